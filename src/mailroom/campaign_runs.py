"""What the campaign console shows of runs: read from each run's folder and its outbox rows.

A run's state is the folder's record (who triggered it, the gate's result, the approver's answer,
the report) and the outbox's (a halt, the batches still to send), never Airflow's own tables:

- ``preparing``: the run has a folder but no gate result yet;
- ``failed gate``: the data-quality gate refused the frozen batches (nobody was asked);
- ``awaiting approval``: the gate passed and nobody has answered;
- ``rejected`` / ``timed out``: the approver said no, or nobody answered in time;
- ``sending``: approved, with requests still to send; ``halted``: an operator (or a refusal)
  halted it;
- ``sent``: everyone staged was sent; ``incomplete``: it ended with some failed, unknown or
  halted;
- ``failed``: it ended without an answer at the gate (nobody could be asked, or a stage before
  it failed after the freeze): nothing was sent.

``run_progress`` counts the run's recipients and requests per state, overall, per shard and per
locale, from the outbox's batch rows (one row a request, so about a thousand at a million
recipients), and the current rate and ETA; and, per locale, what the provider reported after it
accepted the requests (``delivery_feedback``: delivered, bounced, dropped, complained,
unsubscribed; one grouped query over its events). Every address shown is masked, in the
provider's reasons too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailroom.addresses import mask, mask_addresses
from mailroom.errors import MailroomError
from mailroom.run_record import APPROVAL_FILE, FROZEN, OWNER, Folder
from mailroom.staging import run_folder_name

if TYPE_CHECKING:
    from mailroom.delivery.outbox import BatchProgress, Outbox

PREPARING = "preparing"
FAILED_GATE = "failed gate"
AWAITING_APPROVAL = "awaiting approval"
REJECTED = "rejected"
TIMED_OUT = "timed out"
SENDING = "sending"
HALTED = "halted"
SENT = "sent"
INCOMPLETE = "incomplete"
FAILED = "failed"
RUN_STATES = (
    AWAITING_APPROVAL,
    SENDING,
    HALTED,
    SENT,
    INCOMPLETE,
    REJECTED,
    TIMED_OUT,
    FAILED_GATE,
    FAILED,
    PREPARING,
)
# States in which nothing moves unless someone acts: the console stops refreshing.
SETTLED = (SENT, INCOMPLETE, REJECTED, TIMED_OUT, FAILED_GATE, FAILED, HALTED)
BATCH_STATES = ("staged", "sending", "sent", "failed", "unknown", "halted")
# The window the current rate is measured over.
RATE_WINDOW = timedelta(seconds=30)
# The two Great Expectations checks whose Data Docs a run keeps: name → folder in the run.
DATA_DOCS = {"audience": "audience/data_docs", "gate": "gate/data_docs"}
SUMMARY_FILE = "preview/summary.json"
_LOCALE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")


@dataclass(frozen=True)
class RunFolder:
    """One run's folder: who owns it (``run.json``) and how to read its small files."""

    campaign: str
    run_id: str
    folder: Folder
    owner: dict[str, Any]

    @property
    def run_key(self) -> str:
        return f"{self.campaign}/{self.run_id}"

    def json(self, rel: str) -> Any:
        data = self.folder.read(rel)
        return None if data is None else json.loads(data)


def local_run(root: Path) -> RunFolder | None:
    """The run whose folder is ``root``, or None when it is not one (no ``run.json``)."""
    folder = Folder.local(root)
    data = folder.read(OWNER)
    if data is None:
        return None
    owner = json.loads(data)
    return RunFolder(str(owner["campaign"]), str(owner["run_id"]), folder, owner)


def find_runs(staging_root: Path) -> list[RunFolder]:
    """Every run under a local staging root (``<root>/<campaign>/<run>/run.json``)."""
    found = []
    for owner in sorted(staging_root.glob(f"*/*/{OWNER}")):
        run = local_run(owner.parent)
        if run is not None and run.campaign == owner.parent.parent.name:
            found.append(run)
    return found


def find_run(staging_root: Path, run_id: str) -> RunFolder | None:
    """The run with exactly this id under a local staging root, or None. The folder is found by
    the id's folder name (``staging.run_folder_name``: no separator or dot-only name can reach
    outside the root) and must record this very id: a look-alike id is not its run."""
    try:
        name = run_folder_name(run_id)
    except MailroomError:
        return None
    if not staging_root.is_dir():
        return None
    for campaign in sorted(p for p in staging_root.iterdir() if p.is_dir()):
        run = local_run(campaign / name)
        if run is not None and run.run_id == run_id and run.campaign == campaign.name:
            return run
    return None


def latest_report(run: RunFolder) -> dict[str, Any] | None:
    """The run's newest report: the first ``report.json``, or a later one beside it once an
    operator's action made reconcile report again (``reports/<n>.json``)."""
    n = 2
    latest = None
    while (later := run.json(f"reports/{n}.json")) is not None:
        latest = later
        n += 1
    report = latest if latest is not None else run.json("report.json")
    return dict(report) if report is not None else None


def run_state(
    run: RunFolder, outbox: Outbox | None, batches: list[BatchProgress] | None = None
) -> str:
    """The run's state, as the module docstring defines it (``batches``: the run's
    ``Outbox.batch_progress`` when the caller has read it already)."""
    approval = run.json(APPROVAL_FILE) or {}
    decision = approval.get("decision")
    if decision == "rejected":
        return REJECTED
    if decision == "timed_out":
        return TIMED_OUT
    if decision == "approved":
        counts = _counts(batches if batches is not None else _batches(outbox, run.run_key))
        if counts is None:
            return SENDING
        if outbox is not None and outbox.halt_requested(run.run_key):
            return HALTED
        pending = counts["staged"]["recipients"] + counts["sending"]["recipients"]
        if pending:
            return SENDING
        if counts["halted"]["recipients"] and latest_report(run) is None:
            return HALTED
        unfinished = sum(counts[s]["recipients"] for s in ("failed", "unknown", "halted"))
        return INCOMPLETE if unfinished else SENT
    gate = run.json("gate/result.json")
    if gate is not None and not gate.get("success"):
        return FAILED_GATE
    if latest_report(run) is not None:  # reconcile ran, and nobody answered the gate
        return FAILED
    if gate is not None and run.folder.has(FROZEN):
        return AWAITING_APPROVAL
    return PREPARING


def run_overview(run: RunFolder, outbox: Outbox | None) -> dict[str, Any]:
    """One line of the campaign list: the run, its state, who did what when, sent of total."""
    approval = run.json(APPROVAL_FILE) or {}
    batches = _batches(outbox, run.run_key)
    counts = _counts(batches)
    total = sum(c["recipients"] for c in counts.values()) if counts else None
    started = run.owner.get("started_at")
    ended = _ended_at(run, approval, batches)
    return {
        "campaign": run.campaign,
        "run_id": run.run_id,
        "run_key": run.run_key,
        "state": run_state(run, outbox, batches),
        "triggered_by": run.owner.get("triggered_by"),
        "decision": approval.get("decision"),
        "decided_by": approval.get("by"),
        "decided_at": approval.get("at") or None,
        "sent": counts["sent"]["recipients"] if counts else 0,
        "total": total,
        "started_at": started,
        "ended_at": ended,
        "duration_seconds": _seconds_between(started, ended),
        "halt_reason": outbox.halt_reason(run.run_key) if outbox is not None and counts else None,
    }


def run_progress(
    run: RunFolder, outbox: Outbox | None, *, now: datetime | None = None
) -> dict[str, Any]:
    """Recipients and requests per state overall, per shard and per locale; the current rate
    (recipients a second over the last ``RATE_WINDOW``) and the ETA of what is still to send."""
    now = now or datetime.now(UTC)
    batches = _batches(outbox, run.run_key)
    rows = batches or []
    shard_count = max(1, min(int(run.owner.get("shards") or 1), max(len(rows), 1)))
    overall = _zero()
    shards = [_zero() for _ in range(shard_count)]
    locales: dict[str, dict[str, dict[str, int]]] = {}
    recent = 0
    first_sent: datetime | None = None
    for batch in rows:
        for part in (
            overall,
            shards[batch.batch_index % shard_count],
            locales.setdefault(batch.locale, _zero()),
        ):
            _add(part, batch)
        if batch.per_state.get("sent"):
            first_sent = min(first_sent or batch.updated_at, batch.updated_at)
            if now - batch.updated_at <= RATE_WINDOW:
                recent += batch.per_state["sent"]
    total = overall["recipients"]["total"]
    sent = overall["recipients"]["sent"]
    to_send = overall["recipients"]["staged"] + overall["recipients"]["sending"]
    window = RATE_WINDOW.total_seconds()
    if first_sent is not None:
        window = min(window, max((now - first_sent).total_seconds(), 1.0))
    rate = recent / window if recent else 0.0
    state = run_state(run, outbox, batches)
    return {
        "delivery_feedback": _delivery_feedback(outbox, run.run_key, locales if rows else None),
        "run_key": run.run_key,
        "state": state,
        "settled": state in SETTLED,
        "overall": overall,
        "shards": shards,
        "locales": dict(sorted(locales.items())),
        "total": total,
        "sent": sent,
        "percent": round(100.0 * sent / total, 1) if total else 0.0,
        "rate_per_second": round(rate, 1),
        "eta_seconds": round(to_send / rate) if rate and to_send and state == SENDING else None,
        "halt_reason": outbox.halt_reason(run.run_key) if outbox is not None and rows else None,
        "at": now.isoformat(),
    }


def _delivery_feedback(
    outbox: Outbox | None, run_key: str, locales: dict[str, Any] | None
) -> dict[str, Any]:
    """Per locale of the run (``locales``; None: the run is not staged) and in total, how many
    recipients the provider reported delivered, bounced, dropped, complained, unsubscribed."""
    from mailroom.delivery import feedback_report

    if outbox is None or locales is None:
        return feedback_report.shaped({})
    return feedback_report.section(outbox, run_key, locales)


def approved_content(run: RunFolder) -> dict[str, Any]:
    """What the approver saw: the summary the approval task wrote, the manifest digest, each
    locale's preview and which Data Docs the run keeps."""
    summary = run.json(SUMMARY_FILE)
    frozen = run.json(FROZEN) or {}
    locales = sorted((summary or {}).get("previews") or {})
    return {
        "summary": summary,
        "manifest_sha256": frozen.get("manifest_sha256"),
        "locales": locales,
        "data_docs": {
            check: run.folder.has(f"{folder}/index.html") for check, folder in DATA_DOCS.items()
        },
    }


def preview(run: RunFolder, locale: str, kind: str) -> str | None:
    """A locale's preview as the approval task wrote it (``html`` or ``txt``: one real
    recipient's message, address and unsubscribe token masked), or None: a locale the run has
    no preview of is not looked up, whatever the name."""
    if kind not in ("html", "txt") or not _LOCALE.match(locale):
        return None
    if locale not in approved_content(run)["locales"]:
        return None
    data = run.folder.read(f"preview/{locale}.{kind}")
    return None if data is None else data.decode("utf-8")


def data_docs_file(run_root: Path, check: str, rel: str) -> Path | None:
    """A file of one check's Data Docs in a local run folder, or None: an unknown check, a path
    leaving the docs' folder (``..``, an absolute path, a link pointing out) or no such file."""
    base_rel = DATA_DOCS.get(check)
    if base_rel is None or not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return None
    base = (run_root / base_rel).resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


def not_sent_sample(run: RunFolder, outbox: Outbox | None, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` staged recipients not sent, in request order, then the first
    ``limit`` the provider bounced or dropped (``_provider_sample``), as a page shows them (the
    address masked). Only the first requests holding any are read, not every recipient of
    the run: at a million staged that would be a sort of a million rows per page."""
    if outbox is None or outbox.manifest_sha256(run.run_key) is None:
        return []
    wanted: list[str] = []
    found = 0
    for batch in outbox.batch_progress(run.run_key):
        unsent = batch.recipients - batch.per_state.get("sent", 0)
        if unsent > 0:
            wanted.append(batch.batch_id)
            found += unsent
        if found >= limit:
            break
    out: list[dict[str, Any]] = []
    for row in outbox.not_sent(run.run_key, wanted) if wanted else ():
        if len(out) >= limit:
            break
        shown = {k: v for k, v in row.items() if k != "email_key"}
        out.append({**shown, "email": mask(str(row.get("email_key") or ""))})
    return out + _provider_sample(outbox, run.run_key, limit)


def _provider_sample(outbox: Outbox, run_key: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` recipients the provider bounced or dropped after it accepted their
    request, in request order, as ``not_sent_sample`` shows them: state ``bounced`` or
    ``dropped``, the provider's reason as the error (any address in it masked too)."""
    from mailroom.delivery import feedback_report

    return [
        {
            "user_id": row["user_id"],
            "email": mask(str(row["email_key"] or "")),
            "batch_id": row["batch_id"],
            "state": row["state"],
            "last_error": mask_addresses(feedback_report.reason_text(row["reason"])),
        }
        for row in outbox.not_delivered(run_key, limit=limit)
    ]


def run_note(run: RunFolder, outbox: Outbox | None) -> str | None:
    """The one line the DAG run's note says of a finished run: above all a rejection or a
    timeout, which Airflow shows as a green run."""
    state = run_state(run, outbox)
    approval = run.json(APPROVAL_FILE) or {}
    report = latest_report(run) or {}
    staged = (report.get("staged") or {}).get("recipients")
    if state == REJECTED:
        by = approval.get("by") or "an approver"
        return f"REJECTED by {by} at {approval.get('at') or 'an unknown time'}: nothing was sent."
    if state == TIMED_OUT:
        return (
            "TIMED OUT: nobody answered the approval in time (counts as Reject); nothing was sent."
        )
    if state == FAILED_GATE:
        return "FAILED GATE: the data-quality gate refused the frozen batches; nobody was asked."
    if state == FAILED:
        return "NOT APPROVED: the run ended before anyone answered the approval; nothing was sent."
    counts = _counts(_batches(outbox, run.run_key))
    if state in (SENT, INCOMPLETE, HALTED) and counts:
        sent = counts["sent"]["recipients"]
        total = sum(c["recipients"] for c in counts.values())
        label = {SENT: "SENT", INCOMPLETE: "INCOMPLETE", HALTED: "HALTED"}[state]
        tail = f" ({report['equation']})" if report.get("equation") else ""
        return f"{label}: {sent:,} of {total:,} recipients sent{tail}."
    if state == SENT and staged == 0:
        return "SENT: nobody was left to send to."
    return None


def _batches(outbox: Outbox | None, run_key: str) -> list[BatchProgress] | None:
    """The run's batches with their recipients per state; None when it is not staged."""
    if outbox is None or outbox.manifest_sha256(run_key) is None:
        return None
    return outbox.batch_progress(run_key)


def _counts(batches: list[BatchProgress] | None) -> dict[str, dict[str, int]] | None:
    """Batches and recipients per state, as ``Outbox.counts`` gives them, from the batches'
    own counts (one read of the outbox serves the state, the totals and the progress)."""
    if batches is None:
        return None
    out = {s: {"batches": 0, "recipients": 0} for s in BATCH_STATES}
    for batch in batches:
        out[batch.state.value]["batches"] += 1
        for state, n in batch.per_state.items():
            out[state]["recipients"] += n
    return out


def _ended_at(
    run: RunFolder, approval: dict[str, Any], batches: list[BatchProgress] | None
) -> str | None:
    """When a finished run last changed: its last request's outcome, or the answer that ended
    it (a rejection, a timeout); None while it is not finished."""
    if latest_report(run) is None:
        return None
    if batches and approval.get("decision") == "approved":
        return max(b.updated_at for b in batches).isoformat()
    return str(approval.get("at") or "") or None


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start:
        return None
    try:
        begin = datetime.fromisoformat(start)
        finish = datetime.fromisoformat(end) if end else datetime.now(UTC)
    except ValueError:
        return None
    return round((finish - begin).total_seconds(), 1)


def _zero() -> dict[str, dict[str, int]]:
    return {
        "recipients": {s: 0 for s in (*BATCH_STATES, "total")},
        "requests": {s: 0 for s in (*BATCH_STATES, "total")},
    }


def _add(part: dict[str, dict[str, int]], batch: BatchProgress) -> None:
    part["requests"][batch.state.value] += 1
    part["requests"]["total"] += 1
    for state, n in batch.per_state.items():
        part["recipients"][state] += n
    part["recipients"]["total"] += batch.recipients
