"""The non-interactive demo: real Airflow processes, REST trigger and REST approval."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests

from mailroom.audience.sample import generate
from mailroom.cli.local_airflow import free_port
from sendgrid_dev import accepted_recipients, read_accepted

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
USERS = 3000


def test_demo_sends_every_valid_recipient_exactly_once(tmp_path: Path) -> None:
    work = tmp_path / "work"
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailroom.cli.main",
            "demo",
            "--yes",
            "--users",
            str(USERS),
            "--work-dir",
            str(work),
            "--airflow-home",
            str(tmp_path / "airflow"),
            "--airflow-port",
            str(port),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "report: status sent; approval approved by approver" in output
    assert "balanced: True" in output

    # Independently of the demo's own check: the dev server's records against the sample's oracle.
    expected = generate(tmp_path / "oracle.sqlite", users=USERS).expected
    records = read_accepted(work / "sendgrid-dev")
    received = Counter(e.lower() for e in accepted_recipients(records))
    assert set(received) == expected
    assert max(received.values()) == 1
    for record in records:
        assert len(record["body"]["personalizations"]) <= 1000
        for item in record["body"]["personalizations"]:
            assert len(item["to"]) == 1
            assert "cc" not in item
            assert "bcc" not in item
    # The demo stopped everything it started: neither the API nor the dev server still listens.
    dev_url = re.search(r"dev server at (http://[0-9.]+:\d+)", output)
    assert dev_url is not None
    for url in (f"http://127.0.0.1:{port}/api/v2/monitor/health", dev_url.group(1)):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=2)
