"""reconcile: prove ``staged = sent + failed + unknown + halted``; say who did not get it, why."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd

from mailroom.batches import Manifest
from mailroom.delivery.outbox import FINAL_STATES, BatchState, Outbox


def reconcile(
    *,
    run_key: str,
    manifest: Manifest | None,
    outbox: Outbox | None,
    extract_counts: dict[str, Any] | None,
    validation: dict[str, Any] | None,
    approval: dict[str, Any],
    quarantine: Path | None,
    not_sent_csv: Path,
) -> dict[str, Any]:
    """The campaign report.

    ``status`` is one of sent, incomplete, rejected, timed_out, not_approved, failed_before_send.
    """
    counts = outbox.counts(run_key) if outbox is not None and manifest is not None else None
    staged_total = manifest.recipients if manifest is not None else 0
    report: dict[str, Any] = {
        "run": run_key,
        "approval": approval,
        "audience": extract_counts,
        "validation": {k: v for k, v in (validation or {}).items() if k != "gx"},
        "staged": {
            "recipients": staged_total,
            "batches": len(manifest.batches) if manifest else 0,
            "per_locale": manifest.per_locale() if manifest else {},
        },
        "outbox": counts,
        "halt_reason": outbox.halt_reason(run_key) if outbox is not None else None,
    }
    rows = 0
    not_sent_csv.parent.mkdir(parents=True, exist_ok=True)
    with not_sent_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "email", "state", "reason"])
        if quarantine is not None and quarantine.exists():
            for row in pd.read_parquet(quarantine).itertuples():
                writer.writerow([row.user_id, row.email, "quarantined", row.reason])
                rows += 1
        if outbox is not None and manifest is not None:
            for item in outbox.not_sent(run_key):
                reason = item["last_error"] or _default_reason(item["state"], approval)
                writer.writerow([item["user_id"], item["email_key"], item["state"], reason])
                rows += 1
    report["not_sent_file"] = str(not_sent_csv)
    report["not_sent_rows"] = rows

    if counts is None:
        report["status"] = "failed_before_send"
        report["balanced"] = None
        return report
    accounted = sum(counts[s]["recipients"] for s in FINAL_STATES)
    pending = counts[BatchState.STAGED]["recipients"] + counts[BatchState.SENDING]["recipients"]
    report["balanced"] = staged_total == accounted + pending
    report["equation"] = (
        f"staged {staged_total} = sent {counts[BatchState.SENT]['recipients']} + failed "
        f"{counts[BatchState.FAILED]['recipients']} + unknown "
        f"{counts[BatchState.UNKNOWN]['recipients']} + halted "
        f"{counts[BatchState.HALTED]['recipients']} + never attempted {pending}"
    )
    if approval.get("decision") != "approved":
        decision = approval.get("decision")
        report["status"] = decision if decision in {"rejected", "timed_out"} else "not_approved"
    elif counts[BatchState.SENT]["recipients"] == staged_total:
        report["status"] = "sent"
    else:
        report["status"] = "incomplete"
    return report


def _default_reason(state: str, approval: dict[str, Any]) -> str:
    if state == BatchState.STAGED and approval.get("decision") != "approved":
        return f"not sent: {approval.get('decision', 'no approval')}"
    return f"batch {state}"
