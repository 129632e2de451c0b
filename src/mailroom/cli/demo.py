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
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from mailroom.audience.sample import SampleAudience, generate
from mailroom.cli.airflow_api import AirflowApi, AirflowApiError
from mailroom.cli.approvals import APPROVE, REJECT, Approvals
from mailroom.cli.approvals import render as render_approval
from mailroom.cli.local_airflow import (
    STALE_HEARTBEAT_SECONDS,
    ComponentExited,
    LocalAirflow,
    describe_exit,
    die_with_parent,
    free_port,
    port_in_use,
)

DAG_ID = "mailroom_campaign"
CAMPAIGN = "winter_update"
FINISHED = {"success", "failed"}
# How often the demo asks the API for the scheduler's heartbeat while it follows a run, and how
# long after starting the scheduler it begins to (a new scheduler's first heartbeat comes later).
HEALTH_EVERY_SECONDS = 5.0
HEALTH_AFTER_SECONDS = 90.0


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
        self.airflow = LocalAirflow(
            repo, airflow_home or repo / ".airflow", port=airflow_port, owner="mailroom demo"
        )
        self.dev_server: subprocess.Popen[bytes] | None = None
        self.dev_server_dir = self.var / "sendgrid-dev"
        self.run_id: str | None = None
        self._airflow_started = 0.0
        self._health_checked = 0.0
        self._stale: str | None = None
        self._problem: str | None = None
        self._problem_said = 0.0

    def airflow_problem(self) -> str | None:
        """Why a run cannot move now, or None: a component the demo started has ended and
        nothing runs in its place (``mailroom local-airflow start`` starts one), or the
        scheduler's process runs but its heartbeat (the API's /api/v2/monitor/health) is stale."""
        running = self.airflow.status().running  # what runs now, whoever started it
        for proc in self.airflow.processes:
            code = proc.poll()
            name = self.airflow.components.get(proc.pid, "component")
            if code is not None and name not in running:
                return f"Airflow's {name} has ended ({describe_exit(code)})"
        now = time.monotonic()
        if (
            now - self._airflow_started < HEALTH_AFTER_SECONDS
            or now - self._health_checked < HEALTH_EVERY_SECONDS
        ):
            return self._stale
        self._health_checked = now
        age = self.airflow.scheduler_heartbeat_age()
        self._stale = None
        if age is not None and age > STALE_HEARTBEAT_SECONDS:
            self._stale = f"Airflow's scheduler runs but has sent no heartbeat for {age:.0f}s"
        return self._stale

    def watch_airflow(self) -> bool:
        """True when Airflow can move the run. Otherwise says so plainly, with what to do, once
        (and again every minute while it lasts), and returns False: the demo waits for the
        missing component to run again, or for Ctrl-C."""
        problem = self.airflow_problem()
        now = time.monotonic()
        if problem is None:
            if self._problem is not None:
                say("Airflow runs whole again: carrying on")
                self._problem = None
            return True
        if problem != self._problem:
            self._problem, self._problem_said = problem, now
            self.explain_down(problem)
        elif now - self._problem_said >= 60:
            self._problem_said = now
            say(f"still waiting: {problem}. {self.start_hint()} starts what is missing")
        return False

    def start_hint(self) -> str:
        """The command that starts what is missing of the demo's Airflow."""
        cli = f"`mailroom local-airflow start --airflow-home {self.airflow.home}`"
        if self.airflow.home == self.repo / ".airflow":
            return f"`make airflow` (or {cli})"
        return cli

    def explain_down(self, problem: str) -> None:
        """What happened, what it means for the run, and how to bring Airflow back."""
        say(f"{problem}.")
        if self.run_id is not None:
            say(
                f"  Run {self.run_id} cannot move without it: Airflow keeps the run 'running' "
                "as it is, and nothing happens until it runs again."
            )
        say(
            f"  From another terminal, {self.start_hint()} starts what is missing, without "
            "triggering anything, and the demo carries on; Ctrl-C here stops everything."
        )
        say(f"  Airflow's logs: {self.airflow.logs}")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            return self._run()
        except KeyboardInterrupt:
            say("interrupted: stopping everything the demo started")
            return 130
        except ComponentExited as exc:  # while starting
            say(f"{exc}; see {self.airflow.logs}")
            return 1
        finally:
            # Stopping is not cut short by another Ctrl-C (and the guards of Airflow's
            # components, tied to this process, stop them even if it is killed).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.stop()

    def _run(self) -> int:
        started = time.monotonic()
        running = self.airflow.status()
        if running.running:
            assert running.recorded is not None
            say(
                f"a local Airflow already runs in {self.airflow.home} ({', '.join(running.running)}"
                f", started by {running.recorded.owner}): stop it first with `mailroom "
                f"local-airflow stop --airflow-home {self.airflow.home}` (make airflow-stop)"
            )
            return 1
        if port_in_use(self.airflow.port):
            say(f"port {self.airflow.port} is in use: stop what listens there, or --airflow-port")
            return 1
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
        self.airflow.start(tie_to_parent=True)
        self._airflow_started = time.monotonic()
        say(f"Airflow is starting at {self.airflow.url}; waiting for the DAG to be parsed")
        self.airflow.serve_dag(DAG_ID, timeout=180)
        analyst, approver = self.airflow.api("analyst"), self.airflow.api("approver")
        run_id = analyst.trigger(
            DAG_ID, {"campaign": CAMPAIGN, "dry_run": False, "shards": self.shards}
        )
        say(f"triggered {DAG_ID} run {run_id} as 'analyst'")
        say(f"watch it in the campaign console: {self.console_url(run_id)}")
        self.run_id = run_id

        follower = RunFollower(analyst, run_id, watch=self.watch_airflow)
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
            self.run_id = None
            while True:
                self.watch_airflow()
                time.sleep(1)
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
            preexec_fn=die_with_parent,  # gone with the demo, even when it is killed
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

    def console_url(self, run_id: str | None = None) -> str:
        """The campaign console in the Airflow UI: the list, or one run's page."""
        if run_id is None:
            return f"{self.airflow.url}/plugin/campaigns"
        return f"{self.airflow.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/plugin/campaign"

    def print_access(self, passwords: dict[str, str]) -> None:
        say(
            f"Airflow UI: {self.airflow.url}  (users: {', '.join(passwords)}; passwords in "
            f"{self.airflow.passwords_file})"
        )
        say(
            f"campaign console: {self.console_url()} (sign in as operator to halt, resume or "
            "resend; as viewer to watch only)"
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
        if self._airflow_started and self.airflow.status().running:
            # What `mailroom local-airflow start` started in the demo's Airflow meanwhile.
            self.airflow.stop_recorded()
        if self.dev_server is not None and self.dev_server.poll() is None:
            self.dev_server.terminate()
            try:
                self.dev_server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.dev_server.kill()
                self.dev_server.wait()


class RunFollower:
    """Prints each task's state change once, so a person sees the run move."""

    def __init__(
        self, api: AirflowApi, run_id: str, watch: Callable[[], bool] | None = None
    ) -> None:
        self.api, self.run_id = api, run_id
        self.seen: dict[str, str] = {}
        # Called every round: False while the run cannot move (Airflow's scheduler is gone);
        # the follower waits then, without asking the API.
        self.watch = watch

    def until(self, done: Any, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            if self.watch is not None and not self.watch():
                if time.monotonic() > deadline:
                    raise AirflowApiError(f"run {self.run_id} did not progress in time")
                time.sleep(1)
                continue
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
