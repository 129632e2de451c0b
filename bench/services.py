"""What the benchmarks run against: the SendGrid-compatible dev server, a PostgreSQL copy of the
generated users, and the bench copy of the campaign (no rate limit).

Every process and database made here is removed again by the code that made it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
READY_PREFIX = "mailroom-sendgrid-dev listening on "
API_KEY = "SG.bench-key"


# --- the campaign without a rate limit -----------------------------------------------------------
def stop_group(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM a process started in a session of its own and its group; SIGKILL what is left
    after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def unlimited_spec(text: str) -> str:
    """The campaign YAML with its campaign-wide ``rate`` removed, so a send measures the pipeline
    and the server instead of the pacing (everything else unchanged)."""
    spec = yaml.safe_load(text)
    spec.pop("rate", None)
    return yaml.safe_dump(spec, allow_unicode=True, sort_keys=False)


def bench_include(repo: Path, target: Path) -> Path:
    """A copy of ``include/`` whose campaigns have no rate limit (``MAILROOM_INCLUDE_DIR``)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(repo / "include", target)
    for path in (target / "campaigns").glob("*.yaml"):
        path.write_text(unlimited_spec(path.read_text("utf-8")), "utf-8")
    return target


# --- the SendGrid-compatible dev server ----------------------------------------------------------
@dataclass
class DevServer:
    """``mailroom-sendgrid-dev`` in a process of its own, recording to ``data_dir`` (the bounded
    memory setting: a memory store would keep every accepted body), logging nothing per
    request. ``tls``: HTTPS, the certificate to trust written to ``ca_file``; ``latency_ms``: a
    network round trip added to every answer and handshake."""

    data_dir: Path
    tls: bool = False
    latency_ms: float = 0.0
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    @property
    def ca_file(self) -> Path | None:
        return self.data_dir.parent / f"{self.data_dir.name}-ca.pem" if self.tls else None

    def start(self) -> DevServer:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)
        network = ["--latency-ms", str(self.latency_ms)] if self.latency_ms else []
        if self.tls:
            network += ["--tls", "--tls-ca-file", str(self.ca_file)]
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "sendgrid_dev", "--port", "0"),
                *("--data-dir", str(self.data_dir), "--log-every", "0"),
                *network,
            ],
            stdout=subprocess.PIPE,
            stderr=(self.data_dir.parent / f"{self.data_dir.name}.log").open("ab"),
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"the dev server did not start: {line!r}")
        self.url = line.removeprefix(READY_PREFIX)
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (``/proc/<pid>/stat``)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict[str, Any]:
        verify: str | bool = str(self.ca_file) if self.ca_file else True
        result: dict[str, Any] = requests.get(
            f"{self.url}/_dev/stats", timeout=10, verify=verify
        ).json()
        return result

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.ca_file is not None:
            self.ca_file.unlink(missing_ok=True)


def trust_bundle(ca_file: Path, target: Path) -> Path:
    """A CA bundle as a client meets one: the public CAs (certifi's) and the dev server's own,
    so building a TLS context from it costs what it costs with a real bundle."""
    import certifi

    target.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + ca_file.read_bytes())
    return target


# --- PostgreSQL -----------------------------------------------------------------------------------
def pg_url(database: str, driver: str = "postgresql+psycopg2") -> str:
    return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def postgres_available() -> str | None:
    """None when the local PostgreSQL answers, else why not."""
    import psycopg2

    try:
        psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3
        ).close()
    except psycopg2.OperationalError as exc:
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} does not answer: {str(exc).strip()}"
    return None


@contextlib.contextmanager
def fresh_database(prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database on the local PostgreSQL, empty or a copy of ``template`` (which nobody
    may be connected to); dropped on the way out."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5
    )
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            copied = f' TEMPLATE "{template}"' if template else ""
            cur.execute(f'CREATE DATABASE "{name}"{copied}')
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def source_digests(repo: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """The SHA-256 (first 12 hex digits) of each file a benchmark's figures depend on: one that
    changes during a run makes its figures mixed."""
    import hashlib

    return {p: hashlib.sha256((repo / p).read_bytes()).hexdigest()[:12] for p in paths}


def machine_facts(**versions: str) -> dict[str, Any]:
    """Where a benchmark ran: cores, load, Python and SQLAlchemy (and ``versions``), when."""
    from datetime import UTC, datetime

    import sqlalchemy

    return {
        "nproc": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "sqlalchemy": sqlalchemy.__version__,
        **versions,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def copy_users_to_postgres(users_sqlite: Path, database: str) -> int:
    """The generated ``users`` and ``suppressions`` tables, row for row, through COPY."""
    import io

    import psycopg2

    src = sqlite3.connect(users_sqlite)
    dst = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database)
    copied = 0
    try:
        with dst, dst.cursor() as cur:
            cur.execute(
                "CREATE TABLE users (user_id TEXT PRIMARY KEY, email TEXT, first_name TEXT, "
                "locale TEXT, created_at TEXT)"
            )
            cur.execute("CREATE TABLE suppressions (email TEXT, reason TEXT)")
            for table, columns in (
                ("users", "user_id, email, first_name, locale, created_at"),
                ("suppressions", "email, reason"),
            ):
                rows = src.execute(f"SELECT {columns} FROM {table}")
                while chunk := rows.fetchmany(100_000):
                    buffer = io.StringIO()
                    for row in chunk:
                        buffer.write("\t".join(_copy_text(v) for v in row) + "\n")
                    buffer.seek(0)
                    cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN", buffer)
                    copied += len(chunk) if table == "users" else 0
            cur.execute("ANALYZE")
    finally:
        src.close()
        dst.close()
    return copied


def _copy_text(value: object) -> str:
    r"""One field in COPY's text format: ``\N`` for NULL, backslash escapes for the rest."""
    if value is None:
        return "\\N"
    for raw, escaped in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
        value = str(value).replace(raw, escaped)
    return str(value)
