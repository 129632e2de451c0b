"""The DAG run's note says how a campaign run ended: an Airflow listener in the scheduler.

A rejected or timed-out run ends ``success`` in Airflow (nothing failed: nothing was to be
sent), which looks like a sent one in the grid. When a run of the campaign DAG finishes, the
scheduler calls this listener, which reads the run's folder and outbox
(``mailroom.campaign_runs.run_note``) and writes the outcome into the run's note: "REJECTED by
… at …: nothing was sent.", "TIMED OUT …", "FAILED GATE …", "SENT: 600 of 600 …",
"INCOMPLETE …", "NOT APPROVED …". A note someone wrote by hand is kept.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from airflow.listeners import hookimpl

from mailroom_airflow.console import DAG_ID

log = logging.getLogger(__name__)
# What this listener's notes start with: a note that does not is a person's, and is kept.
OUTCOMES = ("REJECTED", "TIMED OUT", "FAILED GATE", "NOT APPROVED", "SENT", "INCOMPLETE", "HALTED")


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _note_later(dag_run)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _note_later(dag_run)


def _note_later(dag_run: Any) -> None:
    """Note the run from a thread of its own. The listener runs inside the scheduler's
    transaction: reading a Variable or a Connection there (the staging root, the outbox) would
    commit and close the scheduler's session under it. The thread has its own session, and
    finds the run's row the scheduler's commit leaves."""
    if getattr(dag_run, "dag_id", None) != DAG_ID:
        return
    run_id = str(dag_run.run_id)
    threading.Thread(
        target=note_outcome, args=(run_id,), name=f"mailroom-note-{run_id}", daemon=True
    ).start()


def note_outcome(run_id: str) -> str | None:
    """Write the run's outcome into its note; returns the note (None: nothing to say)."""
    try:
        note = outcome(run_id)
        if not note:
            return None
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            dag_run = session.scalar(
                select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id)
            )
            if dag_run is None:
                return None
            current = dag_run.note
            if current and not str(current).startswith(OUTCOMES):
                return None  # a person's note is kept
            dag_run.note = note[:1000]
        log.info("mailroom: run %s noted: %s", run_id, note)
        return note
    except Exception:  # a listener must never break the scheduler
        log.exception("mailroom: could not note the outcome of run %s", run_id)
        return None


def outcome(run_id: str) -> str | None:
    from mailroom import campaign_runs
    from mailroom.staging import is_url, local_path
    from mailroom_airflow import settings
    from mailroom_airflow.console.app import shared_outbox

    root = settings.staging_root()
    if is_url(root):
        return None
    run = campaign_runs.find_run(local_path(root), run_id)
    if run is None:
        return None
    return campaign_runs.run_note(run, shared_outbox())
