"""``mailroom feedback serve``, a real process on a real port: SendGrid's signed events (signed
here with ``cryptography``'s ECDSA, as SendGrid signs them) and one-click unsubscribes."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from tests.support.feedback_service import (
    public_key_text,
    signed_headers,
    start_feedback_service,
)
from tests.support.processes import stop_process_group

from mailroom.delivery.outbox import BatchState, Outbox, StagedBatch
from mailroom.unsubscribe import UnsubscribeKeys

pytestmark = pytest.mark.unit

CAMPAIGN = "winter_update"
RUN_ID = "manual__2026-12-01T10:00:00+00:00"
NEW_SECRET, OLD_SECRET = "the-new-unsubscribe-secret", "the-old-unsubscribe-secret"
MAX_BODY = 64 * 1024
USERS = 6


@dataclass
class Service:
    url: str
    outbox: Outbox
    key: ec.EllipticCurvePrivateKey
    process: subprocess.Popen[bytes]
    log: Path

    def signed(
        self, body: bytes, *, at: float | None = None, key: ec.EllipticCurvePrivateKey | None = None
    ) -> dict[str, str]:
        return signed_headers(key or self.key, body, at)

    def post_events(self, body: bytes, **signing: Any) -> requests.Response:
        return requests.post(
            f"{self.url}/webhooks/sendgrid",
            data=body,
            headers=self.signed(body, **signing),
            timeout=10,
        )

    def kept_events(self) -> int:
        with self.outbox.engine.connect() as conn:
            return int(
                conn.exec_driver_sql("SELECT count(*) FROM mailroom_delivery_events").scalar_one()
            )


def start(tmp: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    log = tmp / f"service-{time.monotonic_ns()}.log"
    process, url = start_feedback_service(f"sqlite:///{tmp / 'outbox.sqlite'}", env, log, *extra)
    return process, url, log


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("feedback")
    outbox = Outbox(f"sqlite:///{tmp / 'outbox.sqlite'}")
    run_key = f"{CAMPAIGN}/{RUN_ID}"
    outbox.stage(
        run_key,
        "m" * 64,
        [StagedBatch("en-00000", 0, "en", "a" * 64, USERS)],
        [(f"User{n}@Example.com", f"u{n}", "en-00000") for n in range(USERS)],
    )
    assert outbox.claim(run_key, "en-00000")
    outbox.finish(run_key, "en-00000", BatchState.SENT, message_id="msg-1")
    key = ec.generate_private_key(ec.SECP256R1())
    env = {
        "MAILROOM_UNSUBSCRIBE_SECRETS": f"{NEW_SECRET},{OLD_SECRET}",
        "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY": public_key_text(key),
    }
    process, url, log = start(tmp, env, "--max-body-bytes", str(MAX_BODY))
    try:
        assert process.poll() is None, log.read_text()
        yield Service(url, outbox, key, process, log)
    finally:
        stop_process_group(process)
        outbox.dispose()


def events(*kinds: str, email: str = "user0@example.com", ids: str | None = None) -> bytes:
    ids = ids or uuid.uuid4().hex
    return json.dumps(
        [
            {
                "email": email,
                "timestamp": 1_765_000_000 + n,
                "event": kind,
                "sg_event_id": f"{ids}-{n}",
                "sg_message_id": "msg-1.filter0001",
                "mailroom_campaign": CAMPAIGN,
                "mailroom_run": RUN_ID,
                "mailroom_batch": "en-00000",
            }
            for n, kind in enumerate(kinds)
        ]
    ).encode()


def test_healthz_answers_when_the_outbox_does(service: Service) -> None:
    answer = requests.get(f"{service.url}/healthz", timeout=5)
    assert (answer.status_code, answer.json()) == (200, {"status": "ok"})


def test_signed_events_are_kept_before_the_answer(service: Service) -> None:
    before = service.kept_events()
    answer = service.post_events(events("processed", "delivered"))
    assert answer.status_code == 200
    assert answer.json()["new"] == 2
    assert answer.json()["matched"] == 2
    assert service.kept_events() == before + 2


def test_the_same_event_posted_three_times_counts_once(service: Service) -> None:
    body = events("spamreport", email="user5@example.com", ids="spam-once")
    answers = [service.post_events(body).json() for _ in range(3)]
    assert [a["new"] for a in answers] == [1, 0, 0]
    assert [a["suppressed"] for a in answers] == [1, 0, 0]
    feedback = service.outbox.delivery_feedback(f"{CAMPAIGN}/{RUN_ID}")
    assert feedback["en"]["complained"] == 1


def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    "attack",
    [
        "signed by another key",
        "body changed after signing",
        "no signature",
        "signature not base64",
        "timestamp six minutes old",
        "timestamp six minutes ahead",
        "timestamp changed after signing",
        "malformed JSON",
        "not a list",
        "oversized",
        "oversized without a length",
    ],
)
def test_refused_requests_keep_nothing(service: Service, attack: str) -> None:
    body = events("bounce", email="user1@example.com")
    headers = service.signed(body)
    url = f"{service.url}/webhooks/sendgrid"
    data: Any = body
    expected = 403
    if attack == "signed by another key":
        headers = service.signed(body, key=other_key())
    elif attack == "body changed after signing":
        data = body.replace(b"bounce", b"bounced")
    elif attack == "no signature":
        del headers["X-Twilio-Email-Event-Webhook-Signature"]
    elif attack == "signature not base64":
        headers["X-Twilio-Email-Event-Webhook-Signature"] = "%%%not-base64%%%"
    elif attack == "timestamp six minutes old":
        headers = service.signed(body, at=time.time() - 360)
    elif attack == "timestamp six minutes ahead":
        headers = service.signed(body, at=time.time() + 360)
    elif attack == "timestamp changed after signing":
        headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(int(time.time()) - 1)
    elif attack == "malformed JSON":
        data = body[:-3]
        headers, expected = service.signed(data), 400
    elif attack == "not a list":
        data = b'{"event": "bounce"}'
        headers, expected = service.signed(data), 400
    elif attack.startswith("oversized"):
        data = json.dumps([json.loads(body)[0]] * 400).encode()
        assert len(data) > MAX_BODY
        headers, expected = service.signed(data), 413
        if attack == "oversized without a length":
            data = iter([data[i : i + 4096] for i in range(0, len(data), 4096)])
    before = service.kept_events()
    answer = requests.post(url, data=data, headers=headers, timeout=10)
    assert answer.status_code == expected, answer.text
    assert service.kept_events() == before
    assert service.outbox.suppression("user1@example.com") is None


def token(secret: str, user_id: str, campaign: str = CAMPAIGN) -> str:
    return UnsubscribeKeys.parse(secret).sign(campaign, user_id)


def test_the_get_shows_a_button_and_unsubscribes_nobody(service: Service) -> None:
    answer = requests.get(f"{service.url}/u/{token(NEW_SECRET, 'u2')}", timeout=5)
    assert answer.status_code == 200
    assert '<form method="post">' in answer.text
    assert service.outbox.suppression("user2@example.com") is None


def test_a_one_click_post_unsubscribes_without_redirect_or_cookie(service: Service) -> None:
    url = f"{service.url}/u/{token(NEW_SECRET, 'u3')}"
    for _ in range(2):  # the second changes nothing
        answer = requests.post(
            url,
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
            timeout=5,
        )
        assert answer.status_code == 200
        assert "set-cookie" not in answer.headers
        assert "unsubscribed" in answer.text.lower()
    found = service.outbox.suppression("USER3@example.com")
    assert found is not None
    assert (found.reason, found.source) == ("unsubscribed", "one_click")
    # The run counts them as unsubscribed, once, in their locale.
    assert service.outbox.delivery_feedback(f"{CAMPAIGN}/{RUN_ID}")["en"]["unsubscribed"] == 1
    assert "u3" not in url.rsplit("/", 1)[1]


def test_links_signed_with_an_older_key_still_work(service: Service) -> None:
    answer = requests.post(f"{service.url}/u/{token(OLD_SECRET, 'u4')}", timeout=5)
    assert answer.status_code == 200
    assert service.outbox.suppression("user4@example.com") is not None


def tamper(text: str) -> str:
    kid, campaign, sealed = text.split(".")
    flipped = "A" if sealed[5] != "A" else "B"
    return f"{kid}.{campaign}.{sealed[:5]}{flipped}{sealed[6:]}"


@pytest.mark.parametrize(
    "bad",
    [
        "another campaign",
        "campaign swapped",
        "tampered",
        "unknown key",
        "a user never sent to",
        "garbage",
        "very long",
    ],
)
def test_a_token_that_does_not_verify_gets_400_and_unsubscribes_nobody(
    service: Service, bad: str
) -> None:
    good = token(NEW_SECRET, "u1")
    value = {
        "another campaign": token(NEW_SECRET, "u1", campaign="spring_sale"),
        "campaign swapped": good.replace(f".{CAMPAIGN}.", ".spring_sale."),
        "tampered": tamper(good),
        "unknown key": token("a-key-nobody-configured", "u1"),
        "a user never sent to": token(NEW_SECRET, "u404"),
        "garbage": "not-a-token",
        "very long": "x" * 5000,
    }[bad]
    answers = [
        requests.get(f"{service.url}/u/{value}", timeout=5),
        requests.post(f"{service.url}/u/{value}", data="List-Unsubscribe=One-Click", timeout=5),
    ]
    assert [a.status_code for a in answers] == [400, 400]
    # The page does not say which part was wrong.
    refused = requests.get(f"{service.url}/u/not-a-token", timeout=5).text
    assert all(a.text == refused for a in answers)
    assert service.outbox.suppression("user1@example.com") is None


def test_it_refuses_to_start_without_a_public_key_unless_told_it_is_for_development(
    tmp_path: Path,
) -> None:
    Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}").dispose()
    env = {"MAILROOM_UNSUBSCRIBE_SECRETS": NEW_SECRET, "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY": ""}
    process, _, log = start(tmp_path, env)
    assert process.wait(timeout=30) == 2
    assert "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY is not set" in log.read_text()
    process, _, log = start(
        tmp_path, {**env, "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY": "bm90IGEga2V5"}
    )
    assert process.wait(timeout=30) == 2
    assert "is not an EC public key" in log.read_text()
    process, url, log = start(tmp_path, env, "--accept-unsigned-webhooks")
    try:
        assert process.poll() is None, log.read_text()
        assert "ACCEPTING UNSIGNED WEBHOOKS" in log.read_text()
        answer = requests.post(f"{url}/webhooks/sendgrid", data=events("delivered"), timeout=5)
        assert answer.status_code == 200
    finally:
        stop_process_group(process)
