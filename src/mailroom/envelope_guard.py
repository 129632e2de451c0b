"""The envelope guard: the last check on the exact bytes a transport is about to send.

It parses the serialised body (never the object that produced it) and refuses it unless every
personalization has exactly one recipient in ``to`` and nothing in cc/bcc, no address appears
twice, every address is one valid address, no reserved header is set per personalization, the
request is within the provider's limits, its SHA-256 is in the approved manifest, and (when the
outbox says who this batch is for) its recipients are exactly those.

Transports cannot skip it: ``Transport.send`` runs it and only hands ``GuardedBody`` values to
the provider-specific code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from mailroom.addresses import is_valid_single_address
from mailroom.errors import EnvelopeViolation

MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000
MAX_BODY_BYTES = 30 * 1024 * 1024  # SendGrid's limit on the total message size
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "x-sg-id", "x-sg-eid", "received", "dkim-signature", "Content-Type",
        "Content-Transfer-Encoding", "To", "From", "Subject", "Reply-To", "CC", "BCC",
        "Sender", "Return-Path",
    )
)
_ALLOWED_PERSONALIZATION_KEYS = frozenset(
    {"to", "substitutions", "headers", "custom_args", "send_at", "subject", "dynamic_template_data"}
)


@dataclass(frozen=True)
class ApprovedManifest:
    """What the approver approved: the manifest's digest and every request digest in it."""

    sha256: str
    digests: frozenset[str]


@dataclass(frozen=True)
class GuardedBody:
    """Bytes that passed the guard, with the one recipient of each personalization."""

    body: bytes
    sha256: str
    recipients: tuple[str, ...]


def check_envelope(
    body: bytes,
    approved: ApprovedManifest,
    expected_recipients: Collection[str] | None = None,
) -> GuardedBody:
    digest = hashlib.sha256(body).hexdigest()
    if digest not in approved.digests:
        raise EnvelopeViolation(
            f"request {digest[:12]}… is not in the approved manifest {approved.sha256[:12]}…"
        )
    recipients = recipients_of_body(body)
    if expected_recipients is not None:
        expected = {e.lower() for e in expected_recipients}
        got = {r.lower() for r in recipients}
        if got != expected:
            raise EnvelopeViolation(
                f"request {digest[:12]}… is addressed to {len(got - expected)} recipient(s) "
                f"outside its batch and misses {len(expected - got)} of its own"
            )
    return GuardedBody(body=body, sha256=digest, recipients=recipients)


def recipients_of_body(body: bytes) -> tuple[str, ...]:
    """Check the one-recipient rules on a serialised request; returns its recipients in order."""
    if len(body) > MAX_BODY_BYTES:
        raise EnvelopeViolation(f"request is {len(body)} bytes, over the {MAX_BODY_BYTES} limit")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeViolation(f"request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EnvelopeViolation("request body is not a JSON object")
    for key in ("cc", "bcc"):
        if key in data:
            raise EnvelopeViolation(f"request sets a top-level {key!r}")
    _check_headers(data.get("headers"), "request")
    personalizations = data.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        raise EnvelopeViolation("request has no personalizations")
    if len(personalizations) > MAX_PERSONALIZATIONS:
        raise EnvelopeViolation(
            f"request has {len(personalizations)} personalizations, over {MAX_PERSONALIZATIONS}"
        )
    recipients: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(personalizations):
        recipients.append(_single_recipient(item, i))
        key = recipients[-1].lower()
        if key in seen:
            raise EnvelopeViolation(f"personalization {i}: an address appears twice in the request")
        seen.add(key)
    if len(recipients) > MAX_RECIPIENTS:
        raise EnvelopeViolation(f"request has {len(recipients)} recipients, over {MAX_RECIPIENTS}")
    return tuple(recipients)


def _single_recipient(item: Any, i: int) -> str:
    if not isinstance(item, dict):
        raise EnvelopeViolation(f"personalization {i} is not an object")
    extra = set(item) - _ALLOWED_PERSONALIZATION_KEYS
    if extra & {"cc", "bcc"}:
        raise EnvelopeViolation(f"personalization {i} has {sorted(extra & {'cc', 'bcc'})}")
    if extra:
        raise EnvelopeViolation(f"personalization {i} has unexpected fields {sorted(extra)}")
    to = item.get("to")
    if not isinstance(to, list) or len(to) != 1:
        count = len(to) if isinstance(to, list) else 0
        raise EnvelopeViolation(f"personalization {i} has {count} recipients in 'to', not 1")
    entry = to[0]
    email = entry.get("email") if isinstance(entry, dict) else None
    if not is_valid_single_address(email):
        raise EnvelopeViolation(f"personalization {i}: 'to' is not exactly one valid address")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or any(c in name for c in "\r\n,;<>@")):
        raise EnvelopeViolation(f"personalization {i}: the recipient name could hide an address")
    _check_headers(item.get("headers"), f"personalization {i}")
    return str(email)


def _check_headers(headers: Any, where: str) -> None:
    if headers is None:
        return
    if not isinstance(headers, dict):
        raise EnvelopeViolation(f"{where}: headers are not an object")
    for name, value in headers.items():
        if str(name).lower() in RESERVED_HEADERS:
            raise EnvelopeViolation(f"{where}: sets the reserved header {name!r}")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise EnvelopeViolation(f"{where}: header {name!r} has a line break or is not text")
