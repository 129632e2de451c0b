"""``mailroom feedback serve``: the one part of Mailroom that faces the internet.

- ``GET /u/{token}``: a one-line page with a button. It unsubscribes nobody: mail scanners and
  link previews fetch links.
- ``POST /u/{token}``: unsubscribes (RFC 8058's one-click target, and the page's button): the
  address the campaign last sent that user's mail to goes on the suppression list, and that
  run counts them as unsubscribed (``Outbox.record_unsubscribe``). No redirect,
  no cookie, no login; posting twice changes nothing. A token that does not verify (tampered,
  another key, a campaign this outbox never sent) gets 400, and the page does not say which.
- ``POST /webhooks/sendgrid``: SendGrid's Event Webhook. The signature over the exact body and
  its timestamp are checked first (``webhook_signature``), and the size before the body is read;
  the events are then kept in the outbox (``Outbox.record_delivery_events``) in one transaction
  before the 2xx, so an answer SendGrid never gets means a retry, not a lost event.
- ``GET /healthz``: 200 when the outbox answers.

It holds no state of its own: run as many as needed behind a load balancer.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from mailroom.delivery.delivery_events import EventsRefused, parse_sendgrid_events
from mailroom.delivery.outbox import Outbox
from mailroom.feedback.webhook_signature import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureRefused,
    WebhookSignature,
)
from mailroom.unsubscribe import UnsubscribeKeys

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# A one-click POST carries "List-Unsubscribe=One-Click" and nothing else of use.
_MAX_FORM_BYTES = 8 * 1024
_MAX_TOKEN_CHARS = 512
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True)
class FeedbackSettings:
    """What the service needs: the outbox, the unsubscribe signing keys (newest first), and the
    webhook's public key (``None`` only with ``unsigned_webhooks``, for local development)."""

    outbox_url: str
    unsubscribe_keys: UnsubscribeKeys
    webhook_signature: WebhookSignature | None
    unsigned_webhooks: bool = False
    soft_bounce_limit: int = 3
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if self.webhook_signature is None and not self.unsigned_webhooks:
            raise ValueError(
                "the SendGrid webhook's public key is required (or the explicit flag for local "
                "development that accepts unsigned events)"
            )
        if self.soft_bounce_limit < 1:
            raise ValueError("the soft bounce limit must be at least 1")
        if self.max_body_bytes < 1024:
            raise ValueError("the body size limit must be at least 1024 bytes")


class _TooLarge(Exception):
    pass


def create_app(settings: FeedbackSettings, outbox: Outbox | None = None) -> Starlette:
    """The service's ASGI app. ``outbox``: an open outbox to use (else one is opened at
    ``settings.outbox_url``, which also brings its schema up to date)."""
    box = outbox if outbox is not None else Outbox(settings.outbox_url)
    keys = settings.unsubscribe_keys

    async def show(request: Request) -> Response:
        found = await run_in_threadpool(_recipient, box, keys, request.path_params["token"])
        if found is None:
            return _refused()
        campaign, _ = found
        return _page(
            "Unsubscribe",
            "<p>Stop receiving our emails? This link came with "
            f"<b>{html.escape(campaign)}</b>; unsubscribing stops every campaign.</p>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" '
            'value="One-Click"><button type="submit">Unsubscribe</button></form>',
        )

    async def unsubscribe(request: Request) -> Response:
        try:
            await _read_body(request, _MAX_FORM_BYTES)
        except (_TooLarge, ClientDisconnect):
            return _page("Unsubscribe", "<p>That request was too large.</p>", status=413)
        token = request.path_params["token"]
        verified = _verified(keys, token)
        # The outbox finds whom the token was made for and records them in one transaction;
        # None: no run of that campaign staged them.
        run_key = await run_in_threadpool(box.record_unsubscribe, *verified) if verified else None
        if run_key is None:
            return _refused()
        log.info("one-click unsubscribe from %s", run_key)
        return _page(
            "Unsubscribed",
            "<p>You are unsubscribed. You will not get our campaign emails any more.</p>",
        )

    async def sendgrid_events(request: Request) -> Response:
        started = time.perf_counter()
        declared = request.headers.get("content-length")
        if declared is not None and (
            not declared.isdigit() or int(declared) > settings.max_body_bytes
        ):
            return _json({"error": "the body is larger than this service takes"}, 413)
        try:
            body = await _read_body(request, settings.max_body_bytes)
        except _TooLarge:
            return _json({"error": "the body is larger than this service takes"}, 413)
        except ClientDisconnect:
            return _json({"error": "the body was cut off"}, 400)
        if settings.webhook_signature is not None:
            try:
                settings.webhook_signature.check(
                    body,
                    request.headers.get(SIGNATURE_HEADER),
                    request.headers.get(TIMESTAMP_HEADER),
                )
            except SignatureRefused as exc:
                log.warning("webhook refused: %s", exc)
                return _json({"error": "the signature does not verify"}, 403)
        try:
            events = parse_sendgrid_events(body)
        except EventsRefused as exc:
            log.warning("webhook refused: %s", exc)
            return _json({"error": str(exc)}, 400)
        try:
            recorded = await run_in_threadpool(
                box.record_delivery_events, events, soft_bounce_limit=settings.soft_bounce_limit
            )
        except sa.exc.SQLAlchemyError as exc:
            log.error(
                "webhook: the outbox did not take %d event(s): %s", len(events), type(exc).__name__
            )
            return _json({"error": "the events could not be kept; retry"}, 503)
        elapsed = time.perf_counter() - started
        log.info(
            "webhook: %d event(s), %d new, %d matched to a recipient, %d address(es) suppressed, "
            "%d unknown request(s) settled, %.0f ms",
            recorded.received,
            recorded.new,
            recorded.matched,
            recorded.suppressed,
            recorded.settled_requests,
            elapsed * 1000,
        )
        return _json(
            {
                "received": recorded.received,
                "new": recorded.new,
                "matched": recorded.matched,
                "suppressed": recorded.suppressed,
                "settled_requests": recorded.settled_requests,
            },
            200,
        )

    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(_ping, box)
        except sa.exc.SQLAlchemyError as exc:
            return _json({"status": "outbox unreachable", "error": type(exc).__name__}, 503)
        return _json({"status": "ok"}, 200)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _json({"error": "not found"}, 404)

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _json({"error": "method not allowed"}, 405)

    app = Starlette(
        routes=[
            Route("/u/{token}", show, methods=["GET"]),
            Route("/u/{token}", unsubscribe, methods=["POST"]),
            Route("/webhooks/sendgrid", sendgrid_events, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )
    app.state.outbox = box
    return app


def _recipient(box: Outbox, keys: UnsubscribeKeys, token: str) -> tuple[str, str] | None:
    """(campaign, user id) a token was made for, ``None`` when it does not verify with any key,
    or names a campaign or user this outbox never sent to."""
    verified = _verified(keys, token)
    if verified is None or box.unsubscribed_address(*verified) is None:
        return None
    return verified


def _verified(keys: UnsubscribeKeys, token: str) -> tuple[str, str] | None:
    """(campaign, user id) of a token that verifies with one of ``keys``, else None."""
    return None if len(token) > _MAX_TOKEN_CHARS else keys.verify(token)


def _ping(box: Outbox) -> None:
    with box.engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _refused() -> Response:
    return _page(
        "Link not valid",
        "<p>This unsubscribe link is not valid. Use the link in the email you received.</p>",
        status=400,
    )


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;"
        "padding:0 1rem;color:#1f2937}button{font:inherit;padding:.5rem 1.25rem;"
        "border:1px solid #4b5563;border-radius:.375rem;background:#111827;color:#fff;"
        "cursor:pointer}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(text, status_code=status, headers=_PAGE_HEADERS)


def _json(data: dict[str, Any], status: int) -> Response:
    return Response(
        json.dumps(data),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
