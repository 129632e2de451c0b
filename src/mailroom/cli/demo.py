"""``make demo``: the example campaign end to end on the embedded default, as a person would run it.

Generates a sample users database, starts the SendGrid-compatible dev server and a local Airflow
(SQLite, LocalExecutor), triggers the campaign as the analyst, shows what will be sent, asks the
person at the terminal to approve (the answer goes through Airflow's REST API as the approver),
follows the run to its report, and checks what the dev server received against the sample's own
list of who should get it.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from mailroom.audience.sample import SampleAudience, generate
from mailroom.cli.airflow_api import AirflowApi, AirflowApiError
from mailroom.cli.approvals import APPROVE, REJECT, Approvals
from mailroom.cli.approvals import render as render_approval
from mailroom.cli.local_airflow import LocalAirflow, free_port

DAG_ID = "mailroom_campaign"
CAMPAIGN = "winter_update"
FINISHED = {"success", "failed"}


class Demo:
    def __init__(
        self,
        repo: Path,
        *,
        users: int,
        yes: bool,
        sendgrid_api_host: str | None,
        keep_running: bool,
        shards: int = 2,
        work_dir: Path | None = None,
        airflow_home: Path | None = None,
        airflow_port: int = 28080,
    ) -> None:
        self.repo = repo
        self.var = work_dir or repo / "var"
        self.users = users
        self.yes = yes
        self.sendgrid_api_host = sendgrid_api_host
        self.keep_running = keep_running
        self.shards = shards
        self.airflow = LocalAirflow(repo, airflow_home or repo / ".airflow", port=airflow_port)
        self.dev_server: subprocess.Popen[bytes] | None = None
        self.dev_server_dir = self.var / "sendgrid-dev"

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            return self._run()
        except KeyboardInterrupt:
            say("interrupted: stopping everything the demo started")
            return 130
        finally:
            self.stop()

    def _run(self) -> int:
        started = time.monotonic()
        say(f"generating {self.users} sample users (with suppressed, invalid and duplicate rows)")
        audience = generate(self.var / "demo" / "users.sqlite", users=self.users)
        say(
            f"  {audience.users} users, {audience.suppressed} suppressed, "
            f"{audience.invalid} invalid, "
            f"{audience.duplicates} duplicates → {len(audience.expected)} should receive it"
        )
        host = self.sendgrid_api_host or self.start_dev_server()
        say("preparing Airflow (SQLite, LocalExecutor) in .airflow/")
        self.airflow.migrate()
        self.airflow.import_connections(
            {
                "mailroom_users": {"conn_type": "sqlite", "host": str(audience.path)},
                "mailroom_sendgrid": {
                    "conn_type": "http",
                    "host": host,
                    "password": "SG.local-dev-key",
                    "extra": json.dumps({"timeout": 30}),
                },
            }
        )
        self.airflow.import_variables(
            {
                "mailroom_staging_root": str(self.var / "staging"),
                "mailroom_unsubscribe_secret": self._unsubscribe_secret(),
            }
        )
        self.airflow.start()
        say(f"Airflow is starting at {self.airflow.url}; waiting for the DAG to be parsed")
        self.airflow.serve_dag(DAG_ID, timeout=180)
        analyst, approver = self.airflow.api("analyst"), self.airflow.api("approver")
        run_id = analyst.trigger(
            DAG_ID, {"campaign": CAMPAIGN, "dry_run": False, "shards": self.shards}
        )
        say(f"triggered {DAG_ID} run {run_id} as 'analyst'")

        follower = RunFollower(analyst, run_id)
        follower.until(lambda states: states.get("approve") == "awaiting_input", timeout=900)
        # What `mailroom approvals show RUN` prints: the summary the Airflow UI shows.
        gate = Approvals(approver)
        print("\n" + "=" * 78 + "\n" + render_approval(gate.get(run_id)) + "\n" + "=" * 78)
        cli = (
            f"mailroom approvals {{approve|reject}} '{run_id}' --airflow-url {self.airflow.url} "
            f"--user approver --password-file {self.airflow.passwords_file}"
        )
        say(f"the same from another terminal: {cli}")
        approve = self.yes or ask("Approve this send as 'approver'? [y/N] ")
        answered = gate.answer(run_id, APPROVE if approve else REJECT)
        say(f"{'approved' if approve else 'rejected'} through the REST API: {answered.status}")

        final = follower.until(
            lambda _: analyst.dag_run(DAG_ID, run_id)["state"] in FINISHED, timeout=1800
        )
        state = analyst.dag_run(DAG_ID, run_id)["state"]
        report = _read_report(self.var / "staging", run_id)
        print_report(report)
        ok = state == "success" and report is not None
        if approve and ok and not self.sendgrid_api_host:
            ok = self.verify_received(audience)
        say(f"run {run_id}: {state} ({final}) in {time.monotonic() - started:.0f}s")
        self.print_access(self.airflow.passwords())
        if self.keep_running:
            say("Airflow keeps running; press Ctrl-C to stop everything the demo started")
            while True:
                time.sleep(3600)
        return 0 if ok else 1

    def start_dev_server(self) -> str:
        shutil.rmtree(self.dev_server_dir, ignore_errors=True)
        port = free_port()
        log = self.var / "sendgrid-dev.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.dev_server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sendgrid_dev",
                "--port",
                str(port),
                "--data-dir",
                str(self.dev_server_dir),
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/_dev/health", timeout=1).ok:
                    say(
                        f"SendGrid-compatible dev server at {url} "
                        f"(records to {self.dev_server_dir})"
                    )
                    return url
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError(f"the dev server did not start; see {log}")

    def verify_received(self, audience: SampleAudience) -> bool:
        from sendgrid_dev import accepted_recipients, read_accepted

        records = read_accepted(self.dev_server_dir)
        received = Counter(e.lower() for e in accepted_recipients(records))
        twice = sum(1 for n in received.values() if n > 1)
        missing = len(audience.expected - set(received))
        extra = len(set(received) - audience.expected)
        per_request = max((len(r["body"]["personalizations"]) for r in records), default=0)
        one_each = all(
            len(p["to"]) == 1 and not p.get("cc") and not p.get("bcc")
            for r in records
            for p in r["body"]["personalizations"]
        )
        ok = not twice and not missing and not extra and one_each
        say(
            f"dev server received {len(records)} requests, {sum(received.values())} recipients "
            f"(≤{per_request} per request), one recipient per personalization: {one_each}; "
            f"received twice: {twice}, missing: {missing}, not in the audience: {extra} → "
            f"{'OK' if ok else 'MISMATCH'}"
        )
        return ok

    def print_access(self, passwords: dict[str, str]) -> None:
        say(
            f"Airflow UI: {self.airflow.url}  (users: analyst, approver, admin; passwords in "
            f"{self.airflow.passwords_file})"
        )

    def _unsubscribe_secret(self) -> str:
        path = self.airflow.home / "unsubscribe_secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def stop(self) -> None:
        self.airflow.stop()
        if self.dev_server is not None and self.dev_server.poll() is None:
            self.dev_server.terminate()
            try:
                self.dev_server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.dev_server.kill()


class RunFollower:
    """Prints each task's state change once, so a person sees the run move."""

    def __init__(self, api: AirflowApi, run_id: str) -> None:
        self.api, self.run_id = api, run_id
        self.seen: dict[str, str] = {}

    def until(self, done: Any, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            states = self.poll()
            if done(states):
                return states
            run_state = self.api.dag_run(DAG_ID, self.run_id)["state"]
            if run_state in FINISHED and not done(states):
                raise AirflowApiError(f"run {self.run_id} ended {run_state} early: {states}")
            if time.monotonic() > deadline:
                raise AirflowApiError(f"run {self.run_id} did not progress in time: {states}")
            time.sleep(1)

    def poll(self) -> dict[str, str]:
        states: dict[str, str] = {}
        counts: dict[str, Counter[str]] = {}
        for ti in self.api.task_instances(DAG_ID, self.run_id):
            state = ti.get("state") or "none"
            if ti.get("map_index", -1) >= 0:
                counts.setdefault(ti["task_id"], Counter())[state] += 1
            else:
                states[ti["task_id"]] = state
        for task_id, counter in counts.items():
            states[task_id] = ", ".join(f"{n} {s}" for s, n in sorted(counter.items()))
        for task_id, state in states.items():
            if self.seen.get(task_id) != state:
                say(f"  {task_id}: {state}")
        self.seen = states
        return states


def _read_report(staging_root: Path, run_id: str) -> dict[str, Any] | None:
    from mailroom.staging import RunStaging

    path = RunStaging.for_run(staging_root, CAMPAIGN, run_id).report
    return json.loads(path.read_text()) if path.exists() else None


def print_report(report: dict[str, Any] | None) -> None:
    if report is None:
        say("no report was written")
        return
    approval = report.get("approval", {})
    say(
        f"report: status {report['status']}; "
        f"approval {approval.get('decision')} by {approval.get('by')}"
    )
    if report.get("equation"):
        say(f"  {report['equation']} (balanced: {report['balanced']})")
    for locale, entry in (report.get("staged", {}).get("per_locale") or {}).items():
        say(f"  {locale}: {entry['recipients']} recipients in {entry['batches']} batches")
    say(f"  not sent (with reasons): {report['not_sent_rows']} rows in {report['not_sent_file']}")


def ask(prompt: str) -> bool:
    try:
        return input(prompt).strip().lower() in {"y", "yes"}
    except EOFError:
        return False


def say(message: str) -> None:
    print(f"[mailroom demo] {message}", flush=True)
