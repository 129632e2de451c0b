"""The rows the rules judge: the columns of the personalization rows and the batch rows, and
the two frames gathered a group of bodies at a time (whole arrays from a regular group, single
rows from any other body)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

PERSONALIZATION_COLUMNS = (
    "n_to",
    "n_cc",
    "n_bcc",
    "email",
    "email_key",
    "in_audience",
    "values_match",
    "reserved_headers",
    "unknown_tags",
    "extra_fields",
    "to_entry_problems",
)
BATCH_COLUMNS = (
    "batch_id",
    "json_object",
    "personalizations",
    "recipients",
    "size",
    "digest_matches",
    "staged_matches",
    "shared_matches",
    "top_level_cc_bcc",
    "top_level_reserved_headers",
    "unresolved_tags",
    "leftover_markers",
    "audience_addresses_shared",
    "audience_data_shared",
)
_TEXT_COLUMNS = frozenset({"email", "email_key", "batch_id"})
# Only compared for equality: handed to GX as numbers, equal for equal text (a fraction of the
# cost of hashing text, which GX does to every column it gets).
_NUMBERED = frozenset({"email_key"})
_BOOL_COLUMNS = frozenset(
    {
        "in_audience",
        "values_match",
        "json_object",
        "digest_matches",
        "staged_matches",
        "shared_matches",
    }
)


class Columns:
    """Columns gathered in parts (whole arrays from regular groups, single rows otherwise)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.parts: dict[str, list[Any]] = {n: [] for n in names}
        self.rows: dict[str, list[Any]] = {n: [] for n in names}

    def append_row(self, **values: Any) -> None:
        for name in self.names:
            self.rows[name].append(values[name])

    def append_columns(self, **columns: Any) -> None:
        self._flush_rows()
        for name in self.names:
            self.parts[name].append(columns[name])

    def _flush_rows(self) -> None:
        if self.rows[self.names[0]]:
            for name in self.names:
                values = self.rows[name]
                if name in _TEXT_COLUMNS:
                    self.parts[name].append(pa.array(values, pa.string()))
                else:
                    dtype = bool if name in _BOOL_COLUMNS else np.int64
                    self.parts[name].append(np.asarray(values, dtype=dtype))
                self.rows[name] = []

    def frame(self) -> pd.DataFrame:
        self._flush_rows()
        data: dict[str, Any] = {}
        for name in self.names:
            parts = self.parts[name]
            if name in _TEXT_COLUMNS:
                joined = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
                data[name] = _numbered(joined) if name in _NUMBERED else joined.to_pandas()
            else:
                dtype = bool if name in _BOOL_COLUMNS else np.int64
                data[name] = np.concatenate(parts).astype(dtype) if parts else np.array([], dtype)
        return pd.DataFrame(data)


def _numbered(values: pa.Array) -> pd.Series:
    """Each distinct text as a number (the order it first appears in), missing stays missing."""
    codes = pc.dictionary_encode(values).indices
    return pd.Series(codes.to_pandas(types_mapper={pa.int32(): pd.Int64Dtype()}.get), dtype="Int64")
