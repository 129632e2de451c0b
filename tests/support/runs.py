"""A campaign run taken through every stage before freeze, for tests that start from there."""

from __future__ import annotations

from pathlib import Path

from mailroom import pipeline
from mailroom.batches import Manifest
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.shards import guard_shard
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


def guard_every_request(
    run_key: str, manifest: Manifest, batches_dir: Path, outbox: Outbox
) -> None:
    """What the DAG's guard_shard tasks do after approval: the envelope guard on every request
    of the run, which ``send_shard`` requires before it sends anything."""
    guard_shard(
        run_key=run_key,
        manifest=manifest,
        batches_dir=batches_dir,
        shard_index=0,
        shard_count=1,
        outbox=outbox,
    )
