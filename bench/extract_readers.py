"""The audience extract through ADBC against the SQLAlchemy reader, in one run.

    python bench/extract_readers.py [--users N] [--rounds R] [--no-postgres]

Generates the sample users (``mailroom.audience.sample.generate``, default 1,000,000) in
``var/bench/extract-readers/<users>/``, copies them into a fresh database on the local
PostgreSQL, and runs ``extract_audience`` of the example campaign with ``reader="sqlalchemy"``
and ``reader="adbc"`` alternately, ``R`` rounds each, on SQLite and on PostgreSQL. Each run is
a fresh Python process that imports what the extract needs first and times the call only
(wall clock, CPU time of every thread, peak RSS). Prints every run, the fastest of each reader
(the least disturbed on a shared machine) and their ratio, and fails unless both readers wrote
the same files byte for byte. It writes nothing to ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
READERS = ("sqlalchemy", "adbc")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--child", nargs=3, metavar=("READER", "URL", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    from mailroom.audience.sample import generate
    from services import copy_users_to_postgres, fresh_database, pg_url, postgres_available

    work = REPO / "var" / "bench" / "extract-readers" / str(args.users)
    work.mkdir(parents=True, exist_ok=True)
    users = work / "users.sqlite"
    if not users.exists():
        t0 = time.perf_counter()
        generate(users, users=args.users)
        print(f"generated {args.users:,} users in {time.perf_counter() - t0:.1f} s", flush=True)
    problems = measure("sqlite", f"sqlite:///{users}", work, args.rounds)
    why = "--no-postgres" if args.no_postgres else postgres_available()
    if why:
        print(f"postgresql skipped: {why}")
    else:
        with fresh_database("mailroom_bench_readers") as database:
            copy_users_to_postgres(users, database)
            problems += measure("postgresql", pg_url(database), work, args.rounds)
    for problem in problems:
        print(f"CHECK: {problem}")
    return 1 if problems else 0


def measure(db: str, url: str, work: Path, rounds: int) -> list[str]:
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in READERS}
    for _ in range(rounds):
        for reader in READERS:
            result = spawn(reader, url, work / f"out-{db}-{reader}")
            runs[reader].append(result)
            print(
                f"{db:<10} {reader:<10} {result['seconds']:6.2f} s  "
                f"CPU {result['cpu_seconds']:6.2f} s  peak RSS {result['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    best = {r: min(runs[r], key=lambda x: x["seconds"]) for r in READERS}
    old, new = best["sqlalchemy"], best["adbc"]
    print(
        f"{db:<10} fastest: sqlalchemy {old['seconds']:.2f} s, adbc {new['seconds']:.2f} s; "
        f"adbc/sqlalchemy {new['seconds'] / old['seconds']:.3f} (CPU "
        f"{new['cpu_seconds'] / old['cpu_seconds']:.3f}, peak RSS "
        f"{new['peak_rss_mb'] / old['peak_rss_mb']:.2f})",
        flush=True,
    )
    problems = []
    if len({json.dumps(r["files"], sort_keys=True) for rs in runs.values() for r in rs}) != 1:
        problems.append(f"{db}: the readers wrote different files")
    if len({json.dumps(r["counts"], sort_keys=True) for rs in runs.values() for r in rs}) != 1:
        problems.append(f"{db}: the readers counted differently")
    return problems


def spawn(reader: str, url: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("src", "bench"))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", reader, url, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"{reader} on {url} failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child(reader: str, url: str, out: str) -> dict[str, Any]:
    """One extract, timed alone, after the imports either reader needs."""
    import adbc_driver_postgresql.dbapi  # noqa: F401
    import adbc_driver_sqlite.dbapi  # noqa: F401
    import sqlalchemy  # noqa: F401

    from mailroom.audience.extract import extract_audience
    from mailroom.campaign_spec import load_campaign

    spec = load_campaign(REPO / "include" / "campaigns", "winter_update")
    folder = Path(out)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    counts = extract_audience(
        spec,
        sql_url=url,
        snapshot=folder / "snapshot.parquet",
        suppressed_out=folder / "suppressed.parquet",
        reader=reader,  # type: ignore[arg-type]
    )
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": peak_rss_mb(),
        "counts": counts.to_dict(),
        "files": files,
    }


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


if __name__ == "__main__":
    raise SystemExit(main())
