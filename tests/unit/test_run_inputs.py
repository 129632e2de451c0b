"""What the layers rebuild each request from: the gate renders the content itself, and the files
the run was staged from (spec copy, rendered content, validated audience) are held to the
digests the outbox recorded when it staged the run, so a run folder rewritten afterwards is
refused by name, manifest digests recomputed and all."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom import pipeline
from mailroom.audience.sample import generate
from mailroom.batches import load_manifest, serialise, sha256_hex
from mailroom.delivery.outbox import BatchState, Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import EnvelopeViolation, ValidationFailed
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import RunStaging, read_json, write_json
from sendgrid_dev import SendGridDevServer
from support.runs import built_run

pytestmark = pytest.mark.unit

SECRET = b"run-inputs-secret"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("inputs")
    audience = generate(root / "users.sqlite", users=300)
    return built_run(
        ProjectPaths.under(Path(__file__).resolve().parents[2] / "include"),
        users_url=audience.url(),
        staging_root=root / "staging",
        run_id="manual__inputs",
        shard_count=1,
        secret=SECRET,
    )


@pytest.fixture
def frozen(built: Run, tmp_path: Path) -> Iterator[tuple[Run, Outbox, dict[str, Any]]]:
    """A copy of the built run, frozen into an outbox of its own."""
    shutil.copytree(built.staging.root, tmp_path / "run")
    run = Run(built.campaign, built.run_id, RunStaging(tmp_path / "run"), 1, False)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    summary = pipeline.freeze_batches(run, outbox=outbox)
    yield run, outbox, summary
    outbox.dispose()


def gate_failures(run: Run) -> set[str]:
    result = read_json(run.staging.gate_result)
    return {
        c.get("column") or c["expectation"]
        for part in ("personalization_checks", "request_checks")
        for c in result[part]["checks"]
        if not c["success"]
    }


def send_everything(
    run: Run, outbox: Outbox, summary: dict[str, Any], server: SendGridDevServer
) -> None:
    pipeline.guard_shard(run, manifest_sha256=summary["manifest_sha256"], outbox=outbox)
    pipeline.send_shard(
        run,
        shard=0,
        manifest_sha256=summary["manifest_sha256"],
        transport=SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=10)),
        outbox=outbox,
        shard_count=1,
    )


def test_staging_records_the_digest_of_every_file_a_request_is_rebuilt_from(
    frozen: tuple[Run, Outbox, dict[str, Any]],
) -> None:
    run, outbox, _ = frozen
    recorded = outbox.staged_inputs(run.run_key)
    expected = ["audience/snapshot.parquet", "audience/valid.parquet", "campaign.yaml"] + [
        f"content/{locale}.json" for locale in run.spec().locales
    ]
    if run.staging.suppressed.exists():
        expected.append("audience/suppressed.parquet")
    assert sorted(recorded) == sorted(expected)
    for name, digest in recorded.items():
        assert digest == sha256_hex((run.staging.root / name).read_bytes())


def test_the_gate_renders_the_content_itself(
    frozen: tuple[Run, Outbox, dict[str, Any]], project_paths: ProjectPaths
) -> None:
    """The render stage's output is not what the gate compares with: without it, it passes."""
    run, outbox, _ = frozen
    shutil.rmtree(run.staging.content_dir)
    assert pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)["success"]


def test_content_rewritten_before_freezing_fails_the_gate_that_renders_it_again(
    built: Run, tmp_path: Path, project_paths: ProjectPaths
) -> None:
    """The render stage's output changed between rendering and freezing (bodies, manifest and
    outbox all agree with it): only a gate that renders the content itself sees it."""
    shutil.copytree(built.staging.root, tmp_path / "run")
    run = Run(built.campaign, built.run_id, RunStaging(tmp_path / "run"), 1, False)
    path = run.staging.content_file(run.spec().locales[0])
    content = read_json(path)
    content["subject"] = "Action needed: verify your wallet"
    write_json(path, content)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    try:
        pipeline.freeze_batches(run, outbox=outbox)
        with pytest.raises(ValidationFailed):
            pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
    finally:
        outbox.dispose()
    assert {"shared_matches", "staged_matches"} <= gate_failures(run)


def test_personalizations_swapped_between_requests_with_digests_recomputed_fail_the_gate(
    frozen: tuple[Run, Outbox, dict[str, Any]], project_paths: ProjectPaths
) -> None:
    """Every body is well formed and every digest in the manifest is right: only the outbox,
    which staged who each batch is for and each body's digest, tells it is not the run staged."""
    run, outbox, _ = frozen
    manifest = load_manifest(run.staging.manifest)
    first, second = manifest.batches[0], manifest.batches[1]
    bodies = [json.loads((run.staging.batches_dir / b.file).read_bytes()) for b in (first, second)]
    bodies[0]["personalizations"][0], bodies[1]["personalizations"][0] = (
        bodies[1]["personalizations"][0],
        bodies[0]["personalizations"][0],
    )
    raw = read_json(run.staging.manifest)
    for entry, body in zip(raw["batches"][:2], bodies, strict=True):
        data = serialise(body)
        (run.staging.batches_dir / entry["file"]).write_bytes(data)
        entry["sha256"], entry["size"] = sha256_hex(data), len(data)
    write_json(run.staging.manifest, raw)

    with pytest.raises(ValidationFailed, match="staged_matches"):
        pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
    assert "digest_matches" not in gate_failures(run)  # the manifest's digests are right


@pytest.mark.parametrize("rewritten", ["content", "spec"])
def test_a_run_folder_rewritten_after_staging_is_refused_by_the_guard(
    rewritten: str,
    frozen: tuple[Run, Outbox, dict[str, Any]],
    project_paths: ProjectPaths,
    dev_server: SendGridDevServer,
) -> None:
    run, outbox, summary = frozen
    pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
    if rewritten == "content":
        path = run.staging.content_file(run.spec().locales[0])
        content = read_json(path)
        content["html"] = content["html"].replace("</body>", "<p>Reply to claims@example.net</p>")
        write_json(path, content)
        name = f"content/{run.spec().locales[0]}.json"
    else:
        path = run.staging.campaign_spec
        spec = yaml.safe_load(path.read_text())
        spec["reply_to"] = "claims@example.net"
        path.write_text(yaml.safe_dump(spec))
        name = "campaign.yaml"

    with pytest.raises(EnvelopeViolation, match=f"{name} is not the file the run was staged"):
        send_everything(run, outbox, summary, dev_server)
    assert dev_server.stats().received == 0
    assert outbox.halt_requested(run.run_key)
    with pytest.raises(EnvelopeViolation, match="rewritten after staging"):
        pipeline.send_shard(
            run,
            shard=0,
            manifest_sha256=summary["manifest_sha256"],
            transport=SendGridTransport(SendGridSettings("SG.test", dev_server.url, 10)),
            outbox=outbox,
            shard_count=1,
        )
    assert dev_server.stats().received == 0
    assert {s.state for s in outbox.states(run.run_key).values()} == {BatchState.STAGED}
