"""A SendGrid request exactly as Mailroom's standard builder makes it, for tests of what reads
one (the dev server's schema and rules)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from mailroom.batches import sendgrid_request_body
from mailroom.campaign_spec import load_campaign
from mailroom.content import render_content
from mailroom.envelopes import envelope_values

INCLUDE = Path(__file__).resolve().parents[2] / "include"
# First names that need escaping, non-Latin script and characters outside the BMP.
NAMES = ("Ada", "Bob & Co", "Zoë", "Jürgen", "李", "O'Brien ✨")


@cache
def mailroom_request_body(recipients: int = 3) -> dict[str, Any]:
    """The ``winter_update`` campaign's German request for ``recipients`` people (``u0`` …,
    their first names from ``NAMES`` in turn). Shared: copy it before changing it."""
    spec = load_campaign(INCLUDE / "campaigns", "winter_update")
    content = render_content(spec, INCLUDE / "templates", INCLUDE / "translations")["de"]
    envelopes = []
    for index in range(recipients):
        row = {
            "user_id": f"u{index}",
            "email": f"u{index}@example.com",
            "first_name": NAMES[index % len(NAMES)],
        }
        substitutions, headers = envelope_values(spec, b"secret", row)
        envelopes.append(
            {"email": row["email"], "substitutions": substitutions, "headers": headers}
        )
    custom_args = {"mailroom_campaign": spec.name, "mailroom_batch": "de-00001"}
    return sendgrid_request_body(spec, content, envelopes, custom_args)
