"""check_envelopes: the data-quality gate on the frozen batches themselves.

It reads back the exact request bodies from the staging area, explodes them to one row per
personalization and one row per request, and validates both with Great Expectations, whose Data
Docs (counts only: an unexpected value here is an address) it leaves with the run. It knows
nothing of how the bodies were built: expected values are recomputed from the validated audience,
so a broken body builder cannot vouch for itself.

Each body is read one of two ways, which give the same rows:

* **the regular shape** (what Mailroom writes: every personalization exactly ``to`` +
  ``substitutions`` + ``headers``, every value a string, every ``to`` entry exactly an ``email``,
  nothing else anywhere) is parsed by Arrow's JSON reader against a strict schema, a few dozen
  requests at a time, and checked column-wise;
* **anything else** (an unknown field, a missing or null value, another type, a duplicate key,
  a line break, non-ASCII in an address, not JSON at all) fails that strict parse, and that body
  is read with ``json.loads`` and checked one personalization at a time.

The strict parse only decides which of the two reads a body; both produce the same columns
(``tests/unit/test_quality_gate.py`` compares them on every kind of irregular body), and every
rule is then judged by the same Great Expectations suites. The next group of requests is read,
hashed and parsed in a second thread while the current one is checked, and every recipient's
unsubscribe token is made in a second process meanwhile (``unsubscribe.TokensInBackground``).
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from mailroom.addresses import SINGLE_ADDRESS_PATTERN
from mailroom.batches import BatchEntry, load_manifest, sha256_hex
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.envelope_guard import (
    MAX_BODY_BYTES,
    MAX_PERSONALIZATIONS,
    MAX_RECIPIENTS,
    RESERVED_HEADERS,
)
from mailroom.envelopes import envelope_value_columns, envelope_value_names
from mailroom.gx_runtime import Suite, summarise, validate_suites
from mailroom.staging import RunStaging
from mailroom.substitutions import LEFTOVER_MARKER, TAG_PATTERN
from mailroom.unsubscribe import TokensInBackground

log = logging.getLogger(__name__)

# Anything shaped like an address in lower-cased text; matched against the audience.
_ADDRESS_LIKE = re.compile(r"[a-z0-9._%+'-]{1,64}@[a-z0-9-]+(?:\.[a-z0-9-]+)+")
_NAME_HIDING_AN_ADDRESS = re.compile(r"[\r\n,;<>@]")

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
    "top_level_cc_bcc",
    "top_level_reserved_headers",
    "unresolved_tags",
    "leftover_markers",
    "audience_addresses_shared",
)
_TEXT_COLUMNS = frozenset({"email", "email_key", "batch_id"})
# Only compared for equality: handed to GX as numbers, equal for equal text (a fraction of the
# cost of hashing text, which GX does to every column it gets).
_NUMBERED = frozenset({"email_key"})
_BOOL_COLUMNS = frozenset({"in_audience", "values_match", "json_object", "digest_matches"})
# Requests parsed together by the strict reader (a few dozen MB); the next group is read and
# parsed in a second thread while this one is checked.
CHUNK_BATCHES = 64


@dataclass(frozen=True)
class GateResult:
    success: bool
    personalizations: int
    batches: int
    personalization_checks: dict[str, Any]
    request_checks: dict[str, Any]
    data_docs: str | None = None  # GX's Data Docs index, relative to the run folder

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def failures(self) -> list[str]:
        out = []
        for part in (self.personalization_checks, self.request_checks):
            for check in part["checks"]:
                if not check["success"]:
                    column = f"({check['column']})" if check.get("column") else ""
                    out.append(
                        f"{check['expectation']}{column}: {check['unexpected_count']} unexpected"
                    )
        return out


def explode_batches(
    spec: CampaignSpec,
    *,
    manifest_path: Path,
    valid_audience: Path,
    secret: bytes,
    strict_reader: bool = True,
    tokens: TokensInBackground | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per personalization and one row per request, read from the frozen bytes.

    ``email_key`` is the lower-cased address as a number (the same for the same address), as
    uniqueness needs. ``strict_reader=False`` reads every body the generic way (for tests that
    compare the two readers). ``tokens``: the audience's unsubscribe tokens, already being made
    (``audience_tokens``); by default they are started here. Either way they are closed when
    this returns.
    """
    with tokens or audience_tokens(spec, secret, valid_audience) as made:
        manifest = load_manifest(manifest_path)
        audience = _Audience(spec, secret, valid_audience, made)
        shape = _RegularShape(spec) if strict_reader else None
        people = _Columns(PERSONALIZATION_COLUMNS)
        batch_rows = _Columns(BATCH_COLUMNS)
        for group in _read_groups(manifest.batches, manifest_path.parent, shape):
            if group.parsed is not None and shape is not None:
                _explode_regular(group, group.parsed, audience, shape, people, batch_rows)
                continue
            # Something in this group is irregular: find which, and read only those slowly.
            for one in group.split():
                body = shape.parse(one.datas) if shape is not None else None
                if body is not None and shape is not None:
                    _explode_regular(one, body, audience, shape, people, batch_rows)
                else:
                    _explode_generic(one, audience, people, batch_rows)
    return people.frame(), batch_rows.frame()


def check_envelopes(
    spec: CampaignSpec,
    *,
    manifest_path: Path,
    valid_audience: Path,
    secret: bytes,
    expected_recipients: int,
    data_docs_dir: Path | None = None,
) -> GateResult:
    """Validate the frozen batches; unless ``success``, nothing may be sent
    (``pipeline.check_envelopes`` raises ValidationFailed).

    GX's Data Docs for both suites are written to ``data_docs_dir`` (by default the run's
    ``gate/data_docs``, when the manifest is where a run keeps it), whether the gate passes or
    not, before this returns.
    """
    run = RunStaging(manifest_path.parent.parent)
    if data_docs_dir is None and run.manifest == manifest_path:
        data_docs_dir = run.gate_data_docs

    # Started before Great Expectations is imported (seconds, in a task process of its own).
    with audience_tokens(spec, secret, valid_audience) as tokens:
        import great_expectations.expectations as gxe

        people, batch_rows = explode_batches(
            spec,
            manifest_path=manifest_path,
            valid_audience=valid_audience,
            secret=secret,
            tokens=tokens,
        )
    people_suite = Suite(
        name="envelopes",
        frame=people,
        expectations=[
            gxe.ExpectTableRowCountToEqual(value=expected_recipients),
            gxe.ExpectColumnValuesToBeBetween(column="n_to", min_value=1, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="n_cc", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="n_bcc", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToNotBeNull(column="email"),
            gxe.ExpectColumnValuesToMatchRegex(column="email", regex=SINGLE_ADDRESS_PATTERN),
            gxe.ExpectColumnValuesToBeUnique(column="email_key"),
            gxe.ExpectColumnValuesToBeInSet(column="in_audience", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="values_match", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="reserved_headers", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="unknown_tags", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="extra_fields", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="to_entry_problems", min_value=0, max_value=0),
        ],
    )
    request_suite = Suite(
        name="batches",
        frame=batch_rows,
        expectations=[
            gxe.ExpectColumnValuesToBeInSet(column="json_object", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(
                column="personalizations", min_value=1, max_value=MAX_PERSONALIZATIONS
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="recipients", min_value=1, max_value=MAX_RECIPIENTS
            ),
            gxe.ExpectColumnValuesToBeBetween(column="size", min_value=1, max_value=MAX_BODY_BYTES),
            gxe.ExpectColumnValuesToBeInSet(column="digest_matches", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="top_level_cc_bcc", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(
                column="top_level_reserved_headers", min_value=0, max_value=0
            ),
            gxe.ExpectColumnValuesToBeBetween(column="unresolved_tags", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="leftover_markers", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(
                column="audience_addresses_shared", min_value=0, max_value=0
            ),
        ],
    )
    people_result, request_result = validate_suites(
        [people_suite, request_suite], data_docs_dir=data_docs_dir
    )
    docs = None
    if data_docs_dir is not None:
        index = data_docs_dir / "index.html"
        docs = str(index.relative_to(run.root)) if index.is_relative_to(run.root) else str(index)
    result = GateResult(
        success=bool(people_result.success and request_result.success),
        personalizations=len(people),
        batches=len(batch_rows),
        personalization_checks=summarise(people_result),
        request_checks=summarise(request_result),
        data_docs=docs,
    )
    log.info(
        "check_envelopes: %d personalizations in %d batches, success=%s, data docs %s",
        result.personalizations,
        result.batches,
        result.success,
        docs,
    )
    return result


# --- the validated audience: who may receive, and what each one's envelope must carry ----------
class _Audience:
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


def _lower(values: pa.Array) -> pa.Array:
    """``str.lower`` of every value (Arrow's lower-casing is Python's for ASCII only)."""
    if len(values) == 0 or pc.all(pc.string_is_ascii(values)).as_py() is not False:
        return pc.ascii_lower(values)
    return pa.array([v.lower() if v is not None else None for v in values.to_pylist()], pa.string())


# --- reading the bodies, a group at a time ------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """Some requests as frozen: their manifest entries, bytes, whether each is as frozen, and
    (when every one has the regular shape) their strict parse."""

    entries: Sequence[BatchEntry]
    datas: Sequence[bytes]
    digests_match: Sequence[bool]
    parsed: pa.StructArray | None = None

    def split(self) -> list[_Group]:
        return [
            _Group([e], [d], [ok])
            for e, d, ok in zip(self.entries, self.datas, self.digests_match, strict=True)
        ]


def _read_groups(
    batches: Sequence[BatchEntry], folder: Path, shape: _RegularShape | None
) -> Iterator[_Group]:
    """The requests a group at a time; the next group is read, hashed and parsed in a second
    thread meanwhile (file reads, SHA-256 and Arrow's parser all release the GIL)."""

    def load(entries: list[BatchEntry]) -> _Group:
        datas = [(folder / e.file).read_bytes() for e in entries]
        digests = [sha256_hex(d) == e.sha256 for d, e in zip(datas, entries, strict=True)]
        parsed = shape.parse(datas) if shape is not None else None
        return _Group(entries, datas, digests, parsed)

    groups = [list(batches[i : i + CHUNK_BATCHES]) for i in range(0, len(batches), CHUNK_BATCHES)]
    if not groups:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-read") as pool:
        pending: Future[_Group] = pool.submit(load, groups[0])
        for i in range(len(groups)):
            group = pending.result()
            if i + 1 < len(groups):
                pending = pool.submit(load, groups[i + 1])
            yield group


class _RegularShape:
    """The strict Arrow schema of the bodies Mailroom writes; ``parse`` returns ``None`` for
    any group with a body outside it."""

    def __init__(self, spec: CampaignSpec) -> None:
        text = pa.string()
        self.tags, self.headers = envelope_value_names(spec)
        personalization = pa.struct(
            [
                ("to", pa.list_(pa.struct([("email", text)]))),
                ("substitutions", pa.struct([(t, text) for t in self.tags])),
                ("headers", pa.struct([(h, text) for h in self.headers])),
            ]
        )
        body = pa.struct(
            [
                ("personalizations", pa.list_(personalization)),
                ("from", pa.struct([("email", text), ("name", text)])),
                ("subject", text),
                ("content", pa.list_(pa.struct([("type", text), ("value", text)]))),
                (
                    "custom_args",
                    pa.struct(
                        [(k, text) for k in ("mailroom_campaign", "mailroom_run", "mailroom_batch")]
                    ),
                ),
                ("reply_to", pa.struct([("email", text)])),
                ("categories", pa.list_(text)),
            ]
        )
        self.schema = pa.schema([("body", body)])
        self.options = pajson.ParseOptions(
            explicit_schema=self.schema, unexpected_field_behavior="error"
        )

    def parse(self, datas: Sequence[bytes]) -> pa.StructArray | None:
        # One line per body, each wrapped in an object of our own, so that a body holding two
        # JSON values (or none) cannot shift the rows: it is simply not valid JSON any more.
        if not datas or any(b"\n" in d or b"\r" in d for d in datas):
            return None
        pieces = [b'{"body":']
        for data in datas:
            pieces += [data, b'}\n{"body":']
        pieces[-1] = b"}\n"
        lines = b"".join(pieces)
        block = max(1 << 23, 2 * max(len(d) for d in datas) + 64)
        try:
            table = pajson.read_json(
                pa.BufferReader(lines),
                read_options=pajson.ReadOptions(block_size=block),
                parse_options=self.options,
            )
        except (pa.ArrowInvalid, UnicodeDecodeError):
            return None
        if table.num_rows != len(datas):
            return None
        bodies = table.column("body").combine_chunks()
        try:
            # Arrow's reader does not check that strings are UTF-8; json.loads would refuse.
            bodies.validate(full=True)
        except pa.ArrowInvalid:
            return None
        return bodies if self._complete(bodies) else None

    def _complete(self, bodies: pa.StructArray) -> bool:
        """Nothing the checks read is null (null and absent would read alike), and every
        recipient address is ASCII (where Arrow's lower-casing is Python's)."""
        parts = bodies.field("personalizations")
        items = parts.flatten()
        to = items.field("to")
        entries = to.flatten()
        subs = items.field("substitutions")
        headers = items.field("headers")
        content = bodies.field("content")
        contents = content.flatten()
        required = [
            bodies,
            parts,
            items,
            to,
            entries,
            entries.field("email"),
            subs,
            *(subs.field(t) for t in self.tags),
            headers,
            *(headers.field(h) for h in self.headers),
            bodies.field("subject"),
            content,
            contents,
            contents.field("type"),
            contents.field("value"),
        ]
        if any(a.null_count for a in required):
            return False
        return bool(pc.all(pc.string_is_ascii(entries.field("email"))).as_py() is not False)


# --- one group of regular bodies, column-wise ---------------------------------------------------
def _explode_regular(
    group: _Group,
    bodies: pa.StructArray,
    audience: _Audience,
    shape: _RegularShape,
    people: _Columns,
    batch_rows: _Columns,
) -> None:
    parts = bodies.field("personalizations")
    per_request = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    items = parts.flatten()
    to = items.field("to")
    n_to = pc.list_value_length(to).to_numpy(zero_copy_only=False).astype(np.int64)
    addresses = to.flatten().field("email")
    first = np.cumsum(n_to) - n_to
    email = addresses.take(pa.array(first, mask=n_to == 0)) if len(n_to) else addresses
    email_key = pc.ascii_lower(email)
    hint = [
        audience.hint(e.locale, int(n)) for e, n in zip(group.entries, per_request, strict=True)
    ]
    rows = audience.find(email_key, np.concatenate(hint))
    known = rows >= 0
    values_match = known.copy()
    if known.any():
        own_subs, own_headers = audience.values(rows[known])
        everyone = bool(known.all())
        mask = pa.array(known)
        subs, headers = items.field("substitutions"), items.field("headers")
        pairs = [(subs.field(t), own_subs[t]) for t in shape.tags]
        pairs += [(headers.field(h), own_headers[h]) for h in shape.headers]
        same = np.ones(int(known.sum()), dtype=bool)
        for got, own in pairs:
            mine = got if everyone else got.filter(mask)
            same &= pc.equal(mine, own).to_numpy(zero_copy_only=False)
        values_match[known] = same

    # Per request: the content's tags that no personalization can fill (every regular one has
    # exactly the campaign's tags), template markers left over, audience addresses in the parts
    # every recipient sees.
    subjects = bodies.field("subject").to_pylist()
    contents = bodies.field("content").to_pylist()
    shared_fields = [f.name for f in bodies.type if f.name != "personalizations"]
    shared = pa.StructArray.from_arrays(
        [bodies.field(f) for f in shared_fields], names=shared_fields
    ).to_pylist()
    count = len(group.entries)
    unknown = np.zeros(count, dtype=np.int64)
    recipients = np.bincount(
        np.repeat(np.arange(count), per_request), weights=n_to, minlength=count
    ).astype(np.int64)
    for i, entry in enumerate(group.entries):
        texts = [subjects[i]] + [c["value"] for c in contents[i]]
        tags_used, leftovers = _tags_and_markers(texts)
        unknown[i] = len(tags_used - set(shape.tags))
        batch_rows.append_row(
            batch_id=entry.batch_id,
            json_object=True,
            personalizations=int(per_request[i]),
            recipients=int(recipients[i]),
            size=len(group.datas[i]),
            digest_matches=group.digests_match[i],
            top_level_cc_bcc=0,
            top_level_reserved_headers=0,
            unresolved_tags=int(unknown[i] * per_request[i]),
            leftover_markers=leftovers,
            audience_addresses_shared=_audience_addresses_in(
                {k: v for k, v in shared[i].items() if v is not None}, audience
            ),
        )
    zeros = np.zeros(len(n_to), dtype=np.int64)
    people.append_columns(
        n_to=n_to,
        n_cc=zeros,
        n_bcc=zeros,
        email=email,
        email_key=email_key,
        in_audience=known,
        values_match=values_match,
        reserved_headers=zeros,
        unknown_tags=np.repeat(unknown, per_request),
        extra_fields=zeros,
        to_entry_problems=zeros,
    )


# --- one body of any shape, one personalization at a time --------------------------------------
def _explode_generic(
    one: _Group,
    audience: _Audience,
    people: _Columns,
    batch_rows: _Columns,
) -> None:
    (entry,), (data,), (digest_matches,) = one.entries, one.datas, one.digests_match
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        body = None
    if not isinstance(body, dict):
        batch_rows.append_row(
            batch_id=entry.batch_id,
            json_object=False,
            personalizations=0,
            recipients=0,
            size=len(data),
            digest_matches=digest_matches,
            top_level_cc_bcc=0,
            top_level_reserved_headers=0,
            unresolved_tags=0,
            leftover_markers=0,
            audience_addresses_shared=0,
        )
        return
    parts = body.get("personalizations")
    items = [p if isinstance(p, dict) else None for p in parts] if isinstance(parts, list) else []
    content = body.get("content")
    texts = [str(body.get("subject", ""))] + [
        str(c.get("value", ""))
        for c in (content if isinstance(content, list) else [])
        if isinstance(c, dict)
    ]
    tags_used, leftovers = _tags_and_markers(texts)

    emails: list[str | None] = []
    for item in items:
        to = item.get("to") if item is not None else None
        first = to[0] if isinstance(to, list) and to else None
        emails.append(_as_text(first.get("email") if isinstance(first, dict) else None))
    keys = pa.array([e.lower() if e is not None else None for e in emails], pa.string())
    rows = audience.find(keys, audience.hint(entry.locale, len(items)))
    own = _own_values(audience, rows)

    unresolved = recipient_count = 0
    for item, email, key, row in zip(items, emails, keys.to_pylist(), rows, strict=True):
        extra = 1 if item is None else len(set(item) - {"to", "substitutions", "headers"})
        item = item or {}
        to = item.get("to")
        n_to = len(to) if isinstance(to, list) else 0
        n_cc, n_bcc = (_count(item.get(k)) for k in ("cc", "bcc"))
        recipient_count += n_to + n_cc + n_bcc
        subs = item.get("substitutions")
        headers = item.get("headers")
        sub_keys = set(subs) if isinstance(subs, dict) else set()
        unknown = len(tags_used - sub_keys)
        unresolved += unknown
        people.append_row(
            n_to=n_to,
            n_cc=n_cc,
            n_bcc=n_bcc,
            email=email,
            email_key=key,
            in_audience=bool(row >= 0),
            values_match=bool(row >= 0) and own.get(int(row)) == (subs, headers),
            reserved_headers=_reserved(headers),
            unknown_tags=unknown,
            extra_fields=extra,
            to_entry_problems=_to_entry_problems(to)
            if isinstance(to, list)
            else int(to is not None),
        )
    mail_settings = body.get("mail_settings")
    batch_rows.append_row(
        batch_id=entry.batch_id,
        json_object=True,
        personalizations=len(items),
        recipients=recipient_count,
        size=len(data),
        digest_matches=digest_matches,
        top_level_cc_bcc=int("cc" in body)
        + int("bcc" in body)
        + int(isinstance(mail_settings, dict) and "bcc" in mail_settings),
        top_level_reserved_headers=_reserved(body.get("headers")),
        unresolved_tags=unresolved,
        leftover_markers=leftovers,
        audience_addresses_shared=_audience_addresses_in(
            {k: v for k, v in body.items() if k != "personalizations"}, audience
        ),
    )


def _own_values(
    audience: _Audience, rows: np.ndarray
) -> dict[int, tuple[dict[str, str], dict[str, str]]]:
    """Audience row → (substitutions, headers) as ``envelope_values`` gives them."""
    found = np.unique(rows[rows >= 0])
    if not len(found):
        return {}
    subs, headers = audience.values(found)
    sub_lists = {k: v.to_pylist() for k, v in subs.items()}
    header_lists = {k: v.to_pylist() for k, v in headers.items()}
    return {
        int(row): (
            {k: v[i] for k, v in sub_lists.items()},
            {k: v[i] for k, v in header_lists.items()},
        )
        for i, row in enumerate(found)
    }


def _as_text(value: Any) -> str | None:
    """An address as it reads: text as is; anything else (or text Arrow cannot hold, a lone
    surrogate) as its JSON, which is no address either."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value)
        return value
    return json.dumps(value)


def _count(value: Any) -> int:
    """Recipients in a ``cc``/``bcc`` value: a list's length; anything else set counts as one."""
    if isinstance(value, list):
        return len(value)
    return 0 if value is None or value == {} or value == "" else 1


def _reserved(headers: Any) -> int:
    if headers is None:
        return 0
    if not isinstance(headers, dict):
        return 1
    return sum(1 for h in headers if str(h).lower() in RESERVED_HEADERS)


def _tags_and_markers(texts: Sequence[str]) -> tuple[set[str], int]:
    """The substitution tags the shared texts use, and how many other markers they hold."""
    tags = {m.group(0) for t in texts for m in TAG_PATTERN.finditer(t)}
    leftovers = sum(len(LEFTOVER_MARKER.findall(TAG_PATTERN.sub("", t))) for t in texts)
    return tags, leftovers


def _to_entry_problems(to: list[Any]) -> int:
    """A ``to`` entry is ``{"email"}`` with at most a display name that cannot hide an address."""
    problems = 0
    for entry in to:
        if not isinstance(entry, dict):
            problems += 1
            continue
        problems += len(set(entry) - {"email", "name"})
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or _NAME_HIDING_AN_ADDRESS.search(name)):
            problems += 1
    return problems


def _audience_addresses_in(shared: dict[str, Any], audience: _Audience) -> int:
    """How many audience addresses the parts every recipient sees show (also HTML-escaped or
    %-encoded).

    Field by field (no address can span two: the quotes between them are no address's), and
    each field's text once: every request of a locale shares its content."""
    found: set[str] = set()
    for key, value in shared.items():
        found |= audience.addresses_in(json.dumps({key: value}, ensure_ascii=False))
    return len(found)


def _addresses_in(text: str, audience: _Audience) -> frozenset[str]:
    text = text.lower()
    found = set()
    for variant in (text, unquote(html.unescape(text)).lower()):
        for match in _ADDRESS_LIKE.finditer(variant):
            for candidate in {match.group(0), match.group(0).lstrip("'.%")}:
                if candidate in audience:
                    found.add(candidate)
    return frozenset(found)


# --- the two frames, built a group at a time ----------------------------------------------------
class _Columns:
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
