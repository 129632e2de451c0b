"""Where an operator command finds a run: its outbox, its folder, and the Airflow that runs it.

The DAG's ``prepare`` task records in its XCom the run's folder (``run_dir``) and the outbox it
resolved (``outbox``, with any password masked): the commands read them from there, through
Airflow's REST API, so they act on exactly what the run uses, however the deployment names it.
``--outbox-url`` (or ``MAILROOM_OUTBOX_URL``) overrides the outbox; an outbox password masked in
the XCom comes from ``MAILROOM_OUTBOX_PASSWORD``.

Airflow is ``--airflow-url`` (or ``MAILROOM_AIRFLOW_URL``), signed in as ``--user`` (or
``MAILROOM_AIRFLOW_USER``) with ``--password-file`` (or ``MAILROOM_AIRFLOW_PASSWORD``). Without
them, the demo's local Airflow (``.airflow/`` in the project, as ``make demo`` and ``make
airflow`` start it) is used as ``admin``, with the passwords file it wrote.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.engine import make_url

from mailroom.cli.airflow_api import AirflowApi, AirflowApiError
from mailroom.delivery.outbox import masked_url
from mailroom.errors import MailroomError

DAG_ID = "mailroom_campaign"
LOCAL_AIRFLOW_URL = "http://127.0.0.1:28080"
LOCAL_AIRFLOW_USER = "admin"
MASKED = "***"


class RunNotFound(MailroomError):
    """The command cannot tell where the run's outbox is."""


@dataclass
class RunAccess:
    run_key: str
    outbox_url: str
    run_dir: str | None
    airflow: AirflowApi | None

    @property
    def run_id(self) -> str:
        return self.run_key.split("/", 1)[1]

    def describe(self) -> str:
        """The run's folder and outbox, as the command prints them first (no password)."""
        return (
            f"run {self.run_key}\n  folder: {self.run_dir or '(unknown: Airflow not reachable)'}"
            f"\n  outbox: {masked_url(self.outbox_url)}"
        )


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--outbox-url",
        default=os.environ.get("MAILROOM_OUTBOX_URL"),
        help="the outbox database (env MAILROOM_OUTBOX_URL); by default the one the run's "
        "prepare task recorded, read through Airflow",
    )
    cmd.add_argument(
        "--airflow-url",
        default=os.environ.get("MAILROOM_AIRFLOW_URL"),
        help=f"Airflow's base URL (env MAILROOM_AIRFLOW_URL; default the local {LOCAL_AIRFLOW_URL}"
        " when the project's .airflow/ exists)",
    )
    cmd.add_argument(
        "--user",
        default=os.environ.get("MAILROOM_AIRFLOW_USER"),
        help="your Airflow user name (env MAILROOM_AIRFLOW_USER)",
    )
    cmd.add_argument(
        "--password-file",
        type=Path,
        help="a file holding your Airflow password, or a JSON object of user → password "
        "(otherwise env MAILROOM_AIRFLOW_PASSWORD)",
    )


def find_run(args: argparse.Namespace, repo: Path) -> RunAccess:
    """The run named by ``args.run_key``: its outbox, folder and Airflow, as the module says."""
    run_key = str(args.run_key)
    if "/" not in run_key:
        raise RunNotFound(f"{run_key!r} is not <campaign>/<run id>, as the report names a run")
    airflow = _airflow(args, repo)
    prepared: dict[str, Any] = {}
    if airflow is not None:
        try:
            value = airflow.xcom(DAG_ID, run_key.split("/", 1)[1], "prepare")
            prepared = value if isinstance(value, dict) else {}
        except AirflowApiError as exc:
            if exc.status != 404 or not args.outbox_url:
                raise RunNotFound(
                    f"cannot read run {run_key}'s prepare task from Airflow at "
                    f"{airflow.base_url}: {exc}"
                ) from exc
        except requests.RequestException as exc:
            if not args.outbox_url:
                raise RunNotFound(
                    f"cannot reach Airflow at {airflow.base_url} ({exc.__class__.__name__}) to "
                    "find the run's outbox: start it (`make airflow`), or give --outbox-url"
                ) from exc
            airflow = None
    if prepared and prepared.get("campaign") and run_key.split("/", 1)[0] != prepared["campaign"]:
        raise RunNotFound(
            f"run {run_key.split('/', 1)[1]!r} belongs to campaign {prepared['campaign']!r}, "
            f"not {run_key.split('/', 1)[0]!r}"
        )
    outbox = args.outbox_url or prepared.get("outbox")
    if not outbox:
        raise RunNotFound(
            "no outbox: give --outbox-url (or MAILROOM_OUTBOX_URL), or the run's Airflow "
            "(--airflow-url, --user, --password-file), whose prepare task recorded it"
        )
    return RunAccess(run_key, _with_password(str(outbox)), prepared.get("run_dir"), airflow)


def _with_password(url: str) -> str:
    parsed = make_url(url)
    if parsed.password != MASKED:
        return url
    password = os.environ.get("MAILROOM_OUTBOX_PASSWORD")
    if not password:
        raise RunNotFound(
            f"the run's outbox {masked_url(url)} needs a password: set MAILROOM_OUTBOX_PASSWORD "
            "or give --outbox-url"
        )
    return parsed.set(password=password).render_as_string(hide_password=False)


def _airflow(args: argparse.Namespace, repo: Path) -> AirflowApi | None:
    from mailroom.cli.approvals import resolve_password

    url, user, password_file = args.airflow_url, args.user, args.password_file
    local_passwords = repo / ".airflow" / "passwords.json"
    if url is None:
        if not local_passwords.exists():
            return None
        url = LOCAL_AIRFLOW_URL
        user = user or LOCAL_AIRFLOW_USER
        password_file = password_file or local_passwords
    if not user:
        raise RunNotFound(f"give --user (or MAILROOM_AIRFLOW_USER) for Airflow at {url}")
    return AirflowApi(url, user, resolve_password(user, password_file))
