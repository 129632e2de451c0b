"""validate_audience: the Great Expectations suite on the audience snapshot.

GX itself names the failing rows (by user id); those rows go to the quarantine file with the
expectation that caught them as the reason. Above the campaign's threshold the run fails.

The snapshot is read ``chunk_rows`` rows at a time, twice, and neither pass holds more than a
chunk of it (besides the few values that show an address and the keys held twice), so the
stage's memory stays flat however large the audience. GX validates one
chunk at a time (``gx_runtime.validate_chunks``), which only judges a row by that row; what a
row's verdict owes to the whole audience is computed into columns of the row beforehand, from
every row's keys kept on disk by ``run_keys.RunKeys`` (Parquet files DuckDB reads with a
memory limit) rather than from a Python set of every row, which would grow with the audience:

- a user id or address key held by more than one row of the audience: the first pass adds
  every row's keys, and ``<column>__once_in_audience`` is False on every copy of a repeated key
  (GX's own uniqueness check flags every copy on a whole table), checked row by row;
- a field showing another member's address (below): the first pass reads what the few values
  that may show an address show; the keys answer which of those addresses are members'.

The valid file keeps the snapshot's row order, and the result, the files and the verdict are
those one chunk of the whole audience would give.

GX's own Data Docs of the merged result (counts only: never a row's value) can be left with the
run (``audience/data_docs``), as the gate leaves its own.

A row whose template field shows another audience member's address (a first name holding a
batch-mate's address) is quarantined here, with that reason: sent, it would show one person's
address to another, and the guard would refuse its whole batch after approval and halt the run.
"Shows" is ``addresses.addresses_shown``, the reading of a person (markup, entities,
%-encoding, invisible characters, fullwidth forms and "(at)"/"(dot)" spellings undone, IDN
domains in either form), compared by ``address_key`` with the key of every extracted person
(suppressed people included). A field showing the row's own address, or one of the campaign's
own public addresses (sender, reply-to, unsubscribe mailbox, which every recipient sees in the
message anyway, even when staff are on the list), is no danger and goes out.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.addresses import SINGLE_ADDRESS_PATTERN, addresses_shown
from mailroom.audience.extract import address_keys
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.limits import MAX_SUBSTITUTIONS_BYTES
from mailroom.envelopes import substitutions_fit
from mailroom.errors import ValidationFailed
from mailroom.gx_runtime import summarise, validate_chunks
from mailroom.run_keys import RunKeys
from mailroom.staging import RunStaging

log = logging.getLogger(__name__)

SEPARATORS_PATTERN = r"[,;\s<>\"]"
# Rows read, checked and written at a time: the stage's memory is about that of one chunk.
CHUNK_ROWS = 200_000
MISSING_USER_ID = "user_id missing"
# The keys no two rows of an audience may share.
ONCE_IN_AUDIENCE = ("user_id", "email_key")


@dataclass(frozen=True)
class AudienceValidation:
    total: int
    valid: int
    quarantined: int
    quarantined_by_reason: dict[str, int]
    per_locale: dict[str, int]
    gx: dict[str, Any]
    data_docs: str | None = None  # GX's Data Docs index, relative to the run folder

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "valid": self.valid,
            "quarantined": self.quarantined,
            "quarantined_by_reason": self.quarantined_by_reason,
            "per_locale": self.per_locale,
            "gx": self.gx,
            "data_docs": self.data_docs,
        }


def audience_expectations(spec: CampaignSpec) -> list[Any]:
    import great_expectations.expectations as gxe

    expectations: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValuesToBeInSet(column=_once_in_audience("user_id"), value_set=[True]),
        gxe.ExpectColumnValuesToNotBeNull(column="email"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="email", regex=SEPARATORS_PATTERN),
        gxe.ExpectColumnValuesToMatchRegex(column="email", regex=SINGLE_ADDRESS_PATTERN),
        gxe.ExpectColumnValuesToBeInSet(column=_once_in_audience("email_key"), value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="locale", value_set=list(spec.locales)),
    ]
    for field in spec.fields:
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=field))
        # Within the campaign's cap (``max_field_length``): a 100 KB first name would go into
        # every part of the message it is shown in.
        expectations.append(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=field, min_value=1, max_value=spec.max_field_length
            )
        )
        # A control character (a line break, NUL, ESC…) in a value every message carries could
        # forge a header line or cut the text where a reader or a server stops: quarantined with
        # its reason here, before approval, never refused by the guard after it.
        expectations.append(
            gxe.ExpectColumnValuesToNotMatchRegex(column=field, regex=CONTROL_CHARACTERS)
        )
        # Something a reader sees: "   " (or only invisible characters) would be sent as an
        # empty value ("Hi ,"), as an empty value would, which the length check refuses.
        expectations.append(gxe.ExpectColumnValuesToMatchRegex(column=field, regex=VISIBLE))
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(column=_shows_another(field), value_set=[False])
        )
    # SendGrid refuses a personalization whose substitutions exceed its limit, and with it the
    # whole request: the row's substitutions as ``build_envelopes`` will make them must fit.
    expectations.append(gxe.ExpectColumnValuesToBeInSet(column=SUBSTITUTIONS_FIT, value_set=[True]))
    return expectations


SUBSTITUTIONS_FIT = "substitutions_fit"


# Control characters, and U+FFFD: what the extract made of bytes that were not UTF-8.
CONTROL_CHARACTERS = r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029\ufffd]"
VISIBLE = r"[^\s\u00ad\u200b-\u200f\u2060-\u2064\ufeff]"


def _shows_another(field: str) -> str:
    return f"{field}__shows_another_address"


def _once_in_audience(column: str) -> str:
    return f"{column}__once_in_audience"


# A value that may show an address as ``addresses_shown`` reads one: an "@" or what may be
# decoded into one ("&", "%"), markup, a spelt-out "at", or any non-ASCII character (a fullwidth
# "＠", an invisible character). Others (most first names) are not read one by one.
_MAY_SHOW_AN_ADDRESS = r"[@&%<]|[^\x00-\x7f]|(?i:(?<![a-z0-9])at(?![a-z0-9]))"


def validate_audience(
    spec: CampaignSpec,
    *,
    snapshot: Path,
    valid_out: Path,
    quarantine_out: Path,
    suppressed: Path | None = None,
    chunk_rows: int = CHUNK_ROWS,
    data_docs_dir: Path | None = None,
) -> AudienceValidation:
    """``suppressed``: the extract's suppressed people. A value showing one of their addresses
    is quarantined too: they are audience members (and the gate holds them to it).

    ``chunk_rows``: how many rows of the snapshot are read, checked and written at a time.

    With ``data_docs_dir`` (the run's ``audience/data_docs``), GX's Data Docs of the merged,
    counts-only result are written there, replacing what was there, whether the audience
    passes or not (before ValidationFailed is raised); ``data_docs`` is then their index,
    relative to the run folder when the snapshot is the run's."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    with RunKeys(ONCE_IN_AUDIENCE) as keys:
        showing = _read_keys(spec, snapshot, keys, chunk_rows)
        candidates = set().union(*(shown for rows in showing.values() for shown in rows.values()))
        members = keys.present("email_key", candidates)
        members |= _suppressed_holding(suppressed, candidates - members, chunk_rows)
        repeated = {column: keys.repeated(column).cast(pa.string()) for column in ONCE_IN_AUDIENCE}
    shows_another = {
        field: np.array(sorted(row for row, shown in rows.items() if shown & members), np.int64)
        for field, rows in showing.items()
    }
    with _Sorted(snapshot, valid_out, quarantine_out) as sorted_rows:
        result = validate_chunks(
            _checked_chunks(spec, snapshot, chunk_rows, repeated, shows_another),
            suite_name="audience",
            expectations=audience_expectations(spec),
            index_columns=["user_id"],
            each=sorted_rows.add,
            data_docs_dir=data_docs_dir,
        )
    outcome = AudienceValidation(
        total=sorted_rows.total,
        valid=sorted_rows.valid,
        quarantined=sorted_rows.quarantined,
        quarantined_by_reason=dict(sorted(sorted_rows.reasons.items())),
        per_locale=dict(sorted(sorted_rows.locales.items())),
        gx=summarise(result),
        data_docs=_docs_index(snapshot, data_docs_dir),
    )
    log.info(
        "validate: %d rows, %d valid, %d quarantined %s",
        outcome.total,
        outcome.valid,
        outcome.quarantined,
        outcome.quarantined_by_reason,
    )
    fraction = outcome.quarantined / outcome.total if outcome.total else 0.0
    if outcome.total == 0:
        raise ValidationFailed("the audience is empty: nothing to send")
    if fraction > spec.max_invalid_fraction:
        raise ValidationFailed(
            f"{outcome.quarantined} of {outcome.total} recipients ({fraction:.1%}) failed "
            f"validation, above the campaign's limit of {spec.max_invalid_fraction:.1%}: "
            f"{outcome.quarantined_by_reason}"
        )
    return outcome


def _docs_index(snapshot: Path, data_docs_dir: Path | None) -> str | None:
    """The Data Docs' index as the validation records it: relative to the run folder when the
    snapshot is the run's (as the gate's), otherwise as given."""
    if data_docs_dir is None:
        return None
    index = data_docs_dir / "index.html"
    run = RunStaging(snapshot.parent.parent)
    if run.snapshot == snapshot and index.is_relative_to(run.root):
        return index.relative_to(run.root).as_posix()
    return str(index)


def _frames(
    path: Path, chunk_rows: int, columns: list[str] | None = None
) -> Iterator[pd.DataFrame]:
    """The rows of a Parquet file, ``chunk_rows`` at a time, in order. Without pre-buffering,
    which would keep every column chunk read so far in memory to the end of the file."""
    parquet = pq.ParquetFile(path, pre_buffer=False)
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=columns):
        yield batch.to_pandas()


def _audience_chunks(
    snapshot: Path, chunk_rows: int, columns: list[str] | None = None
) -> Iterator[pd.DataFrame]:
    """The snapshot's rows a chunk at a time, each with its ``email_key``; a user id of blanks
    is no id (its unsubscribe token would name nobody): missing. An empty snapshot is one
    chunk of no rows."""
    read = 0
    for frame in _frames(snapshot, chunk_rows, columns):
        read += 1
        yield _with_keys(frame)
    if not read:
        schema = pq.read_schema(snapshot)
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        yield _with_keys(schema.empty_table().to_pandas())


def _with_keys(frame: pd.DataFrame) -> pd.DataFrame:
    blank = frame["user_id"].astype("string").str.strip().eq("").fillna(False).astype(bool)
    frame["user_id"] = frame["user_id"].astype(object).where(~blank, None)
    frame["email_key"] = address_keys(frame["email"])
    return frame


def _read_keys(
    spec: CampaignSpec, snapshot: Path, keys: RunKeys, chunk_rows: int
) -> dict[str, dict[int, frozenset[str]]]:
    """The first pass: every row's user id and address key into ``keys``; returns, per field,
    the rows (by position in the snapshot) whose value shows an address other than the row's
    own and the campaign's public ones, with those addresses: a few rows, whatever the
    audience's size, since most values cannot show an address at all."""
    public = spec.public_addresses
    showing: dict[str, dict[int, frozenset[str]]] = {field: {} for field in spec.fields}
    offset = 0
    columns = list(dict.fromkeys(["user_id", "email", *spec.fields]))
    for frame in _audience_chunks(snapshot, chunk_rows, columns):
        keys.add(**{c: pa.array(frame[c], pa.string()) for c in ONCE_IN_AUDIENCE})
        for field in spec.fields:
            for row, shown in _addresses_shown_by_row(frame[field], frame["email_key"], public):
                showing[field][offset + row] = shown
        offset += len(frame)
    return showing


def _addresses_shown_by_row(
    values: pd.Series, own: pd.Series, public: frozenset[str]
) -> Iterator[tuple[int, frozenset[str]]]:
    """(position, addresses) of every value showing an address other than the row's own and
    the campaign's public ones."""
    text = values.astype("string[pyarrow]")
    maybe = text.str.contains(_MAY_SHOW_AN_ADDRESS, regex=True).fillna(False).astype(bool)
    positions = np.flatnonzero(maybe.to_numpy())
    for position, value, mine in zip(
        positions, values.iloc[positions].tolist(), own.iloc[positions].tolist(), strict=True
    ):
        shown = addresses_shown(str(value)) - public - {mine}
        if shown:
            yield int(position), shown


def _suppressed_holding(path: Path | None, candidates: set[str], chunk_rows: int) -> set[str]:
    """Which of ``candidates`` are the address key of a suppressed person."""
    if path is None or not path.exists() or not candidates:
        return set()
    wanted = sorted(candidates)
    found: set[str] = set()
    for frame in _frames(path, chunk_rows, ["email"]):
        found_keys = address_keys(frame["email"])
        found.update(found_keys[found_keys.isin(wanted)])
    return found


def _checked_chunks(
    spec: CampaignSpec,
    snapshot: Path,
    chunk_rows: int,
    repeated: dict[str, pa.Array],
    shows_another: dict[str, np.ndarray],
) -> Iterator[pd.DataFrame]:
    """The second pass: every chunk with the columns the suite checks computed, the run-wide
    ones from the first pass."""
    offset = 0
    for frame in _audience_chunks(snapshot, chunk_rows):
        for column in ONCE_IN_AUDIENCE:
            frame[_once_in_audience(column)] = _once(frame[column], repeated[column])
        for field in spec.fields:
            frame[_shows_another(field)] = _rows_flagged(shows_another[field], offset, frame.index)
        frame[SUBSTITUTIONS_FIT] = substitutions_fit(
            spec,
            pa.Table.from_pandas(
                frame[list(dict.fromkeys(["user_id", *spec.fields]))], preserve_index=False
            ),
            MAX_SUBSTITUTIONS_BYTES,
        ).to_numpy(zero_copy_only=False)
        offset += len(frame)
        yield frame


def _once(keys: pd.Series, repeated: pa.Array) -> pd.Series:
    """For each row: whether no other row of the audience holds its key (None: no key)."""
    held_twice = pc.is_in(pa.array(keys, pa.string()), value_set=repeated)
    once = pd.Series(~held_twice.to_numpy(zero_copy_only=False), index=keys.index, dtype=object)
    return once.where(keys.notna(), None)


def _rows_flagged(rows: np.ndarray, offset: int, index: pd.Index) -> pd.Series:
    """True for the chunk's rows among ``rows`` (positions in the snapshot, sorted)."""
    flags = np.zeros(len(index), dtype=bool)
    first, last = np.searchsorted(rows, [offset, offset + len(index)])
    flags[rows[first:last] - offset] = True
    return pd.Series(flags, index=index, dtype=bool)


class _Sorted:
    """The rows GX has judged, a chunk at a time: the valid ones appended to ``valid_out``,
    the others to ``quarantine_out`` with their reason, both in the snapshot's order and with
    its columns, and their counts."""

    def __init__(self, snapshot: Path, valid_out: Path, quarantine_out: Path) -> None:
        valid_schema, quarantine_schema = _file_schemas(snapshot)
        self._valid = pq.ParquetWriter(valid_out, valid_schema)
        self._quarantine = pq.ParquetWriter(quarantine_out, quarantine_schema)
        self.total = 0
        self.valid = 0
        self.quarantined = 0
        self.reasons: Counter[str] = Counter()
        self.locales: Counter[str] = Counter()

    def add(self, chunk: pd.DataFrame, result: Any) -> None:
        reasons = _reasons_by_user(result)
        # The snapshot's columns (the checked ones left out), in its order.
        rows = pa.Table.from_pandas(chunk, schema=self._valid.schema, preserve_index=False)
        user_ids = rows.column("user_id")
        failed = pc.is_in(user_ids, value_set=pa.array(list(reasons), user_ids.type))
        bad = pc.or_(pc.is_null(user_ids), failed)
        quarantine = rows.filter(bad)
        reason = [reasons.get(uid, MISSING_USER_ID) for uid in quarantine["user_id"].to_pylist()]
        field = self._quarantine.schema.field("reason")
        quarantine = quarantine.append_column(field, pa.array(reason, field.type))
        valid = rows.filter(pc.invert(bad))
        self._valid.write_table(valid)
        self._quarantine.write_table(quarantine)
        self.total += rows.num_rows
        self.valid += valid.num_rows
        self.quarantined += quarantine.num_rows
        self.reasons.update(reason)
        for count in pc.value_counts(pc.drop_null(valid.column("locale"))).to_pylist():
            self.locales[count["values"]] += count["counts"]

    def __enter__(self) -> _Sorted:
        return self

    def __exit__(self, *exc: object) -> None:
        self._valid.close()
        self._quarantine.close()


def _file_schemas(snapshot: Path) -> tuple[pa.Schema, pa.Schema]:
    """The valid and the quarantine files' columns: the snapshot's, as a chunk of it read into
    pandas writes them (the quarantine's with its reason), whatever the values of the first
    chunk (a column of no value at all would have no type)."""
    columns = pq.read_schema(snapshot)
    one_row = pa.table(
        [
            pa.array(
                ["x"] if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) else [None],
                f.type,
            )
            for f in columns
        ],
        schema=columns,
    )
    rows = _with_keys(one_row.to_pandas()).drop(columns=["email_key"])
    valid = pa.Schema.from_pandas(rows, preserve_index=False)
    quarantine = pa.Schema.from_pandas(
        rows.assign(reason=pd.Series(["x"], index=rows.index, dtype="str")), preserve_index=False
    )
    return valid, quarantine


def _reasons_by_user(result: Any) -> dict[str, str]:
    """user_id → the first expectation, in the suite's order, that failed for it in the chunk.

    Keyed by user id as on the whole audience, and the same: a user id in more than one chunk
    is held twice, which every copy fails right after the check for a missing id."""
    reasons: dict[str, str] = {}
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        reason = f"{config.type}({config.kwargs.get('column')})"
        for row in item.result.get("unexpected_index_list") or ():
            uid = row.get("user_id")
            if isinstance(uid, str):
                reasons.setdefault(uid, reason)
    return reasons
