"""build_envelopes: one envelope per recipient, carrying only that recipient's values.

An envelope is one row: exactly one address, its locale, and its own substitution values
(HTML-escaped for the HTML tag, CR/LF stripped everywhere), its own unsubscribe link and the
RFC 8058 one-click unsubscribe headers.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.campaign_spec import CampaignSpec
from mailroom.earlier_runs import EarlierRecipients
from mailroom.json_columns import concatenate, json_objects_of_literals, json_strings
from mailroom.substitutions import UNSUBSCRIBE_FIELD, substitution_tag
from mailroom.unsubscribe import token_column, token_length, unsubscribe_token

log = logging.getLogger(__name__)

# Audience rows made into envelopes at a time, and envelopes written at a time (one row group
# per locale among them): the build holds about this many rows whatever the audience's size.
CHUNK_ROWS = 20_000
ROW_GROUP_ROWS = 100_000
ENVELOPE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("email", pa.string()),
        ("locale", pa.string()),
        ("substitutions", pa.string()),
        ("headers", pa.string()),
        ("values_sha256", pa.string()),
    ]
)
# What a Parquet file read a chunk at a time is read through (``parquet_in_chunks``).
READ_BUFFER_BYTES = 1 << 20
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x85\x0b\x0c]+")
LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"


def parquet_in_chunks(path: Path) -> pq.ParquetFile:
    """``path`` opened for reading a chunk at a time (``iter_batches``) in memory that does not
    grow with the file: pyarrow's default ``pre_buffer`` reads ahead, and holds, the bytes of
    every row group the reader is asked for (all of them, for the whole file), and without a
    read buffer each column is read a whole row group at once (a file may be one row group)."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)


def clean_value(value: object) -> str:
    """A substitution value as text on one line: CR/LF would let a value forge headers."""
    text = "" if value is None else str(value)
    return _LINE_BREAKS.sub(" ", text).strip()


def envelope_values(
    spec: CampaignSpec, secret: bytes, row: dict[str, Any]
) -> tuple[dict[str, str], dict[str, str]]:
    """The substitutions and headers of one recipient's envelope."""
    subs: dict[str, str] = {}
    for field in spec.fields:
        value = clean_value(row.get(field))
        subs[substitution_tag(field, html=False)] = value
        subs[substitution_tag(field, html=True)] = html.escape(value, quote=True)
    token = unsubscribe_token(secret, spec.name, str(row["user_id"]))
    url = clean_value(spec.unsubscribe.url_template.replace("{token}", quote(token, safe="")))
    subs[substitution_tag(UNSUBSCRIBE_FIELD, html=False)] = url
    subs[substitution_tag(UNSUBSCRIBE_FIELD, html=True)] = html.escape(url, quote=True)
    targets = [f"<{url}>"]
    if spec.unsubscribe.mailto:
        targets.append(f"<mailto:{spec.unsubscribe.mailto}?subject=unsubscribe%20{quote(token)}>")
    headers = {
        LIST_UNSUBSCRIBE: ", ".join(targets),
        LIST_UNSUBSCRIBE_POST: ONE_CLICK,
    }
    return subs, headers


def envelope_value_names(spec: CampaignSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The substitution tags and header names every envelope of ``spec`` carries, in the order
    ``envelope_values`` gives them."""
    tags = [
        substitution_tag(field, html=escaped) for field in spec.fields for escaped in (False, True)
    ]
    tags += [substitution_tag(UNSUBSCRIBE_FIELD, html=escaped) for escaped in (False, True)]
    return tuple(dict.fromkeys(tags)), (LIST_UNSUBSCRIBE, LIST_UNSUBSCRIBE_POST)


def envelope_value_columns(
    spec: CampaignSpec, secret: bytes, rows: pa.Table, tokens: pa.Array | None = None
) -> tuple[dict[str, pa.Array], dict[str, pa.Array]]:
    """``envelope_values`` for every row of ``rows`` at once: one array per substitution tag and
    per header, whose i-th value is what ``envelope_values`` gives for row i. ``tokens``: the
    rows' unsubscribe tokens, when the caller has them already (else they are made here).

    Field values are cleaned and escaped once per distinct value; the unsubscribe link is the
    campaign's URL template around each user's token (a token is made of URL-, HTML- and
    line-safe characters only, so cleaning and escaping the template once is the same as
    cleaning and escaping every link).
    """
    count = rows.num_rows
    subs: dict[str, pa.Array] = {}
    for field in spec.fields:
        column = rows.column(field) if field in rows.column_names else None
        plain, escaped = _cleaned_and_escaped(column, count)
        subs[substitution_tag(field, html=False)] = plain
        subs[substitution_tag(field, html=True)] = escaped
    if tokens is None:
        tokens = token_column(secret, spec.name, rows.column("user_id"))
    url_pieces = _url_pieces(spec)
    url = _around(url_pieces, tokens, count)
    subs[substitution_tag(UNSUBSCRIBE_FIELD, html=False)] = url
    subs[substitution_tag(UNSUBSCRIBE_FIELD, html=True)] = _around(
        [html.escape(piece, quote=True) for piece in url_pieces], tokens, count
    )
    target = list(url_pieces)
    target[0] = "<" + target[0]
    target[-1] += ">"
    list_unsubscribe = _around(target, tokens, count)
    if spec.unsubscribe.mailto:
        list_unsubscribe = pc.binary_join_element_wise(
            list_unsubscribe,
            f", <mailto:{spec.unsubscribe.mailto}?subject=unsubscribe%20",
            tokens,
            ">",
            "",
        )
    headers = {
        LIST_UNSUBSCRIBE: list_unsubscribe,
        LIST_UNSUBSCRIBE_POST: pa.array([ONE_CLICK] * count, pa.string()),
    }
    return subs, headers


def _url_pieces(spec: CampaignSpec) -> list[str]:
    """The campaign's unsubscribe URL, cleaned, split where each user's token goes."""
    pieces = spec.unsubscribe.url_template.split("{token}")
    if len(pieces) == 1:
        return [clean_value(pieces[0])]
    url_pieces = [_LINE_BREAKS.sub(" ", piece) for piece in pieces]
    url_pieces[0] = url_pieces[0].lstrip()
    url_pieces[-1] = url_pieces[-1].rstrip()
    return url_pieces


def substitutions_bytes(spec: CampaignSpec, rows: pa.Table) -> pa.Array:
    """For every row: the size SendGrid holds against ``MAX_SUBSTITUTIONS_BYTES`` (keys plus
    values, in UTF-8) of the substitutions ``envelope_values`` will give it, computed without
    the secret. The validation quarantines a row over the limit, so no request fails at the
    provider after approval. Exact: a token's length depends on the campaign and the user id's
    length alone (``unsubscribe.token_length``), and a token is URL- and HTML-safe."""
    count = rows.num_rows
    fixed = 0
    total: Any = pa.array(np.zeros(count, np.int64))
    for field in spec.fields:
        fixed += sum(len(substitution_tag(field, html=h).encode()) for h in (False, True))
        if field not in rows.column_names:
            continue  # an empty value: its tags alone
        plain, escaped = _cleaned_and_escaped(rows.column(field), count)
        total = pc.add(total, pc.add(pc.binary_length(plain), pc.binary_length(escaped)))
    url_pieces = _url_pieces(spec)
    fixed += sum(len(substitution_tag(UNSUBSCRIBE_FIELD, html=h).encode()) for h in (False, True))
    fixed += len("".join(url_pieces).encode())
    fixed += len("".join(html.escape(piece, quote=True) for piece in url_pieces).encode())
    ids = pc.cast(rows.column("user_id"), pa.string()) if "user_id" in rows.column_names else None
    id_bytes = pc.fill_null(pc.binary_length(ids), 0) if ids is not None else pa.array([0] * count)
    token = pa.array(token_length(spec.name, id_bytes.to_numpy().astype(np.int64)))
    tokens = pc.multiply(token, 2 * (len(url_pieces) - 1))
    result = pc.add(pc.add(total, tokens), fixed)
    return result.combine_chunks() if isinstance(result, pa.ChunkedArray) else result


def substitutions_fit(spec: CampaignSpec, rows: pa.Table, limit: int) -> pa.Array:
    """For every row: whether ``substitutions_bytes`` is at most ``limit``. Column-wise for
    the rows that fit by a margin (a value's cleaned text is never longer than it, and its
    HTML-escaped form at most six times that), exact for the few others."""
    count = rows.num_rows
    raw: Any = pa.array(np.zeros(count, np.int64))
    for field in spec.fields:
        if field in rows.column_names:
            column = pc.cast(rows.column(field), pa.string())
            raw = pc.add(raw, pc.multiply(pc.fill_null(pc.binary_length(column), 0), 7))
    no_fields = rows.select([c for c in rows.column_names if c not in spec.fields])
    bound = pc.add(raw, substitutions_bytes(spec, no_fields))
    near = pc.greater(bound, limit)
    fits = pc.invert(near)
    if not pc.any(near).as_py():
        return fits.combine_chunks() if isinstance(fits, pa.ChunkedArray) else fits
    rows_near = pc.indices_nonzero(near)
    exact = pc.less_equal(substitutions_bytes(spec, rows.take(rows_near)), limit)
    result = fits.to_numpy(zero_copy_only=False).copy()
    result[rows_near.to_numpy()] = exact.to_numpy(zero_copy_only=False)
    return pa.array(result)


def _around(pieces: list[str], tokens: pa.Array, count: int) -> pa.Array:
    """``token.join(pieces)`` for every token."""
    if len(pieces) == 1:
        return pa.array([pieces[0]] * count, pa.string())
    parts: list[Any] = [pieces[0]]
    for piece in pieces[1:]:
        parts += [tokens, piece]
    return pc.binary_join_element_wise(*parts, "")


def _cleaned_and_escaped(column: Any, count: int) -> tuple[pa.Array, pa.Array]:
    """``clean_value`` and its HTML-escaped form for every value, computed once per value."""
    if column is None or column.null_count == len(column):
        empty = pa.array([""] * count, pa.string())
        return empty, empty
    encoded = pc.dictionary_encode(column)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    plain = [clean_value(v) for v in encoded.dictionary.to_pylist()]
    escaped = [html.escape(v, quote=True) for v in plain]
    indices = encoded.indices
    return (
        pc.fill_null(pa.array(plain, pa.string()).take(indices), ""),
        pc.fill_null(pa.array(escaped, pa.string()).take(indices), ""),
    )


LEFT_OUT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("email", pa.string()),
        ("locale", pa.string()),
        ("reason", pa.string()),
        ("earlier_run", pa.string()),
    ]
)


def build_envelopes(
    spec: CampaignSpec,
    *,
    valid_audience: Path,
    out: Path,
    secret: bytes,
    leave_out: Mapping[str, tuple[str, str]] | EarlierRecipients | None = None,
    left_out_out: Path | None = None,
    chunk_rows: int | None = None,
) -> int:
    """Write one envelope row per valid recipient to ``out``; returns how many.

    ``leave_out``: address key (the address lower-cased, as the outbox keys it) → (reason,
    earlier run) of recipients an earlier run of the campaign sent to; they get no envelope, and
    go to ``left_out_out`` (user id, address, locale, reason, earlier run) instead, so every
    later stage sees exactly who this run sends to and the report can still say why the others
    were not.

    Each row holds the recipient's substitutions and headers as compact JSON, exactly as a
    request body will carry them, and ``values_sha256`` (``envelope_guard.values_digest`` of
    them), which the outbox keeps so the guard can tell whose values a personalization holds.
    The audience is read and its envelopes made ``chunk_rows`` at a time (default
    ``CHUNK_ROWS``), so what is held at once does not grow with the audience. The envelopes
    wait until about ``ROW_GROUP_ROWS`` of them are made, then go out as one Parquet row group
    per locale, so a reader of one locale skips every other locale's rows; within a locale the
    audience's order is kept.
    """
    if not secret:
        raise ValueError("an unsubscribe secret is required to sign unsubscribe links")
    parquet = parquet_in_chunks(valid_audience)
    written = 0
    tmp = out.with_suffix(".parquet.tmp")
    left_tmp = left_out_out.with_suffix(".parquet.tmp") if left_out_out is not None else None
    left_writer = pq.ParquetWriter(left_tmp, LEFT_OUT_SCHEMA) if left_tmp is not None else None
    with pq.ParquetWriter(tmp, ENVELOPE_SCHEMA) as writer:
        waiting = _ByLocale(writer)
        for batch in parquet.iter_batches(batch_size=chunk_rows or CHUNK_ROWS):
            rows = pa.Table.from_batches([batch])
            if leave_out:
                rows = _leave_out(rows, leave_out, left_writer)
            if not rows.num_rows:
                continue
            subs, headers = envelope_value_columns(spec, secret, rows)
            sub_texts = {k: json_strings(v) for k, v in subs.items()}
            header_texts = {k: json_strings(v) for k, v in headers.items()}
            count = rows.num_rows
            waiting.add(
                pa.table(
                    {
                        "user_id": rows.column("user_id").cast(pa.string()),
                        "email": rows.column("email").cast(pa.string()),
                        "locale": rows.column("locale").cast(pa.string()),
                        "substitutions": json_objects_of_literals(sub_texts, count),
                        "headers": json_objects_of_literals(header_texts, count),
                        "values_sha256": values_digests(sub_texts, header_texts, count),
                    },
                    schema=ENVELOPE_SCHEMA,
                )
            )
            del subs, headers, sub_texts, header_texts
            written += count
            if waiting.rows >= ROW_GROUP_ROWS:
                waiting.write()
                log.info("build_envelopes: %d envelopes", written)
        waiting.write()
    log.info("build_envelopes: %d envelopes", written)
    if left_writer is not None and left_tmp is not None and left_out_out is not None:
        left_writer.close()
        left_tmp.replace(left_out_out)
    tmp.replace(out)
    return written


class _ByLocale:
    """Envelopes made but not yet written, and their writer: each ``write`` gives every locale
    among them one row group, its rows in the order they were made."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer = writer
        self.tables: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.rows += table.num_rows

    def write(self) -> None:
        if not self.tables:
            return
        envelopes = pa.concat_tables(self.tables)
        self.tables, self.rows = [], 0
        locales = envelopes.column("locale")
        for locale in sorted(pc.unique(locales).to_pylist(), key=str):
            self.writer.write_table(envelopes.filter(pc.equal(locales, locale)))


def _leave_out(
    rows: pa.Table,
    leave_out: Mapping[str, tuple[str, str]] | EarlierRecipients,
    writer: pq.ParquetWriter | None,
) -> pa.Table:
    """The rows whose address key is not in ``leave_out``; the others go to ``writer``."""
    keys = [str(e).lower() for e in rows.column("email").to_pylist()]
    known = leave_out.reasons(keys) if isinstance(leave_out, EarlierRecipients) else leave_out
    found = [known.get(key) for key in keys]
    left = pa.array([f is not None for f in found], pa.bool_())
    if writer is not None and any(f is not None for f in found):
        taken = [f for f in found if f is not None]
        chosen = rows.filter(left)
        writer.write_table(
            pa.table(
                {
                    "user_id": chosen.column("user_id").cast(pa.string()),
                    "email": chosen.column("email").cast(pa.string()),
                    "locale": chosen.column("locale").cast(pa.string()),
                    "reason": pa.array([f[0] for f in taken], pa.string()),
                    "earlier_run": pa.array([f[1] for f in taken], pa.string()),
                },
                schema=LEFT_OUT_SCHEMA,
            )
        )
    return rows.filter(pc.invert(left))


def values_digests(
    sub_texts: dict[str, pa.Array], header_texts: dict[str, pa.Array], count: int
) -> pa.Array:
    """``envelope_guard.values_digest`` of every row's substitutions and headers, given as JSON
    string literals (``json_strings``)."""
    if not count:
        return pa.array([], pa.string())
    canonical = concatenate(
        "[",
        json_objects_of_literals({k: sub_texts[k] for k in sorted(sub_texts)}, count),
        ",",
        json_objects_of_literals({k: header_texts[k] for k in sorted(header_texts)}, count),
        "]",
    )
    # Each row's bytes hashed where Arrow holds them: no Python copy of every row's text.
    canonical = canonical.cast(pa.string())
    offsets = np.frombuffer(canonical.buffers()[1], np.int32)
    bounds = offsets[canonical.offset : canonical.offset + count + 1].tolist()
    data = memoryview(canonical.buffers()[2] or b"")
    sha256 = hashlib.sha256
    return pa.array(
        [sha256(data[start:end]).hexdigest() for start, end in pairwise(bounds)],
        pa.string(),
    )
