"""The campaign console on real Airflow processes: its API's permissions, path checks and
cross-site refusals, the DAG run's note, and an operator halting and resuming a send in a real
browser.

It shares the package's local Airflow (``support.gate_airflow``); each scenario is its own run
of its own campaign, sending to its own SendGrid-compatible dev server.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import pytest
import requests

from mailroom.batches import load_manifest
from support.gate_airflow import (
    ARTIFACTS,
    DAG_ID,
    Console,
    GateEnv,
    chromium,
    needs_chromium,
    received,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def run_path(run_id: str) -> str:
    return f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


def test_the_console_api_needs_a_login_edit_permission_for_actions_and_known_names(
    gate: GateEnv,
) -> None:
    run_id = gate.trigger("console_api")
    gate.wait_at_gate(run_id)
    anonymous, viewer, operator = (
        Console(gate, None),
        Console(gate, "viewer"),
        Console(gate, "operator"),
    )
    pages = [
        "/campaigns",
        "/api/runs",
        run_path(run_id),
        f"/api{run_path(run_id)}/progress",
        f"{run_path(run_id)}/preview/en/html",
        f"{run_path(run_id)}/data-docs/gate/index.html",
        f"{run_path(run_id)}/not-sent.csv",
    ]
    for page in pages:
        assert anonymous.get(page).status_code == 401, page
    for action in ("halt", "resume", "resend-unknown"):
        assert anonymous.act(run_id, action).status_code == 401, action

    # Read permission sees every page but the download, and none of them shows an address.
    for page in pages[:-1]:
        answer = viewer.get(page)
        assert answer.status_code == 200, (page, answer.text[:300])
        shown = answer.text.lower()
        assert not [a for a in gate.audience.expected if a.lower() in shown], page
    listed = {r["run_id"]: r for r in viewer.get("/api/runs").json()}
    assert listed[run_id]["state"] == "awaiting approval"
    assert listed[run_id]["triggered_by"] == "analyst"
    assert viewer.get("/api/runs?state=sent&campaign=console_api").json() == []
    # …and may not act or download.
    for action in ("halt", "resume", "resend-unknown"):
        assert viewer.act(run_id, action).status_code == 403, action
    assert viewer.get(f"{run_path(run_id)}/not-sent.csv").status_code == 403

    # Names the run's folder does not hold are 404, however they are spelt.
    for page in (
        f"/dags/{DAG_ID}/runs/{quote('../../' + run_id, safe='')}",
        f"/dags/{DAG_ID}/runs/..",
        f"/dags/{DAG_ID}/runs/{quote('..%2F..%2Fconsole_api', safe='')}",
        f"/dags/other_dag/runs/{quote(run_id, safe='')}",
        f"{run_path(run_id)}/preview/{quote('../approval', safe='')}/html",
        f"{run_path(run_id)}/preview/{quote('../../run', safe='')}/html",
        f"{run_path(run_id)}/preview/xx/html",
        f"{run_path(run_id)}/preview/en/json",
        f"{run_path(run_id)}/data-docs/gate/{quote('../../run.json', safe='')}",
        f"{run_path(run_id)}/data-docs/gate/%2E%2E/%2E%2E/run.json",
        f"{run_path(run_id)}/data-docs/audience/..%2F..%2Fapproval.json",
        f"{run_path(run_id)}/data-docs/{quote('../gate', safe='')}/index.html",
        f"{run_path(run_id)}/data-docs/report/index.html",
        "/static/..%2Fapp.py",
    ):
        answer = operator.get(page)
        assert answer.status_code == 404, (page, answer.status_code, answer.text[:200])
    assert operator.act(run_id, "delete-everything").status_code == 404

    # The preview is a sandbox: no script, nothing fetched.
    preview = viewer.get(f"{run_path(run_id)}/preview/en/html")
    policy = preview.headers["Content-Security-Policy"]
    assert policy.startswith("sandbox")
    assert "default-src 'none'" in policy
    assert "script-src" not in policy

    # An action authenticated by the browser's cookie needs the page's CSRF token and this origin.
    cookie_only = requests.Session()
    cookie_only.cookies.set("_token", operator.token)
    url = f"{operator.base}/api{run_path(run_id)}/actions/halt"
    body = {"reason": "cross-site", "confirm": True}
    assert cookie_only.post(url, json=body, timeout=30).status_code == 403
    token = hashlib.sha256(b"mailroom-console-csrf\0" + operator.token.encode()).hexdigest()
    forged = cookie_only.post(
        url,
        json=body,
        headers={"X-Mailroom-CSRF": token, "Origin": "https://evil.example"},
        timeout=30,
    )
    assert forged.status_code == 403
    assert not gate.api("admin").dag_run(DAG_ID, run_id).get("note")
    assert operator.act(run_id, "halt", "unconfirmed").status_code == 200
    assert operator.act(run_id, "halt").status_code == 409  # already halted

    # The operator downloads who was not sent to: everyone, addresses in full.
    csv_text = operator.get(f"{run_path(run_id)}/not-sent.csv").text
    assert csv_text.splitlines()[0] == "user_id,email,state,reason"
    assert len(csv_text.splitlines()) - 1 >= len(gate.audience.expected) * 0.9

    # Reject: the run ends green in Airflow, and says REJECTED in its note and in the console.
    approver = gate.api("approver")
    approver.answer(DAG_ID, run_id, "approve", "Reject")
    assert gate.wait_finished(run_id) == "success"
    note = gate.wait(
        "the run's note", lambda: gate.api("admin").dag_run(DAG_ID, run_id).get("note")
    )
    assert note.startswith("REJECTED by approver"), note
    listed = {r["run_id"]: r for r in viewer.get("/api/runs").json()}
    assert listed[run_id]["state"] == "rejected"
    assert listed[run_id]["decided_by"] == "approver"
    assert gate.servers["console_api"].stats().received == 0


def test_an_operator_resends_the_unknown_requests_through_the_console_api(gate: GateEnv) -> None:
    """Answers lost after the server accepted two requests leave them unknown; the operator's
    explicit resend sends exactly those again (their recipients get it twice, as the action
    warns), clears the run's send tasks through Airflow, and the run ends sent."""
    from sendgrid_dev.faults import Faults

    server = gate.servers["console_unknown"]
    server.set_faults(Faults(drop_after_accept_every=3))
    run_id = gate.trigger("console_unknown", shards=1)
    gate.wait_at_gate(run_id)
    time.sleep(2)  # an answer within ~1 s of awaiting_input can fail the task (Airflow 3.3.2)
    gate.api("approver").answer(DAG_ID, run_id, "approve", "Approve")
    assert gate.wait_finished(run_id) == "failed"  # reconcile: incomplete, two unknown
    viewer, operator = Console(gate, "viewer"), Console(gate, "operator")
    progress = viewer.get(f"/api{run_path(run_id)}/progress").json()
    assert progress["state"] == "incomplete"
    assert progress["overall"]["requests"]["unknown"] == 2
    unknown = progress["overall"]["recipients"]["unknown"]
    first_time = Counter(received(server))
    server.set_faults(Faults())

    assert viewer.act(run_id, "resend-unknown").status_code == 403
    answer = operator.act(run_id, "resend-unknown", "checked the activity feed: not delivered")
    assert answer.status_code == 200, answer.text
    assert answer.json()["cleared"]["ok"] is True
    assert answer.json()["action"]["by"] == "operator"
    assert gate.wait_finished(run_id) == "success"

    got = received(server)
    twice = {a for a, n in got.items() if n == 2}
    assert len(twice) == unknown  # exactly the unknown requests' recipients, once more
    assert set(got) == set(first_time)
    assert max(got.values()) == 2
    assert operator.act(run_id, "resend-unknown").status_code == 409  # nothing unknown now
    note = gate.wait(
        "the run's note",
        lambda: (n := gate.api("admin").dag_run(DAG_ID, run_id).get("note")) and "SENT" in n and n,
    )
    assert note.startswith("SENT"), note


@needs_chromium
def test_an_operator_watches_halts_and_resumes_a_send_in_the_browser(
    gate: GateEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    campaign = "console_steer"
    server = gate.servers[campaign]
    run_id = gate.trigger(campaign)
    gate.wait_at_gate(run_id)
    time.sleep(2)  # an answer within ~1 s of awaiting_input can fail the task (Airflow 3.3.2)
    gate.api("approver").answer(DAG_ID, run_id, "approve", "Approve")
    progress_url = f"{gate.airflow.url}/mailroom/api{run_path(run_id)}/progress"
    viewer = Console(gate, "viewer")

    def progress() -> dict[str, Any]:
        return dict(viewer.session.get(progress_url, timeout=30).json())

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = chromium("1400,1600")
    wait = WebDriverWait(driver, 90)

    def in_console() -> None:
        driver.switch_to.default_content()
        frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe")))
        driver.switch_to.frame(frame)

    def sent_on_page() -> int:
        return int(driver.find_element(By.CSS_SELECTOR, "[data-field=sent]").text.replace(",", ""))

    def act(action: str, reason: str) -> None:
        driver.find_element(By.CSS_SELECTOR, f"button[data-action={action}]").click()
        dialog = wait.until(ec.visibility_of_element_located((By.ID, "confirm")))
        dialog.find_element(By.NAME, "reason").send_keys(reason)
        dialog.find_element(By.CSS_SELECTOR, "button[value=confirm]").click()
        wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, "[data-field=action-result]").is_displayed()
        )
        result = driver.find_element(By.CSS_SELECTOR, "[data-field=action-result]").text
        assert "recorded" in result, result

    try:
        driver.get(f"{gate.airflow.url}/")
        user = wait.until(ec.element_to_be_clickable((By.NAME, "username")))
        user.send_keys("operator")
        driver.find_element(By.NAME, "password").send_keys(gate.passwords["operator"])
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda d: "/auth/login" not in d.current_url)

        # The list, from the navigation entry the plugin adds.
        driver.get(f"{gate.airflow.url}/plugin/campaigns")
        in_console()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"tr[data-run='{run_id}']")))
        time.sleep(0.5)
        driver.switch_to.default_content()
        driver.save_screenshot(str(ARTIFACTS / "console-campaigns.png"))

        # The run's tab: the sent count rises on its own.
        driver.get(f"{gate.airflow.url}{run_path(run_id)}/plugin/campaign")
        in_console()
        wait.until(lambda d: sent_on_page() > 0)
        first = sent_on_page()
        wait.until(lambda d: sent_on_page() > first)
        driver.switch_to.default_content()
        driver.save_screenshot(str(ARTIFACTS / "console-run-sending.png"))
        in_console()

        # Halt: the shards stop before their next request; the rest is halted.
        act("halt", "wrong footer, checking with legal")
        halted = gate.wait(
            "the shards to stop",
            lambda: (
                (p := progress())["state"] == "halted"
                and p["overall"]["requests"]["sending"] == 0
                and p["overall"]["requests"]["halted"] > 0
                and p
            ),
            timeout=120,
        )
        at_halt = server.stats().received
        time.sleep(4)
        assert server.stats().received == at_halt, "a request left after the halt"
        assert 0 < halted["sent"] < halted["total"]

        # Resume: the halted requests are sent, nothing twice.
        driver.refresh()
        in_console()
        act("resume", "footer confirmed")
        assert gate.wait_finished(run_id, timeout=240) == "success"
        gate.wait("the console to say sent", lambda: progress()["state"] == "sent")

        # What was approved: the preview in its sandbox and the Data Docs of both checks.
        driver.refresh()
        in_console()
        preview = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#preview-en")))
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", preview)
        assert driver.find_element(By.CSS_SELECTOR, "[data-field=manifest]").text == (
            load_manifest(gate.folder(campaign, run_id).manifest).sha256
        )
        frame = preview.find_element(By.TAG_NAME, "iframe")
        assert frame.get_attribute("sandbox") == ""
        time.sleep(1)
        driver.switch_to.default_content()
        driver.save_screenshot(str(ARTIFACTS / "console-preview.png"))
        in_console()
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "#preview-en iframe"))
        assert "***@" in driver.page_source or "MASKED" in driver.page_source
        in_console()
        for check in ("audience", "gate"):
            href = driver.find_element(By.CSS_SELECTOR, f"a[data-docs={check}]").get_attribute(
                "href"
            )
            driver.switch_to.default_content()
            driver.get(href)
            assert "Data Docs" in driver.title or "Great Expectations" in driver.page_source
            driver.back()
            in_console()
        with capsys.disabled():
            print(f"\nscreenshots of the campaign console in {ARTIFACTS}")
    finally:
        driver.quit()

    got = received(server)
    assert set(got) == gate.audience.expected
    assert max(got.values()) == 1
    report_dir = gate.folder(campaign, run_id).root
    latest = json.loads((report_dir / "reports" / "2.json").read_text())
    history = [(h["action"], h["by"]) for h in latest["history"]]
    assert history == [("halt", "operator"), ("resume", "operator")]
    audit = sorted(p.name for p in (report_dir / "audit").glob("*.json"))
    assert audit == ["0001-halt.json", "0002-resume.json"]
    note = gate.api("admin").dag_run(DAG_ID, run_id).get("note") or ""
    everyone = len(gate.audience.expected)
    assert note.startswith(f"SENT: {everyone:,} of {everyone:,} recipients sent"), note
