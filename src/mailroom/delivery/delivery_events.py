"""What a provider reports after it accepted a request: SendGrid's Event Webhook, read strictly.

SendGrid posts a JSON array of events (``processed``, ``delivered``, ``deferred``, ``bounce``
with ``type`` bounce or blocked, ``dropped``, ``spamreport``, ``unsubscribe``,
``group_unsubscribe``, ``open``, ``click``…), each with ``sg_event_id`` (retries and duplicates
carry the same one), ``email``, ``timestamp``, ``sg_message_id`` (the request's
``X-Message-Id``, a dot, a suffix of its own) and the request's ``custom_args`` as top-level keys:
the freeze sets ``mailroom_campaign``, ``mailroom_run`` and ``mailroom_batch``
(``batches.batch_custom_args``), which name the request and carry no personal data.

``parse_sendgrid_events`` turns a body into ``DeliveryEvent`` values, or refuses the whole body
(``EventsRefused``) when any event is malformed: nothing of it is kept, and SendGrid sees the
4xx. Each event then says what it means for Mailroom:

- ``outcome``: what the report counts per locale (delivered, bounced, dropped, complained,
  unsubscribed); ``None`` for the rest;
- ``suppression_reason``: the reason it puts the address on the suppression list under
  (a hard bounce, a drop because the address bounced, is invalid, unsubscribed or reported
  spam, a spam report, an unsubscribe);
- ``soft_bounce`` (``blocked``, ``deferred``): counted in a row per address; a delivery resets
  the count (``Outbox.record_delivery_events``);
- ``proves_acceptance`` (``processed``, ``delivered``, ``dropped``, ``bounce``): the provider
  took the request, so a request left ``unknown`` is settled as sent from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from mailroom.addresses import address_key

PROVIDER = "sendgrid"
EVENT_ID_CHARS = 100
_REASON_CHARS = 1000


class Outcome(StrEnum):
    """What became of a recipient's message after the provider accepted it, as reported."""

    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DROPPED = "dropped"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


OUTCOMES = tuple(Outcome)

# SendGrid's ``dropped`` reasons that say the address itself must not be mailed again; the
# others ("Invalid SMTPAPI header", "Spam Content"…) are about the message, not the person.
_DROPPED_BECAUSE = {
    "bounced address": "bounced",
    "invalid": "invalid",
    "unsubscribed address": "unsubscribed",
    "spam reporting address": "spam_report",
}
_ACCEPTANCE = frozenset({"processed", "delivered", "dropped", "bounce"})


class EventsRefused(ValueError):
    """A webhook body that is not a list of well-formed events; the message says which part,
    never an address."""


@dataclass(frozen=True)
class DeliveryEvent:
    """One provider event, as kept: no more of it than Mailroom uses."""

    event_id: str
    event: str
    email: str
    email_key: str | None
    occurred_at: datetime
    message_id: str | None
    campaign: str | None
    run_id: str | None
    batch_id: str | None
    bounce_type: str | None
    reason: str | None

    @property
    def run_key(self) -> str | None:
        """The run its request belongs to, as its custom args say (``<campaign>/<run id>``)."""
        if self.campaign and self.run_id:
            return f"{self.campaign}/{self.run_id}"
        return None

    @property
    def outcome(self) -> Outcome | None:
        if self.event == "delivered":
            return Outcome.DELIVERED
        if self.event == "bounce" and self.bounce_type != "blocked":
            return Outcome.BOUNCED
        if self.event == "dropped":
            return Outcome.DROPPED
        if self.event == "spamreport":
            return Outcome.COMPLAINED
        if self.event in ("unsubscribe", "group_unsubscribe"):
            return Outcome.UNSUBSCRIBED
        return None

    @property
    def soft_bounce(self) -> bool:
        """A temporary failure: ``deferred``, or a ``bounce`` of type ``blocked``."""
        return self.event == "deferred" or (
            self.event == "bounce" and self.bounce_type == "blocked"
        )

    @property
    def proves_acceptance(self) -> bool:
        """The provider took the request this event is about."""
        return self.event in _ACCEPTANCE

    @property
    def suppression_reason(self) -> str | None:
        """The suppression list's reason for this event's address, ``None`` when it puts
        nobody on it."""
        outcome = self.outcome
        if outcome is Outcome.BOUNCED:
            return "bounced"
        if outcome is Outcome.COMPLAINED:
            return "spam_report"
        if outcome is Outcome.UNSUBSCRIBED:
            return "unsubscribed"
        if outcome is Outcome.DROPPED:
            return _DROPPED_BECAUSE.get((self.reason or "").strip().lower())
        return None


def parse_sendgrid_events(body: bytes) -> list[DeliveryEvent]:
    """The events of one Event Webhook body, in its order; ``EventsRefused`` for a body that is
    not UTF-8 JSON, not a list of objects, or holds an event without a usable ``sg_event_id``,
    ``event``, ``email`` or ``timestamp``."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EventsRefused(f"the body is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(data, list):
        raise EventsRefused("the body is not a JSON array of events")
    # A body's events repeat addresses and seconds: each key and time is worked out once.
    keys: dict[str, str | None] = {}
    times: dict[int | float, datetime] = {}
    return [_event(item, n, keys, times) for n, item in enumerate(data, start=1)]


def _event(
    item: Any, n: int, keys: dict[str, str | None], times: dict[int | float, datetime]
) -> DeliveryEvent:
    """One event, read in one pass when every field is as it should be (as SendGrid sends
    them); anything else goes to ``_checked_event``, which says what is wrong in the order it
    checks."""
    if type(item) is not dict:
        return _checked_event(item, n)
    get = item.get
    event_id, event, email = get("sg_event_id"), get("event"), get("email")
    timestamp = get("timestamp")
    sg_message_id, bounce_type = get("sg_message_id"), get("type")
    campaign, run_id, batch_id = (
        get("mailroom_campaign"),
        get("mailroom_run"),
        get("mailroom_batch"),
    )
    # _text's checks, written out (a call per field costs more than the checks).
    if not (
        type(event_id) is str
        and 0 < len(event_id) <= EVENT_ID_CHARS
        and type(event) is str
        and 0 < len(event) <= 32
        and type(email) is str
        and 0 < len(email) <= 320
        and (type(timestamp) is int or type(timestamp) is float)
        and (sg_message_id is None or (type(sg_message_id) is str and len(sg_message_id) <= 255))
        and (campaign is None or (type(campaign) is str and len(campaign) <= 64))
        and (run_id is None or (type(run_id) is str and len(run_id) <= 180))
        and (batch_id is None or (type(batch_id) is str and len(batch_id) <= 64))
        and (bounce_type is None or (type(bounce_type) is str and len(bounce_type) <= 32))
        and "".join(
            (
                event_id,
                event,
                email,
                sg_message_id or "",
                campaign or "",
                run_id or "",
                batch_id or "",
                bounce_type or "",
            )
        ).isprintable()
    ):
        return _checked_event(item, n)
    occurred_at = times.get(timestamp)
    if occurred_at is None:
        try:
            occurred_at = times[timestamp] = datetime.fromtimestamp(timestamp, UTC)
        except (OverflowError, OSError, ValueError):
            return _checked_event(item, n)
    email_key = keys.get(email, _UNSEEN)
    if email_key is _UNSEEN:
        email_key = keys[email] = address_key(email)
    reason = get("reason")
    if reason is not None and not isinstance(reason, str):
        reason = json.dumps(reason, ensure_ascii=False)
    return DeliveryEvent(
        event_id=event_id,
        event=event,
        email=email,
        email_key=email_key,
        occurred_at=occurred_at,
        # The request's X-Message-Id is what comes before the first dot.
        message_id=sg_message_id.partition(".")[0] if sg_message_id else None,
        campaign=campaign or None,
        run_id=run_id or None,
        batch_id=batch_id or None,
        bounce_type=bounce_type or None,
        reason=" ".join(reason.split())[:_REASON_CHARS] if reason else None,
    )


_UNSEEN: Any = object()


def _checked_event(item: Any, n: int) -> DeliveryEvent:
    if not isinstance(item, dict):
        raise EventsRefused(f"event {n} is not a JSON object")
    event_id = _text(item, "sg_event_id", n, required=True, limit=EVENT_ID_CHARS)
    event = _text(item, "event", n, required=True, limit=32)
    email = _text(item, "email", n, required=True, limit=320)
    timestamp = item.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise EventsRefused(f"event {n}: 'timestamp' is not a number of seconds")
    try:
        occurred_at = datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        raise EventsRefused(f"event {n}: 'timestamp' is out of range") from None
    sg_message_id = _text(item, "sg_message_id", n, limit=255)
    reason = item.get("reason")
    if reason is not None and not isinstance(reason, str):
        reason = json.dumps(reason, ensure_ascii=False)
    return DeliveryEvent(
        event_id=event_id,
        event=event,
        email=email,
        email_key=address_key(email),
        occurred_at=occurred_at,
        # The request's X-Message-Id is what comes before the first dot.
        message_id=sg_message_id.split(".", 1)[0] if sg_message_id else None,
        campaign=_text(item, "mailroom_campaign", n, limit=64),
        run_id=_text(item, "mailroom_run", n, limit=180),
        batch_id=_text(item, "mailroom_batch", n, limit=64),
        bounce_type=_text(item, "type", n, limit=32),
        reason=" ".join(reason.split())[:_REASON_CHARS] if reason else None,
    )


def _text(item: dict[str, Any], key: str, n: int, *, required: bool = False, limit: int) -> Any:
    value = item.get(key)
    if value is None or value == "":
        if required:
            raise EventsRefused(f"event {n} has no {key!r}")
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise EventsRefused(f"event {n}: {key!r} is not one line of at most {limit} characters")
    return value
