"""The local Airflow's bookkeeping without Airflow: the pid file, status, sessions, the guard.

Real processes stand in for Airflow's components (a guard around a process that starts one in a
process group of its own, as LocalExecutor's task processes do), so what is checked is what the
e2e tests rely on: nothing of a session is left once its component ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mailroom.campaign_spec import DEFAULT_SEND_RETRY_DELAY_SECONDS, parse_campaign
from mailroom.cli.local_airflow import (
    COMPONENTS,
    PID_FILE,
    ComponentRecord,
    LocalAirflow,
    PidFile,
    PidFileError,
    Recorded,
    command_start,
    command_status,
    command_stop,
    describe_exit,
    free_port,
    loopback_endpoints,
    process_start_time,
    record_alive,
    remaining_sessions,
    session_processes,
    status_of,
    stop_session,
)
from mailroom.errors import CampaignSpecError

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def recorded(*components: tuple[str, int, float], port: int = 28080) -> Recorded:
    return Recorded(
        owner="mailroom local-airflow start",
        owner_pid=4242,
        port=port,
        started_at="2026-12-06T10:00:00+00:00",
        components=tuple(ComponentRecord(c, pid, started) for c, pid, started in components),
    )


def this_process(component: str) -> tuple[str, int, float]:
    started = process_start_time(os.getpid())
    assert started is not None
    return (component, os.getpid(), started)


def a_dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the pid file -----------------------------------------------------------------------------


def test_the_pid_file_round_trips_and_leaves_no_partial_file(tmp_path: Path) -> None:
    pid_file = PidFile(tmp_path / PID_FILE)
    assert pid_file.read() is None
    record = recorded(("api-server", 101, 1.5), ("scheduler", 102, 2.25))
    pid_file.write(record)
    assert pid_file.read() == record
    assert [p.name for p in tmp_path.iterdir()] == [PID_FILE]
    pid_file.remove()
    pid_file.remove()  # already gone: no error
    assert pid_file.read() is None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"port": 1}',
        '{"port": 1, "components": {}}',
        '{"port": "x", "components": []}',
        '{"port": 1, "components": [{"component": "scheduler", "pid": true, "started": 1}]}',
        '{"port": 1, "components": [{"component": "scheduler", "pid": 1, "started": 1}]}',
        '{"port": 1, "components": [{"component": "scheduler", "pid": 9, "started": "x"}]}',
    ],
)
def test_a_pid_file_that_is_not_a_record_is_refused_not_taken_for_a_running_airflow(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / PID_FILE).write_text(content)
    with pytest.raises(PidFileError, match="not a local Airflow record"):
        PidFile(tmp_path / PID_FILE).read()
    airflow = LocalAirflow(REPO, tmp_path)
    assert airflow.status().state == "stopped"


# -- status -----------------------------------------------------------------------------------


def test_status_of_what_the_pid_file_records() -> None:
    everything = recorded(*((c, 100 + i, 1.0) for i, c in enumerate(COMPONENTS)))
    assert status_of(None).state == "stopped"
    assert status_of(None).missing == COMPONENTS

    running = status_of(everything, alive=lambda r: True)
    assert (running.state, running.running, running.gone) == ("running", COMPONENTS, ())
    assert running.missing == ()

    crashed = status_of(everything, alive=lambda r: r.component != "scheduler")
    assert crashed.state == "partly running"
    assert crashed.gone == ("scheduler",)
    assert crashed.missing == ("scheduler",)

    stale = status_of(everything, alive=lambda r: False)
    assert (stale.state, stale.running) == ("stale", ())

    partial = status_of(recorded(("api-server", 100, 1.0)), alive=lambda r: True)
    assert partial.state == "running"
    assert partial.missing == ("scheduler", "dag-processor")


def test_a_record_is_alive_only_for_the_process_that_started_when_recorded() -> None:
    _, pid, started = this_process("scheduler")
    assert record_alive(ComponentRecord("scheduler", pid, started))
    assert not record_alive(ComponentRecord("scheduler", pid, started - 100))  # a reused pid
    assert not record_alive(ComponentRecord("scheduler", a_dead_pid(), started))


def test_sessions_whose_leader_pid_was_reused_are_never_swept() -> None:
    starts = {10: 5.0, 11: 99.0}  # 10: the recorded guard; 11: someone else now; 12: gone
    records = [
        ComponentRecord("api-server", 10, 5.0),
        ComponentRecord("scheduler", 11, 7.0),
        ComponentRecord("dag-processor", 12, 8.0),
    ]
    assert remaining_sessions(records, started=starts.get) == [10, 12]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (None, "still running"),
        (0, "exited with 0"),
        (1, "exited with 1"),
        (-signal.SIGKILL, "killed by SIGKILL"),
        (128 + signal.SIGKILL, "killed by SIGKILL"),
        (128 + signal.SIGTERM, "killed by SIGTERM"),
    ],
)
def test_an_exit_in_words(code: int | None, words: str) -> None:
    assert describe_exit(code) == words


# -- sessions and the guard -------------------------------------------------------------------

# A component that starts a child in a process group of its own (as a LocalExecutor worker
# starts a task process), prints both pids, then waits.
COMPONENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import os, time; os.setpgid(0, 0); time.sleep(600)"])
    while os.getpgid(child.pid) != child.pid:
        time.sleep(0.01)
    print(os.getpid(), child.pid, flush=True)
    time.sleep(600)
    """
)


def start_guard(*extra: str) -> tuple[subprocess.Popen[str], int, int]:
    guard = subprocess.Popen(
        [
            *(sys.executable, "-m", "mailroom.cli.local_airflow", "guard", *extra, "--"),
            *(sys.executable, "-c", COMPONENT),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert guard.stdout is not None
    component, task = map(int, guard.stdout.readline().split())
    return guard, component, task


def test_a_component_killed_by_sigkill_leaves_nothing_of_its_session() -> None:
    guard, component, task = start_guard()
    try:
        assert os.getsid(task) == guard.pid
        assert os.getpgid(task) == task  # moved out of the guard's process group
        assert set(session_processes(guard.pid)) == {guard.pid, component, task}
        os.kill(component, signal.SIGKILL)
        assert guard.wait(timeout=30) == 128 + signal.SIGKILL
        assert session_processes(guard.pid) == []
        assert guard.stderr is not None
        said = guard.stderr.read()
        assert "killed by SIGKILL; stopped 1 process(es) it left in its session" in said
    finally:
        stop_session(guard.pid, grace=0.1)
        guard.wait()


def test_a_stopped_guard_stops_its_component_then_the_rest() -> None:
    guard, component, task = start_guard()
    try:
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=30) == 128 + signal.SIGTERM  # the component's own exit
        assert session_processes(guard.pid) == []
        for pid in (component, task):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        stop_session(guard.pid, grace=0.1)
        guard.wait()


def test_a_guard_killed_by_sigkill_takes_its_component_with_it() -> None:
    guard, component, task = start_guard()
    try:
        os.kill(guard.pid, signal.SIGKILL)
        guard.wait()
        deadline = time.monotonic() + 10
        while process_start_time(component) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_start_time(component) is None  # told to stop when its guard died
        # Its task process is left in the session: what `start` and `stop` sweep.
        assert stop_session(guard.pid, grace=0.5) == [task]
        assert session_processes(guard.pid) == []
    finally:
        stop_session(guard.pid, grace=0.1)


def test_a_guard_tied_to_its_parent_stops_everything_when_the_parent_is_killed() -> None:
    # The demo's case: its components stop with it, even when it is SIGKILLed.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "guard = subprocess.Popen([sys.executable, '-m', 'mailroom.cli.local_airflow', "
            "'guard', '--tie-to-parent', '--', sys.executable, '-c', sys.argv[1]], "
            "start_new_session=True)\n"
            "print(guard.pid, flush=True)\n"
            "time.sleep(600)",
            COMPONENT,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert parent.stdout is not None
    guard = int(parent.stdout.readline())
    component, task = map(int, parent.stdout.readline().split())
    try:
        assert set(session_processes(guard)) == {guard, component, task}
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while session_processes(guard) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_processes(guard) == []
    finally:
        parent.kill()
        stop_session(guard, grace=0.1)


def test_stop_session_kills_what_ignores_sigterm_after_the_grace() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print(1, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    started = time.monotonic()
    assert stop_session(proc.pid, grace=0.5) == [proc.pid]
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 10
    assert stop_session(proc.pid) == []


# -- the commands, on a home whose pid file is made up ----------------------------------------


def test_start_refuses_an_airflow_that_runs_and_status_names_its_components(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    airflow = LocalAirflow(REPO, tmp_path, port=port)
    airflow.pid_file.write(recorded(*(this_process(c) for c in COMPONENTS), port=port))

    assert command_start(airflow) == 1
    out = capsys.readouterr()
    assert f"already running at http://127.0.0.1:{port}" in out.err
    assert not (tmp_path / "logs").exists()  # nothing was started

    assert command_status(airflow) == 0
    shown = capsys.readouterr().out
    for component in COMPONENTS:
        assert f"{component:<14} running (pid {os.getpid()})" in shown


def test_a_stale_pid_file_is_reported_and_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    airflow = LocalAirflow(REPO, tmp_path, port=free_port())
    dead = a_dead_pid()
    airflow.pid_file.write(recorded(*((c, dead, 1.0) for c in COMPONENTS), port=airflow.port))

    assert command_status(airflow) == 3
    assert "not running (stale pid file" in capsys.readouterr().out
    assert airflow.pid_file.path.exists()  # status only reports

    assert command_stop(airflow) == 0
    assert "nothing was running; removed a stale pid file" in capsys.readouterr().out
    assert not airflow.pid_file.path.exists()
    assert command_stop(airflow) == 0
    assert "nothing recorded as running" in capsys.readouterr().out


def test_partly_running_status_says_what_start_would_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    airflow = LocalAirflow(REPO, tmp_path, port=free_port())
    airflow.pid_file.write(
        recorded(
            this_process("api-server"),
            ("scheduler", a_dead_pid(), 1.0),
            this_process("dag-processor"),
            port=airflow.port,
        )
    )
    assert command_status(airflow) == 1
    shown = capsys.readouterr().out
    assert "partly running" in shown
    assert "scheduler      not running" in shown
    assert "`mailroom local-airflow start` starts what is not running" in shown


def test_loopback_endpoints_are_the_connections_a_restart_does_not_bring_back(
    tmp_path: Path,
) -> None:
    (tmp_path / "connections.json").write_text(
        json.dumps(
            {
                "mailroom_sendgrid": {"conn_type": "http", "host": "http://127.0.0.1:3030"},
                "mailroom_users": {"conn_type": "sqlite", "host": "/data/users.sqlite"},
                "real": {"conn_type": "http", "host": "https://api.example.test"},
            }
        )
    )
    assert loopback_endpoints(tmp_path) == [("mailroom_sendgrid", "http://127.0.0.1:3030")]
    assert loopback_endpoints(tmp_path / "nowhere") == []


# -- the campaign's retry delay ---------------------------------------------------------------


def base_spec() -> dict[str, object]:
    raw = yaml.safe_load((REPO / "include/campaigns/winter_update.yaml").read_text("utf-8"))
    assert isinstance(raw, dict)
    return raw


def test_send_retry_delay_seconds_defaults_and_is_read() -> None:
    assert parse_campaign(base_spec(), source="s").send_retry_delay_seconds == 10.0
    assert DEFAULT_SEND_RETRY_DELAY_SECONDS == 10.0
    spec = parse_campaign({**base_spec(), "send_retry_delay_seconds": 2.5}, source="s")
    assert spec.send_retry_delay_seconds == 2.5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be more than 0 seconds, got 0.0"),
        (-3, "must be more than 0 seconds, got -3.0"),
        (float("nan"), "must be a finite number, got nan"),
        (float("inf"), "must be a finite number, got inf"),
        (True, "must be a number, got the boolean true"),
        ("10", "must be a number, got text"),
        (1e300, "is too large for a duration"),
    ],
)
def test_send_retry_delay_seconds_must_be_positive_and_finite(value: object, message: str) -> None:
    with pytest.raises(CampaignSpecError, match="field 'send_retry_delay_seconds' " + message):
        parse_campaign({**base_spec(), "send_retry_delay_seconds": value}, source="s")


def test_a_misspelt_retry_delay_is_refused_with_a_suggestion() -> None:
    with pytest.raises(CampaignSpecError, match="did you mean 'send_retry_delay_seconds'"):
        parse_campaign({**base_spec(), "send_retry_delay": 5}, source="s")


# -- the demo watching its Airflow ------------------------------------------------------------


def test_the_demo_says_when_its_scheduler_ended_or_hangs_and_carries_on_when_it_is_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailroom.cli.demo import Demo

    demo = Demo(
        REPO,
        users=10,
        yes=True,
        sendgrid_api_host=None,
        keep_running=False,
        work_dir=tmp_path / "work",
        airflow_home=tmp_path / "airflow",
        airflow_port=free_port(),
    )
    demo.run_id = "manual__x"
    demo._airflow_started = time.monotonic() - 3600  # long enough to ask for heartbeats
    heartbeat_age: list[float | None] = [3.0]
    monkeypatch.setattr(demo.airflow, "scheduler_heartbeat_age", lambda: heartbeat_age[0])
    assert demo.watch_airflow()

    ended = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    ended.wait()
    demo.airflow.processes.append(ended)
    demo.airflow.components[ended.pid] = "scheduler"
    assert not demo.watch_airflow()
    said = capsys.readouterr().out
    assert "Airflow's scheduler has ended (exited with 3)." in said
    assert "Run manual__x cannot move without it" in said
    assert f"`mailroom local-airflow start --airflow-home {tmp_path / 'airflow'}`" in said
    assert not demo.watch_airflow()
    assert capsys.readouterr().out == ""  # said once, not every second

    # Started again by someone else (as `mailroom local-airflow start` records it).
    demo.airflow.pid_file.write(recorded(this_process("scheduler")))
    assert demo.watch_airflow()
    assert "Airflow runs whole again: carrying on" in capsys.readouterr().out

    # A scheduler whose process runs but whose heartbeat is stale.
    heartbeat_age[0] = 75.0
    demo._health_checked = 0.0
    assert not demo.watch_airflow()
    assert "Airflow's scheduler runs but has sent no heartbeat for 75s." in capsys.readouterr().out
    heartbeat_age[0] = 2.0
    demo._health_checked = 0.0
    assert demo.watch_airflow()
