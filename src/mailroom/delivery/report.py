"""reconcile: prove ``staged = sent + failed + unknown + halted``; say who did not get it, why.

``history`` lists what operators did to the run after it was staged (``mailroom settle``,
``resend``, ``halt``, ``resume``): who, when, why, which requests and how many recipients, with
the equation just before and just after each.

Those an earlier run of the campaign sent to (``already_sent``) or left in doubt
(``unknown_earlier``) were never staged (``mailroom.earlier_runs``): the report counts them
beside the staged ones (``valid = staged + already_sent + unknown_earlier``) and lists them in
``not_sent.csv`` with the earlier run, so everyone the validation kept is accounted for.

``delivery_feedback`` is what the provider reported after it accepted the requests (SendGrid's
Event Webhook, kept in the outbox): per locale and in total, how many recipients were delivered,
bounced, dropped, complained and unsubscribed (``feedback_report``). It is separate from the
equation, which it does not change: those recipients were sent. ``not_sent.csv`` ends with the
bounced and dropped (state ``bounced`` or ``dropped``, the provider's reason as the reason).
Events go on arriving for hours after reconcile, and ``report.json`` and ``not_sent.csv`` are
written once (``run_record``): ``refresh_delivery_feedback`` (``mailroom status``) writes the
section as it is now to ``delivery_feedback.json`` beside them, and the list of who did not get
it, as it is now, to ``delivery_feedback.not_sent.csv``; both are rewritten whole (a file beside,
then ``os.replace``), and are a view of the outbox, which holds the events.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pandas as pd

from mailroom import earlier_runs
from mailroom.batches import Manifest, load_manifest
from mailroom.delivery import feedback_report
from mailroom.delivery.outbox import FINAL_STATES, Action, BatchState, Outbox
from mailroom.earlier_runs import ALREADY_SENT, REASONS, UNKNOWN_EARLIER
from mailroom.errors import MailroomError
from mailroom.staging import RunStaging, json_bytes, read_json

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
    not_sent_csv.parent.mkdir(parents=True, exist_ok=True)
    with not_sent_csv.open("w", newline="", encoding="utf-8") as fh:
        rows, listed = write_not_sent(
            fh,
            not_sent_rows(
                run_key,
                outbox=outbox if manifest is not None else None,
                approval=approval,
                quarantine=quarantine,
                left_out_rows=left_out_rows,
            ),
        )
    report["not_sent_file"] = str(not_sent_csv)
    report["not_sent_rows"] = rows
    report["delivery_feedback"] = {
        **feedback_report.section(
            outbox if manifest is not None else None,
            run_key,
            manifest.per_locale() if manifest is not None else (),
        ),
        "listed_in_not_sent": listed,
    }

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
_STATE = NOT_SENT_COLUMNS.index("state")


def write_not_sent(fh: Any, rows: Iterable[list[Any]]) -> tuple[int, int]:
    """Write ``not_sent.csv`` (its header, then ``rows``) to an open text file; how many rows,
    and how many of them the provider bounced or dropped."""
    writer = csv.writer(fh)
    writer.writerow(NOT_SENT_COLUMNS)
    n = listed = 0
    for row in rows:
        writer.writerow(row)
        n += 1
        listed += row[_STATE] in feedback_report.PROVIDER_STATES
    return n, listed


def not_sent_rows(
    run_key: str,
    *,
    outbox: Outbox | None,
    approval: dict[str, Any],
    quarantine: Path | None,
    left_out_rows: Path | None,
) -> Iterator[list[Any]]:
    """Who did not get the message and why (``NOT_SENT_COLUMNS``): the quarantined, those left
    out because an earlier run of the campaign reached them, every staged recipient not
    ``sent``, then those the provider bounced or dropped after it accepted their request (state
    ``bounced`` or ``dropped``, the provider's reason); as ``not_sent.csv`` holds them and the
    console's download streams them."""
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
        for item in outbox.not_delivered(run_key):
            reason = feedback_report.reason_text(item["reason"])
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


# -- as the provider's events arrive ---------------------------------------------------------

FEEDBACK_FILE = "delivery_feedback.json"
FEEDBACK_NOT_SENT_FILE = "delivery_feedback.not_sent.csv"


def refresh_delivery_feedback(
    outbox: Outbox, run_key: str, run_root: Path, *, now: datetime | None = None
) -> dict[str, Any]:
    """Write the run's ``delivery_feedback`` as the outbox has it now to ``delivery_feedback.json``
    in its folder, and who did not get the message as it is now (``not_sent_rows``: the bounced
    and dropped included) to ``delivery_feedback.not_sent.csv``; each whole, atomically (a file
    beside, then ``os.replace``: a reader sees the old file or the new one). ``report.json`` and
    ``not_sent.csv`` are never touched: they are written once (``run_record``). Returns what
    ``delivery_feedback.json`` now holds."""
    st = RunStaging(run_root)
    owner = run_root / "run.json"
    if owner.exists():
        recorded = read_json(owner)
        if f"{recorded.get('campaign')}/{recorded.get('run_id')}" != run_key:
            raise MailroomError(
                f"{run_root} is the folder of run {recorded.get('campaign')}/"
                f"{recorded.get('run_id')}, not of {run_key}: delivery feedback not written"
            )
    staged = outbox.manifest_sha256(run_key) is not None
    manifest = load_manifest(st.manifest) if st.manifest.exists() else None
    approval = read_json(st.approval) if st.approval.exists() else {}
    rows_file = run_root / FEEDBACK_NOT_SENT_FILE
    with _replacing(rows_file, text=True) as fh:
        rows, listed = write_not_sent(
            fh,
            not_sent_rows(
                run_key,
                outbox=outbox if staged else None,
                approval=approval,
                quarantine=st.quarantine,
                left_out_rows=earlier_runs.left_out_parquet(st),
            ),
        )
    feedback = {
        **feedback_report.section(
            outbox, run_key, manifest.per_locale() if manifest is not None else ()
        ),
        "listed_in_not_sent": listed,
        "not_sent_file": str(rows_file),
        "not_sent_rows": rows,
        "refreshed_at": (now or datetime.now(UTC)).isoformat(),
        "run": run_key,
    }
    if staged and manifest is not None:
        # The requests SendGrid's events settled after the report: the equation moved.
        feedback["equation"] = equation(outbox.counts(run_key), manifest.recipients)
        feedback["settled_by_events"] = [
            {k: entry[k] for k in ("at", "requests", "recipients", "reason")}
            for entry in outbox.actions(run_key)
            if entry["action"] == Action.SETTLE_BY_EVENTS.value
        ]
    with _replacing(run_root / FEEDBACK_FILE) as fh:
        fh.write(json_bytes(feedback))
    return feedback


@contextmanager
def _replacing(path: Path, *, text: bool = False) -> Iterator[IO[Any]]:
    """A file to write ``path`` whole through (UTF-8 text, or bytes): one of its own beside it,
    which replaces ``path`` (``os.replace``) once written and synced, so a reader (or a second
    writer) never sees part of it; removed instead when writing fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        opened = os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb")
        with opened as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def equation_view(report: dict[str, Any]) -> dict[str, Any]:
    """A report without what the provider's events change (``delivery_feedback``, and its
    bounced and dropped among ``not_sent_rows``): what tells whether the outbox moved on."""
    view = {k: v for k, v in report.items() if k != "delivery_feedback"}
    listed = int((report.get("delivery_feedback") or {}).get("listed_in_not_sent") or 0)
    if "not_sent_rows" in view:
        view["not_sent_rows"] = int(view["not_sent_rows"]) - listed
    return view


def equation_rows(data: bytes) -> list[list[str]]:
    """``not_sent.csv``'s rows but the provider's bounced and dropped."""
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    provider = feedback_report.PROVIDER_STATES
    return [row for row in reader if len(row) <= _STATE or row[_STATE] not in provider]
