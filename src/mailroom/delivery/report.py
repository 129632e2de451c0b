"""reconcile: prove ``staged = sent + failed + unknown + halted``; say who did not get it, why.

``history`` lists what operators did to the run after it was staged (``mailroom settle``,
``resend``, ``halt``, ``resume``): who, when, why, which requests and how many recipients, with
the equation just before and just after each.

Those an earlier run of the campaign sent to (``already_sent``) or left in doubt
(``unknown_earlier``) were never staged (``mailroom.earlier_runs``): the report counts them
beside the staged ones (``valid = staged + already_sent + unknown_earlier``) and lists them in
``not_sent.csv`` with the earlier run, so everyone the validation kept is accounted for.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mailroom.batches import Manifest
from mailroom.delivery.outbox import FINAL_STATES, BatchState, Outbox
from mailroom.earlier_runs import ALREADY_SENT, REASONS, UNKNOWN_EARLIER

log = logging.getLogger(__name__)


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
    left_out: dict[str, Any] | None = None,
    left_out_rows: Path | None = None,
) -> dict[str, Any]:
    """The campaign report.

    ``status`` is one of sent, nothing_to_send (an approved run left with nobody to send to:
    everyone was left out by earlier runs; ``nothing_to_send_because`` says so), incomplete,
    rejected, timed_out, not_approved, failed_before_send.
    ``left_out``: the run's ``left_out.json`` (counts, the resend choice); ``left_out_rows``:
    who they are. Reconcile is the run's last step: it also gives up the campaign's sending
    slot (``Outbox.end_sending``), so the next run of the campaign may send.
    """
    counts = outbox.counts(run_key) if outbox is not None and manifest is not None else None
    if outbox is not None and outbox.end_sending(run_key):
        log.info("reconcile: %s no longer holds its campaign's sending slot", run_key)
    staged_total = manifest.recipients if manifest is not None else 0
    left = {reason: int((left_out or {}).get("left_out", {}).get(reason, 0)) for reason in REASONS}
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
        "left_out": {
            **left,
            "by_earlier_run": (left_out or {}).get("left_out_by_earlier_run") or {},
            "resend_to_earlier_recipients": bool(
                (left_out or {}).get("resend_to_earlier_recipients")
            ),
            "resend_reason": (left_out or {}).get("resend_reason"),
            "earlier_recipients_included": (left_out or {}).get("earlier_recipients_included")
            or {},
        },
    }
    rows = 0
    not_sent_csv.parent.mkdir(parents=True, exist_ok=True)
    with not_sent_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(NOT_SENT_COLUMNS)
        for row in not_sent_rows(
            run_key,
            outbox=outbox if manifest is not None else None,
            approval=approval,
            quarantine=quarantine,
            left_out_rows=left_out_rows,
        ):
            writer.writerow(row)
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
    report["equation"] = equation(counts, staged_total)
    report["history"] = [
        {
            **{k: v for k, v in entry.items() if not k.startswith("counts_")},
            "before": equation(entry["counts_before"], staged_total),
            "after": equation(entry["counts_after"], staged_total),
        }
        for entry in (outbox.actions(run_key) if outbox is not None else [])
    ]
    if left_out is not None:
        valid = int(left_out["valid"])
        report["audience_equation"] = (
            f"valid {valid} = staged {staged_total} + already_sent {left[ALREADY_SENT]} + "
            f"unknown_earlier {left[UNKNOWN_EARLIER]}"
        )
        report["balanced"] = report["balanced"] and valid == staged_total + sum(left.values())
    if approval.get("decision") != "approved":
        decision = approval.get("decision")
        report["status"] = decision if decision in {"rejected", "timed_out"} else "not_approved"
    elif staged_total == 0:
        report["status"] = "nothing_to_send"
        report["nothing_to_send_because"] = _nobody_staged(left)
    elif counts[BatchState.SENT]["recipients"] == staged_total:
        report["status"] = "sent"
    else:
        report["status"] = "incomplete"
    return report


def equation(counts: dict[str, dict[str, int]], staged_total: int) -> str:
    """``staged = sent + failed + unknown + halted + never attempted``, in recipients."""
    if not counts:
        return "(no counts)"
    people = {state: int(counts.get(state, {}).get("recipients", 0)) for state in BatchState}
    pending = people[BatchState.STAGED] + people[BatchState.SENDING]
    return (
        f"staged {staged_total} = sent {people[BatchState.SENT]} + failed "
        f"{people[BatchState.FAILED]} + unknown {people[BatchState.UNKNOWN]} + halted "
        f"{people[BatchState.HALTED]} + never attempted {pending}"
    )


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and value != value) else value


def _nobody_staged(left: dict[str, int]) -> str:
    if not any(left.values()):
        return "no recipient was staged"
    parts = [f"{count} {reason}" for reason, count in left.items() if count]
    return (
        "everyone valid was left out by earlier runs of this campaign ("
        + ", ".join(parts)
        + "); trigger with resend_to_earlier_recipients and a resend_reason to send to them again"
    )


NOT_SENT_COLUMNS = ("user_id", "email", "state", "reason")


def not_sent_rows(
    run_key: str,
    *,
    outbox: Outbox | None,
    approval: dict[str, Any],
    quarantine: Path | None,
    left_out_rows: Path | None,
) -> Iterator[list[Any]]:
    """Who did not get the message and why (``NOT_SENT_COLUMNS``): the quarantined, those left
    out because an earlier run of the campaign reached them, then every staged recipient not
    ``sent``; as ``not_sent.csv`` holds them and the console's download streams them."""
    if quarantine is not None and quarantine.exists():
        for row in pd.read_parquet(quarantine).itertuples():
            # A missing user id or address is an empty cell, never "nan" or "None".
            yield [_cell(row.user_id), _cell(row.email), "quarantined", row.reason]
    if left_out_rows is not None and left_out_rows.exists():
        for row in pd.read_parquet(left_out_rows).itertuples():
            yield [row.user_id, row.email, row.reason, _left_out_reason(row)]
    if outbox is not None:
        for item in outbox.not_sent(run_key):
            reason = item["last_error"] or _default_reason(item["state"], approval)
            yield [item["user_id"], item["email_key"], item["state"], reason]


def _left_out_reason(row: Any) -> str:
    run_id = str(row.earlier_run).split("/", 1)[-1]
    if row.reason == ALREADY_SENT:
        return f"not staged: run {run_id} of this campaign already sent to this address"
    return (
        f"not staged: run {run_id} of this campaign left this address in doubt (the provider "
        "may have its message)"
    )


def _default_reason(state: str, approval: dict[str, Any]) -> str:
    if state == BatchState.STAGED and approval.get("decision") != "approved":
        return f"not sent: {approval.get('decision', 'no approval')}"
    return f"batch {state}"
