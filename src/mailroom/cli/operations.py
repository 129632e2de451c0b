"""Operator commands on a run's outbox: status, halt, resume, resend, settle; and ``outbox
upgrade``, the outbox's schema to this release's.

They find the run's outbox and folder as the DAG does (``run_access``) and work on the outbox
database directly, so they act at once on every shard of a run, wherever it runs. Each decision
(halt, resume, resend, settle) is recorded with who, when and why, and the run's counts before
and after (``Outbox.actions``); the report lists them as the run's history. Resuming, resending
or settling as not sent only makes requests sendable again; clear the run's ``send_shard`` and
``reconcile`` tasks in Airflow (UI, REST, or ``--clear`` here) to send them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from mailroom import operator_actions
from mailroom.cli import run_access
from mailroom.cli.run_access import RunAccess, RunNotFound
from mailroom.delivery import feedback_report
from mailroom.delivery.outbox import (
    Action,
    BatchState,
    NothingToSettle,
    OperatorAction,
    Outbox,
    UnknownOutboxRevision,
)
from mailroom.errors import MailroomError
from mailroom.staging import is_url, local_path


def add_commands(sub: Any) -> None:
    for name, text in (
        (
            "status",
            "counts of a run's batches and recipients per state, its history, and what the "
            "provider reported after accepting it (rewriting delivery_feedback.json in a run "
            "folder on this machine)",
        ),
        ("halt", "stop every shard of a run before its next request"),
        ("resume", "lift a halt so cleared shards send the halted batches"),
        (
            "resend",
            "send unknown (or failed) requests again: an explicit operator choice, with a reason; "
            "the recipients of an unknown request may already have the message",
        ),
        (
            "settle",
            "record what checking the provider showed for unknown requests: --as sent (never "
            "sent again) or --as not-sent (sendable again)",
        ),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("run_key", help="<campaign>/<Airflow run id>, as in the report")
        run_access.add_arguments(cmd)
        if name == "settle":
            cmd.add_argument(
                "requests",
                nargs="*",
                metavar="REQUEST",
                help="batch ids (each request's custom_args batch_id, as SendGrid's activity "
                "search and events show it)",
            )
            cmd.add_argument(
                "--all-unknown", action="store_true", help="every unknown request of the run"
            )
            cmd.add_argument("--as", dest="outcome", choices=("sent", "not-sent"), required=True)
        if name in {"halt", "resume", "resend", "settle"}:
            cmd.add_argument(
                "--reason",
                required=name in {"resend", "settle"},
                default="halted by an operator" if name == "halt" else None,
                help="why (recorded with who and when in the run's history and report)",
            )
            cmd.add_argument(
                "--by",
                help="who is deciding (default: the Airflow user, else the login name)",
            )
        if name == "resend":
            cmd.add_argument("--failed", action="store_true", help="also resend failed batches")
        if name in {"resume", "resend", "settle"}:
            cmd.add_argument(
                "--clear",
                action="store_true",
                help="also clear the run's send_shard and reconcile tasks in Airflow, so it "
                "sends what is sendable now",
            )
    outbox = sub.add_parser("outbox", help="the outbox database itself")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    upgrade = outbox_sub.add_parser(
        "upgrade",
        help="bring the outbox's tables to this release's schema (opening it does too); prints "
        "the revision before and after",
    )
    upgrade.add_argument("--outbox-url", default=os.environ.get("MAILROOM_OUTBOX_URL"))


def run_outbox_command(args: argparse.Namespace) -> int:
    """``mailroom outbox upgrade``: open the outbox (which upgrades it) and say what it did."""
    if not args.outbox_url:
        print("mailroom: give --outbox-url or set MAILROOM_OUTBOX_URL", file=sys.stderr)
        return 2
    try:
        outbox = Outbox(args.outbox_url)
    except UnknownOutboxRevision as exc:
        print(f"mailroom outbox upgrade: {exc}", file=sys.stderr)
        return 1
    outbox.dispose()
    schema = outbox.schema
    print(f"outbox schema before: {schema.describe_before()}")
    print(f"outbox schema after:  {schema.after} (this release's newest)")
    if not schema.changed:
        print("nothing to do: it was already there")
    return 0


def run_command(args: argparse.Namespace, repo: Path) -> int:
    try:
        access = run_access.find_run(args, repo)
    except (MailroomError, OSError) as exc:
        print(f"mailroom {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, RunNotFound) else 1
    print(access.describe())
    outbox = Outbox(access.outbox_url)
    try:
        if outbox.manifest_sha256(access.run_key) is None:
            print(f"mailroom: no run {access.run_key!r} in the outbox", file=sys.stderr)
            return 1
        return _act(args, access, outbox)
    except (MailroomError, NothingToSettle, ValueError) as exc:
        print(f"mailroom {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        outbox.dispose()


def _act(args: argparse.Namespace, access: RunAccess, outbox: Outbox) -> int:
    run_key = access.run_key
    by = getattr(args, "by", None) or (access.airflow.username if access.airflow else None)
    by = by or getpass.getuser()
    run_root = _local_folder(access)
    if args.command == "halt":
        operator_actions.halt(outbox, run_key, by=by, reason=args.reason, run_root=run_root)
        print(f"halt requested for {run_key} by {by}: shards stop before their next request")
    elif args.command == "resume":
        reason = args.reason or "resumed by an operator"
        operator_actions.resume(outbox, run_key, by=by, reason=reason, run_root=run_root)
        print(f"halt lifted for {run_key} by {by}")
        _clear_send_tasks(args, access)
    elif args.command == "resend":
        states = [BatchState.UNKNOWN, BatchState.FAILED] if args.failed else [BatchState.UNKNOWN]
        in_doubt = outbox.counts(run_key)[BatchState.UNKNOWN]["recipients"]
        if args.failed:
            moved = outbox.requeue(run_key, states, OperatorAction(Action.RESEND, by, args.reason))
        else:
            before = outbox.counts(run_key)[BatchState.UNKNOWN]["batches"]
            operator_actions.resend_unknown(
                outbox, run_key, by=by, reason=args.reason, run_root=run_root
            )
            moved = before
        names = [s.value for s in states]
        print(
            f"{moved} request(s) of {run_key} in {names} are sendable again ({by}: {args.reason})"
        )
        if in_doubt:
            print(
                f"WARNING: {in_doubt} recipient(s) were in unknown requests: the provider may "
                "have accepted them already, so they may get the message twice. `mailroom "
                "settle` records what checking the provider showed instead."
            )
        _clear_send_tasks(args, access)
    elif args.command == "settle":
        requests = _unknown_requests(outbox, run_key) if args.all_unknown else args.requests
        if not requests:
            print(
                "mailroom settle: name the requests (batch ids) or give --all-unknown; "
                f"unknown now: {', '.join(_unknown_requests(outbox, run_key)) or 'none'}",
                file=sys.stderr,
            )
            return 2
        action = Action.SETTLE_SENT if args.outcome == "sent" else Action.SETTLE_NOT_SENT
        settled = outbox.settle(run_key, requests, OperatorAction(action, by, args.reason))
        print(
            f"settled {len(requests)} request(s), {settled} recipient(s) of {run_key} as "
            f"{args.outcome} ({by}: {args.reason})"
        )
        if action == Action.SETTLE_SENT:
            print("nothing will be sent again to them")
        _clear_send_tasks(args, access)
    print(json.dumps(outbox.counts(run_key), indent=2))
    history = outbox.actions(run_key)
    if history:
        print("history:")
        for entry in history:
            label = operator_actions.action_label(entry["action"])
            print(
                f"  {entry['at']} {label} by {entry['by']}: {entry['reason']} "
                f"({len(entry['requests'])} request(s), {entry['recipients']} recipient(s))"
            )
    if args.command == "status":
        return _delivery_feedback(outbox, run_key, run_root)
    return 0


def _delivery_feedback(outbox: Outbox, run_key: str, run_root: Path | None) -> int:
    """``mailroom status``: what the provider reported after it accepted the requests, per
    locale; with the run's folder on this machine, ``delivery_feedback.json`` and
    ``delivery_feedback.not_sent.csv`` in it are brought up to date first."""
    from mailroom.delivery import report  # pandas: only for the command that writes it

    if run_root is None:
        feedback = feedback_report.section(outbox, run_key)
    else:
        try:
            feedback = report.refresh_delivery_feedback(outbox, run_key, run_root)
        except OSError as exc:
            print(
                f"mailroom status: cannot write the delivery feedback into {run_root}: {exc}",
                file=sys.stderr,
            )
            return 1
    print(
        f"after the provider accepted it ({feedback['provider']}'s events; separate from the "
        "equation above: these recipients count as sent; unsubscribed includes one-click):"
    )
    if feedback["per_locale"] or any(feedback["total"].values()):
        for line in feedback_report.table(feedback):
            print(line)
    else:
        print("  no event yet")
    if run_root is None:
        print(
            "  the run's folder is not on this machine: delivery_feedback.json is not written "
            "(the report's delivery_feedback is as it was at reconcile)"
        )
    else:
        print(
            f"  written to {run_root / report.FEEDBACK_FILE}; who did not get it, the bounced "
            f"and dropped included ({feedback['listed_in_not_sent']:,} of "
            f"{feedback['not_sent_rows']:,}): {feedback['not_sent_file']}"
        )
    return 0


def _local_folder(access: RunAccess) -> Path | None:
    """The run's folder when it is on this machine (its audit trail and delivery feedback are
    written there)."""
    if not access.run_dir or is_url(access.run_dir):
        return None
    folder = local_path(access.run_dir)
    return folder if folder.is_dir() else None


def _unknown_requests(outbox: Outbox, run_key: str) -> list[str]:
    return sorted(
        {str(row["batch_id"]) for row in outbox.not_sent(run_key) if row["state"] == "unknown"}
    )


def _clear_send_tasks(args: argparse.Namespace, access: RunAccess) -> None:
    if not getattr(args, "clear", False) or access.airflow is None:
        print(
            "clear the run's send_shard and reconcile tasks in Airflow to send them "
            "(or run this again with --clear)"
        )
        return
    access.airflow.request(
        "POST",
        f"/dags/{run_access.DAG_ID}/clearTaskInstances",
        json={
            "dag_run_id": access.run_id,
            "task_ids": ["send_shard", "reconcile"],
            "only_failed": False,
            "reset_dag_runs": True,
            "dry_run": False,
        },
    )
    print(f"cleared send_shard and reconcile of {access.run_id}: Airflow sends what is sendable")
