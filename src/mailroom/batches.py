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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.campaign_spec import CampaignSpec
from mailroom.content import LocaleContent
from mailroom.errors import EnvelopeViolation
from mailroom.json_columns import concatenate, json_strings
from mailroom.staging import read_json, write_json

log = logging.getLogger(__name__)

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


def iter_envelopes_by_locale(envelopes: Path, locale: str, size: int) -> Iterator[list[Envelope]]:
    table = pq.read_table(envelopes, filters=[("locale", "=", locale)])
    for offset in range(0, table.num_rows, size):
        rows = table.slice(offset, size).to_pylist()
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
) -> Manifest:
    """Write every request body and the manifest; returns the manifest with its own digest.

    With the standard builder the bodies are assembled column-wise (``_spliced_bodies``),
    byte for byte what ``serialise(sendgrid_request_body(...))`` gives; any other builder is
    called batch by batch.
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
            bodies = _spliced_bodies(spec, contents[locale], envelopes, locale, custom_args)
        else:
            bodies = (
                (
                    batch_id := batch_id_for(locale, seq),
                    serialise(build_body(spec, contents[locale], chunk, custom_args(batch_id))),
                    len(chunk),
                )
                for seq, chunk in enumerate(
                    iter_envelopes_by_locale(envelopes, locale, spec.batch_size), 1
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
) -> Iterator[tuple[str, bytes, int]]:
    """``serialise(sendgrid_request_body(...))`` for each of a locale's batches, spliced from
    the envelopes' own JSON: every personalization is one row's text, every batch's are joined
    by Arrow, and the rest of the body is the standard builder's, serialised with no
    personalization. (Re-serialising the stored JSON gives the same text: it was written with
    the same escaping and separators; ``tests/unit/test_batches.py`` checks the bytes.)"""
    table = pq.read_table(
        envelopes, columns=["email", "substitutions", "headers"], filters=[("locale", "=", locale)]
    )
    count = table.num_rows
    if not count:
        return
    personalizations = concatenate(
        '{"to":[{"email":',
        json_strings(table.column("email")),
        '}],"substitutions":',
        table.column("substitutions").combine_chunks(),
        ',"headers":',
        table.column("headers").combine_chunks(),
        "}",
    )
    del table
    starts = list(range(0, count, spec.batch_size))
    offsets = pa.array([*starts, count], pa.int32())
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, personalizations), ",")
    del personalizations
    for seq, (start, text) in enumerate(zip(starts, joined, strict=True), 1):
        batch_id = batch_id_for(locale, seq)
        skeleton = serialise(sendgrid_request_body(spec, content, [], custom_args(batch_id)))
        if not skeleton.startswith(_BODY_HEAD):
            raise EnvelopeViolation("the request body does not start with its personalizations")
        data = b"".join(
            (_BODY_HEAD[:-1], text.as_buffer().to_pybytes(), b"]", skeleton[len(_BODY_HEAD) :])
        )
        yield batch_id, data, min(spec.batch_size, count - start)


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
