"""A run's record: which run owns a folder, whether the run is frozen, and what each stage may
still write once it is.

Why: a run's folder and outbox rows are its record of what was approved and what left. Clearing a
finished DAG run in Airflow runs every task again under the same run id; before this module that
rewrote the manifest, the frozen bodies and the report (which then said ``not_approved`` and
unbalanced, though nothing was resent). And two run ids can map to one folder name
(``manual__x:1`` and ``manual__x_1``: ``staging.run_folder_name``), which would mix two runs.

**Owner.** ``prepare`` writes ``run.json`` (campaign, run id, folder name) once, when it first
creates the folder. Every stage, ``prepare`` included, refuses a run whose id is not the one
``run.json`` names, naming both: a second run id that maps to the same folder never touches it.

**Frozen.** A run is frozen once ``freeze_batches`` has staged it in the outbox: the outbox holds
its manifest digest (``Outbox.manifest_sha256``), and right after that commit the freeze stage
writes ``frozen.json`` (run id and manifest digest) into the folder, so stages that have no
outbox know it too. A stage that opens the outbox asks it as well (the outbox is the authority:
a marker lost between the commit and the folder does not unfreeze a run). Until a run is frozen
every stage may run again (Airflow retries, clearing a run that failed early): each rewrites only
its own files, and ``freeze_batches`` re-stages the run in the outbox.

**Once frozen**, the folder only grows and no file in it, nor any outbox row but the sending
states, is rewritten. Per stage:

- ``prepare``, ``extract_audience``, ``validate_audience``, ``render_content``,
  ``build_envelopes``, ``freeze_batches``: refused (``RunRefused``), before anything is read or
  written.
- ``check_envelopes``, ``canary_send``, ``summarise``: run once after the freeze. Each is refused
  once its record exists (``gate/result.json``, ``canary/result.json``, any file in ``preview/``);
  an attempt that failed before writing it may be retried.
- ``approve``: ``approval.json`` is written once. The same answer again changes nothing; any
  other answer (a re-run's timeout or rejection after an approval, or the reverse) is refused,
  so the approval task fails and nothing downstream of it runs.
- ``guard_shard``, ``send_shard``: may run again. The guard writes nothing in the folder and
  records only the digest it cleared; a shard claims each batch in the outbox with a
  compare-and-set (``staged|halted → sending``), so a batch that was sent, failed or is unknown
  never leaves again (a halted batch leaves only once an operator lifts the halt).
- ``reconcile``: the first final report stands. ``report.json`` and ``not_sent.csv`` are written
  once; a later reconcile that finds the same report writes nothing. One that finds the outbox
  moved on (an operator resumed a halted run, or resent the unknown) writes its report next to
  the first, as ``reports/<n>.json`` and ``reports/<n>.not_sent.csv``, never over it. The
  provider's events alone (the report's ``delivery_feedback``, the bounced and dropped in its
  ``not_sent`` rows) are not the outbox moving on: they keep arriving after the run.
- Not a stage: ``delivery_feedback.json`` and ``delivery_feedback.not_sent.csv`` are the one
  pair of files rewritten in a frozen run's folder (``mailroom status`` rewrites them whole, by
  ``os.replace``: ``report.refresh_delivery_feedback``). They are a view of the provider's
  events as the outbox holds them now, not a record of the run: the outbox is.
- Any stage not named here is refused once the run is frozen: a new stage must say what it may do.

On object storage the Airflow task checks the folder's objects (and the outbox) before it makes
its working copy, so a refused stage downloads, uploads and removes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from mailroom.errors import MailroomError
from mailroom.staging import json_bytes, run_folder_name, write_json

if TYPE_CHECKING:
    from mailroom.delivery.outbox import Outbox
    from mailroom.run import Run

log = logging.getLogger(__name__)

OWNER = "run.json"
FROZEN = "frozen.json"
APPROVAL_FILE = "approval.json"

BEFORE_FREEZE = (
    "prepare",
    "extract_audience",
    "validate_audience",
    "render_content",
    "build_envelopes",
    "freeze_batches",
)
# Stages that run once after the freeze: refused once the file (or folder) they write exists.
WRITTEN_ONCE = {
    "check_envelopes": "gate/result.json",
    "canary_send": "canary/result.json",
    "summarise": "preview/",
}
# Stages that may run again on a frozen run, and why that is safe (see the module docstring).
AGAIN = ("approve", "guard_shard", "send_shard", "reconcile")


class RunRefused(MailroomError):
    """A stage may not run on this run's folder (another run owns it, or the run is frozen).
    Raised before the stage reads or writes anything: nothing was changed."""


@dataclass(frozen=True)
class Folder:
    """What the checks need to know of a run folder, wherever it is: whether a file (or, for a
    name ending in ``/``, any file under a folder) is there, and a small file's bytes."""

    where: str
    has: Callable[[str], bool]
    read: Callable[[str], bytes | None]

    @classmethod
    def local(cls, root: Path) -> Folder:
        def has(rel: str) -> bool:
            path = root / rel
            if rel.endswith("/"):
                return path.is_dir() and any(p.is_file() for p in path.rglob("*"))
            return path.is_file()

        def read(rel: str) -> bytes | None:
            path = root / rel
            return path.read_bytes() if path.is_file() else None

        return cls(str(root), has, read)

    @classmethod
    def listed(
        cls, where: str, listing: Collection[str], read: Callable[[str], bytes | None]
    ) -> Folder:
        """A folder known by the relative paths of its files (an object-storage listing)."""
        names = set(listing)

        def has(rel: str) -> bool:
            if rel.endswith("/"):
                return any(name.startswith(rel) for name in names)
            return rel in names

        return cls(where, has, lambda rel: read(rel) if rel in names else None)


def owner_record(campaign: str, run_id: str) -> dict[str, str]:
    return {"campaign": campaign, "run_id": run_id, "folder": run_folder_name(run_id)}


def check_stage(
    stage: str, folder: Folder, *, campaign: str, run_id: str, staged_manifest: str | None = None
) -> None:
    """Refuse ``stage`` for run ``run_id`` on ``folder`` unless the rules of the module docstring
    allow it. ``staged_manifest`` is the manifest digest the outbox holds for the run, when the
    caller has the outbox (None: not staged, or not known)."""
    owner = folder.read(OWNER)
    if owner is not None:
        owned_by = str(json.loads(owner).get("run_id"))
        if owned_by != run_id:
            raise RunRefused(
                f"run {run_id!r} maps to the run folder {folder.where} "
                f"({run_folder_name(run_id)}), which belongs to run {owned_by!r} of campaign "
                f"{campaign}: two run ids that differ only in characters a folder name cannot "
                f"hold would share one folder; {stage} refused, nothing was changed. Trigger the "
                "run with another run id."
            )
    marker = folder.read(FROZEN)
    manifest = staged_manifest or (
        str(json.loads(marker).get("manifest_sha256")) if marker is not None else None
    )
    if manifest is None:
        return  # not frozen: every stage may run (again)
    run_key = f"{campaign}/{run_id}"
    if stage in BEFORE_FREEZE:
        raise RunRefused(
            f"run {run_key} is frozen (manifest {manifest} staged in the outbox): {stage} may "
            "not run again, so its files and outbox rows stay as they were approved and sent; "
            "nothing was changed. To send this campaign again, trigger a new run."
        )
    record = WRITTEN_ONCE.get(stage)
    if record is not None:
        if folder.has(record):
            raise RunRefused(
                f"run {run_key} is frozen and {stage} has already written {record}: it runs "
                "once after the freeze, so what the approver saw stays as it was; nothing was "
                "changed"
            )
    elif stage not in AGAIN:
        raise RunRefused(
            f"run {run_key} is frozen and {stage!r} is not a stage that may run after the freeze "
            "(mailroom.run_record); nothing was changed"
        )


def claim_folder(
    root: Path, *, campaign: str, run_id: str, details: dict[str, Any] | None = None
) -> None:
    """``prepare``: refuse a folder another run owns or a frozen run, then record this run as
    the folder's owner (once: the record is never rewritten), with ``details`` of the run the
    console shows (who triggered it, when, over how many shards)."""
    check_stage("prepare", Folder.local(root), campaign=campaign, run_id=run_id)
    if not (root / OWNER).exists():
        write_json(root / OWNER, {**(details or {}), **owner_record(campaign, run_id)})


def mark_frozen(root: Path, *, run_id: str, manifest_sha256: str) -> None:
    write_json(root / FROZEN, {"run_id": run_id, "manifest_sha256": manifest_sha256})


def check_not_answered(folder: Folder, *, run_key: str) -> None:
    """Before the approval is asked: refuse when the run already has its answer (the approve
    task cleared or re-run on its own), so nobody is asked again about a run that is decided."""
    existing = folder.read(APPROVAL_FILE)
    if existing is None:
        return
    before = json.loads(existing)
    raise RunRefused(
        f"run {run_key} was already answered ({before.get('decision')} by "
        f"{before.get('by') or 'nobody'} at {before.get('at') or 'an unknown time'}): the "
        "approval is asked once and the first answer stands; nothing was changed. To finish "
        "sending an approved run, clear its guard_shard and send_shard tasks instead"
    )


def approval_unchanged(path: Path, record: dict[str, Any], *, run_key: str) -> bool:
    """Whether ``approval.json`` already holds ``record`` (then nothing need be written). A
    different record is refused: the first answer is the run's answer."""
    if not path.exists():
        return False
    existing = path.read_bytes()
    if existing == json_bytes(record):
        return True
    before = json.loads(existing)
    raise RunRefused(
        f"run {run_key} already has its approval recorded ({before.get('decision')} by "
        f"{before.get('by') or 'nobody'} at {before.get('at') or 'an unknown time'}); this "
        f"answer ({record.get('decision')}) is not recorded and changes nothing"
    )


P = ParamSpec("P")
R = TypeVar("R")


def stage(
    name: str,
) -> Callable[[Callable[Concatenate[Run, P], R]], Callable[Concatenate[Run, P], R]]:
    """Mark a ``pipeline`` function as the stage ``name``: it refuses (``check_stage``) before it
    runs, asking the outbox too when it is given one (``outbox=``); the freeze, once it has
    staged the run, leaves its marker in the folder."""

    def wrap(fn: Callable[Concatenate[Run, P], R]) -> Callable[Concatenate[Run, P], R]:
        @functools.wraps(fn)
        def checked(run: Run, /, *args: P.args, **kwargs: P.kwargs) -> R:
            outbox: Outbox | None = kwargs.get("outbox")  # type: ignore[assignment]
            staged = outbox.manifest_sha256(run.run_key) if outbox is not None else None
            check_stage(
                name,
                Folder.local(run.staging.root),
                campaign=run.campaign,
                run_id=run.run_id,
                staged_manifest=staged,
            )
            result = fn(run, *args, **kwargs)
            if name == "freeze_batches" and outbox is not None:
                frozen = outbox.manifest_sha256(run.run_key)
                if frozen is not None:
                    mark_frozen(run.staging.root, run_id=run.run_id, manifest_sha256=frozen)
            return result

        return checked

    return wrap


def is_frozen(root: Path, run_key: str, outbox: Outbox | None) -> bool:
    """Whether the run is frozen, by its folder's marker or by the outbox."""
    if (root / FROZEN).exists():
        return True
    return outbox is not None and outbox.manifest_sha256(run_key) is not None


def keep_first_report(run: Run, result: dict[str, Any], not_sent: Path) -> dict[str, Any]:
    """``reconcile`` on a frozen run that has its report: ``result`` (with its ``not_sent``
    rows, made aside) is written only when it differs from the latest report, as
    ``reports/<n>.json`` and ``reports/<n>.not_sent.csv`` (``report.json`` is the first), and
    returned; the same report again writes nothing and returns the latest as it is on disk. A
    report stating another approval than the first is refused: the approval is recorded once."""
    st = run.staging
    first = json.loads(st.report.read_bytes())
    if result.get("approval") != first.get("approval"):
        raise RunRefused(
            f"run {run.run_key} has its report already ({first.get('status')}, approval "
            f"{(first.get('approval') or {}).get('decision')}); a report stating another approval "
            f"({(result.get('approval') or {}).get('decision')}) is not written: the approval is "
            "recorded once"
        )
    reports = st.root / "reports"
    n = 1
    while (reports / f"{n + 1}.json").exists():
        n += 1
    latest, latest_rows = (
        (st.report, st.not_sent)
        if n == 1
        else (reports / f"{n}.json", reports / f"{n}.not_sent.csv")
    )
    on_disk = latest.read_bytes()
    before = json.loads(on_disk)
    as_latest = {**result, **{k: before[k] for k in ("not_sent_file", "amends") if k in before}}
    if _same_outcome(as_latest, on_disk, latest_rows, not_sent):
        log.info("report: unchanged since %s; nothing written", run.where(latest))
        return dict(before)
    amended = reports / f"{n + 1}.json"
    rows = reports / f"{n + 1}.not_sent.csv"
    reports.mkdir(parents=True, exist_ok=True)
    rows.write_bytes(not_sent.read_bytes())
    result = {**result, "not_sent_file": run.where(rows), "amends": run.where(latest)}
    write_json(amended, result)
    log.warning(
        "report: the outbox moved on since %s (status %s, now %s): written as %s, the first "
        "report stands",
        run.where(latest),
        before.get("status"),
        result.get("status"),
        run.where(amended),
    )
    return result


def _same_outcome(result: dict[str, Any], on_disk: bytes, rows_on_disk: Path, rows: Path) -> bool:
    """Whether a report (and its ``not_sent`` rows) says what the one on disk says. What the
    provider's events change alone (``delivery_feedback``, the bounced and dropped at the end of
    the rows) is not a new report: those events go on arriving after the run, and
    ``delivery_feedback.json`` has them (``report.refresh_delivery_feedback``)."""
    if not rows_on_disk.exists():
        return False
    written = json_bytes(result)
    if written == on_disk and rows_on_disk.read_bytes() == rows.read_bytes():
        return True
    from mailroom.delivery import report

    return report.equation_view(json.loads(written)) == report.equation_view(
        json.loads(on_disk)
    ) and report.equation_rows(rows_on_disk.read_bytes()) == report.equation_rows(rows.read_bytes())
