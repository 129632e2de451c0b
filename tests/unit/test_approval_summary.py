"""The approver's summary from a real run folder (the pipeline up to the gate, no Airflow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mailroom import pipeline
from mailroom.approval.summary import (
    MASKED_TOKEN,
    approval_markdown,
    approval_summary,
    data_docs_index,
    decision_line,
    format_duration,
)
from mailroom.audience.sample import SampleAudience, generate
from mailroom.batches import load_manifest
from mailroom.delivery.outbox import Outbox
from mailroom.pipeline import ProjectPaths, Run
from support.runs import built_run

pytestmark = pytest.mark.unit
SECRET = b"unit-test-secret"


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=1500)


@pytest.fixture(scope="module")
def gated_run(
    tmp_path_factory: pytest.TempPathFactory, audience: SampleAudience
) -> tuple[Run, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("run")
    paths = ProjectPaths.under(Path(__file__).resolve().parents[2] / "include")
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp / "staging",
        run_id="manual__summary",
        shard_count=4,
        secret=SECRET,
    )
    outbox = Outbox(f"sqlite:///{tmp / 'outbox.sqlite'}")
    try:
        pipeline.freeze_batches(run, outbox=outbox)
        pipeline.check_envelopes(run, paths, secret=SECRET, outbox=outbox)
    finally:
        outbox.dispose()
    return run, approval_summary(run, triggered_by="analyst")


def test_counts_add_up_overall_and_per_locale(
    gated_run: tuple[Run, dict[str, Any]], audience: SampleAudience
) -> None:
    run, summary = gated_run
    a = summary["audience"]
    assert a["extracted"] == audience.users
    assert a["to_send"] == len(audience.expected) == summary["recipients"]
    assert a["extracted"] == a["suppressed"] + a["duplicates"] + a["quarantined"] + a["to_send"]
    assert sum(a["suppressed_by_reason"].values()) == a["suppressed"]
    assert sum(a["quarantined_by_reason"].values()) == a["quarantined"]
    per_locale = summary["per_locale"]
    assert set(per_locale) == set(run.spec().locales)
    for entry in per_locale.values():
        assert entry["kept"] == entry["quarantined"] + entry["recipients"]
    assert sum(e["recipients"] for e in per_locale.values()) == a["to_send"]
    assert sum(e["batches"] for e in per_locale.values()) == summary["batches"]
    assert summary["manifest_sha256"] == load_manifest(run.staging.manifest).sha256
    assert summary["shards"] == min(4, summary["batches"])


def test_preview_is_one_real_recipient_with_their_own_values_masked(
    gated_run: tuple[Run, dict[str, Any]],
) -> None:
    run, summary = gated_run
    manifest = load_manifest(run.staging.manifest)
    for locale, preview in summary["previews"].items():
        first_batch = next(b for b in manifest.batches if b.locale == locale)
        body = json.loads((run.staging.batches_dir / first_batch.file).read_bytes())
        person = body["personalizations"][0]
        address = person["to"][0]["email"]
        first_name = person["substitutions"]["%%first_name%%"]
        assert preview["to"] != address
        assert preview["to"].startswith(address[0])
        assert "***@" in preview["to"]
        assert first_name in preview["subject"]
        assert "%%" not in preview["subject"] + "".join(preview["text_lines"])
        page = Path(preview["html_file"]).read_text("utf-8")
        text = Path(preview["text_file"]).read_text("utf-8")
        for rendered in (page, text):
            assert "%%" not in rendered
            assert address not in rendered
            assert MASKED_TOKEN in rendered
            # Nobody's real unsubscribe link is in the preview: a click unsubscribes no one.
            assert person["substitutions"]["%%unsubscribe_url%%"] not in rendered


def test_markdown_shows_what_the_approver_needs(gated_run: tuple[Run, dict[str, Any]]) -> None:
    run, summary = gated_run
    text = approval_markdown(summary)
    for expected in (
        "triggered by **analyst**",
        "### Audience",
        "### Per locale",
        "### Data quality",
        "**PASSED**",
        str(run.staging.gate_result),
        "### Preview",
        "### Sending",
        "50 requests/s",
        summary["manifest_sha256"],
        "24 h",
    ):
        assert expected in text, expected
    for locale in run.spec().locales:
        assert f"| {locale} |" in text
        assert f"**{locale}** — to `" in text
    # No recipient's address appears anywhere in what the approver reads.
    manifest = load_manifest(run.staging.manifest)
    for batch in manifest.batches:
        body = json.loads((run.staging.batches_dir / batch.file).read_bytes())
        for person in body["personalizations"]:
            assert person["to"][0]["email"] not in text


def test_data_docs_are_linked_when_present(gated_run: tuple[Run, dict[str, Any]]) -> None:
    run, _ = gated_run
    docs = data_docs_index(run)
    made = not docs.exists()
    if made:  # the gate builds them where GX Data Docs are enabled
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text("<html></html>")
    try:
        text = approval_markdown(approval_summary(run, triggered_by=None))
    finally:
        if made:
            docs.unlink()
    assert f"Data Docs: `{docs}`" in text
    assert "triggered by **unknown**" in text
    if made:
        assert "Data Docs" not in approval_markdown(approval_summary(run, triggered_by=None))


def test_decision_lines_say_what_happened() -> None:
    assert decision_line({"decision": "approved", "by": "ann", "at": "T"}) == (
        "APPROVED by ann at T"
    )
    assert decision_line({"decision": "rejected", "by": "ann", "at": "T"}, recipients=1200) == (
        "REJECTED by ann at T: nothing was sent (0 of 1,200 recipients)"
    )
    assert decision_line({"decision": "timed_out", "at": "T"}).startswith(
        "TIMED OUT without an answer at T (counts as Reject): nothing was sent"
    )
    assert "NOT APPROVED (the gate did not complete)" in decision_line(
        {"decision": "none", "detail": "the gate did not complete"}
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "1 s"), (42, "42 s"), (61, "2 min"), (3600, "1 h 00 min"), (3700, "1 h 02 min")],
)
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
