"""The validated audience: who may receive, and what each one's envelope must carry.

The gate looks every address of the bodies up here, recomputes each recipient's substitutions and
headers from their own row (``envelope_value_columns``, with the unsubscribe tokens made in a
second process by ``audience_tokens``), and finds the audience addresses that the parts every
recipient sees would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.addresses import addresses_shown
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.audience_data import text_of
from mailroom.envelopes import envelope_value_columns
from mailroom.unsubscribe import TokensInBackground


class Audience:
    """The validated audience by lower-cased address; each recipient's own values recomputed
    from their row (``envelope_value_columns``), never taken from the bodies.

    Finding a recipient's row: the bodies are normally frozen in audience order within each
    locale, so the row at the same position is tried first and kept when its address is the
    same; any other address is looked up by hash (the last row with it, should the audience
    hold it twice). The position is only a hint: the address decides.
    """

    def __init__(
        self, spec: CampaignSpec, secret: bytes, path: Path, tokens: TokensInBackground
    ) -> None:
        self.spec = spec
        self.secret = secret
        self.table = pq.read_table(path)
        self._tokens = tokens
        self.keys = _lower(self.table.column("email").combine_chunks())
        self._by_locale: dict[str, np.ndarray] = {}
        if "locale" in self.table.column_names:
            locales = pc.dictionary_encode(self.table.column("locale").combine_chunks())
            codes = pc.fill_null(locales.indices, -1).to_numpy(zero_copy_only=False)
            for i, locale in enumerate(locales.dictionary.to_pylist()):
                self._by_locale[str(locale)] = np.flatnonzero(codes == i)
        self._next: dict[str, int] = {}
        self._index: pd.Index | None = None
        self._rows: np.ndarray | None = None
        self._known: dict[str, bool] = {}
        # What the recomputed values are made of: the user id and the campaign's fields.
        needed = ["user_id", *spec.fields]
        self._value_rows = self.table.select(
            list(dict.fromkeys(c for c in needed if c in self.table.column_names))
        )
        self._addresses_in: dict[str, frozenset[str]] = {}

    def addresses_in(self, text: str) -> frozenset[str]:
        """The audience addresses ``text`` shows, remembered per text."""
        if text not in self._addresses_in:
            self._addresses_in[text] = _addresses_in(text, self)
        return self._addresses_in[text]

    def hint(self, locale: str, count: int) -> np.ndarray:
        """The rows the next ``count`` recipients of ``locale`` hold in audience order (-1 past
        the end)."""
        start = self._next.get(locale, 0)
        self._next[locale] = start + count
        positions = self._by_locale.get(locale, np.empty(0, dtype=np.int64))[start : start + count]
        out = np.full(count, -1, dtype=np.int64)
        out[: len(positions)] = positions
        return out

    def find(self, keys: pa.Array, hint: np.ndarray) -> np.ndarray:
        """The audience row of each key (-1 for none)."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        hinted = hint >= 0
        if hinted.any():
            there = self.keys.take(pa.array(np.where(hinted, hint, 0)))
            same = pc.fill_null(pc.equal(keys, there), False).to_numpy(zero_copy_only=False)
            same &= hinted
            rows[same] = hint[same]
        else:
            same = np.zeros(len(keys), dtype=bool)
        rest = ~same & keys.is_valid().to_numpy(zero_copy_only=False)
        if rest.any():
            rows[rest] = self._lookup(keys.filter(pa.array(rest)))
        return rows

    def _lookup(self, keys: pa.Array) -> np.ndarray:
        if self._index is None:
            index = pd.Index(self.keys.to_pandas())
            rows = pd.Series(np.arange(len(index), dtype=np.int64), index=index)
            rows = rows[rows.index.notna() & ~rows.index.duplicated(keep="last")]
            self._index, self._rows = pd.Index(rows.index), rows.to_numpy()
        assert self._rows is not None
        found: np.ndarray = self._index.get_indexer(pd.Index(keys.to_pandas()))
        return np.where(found >= 0, self._rows[found], -1)

    def __contains__(self, key: str) -> bool:
        if key not in self._known:
            self._known[key] = bool(pc.any(pc.equal(self.keys, key)).as_py())
        return self._known[key]

    def values(self, rows: np.ndarray) -> tuple[dict[str, pa.Array], dict[str, pa.Array]]:
        return envelope_value_columns(
            self.spec,
            self.secret,
            self._value_rows.take(pa.array(rows)),
            tokens=self._tokens.take(rows),
        )


def audience_tokens(spec: CampaignSpec, secret: bytes, valid_audience: Path) -> TokensInBackground:
    """Every recipient's unsubscribe token (one HMAC each, the largest part of the gate's own
    work), made in a second process while the bodies are read and checked in this one."""
    rows = pq.ParquetFile(valid_audience).metadata.num_rows
    return TokensInBackground(secret, spec.name, valid_audience, rows=rows, locales=spec.locales)


def audience_addresses_in(shared: dict[str, Any], audience: Audience) -> int:
    """How many audience addresses the parts every recipient sees show, however written (the
    campaign's public addresses are not counted).

    Field by field (no address can span two: the quotes between them are no address's), and
    each field's text once: every request of a locale shares its content."""
    found: set[str] = set()
    for key, value in shared.items():
        found |= audience.addresses_in(text_of({key: value}))
    return len(found)


def _addresses_in(text: str, audience: Audience) -> frozenset[str]:
    """The audience addresses ``text`` shows, read as a person reads it
    (``addresses.addresses_shown``), but the campaign's own public addresses."""
    candidates = addresses_shown(text) - audience.spec.public_addresses
    return frozenset(c for c in candidates if c in audience)


def _lower(values: pa.Array) -> pa.Array:
    """``str.lower`` of every value (Arrow's lower-casing is Python's for ASCII only)."""
    if len(values) == 0 or pc.all(pc.string_is_ascii(values)).as_py() is not False:
        return pc.ascii_lower(values)
    return pa.array([v.lower() if v is not None else None for v in values.to_pylist()], pa.string())
