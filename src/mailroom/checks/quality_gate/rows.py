"""The rows the rules judge: the columns of the personalization rows and the batch rows, gathered
a group of bodies at a time (whole arrays from a regular group, single rows from any other body).

A group's personalization rows are an Arrow table (``Columns.table``, as ``explode`` spills them);
what Great Expectations gets is a pandas frame of some of them (``personalization_frame``), where
the address key gives way to ``ONCE_IN_RUN``: whether no other personalization of the whole run
has that key, which no chunk of rows can tell on its own (``explode.ExplodedRun`` works it out).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

PERSONALIZATION_COLUMNS = (
    "n_to",
    "n_cc",
    "n_bcc",
    "email",
    "email_key",
    "audience_row",
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
# The run-wide column of the personalization frames: no other personalization of the run has
# the row's address key (missing where it has none).
ONCE_IN_RUN = "email_key_once_in_run"
# The columns of the personalization frames GX validates: the address key and the audience row
# the address was found at (-1: none) only say who is who, and give way to ``ONCE_IN_RUN``.
PERSONALIZATION_FRAME_COLUMNS = tuple(
    ONCE_IN_RUN if name == "email_key" else name
    for name in PERSONALIZATION_COLUMNS
    if name != "audience_row"
)
_TEXT_COLUMNS = frozenset({"email", "email_key", "batch_id"})
_NO_TEXT = pa.array([], pa.string())
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

    def table(self) -> pa.Table:
        """Every row gathered, as Arrow (text as ``string``, counts as ``int64``), and none
        kept."""
        self._flush_rows()
        data: dict[str, Any] = {}
        for name in self.names:
            parts = self.parts[name]
            if name in _TEXT_COLUMNS:
                data[name] = pa.concat_arrays([p.cast(pa.string()) for p in parts] or [_NO_TEXT])
            else:
                dtype = bool if name in _BOOL_COLUMNS else np.int64
                data[name] = pa.array(
                    np.concatenate(parts).astype(dtype) if parts else np.array([], dtype)
                )
            self.parts[name] = []
        return pa.table(data)

    def frame(self) -> pd.DataFrame:
        """Every row gathered, as the frame GX validates."""
        return _frame(self.table())


def personalization_frame(
    rows: pa.Table, once_in_run: pa.Array, *, with_keys: bool = False
) -> pd.DataFrame:
    """Personalization rows (``Columns.table``) as GX validates them, ``once_in_run`` (each
    row's ``ONCE_IN_RUN``) in place of the address key. ``with_keys`` keeps the key and the
    audience row too, after the other columns."""
    checked = rows.drop_columns(["audience_row"])
    index = checked.schema.get_field_index("email_key")
    frame = _frame(checked.set_column(index, ONCE_IN_RUN, once_in_run))
    if with_keys:
        frame["email_key"] = rows.column("email_key").to_pandas()
        frame["audience_row"] = rows.column("audience_row").to_numpy()
    return frame


def _frame(rows: pa.Table) -> pd.DataFrame:
    """Text as Python strings, flags as ``bool`` (``ONCE_IN_RUN`` as Python objects: it can be
    missing), counts as ``int64``."""
    data: dict[str, Any] = {}
    for name in rows.column_names:
        column = rows.column(name)
        if name in _TEXT_COLUMNS:
            data[name] = column.to_pandas()
        elif name == ONCE_IN_RUN:  # the same dtype whether a chunk misses a key or not
            data[name] = column.to_pandas().astype(object)
        else:
            dtype = bool if name in _BOOL_COLUMNS else np.int64
            data[name] = column.to_numpy().astype(dtype)
    return pd.DataFrame(data)
