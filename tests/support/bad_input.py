"""The harness of ``tests/unit/test_bad_input.py``: a baseline project, named changes to it, the
DAG's tasks run in process against the SendGrid dev server, and what each case must show.

A case (``Case``) is changes to the baseline (the example campaign copied into ``tmp_path``, a
small SQLite audience, a trigger; ``spec_set``, ``edit_file``, ``users``, ``suppressions``,
``trigger``, ``earlier_run``, ``clear_task``…) and the outcome expected of it: ``Refused`` (the
task that raises and its exact error), ``Sent`` (the run goes through; each row's fate) or
``Unchanged`` (a cleared task that may run again does nothing). ``play_case`` plays the earlier
runs a case asks for, then its trigger: the tasks in an order the DAG may run them, up to the
first that raises, and ``reconcile`` after it anyway (its trigger rule is ``all_done``).
``check_refused``, ``check_sent`` and ``check_unchanged`` hold what happened to the expectation;
``leaks`` looks for audience data and secrets in every log record and in the error.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import logging
import re
import shutil
import sqlite3
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mailroom import earlier_runs, pipeline, run_record
from mailroom.addresses import address_key, addresses_shown, normalise, readable
from mailroom.batches import load_manifest
from mailroom.campaign_spec import load_campaign_file
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import RunStaging, read_json, run_location, write_json
from mailroom.unsubscribe import unsubscribe_token
from sendgrid_dev import SendGridDevServer, accepted_recipients

REPO = Path(__file__).resolve().parents[2]
CAMPAIGN = "winter_update"
RUN_ID = "manual__bad_input"
EARLIER_RUN_ID = "manual__first"
# Distinctive, so that finding one in a log line is never a coincidence.
SECRET = b"bad-input-unsubscribe-signing-secret-5e1f"
API_KEY = "SG.bad-input-api-key-9c2d7b41"
APPROVED = {"decision": "approved", "by": "approver", "at": "2026-12-06 10:00:00+00:00"}
NO_APPROVAL = {"decision": "none", "detail": "the approval gate did not complete"}

# The baseline audience: one user per locale of the example campaign.
USERS_TABLE = "CREATE TABLE users (user_id, email, first_name, locale)"  # no type affinity:
SUPPRESSIONS_TABLE = "CREATE TABLE suppressions (email, reason)"  # values stay as inserted
BASE_USERS: tuple[tuple[object, ...], ...] = (
    ("u001", "ann@example.com", "Ann", "en"),
    ("u002", "bernd@example.org", "Bernd", "de"),
    ("u003", "chloe@example.net", "Chloé", "fr"),
    ("u004", "diego@example.com", "Diego", "es"),
    ("u005", "emi@example.jp", "Emi", "ja"),
)

# The DAG's tasks in one of its orders: render_content is a branch of its own beside extract and
# validate (both lead to build_envelopes), so it may run first; a case it refuses runs no GX.
STAGES = (
    "prepare",
    "render_content",
    "extract_audience",
    "validate_audience",
    "build_envelopes",
    "freeze_batches",
    "check_envelopes",
    "canary_send",
    "summarise",
    "approve",
    "guard_shard",
    "send_shard",
    "reconcile",
)

# Expected messages name files relative to the case's folder: "{tmp}" stands for it.
TMP = "{tmp}"
INCLUDE = f"{TMP}/include"
CAMPAIGNS = f"{INCLUDE}/campaigns"
SPEC = f"{CAMPAIGNS}/{CAMPAIGN}.yaml"
TEMPLATES = f"{INCLUDE}/templates"
TRANSLATIONS = f"{INCLUDE}/translations"
RUN_DIR = f"{TMP}/staging/{CAMPAIGN}/{RUN_ID}"
DB_URL = f"sqlite:///{TMP}/users.sqlite"


def po(locale: str) -> str:
    return f"{TRANSLATIONS}/{locale}/LC_MESSAGES/messages.po"


# --- the project a case changes ------------------------------------------------------------------


@dataclass
class Trigger:
    """What the DAG is triggered with, and where a cleared run starts again."""

    campaign: str = CAMPAIGN
    run_id: str = RUN_ID
    shards: int = 1
    resend: object = False
    reason: object = ""
    decision: dict[str, Any] = field(default_factory=lambda: dict(APPROVED))
    start_at: str = "prepare"


Change = Callable[["Project"], None]


@dataclass
class Project:
    """One case's copy of the example project, its audience database and its trigger."""

    tmp: Path
    users: list[tuple[object, ...]] = field(default_factory=lambda: list(BASE_USERS))
    suppressions: list[tuple[object, object]] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    trigger: Trigger = field(default_factory=Trigger)
    # Runs before the case's own trigger (an earlier run of the campaign, or the run a cleared
    # task belongs to): each must go through.
    before: list[Trigger] = field(default_factory=list)
    # Changes made after those runs, before the case's own trigger (a user who joined since).
    then: list[Change] = field(default_factory=list)
    # Secrets a case puts somewhere they must not be repeated from (a key in the spec).
    secrets: list[str] = field(default_factory=list)

    @property
    def include(self) -> Path:
        return self.tmp / "include"

    @property
    def paths(self) -> ProjectPaths:
        return ProjectPaths.under(self.include)

    @property
    def spec_path(self) -> Path:
        return self.include / "campaigns" / f"{CAMPAIGN}.yaml"

    @property
    def db(self) -> Path:
        return self.tmp / "users.sqlite"

    @property
    def staging(self) -> Path:
        return self.tmp / "staging"

    def write_audience(self) -> None:
        self.db.unlink(missing_ok=True)
        with sqlite3.connect(self.db) as conn:
            conn.execute(USERS_TABLE)
            conn.execute(SUPPRESSIONS_TABLE)
            conn.executemany("INSERT INTO users VALUES (?,?,?,?)", self.users)
            conn.executemany("INSERT INTO suppressions VALUES (?,?)", self.suppressions)
            for statement in self.statements:
                conn.execute(statement)
        conn.close()


def baseline(tmp: Path) -> Project:
    """The example project, with a quarantine limit a handful of rows can stay under (one bad
    row of six is 17%)."""
    project = Project(tmp)
    shutil.copytree(REPO / "include", project.include)
    text = project.spec_path.read_text("utf-8")
    assert "max_invalid_fraction: 0.05\n" in text
    project.spec_path.write_text(
        text.replace("max_invalid_fraction: 0.05\n", "max_invalid_fraction: 0.5\n"), "utf-8"
    )
    return project


def spec_text(old: str, new: str) -> Change:
    """Replace text in the spec's YAML (for what a parsed mapping cannot hold: a key given twice,
    YAML's own NaN, a broken document)."""

    def change(project: Project) -> None:
        text = project.spec_path.read_text("utf-8")
        assert old in text, old
        project.spec_path.write_text(text.replace(old, new, 1), "utf-8")

    return change


def spec_bytes(data: bytes) -> Change:
    def change(project: Project) -> None:
        project.spec_path.write_bytes(data)

    return change


def _edit_spec(edit: Callable[[dict[str, Any]], None]) -> Change:
    def change(project: Project) -> None:
        raw = yaml.safe_load(project.spec_path.read_text("utf-8"))
        edit(raw)
        project.spec_path.write_text(
            yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), "utf-8"
        )

    return change


def _parent(raw: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    *parents, leaf = dotted.split(".")
    for key in parents:
        raw = raw[key]
    return raw, leaf


def spec_set(dotted: str, value: object) -> Change:
    def edit(raw: dict[str, Any]) -> None:
        parent, leaf = _parent(raw, dotted)
        parent[leaf] = value

    return _edit_spec(edit)


def spec_drop(dotted: str) -> Change:
    def edit(raw: dict[str, Any]) -> None:
        parent, leaf = _parent(raw, dotted)
        del parent[leaf]

    return _edit_spec(edit)


def spec_rename(dotted: str, new: str) -> Change:
    def edit(raw: dict[str, Any]) -> None:
        parent, leaf = _parent(raw, dotted)
        parent[new] = parent.pop(leaf)

    return _edit_spec(edit)


def write_file(relative: str, content: str | bytes) -> Change:
    """Write a file of the project (under ``include/``)."""

    def change(project: Project) -> None:
        path = project.include / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, "utf-8")

    return change


def edit_file(relative: str, old: str | bytes, new: str | bytes) -> Change:
    """Replace the first ``old`` in a file of the project (bytes for bytes)."""

    def change(project: Project) -> None:
        path = project.include / relative
        data = path.read_bytes()
        before = old.encode() if isinstance(old, str) else old
        after = new.encode() if isinstance(new, str) else new
        assert before in data, (relative, old)
        path.write_bytes(data.replace(before, after, 1))

    return change


def delete_file(relative: str) -> Change:
    def change(project: Project) -> None:
        (project.include / relative).unlink()

    return change


def users(*rows: tuple[object, ...]) -> Change:
    """Rows added to the audience after the baseline's (user id, email, first name, locale)."""

    def change(project: Project) -> None:
        project.users.extend(rows)

    return change


def replace_users(*rows: tuple[object, ...]) -> Change:
    def change(project: Project) -> None:
        project.users[:] = rows

    return change


def suppressions(*rows: tuple[object, object]) -> Change:
    def change(project: Project) -> None:
        project.suppressions.extend(rows)

    return change


def sql(statement: str) -> Change:
    """SQL run on the audience database after the rows are in (values Python cannot insert)."""

    def change(project: Project) -> None:
        project.statements.append(statement)

    return change


def trigger(**changes: Any) -> Change:
    def change(project: Project) -> None:
        for key, value in changes.items():
            setattr(project.trigger, key, value)

    return change


def earlier_run(run_id: str = EARLIER_RUN_ID, **changes: Any) -> Change:
    """A complete run of the campaign before the case's own (sent and reconciled)."""

    def change(project: Project) -> None:
        project.before.append(Trigger(run_id=run_id, **changes))

    return change


def clear_task(stage: str, **changes: Any) -> Change:
    """The case's run went through once; then its ``stage`` task is cleared in Airflow, which
    runs that stage and everything downstream again under the same run id."""

    def change(project: Project) -> None:
        project.before.append(Trigger(run_id=project.trigger.run_id))
        project.trigger.start_at = stage
        for key, value in changes.items():
            setattr(project.trigger, key, value)

    return change


def then(*changes: Change) -> Change:
    """``changes`` made once the earlier runs are done, before the case's own trigger."""

    def change(project: Project) -> None:
        project.then.extend(changes)

    return change


def secret(value: str) -> Change:
    def change(project: Project) -> None:
        project.secrets.append(value)

    return change


# --- what a case expects --------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """The run stops at ``stage`` with ``error`` whose message is ``message`` exactly ("{tmp}"
    for the case's folder, "{sha256}" for a digest) or, for a finding whose wording is not
    written yet, matches the pattern. Nothing is sent. ``unchanged``: no file of the staging
    area and no outbox count changed (refused before anything was written)."""

    stage: str
    error: type[BaseException]
    message: str | re.Pattern[str]
    unchanged: bool = False


@dataclass(frozen=True)
class Quarantined:
    """Quarantined at validation with ``reason`` (a pattern only for a finding whose reason is
    not written yet)."""

    reason: str | re.Pattern[str]


@dataclass(frozen=True)
class Suppressed:
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """Dropped at extract: another spelling of a mailbox an earlier row has (who gets it)."""


@dataclass(frozen=True)
class Delivered:
    """Sent exactly once, at ``address`` when given (else the row's address as written)."""

    address: str | None = None


@dataclass(frozen=True)
class Unchanged:
    """The stages run (again) without an error, send nothing and change no file and no outbox
    count: what clearing a task that may run again after the freeze must do."""


@dataclass(frozen=True)
class AlreadySent:
    run_id: str = EARLIER_RUN_ID


Fate = Quarantined | Suppressed | Duplicate | Delivered | AlreadySent


@dataclass(frozen=True)
class Sent:
    """The run goes through to its report. ``rows``: the fate of the rows by user id (every
    other row is delivered); ``unreadable``: the rows of ``suppressions_unreadable.csv``."""

    rows: Mapping[object, Fate] = field(default_factory=dict)
    unreadable: tuple[tuple[str, str, str], ...] = ()
    locale_defaulted: int = 0
    status: str = "sent"


Expected = Refused | Sent | Unchanged


@dataclass(frozen=True)
class Case:
    changes: tuple[Change, ...]
    expect: Expected


# --- playing the DAG ------------------------------------------------------------------------------


@dataclass
class Played:
    run: Run | None
    stage: str | None = None
    error: BaseException | None = None
    report: dict[str, Any] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    received: int = 0


class Harness:
    """One case's project, outbox and dev server."""

    def __init__(self, project: Project, server: SendGridDevServer, outbox: Outbox) -> None:
        self.project = project
        self.server = server
        self.outbox = outbox

    def transport(self) -> SendGridTransport:
        return SendGridTransport(SendGridSettings(API_KEY, self.server.url, 10.0))

    def existing_run(self, t: Trigger) -> Run:
        root = Path(run_location(self.project.staging, t.campaign, t.run_id))
        return Run(t.campaign, t.run_id, RunStaging(root), t.shards, False)

    def play(self, t: Trigger) -> Played:
        """The DAG's tasks in order from ``t.start_at``; the first that raises ends the run, and
        ``reconcile`` runs after it anyway (its trigger rule is ``all_done``) when the run was
        prepared."""
        received = self.server.stats().received
        seen = len(self.server.accepted())
        paths = self.project.paths
        start = STAGES.index(t.start_at)
        played = Played(run=self.existing_run(t) if start else None)
        choice = earlier_runs.ResendChoice()
        frozen: dict[str, Any] | None = None

        def run() -> Run:
            assert played.run is not None
            return played.run

        def shards() -> dict[str, Any]:
            nonlocal frozen
            if frozen is None:  # a cleared task: the freeze's XCom, as the DAG keeps it
                manifest = load_manifest(run().staging.manifest)
                frozen = pipeline.manifest_summary(manifest, run().shard_count)
            return frozen

        def prepare() -> None:
            nonlocal choice
            choice = earlier_runs.resend_choice(t.resend, t.reason)
            played.run = pipeline.prepare(
                paths,
                campaign=t.campaign,
                run_id=t.run_id,
                staging_root=self.project.staging,
                shard_count=t.shards,
                dry_run=False,
            )

        def freeze() -> None:
            nonlocal frozen
            frozen = pipeline.freeze_batches(run(), outbox=self.outbox)

        def approve() -> None:
            approval = run().staging.approval
            if not run_record.approval_unchanged(approval, t.decision, run_key=run().run_key):
                write_json(approval, t.decision)

        def guard() -> None:
            f = shards()
            for shard in f["shards"]:
                pipeline.guard_shard(
                    run(),
                    manifest_sha256=f["manifest_sha256"],
                    outbox=self.outbox,
                    shard=shard,
                    shard_count=len(f["shards"]),
                )

        def send() -> None:
            f = shards()
            for shard in f["shards"]:
                pipeline.send_shard(
                    run(),
                    shard=shard,
                    manifest_sha256=f["manifest_sha256"],
                    transport=self.transport(),
                    outbox=self.outbox,
                    shard_count=len(f["shards"]),
                )

        def reconcile() -> None:
            approval = run().staging.approval
            decision = read_json(approval) if approval.exists() else NO_APPROVAL
            played.report = pipeline.reconcile(run(), outbox=self.outbox, approval=decision)

        tasks: dict[str, Callable[[], object]] = {
            "prepare": prepare,
            "extract_audience": lambda: pipeline.extract_audience(
                run(), sql_url=f"sqlite:///{self.project.db}"
            ),
            "validate_audience": lambda: pipeline.validate_audience(run()),
            "render_content": lambda: pipeline.render_content(run(), paths),
            "build_envelopes": lambda: pipeline.build_envelopes(
                run(), secret=SECRET, outbox=self.outbox, resend=choice
            ),
            "freeze_batches": freeze,
            "check_envelopes": lambda: pipeline.check_envelopes(
                run(), paths, secret=SECRET, outbox=self.outbox
            ),
            "canary_send": lambda: pipeline.canary_send(
                run(), secret=SECRET, transport=self.transport()
            ),
            "summarise": lambda: pipeline.summarise(run(), triggered_by="analyst"),
            "approve": approve,
            "guard_shard": guard,
            "send_shard": send,
            "reconcile": reconcile,
        }
        for stage in STAGES[start:]:
            try:
                tasks[stage]()
            except Exception as exc:  # the task fails; what it raised is the case's outcome
                played.stage, played.error = stage, exc
                break
        if played.error is not None and played.run is not None and played.stage != "reconcile":
            reconcile()
        played.records = self.server.accepted()[seen:]
        played.requests = [r["body"] for r in played.records]
        played.received = self.server.stats().received - received
        return played


def play_case(case: Case, tmp: Path) -> tuple[Project, Played, dict[str, Any]]:
    """The case's changes applied to the baseline, its earlier runs played (each must go
    through), then its own trigger; with the staging area and the outbox before that trigger."""
    project = baseline(tmp)
    for change in case.changes:
        change(project)
    project.write_audience()
    outbox_file = tmp / "outbox.sqlite"
    key = _earlier_key(project) if project.before else None
    cached = _EARLIER.get(key) if key else None
    if cached is not None:  # the same earlier runs of the same project: their files, copied
        shutil.copytree(cached / "staging", project.staging)
        _copy_database(cached / "outbox.sqlite", outbox_file)
    outbox = Outbox(f"sqlite:///{outbox_file}")
    try:
        with SendGridDevServer(api_key=API_KEY) as server:
            harness = Harness(project, server, outbox)
            if cached is None and key is not None:
                for earlier in project.before:
                    done = harness.play(earlier)
                    assert done.error is None, f"earlier run {earlier.run_id}: {done.error!r}"
                _EARLIER[key] = _keep(project, outbox_file)
            for change in project.then:
                change(project)
            if project.then:
                project.write_audience()
            before = snapshot_of(project, outbox)
            played = harness.play(project.trigger)
            after = snapshot_of(project, outbox)
    finally:
        outbox.dispose()
    return project, played, {"before": before, "after": after}


# Earlier runs already played in this process, by what they were played on (the project's
# files, its audience and the triggers): the copy of their staging area and outbox. Playing
# them takes a few seconds each, and many cases share one (a sent baseline run).
_EARLIER: dict[str, Path] = {}
_CACHE = Path(tempfile.mkdtemp(prefix="mailroom-bad-input-"))
atexit.register(shutil.rmtree, _CACHE, True)


def _earlier_key(project: Project) -> str:
    digest = hashlib.sha256()
    for path in sorted(project.include.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(project.include).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    state = (project.users, project.suppressions, project.statements, project.before)
    digest.update(repr(state).encode())
    return digest.hexdigest()


def _copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database that may be open elsewhere."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def _keep(project: Project, outbox_file: Path) -> Path:
    kept = _CACHE / str(len(_EARLIER))
    shutil.copytree(project.staging, kept / "staging")
    _copy_database(outbox_file, kept / "outbox.sqlite")
    return kept


def snapshot_of(project: Project, outbox: Outbox) -> dict[str, Any]:
    files = {
        p.relative_to(project.staging).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(project.staging.rglob("*"))
        if p.is_file()
    }
    runs = {t.run_id for t in (*project.before, project.trigger)}
    counts = {r: outbox.counts(f"{CAMPAIGN}/{r}") for r in sorted(runs)}
    return {"files": files, "outbox": counts}


# --- checks ---------------------------------------------------------------------------------------


def relative_message(error: BaseException, tmp: Path) -> str:
    """The message with the run-specific parts put as in the table: the case's folder and a
    SHA-256 digest (a manifest's)."""
    return re.sub(r"\b[0-9a-f]{64}\b", "{sha256}", str(error).replace(str(tmp), TMP))


def check_refused(expect: Refused, project: Project, played: Played, seen: dict[str, Any]) -> None:
    assert played.error is not None, f"not refused; report: {played.report}"
    message = relative_message(played.error, project.tmp)
    got = (played.stage, type(played.error).__name__, message)
    if isinstance(expect.message, str):
        assert got == (expect.stage, expect.error.__name__, expect.message)
    else:
        assert got[:2] == (expect.stage, expect.error.__name__), got
        assert expect.message.fullmatch(message), message
    assert isinstance(played.error, expect.error)
    assert played.received == 0, f"{played.received} request(s) reached the dev server"
    if expect.unchanged:
        assert seen["after"] == seen["before"], "the refused run changed the staging area"
    if played.report is not None:
        # reconcile ran after the failure (its trigger rule is all_done): nobody is lost, and
        # a run that failed on its own says so (a cleared one keeps its first report).
        assert played.report["balanced"] in (None, True), played.report
        if not expect.unchanged:
            assert played.report["status"] in ("failed_before_send", "not_approved")


def expected_fates(project: Project, expect: Sent) -> list[tuple[tuple[object, ...], Fate]]:
    return [(row, expect.rows.get(row[0], Delivered())) for row in project.users]


def user_key(value: object) -> str:
    """A user id as ``not_sent.csv`` should show it: empty when there is none (a blank id is
    none: it could name nobody)."""
    return "" if value is None or not str(value).strip() else str(value)


def not_sent_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    with Path(report["not_sent_file"]).open(newline="", encoding="utf-8") as fh:
        return sorted((r["user_id"], r["state"], r["reason"]) for r in csv.DictReader(fh))


def check_sent(expect: Sent, project: Project, played: Played) -> None:
    failed = f"{played.stage}: {type(played.error).__name__}: {played.error}"
    assert played.error is None, failed
    report = played.report
    assert report is not None
    listed = not_sent_rows(report)
    fates = expected_fates(project, expect)

    def reason_of(row: tuple[object, ...], fate: Quarantined) -> str:
        if isinstance(fate.reason, str):
            return fate.reason
        # A pattern (a finding): the row's reason as listed, when it matches.
        for uid, state, reason in listed:
            if (uid, state) == (user_key(row[0]), "quarantined") and fate.reason.fullmatch(reason):
                return reason
        return f"<a reason matching {fate.reason.pattern!r}>"

    kinds = Counter(type(f).__name__ for _, f in fates)
    quarantined = Counter(reason_of(r, f) for r, f in fates if isinstance(f, Quarantined))
    suppressed = Counter(f.reason for _, f in fates if isinstance(f, Suppressed))

    # The extract and the validation count every row.
    audience = report["audience"]
    assert {k: audience[k] for k in ("extracted", "suppressed", "duplicates", "kept")} == {
        "extracted": len(project.users),
        "suppressed": kinds["Suppressed"],
        "duplicates": kinds["Duplicate"],
        "kept": len(project.users) - kinds["Suppressed"] - kinds["Duplicate"],
    }, audience
    assert audience["suppressed_by_reason"] == dict(suppressed)
    assert audience["locale_defaulted"] == expect.locale_defaulted
    assert audience.get("suppressions_unreadable", 0) == len(expect.unreadable)
    validation = report["validation"]
    assert validation["total"] == audience["kept"]
    assert validation["quarantined_by_reason"] == dict(quarantined), validation
    assert (validation["valid"], validation["quarantined"]) == (
        validation["total"] - kinds["Quarantined"],
        kinds["Quarantined"],
    ), validation

    # The report balances: staged = sent, valid = staged + left out.
    assert (report["status"], report["balanced"]) == (expect.status, True), report
    staged = report["staged"]["recipients"]
    assert staged == validation["valid"] - kinds["AlreadySent"]
    assert report["outbox"]["sent"]["recipients"] == staged
    assert report["left_out"]["already_sent"] == kinds["AlreadySent"]

    # not_sent.csv: every quarantined and left-out row, with its reason.
    wanted = []
    for row, fate in fates:
        if isinstance(fate, Quarantined):
            wanted.append((user_key(row[0]), "quarantined", reason_of(row, fate)))
        elif isinstance(fate, AlreadySent):
            reason = f"not staged: run {fate.run_id} of this campaign already sent to this address"
            wanted.append((user_key(row[0]), "already_sent", reason))
    assert listed == sorted(wanted)
    assert report["not_sent_rows"] == len(wanted)

    # The suppression rows nobody could read, listed.
    unreadable = played_run(played).staging.audience_dir / "suppressions_unreadable.csv"
    with unreadable.open(newline="", encoding="utf-8") as fh:
        rows = [(r["row"], r["reason"], r["value_masked"]) for r in csv.DictReader(fh)]
    assert rows == list(expect.unreadable)

    # Each delivered row's mailbox got exactly one personalization; the others none at all.
    received = Counter(address_key(a) for a in accepted_recipients(played.records))
    delivered = Counter(
        address_key(f.address or row[1]) for row, f in fates if isinstance(f, Delivered)
    )
    assert received == delivered
    bodies = json.dumps(played.requests, ensure_ascii=False).lower()
    keys = set(delivered)
    for row, fate in fates:
        if isinstance(fate, Quarantined | Suppressed | AlreadySent):
            for needle in spellings(row[1]):
                if address_key(needle) not in keys:
                    assert needle.lower() not in bodies, (row, needle)


def check_unchanged(project: Project, played: Played, seen: dict[str, Any]) -> None:
    failed = f"{played.stage}: {type(played.error).__name__}: {played.error}"
    assert played.error is None, failed
    assert played.received == 0, f"{played.received} request(s) reached the dev server"
    assert seen["after"] == seen["before"], "the staging area or the outbox changed"


def played_run(played: Played) -> Run:
    assert played.run is not None
    return played.run


def spellings(value: object) -> set[str]:
    """Every way an address of ``value`` may be written down: as the source holds it, trimmed,
    normalised, read, and the key of each address it shows."""
    if not isinstance(value, str):
        return set()
    found = {value, value.strip(), readable(value).strip()}
    found |= {s for s in (normalise(value), address_key(value)) if s}
    found |= set(addresses_shown(value))
    return {s for s in found if "@" in s and len(s) >= 6}


def forbidden(project: Project) -> dict[str, str]:
    """What no log line and no error may hold, by what it is: every audience and suppression
    address in every spelling (less the campaign's public ones), every user's unsubscribe token,
    the signing secret, the API key and the case's own secrets."""
    try:
        spec = load_campaign_file(project.spec_path)
        public: frozenset[str] = spec.public_addresses
    except Exception:  # the case broke the spec: the example's public addresses
        public = load_campaign_file(REPO / "include/campaigns/winter_update.yaml").public_addresses
    needles: dict[str, str] = {}
    values: list[object] = [row[1] for row in project.users]
    values += [row[2] for row in project.users if len(row) > 2]
    values += [row[0] for row in project.suppressions]
    for value in values:
        for spelling in spellings(value):
            if address_key(spelling) not in public and spelling.lower() not in public:
                needles[spelling.lower()] = "an audience address"
    for row in project.users:
        if isinstance(row[0], str | int):
            token = unsubscribe_token(SECRET, CAMPAIGN, str(row[0]))
            needles[token.lower()] = "an unsubscribe token"
    needles[SECRET.decode().lower()] = "the unsubscribe signing secret"
    needles[API_KEY.lower()] = "the API key"
    for value in project.secrets:
        needles[value.lower()] = "a secret from the spec"
    return needles


def texts_of(records: Iterable[logging.LogRecord]) -> Iterator[tuple[str, str]]:
    formatter = logging.Formatter()
    for record in records:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + formatter.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        yield f"log record {record.name}:{record.levelname}", text


def leaks(
    project: Project, records: Iterable[logging.LogRecord], error: BaseException | None
) -> list[str]:
    """Each place (a log record, the error and its causes as a task log shows them) that holds
    something of ``forbidden``, and what."""
    needles = forbidden(project)
    places = list(texts_of(records))
    if error is not None:
        places.append(("the error", "".join(traceback.format_exception(error))))
    found = []
    for where, text in places:
        low = text.lower()
        for needle, what in needles.items():
            if needle in low:
                found.append(f"{where} shows {what}: {text[:300]!r}")
    return found
