"""``mailroom``: the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _repo_root() -> Path:
    return Path(os.environ.get("MAILROOM_REPO", Path(__file__).resolve().parents[3]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailroom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the example campaign end to end on a local Airflow")
    demo.add_argument("--users", type=int, default=10_000, help="sample audience size")
    demo.add_argument("--yes", action="store_true", help="approve without asking, then exit")
    demo.add_argument("--sendgrid-api-host", help="send to this SendGrid-compatible endpoint")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep Airflow up after the report (default when asking interactively)",
    )
    demo.add_argument("--shards", type=int, default=2)
    demo.add_argument("--work-dir", type=Path, help="sample data, staging and dev server records")
    demo.add_argument("--airflow-home", type=Path, help="the local Airflow's home folder")
    demo.add_argument("--airflow-port", type=int, default=28080)

    from mailroom.cli import approvals, feedback, operations, suppressions, unsubscribe_link

    approvals.add_parser(sub)
    operations.add_commands(sub)
    suppressions.add_parser(sub)
    feedback.add_parser(sub)
    unsubscribe_link.add_parser(sub)

    fetch = sub.add_parser(
        "fetch-run",
        help="copy a run folder (a local path or an s3:// URL, as in the run's XCom run_dir) to a "
        "local folder: report, not_sent.csv, the gate's Data Docs, the approval previews",
    )
    fetch.add_argument("location", help="the run folder, e.g. s3://bucket/prefix/<campaign>/<run>")
    fetch.add_argument("dest", type=Path)
    fetch.add_argument(
        "--endpoint-url",
        default=os.environ.get("MAILROOM_STAGING_ENDPOINT_URL"),
        help="an S3-compatible store's endpoint (env MAILROOM_STAGING_ENDPOINT_URL); "
        "credentials come from the standard AWS variables or profile",
    )

    local = sub.add_parser(
        "local-airflow",
        help="start, stop or report the demo's local Airflow (nothing is triggered)",
        description="The local Airflow of `mailroom demo` (its home, port, configuration, "
        "connections and variables), run detached: `start` starts what is not running and waits "
        "for the API, `stop` stops every process it started, `status` says what runs.",
    )
    local.add_argument("action", choices=["start", "stop", "status"])
    local.add_argument(
        "--airflow-home", type=Path, help="the local Airflow's home folder (default .airflow/)"
    )
    local.add_argument(
        "--port",
        type=int,
        help="the API's port (default 28080; stop and status read it from the home's pid file)",
    )

    sample = sub.add_parser("sample-audience", help="write the deterministic sample users database")
    sample.add_argument("path", type=Path)
    sample.add_argument("--users", type=int, default=10_000)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from mailroom.cli.demo import Demo

        keep = args.keep_running or not args.yes
        return Demo(
            _repo_root(),
            users=args.users,
            yes=args.yes,
            sendgrid_api_host=args.sendgrid_api_host,
            keep_running=keep,
            shards=args.shards,
            work_dir=args.work_dir,
            airflow_home=args.airflow_home,
            airflow_port=args.airflow_port,
        ).run()
    if args.command == "approvals":
        return approvals.run_command(args)
    if args.command in {"status", "halt", "resume", "resend", "settle"}:
        return operations.run_command(args, _repo_root())
    if args.command == "outbox":
        return operations.run_outbox_command(args)
    if args.command == "suppressions":
        return suppressions.run_command(args)
    if args.command == "feedback":
        return feedback.run_command(args)
    if args.command == "unsubscribe-link":
        return unsubscribe_link.run_command(args, _repo_root())
    if args.command == "fetch-run":
        from mailroom.staging_store import RunStore, StagingError, safe_location

        options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
        try:
            done = RunStore(args.location, storage_options=options).download(args.dest)
        except StagingError as exc:
            print(f"mailroom fetch-run: {exc}", file=sys.stderr)
            return 1
        print(
            f"{safe_location(args.location)} -> {args.dest}: {len(done.fetched)} files, "
            f"{sum(done.fetched.values()):,} bytes in {done.fetch_seconds:.1f}s"
        )
        return 0
    if args.command == "local-airflow":
        from mailroom.cli import local_airflow

        return local_airflow.run_command(
            _repo_root(), args.action, home=args.airflow_home, port=args.port
        )
    if args.command == "sample-audience":
        from mailroom.audience.sample import generate

        result = generate(args.path, users=args.users)
        print(f"{result.path}: {result.users} users, {len(result.expected)} should receive mail")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
