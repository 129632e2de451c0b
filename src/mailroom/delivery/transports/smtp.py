"""The SMTP transport: one message per recipient, over one kept-open connection.

A frozen SendGrid request body (one locale's content and up to 1,000 personalizations) becomes
one SMTP transaction per personalization: ``MAIL FROM`` the sender, exactly one ``RCPT TO`` (the
personalization's one address), and a MIME message (multipart/alternative text + HTML) with that
personalization's substitutions applied the way SendGrid applies its legacy substitutions, its
own headers (``List-Unsubscribe``, ``List-Unsubscribe-Post``) and a Message-ID.

Two guards stand before the bytes leave. ``Transport.send`` has already run the envelope guard on
the request body; here every message is built, serialised and checked again on its exact bytes
(``check_mime_message``: one RCPT, ``To:`` holding exactly that address, no Cc/Bcc, no header
line over the RFC limit, no header that was not set, i.e. no CR/LF injection) and those very
bytes go to ``sendmail``. Before that, ``preflight`` builds and checks every message of a body
and keeps none: ``send_shard`` runs it on every batch of its shard before the shard's first
message leaves, so a message that would be refused anywhere in the shard (its last batch's last
recipient) stops the shard with nothing sent, not after the batches before it went. Sent without
a preflight (``Transport.send`` on its own), all messages of the batch are built and checked
before its first leaves.

Each recipient's outcome goes to the batch's ledger (the outbox) as it happens: a failure in the
middle of 1,000 transactions leaves the ones before it ``sent``, and a retry or resume skips them.
A 4xx reply is retryable (the batch is retried from that message), a 5xx to a recipient fails
that recipient only, a connection lost after the message's final ``.`` makes that one message
``unknown`` (never resent automatically), a refused connection is retryable.
"""

from __future__ import annotations

import json
import logging
import re
import smtplib
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate, make_msgid
from typing import Any

from mailroom.addresses import is_valid_single_address, mask, mask_addresses
from mailroom.checks.envelope_guard import GuardedBody
from mailroom.delivery.outbox import BatchState
from mailroom.delivery.transports.base import (
    Delivery,
    MemoryLedger,
    RecipientLedger,
    Transport,
)
from mailroom.errors import EnvelopeViolation, SendHalted, TransportError
from mailroom.substitutions import apply_substitutions

log = logging.getLogger(__name__)

SECURITY_MODES = ("starttls", "tls", "none")
DEFAULT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
DEFAULT_TIMEOUT_SECONDS = 30.0
# RFC 5322 2.1.1 / RFC 5321 4.5.3.1.6: at most 998 characters on a line, without its CRLF.
MAX_LINE_LENGTH = 998
# Messages in a row whose answer was lost after DATA before the batch stops (the server or the
# network is failing: going on would only make more recipients 'unknown').
MAX_UNKNOWN_IN_A_ROW = 3
# Headers that would put the message in front of anyone but its one recipient.
FORBIDDEN_HEADERS = frozenset({"cc", "bcc", "resent-to", "resent-cc", "resent-bcc"})
SINGLE_HEADERS = ("to", "from", "subject", "date", "message-id", "reply-to", "sender")
# The SMTP policy (CRLF, 78-column folding), but header values set raw (ASCII values such as
# List-Unsubscribe, folded here at their commas) are written as they are, never re-encoded: an
# RFC 2047 encoded List-Unsubscribe URL would not be a URL to the mail client any more.
MESSAGE_POLICY = email_policy.SMTP.clone(refold_source="none")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_FIELD_LINE = re.compile(rb"[!-9;-~]+:")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


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

    def __repr__(self) -> str:
        return (
            f"SmtpSettings(host={self.host!r}, port={self.port}, username={self.username!r}, "
            f"security={self.security!r}, timeout_seconds={self.timeout_seconds}, "
            f"local_hostname={self.local_hostname!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class GuardedMessage:
    """One message whose exact bytes passed ``check_mime_message``, and its envelope."""

    mail_from: str
    rcpt: str
    data: bytes
    message_id: str


MessageBuilder = Callable[[Mapping[str, Any], int, str], EmailMessage]


def build_mime_message(body: Mapping[str, Any], index: int, message_id: str) -> EmailMessage:
    """The message for personalization ``index`` of a SendGrid v3 request body.

    Substitutions are applied to the subject and both content parts with plain string
    replacement in one pass (a value is never substituted again), as SendGrid's legacy
    substitutions do; request-level headers come first, the personalization's own after them.
    """
    item = body["personalizations"][index]
    substitutions = item.get("substitutions") or {}
    msg = EmailMessage(policy=MESSAGE_POLICY)
    try:
        msg["From"] = _address(body["from"])
        msg["To"] = _address(item["to"][0])
        if body.get("reply_to"):
            msg["Reply-To"] = _address(body["reply_to"])
        msg["Subject"] = apply_substitutions(str(body.get("subject") or ""), substitutions)
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = message_id
        headers = {**(body.get("headers") or {}), **(item.get("headers") or {})}
        for name, value in headers.items():
            _set_header(msg, str(name), str(value))
        text = _content(body, "text/plain")
        html = _content(body, "text/html")
        if text is not None:
            msg.set_content(apply_substitutions(text, substitutions), subtype="plain")
        if html is not None:
            html = apply_substitutions(html, substitutions)
            if text is None:
                msg.set_content(html, subtype="html")
            else:
                msg.add_alternative(html, subtype="html")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        # The email package refuses CR/LF in a header value, an unparsable address, …
        raise EnvelopeViolation(
            f"personalization {index}: cannot build its message: {exc}"
        ) from exc
    return msg


def check_mime_message(
    data: bytes,
    rcpt: Sequence[str],
    recipient: str,
    header_names: Iterable[str] | None = None,
) -> None:
    """The one-recipient rules on the exact bytes of one SMTP message and its envelope.

    Exactly one envelope recipient, equal to ``recipient`` (the personalization's own address);
    one ``To:`` holding exactly that one address; no Cc/Bcc (nor Resent-*); CRLF line ends only
    and no line over 998 characters; every header line a field or a continuation; and, given
    ``header_names``, exactly the headers that were set: a CR/LF smuggled into a value or a name
    would show as one more. Raises ``EnvelopeViolation``.
    """
    if len(rcpt) != 1:
        raise EnvelopeViolation(f"the message has {len(rcpt)} envelope recipients, not 1")
    envelope = rcpt[0]
    if not is_valid_single_address(envelope):
        raise EnvelopeViolation("the envelope recipient is not exactly one valid address")
    if envelope.lower() != recipient.lower():
        raise EnvelopeViolation("the envelope recipient is not the personalization's address")
    if _BARE_CR_OR_LF.search(data):
        raise EnvelopeViolation("the message has a bare CR or LF (a line break smuggled in)")
    head, separator, _ = data.partition(b"\r\n\r\n")
    if not separator:
        raise EnvelopeViolation("the message has no end of its header section")
    if any(len(line) > MAX_LINE_LENGTH for line in data.split(b"\r\n")):
        raise EnvelopeViolation(f"the message has a line over {MAX_LINE_LENGTH} characters")
    for n, line in enumerate(head.split(b"\r\n")):
        continuation = line[:1] in (b" ", b"\t")
        if (continuation and n == 0) or (not continuation and not _FIELD_LINE.match(line)):
            raise EnvelopeViolation(
                f"header line {n + 1} is neither a header field nor a continuation"
            )
    parsed = BytesParser(policy=email_policy.default).parsebytes(data)
    names = [str(k).lower() for k in parsed]
    if forbidden := sorted(FORBIDDEN_HEADERS.intersection(names)):
        raise EnvelopeViolation(f"the message sets {forbidden}")
    for name in SINGLE_HEADERS:
        if names.count(name) > 1:
            raise EnvelopeViolation(f"the message has {names.count(name)} {name!r} headers")
    if header_names is not None and Counter(names) != Counter(n.lower() for n in header_names):
        extra = sorted((Counter(names) - Counter(n.lower() for n in header_names)).keys())
        raise EnvelopeViolation(
            f"the message's headers are not the ones that were set (extra: {extra})"
        )
    to_header: Any = parsed.get("To")
    addresses: tuple[Address, ...] = tuple(getattr(to_header, "addresses", None) or ())
    if to_header is None or getattr(to_header, "defects", None) or len(addresses) != 1:
        raise EnvelopeViolation(
            f"'To:' holds {len(addresses)} addresses (or cannot be read), not exactly 1"
        )
    (to,) = addresses
    if to.addr_spec.lower() != envelope.lower():
        raise EnvelopeViolation("'To:' is not the envelope recipient")
    if "@" in to.display_name:
        raise EnvelopeViolation("the display name in 'To:' could hide an address")
    from_header = parsed.get("From")
    if from_header is None or len(getattr(from_header, "addresses", ())) != 1:
        raise EnvelopeViolation("'From:' does not hold exactly one address")


class SmtpTransport(Transport):
    """One SMTP transaction per recipient; the connection stays open across messages and
    batches, and is opened again when the server closes it."""

    name = "smtp"
    delivers_per_recipient = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guarded = {"preflight", "_deliver", "_deliver_each", "_guarded_message", "_transmit"}
        if overridden := sorted(guarded.intersection(cls.__dict__)):
            raise TypeError(f"{cls.__name__} must not override {overridden}: the MIME guard")

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        ssl_context: ssl.SSLContext | None = None,
        build_message: MessageBuilder = build_mime_message,
    ) -> None:
        self.settings = settings
        self._ssl_context = ssl_context
        self._build_message = build_message
        self._conn: _Connection | None = None
        # Digests of the bodies whose every message passed ``preflight`` on this transport: their
        # batch-wide pass before the first message is already done (each message is still
        # checked on its exact bytes as it leaves). One digest per batch, never a message.
        self._preflighted: set[str] = set()
        if settings.security == "none" and settings.username:
            log.warning("SMTP to %s: authenticating without TLS", settings.host)

    # the batch --------------------------------------------------------------------------------
    def preflight(self, guarded: GuardedBody) -> None:
        """Build, serialise and check (``check_mime_message``) the message of every
        personalization of the body, as ``send`` would, one at a time and none kept; send
        nothing. Raises ``EnvelopeViolation`` for the first message that would be refused."""
        body = json.loads(guarded.body)
        for index, email in enumerate(guarded.recipients):
            self._guarded_message(body, index, email)
        self._preflighted.add(guarded.sha256)

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        return self._deliver_each(guarded, MemoryLedger())

    def _deliver_each(self, guarded: GuardedBody, ledger: RecipientLedger) -> Delivery:
        body = json.loads(guarded.body)
        batch = guarded.sha256[:12]
        settled = {k.lower() for k in ledger.settled()}
        todo = [
            (i, email) for i, email in enumerate(guarded.recipients) if email.lower() not in settled
        ]
        # Every message of this pass passes the MIME guard before the first one leaves (done
        # already when this body went through ``preflight``).
        if guarded.sha256 not in self._preflighted:
            for index, email in todo:
                self._guarded_message(body, index, email)
        counts: Counter[str] = Counter()
        unknown_in_a_row = 0
        for index, email in todo:
            if reason := ledger.stop_reason():
                raise SendHalted(reason)
            message = self._guarded_message(body, index, email)
            self._connection()  # a refused connection raises before anything is marked
            if not ledger.begin(email):
                log.warning("request %s: %s is not free to send; skipped", batch, mask(email))
                continue
            try:
                state, detail = self._transmit(message)
            except TransportError as exc:
                ledger.release(email, mask_addresses(str(exc)))  # certainly not accepted
                raise
            if state == BatchState.SENT:
                ledger.finish(email, state, message_id=detail)
            else:
                detail = mask_addresses(detail)
                ledger.finish(email, state, error=detail)
                log.warning("request %s: %s %s: %s", batch, mask(email), state, detail)
            counts[state] += 1
            unknown_in_a_row = unknown_in_a_row + 1 if state == BatchState.UNKNOWN else 0
            if unknown_in_a_row >= MAX_UNKNOWN_IN_A_ROW:
                raise TransportError(
                    f"{unknown_in_a_row} messages in a row lost their answer after DATA: "
                    "stopping this batch (those messages are 'unknown', the rest not sent)"
                )
        log.info(
            "request %s: %d message(s) sent, %d failed, %d unknown now; %d already on record",
            batch,
            counts[BatchState.SENT],
            counts[BatchState.FAILED],
            counts[BatchState.UNKNOWN],
            len(guarded.recipients) - len(todo),
        )
        return self._outcome(guarded, ledger)

    def _outcome(self, guarded: GuardedBody, ledger: RecipientLedger) -> Delivery:
        """The batch's result from every recipient's own: sent only when all were sent."""
        final = {k.lower(): v for k, v in ledger.settled().items()}
        states = Counter(final.get(r.lower(), "not sent") for r in guarded.recipients)
        total = len(guarded.recipients)
        if states[BatchState.SENT] == total:
            return Delivery(message_id=f"smtp-{guarded.sha256[:22]}", status=250)
        lost = states[BatchState.UNKNOWN] + states[BatchState.SENDING]
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        if lost:
            raise TransportError(
                f"{lost} of {total} message(s) lost their answer after DATA ({summary})",
                outcome_unknown=True,
            )
        raise TransportError(f"{total - states[BatchState.SENT]} of {total} not sent ({summary})")

    def _guarded_message(self, body: Mapping[str, Any], index: int, email: str) -> GuardedMessage:
        sender = str((body.get("from") or {}).get("email") or "")
        if not is_valid_single_address(sender):
            raise EnvelopeViolation("the sender is not exactly one valid address")
        message_id = make_msgid(domain=sender.rpartition("@")[2])
        msg = self._build_message(body, index, message_id)
        try:
            data = msg.as_bytes(policy=MESSAGE_POLICY)
        except (ValueError, TypeError, UnicodeError) as exc:
            raise EnvelopeViolation(f"personalization {index}: cannot serialise: {exc}") from exc
        check_mime_message(data, [email], email, header_names=msg.keys())
        return GuardedMessage(sender, email, data, str(msg.get("Message-ID", message_id)))

    # one message ------------------------------------------------------------------------------
    def _transmit(self, message: GuardedMessage) -> tuple[BatchState, str]:
        """Send one guarded message: (``sent``, Message-ID), (``failed``, reply) for a 5xx to
        this recipient, (``unknown``, why) when the answer was lost after the final ``.``.
        Raises TransportError for a 4xx or anything that refuses the whole batch."""
        for attempt in (1, 2):
            conn = self._connection()
            conn.message_sent = False
            code: int
            reply: bytes | str
            try:
                conn.sendmail(message.mail_from, [message.rcpt], message.data)
                return BatchState.SENT, message.message_id
            except smtplib.SMTPRecipientsRefused as exc:
                code, reply = next(iter(exc.recipients.values()), (0, b""))
                where = "RCPT TO"
            except smtplib.SMTPSenderRefused as exc:
                code, reply, where = exc.smtp_code, exc.smtp_error, "MAIL FROM"
            except smtplib.SMTPDataError as exc:
                code, reply, where = exc.smtp_code, exc.smtp_error, "DATA"
            except smtplib.SMTPResponseException as exc:
                code, reply, where = exc.smtp_code, exc.smtp_error, "EHLO"
            except smtplib.SMTPNotSupportedError as exc:
                self._drop()
                raise TransportError(f"SMTP server refuses the message: {exc}") from None
            except OSError as exc:  # lost connection, timeout (SMTPServerDisconnected too)
                delivered_whole = conn.message_sent
                self._drop()
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
            if code == 421 or conn.sock is None:
                self._drop()
            text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
            detail = f"SMTP {code} on {where}: {text[:300]}"
            if 400 <= code < 500:
                raise TransportError(detail, status=code, retryable=True)
            if where in ("MAIL FROM", "EHLO"):  # every message would be refused alike
                raise TransportError(detail, status=code)
            return BatchState.FAILED, detail
        raise AssertionError("unreachable")  # pragma: no cover

    # the connection ---------------------------------------------------------------------------
    def _connection(self) -> _Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> _Connection:
        s = self.settings
        where = f"{s.host}:{s.port}"
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
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            self._drop()


class _Connection(smtplib.SMTP):
    """``smtplib.SMTP`` that can start with TLS ("SMTPS") and knows whether the current
    message went out whole, final ``.`` included: a connection lost after that is an unknown
    outcome, before it the server cannot have accepted the message. ``message_sent`` is reset
    before every transaction (a connection closed before the next ``MAIL FROM`` is not a lost
    answer)."""

    message_sent = False

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

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        if self._tls_context is not None:
            sock = self._tls_context.wrap_socket(sock, server_hostname=self._host)
        return sock

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.message_sent = False
        return super().data(msg)

    def send(self, s: Any) -> None:
        super().send(s)
        if isinstance(s, bytes) and s.endswith(b"\r\n.\r\n"):
            self.message_sent = True


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


def _address(entry: Any) -> Address:
    if not isinstance(entry, Mapping) or not is_valid_single_address(entry.get("email")):
        raise ValueError("not exactly one valid address")
    name = entry.get("name") or ""
    return Address(display_name=str(name), addr_spec=str(entry["email"]))


def _set_header(msg: EmailMessage, name: str, value: str) -> None:
    """A header as given: an ASCII value is written as it is (folded at its commas, never
    encoded), anything else through the email package (RFC 2047)."""
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"header name {name!r} is not a header field name")
    if not _PRINTABLE_ASCII.fullmatch(value):
        msg[name] = value  # the email package refuses CR/LF here
        return
    lines = [f"{name}: "]
    for n, part in enumerate(value.split(", ")):
        piece = part if n == 0 else ", " + part
        if n and len(lines[-1]) + len(piece) > 78:
            lines[-1] += ","
            piece = " " + part
            lines.append("")
        lines[-1] += piece
    folded = "\r\n".join(lines)[len(name) + 2 :]
    msg.set_raw(name, folded)


def _content(body: Mapping[str, Any], content_type: str) -> str | None:
    for block in body.get("content") or []:
        if isinstance(block, Mapping) and str(block.get("type", "")).lower() == content_type:
            value = block.get("value")
            return value if isinstance(value, str) else None
    return None
