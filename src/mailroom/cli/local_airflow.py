"""A project-local Airflow on the embedded default: SQLite, LocalExecutor, real processes.

It writes nothing outside its home folder, starts api-server, scheduler and dag-processor as
child processes in their own process groups, and stops all of them on exit or Ctrl-C. Given an
executor and a database URL it runs the distributed shape too: CeleryExecutor on PostgreSQL,
with ``airflow celery worker`` processes started by :meth:`LocalAirflow.start_celery_worker`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from mailroom.cli.airflow_api import AirflowApi

# The pool the DAG's send shards run in: it bounds how many shards send at once.
SEND_POOL = "mailroom_send"
SEND_POOL_DESCRIPTION = "Mailroom send shards: how many send at the same time"
USERS = {"analyst": "user", "approver": "user", "admin": "admin"}
WORKER_HOSTNAME_ENV = "MAILROOM_WORKER_HOSTNAME"


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


@dataclass
class LocalAirflow:
    repo: Path
    home: Path
    port: int = 28080
    parallelism: int = 4
    send_pool_slots: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    executor: str = "LocalExecutor"
    # The metadata database (SQLAlchemy URL); None keeps the embedded SQLite file in the home.
    database_url: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def passwords_file(self) -> Path:
        return self.home / "passwords.json"

    def passwords(self) -> dict[str, str]:
        if not self.passwords_file.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            values = {user: secrets.token_urlsafe(12) for user in USERS}
            self.passwords_file.write_text(json.dumps(values, indent=2))
            self.passwords_file.chmod(0o600)
        return dict(json.loads(self.passwords_file.read_text()))

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

    def start(
        self, components: tuple[str, ...] = ("api-server", "scheduler", "dag-processor")
    ) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for component in components:
            args = ["airflow", component]
            if component == "api-server":
                args += ["--port", str(self.port), "--host", "127.0.0.1"]
            out = (logs / f"{component}.out").open("ab")
            self.processes.append(
                subprocess.Popen(
                    args,
                    env=self.env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
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
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
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
        out = (logs / f"celery-worker-{name}.out").open("ab")
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a started process and its whole process group, as a crashed host would."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc in self.processes:
            self.processes.remove(proc)

    def api(self, user: str) -> AirflowApi:
        """A REST client signed in as a local user (``analyst``, ``approver`` or ``admin``)."""
        return AirflowApi(self.url, user, self.passwords()[user])

    def serve_dag(self, dag_id: str, timeout: float = 240) -> None:
        """Wait for the API to answer and for ``dag_id`` to be parsed, then unpause it."""
        self.wait_healthy(timeout=timeout)
        admin = self.api("admin")
        admin.wait_until("the DAG to be parsed", lambda: admin.dag_exists(dag_id), timeout=timeout)
        admin.unpause(dag_id)

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{' '.join(map(str, proc.args))} exited with {proc.returncode}; "  # type: ignore[arg-type]
                        f"see {self.home / 'logs'}"
                    )
            try:
                if requests.get(f"{self.url}/api/v2/monitor/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise RuntimeError(
            f"Airflow API did not answer within {timeout:.0f}s; see {self.home / 'logs'}"
        )

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()

    def reset(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
