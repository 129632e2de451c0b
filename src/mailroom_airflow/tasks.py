"""Task bodies: resolve Airflow connections and variables, then call the domain pipeline.

Each function is named like its task and calls the ``mailroom.pipeline`` function of the same
name. The DAG file imports this module while it is parsed, so the domain package (pandas, Arrow,
Great Expectations, Babel, the SendGrid SDK) is imported only inside the bodies, when a task runs.

Each body works on its run's folder through ``_working``: the folder itself when staging is
local, a working copy with the stage's declared inputs when it is on object storage. Before
either, ``_working`` asks ``mailroom.run_record`` whether the stage may run on that folder at all
(another run id owns it; the run is frozen and the stage may not run again), with the outbox's
word when the stage has the outbox open: a refused task fails having read and written nothing,
so clearing a finished DAG run leaves every file of the run as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from mailroom.errors import EnvelopeViolation, MailroomError
from mailroom.run import Run
from mailroom.staging import read_json, run_location, write_json
from mailroom_airflow import settings

if TYPE_CHECKING:
    from mailroom.delivery.outbox import Outbox

log = logging.getLogger(__name__)


@contextmanager
def _working(
    prepared: dict[str, Any],
    stage: str,
    shard: tuple[int, int] | None = None,
    *,
    outbox: Outbox | None = None,
) -> Iterator[Run]:
    from mailroom import run_record

    store = settings.run_store(prepared["run_dir"])
    campaign, run_id = prepared["campaign"], prepared["run_id"]
    run_record.check_stage(
        stage,
        store.record(),
        campaign=campaign,
        run_id=run_id,
        staged_manifest=(
            outbox.manifest_sha256(f"{campaign}/{run_id}") if outbox is not None else None
        ),
    )
    with store.working_copy(stage, shard=shard) as folder:
        yield Run.from_xcom(prepared, working_dir=folder)


@contextmanager
def _outbox() -> Iterator[Outbox]:
    from mailroom.delivery.outbox import Outbox

    outbox = Outbox(settings.outbox_url())
    try:
        yield outbox
    finally:
        outbox.dispose()


def prepare(
    campaign: str, dry_run: bool, shard_count: int, run_id: str, triggered_by: str | None = None
) -> dict[str, Any]:
    from mailroom import pipeline, run_record

    root = settings.staging_root()
    store = settings.run_store(run_location(root, campaign, run_id))
    run_record.check_stage("prepare", store.record(), campaign=campaign, run_id=run_id)
    with store.working_copy("prepare") as folder:
        run = pipeline.prepare(
            settings.project_paths(),
            campaign=campaign,
            run_id=run_id,
            staging_root=root,
            shard_count=shard_count,
            dry_run=dry_run,
            working_dir=folder,
            resolve=lambda spec: settings.resolve(spec, dry_run=dry_run),
            triggered_by=triggered_by,
        )
        spec = run.spec()
    from mailroom.delivery.outbox import masked_url

    return {
        **run.to_xcom(),
        "approvers": list(spec.approvers),
        "response_timeout_hours": spec.response_timeout_hours,
        # Where the operator commands find the run's outbox (``mailroom.cli.run_access``).
        "outbox": masked_url(settings.outbox_url()),
    }


def extract_audience(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline

    with _outbox() as outbox, _working(prepared, "extract_audience") as run:
        conn_id = run.spec().audience.connection_id
        return pipeline.extract_audience(
            run, sql_url=settings.sql_url(conn_id) if conn_id else None, outbox=outbox
        )


def validate_audience(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline

    with _working(prepared, "validate_audience") as run:
        return pipeline.validate_audience(run)


def render_content(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline

    with _working(prepared, "render_content") as run:
        return pipeline.render_content(run, settings.project_paths())


def resend_choice(params: dict[str, Any]) -> dict[str, Any]:
    """The trigger's resend option, checked (a resend needs a reason), as XCom carries it."""
    from mailroom.earlier_runs import resend_choice as checked

    return checked(
        params.get("resend_to_earlier_recipients", False), params.get("resend_reason", "")
    ).to_dict()


def build_envelopes(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline
    from mailroom.earlier_runs import ResendChoice

    with _outbox() as outbox, _working(prepared, "build_envelopes") as run:
        return pipeline.build_envelopes(
            run,
            secret=settings.unsubscribe_secret(),
            outbox=outbox,
            resend=ResendChoice.from_dict(prepared.get("resend")),
        )


def freeze_batches(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline

    with _outbox() as outbox, _working(prepared, "freeze_batches", outbox=outbox) as run:
        return pipeline.freeze_batches(run, outbox=outbox)


def check_envelopes(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline

    with _outbox() as outbox, _working(prepared, "check_envelopes", outbox=outbox) as run:
        return pipeline.check_envelopes(
            run, settings.project_paths(), secret=settings.unsubscribe_secret(), outbox=outbox
        )


def canary_send(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline

    with _working(prepared, "canary_send") as run:
        spec = run.spec()
        if not spec.seed_list:
            return {"sent": False, "reason": "the campaign has no seed_list"}
        transport = settings.transport(
            spec.connection_id,
            dry_run=run.dry_run,
            dry_run_dir=run.staging.canary_dir / "dry_run_outbox",
            kind=spec.transport,
        )
        return pipeline.canary_send(run, secret=settings.unsubscribe_secret(), transport=transport)


def summarise(prepared: dict[str, Any], triggered_by: str | None) -> str:
    from mailroom import pipeline

    with _working(prepared, "summarise") as run:
        return pipeline.summarise(
            run, triggered_by=triggered_by, console_url=settings.console_url(run.run_id)
        )


def guard_shard(prepared: dict[str, Any], frozen: dict[str, Any], shard: int) -> dict[str, Any]:
    from mailroom import pipeline

    shard_count = len(frozen["shards"])
    try:
        with (
            _outbox() as outbox,
            _working(prepared, "guard_shard", (shard, shard_count), outbox=outbox) as run,
        ):
            return pipeline.guard_shard(
                run,
                manifest_sha256=frozen["manifest_sha256"],
                outbox=outbox,
                shard=shard,
                shard_count=shard_count,
            )
    except EnvelopeViolation as exc:
        # The same bytes would be refused again: no retry, the run is halted already.
        raise AirflowFailException(str(exc)) from exc


def send_shard(prepared: dict[str, Any], frozen: dict[str, Any], shard: int) -> dict[str, Any]:
    """One shard's sends. A retry (its previous try raised, or its process was killed; not
    the first try after an operator cleared the task, which starts at once) first waits out the
    campaign's ``send_retry_delay_seconds``: Airflow reads a task's ``retry_delay`` from the DAG
    file, not per run, so the DAG gives ``send_shard`` a short floor and this try waits the
    rest. Airflow queued it no earlier than the floor after the previous try ended, and it
    started ``since_start`` ago: it sends no earlier than the campaign's delay after that end,
    and at most the scheduling latency later."""
    import time
    from datetime import UTC, datetime

    from airflow.sdk import get_current_context

    from mailroom import pipeline

    try:
        ti: Any = get_current_context()["ti"]
    except RuntimeError:  # called outside a task
        ti = None
    shard_count = len(frozen["shards"])
    with (
        _outbox() as outbox,
        _working(prepared, "send_shard", (shard, shard_count), outbox=outbox) as run,
    ):
        # Clearing a task sets its max_tries to its last try + retries (as Airflow's own
        # get_first_reschedule_date reads it): tries after the first of a series are retries.
        if ti is not None and ti.try_number > ti.max_tries - (ti.task.retries or 0) + 1:
            delay = run.spec().send_retry_delay_seconds
            floor = ti.task.retry_delay.total_seconds() if ti.task.retry_delay else 0.0
            since_start = (datetime.now(UTC) - ti.start_date).total_seconds()
            wait = delay - floor - max(0.0, since_start)
            log.warning(
                "send shard %d, try %d: the previous try ended at least %.1fs ago; the "
                "campaign's send_retry_delay_seconds is %g: %s",
                shard,
                ti.try_number,
                floor + max(0.0, since_start),
                delay,
                f"waiting {wait:.1f}s before sending" if wait > 0 else "sending now",
            )
            if wait > 0:
                time.sleep(wait)
        transport = settings.transport(
            run.spec().connection_id,
            dry_run=run.dry_run,
            dry_run_dir=run.staging.dry_run_outbox,
            kind=run.spec().transport,
        )
        log.info(
            "to halt this run: `mailroom halt %s` or set the Airflow Variable %s",
            run.run_key,
            settings.halt_variable_key(run.run_id),
        )
        return pipeline.send_shard(
            run,
            shard=shard,
            manifest_sha256=frozen["manifest_sha256"],
            transport=transport,
            outbox=outbox,
            shard_count=shard_count,
            halt_signal=lambda: settings.halt_variable(run.run_id),
        )


def check_not_answered(prepared: dict[str, Any]) -> None:
    """Before the approval task asks: refuse a run that already has its answer."""
    from mailroom import run_record

    store = settings.run_store(prepared["run_dir"])
    run_record.check_not_answered(
        store.record(), run_key=f"{prepared['campaign']}/{prepared['run_id']}"
    )


def record_approval(prepared: dict[str, Any], event: dict[str, Any]) -> None:
    """Write the answer once: the same answer again changes nothing, another one (a cleared
    run's timeout or rejection after an approval) is refused and fails the task, so nothing
    downstream of the gate runs on it (``run_record``)."""
    from mailroom import run_record

    record = approval_record(event)
    with _working(prepared, "approve") as run:
        if not run_record.approval_unchanged(run.staging.approval, record, run_key=run.run_key):
            write_json(run.staging.approval, record)


def reconcile(prepared: dict[str, Any]) -> dict[str, Any]:
    from mailroom import pipeline
    from mailroom.approval.summary import decision_line

    with _outbox() as outbox, _working(prepared, "reconcile", outbox=outbox) as run:
        approval = (
            read_json(run.staging.approval)
            if run.staging.approval.exists()
            else {"decision": "none", "detail": "the approval gate did not complete"}
        )
        report = pipeline.reconcile(run, outbox=outbox, approval=approval)
        where = run.where(run.staging.report)
    log.info(
        "campaign %s: %s; report %s",
        report["status"].upper(),
        decision_line(approval, recipients=report["staged"]["recipients"]),
        where,
    )
    if report["status"] not in {"sent", "nothing_to_send", "rejected", "timed_out"}:
        raise MailroomError(
            f"campaign run ended {report['status']}: "
            f"{report.get('equation') or 'nothing was sent'}; see {where}"
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
