"""``mailroom feedback serve`` as the tests run it: a real process on a free port, and bodies
signed as SendGrid signs its Event Webhook (ECDSA P-256 over timestamp + body)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .processes import stop_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def public_key_text(key: ec.EllipticCurvePrivateKey) -> str:
    """The public key as SendGrid shows it: base64 of its DER SubjectPublicKeyInfo."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def signed_headers(
    key: ec.EllipticCurvePrivateKey, body: bytes, at: float | None = None
) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def start_feedback_service(
    outbox_url: str, env: dict[str, str], log: Path, *extra: str, timeout: float = 60
) -> tuple[subprocess.Popen[bytes], str]:
    """The service on a free port, in a session of its own, its output in ``log``; returned
    once ``/healthz`` answers 200, or as soon as it has exited (a refusal to start)."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailroom.cli.main",
                "feedback",
                "serve",
                "--port",
                str(port),
                "--outbox-url",
                outbox_url,
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    if process.poll() is None:
        stop_process_group(process)
        raise AssertionError(f"the feedback service did not answer: {log.read_text()[-2000:]}")
    return process, url
