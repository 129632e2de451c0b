"""SendGrid's signed Event Webhook: is this body, exactly as received, the one SendGrid signed,
and signed just now?

SendGrid signs ``timestamp + body`` with ECDSA P-256 / SHA-256 and sends the signature (base64
DER) and the timestamp in ``X-Twilio-Email-Event-Webhook-Signature`` and ``-Timestamp``. The
SDK's ``EventWebhook`` checks the signature; it has no replay window of its own, so a timestamp
more than ``window`` seconds from now is refused here, as is a signed body replayed later.
"""

from __future__ import annotations

import binascii
import time

from cryptography.exceptions import InvalidSignature
from sendgrid.helpers.eventwebhook import EventWebhook

from mailroom.errors import ValidationFailed

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
PUBLIC_KEY_ENV = "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY"
WINDOW_SECONDS = 300


class SignatureRefused(Exception):
    """A webhook request whose signature or timestamp does not hold; the message is for the
    service's log, never for the caller."""


class WebhookSignature:
    """Checks SendGrid's signature with the public key SendGrid shows (base64 of the key's DER
    SubjectPublicKeyInfo, the text in the Event Webhook's settings)."""

    def __init__(self, public_key: str, *, window: float = WINDOW_SECONDS) -> None:
        text = "".join(public_key.split())
        if not text:
            raise ValidationFailed(f"{PUBLIC_KEY_ENV} is empty: it verifies SendGrid's events")
        try:
            self._webhook = EventWebhook(text)
        except (ValueError, TypeError) as exc:
            raise ValidationFailed(
                f"{PUBLIC_KEY_ENV} is not an EC public key in base64, as SendGrid shows it "
                f"({type(exc).__name__})"
            ) from None
        self.window = window

    def check(
        self, body: bytes, signature: str | None, timestamp: str | None, now: float | None = None
    ) -> None:
        """Return when ``body`` is what SendGrid signed with ``timestamp`` within the window;
        raise ``SignatureRefused`` otherwise."""
        if not signature or not timestamp:
            raise SignatureRefused("no signature or timestamp header")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            raise SignatureRefused("the timestamp is not a number of seconds")
        skew = abs((time.time() if now is None else now) - int(timestamp))
        if skew > self.window:
            raise SignatureRefused(
                f"the timestamp is {skew:.0f} s from now (window {self.window:.0f} s)"
            )
        try:
            payload = body.decode("utf-8")
            valid = self._webhook.verify_signature(payload, signature, timestamp)
        except (UnicodeDecodeError, binascii.Error, ValueError, InvalidSignature):
            valid = False
        if not valid:
            raise SignatureRefused("the signature does not verify")
