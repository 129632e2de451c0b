"""Campaign-level exactly-once through the real pipeline (no Airflow), on SQLite and PostgreSQL.

A second run of a campaign leaves out everyone an earlier run sent to (``already_sent``) or left
in doubt (``unknown_earlier``), sends them nothing, and says so in its report, its
``not_sent.csv`` and its approval summary; with the resend option and a reason it sends again,
and the approver reads that first. Another campaign is unaffected. Two runs of one campaign
never send at the same time, and a run built before another sent refuses the batches that
other run sent to in the meantime.
"""

from __future__ import annotations

import csv
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mailroom import earlier_runs, pipeline
from mailroom.approval import summary
from mailroom.audience.sample import SampleAudience, generate
from mailroom.delivery.outbox import BatchState, CampaignBusy, Outbox, StagedBatch
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.earlier_runs import ResendChoice, resend_choice
from mailroom.errors import ValidationFailed
from mailroom.pipeline import ProjectPaths, Run
from sendgrid_dev import SendGridDevServer, accepted_recipients
from support.runs import guard_and_send

pytestmark = pytest.mark.unit
SECRET = b"unit-test-secret"
APPROVED = {"decision": "approved", "by": "approver"}


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=1500)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outbox]:
    """A new outbox: a SQLite file, or a schema of its own in the session's PostgreSQL database
    (so no other test's run of the same campaign is an earlier run here)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'outbox.sqlite'}"
    else:
        base = request.getfixturevalue("postgres_url")
        schema = f"once_{uuid.uuid4().hex[:10]}"
        engine = sa.create_engine(base)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        finally:
            engine.dispose()
        url = f"{base}?options=-csearch_path%3D{schema}"
    box = Outbox(url)
    try:
        yield box
    finally:
        box.dispose()


@pytest.fixture
def two_campaigns(tmp_path: Path, project_paths: ProjectPaths) -> ProjectPaths:
    """The project's campaigns plus ``spring_update``: the same spec under another name."""
    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    spec = (project_paths.campaigns / "winter_update.yaml").read_text("utf-8")
    (campaigns / "winter_update.yaml").write_text(spec, "utf-8")
    (campaigns / "spring_update.yaml").write_text(
        spec.replace("name: winter_update", "name: spring_update"), "utf-8"
    )
    return ProjectPaths(campaigns, project_paths.templates, project_paths.translations)


def built(
    paths: ProjectPaths,
    tmp_path: Path,
    audience: SampleAudience,
    outbox: Outbox,
    run_id: str,
    *,
    campaign: str = "winter_update",
    resend: ResendChoice | None = None,
) -> tuple[Run, dict[str, Any]]:
    """A run taken up to its approval: built against the outbox, frozen and through the gate."""
    run = pipeline.prepare(
        paths,
        campaign=campaign,
        run_id=run_id,
        staging_root=tmp_path / "staging",
        shard_count=1,
        dry_run=False,
    )
    pipeline.extract_audience(run, sql_url=audience.url())
    pipeline.validate_audience(run)
    pipeline.render_content(run, paths)
    pipeline.build_envelopes(run, secret=SECRET, outbox=outbox, resend=resend)
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    pipeline.check_envelopes(run, paths, secret=SECRET, outbox=outbox)
    return run, frozen


def send(run: Run, frozen: dict[str, Any], outbox: Outbox, server: SendGridDevServer) -> None:
    """What the DAG does after approval, through the dev server."""
    guard_and_send(
        run,
        frozen,
        outbox,
        lambda: SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=10)),
    )


def sent_and_reconciled(
    paths: ProjectPaths,
    tmp_path: Path,
    audience: SampleAudience,
    outbox: Outbox,
    server: SendGridDevServer,
) -> tuple[Run, dict[str, Any]]:
    """A first run of the campaign, sent to everyone and reconciled."""
    first, frozen = built(paths, tmp_path, audience, outbox, "manual__first")
    send(first, frozen, outbox, server)
    pipeline.reconcile(first, outbox=outbox, approval=APPROVED)
    return first, frozen


def not_sent_states(run: Run) -> Counter[str]:
    with run.staging.not_sent.open(encoding="utf-8") as fh:
        return Counter(row["state"] for row in csv.DictReader(fh))


def test_a_second_run_sends_nothing_and_says_already_sent(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    outbox: Outbox,
    dev_server: SendGridDevServer,
) -> None:
    _, frozen = sent_and_reconciled(project_paths, tmp_path, audience, outbox, dev_server)
    requests = len(dev_server.accepted())
    everyone = frozen["recipients"]
    received = Counter(e.lower() for e in accepted_recipients(dev_server.accepted()))
    assert (len(received), max(received.values())) == (everyone, 1)

    second, frozen = built(project_paths, tmp_path, audience, outbox, "manual__second")
    record = earlier_runs.read_record(second.staging)
    assert record is not None
    assert record["left_out"] == {"already_sent": everyone, "unknown_earlier": 0}
    assert record["left_out_by_earlier_run"] == {"manual__first": everyone}
    assert frozen["recipients"] == 0
    text = summary.summarise(second, triggered_by="analyst")
    assert f"**{everyone:,} already sent**" in text
    assert "`manual__first`" in text
    send(second, frozen, outbox, dev_server)
    assert len(dev_server.accepted()) == requests  # 0 requests

    report = pipeline.reconcile(second, outbox=outbox, approval=APPROVED)
    assert report["status"] == "nothing_to_send"
    assert report["nothing_to_send_because"] == (
        f"everyone valid was left out by earlier runs of this campaign ({everyone} already_sent); "
        "trigger with resend_to_earlier_recipients and a resend_reason to send to them again"
    )
    assert report["left_out"]["already_sent"] == everyone
    assert report["balanced"] is True
    assert report["audience_equation"] == (
        f"valid {report['validation']['valid']} = staged 0 + already_sent {everyone} + "
        "unknown_earlier 0"
    )
    assert not_sent_states(second)["already_sent"] == everyone
    # left_out.json holds counts, never an address.
    assert "@" not in earlier_runs.left_out_json(second.staging).read_text("utf-8")


def test_resend_with_a_reason_sends_again_and_the_approver_sees_it(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    outbox: Outbox,
    dev_server: SendGridDevServer,
) -> None:
    _, frozen = sent_and_reconciled(project_paths, tmp_path, audience, outbox, dev_server)
    requests = len(dev_server.accepted())
    everyone = frozen["recipients"]

    reason = "the first send had the wrong maintenance date"
    second, frozen = built(
        project_paths,
        tmp_path,
        audience,
        outbox,
        "manual__again",
        resend=resend_choice(True, reason),
    )
    assert frozen["recipients"] == everyone
    text = summary.summarise(second, triggered_by="analyst")
    assert text.count("RESEND requested") == 1
    assert reason in text
    assert f"{everyone:,} recipient(s)" in text
    send(second, frozen, outbox, dev_server)
    assert len(dev_server.accepted()) == 2 * requests
    report = pipeline.reconcile(second, outbox=outbox, approval=APPROVED)
    assert report["status"] == "sent"
    assert report["left_out"]["resend_to_earlier_recipients"] is True
    assert report["left_out"]["resend_reason"] == reason
    assert report["left_out"]["earlier_recipients_included"]["already_sent"] == everyone


def test_unknown_outcomes_of_an_earlier_run_are_left_out(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    outbox: Outbox,
    dev_server: SendGridDevServer,
) -> None:
    first, first_frozen = built(project_paths, tmp_path, audience, outbox, "manual__first")
    everyone = first_frozen["recipients"]
    states = sorted(outbox.states(first.run_key))
    # One whole request lost its answer, one is still in flight; the rest failed outright.
    lost, in_flight, *failed = states
    for batch_id in states:
        assert outbox.claim(first.run_key, batch_id)
    outbox.finish(first.run_key, lost, BatchState.UNKNOWN, error="answer lost")
    for batch_id in failed:
        outbox.finish(first.run_key, batch_id, BatchState.FAILED, error="HTTP 400")
    doubt = len(outbox.batch_members(first.run_key, lost)) + len(
        outbox.batch_members(first.run_key, in_flight)
    )

    second, frozen = built(project_paths, tmp_path, audience, outbox, "manual__second")
    record = earlier_runs.read_record(second.staging)
    assert record is not None
    assert record["left_out"] == {"already_sent": 0, "unknown_earlier": doubt}
    assert record["sending_run_when_built"] == first.run_key
    assert frozen["recipients"] == everyone - doubt
    # The first run is still sending (a batch in flight): the second may not start.
    with pytest.raises(CampaignBusy):
        send(second, frozen, outbox, dev_server)
    outbox.finish(first.run_key, in_flight, BatchState.UNKNOWN, error="worker lost")
    pipeline.reconcile(first, outbox=outbox, approval=APPROVED)
    send(second, frozen, outbox, dev_server)
    received = Counter(e.lower() for e in accepted_recipients(dev_server.accepted()))
    assert sum(received.values()) == everyone - doubt
    assert max(received.values()) == 1
    report = pipeline.reconcile(second, outbox=outbox, approval=APPROVED)
    assert report["status"] == "sent"
    assert report["balanced"] is True
    states_listed = not_sent_states(second)
    del states_listed["quarantined"]  # the validation's, as in every run
    assert states_listed == Counter({"unknown_earlier": doubt})


def test_a_run_built_before_another_sent_refuses_what_that_run_sent(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    outbox: Outbox,
    dev_server: SendGridDevServer,
) -> None:
    first, first_frozen = built(project_paths, tmp_path, audience, outbox, "manual__first")
    # Both wait for approval at once: neither has sent, so the second leaves nobody out.
    second, frozen = built(project_paths, tmp_path, audience, outbox, "manual__second")
    assert frozen["recipients"] == first_frozen["recipients"]
    send(first, first_frozen, outbox, dev_server)
    requests = len(dev_server.accepted())
    pipeline.reconcile(first, outbox=outbox, approval=APPROVED)

    send(second, frozen, outbox, dev_server)
    assert len(dev_server.accepted()) == requests
    report = pipeline.reconcile(second, outbox=outbox, approval=APPROVED)
    assert report["outbox"]["failed"]["recipients"] == frozen["recipients"]
    assert report["balanced"] is True
    with second.staging.not_sent.open(encoding="utf-8") as fh:
        reasons = {row["reason"] for row in csv.DictReader(fh) if row["state"] == "failed"}
    assert len(reasons) > 0
    assert all("by another run of this campaign" in r for r in reasons)


def test_another_campaign_is_unaffected(
    tmp_path: Path,
    two_campaigns: ProjectPaths,
    audience: SampleAudience,
    outbox: Outbox,
    dev_server: SendGridDevServer,
) -> None:
    first, first_frozen = built(two_campaigns, tmp_path, audience, outbox, "manual__first")
    send(first, first_frozen, outbox, dev_server)
    requests = len(dev_server.accepted())

    # Not reconciled: winter_update's run still holds its slot, which is no other campaign's.
    other, frozen = built(
        two_campaigns, tmp_path, audience, outbox, "manual__first", campaign="spring_update"
    )
    record = earlier_runs.read_record(other.staging)
    assert record is not None
    assert record["left_out_total"] == 0
    assert frozen["recipients"] == first_frozen["recipients"]
    send(other, frozen, outbox, dev_server)
    assert len(dev_server.accepted()) == 2 * requests


def test_the_resend_option_needs_a_reason() -> None:
    assert resend_choice(False, "") == ResendChoice()
    assert resend_choice(None, None) == ResendChoice()
    assert resend_choice(True, "  wrong date  ") == ResendChoice(True, "wrong date")
    with pytest.raises(ValidationFailed, match="resend_reason is empty"):
        resend_choice(True, " ")
    with pytest.raises(ValidationFailed, match="resend_to_earlier_recipients is false"):
        resend_choice(False, "because")
    with pytest.raises(ValidationFailed, match="one line"):
        resend_choice(True, "two\nlines")
    with pytest.raises(ValidationFailed, match="true or false"):
        resend_choice("yes", "because")


def test_a_claim_counts_only_the_sends_of_runs_of_its_own_campaign(tmp_path: Path) -> None:
    """A batch holding someone another run of the campaign sent to is failed at its claim;
    a run of ``winterXupdate`` is no run of ``winter_update`` (``_`` is a LIKE wildcard)."""
    box = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    try:
        batch = StagedBatch("en-00001", 0, "en", "0" * 64, 1)
        member = [("a@example.com", "u1", "en-00001")]
        for run_key in ("winterXupdate/r1", "winter_update/r2", "winter_update/r3"):
            box.stage(run_key, "m" * 64, [batch], member)
        assert box.claim("winterXupdate/r1", "en-00001")
        box.finish("winterXupdate/r1", "en-00001", BatchState.SENT)
        box.end_sending("winterXupdate/r1")

        assert box.claim("winter_update/r2", "en-00001")  # another campaign's send
        box.finish("winter_update/r2", "en-00001", BatchState.SENT)
        box.end_sending("winter_update/r2")

        assert not box.claim("winter_update/r3", "en-00001")  # its own campaign's send
        assert box.states("winter_update/r3")["en-00001"].state == BatchState.FAILED
    finally:
        box.dispose()


def test_runs_of_a_campaign_are_told_apart_by_their_exact_name(tmp_path: Path) -> None:
    """``winter_update`` is not ``winterXupdate`` (``_`` is a LIKE wildcard, escaped)."""
    box = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    try:
        batch = StagedBatch("en-00001", 0, "en", "0" * 64, 1)
        box.stage("winterXupdate/r1", "m" * 64, [batch], [("a@example.com", "u1", "en-00001")])
        assert box.claim("winterXupdate/r1", "en-00001")
        box.finish("winterXupdate/r1", "en-00001", BatchState.SENT)
        assert list(box.earlier_outcomes("winter_update/r2")) == []
        assert [o[:2] for o in box.earlier_outcomes("winterXupdate/r2")] == [
            ("a@example.com", "sent")
        ]
    finally:
        box.dispose()
