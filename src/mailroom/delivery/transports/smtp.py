"""The SMTP transport: one message per recipient, several kept-open connections per shard.

A frozen SendGrid request body (one locale's content and up to 1,000 personalizations) becomes
one SMTP transaction per personalization: ``MAIL FROM`` the sender, exactly one ``RCPT TO`` (the
personalization's one address), and a MIME message (multipart/alternative text + HTML) with that
personalization's substitutions applied the way SendGrid applies its legacy substitutions, its
own headers (``List-Unsubscribe``, ``List-Unsubscribe-Post``) and a Message-ID. The messages of
one body are spliced from what they share, made once (``mime.MessageTemplate``): the same bytes
as the reference builder, which property tests hold it to.

Two guards stand before the bytes leave. ``Transport.send`` has already run the envelope guard on
the request body; here every message is checked again on its exact bytes (``mime.MimeGuard``: one
RCPT, ``To:`` holding exactly that address, no Cc/Bcc, no header line over the RFC limit, no
header that was not set, i.e. no CR/LF injection) and those very bytes go out. Before that,
``preflight`` builds and checks every message of a body and keeps none: ``send_shard`` runs it on
every batch of its shard before the shard's first message leaves, so a message that would be
refused anywhere in the shard (its last batch's last recipient) stops the shard with nothing
sent. Sent without a preflight (``Transport.send`` on its own), all messages of the batch are
built and checked before its first leaves.

Recipients are recorded in chunks (``SmtpSettings.chunk_size``, default 100): one transaction
marks a chunk's recipients ``sending``, then its messages go out, spread over the shard's
connections (``Transport.in_flight``, the campaign's ``max_in_flight``), each connection sending
its share in order with ``MAIL``/``RCPT``/``DATA`` in one write where the server offers
``PIPELINING`` (RFC 2920), and one transaction records the chunk's outcomes. The connections
are driven from one thread without blocking: each one's next step is taken as soon as its
answer is in, and while no answer is in, the next chunk is made (threads, one per connection,
spent more on handing Python's interpreter lock back and forth than they saved). A worker killed
at any point leaves at most that one chunk ``sending`` (then ``unknown``: never resent
automatically, the operator settles it); everything recorded before it stays as recorded.

A 4xx reply is retryable (its message and the rest of its connection's share go back to not
sent, the batch is retried from there), a 5xx to a recipient fails that recipient only, a
connection lost after the message's final ``.`` makes that one message ``unknown`` (never resent
automatically), a refused connection is retryable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import select
import smtplib
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import make_msgid
from typing import Any, TypeVar

from mailroom.addresses import is_valid_single_address, mask, mask_addresses
from mailroom.checks.envelope_guard import GuardedBody
from mailroom.delivery.outbox import BatchState, RecipientOutcome
from mailroom.delivery.transports.base import (
    Delivery,
    MemoryLedger,
    RecipientLedger,
    Transport,
)
from mailroom.delivery.transports.mime import (
    MESSAGE_POLICY,
    MessageBuilder,
    MessageTemplate,
    MimeGuard,
    TemplateSeed,
)
from mailroom.errors import EnvelopeViolation, SendHalted, TransportError

log = logging.getLogger(__name__)

SECURITY_MODES = ("starttls", "tls", "none")
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
DEFAULT_TIMEOUT_SECONDS = 30.0
# Recipients recorded per outbox transaction; a crash leaves at most this many 'unknown'.
DEFAULT_CHUNK_SIZE = 100
MAX_CHUNK_SIZE = 5_000
# The most connections one transport keeps (a campaign's max_in_flight is capped at this).
MAX_CONNECTIONS = 32
# Messages in a row whose answer was lost after DATA before the batch stops (the server or the
# network is failing: going on would only make more recipients 'unknown').
MAX_UNKNOWN_IN_A_ROW = 3
# The longest answer line read (smtplib's own limit).
_MAX_REPLY_LINE = 8192


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to connect. ``security``: ``starttls`` (upgrade a plain connection, refuse
    to go on without it), ``tls`` (TLS from the first byte, "SMTPS") or ``none``."""

    host: str
    port: int = 587
    username: str | None = None
    password: str | None = None
    security: str = "starttls"
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    local_hostname: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if not self.host:
            raise TransportError("no SMTP host configured")
        if self.security not in SECURITY_MODES:
            raise TransportError(
                f"SMTP security {self.security!r} is not one of {', '.join(SECURITY_MODES)}"
            )
        if not 0 < int(self.port) < 65536:
            raise TransportError(f"SMTP port {self.port} is not a port")
        if self.timeout_seconds <= 0:
            raise TransportError("the SMTP timeout must be positive")
        if not 1 <= int(self.chunk_size) <= MAX_CHUNK_SIZE:
            raise TransportError(
                f"the SMTP chunk size must be 1 to {MAX_CHUNK_SIZE}, got {self.chunk_size}"
            )

    def __repr__(self) -> str:
        return (
            f"SmtpSettings(host={self.host!r}, port={self.port}, username={self.username!r}, "
            f"security={self.security!r}, timeout_seconds={self.timeout_seconds}, "
            f"local_hostname={self.local_hostname!r}, chunk_size={self.chunk_size})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class GuardedMessage:
    """One message whose exact bytes passed ``check_mime_message``, and its envelope."""

    mail_from: str
    rcpt: str
    data: bytes
    message_id: str


class SmtpTransport(Transport):
    """One SMTP transaction per recipient, over up to ``in_flight`` connections kept open across
    messages and batches (each opened again when the server closes it)."""

    name = "smtp"
    delivers_per_recipient = True
    max_in_flight = MAX_CONNECTIONS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guarded = {"preflight", "_deliver", "_deliver_each", "_guarded_message", "_send_one"}
        if overridden := sorted(guarded.intersection(cls.__dict__)):
            raise TypeError(f"{cls.__name__} must not override {overridden}: the MIME guard")

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        ssl_context: ssl.SSLContext | None = None,
        build_message: MessageBuilder | None = None,
    ) -> None:
        """``build_message``: make each message with this builder (``build_mime_message``'s
        signature) instead of splicing it from the body's template; the guard is the same."""
        self.settings = settings
        self._ssl_context = ssl_context
        self._build_message = build_message
        self._conns: dict[int, _Connection] = {}
        self._guard = MimeGuard()
        # Per body this transport has made messages of: how to make them again the same (its
        # template's date, boundary and Message-IDs), and the SHA-256 of each message the MIME
        # guard cleared, by personalization. A message about to leave that has a cleared
        # digest is the very message the guard passed: it is not parsed again; any other bytes
        # are refused. (A transport given its own builder cannot make the same bytes twice: its
        # messages are guarded again as they leave.)
        self._seeds: dict[str, TemplateSeed] = {}
        self._cleared: dict[str, list[bytes | None]] = {}
        if settings.security == "none" and settings.username:
            log.warning("SMTP to %s: authenticating without TLS", settings.host)

    # the batch --------------------------------------------------------------------------------
    def preflight(self, guarded: GuardedBody) -> None:
        """Build, serialise and check (the MIME guard) the message of every personalization of
        the body, as ``send`` would, one at a time, keeping only each one's SHA-256; send
        nothing. Raises ``EnvelopeViolation`` for the first message that would be refused."""
        body = json.loads(guarded.body)
        recipients = _recipients(guarded, body)
        self._clear(guarded.sha256, body, list(enumerate(recipients)))

    def _clear(
        self, body_sha256: str, body: Mapping[str, Any], todo: Sequence[tuple[int, str]]
    ) -> None:
        """The MIME guard on the message of each (index, recipient), before any leaves; their
        digests are kept."""
        make = self._maker(body_sha256, body)
        cleared = self._cleared.setdefault(body_sha256, [None] * len(body["personalizations"]))
        for index, email in todo:
            message = self._guarded_message(make, index, email, None)
            cleared[index] = hashlib.sha256(message.data).digest()

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        return self._deliver_each(guarded, MemoryLedger())

    def _deliver_each(self, guarded: GuardedBody, ledger: RecipientLedger) -> Delivery:
        body = json.loads(guarded.body)
        recipients = _recipients(guarded, body)
        batch = guarded.sha256[:12]
        settled = {k.lower() for k in ledger.settled()}
        todo = [(i, email) for i, email in enumerate(recipients) if email.lower() not in settled]
        # Every message of this pass passes the MIME guard before the first one leaves (done
        # already when this body went through ``preflight``).
        cleared = self._cleared.get(guarded.sha256)
        if cleared is None or any(cleared[i] is None for i, _ in todo):
            self._clear(guarded.sha256, body, todo)
            cleared = self._cleared[guarded.sha256]
        make = self._maker(guarded.sha256, body)
        reproducible = self._build_message is None
        counts: Counter[str] = Counter()
        unknown_in_a_row = 0

        def record(outcomes: list[RecipientOutcome], error: TransportError | None) -> None:
            nonlocal unknown_in_a_row
            ledger.finish(outcomes)
            for outcome in outcomes:
                if outcome.state is None:
                    continue
                counts[outcome.state] += 1
                if outcome.state != BatchState.SENT:
                    log.warning(
                        "request %s: %s %s: %s",
                        batch,
                        mask(outcome.email),
                        outcome.state,
                        outcome.error,
                    )
                unknown = outcome.state == BatchState.UNKNOWN
                unknown_in_a_row = unknown_in_a_row + 1 if unknown else 0
            if error is not None:
                raise error
            if unknown_in_a_row >= MAX_UNKNOWN_IN_A_ROW:
                raise TransportError(
                    f"{unknown_in_a_row} messages in a row lost their answer after DATA: "
                    "stopping this batch (those messages are 'unknown', the rest not sent)"
                )

        size = self.settings.chunk_size
        parts = [todo[start : start + size] for start in range(0, len(todo), size)]

        def making(part: Sequence[tuple[int, str]], into: list[GuardedMessage]) -> Iterator[None]:
            """Make (and hold to its cleared digest) each message of ``part``, one per step."""
            for i, e in part:
                into.append(self._guarded_message(make, i, e, cleared[i] if reproducible else None))
                yield None

        chunk: list[GuardedMessage] = []
        for _ in making(parts[0] if parts else [], chunk):
            pass
        for k in range(len(parts)):
            if reason := ledger.stop_reason():
                raise SendHalted(reason)
            # A refused connection raises here, before anything of the chunk is marked.
            self._open(min(max(self.in_flight, 1), len(chunk)))
            begun = ledger.begin([m.rcpt for m in chunk])
            if skipped := sum(m.rcpt.lower() not in begun for m in chunk):
                log.warning("request %s: %d recipient(s) not free to send; skipped", batch, skipped)
            # The next chunk is made while this one is on the wire (whenever no answer is in).
            following: list[GuardedMessage] = []
            steps = making(parts[k + 1] if k + 1 < len(parts) else [], following)
            shares, unmade = self._transmit([m for m in chunk if m.rcpt.lower() in begun], steps)
            record(*_collect(shares))
            if unmade is not None:
                raise unmade
            for _ in steps:
                pass
            chunk = following
        log.info(
            "request %s: %d message(s) sent, %d failed, %d unknown now; %d already on record",
            batch,
            counts[BatchState.SENT],
            counts[BatchState.FAILED],
            counts[BatchState.UNKNOWN],
            len(recipients) - len(todo),
        )
        return self._outcome(guarded.sha256, recipients, ledger)

    def _outcome(
        self, body_sha256: str, recipients: Sequence[str], ledger: RecipientLedger
    ) -> Delivery:
        """The batch's result from every recipient's own: sent only when all were sent."""
        final = {k.lower(): v for k, v in ledger.settled().items()}
        states = Counter(final.get(r.lower(), "not sent") for r in recipients)
        total = len(recipients)
        if states[BatchState.SENT] == total:
            return Delivery(message_id=f"smtp-{body_sha256[:22]}", status=250)
        lost = states[BatchState.UNKNOWN] + states[BatchState.SENDING]
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        if lost:
            raise TransportError(
                f"{lost} of {total} message(s) lost their answer after DATA ({summary})",
                outcome_unknown=True,
            )
        raise TransportError(f"{total - states[BatchState.SENT]} of {total} not sent ({summary})")

    def _maker(self, body_sha256: str, body: Mapping[str, Any]) -> _Maker:
        """How this body's messages are made: personalization index → (Message-ID, bytes,
        names of the headers set). Spliced from the body's template, the same bytes every time
        for this transport; or by the builder this transport was given. The sender is checked
        here, once per body."""
        sender = str((body.get("from") or {}).get("email") or "")
        if not is_valid_single_address(sender):
            raise EnvelopeViolation("the sender is not exactly one valid address")
        builder = self._build_message
        if builder is not None:

            def build(index: int) -> tuple[str, str, bytes, list[str]]:
                message_id = make_msgid(domain=sender.rpartition("@")[2])
                msg = builder(body, index, message_id)
                try:
                    data = msg.as_bytes(policy=MESSAGE_POLICY)
                except (ValueError, TypeError, UnicodeError) as exc:
                    raise EnvelopeViolation(
                        f"personalization {index}: cannot serialise: {exc}"
                    ) from exc
                return sender, message_id, data, list(msg.keys())

            return build
        seed = self._seeds.get(body_sha256)
        if seed is None:
            seed = self._seeds[body_sha256] = TemplateSeed.new()
        template = MessageTemplate(body, seed=seed)

        def splice(index: int) -> tuple[str, str, bytes, list[str]]:
            message_id = seed.message_id(index, sender.rpartition("@")[2])
            data, names = template.message(index, message_id)
            return sender, message_id, data, names

        return splice

    def _guarded_message(
        self, make: _Maker, index: int, email: str, cleared: bytes | None
    ) -> GuardedMessage:
        """The message of personalization ``index``, cleared: its SHA-256 is ``cleared`` (the
        digest of the message the MIME guard passed), or, without one, the guard passes it."""
        sender, message_id, data, header_names = make(index)
        if cleared is None:
            self._guard.check(data, [email], email, header_names)
        elif hashlib.sha256(data).digest() != cleared:
            raise EnvelopeViolation(
                f"personalization {index}: the message is not the one the MIME guard cleared"
            )
        return GuardedMessage(sender, email, data, message_id)

    # the chunk over the connections -----------------------------------------------------------
    def _transmit(
        self, messages: Sequence[GuardedMessage], idle: Iterator[None] | None
    ) -> tuple[list[_Share], Exception | None]:
        """Send a chunk's messages, each connection its share in order, all from this thread:
        every connection's next step is taken as soon as its answer is in. While no answer is
        in, a step of ``idle`` is taken (the next chunk is made); the error that stopped
        ``idle``, if any, is returned beside every share's outcomes."""
        lanes = min(max(self.in_flight, 1), len(messages))
        positioned = list(enumerate(messages))
        running = {k: self._lane(k, positioned[k::lanes]) for k in range(lanes)}
        shares: dict[int, _Share] = {}
        waiting: dict[int, _Connection] = {}
        timeout = self.settings.timeout_seconds

        def advance(lane: int, reply: _Reply | None = None, error: OSError | None = None) -> None:
            """Run ``lane`` until it waits for an answer not yet in, or is done."""
            steps = running[lane]
            while True:
                try:
                    if error is not None:
                        conn = steps.throw(error)
                    else:
                        conn = next(steps) if reply is None else steps.send(reply)
                except StopIteration as done:
                    shares[lane] = done.value
                    return
                reply, error = None, None
                try:
                    conn.flush()
                    reply = conn.next_reply()
                except OSError as exc:
                    error = exc
                    continue
                if reply is None:
                    conn.deadline = time.monotonic() + timeout
                    waiting[lane] = conn
                    return

        for lane in running:
            advance(lane)
        unmade: Exception | None = None
        while waiting:
            readable = {conn.socket(): lane for lane, conn in waiting.items()}
            writable = [conn.socket() for conn in waiting.values() if conn.unsent]
            wait = 0.0 if idle is not None else _until(min(c.deadline for c in waiting.values()))
            ready, can_write, _ = select.select(list(readable), writable, [], wait)
            if not ready and not can_write:
                if idle is not None:
                    try:
                        next(idle)
                    except StopIteration:
                        idle = None
                    except Exception as exc:  # the next chunk is refused: this one still ends
                        unmade, idle = exc, None
                    continue
                for lane, conn in list(waiting.items()):
                    if conn.deadline <= time.monotonic():
                        del waiting[lane]
                        advance(lane, error=TimeoutError("timed out waiting for the answer"))
                continue
            for sock in can_write:
                lane = readable[sock]
                try:
                    waiting[lane].flush()
                except OSError as exc:
                    del waiting[lane]
                    advance(lane, error=exc)
            for sock in ready:
                lane = readable[sock]
                if (read := waiting.get(lane)) is None:
                    continue
                try:
                    reply = read.receive()
                except OSError as exc:
                    del waiting[lane]
                    advance(lane, error=exc)
                    continue
                if reply is not None:
                    del waiting[lane]
                    advance(lane, reply=reply)
        return [shares[k] for k in sorted(shares)], unmade

    def _lane(self, lane: int, messages: Sequence[tuple[int, GuardedMessage]]) -> _Steps[_Share]:
        outcomes: list[tuple[int, RecipientOutcome]] = []
        for n, (position, message) in enumerate(messages):
            try:
                state, detail = yield from self._send_one(lane, message)
            except TransportError as exc:
                # Certainly not accepted: this one and the rest of this connection's share.
                outcomes.append(
                    (position, RecipientOutcome(message.rcpt, None, error=mask_addresses(str(exc))))
                )
                outcomes += [(p, RecipientOutcome(m.rcpt, None)) for p, m in messages[n + 1 :]]
                return outcomes, exc
            if state == BatchState.SENT:
                outcome = RecipientOutcome(message.rcpt, state, message_id=detail)
            else:
                outcome = RecipientOutcome(message.rcpt, state, error=mask_addresses(detail))
            outcomes.append((position, outcome))
        return outcomes, None

    # one message ------------------------------------------------------------------------------
    def _send_one(self, lane: int, message: GuardedMessage) -> _Steps[tuple[BatchState, str]]:
        """Send one guarded message over connection ``lane``: (``sent``, Message-ID),
        (``failed``, reply) for a 5xx to this recipient, (``unknown``, why) when the answer was
        lost after the final ``.``. Raises TransportError for a 4xx or anything that refuses
        the whole batch."""
        for attempt in (1, 2):
            conn = self._connection(lane)
            try:
                where, code, reply = yield from conn.transaction(
                    message.mail_from, message.rcpt, message.data
                )
            except OSError as exc:  # lost connection, timeout (SMTPServerDisconnected too)
                delivered_whole = conn.delivered_whole
                self._drop(lane)
                if delivered_whole:
                    return (
                        BatchState.UNKNOWN,
                        "connection lost after the message was sent (after DATA): the server "
                        f"may have accepted it ({type(exc).__name__})",
                    )
                if attempt == 1:
                    # The server closed a connection we kept open: open a new one, once.
                    log.info("SMTP connection to %s closed; reconnecting", self.settings.host)
                    continue
                raise TransportError(
                    f"SMTP connection to {self.settings.host} lost before the message was "
                    f"sent: {type(exc).__name__}",
                    retryable=True,
                ) from None
            if not where:
                return BatchState.SENT, message.message_id
            if code == 421 or conn.sock is None:
                self._drop(lane)
            text = reply.decode("utf-8", "replace")
            detail = f"SMTP {code} on {where}: {text[:300]}"
            if 400 <= code < 500:
                raise TransportError(detail, status=code, retryable=True)
            if where == "MAIL FROM":  # every message would be refused alike
                raise TransportError(detail, status=code)
            return BatchState.FAILED, detail
        raise AssertionError("unreachable")  # pragma: no cover

    # the connections --------------------------------------------------------------------------
    def _open(self, count: int) -> None:
        """Connections 0 … count-1, opened where not open yet."""
        for lane in range(count):
            self._connection(lane)

    def _connection(self, lane: int) -> _Connection:
        conn = self._conns.get(lane)
        if conn is None:
            conn = self._conns[lane] = self._connect()
        return conn

    def _connect(self) -> _Connection:
        s = self.settings
        where = f"{s.host}:{s.port}"
        context = None
        if s.security != "none":
            context = self._ssl_context or ssl.create_default_context()
        conn = _Connection(
            s.host,
            local_hostname=s.local_hostname,
            timeout=s.timeout_seconds,
            tls_context=context if s.security == "tls" else None,
        )
        try:
            code, reply = conn.connect(s.host, s.port)
            if code != 220:
                raise smtplib.SMTPConnectError(code, reply)
            conn.ehlo_or_helo_if_needed()
            if s.security == "starttls":
                conn.starttls(context=context)
                conn.ehlo()
            if s.username:
                conn.login(s.username, s.password or "")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, Exception):
                raise _connect_failure(where, exc) from None
            raise
        conn.start_transactions()
        return conn

    def _drop(self, lane: int) -> None:
        conn = self._conns.pop(lane, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for lane in list(self._conns):
            conn = self._conns[lane]
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                pass
            finally:
                self._drop(lane)


class _Connection(smtplib.SMTP):
    """``smtplib.SMTP`` that can start with TLS ("SMTPS"), and, once set up (greeting, EHLO,
    STARTTLS, AUTH through ``smtplib``), runs its transactions without blocking: a transaction
    is a generator that queues its commands and yields this connection whenever it needs the
    next answer, which the transport's loop sends in when it is in. ``MAIL``/``RCPT``/``DATA``
    go in one write where the server offers ``PIPELINING``. It knows whether the current
    message went out whole, final ``.`` included (``delivered_whole``): a connection lost after
    that is an unknown outcome, before it the server cannot have accepted the message."""

    message_sent = False
    deadline = 0.0

    def __init__(
        self,
        host: str,
        *,
        local_hostname: str | None,
        timeout: float,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self._tls_context = tls_context
        super().__init__(local_hostname=local_hostname, timeout=timeout)
        self._host = host  # for TLS server-name checks; connect() does not set it
        self._out = bytearray()
        self._in = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[_Reply] = deque()

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        if self._tls_context is not None:
            sock = self._tls_context.wrap_socket(sock, server_hostname=self._host)
        return sock

    # the transaction --------------------------------------------------------------------------
    def transaction(self, mail_from: str, rcpt: str, data: bytes) -> _Steps[tuple[str, int, bytes]]:
        """One message to one recipient: ``("", 250, reply)`` when the server took it, else
        where it was refused (``MAIL FROM``, ``RCPT TO``, ``DATA``), the code and the reply.
        Raises ``OSError`` when the connection is lost (``delivered_whole`` says whether the
        final ``.`` had gone out)."""
        self.message_sent = False
        size = f" SIZE={len(data)}" if self.has_extn("size") else ""
        commands = (f"MAIL FROM:<{mail_from}>{size}", f"RCPT TO:<{rcpt}>", "DATA")
        accepted = ((250,), (250, 251), (354,))
        replies: list[_Reply] = []
        if self.has_extn("pipelining"):
            self.queue("".join(f"{c}\r\n" for c in commands).encode("ascii"))
            for _ in commands:
                replies.append((yield self))
        else:
            for command, ok in zip(commands, accepted, strict=True):
                self.queue(f"{command}\r\n".encode("ascii"))
                replies.append((yield self))
                if replies[-1][0] not in ok:
                    break
        for where, ok, (code, reply) in zip(
            ("MAIL FROM", "RCPT TO", "DATA"), accepted, replies, strict=False
        ):
            if code not in ok:
                if replies[-1][0] == 354 and len(replies) == 3:
                    # A server that took DATA all the same: end the (empty) message.
                    self.queue(b".\r\n")
                    yield self
                if code != 421:
                    try:
                        self.queue(b"RSET\r\n")
                        yield self
                    except OSError:
                        self.close()
                return where, code, reply
        # RFC 5321 4.5.2: a dot that starts a line is doubled (every line ends in CRLF: the
        # MIME guard let no bare CR or LF through).
        data = data.replace(b"\n.", b"\n..")
        self.queue(b"." + data + b".\r\n" if data.startswith(b".") else data + b".\r\n")
        self.message_sent = True
        code, reply = yield self
        return ("" if code == 250 else "DATA"), code, reply

    @property
    def delivered_whole(self) -> bool:
        """The current message, final ``.`` included, was handed to the network."""
        return self.message_sent and not self._out

    # the bytes --------------------------------------------------------------------------------
    def start_transactions(self) -> None:
        """From here on this connection is read and written without blocking."""
        if self.sock is not None:
            self.sock.setblocking(False)

    def queue(self, data: bytes) -> None:
        """Bytes to write (``flush``)."""
        self._out += data

    def socket(self) -> socket.socket:
        """The open socket (a connection waited on is open: a lost one is thrown in)."""
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("the connection is closed")
        return self.sock

    @property
    def unsent(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        """Write what the socket takes now of what is queued; raise ``OSError`` when lost."""
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("the connection is closed")
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            del self._out[:sent]

    def next_reply(self) -> _Reply | None:
        """The next whole answer already read, if any."""
        return self._replies.popleft() if self._replies else None

    def receive(self) -> _Reply | None:
        """Read what has come in; the next whole answer, if one is in now. Raises ``OSError``
        when the connection is lost, an answer line is too long or not an answer."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("the connection is closed")
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not data:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            self._in += data
            # TLS may hold more decrypted bytes than one read gave: the socket would not say.
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        self._parse()
        return self.next_reply()

    def _parse(self) -> None:
        """Whole answers out of what was read, as ``smtplib.SMTP.getreply`` reads them."""
        while (end := self._in.find(b"\n")) >= 0:
            line = bytes(self._in[: end + 1])
            del self._in[: end + 1]
            if len(line) > _MAX_REPLY_LINE:
                self.close()
                raise smtplib.SMTPResponseException(500, "Line too long.")
            self._lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                code = -1
            if code == -1 or line[3:4] != b"-":
                self._replies.append((code, b"\n".join(self._lines)))
                self._lines = []
        if len(self._in) > _MAX_REPLY_LINE:
            self.close()
            raise smtplib.SMTPResponseException(500, "Line too long.")

    def quit(self) -> tuple[int, bytes]:
        if self.sock is not None:
            self.sock.settimeout(self.timeout)  # smtplib's own calls block again
        return super().quit()


def _until(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _connect_failure(where: str, exc: Exception) -> TransportError:
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return TransportError(f"SMTP server {where} does not offer what is required: {exc}")
    if isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
        text = exc.smtp_error
        reply = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        return TransportError(
            f"SMTP server {where} answered {code}: {mask_addresses(reply[:300])}",
            status=code,
            retryable=400 <= code < 500,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(f"SMTP server {where}: TLS certificate not trusted: {exc}")
    if isinstance(exc, OSError):
        # Refused, unreachable, timed out, TLS handshake cut: nothing was sent.
        return TransportError(
            f"SMTP server {where} unreachable: {type(exc).__name__}: {exc}", retryable=True
        )
    return TransportError(f"SMTP server {where}: {type(exc).__name__}: {exc}")


# How one body's messages are made: index → (sender, Message-ID, bytes, header names).
_Maker = Callable[[int], tuple[str, str, bytes, list[str]]]

# An SMTP answer: its code and its text.
_Reply = tuple[int, bytes]
# Steps of work over connections: each yield is the connection whose next answer is needed, sent
# back in when it is in (or its loss thrown in); the generator's value is the result.
_T = TypeVar("_T")
_Steps = Generator[_Connection, _Reply, _T]

# One connection's share of a chunk: (position in the chunk, outcome) for each of its messages,
# and the error that stopped it (its remaining messages then certainly not sent).
_Share = tuple[list[tuple[int, RecipientOutcome]], TransportError | None]


def _collect(shares: Sequence[_Share]) -> tuple[list[RecipientOutcome], TransportError | None]:
    """Every message's outcome in the chunk's order, and the first error that stopped a
    connection's share."""
    ordered: dict[int, RecipientOutcome] = {}
    error: TransportError | None = None
    for outcomes, stopped in shares:
        ordered.update(outcomes)
        error = error or stopped
    return [ordered[n] for n in sorted(ordered)], error


def _recipients(guarded: GuardedBody, body: Mapping[str, Any]) -> list[str]:
    """The body's one address per personalization: the guard's, or, for bytes the guard's pass
    cleared (``recipients`` empty), the body's own, which that pass checked."""
    if guarded.recipients:
        return list(guarded.recipients)
    try:
        return [str(item["to"][0]["email"]) for item in body["personalizations"]]
    except (KeyError, IndexError, TypeError) as exc:
        raise EnvelopeViolation(f"a personalization has no recipient: {exc!r}") from None
