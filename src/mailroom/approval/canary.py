"""canary_send: the real request shape to the campaign's seed list, before anyone approves.

Each locale's frozen content goes to every internal seed address, one personalization each, with
seed values of its own (never a real recipient's), through the same transport and the same
envelope guard as the campaign. Approvers can then look at a real inbox; the outcome is part of
what they are shown.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mailroom.addresses import mask
from mailroom.batches import (
    batch_custom_args,
    sendgrid_request_body,
    serialise,
    sha256_hex,
    shared_part,
)
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.envelope_guard import ApprovedManifest
from mailroom.content import LocaleContent
from mailroom.delivery.transports.base import Transport
from mailroom.envelopes import envelope_values
from mailroom.errors import MailroomError
from mailroom.staging import write_json

log = logging.getLogger(__name__)


def seed_envelopes(spec: CampaignSpec, secret: bytes) -> list[dict[str, Any]]:
    """One envelope per seed address, with values that belong to the seed, not to a customer."""
    envelopes = []
    for i, address in enumerate(spec.seed_list):
        row: dict[str, Any] = {"user_id": f"seed-{i}", "email": address}
        row.update({field: f"Seed {i + 1}" for field in spec.fields})
        subs, headers = envelope_values(spec, secret, row)
        envelopes.append({"email": address, "substitutions": subs, "headers": headers})
    return envelopes


def canary_send(
    spec: CampaignSpec,
    *,
    run_id: str,
    contents: dict[str, LocaleContent],
    secret: bytes,
    transport: Transport,
    out_dir: Path,
) -> dict[str, Any]:
    """Send one request per locale to the seed list; returns (and writes) the outcome per locale.

    A refused or failed canary raises: the run stops before approval, since the same transport
    would refuse or fail the campaign.
    """
    if not spec.seed_list:
        return {"sent": False, "reason": "the campaign has no seed_list"}
    envelopes = seed_envelopes(spec, secret)
    bodies = {}
    shared = {}
    for locale in spec.locales:
        batch_id = f"canary-{locale}"
        bodies[locale] = serialise(
            sendgrid_request_body(
                spec, contents[locale], envelopes, batch_custom_args(spec, run_id, batch_id)
            )
        )
        shared[sha256_hex(bodies[locale])] = shared_part(spec, contents[locale], run_id, batch_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    for locale, body in bodies.items():
        (out_dir / f"{locale}.json").write_bytes(body)
    approved = ApprovedManifest("canary", frozenset(shared), shared, spec.public_addresses)
    outcome: dict[str, Any] = {
        "sent": True,
        "seeds": [mask(a) for a in spec.seed_list],
        "locales": {},
    }
    with transport:
        for locale, body in bodies.items():
            delivery = transport.send(body, approved, expected_recipients=set(spec.seed_list))
            outcome["locales"][locale] = {
                "message_id": delivery.message_id,
                "status": delivery.status,
            }
            log.info("canary: %s sent to %d seed address(es)", locale, len(spec.seed_list))
    write_json(out_dir / "result.json", outcome)
    if len(outcome["locales"]) != len(spec.locales):  # pragma: no cover - send raises first
        raise MailroomError("the canary did not reach every locale")
    return outcome
