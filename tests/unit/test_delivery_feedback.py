"""What the provider reported after it accepted a run's requests: the report's
``delivery_feedback`` and the bounced and dropped in ``not_sent.csv`` (``report.reconcile``), and
``report.refresh_delivery_feedback``, which writes them as they are now beside the report while
events keep arriving, never over it."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mailroom.batches import BatchEntry, Manifest
from mailroom.delivery import feedback_report, report
from mailroom.delivery.outbox import BatchState, Outbox, StagedBatch
from mailroom.errors import MailroomError
from mailroom.staging import json_bytes, write_json
from support.provider_events import event, record

pytestmark = pytest.mark.unit
CAMPAIGN = "winter_update"
RUN_ID = "manual__feedback"
RUN_KEY = f"{CAMPAIGN}/{RUN_ID}"
# Three requests of two: en-0 and de-1 sent, en-2 left unknown.
BATCHES = [
    StagedBatch("en-0", 0, "en", "0" * 64, 2),
    StagedBatch("de-1", 1, "de", "1" * 64, 2),
    StagedBatch("en-2", 2, "en", "2" * 64, 2),
]
MEMBERS = [
    ("ann@example.com", "u-ann", "en-0"),
    ("bob@example.com", "u-bob", "en-0"),
    ("cem@example.com", "u-cem", "de-1"),
    ("dan@example.com", "u-dan", "de-1"),
    ("eve@example.com", "u-eve", "en-2"),
    ("fay@example.com", "u-fay", "en-2"),
]
APPROVED = {"decision": "approved", "by": "approver", "at": "2026-12-06 10:00:00+00:00"}
USER_UNKNOWN = "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown"


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    box = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    box.stage(RUN_KEY, "f" * 64, BATCHES, MEMBERS)
    for batch, state in (("en-0", BatchState.SENT), ("de-1", BatchState.SENT)):
        assert box.claim(RUN_KEY, batch)
        box.finish(RUN_KEY, batch, state, message_id=f"msg-{batch}")
    assert box.claim(RUN_KEY, "en-2")
    box.finish(RUN_KEY, "en-2", BatchState.UNKNOWN, error="the answer was lost")
    return box


def manifest() -> Manifest:
    return Manifest(
        campaign=CAMPAIGN,
        run_id=RUN_ID,
        transport="sendgrid",
        batches=tuple(
            BatchEntry(b.batch_id, b.batch_index, b.locale, f"{b.batch_id}.json", b.sha256, 10, 2)
            for b in BATCHES
        ),
        sha256="f" * 64,
    )


def reconciled(outbox: Outbox, not_sent: Path) -> dict[str, Any]:
    return report.reconcile(
        run_key=RUN_KEY,
        manifest=manifest(),
        outbox=outbox,
        extract_counts=None,
        validation=None,
        approval=APPROVED,
        quarantine=None,
        not_sent_csv=not_sent,
    )


def rows_of(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def first_events(outbox: Outbox) -> None:
    record(
        outbox,
        event(RUN_KEY, "en-0", "ann@example.com", "delivered"),
        event(RUN_KEY, "en-0", "ann@example.com", "spamreport"),
        event(RUN_KEY, "en-0", "bob@example.com", "bounce", reason=USER_UNKNOWN),
        event(RUN_KEY, "de-1", "cem@example.com", "dropped", reason="Bounced Address"),
        event(RUN_KEY, "de-1", "dan@example.com", "delivered"),
        event(RUN_KEY, "de-1", "dan@example.com", "unsubscribe"),
    )


def test_reconcile_reports_what_the_provider_said_apart_from_the_equation(
    outbox: Outbox, tmp_path: Path
) -> None:
    first_events(outbox)
    not_sent = tmp_path / "run" / "not_sent.csv"

    result = reconciled(outbox, not_sent)

    # Bounced and dropped were accepted: the equation counts them as sent, unchanged.
    assert result["equation"] == (
        "staged 6 = sent 4 + failed 0 + unknown 2 + halted 0 + never attempted 0"
    )
    assert result["balanced"] is True
    feedback = result["delivery_feedback"]
    assert feedback["in_equation"] is False
    assert "separate from the equation" in feedback["note"]
    assert feedback["per_locale"] == {
        "de": {"delivered": 1, "bounced": 0, "dropped": 1, "complained": 0, "unsubscribed": 1},
        "en": {"delivered": 1, "bounced": 1, "dropped": 0, "complained": 1, "unsubscribed": 0},
    }
    assert feedback["total"] == {
        "delivered": 2,
        "bounced": 1,
        "dropped": 1,
        "complained": 1,
        "unsubscribed": 1,
    }
    assert feedback["listed_in_not_sent"] == 2
    json.dumps(result)

    # not_sent.csv keeps its columns; the unknown first, then the bounced and dropped with the
    # provider's own reason.
    rows = rows_of(not_sent)
    assert rows[0] == ["user_id", "email", "state", "reason"]
    assert rows[1:] == [
        ["u-eve", "eve@example.com", "unknown", "the answer was lost"],
        ["u-fay", "fay@example.com", "unknown", "the answer was lost"],
        ["u-bob", "bob@example.com", "bounced", USER_UNKNOWN],
        ["u-cem", "cem@example.com", "dropped", "Bounced Address"],
    ]
    assert result["not_sent_rows"] == 4
    # The same as the outbox's own reading of the events.
    assert {r["email_key"]: (r["state"], r["reason"]) for r in outbox.not_delivered(RUN_KEY)} == {
        "bob@example.com": ("bounced", USER_UNKNOWN),
        "cem@example.com": ("dropped", "Bounced Address"),
    }


def test_a_run_without_events_reports_every_locale_at_zero(outbox: Outbox, tmp_path: Path) -> None:
    result = reconciled(outbox, tmp_path / "not_sent.csv")
    zero = dict.fromkeys(feedback_report.OUTCOME_NAMES, 0)
    assert result["delivery_feedback"]["per_locale"] == {"de": zero, "en": zero}
    assert result["delivery_feedback"]["total"] == zero
    assert [r[2] for r in rows_of(tmp_path / "not_sent.csv")[1:]] == ["unknown", "unknown"]


def test_a_recipient_bounced_then_dropped_is_listed_once_with_the_latest_reason(
    outbox: Outbox, tmp_path: Path
) -> None:
    record(
        outbox,
        event(RUN_KEY, "en-0", "bob@example.com", "bounce", reason="550 first", timestamp=100),
        event(RUN_KEY, "en-0", "bob@example.com", "dropped", timestamp=200),
    )
    reconciled(outbox, tmp_path / "not_sent.csv")
    listed = [r for r in rows_of(tmp_path / "not_sent.csv") if r[0] == "u-bob"]
    assert listed == [["u-bob", "bob@example.com", "dropped", "sendgrid gave no reason"]]


def run_folder(tmp_path: Path, outbox: Outbox) -> tuple[Path, dict[str, Any]]:
    """A run folder as reconcile leaves it: run.json, approval.json, report.json, not_sent.csv."""
    root = tmp_path / "staging" / CAMPAIGN / RUN_ID
    write_json(root / "run.json", {"campaign": CAMPAIGN, "run_id": RUN_ID, "folder": RUN_ID})
    write_json(root / "approval.json", APPROVED)
    frozen = manifest()
    write_json(
        root / "batches" / "manifest.json",
        {
            "campaign": frozen.campaign,
            "run_id": frozen.run_id,
            "transport": frozen.transport,
            "batches": [b.to_dict() for b in frozen.batches],
        },
    )
    result = reconciled(outbox, root / "not_sent.csv")
    write_json(root / "report.json", result)
    return root, result


def test_refresh_writes_the_feedback_as_it_is_now_beside_the_report_never_over_it(
    outbox: Outbox, tmp_path: Path
) -> None:
    root, _ = run_folder(tmp_path, outbox)
    first = {name: (root / name).read_bytes() for name in ("report.json", "not_sent.csv")}

    # Events arrive after reconcile: the requests left unknown are settled from them.
    first_events(outbox)
    got = record(outbox, event(RUN_KEY, "en-2", "fay@example.com", "bounce", reason="550 gone"))
    assert got.settled_requests == 1
    feedback = report.refresh_delivery_feedback(outbox, RUN_KEY, root)

    on_disk = json.loads((root / report.FEEDBACK_FILE).read_bytes())
    assert on_disk == feedback
    assert on_disk["run"] == RUN_KEY
    assert on_disk["total"]["bounced"] == 2
    assert on_disk["per_locale"]["en"]["bounced"] == 2
    assert on_disk["in_equation"] is False
    assert on_disk["listed_in_not_sent"] == 3
    assert on_disk["not_sent_file"] == str(root / report.FEEDBACK_NOT_SENT_FILE)
    rows = rows_of(root / report.FEEDBACK_NOT_SENT_FILE)
    assert rows[0] == list(report.NOT_SENT_COLUMNS)
    assert rows[1:] == [
        ["u-bob", "bob@example.com", "bounced", USER_UNKNOWN],
        ["u-cem", "cem@example.com", "dropped", "Bounced Address"],
        ["u-fay", "fay@example.com", "bounced", "550 gone"],
    ]
    assert on_disk["not_sent_rows"] == 3
    # The request left unknown is settled from the events, and the file says so.
    [settled] = on_disk["settled_by_events"]
    assert (settled["requests"], settled["recipients"]) == (["en-2"], 2)
    assert "accepted 1 request(s)" in settled["reason"]
    assert " unknown 0 " in f" {on_disk['equation']} "
    # report.json and not_sent.csv are written once: untouched.
    assert {name: (root / name).read_bytes() for name in first} == first
    # Nothing else is left in the folder (no temporary file).
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [
            "approval.json",
            "batches",
            "delivery_feedback.json",
            "delivery_feedback.not_sent.csv",
            "not_sent.csv",
            "report.json",
            "run.json",
        ]
    )

    # More events: the same files, rewritten whole.
    record(outbox, event(RUN_KEY, "en-2", "eve@example.com", "delivered"))
    again = report.refresh_delivery_feedback(outbox, RUN_KEY, root)
    assert again["total"]["delivered"] == 3
    assert json.loads((root / report.FEEDBACK_FILE).read_bytes())["total"]["delivered"] == 3


def test_refresh_replaces_each_file_atomically_and_leaves_the_old_one_when_writing_fails(
    outbox: Outbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = run_folder(tmp_path, outbox)
    report.refresh_delivery_feedback(outbox, RUN_KEY, root)
    before = (root / report.FEEDBACK_FILE).read_bytes()
    first_events(outbox)

    replaced: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", spy)
    report.refresh_delivery_feedback(outbox, RUN_KEY, root)
    # Each file is written beside itself, then moved over it in one step.
    assert [dst.name for _, dst in replaced] == [
        report.FEEDBACK_NOT_SENT_FILE,
        report.FEEDBACK_FILE,
    ]
    assert all(src.parent == root and src.name.endswith(".tmp") for src, _ in replaced)

    def broken(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    written = (root / report.FEEDBACK_FILE).read_bytes()
    assert written != before
    monkeypatch.setattr(report.os, "replace", broken)
    record(outbox, event(RUN_KEY, "en-2", "eve@example.com", "delivered"))
    with pytest.raises(OSError, match="disk full"):
        report.refresh_delivery_feedback(outbox, RUN_KEY, root)
    assert (root / report.FEEDBACK_FILE).read_bytes() == written
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_refresh_refuses_the_folder_of_another_run(outbox: Outbox, tmp_path: Path) -> None:
    root, _ = run_folder(tmp_path, outbox)
    write_json(root / "run.json", {"campaign": CAMPAIGN, "run_id": "manual__other"})
    with pytest.raises(MailroomError, match="not of winter_update/manual__feedback"):
        report.refresh_delivery_feedback(outbox, RUN_KEY, root)
    assert not (root / report.FEEDBACK_FILE).exists()


def test_events_alone_do_not_make_a_later_report(outbox: Outbox, tmp_path: Path) -> None:
    """What tells a later reconcile that the outbox moved on leaves the provider's events out."""
    rows = tmp_path / "not_sent.csv"
    before = reconciled(outbox, rows)
    rows_before = rows.read_bytes()
    first_events(outbox)
    after = reconciled(outbox, rows)
    assert json_bytes(before) != json_bytes(after)
    assert rows.read_bytes() != rows_before
    assert report.equation_view(after) == report.equation_view(before)
    assert report.equation_rows(rows.read_bytes()) == report.equation_rows(rows_before)
    # The outbox moving on is still told apart.
    outbox.settle(RUN_KEY, ["en-2"], _settle_sent())
    moved = reconciled(outbox, rows)
    assert report.equation_view(moved) != report.equation_view(after)


def _settle_sent() -> Any:
    from mailroom.delivery.outbox import Action, OperatorAction

    return OperatorAction(Action.SETTLE_SENT, "olga", "delivered per SendGrid activity")


def test_the_status_table_shows_each_locale_and_the_total() -> None:
    feedback = feedback_report.shaped(
        {"de": {"delivered": 1200, "bounced": 3}}, locales=["en", "de"]
    )
    assert feedback_report.table(feedback) == [
        "  locale  delivered  bounced  dropped  complained  unsubscribed",
        "  de          1,200        3        0           0             0",
        "  en              0        0        0           0             0",
        "  total       1,200        3        0           0             0",
    ]


@pytest.mark.postgres
def test_the_feedback_and_the_bounced_and_dropped_read_the_same_on_postgresql(
    postgres_url: str,
) -> None:
    import uuid

    run_key = f"{CAMPAIGN}/manual__{uuid.uuid4().hex}"
    box = Outbox(postgres_url)
    try:
        box.stage(run_key, "f" * 64, BATCHES, MEMBERS)
        for batch in ("en-0", "de-1"):
            assert box.claim(run_key, batch)
            box.finish(run_key, batch, BatchState.SENT, message_id=f"msg-{batch}")
        record(
            box,
            event(run_key, "en-0", "ann@example.com", "delivered"),
            event(run_key, "en-0", "bob@example.com", "bounce", reason="550 one", timestamp=100),
            event(run_key, "en-0", "bob@example.com", "bounce", reason="550 two", timestamp=200),
            event(run_key, "de-1", "cem@example.com", "dropped", reason="Bounced Address"),
        )
        assert feedback_report.section(box, run_key, ["de", "en"])["total"] == {
            "delivered": 1,
            "bounced": 1,
            "dropped": 1,
            "complained": 0,
            "unsubscribed": 0,
        }
        listed = [
            (r["user_id"], r["batch_id"], r["state"], r["reason"])
            for r in box.not_delivered(run_key)
        ]
        assert listed == [
            ("u-bob", "en-0", "bounced", "550 two"),
            ("u-cem", "de-1", "dropped", "Bounced Address"),
        ]
        assert [r["user_id"] for r in box.not_delivered(run_key, limit=1)] == ["u-bob"]
    finally:
        box.dispose()
