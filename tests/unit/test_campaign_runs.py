"""What the campaign console reads of a run (``mailroom.campaign_runs``) and what its actions do
(``mailroom.operator_actions``), on a real outbox and run folder: states through a run's life,
progress per state, shard and locale, names that try to leave the run's folder, the audit
trail, and the DAG run's note."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailroom import campaign_runs, operator_actions
from mailroom.campaign_runs import find_run, run_progress, run_state
from mailroom.delivery.outbox import BatchState, Outbox, RecipientOutcome, StagedBatch
from mailroom.operator_actions import ActionRefused
from mailroom.staging import write_json

pytestmark = pytest.mark.unit
CAMPAIGN = "winter_update"
RUN_ID = "manual__2026-12-06T10:00:00+00:00"
RUN_KEY = f"{CAMPAIGN}/{RUN_ID}"
# Six requests of ten: en (0, 2, 4) and de (1, 3, 5), over two shards (even/odd index).
BATCHES = [
    StagedBatch(f"{loc}-{i:05d}", i, loc, f"{i:064x}", 10)
    for i, loc in enumerate(["en", "de", "en", "de", "en", "de"])
]


def members() -> list[tuple[str, str, str]]:
    return [
        (f"p{b.batch_index}-{n}@example.com", f"u{b.batch_index}-{n}", b.batch_id)
        for b in BATCHES
        for n in range(10)
    ]


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    box = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    box.stage(RUN_KEY, "f" * 64, BATCHES, members())
    return box


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "staging" / CAMPAIGN / "manual__2026-12-06T10_00_00_00_00"
    write_json(
        folder / "run.json",
        {
            "campaign": CAMPAIGN,
            "run_id": RUN_ID,
            "folder": folder.name,
            "triggered_by": "analyst",
            "started_at": "2026-12-06T10:00:00+00:00",
            "shards": 2,
        },
    )
    return tmp_path / "staging"


def the_run(root: Path) -> campaign_runs.RunFolder:
    run = find_run(root, RUN_ID)
    assert run is not None
    return run


def test_a_runs_state_follows_its_folder_and_outbox_through_its_life(
    root: Path, outbox: Outbox
) -> None:
    folder = root / CAMPAIGN / "manual__2026-12-06T10_00_00_00_00"
    assert run_state(the_run(root), outbox) == "preparing"
    write_json(folder / "gate" / "result.json", {"success": False})
    assert run_state(the_run(root), outbox) == "failed gate"
    write_json(folder / "gate" / "result.json", {"success": True})
    write_json(folder / "frozen.json", {"run_id": RUN_ID, "manifest_sha256": "f" * 64})
    assert run_state(the_run(root), outbox) == "awaiting approval"
    write_json(folder / "report.json", {"status": "not_approved"})  # nobody could be asked
    assert run_state(the_run(root), outbox) == "failed"
    assert str(campaign_runs.run_note(the_run(root), outbox)).startswith("NOT APPROVED")
    (folder / "report.json").unlink()
    write_json(folder / "approval.json", {"decision": "approved", "by": "approver", "at": "T"})
    assert run_state(the_run(root), outbox) == "sending"
    outbox.request_halt(RUN_KEY, reason="checking")
    assert run_state(the_run(root), outbox) == "halted"
    outbox.request_halt(RUN_KEY, halted=False)
    for b in BATCHES:
        assert outbox.claim(RUN_KEY, b.batch_id)
        outbox.finish(RUN_KEY, b.batch_id, BatchState.SENT, message_id="m")
    assert run_state(the_run(root), outbox) == "sent"
    for decision, state in (("rejected", "rejected"), ("timed_out", "timed out")):
        write_json(folder / "approval.json", {"decision": decision, "by": None, "at": "T"})
        assert run_state(the_run(root), outbox) == state


def test_progress_counts_recipients_and_requests_per_state_shard_and_locale(
    root: Path, outbox: Outbox
) -> None:
    now = datetime.now(UTC)
    # Request 0 sent whole; request 1 sent one message per recipient: 4 sent, 1 failed, 1
    # unknown, 4 not yet; request 2 unknown; request 3 halted.
    assert outbox.claim(RUN_KEY, "en-00000")
    outbox.finish(RUN_KEY, "en-00000", BatchState.SENT, message_id="m0")
    assert outbox.claim(RUN_KEY, "de-00001")
    people = [m[0] for m in members() if m[2] == "de-00001"]
    assert outbox.begin_recipients(RUN_KEY, "de-00001", people[:6])
    outbox.finish_recipients(
        RUN_KEY,
        "de-00001",
        [RecipientOutcome(e, BatchState.SENT, message_id="x") for e in people[:4]]
        + [RecipientOutcome(people[4], BatchState.FAILED, error="550")]
        + [RecipientOutcome(people[5], BatchState.UNKNOWN, error="lost")],
    )
    assert outbox.claim(RUN_KEY, "en-00002")
    outbox.finish(RUN_KEY, "en-00002", BatchState.UNKNOWN, error="lost")
    outbox.halt_remaining(RUN_KEY, ["de-00003"])

    p = run_progress(the_run(root), outbox, now=now + timedelta(seconds=1))
    recipients, requests = p["overall"]["recipients"], p["overall"]["requests"]
    assert recipients == {
        "staged": 20,
        "sending": 4,
        "sent": 14,
        "failed": 1,
        "unknown": 11,
        "halted": 10,
        "total": 60,
    }
    assert requests["sending"] == 1
    assert requests["total"] == 6
    # The console's counts are the outbox's own.
    counts = outbox.counts(RUN_KEY)
    assert {s: c["recipients"] for s, c in counts.items()} == {
        s: n for s, n in recipients.items() if s != "total"
    }
    # Shard 0 holds the even requests (all en), shard 1 the odd ones (all de).
    assert [s["recipients"]["sent"] for s in p["shards"]] == [10, 4]
    assert p["locales"]["en"]["recipients"]["unknown"] == 10
    assert p["locales"]["de"]["recipients"]["halted"] == 10
    assert (p["sent"], p["total"], p["percent"]) == (14, 60, 23.3)
    assert p["rate_per_second"] > 0

    # The page's sample of who was not sent: in request order, masked, sent people left out.
    sample = campaign_runs.not_sent_sample(the_run(root), outbox, 8)
    assert [row["batch_id"] for row in sample] == ["de-00001"] * 6 + ["en-00002"] * 2
    assert {row["email"] for row in sample[:6]} == {"p***@example.com"}
    assert {row["state"] for row in sample[:6]} == {"failed", "unknown", "sending"}
    assert all("@example.com" not in str(v) or "***" in str(v) for r in sample for v in r.values())
    assert len(campaign_runs.not_sent_sample(the_run(root), outbox, 1000)) == 46


def test_a_run_is_found_only_by_its_own_id_however_the_name_is_spelt(root: Path) -> None:
    assert find_run(root, RUN_ID) is not None
    # Another id that maps to the same folder name is not this run.
    assert find_run(root, "manual__2026-12-06T10_00_00_00_00") is None
    for trick in ("..", ".", "../winter_update", "../../etc/passwd", "/", "", "%2e%2e", "a/../.."):
        assert find_run(root, trick) is None, trick
    assert find_run(root / "missing", RUN_ID) is None


def test_previews_and_data_docs_are_read_from_the_runs_own_folders_only(
    root: Path, tmp_path: Path
) -> None:
    folder = root / CAMPAIGN / "manual__2026-12-06T10_00_00_00_00"
    write_json(folder / "preview" / "summary.json", {"previews": {"en": {}, "de": {}}})
    (folder / "preview" / "en.html").write_text("<p>hello</p>")
    (folder / "approval.json").write_text("{}")
    docs = folder / "gate" / "data_docs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html>docs</html>")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", docs / "escape.html")
    run = the_run(root)

    assert campaign_runs.preview(run, "en", "html") == "<p>hello</p>"
    for locale, kind in (
        ("../approval", "html"),
        ("..", "html"),
        ("en/../../approval", "html"),
        ("fr", "html"),  # not a locale of this run
        ("en", "json"),
        ("de", "html"),  # a locale of the run whose file is missing
    ):
        assert campaign_runs.preview(run, locale, kind) is None, (locale, kind)

    assert campaign_runs.data_docs_file(folder, "gate", "index.html") == (docs / "index.html")
    for check, rel in (
        ("gate", "../result.json"),
        ("gate", "../../approval.json"),
        ("gate", "/etc/passwd"),
        ("gate", "escape.html"),  # a link pointing out of the docs
        ("gate", ""),
        ("gate", "..\\..\\approval.json"),
        ("report", "index.html"),
        ("../gate", "index.html"),
    ):
        assert campaign_runs.data_docs_file(folder, check, rel) is None, (check, rel)


def test_operator_actions_are_recorded_in_the_outbox_and_the_runs_audit_trail(
    root: Path, outbox: Outbox
) -> None:
    folder = root / CAMPAIGN / "manual__2026-12-06T10_00_00_00_00"
    with pytest.raises(ActionRefused, match="not halted"):
        operator_actions.resume(outbox, RUN_KEY, by="olga", reason="go", run_root=folder)
    with pytest.raises(ActionRefused, match="no unknown request"):
        operator_actions.resend_unknown(outbox, RUN_KEY, by="olga", reason="go", run_root=folder)
    with pytest.raises(ValueError, match="needs a reason"):
        operator_actions.halt(outbox, RUN_KEY, by="olga", reason="  ", run_root=folder)
    with pytest.raises(ActionRefused, match="not staged"):
        operator_actions.halt(outbox, "other/run", by="olga", reason="x", run_root=folder)

    assert outbox.claim(RUN_KEY, "en-00000")
    outbox.finish(RUN_KEY, "en-00000", BatchState.UNKNOWN, error="lost")
    operator_actions.halt(outbox, RUN_KEY, by="olga", reason="wrong footer", run_root=folder)
    assert outbox.halt_requested(RUN_KEY)
    assert not outbox.claim(RUN_KEY, "de-00001")  # nothing is claimed once halted
    with pytest.raises(ActionRefused, match="already halted"):
        operator_actions.halt(outbox, RUN_KEY, by="ivan", reason="again", run_root=folder)
    with pytest.raises(ActionRefused, match="resume it first"):
        operator_actions.resend_unknown(outbox, RUN_KEY, by="olga", reason="go", run_root=folder)
    operator_actions.resume(outbox, RUN_KEY, by="ivan", reason="footer fine", run_root=folder)
    entry = operator_actions.resend_unknown(
        outbox, RUN_KEY, by="ivan", reason="provider has no record", run_root=folder
    )
    assert entry["requests"] == ["en-00000"]
    assert outbox.states(RUN_KEY)["en-00000"].state == BatchState.STAGED

    trail = operator_actions.audit_trail(folder)
    assert [(e["action"], e["by"], e["reason"]) for e in trail] == [
        ("halt", "olga", "wrong footer"),
        ("resume", "ivan", "footer fine"),
        ("resend", "ivan", "provider has no record"),
    ]
    assert sorted(p.name for p in (folder / "audit").iterdir()) == [
        "0001-halt.json",
        "0002-resume.json",
        "0003-resend.json",
    ]
    assert [h["action"] for h in outbox.actions(RUN_KEY)] == ["halt", "resume", "resend"]
    assert json.loads((folder / "audit" / "0001-halt.json").read_text())["run"] == RUN_KEY


def test_the_dag_run_note_says_rejected_timed_out_or_how_many_were_sent(
    root: Path, outbox: Outbox
) -> None:
    folder = root / CAMPAIGN / "manual__2026-12-06T10_00_00_00_00"
    write_json(folder / "gate" / "result.json", {"success": True})
    write_json(folder / "frozen.json", {"run_id": RUN_ID, "manifest_sha256": "f" * 64})
    assert campaign_runs.run_note(the_run(root), outbox) is None  # awaiting approval
    write_json(folder / "approval.json", {"decision": "rejected", "by": "ann", "at": "T1"})
    assert campaign_runs.run_note(the_run(root), outbox) == (
        "REJECTED by ann at T1: nothing was sent."
    )
    write_json(folder / "approval.json", {"decision": "timed_out", "by": None, "at": "T2"})
    assert str(campaign_runs.run_note(the_run(root), outbox)).startswith("TIMED OUT")
    write_json(folder / "approval.json", {"decision": "approved", "by": "ann", "at": "T3"})
    for b in BATCHES[:5]:
        assert outbox.claim(RUN_KEY, b.batch_id)
        outbox.finish(RUN_KEY, b.batch_id, BatchState.SENT, message_id="m")
    assert outbox.claim(RUN_KEY, BATCHES[5].batch_id)
    outbox.finish(RUN_KEY, BATCHES[5].batch_id, BatchState.FAILED, error="400")
    assert campaign_runs.run_note(the_run(root), outbox) == (
        "INCOMPLETE: 50 of 60 recipients sent."
    )


def test_progress_and_the_not_sent_sample_show_what_the_provider_reported(
    root: Path, outbox: Outbox
) -> None:
    """After the provider accepted the requests: per locale, delivered / bounced / dropped /
    complained / unsubscribed (every locale of the run, 0 when it has no event yet); the
    bounced and dropped in the sample, masked, the provider's reason with any address in it
    masked too; and the requests the events settled, named in the history."""
    from support.provider_events import event, record

    write_json(
        root / CAMPAIGN / "manual__2026-12-06T10_00_00_00_00" / "approval.json",
        {"decision": "approved", "by": "ann", "at": "T"},
    )
    for b in BATCHES[:5]:
        assert outbox.claim(RUN_KEY, b.batch_id)
        outbox.finish(RUN_KEY, b.batch_id, BatchState.SENT, message_id=f"m{b.batch_index}")
    assert outbox.claim(RUN_KEY, "de-00005")
    outbox.finish(RUN_KEY, "de-00005", BatchState.UNKNOWN, error="lost")
    zero = {"delivered": 0, "bounced": 0, "dropped": 0, "complained": 0, "unsubscribed": 0}
    before = run_progress(the_run(root), outbox)["delivery_feedback"]
    assert before["per_locale"] == {"de": zero, "en": zero}
    assert before["in_equation"] is False

    reason = "550 5.1.1 <p0-1@example.com>: Recipient address rejected"
    record(
        outbox,
        *(event(RUN_KEY, "en-00000", f"p0-{n}@example.com", "delivered") for n in range(3, 10)),
        event(RUN_KEY, "en-00000", "p0-1@example.com", "bounce", reason=reason),
        event(RUN_KEY, "en-00000", "p0-2@example.com", "dropped", reason="Bounced Address"),
        event(RUN_KEY, "de-00001", "p1-0@example.com", "delivered"),
        event(RUN_KEY, "de-00001", "p1-0@example.com", "spamreport"),
        event(RUN_KEY, "de-00003", "p3-0@example.com", "unsubscribe"),
        event(RUN_KEY, "de-00005", "p5-0@example.com", "processed"),  # settles de-00005
    )

    p = run_progress(the_run(root), outbox)
    assert p["delivery_feedback"]["per_locale"] == {
        "de": {**zero, "delivered": 1, "complained": 1, "unsubscribed": 1},
        "en": {**zero, "delivered": 7, "bounced": 1, "dropped": 1},
    }
    assert p["delivery_feedback"]["total"] == {
        "delivered": 8,
        "bounced": 1,
        "dropped": 1,
        "complained": 1,
        "unsubscribed": 1,
    }
    assert p["sent"] == 60  # bounced and dropped stay counted as sent
    json.dumps(p)

    sample = campaign_runs.not_sent_sample(the_run(root), outbox, 50)
    assert [(r["user_id"], r["email"], r["state"], r["last_error"]) for r in sample] == [
        (
            "u0-1",
            "p***@example.com",
            "bounced",
            "550 5.1.1 <p***@example.com>: Recipient address rejected",
        ),
        ("u0-2", "p***@example.com", "dropped", "Bounced Address"),
    ]
    assert [r["batch_id"] for r in sample] == ["en-00000", "en-00000"]
    assert len(campaign_runs.not_sent_sample(the_run(root), outbox, 1)) == 1

    [settled] = outbox.actions(RUN_KEY)
    assert settled["action"] == "settle_by_events"
    assert operator_actions.action_label(settled["action"]) == "settled from SendGrid's events"
    assert operator_actions.action_label("halt") == "halt"
