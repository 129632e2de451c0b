"""A shard's window of requests in flight, through the kept-alive pool, against the dev server.

Concurrency is read at the server (``peak_in_flight``: the most mail-send requests it answered
at once; ``connections``: how many connections the client opened), never from timings: with
``Faults(hold_until_in_flight=N)`` the server answers nothing until N requests are in at once,
so a window of N shows N, and a window of fewer would never get there.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroom.batches import serialise
from mailroom.checks.envelope_guard import GuardedBody
from mailroom.delivery.outbox import BatchState
from mailroom.delivery.rate import RateLimiter, RetryPolicy
from mailroom.delivery.transports.base import Delivery, Transport
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import TransportError
from sendgrid_dev import Faults, SendGridDevServer, accepted_recipients
from support.runs import Staged, stage_requests

pytestmark = pytest.mark.unit

API_KEY = "SG.window-test-key"
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)
NO_LIMIT = RateLimiter(None, None)
WINDOW = 4
BATCHES = 10


def body_for(batch_id: str, emails: list[str]) -> bytes:
    """A frozen request: shared content, one personalization per address with its own link."""
    personalizations = []
    for i, email in enumerate(emails):
        url = f"https://example-exchange.test/u?token={hashlib.sha256(email.encode()).hexdigest()[:20]}"
        personalizations.append(
            {
                "to": [{"email": email}],
                "substitutions": {
                    "%%first_name%%": f"Ana {i}",
                    "%%unsubscribe_url%%": url,
                    "%%unsubscribe_url|html%%": html.escape(url, quote=True),
                },
                "headers": {"List-Unsubscribe": f"<{url}>"},
            }
        )
    return serialise(
        {
            "personalizations": personalizations,
            "from": {"email": "news@example-exchange.test", "name": "Example Exchange"},
            "subject": "Hello %%first_name%%",
            "content": [
                {"type": "text/plain", "value": "Hi %%first_name%% %%unsubscribe_url%%"},
                {"type": "text/html", "value": '<a href="%%unsubscribe_url|html%%">x</a>'},
            ],
            "custom_args": {"mailroom_batch": batch_id},
        }
    )


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[Staged]:
    """BATCHES frozen requests of two recipients each, staged and cleared by the guard's pass."""
    requests = []
    for index in range(BATCHES):
        emails = [f"p{index}.{n}@example.com" for n in range(2)]
        requests.append((emails, lambda batch_id, emails=emails: body_for(batch_id, emails)))
    run = stage_requests(
        tmp_path,
        "winter_update/manual__window",
        requests,
        limiter=NO_LIMIT,
        retry=FAST_RETRY,
        max_in_flight=WINDOW,
    )
    yield run
    run.outbox.dispose()


@pytest.fixture
def server() -> Iterator[SendGridDevServer]:
    with SendGridDevServer(api_key=API_KEY) as running:
        yield running


def sendgrid(server: SendGridDevServer) -> SendGridTransport:
    return SendGridTransport(SendGridSettings(API_KEY, server.url, timeout_seconds=20))


def received_once(server: SendGridDevServer, staged: Staged) -> None:
    received = Counter(a.lower() for a in accepted_recipients(server.accepted()))
    assert max(received.values(), default=1) == 1


# -- the window at the server ------------------------------------------------------------------


def test_the_window_keeps_that_many_requests_at_the_server_at_once_and_no_more(
    server: SendGridDevServer, staged: Staged
) -> None:
    server.set_faults(Faults(hold_until_in_flight=WINDOW))

    with sendgrid(server) as transport:
        summary = staged.send(transport, max_in_flight=WINDOW)

    stats = server.stats()
    assert stats.peak_in_flight == WINDOW
    assert stats.connections <= WINDOW  # kept alive: one per request in flight, not per request
    assert summary["states"] == {BatchState.SENT: BATCHES}
    assert stats.accepted == BATCHES
    received_once(server, staged)
    states = staged.outbox.states(staged.run_key)
    assert {s.message_id for s in states.values()} == {r["message_id"] for r in server.accepted()}
    staged.accounted()


def test_one_in_flight_is_one_request_at_a_time_over_one_connection(
    server: SendGridDevServer, staged: Staged
) -> None:
    with sendgrid(server) as transport:
        staged.send(transport, max_in_flight=1)

    stats = server.stats()
    assert (stats.peak_in_flight, stats.connections, stats.accepted) == (1, 1, BATCHES)


class OneAtATime(Transport):
    """A whole-request transport that does not say it takes several requests at once."""

    name = "one-at-a-time"

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        self.threads.add(threading.current_thread().name)
        return Delivery(f"id-{guarded.sha256[:8]}", 202)


def test_a_transport_that_takes_one_request_at_a_time_gets_no_window(staged: Staged) -> None:
    transport = OneAtATime()

    summary = staged.send(transport, max_in_flight=8)

    assert summary["states"] == {BatchState.SENT: BATCHES}
    assert transport.threads == {threading.current_thread().name}


def test_a_window_below_one_is_refused(staged: Staged) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        staged.send(OneAtATime(), max_in_flight=0)
    assert staged.states() == dict.fromkeys(staged.states(), BatchState.STAGED)


# -- faults through the window -----------------------------------------------------------------


def test_lost_answers_in_the_window_are_exactly_the_unknown_batches_and_never_resent(
    server: SendGridDevServer, staged: Staged
) -> None:
    server.set_faults(Faults(drop_after_accept_every=3, hold_until_in_flight=WINDOW))

    with sendgrid(server) as transport:
        staged.send(transport)

    sent_ids = {r.message_id for r in staged.outbox.states(staged.run_key).values()}
    dropped = {
        r["body"]["custom_args"]["mailroom_batch"]
        for r in server.accepted()
        if r["message_id"] not in sent_ids
    }
    unknown = {b for b, state in staged.states().items() if state == BatchState.UNKNOWN}
    assert unknown == dropped
    assert len(unknown) == server.stats().dropped_after_accept == BATCHES // 3
    received = server.stats().received

    with sendgrid(server) as transport:
        again = staged.send(transport)

    assert server.stats().received == received
    assert again["skipped_already_done"] == BATCHES
    received_once(server, staged)
    staged.accounted()


@pytest.mark.parametrize(
    "faults",
    [
        Faults(status_429_every=2, retry_after_seconds=0),
        Faults(status_5xx_every=2),
        Faults(delay_seconds=0.05),
        Faults(status_429_every=5, status_5xx_every=7, drop_after_accept_every=4),
    ],
    ids=["429-storm", "5xx", "slow-answers", "everything"],
)
def test_faults_through_the_window_send_each_batch_once_and_account_for_everyone(
    server: SendGridDevServer, staged: Staged, faults: Faults
) -> None:
    server.set_faults(faults)

    with sendgrid(server) as transport:
        # Enough attempts that no batch runs out of them, however the window interleaves them.
        summary = staged.send(
            transport, retry=RetryPolicy(max_attempts=30, base_delay=0.002, max_delay=0.01)
        )

    received_once(server, staged)
    counts = staged.accounted()
    assert counts[BatchState.FAILED]["batches"] == 0
    assert summary["states"].get(BatchState.UNKNOWN, 0) == server.stats().dropped_after_accept
    # Every claim was made once; retries happen inside it.
    assert {r.attempts for r in staged.outbox.states(staged.run_key).values()} == {1}


def test_a_halt_stops_new_requests_and_the_ones_in_flight_finish_recorded(
    server: SendGridDevServer, staged: Staged
) -> None:
    server.set_faults(Faults(hold_until_in_flight=WINDOW))

    def halt_once_the_window_is_full() -> str | None:
        # The dispatcher asks before each new request: the window's first WINDOW are in by the
        # time it asks for the one after them (it waited for room).
        return "operator halt" if server.stats().peak_in_flight >= WINDOW else None

    with sendgrid(server) as transport:
        summary = staged.send(
            transport, halt_signal=halt_once_the_window_is_full, halt_signal_interval=0.0
        )

    assert summary["states"] == {BatchState.SENT: WINDOW, BatchState.HALTED: BATCHES - WINDOW}
    assert server.stats().received == WINDOW
    staged.accounted()

    assert staged.outbox.request_halt(staged.run_key, halted=False)
    with sendgrid(server) as transport:
        resumed = staged.send(transport)

    assert resumed["states"] == {BatchState.SENT: BATCHES}
    assert server.stats().accepted == BATCHES
    received_once(server, staged)
    assert staged.accounted()[BatchState.SENT]["recipients"] == len(staged.addresses)


def test_consecutive_failures_in_the_window_halt_the_run_once(
    server: SendGridDevServer, staged: Staged, caplog: pytest.LogCaptureFixture
) -> None:
    server.set_faults(Faults(status_5xx_every=1))
    caplog.set_level(logging.ERROR, logger="mailroom.delivery.shards")

    with sendgrid(server) as transport:
        staged.send(transport, retry=RetryPolicy(max_attempts=1), max_consecutive_failures=2)

    states = Counter(staged.states().values())
    assert states[BatchState.FAILED] >= 2
    assert states[BatchState.FAILED] + states[BatchState.HALTED] == BATCHES
    assert staged.outbox.halt_requested(staged.run_key)
    assert sum("halting the run" in r.getMessage() for r in caplog.records) == 1
    staged.accounted()


# -- a 429 holds the whole window --------------------------------------------------------------


class RateLimitedOnce(Transport):
    """Answers 429 with a Retry-After to the first request only; records when each started."""

    name = "rate-limited-once"
    max_in_flight = 8

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        self.started: list[tuple[str, float]] = []
        self.lock = threading.Lock()
        self.answered_429_at: float | None = None

    def _deliver(self, guarded: GuardedBody) -> Delivery:
        batch = json.loads(guarded.body)["custom_args"]["mailroom_batch"]
        with self.lock:
            self.started.append((batch, time.monotonic()))
            first = len(self.started) == 1
            if first:
                self.answered_429_at = time.monotonic()
        if first:
            raise TransportError(
                "SendGrid answered 429", status=429, retryable=True, retry_after=self.retry_after
            )
        return Delivery(f"id-{batch}", 202)


class SecondSlotAfterTheRetryIsScheduled:
    """A rate limiter that lets the second request take its slot only once the shard has
    logged the first request's retry (which it does right after pausing the shard)."""

    def __init__(self) -> None:
        self.calls = 0
        self.retry_scheduled = threading.Event()

    def acquire(self, recipients: int) -> None:
        self.calls += 1
        if self.calls == 2:
            assert self.retry_scheduled.wait(30)


def test_a_429_holds_every_new_request_of_the_shard_for_its_retry_after(staged: Staged) -> None:
    retry_after = 0.3
    transport = RateLimitedOnce(retry_after)
    limiter = SecondSlotAfterTheRetryIsScheduled()

    class OnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retry 1 in" in record.getMessage():
                limiter.retry_scheduled.set()

    handler = OnRetry(logging.WARNING)
    shards_log = logging.getLogger("mailroom.delivery.shards")
    shards_log.addHandler(handler)
    try:
        summary = staged.send(
            transport, limiter=limiter, retry=RetryPolicy(max_delay=5.0), max_in_flight=WINDOW
        )
    finally:
        shards_log.removeHandler(handler)

    assert summary["states"] == {BatchState.SENT: BATCHES}
    assert transport.answered_429_at is not None
    # Each request after the 429 started no sooner than its Retry-After allowed: the pause is
    # the shard's, not only the answered request's (an ordering of the clock, not a duration).
    later = [at for _, at in transport.started[1:]]
    assert len(later) == BATCHES  # the 429's retry and every other batch
    assert min(later) >= transport.answered_429_at + retry_after
    staged.accounted()
