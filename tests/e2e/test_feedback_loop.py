"""The feedback loop on real processes: a campaign sent through the local Airflow, SendGrid's
signed events and one-click unsubscribes posted to ``mailroom feedback serve`` on a port, and a
second campaign to the same audience that leaves out exactly the people they named.

It shares the package's local Airflow (``support.gate_airflow``) and its outbox.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from mailroom.addresses import address_key
from mailroom.delivery.outbox import Outbox
from support.feedback_service import public_key_text, signed_headers, start_feedback_service
from support.gate_airflow import DAG_ID, UNSUBSCRIBE_SECRET, Console, GateEnv, received
from support.processes import stop_process_group

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

EVENTS_PER_POST = 1000  # as SendGrid batches them


class Feedback:
    """``mailroom feedback serve`` on the shared Airflow's outbox, and SendGrid's signing key."""

    def __init__(self, url: str, key: ec.EllipticCurvePrivateKey) -> None:
        self.url, self.key = url, key

    def post_events(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers = []
        for start in range(0, len(events), EVENTS_PER_POST):
            body = json.dumps(events[start : start + EVENTS_PER_POST]).encode()
            answer = requests.post(
                f"{self.url}/webhooks/sendgrid",
                data=body,
                headers=signed_headers(self.key, body),
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            answers.append(answer.json())
        return answers


@pytest.fixture(scope="module")
def feedback(gate: GateEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feedback]:
    key = ec.generate_private_key(ec.SECP256R1())
    log = tmp_path_factory.mktemp("feedback") / "service.log"
    gate.staging_root.mkdir(parents=True, exist_ok=True)  # the outbox's folder
    env = {
        "MAILROOM_UNSUBSCRIBE_SECRETS": UNSUBSCRIBE_SECRET,
        "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY": public_key_text(key),
    }
    process, url = start_feedback_service(gate.outbox_url, env, log)
    try:
        assert process.poll() is None, log.read_text()
        yield Feedback(url, key)
    finally:
        stop_process_group(process)
        print(log.read_text("utf-8", "replace")[-3000:])


def send(gate: GateEnv, campaign: str) -> str:
    run_id = gate.trigger(campaign, shards=1)
    gate.wait_at_gate(run_id)
    time.sleep(2)  # an answer within ~1 s of awaiting_input can fail the task (Airflow 3.3.2)
    gate.api("approver").answer(DAG_ID, run_id, "approve", "Approve")
    gate.wait_finished(run_id)
    return run_id


def test_bounces_complaints_and_one_click_unsubscribes_leave_people_out_of_the_next_campaign(
    gate: GateEnv, feedback: Feedback
) -> None:
    from sendgrid_dev.faults import Faults

    # 1. Send the demo campaign; the answers to some requests are lost after SendGrid took them.
    first = gate.servers["feedback_first"]
    first.set_faults(Faults(drop_after_accept_every=4))
    run_id = send(gate, "feedback_first")
    first.set_faults(Faults())
    run_key = f"feedback_first/{run_id}"
    operator = Console(gate, "operator")
    progress = operator.get(f"/api/dags/{DAG_ID}/runs/{run_id}/progress").json()
    unknown = progress["overall"]["requests"]["unknown"]
    assert unknown >= 1, progress["overall"]

    # 2. SendGrid's events for every recipient of every request it took: 5 % bounce, 1 % report
    # spam, the rest are delivered. 3. 2 % unsubscribe with one click, through their own link.
    people: list[tuple[str, dict[str, Any], str, str]] = []  # address, custom args, id, link
    for record in first.accepted():
        body = record["body"]
        for item in body["personalizations"]:
            link = item["headers"]["List-Unsubscribe"].split(",")[0].strip().strip("<>")
            people.append((item["to"][0]["email"], body["custom_args"], record["message_id"], link))
    people.sort()
    assert len(people) == len(set(received(first))) > 300
    n = len(people)
    bounced = people[: n * 5 // 100]
    complained = people[len(bounced) : len(bounced) + n // 100]
    clicked = people[len(bounced) + len(complained) : len(bounced) + len(complained) + n * 2 // 100]
    events: list[dict[str, Any]] = []
    for i, (email, custom_args, message_id, _) in enumerate(people):
        base = {"email": email, "sg_message_id": f"{message_id}.filter0{i}", **custom_args}
        events.append({**base, "event": "processed", "sg_event_id": f"p-{i}", "timestamp": 1})
        if i < len(bounced):
            events.append(
                {
                    **base,
                    "event": "bounce",
                    "type": "bounce",
                    "sg_event_id": f"b-{i}",
                    "timestamp": 2,
                    "reason": "550 5.1.1 The email account does not exist",
                }
            )
        else:
            events.append({**base, "event": "delivered", "sg_event_id": f"d-{i}", "timestamp": 2})
        if len(bounced) <= i < len(bounced) + len(complained):
            events.append({**base, "event": "spamreport", "sg_event_id": f"s-{i}", "timestamp": 3})
    answers = feedback.post_events(events)
    assert sum(a["new"] for a in answers) == len(events)
    assert sum(a["matched"] for a in answers) == len(events)
    assert sum(a["settled_requests"] for a in answers) == unknown
    # SendGrid delivers some events more than once: posting them all again changes nothing.
    assert sum(a["new"] for a in feedback.post_events(events)) == 0

    for _, _, _, link in clicked:
        path = urlparse(link).path
        assert path.startswith("/u/")
        page = requests.get(f"{feedback.url}{path}", timeout=10)  # a mail scanner's fetch
        assert page.status_code == 200
        answer = requests.post(
            f"{feedback.url}{path}",
            data="List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 200

    # The requests left unknown are settled from the events: nothing is resent. The console
    # shows what came back.
    progress = operator.get(f"/api/dags/{DAG_ID}/runs/{run_id}/progress").json()
    assert progress["overall"]["requests"]["unknown"] == 0
    assert progress["delivery_feedback"]["total"] == {
        "delivered": n - len(bounced),
        "bounced": len(bounced),
        "dropped": 0,
        "complained": len(complained),
        "unsubscribed": len(clicked),
    }
    assert operator.act(run_id, "resend-unknown").status_code == 409
    outbox = Outbox(gate.outbox_url)
    try:
        history = outbox.actions(run_key)
        assert [h["action"] for h in history] == ["settle_by_events"] * len(history)
        assert sum(len(h["requests"]) for h in history) == unknown
        feedback_counts = outbox.delivery_feedback(run_key)
        total = {k: sum(v[k] for v in feedback_counts.values()) for k in ("bounced", "complained")}
        assert total == {"bounced": len(bounced), "complained": len(complained)}
        listed = {s.email: s.reason for s in outbox.suppressions()}
    finally:
        outbox.dispose()
    out = {email.lower() for email, *_ in [*bounced, *complained, *clicked]}
    assert {e: listed[e] for e in out} == {
        **{e.lower(): "bounced" for e, *_ in bounced},
        **{e.lower(): "spam_report" for e, *_ in complained},
        **{e.lower(): "unsubscribed" for e, *_ in clicked},
    }

    # 4. A second campaign to the same audience leaves out exactly those people, and says why.
    second_run = send(gate, "feedback_second")
    got = set(received(gate.servers["feedback_second"]))
    assert got == {email.lower() for email, *_ in people} - out
    report = gate.report("feedback_second", second_run)
    assert report["status"] == "sent"
    # Counted by audience row: the sample audience spells some people twice.
    keys = [
        address_key(e)
        for (e,) in sqlite3.connect(gate.audience.path).execute("SELECT email FROM users")
    ]
    rows = Counter(k for k in keys if k)
    assert report["audience"]["suppressed_by_reason"] == {
        **{
            k: v
            for k, v in report["audience"]["suppressed_by_reason"].items()
            if not k.startswith("list:")
        },
        "list:bounced": sum(rows[e.lower()] for e, *_ in bounced),
        "list:spam_report": sum(rows[e.lower()] for e, *_ in complained),
        "list:unsubscribed": sum(rows[e.lower()] for e, *_ in clicked),
    }
