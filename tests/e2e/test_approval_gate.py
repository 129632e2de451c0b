"""The approval gate with real Airflow processes, REST and a real browser.

The local Airflow of ``support.gate_airflow`` serves every end-to-end test of the package; every
scenario is its own DAG run of its own test campaign, which sends through its own Airflow
connection to its own SendGrid-compatible dev server, so "nothing reached the server" is exact.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any
from urllib.parse import quote

import pytest

from mailroom.batches import load_manifest
from mailroom.cli.airflow_api import AirflowApiError
from mailroom.cli.approvals import Approvals
from support.gate_airflow import (
    ARTIFACTS,
    DAG_ID,
    FINISHED,
    Console,
    GateEnv,
    chromium,
    needs_chromium,
    received,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_approved_run_sends_everyone_exactly_once(
    gate: GateEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = gate.trigger("gate_approve")
    gate.wait_at_gate(run_id)

    code, listed = gate.cli(capsys, "list", "--user", "approver")
    assert code == 0, listed
    assert run_id in listed
    code, shown = gate.cli(capsys, "show", run_id, "--user", "approver")
    assert code == 0, shown
    body = Approvals(gate.api("approver")).get(run_id).body
    assert body in shown  # the same summary the UI shows
    for expected in ("triggered by **analyst**", "### Preview", "**PASSED**", "### Who may"):
        assert expected in body
    manifest = json.loads(gate.folder("gate_approve", run_id).manifest.read_text())
    assert manifest["batch_count"] >= 5
    assert load_manifest(gate.folder("gate_approve", run_id).manifest).sha256 in body

    code, out = gate.cli(capsys, "approve", run_id, "--user", "approver")
    assert code == 0, out
    assert "answered Approve by approver" in out

    assert gate.wait_finished(run_id) == "success"
    got = received(gate.servers["gate_approve"])
    assert set(got) == gate.audience.expected
    assert max(got.values()) == 1
    report = gate.report("gate_approve", run_id)
    assert report["status"] == "sent"
    assert report["approval"]["decision"] == "approved"
    assert report["approval"]["by"] == "approver"
    assert report["approval"]["at"]


def test_four_eyes_refuses_the_trigger_and_outsiders_then_reject_sends_nothing(
    gate: GateEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    # The Variable lists analyst and approver; analyst triggers, so only approver is assigned.
    run_id = gate.trigger("gate_reject", user="analyst")
    gate.wait_at_gate(run_id)
    assert Approvals(gate.api("admin")).get(run_id).assignees == ("approver",)

    for user in ("analyst", "admin"):  # the triggering user; a user who is not an approver
        with pytest.raises(AirflowApiError) as refused:
            gate.api(user).answer(DAG_ID, run_id, "approve", "Approve")
        assert refused.value.status == 403
        code, out = gate.cli(capsys, "approve", run_id, "--user", user)
        assert code == 1
        assert f"{user!r} may not answer run {run_id}: its approvers are approver" in out
    assert not Approvals(gate.api("admin")).get(run_id).answered

    code, out = gate.cli(capsys, "reject", run_id, "--user", "approver")
    assert code == 0, out
    assert gate.wait_finished(run_id) == "success"
    assert gate.servers["gate_reject"].stats().received == 0
    report = gate.report("gate_reject", run_id)
    assert report["status"] == "rejected"
    assert report["approval"]["decision"] == "rejected"
    assert report["approval"]["by"] == "approver"
    assert report["outbox"]["sent"]["recipients"] == 0
    states = gate.task_states(run_id)
    assert states["send_shard"] == "skipped"
    assert states["reconcile"] == "success"
    assert "campaign REJECTED: REJECTED by approver" in gate.task_log(run_id, "reconcile")
    # A second answer is refused: the decision stands.
    code, out = gate.cli(capsys, "approve", run_id, "--user", "approver")
    assert code == 1
    assert "already answered Reject by approver" in out


def test_no_answer_in_time_counts_as_reject(gate: GateEnv) -> None:
    run_id = gate.run_of("gate_timeout")
    assert gate.wait_finished(run_id) == "success"
    assert gate.servers["gate_timeout"].stats().received == 0
    report = gate.report("gate_timeout", run_id)
    assert report["status"] == "timed_out"
    assert report["approval"]["decision"] == "timed_out"
    assert report["approval"]["by"] is None
    states = gate.task_states(run_id)
    assert states["approve"] == "success"  # the default answer, Reject, after the timeout
    assert states["send_shard"] == "skipped"
    assert "campaign TIMED_OUT: TIMED OUT without an answer" in gate.task_log(run_id, "reconcile")
    # The run is green in Airflow; its note and the campaign console say what happened.
    note = gate.wait(
        "the run's note", lambda: gate.api("admin").dag_run(DAG_ID, run_id).get("note")
    )
    assert note.startswith("TIMED OUT: nobody answered the approval in time"), note
    listed = Console(gate, "viewer").get("/api/runs").json()
    assert {r["run_id"]: r["state"] for r in listed}[run_id] == "timed out"


def test_a_batch_changed_after_the_summary_is_refused_before_any_request(gate: GateEnv) -> None:
    run_id = gate.trigger("gate_tamper", shards=1)
    gate.wait_at_gate(run_id)
    folder = gate.folder("gate_tamper", run_id)
    manifest = json.loads(folder.manifest.read_text("utf-8"))
    assert manifest["batch_count"] == 1
    frozen = folder.batches_dir / manifest["batches"][0]["file"]
    body = json.loads(frozen.read_bytes())
    body["subject"] = "URGENT: confirm your password at https://phish.example"
    frozen.write_bytes(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())

    Approvals(gate.api("approver")).answer(run_id, "Approve")
    assert gate.wait_finished(run_id) == "failed"
    assert gate.servers["gate_tamper"].stats().received == 0
    report = gate.report("gate_tamper", run_id)
    assert report["approval"]["decision"] == "approved"
    assert report["status"] == "incomplete"
    assert report["outbox"]["sent"]["recipients"] == 0
    assert report["outbox"]["failed"]["recipients"] == manifest["batches"][0]["recipients"]
    not_sent = (folder.root / "not_sent.csv").read_text("utf-8")
    assert "envelope guard" in not_sent
    assert "not in the approved manifest" in not_sent or "digest" in not_sent
    # The guard's pass refused it before any shard started (no retry: the same bytes would be
    # refused again); reconcile fails the run, saying why.
    states = gate.task_states(run_id)
    assert states["guard_shard"] == "failed"
    assert states["send_shard"] == "upstream_failed"
    assert states["reconcile"] == "failed"
    log = gate.task_log(run_id, "reconcile")
    assert "campaign INCOMPLETE: APPROVED by approver" in log
    assert "campaign run ended incomplete" in log


def test_a_run_nobody_else_may_approve_fails_at_the_gate(gate: GateEnv) -> None:
    run_id = gate.run_of("gate_nobody", user="analyst")
    assert gate.wait_finished(run_id) == "failed"
    states = gate.task_states(run_id)
    assert states["approve"] == "failed"
    assert "no eligible approver for campaign 'gate_nobody'" in gate.task_log(run_id, "approve")
    assert gate.servers["gate_nobody"].stats().received == 0
    report = gate.report("gate_nobody", run_id)
    assert report["status"] == "not_approved"
    listed = Console(gate, "viewer").get("/api/runs?campaign=gate_nobody").json()
    assert [(r["run_id"], r["state"]) for r in listed] == [(run_id, "failed")]
    note = gate.wait(
        "the run's note", lambda: gate.api("admin").dag_run(DAG_ID, run_id).get("note")
    )
    assert note.startswith("NOT APPROVED"), note


@needs_chromium
def test_approver_approves_in_the_airflow_ui(
    gate: GateEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    run_id = gate.trigger("gate_browser")
    gate.wait_at_gate(run_id)
    digest = load_manifest(gate.folder("gate_browser", run_id).manifest).sha256

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "approval.png"
    driver = chromium()
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(f"{gate.airflow.url}/")
        user = wait.until(ec.element_to_be_clickable((By.NAME, "username")))
        user.send_keys("approver")
        driver.find_element(By.NAME, "password").send_keys(gate.passwords["approver"])
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda d: "/auth/login" not in d.current_url)

        driver.get(
            f"{gate.airflow.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
            "/tasks/approve/required_actions?map_index=-1"
        )
        wait.until(ec.presence_of_element_located((By.XPATH, f"//*[contains(., '{digest}')]")))
        page = driver.find_element(By.TAG_NAME, "body").text
        for expected in ("Send campaign gate_browser?", "Audience", "Data quality", "Preview"):
            assert expected in page, expected
        # The summary's top (what is sent, to how many, checked how) as the artifact…
        heading = driver.find_element(By.XPATH, "//h2[contains(., 'gate_browser')]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", heading)
        time.sleep(0.5)
        driver.save_screenshot(str(shot))
        with capsys.disabled():
            print(f"\nscreenshot of the approval page: {shot}")
        # …and its end, where the approver answers.
        approve = wait.until(
            ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Approve']"))
        )
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", approve)
        time.sleep(0.5)
        driver.save_screenshot(str(ARTIFACTS / "approval-answer.png"))
        approve.click()
        gate.wait(
            "the answer to be recorded",
            lambda: gate.folder("gate_browser", run_id).approval.exists(),
        )
    finally:
        driver.quit()

    assert gate.wait_finished(run_id) == "success"
    report = gate.report("gate_browser", run_id)
    assert report["approval"]["decision"] == "approved"
    assert report["approval"]["by"] == "approver"
    assert report["status"] == "sent"
    got = received(gate.servers["gate_browser"])
    assert set(got) == gate.audience.expected
    assert max(got.values()) == 1


def test_clearing_a_finished_run_resends_nothing_and_changes_no_file(gate: GateEnv) -> None:
    """What an operator does by mistake: clear a sent run in Airflow. Every task runs again under
    the same run id; the frozen run refuses at ``prepare`` (``mailroom.run_record``), and the run
    folder stays byte for byte as it was."""
    run_id = gate.trigger("gate_clear", shards=1)
    gate.wait_at_gate(run_id)
    time.sleep(2)  # an answer within ~1 s of awaiting_input can fail the task (PLATFORM_NOTES)
    Approvals(gate.api("approver")).answer(run_id, "Approve")
    assert gate.wait_finished(run_id) == "success", gate.task_states(run_id)
    server = gate.servers["gate_clear"]
    requests = server.stats().received
    assert requests > 0
    root = gate.folder("gate_clear", run_id).root

    def files() -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    before = files()
    assert {"run.json", "frozen.json", "report.json", "approval.json"} <= set(before)

    gate.api("admin").request(
        "POST",
        f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/clear",
        json={"dry_run": False, "only_failed": False},
    )

    def prepare_ran_again() -> bool:
        tis = {ti["task_id"]: ti for ti in gate.api("admin").task_instances(DAG_ID, run_id)}
        return tis["prepare"].get("try_number", 0) >= 2 and gate.run_state(run_id) in FINISHED

    gate.wait("the cleared run to run again and finish", prepare_ran_again)
    assert gate.run_state(run_id) == "failed"
    states = gate.task_states(run_id)
    assert states["prepare"] == "failed"
    assert states["send_shard"] in {"upstream_failed", "skipped"}
    assert "is frozen" in gate.task_log(run_id, "prepare", try_number=2)
    assert server.stats().received == requests
    assert files() == before


def test_triggering_a_campaign_twice_sends_nothing_twice_unless_asked_with_a_reason(
    gate: GateEnv,
) -> None:
    """The second run of a campaign leaves out everyone the first sent to, sends 0 requests and
    says why; a third, triggered with the resend option and a reason, sends again, and its
    approver reads that before answering."""
    server = gate.servers["gate_twice"]
    approvals = Approvals(gate.api("approver"))

    def run(conf: dict[str, Any]) -> tuple[str, str]:
        run_id = gate.api("analyst").trigger(
            DAG_ID, {"campaign": "gate_twice", "dry_run": False, "shards": 1, **conf}
        )
        gate.wait_at_gate(run_id)
        body = approvals.get(run_id).body
        approvals.answer(run_id, "Approve")
        assert gate.wait_finished(run_id) == "success"
        return run_id, body

    first, _ = run({})
    requests = server.stats().received
    everyone = gate.report("gate_twice", first)["outbox"]["sent"]["recipients"]
    assert requests > 0

    second, body = run({})
    assert server.stats().received == requests  # 0 requests
    assert f"**{everyone:,} already sent**" in body
    report = gate.report("gate_twice", second)
    assert report["left_out"]["already_sent"] == everyone
    assert report["staged"]["recipients"] == 0
    assert report["status"] == "nothing_to_send"
    assert report["balanced"] is True

    reason = "the first send named the wrong maintenance window"
    third, body = run({"resend_to_earlier_recipients": True, "resend_reason": reason})
    assert "RESEND requested" in body
    assert reason in body
    assert gate.report("gate_twice", third)["left_out"]["resend_reason"] == reason
    assert sum(received(server).values()) == 2 * everyone
