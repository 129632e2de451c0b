"""The SendGrid transport, through the official SDK, sending the frozen bytes unchanged."""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
from dataclasses import dataclass

from mailroom.addresses import mask_addresses
from mailroom.checks.envelope_guard import GuardedBody
from mailroom.delivery.transports.base import Delivery, Transport
from mailroom.errors import TransportError

DEFAULT_HOST = "https://api.sendgrid.com"
DEFAULT_TIMEOUT_SECONDS = 30.0
# A non-plain JSON content type makes the SDK send our string as it is instead of re-encoding it,
# so the bytes on the wire are the bytes the guard checked and the approver approved.
_CONTENT_TYPE = "application/json; charset=utf-8"

# The SDK's HTTP client logs whole request bodies (every address) at DEBUG.
logging.getLogger("python_http_client").setLevel(logging.WARNING)


@dataclass(frozen=True)
class SendGridSettings:
    api_key: str
    host: str = DEFAULT_HOST
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        # Checked when the settings are made (the DAG's prepare task makes them), so a missing
        # or mangled key fails before extract, not at send after approval. Never shown.
        if not self.api_key or not self.api_key.strip():
            raise TransportError("no SendGrid API key configured (empty)")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in self.api_key):
            raise TransportError(
                "the SendGrid API key holds whitespace or a control character (a line break "
                "pasted with it?): set it again"
            )
        if not self.host.startswith(("https://", "http://")) or len(self.host) <= len("https://"):
            raise TransportError(f"the SendGrid host {self.host!r} is not an http(s) URL")
        if not self.timeout_seconds > 0:
            raise TransportError("the SendGrid timeout must be positive")

    def __repr__(self) -> str:
        return f"SendGridSettings(host={self.host!r}, timeout_seconds={self.timeout_seconds})"


class SendGridTransport(Transport):
    name = "sendgrid"

    def __init__(self, settings: SendGridSettings) -> None:
        from sendgrid import SendGridAPIClient

        self.settings = settings
        self._client = SendGridAPIClient(settings.api_key, host=settings.host.rstrip("/"))
        self._client.client.timeout = settings.timeout_seconds

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        from python_http_client.exceptions import HTTPError

        try:
            response = self._client.client.mail.send.post(
                request_body=guarded.body.decode("utf-8"),
                request_headers={"Content-Type": _CONTENT_TYPE},
                timeout=self.settings.timeout_seconds,
            )
        except HTTPError as exc:
            raise _http_failure(exc.status_code, exc.headers, exc.body) from None
        except urllib.error.URLError as exc:
            # urllib wraps failures while connecting or writing the request: the provider did
            # not get a complete request, so retrying cannot duplicate.
            raise TransportError(
                f"SendGrid unreachable at {self.settings.host}: {exc.reason}", retryable=True
            ) from None
        except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
            # The request was sent and the answer was lost: it may have been accepted.
            raise TransportError(
                f"SendGrid answer lost after the request was sent: {type(exc).__name__}",
                outcome_unknown=True,
            ) from None
        status = response.status_code
        if status not in (200, 202):
            raise TransportError(f"SendGrid answered {status}", status=status)
        message_id = response.headers.get("X-Message-Id") or ""
        if not message_id:
            raise TransportError(
                f"SendGrid answered {status} without an X-Message-Id", status=status
            )
        return Delivery(message_id=message_id, status=status)


def _http_failure(status: int, headers: object, body: object) -> TransportError:
    detail = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    retry_after = None
    if headers is not None and hasattr(headers, "get"):
        retry_after = headers.get("Retry-After") or headers.get("X-RateLimit-Reset")
    return TransportError(
        f"SendGrid answered {status}: {mask_addresses(detail[:300])}",
        status=status,
        retryable=status == 429 or status >= 500,
        retry_after=_seconds_to_wait(retry_after),
    )


def _seconds_to_wait(value: object) -> float | None:
    """``Retry-After`` is seconds; ``X-RateLimit-Reset`` is a Unix time."""
    try:
        number = float(str(value)) if value is not None else None
    except ValueError:
        return None
    if number is not None and number > 1_000_000_000:
        number = max(0.0, number - time.time())
    return number
