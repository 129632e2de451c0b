"""A campaign run taken through every stage before freeze, for tests that start from there."""

from __future__ import annotations

from pathlib import Path

from mailroom import pipeline
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
    run = pipeline.prepare_run(
        paths,
        campaign=campaign,
        run_id=run_id,
        staging_root=staging_root,
        shard_count=shard_count,
        dry_run=dry_run,
    )
    pipeline.extract(run, sql_url=users_url)
    pipeline.validate(run)
    pipeline.render(run, paths)
    pipeline.build(run, secret=secret)
    return run
