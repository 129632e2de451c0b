"""``prepare`` resolves everything a run reads from Airflow, so a missing key fails there.

The unsubscribe secret, the outbox, the audience's connection, the transport's connection and
key, and the approvers Variable are read in the ``prepare`` task (``settings.resolve``), before
extract: a run with an empty API key never reaches an approver, let alone the send. Connections
and variables are given as ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*``, which Airflow reads first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from support.airflow_env import REPO

pytestmark = pytest.mark.dag

SECRET = "prepare-resolves-secret-value"
API_KEY = "SG.prepare-resolves-key"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example project, with every connection and variable a run needs."""
    include = tmp_path / "include"
    shutil.copytree(REPO / "include", include)
    staging = tmp_path / "staging"
    monkeypatch.setenv("MAILROOM_INCLUDE_DIR", str(include))
    monkeypatch.setenv("MAILROOM_STAGING_ROOT", str(staging))
    for name in ("STAGING_ROOT", "APPROVERS__WINTER_UPDATE"):
        monkeypatch.delenv(f"AIRFLOW_VAR_MAILROOM_{name}", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MAILROOM_OUTBOX", raising=False)
    monkeypatch.setenv("AIRFLOW_VAR_MAILROOM_UNSUBSCRIBE_SECRET", SECRET)
    _connection(monkeypatch, "mailroom_users", conn_type="sqlite", host=str(tmp_path / "u.db"))
    _connection(
        monkeypatch,
        "mailroom_sendgrid",
        conn_type="http",
        host="https://api.sendgrid.com",
        password=API_KEY,
    )
    return staging


def _connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: object) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


def _prepare(run_id: str, *, dry_run: bool = False) -> dict[str, object]:
    from mailroom_airflow import tasks

    return tasks.prepare("winter_update", dry_run, 1, run_id)


def test_a_run_with_every_setting_in_place_is_prepared(project: Path) -> None:
    prepared = _prepare("manual__ok")

    assert prepared["campaign"] == "winter_update"
    assert (project / "winter_update" / "manual__ok" / "campaign.yaml").exists()


BROKEN = {
    "api-key-empty": (
        {"conn": ("mailroom_sendgrid", {"conn_type": "http", "password": ""})},
        "the sendgrid connection 'mailroom_sendgrid': no SendGrid API key configured (empty). "
        "Nothing was extracted or sent.",
    ),
    "api-key-blank": (
        {"conn": ("mailroom_sendgrid", {"conn_type": "http", "password": "   "})},
        "the sendgrid connection 'mailroom_sendgrid': no SendGrid API key configured (empty). "
        "Nothing was extracted or sent.",
    ),
    "api-key-with-a-line-break": (
        {"conn": ("mailroom_sendgrid", {"conn_type": "http", "password": f"{API_KEY}\n"})},
        "the sendgrid connection 'mailroom_sendgrid': the SendGrid API key holds whitespace or "
        "a control character (a line break pasted with it?): set it again. "
        "Nothing was extracted or sent.",
    ),
    "sendgrid-connection-missing": (
        {"drop": "AIRFLOW_CONN_MAILROOM_SENDGRID"},
        "the sendgrid connection 'mailroom_sendgrid': Airflow connection 'mailroom_sendgrid' is "
        "not defined. Nothing was extracted or sent.",
    ),
    "sendgrid-timeout-not-a-number": (
        {
            "conn": (
                "mailroom_sendgrid",
                {"conn_type": "http", "password": API_KEY, "extra": {"timeout": "soon"}},
            )
        },
        "the sendgrid connection 'mailroom_sendgrid': could not convert string to float: 'soon'. "
        "Nothing was extracted or sent.",
    ),
    "audience-connection-missing": (
        {"drop": "AIRFLOW_CONN_MAILROOM_USERS"},
        "the audience connection 'mailroom_users': Airflow connection 'mailroom_users' is not "
        "defined. Nothing was extracted or sent.",
    ),
    "audience-connection-of-an-unknown-type": (
        {"conn": ("mailroom_users", {"conn_type": "mysql", "host": "db"})},
        "the audience connection 'mailroom_users': connection 'mailroom_users' has type 'mysql'; "
        "use sqlite, postgres, or set extra.sqlalchemy_url. Nothing was extracted or sent.",
    ),
    "unsubscribe-secret-missing": (
        {"drop": "AIRFLOW_VAR_MAILROOM_UNSUBSCRIBE_SECRET"},
        "the unsubscribe secret: Airflow Variable 'mailroom_unsubscribe_secret' is not set: it "
        "signs unsubscribe links. Nothing was extracted or sent.",
    ),
    "unsubscribe-secret-blank": (
        {"var": ("mailroom_unsubscribe_secret", "  \t ")},
        "the unsubscribe secret: Airflow Variable 'mailroom_unsubscribe_secret' is not set: it "
        "signs unsubscribe links. Nothing was extracted or sent.",
    ),
    "approvers-variable-of-empty-names": (
        {"var": ("mailroom_approvers__winter_update", ", ,")},
        "the approvers: Airflow Variable mailroom_approvers__winter_update holds an empty "
        "approver name (3 comma-separated entries, 3 empty): write the names separated by "
        "commas, or delete the Variable to use the campaign spec's approvers. "
        "Nothing was extracted or sent.",
    ),
    "approvers-variable-with-an-empty-name": (
        {"var": ("mailroom_approvers__winter_update", "ann,,bob")},
        "the approvers: Airflow Variable mailroom_approvers__winter_update holds an empty "
        "approver name (3 comma-separated entries, 1 empty): write the names separated by "
        "commas, or delete the Variable to use the campaign spec's approvers. "
        "Nothing was extracted or sent.",
    ),
}


@pytest.mark.parametrize(("change", "error"), BROKEN.values(), ids=BROKEN.keys())
def test_prepare_fails_naming_what_is_missing_and_writes_nothing(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, tuple[str, object] | str],
    error: str,
) -> None:
    from mailroom.errors import MailroomError

    if "drop" in change:
        monkeypatch.delenv(str(change["drop"]))
    if "conn" in change:
        conn_id, fields = change["conn"]
        if isinstance(fields, dict) and isinstance(fields.get("extra"), dict):
            fields = {**fields, "extra": json.dumps(fields["extra"])}
        _connection(monkeypatch, str(conn_id), **dict(fields))  # type: ignore[call-overload]
    if "var" in change:
        name, value = change["var"]
        monkeypatch.setenv(f"AIRFLOW_VAR_{str(name).upper()}", str(value))

    with pytest.raises(MailroomError) as refused:
        _prepare("manual__broken")

    assert str(refused.value) == error
    assert not (project / "winter_update" / "manual__broken").exists()
    logged = caplog.text + str(refused.value)
    assert API_KEY not in logged
    assert SECRET not in logged


def test_a_dry_run_needs_no_transport_connection(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_MAILROOM_SENDGRID")

    assert _prepare("manual__dry", dry_run=True)["dry_run"] is True


def test_the_approvers_variable_replaces_the_specs_names(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailroom_airflow import settings

    monkeypatch.setenv("AIRFLOW_VAR_MAILROOM_APPROVERS__WINTER_UPDATE", " ann , bob ")
    assert settings.approvers("winter_update", ["approver"]) == ["ann", "bob"]
    monkeypatch.setenv("AIRFLOW_VAR_MAILROOM_APPROVERS__WINTER_UPDATE", "  ")
    assert settings.approvers("winter_update", ["approver"]) == ["approver"]
