"""Halt, resume, self-pause and the campaign-wide rate, against the dev server and a real outbox."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom import pipeline
from mailroom.audience.sample import generate
from mailroom.batches import load_manifest, shared_parts
from mailroom.delivery.outbox import BatchState, Outbox
from mailroom.delivery.rate import RetryPolicy, SharedRateLimiter
from mailroom.delivery.shards import send_shard
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import EnvelopeViolation
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import RunStaging
from sendgrid_dev import Faults, SendGridDevServer, accepted_recipients
from support.runs import built_run

pytestmark = pytest.mark.unit
SECRET = b"sending-control"


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict[str, Any], Path]:
    """A frozen run of ~2,900 recipients in batches of 100 (about 30 requests)."""
    root = tmp_path_factory.mktemp("control")
    include = root / "include"
    shutil.copytree(Path(__file__).resolve().parents[2] / "include", include)
    spec_path = include / "campaigns" / "winter_update.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["batch_size"] = 100
    spec["rate"] = {"requests_per_second": 20}
    spec_path.write_text(yaml.safe_dump(spec))
    paths = ProjectPaths.under(include)
    audience = generate(root / "users.sqlite", users=3000)
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=root / "staging",
        run_id="manual__control",
        shard_count=3,
        secret=SECRET,
    )
    return run, {"expected": audience.expected}, root


def _fresh(frozen_run: tuple[Run, dict[str, Any], Path], tmp_path: Path) -> tuple[Run, Outbox, str]:
    built, _, _ = frozen_run
    # Each test freezes a copy of the built run: a frozen run is never frozen again (run_record).
    copy = RunStaging(shutil.copytree(built.staging.root, tmp_path / "run"))
    run = replace(built, staging=copy, location=None)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    # What the DAG's guard_shard tasks do after approval, before any shard sends.
    pipeline.guard_shard(run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox)
    return run, outbox, frozen["manifest_sha256"]


def _shard(
    run: Run, outbox: Outbox, server: SendGridDevServer, index: int, count: int, **kwargs: Any
) -> dict[str, Any]:
    transport = SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=5))
    kwargs.setdefault("limiter", SharedRateLimiter(outbox, run.run_key, None, None))
    manifest = load_manifest(run.staging.manifest)
    return send_shard(
        run_key=run.run_key,
        manifest=manifest,
        shared=shared_parts(run.spec(), pipeline.load_contents(run), manifest),
        batches_dir=run.staging.batches_dir,
        shard_index=index,
        shard_count=count,
        transport=transport,
        outbox=outbox,
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02),
        **kwargs,
    )


def test_halt_mid_run_then_resume_sends_everyone_once(
    frozen_run: tuple[Run, dict[str, Any], Path], tmp_path: Path, dev_server: SendGridDevServer
) -> None:
    run, outbox, _ = _fresh(frozen_run, tmp_path)
    calls = 0

    def halt_after_five() -> str | None:
        nonlocal calls
        calls += 1
        return "operator pressed halt" if calls > 5 else None

    first = _shard(
        run, outbox, dev_server, 0, 1, halt_signal=halt_after_five, halt_signal_interval=0.0
    )
    assert first["states"][BatchState.SENT] == 5
    assert first["states"][BatchState.HALTED] > 0
    assert outbox.halt_reason(run.run_key) == "operator pressed halt"
    assert len(dev_server.accepted()) == 5

    outbox.request_halt(run.run_key, halted=False)
    second = _shard(run, outbox, dev_server, 0, 1)
    assert second["states"] == {BatchState.SENT: first["batches"]}
    received = Counter(e.lower() for e in accepted_recipients(dev_server.accepted()))
    assert set(received) == frozen_run[1]["expected"]
    assert max(received.values()) == 1


def test_a_halt_that_comes_while_a_shard_waits_for_its_rate_slot_stops_the_next_request(
    frozen_run: tuple[Run, dict[str, Any], Path], tmp_path: Path, dev_server: SendGridDevServer
) -> None:
    """At a slow rate a shard spends most of its time waiting for the run's next slot. A halt
    asked during that wait stops the request the shard was waiting to send: nothing is
    claimed once the halt is recorded, and that batch is left halted with the rest."""
    run, outbox, _ = _fresh(frozen_run, tmp_path)

    class HaltWhileWaiting(SharedRateLimiter):
        waits = 0

        def acquire(self, recipients: int) -> None:
            super().acquire(recipients)
            self.waits += 1
            if self.waits == 3:  # the operator presses halt while the third request waits
                outbox.request_halt(run.run_key, reason="pressed during the wait")

    limiter = HaltWhileWaiting(outbox, run.run_key, None, None)
    result = _shard(run, outbox, dev_server, 0, 1, limiter=limiter)

    assert len(dev_server.accepted()) == 2
    assert result["states"][BatchState.SENT] == 2
    assert result["states"][BatchState.HALTED] == result["batches"] - 2
    assert limiter.waits == 3


def test_a_run_pauses_itself_after_consecutive_failures(
    frozen_run: tuple[Run, dict[str, Any], Path], tmp_path: Path
) -> None:
    run, outbox, _ = _fresh(frozen_run, tmp_path)
    with SendGridDevServer(faults=Faults(status_5xx_every=1)) as failing:
        result = _shard(run, outbox, failing, 0, 1, max_consecutive_failures=3)
    assert result["states"]["failed"] == 3
    assert result["states"][BatchState.HALTED] == result["batches"] - 3
    assert outbox.halt_reason(run.run_key) == "paused after 3 consecutive failed batches"
    counts = outbox.counts(run.run_key)
    staged = sum(b.recipients for b in load_manifest(run.staging.manifest).batches)
    final = sum(counts[s]["recipients"] for s in ("sent", "failed", "unknown", "halted"))
    assert final == staged


def test_the_campaign_rate_holds_across_concurrent_shards(
    frozen_run: tuple[Run, dict[str, Any], Path], tmp_path: Path, dev_server: SendGridDevServer
) -> None:
    run, outbox, _ = _fresh(frozen_run, tmp_path)
    rate = 20.0
    errors: list[BaseException] = []
    slots: list[float] = []
    reserve = outbox.reserve_send_slot

    def reserve_and_record(*args: Any, now: float, **kwargs: Any) -> float:
        wait = reserve(*args, now=now, **kwargs)
        slots.append(now + wait)  # the moment this request may leave
        return wait

    outbox.reserve_send_slot = reserve_and_record  # type: ignore[method-assign]

    def shard(index: int) -> None:
        try:
            limiter = SharedRateLimiter(outbox, run.run_key, rate, None)
            _shard(run, outbox, dev_server, index, 3, limiter=limiter)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    records = dev_server.accepted()
    batches = len(load_manifest(run.staging.manifest).batches)
    assert len(records) == len(slots) == batches
    # The slots the three shards took from the outbox: a token bucket without burst, so any
    # one-second window holds at most rate of them (+1 at its edge).
    slots.sort()
    for i, start in enumerate(slots):
        in_window = sum(1 for t in slots[i:] if t < start + 1.0)
        assert in_window <= rate + 1, f"{in_window} slots within one second at {start}"
    # And the server saw them spread out accordingly (arrival times jitter on a busy machine,
    # so only the whole span is held to the rate, give or take a second).
    from datetime import datetime

    times = sorted(datetime.fromisoformat(r["received_at"]).timestamp() for r in records)
    assert times[-1] - times[0] >= (batches - 1) / rate - 1.0


def test_a_guard_violation_halts_every_shard_of_the_run(
    frozen_run: tuple[Run, dict[str, Any], Path], tmp_path: Path, dev_server: SendGridDevServer
) -> None:
    run, outbox, _ = _fresh(frozen_run, tmp_path)
    manifest = load_manifest(run.staging.manifest)
    tampered = manifest.shard(0, 3)[0]
    path = run.staging.batches_dir / tampered.file
    path.write_bytes(path.read_bytes().replace(b'"subject":"', b'"subject":"URGENT ', 1))
    with pytest.raises(EnvelopeViolation):
        _shard(run, outbox, dev_server, 0, 3)
    assert "envelope guard refused" in (outbox.halt_reason(run.run_key) or "")
    # Shard 0 retried by Airflow, and the other shards, send nothing more.
    for index in range(3):
        result = _shard(run, outbox, dev_server, index, 3)
        assert result["states"].get(BatchState.SENT, 0) == 0
    assert dev_server.stats().received == 0
