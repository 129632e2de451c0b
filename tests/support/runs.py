"""A campaign run taken through every stage before freeze, for tests that start from there."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailroom import pipeline
from mailroom.batches import BatchEntry, Manifest
from mailroom.delivery.outbox import FINAL_STATES, BatchState, Outbox, StagedBatch
from mailroom.delivery.rate import RateLimiter
from mailroom.delivery.shards import guard_shard, send_shard
from mailroom.delivery.transports.base import Transport
from mailroom.pipeline import ProjectPaths, Run


def built_run(
    paths: ProjectPaths,
    *,
    users_url: str,
    staging_root: Path,
    run_id: str,
    shard_count: int,
    secret: bytes,
    campaign: str = "winter_update",
    dry_run: bool = False,
) -> Run:
    """Prepare a run of ``campaign`` and run extract, validate, render and build on it."""
    run = pipeline.prepare(
        paths,
        campaign=campaign,
        run_id=run_id,
        staging_root=staging_root,
        shard_count=shard_count,
        dry_run=dry_run,
    )
    pipeline.extract_audience(run, sql_url=users_url)
    pipeline.validate_audience(run)
    pipeline.render_content(run, paths)
    pipeline.build_envelopes(run, secret=secret)
    return run


def shared_of(*bodies: bytes) -> dict[str, dict[str, Any]]:
    """For bodies a test writes by hand: each one's shared part (all but its personalizations)
    taken from the body itself, as if the approved inputs gave exactly that. The reconstruction
    from the spec and the content (``batches.shared_parts``) has tests of its own."""
    return {
        hashlib.sha256(body).hexdigest(): {
            k: v for k, v in json.loads(body).items() if k != "personalizations"
        }
        for body in bodies
    }


def shared_in(manifest: Manifest, batches_dir: Path) -> dict[str, dict[str, Any]]:
    """``shared_of`` every body of a hand-written manifest."""
    return shared_of(*((batches_dir / b.file).read_bytes() for b in manifest.batches))


def guard_every_request(
    run_key: str, manifest: Manifest, batches_dir: Path, outbox: Outbox
) -> None:
    """What the DAG's guard_shard tasks do after approval: the envelope guard on every request
    of the run, which ``send_shard`` requires before it sends anything (for a hand-written
    manifest: see ``shared_of``)."""
    guard_shard(
        run_key=run_key,
        manifest=manifest,
        shared=shared_in(manifest, batches_dir),
        batches_dir=batches_dir,
        shard_index=0,
        shard_count=1,
        outbox=outbox,
    )


def guard_and_send(
    run: Run, frozen: dict[str, Any], outbox: Outbox, transport: Callable[[], Transport]
) -> None:
    """What the DAG does after approval: every shard's guard pass, then every shard's send
    (each through a new ``transport()``). ``frozen``: what ``pipeline.freeze_batches`` returned."""
    shards = frozen["shards"]
    for shard in shards:
        pipeline.guard_shard(
            run,
            manifest_sha256=frozen["manifest_sha256"],
            outbox=outbox,
            shard=shard,
            shard_count=len(shards),
        )
    for shard in shards:
        pipeline.send_shard(
            run,
            shard=shard,
            manifest_sha256=frozen["manifest_sha256"],
            transport=transport(),
            outbox=outbox,
            shard_count=len(shards),
        )


@dataclass
class Staged:
    """Frozen requests on disk, staged in an outbox and cleared by the guard's pass."""

    run_key: str
    manifest: Manifest
    batches_dir: Path
    outbox: Outbox
    addresses: list[str]
    # send_shard's keywords this run is sent with unless a call gives its own.
    defaults: dict[str, Any] = field(default_factory=dict)

    def send(self, transport: Transport, **kwargs: Any) -> dict[str, Any]:
        """``send_shard`` on the run (shard 0 of 1, no rate limit unless given)."""
        options = {
            "shard_index": 0,
            "shard_count": 1,
            "limiter": RateLimiter(None, None),
            **self.defaults,
            **kwargs,
        }
        return send_shard(
            run_key=self.run_key,
            manifest=self.manifest,
            shared=shared_in(self.manifest, self.batches_dir),
            batches_dir=self.batches_dir,
            transport=transport,
            outbox=self.outbox,
            **options,
        )

    def accounted(self) -> dict[str, dict[str, int]]:
        """The reconcile equation, staged = sent + failed + unknown + halted, for batches and
        recipients, with nothing left staged or sending."""
        counts = self.outbox.counts(self.run_key)
        assert counts[BatchState.STAGED] == {"batches": 0, "recipients": 0}
        assert counts[BatchState.SENDING] == {"batches": 0, "recipients": 0}
        for unit, total in (
            ("batches", len(self.manifest.batches)),
            ("recipients", len(self.addresses)),
        ):
            assert sum(counts[s][unit] for s in FINAL_STATES) == total
        return counts

    def states(self) -> dict[str, BatchState]:
        return {b: r.state for b, r in self.outbox.states(self.run_key).items()}


def stage_requests(
    tmp_path: Path,
    run_key: str,
    requests: Sequence[tuple[list[str], Callable[[str], bytes]]],
    **defaults: Any,
) -> Staged:
    """One frozen SendGrid request per (addresses, body of batch id), written under
    ``tmp_path``, staged in a SQLite outbox there and cleared by the guard's pass."""
    campaign, _, run_id = run_key.partition("/")
    batches_dir = tmp_path / "batches"
    batches_dir.mkdir()
    entries, members, addresses = [], [], []
    for index, (emails, body) in enumerate(requests):
        batch_id = f"en-{index + 1:05d}"
        data = body(batch_id)
        (batches_dir / f"{batch_id}.json").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        entries.append(
            BatchEntry(batch_id, index, "en", f"{batch_id}.json", digest, len(data), len(emails))
        )
        members += [(email, f"u{index}-{n}", batch_id) for n, email in enumerate(emails)]
        addresses += emails
    manifest_sha = hashlib.sha256(json.dumps([e.to_dict() for e in entries]).encode()).hexdigest()
    manifest = Manifest(campaign, run_id, "sendgrid", tuple(entries), manifest_sha)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    outbox.stage(
        run_key,
        manifest_sha,
        [StagedBatch(e.batch_id, e.index, e.locale, e.sha256, e.recipients) for e in entries],
        members,
    )
    guard_every_request(run_key, manifest, batches_dir, outbox)
    return Staged(run_key, manifest, batches_dir, outbox, addresses, defaults)
