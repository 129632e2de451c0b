"""The approver's summary from a real run folder (the pipeline up to the gate, no Airflow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from mailroom import pipeline
from mailroom.addresses import address_key, addresses_shown
from mailroom.approval.summary import (
    MASKED_TOKEN,
    MASKED_VALUE,
    approval_markdown,
    approval_summary,
    data_docs_index,
    decision_line,
    format_duration,
    preview_value,
)
from mailroom.audience.sample import SampleAudience, generate
from mailroom.batches import load_manifest
from mailroom.delivery.outbox import Outbox
from mailroom.pipeline import ProjectPaths, Run
from support.runs import built_run

pytestmark = pytest.mark.unit
INCLUDE = Path(__file__).resolve().parents[2] / "include"
SECRET = b"unit-test-secret"


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=1500)


def gated(
    paths: ProjectPaths, tmp: Path, audience: SampleAudience, run_id: str, *, shard_count: int
) -> Run:
    """A run of ``paths``' example campaign through the gate, ready to summarise."""
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp / "staging",
        run_id=run_id,
        shard_count=shard_count,
        secret=SECRET,
    )
    outbox = Outbox(f"sqlite:///{tmp / 'outbox.sqlite'}")
    try:
        pipeline.freeze_batches(run, outbox=outbox)
        assert pipeline.check_envelopes(run, paths, secret=SECRET, outbox=outbox)["success"]
    finally:
        outbox.dispose()
    return run


@pytest.fixture(scope="module")
def gated_run(
    tmp_path_factory: pytest.TempPathFactory, audience: SampleAudience
) -> tuple[Run, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("run")
    run = gated(ProjectPaths.under(INCLUDE), tmp, audience, "manual__summary", shard_count=4)
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


def test_preview_masks_every_audience_address_the_message_shows(
    tmp_path: Path, audience: SampleAudience
) -> None:
    """A template may print the recipient's own address (``{{ recipient.email }}``), and a
    first name may spell it out: the preview still shows no audience address anywhere, only
    masked forms, while the campaign's own public addresses stay readable."""
    include = tmp_path / "include"
    shutil.copytree(INCLUDE, include)
    spec_file = include / "campaigns" / "winter_update.yaml"
    spec_file.write_text(
        spec_file.read_text("utf-8").replace("fields: [first_name]", "fields: [first_name, email]"),
        encoding="utf-8",
    )
    for name in ("body.txt", "body.html", "subject.txt"):
        template = include / "templates" / "winter_update" / name
        template.write_text(
            template.read_text("utf-8").replace(
                "{% endblock %}", "Sent to {{ recipient.email }}.\n{% endblock %}"
            )
            if name != "subject.txt"
            else template.read_text("utf-8").rstrip("\n") + " ({{ recipient.email }})\n",
            encoding="utf-8",
        )
    run = gated(
        ProjectPaths.under(include), tmp_path, audience, "manual__shows_email", shard_count=1
    )

    summary = approval_summary(run, triggered_by="analyst")

    everyone = {
        address_key(e)
        for e in pq.read_table(run.staging.valid_audience, columns=["email"])
        .column("email")
        .to_pylist()
    }
    shown = set()
    for preview in summary["previews"].values():
        # Masked like the "to", not dropped: the approver sees the template prints an address.
        assert f"Sent to {preview['to']}." in Path(preview["text_file"]).read_text("utf-8")
        assert f"({preview['to']})" in preview["subject"]
        for file in (preview["html_file"], preview["text_file"]):
            shown |= addresses_shown(Path(file).read_text("utf-8"))
        shown |= addresses_shown(preview["subject"] + "\n".join(preview["text_lines"]))
    shown |= addresses_shown(approval_markdown(summary))
    assert shown & everyone == set()


PUBLIC = frozenset({"support@example-exchange.test"})


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("Ann", "Ann"),
        ("ann@example.com", "a***@example.com"),
        (" Ann@Example.com ", "A***@Example.com"),
        ("ann&#64;example.com", "a***@example.com"),
        ("MAX (at) example (dot) net", MASKED_VALUE),
        ("Ann <ann@example.com>", MASKED_VALUE),
        ("ann@bücher.example", MASKED_VALUE),
        ("write to support@example-exchange.test", "write to support@example-exchange.test"),
    ],
)
def test_a_value_showing_an_address_is_masked_in_the_preview(value: str, shown: str) -> None:
    assert preview_value(value, PUBLIC) == shown


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
