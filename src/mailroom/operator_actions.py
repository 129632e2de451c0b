"""What an operator does to a run once it is approved: halt, resume, resend the unknown.

The console and the ``mailroom`` CLI both act through these functions. Each changes the run's
outbox in one transaction that also records who, when, why and the run's counts before and after
(``Outbox.actions``, which the report lists as the run's history), then writes the same record
into the run's audit trail: ``audit/<n>-<action>.json`` in the run's folder, one file per action,
each written once (a frozen run's folder only grows).

None of them sends anything: halting stops every shard before its next request; resuming and
resending make batches sendable again, and the run's ``send_shard`` and ``reconcile`` tasks must
then be cleared in Airflow (the console does that through Airflow's own API).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailroom.delivery.outbox import Action, BatchState, OperatorAction, Outbox
from mailroom.errors import MailroomError
from mailroom.staging import write_json

AUDIT_DIR = "audit"
# How the history (the console's, ``mailroom status``'s) names an action that is not an
# operator's: the provider's events showed it accepted requests left unknown.
ACTION_LABELS = {Action.SETTLE_BY_EVENTS.value: "settled from SendGrid's events"}


class ActionRefused(MailroomError):
    """The action does not apply to the run as it is (nothing changed)."""


def halt(
    outbox: Outbox, run_key: str, *, by: str, reason: str, run_root: Path | None
) -> dict[str, Any]:
    """Every shard stops before its next request; what it has not sent becomes ``halted``."""
    action = OperatorAction(Action.HALT, by, reason)
    _staged(outbox, run_key)
    if outbox.halt_requested(run_key):
        raise ActionRefused(f"run {run_key} is already halted: {outbox.halt_reason(run_key)}")
    outbox.request_halt(run_key, reason=reason, action=action)
    return _audited(outbox, run_key, run_root)


def resume(
    outbox: Outbox, run_key: str, *, by: str, reason: str, run_root: Path | None
) -> dict[str, Any]:
    """Lift the run's halt: cleared send shards send its ``halted`` batches (and any still
    ``staged``); a batch sent, failed or unknown is never claimed again."""
    action = OperatorAction(Action.RESUME, by, reason)
    _staged(outbox, run_key)
    counts = outbox.counts(run_key)
    if not outbox.halt_requested(run_key) and not counts[BatchState.HALTED]["recipients"]:
        raise ActionRefused(f"run {run_key} is not halted: nothing to resume")
    outbox.request_halt(run_key, halted=False, action=action)
    return _audited(outbox, run_key, run_root)


def resend_unknown(
    outbox: Outbox, run_key: str, *, by: str, reason: str, run_root: Path | None
) -> dict[str, Any]:
    """The operator's explicit choice: the ``unknown`` requests (the provider may have accepted
    them) become sendable again. Their recipients may get the message twice."""
    action = OperatorAction(Action.RESEND, by, reason)
    _staged(outbox, run_key)
    unknown = outbox.counts(run_key)[BatchState.UNKNOWN]
    if not unknown["recipients"]:
        raise ActionRefused(f"run {run_key} has no unknown request: nothing to resend")
    if outbox.halt_requested(run_key):
        raise ActionRefused(
            f"run {run_key} is halted: resume it first, so what is resent is not halted again"
        )
    outbox.requeue(run_key, [BatchState.UNKNOWN], action)
    return _audited(outbox, run_key, run_root)


def action_label(action: str) -> str:
    """An action of the run's history as the console and ``mailroom status`` show it."""
    return ACTION_LABELS.get(action, action)


def _staged(outbox: Outbox, run_key: str) -> None:
    if outbox.manifest_sha256(run_key) is None:
        raise ActionRefused(f"run {run_key} is not staged in the outbox: nothing was approved")


def _audited(outbox: Outbox, run_key: str, run_root: Path | None) -> dict[str, Any]:
    """The action just recorded in the outbox, written into the run's audit trail too."""
    history = outbox.actions(run_key)
    entry = {"run": run_key, "n": len(history), **history[-1]}
    if run_root is not None:
        write_json(run_root / AUDIT_DIR / f"{len(history):04d}-{entry['action']}.json", entry)
    return entry


def audit_trail(run_root: Path) -> list[dict[str, Any]]:
    """The run's audit files, oldest first."""
    import json

    folder = run_root / AUDIT_DIR
    if not folder.is_dir():
        return []
    return [json.loads(p.read_bytes()) for p in sorted(folder.glob("*.json"))]
