"""Task bodies: resolve Airflow connections and variables, then call the domain pipeline."""

from __future__ import annotations

import logging
from typing import Any

from mailroom import pipeline
from mailroom.approval_summary import approval_markdown, approval_summary, decision_line
from mailroom.errors import MailroomError
from mailroom.outbox import Outbox
from mailroom.pipeline import Run
from mailroom.staging import read_json, write_json
from mailroom_airflow import settings

log = logging.getLogger(__name__)


def prepare(campaign: str, dry_run: bool, shard_count: int, run_id: str) -> dict[str, Any]:
    run = pipeline.prepare_run(
        settings.project_paths(),
        campaign=campaign,
        run_id=run_id,
        staging_root=settings.staging_root(),
        shard_count=shard_count,
        dry_run=dry_run,
    )
    spec = run.spec()
    return {
        **run.to_xcom(),
        "approvers": list(spec.approvers),
        "response_timeout_hours": spec.response_timeout_hours,
    }


def extract(prepared: dict[str, Any]) -> dict[str, Any]:
    run = Run.from_xcom(prepared)
    conn_id = run.spec().audience.connection_id
    return pipeline.extract(run, sql_url=settings.sql_url(conn_id) if conn_id else None)


def validate(prepared: dict[str, Any]) -> dict[str, Any]:
    return pipeline.validate(Run.from_xcom(prepared))


def render(prepared: dict[str, Any]) -> dict[str, Any]:
    return pipeline.render(Run.from_xcom(prepared), settings.project_paths())


def build(prepared: dict[str, Any]) -> dict[str, Any]:
    return pipeline.build(Run.from_xcom(prepared), secret=settings.unsubscribe_secret())


def freeze(prepared: dict[str, Any]) -> dict[str, Any]:
    outbox = Outbox(settings.outbox_url())
    try:
        return pipeline.freeze(Run.from_xcom(prepared), outbox=outbox)
    finally:
        outbox.dispose()


def gate(prepared: dict[str, Any]) -> dict[str, Any]:
    return pipeline.gate(Run.from_xcom(prepared), secret=settings.unsubscribe_secret())


def summarise(prepared: dict[str, Any], triggered_by: str | None) -> str:
    return approval_markdown(approval_summary(Run.from_xcom(prepared), triggered_by=triggered_by))


def canary(prepared: dict[str, Any]) -> dict[str, Any]:
    run = Run.from_xcom(prepared)
    spec = run.spec()
    if not spec.seed_list:
        return {"sent": False, "reason": "the campaign has no seed_list"}
    transport = settings.transport(
        spec.connection_id,
        dry_run=run.dry_run,
        dry_run_dir=run.staging.root / "canary" / "dry_run_outbox",
        kind=spec.transport,
    )
    return pipeline.canary(run, secret=settings.unsubscribe_secret(), transport=transport)


def send(prepared: dict[str, Any], frozen: dict[str, Any], shard: int) -> dict[str, Any]:
    run = Run.from_xcom(prepared)
    transport = settings.transport(
        run.spec().connection_id,
        dry_run=run.dry_run,
        dry_run_dir=run.staging.root / "dry_run_outbox",
        kind=run.spec().transport,
    )
    outbox = Outbox(settings.outbox_url())
    log.info(
        "to halt this run: `mailroom halt %s` or set the Airflow Variable %s",
        run.run_key,
        settings.halt_variable_key(run.run_id),
    )
    try:
        return pipeline.send(
            run,
            shard=shard,
            manifest_sha256=frozen["manifest_sha256"],
            transport=transport,
            outbox=outbox,
            shard_count=len(frozen["shards"]),
            halt_signal=lambda: settings.halt_variable(run.run_id),
        )
    finally:
        outbox.dispose()


def record_approval(prepared: dict[str, Any], event: dict[str, Any]) -> None:
    run = Run.from_xcom(prepared)
    write_json(run.staging.approval, approval_record(event))


def reconcile(prepared: dict[str, Any]) -> dict[str, Any]:
    run = Run.from_xcom(prepared)
    approval = (
        read_json(run.staging.approval)
        if run.staging.approval.exists()
        else {"decision": "none", "detail": "the approval gate did not complete"}
    )
    outbox = Outbox(settings.outbox_url())
    try:
        report = pipeline.report(run, outbox=outbox, approval=approval)
    finally:
        outbox.dispose()
    log.info(
        "campaign %s: %s; report %s",
        report["status"].upper(),
        decision_line(approval, recipients=report["staged"]["recipients"]),
        run.staging.report,
    )
    if report["status"] not in {"sent", "rejected", "timed_out"}:
        raise MailroomError(
            f"campaign run ended {report['status']}: "
            f"{report.get('equation') or 'nothing was sent'}; "
            f"see {run.staging.report}"
        )
    return report


def approval_record(event: dict[str, Any]) -> dict[str, Any]:
    """The approver's answer as the report states it: who, what, when, or a timeout."""
    chosen = (event.get("chosen_options") or [None])[0]
    user = event.get("responded_by_user") or {}
    by = (user.get("name") or user.get("id")) if isinstance(user, dict) else None
    if event.get("timedout") or (chosen != "Approve" and not by):
        decision = "timed_out"
    elif chosen == "Approve":
        decision = "approved"
    else:
        decision = "rejected"
    return {"decision": decision, "by": by, "at": str(event.get("responded_at") or "")}
