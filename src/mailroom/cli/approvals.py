"""``mailroom approvals``: list, show, approve or reject campaign runs waiting at the gate.

Every call goes through Airflow's REST API as the person running the command, with their own
credentials, so Airflow itself decides who may answer: only the run's assigned approvers (never
the user who triggered it). ``show`` prints the same summary the Airflow UI shows on the run's
*Required Actions* page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from getpass import getpass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from mailroom.cli.airflow_api import AirflowApi, AirflowApiError

DAG_ID = "mailroom_campaign"
TASK_ID = "approve"
APPROVE, REJECT = "Approve", "Reject"
DEFAULT_URL = "http://127.0.0.1:28080"
# Airflow 3.3.2 can fail a HITL task answered within ~1 s of it parking (see PLATFORM_NOTES):
# an answer waits until the request is at least this old.
ANSWER_GRACE_SECONDS = 3.0


class ApprovalError(AirflowApiError):
    pass


@dataclass(frozen=True)
class Approval:
    """One approval request of a run, as Airflow's REST API reports it."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    subject: str
    body: str
    assignees: tuple[str, ...]
    created_at: datetime
    task_state: str | None
    responded_by: str | None
    responded_at: str | None
    chosen: tuple[str, ...]

    @property
    def answered(self) -> bool:
        return bool(self.chosen)

    @property
    def status(self) -> str:
        if not self.answered:
            return f"waiting for an answer ({self.task_state or 'unknown state'})"
        choice = ", ".join(self.chosen)
        if self.responded_by:
            return f"answered {choice} by {self.responded_by} at {self.responded_at}"
        return f"timed out: {choice} by default at {self.responded_at}"

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Approval:
        ti = data.get("task_instance") or {}
        by = data.get("responded_by_user") or {}
        return cls(
            dag_id=str(ti.get("dag_id", DAG_ID)),
            run_id=str(ti.get("dag_run_id", "")),
            task_id=str(ti.get("task_id", TASK_ID)),
            map_index=int(ti.get("map_index", -1)),
            subject=str(data.get("subject") or ""),
            body=str(data.get("body") or ""),
            assignees=tuple(str(u.get("id")) for u in data.get("assigned_users") or []),
            created_at=_parse_time(str(data["created_at"])),
            task_state=ti.get("state"),
            responded_by=(by.get("name") or by.get("id")) if by else None,
            responded_at=data.get("responded_at"),
            chosen=tuple(data.get("chosen_options") or ()),
        )


class Approvals:
    """The approval gate of ``mailroom_campaign`` runs, seen by one Airflow user."""

    def __init__(self, api: AirflowApi, dag_id: str = DAG_ID, task_id: str = TASK_ID) -> None:
        self.api, self.dag_id, self.task_id = api, dag_id, task_id

    def pending(self) -> list[Approval]:
        items = [Approval.from_api(d) for d in self.api.pending_approvals()]
        return sorted(
            (a for a in items if a.dag_id == self.dag_id and a.task_id == self.task_id),
            key=lambda a: a.created_at,
        )

    def get(self, run_id: str) -> Approval:
        try:
            data = self.api.request("GET", self._path(run_id))
        except AirflowApiError as exc:
            if exc.status == 404:
                raise ApprovalError(
                    f"run {run_id!r} of {self.dag_id} has no approval request (yet): it does not "
                    "exist, or has not reached the approval gate",
                    404,
                ) from exc
            raise
        return Approval.from_api(data)

    def answer(
        self,
        run_id: str,
        option: str,
        *,
        manifest_sha256: str | None = None,
        grace: float = ANSWER_GRACE_SECONDS,
    ) -> Approval:
        """Answer ``option`` as this user; returns the request as Airflow recorded the answer."""
        item = self.get(run_id)
        if item.answered:
            raise ApprovalError(f"run {run_id} was already {item.status}", 409)
        if manifest_sha256 and manifest_sha256 not in item.body:
            raise ApprovalError(
                f"run {run_id} asks to approve a different manifest than "
                f"{manifest_sha256}: look at it again with `mailroom approvals show {run_id}`"
            )
        age = (datetime.now(UTC) - item.created_at).total_seconds()
        if age < grace:
            time.sleep(grace - age)
        try:
            self.api.request(
                "PATCH",
                self._path(run_id),
                json={"chosen_options": [option], "params_input": {}},
            )
        except AirflowApiError as exc:
            if exc.status == 403:
                raise ApprovalError(
                    f"{self.api.username!r} may not answer run {run_id}: its approvers are "
                    f"{', '.join(item.assignees) or 'none'} (the user who triggered a run never "
                    "is one)",
                    403,
                ) from exc
            if exc.status == 409:
                raise ApprovalError(f"run {run_id} was answered already: {exc}", 409) from exc
            raise
        return self.get(run_id)

    def _path(self, run_id: str) -> str:
        return (
            f"/dags/{self.dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
            f"{self.task_id}/-1/hitlDetails"
        )


def render(item: Approval) -> str:
    """What ``show`` prints: the request's state, then the same body the Airflow UI shows."""
    return "\n".join(
        [
            f"# {item.subject}",
            f"run:       {item.run_id}",
            f"waiting:   since {item.created_at:%Y-%m-%d %H:%M:%S} UTC",
            f"approvers: {', '.join(item.assignees) or 'anyone allowed by Airflow'}",
            f"status:    {item.status}",
            "",
            item.body,
        ]
    )


def render_list(items: list[Approval], user: str) -> str:
    if not items:
        return "no campaign runs are waiting for approval"
    rows = [("", "RUN", "WAITING", "APPROVERS", "SUBJECT")]
    now = datetime.now(UTC)
    for a in items:
        mine = "*" if user in a.assignees else ""
        rows.append((mine, a.run_id, _age(now, a.created_at), ",".join(a.assignees), a.subject))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.append(f"(* = {user} may answer)")
    return "\n".join(line.rstrip() for line in lines)


# command line -------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "approvals",
        help="list, show, approve or reject campaign runs waiting at the approval gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="approvals_command", required=True)
    for name, text in (
        ("list", "runs waiting for an approval"),
        ("show", "one run's approval request: the summary the Airflow UI shows"),
        ("approve", "approve a run: it sends exactly the manifest in its summary"),
        ("reject", "reject a run: it ends with nothing sent"),
    ):
        cmd = commands.add_parser(name, help=text, description=text)
        if name != "list":
            cmd.add_argument("run_id", metavar="RUN", help="the Airflow DAG run id")
        if name == "approve":
            cmd.add_argument(
                "--manifest-sha256",
                help="refuse unless the run's summary names this manifest digest",
            )
        cmd.add_argument(
            "--airflow-url",
            default=os.environ.get("MAILROOM_AIRFLOW_URL", DEFAULT_URL),
            help="Airflow's base URL (env MAILROOM_AIRFLOW_URL; default %(default)s)",
        )
        cmd.add_argument(
            "--user",
            default=os.environ.get("MAILROOM_AIRFLOW_USER"),
            help="your Airflow user name (env MAILROOM_AIRFLOW_USER)",
        )
        cmd.add_argument(
            "--password-file",
            type=Path,
            help="a file holding your password, or a JSON object of user → password "
            "(otherwise env MAILROOM_AIRFLOW_PASSWORD, otherwise asked)",
        )
        cmd.add_argument("--dag-id", default=DAG_ID, help=argparse.SUPPRESS)


def run_command(args: argparse.Namespace) -> int:
    if not args.user:
        print("mailroom approvals: give --user or set MAILROOM_AIRFLOW_USER", file=sys.stderr)
        return 2
    try:
        password = resolve_password(args.user, args.password_file)
        gate = Approvals(AirflowApi(args.airflow_url, args.user, password), dag_id=args.dag_id)
        command = args.approvals_command
        if command == "list":
            print(render_list(gate.pending(), args.user))
        elif command == "show":
            print(render(gate.get(args.run_id)))
        else:
            option = APPROVE if command == "approve" else REJECT
            done = gate.answer(
                args.run_id, option, manifest_sha256=getattr(args, "manifest_sha256", None)
            )
            verb = "approved" if option == APPROVE else "rejected"
            print(f"{verb} run {done.run_id} as {args.user}: {done.status}")
        return 0
    except AirflowApiError as exc:
        print(f"mailroom approvals: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(
            f"mailroom approvals: cannot reach Airflow at {args.airflow_url}: {exc}",
            file=sys.stderr,
        )
        return 1


def resolve_password(user: str, password_file: Path | None) -> str:
    if password_file is not None:
        text = password_file.read_text(encoding="utf-8").strip()
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(values, dict):
            if user not in values:
                raise ApprovalError(f"{password_file} holds no password for {user!r}")
            return str(values[user])
        return text
    if os.environ.get("MAILROOM_AIRFLOW_PASSWORD"):
        return os.environ["MAILROOM_AIRFLOW_PASSWORD"]
    if not sys.stdin.isatty():
        raise ApprovalError(
            "no password: give --password-file, set MAILROOM_AIRFLOW_PASSWORD, or run in a terminal"
        )
    return getpass(f"Airflow password for {user}: ")


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _age(now: datetime, then: datetime) -> str:
    seconds = max(int((now - then).total_seconds()), 0)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
