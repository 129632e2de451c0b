"""The campaign console's run view at N recipients: how long each answer takes, in process.

    python bench/console_view.py [--users N [N ...]] [--db sqlite postgres postgres-vacuumed]
    make bench-console   (bench/run.py --stage console [--users N [N ...]] [--no-postgres])

For each size and database it stages two synthetic runs of N recipients in N/1,000 requests over
five locales with ``Outbox.stage`` and puts each mid-send with the outbox's own calls:

- ``sendgrid``: whole requests (``claim`` + ``finish``): about 40 % of the requests ``sent``, a
  few ``failed`` and ``unknown`` among them, one ``sending`` per shard, the rest ``staged``;
- ``smtp``: one message per recipient (``begin_recipients`` / ``finish_recipients``): 30 % of
  the requests sent message by message (so 30 % of the recipients have a state of their own; a
  few requests ``failed`` with refused recipients, one ``unknown`` with lost answers), one
  request per shard in the middle of its messages, the rest ``staged``.

Databases: a SQLite file; a fresh database on the local PostgreSQL (dropped afterwards) as the
updates left it (``ANALYZE``d, as autovacuum's analyze soon does, with the dead rows of the
updates still there); and the same after ``VACUUM ANALYZE`` (as autovacuum leaves it).

Each run has a folder as the DAG leaves it by then (``run.json`` with 4 shards, ``frozen.json``,
the gate's result, the approval, the approval summary and previews, a quarantine file, a halt
and a resume in its audit trail and the outbox's history). Then, in rounds (one of each per
round, so each is read against the baseline measured alongside it):

- ``Outbox.counts`` (the baseline: what reconcile and the CLI already ask of the outbox);
- ``campaign_runs.run_progress``;
- ``GET /api/dags/{dag}/runs/{run}/progress`` (the JSON the page polls every 2 s) and
  ``GET /dags/{dag}/runs/{run}`` (the HTML page), the whole HTTP answer through the console's
  real FastAPI app and ``fastapi.testclient.TestClient``. Only Airflow's auth is replaced:
  the ``requires_access_dag`` dependencies and ``get_user`` through ``app.dependency_overrides``,
  and ``_allowed`` (Airflow's auth manager) returns True; ``settings.staging_root`` and
  ``settings.outbox_url`` point at the bench's folder and outbox.

Where an answer takes longer than ``TARGET_MS`` it profiles the route, called directly:
time per outbox call, per SQL statement and in the page's render, and cProfile's top entries.
This file writes its figures to a file of its own (``--json``); ``make bench-console`` (``run.py
--stage console``) keeps them under ``console`` in ``bench/results.json`` and writes
``BENCHMARKS.md`` again.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import re
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 200.0
CAMPAIGN = "winter_update"
RUN_ID = "manual__2026-12-06T10:00:00+00:00"
RUN_KEY = f"{CAMPAIGN}/{RUN_ID}"
LOCALES = ("de", "en", "es", "fr", "nl")
PER_REQUEST = 1_000
SHARDS = 4
VARIANTS = ("sendgrid", "smtp")
# A SQLite file; a fresh PostgreSQL database as the updates left it (analyzed, not vacuumed);
# the same after VACUUM ANALYZE (as autovacuum leaves it, until the next updates).
DBS = ("sqlite", "postgres", "postgres-vacuumed")
ANSWERS = ("counts", "run_progress", "progress_api", "run_page")
LABELS = {
    "counts": "Outbox.counts (baseline)",
    "run_progress": "campaign_runs.run_progress",
    "progress_api": "GET …/progress (JSON)",
    "run_page": "GET run page (HTML)",
}


# --- the synthetic run ---------------------------------------------------------------------------
def address(n: int) -> str:
    return f"user{n:07d}@example.org"


def staged_batches(users: int) -> list[Any]:
    from mailroom.delivery.outbox import StagedBatch

    count = math.ceil(users / PER_REQUEST)
    return [
        StagedBatch(
            f"{LOCALES[i % len(LOCALES)]}-{i:05d}",
            i,
            LOCALES[i % len(LOCALES)],
            f"{i:064x}",
            min(PER_REQUEST, users - i * PER_REQUEST),
        )
        for i in range(count)
    ]


def members(batches: list[Any]) -> Iterator[tuple[str, str, str, str]]:
    for b in batches:
        first = b.batch_index * PER_REQUEST
        for n in range(first, first + b.recipients):
            yield address(n), f"u{n}", b.batch_id, f"{n:064x}"


def batch_addresses(b: Any) -> list[str]:
    first = b.batch_index * PER_REQUEST
    return [address(n) for n in range(first, first + b.recipients)]


def mid_send_sendgrid(outbox: Any, batches: list[Any]) -> None:
    """Whole requests: the first 40 % done (1 in 100 failed, 1 in 100 unknown), the next one per
    shard ``sending``, the rest ``staged`` (each shard takes its requests in index order)."""
    from mailroom.delivery.outbox import BatchState

    done = max(1, round(0.4 * len(batches)))
    for b in batches[:done]:
        assert outbox.claim(RUN_KEY, b.batch_id)
        if b.batch_index % 100 == 17:
            outbox.finish(RUN_KEY, b.batch_id, BatchState.FAILED, error="HTTP 400: bad request")
        elif b.batch_index % 100 == 53:
            outbox.finish(RUN_KEY, b.batch_id, BatchState.UNKNOWN, error="read timed out")
        else:
            outbox.finish(RUN_KEY, b.batch_id, BatchState.SENT, message_id=f"sg-{b.batch_index}")
    for b in batches[done : done + SHARDS]:
        assert outbox.claim(RUN_KEY, b.batch_id)


def mid_send_smtp(outbox: Any, batches: list[Any]) -> None:
    """One message per recipient: the first 30 % of the requests sent message by message (1 in
    50 with two refused recipients: ``failed``; one with lost answers: ``unknown``), the next
    one per shard in the middle of its messages, the rest ``staged``."""
    from mailroom.delivery.outbox import BatchState, RecipientOutcome

    done = max(1, round(0.3 * len(batches)))
    for b in batches[:done]:
        people = batch_addresses(b)
        assert outbox.claim(RUN_KEY, b.batch_id)
        outbox.begin_recipients(RUN_KEY, b.batch_id, people)
        outcomes = [RecipientOutcome(e, BatchState.SENT, message_id=f"<{e}>") for e in people]
        final, error = BatchState.SENT, None
        if b.batch_index % 50 == 7:
            for k in (3, 700):
                outcomes[k] = RecipientOutcome(people[k], BatchState.FAILED, error="550 no such")
            final, error = BatchState.FAILED, "2 recipient(s) refused"
        elif b.batch_index == done // 2:
            for k in range(900, len(people)):
                outcomes[k] = RecipientOutcome(people[k], BatchState.UNKNOWN, error="lost")
            final, error = BatchState.UNKNOWN, "connection lost after DATA"
        outbox.finish_recipients(RUN_KEY, b.batch_id, outcomes)
        if final == BatchState.SENT:
            outbox.finish(RUN_KEY, b.batch_id, final, message_id="smtp")
        else:
            outbox.finish(RUN_KEY, b.batch_id, final, error=error)
    for b in batches[done : done + SHARDS]:
        people = batch_addresses(b)
        assert outbox.claim(RUN_KEY, b.batch_id)
        half = len(people) // 2
        outbox.begin_recipients(RUN_KEY, b.batch_id, people[: half + 100])
        outbox.finish_recipients(
            RUN_KEY,
            b.batch_id,
            [RecipientOutcome(e, BatchState.SENT, message_id=f"<{e}>") for e in people[:half]],
        )


def run_folder(root: Path, users: int, batches: int, variant: str) -> Path:
    """The run's folder as the DAG leaves it mid-send (what the run page reads)."""
    from mailroom.staging import run_folder_name, write_json

    folder = root / CAMPAIGN / run_folder_name(RUN_ID)
    write_json(
        folder / "run.json",
        {
            "campaign": CAMPAIGN,
            "run_id": RUN_ID,
            "folder": folder.name,
            "triggered_by": "analyst",
            "started_at": (datetime.now(UTC) - timedelta(minutes=3)).isoformat(),
            "shards": SHARDS,
        },
    )
    write_json(folder / "frozen.json", {"run_id": RUN_ID, "manifest_sha256": "f" * 64})
    write_json(folder / "gate" / "result.json", {"success": True, "personalizations": users})
    write_json(
        folder / "approval.json",
        {
            "decision": "approved",
            "by": "approver",
            "at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        },
    )
    quarantined = max(1, users // 250)
    write_json(
        folder / "preview" / "summary.json",
        {
            "campaign": CAMPAIGN,
            "description": "Winter update",
            "run_id": RUN_ID,
            "triggered_by": "analyst",
            "dry_run": False,
            "transport": f"{variant} (mailroom_{variant})",
            "sender": "Mailroom <news@example.org>",
            "audience": {
                "extracted": users + users // 20,
                "suppressed": users // 40,
                "suppressed_by_reason": {"unsubscribed": users // 40},
                "duplicates": users // 50,
                "locale_defaulted": users // 100,
                "kept": users + quarantined,
                "quarantined": quarantined,
                "quarantined_by_reason": {"invalid_email": quarantined},
                "valid": users,
                "left_out": {"sent_by_earlier_run": 0, "in_doubt": 0},
                "to_send": users,
            },
            "per_locale": {
                loc: {"recipients": users // 5, "batches": batches // 5, "subject": f"News {loc}"}
                for loc in LOCALES
            },
            "batches": batches,
            "shards": SHARDS,
            "quality": {"success": True, "personalizations": users, "checks": 14},
            "previews": {
                loc: {"to": "u***@example.org", "subject": f"Winter news ({loc})"}
                for loc in LOCALES
            },
        },
    )
    body = "<p>" + "Winter is here, and so is our news. " * 40 + "</p>\n"
    for loc in LOCALES:
        html = f"<!doctype html><html lang='{loc}'><body>{body * 20}</body></html>"
        (folder / "preview" / f"{loc}.html").write_text(html, "utf-8")
        (folder / "preview" / f"{loc}.txt").write_text(
            ("Winter is here, and so is our news. " * 8 + "\n") * 8, "utf-8"
        )
    for check in ("audience", "gate"):
        docs = folder / check / "data_docs" / "index.html"
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text("<html><body>Data Docs</body></html>", "utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "user_id": [f"q{n}" for n in range(quarantined)],
                "email": [f"bad{n}@@example" for n in range(quarantined)],
                "reason": ["invalid_email"] * quarantined,
                "locale": [LOCALES[n % len(LOCALES)] for n in range(quarantined)],
            }
        ),
        folder / "audience" / "quarantine.parquet",
    )
    return folder


@dataclass
class Case:
    db: str
    variant: str
    users: int
    url: str
    staging_root: Path
    setup_seconds: float
    own_state_recipients: int


@contextlib.contextmanager
def case(db: str, variant: str, users: int, work: Path) -> Iterator[Case]:
    """One mid-send run in a fresh outbox (SQLite file, or a PostgreSQL database dropped on the
    way out) with its run folder."""
    from mailroom import operator_actions
    from mailroom.delivery.outbox import Outbox
    from services import fresh_database, pg_url

    base = work / f"{users}-{db}-{variant}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if db == "sqlite":
            url = f"sqlite:///{base / 'outbox.sqlite'}"
        else:
            url = pg_url(stack.enter_context(fresh_database("mailroom_console_bench")))
        t0 = time.perf_counter()
        batches = staged_batches(users)
        outbox = Outbox(url)
        try:
            outbox.stage(RUN_KEY, "f" * 64, batches, members(batches))
            folder = run_folder(base / "staging", users, len(batches), variant)
            if variant == "sendgrid":
                mid_send_sendgrid(outbox, batches)
            else:
                mid_send_smtp(outbox, batches)
            # An operator halted the run for a while and resumed it: the page lists both.
            for act in (operator_actions.halt, operator_actions.resume):
                act(outbox, RUN_KEY, by="operator", reason="checking a complaint", run_root=folder)
            if db != "sqlite":
                # Statistics as autovacuum's analyze takes them after this many updates; the
                # dead rows the updates left are vacuumed only for "postgres-vacuumed".
                vacuum = "VACUUM ANALYZE" if db == "postgres-vacuumed" else "ANALYZE"
                with outbox.engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT"
                ) as conn:
                    conn.exec_driver_sql(f"{vacuum} mailroom_recipients, mailroom_batches")
            own = own_states(outbox)
        finally:
            outbox.dispose()
        made = time.perf_counter() - t0
        yield Case(db, variant, users, url, base / "staging", made, own)
    shutil.rmtree(base, ignore_errors=True)


def own_states(outbox: Any) -> int:
    import sqlalchemy as sa

    from mailroom.delivery.outbox import recipients

    with outbox.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(recipients)
                .where(recipients.c.run_key == RUN_KEY, recipients.c.state.is_not(None))
            ).scalar_one()
        )


# --- the console, in this process ----------------------------------------------------------------
class BenchUser:
    """Who the overridden ``get_user`` says is signed in."""

    def get_id(self) -> str:
        return "bench"

    def get_name(self) -> str:
        return "bench"


def _allow() -> None:
    return None


def console_app(c: Case) -> Any:
    """The console's app with only Airflow's auth replaced, reading this case's folder and
    outbox."""
    from airflow.api_fastapi.core_api.security import get_user

    from mailroom_airflow import settings
    from mailroom_airflow.console import app as console

    settings.staging_root = lambda: str(c.staging_root)
    settings.outbox_url = lambda: c.url
    console._allowed = lambda user, method: True
    for dep in (console.can_read, console.can_edit, console.can_read_runs):
        console.app.dependency_overrides[dep.dependency] = _allow
    console.app.dependency_overrides[get_user] = BenchUser
    return console


def release_outbox() -> None:
    """Close the console's shared outbox (the database is dropped next)."""
    from mailroom_airflow.console import app as console

    console.shared_outbox().dispose()
    console._outbox_at.cache_clear()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def measure(c: Case, *, repeat: int, min_repeat: int, budget: float) -> dict[str, Any]:
    """Each answer once a round, the four in turn, for ``repeat`` rounds (at least
    ``min_repeat``, then fewer once ``budget`` seconds have gone); ms per answer."""
    from fastapi.testclient import TestClient

    from mailroom import campaign_runs
    from mailroom_airflow.console import DAG_ID

    console = console_app(c)
    outbox = console.shared_outbox()
    run = campaign_runs.find_run(c.staging_root, RUN_ID)
    assert run is not None
    path = f"/dags/{DAG_ID}/runs/{quote(RUN_ID, safe='')}"
    api = f"/api/dags/{DAG_ID}/runs/{quote(RUN_ID, safe='')}/progress"
    calls: dict[str, Callable[[], Any]] = {}
    with TestClient(console.app) as client:

        def page() -> Any:
            answer = client.get(path)
            assert answer.status_code == 200, answer.text[:300]
            return answer

        def progress() -> Any:
            answer = client.get(api)
            assert answer.status_code == 200, answer.text[:300]
            return answer

        calls = {
            "counts": lambda: outbox.counts(RUN_KEY),
            "run_progress": lambda: campaign_runs.run_progress(run, outbox),
            "progress_api": progress,
            "run_page": page,
        }
        check = checked(c, {name: call() for name, call in calls.items()})  # also warms up
        times: dict[str, list[float]] = {name: [] for name in calls}
        started = time.perf_counter()
        for k in range(repeat):
            if k >= min_repeat and time.perf_counter() - started > budget:
                break
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(1000 * (time.perf_counter() - t0))
    base = statistics.median(times["counts"])
    answers = {
        name: {
            "median_ms": round(statistics.median(ms), 2),
            "p95_ms": round(percentile(ms, 95), 2),
            "min_ms": round(min(ms), 2),
            "rounds": len(ms),
            "median_vs_counts": round(statistics.median(ms) / base, 1) if base else None,
        }
        for name, ms in times.items()
    }
    return {"answers": answers, "check": check}


def checked(c: Case, first: dict[str, Any]) -> dict[str, Any]:
    """What the answers said, checked against the run as it was set up."""
    counts = first["counts"]
    total = sum(n["recipients"] for n in counts.values())
    progress = first["progress_api"].json()
    html = first["run_page"].text
    assert total == c.users, (total, c.users)
    assert progress["total"] == c.users, progress["total"]
    assert progress["state"] == "sending", progress["state"]
    assert progress["overall"]["recipients"] == first["run_progress"]["overall"]["recipients"]
    assert {s: n for s, n in progress["overall"]["recipients"].items() if s != "total"} == {
        s: n["recipients"] for s, n in counts.items()
    }
    assert f"{progress['sent']:,}" in html
    assert "The first 50 are shown." in html
    return {
        "recipients": progress["overall"]["recipients"],
        "requests": progress["overall"]["requests"],
        "own_state_recipients": c.own_state_recipients,
        "page_bytes": len(first["run_page"].content),
        "progress_bytes": len(first["progress_api"].content),
    }


# --- where the time goes -------------------------------------------------------------------------
class Parts:
    """Seconds per part of one answer, by wrapping calls in this benchmark process only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[Callable[[], None]] = []

    def add(self, part: str, seconds: float, *, call: bool = True) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds
        self.calls[part] = self.calls.get(part, 0) + int(call)

    def wrap(self, owner: Any, name: str, part: str, *, generator: bool = False) -> None:
        original = getattr(owner, name)
        parts = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                parts.add(part, time.perf_counter() - t0)

        def timed_generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
            # Time spent producing rows, the first (the query) included; the caller's own
            # time between rows is not counted. Closed early, as the page closes it.
            t0 = time.perf_counter()
            inner = original(*args, **kwargs)
            parts.add(part, 0.0)
            try:
                while True:
                    try:
                        row = next(inner)
                    except StopIteration:
                        return
                    parts.add(part, time.perf_counter() - t0, call=False)
                    yield row
                    t0 = time.perf_counter()
            finally:
                t1 = time.perf_counter()
                inner.close()
                parts.add(part, time.perf_counter() - t1, call=False)

        setattr(owner, name, timed_generator if generator else timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def statements(self, engine: Any) -> None:
        import sqlalchemy as sa

        started: dict[int, float] = {}

        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            started[id(cursor)] = time.perf_counter()

        def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            t0 = started.pop(id(cursor), None)
            if t0 is not None:
                self.add("SQL: " + _short_sql(statement), time.perf_counter() - t0)

        sa.event.listen(engine, "before_cursor_execute", before)
        sa.event.listen(engine, "after_cursor_execute", after)
        self._undo.append(lambda: sa.event.remove(engine, "before_cursor_execute", before))
        self._undo.append(lambda: sa.event.remove(engine, "after_cursor_execute", after))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _short_sql(statement: str) -> str:
    """A statement as one recognisable line: its select list, first table and the filters."""
    text = re.sub(r"\s+", " ", statement).strip()
    text = re.sub(r"\bmailroom_", "", text)
    return text if len(text) <= 150 else text[:147] + "..."


def profile(c: Case, *, reps: int) -> dict[str, Any]:
    """Each route called directly (the request thread is this one, so cProfile sees it): time
    per outbox call, SQL statement and render step (median over ``reps``), and cProfile's top
    functions by own time."""
    from starlette.requests import Request

    from mailroom import campaign_runs, operator_actions
    from mailroom.delivery.outbox import Outbox
    from mailroom_airflow.console import DAG_ID

    console = console_app(c)
    outbox = console.shared_outbox()
    request = Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [],
            "query_string": b"",
            "server": ("testserver", 80),
            "scheme": "http",
            "root_path": "",
        }
    )
    routes: dict[str, Callable[[], Any]] = {
        "progress_api": lambda: console.progress_api(DAG_ID, RUN_ID),
        "run_page": lambda: console.run_page(request, DAG_ID, RUN_ID, BenchUser()),
    }
    out: dict[str, Any] = {}
    for name, route in routes.items():
        route()  # warm
        runs: list[Parts] = []
        for _ in range(reps):
            parts = Parts()
            for method in (
                "counts",
                "batch_progress",
                "manifest_sha256",
                "actions",
                "halt_reason",
                "halt_requested",
                "last_change",
            ):
                parts.wrap(Outbox, method, f"Outbox.{method}")
            parts.wrap(Outbox, "not_sent", "Outbox.not_sent (first 50 rows)", generator=True)
            parts.wrap(console, "_page", "render (Jinja2 run.html)")
            parts.wrap(console, "_quarantined", "quarantine.parquet counts")
            parts.wrap(campaign_runs, "find_run", "find_run")
            parts.wrap(operator_actions, "audit_trail", "audit trail files")
            parts.statements(outbox.engine)
            t0 = time.perf_counter()
            try:
                route()
            finally:
                parts.add("total", time.perf_counter() - t0)
                parts.undo()
            runs.append(parts)
        names = sorted({p for r in runs for p in r.seconds})
        table = {
            part: {
                "ms": round(1000 * statistics.median(r.seconds.get(part, 0.0) for r in runs), 2),
                "calls": runs[0].calls.get(part, 0),
            }
            for part in names
        }
        profiler = cProfile.Profile()
        profiler.enable()
        route()
        profiler.disable()
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.sort_stats("tottime").print_stats(12)
        out[name] = {
            "parts": dict(sorted(table.items(), key=lambda kv: -kv[1]["ms"])),
            "cprofile_tottime": _profile_lines(buffer.getvalue()),
        }
    return out


def _profile_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [
        re.sub(r"/\S*/(site-packages|src)/", "", line.rstrip())
        for line in lines[start:]
        if line.strip()
    ]


# --- the driver ----------------------------------------------------------------------------------
def bench(
    users: list[int],
    *,
    dbs: list[str],
    variants: list[str],
    work: Path,
    repeat: int,
    min_repeat: int,
    budget: float,
    profile_reps: int,
    out: Path | None,
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AIRFLOW_HOME", str(work / "airflow_home"))
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from services import postgres_available

    code = sources()
    results: list[dict[str, Any]] = []
    for n in users:
        for db in dbs:
            if db != "sqlite" and (why := postgres_available()):
                print(f"{n:>9,} {db} skipped: {why}", flush=True)
                continue
            for variant in variants:
                with case(db, variant, n, work) as c:
                    print(
                        f"{n:>9,} {db:<17} {variant:<8} set up in {c.setup_seconds:.1f} s "
                        f"({c.own_state_recipients:,} recipients with a state of their own)",
                        flush=True,
                    )
                    entry: dict[str, Any] = {
                        "users": n,
                        "db": db,
                        "variant": variant,
                        "setup_seconds": round(c.setup_seconds, 1),
                        **measure(c, repeat=repeat, min_repeat=min_repeat, budget=budget),
                    }
                    slow = [
                        a
                        for a, f in entry["answers"].items()
                        if max(f["median_ms"], f["p95_ms"]) > TARGET_MS
                    ]
                    if slow or profile_reps < 0:
                        entry["profile"] = profile(c, reps=max(1, abs(profile_reps)))
                    results.append(entry)
                    print_entry(entry)
                    release_outbox()
    report = {
        "machine": machine(),
        "target_ms": TARGET_MS,
        "sources": code,
        "results": results,
    }
    if sources() != code:
        report["sources_changed_during_run"] = sources()
        print("WARNING: the console's sources changed during the run: the figures are mixed")
    print_table(report)
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return report


# What the figures depend on: a change to any of these during a run makes its figures mixed.
SOURCES = (
    "src/mailroom/campaign_runs.py",
    "src/mailroom/delivery/outbox.py",
    "src/mailroom_airflow/console/app.py",
    "src/mailroom_airflow/console/templates/run.html",
)


def sources() -> dict[str, str]:
    from services import source_digests

    return source_digests(REPO, SOURCES)


def machine() -> dict[str, Any]:
    from services import machine_facts

    return machine_facts()


def print_entry(entry: dict[str, Any]) -> None:
    for name in ANSWERS:
        f = entry["answers"][name]
        print(
            f"    {LABELS[name]:<28} median {f['median_ms']:8.1f} ms  p95 {f['p95_ms']:8.1f} ms"
            f"  ×{f['median_vs_counts']:<6} ({f['rounds']} rounds)",
            flush=True,
        )
    for route, prof in (entry.get("profile") or {}).items():
        print(f"    where {route}'s time goes (median of direct calls):")
        for part, v in list(prof["parts"].items())[:10]:
            print(f"      {v['ms']:9.1f} ms  ×{v['calls']:<3} {part}")
        print("      cProfile, by own time:")
        for line in prof["cprofile_tottime"][:9]:
            print(f"        {line}")


def print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"Campaign console run view (target < {TARGET_MS:.0f} ms per answer; "
        f"{report['machine']['nproc']} cores; median / p95 ms, × = median ÷ Outbox.counts median)"
    )
    head = "| users | db | shape | " + " | ".join(LABELS[a] for a in ANSWERS) + " |"
    print(head)
    print("|" + "---|" * (3 + len(ANSWERS)))
    for e in report["results"]:
        cells = []
        for a in ANSWERS:
            f = e["answers"][a]
            ratio = "" if a == "counts" else f" (×{f['median_vs_counts']})"
            cells.append(f"{f['median_ms']:.1f} / {f['p95_ms']:.1f}{ratio}")
        print(f"| {e['users']:,} | {e['db']} | {e['variant']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--db", nargs="+", default=list(DBS), choices=DBS)
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeat", type=int, default=40, help="rounds (each answer once)")
    parser.add_argument("--min-repeat", type=int, default=10)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of rounds per run")
    parser.add_argument(
        "--profile-reps",
        type=int,
        default=3,
        help="direct calls per route profiled when an answer is over the target "
        "(negative: profile every run)",
    )
    parser.add_argument("--work", type=Path, default=REPO / "var" / "bench" / "console")
    parser.add_argument(
        "--json", type=Path, default=None, help="the figures (default: <work>/console.json)"
    )
    args = parser.parse_args(argv)
    bench(
        args.users,
        dbs=args.db,
        variants=args.variant,
        work=args.work.resolve(),
        repeat=args.repeat,
        min_repeat=args.min_repeat,
        budget=args.budget,
        profile_reps=args.profile_reps,
        out=args.json or args.work.resolve() / "console.json",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
