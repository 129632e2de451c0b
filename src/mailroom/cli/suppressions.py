"""``mailroom suppressions``: the outbox's suppression list, kept by operators.

Every campaign's ``extract_audience`` leaves out whoever is on the list, matched by address key,
so ``Ann@EXAMPLE.com``, ``ａｎｎ@example.com`` and ``ann@example.com`` are one person, and so are
a Unicode domain and its punycode. ``list`` counts the list by reason and source and shows each
address masked (a terminal's scrollback is no place for the list); ``export`` writes it in
full, for whoever needs to see it. ``import`` takes a whole CSV or nothing: a row that is not
one address, or lacks a reason, is reported by row number with its value masked, and nothing of
the file is added, so a half-imported file never passes for the whole one. Adding someone
already on the list keeps their first record and is not an error, so a file may be imported
again.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from mailroom.addresses import mask
from mailroom.delivery.outbox import (
    Outbox,
    Suppression,
    SuppressionRefused,
    UnknownOutboxRevision,
    listed_address,
)

# The columns ``export`` writes, in this order; ``import`` reads any of them.
COLUMNS = ("email", "reason", "source", "detail", "created_at", "created_by")
REQUIRED = ("email", "reason")
# How many refused rows an import prints before it only counts the rest.
SHOWN_REFUSALS = 50


def add_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--outbox-url",
        default=os.environ.get("MAILROOM_OUTBOX_URL"),
        help="the outbox database (env MAILROOM_OUTBOX_URL)",
    )
    text = "the suppression list: who no campaign sends to, whatever its own suppressions say"
    cmd = sub.add_parser("suppressions", help=text, description=__doc__)
    actions = cmd.add_subparsers(dest="suppressions_command", required=True)
    actions.add_parser(
        "list",
        parents=[common],
        help="counts by reason and source, and every address masked (export shows them in full)",
    )
    add = actions.add_parser(
        "add",
        parents=[common],
        help="put addresses on the list (one already on it keeps its first record)",
    )
    add.add_argument("emails", nargs="+", metavar="EMAIL")
    add.add_argument(
        "--reason", required=True, help="why: unsubscribed, bounced, spam_report, manual…"
    )
    add.add_argument("--detail", help="anything an operator should know later")
    add.add_argument("--by", help="who is adding them (default: the login name)")
    remove = actions.add_parser(
        "remove",
        parents=[common],
        help="take addresses off the list: campaigns may send to them again",
    )
    remove.add_argument("emails", nargs="+", metavar="EMAIL")
    remove.add_argument(
        "--reason",
        required=True,
        help="why they may be mailed again (recorded with who and when, and the record removed)",
    )
    remove.add_argument("--by", help="who is removing them (default: the login name)")
    load = actions.add_parser(
        "import",
        parents=[common],
        help="add every row of a CSV with a header: email,reason[,detail] (export's columns "
        "too); one unreadable row and nothing is added",
    )
    load.add_argument("file", type=Path, metavar="FILE.csv")
    load.add_argument(
        "--source", default="import", help="where the rows came from, when a row does not say"
    )
    load.add_argument("--by", help="who is importing (default: the login name)")
    export = actions.add_parser(
        "export",
        parents=[common],
        help=f"write the whole list, addresses in full, as CSV ({','.join(COLUMNS)})",
    )
    export.add_argument("file", metavar="FILE.csv", help="the file to write, or - for stdout")
    check = actions.add_parser(
        "check",
        parents=[common],
        help="exit 0 and print the reason when an address (in any spelling) is on the list, "
        "1 when it is not",
    )
    check.add_argument("email", metavar="EMAIL")


def run_command(args: argparse.Namespace) -> int:
    name = f"mailroom suppressions {args.suppressions_command}"
    if not args.outbox_url:
        print(f"{name}: give --outbox-url or set MAILROOM_OUTBOX_URL", file=sys.stderr)
        return 2
    try:
        outbox = Outbox(args.outbox_url)
    except UnknownOutboxRevision as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    try:
        return _COMMANDS[args.suppressions_command](outbox, args, name)
    finally:
        outbox.dispose()


def _list(outbox: Outbox, args: argparse.Namespace, name: str) -> int:
    entries = list(outbox.suppressions())
    print(f"{len(entries):,} address(es) on the suppression list")
    if not entries:
        return 0
    print(f"by reason: {_counted(Counter(e.reason for e in entries))}")
    print(f"by source: {_counted(Counter(e.source for e in entries))}")
    for entry in entries:
        when = entry.created_at.isoformat(timespec="seconds") if entry.created_at else "-"
        print(
            f"  {mask(entry.email)}  {entry.reason}  {entry.source}  {when}"
            f"  {entry.created_by or '-'}"
        )
    return 0


def _add(outbox: Outbox, args: argparse.Namespace, name: str) -> int:
    refused = _refused_arguments(args.emails)
    if refused:
        return _report_refused(name, refused, "nothing was added")
    by = args.by or getpass.getuser()
    try:
        entries = [
            Suppression(email, args.reason, "cli", detail=args.detail, created_by=by)
            for email in args.emails
        ]
    except ValueError as exc:
        print(f"{name}: {exc}; nothing was added", file=sys.stderr)
        return 1
    added = outbox.suppress(entries)
    print(
        f"{added} added to the suppression list ({by}: {args.reason}); "
        f"{len(entries) - added} already on it or given twice, their first record kept"
    )
    return 0


def _remove(outbox: Outbox, args: argparse.Namespace, name: str) -> int:
    refused = _refused_arguments(args.emails)
    if refused:
        return _report_refused(name, refused, "nobody was taken off")
    absent = [email for email in args.emails if outbox.suppression(email) is None]
    by = args.by or getpass.getuser()
    removed = outbox.unsuppress(args.emails, by=by, why=args.reason)
    print(
        f"{removed} taken off the suppression list by {by}: campaigns may send to them again "
        "(`mailroom suppressions check EMAIL` shows who removed them and why)"
    )
    if absent:
        print(f"not on the list: {', '.join(mask(listed_address(e)[0]) for e in absent)}")
    return 0


def _import(outbox: Outbox, args: argparse.Namespace, name: str) -> int:
    by = args.by or getpass.getuser()
    try:
        with args.file.open(encoding="utf-8-sig", newline="") as f:
            entries, refused = _read_rows(f, source=args.source, by=by)
    except UnicodeDecodeError:
        print(f"{name}: {args.file} is not UTF-8; nothing was added", file=sys.stderr)
        return 1
    except csv.Error as exc:
        print(f"{name}: {args.file} is not a CSV file ({exc}); nothing was added", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{name}: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    if refused:
        return _report_refused(name, refused, f"nothing of {args.file} was added")
    added = outbox.suppress(entries)
    print(
        f"{args.file}: {len(entries):,} row(s), {added:,} added to the suppression list; "
        f"{len(entries) - added:,} already on it or repeated in the file, their first record kept"
    )
    return 0


def _export(outbox: Outbox, args: argparse.Namespace, name: str) -> int:
    if args.file == "-":
        count = _write_rows(outbox, sys.stdout)
        print(f"{count:,} address(es) exported", file=sys.stderr)
        return 0
    path = Path(args.file)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as out:
            count = _write_rows(outbox, out)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        print(f"{name}: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{count:,} address(es) exported to {path}, in full: keep the file as the list itself")
    return 0


def _check(outbox: Outbox, args: argparse.Namespace, name: str) -> int:
    try:
        entry = outbox.suppression(args.email)
    except SuppressionRefused as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    if entry is None:
        print(f"not suppressed: {mask(listed_address(args.email)[0])}")
        for removal in outbox.suppression_removals(args.email):
            print(
                f"  taken off {removal['removed_at'].isoformat(timespec='seconds')} by "
                f"{removal['removed_by']}: {removal['why']} (was {removal['reason']}, source "
                f"{removal['source']})"
            )
        return 1
    when = entry.created_at.isoformat(timespec="seconds") if entry.created_at else "-"
    print(
        f"suppressed: {entry.reason} ({mask(entry.email)}, source {entry.source}, since {when}"
        f"{f', by {entry.created_by}' if entry.created_by else ''})"
    )
    return 0


_COMMANDS = {
    "list": _list,
    "add": _add,
    "remove": _remove,
    "import": _import,
    "export": _export,
    "check": _check,
}


def _read_rows(lines: TextIO, *, source: str, by: str) -> tuple[list[Suppression], list[str]]:
    """The suppressions a CSV holds, and every row refused (``row 1`` is the first after the
    header, with its line in the file): an import adds all of them or none. A row without a
    source is ``source``'s, and a file without a created_by column ``by``'s (an exported list
    keeps its own: its round trip changes nothing)."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return [], ["the file is empty: its first line must name the columns email,reason"]
    names = [column.strip().lower() for column in header]
    problems = _header_problems(names)
    if problems:
        return [], problems
    entries: list[Suppression] = []
    refused: list[str] = []
    row = 0
    for values in reader:
        if not any(v.strip() for v in values):
            continue  # a blank line
        row += 1
        where = f"row {row} (line {reader.line_num})"
        if len(values) > len(names):
            refused.append(f"{where}: more values than the header names")
            continue
        fields = dict(zip(names, values, strict=False))
        try:
            address, _ = listed_address(fields.get("email"))
        except SuppressionRefused as exc:
            refused.append(f"{where}: {exc}")
            continue
        try:
            entries.append(
                Suppression(
                    address,
                    fields.get("reason", ""),
                    fields.get("source") or source,
                    detail=fields.get("detail") or None,
                    # An exported list says who added each row (blank: nobody recorded).
                    created_by=fields.get("created_by") if "created_by" in names else by,
                    created_at=_moment(fields.get("created_at")),
                )
            )
        except ValueError as exc:
            refused.append(f"{where}: {exc} ({mask(address)})")
    return entries, refused


def _header_problems(names: list[str]) -> list[str]:
    problems = []
    if "email" not in names and any("@" in n for n in names):
        problems.append(
            "the first line holds an address, not a header: it must name the columns "
            "email,reason[,detail]"
        )
    else:
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            problems.append(f"the header lacks the column(s) {', '.join(missing)}")
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        problems.append(
            f"the header names column(s) an import does not know: {', '.join(unknown)} "
            f"(it reads {', '.join(COLUMNS)})"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"the header names a column twice: {', '.join(twice)}")
    return problems


def _moment(value: str | None) -> datetime | None:
    """A row's ``created_at`` (ISO 8601, as export writes it; UTC when it has no zone)."""
    if value is None or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError("created_at is not an ISO 8601 date and time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _write_rows(outbox: Outbox, out: TextIO) -> int:
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    count = 0
    for entry in outbox.suppressions():
        writer.writerow(
            (
                entry.email,
                entry.reason,
                entry.source,
                entry.detail or "",
                entry.created_at.isoformat() if entry.created_at else "",
                entry.created_by or "",
            )
        )
        count += 1
    return count


def _refused_arguments(emails: list[str]) -> list[str]:
    refused = []
    for position, email in enumerate(emails, start=1):
        try:
            listed_address(email)
        except SuppressionRefused as exc:
            refused.append(f"address {position}: {exc}")
    return refused


def _report_refused(name: str, refused: list[str], outcome: str) -> int:
    print(f"{name}: {len(refused)} refused, {outcome}:", file=sys.stderr)
    for line in refused[:SHOWN_REFUSALS]:
        print(f"  {line}", file=sys.stderr)
    if len(refused) > SHOWN_REFUSALS:
        print(f"  … and {len(refused) - SHOWN_REFUSALS} more", file=sys.stderr)
    return 1


def _counted(counts: Counter[str]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in sorted(counts.items()))
