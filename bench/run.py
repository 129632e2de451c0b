"""`make bench`: the in-process stages on a generated audience, timed one fresh process each.

    python bench/run.py [--users N]          # default 100,000; `make bench FULL=1` passes 1,000,000

It generates the sample users database (``mailroom.sample_audience.generate``), prepares one run
of the example campaign in ``var/bench/<users>/`` and then runs each stage (extract, validate,
render, build envelopes, freeze, the data-quality gate) and the gate's baseline (the same checks
in bare pyarrow/pandas, ``bench/bare_gate.py``) in a fresh Python process of its own, one after
the other. Each child imports what its stage needs first, then times only the stage call and
reports its own peak RSS (``VmHWM``) and CPU time, so every figure is that stage's alone.

The figures go to ``bench/results.json`` (raw, one entry per audience size, the latest run of
each size kept) and ``BENCHMARKS.md`` (method, machine, one table per size). These machines are
shared and noisy: read the ratios measured within one run, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"
REPORT = REPO / "BENCHMARKS.md"
CAMPAIGN = "winter_update"
RUN_ID = "bench"
SECRET = b"bench-secret"
STAGES = ("extract", "validate", "render", "build", "freeze", "gate", "gate_baseline")
# What each stage's child imports before the clock starts (GX costs seconds to import; a task
# pays that once per process, and it is reported on its own).
IMPORTS = {
    "validate": ("great_expectations", "great_expectations.expectations"),
    "gate": ("great_expectations", "great_expectations.expectations"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=None, help="default: var/bench/<users>")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = (args.work or REPO / "var" / "bench" / str(args.users)).resolve()
    if args.stage:
        print(json.dumps(run_stage(args.stage, work)))
        return 0
    return drive(args.users, work)


# --- the parent: generate, prepare, one child per stage, report --------------------------------
def drive(users: int, work: Path) -> int:
    from mailroom import pipeline
    from mailroom.sample_audience import generate

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()
    host = machine()
    t0 = time.perf_counter()
    audience = generate(work / "users.sqlite", users=users)
    generated = time.perf_counter() - t0
    print(f"generated {users:,} users in {generated:.1f} s", flush=True)
    pipeline.prepare_run(
        pipeline.ProjectPaths.under(REPO / "include"),
        campaign=CAMPAIGN,
        run_id=RUN_ID,
        staging_root=work / "staging",
        shard_count=1,
        dry_run=True,
    )
    (work / "users_url").write_text(audience.url())
    stages: dict[str, Any] = {}
    for stage in STAGES:
        stages[stage] = child(stage, work)
        s = stages[stage]
        print(
            f"{stage:<14} {s['rows']:>9,} {s['unit']:<16} {s['seconds']:8.2f} s "
            f"peak RSS {s['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
    gate, baseline = stages["gate"], stages["gate_baseline"]
    entry = {
        "users": users,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": {**host, "loadavg": os.getloadavg()},
        "generate_seconds": round(generated, 3),
        "stages": stages,
        "gate_vs_baseline": round(gate["seconds"] / baseline["seconds"], 2),
        "gate_outcome": gate["outcome"],
        "baseline_outcome": baseline["outcome"],
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[str(users)] = entry
    RESULTS.write_text(
        json.dumps(dict(sorted(results.items(), key=lambda kv: int(kv[0]))), indent=2) + "\n"
    )
    REPORT.write_text(render_report(results))
    ratio = entry["gate_vs_baseline"]
    print(f"gate / bare baseline = {ratio}; wrote {REPORT.name} and bench/{RESULTS.name}")
    return 0


def child(stage: str, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--work", str(work)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("src", "bench"))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"stage {stage} failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(wall, 3)
    return result


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
    for name in ("pandas", "pyarrow", "great_expectations"):
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


# --- a child: one stage, timed on its own --------------------------------------------------------
def run_stage(stage: str, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    from mailroom import pipeline
    from mailroom.outbox import Outbox
    from mailroom.pipeline import Run
    from mailroom.staging import RunStaging, read_json

    for module in IMPORTS.get(stage, ()):
        importlib.import_module(module)
    if stage == "gate_baseline":
        import bare_gate
    imported = time.perf_counter() - t0
    rss_imported = peak_rss_mb()

    staging = RunStaging(work / "staging" / CAMPAIGN / RUN_ID)
    run = Run(CAMPAIGN, RUN_ID, staging, 1, True)
    paths = pipeline.ProjectPaths.under(REPO / "include")
    spec = run.spec()
    valid = (
        read_json(staging.audience_validation)["valid"]
        if staging.audience_validation.exists()
        else 0
    )
    outcome: Any = None

    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if stage == "extract":
        outcome = pipeline.extract(run, sql_url=(work / "users_url").read_text())
        rows, unit = outcome["extracted"], "users read"
    elif stage == "validate":
        outcome = pipeline.validate(run)
        rows, unit = outcome["total"], "audience rows"
    elif stage == "render":
        outcome = pipeline.render(run, paths)
        rows, unit = len(outcome), "locales"
    elif stage == "build":
        outcome = pipeline.build(run, secret=SECRET)
        rows, unit = outcome["envelopes"], "envelopes"
    elif stage == "freeze":
        summary = pipeline.freeze(run, outbox=Outbox(f"sqlite:///{work / 'outbox.sqlite'}"))
        outcome = {"requests": summary["requests"], "recipients": summary["recipients"]}
        rows, unit = summary["recipients"], "envelopes"
    elif stage == "gate":
        outcome = pipeline.gate(run, secret=SECRET)
        rows, unit = outcome["personalizations"], "personalizations"
    else:
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
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
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
    }


def _gib(meminfo_value: str) -> str:
    number, _, unit = meminfo_value.partition(" ")
    if unit.strip() != "kB" or not number.isdigit():
        return meminfo_value
    return f"{int(number) / 1024**2:.1f} GiB"


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
    """User + system CPU time of this process, every thread included."""
    times = os.times()
    return times.user + times.system


# --- BENCHMARKS.md -------------------------------------------------------------------------------
STAGE_NAMES = {
    "extract": "extract (SQLite)",
    "validate": "validate (GX)",
    "render": "render",
    "build": "build envelopes",
    "freeze": "freeze (+ outbox)",
    "gate": "**data-quality gate (GX)**",
    "gate_baseline": "gate baseline: bare pyarrow",
}


def render_report(results: dict[str, Any]) -> str:
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.py`; `make bench FULL=1` for 1,000,000 users) from",
        "`bench/results.json`; do not edit by hand.",
        "",
        "## Method",
        "",
        "- The audience is `mailroom.sample_audience.generate(users=N)`: the demo's users",
        "  database, with its suppressed, invalid, duplicated and tricky rows (about 96 % valid).",
        "- One run of the `winter_update` campaign (5 locales, one field) in `var/bench/<N>/`;",
        "  each stage runs the function its DAG task runs (`mailroom.pipeline`), in a fresh Python",
        "  process of its own, one stage at a time. The child imports what the stage needs first",
        "  (Great Expectations for validate and the gate), then the clock runs around the stage",
        "  call only; *import s* is that import, paid once per task process.",
        "- *seconds* is wall-clock time around the stage call; *CPU s* the CPU time the child",
        "  spent meanwhile, every thread included (more than *seconds* where a stage uses both",
        "  cores, less where it waited on the machine's other load).",
        "- *peak RSS* is the child's own high-water mark (`VmHWM` in `/proc/self/status`),",
        "  imports included; *RSS after imports* is the same mark before the stage started.",
        "- Freeze includes staging every batch and recipient in the outbox (SQLite).",
        "- The gate is `pipeline.gate`: read back every frozen body, explode, recompute every",
        "  recipient's values from the validated audience, two GX suites through Checkpoints,",
        "  write GX's Data Docs to the run folder. Its baseline, measured in the same run, is",
        "  `bench/bare_gate.py`: the same checks in bare pyarrow/pandas, no GX, no Data Docs, no",
        "  strict schema or fallback for irregular bodies. The ratio gate / baseline is the figure",
        "  to read; absolute seconds move with the load on this shared machine.",
        "- Timings live here only, never in test assertions.",
        "",
    ]
    for users, entry in results.items():
        m = entry["machine"]
        stages = entry["stages"]
        load = ", ".join(f"{x:.1f}" for x in m["loadavg"])
        out += [
            f"## {int(users):,} users",
            "",
            f"Run {entry['started']} on {m['nproc']} CPUs (`nproc`; {m['cpu']}), "
            f"{_gib(m['mem_total'])} RAM ({_gib(m['mem_available'])} available at the start, "
            f"`/proc/meminfo`), load average {load} at the end (other engineers' tests share "
            f"the machine); Python {m['python']}, "
            f"pandas {m['pandas']}, pyarrow {m['pyarrow']}, "
            f"great_expectations {m['great_expectations']}.",
            "",
            "| stage | rows | seconds | CPU s | rows/s | peak RSS MB | RSS after imports MB "
            "| import s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in stages.items():
            rps = f"{s['rows_per_second']:,}" if s.get("rows_per_second") else "—"
            cells = [
                STAGE_NAMES.get(name, name),
                f"{s['rows']:,} {s['unit']}",
                f"{s['seconds']:.2f}",
                f"{s['cpu_seconds']:.2f}" if "cpu_seconds" in s else "—",
                rps,
                f"{s['peak_rss_mb']:.0f}",
                f"{s['rss_after_imports_mb']:.0f}",
                f"{s['import_seconds']:.1f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
        gate_ok = (entry.get("gate_outcome") or {}).get("success")
        base_ok = (entry.get("baseline_outcome") or {}).get("success")
        out += [
            "",
            f"**Gate / bare baseline: {entry['gate_vs_baseline']}×** "
            f"(gate success: {gate_ok}, baseline clean: {base_ok}). "
            f"Generating the users database took {entry['generate_seconds']:.1f} s (not a stage).",
            "",
        ]
    sizes = sorted(results, key=int)
    if len(sizes) >= 2:
        small, large = results[sizes[0]], results[sizes[-1]]
        factor = int(sizes[-1]) / int(sizes[0])
        out += [
            f"## Scaling: {int(sizes[0]):,} → {int(sizes[-1]):,} users ({factor:g}× the rows)",
            "",
            "Linear time would be the same factor; bounded memory far less. (Different runs, so",
            "the load on the machine may differ between the two.)",
            "",
            "| stage | seconds × | peak RSS × |",
            "|---|---:|---:|",
        ]
        for name, s in large["stages"].items():
            before = small["stages"].get(name)
            if not before or not before["seconds"]:
                continue
            time_x = s["seconds"] / before["seconds"]
            rss_x = s["peak_rss_mb"] / before["peak_rss_mb"]
            out.append(f"| {STAGE_NAMES.get(name, name)} | {time_x:.1f} | {rss_x:.1f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
