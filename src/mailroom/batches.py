"""freeze_batches: every batch's body (the exact SendGrid request), written once, with a SHA-256
manifest.

One batch = one locale's content + up to ``batch_size`` personalizations of one recipient
each. The bytes written here are the bytes the senders send: nothing re-serialises them later,
so the manifest digest the approver sees pins every byte that can leave.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.campaign_spec import CampaignSpec
from mailroom.content import LocaleContent
from mailroom.envelopes import parquet_in_chunks
from mailroom.errors import EnvelopeViolation
from mailroom.json_columns import concatenate, json_strings
from mailroom.staging import read_json, write_json

log = logging.getLogger(__name__)

# Envelopes read at a time: the freeze holds about this many rows' text, whatever the audience.
CHUNK_ROWS = 20_000
Envelope = dict[str, Any]
BodyBuilder = Callable[
    [CampaignSpec, LocaleContent, Sequence[Envelope], dict[str, str]], dict[str, Any]
]


def personalization(envelope: Envelope) -> dict[str, Any]:
    return {
        "to": [{"email": envelope["email"]}],
        "substitutions": envelope["substitutions"],
        "headers": envelope["headers"],
    }


def sendgrid_request_body(
    spec: CampaignSpec,
    content: LocaleContent,
    envelopes: Sequence[Envelope],
    custom_args: dict[str, str],
) -> dict[str, Any]:
    """The v3 mail-send body: shared content, one personalization per recipient."""
    body: dict[str, Any] = {
        "personalizations": [personalization(e) for e in envelopes],
        "from": {"email": spec.sender.email, "name": spec.sender.name},
        "subject": content.subject,
        "content": [
            {"type": "text/plain", "value": content.text},
            {"type": "text/html", "value": content.html},
        ],
        "custom_args": custom_args,
    }
    if spec.reply_to:
        body["reply_to"] = {"email": spec.reply_to}
    if spec.categories:
        body["categories"] = list(spec.categories)
    return body


def batch_custom_args(spec: CampaignSpec, run_id: str, batch_id: str) -> dict[str, str]:
    """The top-level ``custom_args`` of a batch: which campaign, run and batch it is (SendGrid
    shows them in its activity search and events; never any personal data)."""
    return {"mailroom_campaign": spec.name, "mailroom_run": run_id, "mailroom_batch": batch_id}


def shared_part(
    spec: CampaignSpec, content: LocaleContent, run_id: str, batch_id: str
) -> dict[str, Any]:
    """Everything of a batch's body but its personalizations, rebuilt from the approved inputs
    (the campaign spec and the locale's rendered content): what every recipient of it sees."""
    body = sendgrid_request_body(spec, content, [], batch_custom_args(spec, run_id, batch_id))
    del body["personalizations"]
    return body


def shared_parts(
    spec: CampaignSpec, contents: Mapping[str, LocaleContent], manifest: Manifest
) -> dict[str, dict[str, Any]]:
    """Each batch's ``shared_part``, by the SHA-256 of its body: what the envelope guard
    compares every body with."""
    return {
        b.sha256: shared_part(spec, contents[b.locale], manifest.run_id, b.batch_id)
        for b in manifest.batches
    }


def serialise(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BatchEntry:
    batch_id: str
    index: int
    locale: str
    file: str
    sha256: str
    size: int
    recipients: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Manifest:
    campaign: str
    run_id: str
    transport: str
    batches: tuple[BatchEntry, ...]
    sha256: str

    @property
    def recipients(self) -> int:
        return sum(b.recipients for b in self.batches)

    @property
    def digests(self) -> frozenset[str]:
        return frozenset(b.sha256 for b in self.batches)

    def per_locale(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for b in self.batches:
            entry = out.setdefault(b.locale, {"batches": 0, "recipients": 0})
            entry["batches"] += 1
            entry["recipients"] += b.recipients
        return dict(sorted(out.items()))

    def shard(self, shard_index: int, shard_count: int) -> list[BatchEntry]:
        """A fixed slice: batch i belongs to shard ``i mod shard_count``, whatever ran before."""
        return [b for b in self.batches if b.index % shard_count == shard_index]


def locale_envelopes(
    envelopes: Path, locale: str, columns: Sequence[str], chunk_rows: int = CHUNK_ROWS
) -> Iterator[pa.Table]:
    """``columns`` of a locale's envelopes, in the file's order, at most ``chunk_rows`` rows at a
    time: what a reader of one locale holds at once, whatever the audience's size. Only the row
    groups whose statistics may hold the locale are read (``build_envelopes`` writes one locale
    per row group, so a reader of one locale skips every other locale's rows)."""
    parquet = parquet_in_chunks(envelopes)
    metadata = parquet.metadata
    where = parquet.schema_arrow.get_field_index("locale")
    groups: list[int] = []
    mixed = False
    for index in range(metadata.num_row_groups):
        stats = metadata.row_group(index).column(where).statistics
        if stats is None or not stats.has_min_max:
            groups.append(index)
            mixed = True
        elif stats.min <= locale <= stats.max:
            groups.append(index)
            mixed = mixed or stats.min != stats.max or stats.null_count != 0
    if not groups:
        return
    read = list(dict.fromkeys([*columns, "locale"]))
    for batch in parquet.iter_batches(batch_size=chunk_rows, row_groups=groups, columns=read):
        rows = pa.Table.from_batches([batch])
        if mixed:
            rows = rows.filter(pc.equal(rows.column("locale"), locale))
        if rows.num_rows:
            yield rows.select(list(columns))


def in_batches(chunks: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """The rows of ``chunks``, in order, ``size`` at a time (the last table may hold fewer): a
    locale's requests, however its envelopes were read."""
    carry: list[pa.Table] = []
    held = 0
    for chunk in chunks:
        start = 0
        if held:
            start = min(size - held, chunk.num_rows)
            carry.append(chunk.slice(0, start))
            held += start
            if held < size:
                continue
            yield pa.concat_tables(carry)
            carry, held = [], 0
        full = start + (chunk.num_rows - start) // size * size
        for offset in range(start, full, size):
            yield chunk.slice(offset, size)
        if full < chunk.num_rows:
            carry, held = [chunk.slice(full)], chunk.num_rows - full
    if held:
        yield pa.concat_tables(carry)


def iter_envelopes_by_locale(
    envelopes: Path, locale: str, size: int, *, chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[Envelope]]:
    """A locale's envelopes as dicts (substitutions and headers parsed), ``size`` at a time:
    the envelopes of each of its requests, in order."""
    columns = pq.ParquetFile(envelopes).schema_arrow.names
    for table in in_batches(locale_envelopes(envelopes, locale, columns, chunk_rows), size):
        rows = table.to_pylist()
        for row in rows:
            row["substitutions"] = json.loads(row["substitutions"])
            row["headers"] = json.loads(row["headers"])
        yield rows


def freeze_batches(
    spec: CampaignSpec,
    *,
    run_id: str,
    envelopes: Path,
    contents: dict[str, LocaleContent],
    batches_dir: Path,
    manifest_path: Path,
    build_body: BodyBuilder = sendgrid_request_body,
    chunk_rows: int = CHUNK_ROWS,
) -> Manifest:
    """Write every request body and the manifest; returns the manifest with its own digest.

    With the standard builder the bodies are assembled column-wise (``_spliced_bodies``),
    byte for byte what ``serialise(sendgrid_request_body(...))`` gives; any other builder is
    called batch by batch. Either way the envelopes are read ``chunk_rows`` at a time, so what
    is held at once does not grow with the audience; the bodies are the same whatever the
    chunk size.
    """
    batches_dir.mkdir(parents=True, exist_ok=True)
    for stale in batches_dir.glob("*.json"):
        stale.unlink()
    entries: list[BatchEntry] = []
    custom_args = functools.partial(batch_custom_args, spec, run_id)
    for locale in spec.locales:
        if locale not in contents:
            raise EnvelopeViolation(f"no rendered content for locale {locale!r}")

        bodies: Iterator[tuple[str, bytes, int]]
        if build_body is sendgrid_request_body:
            bodies = _spliced_bodies(
                spec, contents[locale], envelopes, locale, custom_args, chunk_rows
            )
        else:
            bodies = (
                (
                    batch_id := batch_id_for(locale, seq),
                    serialise(build_body(spec, contents[locale], chunk, custom_args(batch_id))),
                    len(chunk),
                )
                for seq, chunk in enumerate(
                    iter_envelopes_by_locale(
                        envelopes, locale, spec.batch_size, chunk_rows=chunk_rows
                    ),
                    1,
                )
            )
        for batch_id, data, recipients in bodies:
            name = f"{batch_id}.json"
            (batches_dir / name).write_bytes(data)
            entries.append(
                BatchEntry(
                    batch_id, len(entries), locale, name, sha256_hex(data), len(data), recipients
                )
            )
        log.info("freeze: locale %s done, %d batches so far", locale, len(entries))
    manifest = {
        "campaign": spec.name,
        "run_id": run_id,
        "transport": spec.transport,
        "batch_count": len(entries),
        "recipient_count": sum(e.recipients for e in entries),
        "batches": [e.to_dict() for e in entries],
    }
    write_json(manifest_path, manifest)
    return load_manifest(manifest_path)


def batch_id_for(locale: str, seq: int) -> str:
    """The id of a locale's ``seq``-th request (from 1)."""
    return f"{locale}-{seq:05d}"


_BODY_HEAD = b'{"personalizations":[]'


def _spliced_bodies(
    spec: CampaignSpec,
    content: LocaleContent,
    envelopes: Path,
    locale: str,
    custom_args: Callable[[str], dict[str, str]],
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[str, bytes, int]]:
    """``serialise(sendgrid_request_body(...))`` for each of a locale's batches, spliced from
    the envelopes' own JSON: every personalization is one row's text, every batch's are joined
    by Arrow, and the rest of the body is the standard builder's, serialised with no
    personalization. (Re-serialising the stored JSON gives the same text: it was written with
    the same escaping and separators; ``tests/unit/test_batches.py`` checks the bytes.) The
    envelopes are read ``chunk_rows`` at a time; a batch may take rows of two chunks."""
    personalizations = (
        pa.table(
            {
                "personalization": concatenate(
                    '{"to":[{"email":',
                    json_strings(rows.column("email")),
                    '}],"substitutions":',
                    rows.column("substitutions").combine_chunks(),
                    ',"headers":',
                    rows.column("headers").combine_chunks(),
                    "}",
                )
            }
        )
        for rows in locale_envelopes(
            envelopes, locale, ("email", "substitutions", "headers"), chunk_rows
        )
    )
    for seq, batch in enumerate(in_batches(personalizations, spec.batch_size), 1):
        batch_id = batch_id_for(locale, seq)
        skeleton = serialise(sendgrid_request_body(spec, content, [], custom_args(batch_id)))
        if not skeleton.startswith(_BODY_HEAD):
            raise EnvelopeViolation("the request body does not start with its personalizations")
        data = b"".join(
            (_BODY_HEAD[:-1], _joined(batch.column(0)), b"]", skeleton[len(_BODY_HEAD) :])
        )
        yield batch_id, data, batch.num_rows


def _joined(texts: pa.ChunkedArray) -> bytes:
    """The texts, in order, joined by commas."""
    values = texts.combine_chunks()
    listed = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
    joined: bytes = pc.binary_join(listed, ",")[0].as_buffer().to_pybytes()
    return joined


def load_manifest(manifest_path: Path, expected_sha256: str | None = None) -> Manifest:
    """Read the manifest; with ``expected_sha256`` refuse any manifest but the approved one."""
    data = manifest_path.read_bytes()
    digest = sha256_hex(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise EnvelopeViolation(
            f"the manifest has digest {digest[:12]}…, not the approved "
            f"{expected_sha256[:12]}…: the batches changed after they were frozen"
        )
    raw = read_json(manifest_path)
    batches = tuple(BatchEntry(**b) for b in raw["batches"])
    return Manifest(raw["campaign"], raw["run_id"], raw["transport"], batches, digest)
