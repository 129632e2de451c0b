"""What the provider reported after it accepted a run's requests, as the report, ``mailroom
status`` and the campaign console show it (the events are kept by
``Outbox.record_delivery_events``).

It is separate from the equation ``staged = sent + failed + unknown + halted``: a recipient the
provider later bounced or dropped was sent (the provider accepted the request) and stays counted
as sent there. ``section`` is the report's ``delivery_feedback``: per locale and in total, how
many recipients had each outcome (``delivery_events.OUTCOMES``); ``not_delivered`` lists the
bounced and dropped with the provider's reason, as ``not_sent.csv`` ends with them (state
``bounced`` or ``dropped``). Both read the outbox with one query each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from mailroom.delivery.delivery_events import OUTCOMES, PROVIDER
from mailroom.delivery.outbox import BatchState, batches, delivery_events, recipients

if TYPE_CHECKING:
    from mailroom.delivery.outbox import Outbox

OUTCOME_NAMES = tuple(o.value for o in OUTCOMES)
# The outcomes that mean the recipient did not get the message: ``not_sent.csv``'s state for them.
PROVIDER_STATES = ("bounced", "dropped")
NOTE = (
    f"what {PROVIDER} reported after it accepted the requests (and the one-click unsubscribes "
    "from the run's links), in recipients per outcome (one "
    "delivered who then complained counts in both); separate from the equation: these "
    "recipients were accepted by the provider and stay counted as sent. The bounced and dropped "
    "are listed in not_sent.csv with the provider's reason."
)


def section(outbox: Outbox | None, run_key: str, locales: Iterable[str] = ()) -> dict[str, Any]:
    """The report's ``delivery_feedback``: every outcome per locale (each of ``locales``, 0 when
    it has no events, and any other locale with events) and in ``total``."""
    return shaped(outbox.delivery_feedback(run_key) if outbox is not None else {}, locales)


def shaped(per_locale: dict[str, dict[str, int]], locales: Iterable[str] = ()) -> dict[str, Any]:
    """``Outbox.delivery_feedback``'s counts as the report and the console give them."""
    full = {str(locale): dict.fromkeys(OUTCOME_NAMES, 0) for locale in locales}
    for locale, counts in per_locale.items():
        full[str(locale)] = {o: int(counts.get(o, 0)) for o in OUTCOME_NAMES}
    return {
        "provider": PROVIDER,
        "in_equation": False,
        "note": NOTE,
        "per_locale": dict(sorted(full.items())),
        "total": {o: sum(c[o] for c in full.values()) for o in OUTCOME_NAMES},
    }


def not_delivered(
    outbox: Outbox, run_key: str, *, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """The run's recipients the provider bounced or dropped after accepting their request, in
    request order: ``user_id``, ``email_key``, ``batch_id``, ``state`` (the outcome of their
    latest such event, as ``Outbox.provider_outcomes``) and the provider's ``reason`` (or None).
    Only recipients the outbox holds as ``sent``: anyone else is listed by their own state
    already (``Outbox.not_sent``)."""
    ev = delivery_events
    latest = (
        sa.select(
            ev.c.email_key,
            ev.c.outcome,
            ev.c.reason,
            sa.func.row_number()
            .over(
                partition_by=ev.c.email_key,
                order_by=(ev.c.occurred_at.desc(), ev.c.event_id.desc()),
            )
            .label("n"),
        )
        .where(ev.c.run_key == run_key, ev.c.outcome.in_(PROVIDER_STATES))
        .subquery()
    )
    state = sa.func.coalesce(recipients.c.state, batches.c.state)
    query = (
        sa.select(
            recipients.c.user_id,
            recipients.c.email_key,
            batches.c.batch_id,
            latest.c.outcome.label("state"),
            latest.c.reason,
        )
        .select_from(
            latest.join(
                recipients,
                sa.and_(
                    recipients.c.run_key == run_key, recipients.c.email_key == latest.c.email_key
                ),
            ).join(
                batches,
                sa.and_(
                    batches.c.run_key == recipients.c.run_key,
                    batches.c.batch_id == recipients.c.batch_id,
                ),
            )
        )
        .where(latest.c.n == 1, state == BatchState.SENT)
        .order_by(batches.c.batch_index, recipients.c.email_key)
    )
    if limit is not None:
        query = query.limit(limit)
    with outbox.engine.connect() as conn:
        for row in conn.execute(query):
            yield dict(row._mapping)


def reason_text(reason: str | None) -> str:
    """``not_sent.csv``'s reason of a bounced or dropped recipient: the provider's own."""
    return reason or f"{PROVIDER} gave no reason"


def table(feedback: dict[str, Any]) -> list[str]:
    """The per-locale table ``mailroom status`` prints (counts only, never an address)."""
    rows = [("locale", *OUTCOME_NAMES)]
    for locale, counts in feedback["per_locale"].items():
        rows.append((locale, *(f"{counts[o]:,}" for o in OUTCOME_NAMES)))
    rows.append(("total", *(f"{feedback['total'][o]:,}" for o in OUTCOME_NAMES)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
