"""A throwaway AIRFLOW_HOME for one test session, configured before Airflow is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def configure_airflow_home() -> Path:
    """Point Airflow at a fresh home on SQLite; idempotent within one process."""
    if os.environ.get("MAILROOM_TEST_AIRFLOW_HOME"):
        return Path(os.environ["MAILROOM_TEST_AIRFLOW_HOME"])
    home = Path(tempfile.mkdtemp(prefix="mailroom-airflow-"))
    os.environ.update(
        {
            "MAILROOM_TEST_AIRFLOW_HOME": str(home),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "GX_ANALYTICS_ENABLED": "False",
        }
    )
    return home


def migrate() -> None:
    """Create the metadata database, and the pool the send shards run in."""
    from mailroom.cli.local_airflow import SEND_POOL, SEND_POOL_DESCRIPTION

    for args in (["db", "migrate"], ["pools", "set", SEND_POOL, "2", SEND_POOL_DESCRIPTION]):
        subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            check=True,
            capture_output=True,
            env=os.environ.copy(),
            timeout=300,
        )


def set_connections(**connections: dict[str, object]) -> None:
    for conn_id, value in connections.items():
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(value)


def set_variables(**variables: str) -> None:
    for key, value in variables.items():
        os.environ[f"AIRFLOW_VAR_{key.upper()}"] = value
