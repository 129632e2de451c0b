"""The Airflow adapter's staging settings, against a real S3-compatible server (moto).

The staging root comes from the Variable ``mailroom_staging_root`` (or ``MAILROOM_STAGING_ROOT``),
its credentials from the connection ``mailroom_staging`` or, without it, the standard AWS
variables; connections and variables are given as ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.s3_server import KEY, SECRET, S3Server, threaded_s3_server

pytestmark = pytest.mark.dag


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with threaded_s3_server() as server:
        yield server


@pytest.fixture
def staged_on(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MAILROOM_STAGING", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MAILROOM_OUTBOX", raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_MAILROOM_STAGING_ROOT", s3.url("airflow"))
    return s3


def run_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What ``prepare`` reads besides staging: the secret, a shared outbox (object-storage
    staging needs one), the audience's and the transport's connections."""
    monkeypatch.setenv("AIRFLOW_VAR_MAILROOM_UNSUBSCRIBE_SECRET", "staging-settings-secret")
    for conn_id, fields in {
        "mailroom_outbox": {"conn_type": "sqlite", "host": str(tmp_path / "outbox.sqlite")},
        "mailroom_users": {"conn_type": "sqlite", "host": str(tmp_path / "users.sqlite")},
        "mailroom_sendgrid": {"conn_type": "http", "password": "SG.staging-settings"},
    }.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


def test_tasks_keep_the_run_folder_on_object_storage_with_the_staging_connection(
    staged_on: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mailroom_airflow import tasks

    run_settings(monkeypatch, tmp_path)
    monkeypatch.setenv(
        "AIRFLOW_CONN_MAILROOM_STAGING",
        json.dumps(
            {
                "conn_type": "generic",
                "login": KEY,
                "password": SECRET,
                "extra": {"endpoint_url": staged_on.endpoint_url},
            }
        ),
    )
    prepared = tasks.prepare("winter_update", False, 2, "manual__conn")
    assert prepared["run_dir"] == staged_on.url("airflow/winter_update/manual__conn")
    tasks.record_approval(
        prepared, {"chosen_options": ["Approve"], "responded_by_user": {"name": "approver"}}
    )
    objects = staged_on.keys("airflow/winter_update/manual__conn")
    assert set(objects) == {"campaign.yaml", "run.json", "approval.json"}


def test_without_the_connection_the_standard_aws_settings_apply(
    staged_on: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mailroom_airflow import tasks

    run_settings(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", staged_on.endpoint_url)
    prepared = tasks.prepare("winter_update", True, 1, "manual__env")
    assert "campaign.yaml" in staged_on.keys("airflow/winter_update/manual__env")
    assert prepared["dry_run"] is True


def test_object_storage_staging_needs_a_shared_outbox(staged_on: S3Server) -> None:
    from mailroom.errors import MailroomError
    from mailroom_airflow import settings

    with pytest.raises(MailroomError, match="mailroom_outbox"):
        settings.outbox_url()
