"""The operator commands act on a run's outbox: halt, resume, resend the unknown."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailroom.cli.main import main
from mailroom.delivery.outbox import BatchState, Outbox, StagedBatch

pytestmark = pytest.mark.unit
RUN = "winter_update/manual__ops"


@pytest.fixture
def outbox_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'outbox.sqlite'}"
    outbox = Outbox(url)
    outbox.stage(
        RUN,
        "f" * 64,
        [
            StagedBatch("en-00001", 0, "en", "a" * 64, 1),
            StagedBatch("en-00002", 1, "en", "b" * 64, 1),
        ],
        [("a@example.com", "u1", "en-00001"), ("b@example.com", "u2", "en-00002")],
    )
    assert outbox.claim(RUN, "en-00001")
    outbox.finish(RUN, "en-00001", BatchState.UNKNOWN, error="answer lost")
    outbox.dispose()
    return url


def test_halt_and_resume_flip_the_runs_flag(
    outbox_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["halt", RUN, "--outbox-url", outbox_url, "--reason", "wrong subject"]) == 0
    outbox = Outbox(outbox_url)
    assert outbox.halt_requested(RUN)
    assert outbox.halt_reason(RUN) == "wrong subject"
    assert main(["resume", RUN, "--outbox-url", outbox_url]) == 0
    assert not outbox.halt_requested(RUN)
    assert "clear the run's send_shard" in capsys.readouterr().out


def test_resend_makes_only_unknown_batches_sendable(outbox_url: str) -> None:
    assert main(["resend", RUN, "--outbox-url", outbox_url]) == 0
    outbox = Outbox(outbox_url)
    states = outbox.states(RUN)
    assert states["en-00001"].state == "staged"
    assert outbox.claim(RUN, "en-00001")
    assert outbox.states(RUN)["en-00001"].state == BatchState.SENDING


def test_unknown_run_and_missing_outbox_are_clear_errors(
    outbox_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["status", "winter_update/nope", "--outbox-url", outbox_url]) == 1
    assert "no run 'winter_update/nope'" in capsys.readouterr().err
    monkeypatch.delenv("MAILROOM_OUTBOX_URL", raising=False)
    assert main(["status", RUN]) == 2
