"""The canary: the frozen content to the seed list, each seed in its own envelope, guarded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mailroom import pipeline
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import EnvelopeViolation
from mailroom.pipeline import ProjectPaths
from sendgrid_dev import SendGridDevServer, accepted_recipients

pytestmark = pytest.mark.unit
SEEDS = ["qa@example-exchange.test", "compliance@example-exchange.test"]


def _run(tmp_path: Path, seeds: list[str]) -> pipeline.Run:
    include = tmp_path / "include"
    shutil.copytree(Path(__file__).resolve().parents[2] / "include", include)
    spec_path = include / "campaigns" / "winter_update.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["seed_list"] = seeds
    spec_path.write_text(yaml.safe_dump(spec))
    paths = ProjectPaths.under(include)
    run = pipeline.prepare(
        paths,
        campaign="winter_update",
        run_id="manual__canary",
        staging_root=tmp_path / "staging",
        shard_count=1,
        dry_run=False,
    )
    pipeline.render_content(run, paths)
    return run


def _transport(server: SendGridDevServer) -> SendGridTransport:
    return SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=5))


def test_canary_reaches_each_seed_once_per_locale_with_seed_values(
    tmp_path: Path, dev_server: SendGridDevServer
) -> None:
    run = _run(tmp_path, SEEDS)
    outcome = pipeline.canary_send(run, secret=b"canary", transport=_transport(dev_server))
    records = dev_server.accepted()
    assert len(records) == len(run.spec().locales)
    assert sorted(outcome["locales"]) == sorted(run.spec().locales)
    for record in records:
        assert [p["to"] for p in record["body"]["personalizations"]] == [
            [{"email": s}] for s in SEEDS
        ]
        for item in record["body"]["personalizations"]:
            assert item["substitutions"]["%%first_name%%"].startswith("Seed ")
    assert sorted(accepted_recipients(records)) == sorted(SEEDS * len(run.spec().locales))
    assert (run.staging.root / "canary" / "result.json").exists()


def test_no_seed_list_sends_nothing(tmp_path: Path, dev_server: SendGridDevServer) -> None:
    run = _run(tmp_path, [])
    assert (
        pipeline.canary_send(run, secret=b"canary", transport=_transport(dev_server))["sent"]
        is False
    )
    assert dev_server.stats().received == 0


def test_canary_goes_through_the_envelope_guard(
    tmp_path: Path, dev_server: SendGridDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path, SEEDS)
    import mailroom.approval.canary as canary_module

    original = canary_module.sendgrid_request_body

    def everyone_in_one_to(spec, content, envelopes, custom_args):  # type: ignore[no-untyped-def]
        body = original(spec, content, envelopes, custom_args)
        body["personalizations"] = [
            {
                "to": [p["to"][0] for p in body["personalizations"]],
                "substitutions": body["personalizations"][0]["substitutions"],
                "headers": body["personalizations"][0]["headers"],
            }
        ]
        return body

    monkeypatch.setattr(canary_module, "sendgrid_request_body", everyone_in_one_to)
    with pytest.raises(EnvelopeViolation):
        pipeline.canary_send(run, secret=b"canary", transport=_transport(dev_server))
    assert dev_server.stats().received == 0
