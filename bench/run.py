"""`make bench`: every stage on a generated audience, each read against a same-run baseline.

    python bench/run.py [--users N [N ...]] [--e2e N [N ...]] [--e2e-db sqlite postgres]

For each audience size (default 100,000) it generates the sample users database
(``mailroom.audience.sample.generate``), prepares one run of the example campaign in
``var/bench/<users>/`` (its spec copy without the campaign-wide rate limit) and runs each stage
(extract from SQLite and from PostgreSQL, validate, render, build envelopes, freeze, the
data-quality gate, send to the SendGrid-compatible dev server) and each baseline (``baselines.py``,
``bare_gate.py``, ``legacy_send.py``) in a fresh Python process of its own, one after the other.
The send is measured over two networks, each against a bare kept-alive client with the same
window and against today's path (``legacy_send.py``): loopback HTTP, and HTTPS with a 100 ms
round trip (the dev server's ``--tls --latency-ms 100``); every send starts from a copy of the
outbox as the guard's pass left it. Each child imports
what its stage needs first, then times only the stage call and reports its own peak RSS
(``VmHWM``) and CPU time, so every figure is that stage's alone.

``--e2e`` then runs the whole DAG through a real Airflow at those sizes (``e2e_airflow.py``).

``--stage console [--users N ...] [--no-postgres]`` measures the campaign console's run view
instead (``console_view.py``: ms per answer against ``Outbox.counts``, printed as a table); it is
not part of the full run: it keeps its figures under ``console`` in ``results.json`` and writes
``BENCHMARKS.md`` again with them (``make bench-console``).

``--stage feedback [--users N] [--no-postgres]`` measures ``mailroom feedback serve`` taking
SendGrid's Event Webhook instead (``feedback_ingest.py``: events per second into an outbox of a
run of N recipients, default 200,000, read against the parse and the in-process record); it too
keeps its figures under its own key, ``feedback`` (``make bench-feedback``).

The figures go to ``bench/results.json`` (raw; the latest run of each size and kind kept) and
``BENCHMARKS.md`` (``report.py``: method, machine, tables, ratios, targets). These machines are
shared and noisy: read the ratios measured within one run, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_PARTS_LOCK = threading.Lock()
RESULTS = REPO / "bench" / "results.json"
REPORT = REPO / "BENCHMARKS.md"
CAMPAIGN = "winter_update"
RUN_ID = "bench"
PG_RUN_ID = "bench_pg"
SECRET = b"bench-secret"
NAIVE_SAMPLE = 2000
STAGES = (
    "extract",
    "extract_sqlalchemy",
    "extract_pg",
    "validate",
    "render",
    "build",
    "freeze",
    "encode_baseline",
    "gate",
    "gate_baseline",
    "guard",
    "send",
    "post_baseline",
    "legacy_send",
    "send_tls",
    "post_baseline_tls",
    "legacy_send_tls",
    "send_tls_8",
    "post_baseline_tls_8",
    "smtp_send",
    "smtp_bare",
    "smtp_send_2",
    "smtp_bare_aiosmtpd",
    "naive_baseline",
)
# Not a stage of the full run (nor of --skip): the campaign console's run view, measured on a
# synthetic mid-send run of its own by ``console_view.py`` when asked for with --stage.
CONSOLE_STAGE = "console"
# Nor this: SendGrid's Event Webhook through the feedback service (``feedback_ingest.py``).
FEEDBACK_STAGE = "feedback"
# Above this many users the sends (through the dev server and the SMTP sink: the whole run,
# a few at a time) are measured end to end through Airflow rather than in process, and the
# bare gate (which holds every body and recipient at once: 2.8 GB at 1M) is not run.
SENDS_IN_PROCESS_UP_TO = 100_000
BARE_GATE_UP_TO = 1_000_000
# Stages that talk to the dev server: each gets a fresh one, started the same way.
SERVED = {
    "send",
    "post_baseline",
    "legacy_send",
    "send_tls",
    "post_baseline_tls",
    "legacy_send_tls",
    "send_tls_8",
    "post_baseline_tls_8",
    "naive_baseline",
}
# The network between a stage and its dev server: HTTPS with a round trip of this many ms.
LATENCY_MS = 100.0
OVER_TLS = {"send_tls", "post_baseline_tls", "legacy_send_tls", "send_tls_8", "post_baseline_tls_8"}
# Stages that send a run and mark it in the outbox: each starts from the guard pass's outbox.
SENDS = {"send", "legacy_send", "send_tls", "legacy_send_tls", "send_tls_8"}
# Stages run with another window than the campaign's (max_in_flight): what a link with a long
# round trip gains from a wider one.
WINDOW_OF = {"send_tls_8": 8, "post_baseline_tls_8": 8}
# Every stage that sends the whole run, in the report's order.
SEND_FAMILY = (
    "send",
    "post_baseline",
    "legacy_send",
    "send_tls",
    "post_baseline_tls",
    "legacy_send_tls",
    "send_tls_8",
    "post_baseline_tls_8",
)
# A send and its bare client run alternately this many times each; the fastest of each counts
# (loopback most: each run is short and the server is bound by the CPU other work takes).
ROUNDS = {"send": 5, "send_tls": 3, "send_tls_8": 2, "smtp_send": 2}
ROUND_PARTNER = {
    "send": "post_baseline",
    "send_tls": "post_baseline_tls",
    "send_tls_8": "post_baseline_tls_8",
    "smtp_send": "smtp_bare",
}
ROUND_OF = set(ROUND_PARTNER.values())
# Stages that send over SMTP to a local sink (bench/smtp_sink.py) in a process of its own: which
# sink each gets, fresh and started the same way. The send is read against the bare pipelined
# client (bench/bare_smtp.py) to the same fast sink, and that client to an aiosmtpd sink shows
# how far above the usual Python sink the fast one's ceiling is.
SINK_OF = {
    "smtp_send": "fast",
    "smtp_bare": "fast",
    "smtp_send_2": "fast",
    "smtp_bare_aiosmtpd": "aiosmtpd",
}
# The SMTP send on both cores: the run's two shards sent at once by two processes, as two
# mapped send_shard tasks do (each with its own connections), to one sink.
BOTH_CORES = {"smtp_send_2": 2}
# Connections per shard: the SMTP transport's max_in_flight (the campaign's default window), and
# the bare client's connections.
SMTP_CONNECTIONS = 4
# How many recipients the SMTP stages send by default: 0, the whole run (the target is read at
# 100,000 recipients); N sends one shard of the run (batch i in shard i mod S) with S chosen so
# the shard holds about N, for a quicker look.
SMTP_RECIPIENTS = 0
# The aiosmtpd sink tops out near 1,500 messages/s: its ceiling needs fewer messages.
AIOSMTPD_MESSAGES = 5_000
# What each stage's child imports before the clock starts (GX costs seconds to import; a task
# pays that once per process, and it is reported on its own).
IMPORTS = {
    "validate": ("great_expectations", "great_expectations.expectations"),
    "gate": ("great_expectations", "great_expectations.expectations"),
    "send": ("sendgrid", "mailroom.delivery.transports.sendgrid"),
    "send_tls": ("sendgrid", "mailroom.delivery.transports.sendgrid"),
    "send_tls_8": ("sendgrid", "mailroom.delivery.transports.sendgrid"),
    "legacy_send": ("sendgrid", "python_http_client", "legacy_send"),
    "legacy_send_tls": ("sendgrid", "python_http_client", "legacy_send"),
    "naive_baseline": ("sendgrid", "jinja2", "babel.support", "css_inline"),
    "smtp_send": ("smtplib", "email.message", "mailroom.delivery.transports.smtp"),
    "smtp_send_2": ("smtplib", "email.message", "mailroom.delivery.transports.smtp"),
    "smtp_bare": ("bare_smtp",),
    "smtp_bare_aiosmtpd": ("bare_smtp",),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="*", default=None, help="default: 100,000")
    parser.add_argument("--e2e", type=int, nargs="*", default=[], metavar="USERS")
    parser.add_argument("--e2e-db", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--naive-sample", type=int, default=NAIVE_SAMPLE)
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL extract")
    parser.add_argument(
        "--smtp-recipients",
        type=int,
        default=SMTP_RECIPIENTS,
        metavar="N",
        help="the SMTP stages send one shard of the run holding about N recipients "
        "(default 0: the whole run)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=STAGES,
        metavar="STAGE",
        help="leave these stages out (a quicker look; the report says they were not measured)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only regenerate BENCHMARKS.md from results.json"
    )
    parser.add_argument("--work", type=Path, default=None, help="default: var/bench/<users>")
    parser.add_argument(
        "--stage", choices=(*STAGES, CONSOLE_STAGE, FEEDBACK_STAGE), help=argparse.SUPPRESS
    )
    parser.add_argument("--context", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == CONSOLE_STAGE:
        import console_view

        dbs = ["sqlite"] if args.no_postgres else list(console_view.DBS)
        work = (args.work or REPO / "var" / "bench" / "console").resolve()
        code = console_view.main(
            ["--users", *map(str, args.users or [100_000]), "--db", *dbs, "--work", str(work)]
        )
        if code == 0:
            results = load_results()
            results["console"] = json.loads((work / "console.json").read_text())
            save_results(results)
            print(f"wrote {REPORT.name} and bench/{RESULTS.name}")
        return code
    if args.stage == FEEDBACK_STAGE:
        import feedback_ingest

        dbs = ["sqlite"] if args.no_postgres else list(feedback_ingest.DBS)
        work = (args.work or REPO / "var" / "bench" / "feedback").resolve()
        recipients = (args.users or [feedback_ingest.RECIPIENTS])[-1]
        code = feedback_ingest.main(
            ["--recipients", str(recipients), "--db", *dbs, "--work", str(work)]
        )
        if code == 0:
            results = load_results()
            results["feedback"] = json.loads((work / "feedback.json").read_text())
            save_results(results)
            print(f"wrote {REPORT.name} and bench/{RESULTS.name}")
        return code
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.work.resolve(), json.loads(args.context))))
        return 0
    if args.report:
        save_results(load_results())
        return 0
    for users in args.users or [100_000]:
        work = (args.work or REPO / "var" / "bench" / str(users)).resolve()
        drive(
            users,
            work,
            naive_sample=args.naive_sample,
            postgres=not args.no_postgres,
            skip=frozenset(args.skip),
            smtp_recipients=args.smtp_recipients,
        )
    if args.e2e:
        import e2e_airflow

        for users in args.e2e:
            for db in args.e2e_db:
                e2e_airflow.bench(users, db)
    return 0


# --- the parent: generate, prepare, one child per stage, report --------------------------------
def drive(
    users: int,
    work: Path,
    *,
    naive_sample: int,
    postgres: bool,
    skip: frozenset[str] = frozenset(),
    smtp_recipients: int = SMTP_RECIPIENTS,
) -> dict[str, Any]:
    from mailroom.audience.sample import generate
    from services import (
        copy_users_to_postgres,
        fresh_database,
        pg_url,
        postgres_available,
    )

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()
    host = machine()
    t0 = time.perf_counter()
    users_db = generate(work / "users.sqlite", users=users).path  # not its oracle: 10M of them
    generated = time.perf_counter() - t0
    print(f"generated {users:,} users in {generated:.1f} s", flush=True)
    for run_id in (RUN_ID, PG_RUN_ID):
        prepare(work, run_id)
    (work / "users_url").write_text(f"sqlite:///{users_db}")

    stages: dict[str, Any] = {}
    servers: dict[str, Any] = {}
    skipped: dict[str, str] = {}  # not run, and why; a stage that failed is here too
    pg_load = None
    for stage in STAGES:
        context: dict[str, Any] = {"naive_sample": naive_sample}
        if stage not in skip and too_large(stage, users):
            skipped[stage] = too_large(stage, users)
            print(f"{stage:<16} skipped: {skipped[stage]}", flush=True)
            continue
        if stage in SINK_OF and stage not in skip:
            try:
                context |= smtp_context(work, smtp_recipients)
            except FileNotFoundError:
                skipped[stage] = "no frozen run to send (freeze did not run)"
                print(f"{stage:<16} skipped: {skipped[stage]}", flush=True)
                continue
        if stage in skip:
            skipped[stage] = "--skip"
            print(f"{stage:<16} skipped: --skip", flush=True)
            continue
        if stage == "extract_pg":
            why = "--no-postgres" if not postgres else postgres_available()
            if why:
                skipped[stage] = why
                print(f"{stage:<16} skipped: {why}", flush=True)
                continue
            with fresh_database("mailroom_bench_users") as database:
                t0 = time.perf_counter()
                copy_users_to_postgres(users_db, database)
                pg_load = time.perf_counter() - t0
                result = child(stage, work, {**context, "sql_url": pg_url(database)})
        elif stage in ROUND_OF:
            continue  # measured in rounds with its send, below
        elif stage in ROUNDS:
            # The send and its bare client, alternately, ROUNDS times each: on a shared machine
            # the fastest of each is the one least disturbed by others' work.
            tries: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
            for _ in range(ROUNDS[stage]):
                for name in (stage, ROUND_PARTNER[stage]):
                    measure = sunk if name in SINK_OF else served
                    tries.setdefault(name, []).append(measure(name, work, context))
            for name, runs in tries.items():
                done = [r for r in runs if "failed" not in r[0]]
                if not done:
                    skipped[name] = runs[0][0]["failed"]
                    print(f"{name:<16} FAILED: {skipped[name]}", flush=True)
                    continue
                result, servers[name] = min(done, key=lambda r: r[0]["seconds"])
                result["runs_seconds"] = [r[0]["seconds"] for r in done]
                stages[name] = result
                print(
                    f"{name:<16} {result['rows']:>9,} {result['unit']:<18} "
                    f"{result['seconds']:8.2f} s best of "
                    + ", ".join(f"{x:.2f}" for x in result["runs_seconds"]),
                    flush=True,
                )
            continue
        elif stage in SERVED:
            result, servers[stage] = served(stage, work, context)
        elif stage in SINK_OF:
            result, servers[stage] = sunk(stage, work, context)
        else:
            result = child(stage, work, context)
        if stage == "guard":
            copy_sqlite(work / "outbox.sqlite", work / "outbox-guarded.sqlite")
        if "failed" in result:
            skipped[stage] = result["failed"]
            print(f"{stage:<16} FAILED: {result['failed']}", flush=True)
            continue
        stages[stage] = s = result
        print(
            f"{stage:<16} {s['rows']:>9,} {s['unit']:<18} {s['seconds']:8.2f} s "
            f"peak RSS {s['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
    entry = {
        "users": users,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {**host, "loadavg": os.getloadavg()},
        "generate_seconds": round(generated, 3),
        "postgres_load_seconds": round(pg_load, 3) if pg_load is not None else None,
        "stages": stages,
        "servers": servers,
        "skipped": skipped,
    }
    entry["ratios"] = ratios(entry)
    entry["checks"] = checks(entry)
    for problem in entry["checks"]:
        print(f"CHECK: {problem}", flush=True)
    results = load_results()
    results["in_process"][str(users)] = entry
    save_results(results)
    print(f"ratios {json.dumps(entry['ratios'])}; wrote {REPORT.name} and bench/{RESULTS.name}")
    shutil.rmtree(work / "encode_baseline", ignore_errors=True)
    return entry


def served(
    stage: str, work: Path, context: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run of a stage against a fresh dev server (HTTPS with the round trip for the TLS
    stages; a fresh copy of the guarded outbox for a send): its result and the server's
    figures."""
    from services import DevServer, trust_bundle

    tls = stage in OVER_TLS
    context = dict(context)
    server = DevServer(
        work / f"sendgrid-dev-{stage}", tls=tls, latency_ms=LATENCY_MS if tls else 0.0
    )
    with server:
        context["server_url"] = server.url
        if server.ca_file is not None:
            context["ca_bundle"] = str(trust_bundle(server.ca_file, work / "ca-bundle.pem"))
        if stage in SENDS:
            context["outbox_url"] = f"sqlite:///{fresh_outbox(work, stage)}"
        cpu0 = server.cpu_seconds()
        result = child(stage, work, context)
        figures = {
            "cpu_seconds": round(server.cpu_seconds() - cpu0, 3),
            "peak_rss_mb": server_peak_rss_mb(server),
            "stats": server.stats(),
        }
    return result, figures


def sunk(stage: str, work: Path, context: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run of an SMTP stage against a fresh SMTP sink in a process of its own (a fresh copy
    of the guarded outbox for the send): its result and the sink's figures and stats."""
    from smtp_sink import SmtpSink

    context = dict(context)
    sink = SmtpSink(work / f"smtp-sink-{stage}.json", impl=SINK_OF[stage])
    sink.log_file = work / f"smtp-sink-{stage}.log"
    sink.start()
    try:
        context["smtp_port"] = sink.port
        if stage.startswith("smtp_send"):
            context["outbox_url"] = f"sqlite:///{fresh_outbox(work, stage)}"
        cpu0 = sink.cpu_seconds()
        if stage in BOTH_CORES:
            result = shards_at_once(stage, work, context, BOTH_CORES[stage])
        else:
            result = child(stage, work, context)
        cpu = sink.cpu_seconds() - cpu0
        rss = sink.peak_rss_mb()
    finally:
        stats = sink.stop()
    return result, {"cpu_seconds": round(cpu, 3), "peak_rss_mb": rss, "stats": stats}


def shards_at_once(stage: str, work: Path, context: dict[str, Any], shards: int) -> dict[str, Any]:
    """The run's ``shards`` shards sent at once, each by a child of its own: messages and CPU
    summed, the time of the slowest (both started together), every shard's checks."""
    from concurrent.futures import ThreadPoolExecutor

    contexts = [
        {**context, "smtp_shard_index": k, "smtp_shard_count": shards} for k in range(shards)
    ]
    with ThreadPoolExecutor(shards) as pool:
        results = list(pool.map(lambda c: child(stage, work, c), contexts))
    if failed := [r["failed"] for r in results if "failed" in r]:
        return {"failed": "; ".join(failed)}
    combined = dict(results[0])
    for key in ("rows", "cpu_seconds", "expected_messages", "batches"):
        combined[key] = sum(r.get(key) or 0 for r in results)
    combined["seconds"] = max(r["seconds"] for r in results)
    combined["all_sent"] = all(r.get("all_sent") for r in results)
    combined["shards"] = [{k: r.get(k) for k in ("rows", "seconds", "states")} for r in results]
    combined["shard_count"] = shards
    return combined


def smtp_context(work: Path, recipients: int) -> dict[str, Any]:
    """Which shard of the run the SMTP stages send (shard 0 of ``smtp_shard_count``, about
    ``recipients`` of them; the whole run for 0) and how many messages that is."""
    from mailroom.staging import RunStaging

    path = RunStaging(work / "staging" / CAMPAIGN / RUN_ID).manifest
    if not path.exists():
        raise FileNotFoundError(path)
    manifest = json.loads(path.read_bytes())
    total = int(manifest["recipient_count"])
    count = 1 if recipients <= 0 or recipients >= total else max(1, round(total / recipients))
    mine = [b for b in manifest["batches"] if int(b["index"]) % count == 0]
    return {
        "smtp_shard_count": count,
        "smtp_messages": sum(int(b["recipients"]) for b in mine),
        "smtp_batches": len(mine),
        "smtp_connections": SMTP_CONNECTIONS,
    }


def too_large(stage: str, users: int) -> str:
    """Why ``stage`` is not run in process at this size ("" when it is)."""
    sends = SERVED | set(SINK_OF) | set(ROUND_PARTNER.values())
    if stage in sends and users > SENDS_IN_PROCESS_UP_TO:
        return f"sends are measured in process up to {SENDS_IN_PROCESS_UP_TO:,} users"
    if stage == "gate_baseline" and users > BARE_GATE_UP_TO:
        return f"the bare gate holds the whole run in memory: run up to {BARE_GATE_UP_TO:,} users"
    return ""


def copy_sqlite(source: Path, target: Path) -> Path:
    """A consistent copy of a SQLite database (its WAL included), through SQLite's backup."""
    import sqlite3

    target.unlink(missing_ok=True)
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target


def fresh_outbox(work: Path, stage: str) -> Path:
    """The outbox as the guard's pass left it, for one send stage of its own."""
    return copy_sqlite(work / "outbox-guarded.sqlite", work / f"outbox-{stage}.sqlite")


def prepare(work: Path, run_id: str) -> None:
    """One run folder under ``work/staging``; its spec copy without the rate limit."""
    from mailroom import pipeline
    from services import unlimited_spec

    run = pipeline.prepare(
        pipeline.ProjectPaths.under(REPO / "include"),
        campaign=CAMPAIGN,
        run_id=run_id,
        staging_root=work / "staging",
        shard_count=1,
        dry_run=False,
    )
    run.spec_copy.write_text(unlimited_spec(run.spec_copy.read_text("utf-8")), "utf-8")


def ratios(entry: dict[str, Any]) -> dict[str, Any]:
    """The figures to read: each stage against its baseline, measured in the same run."""
    s = entry["stages"]

    def seconds(name: str) -> float | None:
        return s[name]["seconds"] if name in s and s[name]["seconds"] > 0 else None

    out: dict[str, Any] = {}
    if seconds("guard") and s.get("send", {}).get("parts_seconds", {}).get("guard"):
        out["guard_pass_vs_send_guard"] = round(
            s["guard"]["seconds"] / s["send"]["parts_seconds"]["guard"], 2
        )
    if seconds("gate") and seconds("gate_baseline"):
        out["gate_vs_bare_gate"] = round(s["gate"]["seconds"] / s["gate_baseline"]["seconds"], 2)
    if seconds("build") and seconds("freeze") and seconds("encode_baseline"):
        both = s["build"]["seconds"] + s["freeze"]["seconds"]
        out["build_freeze_vs_bare_encoder"] = round(both / s["encode_baseline"]["seconds"], 2)
        cpu = [s[n].get("cpu_seconds") for n in ("build", "freeze", "encode_baseline")]
        if all(cpu):
            out["build_freeze_vs_bare_encoder_cpu"] = round((cpu[0] + cpu[1]) / cpu[2], 2)
    for suffix in ("", "_tls", "_tls_8"):
        send, bare = f"send{suffix}", f"post_baseline{suffix}"
        legacy = "legacy_send_tls" if "tls" in suffix else "legacy_send"
        if not seconds(send):
            continue
        ours = s[send]["rows"] / s[send]["seconds"]
        if seconds(bare):
            bare_rate = s[bare]["rows"] / s[bare]["seconds"]
            out[f"{send}_vs_bare_post"] = round(ours / bare_rate, 3)
        if seconds(legacy):
            legacy_rate = s[legacy]["rows"] / s[legacy]["seconds"]
            out[f"{send}_vs_legacy"] = round(ours / legacy_rate, 2)
    if seconds("smtp_send") and seconds("smtp_bare"):
        ours = s["smtp_send"]["rows"] / s["smtp_send"]["seconds"]
        out["smtp_send_vs_bare"] = round(
            ours / (s["smtp_bare"]["rows"] / s["smtp_bare"]["seconds"]), 4
        )
    if seconds("smtp_send_2") and seconds("smtp_bare"):
        ours = s["smtp_send_2"]["rows"] / s["smtp_send_2"]["seconds"]
        out["smtp_send_2_vs_bare"] = round(
            ours / (s["smtp_bare"]["rows"] / s["smtp_bare"]["seconds"]), 4
        )
    if seconds("smtp_bare") and seconds("smtp_bare_aiosmtpd"):
        fast = s["smtp_bare"]["rows"] / s["smtp_bare"]["seconds"]
        slow = s["smtp_bare_aiosmtpd"]["rows"] / s["smtp_bare_aiosmtpd"]["seconds"]
        out["smtp_sink_vs_aiosmtpd"] = round(fast / slow, 2)
    naive = s.get("naive_baseline")
    sent = (s.get("send") or {}).get("rows")
    if naive and naive["rows"] and sent:
        naive_ms = 1000 * naive["seconds"] / naive["rows"]
        pipeline = [n for n in PIPELINE_STAGES if n in s]
        ours_ms = 1000 * sum(s[n]["seconds"] for n in pipeline) / sent
        out["per_recipient_ms"] = {"ours": round(ours_ms, 4), "naive": round(naive_ms, 4)}
        out["ours_vs_naive"] = round(ours_ms / naive_ms, 4)
    return out


def checks(entry: dict[str, Any]) -> list[str]:
    """What a benchmark run shows to be wrong besides speed: the same users read differently
    from the two databases, a stage that did not deliver everything, a failed gate."""
    s, problems = entry["stages"], []
    if "extract" in s and "extract_pg" in s:
        lite, pg = s["extract"].get("counts") or {}, s["extract_pg"].get("counts") or {}
        if s["extract"]["rows"] != s["extract_pg"]["rows"]:
            problems.append(
                f"extract read {s['extract']['rows']:,} users from SQLite but "
                f"{s['extract_pg']['rows']:,} from PostgreSQL (the same rows)"
            )
        for key in sorted(set(lite) & set(pg) - {"extracted"}):
            if lite[key] != pg[key]:
                problems.append(
                    f"extract {key}: {lite[key]} from SQLite but {pg[key]} from PostgreSQL"
                )
    sent = [n for n in SEND_FAMILY if n in s]
    if "freeze" in s:
        for name in sent:
            if s[name]["rows"] != s["freeze"]["rows"]:
                problems.append(
                    f"{name} delivered {s[name]['rows']:,} of {s['freeze']['rows']:,} recipients"
                )
    problems += smtp_checks(entry)
    for name in ("gate", "gate_baseline"):
        outcome = (s.get(name) or {}).get("outcome") or {}
        if name in s and not outcome.get("success"):
            problems.append(f"{name} did not pass: {outcome}")
    return problems


def smtp_checks(entry: dict[str, Any]) -> list[str]:
    """The SMTP stages: every message of the shard sent (the outbox says ``sent`` for each
    recipient, none failed, unknown or still sending) and, by the sink's own count, each
    recipient received exactly once, one RCPT per transaction, ``To:`` equal to the RCPT."""
    s, servers, problems = entry["stages"], entry.get("servers", {}), []
    for name in SINK_OF:
        if name not in s:
            continue
        stage, stats = s[name], (servers.get(name) or {}).get("stats")
        expected = stage.get("expected_messages")
        if expected is not None and stage["rows"] != expected:
            problems.append(f"{name} delivered {stage['rows']:,} of {expected:,} messages")
        if name == "smtp_send" and not stage.get("all_sent"):
            problems.append(
                f"{name}: the outbox does not hold every recipient sent: {stage.get('outbox')}"
            )
        if not stats:
            problems.append(f"{name}: the SMTP sink wrote no stats")
            continue
        if stats["recipients"] != stage["rows"] or stats["messages"] != stage["rows"]:
            problems.append(
                f"{name}: the sink received {stats['messages']:,} messages for "
                f"{stats['recipients']:,} recipients, the stage sent {stage['rows']:,}"
            )
        for key in ("duplicate_recipients", "multi_rcpt_transactions", "to_mismatch"):
            if stats.get(key):
                problems.append(f"{name}: the sink counted {stats[key]:,} {key.replace('_', ' ')}")
    return problems


# Every stage a campaign run does, once (extract from SQLite; the PostgreSQL extract is the same
# stage on another database).
PIPELINE_STAGES = ("extract", "validate", "render", "build", "freeze", "gate", "guard", "send")


def child(stage: str, work: Path, context: dict[str, Any]) -> dict[str, Any]:
    cmd = [
        *(sys.executable, str(Path(__file__).resolve()), "--stage", stage),
        *("--work", str(work), "--context", json.dumps(context)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("src", "bench"))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        # Recorded, and the suite goes on: at the largest sizes a stage may run out of memory
        # (exit -9), and the figures of the others are still worth having.
        sys.stderr.write(done.stderr[-5000:])
        last = (done.stderr.strip().splitlines() or [""])[-1][:300]
        killed = " (killed: out of memory?)" if done.returncode == -9 else ""
        return {"failed": f"exit {done.returncode}{killed} after {wall:.0f} s: {last}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(wall, 3)
    return result


def server_peak_rss_mb(server: Any) -> float | None:
    from smtp_sink import process_peak_rss_mb

    return process_peak_rss_mb(server.process.pid)


def machine() -> dict[str, Any]:
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    versions = {}
    for name in ("pandas", "pyarrow", "great_expectations", "sqlalchemy"):
        versions[name] = importlib.import_module(name).__version__
    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu": cpu,
        "mem_total": meminfo.get("MemTotal", "").strip(),
        "mem_available": meminfo.get("MemAvailable", "").strip(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def load_results() -> dict[str, Any]:
    """``{"in_process": {users: entry}, "e2e": {db: {users: entry}}}``; an older file that was
    keyed by users alone is read as in-process entries."""
    raw = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if raw and all(key.isdigit() for key in raw):
        raw = {"in_process": raw}
    raw.setdefault("in_process", {})
    raw.setdefault("e2e", {})
    return raw


def save_results(results: dict[str, Any]) -> None:
    from report import render_report

    results["in_process"] = dict(sorted(results["in_process"].items(), key=lambda kv: int(kv[0])))
    for db, sizes in results["e2e"].items():
        results["e2e"][db] = dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(render_report(results))


# --- a child: one stage, timed on its own --------------------------------------------------------
def run_stage(stage: str, work: Path, context: dict[str, Any]) -> dict[str, Any]:
    if stage.startswith("legacy_send") and context.get("ca_bundle"):
        # The SDK's HTTP client builds a default TLS context per request: from this bundle.
        os.environ["SSL_CERT_FILE"] = context["ca_bundle"]
    t0 = time.perf_counter()
    from mailroom import pipeline
    from mailroom.delivery.outbox import Outbox
    from mailroom.pipeline import Run
    from mailroom.staging import RunStaging, read_json

    for module in IMPORTS.get(stage, ()):
        importlib.import_module(module)
    if stage == "gate_baseline":
        import bare_gate
    if stage in ("encode_baseline", "naive_baseline") or stage.startswith("post_baseline"):
        import baselines
    if stage.startswith("smtp_bare"):
        import bare_smtp
    imported = time.perf_counter() - t0
    rss_imported = peak_rss_mb()

    run_id = PG_RUN_ID if stage == "extract_pg" else RUN_ID
    staging = RunStaging(work / "staging" / CAMPAIGN / run_id)
    run = Run(CAMPAIGN, run_id, staging, 1, False)
    paths = pipeline.ProjectPaths.under(REPO / "include")
    spec = run.spec()
    valid = (
        read_json(staging.audience_validation)["valid"]
        if staging.audience_validation.exists()
        else 0
    )
    outbox_url = f"sqlite:///{work / 'outbox.sqlite'}"
    outcome: Any = None
    extra: dict[str, Any] = {}

    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if stage in ("extract", "extract_pg"):
        sql_url = context.get("sql_url") or (work / "users_url").read_text()
        outcome = pipeline.extract_audience(run, sql_url=sql_url)
        extra = {"counts": outcome}
        rows, unit = outcome["extracted"], "users read"
    elif stage == "extract_sqlalchemy":
        from mailroom.audience.extract import extract_audience

        # The same extract through the reader every database had before ADBC, to files of its
        # own; they must be the extract stage's byte for byte.
        folder = work / "extract_sqlalchemy"
        folder.mkdir(exist_ok=True)
        sql_url = (work / "users_url").read_text()
        counts = extract_audience(
            run.spec(),
            sql_url=sql_url,
            snapshot=folder / staging.snapshot.name,
            suppressed_out=folder / staging.suppressed.name,
            reader="sqlalchemy",
        ).to_dict()
        same = all(
            (folder / path.name).read_bytes() == path.read_bytes()
            for path in (staging.snapshot, staging.suppressed)
        )
        extra = {"counts": counts, "same_files_as_extract": same}
        rows, unit = counts["extracted"], "users read"
    elif stage == "validate":
        outcome = pipeline.validate_audience(run)
        rows, unit = outcome["total"], "audience rows"
    elif stage == "render":
        outcome = pipeline.render_content(run, paths)
        rows, unit = len(outcome), "locales"
    elif stage == "build":
        outcome = pipeline.build_envelopes(run, secret=SECRET)
        rows, unit = outcome["envelopes"], "envelopes"
    elif stage == "freeze":
        summary = pipeline.freeze_batches(run, outbox=Outbox(outbox_url))
        (work / "manifest_sha256").write_text(summary["manifest_sha256"])
        extra = {"batches": summary["batches"]}
        rows, unit = summary["recipients"], "envelopes"
    elif stage == "encode_baseline":
        done = baselines.bare_encode(staging.manifest, work / "encode_baseline")
        extra = {k: v for k, v in done.items() if k not in ("seconds", "cpu_seconds")}
        rows, unit = done["recipients"], "personalizations"
    elif stage == "gate":
        outbox = Outbox(outbox_url)
        try:
            outcome = pipeline.check_envelopes(run, paths, secret=SECRET, outbox=outbox)
        finally:
            outbox.dispose()
        rows, unit = outcome["personalizations"], "personalizations"
    elif stage == "gate_baseline":
        fails = bare_gate.bare_gate(
            spec,
            manifest_path=staging.manifest,
            valid_audience=staging.valid_audience,
            secret=SECRET,
            expected=valid,
        )
        outcome = {
            "success": not any(fails.values()),
            "failures": {k: v for k, v in fails.items() if v},
        }
        rows, unit = valid, "personalizations"
    elif stage == "guard":
        logging.basicConfig(
            level=logging.INFO, filename=str(work / "guard.log"), filemode="w", force=True
        )
        outbox = Outbox(outbox_url)
        result = pipeline.guard_shard(
            run, manifest_sha256=(work / "manifest_sha256").read_text(), outbox=outbox
        )
        outbox.dispose()
        extra = {"batches": result["batches"]}
        rows, unit = result["recipients"], "recipients cleared"
    elif stage in ("send", "send_tls", "send_tls_8"):
        from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
        from services import API_KEY

        # What a send task logs, at the level its task logs it, to a file of its own.
        logging.basicConfig(
            level=logging.INFO, filename=str(work / f"{stage}.log"), filemode="w", force=True
        )
        outbox = Outbox(context["outbox_url"])
        parts = _time_send_parts()
        window = WINDOW_OF.get(stage, spec.max_in_flight)
        if stage in WINDOW_OF:
            _force_window(window)
        settings = SendGridSettings(
            api_key=API_KEY, host=context["server_url"], ca_bundle=context.get("ca_bundle")
        )
        result = pipeline.send_shard(
            run,
            shard=0,
            manifest_sha256=(work / "manifest_sha256").read_text(),
            transport=SendGridTransport(settings),
            outbox=outbox,
            shard_count=1,
        )
        outbox.dispose()
        extra = {
            "batches": result["batches"],
            "states": result["states"],
            "window": window,
            "parts_seconds": {k: round(v, 3) for k, v in parts.items()},
        }
        rows, unit = result["recipients_sent"], "recipients sent"
    elif stage in ("legacy_send", "legacy_send_tls"):
        import legacy_send
        from mailroom.delivery.transports.sendgrid import SendGridSettings
        from services import API_KEY

        logging.basicConfig(
            level=logging.INFO, filename=str(work / f"{stage}.log"), filemode="w", force=True
        )
        outbox = Outbox(context["outbox_url"])
        parts = _time_legacy_parts()
        result = legacy_send.pipeline_send_shard(
            run,
            shard=0,
            manifest_sha256=(work / "manifest_sha256").read_text(),
            transport=legacy_send.LegacySendGridTransport(
                SendGridSettings(api_key=API_KEY, host=context["server_url"])
            ),
            outbox=outbox,
        )
        outbox.dispose()
        extra = {
            "batches": result["batches"],
            "window": 1,
            "parts_seconds": {k: round(v, 3) for k, v in parts.items()},
        }
        rows, unit = result["recipients_sent"], "recipients sent"
    elif stage in ("smtp_send", "smtp_send_2"):
        from mailroom.delivery.transports.smtp import SmtpSettings, SmtpTransport

        shard = int(context.get("smtp_shard_index", 0))
        logging.basicConfig(
            level=logging.INFO,
            filename=str(work / f"{stage}-{shard}.log"),
            filemode="w",
            force=True,
        )
        outbox = Outbox(context["outbox_url"])
        window = int(context["smtp_connections"])
        _force_window(window)
        transport = SmtpTransport(
            SmtpSettings(host="127.0.0.1", port=int(context["smtp_port"]), security="none")
        )
        result = pipeline.send_shard(
            run,
            shard=shard,
            manifest_sha256=(work / "manifest_sha256").read_text(),
            transport=transport,
            outbox=outbox,
            shard_count=int(context["smtp_shard_count"]),
        )
        counts = outbox.counts(run.run_key)
        outbox.dispose()
        people = {state: n["recipients"] for state, n in counts.items() if n["recipients"]}
        mine = [
            b
            for b in read_json(staging.manifest)["batches"]
            if int(b["index"]) % int(context["smtp_shard_count"]) == shard
        ]
        expected = sum(int(b["recipients"]) for b in mine)
        extra = {
            "batches": result["batches"],
            "states": result["states"],
            "window": window,
            "shard_count": int(context["smtp_shard_count"]),
            "expected_messages": expected,
            "outbox": people,
            # This shard's batches all sent, and its recipients all delivered.
            "all_sent": result["states"] == {"sent": len(mine)}
            and result["recipients_sent"] == expected,
        }
        rows, unit = result["recipients_sent"], "messages sent"
    elif stage in ("smtp_bare", "smtp_bare_aiosmtpd"):
        limit = AIOSMTPD_MESSAGES if stage == "smtp_bare_aiosmtpd" else None
        t_build = time.perf_counter()
        messages = bare_smtp.messages_from_manifest(
            staging.manifest, shard_count=int(context["smtp_shard_count"]), limit=limit
        )
        built = time.perf_counter() - t_build
        cpu_send = cpu_seconds()
        done = bare_smtp.send_pipelined(
            messages,
            "127.0.0.1",
            int(context["smtp_port"]),
            connections=int(context["smtp_connections"]),
            pipelining="always",  # aiosmtpd does not advertise it, but reads commands in order
        )
        done["cpu_seconds"] = cpu_seconds() - cpu_send
        extra = {
            "build_seconds": round(built, 3),
            "connections": done["connections"],
            "pipelined": done["pipelined"],
            "data_bytes": done["data_bytes"],
            "expected_messages": len(messages),
        }
        rows, unit = done["messages"], "messages sent"
    elif stage.startswith("post_baseline"):
        done = baselines.bare_post(
            staging.manifest,
            context["server_url"],
            window=WINDOW_OF.get(stage, spec.max_in_flight),
            ca_file=context.get("ca_bundle"),
        )
        extra = {k: v for k, v in done.items() if k != "seconds"}
        rows, unit = done["recipients"], "recipients sent"
    else:
        done = baselines.naive_pipeline(
            spec=spec,
            templates_dir=paths.templates,
            translations_dir=paths.translations,
            valid_audience=staging.valid_audience,
            secret=SECRET,
            server_url=context["server_url"],
            sample=int(context["naive_sample"]),
        )
        extra = {k: v for k, v in done.items() if k not in ("seconds", "cpu_seconds")}
        rows, unit = done["recipients"], "recipients (sample)"
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    if stage in ("encode_baseline", "naive_baseline") or stage.startswith("smtp_bare"):
        # only the parts the baseline times, not its own set-up (building the messages)
        seconds, cpu = done["seconds"], done["cpu_seconds"]
    return {
        "stage": stage,
        "rows": rows,
        "unit": unit,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "rows_per_second": round(rows / seconds) if unit != "locales" and seconds else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_imports_mb": round(rss_imported, 1),
        "import_seconds": round(imported, 3),
        "outcome": outcome if stage in ("gate", "gate_baseline") else None,
        **extra,
    }


def _timed(parts: dict[str, float], part: str, fn: Any) -> Any:
    """``fn``, adding the seconds spent in it to ``parts[part]`` (from any thread)."""
    lock = _PARTS_LOCK

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                parts[part] += time.perf_counter() - t0

    return wrapper


def _time_send_parts() -> dict[str, float]:
    """Where a send's time goes, by wrapping calls in this benchmark process only: ``shards``
    (the shard's loop: everything after reading and checking the run's inputs, which is the
    rest), ``guard`` (the full envelope guard inside send: none for a cleared body),
    ``digest`` (the check of a body against the guard pass's clearance) and ``request`` (inside
    the transport's HTTP request; summed over the window's threads, so more than the wall time
    when requests overlap)."""
    from mailroom import pipeline
    from mailroom.delivery.transports import base
    from mailroom.delivery.transports.sendgrid import SendGridTransport

    parts = {"shards": 0.0, "guard": 0.0, "digest": 0.0, "request": 0.0}
    pipeline.shards.send_shard = _timed(parts, "shards", pipeline.shards.send_shard)  # type: ignore[attr-defined]
    base.check_envelope = _timed(parts, "guard", base.check_envelope)  # type: ignore[assignment]
    base._cleared = _timed(parts, "digest", base._cleared)  # type: ignore[attr-defined]
    SendGridTransport._deliver = _timed(parts, "request", SendGridTransport._deliver)  # type: ignore[method-assign]
    return parts


def _force_window(window: int) -> None:
    """The send with ``window`` requests in flight instead of the campaign's: the window the
    pipeline hands the shard, replaced in this benchmark process only."""
    from mailroom import pipeline

    send_shard = pipeline.shards.send_shard  # type: ignore[attr-defined]

    def with_window(**kwargs: Any) -> Any:
        return send_shard(**{**kwargs, "max_in_flight": window})

    pipeline.shards.send_shard = with_window  # type: ignore[attr-defined]


def _time_legacy_parts() -> dict[str, float]:
    """Today's path: the envelope guard inside send, and the request through the SDK."""
    import legacy_send
    from mailroom.delivery.transports import base

    parts = {"guard": 0.0, "request": 0.0}
    base.check_envelope = _timed(parts, "guard", base.check_envelope)  # type: ignore[assignment]
    transport = legacy_send.LegacySendGridTransport
    transport._deliver = _timed(parts, "request", transport._deliver)  # type: ignore[method-assign]
    return parts


def peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` belongs to its address space, which ``exec``
    makes new (``getrusage``'s ``ru_maxrss`` would carry the parent's peak into the child)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included, and of the processes it
    started and waited for (the gate's token worker)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


if __name__ == "__main__":
    raise SystemExit(main())
