"""The SendGrid dev server, exercised over real HTTP the way the pipeline and the SDK talk to it."""

import http.client
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Mail

from mailroom.checks.limits import MAX_REQUEST_BYTES
from mailroom.errors import MailroomError
from sendgrid_dev import (
    ACCEPTED_FILE_NAME,
    DevServerError,
    Faults,
    SendGridDevServer,
    accepted_recipients,
    read_accepted,
)
from sendgrid_dev.__main__ import READY_PREFIX

pytestmark = pytest.mark.unit

SEND_PATH = "/v3/mail/send"
API_KEY = "SG.test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SRC_DIR = Path(__file__).resolve().parents[2] / "src"


def mail_body(*addresses: str, **top_level: Any) -> dict[str, Any]:
    """A valid body with one personalization per address, as the pipeline sends them."""
    body: dict[str, Any] = {
        "personalizations": [{"to": [{"email": address}]} for address in addresses],
        "from": {"email": "news@example.org", "name": "News"},
        "subject": "Hello",
        "content": [
            {"type": "text/plain", "value": "Hi"},
            {"type": "text/html", "value": "<p>Hi</p>"},
        ],
    }
    body.update(top_level)
    return body


def post(
    server: SendGridDevServer, body: object, headers: dict[str, str] | None = None
) -> requests.Response:
    return requests.post(
        server.url + SEND_PATH,
        data=json.dumps(body),
        headers=AUTH if headers is None else headers,
        timeout=10,
    )


@pytest.fixture
def server() -> Iterator[SendGridDevServer]:
    with SendGridDevServer() as running:
        yield running


@pytest.fixture
def recording_server(tmp_path: Path) -> Iterator[SendGridDevServer]:
    with SendGridDevServer(data_dir=tmp_path) as running:
        yield running


# -- accepting --------------------------------------------------------------------------------


def test_valid_request_gets_202_with_a_message_id_and_is_recorded_to_disk(
    recording_server: SendGridDevServer, tmp_path: Path
) -> None:
    body = mail_body("ada@example.com")
    response = post(recording_server, body)

    assert response.status_code == 202
    assert response.content == b""
    assert response.headers["Content-Length"] == "0"
    message_id = response.headers["X-Message-Id"]
    assert len(message_id) == 22
    assert set(message_id) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    [record] = recording_server.accepted()
    assert record["message_id"] == message_id
    assert record["body"] == body
    assert record["size"] == len(json.dumps(body).encode())
    assert record["received_at"].endswith("+00:00")
    assert read_accepted(tmp_path) == [record]
    stats = recording_server.stats()
    assert (stats.received, stats.accepted, stats.accepted_recipients) == (1, 1, 1)


def test_message_ids_are_unique(server: SendGridDevServer) -> None:
    ids = {post(server, mail_body(f"u{i}@example.com")).headers["X-Message-Id"] for i in range(20)}
    assert len(ids) == 20


def test_sdk_mail_with_two_to_addresses_arrives_as_one_personalization_with_two_recipients(
    server: SendGridDevServer,
) -> None:
    client = SendGridAPIClient(API_KEY, host=server.url)
    message = Mail(
        from_email="news@example.org",
        to_emails=["ada@example.com", "bob@example.com"],
        subject="Hello",
        plain_text_content="Hi",
        html_content="<p>Hi</p>",
    )

    response = client.send(message)

    assert response.status_code == 202
    [record] = server.accepted()
    assert response.headers["X-Message-Id"] == record["message_id"]
    [personalization] = record["body"]["personalizations"]
    assert [to["email"] for to in personalization["to"]] == ["ada@example.com", "bob@example.com"]
    assert accepted_recipients([record]) == ["ada@example.com", "bob@example.com"]
    assert server.stats().accepted_recipients == 2


def test_sdk_is_multiple_makes_one_personalization_per_recipient(
    server: SendGridDevServer,
) -> None:
    client = SendGridAPIClient(API_KEY, host=server.url)
    message = Mail(
        from_email="news@example.org",
        to_emails=["ada@example.com", "bob@example.com"],
        subject="Hello",
        plain_text_content="Hi",
        is_multiple=True,
    )

    assert client.send(message).status_code == 202
    [record] = server.accepted()
    assert len(record["body"]["personalizations"]) == 2


def test_requests_at_the_documented_limits_are_accepted(server: SendGridDevServer) -> None:
    thousand_personalizations = mail_body(*(f"u{i}@example.com" for i in range(1000)))
    at_recipient_limit = mail_body("a@example.com")
    at_recipient_limit["personalizations"][0]["cc"] = [
        {"email": f"c{i}@example.com"} for i in range(999)
    ]
    substitutions_at_limit = mail_body("a@example.com")
    substitutions_at_limit["personalizations"][0]["substitutions"] = {"%%k%%": "x" * 9995}

    for body in (thousand_personalizations, at_recipient_limit, substitutions_at_limit):
        response = post(server, body)
        assert response.status_code == 202, response.text
    assert server.stats().accepted_recipients == 2000 + 1


# -- rejecting --------------------------------------------------------------------------------


def _duplicated_across_personalizations() -> dict[str, Any]:
    return mail_body("ada@example.com", "bob@example.com", "ada@example.com")


def _case_variant_duplicate_in_bcc() -> dict[str, Any]:
    body = mail_body("ada@example.com", "bob@example.com")
    body["personalizations"][1]["bcc"] = [{"email": "ADA@Example.COM"}]
    return body


def _too_many_recipients() -> dict[str, Any]:
    body = mail_body("a@example.com", "b@example.com")
    body["personalizations"][0]["cc"] = [{"email": f"c{i}@example.com"} for i in range(500)]
    body["personalizations"][1]["bcc"] = [{"email": f"d{i}@example.com"} for i in range(499)]
    return body


def _with_personalization(**fields: Any) -> dict[str, Any]:
    body = mail_body("ada@example.com")
    body["personalizations"][0].update(fields)
    return body


def _without(key: str) -> dict[str, Any]:
    body = mail_body("ada@example.com")
    del body[key]
    return body


def _attachment(*, without: str = "", **fields: Any) -> dict[str, Any]:
    attachment = {"content": "SGk=", "filename": "hi.txt", "type": "text/plain", **fields}
    attachment.pop(without, None)
    return mail_body("ada@example.com", attachments=[attachment])


INVALID_BODIES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "1001 personalizations": (
        lambda: mail_body(*(f"u{i}@example.com" for i in range(1001))),
        "personalizations",
    ),
    "1001 recipients over two personalizations": (_too_many_recipients, "personalizations"),
    "duplicate address in two personalizations": (
        _duplicated_across_personalizations,
        "personalizations.2.to.0.email",
    ),
    "case-variant duplicate in bcc": (
        _case_variant_duplicate_in_bcc,
        "personalizations.1.bcc.0.email",
    ),
    "missing from": (lambda: _without("from"), "from.email"),
    "invalid from": (
        lambda: mail_body("ada@example.com", **{"from": {"email": "x"}}),
        "from.email",
    ),
    "two addresses in one email": (
        lambda: mail_body("a@x.com, b@y.com"),
        "personalizations.0.to.0.email",
    ),
    "address with semicolon": (
        lambda: mail_body("a@x.com;b@y.com"),
        "personalizations.0.to.0.email",
    ),
    "address with display name": (
        lambda: mail_body("Ada <ada@example.com>"),
        "personalizations.0.to.0.email",
    ),
    "address with space": (lambda: mail_body("ada @example.com"), "personalizations.0.to.0.email"),
    "address without domain dot": (
        lambda: mail_body("ada@example"),
        "personalizations.0.to.0.email",
    ),
    "name with comma": (
        lambda: _with_personalization(to=[{"email": "ada@example.com", "name": "Lovelace, Ada"}]),
        "personalizations.0.to.0.name",
    ),
    "empty to": (lambda: _with_personalization(to=[]), "personalizations.0.to"),
    "reserved header in personalization": (
        lambda: _with_personalization(headers={"reply-to": "x@example.com"}),
        "personalizations.0.headers.reply-to",
    ),
    "reserved header at top level": (
        lambda: mail_body("ada@example.com", headers={"X-SG-ID": "1"}),
        "headers.X-SG-ID",
    ),
    "oversize substitutions": (
        lambda: _with_personalization(substitutions={"%%k%%": "x" * 9996}),
        "personalizations.0.substitutions",
    ),
    "oversize custom_args": (
        lambda: _with_personalization(custom_args={"k": "x" * 10_000}),
        "personalizations.0.custom_args",
    ),
    "missing subject": (lambda: _without("subject"), "subject"),
    "html before plain": (
        lambda: mail_body(
            "ada@example.com",
            content=[
                {"type": "text/html", "value": "<p>Hi</p>"},
                {"type": "text/plain", "value": "Hi"},
            ],
        ),
        "content.1.type",
    ),
    "empty content": (lambda: mail_body("ada@example.com", content=[]), "content"),
    "no personalizations": (lambda: mail_body(), "personalizations"),
    "custom_args that is not an object": (
        lambda: mail_body("ada@example.com", custom_args="campaign=winter"),
        "custom_args",
    ),
}

# What only SendGrid's published OpenAPI document says; the hand-written checks it replaced let
# every one of these through.
SCHEMA_ONLY_INVALID_BODIES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "a tracking setting's flag as a string": (
        lambda: mail_body(
            "ada@example.com", tracking_settings={"click_tracking": {"enable": "yes"}}
        ),
        "tracking_settings.click_tracking.enable",
    ),
    "a footer's text as a number": (
        lambda: mail_body("ada@example.com", mail_settings={"footer": {"text": 1}}),
        "mail_settings.footer.text",
    ),
    "an unknown attachment disposition": (
        lambda: _attachment(disposition="sideways"),
        "attachments.0.disposition",
    ),
    "an attachment without a filename": (
        lambda: _attachment(without="filename"),
        "attachments.0.filename",
    ),
    "send_at as a date string in a personalization": (
        lambda: _with_personalization(send_at="2026-12-24T08:00:00Z"),
        "personalizations.0.send_at",
    ),
    "an unsubscribe group without its id": (
        lambda: mail_body("ada@example.com", asm={"groups_to_display": [1]}),
        "asm.group_id",
    ),
    "an IP pool name of one character": (
        lambda: mail_body("ada@example.com", ip_pool_name="x"),
        "ip_pool_name",
    ),
    "a batch id that is a number": (
        lambda: mail_body("ada@example.com", batch_id=42),
        "batch_id",
    ),
    "dynamic template data that is a list": (
        lambda: _with_personalization(dynamic_template_data=["Ada"]),
        "personalizations.0.dynamic_template_data",
    ),
}


ALL_INVALID_BODIES = INVALID_BODIES | SCHEMA_ONLY_INVALID_BODIES


@pytest.mark.parametrize("case", ALL_INVALID_BODIES, ids=list(ALL_INVALID_BODIES))
def test_invalid_body_is_rejected_with_sendgrid_errors_and_not_recorded(
    server: SendGridDevServer, case: str
) -> None:
    make_body, expected_field = ALL_INVALID_BODIES[case]

    response = post(server, make_body())

    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert all(set(error) == {"message", "field", "help"} for error in errors)
    assert all(error["help"] is None and error["message"] for error in errors)
    assert expected_field in [error["field"] for error in errors]
    assert server.accepted() == []
    stats = server.stats()
    assert (stats.rejected, stats.accepted) == (1, 0)


def test_duplicate_error_names_the_first_occurrence_not_the_address(
    server: SendGridDevServer,
) -> None:
    response = post(server, _case_variant_duplicate_in_bcc())

    [error] = response.json()["errors"]
    assert "personalizations.0.to.0.email" in error["message"]
    assert "ada@" not in response.text.lower()


def test_error_answers_name_fields_never_values(server: SendGridDevServer) -> None:
    body = mail_body("Ada <ada@example.com>", **{"from": {"email": "news@example.org", "name": 7}})
    body["personalizations"][0]["substitutions"] = {"%%email%%": ["bob@example.com"]}

    response = post(server, body)

    assert response.status_code == 400
    fields = {error["field"] for error in response.json()["errors"]}
    assert fields == {
        "personalizations.0.to.0.email",
        "personalizations.0.substitutions.%%email%%",
        "from.name",
    }
    assert "@" not in "".join(error["message"] for error in response.json()["errors"])


def test_campaign_wide_custom_args_are_an_object_of_strings(server: SendGridDevServer) -> None:
    # The published document types the top-level custom_args as a string; SendGrid takes an
    # object, and Mailroom sends one in every request.
    custom_args = {"mailroom_campaign": "winter_update", "mailroom_batch": "en-00001"}
    assert post(server, mail_body("ada@example.com", custom_args=custom_args)).status_code == 202

    response = post(server, mail_body("bob@example.com", custom_args={"attempt": 2}))
    assert response.status_code == 400
    assert [error["field"] for error in response.json()["errors"]] == ["custom_args.attempt"]


def test_subject_may_come_from_every_personalization_instead(server: SendGridDevServer) -> None:
    body = _without("subject")
    body["personalizations"][0]["subject"] = "Per recipient"

    assert post(server, body).status_code == 202


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b""], ids=["text", "array", "empty"])
def test_body_that_is_not_a_json_object_is_400(server: SendGridDevServer, payload: bytes) -> None:
    response = requests.post(server.url + SEND_PATH, data=payload, headers=AUTH, timeout=10)

    assert response.status_code == 400
    assert response.json()["errors"][0]["help"] is None
    assert server.stats().rejected == 1


@pytest.mark.parametrize(
    "length", [MAX_REQUEST_BYTES, 30_000_001], ids=["exactly the limit", "over 30 MB"]
)
def test_body_of_30_mb_or_more_is_413_without_being_read(
    server: SendGridDevServer, length: int
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", SEND_PATH)
    connection.putheader("Authorization", AUTH["Authorization"])
    connection.putheader("Content-Length", str(length))
    connection.endheaders()

    response = connection.getresponse()

    assert response.status == 413
    assert json.loads(response.read())["errors"][0]["message"] == "content too large"
    assert server.stats().rejected == 1
    connection.close()


# -- auth and sandbox -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}, {"Authorization": ""}],
    ids=["missing", "empty bearer", "basic", "empty header"],
)
def test_request_without_a_bearer_key_is_401(
    server: SendGridDevServer, headers: dict[str, str]
) -> None:
    response = post(server, mail_body("ada@example.com"), headers=headers)

    assert response.status_code == 401
    assert response.json() == {
        "errors": [{"message": "authorization required", "field": None, "help": None}]
    }
    assert server.accepted() == []
    assert server.stats().unauthorized == 1


def test_only_the_configured_api_key_is_accepted() -> None:
    with SendGridDevServer(api_key="SG.right") as keyed:
        wrong = post(keyed, mail_body("ada@example.com"), {"Authorization": "Bearer SG.wrong"})
        right = post(keyed, mail_body("ada@example.com"), {"Authorization": "Bearer SG.right"})

        assert wrong.status_code == 401
        assert right.status_code == 202
        assert len(keyed.accepted()) == 1


def test_sandbox_request_gets_200_and_is_not_delivered(server: SendGridDevServer) -> None:
    body = mail_body("ada@example.com", mail_settings={"sandbox_mode": {"enable": True}})

    response = post(server, body)

    assert response.status_code == 200
    assert response.content == b""
    assert "X-Message-Id" not in response.headers
    assert server.accepted() == []
    stats = server.stats()
    assert (stats.sandbox, stats.accepted, stats.accepted_recipients) == (1, 0, 0)


def test_sandbox_request_is_still_validated(server: SendGridDevServer) -> None:
    body = mail_body("not-an-address", mail_settings={"sandbox_mode": {"enable": True}})

    assert post(server, body).status_code == 400
    assert server.stats().sandbox == 0


# -- faults -----------------------------------------------------------------------------------


def test_every_third_request_gets_429_with_retry_after_and_is_not_recorded() -> None:
    with SendGridDevServer(faults=Faults(status_429_every=3, retry_after_seconds=2)) as faulty:
        responses = [post(faulty, mail_body(f"u{i}@example.com")) for i in range(6)]

        assert [r.status_code for r in responses] == [202, 202, 429, 202, 202, 429]
        limited = responses[2]
        assert limited.headers["Retry-After"] == "2"
        assert limited.headers["X-RateLimit-Remaining"] == "0"
        assert int(limited.headers["X-RateLimit-Limit"]) > 0
        assert int(limited.headers["X-RateLimit-Reset"]) >= int(time.time())
        assert accepted_recipients(faulty.accepted()) == [
            "u0@example.com",
            "u1@example.com",
            "u3@example.com",
            "u4@example.com",
        ]
        assert faulty.stats().status_429_injected == 2


def test_every_second_request_gets_a_server_error_and_is_not_recorded() -> None:
    with SendGridDevServer(faults=Faults(status_5xx_every=2)) as faulty:
        statuses = [post(faulty, mail_body(f"u{i}@example.com")).status_code for i in range(6)]

        assert statuses == [202, 500, 202, 502, 202, 503]
        assert len(faulty.accepted()) == 3
        assert faulty.stats().status_5xx_injected == 3


def test_delay_holds_the_answer_back() -> None:
    with SendGridDevServer(faults=Faults(delay_seconds=0.3)) as slow:
        started = time.monotonic()
        response = post(slow, mail_body("ada@example.com"))

        assert time.monotonic() - started >= 0.3
        assert response.status_code == 202
        assert slow.stats().delayed == 1


def test_dropped_answer_is_recorded_but_the_client_sees_a_connection_error() -> None:
    with SendGridDevServer(faults=Faults(drop_after_accept_every=2)) as lossy:
        first = post(lossy, mail_body("u0@example.com"))
        with pytest.raises(requests.ConnectionError):
            post(lossy, mail_body("u1@example.com"))
        third = post(lossy, mail_body("u2@example.com"))

        assert (first.status_code, third.status_code) == (202, 202)
        assert accepted_recipients(lossy.accepted()) == [
            "u0@example.com",
            "u1@example.com",
            "u2@example.com",
        ]
        stats = lossy.stats()
        assert (stats.accepted, stats.dropped_after_accept) == (3, 1)


def test_requests_beyond_the_rate_ceiling_get_429() -> None:
    rate = 5
    with SendGridDevServer(faults=Faults(max_requests_per_second=rate)) as capped:
        started = time.monotonic()
        with requests.Session() as session:
            responses = [
                session.post(
                    capped.url + SEND_PATH,
                    json=mail_body(f"u{i}@example.com"),
                    headers=AUTH,
                    timeout=10,
                )
                for i in range(20)
            ]
        elapsed = time.monotonic() - started

        accepted = [r for r in responses if r.status_code == 202]
        limited = [r for r in responses if r.status_code == 429]
        assert len(accepted) + len(limited) == 20
        # A one-second burst, then whatever the ceiling refilled while the loop ran.
        assert rate <= len(accepted) <= rate + math.ceil(rate * elapsed)
        assert all(int(r.headers["Retry-After"]) >= 1 for r in limited)
        assert capped.stats().rate_limited == len(limited)
        assert len(capped.accepted()) == len(accepted)


def test_faults_can_be_changed_at_runtime(server: SendGridDevServer) -> None:
    faults_url = server.url + "/_dev/faults"

    changed = requests.put(faults_url, json={"status_429_every": 1}, timeout=10)
    assert changed.status_code == 200
    assert changed.json()["status_429_every"] == 1
    assert post(server, mail_body("ada@example.com")).status_code == 429

    requests.put(faults_url, json={"status_429_every": 0}, timeout=10)
    assert post(server, mail_body("ada@example.com")).status_code == 202
    assert requests.get(faults_url, timeout=10).json() == Faults().to_json()


@pytest.mark.parametrize(
    "change",
    [{"status_429_evry": 2}, {"delay_seconds": -1}, {"status_5xx_every": 1.5}, [1]],
    ids=["typo", "negative", "fractional count", "not an object"],
)
def test_bad_fault_settings_are_refused(server: SendGridDevServer, change: object) -> None:
    response = requests.put(server.url + "/_dev/faults", json=change, timeout=10)

    assert response.status_code == 400
    assert server.faults == Faults()


def test_faults_dataclass_refuses_bad_values() -> None:
    with pytest.raises(DevServerError):
        Faults(status_429_every=-1)
    assert issubclass(DevServerError, MailroomError)


# -- inspection -------------------------------------------------------------------------------


def test_rendered_message_applies_that_personalizations_substitutions(
    server: SendGridDevServer,
) -> None:
    body = mail_body(
        "ada@example.com",
        "bob@example.com",
        subject="Hi %%name%%",
        content=[
            {"type": "text/plain", "value": "Dear %%name%%, leave: %%unsubscribe_url%%"},
            {"type": "text/html", "value": "<p>Dear %%name|html%%</p>"},
        ],
        headers={"List-Unsubscribe": "<https://example.org/u>"},
    )
    body["personalizations"][0]["substitutions"] = {
        "%%name%%": "Ada",
        "%%name|html%%": "Ada &amp; co",
        "%%unsubscribe_url%%": "https://example.org/u/1",
    }
    body["personalizations"][1]["substitutions"] = {
        "%%name%%": "%%unsubscribe_url%%",
        "%%name|html%%": "Bob",
        "%%unsubscribe_url%%": "https://example.org/u/2",
    }
    message_id = post(server, body).headers["X-Message-Id"]

    first = requests.get(f"{server.url}/_dev/messages/{message_id}/0", timeout=10).json()
    second = requests.get(f"{server.url}/_dev/messages/{message_id}/1", timeout=10).json()

    assert first["subject"] == "Hi Ada"
    assert first["text"] == "Dear Ada, leave: https://example.org/u/1"
    assert first["html"] == "<p>Dear Ada &amp; co</p>"
    assert first["to"] == [{"email": "ada@example.com"}]
    assert first["headers"] == {"List-Unsubscribe": "<https://example.org/u>"}
    # A value that looks like a tag is delivered as written, not substituted again.
    assert second["text"] == "Dear %%unsubscribe_url%%, leave: https://example.org/u/2"
    assert server.rendered(message_id, 1) == second


@pytest.mark.parametrize("suffix", ["{id}/2", "{id}/x", "unknown/0", "{id}/0/extra"])
def test_rendering_something_that_does_not_exist_is_404(
    server: SendGridDevServer, suffix: str
) -> None:
    message_id = post(server, mail_body("ada@example.com")).headers["X-Message-Id"]

    url = f"{server.url}/_dev/messages/{suffix.format(id=message_id)}"
    assert requests.get(url, timeout=10).status_code == 404


def test_messages_page_newest_last_and_delete_resets_everything(
    recording_server: SendGridDevServer, tmp_path: Path
) -> None:
    for i in range(5):
        post(recording_server, mail_body(f"u{i}@example.com"))
    messages_url = recording_server.url + "/_dev/messages"

    page = requests.get(messages_url, params={"offset": 1, "limit": 2}, timeout=10).json()
    assert page["total"] == 5
    assert accepted_recipients(page["messages"]) == ["u1@example.com", "u2@example.com"]
    everything = requests.get(messages_url, timeout=10).json()["messages"]
    assert accepted_recipients(everything)[-1] == "u4@example.com"
    assert requests.get(messages_url, params={"limit": 0}, timeout=10).status_code == 400

    assert requests.delete(messages_url, timeout=10).status_code == 200
    assert requests.get(messages_url, timeout=10).json() == {
        "total": 0,
        "offset": 0,
        "messages": [],
    }
    assert requests.get(recording_server.url + "/_dev/stats", timeout=10).json()["received"] == 0
    assert read_accepted(tmp_path) == []
    post(recording_server, mail_body("again@example.com"))
    assert accepted_recipients(read_accepted(tmp_path)) == ["again@example.com"]


def test_health_stats_and_home_page(server: SendGridDevServer) -> None:
    post(server, mail_body("ada@example.com", subject="<b>Launch</b>"))

    assert requests.get(server.url + "/_dev/health", timeout=10).json() == {"ok": True}
    stats = requests.get(server.url + "/_dev/stats", timeout=10).json()
    assert (stats["accepted"], stats["accepted_recipients"]) == (1, 1)
    home = requests.get(server.url + "/", timeout=10)
    assert home.headers["Content-Type"].startswith("text/html")
    assert "&lt;b&gt;Launch&lt;/b&gt;" in home.text
    assert "<b>Launch</b>" not in home.text


def test_unknown_path_is_404_and_wrong_method_is_405(server: SendGridDevServer) -> None:
    assert requests.get(server.url + "/v3/nope", timeout=10).status_code == 404
    wrong_method = requests.get(server.url + SEND_PATH, timeout=10)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"


# -- connections, concurrency, persistence ----------------------------------------------------


def test_one_keep_alive_connection_carries_many_requests(server: SendGridDevServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    sockets = set()
    for i in range(50):
        payload = json.dumps(mail_body(f"u{i}@example.com"))
        headers = {**AUTH, "Content-Type": "application/json"}
        connection.request("POST", SEND_PATH, body=payload, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 202
        assert response.getheader("Content-Length") == "0"
        sockets.add(id(connection.sock))
    connection.close()

    assert len(sockets) == 1
    assert len(server.accepted()) == 50


def test_concurrent_senders_are_each_recorded_exactly_once(
    recording_server: SendGridDevServer, tmp_path: Path
) -> None:
    senders, per_sender = 8, 25
    failures: list[str] = []

    def send_batch(sender: int) -> None:
        with requests.Session() as session:
            for i in range(per_sender):
                response = session.post(
                    recording_server.url + SEND_PATH,
                    json=mail_body(f"s{sender}-{i}@example.com"),
                    headers=AUTH,
                    timeout=10,
                )
                if response.status_code != 202:
                    failures.append(response.text)

    threads = [threading.Thread(target=send_batch, args=(n,)) for n in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    records = read_accepted(tmp_path)
    expected = sorted(f"s{s}-{i}@example.com" for s in range(senders) for i in range(per_sender))
    assert sorted(accepted_recipients(records)) == expected
    assert len({record["message_id"] for record in records}) == senders * per_sender
    assert records == recording_server.accepted()
    assert recording_server.stats().accepted == senders * per_sender


def test_restarted_server_keeps_what_it_accepted_and_ignores_a_torn_last_line(
    tmp_path: Path,
) -> None:
    with SendGridDevServer(data_dir=tmp_path) as first:
        post(first, mail_body("u0@example.com"))
        post(first, mail_body("u1@example.com"))
    with (tmp_path / ACCEPTED_FILE_NAME).open("ab") as log:
        log.write(b'{"message_id": "half-writ')
    assert accepted_recipients(read_accepted(tmp_path)) == ["u0@example.com", "u1@example.com"]

    with SendGridDevServer(data_dir=tmp_path) as second:
        message_id = post(second, mail_body("u2@example.com")).headers["X-Message-Id"]

        assert accepted_recipients(second.accepted()) == [
            "u0@example.com",
            "u1@example.com",
            "u2@example.com",
        ]
        assert second.rendered(message_id, 0)["to"] == [{"email": "u2@example.com"}]
    assert len(read_accepted(tmp_path)) == 3


def test_read_accepted_names_a_directory_without_a_log(tmp_path: Path) -> None:
    with pytest.raises(DevServerError, match="does not exist"):
        read_accepted(tmp_path)


def test_read_accepted_refuses_a_corrupt_line(tmp_path: Path) -> None:
    (tmp_path / ACCEPTED_FILE_NAME).write_bytes(b"not json\n")

    with pytest.raises(DevServerError, match="line 1"):
        read_accepted(tmp_path)


def test_accepted_recipients_keeps_duplicates_across_records(server: SendGridDevServer) -> None:
    post(server, mail_body("ada@example.com"))
    post(server, mail_body("ada@example.com"))

    assert accepted_recipients(server.accepted()) == ["ada@example.com", "ada@example.com"]


def test_stop_returns_promptly_with_an_idle_keep_alive_client() -> None:
    running = SendGridDevServer().start()
    session = requests.Session()
    assert (
        session.post(
            running.url + SEND_PATH, json=mail_body("ada@example.com"), headers=AUTH, timeout=10
        ).status_code
        == 202
    )

    started = time.monotonic()
    running.stop()

    assert time.monotonic() - started < 2
    assert len(running.accepted()) == 1
    session.close()


def test_url_before_start_is_an_error() -> None:
    with pytest.raises(DevServerError):
        _ = SendGridDevServer().url


# -- the CLI in another process ---------------------------------------------------------------


def _read_ready_line(process: subprocess.Popen[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        process.kill()
        raise AssertionError("the dev server CLI did not report ready in time") from None


def test_cli_server_in_another_process_records_to_the_data_dir(tmp_path: Path) -> None:
    secret = "SG.cli-secret-key"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sendgrid_dev",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
            "--api-key",
            secret,
            "--log-every",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = _read_ready_line(process, timeout=15)
        assert ready.startswith(READY_PREFIX)
        url = ready.removeprefix(READY_PREFIX).strip()
        client = SendGridAPIClient(secret, host=url)
        message = Mail(
            from_email="news@example.org",
            to_emails="ada@example.com",
            subject="Hi",
            plain_text_content="Hi",
        )
        assert client.send(message).status_code == 202
        wrong_key = requests.post(
            url + SEND_PATH,
            json=mail_body("bob@example.com"),
            headers={"Authorization": "Bearer SG.other"},
            timeout=10,
        )
        assert wrong_key.status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)

    assert process.returncode == 0, stderr
    records = read_accepted(tmp_path)
    assert accepted_recipients(records) == ["ada@example.com"]
    assert "requests=2 accepted=1" in stderr
    for secret_text in ("ada@example.com", "bob@example.com", "news@example.org", secret):
        assert secret_text not in stderr


def test_cli_refuses_bad_fault_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sendgrid_dev", "--status-429-every", "-2"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC_DIR)},
        timeout=15,
    )

    assert result.returncode == 2
    assert "status_429_every" in result.stderr
