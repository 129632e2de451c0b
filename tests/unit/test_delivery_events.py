"""The provider's events in the outbox: kept once, matched to the recipient they are about,
turned into suppressions, soft bounces counted in a row, and ``unknown`` requests settled."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailroom.delivery.delivery_events import EventsRefused, parse_sendgrid_events
from mailroom.delivery.outbox import (
    Action,
    BatchState,
    NothingToSettle,
    OperatorAction,
    Outbox,
    StagedBatch,
)

pytestmark = pytest.mark.unit

_ids = itertools.count()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outbox]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'outbox.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    box = Outbox(url)
    try:
        yield box
    finally:
        box.dispose()


@pytest.fixture
def run() -> tuple[str, str]:
    unique = uuid.uuid4().hex
    return f"events_{unique[:8]}", f"manual__{unique}"


def stage(outbox: Outbox, campaign: str, run_id: str, outcome: BatchState) -> list[str]:
    """Two requests (en, de) of three recipients each, sent and ended in ``outcome``."""
    run_key = f"{campaign}/{run_id}"
    staged = [
        StagedBatch("en-00000", 0, "en", "a" * 64, 3),
        StagedBatch("de-00000", 1, "de", "b" * 64, 3),
    ]
    members = [
        (addr(campaign, f"{b.locale}{n}"), f"u-{b.locale}{n}", b.batch_id)
        for b in staged
        for n in range(3)
    ]
    outbox.stage(run_key, "m" * 64, staged, members)
    for b in staged:
        assert outbox.claim(run_key, b.batch_id)
        if outcome == BatchState.SENT:
            outbox.finish(run_key, b.batch_id, outcome, message_id=message_id(run_id, b.batch_id))
        else:
            outbox.finish(run_key, b.batch_id, outcome, error="the answer was lost")
    return [b.batch_id for b in staged]


def message_id(run_id: str, batch_id: str | None) -> str:
    """A request's X-Message-Id: SendGrid's are unique (PostgreSQL's outbox holds the session's)."""
    return f"msg-{run_id[-12:]}-{batch_id}"


def addr(campaign: str, local: str) -> str:
    """An address of this test's own (PostgreSQL's suppression list is shared by the session)."""
    return f"{local}@{campaign.replace('_', '-')}.example.com"


def event(
    campaign: str | None,
    run_id: str | None,
    batch_id: str | None,
    email: str,
    kind: str,
    *,
    event_id: str | None = None,
    at: int = 1_765_000_000,
    sent_by: str = "",
    **extra: Any,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "email": email,
        "timestamp": at,
        "event": kind,
        "sg_event_id": event_id or f"ev-{next(_ids)}-{uuid.uuid4().hex[:6]}",
        "sg_message_id": f"{message_id(run_id or sent_by, batch_id)}.filter0001.1.0",
        **extra,
    }
    if campaign:
        item.update(mailroom_campaign=campaign, mailroom_run=run_id, mailroom_batch=batch_id)
    return item


def ours(email: str, campaign: str) -> bool:
    """Whether ``email`` is one of this test's own addresses (``addr``)."""
    return email.endswith("@" + addr(campaign, "x").split("@")[1])


def post(outbox: Outbox, *events: dict[str, Any], limit: int = 3) -> Any:
    return outbox.record_delivery_events(
        parse_sendgrid_events(json.dumps(list(events)).encode()), soft_bounce_limit=limit
    )


def test_each_outcome_is_counted_per_locale_once_per_recipient(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    stage(outbox, campaign, run_id, BatchState.SENT)
    done = post(
        outbox,
        event(campaign, run_id, "en-00000", addr(campaign, "en0"), "delivered"),
        event(campaign, run_id, "en-00000", addr(campaign, "en0"), "delivered"),
        event(
            campaign,
            run_id,
            "en-00000",
            addr(campaign, "en1"),
            "bounce",
            type="bounce",
            reason="550 no such user",
        ),
        event(campaign, run_id, "de-00000", addr(campaign, "DE0"), "spamreport"),
        event(
            campaign, run_id, "de-00000", addr(campaign, "de1"), "dropped", reason="Bounced Address"
        ),
        event(campaign, run_id, "de-00000", addr(campaign, "de2"), "unsubscribe"),
        event(campaign, run_id, "de-00000", addr(campaign, "de2"), "open"),
    )
    assert (done.received, done.new, done.matched, done.suppressed) == (7, 7, 7, 4)
    zero = dict.fromkeys(["delivered", "bounced", "dropped", "complained", "unsubscribed"], 0)
    assert outbox.delivery_feedback(f"{campaign}/{run_id}") == {
        "de": {**zero, "complained": 1, "dropped": 1, "unsubscribed": 1},
        "en": {**zero, "delivered": 1, "bounced": 1},
    }
    reasons = {
        s.email: (s.reason, s.source) for s in outbox.suppressions() if ours(s.email, campaign)
    }
    assert reasons == {
        addr(campaign, "en1"): ("bounced", "sendgrid"),
        addr(campaign, "de0"): ("spam_report", "sendgrid"),
        addr(campaign, "de1"): ("bounced", "sendgrid"),
        addr(campaign, "de2"): ("unsubscribed", "sendgrid"),
    }
    not_delivered = outbox.not_delivered(f"{campaign}/{run_id}")
    assert {r["email_key"]: (r["state"], r["reason"]) for r in not_delivered} == {
        addr(campaign, "en1"): ("bounced", "550 no such user"),
        addr(campaign, "de1"): ("dropped", "Bounced Address"),
    }


def test_the_same_event_posted_three_times_counts_once(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    stage(outbox, campaign, run_id, BatchState.SENT)
    same = event(
        campaign, run_id, "en-00000", addr(campaign, "en0"), "deferred", event_id="only-once"
    )
    results = [post(outbox, same, same, limit=2) for _ in range(3)]
    assert [(r.received, r.new) for r in results] == [(2, 1), (2, 0), (2, 0)]
    # One soft bounce, however often it was posted: a limit of 2 is not reached.
    assert outbox.suppression(addr(campaign, "en0")) is None


def test_drops_for_the_message_and_not_the_person_suppress_nobody(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    stage(outbox, campaign, run_id, BatchState.SENT)
    post(
        outbox,
        event(
            campaign, run_id, "en-00000", addr(campaign, "en0"), "dropped", reason="Spam Content"
        ),
        event(
            campaign,
            run_id,
            "en-00000",
            addr(campaign, "en1"),
            "dropped",
            reason="Invalid SMTPAPI header",
        ),
        event(
            campaign,
            run_id,
            "en-00000",
            addr(campaign, "en2"),
            "bounce",
            type="blocked",
            reason="4.7.1",
        ),
    )
    assert [s for s in outbox.suppressions() if ours(s.email, campaign)] == []


def test_soft_bounces_in_a_row_suppress_and_a_delivery_sets_the_count_back(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    stage(outbox, campaign, run_id, BatchState.SENT)
    en = ("en-00000",)

    def soft(email: str, at: int, kind: str = "deferred") -> dict[str, Any]:
        extra = {"type": "blocked"} if kind == "bounce" else {}
        return event(campaign, run_id, *en, email, kind, at=at, reason="451 try later", **extra)

    post(outbox, soft(addr(campaign, "en0"), 1), soft(addr(campaign, "en0"), 2, "bounce"))
    post(outbox, event(campaign, run_id, *en, addr(campaign, "en0"), "delivered", at=3))
    post(outbox, soft(addr(campaign, "en0"), 4))
    assert outbox.suppression(addr(campaign, "en0")) is None  # 2, then 0, then 1 in a row
    # In one body, out of order: they are counted in the order they happened.
    post(
        outbox,
        soft(addr(campaign, "en1"), 30),
        soft(addr(campaign, "en1"), 10),
        soft(addr(campaign, "en1"), 20),
    )
    found = outbox.suppression(addr(campaign, "en1"))
    assert found is not None
    assert (found.reason, found.source) == ("soft_bounced", "sendgrid")
    post(outbox, soft(addr(campaign, "en0"), 5), soft(addr(campaign, "en0"), 6))
    assert outbox.suppression(addr(campaign, "en0")) is not None


def test_events_settle_unknown_requests_and_a_resend_of_them_is_refused(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    run_key = f"{campaign}/{run_id}"
    stage(outbox, campaign, run_id, BatchState.UNKNOWN)
    # An open or a deferral proves nothing was accepted... a processed event does.
    first = post(outbox, event(campaign, run_id, "en-00000", addr(campaign, "en0"), "deferred"))
    assert first.settled_requests == 0
    done = post(outbox, event(campaign, run_id, "en-00000", addr(campaign, "en0"), "processed"))
    assert done.settled_requests == 1
    states = {b: s.state for b, s in outbox.states(run_key).items()}
    assert states == {"en-00000": BatchState.SENT, "de-00000": BatchState.UNKNOWN}
    history = outbox.actions(run_key)
    assert [(h["action"], h["by"], h["requests"], h["recipients"]) for h in history] == [
        (Action.SETTLE_BY_EVENTS.value, "sendgrid events", ["en-00000"], 3)
    ]
    assert "accepted 1 request(s)" in history[0]["reason"]
    # The operator's resend of everything unknown no longer includes it...
    moved = outbox.requeue(
        run_key, [BatchState.UNKNOWN], OperatorAction(Action.RESEND, "op", "resend the unknown")
    )
    assert moved == 1
    assert outbox.states(run_key)["en-00000"].state == BatchState.SENT
    # ...and settling it as not sent is refused: it is sent.
    with pytest.raises(NothingToSettle, match="it is sent"):
        outbox.settle(run_key, ["en-00000"], OperatorAction(Action.SETTLE_NOT_SENT, "op", "guess"))


def test_events_kept_before_the_request_was_found_unknown_settle_it_at_resend(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    """SendGrid can report a request before the worker that sent it records the answer as lost:
    the events are on record when the operator goes to resend it."""
    campaign, run_id = run
    run_key = f"{campaign}/{run_id}"
    staged = [StagedBatch("en-00000", 0, "en", "a" * 64, 1)]
    outbox.stage(run_key, "m" * 64, staged, [(addr(campaign, "en0"), "u-en0", "en-00000")])
    assert outbox.claim(run_key, "en-00000")
    post(outbox, event(campaign, run_id, "en-00000", addr(campaign, "en0"), "delivered"))
    outbox.finish(run_key, "en-00000", BatchState.UNKNOWN, error="timed out")
    moved = outbox.requeue(
        run_key, [BatchState.UNKNOWN], OperatorAction(Action.RESEND, "op", "resend the unknown")
    )
    assert moved == 0
    assert outbox.states(run_key)["en-00000"].state == BatchState.SENT
    assert [h["action"] for h in outbox.actions(run_key)] == ["settle_by_events", "resend"]


def test_events_without_custom_args_are_matched_by_the_message_id(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    stage(outbox, campaign, run_id, BatchState.SENT)
    done = post(
        outbox, event(None, None, "de-00000", addr(campaign, "de1"), "delivered", sent_by=run_id)
    )
    assert done.matched == 1
    assert outbox.delivery_feedback(f"{campaign}/{run_id}")["de"]["delivered"] == 1


def test_events_about_nobody_of_this_outbox_are_kept_and_counted_nowhere(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    stage(outbox, campaign, run_id, BatchState.SENT)
    done = post(
        outbox,
        # Not a recipient of the request its custom args name.
        event(campaign, run_id, "en-00000", addr(campaign, "de1"), "delivered"),
        # A request this outbox never staged.
        event(campaign, "another-run", "en-00000", addr(campaign, "en0"), "delivered"),
        # Another system's mail on the same SendGrid account: still a bounce.
        event(None, None, None, addr(campaign, "stranger"), "bounce", type="bounce"),
    )
    assert (done.new, done.matched, done.suppressed) == (3, 0, 1)
    assert outbox.delivery_feedback(f"{campaign}/{run_id}") == {}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{not json", "not UTF-8 JSON"),
        (b'{"event": "delivered"}', "not a JSON array"),
        (b"[1]", "event 1 is not a JSON object"),
        (b'[{"event": "delivered", "email": "a@b.c", "timestamp": 1}]', "no 'sg_event_id'"),
        (
            b'[{"sg_event_id": "x", "event": "delivered", "email": "a@b.c", "timestamp": "1"}]',
            "timestamp",
        ),
        (
            b'[{"sg_event_id": "x", "event": "delivered", "email": "a@b.c", "timestamp": 1e30}]',
            "out of range",
        ),
        (
            b'[{"sg_event_id": "x\\ny", "event": "delivered", "email": "a@b.c", "timestamp": 1}]',
            "one line",
        ),
        (
            b'[{"sg_event_id": 7, "event": "delivered", "email": "a@b.c", "timestamp": 1}]',
            "one line",
        ),
    ],
)
def test_a_malformed_body_is_refused_whole(body: bytes, says: str) -> None:
    with pytest.raises(EventsRefused, match=says):
        parse_sendgrid_events(body)


def test_a_one_click_unsubscribe_suppresses_and_counts_in_the_newest_run_once(
    outbox: Outbox, run: tuple[str, str]
) -> None:
    campaign, run_id = run
    stage(outbox, campaign, run_id, BatchState.SENT)
    newer = f"{run_id}-again"
    outbox.stage(
        f"{campaign}/{newer}",
        "m" * 64,
        [StagedBatch("de-00000", 0, "de", "c" * 64, 1)],
        [(addr(campaign, "DE1"), "u-de1", "de-00000")],
        resend_reason="a second run for the test",
    )
    assert outbox.record_unsubscribe(campaign, "u-nobody") is None
    for _ in range(2):
        assert outbox.record_unsubscribe(campaign, "u-de1") == f"{campaign}/{newer}"
    assert outbox.delivery_feedback(f"{campaign}/{newer}")["de"]["unsubscribed"] == 1
    assert outbox.delivery_feedback(f"{campaign}/{run_id}") == {}
    found = outbox.suppression(addr(campaign, "de1"))
    assert found is not None
    assert (found.reason, found.source) == ("unsubscribed", "one_click")
    assert outbox.record_unsubscribe("another_campaign", "u-de1") is None
