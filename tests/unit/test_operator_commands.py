"""The operator commands act on a run's outbox: halt, resume, resend and settle the unknown,
each recorded with who, when and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailroom.cli.main import main
from mailroom.cli.run_access import RunNotFound, find_run
from mailroom.delivery.outbox import BatchState, Outbox, StagedBatch

pytestmark = pytest.mark.unit
RUN = "winter_update/manual__ops"


@pytest.fixture(autouse=True)
def no_local_airflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands look for the project's local Airflow; these tests give the outbox."""
    monkeypatch.setenv("MAILROOM_REPO", str(tmp_path / "project"))
    for name in ("MAILROOM_AIRFLOW_URL", "MAILROOM_AIRFLOW_USER", "MAILROOM_OUTBOX_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def outbox_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'outbox.sqlite'}"
    outbox = Outbox(url)
    outbox.stage(
        RUN,
        "f" * 64,
        [
            StagedBatch("en-00001", 0, "en", "a" * 64, 1),
            StagedBatch("en-00002", 1, "en", "b" * 64, 1),
        ],
        [("a@example.com", "u1", "en-00001"), ("b@example.com", "u2", "en-00002")],
    )
    assert outbox.claim(RUN, "en-00001")
    outbox.finish(RUN, "en-00001", BatchState.UNKNOWN, error="answer lost")
    outbox.dispose()
    return url


def test_halt_and_resume_flip_the_runs_flag(
    outbox_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["halt", RUN, "--outbox-url", outbox_url, "--reason", "wrong subject"]) == 0
    outbox = Outbox(outbox_url)
    assert outbox.halt_requested(RUN)
    assert outbox.halt_reason(RUN) == "wrong subject"
    assert main(["resume", RUN, "--outbox-url", outbox_url]) == 0
    assert not outbox.halt_requested(RUN)
    assert "clear the run's send_shard" in capsys.readouterr().out


def test_resend_makes_only_unknown_batches_sendable(
    outbox_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "checked: the provider has no record of en-00001"
    assert (
        main(["resend", RUN, "--outbox-url", outbox_url, "--reason", reason, "--by", "olga"]) == 0
    )
    out = capsys.readouterr().out
    assert "WARNING: 1 recipient(s) were in unknown requests" in out
    assert "may get the message twice" in out
    outbox = Outbox(outbox_url)
    states = outbox.states(RUN)
    assert states["en-00001"].state == "staged"
    assert outbox.claim(RUN, "en-00001")
    assert outbox.states(RUN)["en-00001"].state == BatchState.SENDING


def test_unknown_run_and_missing_outbox_are_clear_errors(
    outbox_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["status", "winter_update/nope", "--outbox-url", outbox_url]) == 1
    assert "no run 'winter_update/nope'" in capsys.readouterr().err
    monkeypatch.delenv("MAILROOM_OUTBOX_URL", raising=False)
    assert main(["status", RUN]) == 2


def test_resend_without_a_reason_is_refused_and_changes_nothing(outbox_url: str) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["resend", RUN, "--outbox-url", outbox_url])
    assert refused.value.code == 2
    assert Outbox(outbox_url).states(RUN)["en-00001"].state == BatchState.UNKNOWN


def test_settle_as_sent_records_who_when_why_and_the_counts(
    outbox_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "SendGrid activity shows en-00001 delivered"
    argv = ["settle", RUN, "en-00001", "--as", "sent", "--reason", reason, "--by", "olga"]

    assert main([*argv, "--outbox-url", outbox_url]) == 0

    outbox = Outbox(outbox_url)
    assert outbox.states(RUN)["en-00001"].state == BatchState.SENT
    (entry,) = outbox.actions(RUN)
    assert (entry["action"], entry["by"], entry["reason"]) == ("settle_sent", "olga", reason)
    assert (entry["requests"], entry["recipients"]) == (["en-00001"], 1)
    assert entry["counts_before"]["unknown"]["recipients"] == 1
    assert entry["counts_after"]["sent"]["recipients"] == 1
    out = capsys.readouterr().out
    assert f"outbox: {outbox_url}" in out
    assert "settle_sent by olga" in out


def test_settle_as_not_sent_makes_the_request_sendable(outbox_url: str) -> None:
    argv = ["settle", RUN, "--all-unknown", "--as", "not-sent", "--reason", "no record at SG"]

    assert main([*argv, "--outbox-url", outbox_url]) == 0

    outbox = Outbox(outbox_url)
    assert outbox.states(RUN)["en-00001"].state == BatchState.STAGED
    assert [a["action"] for a in outbox.actions(RUN)] == ["settle_not_sent"]


@pytest.mark.parametrize(
    ("request_id", "error"),
    [
        ("en-00002", "en-00002: nothing unknown in it (it is staged)"),
        ("en-09999", "en-09999: not a request of winter_update/manual__ops"),
    ],
)
def test_settling_a_request_without_an_unknown_outcome_is_refused(
    outbox_url: str, capsys: pytest.CaptureFixture[str], request_id: str, error: str
) -> None:
    argv = ["settle", RUN, request_id, "--as", "sent", "--reason", "checked"]

    assert main([*argv, "--outbox-url", outbox_url]) == 1

    assert error in capsys.readouterr().err
    outbox = Outbox(outbox_url)
    assert outbox.actions(RUN) == []
    assert outbox.states(RUN)["en-00001"].state == BatchState.UNKNOWN


def test_the_report_keeps_the_history_with_the_equation_before_and_after(
    outbox_url: str, tmp_path: Path
) -> None:
    from mailroom.batches import BatchEntry, Manifest
    from mailroom.delivery.report import reconcile

    for argv in (
        ["halt", RUN, "--reason", "wrong subject", "--by", "olga"],
        ["resume", RUN, "--reason", "subject was right", "--by", "olga"],
        ["settle", RUN, "en-00001", "--as", "sent", "--reason", "delivered", "--by", "ivan"],
    ):
        assert main([*argv, "--outbox-url", outbox_url]) == 0
    manifest = Manifest(
        campaign="winter_update",
        run_id="manual__ops",
        transport="sendgrid",
        batches=(
            BatchEntry("en-00001", 0, "en", "en-00001.json", "a" * 64, 10, 1),
            BatchEntry("en-00002", 1, "en", "en-00002.json", "b" * 64, 10, 1),
        ),
        sha256="f" * 64,
    )

    report = reconcile(
        run_key=RUN,
        manifest=manifest,
        outbox=Outbox(outbox_url),
        extract_counts=None,
        validation=None,
        approval={"decision": "approved"},
        quarantine=None,
        not_sent_csv=tmp_path / "not_sent.csv",
    )

    assert [(h["action"], h["by"]) for h in report["history"]] == [
        ("halt", "olga"),
        ("resume", "olga"),
        ("settle_sent", "ivan"),
    ]
    settled = report["history"][-1]
    assert settled["before"] == (
        "staged 2 = sent 0 + failed 0 + unknown 1 + halted 0 + never attempted 1"
    )
    assert (
        settled["after"]
        == "staged 2 = sent 1 + failed 0 + unknown 0 + halted 0 + never attempted 1"
    )
    json.dumps(report)  # the report is written as JSON


def test_an_outbox_password_masked_in_the_run_record_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox the prepare task recorded shows no password; the command takes it from
    MAILROOM_OUTBOX_PASSWORD, and says so when it is missing."""
    from mailroom.cli import run_access

    masked = "postgresql+psycopg2://mailroom:***@db:5432/mailroom_outbox"
    monkeypatch.delenv("MAILROOM_OUTBOX_PASSWORD", raising=False)
    with pytest.raises(RunNotFound, match="needs a password: set MAILROOM_OUTBOX_PASSWORD"):
        run_access._with_password(masked)
    monkeypatch.setenv("MAILROOM_OUTBOX_PASSWORD", "s3cret")
    assert run_access._with_password(masked) == (
        "postgresql+psycopg2://mailroom:s3cret@db:5432/mailroom_outbox"
    )
    assert run_access.masked_url(run_access._with_password(masked)) == masked


def test_without_an_outbox_or_an_airflow_the_command_says_what_to_give(
    tmp_path: Path,
) -> None:
    import argparse

    args = argparse.Namespace(
        run_key=RUN, outbox_url=None, airflow_url=None, user=None, password_file=None
    )
    with pytest.raises(RunNotFound, match="give --outbox-url"):
        find_run(args, tmp_path)
    with pytest.raises(RunNotFound, match="is not <campaign>/<run id>"):
        find_run(argparse.Namespace(**{**vars(args), "run_key": "manual__x"}), tmp_path)


def test_status_shows_and_writes_what_the_provider_reported_after_accepting(
    outbox_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SendGrid's events settle the unknown request and bounce its recipient: ``status``
    prints the per-locale table and the settlement's label, and rewrites
    ``delivery_feedback.json`` and its not-sent list in the run's local folder, never
    ``report.json``."""
    from mailroom.cli import run_access
    from mailroom.delivery import report
    from mailroom.staging import write_json
    from support.provider_events import event, record

    folder = tmp_path / "staging" / "winter_update" / "manual__ops"
    write_json(folder / "run.json", {"campaign": "winter_update", "run_id": "manual__ops"})
    write_json(folder / "approval.json", {"decision": "approved", "by": "approver"})
    write_json(folder / "report.json", {"status": "incomplete"})
    report_bytes = (folder / "report.json").read_bytes()
    monkeypatch.setattr(
        run_access,
        "find_run",
        lambda args, repo: run_access.RunAccess(RUN, outbox_url, str(folder), None),
    )
    outbox = Outbox(outbox_url)
    record(
        outbox,
        event(RUN, "en-00001", "a@example.com", "processed"),
        event(RUN, "en-00001", "a@example.com", "bounce", reason="550 5.1.1 unknown user"),
    )
    outbox.dispose()

    assert main(["status", RUN, "--outbox-url", outbox_url]) == 0
    out = capsys.readouterr().out
    assert "settled from SendGrid's events by sendgrid events" in out
    assert "after the provider accepted it (sendgrid's events; separate from the equation" in out
    assert "  locale  delivered  bounced  dropped  complained  unsubscribed" in out
    assert "  en              0        1        0           0             0" in out
    assert "  total           0        1        0           0             0" in out
    assert str(folder / report.FEEDBACK_FILE) in out
    assert "a@example.com" not in out
    written = json.loads((folder / report.FEEDBACK_FILE).read_bytes())
    assert written["per_locale"]["en"]["bounced"] == 1
    rows = (folder / report.FEEDBACK_NOT_SENT_FILE).read_text("utf-8").splitlines()
    assert rows == [
        "user_id,email,state,reason",
        "u2,b@example.com,staged,batch staged",
        "u1,a@example.com,bounced,550 5.1.1 unknown user",
    ]
    assert (folder / "report.json").read_bytes() == report_bytes


def test_status_without_the_run_folder_still_shows_the_table(
    outbox_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", RUN, "--outbox-url", outbox_url]) == 0
    out = capsys.readouterr().out
    assert "after the provider accepted it" in out
    assert "  no event yet" in out
    assert "the run's folder is not on this machine: delivery_feedback.json is not written" in out
