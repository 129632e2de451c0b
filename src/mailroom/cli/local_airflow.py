"""A project-local Airflow on the embedded default: SQLite, LocalExecutor, real processes.

It writes nothing outside its home folder. Each component (api-server, scheduler,
dag-processor) runs under a small guard process (``python -m mailroom.cli.local_airflow guard
-- airflow <component>``) that leads a session of its own: the component and everything it
starts (LocalExecutor workers, the task processes under them, which put themselves in process
groups of their own but stay in the session) belong to that session. When the component ends,
crashed or stopped, the guard stops whatever is left of its session, so a SIGKILLed scheduler
leaves no worker or task process behind; when the guard is told to stop it stops the component
first, then the rest. The scheduler serves no logs: with LocalExecutor and one home the
api-server reads the task log files itself (``--skip-serve-logs``; Airflow's log server would
bind port 8793 on every interface).

The home records what runs in ``local-airflow.json`` (each guard's pid, which is its session's
id, and its start time, so a reused pid is never taken for it): ``mailroom local-airflow
start|stop|status`` reads it, whoever started the components (the demo or that command).

Given an executor and a database URL it runs the distributed shape too: CeleryExecutor on
PostgreSQL, with ``airflow celery worker`` processes started by
:meth:`LocalAirflow.start_celery_worker`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import requests

from mailroom.cli.airflow_api import AirflowApi

# The pool the DAG's send shards run in: it bounds how many shards send at once.
SEND_POOL = "mailroom_send"
SEND_POOL_DESCRIPTION = "Mailroom send shards: how many send at the same time"
# analyst triggers, approver approves, operator watches and steers runs in the campaign console,
# viewer may only look (Airflow's roles: viewer < user < op < admin).
USERS = {
    "analyst": "user",
    "approver": "user",
    "operator": "op",
    "viewer": "viewer",
    "admin": "admin",
}
WORKER_HOSTNAME_ENV = "MAILROOM_WORKER_HOSTNAME"
COMPONENTS = ("api-server", "scheduler", "dag-processor")
DEFAULT_PORT = 28080
PID_FILE = "local-airflow.json"
# Seconds a stopped component has to end by itself (a scheduler waits for its running tasks)
# before its guard kills it, and then what is left of its session has to end on SIGTERM.
COMPONENT_GRACE_SECONDS = 10.0
SESSION_GRACE_SECONDS = 5.0
# A scheduler whose last heartbeat is older than this is taken for dead even if its process runs.
STALE_HEARTBEAT_SECONDS = 60.0


def worker_hostname() -> str:
    """Airflow's ``[core] hostname_callable`` for several workers on one machine.

    Task instances record the hostname of the worker that ran them; two workers on one host
    would both report the host's name, so each worker process names itself through
    ``MAILROOM_WORKER_HOSTNAME`` (a real deployment has one hostname per worker and needs none).
    """
    return os.environ.get(WORKER_HOSTNAME_ENV) or socket.getfqdn()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` (a connect succeeds)."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


# -- processes --------------------------------------------------------------------------------


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux; elsewhere
    nothing). Usable as a ``preexec_fn`` of a single-threaded parent."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG


def _become_subreaper() -> None:
    """Orphans of this process's descendants are re-parented to it, so it can reap them."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _all_pids() -> list[int]:
    proc = Path("/proc")
    if proc.is_dir():
        return [int(p.name) for p in proc.iterdir() if p.name.isdigit()]
    import psutil  # comes with Airflow; only needed where there is no /proc

    return list(psutil.pids())


def _is_zombie(pid: int) -> bool:
    """A process that has ended and waits for its parent to collect it: nothing to stop."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
        except (OSError, IndexError):
            return True  # gone while looking
    import psutil

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def session_processes(sid: int, *, exclude: Iterable[int] = ()) -> list[int]:
    """The live (not zombie) processes of session ``sid``, whatever process group they moved to."""
    skip = set(exclude)
    found = []
    for pid in _all_pids():
        if pid in skip:
            continue
        try:
            if os.getsid(pid) != sid:
                continue
        except OSError:
            continue
        if not _is_zombie(pid):
            found.append(pid)
    return sorted(found)


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch, as psutil reports it), None if no such
    process runs."""
    import psutil  # comes with Airflow

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(proc.create_time())
    except psutil.Error:
        return None


def _reap_children(skip: int | None = None) -> None:
    """Collect every ended child but ``skip`` (orphans re-parented to a subreaper included)."""
    if skip is None:
        with contextlib.suppress(ChildProcessError, OSError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        return
    import psutil  # comes with Airflow

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            if child.pid != skip and _is_zombie(child.pid):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(child.pid, os.WNOHANG)


def stop_session(
    sid: int,
    *,
    grace: float = SESSION_GRACE_SECONDS,
    exclude: Iterable[int] = (),
    reap: bool = False,
) -> list[int]:
    """SIGTERM every process of session ``sid``, SIGKILL what is left after ``grace`` seconds;
    returns the pids that had to be stopped. ``reap`` collects ended children as it goes (for a
    subreaper, whose session's orphans are its children)."""
    skip = set(exclude)
    targets = session_processes(sid, exclude=skip)
    if not targets:
        return []
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if reap:
            _reap_children()
        if not session_processes(sid, exclude=skip):
            return targets
        time.sleep(0.1)
    for _ in range(50):  # new processes may appear while killing: until none is left
        left = session_processes(sid, exclude=skip)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        if reap:
            _reap_children()
    return targets


def describe_exit(code: int | None) -> str:
    """A process's exit in words: ``exited with 1``, ``killed by SIGKILL``."""
    if code is None:
        return "still running"
    signum = -code if code < 0 else code - 128 if code > 128 else 0
    if signum:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(signum).name}"
    return f"exited with {code}"


def guard(argv: Sequence[str], *, tie_to_parent: bool = False) -> int:
    """Run ``argv`` (one Airflow component) and leave nothing of this session behind it.

    Meant to run as the leader of a session of its own. SIGTERM, SIGINT or SIGHUP stop the
    component (SIGTERM, then SIGKILL after ``COMPONENT_GRACE_SECONDS``); when it has ended,
    by itself or not, every other process of the session gets SIGTERM, then SIGKILL. The
    component is told to stop if the guard dies (Linux), and with ``tie_to_parent`` the guard
    stops when whoever started it dies. Returns the component's exit status (128 + signal for a
    signal).
    """
    me = os.getpid()
    if tie_to_parent:
        die_with_parent(signal.SIGTERM)
    _become_subreaper()
    stop_requested: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, request_stop)
    name = " ".join(argv[:2])
    if tie_to_parent and os.getppid() == 1:  # the parent died before the tie was made
        return 128 + signal.SIGTERM
    child = subprocess.Popen(list(argv), preexec_fn=die_with_parent)
    kill_at: float | None = None
    reaped = time.monotonic()
    while True:
        try:
            code = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() - reaped > 5:  # orphans the component's processes left to us
            reaped = time.monotonic()
            _reap_children(skip=child.pid)
        if stop_requested and kill_at is None:
            kill_at = time.monotonic() + COMPONENT_GRACE_SECONDS
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        if kill_at is not None and time.monotonic() > kill_at:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
    left = stop_session(me, exclude={me}, reap=True)
    _reap_children()
    how = "stopped" if stop_requested else describe_exit(code)
    print(
        f"[mailroom local-airflow] {name} {how}"
        + (f"; stopped {len(left)} process(es) it left in its session" if left else ""),
        file=sys.stderr,
        flush=True,
    )
    return code if code >= 0 else 128 - code


# -- the record of what runs ------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentRecord:
    """One component as the pid file records it: its guard's pid (= its session's id) and the
    guard's start time."""

    component: str
    pid: int
    started: float

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "pid": self.pid, "started": self.started}


@dataclass(frozen=True)
class Recorded:
    """What ``local-airflow.json`` says runs in a home."""

    owner: str
    owner_pid: int
    port: int
    started_at: str
    components: tuple[ComponentRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "owner_pid": self.owner_pid,
            "port": self.port,
            "started_at": self.started_at,
            "components": [c.to_json() for c in self.components],
        }

    @classmethod
    def from_json(cls, data: object) -> Recorded:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        components = data.get("components")
        if not isinstance(components, list):
            raise ValueError("'components' is not a list")
        records = []
        for item in components:
            if not isinstance(item, dict):
                raise ValueError("a component is not a JSON object")
            pid, started = item.get("pid"), item.get("started")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
                raise ValueError("a component's 'pid' is not a process id")
            if not isinstance(started, int | float) or isinstance(started, bool):
                raise ValueError("a component's 'started' is not a time")
            records.append(ComponentRecord(str(item.get("component")), pid, float(started)))
        port, owner_pid = data.get("port"), data.get("owner_pid", 0)
        if not isinstance(port, int) or isinstance(port, bool):
            raise ValueError("'port' is not a number")
        if not isinstance(owner_pid, int) or isinstance(owner_pid, bool):
            raise ValueError("'owner_pid' is not a process id")
        return cls(
            owner=str(data.get("owner", "")),
            owner_pid=owner_pid,
            port=port,
            started_at=str(data.get("started_at", "")),
            components=tuple(records),
        )


class PidFileError(ValueError):
    """The pid file exists but cannot be read as one."""


@dataclass(frozen=True)
class PidFile:
    path: Path

    def read(self) -> Recorded | None:
        """The record, or None when there is none; a file that is not one raises
        ``PidFileError`` (never taken for a running Airflow)."""
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return None
        try:
            return Recorded.from_json(json.loads(text))
        except ValueError as exc:
            raise PidFileError(f"{self.path}: not a local Airflow record ({exc})") from exc

    def write(self, recorded: Recorded) -> None:
        """Atomically: a reader never sees half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps(recorded.to_json(), indent=2) + "\n", "utf-8")
        partial.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


Liveness = Callable[[ComponentRecord], bool]


def record_alive(record: ComponentRecord) -> bool:
    """Whether the recorded guard still runs: its pid is alive and started when recorded."""
    started = process_start_time(record.pid)
    return started is not None and abs(started - record.started) < 0.5


@dataclass(frozen=True)
class Status:
    """Which recorded components run; ``stale`` when a record exists and none of them does."""

    recorded: Recorded | None
    running: tuple[str, ...]
    gone: tuple[str, ...]

    @property
    def state(self) -> str:
        if self.recorded is None:
            return "stopped"
        if not self.running:
            return "stale"
        return "running" if not self.gone else "partly running"

    @property
    def missing(self) -> tuple[str, ...]:
        """Components neither recorded as running nor recorded at all."""
        return tuple(c for c in COMPONENTS if c not in self.running)


def status_of(recorded: Recorded | None, alive: Liveness = record_alive) -> Status:
    if recorded is None:
        return Status(None, (), ())
    running = tuple(c.component for c in recorded.components if alive(c))
    gone = tuple(c.component for c in recorded.components if c.component not in running)
    return Status(recorded, running, gone)


def remaining_sessions(
    records: Iterable[ComponentRecord], started: Callable[[int], float | None] = process_start_time
) -> list[int]:
    """The session ids of ``records`` that may still hold processes of theirs.

    A session's id is its leader's pid, and Linux does not give that number to a new process
    while any process still has it as its session id; so if a process with that pid runs but
    started at another time, the session is empty (the number was free for reuse), and it is
    never swept: an unrelated session is never touched.
    """
    sessions = []
    for record in records:
        now = started(record.pid)
        if now is None or abs(now - record.started) < 0.5:
            sessions.append(record.pid)
    return sessions


class AlreadyRunning(RuntimeError):
    pass


class ComponentExited(RuntimeError):
    """A component of the local Airflow has ended while it was needed."""

    def __init__(self, component: str, pid: int, code: int | None, detail: str = "") -> None:
        self.component, self.pid, self.code = component, pid, code
        how = detail or describe_exit(code)
        super().__init__(f"Airflow's {component} (pid {pid}) {how}")


# -- the local Airflow ------------------------------------------------------------------------


@dataclass
class LocalAirflow:
    repo: Path
    home: Path
    port: int = DEFAULT_PORT
    parallelism: int = 4
    send_pool_slots: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    executor: str = "LocalExecutor"
    # The metadata database (SQLAlchemy URL); None keeps the embedded SQLite file in the home.
    database_url: str | None = None
    # Who starts it, as the pid file says (``mailroom local-airflow start``, ``mailroom demo``).
    owner: str = "mailroom"
    # The component each started guard runs (by the guard's pid).
    components: dict[int, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def passwords_file(self) -> Path:
        return self.home / "passwords.json"

    @property
    def pid_file(self) -> PidFile:
        return PidFile(self.home / PID_FILE)

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def passwords(self) -> dict[str, str]:
        if not self.passwords_file.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            self.passwords_file.write_text("{}")
        values = dict(json.loads(self.passwords_file.read_text()))
        # A user added since the file was written gets a password of their own.
        if set(USERS) - set(values):
            values.update({u: secrets.token_urlsafe(12) for u in USERS if u not in values})
            self.passwords_file.write_text(json.dumps(values, indent=2))
        self.passwords_file.chmod(0o600)
        return values

    def env(self) -> dict[str, str]:
        secret_file = self.home / "secret_key"
        if not secret_file.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            secret_file.write_text(secrets.token_urlsafe(32))
        secret = secret_file.read_text().strip()
        self.passwords()
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.repo / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.repo / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                self.database_url or f"sqlite:///{self.home / 'airflow.db'}"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                f"{u}:{r}" for u, r in USERS.items()
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__SECRET_KEY": secret,
            "AIRFLOW__API_AUTH__JWT_SECRET": secret,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # A campaign is a chain of a dozen tasks, each queued only once the scheduler's
            # loop sees the one before it done: an idle loop waits a quarter of a second for the
            # next look rather than a whole one (Airflow's default), which is up to 0.75 s less
            # between every two tasks, for a few more queries of the metadata database.
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": os.environ.get(
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME", "0.25"
            ),
            # A task whose worker died with it (everything killed, then started again) is
            # failed, and retried, after a minute without heartbeats rather than five (or as
            # the environment sets it).
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": os.environ.get(
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT", "60"
            ),
            # How long a worker may take to notice its task process has died (it waits on the
            # task's sockets that long once they are closed): a killed send task is failed,
            # and its retry scheduled, within a second rather than up to five.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join(
                [
                    str(self.repo / "src"),
                    os.environ.get("PYTHONPATH", ""),
                ]
            ),
            "GX_ANALYTICS_ENABLED": "False",
            "NO_PROXY": "127.0.0.1,localhost",
            **self.extra_env,
        }
        return env

    def airflow(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            ["airflow", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def migrate(self) -> None:
        self.airflow("db", "migrate")
        self.airflow("pools", "set", SEND_POOL, str(self.send_pool_slots), SEND_POOL_DESCRIPTION)

    def import_connections(self, connections: dict[str, dict[str, object]]) -> None:
        path = self.home / "connections.json"
        path.write_text(json.dumps(connections, indent=2))
        path.chmod(0o600)
        self.airflow("connections", "import", "--overwrite", str(path))

    def import_variables(self, variables: dict[str, str]) -> None:
        path = self.home / "variables.json"
        path.write_text(json.dumps(variables, indent=2))
        path.chmod(0o600)
        self.airflow("variables", "import", "--action-on-existing-key", "overwrite", str(path))

    # -- what runs --------------------------------------------------------------------------

    def status(self) -> Status:
        """What the pid file records and which of it runs; an unreadable pid file counts as
        none (``start`` replaces it)."""
        try:
            return status_of(self.pid_file.read())
        except PidFileError:
            return Status(None, (), ())

    def start(
        self,
        components: tuple[str, ...] = COMPONENTS,
        *,
        tie_to_parent: bool = False,
    ) -> None:
        """Start ``components``, each under its guard in a session of its own, and record them.

        Refuses (``AlreadyRunning``) when the pid file records any of them running; a record of
        which nothing runs is stale and replaced. ``tie_to_parent`` stops them when this process
        dies (the demo); without it they outlive it (``mailroom local-airflow start``).
        """
        status = self.status()
        clash = [c for c in components if c in status.running]
        if clash:
            assert status.recorded is not None
            raise AlreadyRunning(
                f"the local Airflow in {self.home} already runs {', '.join(clash)} (started by "
                f"{status.recorded.owner} at {status.recorded.started_at}, port "
                f"{status.recorded.port})"
            )
        recorded = status.recorded.components if status.recorded is not None else ()
        kept = tuple(c for c in recorded if c.component in status.running)
        # What a stale record's guards left behind (a guard SIGKILLed, its component not).
        for sid in remaining_sessions(c for c in recorded if c.component not in status.running):
            stop_session(sid)
        self.logs.mkdir(parents=True, exist_ok=True)
        env = self.env()
        for component in components:
            args = ["airflow", component]
            if component == "api-server":
                args += ["--port", str(self.port), "--host", "127.0.0.1"]
            if component == "scheduler":
                args += ["--skip-serve-logs"]
            self._start_guarded(component, args, env, tie_to_parent=tie_to_parent)
        self._record(kept, status.recorded if kept else None)

    def _start_guarded(
        self, component: str, args: list[str], env: Mapping[str, str], *, tie_to_parent: bool
    ) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "mailroom.cli.local_airflow", "guard"]
        if tie_to_parent:
            command.append("--tie-to-parent")
        out: IO[bytes] = (self.logs / f"{component}.out").open("ab")
        try:
            proc = subprocess.Popen(
                [*command, "--", *args],
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        self.processes.append(proc)
        self.components[proc.pid] = component
        return proc

    def _record(
        self, kept: tuple[ComponentRecord, ...] = (), previous: Recorded | None = None
    ) -> None:
        """Write the pid file: the components kept running (under ``previous``'s owner, who
        runs this Airflow) and the ones this object started."""
        ours = []
        for proc in self.processes:
            component = self.components.get(proc.pid)
            started = process_start_time(proc.pid)
            if component is not None and started is not None:
                ours.append(ComponentRecord(component, proc.pid, started))
        if not ours and not kept:
            self.pid_file.remove()
            return
        self.pid_file.write(
            Recorded(
                owner=previous.owner if previous else self.owner,
                owner_pid=previous.owner_pid if previous else os.getpid(),
                port=self.port,
                started_at=(
                    previous.started_at
                    if previous
                    else datetime.now(UTC).isoformat(timespec="seconds")
                ),
                components=(*kept, *ours),
            )
        )

    def start_celery_worker(
        self, name: str, *, concurrency: int = 2, queues: str | None = None
    ) -> subprocess.Popen[bytes]:
        """One ``airflow celery worker`` (CeleryExecutor), in its own process group.

        ``name`` is its Celery node name (``name@host``) and the hostname its task instances
        record, so several workers on one machine stay distinguishable. It serves no logs (the
        workers share this home's log folder with the api-server).
        """
        self.logs.mkdir(parents=True, exist_ok=True)
        args = [
            "airflow",
            "celery",
            "worker",
            "--celery-hostname",
            f"{name}@%h",
            "--concurrency",
            str(concurrency),
            "--skip-serve-logs",
            "--without-mingle",
            "--without-gossip",
        ]
        if queues:
            args += ["--queues", queues]
        env = {
            **self.env(),
            WORKER_HOSTNAME_ENV: name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
        }
        out = (self.logs / f"celery-worker-{name}.out").open("ab")
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a started process and its whole session, as a crashed host would."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in session_processes(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc in self.processes:
            self.processes.remove(proc)

    def api(self, user: str) -> AirflowApi:
        """A REST client signed in as a local user (``analyst``, ``approver`` or ``admin``)."""
        return AirflowApi(self.url, user, self.passwords()[user])

    def serve_dag(self, dag_id: str, timeout: float = 240) -> None:
        """Wait for the API to answer and for ``dag_id`` to be parsed, then unpause it."""
        self.wait_healthy(timeout=timeout)
        admin = self.api("admin")

        def parsed() -> bool:
            self.check_running()
            return admin.dag_exists(dag_id)

        admin.wait_until("the DAG to be parsed", parsed, timeout=timeout)
        admin.unpause(dag_id)

    def pid_of(self, component: str) -> int | None:
        """The pid of the guard this object started ``component`` under, if it did."""
        return next((pid for pid, name in self.components.items() if name == component), None)

    def check_running(self) -> None:
        """Raise ``ComponentExited`` for the first started component that has ended."""
        for proc in self.processes:
            code = proc.poll()
            if code is not None:
                name = self.components.get(proc.pid) or " ".join(map(str, proc.args))  # type: ignore[arg-type]
                raise ComponentExited(name, proc.pid, code)

    def health(self) -> dict[str, Any] | None:
        """``/api/v2/monitor/health``, or None when the API does not answer."""
        try:
            response = requests.get(f"{self.url}/api/v2/monitor/health", timeout=5)
            return dict(response.json()) if response.ok else None
        except (requests.RequestException, ValueError):
            return None

    def scheduler_heartbeat(self) -> datetime | None:
        """The scheduler's last heartbeat, as the API reports it; None when the API does not
        answer or no scheduler has ever run."""
        health = self.health()
        beat = ((health or {}).get("scheduler") or {}).get("latest_scheduler_heartbeat")
        if not beat:
            return None
        try:
            when = datetime.fromisoformat(str(beat))
        except ValueError:
            return None
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    def scheduler_heartbeat_age(self) -> float | None:
        """Seconds since the scheduler's last heartbeat (None: see ``scheduler_heartbeat``)."""
        when = self.scheduler_heartbeat()
        return None if when is None else (datetime.now(UTC) - when).total_seconds()

    def wait_scheduler(self, since: datetime, timeout: float = 120) -> None:
        """Wait for a scheduler heartbeat after ``since`` (a scheduler started then is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.check_running()
            except ComponentExited as exc:
                raise RuntimeError(f"{exc}; see {self.logs}") from exc
            beat = self.scheduler_heartbeat()
            if beat is not None and beat >= since:
                return
            time.sleep(1)
        raise RuntimeError(f"no scheduler heartbeat within {timeout:.0f}s; see {self.logs}")

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.check_running()
            except ComponentExited as exc:
                raise RuntimeError(f"{exc}; see {self.logs}") from exc
            try:
                if requests.get(f"{self.url}/api/v2/monitor/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise RuntimeError(f"Airflow API did not answer within {timeout:.0f}s; see {self.logs}")

    def stop(self) -> None:
        """Stop every process this object started, with everything in their sessions, and
        remove their record."""
        guarded = [p for p in self.processes if p.pid in self.components]
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if proc in guarded:
                        proc.send_signal(signal.SIGTERM)  # the guard stops the rest
                    else:
                        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + COMPONENT_GRACE_SECONDS + SESSION_GRACE_SECONDS + 5
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.processes:
            stop_session(proc.pid, grace=1.0)
        self._forget(p.pid for p in self.processes)
        self.processes.clear()
        self.components.clear()

    def _forget(self, pids: Iterable[int]) -> None:
        """Drop these guards from the pid file (the file goes when nothing else is in it)."""
        try:
            recorded = self.pid_file.read()
        except PidFileError:
            return
        if recorded is None:
            return
        gone = set(pids)
        left = tuple(c for c in recorded.components if c.pid not in gone)
        if not left:
            self.pid_file.remove()
        elif len(left) != len(recorded.components):
            self.pid_file.write(
                Recorded(
                    recorded.owner, recorded.owner_pid, recorded.port, recorded.started_at, left
                )
            )

    def stop_recorded(self) -> list[str]:
        """Stop whatever the pid file records (whoever started it), with everything in the
        components' sessions; returns the components that were running. The record goes."""
        try:
            recorded = self.pid_file.read()
        except PidFileError:
            recorded = None
        if recorded is None:
            self.pid_file.remove()
            return []
        status = status_of(recorded)
        for record in recorded.components:
            if record.component in status.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGTERM)  # its guard stops the rest
        deadline = time.monotonic() + COMPONENT_GRACE_SECONDS + SESSION_GRACE_SECONDS + 5
        while time.monotonic() < deadline:
            if not any(record_alive(r) for r in recorded.components):
                break
            time.sleep(0.2)
        for sid in remaining_sessions(recorded.components):
            stop_session(sid, grace=1.0)
        self.pid_file.remove()
        return list(status.running)

    def leftovers(self, recorded: Recorded | None = None) -> list[int]:
        """Live processes still in the sessions of ``recorded`` (by default, the pid file's)."""
        if recorded is None:
            try:
                recorded = self.pid_file.read()
            except PidFileError:
                return []
        if recorded is None:
            return []
        found: list[int] = []
        for sid in remaining_sessions(recorded.components):
            found += session_processes(sid)
        return found

    def reset(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


# -- ``mailroom local-airflow start|stop|status`` ---------------------------------------------


def loopback_endpoints(home: Path) -> list[tuple[str, str]]:
    """(connection id, URL) of the connections imported into ``home`` (its connections.json)
    whose host is an http(s) URL on this machine: a local stand-in such as the demo's
    SendGrid-compatible dev server, which does not come back with Airflow."""
    try:
        data = json.loads((home / "connections.json").read_text("utf-8"))
    except (OSError, ValueError):
        return []
    found = []
    if isinstance(data, dict):
        for conn_id, conn in data.items():
            host = conn.get("host") if isinstance(conn, dict) else None
            if not isinstance(host, str):
                continue
            parts = urlsplit(host)
            if parts.scheme in {"http", "https"} and parts.hostname in {"127.0.0.1", "localhost"}:
                found.append((str(conn_id), host))
    return found


def _endpoint_answers(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return port_in_use(port, parts.hostname or "127.0.0.1")


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def command_start(airflow: LocalAirflow, *, timeout: float = 240) -> int:
    status = airflow.status()
    if status.running and not status.missing:
        recorded = status.recorded
        assert recorded is not None
        print(
            f"mailroom local-airflow: already running at http://127.0.0.1:{recorded.port} "
            f"({', '.join(status.running)}; started by {recorded.owner} at "
            f"{recorded.started_at}). `mailroom local-airflow stop` stops it.",
            file=sys.stderr,
        )
        return 1
    demo = None
    if status.recorded is not None and status.running:
        airflow.port = status.recorded.port
        if status.recorded.owner == "mailroom demo" and process_start_time(
            status.recorded.owner_pid
        ):
            demo = status.recorded.owner_pid
    elif status.state == "stale":
        print(f"mailroom local-airflow: removing a stale pid file ({_rel(airflow.pid_file.path)})")
    missing = status.missing
    if "api-server" in missing and port_in_use(airflow.port):
        print(
            f"mailroom local-airflow: port {airflow.port} is in use by a process this home does "
            f"not record; stop it or start on another port (--port)",
            file=sys.stderr,
        )
        return 1
    if not (airflow.home / "airflow.db").exists() and airflow.database_url is None:
        print(f"mailroom local-airflow: creating the Airflow database in {_rel(airflow.home)}")
        airflow.migrate()
    airflow.owner = "mailroom local-airflow start"
    since = datetime.now(UTC)
    try:
        airflow.start(missing)
    except AlreadyRunning as exc:
        print(f"mailroom local-airflow: {exc}", file=sys.stderr)
        return 1
    try:
        airflow.wait_healthy(timeout=timeout)
        if "scheduler" in missing:
            airflow.wait_scheduler(since, timeout=timeout)
    except RuntimeError as exc:
        print(f"mailroom local-airflow: {exc}; stopping what was started", file=sys.stderr)
        airflow.stop()
        return 1
    print(
        f"Airflow is up at {airflow.url} ({', '.join(missing)} started"
        + (f"; {', '.join(status.running)} already running" if status.running else "")
        + "). Nothing was triggered."
    )
    print(f"  campaign console: {airflow.url}/plugin/campaigns")
    if demo is not None:
        print(
            f"  `mailroom demo` (pid {demo}) runs this Airflow: it carries on, and stops "
            "what was started here when it ends"
        )
    print(
        f"  users: {', '.join(USERS)}; passwords in {_rel(airflow.passwords_file)}\n"
        f"  logs: {_rel(airflow.logs)}/<component>.out; pid file {_rel(airflow.pid_file.path)}\n"
        "  stop it with `mailroom local-airflow stop` (make airflow-stop)"
    )
    _warn_dead_endpoints(airflow.home)
    return 0


def _warn_dead_endpoints(home: Path) -> None:
    for conn_id, url in loopback_endpoints(home):
        if not _endpoint_answers(url):
            port = urlsplit(url).port
            print(
                f"  note: connection {conn_id} sends to {url}, where nothing answers now (the "
                "demo's SendGrid-compatible dev server stops with the demo); a run that sends "
                f"fails until it runs again: mailroom-sendgrid-dev --port {port} "
                "--data-dir var/sendgrid-dev"
            )


def command_stop(airflow: LocalAirflow) -> int:
    try:
        recorded = airflow.pid_file.read()
    except PidFileError as exc:
        print(f"mailroom local-airflow: {exc}; removing it", file=sys.stderr)
        airflow.pid_file.remove()
        return 1
    if recorded is None:
        print(f"mailroom local-airflow: nothing recorded as running in {_rel(airflow.home)}")
        return 0
    stopped = airflow.stop_recorded()
    left = airflow.leftovers(recorded)
    if left:
        print(
            f"mailroom local-airflow: processes {left} are still running after SIGKILL",
            file=sys.stderr,
        )
        return 1
    if stopped:
        print(
            f"stopped the local Airflow at http://127.0.0.1:{recorded.port} "
            f"({', '.join(stopped)}), with every process it had started"
        )
    else:
        print(
            "mailroom local-airflow: nothing was running; removed a stale pid file "
            f"({_rel(airflow.pid_file.path)})"
        )
    if port_in_use(recorded.port):
        print(
            f"mailroom local-airflow: port {recorded.port} is still in use by a process this "
            "home does not record",
            file=sys.stderr,
        )
        return 1
    return 0


def command_status(airflow: LocalAirflow) -> int:
    """Exit status 0 when everything runs, 1 when part of it does, 3 when nothing does."""
    try:
        recorded = airflow.pid_file.read()
    except PidFileError as exc:
        print(f"mailroom local-airflow: {exc}", file=sys.stderr)
        recorded = None
    status = status_of(recorded)
    if recorded is None or status.state == "stale":
        why = (
            f" (stale pid file {_rel(airflow.pid_file.path)}: nothing it records runs)"
            if recorded is not None
            else ""
        )
        print(f"local Airflow in {_rel(airflow.home)}: not running{why}")
        if port_in_use(airflow.port):
            print(f"  port {airflow.port} is in use by a process this home does not record")
        return 3
    airflow.port = recorded.port
    print(
        f"local Airflow in {_rel(airflow.home)}: {status.state}, {airflow.url} (started by "
        f"{recorded.owner} at {recorded.started_at})"
    )
    by_name = {c.component: c for c in recorded.components}
    for component in COMPONENTS:
        record = by_name.get(component)
        if component in status.running and record is not None:
            print(f"  {component:<14} running (pid {record.pid})")
        elif record is not None:
            print(f"  {component:<14} not running (pid {record.pid} has ended)")
        else:
            print(f"  {component:<14} not started")
    age = airflow.scheduler_heartbeat_age() if "api-server" in status.running else None
    if age is not None:
        print(f"  scheduler's last heartbeat {age:.0f}s ago")
    if status.gone:
        print("  `mailroom local-airflow start` starts what is not running")
    return 0 if not status.gone else 1


def run_command(repo: Path, action: str, *, home: Path | None, port: int | None) -> int:
    """``mailroom local-airflow start|stop|status``: the demo's local Airflow (same home, port,
    configuration), nothing triggered."""
    airflow = LocalAirflow(repo, home or repo / ".airflow", port=port or DEFAULT_PORT)
    if action == "start":
        return command_start(airflow)
    if port is None:  # stop and status: the port it was started on
        with contextlib.suppress(PidFileError):
            recorded = airflow.pid_file.read()
            if recorded is not None:
                airflow.port = recorded.port
    if action == "stop":
        return command_stop(airflow)
    return command_status(airflow)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mailroom.cli.local_airflow guard [--tie-to-parent] -- COMMAND...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "guard" or "--" not in args:
        print(main.__doc__, file=sys.stderr)
        return 2
    split = args.index("--")
    options, command = args[1:split], args[split + 1 :]
    if not command or set(options) - {"--tie-to-parent"}:
        print(main.__doc__, file=sys.stderr)
        return 2
    return guard(command, tie_to_parent="--tie-to-parent" in options)


if __name__ == "__main__":
    raise SystemExit(main())
