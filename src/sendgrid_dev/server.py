"""A local stand-in for ``https://api.sendgrid.com`` that records what a client sent.

It speaks enough of the v3 mail-send API for the official SDK and the pipeline to talk to it
unchanged, answers the way SendGrid documents (202, 400, 401, 413, sandbox 200), checks every
body against SendGrid's published OpenAPI document and documented rules (``validation.py``), and
can be told to fail on purpose. It needs only the standard library and ``jsonschema`` (one of
Mailroom's own dependencies) so it can start anywhere the pipeline runs; HTTP/1.1 keep-alive with an
exact Content-Length on every answer lets one client connection carry thousands of requests.

It can also stand in for the network between: ``tls=True`` serves HTTPS with a certificate made
at start (``tls.py``; clients trust ``ca_file``), and ``latency_ms`` adds one network round trip
of that many milliseconds where a real link has one: to every answer, to every new connection
(TCP's handshake) and, with TLS, once more to its handshake (TLS 1.3). A client that opens a
connection per request pays all three on every request; one that keeps its connections open
pays one. ``stats().peak_in_flight`` says how many mail-send requests it answered at once.
"""

import contextlib
import hmac
import html
import json
import logging
import selectors
import shutil
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qs, unquote, urlsplit

from mailroom.checks.limits import MAX_REQUEST_BYTES
from sendgrid_dev.errors import DevServerError
from sendgrid_dev.faults import (
    HOLD_SECONDS,
    SERVER_ERROR_STATUSES,
    Faults,
    InjectedFault,
    RateCeiling,
    drop_due,
    scheduled_fault,
)
from sendgrid_dev.rendering import render_personalization
from sendgrid_dev.schema import mail_send_is_valid, mail_send_validator
from sendgrid_dev.store import AcceptedRecord, MessageStore, open_store
from sendgrid_dev.tls import make_certificate
from sendgrid_dev.validation import (
    count_recipients,
    is_sandbox,
    iter_recipient_addresses,
    validate_mail_send,
)

MAIL_SEND_PATH = "/v3/mail/send"
# An idle keep-alive connection holds a thread; this bounds how long a vanished client keeps it.
IDLE_CONNECTION_TIMEOUT_SECONDS = 30.0
# How long stop() lets requests already being answered finish before closing the store.
STOP_GRACE_SECONDS = 5.0
# Bodies of the /_dev endpoints are small JSON; anything bigger is a mistake.
MAX_DEV_REQUEST_BYTES = 1_000_000
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000
HOME_PAGE_RECENT = 50
# What X-RateLimit-Limit reports for an injected 429 when no ceiling is set: SendGrid's
# documented default per-endpoint limit is 600 requests a minute.
REPORTED_RATE_LIMIT = 600

logger = logging.getLogger("sendgrid_dev")


@dataclass(slots=True)
class DevServerStats:
    """Counts of mail-send requests by outcome. ``accepted`` includes the ones whose answer was
    then dropped on purpose, because SendGrid would have sent those."""

    received: int = 0
    accepted: int = 0
    accepted_personalizations: int = 0
    accepted_recipients: int = 0
    rejected: int = 0
    unauthorized: int = 0
    sandbox: int = 0
    rate_limited: int = 0
    status_429_injected: int = 0
    status_5xx_injected: int = 0
    dropped_after_accept: int = 0
    delayed: int = 0
    # The most mail-send requests being answered at once (read to the answer's end).
    peak_in_flight: int = 0
    # Client connections opened (a client keeping its connections open opens few).
    connections: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


_CountedOutcome = Literal[
    "rejected",
    "unauthorized",
    "sandbox",
    "rate_limited",
    "status_429_injected",
    "dropped_after_accept",
    "delayed",
]


class _TrafficState:
    """Counters, fault settings and rate ceiling shared by every handler thread."""

    def __init__(self, faults: Faults, log_every: int) -> None:
        self._lock = threading.Lock()
        self._in_flight_changed = threading.Condition(self._lock)
        self._in_flight = 0
        self._stats = DevServerStats()
        self._faults = faults
        self._ceiling = self._ceiling_for(faults)
        self._server_errors = 0
        self._log_every = log_every

    @staticmethod
    def _ceiling_for(faults: Faults) -> RateCeiling | None:
        return (
            RateCeiling(faults.max_requests_per_second) if faults.max_requests_per_second else None
        )

    def begin(self) -> tuple[int, Faults, RateCeiling | None]:
        """The request's 1-based sequence number and the settings it is answered under."""
        with self._lock:
            self._stats.received += 1
            return self._stats.received, self._faults, self._ceiling

    def count_connection(self) -> None:
        with self._lock:
            self._stats.connections += 1

    def enter(self) -> None:
        """A mail-send request is being answered."""
        with self._lock:
            self._in_flight += 1
            self._stats.peak_in_flight = max(self._stats.peak_in_flight, self._in_flight)
            self._in_flight_changed.notify_all()

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def hold(self, until_in_flight: int) -> None:
        """Wait until ``until_in_flight`` requests have been answered at once (or HOLD_SECONDS
        have passed)."""
        with self._lock:
            self._in_flight_changed.wait_for(
                lambda: self._stats.peak_in_flight >= until_in_flight, HOLD_SECONDS
            )

    def count(self, outcome: _CountedOutcome) -> None:
        with self._lock:
            setattr(self._stats, outcome, getattr(self._stats, outcome) + 1)

    def count_accepted(self, personalizations: int, recipients: int) -> None:
        with self._lock:
            self._stats.accepted += 1
            self._stats.accepted_personalizations += personalizations
            self._stats.accepted_recipients += recipients

    def next_server_error_status(self) -> int:
        with self._lock:
            self._stats.status_5xx_injected += 1
            status = SERVER_ERROR_STATUSES[self._server_errors % len(SERVER_ERROR_STATUSES)]
            self._server_errors += 1
            return status

    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults
            self._ceiling = self._ceiling_for(faults)

    def snapshot(self) -> DevServerStats:
        with self._lock:
            return replace(self._stats)

    def reset(self) -> None:
        with self._lock:
            self._stats = DevServerStats(peak_in_flight=self._in_flight)
            self._server_errors = 0
            self._ceiling = self._ceiling_for(self._faults)

    def log_progress(self, sequence: int) -> None:
        """One line per ``log_every`` requests, counts only: logs must never carry addresses."""
        if not self._log_every or sequence % self._log_every:
            return
        stats = self.snapshot()
        logger.info(
            "mail-send requests=%d accepted=%d recipients=%d rejected=%d unauthorized=%d"
            " sandbox=%d rate_limited=%d injected_429=%d injected_5xx=%d dropped=%d",
            stats.received,
            stats.accepted,
            stats.accepted_recipients,
            stats.rejected,
            stats.unauthorized,
            stats.sandbox,
            stats.rate_limited,
            stats.status_429_injected,
            stats.status_5xx_injected,
            stats.dropped_after_accept,
        )


@dataclass
class _App:
    traffic: _TrafficState
    store: MessageStore
    api_key: str | None
    # One network round trip, in seconds (0: none added).
    latency: float = 0.0


def _error_body(message: str, field: str | None = None) -> dict[str, Any]:
    return {"errors": [{"message": message, "field": field, "help": None}]}


def _utf8_text(raw: bytes) -> str | None:
    """``raw`` decoded, when ``json.loads(raw)`` would decode it as plain UTF-8 and it is that:
    ``json.loads`` then parses this text to the same value (it decodes with surrogatepass, which
    only matters for bytes that are not UTF-8), and the store need not decode the bytes again.
    None for anything else (a BOM, UTF-16 or UTF-32, bytes that are not UTF-8), which
    ``json.loads`` is given as bytes, as always."""
    if json.detect_encoding(raw) != "utf-8":
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mailroom-sendgrid-dev"
    sys_version = ""
    # Headers and body are written separately; without this, Nagle plus delayed ACKs add ~40 ms
    # to every keep-alive request.
    disable_nagle_algorithm = True
    timeout = IDLE_CONNECTION_TIMEOUT_SECONDS
    _responded: bool = False

    @property
    def app(self) -> _App:
        assert isinstance(self.server, _DevHTTPServer)
        return self.server.app

    def setup(self) -> None:
        super().setup()
        assert isinstance(self.server, _DevHTTPServer)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            assert isinstance(self.server, _DevHTTPServer)
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # -- plumbing ---------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self._responded = False
        path = urlsplit(self.path).path
        if self.app.latency:
            time.sleep(self.app.latency)  # the request's round trip
        try:
            if path == MAIL_SEND_PATH and method == "POST":
                self._mail_send()
                return
            body = self._read_dev_body()
            if body is None:
                return
            self._route(method, path, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            logger.exception("unexpected error answering %s %s", method, path)
            self.close_connection = True
            if not self._responded:
                self._send_json(500, _error_body("internal server error"))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._responded = True
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_json(
        self, status: int, payload: object, headers: dict[str, str] | None = None
    ) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _content_length(self) -> int | None:
        """The declared body length; None (and the connection marked for closing) if the body
        cannot be delimited, since its unread bytes would corrupt the next request."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return None
        return length

    def _read_exactly(self, length: int) -> bytes | None:
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            return None
        return data

    def _read_dev_body(self) -> bytes | None:
        length = self._content_length()
        if length is None:
            self._send_json(411, _error_body("a valid Content-Length header is required"))
            return None
        if length > MAX_DEV_REQUEST_BYTES:
            self.close_connection = True
            self._send_json(413, _error_body("content too large"))
            return None
        return self._read_exactly(length)

    # -- /v3/mail/send ----------------------------------------------------------------------

    def _mail_send(self) -> None:
        traffic = self.app.traffic
        sequence, faults, ceiling = traffic.begin()
        traffic.enter()
        try:
            self._answer_mail_send(sequence, faults, ceiling)
        finally:
            traffic.leave()
            traffic.log_progress(sequence)

    def _answer_mail_send(self, sequence: int, faults: Faults, ceiling: RateCeiling | None) -> None:
        traffic = self.app.traffic
        length = self._content_length()
        if length is None:
            traffic.count("rejected")
            self._send_json(411, _error_body("a valid Content-Length header is required"))
            return
        if length >= MAX_REQUEST_BYTES:
            traffic.count("rejected")
            self.close_connection = True
            self._send_json(413, _error_body("content too large"))
            return
        raw = self._read_exactly(length)
        if raw is None:
            return
        if faults.hold_until_in_flight:
            traffic.hold(faults.hold_until_in_flight)
        if faults.delay_seconds:
            traffic.count("delayed")
            time.sleep(faults.delay_seconds)

        auth_error = self._auth_error()
        if auth_error is not None:
            traffic.count("unauthorized")
            self._send_json(401, _error_body(auth_error))
            return

        if ceiling is not None:
            wait = ceiling.admit()
            if wait is not None:
                traffic.count("rate_limited")
                self._send_too_many_requests(wait, int(ceiling.rate) or 1)
                return
        fault = scheduled_fault(sequence, faults)
        if fault is InjectedFault.STATUS_429:
            traffic.count("status_429_injected")
            limit = int(faults.max_requests_per_second) or REPORTED_RATE_LIMIT
            self._send_too_many_requests(faults.retry_after_seconds, limit)
            return
        if fault is InjectedFault.STATUS_5XX:
            self._send_json(
                traffic.next_server_error_status(), _error_body("internal server error")
            )
            return

        text = _utf8_text(raw)
        try:
            body = json.loads(raw if text is None else text)
        except (ValueError, RecursionError):
            traffic.count("rejected")
            self._send_json(400, _error_body("Bad Request: the body is not valid JSON"))
            return
        errors = validate_mail_send(body)
        if errors:
            traffic.count("rejected")
            self._send_json(400, {"errors": [error.to_json() for error in errors]})
            return
        if is_sandbox(body):
            traffic.count("sandbox")
            self._send(200)
            return

        record = self.app.store.append(body, len(raw), raw, utf8=text is not None)
        traffic.count_accepted(len(body["personalizations"]), count_recipients(body))
        if drop_due(sequence, faults):
            traffic.count("dropped_after_accept")
            self.close_connection = True
            self._responded = True
            return
        self._send(202, headers={"X-Message-Id": record["message_id"]})

    def _auth_error(self) -> str | None:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "authorization required"
        expected = self.app.api_key
        if expected is not None and not hmac.compare_digest(token.encode(), expected.encode()):
            return "The provided authorization grant is invalid, expired, or revoked"
        return None

    def _send_too_many_requests(self, retry_after: int, limit: int) -> None:
        self._send_json(
            429,
            _error_body("too many requests"),
            headers={
                "Retry-After": str(retry_after),
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(time.time()) + retry_after),
            },
        )

    # -- /_dev and / ------------------------------------------------------------------------

    def _route(self, method: str, path: str, body: bytes) -> None:
        app = self.app
        if path == MAIL_SEND_PATH:
            self._send_json(405, _error_body("method not allowed"), headers={"Allow": "POST"})
        elif method == "GET" and path == "/":
            self._send(200, self._home_page().encode(), "text/html; charset=utf-8")
        elif method == "GET" and path == "/_dev/health":
            self._send_json(200, {"ok": True})
        elif method == "GET" and path == "/_dev/stats":
            self._send_json(200, app.traffic.snapshot().to_json())
        elif path == "/_dev/faults" and method == "GET":
            self._send_json(200, app.traffic.faults.to_json())
        elif path == "/_dev/faults" and method == "PUT":
            self._put_faults(body)
        elif path == "/_dev/messages" and method == "GET":
            self._list_messages()
        elif path == "/_dev/messages" and method == "DELETE":
            app.store.clear()
            app.traffic.reset()
            self._send_json(200, {"ok": True})
        elif method == "GET" and path.startswith("/_dev/messages/"):
            self._get_message(path.removeprefix("/_dev/messages/").split("/"))
        else:
            self._send_json(404, _error_body("not found"))

    def _put_faults(self, body: bytes) -> None:
        traffic = self.app.traffic
        try:
            faults = traffic.faults.with_changes(json.loads(body or b"null"))
        except (ValueError, TypeError, DevServerError) as error:
            message = str(error) if isinstance(error, DevServerError) else "body must be JSON"
            self._send_json(400, _error_body(message))
            return
        traffic.set_faults(faults)
        logger.info("faults set to %s", faults.to_json())
        self._send_json(200, faults.to_json())

    def _list_messages(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        try:
            offset = int(query.get("offset", ["0"])[0])
            limit = int(query.get("limit", [str(DEFAULT_PAGE_LIMIT)])[0])
        except ValueError:
            offset = limit = -1
        if offset < 0 or not 0 < limit <= MAX_PAGE_LIMIT:
            self._send_json(
                400, _error_body(f"offset must be >= 0 and limit in 1..{MAX_PAGE_LIMIT}")
            )
            return
        store = self.app.store
        self._send_json(
            200, {"total": store.count(), "offset": offset, "messages": store.page(offset, limit)}
        )

    def _get_message(self, parts: list[str]) -> None:
        record = self.app.store.get(unquote(parts[0]))
        if record is None or len(parts) > 2:
            self._send_json(404, _error_body("not found"))
            return
        if len(parts) == 1:
            self._send_json(200, record)
            return
        try:
            rendered = render_personalization(record, int(parts[1]))
        except (ValueError, IndexError):
            self._send_json(404, _error_body("no such personalization"))
            return
        self._send_json(200, rendered)

    def _home_page(self) -> str:
        app = self.app
        stats = app.traffic.snapshot().to_json()
        total = app.store.count()
        recent = app.store.page(max(0, total - HOME_PAGE_RECENT), HOME_PAGE_RECENT)
        stat_rows = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{value}</td></tr>"
            for name, value in stats.items()
        )
        message_rows = "".join(_home_page_row(record) for record in reversed(recent))
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            "<title>Mailroom SendGrid dev server</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
            "</head><body><h1>Mailroom SendGrid dev server</h1>"
            f"<table>{stat_rows}</table>"
            f"<h2>Latest {len(recent)} of {total} recorded requests (newest first)</h2>"
            "<table><tr><th>received</th><th>message id</th><th>personalizations</th>"
            "<th>recipients</th><th>first recipient</th><th>subject</th></tr>"
            f"{message_rows}</table></body></html>"
        )


def _home_page_row(record: AcceptedRecord) -> str:
    body = record["body"]
    personalizations = body["personalizations"]
    recipients = list(iter_recipient_addresses(body))
    subject = body.get("subject") or personalizations[0].get("subject") or ""
    message_id = html.escape(record["message_id"])
    cells = (
        html.escape(record["received_at"]),
        f"<a href='/_dev/messages/{message_id}/0'>{message_id}</a>",
        str(len(personalizations)),
        str(len(recipients)),
        html.escape(recipients[0] if recipients else ""),
        html.escape(str(subject)),
    )
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


class _DevHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops SYNs when a bulk client opens many connections at once.
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], app: _App, tls: ssl.SSLContext | None = None
    ) -> None:
        self.app = app
        self.tls = tls
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._connections: set[socket.socket] = set()
        self._connections_changed = threading.Condition()
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(address, _RequestHandler)

    def serve_until_woken(self) -> None:
        """Accept connections until ``wake``; unlike ``serve_forever`` it never polls, so an
        idle server costs nothing and stopping is immediate."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_reader in ready:
                    return
                self.handle_request()

    def wake(self) -> None:
        self._wake_writer.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup of the host, which can stall startup.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """One connection, in its own thread: the round trips of its handshakes (TCP's, and
        TLS 1.3's), the TLS handshake itself, then its requests."""
        latency = self.app.latency
        if self.tls is None:
            if latency:
                time.sleep(latency)
            super().finish_request(request, client_address)
            return
        if latency:
            time.sleep(2 * latency)
        request.settimeout(IDLE_CONNECTION_TIMEOUT_SECONDS)
        try:
            secure = self.tls.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError too: a client that does not trust the certificate
            logger.debug("TLS handshake with %s failed", client_address, exc_info=True)
            return
        try:
            super().finish_request(secure, client_address)
        finally:
            secure.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)

    def track(self, connection: socket.socket) -> None:
        self.app.traffic.count_connection()
        with self._connections_changed:
            self._connections.add(connection)

    def open_connections(self) -> int:
        with self._connections_changed:
            return len(self._connections)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_changed:
            self._connections.discard(connection)
            self._connections_changed.notify_all()

    def drop_connections(self, grace_seconds: float) -> None:
        with self._connections_changed:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._connections_changed.wait_for(lambda: not self._connections, grace_seconds)

    def close_connections(self, grace_seconds: float) -> None:
        """Let requests already read be answered, end idle keep-alive connections, and wait for
        their threads, so nothing is appended to the store after it is closed."""
        with self._connections_changed:
            for connection in self._connections:
                # Only the read side: a handler blocked waiting for the next request sees end
                # of stream, one still answering can finish writing.
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
            self._connections_changed.wait_for(lambda: not self._connections, grace_seconds)


class SendGridDevServer:
    """A SendGrid mail-send stand-in serving from a background thread.

    ``data_dir`` makes accepted requests durable in ``<data_dir>/accepted.jsonl`` (readable by
    another process with ``read_accepted``); without it they live in memory only. ``api_key``,
    when given, is the only bearer token accepted; otherwise any non-empty one is.

    ``tls``: serve HTTPS with a certificate made at start for ``host``, the loopback names and
    ``tls_names``; what a client must trust is written to ``ca_file`` (by default a file of the
    server's own, removed at stop). ``latency_ms``: one network round trip added to every
    answer and to every connection's handshakes (see the module's docstring).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: Path | None = None,
        api_key: str | None = None,
        faults: Faults | None = None,
        *,
        log_every: int = 0,
        tls: bool = False,
        tls_names: tuple[str, ...] = (),
        ca_file: Path | None = None,
        latency_ms: float = 0.0,
    ) -> None:
        if not latency_ms >= 0 or latency_ms == float("inf"):
            raise DevServerError(f"latency_ms must be a number >= 0, got {latency_ms!r}")
        self._tls = tls
        self._tls_names = tls_names
        self._ca_file = None if ca_file is None else Path(ca_file)
        self._ca_pem: bytes | None = None
        self._own_tls_dir: Path | None = None
        self._latency = latency_ms / 1000
        self._host = host
        self._requested_port = port
        self._data_dir = None if data_dir is None else Path(data_dir)
        self._api_key = api_key
        self._traffic = _TrafficState(faults or Faults(), log_every)
        self._store: MessageStore | None = None
        self._httpd: _DevHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._httpd is not None:
            raise DevServerError("this dev server was already started")
        # Compiled before the port is bound, once per process: a missing or unreadable OpenAPI
        # document stops the start, and no request waits for it.
        mail_send_validator()
        mail_send_is_valid()
        context = self._make_tls() if self._tls else None
        self._store = open_store(self._data_dir)
        app = _App(self._traffic, self._store, self._api_key, self._latency)
        try:
            self._httpd = _DevHTTPServer((self._host, self._requested_port), app, context)
        except OSError:
            self._store.close()
            self._remove_own_tls_dir()
            raise
        self._thread = threading.Thread(
            target=self._httpd.serve_until_woken,
            name="sendgrid-dev-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.wake()
        thread.join()
        httpd.close_connections(STOP_GRACE_SECONDS)
        httpd.server_close()
        assert self._store is not None
        self._store.close()
        self._thread = None
        self._remove_own_tls_dir()

    def _make_tls(self) -> ssl.SSLContext:
        """A new certificate, its authority's PEM written to ``ca_file``."""
        unspecified = self._host in ("", "0.0.0.0", "::")
        names = (() if unspecified else (self._host,)) + tuple(self._tls_names)
        certificate = make_certificate(names[0] if names else "localhost", names[1:])
        if self._ca_file is None:
            self._own_tls_dir = Path(tempfile.mkdtemp(prefix="sendgrid-dev-tls-"))
            self._ca_file = self._own_tls_dir / "ca.pem"
        self._ca_file.parent.mkdir(parents=True, exist_ok=True)
        self._ca_file.write_bytes(certificate.ca_pem)
        self._ca_pem = certificate.ca_pem
        return certificate.server_context()

    def _remove_own_tls_dir(self) -> None:
        if self._own_tls_dir is not None:
            shutil.rmtree(self._own_tls_dir, ignore_errors=True)
            self._own_tls_dir = None

    def __enter__(self) -> Self:
        return self if self._httpd is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise DevServerError("the dev server has no port until it is started")
        return self._httpd.server_port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The PEM file a client trusts to reach this server over HTTPS (``tls=True``)."""
        if self._ca_file is None or self._ca_pem is None:
            raise DevServerError("the dev server has no certificate: start it with tls=True")
        return self._ca_file

    @property
    def ca_pem(self) -> bytes:
        if self._ca_pem is None:
            raise DevServerError("the dev server has no certificate: start it with tls=True")
        return self._ca_pem

    @property
    def faults(self) -> Faults:
        return self._traffic.faults

    def set_faults(self, faults: Faults) -> None:
        self._traffic.set_faults(faults)

    def stats(self) -> DevServerStats:
        return self._traffic.snapshot()

    def open_connections(self) -> int:
        """Client connections open now (idle kept-alive ones too)."""
        return self._httpd.open_connections() if self._httpd is not None else 0

    def drop_connections(self) -> None:
        """Close every client connection now, as a server's idle timeout or a restart does (a
        request being answered on one loses its answer); returns once they are closed."""
        if self._httpd is not None:
            self._httpd.drop_connections(STOP_GRACE_SECONDS)

    def accepted(self) -> list[AcceptedRecord]:
        """Every recorded request, oldest first; still readable after ``stop``."""
        store = self._require_store()
        return store.page(0, store.count())

    def rendered(self, message_id: str, personalization_index: int) -> dict[str, Any]:
        """What ``GET /_dev/messages/<id>/<index>`` answers; KeyError for an unknown id."""
        record = self._require_store().get(message_id)
        if record is None:
            raise KeyError(message_id)
        return render_personalization(record, personalization_index)

    def reset(self) -> None:
        """Forget every recorded request and zero the stats, as ``DELETE /_dev/messages`` does."""
        self._require_store().clear()
        self._traffic.reset()

    def _require_store(self) -> MessageStore:
        if self._store is None:
            raise DevServerError("the dev server has recorded nothing because it was not started")
        return self._store
