"""extract_audience: read recipients from the source, normalise, drop suppressed and duplicates.

The source is streamed in chunks and written chunk by chunk to a Parquet snapshot, so memory
stays bounded by the chunk size plus the addresses kept so far for dedupe, and those only up to
``SEEN_IN_MEMORY`` of them (``_SeenKeys``): past that, every later row's address key goes to a
file beside the snapshot, DuckDB finds the keys kept twice among them once the source is read,
and one more pass over the snapshot leaves out the later copies. Either way the first row of an
address is the one kept.

Dedupe and suppression compare ``addresses.address_key``, the one key of a mailbox: the IDN and
punycode spellings of one mailbox, its case variants, and a spelling with an invisible character
or a fullwidth form are one person, who gets the message once (and whose suppression, however it
is spelt, holds). Distinct mailboxes (``ann@``, ``a.nn@``, ``ann+x@``) stay distinct.

A suppression list is read through ``addresses.single_address`` first, which takes off the
wrappers people write around an address (``Name <a@x>``, ``mailto:a@x``, ``a@x;``…). A row that
cannot be read as one address is not guessed at: it is counted (``suppressions_unreadable``) and
listed, by row number and masked value, in ``suppressions_unreadable.csv`` next to the snapshot,
so an operator can fix the list before approving.

The outbox's suppression list (``Outbox.suppressed_keys``: whoever unsubscribed, bounced or
was suppressed by an operator, for every campaign) is applied with the campaign's own: its keys
are address keys already. Where both hold a person, the campaign's reason is the one counted;
the list's reasons are counted as ``list:<reason>``, so the approver can tell them apart.

A SQLite or PostgreSQL audience is read through ADBC (``adbc_source``) and normalised
column-wise in Arrow (``arrow_addresses``); any other database, and anything ADBC would not read
as SQLAlchemy does, is read through SQLAlchemy and normalised with pandas. Both give the same
snapshot, counts and errors.
"""

from __future__ import annotations

import csv
import logging
import queue
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.addresses import (
    UnreadableAddress,
    address_key,
    mask_addresses,
    mask_value,
    normalise,
    readable,
    suppression_address,
)
from mailroom.audience.adbc_source import AdbcTarget, NotExact, adbc_target, text_chunks
from mailroom.audience.arrow_addresses import address_keys as arrow_address_keys
from mailroom.audience.arrow_addresses import sendable
from mailroom.campaign_spec import CampaignSpec
from mailroom.errors import AudienceError

log = logging.getLogger(__name__)

CHUNK_ROWS = 100_000
# Address keys held in a set for dedupe (about 100 bytes each) before the rest is deduped on disk.
SEEN_IN_MEMORY = 1_000_000
REQUIRED_COLUMNS = ("user_id", "email", "locale")


@dataclass(frozen=True)
class ExtractCounts:
    extracted: int
    suppressed: int
    suppressed_by_reason: dict[str, int]
    duplicates: int
    locale_defaulted: int
    kept: int
    # Suppression rows that could not be read as one address (listed in the unreadable file):
    # not applied, so the approver must see how many there were.
    suppressions_unreadable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "extracted": self.extracted,
            "suppressed": self.suppressed,
            "suppressed_by_reason": self.suppressed_by_reason,
            "duplicates": self.duplicates,
            "locale_defaulted": self.locale_defaulted,
            "kept": self.kept,
            # Only when there are some: the record of a run without any keeps its shape.
            **(
                {"suppressions_unreadable": self.suppressions_unreadable}
                if self.suppressions_unreadable
                else {}
            ),
        }


def snapshot_schema(fields: tuple[str, ...]) -> pa.Schema:
    columns = ["user_id", "email", "locale", *[f for f in fields if f not in REQUIRED_COLUMNS]]
    return pa.schema([(c, pa.string()) for c in columns])


SUPPRESSED_SCHEMA = pa.schema([("user_id", pa.string()), ("email", pa.string())])
UNREADABLE_SUPPRESSIONS_FILE = "suppressions_unreadable.csv"
UNREADABLE_COLUMNS = ("row", "reason", "value_masked")
# How the outbox's suppression list's reasons are counted, beside the campaign's own.
LIST_REASON_PREFIX = "list:"


@dataclass(frozen=True)
class UnreadableSuppression:
    """A suppression row that is not one address. ``row`` is its position in the suppression
    source, 1 for the first data row (the CSV line after the header, the first row the query
    returns); ``value_masked`` is ``addresses.mask_value`` of it: enough to find the row, not
    to read an address off the run folder."""

    row: int
    reason: str
    value_masked: str


@dataclass
class Suppressions:
    """The suppression list read: reason by address key, and the rows that were not read."""

    reasons: dict[str, str]
    unreadable: list[UnreadableSuppression]


Reader = Literal["auto", "adbc", "sqlalchemy"]


def extract_audience(
    spec: CampaignSpec,
    *,
    sql_url: str | None,
    snapshot: Path,
    suppressed_out: Path | None = None,
    unreadable_suppressions_out: Path | None = None,
    reader: Reader = "auto",
    outbox_suppressions: Mapping[str, str] | None = None,
) -> ExtractCounts:
    """Write the audience snapshot for ``spec`` to ``snapshot`` and return what was dropped.

    ``sql_url`` is the SQLAlchemy URL of the audience database (resolved from the campaign's
    connection by the caller); file sources use the spec's ``url`` instead. ``suppressed_out``
    receives who was left out for a suppression (user id and address key): never recipients,
    but still people whose data no shared part of a request may show (``checks.audience_data``).
    ``unreadable_suppressions_out`` (by default ``suppressions_unreadable.csv`` next to the
    snapshot) lists the suppression rows that are not one address; it is always written, with
    its header only when there are none, so a run folder never holds a stale one.

    ``reader`` is how an audience query is read: ``auto`` through ADBC for SQLite and
    PostgreSQL, else (and wherever ADBC would read a value differently) through SQLAlchemy;
    ``sqlalchemy`` always through SQLAlchemy; ``adbc`` through ADBC or an ``AudienceError``
    saying why not. The suppression list is read through SQLAlchemy.

    ``outbox_suppressions`` is the outbox's suppression list (address key → reason), left out
    too and counted by reason as ``list:<reason>``.
    """
    read = _read_suppressions(spec, sql_url)
    for key, reason in (outbox_suppressions or {}).items():
        read.reasons.setdefault(key, f"{LIST_REASON_PREFIX}{reason}")
    _write_unreadable(
        unreadable_suppressions_out or snapshot.with_name(UNREADABLE_SUPPRESSIONS_FILE),
        read.unreadable,
    )
    schema = snapshot_schema(spec.fields)
    tally = None
    query = spec.audience.query
    if reader != "sqlalchemy" and query and sql_url:
        tally = _through_adbc(
            spec, query, sql_url, read.reasons, schema, snapshot, suppressed_out, reader
        )
    if tally is None:
        tally = _Tally(seen=_SeenKeys(SEEN_IN_MEMORY, snapshot))
        chunks = _pandas_chunks(spec, sql_url, read.reasons, schema, tally)
        _write_snapshot(snapshot, suppressed_out, schema, chunks, tally)
    counts = ExtractCounts(
        extracted=tally.extracted,
        suppressed=sum(tally.suppressed.values()),
        suppressed_by_reason=dict(sorted(tally.suppressed.items())),
        duplicates=tally.duplicates,
        locale_defaulted=tally.defaulted,
        kept=tally.kept,
        suppressions_unreadable=len(read.unreadable),
    )
    if read.unreadable:
        log.warning(
            "extract: %d suppression row(s) are not one address and were not applied; see %s",
            len(read.unreadable),
            UNREADABLE_SUPPRESSIONS_FILE,
        )
    log.info("extract: done %s", counts.to_dict())
    return counts


class _SeenKeys:
    """The address keys of the rows kept so far, for dedupe.

    Up to ``limit`` keys they are held in ``keys``, and every row repeating one of them is left
    out as it is read. Past it ``keys`` is no longer added to (rows repeating one of its keys
    are still left out as read), and the key of every row kept from then on, with whether its
    locale was defaulted, is written to a file beside the snapshot, row for row with the
    snapshot from row ``frozen_at``: a row there repeating an earlier one of those rows is only
    found once the source is read (``_leave_out_later_copies``)."""

    def __init__(self, limit: int, snapshot: Path) -> None:
        self.keys: set[str] = set()
        self.limit = limit
        self.frozen_at: int | None = None
        self.path: Path | None = None
        self._beside = snapshot
        self._writer: pq.ParquetWriter | None = None

    def add(
        self,
        keys: pa.Array,
        defaulted: pa.Array,
        *,
        rows_before: int,
        distinct: set[str] | None = None,
    ) -> None:
        """The keys (missing for none) of one chunk's kept rows, the snapshot's rows from
        ``rows_before`` on, and whether each row's locale was defaulted; ``distinct``: those
        keys as a set, when the caller has it already."""
        if self.frozen_at is None:
            if len(self.keys) + len(keys) <= self.limit:
                if distinct is None:
                    distinct = {k for k in keys.to_pylist() if k is not None}
                self.keys |= distinct
                return
            self.frozen_at = rows_before
            self.path = self._beside.with_name(self._beside.name + ".keys")
            self._writer = pq.ParquetWriter(self.path, _SEEN_SCHEMA)
        assert self._writer is not None
        self._writer.write_table(
            pa.table({"key": keys, "defaulted": defaulted}, schema=_SEEN_SCHEMA)
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_SEEN_SCHEMA = pa.schema([("key", pa.string()), ("defaulted", pa.bool_())])


@dataclass(kw_only=True)
class _Tally:
    """What one pass over the audience has counted so far, and the address keys it has kept."""

    extracted: int = 0
    duplicates: int = 0
    defaulted: int = 0
    kept: int = 0
    seen: _SeenKeys
    suppressed: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Kept:
    """One chunk's outcome: the rows kept, in the snapshot's schema, and who was left out for a
    suppression (``None`` when nobody was)."""

    rows: pa.Table
    left_out: pa.Table | None


def _write_snapshot(
    snapshot: Path,
    suppressed_out: Path | None,
    schema: pa.Schema,
    chunks: Iterator[_Kept],
    tally: _Tally,
) -> None:
    """Write each chunk as it comes (in a thread of its own, while the next one is made: Parquet
    encodes without the GIL), then move the files into place whole."""
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_suffix(".parquet.tmp")
    with ExitStack() as files:
        writer = files.enter_context(pq.ParquetWriter(tmp, schema))
        left_out_writer = (
            files.enter_context(pq.ParquetWriter(_tmp(suppressed_out), SUPPRESSED_SCHEMA))
            if suppressed_out is not None
            else None
        )

        def write(chunk: _Kept) -> None:
            if left_out_writer is not None and chunk.left_out is not None:
                left_out_writer.write_table(chunk.left_out)
            writer.write_table(chunk.rows)

        try:
            with _Behind(write) as behind:
                for chunk in chunks:
                    behind.hand(chunk)
                    log.info("extract: %d rows read, %d kept so far", tally.extracted, tally.kept)
        finally:
            tally.seen.close()
    if tally.seen.path is not None:
        try:
            _leave_out_later_copies(tmp, schema, tally)
        finally:
            tally.seen.path.unlink(missing_ok=True)
    tmp.replace(snapshot)
    if suppressed_out is not None:
        _tmp(suppressed_out).replace(suppressed_out)


def _leave_out_later_copies(snapshot: Path, schema: pa.Schema, tally: _Tally) -> None:
    """The snapshot rewritten without the rows repeating the address of an earlier row kept
    after ``_SeenKeys`` stopped holding keys (only when there is one: DuckDB groups those rows'
    keys on disk, within a memory limit, to find the keys kept twice)."""
    import duckdb

    seen = tally.seen
    assert seen.path is not None
    assert seen.frozen_at is not None
    seen.keys.clear()  # every row before ``frozen_at`` is already the only one of its address
    spill = seen.path.with_name(seen.path.name + ".spill")
    with duckdb.connect(
        config={"memory_limit": "256MB", "temp_directory": str(spill), "threads": 2}
    ) as connection:
        source = "read_parquet('" + str(seen.path).replace("'", "''") + "')"
        twice = set(
            connection.sql(
                f"SELECT key FROM {source} WHERE key IS NOT NULL GROUP BY key HAVING count(*) > 1"
            )
            .to_arrow_table()
            .column("key")
            .to_pylist()
        )
    shutil.rmtree(spill, ignore_errors=True)
    if not twice:
        return
    log.info("extract: leaving out the later rows of %d address(es) kept twice", len(twice))
    rewritten = snapshot.with_name(snapshot.name + ".deduped")
    kept_once: set[str] = set()
    side = _Rows(pq.ParquetFile(seen.path, pre_buffer=False))
    row = 0
    with pq.ParquetWriter(rewritten, schema) as writer:
        written = pq.ParquetFile(snapshot, pre_buffer=False)
        # Row group by row group, each one chunk of the source as first written (an empty one
        # included): the file is the one dedupe in memory writes.
        for group in range(written.num_row_groups):
            rows = written.read_row_group(group).cast(schema)
            start = max(seen.frozen_at - row, 0)
            row += rows.num_rows
            if start < rows.num_rows:
                after = side.take(rows.num_rows - start)
                keep = np.ones(rows.num_rows, dtype=bool)
                for i, key in enumerate(after.column("key").to_pylist()):
                    if key in twice:
                        if key in kept_once:
                            keep[start + i] = False
                        kept_once.add(key)
                dropped = ~keep[start:]
                defaulted = after.column("defaulted").to_numpy(zero_copy_only=False)
                tally.duplicates += int(dropped.sum())
                tally.defaulted -= int((dropped & defaulted).sum())
                tally.kept -= int(dropped.sum())
                rows = rows.filter(pa.array(keep))
            writer.write_table(rows)
    rewritten.replace(snapshot)


class _Rows:
    """A Parquet file's rows handed out in consecutive slices of any length."""

    def __init__(self, file: pq.ParquetFile) -> None:
        self._batches = file.iter_batches(batch_size=CHUNK_ROWS)
        self._pending: list[pa.RecordBatch] = []
        self._held = 0
        self._schema = file.schema_arrow

    def take(self, count: int) -> pa.Table:
        while self._held < count:
            batch = next(self._batches)
            self._pending.append(batch)
            self._held += batch.num_rows
        table = pa.Table.from_batches(self._pending, self._schema)
        rest = table.slice(count)
        self._pending = rest.to_batches()
        self._held = rest.num_rows
        return table.slice(0, count)


class _Behind:
    """Calls ``function`` on each item handed over, in order, in a thread of its own, one item
    behind the caller; an error it raises is raised to the caller at the next hand-over or on
    leaving the ``with`` (which waits for the last item)."""

    def __init__(self, function: Callable[[_Kept], None]) -> None:
        self._function = function
        self._items: queue.Queue[_Kept | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="extract-write", daemon=True)

    def _run(self) -> None:
        while (item := self._items.get()) is not None:
            if self._error is None:
                try:
                    self._function(item)
                except BaseException as exc:  # raised to the caller
                    self._error = exc

    def hand(self, item: _Kept) -> None:
        self._raise()
        self._items.put(item)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _Behind:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._items.put(None)
        self._thread.join()
        if exc_info[0] is None:
            self._raise()


def _through_adbc(
    spec: CampaignSpec,
    query: str,
    sql_url: str,
    suppressions: dict[str, str],
    schema: pa.Schema,
    snapshot: Path,
    suppressed_out: Path | None,
    reader: Reader,
) -> _Tally | None:
    """The snapshot written from ADBC's record batches; ``None`` (nothing kept of this pass)
    when ADBC cannot read the audience as SQLAlchemy would, unless ``reader`` insists."""
    tally = _Tally(seen=_SeenKeys(SEEN_IN_MEMORY, snapshot))
    try:
        target = adbc_target(sql_url)
        log.info("extract: reading the audience through ADBC (%s)", target.driver)
        chunks = _arrow_chunks(spec, query, target, suppressions, schema, tally)
        _write_snapshot(snapshot, suppressed_out, schema, chunks, tally)
    except (NotExact, pa.ArrowException) as exc:
        # An Arrow error here is a limit of the column-wise path (a chunk's text over 2 GiB):
        # the SQLAlchemy reader has none.
        why = str(exc) if isinstance(exc, NotExact) else f"Arrow failed ({type(exc).__name__})"
        if reader == "adbc":
            raise AudienceError(
                f"the audience cannot be read exactly through ADBC: {why}"
            ) from None
        log.info("extract: reading the audience through SQLAlchemy instead: %s", why)
        return None
    return tally


def _pandas_chunks(
    spec: CampaignSpec,
    sql_url: str | None,
    suppressions: dict[str, str],
    schema: pa.Schema,
    tally: _Tally,
) -> Iterator[_Kept]:
    """The audience read through SQLAlchemy (or from its file), normalised with pandas."""
    locales = set(spec.locales)
    seen = tally.seen
    for chunk in _read_audience_chunks(spec, sql_url):
        tally.extracted += len(chunk)
        chunk = _normalise_chunk(chunk, schema)
        keys = address_keys(chunk["email"])
        reasons = keys.map(suppressions)
        is_suppressed = reasons.notna()
        tally.suppressed.update(reasons[is_suppressed].tolist())
        left_out = None
        if is_suppressed.any():
            left_out = pa.table(
                {
                    # As the snapshot reads it (``from_pandas``): a NULL user id among
                    # integers is NaN here, and null there.
                    "user_id": pa.array(
                        chunk.loc[is_suppressed, "user_id"], pa.string(), from_pandas=True
                    ),
                    "email": keys[is_suppressed].tolist(),
                },
                schema=SUPPRESSED_SCHEMA,
            )
        chunk, keys = chunk[~is_suppressed], keys[~is_suppressed]

        # Membership row by row: ``isin(seen)`` would rebuild a hash table of every address
        # seen so far for each chunk, quadratic in the audience.
        earlier = pd.Series([k in seen.keys for k in keys], index=keys.index, dtype=bool)
        is_duplicate = keys.notna() & (keys.duplicated() | earlier)
        tally.duplicates += int(is_duplicate.sum())
        chunk, keys = chunk[~is_duplicate], keys[~is_duplicate]

        unknown = ~chunk["locale"].isin(locales)
        if unknown.any():
            chunk.loc[unknown, "locale"] = chunk.loc[unknown, "locale"].map(
                lambda v: _locale_match(v, locales, spec.default_locale)
            )
            tally.defaulted += int(unknown.sum())
        seen.add(
            pa.array(keys, pa.string(), from_pandas=True),
            pa.array(unknown, pa.bool_()),
            rows_before=tally.kept,
        )
        tally.kept += len(chunk)
        rows = pa.Table.from_pandas(chunk, schema=schema, preserve_index=False)
        yield _Kept(rows, left_out)


def _arrow_chunks(
    spec: CampaignSpec,
    query: str,
    target: AdbcTarget,
    suppressions: dict[str, str],
    schema: pa.Schema,
    tally: _Tally,
) -> Iterator[_Kept]:
    """The audience read through ADBC, normalised column-wise: ``_pandas_chunks``, value for
    value."""
    locales = set(spec.locales)
    for chunk in text_chunks(target, query, tuple(schema.names), CHUNK_ROWS):
        tally.extracted += chunk.rows
        _require_columns(schema, chunk.columns)
        columns = {name: _text_array(chunk.columns[name]) for name in schema.names}
        columns["email"] = sendable(columns["email"])
        columns["locale"], unknown = _arrow_locales(columns["locale"], locales, spec.default_locale)
        keys = arrow_address_keys(columns["email"])
        distinct = set(keys.to_pylist())
        distinct.discard(None)

        left_out = None
        drop = None
        hits = suppressions.keys() & distinct if suppressions else set()
        if hits:
            drop = pc.is_in(keys, value_set=pa.array(sorted(hits), pa.string()))
            suppressed_keys = keys.filter(drop)
            tally.suppressed.update(suppressions[k] for k in suppressed_keys.to_pylist())
            left_out = pa.table(
                {"user_id": columns["user_id"].filter(drop), "email": suppressed_keys},
                schema=SUPPRESSED_SCHEMA,
            )
            keys = pc.if_else(drop, pa.scalar(None, pa.string()), keys)  # no part in dedupe
            distinct -= hits
        repeated = _repeated(keys, distinct, tally.seen.keys)
        if repeated is not None:
            tally.duplicates += pc.sum(repeated).as_py()
            drop = repeated if drop is None else pc.or_(drop, repeated)

        rows = pa.table(columns, schema=schema)
        if drop is not None:
            keep = pc.invert(drop)
            rows, unknown = rows.filter(keep), unknown.filter(keep)
        tally.defaulted += pc.sum(unknown).as_py() or 0
        tally.seen.add(
            keys if drop is None else keys.filter(pc.invert(drop)),
            unknown,
            rows_before=tally.kept,
            distinct=distinct,
        )
        tally.kept += rows.num_rows
        yield _Kept(rows, left_out)


def _arrow_locales(values: pa.Array, locales: set[str], default: str) -> tuple[pa.Array, pa.Array]:
    """Each row's locale as the snapshot holds it (normalised, else its language, else the
    campaign's default), and whether it was not one of ``locales`` as given: once per distinct
    value."""
    encoded = pc.dictionary_encode(values)
    normalised = [_normalise_locale(v) for v in encoded.dictionary.to_pylist()]
    unknown = [n not in locales for n in normalised]
    final = [
        _locale_match(n, locales, default) if u else n
        for n, u in zip(normalised, unknown, strict=True)
    ]
    return (
        pc.fill_null(pc.take(pa.array(final, pa.string()), encoded.indices), default),
        pc.fill_null(pc.take(pa.array(unknown, pa.bool_()), encoded.indices), True),
    )


def _repeated(keys: pa.Array, distinct: set[str], seen: set[str]) -> pa.Array | None:
    """Which rows repeat the key of an earlier row, in this chunk or in an earlier one (whose
    keys are in ``seen``); ``None`` when none does. Rows without a key repeat nothing."""
    earlier = seen & distinct
    if not earlier and len(distinct) == len(keys) - keys.null_count:
        return None
    present = keys.is_valid()
    valid = np.flatnonzero(present.to_numpy(zero_copy_only=False))
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes[valid], return_index=True)
    repeated = np.ones(len(keys), dtype=bool)
    repeated[valid[first]] = False
    result = pa.array(repeated)
    if earlier:
        again = pc.is_in(keys, value_set=pa.array(sorted(earlier), pa.string()))
        result = pc.or_(result, pc.fill_null(again, False))
    return pc.and_(result, present)


def _require_columns(schema: pa.Schema, columns: Container[str]) -> None:
    missing = [c for c in schema.names if c not in columns]
    if missing:
        raise AudienceError(f"audience source lacks required column(s): {', '.join(missing)}")


def _normalise_chunk(chunk: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    _require_columns(schema, chunk.columns)
    out = pd.DataFrame(index=chunk.index)
    for column in schema.names:
        out[column] = _text_series(chunk[column])
    out["email"] = _sendable(out["email"])
    out["locale"] = out["locale"].map(_normalise_locale)
    return out.reset_index(drop=True)


def _text_series(values: pd.Series) -> pd.Series:
    """A column of a source as the snapshot's text: ``str`` of each value, missing kept."""
    if pd.api.types.infer_dtype(values, skipna=True) not in _TEXT_ONLY:
        # BLOBs (bytes) as text: bytes that are not UTF-8 become U+FFFD, which validation
        # quarantines naming the column, rather than failing the extract for everyone.
        values = values.map(_as_text)
    return values.where(values.isna(), values.astype(str)).astype(object)


def _text_array(values: pa.Array | list[object]) -> pa.Array:
    """A column ``adbc_source`` read: text already, or the DB-API driver's values, made text as
    ``_text_series`` makes a column the SQLAlchemy reader built (and its chunk built the same
    way, a frame of row tuples)."""
    if isinstance(values, pa.Array):
        return values
    column = pd.DataFrame([(v,) for v in values], columns=["value"])["value"]
    return pa.array(_text_series(column), type=pa.string(), from_pandas=True)


_TEXT_ONLY = frozenset({"string", "empty", "integer", "floating", "mixed-integer-float", "boolean"})


def _as_text(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return value


def _sendable(emails: pd.Series) -> pd.Series:
    """What is sent: ``normalise`` (trimmed, the domain lower-cased and IDNA-encoded, the local
    part's case kept) of the address as it reads, so that an invisible character or a fullwidth
    form pasted into the source does not make an undeliverable address that hides a duplicate.
    Only non-ASCII values need reading; most of an audience is ASCII."""
    text = emails.astype("string[pyarrow]")
    non_ascii = ~text.str.isascii().fillna(True).astype(bool)
    values = emails.tolist()
    if non_ascii.any():
        for i in non_ascii.to_numpy().nonzero()[0]:
            values[i] = readable(values[i])
    return pd.Series([normalise(v) for v in values], index=emails.index, dtype=object)


# Text, an "@", and text without one: ``rpartition("@")`` gives a local part and a domain.
_SHAPED = r"(?s)^.+@[^@]+$"


def address_keys(emails: pd.Series) -> pd.Series:
    """``address_key`` of every value of ``emails`` as ``_sendable`` writes them (normalised),
    ``None`` where there is no address. For ASCII values, most of an audience, the key is the
    lower-cased value when an ``@`` has text on both sides (``normalise`` already trimmed it and
    encoded the domain), computed by Arrow; the rest go through ``address_key`` itself."""
    text = emails.astype("string[pyarrow]")
    is_ascii = text.str.isascii().fillna(False).astype(bool)
    low = text.str.lower()
    shaped = (is_ascii & low.str.contains(_SHAPED, regex=True)).fillna(False).astype(bool)
    keys = low.astype(object).where(shaped, None)
    rest = ~is_ascii & text.notna()
    if rest.any():
        keys[rest] = emails[rest].map(address_key)
    return keys


def _tmp(path: Path) -> Path:
    """Where a file is written before it is moved into place whole."""
    return path.with_suffix(".parquet.tmp")


@lru_cache(maxsize=4096)
def _normalise_locale(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    language, _, region = value.strip().replace("-", "_").partition("_")
    return f"{language.lower()}_{region.upper()}" if region else language.lower()


def _locale_match(value: object, locales: set[str], default: str) -> str:
    """A user's locale the campaign has, else its language, else the campaign's default."""
    if isinstance(value, str):
        if value in locales:
            return value
        language = value.partition("_")[0]
        if language in locales:
            return language
    return default


def _read_audience_chunks(spec: CampaignSpec, sql_url: str | None) -> Iterator[pd.DataFrame]:
    source = spec.audience
    if source.query:
        yield from _sql_chunks(_require_url(sql_url, spec), source.query)
    elif source.url:
        yield from _file_chunks(source.url)


def _read_suppressions(spec: CampaignSpec, sql_url: str | None) -> Suppressions:
    """Every suppression row, read as one address and keyed by ``address_key`` (as the audience
    is), with its reason. NULL, blank and unreadable rows are collected, not raised: one bad row
    must not stop a run, nor hide the rows after it."""
    source = spec.audience
    frames: Iterator[pd.DataFrame]
    if source.suppressions_query:
        frames = _sql_chunks(_require_url(sql_url, spec), source.suppressions_query)
    elif source.suppressions_url:
        frames = _file_chunks(source.suppressions_url)
    else:
        return Suppressions({}, [])
    result: dict[str, str] = {}
    unreadable: list[UnreadableSuppression] = []
    row = 0
    for frame in frames:
        if "email" not in frame.columns:
            raise AudienceError("suppression source lacks the 'email' column")
        reasons = frame["reason"].tolist() if "reason" in frame.columns else [None] * len(frame)
        for value, reason in zip(frame["email"].tolist(), reasons, strict=True):
            row += 1
            try:
                _, key = suppression_address(value)
            except UnreadableAddress as exc:
                unreadable.append(UnreadableSuppression(row, str(exc), mask_value(value)))
                continue
            result[key] = _reason(reason)
    return Suppressions(result, unreadable)


def _reason(value: object) -> str:
    """A suppression's reason; ``suppressed`` when the source has none (NULL, NaN, blank)."""
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return "suppressed"
    return str(value).strip()


def _write_unreadable(path: Path, rows: list[UnreadableSuppression]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(UNREADABLE_COLUMNS)
        writer.writerows((r.row, r.reason, r.value_masked) for r in rows)
    tmp.replace(path)


def _require_url(sql_url: str | None, spec: CampaignSpec) -> str:
    if not sql_url:
        raise AudienceError(
            f"campaign {spec.name!r} reads its audience through connection "
            f"{spec.audience.connection_id!r}, which resolved to no database URL"
        )
    return sql_url


def _sql_chunks(sql_url: str, query: str) -> Iterator[pd.DataFrame]:
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    engine = sa.create_engine(sql_url)
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(sa.text(query))
            columns = list(result.keys())
            # Rows as plain tuples: a frame built from SQLAlchemy's rows costs a failed
            # attribute lookup per row. (Not from the DB-API cursor directly: with a
            # server-side cursor SQLAlchemy has already buffered the first row.)
            while rows := result.fetchmany(CHUNK_ROWS):
                yield pd.DataFrame(list(map(tuple, rows)), columns=columns)
    except SQLAlchemyError as exc:
        reason = _without_values(str(getattr(exc, "orig", None) or exc).splitlines()[0])
        # Not chained: the driver's own error may quote a recipient's value, and a task log
        # prints the whole chain.
        raise AudienceError(
            "cannot read the audience database "
            f"({engine.url.render_as_string(hide_password=True)}): "
            f"{reason}"
        ) from None
    finally:
        engine.dispose()


def _without_values(reason: str) -> str:
    """A database error as the run may log it: SQLite quotes a value it cannot decode
    ("Could not decode to UTF-8 column 'first_name' with text '…'"), and a value is a
    recipient's; and any address is masked."""
    reason = re.sub(r" with text '.*", " (the value is not shown)", reason)
    return mask_addresses(reason)


def _file_chunks(url: str) -> Iterator[pd.DataFrame]:
    path = url.removeprefix("file://")
    try:
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(path, pre_buffer=False)
            for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
                yield batch.to_pandas()
        elif path.endswith(".csv"):
            yield from pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
        else:
            raise AudienceError(f"audience url {url!r}: only .csv and .parquet files are supported")
    except FileNotFoundError as exc:
        raise AudienceError(f"audience file not found: {url}") from exc
