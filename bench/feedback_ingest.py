"""SendGrid's Event Webhook into the outbox: how many events a second ``mailroom feedback serve``
keeps, with SendGrid-sized bodies (1,000 events a POST).

    python bench/feedback_ingest.py [--recipients N] [--bodies N] [--db sqlite postgres]
    make bench-feedback   (bench/run.py --stage feedback [--users N] [--no-postgres])

For each database it stages one run of N recipients (default 200,000) in requests of 1,000 with
the outbox's own calls (``Outbox.stage``, ``claim``, ``finish`` sent with a message id): a SQLite
file, or a fresh database on the local PostgreSQL (dropped afterwards). Then, outside any clock,
it makes ``--bodies`` webhook bodies of 1,000 events each: the first recipients of the run, each
``processed`` and then ``delivered``, or bounced (hard, or ``blocked``), some ``deferred`` first
(a few three times in a row, then nothing: suppressed as soft bounces), opened, clicked or
reported as spam; about 5 % bounces, 1 % spam reports and 2 % deferrals of all events, in the
order they happened, with the run's custom args and SendGrid's other fields. Every measurement
starts from its own copy of the staged outbox (SQLite's backup API; PostgreSQL's ``CREATE
DATABASE … TEMPLATE``), so each takes the very same bodies into the very same outbox:

- *signature + parse* (the floor without a database): ``WebhookSignature.check`` and
  ``parse_sendgrid_events`` on each body, in this process;
- *in-process record* (no HTTP): the same, then ``Outbox.record_delivery_events``, one body at a
  time, each part timed;
- *service*: ``python -m mailroom.cli.main feedback serve`` on a port of its own (its log at
  INFO, one line per POST, as it runs), every body POSTed with its signature, one at a time
  (one client) and then, into another copy, two clients at once (a thread and a kept-alive
  ``requests.Session`` each), events per second from the first request to the last answer and
  each POST's latency. The service's CPU time is read from ``/proc``.
- *retries*: each body posted a second time to the service that took it (as SendGrid retries a
  POST whose answer it did not get): nothing new may be kept (asserted: the answers' ``new``,
  the table's row count).

Each pass's outcome is checked against the bodies: every event kept once and matched to its
recipient, and the in-process record and the sequential service leaving the same suppression
list and soft-bounce counts. ``--profile`` adds where the in-process record's time goes: SQL
statement by statement and cProfile's top functions.

This file writes its figures to a file of its own (``--json``); ``make bench-feedback``
(``run.py --stage feedback``) keeps them under ``feedback`` in ``bench/results.json`` and writes
``BENCHMARKS.md`` again.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_EVENTS_PER_SECOND = 10_000
RECIPIENTS = 200_000
CAMPAIGN = "winter_update"
RUN_ID = "manual__2026-12-07T08:00:00+00:00"
RUN_KEY = f"{CAMPAIGN}/{RUN_ID}"
LOCALES = ("de", "en", "es", "fr", "nl")
PER_REQUEST = 1_000
PER_BODY = 1_000  # SendGrid posts up to 1,000 events (or 768 KB) at a time
SOFT_BOUNCE_LIMIT = 3
DBS = ("sqlite", "postgres")
SECRETS = "feedback-bench-secret-0123456789abcdef"
SEED = 20261207
# What becomes of each recipient (shares of recipients; every one is ``processed`` first):
# about 5 % of all events are bounces, 1 % spam reports, 2 % deferrals.
HARD_BOUNCE, BLOCKED, DEFERRED = 0.105, 0.018, 0.035
OPENED, CLICKED_OF_OPENED, SPAM_OF_DELIVERED = 0.30, 0.27, 0.026
SENT_PER_SECOND = 100
PASSES = ("parse", "record", "service_1", "service_2", "retry_1", "retry_2")


def address(n: int) -> str:
    return f"user{n:07d}@example.org"


def message_id(batch_index: int) -> str:
    """A request's X-Message-Id, as SendGrid makes them (22 characters)."""
    return base64.urlsafe_b64encode(f"mr-{batch_index:06d}-{SEED}".encode()).decode()[:22]


# --- the staged run --------------------------------------------------------------------------
def staged_batches(recipients: int) -> list[Any]:
    from mailroom.delivery.outbox import StagedBatch

    count = math.ceil(recipients / PER_REQUEST)
    return [
        StagedBatch(
            f"{LOCALES[i % len(LOCALES)]}-{i:05d}",
            i,
            LOCALES[i % len(LOCALES)],
            f"{i:064x}",
            min(PER_REQUEST, recipients - i * PER_REQUEST),
        )
        for i in range(count)
    ]


def stage_sent_run(url: str, recipients: int) -> dict[str, Any]:
    """One run of ``recipients`` staged, every request claimed and ``sent`` with its message id."""
    from mailroom.delivery.outbox import BatchState, Outbox

    batches = staged_batches(recipients)
    members = (
        (address(n), f"u{n}", b.batch_id, f"{n:064x}")
        for b in batches
        for n in range(b.batch_index * PER_REQUEST, b.batch_index * PER_REQUEST + b.recipients)
    )
    t0 = time.perf_counter()
    outbox = Outbox(url)
    try:
        outbox.stage(RUN_KEY, "f" * 64, batches, members)
        staged = time.perf_counter() - t0
        for b in batches:
            assert outbox.claim(RUN_KEY, b.batch_id), b.batch_id
            outbox.finish(
                RUN_KEY, b.batch_id, BatchState.SENT, message_id=message_id(b.batch_index)
            )
    finally:
        outbox.dispose()
    return {
        "recipients": recipients,
        "requests": len(batches),
        "stage_seconds": round(staged, 1),
        "claim_finish_seconds": round(time.perf_counter() - t0 - staged, 1),
    }


# --- the bodies ------------------------------------------------------------------------------
@dataclass
class Bodies:
    bodies: list[bytes]
    kinds: Counter[str]
    recipients: int  # how many of the run's recipients the events are about
    batches: int  # how many of its requests
    events: int
    bytes: int
    headers: list[dict[str, str]] = field(default_factory=list)


def _event_id(rng: random.Random) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(16)).decode().rstrip("=")


def recipient_events(n: int, rng: random.Random, sent_at: float) -> list[dict[str, Any]]:
    """What SendGrid reports about one recipient of the run, as it would post it."""
    b = n // PER_REQUEST
    common = {
        "email": address(n),
        "sg_message_id": f"{message_id(b)}.filterdrecv-7bc86b958d-{n % 97:02d}-{b:x}-0",
        "smtp-id": f"<{message_id(b)}@geopod-ismtpd-3-0>",
        "category": ["winter_update"],
        "mailroom_campaign": CAMPAIGN,
        "mailroom_run": RUN_ID,
        "mailroom_batch": f"{LOCALES[b % len(LOCALES)]}-{b:05d}",
    }

    def ev(kind: str, at: float, **extra: Any) -> dict[str, Any]:
        return {
            **common,
            "timestamp": int(at),
            "event": kind,
            "sg_event_id": _event_id(rng),
            **extra,
        }

    out = [ev("processed", sent_at + rng.uniform(0, 2))]
    fate = rng.random()
    t = sent_at + rng.uniform(2, 20)
    if fate < HARD_BOUNCE:
        out.append(
            ev(
                "bounce",
                t,
                type="bounce",
                status="5.1.1",
                reason="550 5.1.1 The email account that you tried to reach does not exist.",
                bounce_classification="Invalid Address",
            )
        )
        return out
    if fate < HARD_BOUNCE + BLOCKED:
        out.append(
            ev(
                "bounce",
                t,
                type="blocked",
                status="4.7.1",
                reason="421 4.7.1 Try again later, closing connection.",
                bounce_classification="Reputation",
            )
        )
        return out
    if fate < HARD_BOUNCE + BLOCKED + DEFERRED:
        times = 3 if rng.random() < 0.2 else rng.choice((1, 1, 2))
        for k in range(times):
            out.append(
                ev(
                    "deferred",
                    t + 60 * k,
                    response="451 4.3.2 Please try again later",
                    attempt=str(k + 1),
                )
            )
        if times == 3:
            return out
        t += 60 * times
    out.append(
        ev("delivered", t, response="250 2.0.0 OK  1765100000 qm12si", ip="149.72.1.1", tls=1)
    )
    if rng.random() < OPENED:
        opened = t + rng.uniform(30, 600)
        agent = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36"
        out.append(ev("open", opened, useragent=agent, ip="203.0.113.7", sg_machine_open=False))
        if rng.random() < CLICKED_OF_OPENED:
            out.append(
                ev(
                    "click",
                    opened + rng.uniform(2, 60),
                    url="https://example.org/winter?utm_source=mailroom",
                    url_offset={"index": 0, "type": "html"},
                    useragent=agent,
                    ip="203.0.113.7",
                )
            )
    if rng.random() < SPAM_OF_DELIVERED:
        out.append(ev("spamreport", t + rng.uniform(60, 600)))
    return out


def make_bodies(count: int, recipients: int) -> Bodies:
    """``count`` bodies of ``PER_BODY`` events: every event of the run's first recipients, in
    the order they happened, as SendGrid batches them up (the opens, clicks and spam reports
    trail: the last bodies hold more of them)."""
    rng = random.Random(SEED)
    wanted = count * PER_BODY
    started = 1_765_100_000.0
    stream: list[tuple[int, int, dict[str, Any]]] = []
    n = 0
    while len(stream) < wanted and n < recipients:
        # SendGrid hands over 100 recipients' messages a second: the events of a body are
        # about recipients of several requests, some minutes apart.
        for e in recipient_events(n, rng, started + n / SENT_PER_SECOND):
            stream.append((e["timestamp"], len(stream), e))
        n += 1
    stream.sort(key=lambda item: (item[0], item[1]))
    events = [e for _, _, e in stream[:wanted]]
    if len(events) < wanted:
        raise SystemExit(f"{recipients:,} recipients make {len(events):,} events: too few")
    bodies = [
        json.dumps(events[i : i + PER_BODY], separators=(", ", ": ")).encode()
        for i in range(0, len(events), PER_BODY)
    ]
    return Bodies(
        bodies=bodies,
        kinds=Counter(
            e["event"] if e["event"] != "bounce" else f"bounce ({e['type']})" for e in events
        ),
        recipients=len({e["email"] for e in events}),
        batches=len({e["mailroom_batch"] for e in events}),
        events=len(events),
        bytes=sum(len(b) for b in bodies),
    )


class Signer:
    """SendGrid's side: an ECDSA P-256 key and its public key as SendGrid shows it."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.key = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key(self) -> str:
        from cryptography.hazmat.primitives import serialization

        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def sign(self, bodies: Bodies) -> None:
        """Signed just now (the service refuses a timestamp more than 300 s away): before each
        pass, outside its clock."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        timestamp = str(int(time.time()))
        bodies.headers = [
            {
                "Content-Type": "application/json",
                "User-Agent": "SendGrid Event API",
                "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(
                    self.key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
                ).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
            }
            for body in bodies.bodies
        ]


# --- outboxes: one staged, a copy per pass ---------------------------------------------------
class Outboxes:
    """The staged outbox and fresh copies of it, each removed on the way out."""

    def __init__(self, db: str, work: Path, stack: contextlib.ExitStack) -> None:
        self.db, self.work, self.stack = db, work, stack
        self.copies = 0
        if db == "sqlite":
            self.staged = f"sqlite:///{work / 'staged.sqlite'}"
        else:
            from services import fresh_database, pg_url

            self.template = stack.enter_context(fresh_database("mailroom_feedback_bench"))
            self.staged = pg_url(self.template)

    def copy(self) -> str:
        self.copies += 1
        if self.db == "sqlite":
            target = self.work / f"copy-{self.copies}.sqlite"
            src = sqlite3.connect(self.work / "staged.sqlite")
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
            return f"sqlite:///{target}"
        from services import fresh_database, pg_url

        copy = fresh_database("mailroom_feedback_bench_copy", template=self.template)
        return pg_url(self.stack.enter_context(copy))


def analyze(url: str) -> None:
    """Fresh planner statistics on the copy, as on a database autovacuum has seen (a new
    PostgreSQL database from a template starts without them)."""
    import sqlalchemy as sa

    if not url.startswith("postgresql"):
        return
    engine = sa.create_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


def outbox_state(url: str) -> dict[str, Any]:
    """What the events left in the outbox: events kept (and matched), suppressions by reason,
    soft-bounce rows (and those at the limit), the run's feedback per outcome."""
    import sqlalchemy as sa

    from mailroom.delivery.outbox import Outbox

    box = Outbox(url)
    try:
        with box.engine.connect() as conn:

            def one(sql: str) -> int:
                return int(conn.exec_driver_sql(sql).scalar_one())

            state = {
                "events_kept": one("SELECT count(*) FROM mailroom_delivery_events"),
                "events_matched": one(
                    "SELECT count(*) FROM mailroom_delivery_events WHERE run_key IS NOT NULL"
                ),
                "soft_bounce_rows": one("SELECT count(*) FROM mailroom_soft_bounces"),
                "soft_bounce_sum": one(
                    "SELECT coalesce(sum(in_a_row), 0) FROM mailroom_soft_bounces"
                ),
                "suppressed": dict(
                    sorted(
                        (str(r), int(n))
                        for r, n in conn.execute(
                            sa.text(
                                "SELECT reason, count(*) FROM mailroom_suppressions GROUP BY reason"
                            )
                        )
                    )
                ),
            }
        feedback = box.delivery_feedback(RUN_KEY)
        state["feedback"] = {
            outcome: sum(per[outcome] for per in feedback.values())
            for outcome in next(iter(feedback.values()), {})
        }
    finally:
        box.dispose()
    return state


# --- in process --------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def figures(events: int, wall: float, latencies: list[float]) -> dict[str, Any]:
    return {
        "seconds": round(wall, 3),
        "events_per_second": round(events / wall) if wall else None,
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * percentile(latencies, 95), 1),
        "max_ms": round(1000 * max(latencies), 1),
    }


def parse_only(bodies: Bodies, public_key: str) -> dict[str, Any]:
    """The signature check and the parse of every body, in this process: the floor."""
    from mailroom.delivery.delivery_events import parse_sendgrid_events
    from mailroom.feedback.webhook_signature import (
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
        WebhookSignature,
    )

    signature = WebhookSignature(public_key)
    parts = {"signature": 0.0, "parse": 0.0}
    latencies: list[float] = []
    parsed = 0
    started = time.perf_counter()
    for body, headers in zip(bodies.bodies, bodies.headers, strict=True):
        t0 = time.perf_counter()
        signature.check(body, headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER])
        t1 = time.perf_counter()
        parsed += len(parse_sendgrid_events(body))
        t2 = time.perf_counter()
        parts["signature"] += t1 - t0
        parts["parse"] += t2 - t1
        latencies.append(t2 - t0)
    wall = time.perf_counter() - started
    assert parsed == bodies.events, (parsed, bodies.events)
    return {
        **figures(bodies.events, wall, latencies),
        "ms_per_body": {k: round(1000 * v / len(bodies.bodies), 2) for k, v in parts.items()},
    }


def record_in_process(url: str, bodies: Bodies, public_key: str) -> dict[str, Any]:
    """What the service's route does with each body, without HTTP: the signature, the parse,
    ``record_delivery_events``; the outbox opened before the clock."""
    from mailroom.delivery.delivery_events import parse_sendgrid_events
    from mailroom.delivery.outbox import Outbox
    from mailroom.feedback.webhook_signature import (
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
        WebhookSignature,
    )

    signature = WebhookSignature(public_key)
    box = Outbox(url)
    parts = {"signature": 0.0, "parse": 0.0, "record": 0.0}
    latencies: list[float] = []
    new = matched = suppressed = 0
    try:
        started = time.perf_counter()
        for body, headers in zip(bodies.bodies, bodies.headers, strict=True):
            t0 = time.perf_counter()
            signature.check(body, headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER])
            t1 = time.perf_counter()
            events = parse_sendgrid_events(body)
            t2 = time.perf_counter()
            done = box.record_delivery_events(events, soft_bounce_limit=SOFT_BOUNCE_LIMIT)
            t3 = time.perf_counter()
            parts["signature"] += t1 - t0
            parts["parse"] += t2 - t1
            parts["record"] += t3 - t2
            latencies.append(t3 - t0)
            new, matched, suppressed = (
                new + done.new,
                matched + done.matched,
                suppressed + done.suppressed,
            )
        wall = time.perf_counter() - started
    finally:
        box.dispose()
    return {
        **figures(bodies.events, wall, latencies),
        "ms_per_body": {k: round(1000 * v / len(bodies.bodies), 2) for k, v in parts.items()},
        "record_only_events_per_second": round(bodies.events / parts["record"]),
        "answers": {"new": new, "matched": matched, "suppressed": suppressed},
    }


def profile_record(url: str, bodies: Bodies, count: int) -> dict[str, Any]:
    """Where ``record_delivery_events``'s time goes: each SQL statement's time as the driver ran
    it (a listener on the engine, no profiler) over the first ``count`` bodies, then cProfile's
    top functions by own time over the next ``count``."""
    import sqlalchemy as sa

    from mailroom.delivery.delivery_events import parse_sendgrid_events
    from mailroom.delivery.outbox import Outbox

    box = Outbox(url)
    timed = [parse_sendgrid_events(b) for b in bodies.bodies[:count]]
    profiled = [parse_sendgrid_events(b) for b in bodies.bodies[count : 2 * count]]
    sql: dict[str, list[float]] = {}
    started: dict[int, float] = {}

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started[id(cursor)] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        t0 = started.pop(id(cursor), None)
        if t0 is not None:
            entry = sql.setdefault(_short_sql(statement), [0.0, 0])
            entry[0] += time.perf_counter() - t0
            entry[1] += 1

    profiler = cProfile.Profile()
    try:
        sa.event.listen(box.engine, "before_cursor_execute", before)
        sa.event.listen(box.engine, "after_cursor_execute", after)
        t0 = time.perf_counter()
        for events in timed:
            box.record_delivery_events(events, soft_bounce_limit=SOFT_BOUNCE_LIMIT)
        total = time.perf_counter() - t0
        sa.event.remove(box.engine, "before_cursor_execute", before)
        sa.event.remove(box.engine, "after_cursor_execute", after)
        profiler.enable()
        for events in profiled:
            box.record_delivery_events(events, soft_bounce_limit=SOFT_BOUNCE_LIMIT)
        profiler.disable()
    finally:
        box.dispose()
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(15)
    n = len(timed)
    return {
        "bodies": n,
        "ms_per_body": round(1000 * total / n, 2),
        "sql_ms_per_body": {
            text: {"ms": round(1000 * s / n, 2), "calls_per_body": round(c / n, 1)}
            for text, (s, c) in sorted(sql.items(), key=lambda kv: -kv[1][0])
        },
        "cprofile_bodies": len(profiled),
        "cprofile_tottime": _profile_lines(buffer.getvalue()),
    }


def _short_sql(statement: str) -> str:
    text = re.sub(r"\s+", " ", statement).strip()
    text = re.sub(r"\bmailroom_", "", text)
    text = re.sub(r"(\(\?(, \?)+\)|\(%\(\w+\)s(, %\(\w+\)s)+\))(, \1)*", "(…)", text)
    text = re.sub(r"(\?|%\(\w+\)s)(, (\?|%\(\w+\)s))+", "…", text)
    return text if len(text) <= 140 else text[:137] + "..."


def _profile_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [
        re.sub(r"/\S*/(site-packages|src|lib/python3\.\d+)/", "", line.rstrip())
        for line in lines[start:]
        if line.strip()
    ]


# --- the service -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """``mailroom feedback serve`` in a process of its own, on a port of its own."""

    def __init__(self, url: str, public_key: str, log: Path) -> None:
        self.outbox_url, self.public_key, self.log = url, public_key, log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Service:
        port = free_port()
        env = {
            **os.environ,
            "MAILROOM_UNSUBSCRIBE_SECRETS": SECRETS,
            "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY": self.public_key,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mailroom.cli.main", "feedback", "serve"),
                    *("--port", str(port), "--outbox-url", self.outbox_url),
                    *("--soft-bounce-limit", str(SOFT_BOUNCE_LIMIT)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        import requests

        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the feedback service did not start: {self.log.read_text()[-2000:]}")

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        from services import stop_group

        if self.process is not None:
            stop_group(self.process)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def post_all(service: Service, bodies: Bodies, clients: int) -> dict[str, Any]:
    """Every body POSTed, ``clients`` at a time (a thread and a kept-alive session each, taking
    the next body in order); events per second from the first request to the last answer."""
    import requests

    endpoint = f"{service.url}/webhooks/sendgrid"
    sessions = [requests.Session() for _ in range(clients)]
    for s in sessions:  # connected before the clock
        assert s.get(f"{service.url}/healthz", timeout=10).status_code == 200
    latencies: list[float] = []
    answers: list[dict[str, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()
    todo = iter(range(len(bodies.bodies)))

    def client(session: requests.Session) -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            t0 = time.perf_counter()
            answer = session.post(
                endpoint, data=bodies.bodies[i], headers=bodies.headers[i], timeout=120
            )
            took = time.perf_counter() - t0
            with lock:
                latencies.append(took)
                if answer.status_code == 200:
                    answers.append(answer.json())
                else:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")

    cpu0 = service.cpu_seconds()
    threads = [threading.Thread(target=client, args=(s,)) for s in sessions]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpu = service.cpu_seconds() - cpu0
    for s in sessions:
        s.close()
    if failures:
        raise RuntimeError(f"{len(failures)} POST(s) failed, the first: {failures[0]}")
    totals = {k: sum(a[k] for a in answers) for k in ("received", "new", "matched", "suppressed")}
    return {
        **figures(bodies.events, wall, latencies),
        "clients": clients,
        "service_cpu_seconds": round(cpu, 2),
        "answers": totals,
    }


# --- one database --------------------------------------------------------------------------------
def bench_db(
    db: str, recipients: int, bodies: Bodies, signer: Signer, work: Path, *, profile: int
) -> dict[str, Any]:
    base = work / db
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    out: dict[str, Any] = {"db": db}
    with contextlib.ExitStack() as stack:
        boxes = Outboxes(db, base, stack)
        out["staging"] = stage_sent_run(boxes.staged, recipients)
        print(
            f"  {db}: staged {recipients:,} recipients in {out['staging']['requests']} "
            f"requests ({out['staging']['stage_seconds']} s; claims and finishes "
            f"{out['staging']['claim_finish_seconds']} s)",
            flush=True,
        )
        urls = {name: boxes.copy() for name in ("record", "service_1", "service_2")}
        if profile:
            urls["profile"] = boxes.copy()
        for url in urls.values():
            analyze(url)
        signer.sign(bodies)
        out["parse"] = parse_only(bodies, signer.public_key)
        _print("signature + parse (in process)", out["parse"])
        signer.sign(bodies)
        out["record"] = record_in_process(urls["record"], bodies, signer.public_key)
        _print("+ record_delivery_events (in process)", out["record"])
        states = {"record": outbox_state(urls["record"])}
        for clients in (1, 2):
            name = f"service_{clients}"
            with Service(urls[name], signer.public_key, base / f"{name}.log") as service:
                signer.sign(bodies)
                out[name] = post_all(service, bodies, clients)
                _print(f"service, {clients} client(s)", out[name])
                after_first = outbox_state(urls[name])
                signer.sign(bodies)
                retry = post_all(service, bodies, clients)
                out[f"retry_{clients}"] = retry
                _print(f"  each body again, {clients} client(s)", retry)
            states[name] = outbox_state(urls[name])
            assert retry["answers"]["new"] == 0, retry["answers"]
            assert states[name] == after_first, (states[name], after_first)
        out["check"] = check(bodies, out, states)
        if profile:
            out["profile"] = profile_record(urls["profile"], bodies, profile)
    return out


def check(bodies: Bodies, out: dict[str, Any], states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every event kept once and matched; the in-process record and the sequential service
    left the same outbox; the retries added nothing."""
    for name, state in states.items():
        assert state["events_kept"] == bodies.events, (name, state, bodies.events)
        assert state["events_matched"] == bodies.events, (name, state)
    for name in ("record", "service_1", "service_2"):
        answers = out[name]["answers"]
        assert answers["new"] == bodies.events, (name, answers)
        assert answers["matched"] == bodies.events, (name, answers)
    for name in ("retry_1", "retry_2"):
        assert out[name]["answers"]["received"] == bodies.events, out[name]["answers"]
    assert states["record"] == states["service_1"], (states["record"], states["service_1"])
    # Two clients may take a recipient's soft bounces in another order: the rest is the same.
    same = {k: v for k, v in states["record"].items() if k not in ("soft_bounce_sum",)}
    two = {k: v for k, v in states["service_2"].items() if k not in ("soft_bounce_sum",)}
    if same != two:
        print(f"    note: two clients left {two}, one left {same}", flush=True)
    return {"state": states["service_1"], "two_clients_state": states["service_2"]}


def _print(label: str, f: dict[str, Any]) -> None:
    print(
        f"    {label:<40} {f['events_per_second']:>8,} events/s  p50 {f['p50_ms']:7.1f} ms  "
        f"p95 {f['p95_ms']:7.1f} ms"
        + (f"  service CPU {f['service_cpu_seconds']:.1f} s" if "service_cpu_seconds" in f else ""),
        flush=True,
    )


def ratios(entry: dict[str, Any]) -> dict[str, float]:
    def rate(name: str) -> float:
        return float(entry[name]["events_per_second"])

    return {
        "service_1_vs_record": round(rate("service_1") / rate("record"), 2),
        "service_2_vs_record": round(rate("service_2") / rate("record"), 2),
        "service_2_vs_service_1": round(rate("service_2") / rate("service_1"), 2),
        "record_vs_parse": round(rate("record") / rate("parse"), 3),
        "retry_1_vs_service_1": round(rate("retry_1") / rate("service_1"), 2),
    }


# What the figures depend on: a change to any of these during a run makes its figures mixed.
SOURCES = (
    "src/mailroom/delivery/outbox.py",
    "src/mailroom/delivery/delivery_events.py",
    "src/mailroom/feedback/service.py",
    "src/mailroom/feedback/webhook_signature.py",
)


def sources() -> dict[str, str]:
    from services import source_digests

    return source_digests(REPO, SOURCES)


def machine() -> dict[str, Any]:
    import starlette
    import uvicorn

    from services import machine_facts

    return machine_facts(starlette=starlette.__version__, uvicorn=uvicorn.__version__)


def bench(
    recipients: int, count: int, dbs: list[str], work: Path, *, profile: int
) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)
    from services import postgres_available

    work.mkdir(parents=True, exist_ok=True)
    code = sources()
    t0 = time.perf_counter()
    bodies = make_bodies(count, recipients)
    print(
        f"{len(bodies.bodies)} bodies of {PER_BODY:,} events "
        f"({bodies.bytes / len(bodies.bodies) / 1024:.0f} KiB each) about "
        f"{bodies.recipients:,} recipients in {bodies.batches} requests, made in "
        f"{time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{k} {100 * n / bodies.events:.1f} %" for k, n in bodies.kinds.most_common()),
        flush=True,
    )
    signer = Signer()
    results: list[dict[str, Any]] = []
    for db in dbs:
        if db != "sqlite" and (why := postgres_available()):
            print(f"  {db} skipped: {why}", flush=True)
            continue
        entry = bench_db(db, recipients, bodies, signer, work, profile=profile)
        entry["ratios"] = ratios(entry)
        results.append(entry)
    report: dict[str, Any] = {
        "machine": machine(),
        "target_events_per_second": TARGET_EVENTS_PER_SECOND,
        "soft_bounce_limit": SOFT_BOUNCE_LIMIT,
        "sources": code,
        "bodies": {
            "count": len(bodies.bodies),
            "events_per_body": PER_BODY,
            "events": bodies.events,
            "kib_per_body": round(bodies.bytes / len(bodies.bodies) / 1024, 1),
            "recipients": bodies.recipients,
            "requests": bodies.batches,
            "kinds": dict(bodies.kinds.most_common()),
        },
        "results": results,
    }
    if sources() != code:
        report["sources_changed_during_run"] = sources()
        print("WARNING: the ingest's sources changed during the run: the figures are mixed")
    print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    print()
    print(f"Feedback ingest (target ≥ {report['target_events_per_second']:,} events/s)")
    print("| db | pass | events/s | p50 ms | p95 ms | service CPU s |")
    print("|---|---|---:|---:|---:|---:|")
    for e in report["results"]:
        for name in PASSES:
            f = e[name]
            cpu = f.get("service_cpu_seconds")
            print(
                f"| {e['db']} | {name} | {f['events_per_second']:,} | {f['p50_ms']} | "
                f"{f['p95_ms']} | {'' if cpu is None else cpu} |"
            )
        print(f"| {e['db']} | ratios | {e['ratios']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=RECIPIENTS)
    parser.add_argument(
        "--bodies", type=int, default=100, help=f"bodies of {PER_BODY:,} events per pass"
    )
    parser.add_argument("--db", nargs="+", default=list(DBS), choices=DBS)
    parser.add_argument(
        "--profile",
        type=int,
        default=20,
        metavar="BODIES",
        help="profile the in-process record on this many bodies (0: not at all)",
    )
    parser.add_argument("--work", type=Path, default=REPO / "var" / "bench" / "feedback")
    parser.add_argument(
        "--json", type=Path, default=None, help="the figures (default: <work>/feedback.json)"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = args.work.resolve()
    report = bench(args.recipients, args.bodies, args.db, work, profile=args.profile)
    out = args.json or work / "feedback.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for db in args.db:
        shutil.rmtree(work / db, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
