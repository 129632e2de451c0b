"""Operator commands on a run's outbox: status, halt, resume, resend the unknown; and
``outbox upgrade``, the outbox's schema to this release's.

They work on the outbox database directly (``--outbox-url`` or ``MAILROOM_OUTBOX_URL``), so they
act at once on every shard of a run, wherever it runs. Resuming or resending only makes batches
sendable again; clear the run's ``send_shard`` and ``reconcile`` tasks in Airflow (UI, REST, or
``--airflow-url`` here) to send them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mailroom.delivery.outbox import BatchState, Outbox, UnknownOutboxRevision


def add_commands(sub: Any) -> None:
    for name, text in (
        ("status", "counts of a run's batches and recipients per state"),
        ("halt", "stop every shard of a run before its next request"),
        ("resume", "lift a halt so cleared shards send the halted batches"),
        ("resend", "make unknown (or failed) batches sendable again: an explicit operator choice"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run_key", help="<campaign>/<Airflow run id>, as in the report")
        cmd.add_argument("--outbox-url", default=os.environ.get("MAILROOM_OUTBOX_URL"))
        if name == "halt":
            cmd.add_argument("--reason", default="halted by an operator")
        if name == "resend":
            cmd.add_argument("--failed", action="store_true", help="also resend failed batches")
        if name in {"resume", "resend"}:
            cmd.add_argument("--airflow-url", help="also clear the run's send tasks through REST")
            cmd.add_argument("--user", default=os.environ.get("MAILROOM_AIRFLOW_USER"))
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


def run_command(args: argparse.Namespace) -> int:
    if not args.outbox_url:
        print("mailroom: give --outbox-url or set MAILROOM_OUTBOX_URL", file=sys.stderr)
        return 2
    outbox = Outbox(args.outbox_url)
    try:
        if outbox.manifest_sha256(args.run_key) is None:
            print(f"mailroom: no run {args.run_key!r} in the outbox", file=sys.stderr)
            return 1
        if args.command == "halt":
            outbox.request_halt(args.run_key, reason=args.reason)
            print(f"halt requested for {args.run_key}: shards stop before their next request")
        elif args.command == "resume":
            outbox.request_halt(args.run_key, halted=False)
            print(f"halt lifted for {args.run_key}")
            _clear_send_tasks(args)
        elif args.command == "resend":
            states = (
                [BatchState.UNKNOWN, BatchState.FAILED] if args.failed else [BatchState.UNKNOWN]
            )
            moved = outbox.requeue(args.run_key, states)
            names = [s.value for s in states]
            print(f"{moved} batch(es) of {args.run_key} in {names} are sendable again")
            _clear_send_tasks(args)
        print(json.dumps(outbox.counts(args.run_key), indent=2))
        return 0
    finally:
        outbox.dispose()


def _clear_send_tasks(args: argparse.Namespace) -> None:
    if not args.airflow_url:
        print("clear the run's send_shard and reconcile tasks in Airflow to send them")
        return
    from getpass import getpass

    from mailroom.cli.airflow_api import AirflowApi

    password = os.environ.get("MAILROOM_AIRFLOW_PASSWORD") or getpass("Airflow password: ")
    api = AirflowApi(args.airflow_url, args.user, password)
    run_id = args.run_key.split("/", 1)[1]
    api.request(
        "POST",
        "/dags/mailroom_campaign/clearTaskInstances",
        json={
            "dag_run_id": run_id,
            "task_ids": ["send_shard", "reconcile"],
            "only_failed": False,
            "reset_dag_runs": True,
            "dry_run": False,
        },
    )
    print(f"cleared send_shard and reconcile of {run_id}: Airflow sends what is sendable")
