from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroom.pipeline import ProjectPaths
from mailroom.sendgrid_dev_server import SendGridDevServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project_paths() -> ProjectPaths:
    return ProjectPaths.under(REPO / "include")


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[SendGridDevServer]:
    with SendGridDevServer(data_dir=tmp_path / "sendgrid-dev", api_key="SG.test") as server:
        yield server
