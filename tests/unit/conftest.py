from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroom.pipeline import ProjectPaths
from sendgrid_dev import SendGridDevServer
from support.markers import POSTGRES, require_marker

REPO = Path(__file__).resolve().parents[2]
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


@pytest.fixture
def project_paths() -> ProjectPaths:
    return ProjectPaths.under(REPO / "include")


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[SendGridDevServer]:
    with SendGridDevServer(data_dir=tmp_path / "sendgrid-dev", api_key="SG.test") as server:
        yield server


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    """The session's database on the local PostgreSQL; only for tests marked ``postgres``."""
    require_marker(request, POSTGRES)  # before the database, so a missing marker is the error
    return str(request.getfixturevalue("postgres_database"))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of its own on the local PostgreSQL for this test session, dropped after.

    Tests ask for ``postgres_url``, which checks they carry the ``postgres`` marker.
    """
    try:
        import psycopg2
    except ImportError as exc:  # pragma: no cover - the lock file installs it
        pytest.fail(f"psycopg2 is not installed, cannot run the PostgreSQL cases: {exc}")
    name = f"mailroom_outbox_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5
        )
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip()
    else:
        reason = ""
    if reason:  # failed outside the except block, so the report is this line, not a traceback
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user {PG_USER!r}; the "
            f"PostgreSQL cases need it (CI provides it): {reason}",
            pytrace=False,
        )
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
