"""send_shard: send one shard's frozen batches, each exactly once or accounted for.

Nothing of a run leaves before the envelope guard has cleared every one of its requests
(``guard_shard``, once per shard after approval): a broken or edited body anywhere in the run
stops it before its first request, not when a shard reaches that body. Then, before every
request, the shard checks for a halt, claims the batch in the outbox (compare-and-set), and sends
the frozen bytes through a transport, handing it what the guard's pass recorded for the batch
(``Clearance``): bytes whose SHA-256 is the one the pass cleared are not parsed a second time,
any other bytes are refused. Outcomes go back to the outbox; a request whose answer was lost
becomes ``unknown`` and is never resent here. A transport that sends one message per recipient
(SMTP) also gets the batch's ledger in the outbox, records each message there, and skips the
ones already recorded when a batch is retried or resumed.

A shard keeps a window of up to ``max_in_flight`` whole requests in flight (the campaign's
setting; a per-recipient transport sends one batch at a time and keeps that many messages in
flight itself, over as many connections), each in a thread of its own: the shard itself still
checks for a halt, takes the run's rate slot and claims each batch before its request starts,
in the manifest's order, and every request records its own outcome when it ends. A halt stops
new requests; those in flight finish and are recorded. A 429 holds every new request and retry
of the shard for its ``Retry-After``, not only the one answered.

What such a transport sends is not the guarded body but messages it builds from it, so the
guard on the bodies is not all: before the shard's first message leaves, ``send_shard`` has the
transport build and check every message of every batch it is about to send
(``Transport.preflight``), and ``guard_shard``, given the run's transport, does the same in the
guard pass, before anything of the run leaves. A message that would be refused in the shard's
last batch stops the shard with nothing sent. The messages are built again as they leave and
none is kept in between: memory stays one message deep whatever the shard's size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mailroom.addresses import mask_addresses
from mailroom.batches import BatchEntry, Manifest
from mailroom.checks.envelope_guard import ApprovedManifest, check_envelope
from mailroom.delivery.outbox import BatchState, Outbox
from mailroom.delivery.rate import RateLimiter, RetryPolicy, SharedRateLimiter
from mailroom.delivery.transports.base import Clearance, Transport
from mailroom.errors import EnvelopeViolation, SendHalted, TransportError

log = logging.getLogger(__name__)


@dataclass
class ShardProgress:
    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    recipients_sent: int = 0
    skipped: int = 0
    states: dict[str, int] = field(default_factory=dict)

    def record(self, state: BatchState, recipients: int) -> None:
        self.done += 1
        self.states[state.value] = self.states.get(state.value, 0) + 1
        if state == BatchState.SENT:
            self.recipients_sent += recipients

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        remaining = self.total - self.done - self.skipped
        eta = remaining / rate if rate > 0 else float("inf")
        return (
            f"batches {self.done + self.skipped}/{self.total}, "
            f"recipients sent {self.recipients_sent}, "
            f"{rate:.1f} req/s, {self.recipients_sent / elapsed:.0f} recipients/s, ETA {eta:.0f}s, "
            f"states {self.states}"
        )


def guard_shard(
    *,
    run_key: str,
    manifest: Manifest,
    shared: Mapping[str, Mapping[str, Any]],
    public: frozenset[str] = frozenset(),
    batches_dir: Path,
    shard_index: int,
    shard_count: int,
    outbox: Outbox,
    transport: Transport | None = None,
    log_every: int = 100,
) -> dict[str, Any]:
    """The envelope guard on every request of this shard, before any request of the run leaves.

    Each body is checked as ``Transport.send`` checks it (the exact bytes against the approved
    manifest and the recipients the outbox registered for its batch) and, given the transport
    the run sends through, what that transport would make of it (``Transport.preflight``: for
    SMTP, every message); the batches it clears are recorded in the outbox, which is what lets
    ``send_shard`` start. The first refusal marks that batch ``failed``, halts the run and leaves
    every batch of it not yet sent ``halted`` with the reason, then raises
    ``EnvelopeViolation``: nothing of the run is sent.
    """
    mine = manifest.shard(shard_index, shard_count)
    approved = ApprovedManifest(manifest.sha256, manifest.digests, shared, public)
    started = time.monotonic()
    cleared: list[tuple[str, str]] = []
    personalizations = 0
    for position, entry in enumerate(mine, start=1):
        body = (batches_dir / entry.file).read_bytes()
        try:
            guarded = check_envelope(body, approved, outbox.batch_members(run_key, entry.batch_id))
            if transport is not None:
                transport.preflight(guarded)
        except EnvelopeViolation as exc:
            outbox.mark_guarded(run_key, cleared)
            _refuse_before_sending(
                run_key, manifest, entry, outbox, exc, f"guard shard {shard_index}"
            )
            raise
        cleared.append((entry.batch_id, guarded.sha256))
        personalizations += len(guarded.recipients)
        if position % log_every == 0 or position == len(mine):
            elapsed = max(time.monotonic() - started, 1e-6)
            log.info(
                "guard shard %d/%d: %d/%d batches cleared, %d recipients, %.0f recipients/s",
                shard_index,
                shard_count,
                position,
                len(mine),
                personalizations,
                personalizations / elapsed,
            )
    outbox.mark_guarded(run_key, cleared)
    return {
        "shard": shard_index,
        "batches": len(cleared),
        "recipients": personalizations,
        "seconds": round(time.monotonic() - started, 3),
    }


def send_shard(
    *,
    run_key: str,
    manifest: Manifest,
    shared: Mapping[str, Mapping[str, Any]],
    public: frozenset[str] = frozenset(),
    batches_dir: Path,
    shard_index: int,
    shard_count: int,
    transport: Transport,
    outbox: Outbox,
    limiter: RateLimiter | SharedRateLimiter,
    retry: RetryPolicy = RetryPolicy(),
    log_every: int = 10,
    max_consecutive_failures: int | None = None,
    halt_signal: Callable[[], str | None] | None = None,
    halt_signal_interval: float = 1.0,
    max_in_flight: int = 1,
) -> dict[str, Any]:
    """Send this shard's batches; returns counts per final state for this shard.

    ``max_in_flight``: how many requests may be in flight at once (the campaign's
    ``max_in_flight``; at most what the transport takes, ``Transport.max_in_flight``).

    After ``max_consecutive_failures`` batches in a row end failed or unknown, the shard halts
    the whole run instead of burning through the list; an operator resumes it. ``halt_signal``
    is an outside halt switch (an Airflow Variable), looked at every ``halt_signal_interval``
    seconds at most; when it
    answers a reason, the run is halted in the outbox for every shard.
    """
    unguarded = outbox.unguarded(run_key)
    if unguarded:
        raise EnvelopeViolation(
            f"{unguarded} of the run's {len(manifest.batches)} request(s) have not been cleared "
            "by the envelope guard (guard_shard, for every shard, after approval): nothing of "
            "the run is sent"
        )
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    clearances = Clearance.read(outbox, run_key)
    mine = manifest.shard(shard_index, shard_count)
    approved = ApprovedManifest(manifest.sha256, manifest.digests, shared, public)
    interrupted = outbox.mark_interrupted(run_key, [b.batch_id for b in mine])
    if interrupted:
        log.warning(
            "shard %d: %d batch(es) were interrupted mid-request: %s",
            shard_index,
            interrupted,
            "the message being sent of each is now 'unknown', the messages on record stay sent "
            "and the rest continue"
            if transport.delivers_per_recipient
            else "each whole request is now 'unknown' (the provider may have accepted it) and "
            "is not resent",
        )
    progress = ShardProgress(total=len(mine))
    if transport.delivers_per_recipient:
        # One batch at a time; the transport keeps its own messages in flight.
        transport.in_flight = min(max_in_flight, transport.max_in_flight)
    window = _Window(
        1 if transport.delivers_per_recipient else min(max_in_flight, transport.max_in_flight)
    )
    log.info(
        "shard %d/%d: %d batches, %d recipients, up to %d request(s) in flight",
        shard_index,
        shard_count,
        len(mine),
        sum(b.recipients for b in mine),
        window.size,
    )
    settled = {
        batch_id
        for batch_id, st in outbox.states(run_key, [b.batch_id for b in mine]).items()
        if st.state not in (BatchState.STAGED, BatchState.HALTED)
    }
    if transport.delivers_per_recipient and not outbox.halt_requested(run_key):
        _preflight_shard(
            run_key,
            manifest,
            [b for b in mine if b.batch_id not in settled],
            batches_dir,
            approved,
            transport,
            outbox,
            shard_index,
            clearances,
        )
    consecutive_failures = 0
    paused_for_failures = False
    pause = _Pause()

    def record(ended: list[tuple[BatchEntry, BatchState]]) -> None:
        """Requests that ended (each has recorded its own outcome): progress, the run of
        failures, the log."""
        nonlocal consecutive_failures, paused_for_failures
        for entry, state in ended:
            progress.record(state, entry.recipients)
            if state != BatchState.HALTED:  # a halt mid-batch is not a failure
                consecutive_failures = 0 if state == BatchState.SENT else consecutive_failures + 1
            if (
                max_consecutive_failures
                and consecutive_failures >= max_consecutive_failures
                and not paused_for_failures
            ):
                paused_for_failures = True
                reason = f"paused after {consecutive_failures} consecutive failed batches"
                outbox.request_halt(run_key, reason=reason)
                log.error("shard %d: %s: halting the run", shard_index, reason)
            if progress.done % log_every == 0:
                log.info("shard %d: %s", shard_index, progress.line())

    signal_checked = 0.0

    def stop_if_halted(position: int) -> bool:
        """When the run is halted, leave this batch and every later one ``halted``."""
        if not outbox.halt_requested(run_key):
            return False
        halted = outbox.halt_remaining(run_key, [b.batch_id for b in mine[position:]])
        log.warning(
            "shard %d: %s; %d batch(es) left 'halted'%s",
            shard_index,
            outbox.halt_reason(run_key) or "halt requested",
            halted,
            f", {window.in_flight} request(s) in flight finish" if window.in_flight else "",
        )
        return True

    try:
        for position, entry in enumerate(mine):
            record(window.ended(room=True))
            if (
                halt_signal is not None
                and time.monotonic() - signal_checked >= halt_signal_interval
            ):
                signal_checked = time.monotonic()
                if reason := halt_signal():
                    outbox.request_halt(run_key, reason=reason)
            if stop_if_halted(position):
                break
            if entry.batch_id in settled:
                progress.skipped += 1
                continue
            # Wait for a 429's pause and the run's rate slot while the batch is still 'staged':
            # a worker killed while waiting leaves nothing in doubt. (The pause again after the
            # slot: a 429 may have come meanwhile.)
            pause.wait()
            limiter.acquire(entry.recipients)
            pause.wait()
            if not outbox.claim(run_key, entry.batch_id):
                # A halt that came while the shard waited for its slot refuses the claim.
                if stop_if_halted(position):
                    break
                progress.skipped += 1
                continue
            window.submit(
                entry,
                partial(
                    _send_batch,
                    run_key,
                    entry,
                    batches_dir,
                    approved,
                    transport,
                    outbox,
                    limiter,
                    retry,
                    clearances.get(entry.batch_id),
                    pause,
                ),
            )
            record(window.ended())
    except BaseException:
        window.abandon()
        raise
    record(window.close())
    if progress.done % log_every:
        log.info("shard %d: %s", shard_index, progress.line())
    states = outbox.states(run_key, [b.batch_id for b in mine])
    summary: dict[str, int] = {}
    for st in states.values():
        summary[st.state.value] = summary.get(st.state.value, 0) + 1
    return {
        "shard": shard_index,
        "batches": len(mine),
        "states": summary,
        "recipients_sent": progress.recipients_sent,
        "skipped_already_done": progress.skipped,
    }


def _preflight_shard(
    run_key: str,
    manifest: Manifest,
    entries: Sequence[BatchEntry],
    batches_dir: Path,
    approved: ApprovedManifest,
    transport: Transport,
    outbox: Outbox,
    shard_index: int,
    clearances: Mapping[str, Clearance],
) -> None:
    """Every message of these batches built and checked by the transport before the shard's
    first one leaves (``Transport.preflight``); a refusal refuses the batch and halts the run."""
    started = time.monotonic()
    messages = 0
    for entry in entries:
        body = (batches_dir / entry.file).read_bytes()
        try:
            guarded = transport.guard(
                body,
                approved,
                outbox.batch_members(run_key, entry.batch_id),
                clearances.get(entry.batch_id),
            )
            transport.preflight(guarded)
        except EnvelopeViolation as exc:
            _refuse_before_sending(run_key, manifest, entry, outbox, exc, f"shard {shard_index}")
            raise
        messages += entry.recipients
    log.info(
        "shard %d: %d message(s) of %d batch(es) built and checked by the %s transport before "
        "the first leaves, in %.1fs",
        shard_index,
        messages,
        len(entries),
        transport.name,
        time.monotonic() - started,
    )


def _refuse_before_sending(
    run_key: str,
    manifest: Manifest,
    entry: BatchEntry,
    outbox: Outbox,
    exc: EnvelopeViolation,
    where: str,
) -> None:
    """A batch refused before any request of it left: the batch ``failed``, the run halted and
    every batch of it not yet sent ``halted`` with the reason."""
    reason = f"envelope guard refused batch {entry.batch_id} before sending: {exc}"
    outbox.refuse(run_key, entry.batch_id, f"envelope guard: {exc}")
    outbox.request_halt(run_key, reason=reason)
    halted = outbox.halt_remaining(run_key, [b.batch_id for b in manifest.batches])
    log.error(
        "%s: batch %s refused (%s); the run is halted, %d batch(es) left 'halted', nothing "
        "more is sent",
        where,
        entry.batch_id,
        mask_addresses(str(exc)),
        halted,
    )


def _send_batch(
    run_key: str,
    entry: BatchEntry,
    batches_dir: Path,
    approved: ApprovedManifest,
    transport: Transport,
    outbox: Outbox,
    limiter: RateLimiter | SharedRateLimiter,
    retry: RetryPolicy,
    cleared: Clearance | None = None,
    pause: _Pause | None = None,
) -> BatchState:
    """One claimed batch's request, retried while the answer allows; records the outcome."""
    body = (batches_dir / entry.file).read_bytes()
    members: Mapping[str, str | None] = (
        _Members(outbox, run_key, entry.batch_id)
        if cleared is not None and not transport.delivers_per_recipient
        else outbox.batch_members(run_key, entry.batch_id)
    )
    ledger = outbox.ledger(run_key, entry.batch_id) if transport.delivers_per_recipient else None
    if ledger is None and outbox.recipient_outcomes(run_key, entry.batch_id):
        # Partly sent one message per recipient: a whole request would send those again.
        error = (
            f"recipients of this batch already have outcomes of their own: the {transport.name} "
            "transport sends whole requests and would send them again"
        )
        outbox.finish(run_key, entry.batch_id, BatchState.FAILED, error=error)
        log.error("batch %s: %s", entry.batch_id, error)
        return BatchState.FAILED
    attempt = 0
    while True:
        attempt += 1
        if attempt > 1:
            if pause is not None:
                pause.wait()
            limiter.acquire(entry.recipients)
            if pause is not None:
                pause.wait()
        try:
            delivery = transport.send(
                body, approved, expected_recipients=members, ledger=ledger, cleared=cleared
            )
        except SendHalted as exc:
            outbox.finish(run_key, entry.batch_id, BatchState.HALTED, error=str(exc))
            log.warning("batch %s: halted mid-batch: %s", entry.batch_id, exc)
            return BatchState.HALTED
        except EnvelopeViolation as exc:
            outbox.finish(
                run_key, entry.batch_id, BatchState.FAILED, error=f"envelope guard: {exc}"
            )
            # One refused batch means the frozen batches cannot be trusted: stop every shard of the
            # run, not only this one (a retried shard would otherwise carry on with the rest).
            outbox.request_halt(
                run_key, reason=f"envelope guard refused batch {entry.batch_id}: {exc}"
            )
            raise
        except TransportError as exc:
            message = mask_addresses(str(exc))
            if exc.outcome_unknown:
                outbox.finish(run_key, entry.batch_id, BatchState.UNKNOWN, error=message)
                log.warning(
                    "batch %s: outcome unknown (%s); not resending", entry.batch_id, message
                )
                return BatchState.UNKNOWN
            if exc.retryable and attempt < retry.max_attempts:
                delay = retry.delay(attempt, exc.retry_after)
                if exc.status == 429 and pause is not None:
                    pause.hold(delay)  # the whole shard waits, not only this request
                log.warning(
                    "batch %s: %s; retry %d in %.1fs", entry.batch_id, message, attempt, delay
                )
                time.sleep(delay)
                continue
            outbox.finish(run_key, entry.batch_id, BatchState.FAILED, error=message)
            log.error("batch %s: failed after %d attempt(s): %s", entry.batch_id, attempt, message)
            return BatchState.FAILED
        outbox.finish(run_key, entry.batch_id, BatchState.SENT, message_id=delivery.message_id)
        return BatchState.SENT


class _Members(Mapping[str, str | None]):
    """Who a batch is for (``Outbox.batch_members``), read from the outbox when first needed:
    the full guard needs them, a body the guard's pass cleared goes without them."""

    def __init__(self, outbox: Outbox, run_key: str, batch_id: str) -> None:
        self._read = partial(outbox.batch_members, run_key, batch_id)
        self._members: dict[str, str | None] | None = None

    def _all(self) -> dict[str, str | None]:
        if self._members is None:
            self._members = self._read()
        return self._members

    def __getitem__(self, email: str) -> str | None:
        return self._all()[email]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class _Pause:
    """A pause of the whole shard: a 429's ``Retry-After`` holds every new request and retry,
    not only the request it answered."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self) -> None:
        while (left := self._until - time.monotonic()) > 0:
            time.sleep(left)


class _Window:
    """Up to ``size`` requests in flight, each in a thread of its own; with ``size`` 1 each is
    sent in the calling thread, one after the other."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._pool = (
            ThreadPoolExecutor(self.size, thread_name_prefix="mailroom-send")
            if self.size > 1
            else None
        )
        self._running: dict[Future[BatchState], BatchEntry] = {}
        self._ended: list[tuple[BatchEntry, BatchState]] = []

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def submit(self, entry: BatchEntry, send: Callable[[], BatchState]) -> None:
        if self._pool is None:
            self._ended.append((entry, send()))
        else:
            self._running[self._pool.submit(send)] = entry

    def ended(self, *, room: bool = False) -> list[tuple[BatchEntry, BatchState]]:
        """The requests that ended since last asked; with ``room``, first waits until fewer
        than ``size`` are in flight. Raises what a request raised."""
        if room and len(self._running) >= self.size:
            wait(self._running, return_when=FIRST_COMPLETED)
        return self._collect()

    def close(self) -> list[tuple[BatchEntry, BatchState]]:
        """Waits for every request in flight to end; returns the ones not yet collected."""
        try:
            if self._running:
                wait(self._running)
            return self._collect()
        finally:
            self._shutdown()

    def abandon(self) -> None:
        """The shard stops on an error: the requests in flight still end and record their
        outcome (their own errors are logged: the first error is the one raised)."""
        try:
            if self._running:
                wait(self._running)
            for future, entry in self._running.items():
                if (error := future.exception()) is not None:
                    log.error(
                        "batch %s: %s",
                        entry.batch_id,
                        mask_addresses(f"{type(error).__name__}: {error}"),
                    )
            self._running.clear()
        finally:
            self._shutdown()

    def _collect(self) -> list[tuple[BatchEntry, BatchState]]:
        error: BaseException | None = None
        for future in [f for f in self._running if f.done()]:
            entry = self._running.pop(future)
            if (raised := future.exception()) is not None:
                error = error or raised
            else:
                self._ended.append((entry, future.result()))
        ended, self._ended = self._ended, []
        if error is not None:
            raise error
        return ended

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
