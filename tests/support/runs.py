"""A campaign run taken through every stage before freeze, for tests that start from there."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailroom import pipeline
from mailroom.batches import Manifest
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.shards import guard_shard
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
