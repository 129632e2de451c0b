"""SendGrid Event Webhook bodies for tests: events about a run's recipients, as SendGrid posts
them (the request's custom args as top-level keys), recorded in an outbox the way the feedback
service records them."""

from __future__ import annotations

import json
from itertools import count
from typing import Any

from mailroom.delivery.delivery_events import parse_sendgrid_events
from mailroom.delivery.outbox import EventsRecorded, Outbox

_ids = count(1)


def event(
    run_key: str,
    batch_id: str,
    email: str,
    kind: str,
    *,
    reason: str | None = None,
    bounce_type: str | None = None,
    timestamp: int = 1_765_000_000,
) -> dict[str, Any]:
    """One event about ``email`` of request ``batch_id`` of run ``run_key``."""
    campaign, run_id = run_key.split("/", 1)
    item: dict[str, Any] = {
        "email": email,
        "timestamp": timestamp,
        "event": kind,
        "sg_event_id": f"ev-{next(_ids)}",
        "sg_message_id": f"msg-{batch_id}.filter0001",
        "mailroom_campaign": campaign,
        "mailroom_run": run_id,
        "mailroom_batch": batch_id,
    }
    if kind == "bounce":
        item["type"] = bounce_type or "bounce"
    if reason is not None:
        item["reason"] = reason
    return item


def record(outbox: Outbox, *events: dict[str, Any]) -> EventsRecorded:
    """Record one webhook body of ``events`` in ``outbox``."""
    body = json.dumps(list(events)).encode()
    return outbox.record_delivery_events(parse_sendgrid_events(body), soft_bounce_limit=3)
