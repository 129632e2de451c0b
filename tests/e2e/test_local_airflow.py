"""The local Airflow brought back, stopped, and its send tasks killed: real Airflow processes.

* A send shard's task process is SIGKILLed mid-request: its retry starts within the campaign's
  ``send_retry_delay_seconds`` (not Airflow's default 300 s), sends nothing before that delay,
  the request cut off is ``unknown`` and never resent, and the report balances.
* ``mailroom local-airflow start`` brings Airflow back after all of it was SIGKILLed, refuses
  to start it twice, and ``stop`` leaves no process of it (by session, by its environment, by
  its port).
* The scheduler and its task processes are SIGKILLed mid-send, and Airflow is brought back
  with ``mailroom local-airflow start``: the requests cut off are ``unknown`` and not resent.
  An operator checks the server for each one's batch id and settles it (``mailroom settle``):
  the run finishes with nobody mailed twice and a report whose history names the settlement.
  With ``mailroom resend`` instead, the recipients the server already had get it twice, as the
  command warned, and the report's history records how many.
* ``mailroom demo --yes`` leaves nothing behind when it ends normally, and when it is stopped
  with SIGINT after its scheduler was killed (having said so, and carried on once
  ``mailroom local-airflow start`` started a scheduler again).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import quote

import psutil
import pytest
import yaml

from mailroom.audience.sample import SampleAudience, generate
from mailroom.cli.airflow_api import AirflowApi
from mailroom.cli.local_airflow import (
    PID_FILE,
    LocalAirflow,
    free_port,
    port_in_use,
    session_processes,
)
from mailroom.delivery.outbox import BatchState, Outbox
from mailroom.staging import RunStaging
from sendgrid_dev import SendGridDevServer, accepted_recipients
from sendgrid_dev.faults import Faults

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
DAG_ID = "mailroom_campaign"
CAMPAIGN = "kill_send"
USERS = 600
BATCH_SIZE = 40  # ~15 requests
RETRY_DELAY = 8.0  # the campaign's send_retry_delay_seconds
REQUEST_SECONDS = 0.5  # the dev server answers each request after this long: kills land mid-request
API_KEY = "SG.e2e-local-airflow"
CRASH_CAMPAIGNS = ("crash_settle", "crash_resend")
HEARTBEAT_TIMEOUT = 20  # seconds (the local Airflow's default is 60)
FINISHED = {"success", "failed"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Airflow settings other tests may have set (a
    connection in ``AIRFLOW_CONN_*`` would win over the database's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return {**env, **extra}


@dataclass
class Home:
    """A local Airflow home prepared as the demo prepares one: migrated, connections and
    variables imported; started and stopped only through ``mailroom local-airflow``."""

    tmp: Path
    airflow: LocalAirflow
    include: Path
    audience: SampleAudience
    server: SendGridDevServer
    seen_sessions: set[int] = field(default_factory=set)

    def cli(self, action: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "mailroom.cli.main", "local-airflow", action),
                *("--airflow-home", str(self.airflow.home)),
                *(("--port", str(self.airflow.port)) if action == "start" else ()),
            ],
            env=clean_env(
                MAILROOM_INCLUDE_DIR=str(self.include),
                # A task that died with its scheduler is failed (and retried) sooner.
                AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.seen_sessions |= set(recorded_sessions(self.airflow.home))
        return result

    def api(self, user: str) -> AirflowApi:
        return self.airflow.api(user)


def recorded_sessions(home: Path) -> list[int]:
    try:
        data = json.loads((home / PID_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return []
    return [int(c["pid"]) for c in data["components"]]


def processes_of_home(home: Path) -> list[int]:
    """Every live process whose environment names ``home`` as its AIRFLOW_HOME."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("AIRFLOW_HOME") == str(home):
                found.append(proc.pid)
    return found


def alive_in(sessions: set[int]) -> list[str]:
    """The live processes of these sessions, described."""
    left = []
    for sid in sorted(sessions):
        for pid in session_processes(sid):
            with contextlib.suppress(psutil.Error):
                left.append(f"{pid} (session {sid}): {' '.join(psutil.Process(pid).cmdline())}")
    return left


def sigkill_sessions(sessions: list[int]) -> None:
    """``kill -9`` every process of these sessions, as a crash of the whole machine would."""
    for _ in range(100):
        left = [pid for sid in sessions for pid in session_processes(sid)]
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"still alive after SIGKILL: {alive_in(set(sessions))}")


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def parse_time(value: str) -> datetime:
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    tmp = tmp_path_factory.mktemp("local-airflow")
    include = tmp / "include"
    shutil.copytree(REPO / "include", include)
    base = yaml.safe_load((include / "campaigns" / "winter_update.yaml").read_text("utf-8"))
    spec = {
        **base,
        "name": CAMPAIGN,
        "batch_size": BATCH_SIZE,
        "rate": {"requests_per_second": 2},
        "send_retry_delay_seconds": RETRY_DELAY,
    }
    (include / "campaigns" / f"{CAMPAIGN}.yaml").write_text(yaml.safe_dump(spec), "utf-8")
    # One campaign per crash test: a campaign mails each person once across runs.
    for name in CRASH_CAMPAIGNS:
        crash = {**spec, "name": name}
        (include / "campaigns" / f"{name}.yaml").write_text(yaml.safe_dump(crash), "utf-8")
    audience = generate(tmp / "users.sqlite", users=USERS)
    server = SendGridDevServer(
        data_dir=tmp / "sendgrid", api_key=API_KEY, faults=Faults(delay_seconds=REQUEST_SECONDS)
    ).start()
    airflow = LocalAirflow(REPO, tmp / "airflow", port=free_port())
    env = Home(tmp, airflow, include, audience, server)
    try:
        airflow.migrate()
        airflow.import_connections(
            {
                "mailroom_users": {"conn_type": "sqlite", "host": str(audience.path)},
                "mailroom_sendgrid": {"conn_type": "http", "host": server.url, "password": API_KEY},
            }
        )
        airflow.import_variables(
            {
                "mailroom_staging_root": str(tmp / "staging"),
                "mailroom_unsubscribe_secret": "e2e-local-airflow",
            }
        )
        yield env
    finally:
        env.cli("stop")
        sigkill_sessions(sorted(env.seen_sessions))
        server.stop()


def test_start_after_everything_was_killed_brings_airflow_back_and_stop_leaves_nothing(
    home: Home,
) -> None:
    started = time.monotonic()
    first = home.cli("start")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"Airflow is up at {home.airflow.url}" in first.stdout
    assert "Nothing was triggered" in first.stdout
    assert str(home.airflow.passwords_file) in first.stdout
    sessions = recorded_sessions(home.airflow.home)
    assert len(sessions) == 3
    # No log server: nothing of ours listens but the API, on loopback.
    listening = {
        (c.laddr.ip, c.laddr.port)
        for sid in sessions
        for pid in session_processes(sid)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", home.airflow.port)}, listening

    again = home.cli("start")
    assert again.returncode == 1
    assert "already running" in again.stderr
    status = home.cli("status")
    assert status.returncode == 0, status.stdout
    for component in ("api-server", "scheduler", "dag-processor"):
        assert re.search(rf"{component} +running \(pid \d+\)", status.stdout), status.stdout

    # Everything SIGKILLed: the guards, the components, the LocalExecutor workers.
    sigkill_sessions(sessions)
    assert not port_in_use(home.airflow.port)
    stale = home.cli("status")
    assert stale.returncode == 3, stale.stdout
    assert "not running (stale pid file" in stale.stdout

    back = home.cli("start")
    assert back.returncode == 0, back.stdout + back.stderr
    assert "removing a stale pid file" in back.stdout
    # The same database: the connections imported before are there, and the DAG.
    admin = home.api("admin")
    assert admin.request("GET", "/connections/mailroom_sendgrid")["host"] == home.server.url
    assert admin.request("GET", "/variables/mailroom_staging_root")["value"]
    wait_for("the DAG to be parsed", lambda: admin.dag_exists(DAG_ID), timeout=120)
    new_sessions = recorded_sessions(home.airflow.home)
    assert set(new_sessions).isdisjoint(sessions)

    stopped = home.cli("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped the local Airflow" in stopped.stdout
    assert not alive_in(set(sessions) | set(new_sessions))
    assert not processes_of_home(home.airflow.home)
    assert not port_in_use(home.airflow.port)
    assert not (home.airflow.home / PID_FILE).exists()
    assert home.cli("status").returncode == 3
    print(f"\nlocal-airflow start, kill -9, start, stop: {time.monotonic() - started:.0f}s")


def test_a_killed_send_task_is_retried_after_the_campaign_delay_and_nothing_is_sent_twice(
    home: Home,
) -> None:
    started = home.cli("start")
    assert started.returncode == 0, started.stdout + started.stderr
    home.airflow.serve_dag(DAG_ID, timeout=180)
    analyst, approver = home.api("analyst"), home.api("approver")
    run_id = analyst.trigger(DAG_ID, {"campaign": CAMPAIGN, "dry_run": False, "shards": 1})

    def states() -> dict[str, dict[str, Any]]:
        return {ti["task_id"]: ti for ti in analyst.task_instances(DAG_ID, run_id)}

    def at_gate() -> bool:
        if analyst.dag_run(DAG_ID, run_id)["state"] in FINISHED:
            raise AssertionError(f"run ended before the gate: {states()}")
        return states().get("approve", {}).get("state") == "awaiting_input"

    wait_for("the approval gate", at_gate, timeout=300, interval=1)
    time.sleep(2.5)  # Airflow 3.3.2 can fail an approval answered within ~1 s of the wait
    approver.answer(DAG_ID, run_id, "approve", "Approve")

    # Mid-send: a few requests accepted, the task running; its own process is killed (not the
    # LocalExecutor worker supervising it, not the scheduler).
    def sending() -> dict[str, Any] | None:
        ti = states().get("send_shard", {})
        if ti.get("state") == "running" and ti.get("pid") and home.server.stats().accepted >= 2:
            return ti
        return None

    ti = wait_for("the send shard to be mid-send", sending, timeout=300, interval=0.2)
    task = psutil.Process(int(ti["pid"]))
    assert "LocalExecutor" in " ".join(task.parent().cmdline()), task.parent().cmdline()
    killed_at = datetime.now(UTC)
    task.kill()
    task.wait(10)

    final = wait_for(
        "the run to finish",
        lambda: (s := analyst.dag_run(DAG_ID, run_id)["state"]) in FINISHED and s,
        timeout=300,
        interval=1,
    )
    tries = sorted(
        analyst.request(
            "GET",
            f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/send_shard/0/tries",
        )["task_instances"],
        key=lambda t: t["try_number"],
    )
    assert [t["try_number"] for t in tries] == [1, 2], tries
    assert tries[0]["state"] in {"failed", "up_for_retry"}, tries[0]
    assert tries[1]["state"] == "success", tries[1]
    ended = (parse_time(tries[0]["end_date"]) - killed_at).total_seconds()
    retry_started = parse_time(tries[1]["start_date"])
    retry_after = (retry_started - killed_at).total_seconds()
    assert 0 < retry_after <= RETRY_DELAY, (retry_after, tries)

    # The outcome: everyone once at most; whoever is missing was in the request cut off,
    # which is 'unknown' and was not resent; the report balances.
    outbox = Outbox(f"sqlite:///{home.tmp / 'staging' / 'outbox.sqlite'}")
    try:
        run_key = f"{CAMPAIGN}/{run_id}"
        batch_states = Counter(st.state for st in outbox.states(run_key).values())
        unknown = [b for b, st in outbox.states(run_key).items() if st.state == BatchState.UNKNOWN]
        maybe = {e.lower() for b in unknown for e in outbox.batch_members(run_key, b)}
    finally:
        outbox.dispose()
    records = home.server.accepted()
    # The retry sent nothing before the campaign's delay had passed since the kill (the
    # request cut off by it may be recorded just after it: the server records, then answers).
    retry_sent = [
        (parse_time(r["received_at"]) - killed_at).total_seconds()
        for r in records
        if parse_time(r["received_at"]) > killed_at
        and not {e.lower() for e in accepted_recipients([r])} & maybe
    ]
    resumed = min(retry_sent)
    assert resumed >= RETRY_DELAY, retry_sent
    received = Counter(e.lower() for e in accepted_recipients(records))
    assert max(received.values()) == 1, "someone received the message twice"
    assert set(received) <= home.audience.expected
    assert home.audience.expected - set(received) <= maybe
    assert set(batch_states) <= {BatchState.SENT, BatchState.UNKNOWN}, batch_states
    folder = RunStaging.for_run(home.tmp / "staging", CAMPAIGN, run_id)
    report = json.loads(folder.report.read_text("utf-8"))
    assert report["balanced"] is True, report
    assert final == ("failed" if unknown else "success"), (final, batch_states)
    log = task_log(analyst, run_id, 2)
    assert f"the campaign's send_retry_delay_seconds is {RETRY_DELAY:g}: waiting" in log
    # Exactly the requests in flight at the kill are 'unknown', said so in SendGrid's terms.
    interrupted = re.search(
        r"(\d+) batch\(es\) were interrupted mid-request: each whole request is now "
        r"'unknown' \(the provider may have accepted it\) and is not resent",
        log,
    )
    assert (int(interrupted[1]) if interrupted else 0) == len(unknown), (log, batch_states)
    print(
        f"\nsend task SIGKILLed mid-send: try 1 ended {ended:.1f}s and the retry try started "
        f"{retry_after:.1f}s after the kill, "
        f"first request of the retry recorded {resumed:.1f}s after it (campaign delay "
        f"{RETRY_DELAY:g}s, request {REQUEST_SECONDS:g}s); batches {dict(batch_states)}; "
        f"run {final}; report balanced"
    )
    stopped = home.cli("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not processes_of_home(home.airflow.home)


@dataclass
class Crashed:
    """A run SIGKILLed mid-send with its scheduler, ended after Airflow was brought back."""

    run_id: str
    unknown: set[str]  # its requests left 'unknown'


@pytest.fixture(scope="module")
def crashed(home: Home) -> dict[str, Crashed]:
    """One run of each crash campaign, both mid-request when the scheduler and its task
    processes are SIGKILLed; Airflow brought back with ``mailroom local-airflow start``; both
    runs ended (the requests in flight ``unknown``, the rest sent, each run incomplete)."""
    if home.cli("status").returncode != 0:
        started = home.cli("start")
        assert started.returncode == 0, started.stdout + started.stderr
    home.airflow.serve_dag(DAG_ID, timeout=180)
    analyst, approver = home.api("analyst"), home.api("approver")
    runs = {
        c: analyst.trigger(DAG_ID, {"campaign": c, "dry_run": False, "shards": 1})
        for c in CRASH_CAMPAIGNS
    }

    def state(run_id: str, task_id: str) -> str | None:
        tis = analyst.task_instances(DAG_ID, run_id)
        return next((ti.get("state") for ti in tis if ti["task_id"] == task_id), None)

    for run_id in runs.values():
        wait_for(
            "the approval gate",
            lambda r=run_id: state(r, "approve") == "awaiting_input",
            timeout=300,
            interval=1,
        )
    time.sleep(2.5)  # Airflow 3.3.2 can fail an approval answered within ~1 s of the wait
    for run_id in runs.values():
        approver.answer(DAG_ID, run_id, "approve", "Approve")
    outbox = Outbox(f"sqlite:///{home.tmp / 'staging' / 'outbox.sqlite'}")

    def mid_request(campaign: str, run_id: str) -> bool:
        # A few requests answered, and one claimed and in flight now (the server holds each
        # REQUEST_SECONDS before it answers).
        if sum(at_the_server(home, run_id).values()) < 2:
            return False
        in_flight = outbox.states(f"{campaign}/{run_id}").values()
        return any(st.state == BatchState.SENDING for st in in_flight)

    try:
        wait_for(
            "both runs to be mid-request",
            lambda: all(mid_request(c, r) for c, r in runs.items()),
            timeout=300,
            interval=0.05,
        )
    finally:
        outbox.dispose()
    scheduler = [
        c["pid"]
        for c in json.loads((home.airflow.home / PID_FILE).read_text("utf-8"))["components"]
        if c["component"] == "scheduler"
    ]
    sigkill_sessions(scheduler)  # the scheduler, its LocalExecutor workers, their task processes
    back = home.cli("start")
    assert back.returncode == 0, back.stdout + back.stderr
    # Airflow finds the tasks whose processes died with the scheduler and retries them; each
    # retry marks what was in flight 'unknown', sends the rest, and its run ends incomplete.
    ended = {}
    outbox = Outbox(f"sqlite:///{home.tmp / 'staging' / 'outbox.sqlite'}")
    try:
        for campaign, run_id in runs.items():
            final = wait_for(
                "the run to end",
                lambda r=run_id: (s := analyst.dag_run(DAG_ID, r)["state"]) in FINISHED and s,
                timeout=420,
                interval=2,
            )
            assert final == "failed"
            states_now = outbox.states(f"{campaign}/{run_id}")
            unknown = {b for b, st in states_now.items() if st.state == BatchState.UNKNOWN}
            assert unknown, states_now
            assert {st.state for st in states_now.values()} == {
                BatchState.SENT,
                BatchState.UNKNOWN,
            }
            ended[campaign] = Crashed(run_id, unknown)
    finally:
        outbox.dispose()
    return ended


def operator(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    """A ``mailroom`` operator command as an operator runs it against the local Airflow."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "mailroom.cli.main", *args),
            *("--airflow-url", home.airflow.url, "--user", "admin"),
            *("--password-file", str(home.airflow.passwords_file)),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def at_the_server(home: Home, run_id: str) -> dict[str, int]:
    """batch id → how many requests with it the server recorded (its ``custom_args``)."""
    return Counter(
        r["body"]["custom_args"]["mailroom_batch"]
        for r in home.server.accepted()
        if r["body"]["custom_args"]["mailroom_run"] == run_id
    )


def finished_report(home: Home, campaign: str, run_id: str) -> dict[str, Any]:
    analyst = home.api("analyst")
    wait_for(
        "the run to end again",
        lambda: analyst.dag_run(DAG_ID, run_id)["state"] in FINISHED,
        timeout=300,
        interval=1,
    )
    assert analyst.dag_run(DAG_ID, run_id)["state"] == "success"
    folder = RunStaging.for_run(home.tmp / "staging", campaign, run_id)
    reports = sorted((folder.root / "reports").glob("*.json"))
    return dict(json.loads((reports[-1] if reports else folder.report).read_text("utf-8")))


def test_after_a_crash_an_operator_settles_the_unknown_and_nothing_is_sent_twice(
    home: Home, crashed: dict[str, Crashed]
) -> None:
    campaign = "crash_settle"
    run_id, unknown = crashed[campaign].run_id, crashed[campaign].unknown
    run_key = f"{campaign}/{run_id}"
    seen = at_the_server(home, run_id)
    # What an operator finds in SendGrid's activity, by each request's batch id.
    accepted = sorted(b for b in unknown if seen[b])
    missing = sorted(b for b in unknown if not seen[b])
    status = operator(home, "status", run_key)
    assert f"outbox: sqlite:///{home.tmp / 'staging' / 'outbox.sqlite'}" in status.stdout
    assert f"folder: {RunStaging.for_run(home.tmp / 'staging', campaign, run_id).root}" in (
        status.stdout
    )
    listed = subprocess.run(
        [
            *(sys.executable, "-m", "mailroom.cli.main", "settle", run_key),
            *("--as", "sent", "--reason", "which are unknown?"),
        ],
        env=clean_env(MAILROOM_OUTBOX_URL=f"sqlite:///{home.tmp / 'staging' / 'outbox.sqlite'}"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"unknown now: {', '.join(sorted(unknown))}" in listed.stderr, listed.stderr
    settles = [
        (accepted, "sent", "SendGrid activity shows the batch delivered"),
        (missing, "not-sent", "no SendGrid activity for the batch"),
    ]
    settles = [s for s in settles if s[0]]
    for number, (requests, outcome, reason) in enumerate(settles, start=1):
        last = ("--clear",) if number == len(settles) else ()  # then send and report
        operator(
            home,
            *("settle", run_key, *requests, "--as", outcome, "--by", "olga"),
            *("--reason", reason, *last),
        )

    report = finished_report(home, campaign, run_id)
    received = Counter(
        e.lower()
        for r in home.server.accepted()
        if r["body"]["custom_args"]["mailroom_run"] == run_id
        for e in accepted_recipients([r])
    )
    assert max(received.values()) == 1, "someone received the message twice"
    assert set(received) == home.audience.expected
    assert (report["status"], report["balanced"]) == ("sent", True), report
    settled = [h for h in report["history"] if h["action"].startswith("settle")]
    assert {(h["action"], h["by"]) for h in settled} == {
        *((("settle_sent", "olga"),) if accepted else ()),
        *((("settle_not_sent", "olga"),) if missing else ()),
    }
    assert sorted(r for h in settled for r in h["requests"]) == sorted(unknown)
    assert all("unknown" in h["before"] and h["before"] != h["after"] for h in settled)
    print(
        f"\ncrash mid-send: {len(unknown)} request(s) unknown ({len(accepted)} the server had, "
        f"{len(missing)} it had not); settled; {sum(received.values())} recipients once each"
    )


def test_after_a_crash_resend_sends_twice_what_the_server_had_and_the_report_says_so(
    home: Home, crashed: dict[str, Crashed]
) -> None:
    campaign = "crash_resend"
    run_id, unknown = crashed[campaign].run_id, crashed[campaign].unknown
    run_key = f"{campaign}/{run_id}"
    outbox = Outbox(f"sqlite:///{home.tmp / 'staging' / 'outbox.sqlite'}")
    try:
        in_doubt = sum(len(outbox.batch_members(run_key, b)) for b in unknown)
    finally:
        outbox.dispose()
    had = {b for b, n in at_the_server(home, run_id).items() if n and b in unknown}
    already = {
        e.lower()
        for r in home.server.accepted()
        if r["body"]["custom_args"]["mailroom_batch"] in had
        and r["body"]["custom_args"]["mailroom_run"] == run_id
        for e in accepted_recipients([r])
    }

    resent = operator(
        home, "resend", run_key, "--reason", "no time to check SendGrid", "--by", "ivan", "--clear"
    )
    assert f"WARNING: {in_doubt} recipient(s) were in unknown requests" in resent.stdout
    assert "may get the message twice" in resent.stdout

    report = finished_report(home, campaign, run_id)
    received = Counter(
        e.lower()
        for r in home.server.accepted()
        if r["body"]["custom_args"]["mailroom_run"] == run_id
        for e in accepted_recipients([r])
    )
    twice = {e for e, n in received.items() if n == 2}
    assert twice == already, "exactly those the server already had got it twice"
    assert max(received.values()) <= 2
    assert set(received) == home.audience.expected
    (entry,) = [h for h in report["history"] if h["action"] == "resend"]
    assert (entry["by"], entry["recipients"], sorted(entry["requests"])) == (
        "ivan",
        in_doubt,
        sorted(unknown),
    )
    assert (report["status"], report["balanced"]) == ("sent", True), report
    print(
        f"\ncrash mid-send, resent without checking: {len(unknown)} request(s), {in_doubt} "
        f"recipient(s) in doubt; {len(twice)} received it twice, as warned"
    )
    stopped = home.cli("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def task_log(api: AirflowApi, run_id: str, try_number: int) -> str:
    data = api.request(
        "GET",
        f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/send_shard/logs/"
        f"{try_number}",
        params={"full_content": True, "map_index": 0},
    )
    content = data.get("content") if isinstance(data, dict) else data
    if isinstance(content, list):
        return "\n".join(json.dumps(e) if isinstance(e, dict) else str(e) for e in content)
    return str(content)


# -- the demo ---------------------------------------------------------------------------------


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class DemoProcess:
    """``mailroom demo --yes`` in a session of its own, its output read as it comes, and the
    sessions of every process it starts noted while it runs."""

    def __init__(self, tmp: Path, users: int) -> None:
        self.home = tmp / "airflow"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mailroom.cli.main", "demo", "--yes"),
                *("--users", str(users), "--work-dir", str(tmp / "work")),
                *("--airflow-home", str(self.home), "--airflow-port", str(self.port)),
            ],
            cwd=REPO,
            env=clean_env(PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # Ctrl-C reaches it even when this runs as a background job, which a shell starts
            # with SIGINT ignored (and a process keeps ignoring what it was started ignoring).
            preexec_fn=_sigint_default,
        )
        self.lines: list[str] = []
        self.sessions: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in cast(IO[str], self.proc.stdout):
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def note_sessions(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(OSError):
                    self.sessions.add(os.getsid(child.pid))
        self.sessions |= set(recorded_sessions(self.home))

    def wait_for_output(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            self.note_sessions()
            if self.proc.poll() is not None and text not in self.output:
                raise AssertionError(f"the demo exited before {text!r}:\n{self.output[-4000:]}")
            return text in self.output

        wait_for(repr(text), seen, timeout=timeout, interval=0.3)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.note_sessions()
            time.sleep(0.5)
        code = self.proc.wait(timeout=5)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        sigkill_sessions(sorted(self.sessions))


def test_the_demo_leaves_nothing_behind_when_it_ends(tmp_path: Path) -> None:
    demo = DemoProcess(tmp_path, users=200)
    try:
        code = demo.wait(timeout=480)
        assert code == 0, demo.output[-6000:]
        assert "balanced: True" in demo.output
        assert "→ OK" in demo.output
        assert len(demo.sessions) >= 4, demo.sessions  # the dev server and three components
        assert not alive_in(demo.sessions)
        assert not processes_of_home(demo.home)
        assert not port_in_use(demo.port)
        assert not (demo.home / PID_FILE).exists()
    finally:
        demo.kill()


def test_the_demo_says_its_scheduler_died_carries_on_and_ctrl_c_leaves_nothing(
    tmp_path: Path,
) -> None:
    demo = DemoProcess(tmp_path, users=200)
    try:
        demo.wait_for_output("as 'analyst'", timeout=300)  # Airflow is up, the run triggered
        guard = next(
            c["pid"]
            for c in json.loads((demo.home / PID_FILE).read_text())["components"]
            if c["component"] == "scheduler"
        )
        scheduler = psutil.Process(guard).children()[0]
        assert "airflow scheduler" in " ".join(scheduler.cmdline())
        scheduler.kill()
        demo.wait_for_output("Airflow's scheduler has ended (killed by SIGKILL)", timeout=30)
        assert f"mailroom local-airflow start --airflow-home {demo.home}" in demo.output
        assert "cannot move without it" in demo.output
        time.sleep(2)
        assert demo.proc.poll() is None  # it waits, having said so

        # What it says to do: start what is missing, from another terminal; the demo carries on.
        back = subprocess.run(
            [
                *(sys.executable, "-m", "mailroom.cli.main", "local-airflow", "start"),
                *("--airflow-home", str(demo.home)),
            ],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert back.returncode == 0, back.stdout + back.stderr
        assert "(scheduler started; api-server, dag-processor already running)" in back.stdout
        demo.wait_for_output("Airflow runs whole again: carrying on", timeout=60)
        demo.note_sessions()

        demo.proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = demo.wait(timeout=120)
        assert code == 130, demo.output[-4000:]
        assert "interrupted: stopping everything the demo started" in demo.output
        assert len(demo.sessions) >= 5, demo.sessions  # dev server, 3 components, new scheduler
        assert not alive_in(demo.sessions)
        assert not processes_of_home(demo.home)
        assert not port_in_use(demo.port)
        assert not (demo.home / PID_FILE).exists()
    finally:
        demo.kill()
