"""The validated audience: who may receive, and what each one's envelope must carry.

The gate looks every address of the bodies up here, recomputes each recipient's substitutions and
headers from their own row (``envelope_value_columns``, with the unsubscribe tokens made ahead in
a second process: ``audience_tokens``), and finds the audience addresses that the parts every
recipient sees would show.

An address's row is the audience row holding it, lower-cased (should the audience hold it more
than once, which the validation never lets it, the last such row). The audience is never held
whole to find it: one pass over the file writes each locale's rows, in audience order, with
their lower-cased address (their ``key``) and row number, to a file of its own in a scratch
folder (the rows of no campaign locale to one more), and every key to ``run_keys.RunKeys``,
which names the addresses the audience holds more than once. The bodies are frozen in audience
order within each locale, so each locale's file is then read as a cursor alongside them, a
batch at a time with the tokens the second process made for it: an address is looked for at
the cursor's same position first, then among the rows just ahead (over anyone the run leaves
out). Only an address not there (reordered, in two requests, of another locale, outside the
audience), or held twice by the audience, is looked up by key, in one scan of every file for
all such addresses of a group of bodies (``_lookup``): an irregular body costs time, never the
verdict.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.addresses import addresses_shown
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.audience_data import text_of
from mailroom.envelopes import envelope_value_columns
from mailroom.run_keys import RunKeys
from mailroom.unsubscribe import TokensInBackground, token_column

# Audience rows read at a time, by the pass that splits the file and by each locale's cursor.
READ_ROWS = 65_536
# Bytes read from a Parquet file at a time by the scans above.
STREAM_BUFFER = 1 << 20
# DuckDB's memory for finding an address the audience holds twice (none, as a rule): it runs
# while the bodies are read, so it is kept low, and spills to the scratch folder beyond it.
TWICE_MEMORY_MB = 128


@dataclass(frozen=True)
class Found:
    """Where each address of a group is in the audience (``rows``: its row number, -1 for
    none) and, for those found, in that order, their own row's value columns and token
    (``own``)."""

    rows: np.ndarray
    own: pa.Table


class Audience:
    """The validated audience by lower-cased address, a locale's rows at a time (see the
    module); each recipient's own values recomputed from their row (``envelope_value_columns``),
    never taken from the bodies. Close it (or use it as a context manager) to remove its
    scratch folder."""

    def __init__(
        self,
        spec: CampaignSpec,
        secret: bytes,
        path: Path,
        tokens: TokensInBackground,
        *,
        read_rows: int | None = None,
    ) -> None:
        self.spec = spec
        self.secret = secret
        self._tokens = tokens
        self._read_rows = read_rows or READ_ROWS
        self._locales = tuple(dict.fromkeys(spec.locales))
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        self.rows = file.metadata.num_rows
        # What the recomputed values are made of: the user id and the campaign's fields.
        self._values = [c for c in dict.fromkeys(["user_id", *spec.fields]) if c in names]
        self._folder = Path(tempfile.mkdtemp(prefix="mailroom-audience-"))
        self._parts: dict[int, Path] = {}  # a locale's index (the rest: one past the last) → file
        self._cursors: dict[str, _Cursor] = {}
        self._known: dict[str, bool] = {}
        self._addresses_in: dict[str, frozenset[str]] = {}
        self._twice: pa.Array | None = None
        try:
            self._pending_twice = self._split(path, has_locale="locale" in names)
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise

    def __enter__(self) -> Audience:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._cursors.clear()
        with contextlib.suppress(Exception):  # the scratch folder goes either way
            self._pending_twice.result()
        shutil.rmtree(self._folder, ignore_errors=True)

    # --- the pass that splits the audience by locale ------------------------------------------
    def _split(self, path: Path, *, has_locale: bool) -> Future[pa.Array]:
        """Write each locale's rows (row number, key and value columns) to its own file, and
        every key to a ``RunKeys``, whose keys held twice are then found in a thread of their
        own (DuckDB works without the GIL) while the caller goes on."""
        keys = RunKeys(["key"], folder=self._folder / "keys", memory_limit_mb=TWICE_MEMORY_MB)
        writers: dict[int, pq.ParquetWriter] = {}
        columns = list(dict.fromkeys([*self._values, "email", *(["locale"] * has_locale)]))
        start = 0
        try:
            for batch in _streamed(path).iter_batches(batch_size=self._read_rows, columns=columns):
                key = pc.cast(_lower(batch.column("email")), pa.string())
                table = pa.table(
                    {
                        "row": pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64)),
                        "key": key,
                        **{name: batch.column(name) for name in self._values},
                    }
                )
                start += batch.num_rows
                keys.add(key=key)
                placed = np.zeros(batch.num_rows, dtype=bool)
                if has_locale:
                    locale = batch.column("locale")
                    for part, name in enumerate(self._locales):
                        mine = pc.fill_null(pc.equal(locale, name), False)
                        mine_np = mine.to_numpy(zero_copy_only=False)
                        if mine_np.any():
                            self._write(writers, part, table.filter(mine))
                            placed |= mine_np
                if not placed.all():
                    self._write(writers, len(self._locales), table.filter(pa.array(~placed)))
        except BaseException:
            keys.close()
            raise
        finally:
            for writer in writers.values():
                writer.close()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-audience")
        try:
            return pool.submit(_held_twice, keys)
        finally:
            pool.shutdown(wait=False)

    def _write(self, writers: dict[int, pq.ParquetWriter], part: int, table: pa.Table) -> None:
        writer = writers.get(part)
        if writer is None:
            self._parts[part] = self._folder / f"{part}.parquet"
            writer = writers[part] = pq.ParquetWriter(
                self._parts[part], table.schema, compression="none"
            )
        writer.write_table(table)

    def _held_twice(self) -> pa.Array | None:
        """The keys more than one audience row holds (``None`` for none: the usual case)."""
        if self._twice is None:
            twice = self._pending_twice.result()
            self._twice = twice if len(twice) else pa.array([], pa.string())
        return self._twice if len(self._twice) else None

    # --- finding the addresses of a group of bodies ---------------------------------------------
    def find(self, keys: pa.Array, segments: Sequence[tuple[str, int]]) -> Found:
        """The audience row (and own values) of each lower-cased address of ``keys``.
        ``segments``: the locale of each run of them, in order (the requests they are in), which
        says whose rows to look at first."""
        count = len(keys)
        rows = np.full(count, -1, dtype=np.int64)
        positions: list[np.ndarray] = []
        owns: list[pa.Table] = []
        twice = self._held_twice()
        missed = np.zeros(count, dtype=bool)
        # Each run of one locale: its cursor, the file of its locale, where it starts and ends,
        # and how many of its addresses the cursor found.
        segments_seen: list[tuple[_Cursor, int, int, int, int]] = []
        start = 0
        for locale, size in _runs(segments):
            run = keys.slice(start, size)
            cursor = self._cursor(locale)
            at, window = cursor.find(run, twice)
            in_window = np.flatnonzero(at >= 0)
            if len(in_window):
                rows[start + in_window] = window.column("row").to_numpy()[at[in_window]]
                positions.append(start + in_window)
                owns.append(window.take(pa.array(at[in_window])))
            missed[start : start + size] = (at < 0) & run.is_valid().to_numpy(zero_copy_only=False)
            segments_seen.append(
                (cursor, self._part_of(locale), start, start + size, len(in_window))
            )
            start += size
        if missed.any():
            where = np.flatnonzero(missed)
            looked_up, table = self._lookup(keys.filter(pa.array(missed)))
            found = looked_up >= 0
            if found.any():
                own = table.take(pa.array(looked_up[found]))
                rows[where[found]] = own.column("row").to_numpy()
                positions.append(where[found])
                owns.append(own)
                # Most of a run's addresses found further on in its locale than its cursor
                # looked: the run leaves out everyone between, and its cursor goes on from there.
                parts = own.column("part").to_numpy()
                found_rows = own.column("row").to_numpy()
                found_at = where[found]
                for cursor, part, first, end, in_place in segments_seen:
                    mine = (parts == part) & (found_at >= first) & (found_at < end)
                    if mine.sum() > in_place:
                        cursor.pass_row(int(found_rows[mine].max()))
        if not positions:
            return Found(rows, self._empty())
        order = np.argsort(np.concatenate(positions), kind="stable")
        columns = [*self._values, "token"]
        own = pa.concat_tables([t.select(columns) for t in owns]).take(pa.array(order))
        return Found(rows, own)

    def _cursor(self, locale: str) -> _Cursor:
        if locale not in self._cursors:
            path = self._parts.get(self._part_of(locale))
            self._cursors[locale] = _Cursor(
                path if locale in self._locales else None,
                lambda rows, ids: self._tokens.take(locale, rows, ids),
                self._read_rows,
            )
        return self._cursors[locale]

    def _part_of(self, locale: str) -> int:
        return self._locales.index(locale) if locale in self._locales else -1

    def _lookup(self, keys: pa.Array) -> tuple[np.ndarray, pa.Table]:
        """Each key's last audience row: its index in the table returned (-1 for none), which
        holds those rows with their token (made here) and which file (``part``) they are in."""
        wanted = pc.unique(keys.drop_null())
        tables = [
            table.append_column("part", pa.array(np.full(table.num_rows, part, np.int64)))
            for part, table in self._scan(wanted)
        ]
        if not tables:
            return np.full(len(keys), -1, dtype=np.int64), self._empty()
        # The last row holding a key first: ``index_in`` finds a key's first.
        table = pa.concat_tables(tables).sort_by([("row", "descending")])
        table = table.append_column(
            "token",
            token_column(self.secret, self.spec.name, table.column("user_id").combine_chunks()),
        )
        at = pc.index_in(keys, value_set=table.column("key").combine_chunks(), skip_nulls=True)
        return pc.fill_null(at, -1).to_numpy(zero_copy_only=False).astype(np.int64), table

    def _scan(self, wanted: pa.Array) -> Iterator[tuple[int, pa.Table]]:
        """Every audience row holding one of ``wanted`` keys, by file: the keys are read first,
        and the rest of a row group only when it holds one."""
        if not len(wanted):
            return
        for part, path in self._parts.items():
            file = pq.ParquetFile(path)
            for group in range(file.num_row_groups):
                keys = file.read_row_group(group, columns=["key"]).column("key")
                hit = pc.is_in(keys, value_set=wanted)
                if pc.any(hit).as_py():
                    yield part, file.read_row_group(group).filter(hit)

    def _empty(self) -> pa.Table:
        return pa.table(
            {
                **{name: pa.array([], pa.string()) for name in self._values},
                "token": pa.array([], pa.string()),
            }
        )

    def values(self, found: Found) -> tuple[dict[str, pa.Array], dict[str, pa.Array]]:
        """The substitutions and headers of every address found, in order."""
        own = found.own
        return envelope_value_columns(
            self.spec,
            self.secret,
            own.select(self._values),
            tokens=own.column("token").combine_chunks(),
        )

    # --- audience addresses in what every recipient sees ----------------------------------------
    def known(self, candidates: Iterable[str]) -> set[str]:
        """Which of ``candidates`` (lower-cased addresses) are in the audience."""
        wanted = set(candidates)
        new = sorted(wanted - set(self._known))
        if new:
            found: set[str] = set()
            for _, table in self._scan(pa.array(new, pa.string())):
                found.update(table.column("key").to_pylist())
            self._known.update((key, key in found) for key in new)
        return {key for key in wanted if self._known[key]}

    def addresses_in(self, text: str) -> frozenset[str]:
        """The audience addresses ``text`` shows, remembered per text."""
        if text not in self._addresses_in:
            self._addresses_in[text] = _addresses_in(text, self)
        return self._addresses_in[text]


class _Cursor:
    """One locale's rows in audience order, read from its file a batch at a time, each batch
    with its tokens; the rows held start at the first row not yet passed."""

    def __init__(
        self,
        path: Path | None,
        tokens: Callable[[np.ndarray, pa.Array | pa.ChunkedArray], pa.Array],
        read_rows: int,
    ) -> None:
        self._batches: Iterator[pa.RecordBatch] = (
            _streamed(path).iter_batches(batch_size=read_rows) if path else iter(())
        )
        self._tokens = tokens
        self._read_rows = read_rows
        self._held: list[pa.Table] = []
        self._count = 0

    def find(self, keys: pa.Array, twice: pa.Array | None) -> tuple[np.ndarray, pa.Table]:
        """Where in the rows just ahead each key is (-1: not there, or held twice by the
        audience), and those rows; the cursor passes the furthest row found."""
        count = len(keys)
        window = self._ahead(count + max(count, self._read_rows))
        at = np.full(count, -1, dtype=np.int64)
        if not window.num_rows or not count:
            return at, window
        ahead = window.column("key")
        # In audience order, every address is at its own position.
        same = min(count, window.num_rows)
        equal = pc.fill_null(pc.equal(keys.slice(0, same), ahead.slice(0, same)), False)
        in_place = np.flatnonzero(equal.to_numpy(zero_copy_only=False))
        at[in_place] = in_place
        rest = at < 0
        if rest.any():
            found = pc.index_in(keys.filter(pa.array(rest)), value_set=ahead, skip_nulls=True)
            at[rest] = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
        if twice is not None:
            at[pc.is_in(keys, value_set=twice).to_numpy(zero_copy_only=False)] = -1
        if (at >= 0).any():
            self._drop(int(at.max()) + 1)
        return at, window

    def pass_row(self, row: int) -> None:
        """Pass every row up to audience row ``row``."""
        while True:
            if not self._held and not self._read():
                return
            rows = self._held[0].column("row").to_numpy()
            if rows[-1] > row:
                self._drop(int(np.searchsorted(rows, row, side="right")))
                return
            self._drop(len(rows))

    def _ahead(self, count: int) -> pa.Table:
        while self._count < count and self._read():
            pass
        if not self._held:
            return pa.table({"row": pa.array([], pa.int64()), "key": pa.array([], pa.string())})
        return pa.concat_tables(self._held).slice(0, count).combine_chunks()

    def _read(self) -> bool:
        batch = next(self._batches, None)
        if batch is None:
            return False
        tokens = self._tokens(batch.column("row").to_numpy(), batch.column("user_id"))
        self._held.append(pa.Table.from_batches([batch]).append_column("token", tokens))
        self._count += batch.num_rows
        return True

    def _drop(self, count: int) -> None:
        """Pass the first ``count`` rows held."""
        while count and self._held:
            first = self._held[0]
            if first.num_rows <= count:
                self._held.pop(0)
                count -= first.num_rows
                self._count -= first.num_rows
            else:
                self._held[0] = first.slice(count)
                self._count -= count
                count = 0


def _streamed(path: Path) -> pq.ParquetFile:
    """A Parquet file read a page at a time (a row group can be the whole audience)."""
    return pq.ParquetFile(path, buffer_size=STREAM_BUFFER, pre_buffer=False)


def _runs(segments: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Consecutive segments of one locale as one."""
    out: list[tuple[str, int]] = []
    for locale, size in segments:
        if out and out[-1][0] == locale:
            out[-1] = (locale, out[-1][1] + int(size))
        else:
            out.append((locale, int(size)))
    return out


def _held_twice(keys: RunKeys) -> pa.Array:
    with keys:
        return keys.repeated("key")


def audience_tokens(spec: CampaignSpec, secret: bytes, valid_audience: Path) -> TokensInBackground:
    """Every recipient's unsubscribe token (one HMAC each, the largest part of the gate's own
    work), made in a second process, locale by locale in the order the bodies are read, while
    the bodies are read and checked in this one."""
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
    return frozenset(audience.known(candidates)) if candidates else frozenset()


def _lower(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``str.lower`` of every value (Arrow's lower-casing is Python's for ASCII only)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if len(values) == 0 or pc.all(pc.string_is_ascii(values)).as_py() is not False:
        return pc.ascii_lower(values)
    return pa.array([v.lower() if v is not None else None for v in values.to_pylist()], pa.string())
