"""What the provider reported after it accepted a run's requests, as the report, ``mailroom
status`` and the campaign console show it (the events are kept by
``Outbox.record_delivery_events``).

It is separate from the equation ``staged = sent + failed + unknown + halted``: a recipient the
provider later bounced or dropped was sent (the provider accepted the request) and stays counted
as sent there. ``section`` is the report's ``delivery_feedback``: per locale and in total, how
many recipients had each outcome (``delivery_events.OUTCOMES``); ``Outbox.not_delivered`` lists the
bounced and dropped with the provider's reason, as ``not_sent.csv`` ends with them (state
``bounced`` or ``dropped``). Both read the outbox with one query each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mailroom.delivery.delivery_events import OUTCOMES, PROVIDER
from mailroom.delivery.outbox import NOT_DELIVERED

if TYPE_CHECKING:
    from mailroom.delivery.outbox import Outbox

OUTCOME_NAMES = tuple(o.value for o in OUTCOMES)
# The outcomes that mean the recipient did not get the message: ``not_sent.csv``'s state for them.
PROVIDER_STATES = NOT_DELIVERED
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
