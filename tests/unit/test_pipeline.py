"""The whole pipeline in process (no Airflow) against the SendGrid-compatible dev server."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mailroom import pipeline
from mailroom.errors import (
    AudienceError,
    CampaignSpecError,
    ContentError,
    EnvelopeViolation,
    ValidationFailed,
)
from mailroom.outbox import Outbox
from mailroom.payloads import sendgrid_request_body
from mailroom.pipeline import ProjectPaths, Run
from mailroom.sample_audience import SampleAudience, generate
from mailroom.sendgrid_dev_server import SendGridDevServer, accepted_recipients
from mailroom.transports.sendgrid import SendGridSettings, SendGridTransport
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


def send_all(run: Run, frozen: dict[str, Any], outbox: Outbox, server: SendGridDevServer) -> None:
    for shard in frozen["shards"]:
        transport = SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=10))
        pipeline.send(
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
    frozen = pipeline.freeze(run, outbox=outbox)
    pipeline.gate(run, secret=SECRET)
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
    report = pipeline.report(
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
    frozen = pipeline.freeze(run, outbox=outbox)
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
    frozen = pipeline.freeze(run, outbox=outbox, build_body=everyone_in_one_to)
    with pytest.raises(ValidationFailed, match="n_to"):
        pipeline.gate(run, secret=SECRET)
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
        pipeline.freeze(run, outbox=outbox, build_body=fails_on_the_third)
    assert outbox.manifest_sha256(run.run_key) is None
    assert outbox.states(run.run_key) == {}
    with outbox.engine.connect() as conn:
        left = conn.exec_driver_sql(
            "SELECT count(*) FROM mailroom_recipients WHERE run_key = ?", (run.run_key,)
        ).scalar_one()
    assert left == 0

    frozen = pipeline.freeze(run, outbox=outbox)
    assert outbox.manifest_sha256(run.run_key) == frozen["manifest_sha256"]
    staged = sum(len(outbox.batch_members(run.run_key, b)) for b in outbox.states(run.run_key))
    assert staged == frozen["recipients"] == len(audience.expected)


def test_a_payload_edited_after_freezing_is_refused(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run = prepared(tmp_path, project_paths, audience)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze(run, outbox=outbox)
    first = sorted(run.staging.payloads_dir.glob("en-*.json"))[0]
    body = json.loads(first.read_bytes())
    body["subject"] = "Urgent: verify your wallet"
    first.write_bytes(json.dumps(body).encode())
    with pytest.raises(ValidationFailed, match="digest_matches"):
        pipeline.gate(run, secret=SECRET)
    with pytest.raises(EnvelopeViolation, match="not in the approved manifest"):
        send_all(run, frozen, outbox, dev_server)
    assert dev_server.accepted() == []


def test_a_manifest_swapped_after_approval_is_refused(
    tmp_path: Path,
    project_paths: ProjectPaths,
    audience: SampleAudience,
    dev_server: SendGridDevServer,
) -> None:
    run = prepared(tmp_path, project_paths, audience)
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze(run, outbox=outbox)
    manifest = json.loads(run.staging.manifest.read_text())
    manifest["batches"] = manifest["batches"][:1]
    run.staging.manifest.write_text(json.dumps(manifest))
    with pytest.raises(EnvelopeViolation, match="not the approved"):
        send_all(run, frozen, outbox, dev_server)
    assert dev_server.accepted() == []


def test_unknown_campaign_is_a_clear_error(tmp_path: Path, project_paths: ProjectPaths) -> None:
    with pytest.raises(CampaignSpecError, match=r"unknown campaign 'no_such'.*winter_update"):
        pipeline.prepare_run(
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
    run = pipeline.prepare_run(
        project_paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path,
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(AudienceError, match="cannot read the audience database"):
        pipeline.extract(run, sql_url="postgresql+psycopg2://nobody@127.0.0.1:1/users")


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
    run = pipeline.prepare_run(
        paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path / "s",
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(ContentError, match="account_balance"):
        pipeline.render(run, paths)


def test_missing_translation_catalog_fails_render(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    paths = _copy_include(tmp_path, project_paths)
    shutil.rmtree(paths.translations / "ja")
    run = pipeline.prepare_run(
        paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path / "s",
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(ContentError, match="ja"):
        pipeline.render(run, paths)


def test_template_syntax_error_fails_render(tmp_path: Path, project_paths: ProjectPaths) -> None:
    paths = _copy_include(tmp_path, project_paths)
    body = paths.templates / "winter_update" / "body.html"
    body.write_text(body.read_text().replace("{% endblock %}", "{% endblok %}", 1))
    run = pipeline.prepare_run(
        paths,
        campaign="winter_update",
        run_id="r",
        staging_root=tmp_path / "s",
        shard_count=1,
        dry_run=False,
    )
    with pytest.raises(ContentError, match=r"body\.html"):
        pipeline.render(run, paths)
