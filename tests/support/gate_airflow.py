"""One local Airflow for the end-to-end tests of the approval gate and the campaign console.

One local Airflow (api-server, scheduler, dag-processor on SQLite) serves every test of the
package (``tests/e2e/conftest.py``'s ``gate`` fixture); every scenario is its own DAG run of its
own test campaign, which sends through its own Airflow connection to its own SendGrid-compatible
dev server, so "nothing reached the server" is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import yaml

from mailroom.audience.sample import SampleAudience, generate
from mailroom.cli.airflow_api import AirflowApi
from mailroom.cli.local_airflow import LocalAirflow, free_port
from mailroom.cli.main import main as mailroom
from mailroom.staging import RunStaging
from sendgrid_dev import SendGridDevServer, accepted_recipients

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "mailroom_campaign"
USERS = 600
API_KEY = "SG.e2e-gate"
# Airflow signs unsubscribe links with it; the feedback service verifies them with it.
UNSUBSCRIBE_SECRET = "e2e-approval-gate"
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
    # The campaign console: 30 requests of 20 at one request a second, so there is time to
    # watch it, halt it and resume it; and one run that is left at the gate.
    "console_steer": {"batch_size": 20, "rate": {"requests_per_second": 1}},
    "console_api": {"batch_size": 200},
    # Six requests of 100; the dev server loses the answer to two of them (unknown).
    "console_unknown": {"batch_size": 100, "locales": ["en"]},
    # The feedback loop: a campaign whose bounces, complaints and unsubscribes the second, to
    # the same audience, leaves out.
    "feedback_first": {"batch_size": 100},
    "feedback_second": {"batch_size": 100},
}


@dataclass
class GateEnv:
    airflow: LocalAirflow
    staging_root: Path
    audience: SampleAudience
    servers: dict[str, SendGridDevServer]
    passwords: dict[str, str] = field(default_factory=dict)
    background: dict[str, str] = field(default_factory=dict)  # campaign → run started early

    @property
    def outbox_url(self) -> str:
        """The outbox every run writes to: SQLite in the staging root (no mailroom_outbox
        connection is defined)."""
        return f"sqlite:///{self.staging_root / 'outbox.sqlite'}"

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


@contextmanager
def gate_airflow(tmp: Path, selected: set[str]) -> Iterator[GateEnv]:
    """One local Airflow with a campaign, a connection and a dev server per scenario; the
    scenarios that end by themselves (``BACKGROUND``) among the ``selected`` tests start at
    once."""
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
                "mailroom_unsubscribe_secret": UNSUBSCRIBE_SECRET,
                # The triggering analyst is listed too: four eyes must still keep them out.
                "mailroom_approvers__gate_reject": "analyst,approver",
            }
        )
        airflow.start()
        airflow.serve_dag(DAG_ID, timeout=180)
        env.passwords = airflow.passwords()
        # Scenarios that end by themselves start now and run alongside the others.
        for test, campaign in BACKGROUND.items():
            if test in selected:
                env.background[campaign] = env.trigger(campaign, user="analyst")
        yield env
    finally:
        airflow.stop()
        for server in servers.values():
            server.stop()


def received(server: SendGridDevServer) -> Counter[str]:
    return Counter(e.lower() for e in accepted_recipients(server.accepted()))


class Console:
    """The console's HTTP surface as one user sees it (None: nobody signed in)."""

    def __init__(self, gate: GateEnv, user: str | None) -> None:
        self.base = f"{gate.airflow.url}/mailroom"
        self.session = requests.Session()
        self.token = ""
        if user is not None:
            answer = requests.post(
                f"{gate.airflow.url}/auth/token",
                json={"username": user, "password": gate.passwords[user]},
                timeout=30,
            )
            answer.raise_for_status()
            self.token = answer.json()["access_token"]
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    def get(self, path: str) -> requests.Response:
        return self.session.get(f"{self.base}{path}", timeout=30)

    def act(self, run_id: str, action: str, reason: str = "e2e check") -> requests.Response:
        return self.session.post(
            f"{self.base}/api/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/actions/{action}",
            json={"reason": reason, "confirm": True},
            timeout=60,
        )


# The browser tests run wherever Chromium is; CI installs it, and never skips them.
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them; CI never skips)",
)


def chromium(window: str = "1400,1800") -> Any:
    """Headless Chromium through Debian's chromedriver (``.ci/run`` installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

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
        f"--window-size={window}",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
