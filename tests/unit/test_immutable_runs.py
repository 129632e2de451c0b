"""Immutable runs (``mailroom.run_record``), through the real pipeline and the dev server.

Clearing a finished DAG run runs every stage again under the same run id: each must refuse, or
leave every file of the run byte-identical and send nothing. Two run ids that map to one folder
never share it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom import pipeline, run_record
from mailroom.audience.sample import SampleAudience, generate
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.pipeline import ProjectPaths, Run
from mailroom.run_record import RunRefused
from mailroom.staging import read_json, write_json
from sendgrid_dev import SendGridDevServer
from support.runs import built_run, guard_and_send

pytestmark = pytest.mark.unit
SECRET = b"immutable-runs"
SEEDS = ["qa@example-exchange.test"]
APPROVED = {"decision": "approved", "by": "approver", "at": "2026-12-06 10:00:00+00:00"}


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=400)


@pytest.fixture
def paths(tmp_path: Path) -> ProjectPaths:
    """The project's include folder, with a seed list so the canary writes its record too."""
    include = tmp_path / "include"
    shutil.copytree(Path(__file__).resolve().parents[2] / "include", include)
    spec_path = include / "campaigns" / "winter_update.yaml"
    spec = yaml.safe_load(spec_path.read_text("utf-8"))
    spec.update(seed_list=SEEDS, batch_size=100)
    spec_path.write_text(yaml.safe_dump(spec), "utf-8")
    return ProjectPaths.under(include)


def folder_digest(root: Path) -> dict[str, str]:
    """Every file of a run folder: relative path → SHA-256 of its bytes."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def transport(server: SendGridDevServer) -> SendGridTransport:
    return SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=10))


def prepare_again(paths: ProjectPaths, run: Run, run_id: str | None = None) -> Run:
    return pipeline.prepare(
        paths,
        campaign="winter_update",
        run_id=run_id or run.run_id,
        staging_root=run.staging.root.parents[1],
        shard_count=run.shard_count,
        dry_run=False,
    )


def complete_run(
    tmp_path: Path, paths: ProjectPaths, audience: SampleAudience, server: SendGridDevServer
) -> tuple[Run, Outbox, dict[str, Any]]:
    """Every stage of one run, as the DAG runs them, up to its report."""
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__immutable",
        shard_count=2,
        secret=SECRET,
    )
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    pipeline.check_envelopes(run, paths, secret=SECRET, outbox=outbox)
    pipeline.canary_send(run, secret=SECRET, transport=transport(server))
    pipeline.summarise(run, triggered_by="analyst")
    write_json(run.staging.approval, APPROVED)  # what tasks.record_approval writes
    guard_and_send(run, frozen, outbox, lambda: transport(server))
    report = pipeline.reconcile(run, outbox=outbox, approval=read_json(run.staging.approval))
    assert report["status"] == "sent", report
    return run, outbox, frozen


def test_every_stage_of_a_finished_run_refuses_or_changes_nothing(
    tmp_path: Path,
    paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run, outbox, frozen = complete_run(tmp_path, paths, audience, dev_server)
    before = folder_digest(run.staging.root)
    assert {"run.json", "frozen.json", "report.json", "canary/result.json"} <= set(before)
    requests = dev_server.stats().received
    outbox_before = outbox.counts(run.run_key)

    refused: dict[str, Any] = {
        "prepare": lambda: prepare_again(paths, run),
        "extract_audience": lambda: pipeline.extract_audience(run, sql_url=audience.url()),
        "validate_audience": lambda: pipeline.validate_audience(run),
        "render_content": lambda: pipeline.render_content(run, paths),
        "build_envelopes": lambda: pipeline.build_envelopes(run, secret=SECRET),
        "freeze_batches": lambda: pipeline.freeze_batches(run, outbox=outbox),
        "check_envelopes": lambda: pipeline.check_envelopes(
            run, paths, secret=SECRET, outbox=outbox
        ),
        "canary_send": lambda: pipeline.canary_send(
            run, secret=SECRET, transport=transport(dev_server)
        ),
        "summarise": lambda: pipeline.summarise(run, triggered_by="analyst"),
    }
    for stage, again in refused.items():
        with pytest.raises(RunRefused, match="frozen") as caught:
            again()
        assert "nothing was changed" in str(caught.value), stage
        assert folder_digest(run.staging.root) == before, stage

    # The stages that legitimately run after the freeze: nothing is sent twice, nothing changes.
    guard_and_send(run, frozen, outbox, lambda: transport(dev_server))
    report = pipeline.reconcile(run, outbox=outbox, approval=read_json(run.staging.approval))
    assert report == read_json(run.staging.report)
    # A re-run's timeout or rejection never reaches the report.
    with pytest.raises(RunRefused, match="approval"):
        pipeline.reconcile(run, outbox=outbox, approval={"decision": "timed_out", "by": None})
    with pytest.raises(RunRefused, match="already has its approval recorded"):
        run_record.approval_unchanged(
            run.staging.approval, {**APPROVED, "decision": "timed_out"}, run_key=run.run_key
        )
    assert run_record.approval_unchanged(run.staging.approval, APPROVED, run_key=run.run_key)
    # The approve task cleared on its own asks nobody again.
    with pytest.raises(RunRefused, match=r"already answered \(approved by approver at "):
        run_record.check_not_answered(
            run_record.Folder.local(run.staging.root), run_key=run.run_key
        )

    assert folder_digest(run.staging.root) == before
    assert dev_server.stats().received == requests
    assert outbox.counts(run.run_key) == outbox_before
    outbox.dispose()


def test_a_later_report_is_written_beside_the_first_never_over_it(
    tmp_path: Path,
    paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    """The outbox moved on after the report (here: the batches an operator halted, then
    resumed): the first report stands, the later one is written next to it, once."""
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__amended",
        shard_count=1,
        secret=SECRET,
    )
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    write_json(run.staging.approval, APPROVED)
    pipeline.guard_shard(run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox)
    outbox.request_halt(run.run_key)
    send = {
        "shard": 0,
        "manifest_sha256": frozen["manifest_sha256"],
        "outbox": outbox,
        "shard_count": 1,
    }
    pipeline.send_shard(run, transport=transport(dev_server), **send)
    first = pipeline.reconcile(run, outbox=outbox, approval=APPROVED)
    assert first["status"] == "incomplete"
    before = folder_digest(run.staging.root)

    outbox.request_halt(run.run_key, halted=False)  # `mailroom resume`
    pipeline.send_shard(run, transport=transport(dev_server), **send)
    later = pipeline.reconcile(run, outbox=outbox, approval=APPROVED)
    assert later["status"] == "sent"
    assert later["amends"] == str(run.staging.report)
    after = folder_digest(run.staging.root)
    assert {k: v for k, v in after.items() if not k.startswith("reports/")} == before
    assert set(after) - set(before) == {"reports/2.json", "reports/2.not_sent.csv"}
    # Reconciling again finds nothing new: nothing is written.
    assert pipeline.reconcile(run, outbox=outbox, approval=APPROVED) == later
    assert folder_digest(run.staging.root) == after
    outbox.dispose()


def test_run_ids_that_share_a_folder_are_refused(
    tmp_path: Path, paths: ProjectPaths, audience: SampleAudience
) -> None:
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__x:1",
        shard_count=1,
        secret=SECRET,
    )
    before = folder_digest(run.staging.root)
    assert read_json(run.staging.root / "run.json")["run_id"] == "manual__x:1"
    with pytest.raises(RunRefused) as caught:
        prepare_again(paths, run, run_id="manual__x_1")
    assert "'manual__x_1'" in str(caught.value)
    assert "'manual__x:1'" in str(caught.value)
    # Any stage of the other run id is refused the same way.
    other = Run("winter_update", "manual__x_1", run.staging, 1, False)
    with pytest.raises(RunRefused, match="belongs to run 'manual__x:1'"):
        pipeline.validate_audience(other)
    assert folder_digest(run.staging.root) == before


def test_a_run_that_failed_before_its_freeze_may_run_again(
    tmp_path: Path, paths: ProjectPaths, audience: SampleAudience
) -> None:
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__retry",
        shard_count=1,
        secret=SECRET,
    )
    again = prepare_again(paths, run)
    pipeline.extract_audience(again, sql_url=audience.url())
    pipeline.validate_audience(again)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(again, outbox=outbox)
    assert read_json(run.staging.root / "frozen.json") == {
        "manifest_sha256": frozen["manifest_sha256"],
        "run_id": "manual__retry",
    }
    outbox.dispose()


def test_provider_events_after_the_report_make_no_later_report_and_go_beside_it(
    tmp_path: Path,
    paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    """SendGrid's events keep arriving after reconcile: a reconcile run again writes nothing
    for them (the outbox did not move on), and ``refresh_delivery_feedback`` writes them into
    ``delivery_feedback.json`` and ``delivery_feedback.not_sent.csv`` only."""
    from mailroom.batches import load_manifest
    from mailroom.delivery import report
    from support.provider_events import event, record

    run, outbox, _ = complete_run(tmp_path, paths, audience, dev_server)
    first = pipeline.reconcile(run, outbox=outbox, approval=read_json(run.staging.approval))
    before = folder_digest(run.staging.root)
    batch = load_manifest(run.staging.manifest).batches[0]
    bounced, delivered = sorted(outbox.batch_members(run.run_key, batch.batch_id))[:2]
    got = record(
        outbox,
        event(run.run_key, batch.batch_id, bounced, "bounce", reason="550 5.1.1 unknown user"),
        event(run.run_key, batch.batch_id, delivered, "delivered"),
    )
    assert got.matched == 2

    assert pipeline.reconcile(run, outbox=outbox, approval=read_json(run.staging.approval)) == first
    assert folder_digest(run.staging.root) == before

    feedback = report.refresh_delivery_feedback(outbox, run.run_key, run.staging.root)
    assert feedback["total"]["bounced"] == 1
    assert feedback["total"]["delivered"] == 1
    after = folder_digest(run.staging.root)
    assert {k: v for k, v in after.items() if not k.startswith("delivery_feedback")} == before
    assert set(after) - set(before) == {
        "delivery_feedback.json",
        "delivery_feedback.not_sent.csv",
    }
    outbox.dispose()
