"""20,000 recipients through every fault the dev server can inject, four shards at once, one
request at a time per shard and through a window of four in flight per shard."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mailroom import pipeline
from mailroom.audience.sample import SampleAudience, generate
from mailroom.batches import load_manifest, shared_parts
from mailroom.delivery.outbox import FINAL_STATES, BatchState, Outbox
from mailroom.delivery.rate import RetryPolicy, SharedRateLimiter
from mailroom.delivery.shards import send_shard
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.pipeline import ProjectPaths, Run
from sendgrid_dev import Faults, SendGridDevServer, accepted_recipients
from support.runs import built_run

pytestmark = pytest.mark.unit
SHARDS = 4


def guarded_run(tmp_path: Path, run_id: str, *, users: int) -> tuple[Run, SampleAudience, Outbox]:
    """The example campaign in batches of 100, frozen for ``SHARDS`` shards and through the
    guard's pass: what the send shards start from after approval."""
    include = tmp_path / "include"
    shutil.copytree(Path(__file__).resolve().parents[2] / "include", include)
    spec_path = include / "campaigns" / "winter_update.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["batch_size"] = 100
    spec_path.write_text(yaml.safe_dump(spec))
    audience = generate(tmp_path / "users.sqlite", users=users)
    run = built_run(
        ProjectPaths.under(include),
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id=run_id,
        shard_count=SHARDS,
        secret=b"faults",
    )
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    pipeline.guard_shard(run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox)
    return run, audience, outbox


@pytest.mark.parametrize("window", [1, 4], ids=["one-in-flight", "four-in-flight"])
def test_every_fault_at_once_ends_with_each_recipient_accounted_for(
    tmp_path: Path, window: int
) -> None:
    run, audience, outbox = guarded_run(tmp_path, "manual__faults", users=20_000)
    manifest = load_manifest(run.staging.manifest)

    faults = Faults(
        status_429_every=7,
        status_5xx_every=5,
        delay_seconds=0.002,
        drop_after_accept_every=13,
        max_requests_per_second=300,
        retry_after_seconds=0,
    )
    errors: list[BaseException] = []
    with SendGridDevServer(faults=faults) as server:

        def shard(index: int) -> None:
            try:
                send_shard(
                    run_key=run.run_key,
                    manifest=manifest,
                    shared=shared_parts(run.spec(), pipeline.load_contents(run), manifest),
                    batches_dir=run.staging.batches_dir,
                    shard_index=index,
                    shard_count=SHARDS,
                    transport=SendGridTransport(SendGridSettings("SG.t", server.url, 5.0)),
                    outbox=outbox,
                    limiter=SharedRateLimiter(outbox, run.run_key, None, None),
                    retry=RetryPolicy(max_attempts=8, base_delay=0.005, max_delay=0.02),
                    max_in_flight=window,
                )
            except BaseException as exc:  # pragma: no cover - surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=shard, args=(i,)) for i in range(SHARDS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        records = server.accepted()
        stats = server.stats()
    assert not errors
    assert stats.status_429_injected > 0
    assert stats.status_5xx_injected > 0
    assert stats.dropped_after_accept > 0

    # Nobody was accepted twice by the server, retries and faults notwithstanding.
    received = Counter(e.lower() for e in accepted_recipients(records))
    assert max(received.values()) == 1
    assert set(received) <= audience.expected

    # Every batch ended in exactly one final state, and the books balance.
    states = outbox.states(run.run_key)
    assert {s.state for s in states.values()} <= set(FINAL_STATES)
    counts = outbox.counts(run.run_key)
    assert sum(counts[s]["recipients"] for s in FINAL_STATES) == manifest.recipients
    assert counts["staged"]["recipients"] == counts["sending"]["recipients"] == 0

    # The unknown batches are exactly those whose answer the server dropped.
    sent_ids = {s.message_id for s in states.values() if s.state == BatchState.SENT}
    dropped = {
        r["body"]["custom_args"]["mailroom_batch"]
        for r in records
        if r["message_id"] not in sent_ids
    }
    unknown = {batch_id for batch_id, s in states.items() if s.state == BatchState.UNKNOWN}
    assert unknown == dropped
    assert len(unknown) == stats.dropped_after_accept
    # Everyone else got it: sent batches cover every expected recipient not in an unknown batch.
    assert (
        counts[BatchState.SENT]["recipients"] + counts[BatchState.UNKNOWN]["recipients"]
        == manifest.recipients
    )


def test_a_halt_and_resume_through_the_windows_under_faults_send_everyone_once(
    tmp_path: Path,
) -> None:
    """Four shards of four in flight each, under every fault; an operator halts the run part
    way (each shard stops its new requests, those in flight finish and are recorded), then
    resumes it: nobody twice, everybody in exactly one final state."""
    run, _, outbox = guarded_run(tmp_path, "manual__halt_resume", users=6_000)
    manifest = load_manifest(run.staging.manifest)
    shared = shared_parts(run.spec(), pipeline.load_contents(run), manifest)
    faults = Faults(
        status_429_every=7,
        status_5xx_every=5,
        delay_seconds=0.002,
        drop_after_accept_every=13,
        retry_after_seconds=0,
    )
    halt_after = len(manifest.batches) // 3

    with SendGridDevServer(faults=faults) as server:

        def operator() -> str | None:
            return "operator halt" if server.stats().accepted >= halt_after else None

        def send_all(halt_signal: Callable[[], str | None] | None) -> None:
            errors: list[BaseException] = []

            def shard(index: int) -> None:
                try:
                    send_shard(
                        run_key=run.run_key,
                        manifest=manifest,
                        shared=shared,
                        batches_dir=run.staging.batches_dir,
                        shard_index=index,
                        shard_count=SHARDS,
                        transport=SendGridTransport(SendGridSettings("SG.t", server.url, 5.0)),
                        outbox=outbox,
                        limiter=SharedRateLimiter(outbox, run.run_key, None, None),
                        retry=RetryPolicy(max_attempts=30, base_delay=0.002, max_delay=0.01),
                        halt_signal=halt_signal,
                        halt_signal_interval=0.0,
                        max_in_flight=4,
                    )
                except BaseException as exc:  # pragma: no cover - surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=shard, args=(i,)) for i in range(SHARDS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert not errors

        send_all(operator)
        halted = outbox.counts(run.run_key)
        assert halted[BatchState.HALTED]["batches"] > 0
        assert halted["staged"]["recipients"] == halted["sending"]["recipients"] == 0
        assert sum(halted[s]["recipients"] for s in FINAL_STATES) == manifest.recipients

        assert outbox.request_halt(run.run_key, halted=False)
        send_all(None)
        records = server.accepted()
        stats = server.stats()

    received = Counter(e.lower() for e in accepted_recipients(records))
    assert max(received.values()) == 1
    counts = outbox.counts(run.run_key)
    assert counts[BatchState.HALTED]["batches"] == counts[BatchState.FAILED]["batches"] == 0
    assert counts["staged"]["recipients"] == counts["sending"]["recipients"] == 0
    assert (
        counts[BatchState.SENT]["recipients"] + counts[BatchState.UNKNOWN]["recipients"]
        == manifest.recipients
        == sum(received.values())
    )
    assert counts[BatchState.UNKNOWN]["batches"] == stats.dropped_after_accept
