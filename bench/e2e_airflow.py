"""`make bench-e2e`: the whole campaign DAG through a real Airflow, trigger to report.

    python bench/e2e_airflow.py [--users N [N ...]] [--db sqlite postgres] [--shards 2] [--keep]

For each size and database it generates the users, starts the SendGrid-compatible dev server and
a project-local Airflow (api-server, scheduler, dag-processor; LocalExecutor) in
``var/bench/e2e/<db>/<users>/``, triggers the rate-free copy of the example campaign through
REST as ``analyst``, approves it through REST as ``approver`` as soon as the gate waits, and
follows the run to ``reconcile``. ``sqlite`` keeps Airflow's metadata, the users and the outbox
in SQLite files; ``postgres`` puts all three in fresh databases on the local PostgreSQL (dropped
afterwards).

Each task's time is split into queue, start-up, work and finish from Airflow's task instance
dates and the stage function's own start and end, which ``bench/airflow_hook/sitecustomize.py``
records inside the task process together with its peak RSS. The entry goes to
``bench/results.json`` under ``e2e`` and BENCHMARKS.md is regenerated.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import secrets
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from mailroom import pipeline
from services import (
    API_KEY,
    PG_HOST,
    PG_PORT,
    PG_USER,
    DevServer,
    bench_include,
    copy_users_to_postgres,
    fresh_database,
    pg_url,
    postgres_available,
)

REPO = Path(__file__).resolve().parents[1]
HOOK_DIR = Path(__file__).resolve().parent / "airflow_hook"
DAG_ID = "mailroom_campaign"
CAMPAIGN = "winter_update"
FINISHED = {"success", "failed"}
# The hooked functions: every function ``mailroom.pipeline`` exports, named like its task.
TASKS = frozenset(name for name in pipeline.__all__ if inspect.isfunction(getattr(pipeline, name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[100_000])
    parser.add_argument("--db", nargs="+", choices=("sqlite", "postgres"), default=["sqlite"])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the run folder and outbox")
    args = parser.parse_args()
    for users in args.users:
        for db in args.db:
            bench(users, db, shards=args.shards, keep=args.keep)
    return 0


def bench(users: int, db: str, *, shards: int = 2, keep: bool = False) -> dict[str, Any]:
    from mailroom.audience.sample import generate
    from mailroom.cli.approvals import APPROVE, Approvals
    from mailroom.cli.local_airflow import LocalAirflow, free_port
    from run import load_results, machine, save_results

    if db == "postgres" and (why := postgres_available()):
        raise SystemExit(f"e2e on PostgreSQL: {why}")
    work = (REPO / "var" / "bench" / "e2e" / db / str(users)).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()
    host = machine()
    say(f"{db}, {users:,} users: generating the audience")
    audience = generate(work / "users.sqlite", users=users)
    include = bench_include(REPO, work / "include")
    staging = work / "staging"
    timings = work / "stage_timings.jsonl"

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(DevServer(work / "sendgrid-dev"))
        connections: dict[str, dict[str, Any]] = {
            "mailroom_users": {"conn_type": "sqlite", "host": str(audience.path)},
            "mailroom_sendgrid": {
                "conn_type": "http",
                "host": server.url,
                "password": API_KEY,
                "extra": json.dumps({"timeout": 60}),
            },
        }
        database_url = None
        if db == "postgres":
            metadata = stack.enter_context(fresh_database("mailroom_bench_airflow"))
            outbox = stack.enter_context(fresh_database("mailroom_bench_outbox"))
            users_db = stack.enter_context(fresh_database("mailroom_bench_users"))
            copy_users_to_postgres(audience.path, users_db)
            database_url = pg_url(metadata)
            for conn_id, name in (("mailroom_users", users_db), ("mailroom_outbox", outbox)):
                connections[conn_id] = {
                    "conn_type": "postgres",
                    "host": PG_HOST,
                    "port": PG_PORT,
                    "login": PG_USER,
                    "schema": name,
                }
        airflow = LocalAirflow(
            REPO,
            work / "airflow",
            port=free_port(),
            database_url=database_url,
            extra_env={
                "MAILROOM_INCLUDE_DIR": str(include),
                "MAILROOM_STAGING_ROOT": str(staging),
                "MAILROOM_BENCH_TIMINGS": str(timings),
                "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HOOK_DIR)]),
            },
        )
        stack.callback(airflow.stop)
        say("preparing and starting Airflow")
        t_up = time.perf_counter()
        airflow.migrate()
        airflow.import_connections(connections)
        airflow.import_variables(
            {
                "mailroom_staging_root": str(staging),
                "mailroom_unsubscribe_secret": secrets.token_urlsafe(32),
            }
        )
        airflow.start()
        airflow.serve_dag(DAG_ID, timeout=240)
        analyst, approver = airflow.api("analyst"), airflow.api("approver")
        ready = time.perf_counter() - t_up
        say(f"Airflow ready in {ready:.0f} s; triggering")

        timeout = 600 + users / 1000
        trigger_at = time.time()
        run_id = analyst.trigger(DAG_ID, {"campaign": CAMPAIGN, "dry_run": False, "shards": shards})
        wait_states(analyst, run_id, lambda s: s.get("approve") == "awaiting_input", timeout)
        say(f"approval gate waiting after {time.time() - trigger_at:.0f} s; approving")
        Approvals(approver).answer(run_id, APPROVE)
        wait_states(analyst, run_id, lambda s: False, timeout, finished_ok=True)
        dag_run = analyst.dag_run(DAG_ID, run_id)
        tis = analyst.task_instances(DAG_ID, run_id)
        stats = server.stats()
        reports = sorted((staging / CAMPAIGN).glob("*/report.json"))
        report = json.loads(reports[-1].read_text()) if reports else {}

    records = [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
    entry = {
        "users": users,
        "database": db,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {**host, "loadavg": os.getloadavg()},
        "shards": shards,
        "airflow_ready_seconds": round(ready, 1),
        "run_id": run_id,
        "state": dag_run["state"],
        "outcome": f"{dag_run['state']}, report {report.get('status')}, "
        f"{stats.get('accepted_recipients', 0):,} recipients accepted by the dev server",
        "report_equation": report.get("equation"),
        "dev_server": stats,
        **breakdown(trigger_at, tis, records),
    }
    results = load_results()
    results["e2e"].setdefault(db, {})[str(users)] = entry
    save_results(results)
    b = entry["breakdown"]
    say(
        f"{db}, {users:,} users: {dag_run['state']} in {b['wall_seconds']:.1f} s "
        f"(work {b['work_seconds']:.1f}, approval {b['approval_seconds']:.1f}, "
        f"orchestration {b['orchestration_seconds']:.1f})"
    )
    if not keep:
        shutil.rmtree(staging, ignore_errors=True)
    if dag_run["state"] != "success":
        raise SystemExit(f"run {run_id} ended {dag_run['state']}; see {work / 'airflow' / 'logs'}")
    return entry


def wait_states(
    api: Any, run_id: str, done: Any, timeout: float, *, finished_ok: bool = False
) -> dict[str, str]:
    """Poll the run's task states until ``done(states)``, or until the run finishes (an error
    unless ``finished_ok``)."""
    deadline = time.monotonic() + timeout
    while True:
        states = {
            ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else ""): (
                ti.get("state") or "none"
            )
            for ti in api.task_instances(DAG_ID, run_id)
        }
        if done(states):
            return states
        run_state = api.dag_run(DAG_ID, run_id)["state"]
        if run_state in FINISHED:
            if finished_ok:
                return states
            raise SystemExit(f"run {run_id} ended {run_state} early: {states}")
        if time.monotonic() > deadline:
            raise SystemExit(f"run {run_id} did not progress within {timeout:.0f} s: {states}")
        time.sleep(0.5)


# --- the breakdown --------------------------------------------------------------------------------
def breakdown(
    trigger_at: float, tis: list[dict[str, Any]], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per task: queue, start-up, work, finish; per run: work, approval, orchestration."""
    stage_of: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in sorted(records, key=lambda r: r["start"]):
        task = rec["stage"] if rec["stage"] in TASKS else None
        if task is None:
            continue
        key = (task, rec["shard"] if rec.get("shard") is not None else -1)
        stage_of[key] = rec  # the last try wins
    tasks = []
    for ti in sorted(tis, key=lambda t: (_epoch(t.get("start_date")) or 0, t["task_id"])):
        map_index = ti.get("map_index", -1)
        start, end = _epoch(ti.get("start_date")), _epoch(ti.get("end_date"))
        queued = _epoch(ti.get("queued_when"))
        rec = stage_of.get((ti["task_id"], map_index))
        task: dict[str, Any] = {
            "label": ti["task_id"] + (f" [{map_index}]" if map_index >= 0 else ""),
            "state": ti.get("state"),
            "queued_at": _minus(queued, trigger_at),
            # A deferred task (the approval gate) is queued again when it resumes.
            "queue_seconds": _minus(start, queued) if _ordered(queued, start) else None,
            "task_seconds": _minus(end, start),
            "start": start,
            "end": end,
        }
        if rec is not None:
            task.update(
                startup_seconds=_minus(rec["start"], start),
                work_seconds=rec["end"] - rec["start"],
                finish_seconds=_minus(end, rec["end"]),
                peak_rss_mb=rec.get("peak_rss_mb"),
                work=(rec["start"], rec["end"]),
            )
        tasks.append(task)
    ends = [t["end"] for t in tasks if t["label"] == "reconcile" and t["end"]]
    finished = ends[0] if ends else max((t["end"] or 0) for t in tasks)
    work = union([t["work"] for t in tasks if "work" in t], trigger_at, finished)
    approval_spans = [
        (t["start"], t["end"]) for t in tasks if t["label"] == "approve" and t["start"] and t["end"]
    ]
    approval = union(approval_spans, trigger_at, finished)
    wall = finished - trigger_at
    totals = {
        key: round(sum(t.get(key) or 0 for t in tasks if t["label"] != "approve"), 3)
        for key in ("queue_seconds", "startup_seconds", "work_seconds", "finish_seconds")
    }
    for t in tasks:
        t.pop("work", None)
        for key in ("start", "end"):
            t.pop(key, None)
    return {
        "breakdown": {
            "wall_seconds": round(wall, 3),
            "work_seconds": round(work, 3),
            "approval_seconds": round(approval, 3),
            "orchestration_seconds": round(max(wall - work - approval, 0.0), 3),
        },
        "totals": totals,
        "tasks": tasks,
    }


def union(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Total length covered by ``spans`` inside ``[lo, hi]`` (overlaps counted once)."""
    total, reach = 0.0, lo
    for start, end in sorted((max(a, lo), min(b, hi)) for a, b in spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _epoch(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _ordered(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a <= b


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def say(message: str) -> None:
    print(f"[bench e2e] {message}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
