"""Transports and send_shard against the real SendGrid-compatible dev server, with real faults.

The SendGrid transport goes through the official SDK over real HTTP; the dev server records what
arrived and injects 429s, 5xx answers and dropped connections on a fixed schedule, so every
outcome the outbox distinguishes is met for real.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailroom.batches import serialise
from mailroom.checks.envelope_guard import ApprovedManifest, GuardedBody
from mailroom.delivery.outbox import BatchState
from mailroom.delivery.rate import RateLimiter, RetryPolicy
from mailroom.delivery.transports.base import Clearance, Delivery, Transport
from mailroom.delivery.transports.file import FileTransport
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import EnvelopeViolation, TransportError
from sendgrid_dev import Faults, SendGridDevServer, accepted_recipients
from support.runs import Staged, shared_of, stage_requests

pytestmark = pytest.mark.unit

API_KEY = "SG.unit-test-key"
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)
NO_LIMIT = RateLimiter(None, None)


def personalization(i: int, email: str) -> dict[str, Any]:
    """One recipient's envelope as build_envelopes makes it: own values, own unsubscribe link."""
    token = hashlib.sha256(email.lower().encode()).hexdigest()[:22]
    url = f"https://example-exchange.test/unsubscribe?token={token}"
    return {
        "to": [{"email": email}],
        "substitutions": {
            "%%first_name%%": f"Jürgen {i}",
            "%%first_name|html%%": f"J&amp;rgen {i}",
            "%%unsubscribe_url%%": url,
            "%%unsubscribe_url|html%%": html.escape(url, quote=True),
        },
        "headers": {
            "List-Unsubscribe": f"<{url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    }


def mail_body(*emails: str, batch_id: str = "en-00001", **top_level: Any) -> dict[str, Any]:
    """A request shaped like the frozen ones: shared content, one personalization per address."""
    body: dict[str, Any] = {
        "personalizations": [personalization(i, email) for i, email in enumerate(emails)],
        "from": {"email": "news@example-exchange.test", "name": "Example Exchange"},
        "subject": "Wintergrüße, %%first_name%% — 冬のお知らせ",
        "content": [
            {
                "type": "text/plain",
                "value": "Hallo %%first_name%%\n«ünïcödé» ✓ %%unsubscribe_url%%",
            },
            {
                "type": "text/html",
                "value": '<p>Hallo %%first_name|html%%</p><a href="%%unsubscribe_url|html%%">x</a>',
            },
        ],
        "custom_args": {"mailroom_batch": batch_id},
    }
    body.update(top_level)
    return body


def approve(*bodies: bytes) -> ApprovedManifest:
    shared = shared_of(*bodies)
    return ApprovedManifest("a" * 64, frozenset(shared), shared)


def sendgrid(server: SendGridDevServer, api_key: str = API_KEY) -> SendGridTransport:
    return SendGridTransport(SendGridSettings(api_key, server.url, timeout_seconds=10))


@pytest.fixture
def server() -> Iterator[SendGridDevServer]:
    with SendGridDevServer(api_key=API_KEY) as running:
        yield running


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the SendGrid transport, answer by answer ---------------------------------------------------


def test_the_frozen_bytes_arrive_unchanged(server: SendGridDevServer) -> None:
    body = serialise(mail_body("ada@example.com", "Bob.Stone@example.org"))
    # The SDK's own encoding (json.dumps, ASCII escapes, ", " separators) would differ in size.
    assert json.dumps(json.loads(body)).encode() != body

    with sendgrid(server) as transport:
        delivery = transport.send(body, approve(body))

    [record] = server.accepted()
    assert record["body"] == json.loads(body)
    assert record["size"] == len(body)
    assert delivery == Delivery(message_id=record["message_id"], status=202)


def test_202_gives_the_servers_message_id_for_each_request(server: SendGridDevServer) -> None:
    bodies = [serialise(mail_body(f"user{i}@example.com", batch_id=f"en-{i}")) for i in range(3)]
    approved = approve(*bodies)
    with sendgrid(server) as transport:
        deliveries = [
            transport.send(b, approved, expected_recipients=[f"USER{i}@example.com"])
            for i, b in enumerate(bodies)
        ]

    records = server.accepted()
    assert [d.message_id for d in deliveries] == [r["message_id"] for r in records]
    assert len({d.message_id for d in deliveries}) == 3
    assert {d.status for d in deliveries} == {202}


def test_400_from_the_provider_raises_and_is_not_retryable(server: SendGridDevServer) -> None:
    # The guard checks recipients, not the sender: this passes it and fails at the provider.
    without_from = mail_body("ada@example.com")
    del without_from["from"]
    body = serialise(without_from)

    with sendgrid(server) as transport, pytest.raises(TransportError) as caught:
        transport.send(body, approve(body))

    error = caught.value
    assert (error.status, error.retryable, error.outcome_unknown) == (400, False, False)
    assert "400" in str(error)
    assert "from" in str(error)
    assert "ada@example.com" not in str(error)
    assert server.stats().rejected == 1
    assert server.accepted() == []


def test_a_wrong_api_key_raises_401_and_is_never_shown(server: SendGridDevServer) -> None:
    body = serialise(mail_body("ada@example.com"))
    settings = SendGridSettings("SG.wrong-key", server.url, timeout_seconds=10)

    with SendGridTransport(settings) as transport, pytest.raises(TransportError) as caught:
        transport.send(body, approve(body))

    error = caught.value
    assert (error.status, error.retryable, error.outcome_unknown) == (401, False, False)
    assert "SG.wrong-key" not in str(error)
    assert "SG.wrong-key" not in repr(settings)
    assert server.stats().unauthorized == 1


def test_an_empty_api_key_is_refused_before_any_request() -> None:
    with pytest.raises(TransportError, match="no SendGrid API key"):
        SendGridTransport(SendGridSettings("", "http://127.0.0.1:9"))


@pytest.mark.parametrize(
    ("api_key", "host", "timeout", "error"),
    [
        (" \t", "https://api.sendgrid.com", 30, "no SendGrid API key configured (empty)"),
        ("SG.abc\n", "https://api.sendgrid.com", 30, "holds whitespace or a control character"),
        ("SG.a b", "https://api.sendgrid.com", 30, "holds whitespace or a control character"),
        ("SG.a\x00b", "https://api.sendgrid.com", 30, "holds whitespace or a control character"),
        ("SG.abc", "api.sendgrid.com", 30, "is not an http(s) URL"),
        ("SG.abc", "https://", 30, "is not an http(s) URL"),
        ("SG.abc", "https://api.sendgrid.com", 0, "the SendGrid timeout must be positive"),
        ("SG.abc", "https://api.sendgrid.com", float("nan"), "timeout must be positive"),
    ],
)
def test_settings_that_could_not_send_are_refused_when_made_never_showing_the_key(
    api_key: str, host: str, timeout: float, error: str
) -> None:
    with pytest.raises(TransportError) as refused:
        SendGridSettings(api_key, host, timeout_seconds=timeout)

    assert error in str(refused.value)
    assert api_key.strip() not in str(refused.value) or not api_key.strip()


def test_429_is_retryable_and_carries_retry_after(server: SendGridDevServer) -> None:
    server.set_faults(Faults(status_429_every=1, retry_after_seconds=7))
    body = serialise(mail_body("ada@example.com"))

    with sendgrid(server) as transport, pytest.raises(TransportError) as caught:
        transport.send(body, approve(body))

    error = caught.value
    assert (error.status, error.retryable, error.outcome_unknown) == (429, True, False)
    assert error.retry_after == 7.0
    assert server.stats().status_429_injected == 1


def test_every_5xx_is_retryable(server: SendGridDevServer) -> None:
    server.set_faults(Faults(status_5xx_every=1))
    body = serialise(mail_body("ada@example.com"))
    statuses = []

    with sendgrid(server) as transport:
        for _ in range(3):
            with pytest.raises(TransportError) as caught:
                transport.send(body, approve(body))
            assert (caught.value.retryable, caught.value.outcome_unknown) == (True, False)
            statuses.append(caught.value.status)

    assert statuses == [500, 502, 503]
    assert server.accepted() == []


def test_an_answer_lost_after_acceptance_is_outcome_unknown(server: SendGridDevServer) -> None:
    server.set_faults(Faults(drop_after_accept_every=1))
    body = serialise(mail_body("ada@example.com"))

    with sendgrid(server) as transport, pytest.raises(TransportError) as caught:
        transport.send(body, approve(body))

    error = caught.value
    assert error.outcome_unknown is True
    assert error.retryable is False
    stats = server.stats()
    assert (stats.accepted, stats.dropped_after_accept) == (1, 1)


def test_an_unreachable_host_is_retryable_and_certainly_not_sent() -> None:
    body = serialise(mail_body("ada@example.com"))
    settings = SendGridSettings(API_KEY, f"http://127.0.0.1:{closed_port()}", timeout_seconds=5)

    with SendGridTransport(settings) as transport, pytest.raises(TransportError) as caught:
        transport.send(body, approve(body))

    error = caught.value
    assert (error.retryable, error.outcome_unknown, error.status) == (True, False, None)
    assert "unreachable" in str(error)


# -- the interface and the other transports ------------------------------------------------------


def test_a_transport_cannot_override_send() -> None:
    with pytest.raises(TypeError, match="must not override send"):

        class Sneaky(Transport):  # pragma: no cover - the class statement itself must fail
            def send(self, body: bytes, approved: ApprovedManifest, expected: Any = None) -> Any:
                return None

            def _deliver(self, guarded: GuardedBody) -> Delivery:
                return Delivery("x", 202)


def test_the_file_transport_writes_the_guarded_bytes(tmp_path: Path) -> None:
    body = serialise(mail_body("ada@example.com", "bob@example.org"))
    digest = hashlib.sha256(body).hexdigest()

    with FileTransport(tmp_path / "out") as transport:
        delivery = transport.send(
            body, approve(body), expected_recipients=["ada@example.com", "bob@example.org"]
        )

    assert (tmp_path / "out" / f"{digest}.json").read_bytes() == body
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{digest}.json"]
    assert delivery == Delivery(message_id=f"file-{digest[:22]}", status=200)


@dataclass
class Wire:
    """One transport under test and how to tell whether anything left through it."""

    transport: Transport
    sent_anything: Any


@pytest.fixture(params=["sendgrid", "file"])
def wire(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Wire]:
    if request.param == "sendgrid":
        server = request.getfixturevalue("server")
        transport: Transport = sendgrid(server)
        yield Wire(transport, lambda: server.stats().received > 0)
    else:
        out = tmp_path / "file-out"
        transport = FileTransport(out)
        yield Wire(transport, lambda: any(out.iterdir()))
    transport.close()


def test_a_body_not_in_the_approved_manifest_never_leaves(wire: Wire) -> None:
    approved_body = serialise(mail_body("ada@example.com"))
    changed = serialise(mail_body("ada@example.com", subject="Something else"))

    with pytest.raises(EnvelopeViolation, match="not in the approved manifest"):
        wire.transport.send(changed, approve(approved_body))

    assert not wire.sent_anything()


def test_an_approved_body_for_other_recipients_never_leaves(wire: Wire) -> None:
    body = serialise(mail_body("ada@example.com"))
    with pytest.raises(EnvelopeViolation, match="outside its batch"):
        wire.transport.send(body, approve(body), expected_recipients=["bob@example.org"])
    assert not wire.sent_anything()


def test_an_approved_body_with_two_recipients_in_one_envelope_never_leaves(wire: Wire) -> None:
    mutant = mail_body("ada@example.com")
    mutant["personalizations"][0]["to"].append({"email": "bob@example.org"})
    body = serialise(mutant)
    with pytest.raises(EnvelopeViolation, match="2 recipients"):
        wire.transport.send(body, approve(body))
    assert not wire.sent_anything()


def test_the_sdk_logger_cannot_log_request_bodies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("python_http_client", "python_http_client.client"):
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.DEBUG), name
    assert logging.getLogger("python_http_client").level >= logging.WARNING


# -- send_shard end to end -----------------------------------------------------------------------


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[Staged]:
    """Six frozen requests of three recipients each, written to disk and staged in an outbox."""
    requests = []
    for index in range(6):
        emails = [f"Person{index}.{n}@Example.com" for n in range(3)]
        requests.append(
            (
                emails,
                lambda batch_id, emails=emails: serialise(mail_body(*emails, batch_id=batch_id)),
            )
        )
    run = stage_requests(
        tmp_path, "winter_update/manual__transport", requests, limiter=NO_LIMIT, retry=FAST_RETRY
    )
    yield run
    run.outbox.dispose()


@pytest.mark.parametrize(
    "faults",
    [Faults(status_5xx_every=3), Faults(status_429_every=2, retry_after_seconds=1)],
    ids=["5xx-every-3", "429-every-2"],
)
def test_send_shard_retries_transient_failures_and_sends_each_batch_once(
    server: SendGridDevServer, staged: Staged, faults: Faults
) -> None:
    server.set_faults(faults)

    with sendgrid(server) as transport:
        summary = staged.send(transport)

    assert summary["states"] == {BatchState.SENT: 6}
    assert summary["recipients_sent"] == 18
    received = Counter(a.lower() for a in accepted_recipients(server.accepted()))
    assert received == Counter(a.lower() for a in staged.addresses)
    states = staged.outbox.states(staged.run_key)
    accepted_ids = {r["message_id"] for r in server.accepted()}
    assert {s.message_id for s in states.values()} == accepted_ids
    assert max(s.attempts for s in states.values()) == 1  # retries happen inside one claim
    assert staged.accounted()[BatchState.SENT] == {"batches": 6, "recipients": 18}

    # A retried or cleared shard sends nothing again.
    with sendgrid(server) as transport:
        again = staged.send(transport)
    assert again["skipped_already_done"] == 6
    assert len(server.accepted()) == 6


def test_lost_answers_end_unknown_and_are_not_resent(
    server: SendGridDevServer, staged: Staged
) -> None:
    server.set_faults(Faults(drop_after_accept_every=2))

    with sendgrid(server) as transport:
        summary = staged.send(transport)

    assert summary["states"] == {BatchState.SENT: 3, BatchState.UNKNOWN: 3}
    states = staged.outbox.states(staged.run_key)
    by_index = [states[b.batch_id].state for b in staged.manifest.batches]
    assert by_index == [BatchState.SENT, BatchState.UNKNOWN] * 3
    assert all(
        "answer lost" in (states[b].last_error or "")
        for b in states
        if states[b].state == BatchState.UNKNOWN
    )
    received_before = server.stats().received
    assert received_before == 6

    with sendgrid(server) as transport:
        again = staged.send(transport)

    assert server.stats().received == received_before
    assert again["states"] == {BatchState.SENT: 3, BatchState.UNKNOWN: 3}
    counts = staged.accounted()
    assert counts[BatchState.UNKNOWN] == {"batches": 3, "recipients": 9}
    not_sent = list(staged.outbox.not_sent(staged.run_key))
    assert len(not_sent) == 9
    assert {r["state"] for r in not_sent} == {BatchState.UNKNOWN}


def test_a_batch_that_keeps_failing_ends_failed_with_its_reason(
    server: SendGridDevServer, staged: Staged
) -> None:
    server.set_faults(Faults(status_5xx_every=1))

    with sendgrid(server) as transport:
        summary = staged.send(
            transport, retry=RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.002)
        )

    assert summary["states"] == {BatchState.FAILED: 6}
    assert server.stats().received == 12
    assert staged.accounted()[BatchState.FAILED] == {"batches": 6, "recipients": 18}
    reasons = {r["last_error"] for r in staged.outbox.not_sent(staged.run_key)}
    assert all(reason.startswith("SendGrid answered 50") for reason in reasons)


def test_a_halted_run_sends_nothing_and_every_batch_is_accounted_for(
    server: SendGridDevServer, staged: Staged
) -> None:
    assert staged.outbox.request_halt(staged.run_key)

    with sendgrid(server) as transport:
        summary = staged.send(transport)

    assert summary["states"] == {BatchState.HALTED: 6}
    assert server.stats().received == 0
    assert staged.accounted()[BatchState.HALTED] == {"batches": 6, "recipients": 18}


def test_a_batch_left_sending_by_a_dead_worker_becomes_unknown_and_is_not_sent(
    server: SendGridDevServer, staged: Staged
) -> None:
    interrupted = staged.manifest.batches[2].batch_id
    assert staged.outbox.claim(staged.run_key, interrupted)  # the worker died after this

    with sendgrid(server) as transport:
        summary = staged.send(transport)

    assert summary["states"] == {BatchState.SENT: 5, BatchState.UNKNOWN: 1}
    assert staged.outbox.states(staged.run_key)[interrupted].state == BatchState.UNKNOWN
    assert server.stats().received == 5
    interrupted_batch = {a.lower() for a in staged.addresses[6:9]}
    assert not interrupted_batch & {a.lower() for a in accepted_recipients(server.accepted())}
    staged.accounted()


def test_a_batch_changed_after_approval_is_refused_and_stops_the_shard(
    server: SendGridDevServer, staged: Staged
) -> None:
    """Changed after the guard's pass cleared it: the guard inside the transport refuses it."""
    second = staged.manifest.batches[1]
    path = staged.batches_dir / second.file
    path.write_bytes(path.read_bytes().replace(b"Winter", b"Summer"))

    with sendgrid(server) as transport, pytest.raises(EnvelopeViolation):
        staged.send(transport)

    states = staged.outbox.states(staged.run_key)
    assert states[second.batch_id].state == BatchState.FAILED
    assert "envelope guard" in (states[second.batch_id].last_error or "")
    assert server.stats().received == 1  # only the first batch left


def test_shards_split_the_batches_and_together_send_each_once(
    server: SendGridDevServer, staged: Staged
) -> None:
    with sendgrid(server) as transport:
        summaries = [staged.send(transport, shard_index=i, shard_count=4) for i in range(4)]

    assert [s["batches"] for s in summaries] == [2, 2, 1, 1]
    assert staged.accounted()[BatchState.SENT] == {"batches": 6, "recipients": 18}
    assert sorted(accepted_recipients(server.accepted())) == sorted(staged.addresses)


def test_no_log_record_names_a_recipient_while_sending(
    server: SendGridDevServer, staged: Staged, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in (
        "mailroom",
        "mailroom.delivery.shards",
        "mailroom.delivery.outbox",
        "mailroom.delivery.transports",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    server.set_faults(Faults(status_5xx_every=3, status_429_every=5, drop_after_accept_every=4))

    with sendgrid(server) as transport:
        staged.send(transport, log_every=1)
    # Also the failure path: a provider refusal is logged with its message.
    server.set_faults(Faults(status_5xx_every=1))
    staged.outbox.requeue(staged.run_key, [BatchState.UNKNOWN])
    with sendgrid(server) as transport:
        staged.send(transport, retry=RetryPolicy(max_attempts=1), log_every=1)

    assert any(
        r.name.startswith("mailroom.delivery.shards") and r.levelno == logging.WARNING
        for r in caplog.records
    ), "the faults should have been logged"
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    text = caplog.text.lower()
    for address in staged.addresses:
        assert address.lower() not in text
    # Nothing that looks like an unmasked address at all (masked ones read "p***@example.com").
    assert not re.search(r"[a-z0-9._%+-]{2,}@example\.com", text), text[:2000]


# -- the guard's pass, checked by digest in send ------------------------------------------------


def test_a_cleared_body_is_sent_without_being_parsed_again(
    server: SendGridDevServer, staged: Staged, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's pass parsed every body in full; send_shard hands send what the pass
    recorded, and bytes with that digest go out without a second parse."""
    from mailroom.checks import envelope_guard
    from mailroom.delivery.transports import base

    def no_second_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cleared body was parsed again")

    monkeypatch.setattr(base, "check_envelope", no_second_parse)
    monkeypatch.setattr(envelope_guard, "_parse", no_second_parse)
    # Nor are the batch's recipients read again: the pass checked the body against them.
    monkeypatch.setattr(staged.outbox, "batch_members", no_second_parse)

    with sendgrid(server) as transport:
        summary = staged.send(transport)

    assert summary["states"] == {BatchState.SENT: 6}
    assert sorted(accepted_recipients(server.accepted())) == sorted(staged.addresses)


def test_send_refuses_a_body_that_is_not_the_one_the_pass_cleared(
    server: SendGridDevServer,
) -> None:
    body = serialise(mail_body("ada@example.com"))
    other = serialise(mail_body("ada@example.com", batch_id="en-00002"))
    approved = approve(body, other)  # both approved: the clearance is what tells them apart
    cleared = Clearance("en-00001", hashlib.sha256(body).hexdigest())

    with sendgrid(server) as transport, pytest.raises(EnvelopeViolation, match="pass cleared"):
        transport.send(other, approved, expected_recipients=["ada@example.com"], cleared=cleared)

    assert server.stats().received == 0


def test_a_clearance_outside_the_approved_manifest_gets_the_full_guard(
    server: SendGridDevServer,
) -> None:
    body = serialise(mail_body("ada@example.com"))
    elsewhere = serialise(mail_body("bob@example.org"))
    cleared = Clearance("en-00001", hashlib.sha256(body).hexdigest())

    with sendgrid(server) as transport, pytest.raises(EnvelopeViolation, match="not in the appr"):
        transport.send(body, approve(elsewhere), cleared=cleared)

    assert server.stats().received == 0


def test_without_a_clearance_send_runs_the_full_guard(
    server: SendGridDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailroom.delivery.transports import base

    calls: list[bytes] = []
    real = base.check_envelope

    def counted(body: bytes, *args: Any, **kwargs: Any) -> GuardedBody:
        calls.append(body)
        return real(body, *args, **kwargs)

    monkeypatch.setattr(base, "check_envelope", counted)
    body = serialise(mail_body("ada@example.com"))

    with sendgrid(server) as transport:
        transport.send(body, approve(body))

    assert calls == [body]


def test_only_the_batches_the_pass_cleared_as_staged_have_a_clearance(staged: Staged) -> None:
    cleared = Clearance.read(staged.outbox, staged.run_key)
    assert {c.batch_id: c.sha256 for c in cleared.values()} == {
        b.batch_id: b.sha256 for b in staged.manifest.batches
    }
    first = staged.manifest.batches[0]
    staged.outbox.mark_guarded(staged.run_key, [(first.batch_id, "0" * 64)])  # not as staged
    assert first.batch_id in Clearance.read(staged.outbox, staged.run_key)  # the record stays
    assert Clearance.read(staged.outbox, "winter_update/no-such-run") == {}


# -- kept-alive connections ------------------------------------------------------------------------


def test_requests_share_one_kept_alive_connection(server: SendGridDevServer) -> None:
    bodies = [serialise(mail_body(f"user{i}@example.com", batch_id=f"en-{i}")) for i in range(5)]
    approved = approve(*bodies)

    with sendgrid(server) as transport:
        for body in bodies:
            transport.send(body, approved)

    assert (server.stats().accepted, server.stats().connections) == (5, 1)


def test_a_connection_the_server_closed_while_idle_is_replaced_not_lost(
    server: SendGridDevServer,
) -> None:
    bodies = [serialise(mail_body(f"user{i}@example.com", batch_id=f"en-{i}")) for i in range(2)]
    approved = approve(*bodies)

    with sendgrid(server) as transport:
        transport.send(bodies[0], approved)
        server.drop_connections()  # what an idle timeout on the server's side does
        delivery = transport.send(bodies[1], approved)

    assert delivery.status == 202
    stats = server.stats()
    assert (stats.accepted, stats.connections) == (2, 2)


def test_the_sdks_headers_go_with_every_request() -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sendgrid import __version__

    seen: list[dict[str, str]] = []

    class Recorder(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({**dict(self.headers.items()), "path": self.path})
            self.send_response(202)
            self.send_header("X-Message-Id", "recorded")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    body = serialise(mail_body("ada@example.com"))
    with ThreadingHTTPServer(("127.0.0.1", 0), Recorder) as recorder:
        thread = threading.Thread(target=recorder.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{recorder.server_address[1]}"
            settings = SendGridSettings(API_KEY, url, timeout_seconds=10)
            with SendGridTransport(settings) as transport:
                assert transport.send(body, approve(body)).message_id == "recorded"
        finally:
            recorder.shutdown()

    [headers] = seen
    assert headers["path"] == "/v3/mail/send"
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["User-Agent"] == f"sendgrid/{__version__};python"
    assert headers["Accept"] == "application/json"
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Content-Length"] == str(len(body))
    assert headers.get("Connection", "").lower() != "close"
