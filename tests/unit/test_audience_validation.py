"""A bad row is quarantined before approval and the run sends around it: it never halts an
approved run at the envelope guard."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from mailroom import pipeline
from mailroom.audience.sample import generate
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import ValidationFailed
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import read_json
from sendgrid_dev import SendGridDevServer, accepted_recipients
from support.runs import built_run

pytestmark = pytest.mark.unit
SECRET = b"audience-validation"
# Three recipients of one locale (en: every fifth user), in one batch of the example campaign.
NAMED_AFTER_A_BATCH_MATE = "u00000010"
NAMED_AFTER_THEMSELVES = "u00000020"
BATCH_MATE = "user15@example.com"


def test_a_name_showing_a_batch_mates_address_is_quarantined_and_the_run_sends_around_it(
    tmp_path: Path, project_paths: ProjectPaths, dev_server: SendGridDevServer
) -> None:
    audience = generate(tmp_path / "users.sqlite", users=300)
    with sqlite3.connect(audience.path) as conn:
        for user_id, name in (
            # As a person types it, and as the guard also reads it: %-encoded.
            (NAMED_AFTER_A_BATCH_MATE, f"Sam ({BATCH_MATE.upper()})"),
            ("u00000025", BATCH_MATE.replace("@", "%40")),
            (NAMED_AFTER_THEMSELVES, "user20@example.com"),
        ):
            conn.execute("UPDATE users SET first_name = ? WHERE user_id = ?", (name, user_id))
    run = built_run(
        project_paths,
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__names",
        shard_count=1,
        secret=SECRET,
    )

    quarantine = pd.read_parquet(run.staging.quarantine).set_index("user_id")["reason"]
    reason = "expect_column_values_to_be_in_set(first_name__shows_another_address)"
    assert quarantine.get(NAMED_AFTER_A_BATCH_MATE) == reason
    assert quarantine.get("u00000025") == reason
    assert NAMED_AFTER_THEMSELVES not in quarantine.index
    assert set(pd.read_parquet(run.staging.valid_audience).columns) == {
        "user_id",
        "email",
        "first_name",
        "locale",
    }

    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    frozen = pipeline.freeze_batches(run, outbox=outbox)
    pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
    pipeline.guard_shard(run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox)
    sent = pipeline.send_shard(
        run,
        shard=0,
        manifest_sha256=frozen["manifest_sha256"],
        transport=SendGridTransport(SendGridSettings("SG.test", dev_server.url, 10.0)),
        outbox=outbox,
        shard_count=1,
    )
    outbox.dispose()

    assert sent["states"] == {"sent": frozen["batches"]}
    received = Counter(a.lower() for a in accepted_recipients(dev_server.accepted()))
    assert max(received.values()) == 1
    assert {BATCH_MATE, "user20@example.com"} <= set(received)
    assert {"user10@example.com", "user25@example.com"}.isdisjoint(received)


def test_an_audience_whose_fields_hold_no_address_at_all_validates(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    from mailroom.audience.validate import validate_audience
    from mailroom.campaign_spec import load_campaign

    spec = load_campaign(project_paths.campaigns, "winter_update")
    snapshot = tmp_path / "snapshot.parquet"
    pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "email": ["ann@example.com", "bob@example.org"],
            "first_name": ["Ann", "Bob"],
            "locale": ["en", "de"],
        }
    ).to_parquet(snapshot, index=False)
    outcome = validate_audience(
        spec,
        snapshot=snapshot,
        valid_out=tmp_path / "valid.parquet",
        quarantine_out=tmp_path / "quarantine.parquet",
    )
    assert (outcome.valid, outcome.quarantined) == (2, 0)


@pytest.mark.parametrize(
    "first_name",
    [
        "Ann\r\nBcc: all@example.com",
        "Ann\nBob",
        "Ann\x00",
        "Ann\x1b[2J",
        "Ann\u2028Bob",
        "A" * 257,
    ],
    ids=["CRLF header", "LF", "NUL", "ESC", "line separator", "over the length cap"],
)
def test_a_control_character_or_an_overlong_value_is_quarantined_with_its_reason(
    tmp_path: Path, project_paths: ProjectPaths, first_name: str
) -> None:
    from mailroom.audience.validate import validate_audience
    from mailroom.campaign_spec import load_campaign

    spec = load_campaign(project_paths.campaigns, "winter_update")
    snapshot = tmp_path / "snapshot.parquet"
    others = 40  # one bad row stays under the campaign's quarantine limit
    pd.DataFrame(
        {
            "user_id": ["u1", *(f"u{i}" for i in range(2, others + 2))],
            "email": ["ann@example.com", *(f"user{i}@example.org" for i in range(others))],
            "first_name": [first_name, "Bob\tthe builder", *["Eve"] * (others - 1)],  # tab: text
            "locale": ["en"] * (others + 1),
        }
    ).to_parquet(snapshot, index=False)
    outcome = validate_audience(
        spec,
        snapshot=snapshot,
        valid_out=tmp_path / "valid.parquet",
        quarantine_out=tmp_path / "quarantine.parquet",
    )
    assert (outcome.valid, outcome.quarantined) == (others, 1)
    quarantine = pd.read_parquet(tmp_path / "quarantine.parquet")
    assert quarantine["user_id"].tolist() == ["u1"]
    reason = (
        "expect_column_value_lengths_to_be_between(first_name)"
        if len(first_name) > spec.max_field_length
        else "expect_column_values_to_not_match_regex(first_name)"
    )
    assert quarantine["reason"].tolist() == [reason]


def test_a_row_whose_substitutions_sendgrid_would_refuse_is_quarantined(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    """SendGrid refuses a personalization whose substitutions exceed 10,000 bytes, and with it
    the whole request of up to 1,000 recipients: a row that would is quarantined, with that
    reason, before approval. The limit is exact: one byte under it goes out."""
    import dataclasses

    import pyarrow as pa

    from mailroom.audience.validate import validate_audience
    from mailroom.campaign_spec import load_campaign
    from mailroom.checks.limits import MAX_SUBSTITUTIONS_BYTES
    from mailroom.envelopes import substitutions_bytes

    spec = dataclasses.replace(
        load_campaign(project_paths.campaigns, "winter_update"), max_field_length=10_000
    )

    def size(user_id: str, name: str) -> int:
        table = pa.table({"user_id": [user_id], "first_name": [name]})
        return int(substitutions_bytes(spec, table)[0].as_py())

    # "<" is 1 byte in the text and 4 ("&lt;") in the HTML: 5 per character.
    base = size("u1", "")
    fits = "<" * ((MAX_SUBSTITUTIONS_BYTES - base) // 5)
    assert size("u1", fits) <= MAX_SUBSTITUTIONS_BYTES < size("u2", fits + "<")
    others = 40
    pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3" * 3_000, *(f"u{i}" for i in range(4, others + 4))],
            "email": [f"user{i}@example.org" for i in range(others + 3)],
            "first_name": [fits, fits + "<", "Ann", *["Eve"] * others],
            "locale": ["en"] * (others + 3),
        }
    ).to_parquet(tmp_path / "snapshot.parquet", index=False)

    outcome = validate_audience(
        spec,
        snapshot=tmp_path / "snapshot.parquet",
        valid_out=tmp_path / "valid.parquet",
        quarantine_out=tmp_path / "quarantine.parquet",
    )

    quarantine = pd.read_parquet(tmp_path / "quarantine.parquet")
    assert sorted(quarantine["user_id"].str[:2]) == ["u2", "u3"]  # a 6,000-byte user id too
    assert set(quarantine["reason"]) == {"expect_column_values_to_be_in_set(substitutions_fit)"}
    assert (outcome.valid, outcome.quarantined) == (others + 1, 2)


# --- Data Docs ---------------------------------------------------------------------------------
def validated_run(tmp_path: Path, project_paths: ProjectPaths, bad: int) -> Run:
    """A prepared and extracted run of 100 recipients, ``bad`` of them with a first name GX
    refuses (a line break before another member's address) and an address it refuses (two in
    one field): above 5 the audience is over the campaign's limit."""
    audience = generate(tmp_path / "users.sqlite", users=1)
    rows = [
        (f"u{n:08d}", f"user{n}@example.com", "Ann", "en")
        if n > bad
        else (
            f"u{n:08d}",
            f"a{n}@example.com, b{n}@example.org",
            f"Ann\nBcc: user{n + 50}@example.com",
            "en",
        )
        for n in range(1, 101)
    ]
    with sqlite3.connect(audience.path) as conn:
        conn.execute("DELETE FROM users")
        conn.execute("DELETE FROM suppressions")
        conn.executemany(
            "INSERT INTO users (user_id, email, first_name, locale) VALUES (?,?,?,?)", rows
        )
    run = pipeline.prepare(
        project_paths,
        campaign="winter_update",
        run_id=f"manual__docs_{bad}",
        staging_root=tmp_path / "staging",
        shard_count=1,
        dry_run=False,
    )
    pipeline.extract_audience(run, sql_url=audience.url())
    return run


def assert_docs_show_no_address(run: Run) -> str:
    """Every page of the run's audience Data Docs, which name the audience suite and no
    address of the snapshot; returns their text."""
    import html

    docs = run.staging.audience_data_docs
    assert (docs / "index.html").is_file()
    pages = {p: p.read_text("utf-8") for p in docs.rglob("*.html")}
    assert any("validations" in p.parts and "audience" in p.parts for p in pages)
    text = "\n".join(pages.values())
    assert "audience" in pages[docs / "index.html"]
    assert not docs.with_name("data_docs.building").exists()
    snapshot = pd.read_parquet(run.staging.snapshot)
    emails = set(snapshot["email"])
    addresses = emails | {part.strip() for e in emails for part in e.split(",")}
    addresses |= {a.lower() for a in addresses}
    assert len(addresses) >= 100
    unescaped = html.unescape(text)
    for address in addresses | {"user51@example.com"}:
        assert address not in text, "the Data Docs show a recipient's address"
        assert address not in unescaped, "the Data Docs show a recipient's address"
    return text


def test_the_audience_validation_leaves_its_data_docs_with_the_run(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    run = validated_run(tmp_path, project_paths, bad=2)  # quarantined, under the limit
    stale = run.staging.audience_data_docs / "validations" / "stale.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier attempt")

    summary = pipeline.validate_audience(run)

    assert summary["quarantined"] == 2
    assert summary["data_docs"] == "audience/data_docs/index.html"
    record = read_json(run.staging.audience_validation)
    assert record["data_docs"] == "audience/data_docs/index.html"
    assert (run.staging.root / record["data_docs"]).is_file()
    assert not stale.exists()
    assert_docs_show_no_address(run)


def test_a_failing_audience_validation_leaves_its_data_docs_too(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    import re

    run = validated_run(tmp_path, project_paths, bad=10)  # 10%: above the campaign's 5%

    with pytest.raises(ValidationFailed, match="failed validation"):
        pipeline.validate_audience(run)

    text = assert_docs_show_no_address(run)
    assert re.search(r"(?i)fail", text)
    readable = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))
    assert re.search(r"email .{0,300}?10 unexpected values found", readable)


def test_without_a_data_docs_folder_none_is_written_or_recorded(
    tmp_path: Path, project_paths: ProjectPaths
) -> None:
    from mailroom.audience.validate import validate_audience
    from mailroom.campaign_spec import load_campaign

    spec = load_campaign(project_paths.campaigns, "winter_update")
    snapshot = tmp_path / "snapshot.parquet"
    pd.DataFrame(
        {"user_id": ["u1"], "email": ["ann@example.com"], "first_name": ["Ann"], "locale": ["en"]}
    ).to_parquet(snapshot, index=False)
    outcome = validate_audience(
        spec,
        snapshot=snapshot,
        valid_out=tmp_path / "valid.parquet",
        quarantine_out=tmp_path / "quarantine.parquet",
    )
    assert outcome.data_docs is None
    assert not list(tmp_path.rglob("*.html"))
