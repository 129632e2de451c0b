from __future__ import annotations

import pytest

from support.airflow_env import configure_airflow_home, migrate

configure_airflow_home()


@pytest.fixture(scope="session")
def airflow_db() -> None:
    migrate()
