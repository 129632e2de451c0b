"""Services for the distributed tier: PostgreSQL and Redis on this machine, fresh databases.

PostgreSQL (127.0.0.1:5432, trust auth, user postgres) and Redis (127.0.0.1:6379) are used as
they are when they answer; otherwise they are started here with the same commands as `.ci/run`
and stopped again afterwards. Every database, Redis key and process the tests create is removed.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.local_services import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    REDIS_HOST,
    REDIS_PORT,
    Broker,
    Databases,
    Services,
)
from support.markers import POSTGRES, require_marker


def _pg_ready() -> bool:
    if shutil.which("pg_isready") is None:
        return _can_connect_pg()
    return (
        subprocess.run(
            ["pg_isready", "-h", PG_HOST, "-p", str(PG_PORT), "-q"], check=False, timeout=10
        ).returncode
        == 0
    )


def _can_connect_pg() -> bool:
    import psycopg2

    try:
        psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3
        ).close()
    except psycopg2.OperationalError:
        return False
    return True


def _redis_ready() -> bool:
    import redis

    try:
        return bool(redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def _wait(what: str, ready: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.5)
    pytest.fail(f"{what} did not come up within {timeout:.0f}s", pytrace=False)


def _pg_cluster_version() -> str:
    versions = sorted(p.name for p in Path("/etc/postgresql").glob("*"))
    if not versions or shutil.which("pg_ctlcluster") is None:
        pytest.fail(
            f"PostgreSQL does not answer at {PG_HOST}:{PG_PORT} and no local cluster can be "
            "started (pg_ctlcluster, /etc/postgresql/<version>)",
            pytrace=False,
        )
    return versions[-1]


@pytest.fixture(scope="session")
def local_services() -> Iterator[Services]:
    """PostgreSQL and Redis, started only if they are not already running."""
    started_pg = started_redis = False
    version = ""
    if not _pg_ready():
        version = _pg_cluster_version()
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            check=True,
            timeout=120,
        )
        started_pg = True
        _wait("PostgreSQL", _pg_ready)
    if not _redis_ready():
        if shutil.which("redis-server") is None:
            pytest.fail(f"Redis does not answer at {REDIS_HOST}:{REDIS_PORT}", pytrace=False)
        subprocess.run(
            # The same command as .ci/run: nothing kept on disk.
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "-::1",
                "--port",
                str(REDIS_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                "/var/lib/redis",
                "--logfile",
                "/var/log/redis/ci.log",
            ],
            check=True,
            timeout=60,
        )
        started_redis = True
        _wait("Redis", _redis_ready)
    try:
        yield Services(started_pg, started_redis)
    finally:
        if started_redis:
            import redis

            # Shutting down closes the connection: expected.
            with contextlib.suppress(redis.ConnectionError):
                redis.Redis(REDIS_HOST, REDIS_PORT).shutdown(nosave=True)
        if started_pg:
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop"],
                check=False,
                timeout=120,
            )


@pytest.fixture
def fresh_databases(
    request: pytest.FixtureRequest, local_services: Services
) -> Iterator[Databases]:
    """Two new databases, Airflow's metadata and Mailroom's outbox, dropped afterwards."""
    import psycopg2

    require_marker(request, POSTGRES)

    token = uuid.uuid4().hex[:10]
    dbs = Databases(f"mailroom_dist_{token}_airflow", f"mailroom_dist_{token}_outbox")
    admin = psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5
    )
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            for name in (dbs.metadata, dbs.outbox):
                cur.execute(f'CREATE DATABASE "{name}"')
        yield dbs
    finally:
        with admin.cursor() as cur:
            for name in (dbs.metadata, dbs.outbox):
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def broker(local_services: Services) -> Iterator[Broker]:
    """A Celery queue of its own on the local Redis; its keys are removed afterwards.

    The queue (and the worker names, which carry the same token) are unique to this test, so a
    concurrent run elsewhere on the machine neither takes our tasks nor gets its own removed.
    """
    import redis

    token = uuid.uuid4().hex[:10]
    # Prefer a database nobody uses; any will do, since every key we make carries the token.
    empty = [n for n in range(15, 0, -1) if redis.Redis(REDIS_HOST, REDIS_PORT, db=n).dbsize() == 0]
    db = empty[0] if empty else 15
    result = Broker(db, f"mailroom-dist-{token}", token)
    try:
        yield result
    finally:
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=db)
        # Messages a killed worker held (kombu's "unacked" hash and its index) are ours too.
        for tag, payload in list(client.hscan_iter("unacked")):
            if token.encode() in payload:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            if token in name:
                client.delete(key)
            elif name.startswith("_kombu.binding.") and client.type(key) == b"set":
                ours = [m for m in client.smembers(key) if token.encode() in m]
                if ours:
                    client.srem(key, *ours)
        # Kombu's shared bookkeeping, which our workers created in a database that was empty:
        # removed only when nothing else (another run's queue or bindings) is left beside it.
        leftover = {k.decode(errors="replace") for k in client.scan_iter(count=1000)}
        if empty and leftover and leftover <= _KOMBU_SHARED_KEYS:
            client.delete(*leftover)


_KOMBU_SHARED_KEYS = {
    "_kombu.binding.celery.pidbox",
    "_kombu.binding.reply.celery.pidbox",
    "_kombu.binding.celeryev",
    "_kombu.binding_deadlines",
    "unacked",
    "unacked_index",
    "unacked_mutex",
}
