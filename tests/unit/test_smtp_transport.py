"""The SMTP transport against a real SMTP server (aiosmtpd) that records every envelope.

One message per recipient, one RCPT each, ``To:`` equal to it and that recipient's own values;
STARTTLS, implicit TLS and AUTH; 4xx retried, 5xx failing only its recipient, a connection lost
after DATA leaving only that message ``unknown``; resuming a batch sends only what is not on
record; and the MIME guard refusing what would reach anyone else, before anything leaves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import html
import ipaddress
import socket
import ssl
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailroom.batches import BatchEntry, Manifest, serialise, sha256_hex
from mailroom.checks.envelope_guard import (
    ApprovedManifest,
    GuardedBody,
    check_envelope,
    values_digest,
)
from mailroom.delivery.outbox import BatchState, Member, Outbox, RecipientOutcome
from mailroom.delivery.outbox import StagedBatch as OutboxBatch
from mailroom.delivery.rate import RateLimiter, RetryPolicy
from mailroom.delivery.shards import guard_shard, send_shard
from mailroom.delivery.transports.base import MemoryLedger
from mailroom.delivery.transports.file import FileTransport
from mailroom.delivery.transports.mime import MimeGuard, build_mime_message, check_mime_message
from mailroom.delivery.transports.smtp import SmtpSettings, SmtpTransport
from mailroom.errors import EnvelopeViolation, TransportError
from support.runs import guard_every_request, shared_in, shared_of

pytestmark = pytest.mark.unit

SENDER = "news@mailroom.test"
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
NAMES = ["Ana", "Björn", "Chloé", "Dmitri", "Eve", "Fatima"]
MAILBOXES = ["ana", "bjorn", "chloe", "dmitri", "eve", "fatima"]


# -- a recording SMTP server -----------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    session: int
    tls: bool
    authenticated: bool


@dataclass
class RecordingHandler:
    """Records every accepted envelope; faults are queued per recipient."""

    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    data_replies: dict[str, list[str]] = field(default_factory=dict)
    drop_after_data: set[str] = field(default_factory=set)
    # Recipient → seconds the answer to their message's final "." is held back (it is kept).
    slow_answers: dict[str, float] = field(default_factory=dict)
    mail_reply: str | None = None
    close_every: int | None = None
    rcpt_attempts: Counter[str] = field(default_factory=Counter)
    on_message: Callable[[Received], None] | None = None
    _per_session: Counter[int] = field(default_factory=Counter)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.rcpt_attempts[address.lower()] += 1
        queued = self.rcpt_replies.get(address.lower())
        if queued:
            return queued.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        rcpt = envelope.rcpt_tos[0].lower() if envelope.rcpt_tos else ""
        queued = self.data_replies.get(rcpt)
        if queued:
            return queued.pop(0)
        record = Received(
            envelope.mail_from,
            list(envelope.rcpt_tos),
            envelope.original_content,
            id(session),
            session.ssl is not None,
            bool(session.authenticated),
        )
        self.received.append(record)
        if self.on_message is not None:
            self.on_message(record)
        if rcpt in self.drop_after_data:
            self.drop_after_data.discard(rcpt)
            server.transport.abort()  # accepted, and the answer never leaves
            return "250 OK"
        if delay := self.slow_answers.pop(rcpt, 0.0):
            await asyncio.sleep(delay)  # accepted; the answer comes after the client gave up
        self._per_session[id(session)] += 1
        if self.close_every and self._per_session[id(session)] % self.close_every == 0:
            server.loop.call_soon(server.transport.close)  # after this answer is written
        return "250 Message accepted"

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if address.lower() in (a.lower() for a in r.rcpt_tos)]


@dataclass
class Server:
    handler: RecordingHandler
    controller: Controller
    port: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., Server]]:
    started: list[Controller] = []

    def start(**kwargs: Any) -> Server:
        handler = RecordingHandler()
        port = _free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        started.append(controller)
        return Server(handler, controller, port)

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailroom smtp test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def client_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def transport_for(server: Server, **settings: Any) -> SmtpTransport:
    ssl_context = settings.pop("ssl_context", None)
    build = settings.pop("build_message", None)
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "security": "none",
        "timeout_seconds": 5.0,
        "local_hostname": "mailroom.test",
    }
    return SmtpTransport(
        SmtpSettings(**{**base, **settings}), ssl_context=ssl_context, build_message=build
    )


# -- a frozen run: SendGrid request bodies, a manifest, the outbox ---------------------------------


@dataclass(frozen=True)
class Person:
    email: str
    first_name: str
    token: str

    @property
    def unsubscribe_url(self) -> str:
        return f"https://mailroom.test/unsubscribe?campaign=smtp_test&token={self.token}"

    def substitutions(self) -> dict[str, str]:
        url = self.unsubscribe_url
        return {
            "%%first_name%%": self.first_name,
            "%%first_name|html%%": html.escape(self.first_name, quote=True),
            "%%unsubscribe_url%%": url,
            "%%unsubscribe_url|html%%": html.escape(url, quote=True),
        }

    def headers(self) -> dict[str, str]:
        return {
            "List-Unsubscribe": f"<{self.unsubscribe_url}>, "
            f"<mailto:unsubscribe@mailroom.test?subject=unsubscribe%20{self.token}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }


def people(n: int) -> list[Person]:
    # Long tokens: List-Unsubscribe runs well past 78 columns and must stay a literal URL.
    return [
        Person(f"{MAILBOXES[i % 6]}.{i}@inbox.test", NAMES[i % 6], f"{i}x" * 40) for i in range(n)
    ]


def request_body(recipients: list[Person]) -> dict[str, Any]:
    return {
        "personalizations": [
            {"to": [{"email": p.email}], "substitutions": p.substitutions(), "headers": p.headers()}
            for p in recipients
        ],
        "from": {"email": SENDER, "name": "Mailroom News"},
        "reply_to": {"email": "support@mailroom.test"},
        "subject": "Hello %%first_name%%, our winter update",
        "content": [
            {
                "type": "text/plain",
                # Lines that start with a dot: SMTP doubles it on the wire (RFC 5321 4.5.2).
                "value": "Hi %%first_name%%,\nhere is what changed.\n.\n..and what did not\n"
                "Unsubscribe: %%unsubscribe_url%%\n",
            },
            {
                "type": "text/html",
                "value": "<p>Hi %%first_name|html%%,</p><p>here is what changed.</p>"
                '<a href="%%unsubscribe_url|html%%">Unsubscribe</a>',
            },
        ],
        "custom_args": {"mailroom_campaign": "smtp_test"},
    }


@dataclass
class Run:
    run_key: str
    manifest: Manifest
    batches_dir: Path
    outbox: Outbox
    people: list[Person]

    def batch_ids(self) -> list[str]:
        return [b.batch_id for b in self.manifest.batches]

    def body(self, index: int = 0) -> bytes:
        return (self.batches_dir / self.manifest.batches[index].file).read_bytes()

    def approved(self) -> ApprovedManifest:
        return ApprovedManifest(
            self.manifest.sha256, self.manifest.digests, shared_in(self.manifest, self.batches_dir)
        )

    def own_states(self, batch: int = 0) -> dict[str, str | None]:
        states = self.outbox.recipient_states(self.run_key, self.batch_ids()[batch])
        return {email: st.state for email, st in states.items()}

    def batch_state(self, batch: int = 0) -> str:
        return self.outbox.states(self.run_key)[self.batch_ids()[batch]].state


@pytest.fixture
def stage_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    outboxes: list[Outbox] = []

    def stage(count: int = 5, batch_size: int = 1000) -> Run:
        batches_dir = tmp_path / "batches"
        batches_dir.mkdir(exist_ok=True)
        everyone = people(count)
        entries, members = [], []
        for index, start in enumerate(range(0, count, batch_size)):
            chunk = everyone[start : start + batch_size]
            batch_id = f"en-{index + 1:05d}"
            data = serialise(request_body(chunk))
            (batches_dir / f"{batch_id}.json").write_bytes(data)
            entries.append(
                BatchEntry(
                    batch_id,
                    index,
                    "en",
                    f"{batch_id}.json",
                    sha256_hex(data),
                    len(data),
                    len(chunk),
                )
            )
            members += [
                Member(
                    p.email,
                    f"u-{p.token[:4]}",
                    batch_id,
                    values_digest(p.substitutions(), p.headers()),
                )
                for p in chunk
            ]
        manifest = Manifest("smtp_test", "run-1", "smtp", tuple(entries), "m" * 64)
        outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
        outboxes.append(outbox)
        run_key = f"smtp_test/{uuid.uuid4().hex}"
        outbox.stage(
            run_key,
            manifest.sha256,
            [OutboxBatch(e.batch_id, e.index, e.locale, e.sha256, e.recipients) for e in entries],
            members,
        )
        guard_every_request(run_key, manifest, batches_dir, outbox)
        return Run(run_key, manifest, batches_dir, outbox, everyone)

    yield stage
    for outbox in outboxes:
        outbox.dispose()


def send(run: Run, transport: Any, **kwargs: Any) -> dict[str, Any]:
    with transport:
        return send_shard(
            run_key=run.run_key,
            manifest=run.manifest,
            shared=shared_in(run.manifest, run.batches_dir),
            batches_dir=run.batches_dir,
            shard_index=0,
            shard_count=1,
            transport=transport,
            outbox=run.outbox,
            limiter=RateLimiter(None, None),
            retry=kwargs.pop("retry", FAST_RETRY),
            **kwargs,
        )


def parse(data: bytes) -> EmailMessage:
    # policy.default always builds an EmailMessage (the stubs say Message).
    return cast(EmailMessage, email.message_from_bytes(data, policy=email_policy.default))


def part(message: EmailMessage, subtype: str) -> str:
    body = message.get_body(preferencelist=(subtype,))
    assert body is not None
    return str(body.get_content())


# -- one message per recipient ---------------------------------------------------------------------


def test_every_recipient_gets_one_message_to_them_alone_with_their_own_values(
    smtp_server: Callable[..., Server],
    stage_run: Callable[..., Run],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = smtp_server()
    run = stage_run(6)
    checked: list[bytes] = []
    real_check = MimeGuard.check

    def spy(guard: MimeGuard, data: bytes, *args: Any, **kwargs: Any) -> None:
        real_check(guard, data, *args, **kwargs)
        checked.append(data)

    monkeypatch.setattr(MimeGuard, "check", spy)

    result = send(run, transport_for(server))

    received = server.handler.received
    assert result["states"] == {BatchState.SENT: 1}
    assert len(received) == len(run.people)
    assert len({r.session for r in received}) == 1  # one connection, kept open
    message_ids = set()
    for person in run.people:
        [envelope] = server.handler.to(person.email)
        assert envelope.rcpt_tos == [person.email]
        assert envelope.mail_from == SENDER
        message = parse(envelope.data)
        assert [str(a.addr_spec) for a in message["To"].addresses] == [person.email]
        assert message["Cc"] is None
        assert message["Bcc"] is None
        assert message["Subject"] == f"Hello {person.first_name}, our winter update"
        assert message["From"].addresses[0].addr_spec == SENDER
        assert message["Reply-To"].addresses[0].addr_spec == "support@mailroom.test"
        assert message.get_content_type() == "multipart/alternative"
        text, page = part(message, "plain"), part(message, "html")
        assert f"Hi {person.first_name}," in text
        assert person.unsubscribe_url in text
        assert html.escape(person.unsubscribe_url, quote=True) in page
        assert f"Hi {html.escape(person.first_name)}," in page
        # The one-click unsubscribe headers are this recipient's own, as literal URLs.
        unfolded = envelope.data.replace(b"\r\n ", b" ")
        assert f"List-Unsubscribe: {person.headers()['List-Unsubscribe']}".encode() in unfolded
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        for other in run.people:
            if other != person:
                assert other.email not in envelope.data.decode("utf-8", "replace")
                assert other.token not in envelope.data.decode("utf-8", "replace")
        message_ids.add(message["Message-ID"])
        # The server got exactly the bytes the MIME guard checked.
        assert envelope.data in checked
    assert len(message_ids) == len(run.people)
    own = run.outbox.recipient_states(run.run_key, run.batch_ids()[0])
    assert {st.state for st in own.values()} == {BatchState.SENT}
    assert {st.message_id for st in own.values()} == message_ids
    assert list(run.outbox.not_sent(run.run_key)) == []


def test_a_connection_the_server_closes_between_messages_is_opened_again(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    server.handler.close_every = 2
    run = stage_run(5)

    assert send(run, transport_for(server))["states"] == {BatchState.SENT: 1}

    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == sorted(
        p.email for p in run.people
    )
    assert len({r.session for r in server.handler.received}) == 3


def test_starttls_and_auth(
    smtp_server: Callable[..., Server],
    stage_run: Callable[..., Run],
    certificate: tuple[Path, Path],
) -> None:
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        ok = (data.login, data.password) == (b"mailroom", b"s3cret")
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535

    server = smtp_server(
        tls_context=server_tls(certificate),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
    run = stage_run(3)
    transport = transport_for(
        server,
        security="starttls",
        username="mailroom",
        password="s3cret",
        ssl_context=client_tls(certificate),
    )

    assert send(run, transport)["states"] == {BatchState.SENT: 1}

    assert len(server.handler.received) == 3
    assert all(r.tls and r.authenticated for r in server.handler.received)
    assert logins == [(b"mailroom", b"s3cret")]  # one connection, one login

    # A wrong password is a failure that no retry can fix; nothing is sent.
    wrong = transport_for(
        server,
        security="starttls",
        username="mailroom",
        password="wrong",
        ssl_context=client_tls(certificate),
    )
    with wrong, pytest.raises(TransportError) as refused:
        wrong.send(run.body(), run.approved())
    assert refused.value.status == 535
    assert not refused.value.retryable
    # An untrusted certificate stops before anything is said.
    untrusted = transport_for(server, security="starttls", username="mailroom", password="s3cret")
    with untrusted, pytest.raises(TransportError, match="certificate") as distrusted:
        untrusted.send(run.body(), run.approved())
    assert not distrusted.value.retryable
    assert len(server.handler.received) == 3


def test_starttls_is_never_skipped_when_the_server_does_not_offer_it(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(2)
    transport = transport_for(server, security="starttls")

    with transport, pytest.raises(TransportError, match="STARTTLS") as refused:
        transport.send(run.body(), run.approved())

    assert not refused.value.retryable
    assert server.handler.received == []


def test_implicit_tls(
    smtp_server: Callable[..., Server],
    stage_run: Callable[..., Run],
    certificate: tuple[Path, Path],
) -> None:
    server = smtp_server(ssl_context=server_tls(certificate))
    run = stage_run(2)

    transport = transport_for(server, security="tls", ssl_context=client_tls(certificate))
    assert send(run, transport)["states"] == {BatchState.SENT: 1}

    assert len(server.handler.received) == 2


# -- failures: 4xx, 5xx, lost answers, refused connections -----------------------------------------


def test_a_4xx_on_one_rcpt_is_retried_and_nobody_gets_two(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(5)
    greylisted = run.people[2].email
    server.handler.rcpt_replies[greylisted] = ["451 4.7.1 Greylisted, try again later"]

    assert send(run, transport_for(server))["states"] == {BatchState.SENT: 1}

    delivered = Counter(r.rcpt_tos[0] for r in server.handler.received)
    assert delivered == Counter({p.email: 1 for p in run.people})
    assert server.handler.rcpt_attempts[greylisted] == 2
    # The first two went out on the first attempt and were not sent again on the retry.
    assert server.handler.rcpt_attempts[run.people[0].email] == 1


def test_a_4xx_that_persists_fails_the_batch_and_keeps_the_sent_ones_sent(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(4)
    stuck = run.people[1].email
    server.handler.data_replies[stuck] = ["452 4.2.2 Mailbox full"] * 10

    assert send(run, transport_for(server))["states"] == {BatchState.FAILED: 1}

    assert [r.rcpt_tos[0] for r in server.handler.received] == [run.people[0].email]
    assert run.own_states() == {
        run.people[0].email: BatchState.SENT,
        stuck: None,  # not sent: its batch's state and reason stand for it
        run.people[2].email: None,
        run.people[3].email: None,
    }
    counts = run.outbox.counts(run.run_key)
    assert counts[BatchState.SENT]["recipients"] == 1
    assert counts[BatchState.FAILED]["recipients"] == 3
    reasons = {r["email_key"]: r["last_error"] for r in run.outbox.not_sent(run.run_key)}
    assert set(reasons) == {stuck, run.people[2].email, run.people[3].email}
    assert "452" in reasons[stuck]


def test_a_5xx_fails_only_that_recipient_and_the_others_are_sent(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(5)
    gone = run.people[1].email
    server.handler.rcpt_replies[gone] = ["550 5.1.1 No such user here"]

    assert send(run, transport_for(server))["states"] == {BatchState.FAILED: 1}

    assert sorted(r.rcpt_tos[0] for r in server.handler.received) == sorted(
        p.email for p in run.people if p.email != gone
    )
    assert server.handler.rcpt_attempts[gone] == 1  # a 5xx is not retried
    states = run.own_states()
    assert states.pop(gone) == BatchState.FAILED
    assert set(states.values()) == {BatchState.SENT}
    [row] = run.outbox.not_sent(run.run_key)
    assert (row["email_key"], row["state"]) == (gone, BatchState.FAILED)
    assert "550" in row["last_error"]
    assert gone not in row["last_error"]
    counts = run.outbox.counts(run.run_key)
    assert counts[BatchState.SENT]["recipients"] == 4
    assert counts[BatchState.FAILED]["recipients"] == 1
    assert counts[BatchState.FAILED]["batches"] == 1


def test_a_connection_lost_after_data_leaves_that_one_unknown_and_never_resends_it(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(5)
    lost = run.people[2].email
    server.handler.drop_after_data.add(lost)

    assert send(run, transport_for(server))["states"] == {BatchState.UNKNOWN: 1}

    assert Counter(r.rcpt_tos[0] for r in server.handler.received) == Counter(
        {p.email: 1 for p in run.people}
    )
    states = run.own_states()
    assert states.pop(lost) == BatchState.UNKNOWN
    assert set(states.values()) == {BatchState.SENT}
    [row] = run.outbox.not_sent(run.run_key)
    assert (row["email_key"], row["state"]) == (lost, BatchState.UNKNOWN)
    assert "after DATA" in row["last_error"]

    # A retried shard sends nothing: the batch's outcome is settled.
    assert send(run, transport_for(server))["skipped_already_done"] == 1
    assert len(server.handler.received) == 5

    # The operator's explicit resend sends that one message again, and only it.
    assert run.outbox.requeue(run.run_key, [BatchState.UNKNOWN]) == 1
    assert send(run, transport_for(server))["states"] == {BatchState.SENT: 1}
    assert [r.rcpt_tos[0] for r in server.handler.received[5:]] == [lost]


def test_an_answer_slower_than_the_timeout_leaves_that_one_unknown_and_nobody_twice(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """The server takes a message and answers after the client stopped waiting: that message is
    'unknown' (the server has it), the connection is opened again for the rest, and neither the
    retried shard nor anything else sends it twice."""
    server = smtp_server()
    run = stage_run(5)
    slow = run.people[1].email
    server.handler.slow_answers[slow] = 1.5

    result = send(run, transport_for(server, timeout_seconds=0.5, chunk_size=2), max_in_flight=2)

    assert result["states"] == {BatchState.UNKNOWN: 1}
    states = run.own_states()
    assert states.pop(slow) == BatchState.UNKNOWN
    assert set(states.values()) == {BatchState.SENT}
    assert send(run, transport_for(server))["skipped_already_done"] == 1
    assert Counter(r.rcpt_tos[0] for r in server.handler.received) == Counter(
        {p.email: 1 for p in run.people}
    )


def test_answers_lost_again_and_again_stop_the_batch_instead_of_burning_through_it(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(6)
    server.handler.drop_after_data.update(p.email for p in run.people[1:4])

    # One recipient per chunk: the batch stops after the third in a row (with bigger chunks it
    # stops after the chunk holding the third).
    assert send(run, transport_for(server, chunk_size=1))["states"] == {BatchState.FAILED: 1}

    assert len(server.handler.received) == 4  # the fifth and sixth were never attempted
    assert run.own_states() == {
        run.people[0].email: BatchState.SENT,
        run.people[1].email: BatchState.UNKNOWN,
        run.people[2].email: BatchState.UNKNOWN,
        run.people[3].email: BatchState.UNKNOWN,
        run.people[4].email: None,
        run.people[5].email: None,
    }
    counts = run.outbox.counts(run.run_key)
    assert [
        counts[s]["recipients"] for s in (BatchState.SENT, BatchState.UNKNOWN, BatchState.FAILED)
    ] == [1, 3, 2]


def test_a_refused_connection_is_retryable_and_sends_nothing(
    stage_run: Callable[..., Run],
) -> None:
    run = stage_run(2)
    transport = SmtpTransport(
        SmtpSettings("127.0.0.1", _free_port(), security="none", timeout_seconds=2)
    )
    ledger = MemoryLedger()

    with transport, pytest.raises(TransportError) as refused:
        transport.send(run.body(), run.approved(), ledger=ledger)

    assert refused.value.retryable
    assert not refused.value.outcome_unknown
    assert ledger.states == {}


# -- resuming a batch ------------------------------------------------------------------------------


def test_resume_after_a_failure_mid_batch_sends_only_the_rest(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(6)
    handler = server.handler

    def shut_down_after_three(_: Received) -> None:
        if len(handler.received) == 3:
            handler.mail_reply = "421 4.3.2 Service shutting down"

    handler.on_message = shut_down_after_three

    assert send(run, transport_for(server))["states"] == {BatchState.FAILED: 1}
    first = [r.rcpt_tos[0] for r in handler.received]
    assert first == [p.email for p in run.people[:3]]
    assert run.outbox.unsent_recipients(run.run_key, run.batch_ids()[0]) == sorted(
        p.email for p in run.people[3:]
    )

    handler.mail_reply = None
    handler.on_message = None
    assert run.outbox.requeue(run.run_key, [BatchState.FAILED]) == 1
    assert send(run, transport_for(server))["states"] == {BatchState.SENT: 1}

    assert Counter(r.rcpt_tos[0] for r in handler.received) == Counter(
        {p.email: 1 for p in run.people}
    )
    assert run.outbox.unsent_recipients(run.run_key, run.batch_ids()[0]) == []


def test_a_worker_killed_mid_batch_leaves_only_the_message_in_flight_unknown(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(5)
    batch_id = run.batch_ids()[0]
    box = run.outbox
    # What a worker killed while sending the third message leaves behind.
    assert box.claim(run.run_key, batch_id)
    for person in run.people[:3]:
        assert box.mark_recipient(run.run_key, batch_id, person.email, BatchState.SENDING)
    for person in run.people[:2]:
        assert box.mark_recipient(
            run.run_key, batch_id, person.email, BatchState.SENT, message_id="<m>"
        )

    assert send(run, transport_for(server))["states"] == {BatchState.UNKNOWN: 1}

    assert [r.rcpt_tos[0] for r in server.handler.received] == [p.email for p in run.people[3:]]
    assert run.own_states() == {
        run.people[0].email: BatchState.SENT,
        run.people[1].email: BatchState.SENT,
        run.people[2].email: BatchState.UNKNOWN,
        run.people[3].email: BatchState.SENT,
        run.people[4].email: BatchState.SENT,
    }
    counts = box.counts(run.run_key)
    assert counts[BatchState.SENT]["recipients"] == 4
    assert counts[BatchState.UNKNOWN]["recipients"] == 1


def test_several_connections_send_each_recipient_once_and_record_a_chunk_per_transaction(
    smtp_server: Callable[..., Server],
    stage_run: Callable[..., Run],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = smtp_server()
    run = stage_run(13)
    writes: list[tuple[str, int]] = []
    begin, finish = Outbox.begin_recipients, Outbox.finish_recipients

    def counting_begin(box: Outbox, run_key: str, batch_id: str, emails: Any) -> set[str]:
        writes.append(("begin", len(emails)))
        return begin(box, run_key, batch_id, emails)

    def counting_finish(box: Outbox, run_key: str, batch_id: str, outcomes: Any) -> None:
        writes.append(("finish", len(outcomes)))
        finish(box, run_key, batch_id, outcomes)

    monkeypatch.setattr(Outbox, "begin_recipients", counting_begin)
    monkeypatch.setattr(Outbox, "finish_recipients", counting_finish)

    result = send(run, transport_for(server, chunk_size=5), max_in_flight=3)

    assert result["states"] == {BatchState.SENT: 1}
    assert Counter(r.rcpt_tos[0] for r in server.handler.received) == Counter(
        {p.email: 1 for p in run.people}
    )
    assert len({r.session for r in server.handler.received}) == 3  # three connections
    assert writes == [
        ("begin", 5),
        ("finish", 5),
        ("begin", 5),
        ("finish", 5),
        ("begin", 3),
        ("finish", 3),
    ]
    assert set(run.own_states().values()) == {BatchState.SENT}


def test_a_5xx_and_a_4xx_on_different_connections_of_one_chunk(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """A 5xx fails its recipient only; a 4xx gives its message and the rest of that
    connection's share back (not sent), the other connection goes on; the retry sends exactly
    those."""
    server = smtp_server()
    run = stage_run(8)
    refused, deferred = run.people[1].email, run.people[2].email
    server.handler.rcpt_replies[refused] = ["550 5.1.1 no such user"]
    server.handler.rcpt_replies[deferred] = ["451 4.3.0 try again later"]

    result = send(run, transport_for(server, chunk_size=8), max_in_flight=2)

    assert result["states"] == {BatchState.FAILED: 1}
    got = Counter(r.rcpt_tos[0] for r in server.handler.received)
    assert got[refused] == 0
    assert max(got.values()) == 1
    states = run.own_states()
    assert states[refused] == BatchState.FAILED
    assert states[deferred] == BatchState.SENT  # retried within the batch's retry policy
    assert {e for e, st in states.items() if st != BatchState.SENT} == {refused}
    assert Counter(r.rcpt_tos[0] for r in server.handler.received) == Counter(
        {p.email: 1 for p in run.people if p.email != refused}
    )


def test_a_worker_killed_mid_chunk_leaves_at_most_that_chunk_unknown_and_nobody_twice(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """A real SIGKILL of the sending process while its second chunk is on the wire: the chunk's
    recipients are 'unknown' (the server may have them), nobody before it or after it is in
    doubt, and the resumed shard sends everyone else exactly once."""
    import multiprocessing
    import os
    import signal

    server = smtp_server()
    run = stage_run(16)
    chunk = 4
    victim: dict[str, int] = {}

    def kill_on_the_sixth(_: Received) -> None:
        if len(server.handler.received) == 6:
            os.kill(victim["pid"], signal.SIGKILL)

    def worker() -> None:
        box = Outbox(run.outbox.url)
        send(
            Run(run.run_key, run.manifest, run.batches_dir, box, run.people),
            transport_for(server, chunk_size=chunk),
            max_in_flight=2,
        )

    server.handler.on_message = kill_on_the_sixth
    process = multiprocessing.get_context("fork").Process(target=worker)
    process.start()
    victim["pid"] = process.pid or 0
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    server.handler.on_message = None

    assert send(run, transport_for(server, chunk_size=chunk), max_in_flight=2)["states"] == {
        BatchState.UNKNOWN: 1
    }
    states = run.own_states()
    unknown = {e for e, st in states.items() if st == BatchState.UNKNOWN}
    assert 0 < len(unknown) <= chunk
    assert unknown == {p.email for p in run.people[4:8]}  # exactly the chunk in flight
    got = Counter(r.rcpt_tos[0] for r in server.handler.received)
    assert max(got.values()) == 1  # nobody twice
    assert {e for e, st in states.items() if st == BatchState.SENT} == {
        p.email for p in run.people
    } - unknown
    assert all(got[e] == 1 for e, st in states.items() if st == BatchState.SENT)


def test_a_server_offering_pipelining_gets_each_transaction_in_two_writes(
    stage_run: Callable[..., Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 2920 against the benchmark's sink, which offers PIPELINING: MAIL, RCPT and DATA go
    in one write and the message in another, over three connections; the sink gets every
    message once, to its own address in ``To:``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from mailroom.delivery.transports import smtp as smtp_module
    from smtp_sink import SmtpSink

    writes: Counter[str] = Counter()
    real_queue = smtp_module._Connection.queue

    def counting(conn: Any, data: Any) -> None:
        if isinstance(data, bytes) and data.startswith(b"MAIL FROM:"):
            grouped = b"\r\nRCPT TO:" in data and data.endswith(b"\r\nDATA\r\n")
            writes["MAIL+RCPT+DATA" if grouped else "MAIL"] += 1
        elif isinstance(data, bytes) and data.endswith(b"\r\n.\r\n"):
            writes["message"] += 1
        real_queue(conn, data)

    monkeypatch.setattr(smtp_module._Connection, "queue", counting)
    run = stage_run(12)
    with SmtpSink(stats_file=tmp_path / "sink.json") as sink:
        transport = SmtpTransport(
            SmtpSettings("127.0.0.1", sink.port, security="none", chunk_size=5)
        )
        transport.in_flight = 3
        with transport:
            transport.send(
                run.body(),
                run.approved(),
                ledger=run.outbox.ledger(run.run_key, run.batch_ids()[0]),
            )
        stats = sink.stop()

    assert stats is not None
    assert (stats["messages"], stats["distinct_recipients"], stats["duplicate_recipients"]) == (
        12,
        12,
        0,
    )
    assert (stats["multi_rcpt_transactions"], stats["to_mismatch"], stats["connections"]) == (
        0,
        0,
        3,
    )
    assert writes["MAIL+RCPT+DATA"] == 12
    assert writes["message"] == 12
    assert writes["MAIL"] == 0
    assert set(run.own_states().values()) == {BatchState.SENT}


def test_a_halt_mid_batch_stops_before_the_next_message_and_resume_sends_the_rest(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(6)
    box = run.outbox

    def halt_after_two(_: Received) -> None:
        if len(server.handler.received) == 2:
            box.request_halt(run.run_key, reason="operator: wrong subject?")

    server.handler.on_message = halt_after_two
    # A halt stops the batch before its next chunk: one recipient per chunk here.
    assert send(run, transport_for(server, chunk_size=1))["states"] == {BatchState.HALTED: 1}
    assert len(server.handler.received) == 2
    [row, *_] = box.not_sent(run.run_key)
    assert row["state"] == BatchState.HALTED
    assert "wrong subject" in row["last_error"]

    server.handler.on_message = None
    box.request_halt(run.run_key, halted=False)
    assert send(run, transport_for(server))["states"] == {BatchState.SENT: 1}
    assert Counter(r.rcpt_tos[0] for r in server.handler.received) == Counter(
        {p.email: 1 for p in run.people}
    )


def test_a_whole_request_transport_refuses_a_batch_partly_sent_per_recipient(
    stage_run: Callable[..., Run], tmp_path: Path
) -> None:
    run = stage_run(3)
    batch_id = run.batch_ids()[0]
    assert run.outbox.mark_recipient(run.run_key, batch_id, run.people[0].email, BatchState.SENDING)
    assert run.outbox.mark_recipient(run.run_key, batch_id, run.people[0].email, BatchState.SENT)
    out = tmp_path / "file-transport"

    assert send(run, FileTransport(out))["states"] == {BatchState.FAILED: 1}

    assert list(out.iterdir()) == []
    assert "would send them again" in (run.outbox.states(run.run_key)[batch_id].last_error or "")


# -- the MIME guard --------------------------------------------------------------------------------


def good_message(to: str = "ana.0@inbox.test") -> bytes:
    return (
        "From: Mailroom <news@mailroom.test>\r\n"
        f"To: {to}\r\n"
        "Subject: Hello\r\n"
        "Message-ID: <1@mailroom.test>\r\n"
        "\r\n"
        "Hi\r\n"
    ).encode()


HEADERS = ["From", "To", "Subject", "Message-ID"]


def test_the_mime_guard_accepts_one_message_to_its_one_recipient() -> None:
    check_mime_message(good_message(), ["ana.0@inbox.test"], "ana.0@inbox.test", HEADERS)
    check_mime_message(good_message(), ["Ana.0@inbox.test"], "ana.0@inbox.test")


@pytest.mark.parametrize(
    ("data", "rcpt", "expected"),
    [
        (good_message(), ["ana.0@inbox.test", "eve.4@inbox.test"], "2 envelope recipients"),
        (good_message(), [], "0 envelope recipients"),
        (good_message(), ["eve.4@inbox.test"], "not the personalization's address"),
        (good_message("eve.4@inbox.test"), ["ana.0@inbox.test"], "'To:' is not the envelope"),
        (
            good_message("ana.0@inbox.test, eve.4@inbox.test"),
            ["ana.0@inbox.test"],
            "holds 2 addresses",
        ),
        (
            good_message("Eve <eve.4@inbox.test>, ana.0@inbox.test"),
            ["ana.0@inbox.test"],
            "holds 2 addresses",
        ),
        (
            good_message().replace(b"Subject:", b"Cc: eve.4@inbox.test\r\nSubject:"),
            ["ana.0@inbox.test"],
            "'cc'",
        ),
        (
            good_message().replace(b"Subject:", b"Bcc: eve.4@inbox.test\r\nSubject:"),
            ["ana.0@inbox.test"],
            "'bcc'",
        ),
        (
            good_message().replace(b"Subject: Hello", b"Subject: Hello\nBcc: eve.4@inbox.test"),
            ["ana.0@inbox.test"],
            "bare CR or LF",
        ),
        (
            good_message().replace(b"Subject: Hello", b"Subject: Hello\r\nX-Injected"),
            ["ana.0@inbox.test"],
            "neither a header field",
        ),
        (
            good_message().replace(b"Subject:", b"To: eve.4@inbox.test\r\nSubject:"),
            ["ana.0@inbox.test"],
            "2 'to' headers",
        ),
        (
            good_message().replace(b"Subject: Hello", b"Subject: " + b"x" * 1000),
            ["ana.0@inbox.test"],
            "over 998",
        ),
        (
            good_message().replace(b"Subject: Hello", b"Subject: Hi\r\nX-Extra: y"),
            ["ana.0@inbox.test"],
            "not the ones that were set",
        ),
        (good_message().replace(b"\r\n\r\n", b"\r\n"), ["ana.0@inbox.test"], "no end of"),
    ],
    ids=[
        "two RCPT",
        "no RCPT",
        "RCPT is someone else",
        "To differs from RCPT",
        "two addresses in To",
        "a display name and two addresses",
        "Cc",
        "Bcc",
        "bare LF injection",
        "header line without a name",
        "a second To",
        "line over 998",
        "a header nobody set",
        "no header end",
    ],
)
def test_the_mime_guard_refuses(data: bytes, rcpt: list[str], expected: str) -> None:
    with pytest.raises(EnvelopeViolation, match=expected.replace("(", r"\(")):
        check_mime_message(data, rcpt, "ana.0@inbox.test", HEADERS)


def _mutant(
    change: Callable[[EmailMessage, Mapping[str, Any], int], None], only: int | None = None
) -> Callable[[Mapping[str, Any], int, str], EmailMessage]:
    def build(body: Mapping[str, Any], index: int, message_id: str) -> EmailMessage:
        message = build_mime_message(body, index, message_id)
        if only is None or index == only:
            change(message, body, index)
        return message

    return build


def _to_someone_else(message: EmailMessage, body: Mapping[str, Any], index: int) -> None:
    others = body["personalizations"]
    del message["To"]
    message["To"] = others[(index + 1) % len(others)]["to"][0]["email"]


def _everyone_in_to(message: EmailMessage, body: Mapping[str, Any], index: int) -> None:
    del message["To"]
    message["To"] = ", ".join(p["to"][0]["email"] for p in body["personalizations"])


def _bcc(message: EmailMessage, body: Mapping[str, Any], index: int) -> None:
    message["Bcc"] = "archive@mailroom.test"


def _cc(message: EmailMessage, body: Mapping[str, Any], index: int) -> None:
    message["Cc"] = body["personalizations"][0]["to"][0]["email"]


def _header_name_injection(message: EmailMessage, body: Mapping[str, Any], index: int) -> None:
    message["X-Campaign\r\nBcc"] = "archive@mailroom.test"


def _raw_value_injection(message: EmailMessage, body: Mapping[str, Any], index: int) -> None:
    message.set_raw("X-Campaign", "winter\r\nBcc: archive@mailroom.test")


@pytest.mark.parametrize(
    "mutant",
    [
        _mutant(_to_someone_else),
        _mutant(_everyone_in_to),
        _mutant(_bcc),
        _mutant(_cc),
        _mutant(_header_name_injection),
        _mutant(_raw_value_injection),
        _mutant(_bcc, only=4),
    ],
    ids=[
        "To is another recipient",
        "everyone in To",
        "Bcc",
        "Cc",
        "CR/LF in a header name",
        "CR/LF in a raw header value",
        "Bcc on the last message only",
    ],
)
def test_a_mutant_message_builder_is_stopped_before_anything_leaves(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run], mutant: Any
) -> None:
    server = smtp_server()
    run = stage_run(5)

    with pytest.raises(EnvelopeViolation):
        send(run, transport_for(server, build_message=mutant))

    assert server.handler.received == []
    assert server.handler.rcpt_attempts == Counter()
    assert run.batch_state() == BatchState.FAILED
    assert set(run.own_states().values()) == {None}


def _for_recipient(
    change: Callable[[EmailMessage, Mapping[str, Any], int], None], email_address: str
) -> Callable[[Mapping[str, Any], int, str], EmailMessage]:
    """A message builder that breaks only the message to ``email_address``."""

    def build(body: Mapping[str, Any], index: int, message_id: str) -> EmailMessage:
        message = build_mime_message(body, index, message_id)
        if body["personalizations"][index]["to"][0]["email"] == email_address:
            change(message, body, index)
        return message

    return build


def test_every_message_of_a_shard_is_checked_before_its_first_leaves(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """Only the very last message of the shard (its third batch) would be refused: nothing of
    the shard leaves, not even the first two batches, whose messages are all fine."""
    server = smtp_server()
    run = stage_run(6, batch_size=2)
    last = run.people[-1].email

    with pytest.raises(EnvelopeViolation, match=r"sets \['bcc'\]"):
        send(run, transport_for(server, build_message=_for_recipient(_bcc, last)))

    assert server.handler.received == []
    assert server.handler.rcpt_attempts == Counter()
    assert [run.batch_state(i) for i in range(3)] == [
        BatchState.HALTED,
        BatchState.HALTED,
        BatchState.FAILED,
    ]
    assert "envelope guard refused batch en-00003" in (run.outbox.halt_reason(run.run_key) or "")
    for batch in range(3):
        assert set(run.own_states(batch).values()) <= {None}
    # Run again (an Airflow retry): the run is halted, nothing is built, nothing leaves.
    assert send(run, transport_for(server))["states"] == {
        BatchState.HALTED: 2,
        BatchState.FAILED: 1,
    }
    assert server.handler.received == []


def test_the_guard_pass_given_the_transport_stops_the_run_before_any_shard_sends(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """Three shards of one batch each; the last shard's last message would be refused. With
    the transport, ``guard_shard`` refuses it in the guard pass, so shard 0 sends nothing."""
    server = smtp_server()
    run = stage_run(6, batch_size=2)
    broken = _for_recipient(_cc, run.people[-1].email)
    approved = run.approved()

    for shard in range(2):
        result = guard_shard(
            run_key=run.run_key,
            manifest=run.manifest,
            shared=approved.shared,
            batches_dir=run.batches_dir,
            shard_index=shard,
            shard_count=3,
            outbox=run.outbox,
            transport=transport_for(server, build_message=broken),
        )
        assert result["recipients"] == 2
    with pytest.raises(EnvelopeViolation, match=r"sets \['cc'\]"):
        guard_shard(
            run_key=run.run_key,
            manifest=run.manifest,
            shared=approved.shared,
            batches_dir=run.batches_dir,
            shard_index=2,
            shard_count=3,
            outbox=run.outbox,
            transport=transport_for(server, build_message=broken),
        )

    with transport_for(server) as transport:
        result = send_shard(
            run_key=run.run_key,
            manifest=run.manifest,
            shared=approved.shared,
            batches_dir=run.batches_dir,
            shard_index=0,
            shard_count=3,
            transport=transport,
            outbox=run.outbox,
            limiter=RateLimiter(None, None),
        )
    assert result["states"] == {BatchState.HALTED: 1}
    assert server.handler.received == []
    assert run.batch_state(2) == BatchState.FAILED


def test_a_preflighted_message_is_built_once_more_as_it_leaves_and_no_more(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """The shard's preflight builds every message once and keeps none; the send builds each
    once more, on the bytes that leave (the batch's own check before its first message is
    the preflight's, not a third build)."""
    server = smtp_server()
    run = stage_run(6, batch_size=2)
    built: Counter[str] = Counter()

    def counting(body: Mapping[str, Any], index: int, message_id: str) -> EmailMessage:
        built[body["personalizations"][index]["to"][0]["email"]] += 1
        return build_mime_message(body, index, message_id)

    assert send(run, transport_for(server, build_message=counting))["states"] == {
        BatchState.SENT: 3
    }
    assert built == Counter({p.email: 2 for p in run.people})
    assert len(server.handler.received) == len(run.people)


def test_preflight_sends_nothing_and_refuses_what_send_would_refuse(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    server = smtp_server()
    run = stage_run(3)
    guarded = check_envelope(run.body(), run.approved())

    transport_for(server).preflight(guarded)
    with pytest.raises(EnvelopeViolation, match="'To:' is not the envelope recipient"):
        transport_for(
            server, build_message=_for_recipient(_to_someone_else, run.people[2].email)
        ).preflight(guarded)

    assert server.handler.received == []
    assert server.handler.rcpt_attempts == Counter()


def test_a_slow_answer_on_one_connection_does_not_hold_up_the_others(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """The connections of a shard are driven from one thread: while the first waits for a
    slow answer, the second sends its whole share."""
    server = smtp_server()
    run = stage_run(6)
    first = run.people[0].email  # connection 0 sends people 0, 2, 4; connection 1 people 1, 3, 5
    server.handler.slow_answers[first] = 1.0

    result = send(run, transport_for(server, chunk_size=6), max_in_flight=2)

    assert result["states"] == {BatchState.SENT: 1}
    order = [r.rcpt_tos[0] for r in server.handler.received]
    waited_for = order.index(run.people[2].email)  # connection 0's next, after the slow answer
    assert {run.people[k].email for k in (1, 3, 5)} <= set(order[:waited_for])


@pytest.mark.parametrize("security", ["none", "tls"])
def test_messages_larger_than_the_socket_buffers_leave_whole_over_several_connections(
    security: str,
    smtp_server: Callable[..., Server],
    stage_run: Callable[..., Run],
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message the socket takes in pieces (written as the connection can take it, in the
    clear and over TLS) arrives whole, each to its own recipient with their own values."""
    from mailroom.delivery.transports import smtp as smtp_module

    start = smtp_module._Connection.start_transactions

    def small_send_buffer(conn: Any) -> None:  # as on a slow link: the socket takes a little
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        start(conn)

    monkeypatch.setattr(smtp_module._Connection, "start_transactions", small_send_buffer)
    tls = security == "tls"
    server = smtp_server(ssl_context=server_tls(certificate)) if tls else smtp_server()
    run = stage_run(4)
    body = request_body(run.people)
    long_html = "".join(
        f"<p>{n:06d} for %%first_name|html%% {'x' * 90}</p>\n" for n in range(8_000)
    )
    body["content"][1]["value"] = long_html
    data = serialise(body)
    approved = ApprovedManifest("m" * 64, frozenset({sha256_hex(data)}), shared_of(data))
    transport = transport_for(
        server, security=security, ssl_context=client_tls(certificate) if tls else None
    )
    transport.in_flight = 2

    with transport:
        transport.send(data, approved)

    assert len(server.handler.received) == 4
    for person in run.people:
        (received,) = server.handler.to(person.email)
        assert len(received.data) > 800_000
        message = email.message_from_bytes(received.data, policy=email_policy.default)
        part = cast(EmailMessage, message).get_body(("html",))
        assert part is not None
        name = html.escape(person.substitutions()["%%first_name%%"])
        assert part.get_content().replace("\r\n", "\n") == long_html.replace(
            "%%first_name|html%%", name
        )


def test_a_line_break_in_a_substituted_subject_is_refused(
    smtp_server: Callable[..., Server], stage_run: Callable[..., Run]
) -> None:
    """A value that passed the request guard but would forge a header once substituted."""
    server = smtp_server()
    run = stage_run(3)
    body = request_body(run.people)
    body["personalizations"][1]["substitutions"]["%%first_name%%"] = "Eve\r\nBcc: x@evil.test"
    data = serialise(body)
    approved = ApprovedManifest("m" * 64, frozenset({sha256_hex(data)}), shared_of(data))
    transport = transport_for(server)

    with transport, pytest.raises(EnvelopeViolation, match="personalization 1"):
        transport.send(data, approved)

    assert server.handler.received == []


def test_subclasses_cannot_replace_the_guarded_steps() -> None:
    with pytest.raises(TypeError, match="must not override"):

        class Sloppy(SmtpTransport):
            def _guarded_message(self, body: Any, index: int, email: str) -> Any:
                raise NotImplementedError

    with pytest.raises(TypeError, match="must not override"):

        class Trusting(SmtpTransport):
            def preflight(self, guarded: GuardedBody) -> None:
                pass


# -- settings and wiring ---------------------------------------------------------------------------


def test_settings_repr_never_shows_the_password() -> None:
    settings = SmtpSettings("smtp.mailroom.test", 587, "mailroom", "hunter2-secret")

    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    assert "smtp.mailroom.test" in repr(settings)
    with pytest.raises(TransportError, match="security"):
        SmtpSettings("smtp.mailroom.test", security="ssl")


def test_a_campaign_may_use_the_smtp_transport(tmp_path: Path) -> None:
    import yaml

    from mailroom.campaign_spec import load_campaign

    repo = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((repo / "include/campaigns/winter_update.yaml").read_text())
    raw["transport"] = "smtp"
    raw.pop("connection_id", None)
    (tmp_path / "winter_update.yaml").write_text(yaml.safe_dump(raw))

    spec = load_campaign(tmp_path, "winter_update")

    assert (spec.transport, spec.connection_id) == ("smtp", "mailroom_smtp")


def test_outbox_ledger_records_each_chunk_compare_and_set(
    stage_run: Callable[..., Run],
) -> None:
    run = stage_run(3)
    batch_id = run.batch_ids()[0]
    ledger = run.outbox.ledger(run.run_key, batch_id)
    first, second, third = (p.email for p in run.people)

    assert ledger.begin([first.upper(), second]) == {first, second}
    assert ledger.begin([first, third]) == {third}  # first is taken: only third moves
    ledger.finish(
        [
            RecipientOutcome(first, BatchState.SENT, message_id="<1@mailroom.test>"),
            RecipientOutcome(second, None, error="451 try later"),
            RecipientOutcome(third, BatchState.FAILED, error="550 no such user"),
        ]
    )
    assert ledger.settled() == {first: BatchState.SENT, third: BatchState.FAILED}
    assert run.outbox.unsent_recipients(run.run_key, batch_id) == [second]
    with pytest.raises(Exception, match=r"1 recipient\(s\) of batch .* were not 'sending'"):
        ledger.finish([RecipientOutcome(second, BatchState.SENT)])
    records = run.outbox.recipient_states(run.run_key, batch_id)
    assert records[first].message_id == "<1@mailroom.test>"
    assert records[second].last_error == "451 try later"
    assert records[third].last_error == "550 no such user"
    assert run.batch_state() == BatchState.STAGED  # the ledger never moves the batch itself


def test_threads_do_not_share_a_message(stage_run: Callable[..., Run]) -> None:
    """Two workers racing to begin the same recipient: exactly one may send it."""
    run = stage_run(1)
    batch_id = run.batch_ids()[0]
    email_address = run.people[0].email
    wins: list[bool] = []
    barrier = threading.Barrier(4)

    def race() -> None:
        barrier.wait()
        wins.append(
            run.outbox.mark_recipient(run.run_key, batch_id, email_address, BatchState.SENDING)
        )

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(wins) == [False, False, False, True]
