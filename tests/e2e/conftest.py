"""The one local Airflow every end-to-end test of the approval gate and the console shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.gate_airflow import GateEnv, gate_airflow


@pytest.fixture(scope="package")
def gate(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GateEnv]:
    with gate_airflow(
        tmp_path_factory.mktemp("gate"), {item.name for item in request.session.items}
    ) as env:
        yield env
