"""The approval gate with real Airflow processes, REST and a real browser.

One local Airflow (api-server, scheduler, dag-processor on SQLite) serves the whole module; every
scenario is its own DAG run of its own test campaign, which sends through its own Airflow
connection to its own SendGrid-compatible dev server, so "nothing reached the server" is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from mailroom.audience.sample import SampleAudience, generate
from mailroom.batches import load_manifest
from mailroom.cli.airflow_api import AirflowApi, AirflowApiError
from mailroom.cli.approvals import Approvals
from mailroom.cli.local_airflow import LocalAirflow, free_port
from mailroom.cli.main import main as mailroom
from mailroom.staging import RunStaging
from sendgrid_dev import SendGridDevServer, accepted_recipients

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
DAG_ID = "mailroom_campaign"
USERS = 600
API_KEY = "SG.e2e-gate"
ARTIFACTS = Path(os.environ.get("MAILROOM_TEST_ARTIFACTS", REPO / "var" / "test-artifacts"))
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FINISHED = {"success", "failed"}
# Runs nobody answers end by themselves: the module starts them first (test name → campaign).
BACKGROUND = {
    "test_no_answer_in_time_counts_as_reject": "gate_timeout",
    "test_a_run_nobody_else_may_approve_fails_at_the_gate": "gate_nobody",
}

# Each scenario's campaign: changes to include/campaigns/winter_update.yaml.
SCENARIOS: dict[str, dict[str, Any]] = {
    "gate_approve": {"batch_size": 100},
    "gate_reject": {"batch_size": 100},
    "gate_timeout": {"batch_size": 100, "response_timeout_hours": 0.004},  # ~14 s
    "gate_tamper": {"locales": ["en"], "batch_size": 1000},  # one request
    "gate_nobody": {"approvers": ["analyst"]},
    "gate_browser": {"batch_size": 200},
    "gate_clear": {"batch_size": 200},
    "gate_twice": {"batch_size": 200},
}


@dataclass
class GateEnv:
    airflow: LocalAirflow
    staging_root: Path
    audience: SampleAudience
    servers: dict[str, SendGridDevServer]
    passwords: dict[str, str] = field(default_factory=dict)
    background: dict[str, str] = field(default_factory=dict)  # campaign → run started early

    def run_of(self, campaign: str, user: str = "analyst") -> str:
        return self.background.get(campaign) or self.trigger(campaign, user=user)

    def api(self, user: str) -> AirflowApi:
        return AirflowApi(self.airflow.url, user, self.passwords[user])

    def trigger(self, campaign: str, user: str = "analyst", shards: int = 2) -> str:
        return self.api(user).trigger(
            DAG_ID, {"campaign": campaign, "dry_run": False, "shards": shards}
        )

    def task_states(self, run_id: str) -> dict[str, str]:
        """Each task's state; a mapped task's differing shard states joined with commas."""
        states: dict[str, str] = {}
        for ti in self.api("admin").task_instances(DAG_ID, run_id):
            key, state = ti["task_id"], ti.get("state") or "none"
            if key in states and state not in states[key].split(","):
                state = f"{states[key]},{state}"
            states[key] = state
        return states

    def run_state(self, run_id: str) -> str:
        return str(self.api("admin").dag_run(DAG_ID, run_id)["state"])

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 240) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(1)

    def wait_at_gate(self, run_id: str) -> None:
        def parked() -> bool:
            states = self.task_states(run_id)
            if self.run_state(run_id) in FINISHED:
                raise AssertionError(f"run {run_id} ended before the gate: {states}")
            return states.get("approve") == "awaiting_input"

        self.wait(f"run {run_id} to reach the approval gate", parked)

    def wait_finished(self, run_id: str, timeout: float = 240) -> str:
        return str(
            self.wait(
                f"run {run_id} to finish",
                lambda: (s := self.run_state(run_id)) in FINISHED and s,
                timeout=timeout,
            )
        )

    def folder(self, campaign: str, run_id: str) -> RunStaging:
        return RunStaging.for_run(self.staging_root, campaign, run_id)

    def report(self, campaign: str, run_id: str) -> dict[str, Any]:
        return dict(json.loads(self.folder(campaign, run_id).report.read_text("utf-8")))

    def task_log(self, run_id: str, task_id: str, try_number: int = 1) -> str:
        data = self.api("admin").request(
            "GET",
            f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
            f"/logs/{try_number}",
            params={"full_content": True},
        )
        content = data.get("content") if isinstance(data, dict) else data
        if isinstance(content, list):
            return "\n".join(
                json.dumps(e, ensure_ascii=False) if isinstance(e, dict) else str(e)
                for e in content
            )
        return str(content)

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = mailroom(
            [
                "approvals",
                *args,
                "--airflow-url",
                self.airflow.url,
                "--password-file",
                str(self.airflow.passwords_file),
            ]
        )
        out = capsys.readouterr()
        return code, out.out + out.err


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GateEnv]:
    tmp = tmp_path_factory.mktemp("gate")
    include = tmp / "include"
    shutil.copytree(REPO / "include", include)
    base = yaml.safe_load((include / "campaigns" / "winter_update.yaml").read_text("utf-8"))
    for name, changes in SCENARIOS.items():
        spec = {**base, **changes, "name": name, "connection_id": f"mailroom_sendgrid_{name}"}
        (include / "campaigns" / f"{name}.yaml").write_text(yaml.safe_dump(spec), "utf-8")
    audience = generate(tmp / "users.sqlite", users=USERS)
    servers = {
        name: SendGridDevServer(data_dir=tmp / "sendgrid" / name, api_key=API_KEY).start()
        for name in SCENARIOS
    }
    airflow = LocalAirflow(
        REPO,
        tmp / "airflow",
        port=free_port(),
        extra_env={
            "MAILROOM_INCLUDE_DIR": str(include),
            # A failed shard retries at once here, and the gate's timeout is swept every 2 s.
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1",
            "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "2",
        },
    )
    env = GateEnv(airflow, tmp / "staging", audience, servers)
    try:
        airflow.migrate()
        airflow.import_connections(
            {
                "mailroom_users": {"conn_type": "sqlite", "host": str(audience.path)},
                **{
                    f"mailroom_sendgrid_{name}": {
                        "conn_type": "http",
                        "host": server.url,
                        "password": API_KEY,
                    }
                    for name, server in servers.items()
                },
            }
        )
        airflow.import_variables(
            {
                "mailroom_staging_root": str(env.staging_root),
                "mailroom_unsubscribe_secret": "e2e-approval-gate",
                # The triggering analyst is listed too: four eyes must still keep them out.
                "mailroom_approvers__gate_reject": "analyst,approver",
            }
        )
        airflow.start()
        airflow.serve_dag(DAG_ID, timeout=180)
        env.passwords = airflow.passwords()
        # Scenarios that end by themselves start now and run alongside the others.
        selected = {item.name for item in request.session.items}
        for test, campaign in BACKGROUND.items():
            if test in selected:
                env.background[campaign] = env.trigger(campaign, user="analyst")
        yield env
    finally:
        airflow.stop()
        for server in servers.values():
            server.stop()


def _received(server: SendGridDevServer) -> Counter[str]:
    return Counter(e.lower() for e in accepted_recipients(server.accepted()))


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
    received = _received(gate.servers["gate_approve"])
    assert set(received) == gate.audience.expected
    assert max(received.values()) == 1
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


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them; CI never skips)",
)
def test_approver_approves_in_the_airflow_ui(
    gate: GateEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    run_id = gate.trigger("gate_browser")
    gate.wait_at_gate(run_id)
    digest = load_manifest(gate.folder("gate_browser", run_id).manifest).sha256

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "approval.png"
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
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
    received = _received(gate.servers["gate_browser"])
    assert set(received) == gate.audience.expected
    assert max(received.values()) == 1


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
    assert sum(_received(server).values()) == 2 * everyone
