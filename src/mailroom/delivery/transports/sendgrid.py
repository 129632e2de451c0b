"""The SendGrid transport: the frozen bytes POSTed unchanged over kept-alive connections.

The official SDK gives what it is right about: the request it would make (its URL for mail
send, and its headers: ``Authorization: Bearer``, ``User-Agent``, ``Accept``). Its HTTP client
(``python_http_client``) is not fit for a bulk send: it builds a ``urllib`` opener for every
request and urllib sends ``Connection: close``, so every request paid a new TCP connection and,
over HTTPS, a new TLS context (≈17 ms with a realistic CA bundle) and handshake. So the bytes go
through a pool of ``http.client`` connections kept open between requests, one pool per transport
(one transport per shard), every connection using one TLS context built when the transport is
made; the shard's window of requests in flight (``Transport.max_in_flight``) uses one
connection per request at a time.

A failure says what the provider may have got, for the outbox:

- no connection (refused, unresolvable, timed out, TLS handshake or certificate refused) or the
  request not completely written: the provider has no complete request, so it is ``retryable``
  and cannot duplicate;
- the request written and the answer lost (dropped, reset, timed out): ``outcome_unknown``, as
  the provider may have accepted it; it is never resent here;
- an answer: 429 and 5xx ``retryable`` with ``retry_after`` from ``Retry-After`` (or
  ``X-RateLimit-Reset``), any other non-2xx fails, and a 200/202 without ``X-Message-Id`` too.

A kept-alive connection the server has closed while it was idle is noticed before reuse (it
reads as ready: end of stream) and replaced, so an idle period does not turn the next request's
answer into a lost one.
"""

from __future__ import annotations

import http.client
import logging
import select
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from mailroom.addresses import mask_addresses
from mailroom.checks.envelope_guard import GuardedBody
from mailroom.delivery.transports.base import Delivery, Transport
from mailroom.errors import TransportError

DEFAULT_HOST = "https://api.sendgrid.com"
DEFAULT_TIMEOUT_SECONDS = 30.0
# The most requests one transport carries at once (a campaign's ``max_in_flight`` is capped at
# this); also how many idle connections its pool keeps.
MAX_IN_FLIGHT = 32
# Not the SDK's plain "application/json": the bytes on the wire are the bytes the guard checked
# and the approver approved, UTF-8 as frozen.
_CONTENT_TYPE = "application/json; charset=utf-8"

# The SDK's HTTP client logs whole request bodies (every address) at DEBUG.
logging.getLogger("python_http_client").setLevel(logging.WARNING)


@dataclass(frozen=True)
class SendGridSettings:
    api_key: str
    host: str = DEFAULT_HOST
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    # A PEM file of the certificates to trust for an https host, instead of the system's (a
    # private CA, or the dev server's own with ``--tls``).
    ca_bundle: str | None = None

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
        if self.ca_bundle is not None:
            _tls_context(self.ca_bundle)  # a file that is not there or holds no certificate

    def __repr__(self) -> str:
        bundle = f", ca_bundle={self.ca_bundle!r}" if self.ca_bundle else ""
        return (
            f"SendGridSettings(host={self.host!r}, timeout_seconds={self.timeout_seconds}{bundle})"
        )


class SendGridTransport(Transport):
    name = "sendgrid"
    max_in_flight = MAX_IN_FLIGHT

    def __init__(self, settings: SendGridSettings) -> None:
        from sendgrid import SendGridAPIClient

        self.settings = settings
        sdk = SendGridAPIClient(settings.api_key, host=settings.host.rstrip("/"))
        # The URL and headers the SDK's ``client.mail.send.post`` would use.
        url = urlsplit(sdk.client.mail.send._build_url(None))
        self._path = url.path
        self._headers = {**sdk.client.request_headers, "Content-Type": _CONTENT_TYPE}
        self._pool = _ConnectionPool(
            url,
            settings.timeout_seconds,
            _tls_context(settings.ca_bundle) if url.scheme == "https" else None,
            MAX_IN_FLIGHT,
        )

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        pool = self._pool
        try:
            conn = pool.take()
        except OSError as exc:
            raise TransportError(
                f"SendGrid unreachable at {self.settings.host}: {_reason(exc)}", retryable=True
            ) from None
        try:
            try:
                conn.request("POST", self._path, body=guarded.body, headers=self._headers)
            except (OSError, http.client.HTTPException) as exc:
                # Not completely written: the provider has no complete request to accept.
                raise TransportError(
                    f"SendGrid unreachable at {self.settings.host}: the request could not be "
                    f"written ({_reason(exc)})",
                    retryable=True,
                ) from None
            try:
                response = conn.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as exc:
                # The request was sent and the answer was lost: it may have been accepted.
                raise TransportError(
                    f"SendGrid answer lost after the request was sent: {type(exc).__name__}",
                    outcome_unknown=True,
                ) from None
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            pool.give_back(conn)
        status = response.status
        if status >= 400:
            raise _http_failure(status, response.headers, answer)
        if status not in (200, 202):
            raise TransportError(f"SendGrid answered {status}", status=status)
        message_id = response.headers.get("X-Message-Id") or ""
        if not message_id:
            raise TransportError(
                f"SendGrid answered {status} without an X-Message-Id", status=status
            )
        return Delivery(message_id=message_id, status=status)

    def close(self) -> None:
        self._pool.close()


class _ConnectionPool:
    """Kept-alive connections to one host, each carrying one request at a time; an idle one is
    reused (the most recently used first), a new one made when none is idle."""

    def __init__(
        self, url: SplitResult, timeout: float, context: ssl.SSLContext | None, keep: int
    ) -> None:
        self._host = url.hostname or ""
        self._port = url.port
        self._timeout = timeout
        self._context = context
        self._keep = keep
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> http.client.HTTPConnection:
        """An open connection; raises OSError when a new one cannot be made (nothing sent)."""
        with self._lock:
            while self._idle:
                idle = self._idle.pop()
                if not _dropped(idle):
                    return idle
                idle.close()
        conn: http.client.HTTPConnection
        if self._context is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        else:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._context
            )
        try:
            conn.connect()  # here, so that failing to connect is told apart from the request
        except BaseException:
            conn.close()
            raise
        return conn

    def give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._keep:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection is unusable: closed, or readable (the server
    closed it, or sent something unasked), which an idle HTTP/1.1 connection never is."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """One client TLS context for every connection of a transport: the system's certificates,
    or only those of ``ca_bundle``; hostnames checked."""
    if ca_bundle is None:
        return ssl.create_default_context()
    if not Path(ca_bundle).is_file():
        raise TransportError(f"the SendGrid CA bundle {ca_bundle!r} is not a file")
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TransportError(
            f"the SendGrid CA bundle {ca_bundle!r} holds no usable certificate: {_reason(exc)}"
        ) from None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


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
