"""The dev server over HTTPS with the certificate it makes at start, and the SendGrid transport
trusting it (``SendGridSettings.ca_bundle``); the added round trip of ``--latency-ms``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mailroom.batches import serialise
from mailroom.checks.envelope_guard import ApprovedManifest
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import TransportError
from sendgrid_dev import DevServerError, SendGridDevServer
from sendgrid_dev.__main__ import READY_PREFIX

pytestmark = pytest.mark.unit

API_KEY = "SG.https-test-key"


def body_for(email: str, batch_id: str) -> bytes:
    url = "https://example-exchange.test/u?token=" + hashlib.sha256(email.encode()).hexdigest()[:20]
    return serialise(
        {
            "personalizations": [
                {
                    "to": [{"email": email}],
                    "substitutions": {"%%unsubscribe_url%%": url},
                    "headers": {"List-Unsubscribe": f"<{url}>"},
                }
            ],
            "from": {"email": "news@example-exchange.test"},
            "subject": "Hello",
            "content": [{"type": "text/plain", "value": "Hi %%unsubscribe_url%%"}],
            "custom_args": {"mailroom_batch": batch_id},
        }
    )


def approve(*bodies: bytes) -> ApprovedManifest:
    shared = {
        hashlib.sha256(b).hexdigest(): {
            k: v for k, v in json.loads(b).items() if k != "personalizations"
        }
        for b in bodies
    }
    return ApprovedManifest("h" * 64, frozenset(shared), shared)


@pytest.fixture
def https_server() -> Iterator[SendGridDevServer]:
    with SendGridDevServer(api_key=API_KEY, tls=True) as server:
        yield server


def test_the_transport_sends_over_https_trusting_the_certificate_made_at_start(
    https_server: SendGridDevServer,
) -> None:
    assert https_server.url.startswith("https://127.0.0.1:")
    bodies = [body_for(f"user{i}@example.com", f"en-{i}") for i in range(3)]
    approved = approve(*bodies)
    settings = SendGridSettings(
        API_KEY, https_server.url, timeout_seconds=10, ca_bundle=str(https_server.ca_file)
    )

    with SendGridTransport(settings) as transport:
        deliveries = [transport.send(body, approved) for body in bodies]

    records = https_server.accepted()
    assert [r["body"] for r in records] == [json.loads(b) for b in bodies]
    assert [d.message_id for d in deliveries] == [r["message_id"] for r in records]
    # One TLS handshake for the three: the connection is kept open between requests.
    assert https_server.stats().connections == 1


def test_the_certificate_names_the_loopback_host_names(https_server: SendGridDevServer) -> None:
    for host in ("127.0.0.1", "localhost"):
        answer = requests.get(
            f"https://{host}:{https_server.port}/_dev/health",
            verify=str(https_server.ca_file),
            timeout=10,
        )
        assert answer.json() == {"ok": True}


def test_without_the_certificate_the_server_is_not_trusted_and_nothing_is_sent(
    https_server: SendGridDevServer,
) -> None:
    body = body_for("ada@example.com", "en-1")
    settings = SendGridSettings(API_KEY, https_server.url, timeout_seconds=10)  # system CAs

    with SendGridTransport(settings) as transport, pytest.raises(TransportError) as refused:
        transport.send(body, approve(body))

    error = refused.value
    assert (error.retryable, error.outcome_unknown, error.status) == (True, False, None)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert https_server.stats().received == 0


def test_another_servers_certificate_is_not_trusted(
    https_server: SendGridDevServer, tmp_path: Path
) -> None:
    with SendGridDevServer(tls=True, ca_file=tmp_path / "other-ca.pem") as other:
        other_ca = other.ca_file
        assert other_ca.read_bytes() == other.ca_pem
    body = body_for("ada@example.com", "en-1")
    settings = SendGridSettings(
        API_KEY, https_server.url, timeout_seconds=10, ca_bundle=str(other_ca)
    )

    with SendGridTransport(settings) as transport, pytest.raises(TransportError, match="VERIFY"):
        transport.send(body, approve(body))

    assert https_server.stats().received == 0


def test_a_ca_bundle_that_cannot_be_used_is_refused_when_the_settings_are_made(
    tmp_path: Path,
) -> None:
    with pytest.raises(TransportError, match="is not a file"):
        SendGridSettings(API_KEY, "https://127.0.0.1:1", ca_bundle=str(tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TransportError, match="no usable certificate"):
        SendGridSettings(API_KEY, "https://127.0.0.1:1", ca_bundle=str(garbage))
    assert API_KEY not in repr(SendGridSettings(API_KEY, "https://x.test", ca_bundle=None))


def test_the_server_removes_the_certificate_it_wrote_for_itself() -> None:
    with SendGridDevServer(tls=True) as server:
        ca_file = server.ca_file
        assert ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert not ca_file.exists()
    with SendGridDevServer() as plain, pytest.raises(DevServerError, match="tls=True"):
        _ = plain.ca_file
    with pytest.raises(DevServerError, match="latency_ms"):
        SendGridDevServer(latency_ms=-1)


def test_the_command_serves_https_with_latency_and_writes_the_certificate(tmp_path: Path) -> None:
    ca_file = tmp_path / "dev-ca.pem"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "sendgrid_dev", "--port", "0", "--log-every", "0"),
            *("--tls", "--tls-ca-file", str(ca_file), "--latency-ms", "5"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline().strip()
        assert ready.startswith(READY_PREFIX + "https://"), ready
        url = ready.removeprefix(READY_PREFIX)
        body = body_for("ada@example.com", "en-1")
        settings = SendGridSettings(API_KEY, url, timeout_seconds=10, ca_bundle=str(ca_file))
        with SendGridTransport(settings) as transport:
            assert transport.send(body, approve(body)).status == 202
        stats = requests.get(f"{url}/_dev/stats", verify=str(ca_file), timeout=10).json()
        assert (stats["accepted"], stats["connections"]) == (1, 2)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert str(ca_file) in stderr
    assert API_KEY not in stderr


def test_the_command_refuses_tls_options_without_tls() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sendgrid_dev", "--tls-ca-file", "x.pem"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "go with --tls" in done.stderr
