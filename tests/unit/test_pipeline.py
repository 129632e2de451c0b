"""The whole pipeline in process (no Airflow) against the SendGrid-compatible dev server."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mailroom import pipeline
from mailroom.audience.sample import SampleAudience, generate
from mailroom.batches import BatchEntry, load_manifest, sendgrid_request_body
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import (
    AudienceError,
    CampaignSpecError,
    ContentError,
    EnvelopeViolation,
    ValidationFailed,
)
from mailroom.pipeline import ProjectPaths, Run
from sendgrid_dev import SendGridDevServer, accepted_recipients
from support.runs import built_run

pytestmark = pytest.mark.unit
SECRET = b"unit-test-secret"


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=3000)


def prepared(tmp_path: Path, paths: ProjectPaths, audience: SampleAudience, shards: int = 2) -> Run:
    return built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__test",
        shard_count=shards,
        secret=SECRET,
    )


def run_batches(run: Run, shard: int, count: int) -> list[BatchEntry]:
    return load_manifest(run.staging.manifest).shard(shard, count)


def guard_all(run: Run, frozen: dict[str, Any], outbox: Outbox) -> None:
    """What the DAG's guard_shard tasks do after approval: the guard on every request."""
    for shard in frozen["shards"]:
        pipeline.guard_shard(
            run,
            manifest_sha256=frozen["manifest_sha256"],
            outbox=outbox,
            shard=shard,
            shard_count=len(frozen["shards"]),
        )


def send_all(run: Run, frozen: dict[str, Any], outbox: Outbox, server: SendGridDevServer) -> None:
    guard_all(run, frozen, outbox)
    for shard in frozen["shards"]:
        transport = SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=10))
        pipeline.send_shard(
            run,
            shard=shard,
            manifest_sha256=frozen["manifest_sha256"],
            transport=transport,
            outbox=outbox,
            shard_count=len(frozen["shards"]),
        )


def test_every_valid_recipient_gets_exactly_one_envelope(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run = prepared(tmp_path, project_paths, audience)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
    send_all(run, frozen, outbox, dev_server)

    records = dev_server.accepted()
    received = Counter(e.lower() for e in accepted_recipients(records))
    assert set(received) == audience.expected
    assert max(received.values()) == 1
    for record in records:
        for item in record["body"]["personalizations"]:
            assert len(item["to"]) == 1
            assert "cc" not in item
            assert "bcc" not in item
    report = pipeline.reconcile(
        run, outbox=outbox, approval={"decision": "approved", "by": "approver"}
    )
    assert report["status"] == "sent"
    assert report["balanced"] is True
    assert report["outbox"]["sent"]["recipients"] == len(audience.expected)

    # Sending again (a retried or cleared shard) sends nothing twice.
    send_all(run, frozen, outbox, dev_server)
    assert len(dev_server.accepted()) == len(records)


def test_each_recipient_sees_only_their_own_values(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run = prepared(tmp_path, project_paths, audience, shards=1)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    send_all(run, frozen, outbox, dev_server)
    import sqlite3

    with sqlite3.connect(audience.path) as conn:
        names = dict(conn.execute("SELECT lower(trim(email)), first_name FROM users").fetchall())
    seen = 0
    for record in dev_server.accepted():
        for item in record["body"]["personalizations"]:
            subs = item["substitutions"]
            email = item["to"][0]["email"].lower()
            if email in names and "\n" not in names[email] and "<" not in names[email]:
                assert subs["%%first_name%%"] == names[email].strip()
                seen += 1
            assert "\n" not in subs["%%first_name%%"]
            assert "\r" not in subs["%%first_name%%"]
            assert "<" not in subs["%%first_name|html%%"]
            assert item["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            assert subs["%%unsubscribe_url%%"] in item["headers"]["List-Unsubscribe"]
    assert seen > 1000


def test_the_2019_change_is_stopped_by_the_gate_and_by_the_guard(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    def everyone_in_one_to(
        spec: Any, content: Any, envelopes: Any, custom_args: Any
    ) -> dict[str, Any]:
        body = sendgrid_request_body(spec, content, envelopes, custom_args)
        body["personalizations"] = [
            {
                "to": [p["to"][0] for p in body["personalizations"]],
                "substitutions": body["personalizations"][0]["substitutions"],
            }
        ]
        return body

    run = prepared(tmp_path, project_paths, audience)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox, build_body=everyone_in_one_to)
    with pytest.raises(ValidationFailed, match="n_to"):
        pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
    # Without the gate, the guard inside the transport refuses the first request.
    with pytest.raises(EnvelopeViolation, match="recipients in 'to', not 1"):
        send_all(run, frozen, outbox, dev_server)
    assert dev_server.accepted() == []
    assert dev_server.stats().received == 0


def test_a_freeze_that_fails_midway_stages_nothing(
    tmp_path: Path, project_paths: ProjectPaths, audience: SampleAudience
) -> None:
    """The outbox takes the recipients while the bodies are written; a freeze that fails after
    some bodies leaves no recipient, batch or run row behind, and a second freeze stages all."""
    calls = 0

    def fails_on_the_third(
        spec: Any, content: Any, envelopes: Any, custom_args: Any
    ) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("disk full")
        return sendgrid_request_body(spec, content, envelopes, custom_args)

    run = prepared(tmp_path, project_paths, audience)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.freeze_batches(run, outbox=outbox, build_body=fails_on_the_third)
    assert outbox.manifest_sha256(run.run_key) is None
    assert outbox.states(run.run_key) == {}
    with outbox.engine.connect() as conn:
        left = conn.exec_driver_sql(
            "SELECT count(*) FROM mailroom_recipients WHERE run_key = ?", (run.run_key,)
        ).scalar_one()
    assert left == 0

    frozen = pipeline.freeze_batches(run, outbox=outbox)
    assert outbox.manifest_sha256(run.run_key) == frozen["manifest_sha256"]
    staged = sum(len(outbox.batch_members(run.run_key, b)) for b in outbox.states(run.run_key))
    assert staged == frozen["recipients"] == len(audience.expected)


def test_a_batch_edited_after_freezing_is_refused(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run = prepared(tmp_path, project_paths, audience)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    first = sorted(run.staging.batches_dir.glob("en-*.json"))[0]
    body = json.loads(first.read_bytes())
    body["subject"] = "Urgent: verify your wallet"
    first.write_bytes(json.dumps(body).encode())
    with pytest.raises(ValidationFailed, match="digest_matches"):
        pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
    with pytest.raises(EnvelopeViolation, match="not in the approved manifest"):
        send_all(run, frozen, outbox, dev_server)
    assert dev_server.accepted() == []


def test_a_broken_body_in_the_last_request_stops_the_run_before_its_first_request(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    """Only the last request of the last shard is broken (another recipient's address in one
    of its envelopes), and it was frozen that way, so its digest is in the manifest. The guard's
    pass over every request refuses it before any shard sends: nothing leaves, that batch ends
    ``failed`` and every other one ``halted``, each with its reason."""
    calls = 0
    run = prepared(tmp_path, project_paths, audience, shards=3)
    plan_size = len(pipeline._batch_plan(run.spec(), run.staging.envelopes))

    def last_one_broken(spec: Any, content: Any, envelopes: Any, args: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        body = sendgrid_request_body(spec, content, envelopes, args)
        if calls == plan_size:
            first, second = body["personalizations"][:2]
            second["headers"]["Disposition-Notification-To"] = first["to"][0]["email"]
        return body

    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox, build_body=last_one_broken)
    assert calls == plan_size
    with pytest.raises(EnvelopeViolation, match="shows the address of another recipient"):
        send_all(run, frozen, outbox, dev_server)
    assert dev_server.stats().received == 0
    states = Counter(s.state for s in outbox.states(run.run_key).values())
    assert states == {"failed": 1, "halted": frozen["batches"] - 1}
    assert outbox.halt_requested(run.run_key)
    report = pipeline.reconcile(run, outbox=outbox, approval={"decision": "approved", "by": "a"})
    assert report["balanced"] is True
    assert report["outbox"]["sent"]["recipients"] == 0


def test_no_shard_sends_before_the_guard_has_cleared_every_request(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run = prepared(tmp_path, project_paths, audience, shards=2)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    transport = SendGridTransport(SendGridSettings("SG.test", dev_server.url, timeout_seconds=10))
    send_one = {
        "shard": 0,
        "manifest_sha256": frozen["manifest_sha256"],
        "transport": transport,
        "outbox": outbox,
        "shard_count": 2,
    }
    with pytest.raises(EnvelopeViolation, match="have not been cleared by the envelope guard"):
        pipeline.send_shard(run, **send_one)
    # Shard 0 cleared, shard 1 not yet: shard 0 still waits for the whole run.
    pipeline.guard_shard(
        run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox, shard=0, shard_count=2
    )
    with pytest.raises(EnvelopeViolation, match="have not been cleared"):
        pipeline.send_shard(run, **send_one)
    assert dev_server.stats().received == 0
    pipeline.guard_shard(
        run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox, shard=1, shard_count=2
    )
    assert pipeline.send_shard(run, **send_one)["states"] == {"sent": len(run_batches(run, 0, 2))}


def test_a_body_edited_after_the_guard_cleared_it_is_refused_when_it_is_sent(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    """Cleared is not a pass to send: each request is guarded again on the bytes that leave."""
    run = prepared(tmp_path, project_paths, audience, shards=1)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    guard_all(run, frozen, outbox)
    last = run_batches(run, 0, 1)[-1]
    path = run.staging.batches_dir / last.file
    body = json.loads(path.read_bytes())
    body["subject"] = "Urgent: verify your wallet"
    path.write_bytes(json.dumps(body).encode())
    transport = SendGridTransport(SendGridSettings("SG.test", dev_server.url, timeout_seconds=10))
    with pytest.raises(EnvelopeViolation, match="not in the approved manifest"):
        pipeline.send_shard(
            run,
            shard=0,
            manifest_sha256=frozen["manifest_sha256"],
            transport=transport,
            outbox=outbox,
            shard_count=1,
        )
    sent = {json.dumps(r["body"], sort_keys=True) for r in dev_server.accepted()}
    assert len(sent) == frozen["batches"] - 1
    assert outbox.states(run.run_key)[last.batch_id].state == "failed"


def test_a_manifest_swapped_after_approval_is_refused(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run = prepared(tmp_path, project_paths, audience)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    manifest = json.loads(run.staging.manifest.read_text())
    manifest["batches"] = manifest["batches"][:1]
    run.staging.manifest.write_text(json.dumps(manifest))
    with pytest.raises(EnvelopeViolation, match="not the approved"):
        send_all(run, frozen, outbox, dev_server)
    assert dev_server.accepted() == []


def test_unknown_campaign_is_a_clear_error(tmp_path: Path, project_paths: ProjectPaths) -> None:
    with pytest.raises(CampaignSpecError, match=r"unknown campaign 'no_such'.*winter_update"):
        pipeline.prepare(
            project_paths,
            campaign="no_such",
            run_id="r",
            staging_root=tmp_path,
            shard_count=1,
            dry_run=False,
        )


def test_unreachable_users_database_is_a_clear_error(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    run = pipeline.prepare(
        project_paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path,
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(AudienceError, match="cannot read the audience database"):
        pipeline.extract_audience(run, sql_url="postgresql+psycopg2://nobody@127.0.0.1:1/users")


def _copy_include(tmp_path: Path, project_paths: ProjectPaths) -> ProjectPaths:
    include = tmp_path / "include"
    shutil.copytree(project_paths.campaigns.parent, include)
    return ProjectPaths.under(include)


def test_template_with_an_undefined_variable_fails_render(
    tmp_path: Path, project_paths: ProjectPaths, audience: SampleAudience
) -> None:
    paths = _copy_include(tmp_path, project_paths)
    body = paths.templates / "winter_update" / "body.txt"
    text = body.read_text().replace(
        "{% block content %}", "{% block content %}{{ recipient.account_balance }}", 1
    )
    body.write_text(text)
    run = pipeline.prepare(
        paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path / "s",
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(ContentError, match="account_balance"):
        pipeline.render_content(run, paths)


def test_missing_translation_catalog_fails_render(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    paths = _copy_include(tmp_path, project_paths)
    shutil.rmtree(paths.translations / "ja")
    run = pipeline.prepare(
        paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path / "s",
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(ContentError, match="ja"):
        pipeline.render_content(run, paths)


def test_template_syntax_error_fails_render(tmp_path: Path, project_paths: ProjectPaths) -> None:
    paths = _copy_include(tmp_path, project_paths)
    body = paths.templates / "winter_update" / "body.html"
    body.write_text(body.read_text().replace("{% endblock %}", "{% endblok %}", 1))
    run = pipeline.prepare(
        paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path / "s",
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(ContentError, match=r"body\.html"):
        pipeline.render_content(run, paths)
