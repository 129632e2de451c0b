"""Suppressions are read through the audience's normaliser: every way a person writes an
address on a suppression list matches that person in the audience, and a row that is not one
address is counted and listed for an operator, never a crash and never silently dropped."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from mailroom.audience.extract import UNREADABLE_SUPPRESSIONS_FILE, ExtractCounts, extract_audience
from mailroom.campaign_spec import CampaignSpec, load_campaign
from mailroom.pipeline import ProjectPaths

pytestmark = pytest.mark.unit

# The audience: each user once, in the spelling the source holds.
AUDIENCE = [
    ("u1", "ann@example.com", "Ann", "en"),
    ("u2", "Bob.Smith@Example.org", "Bob", "en"),
    ("u3", "user@xn--bcher-kva.example", "Björn", "de"),
    ("u4", "zoe@bücher.example", "Zoë", "de"),
    ("u5", "keep@example.com", "Keep", "en"),
]


@pytest.fixture
def spec(project_paths: ProjectPaths) -> CampaignSpec:
    campaign = load_campaign(project_paths.campaigns, "winter_update")
    assert campaign.audience.suppressions_query  # the fixture database's table is read
    return campaign


def run_extract(
    spec: CampaignSpec, tmp_path: Path, suppressions: list[tuple[object, object]]
) -> tuple[ExtractCounts, pd.DataFrame, list[dict[str, str]]]:
    path = tmp_path / "users.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (user_id TEXT, email TEXT, first_name TEXT, locale TEXT)")
        conn.execute("CREATE TABLE suppressions (email, reason TEXT)")
        conn.executemany("INSERT INTO users VALUES (?,?,?,?)", AUDIENCE)
        conn.executemany("INSERT INTO suppressions VALUES (?,?)", suppressions)
    conn.close()
    snapshot = tmp_path / "audience" / "snapshot.parquet"
    counts = extract_audience(spec, sql_url=f"sqlite:///{path}", snapshot=snapshot)
    listed = snapshot.with_name(UNREADABLE_SUPPRESSIONS_FILE)
    with listed.open(newline="", encoding="utf-8") as f:
        unreadable = list(csv.DictReader(f))
    return counts, pd.read_parquet(snapshot), unreadable


@pytest.mark.parametrize(
    ("spelling", "user"),
    [
        ("ann@example.com", "u1"),
        ("  ann@example.com  ", "u1"),
        ("ANN@EXAMPLE.COM", "u1"),
        ("Ann Lee <ann@example.com>", "u1"),
        ('"Lee, Ann" <ann@example.com>', "u1"),
        ("<ann@example.com>", "u1"),
        ("mailto:ann@example.com", "u1"),
        ("MAILTO:Ann@Example.com?subject=unsubscribe", "u1"),
        ("mailto:ann%40example.com", "u1"),
        ("<mailto:ann@example.com>", "u1"),
        ("ann@example.com;", "u1"),
        ("ann@example.com,", "u1"),
        ("'ann@example.com'", "u1"),
        ('"ann@example.com"', "u1"),
        ("ann@example.com.", "u1"),
        ("\tann@example.com\r\n", "u1"),
        ("an\u200bn@example.com", "u1"),
        ("\ufeffann@example.com\u2060", "u1"),
        ("ａｎｎ＠ｅｘａｍｐｌｅ．ｃｏｍ", "u1"),
        ("bob.smith@example.org", "u2"),
        ("Bob Smith <BOB.SMITH@EXAMPLE.ORG>;", "u2"),
        ("user@bücher.example", "u3"),
        ("USER@BÜCHER.EXAMPLE", "u3"),
        ("user@bu\u0308cher.example", "u3"),
        ("user@bücher。example", "u3"),
        ("zoe@xn--bcher-kva.example", "u4"),
        ("ZOE@XN--BCHER-KVA.EXAMPLE", "u4"),
        ("Zoë <mailto:zoe@xn--bcher-kva.example>", "u4"),
    ],
)
def test_every_spelling_of_a_suppression_matches(
    spec: CampaignSpec, tmp_path: Path, spelling: str, user: str
) -> None:
    counts, kept, unreadable = run_extract(spec, tmp_path, [(spelling, "unsubscribed")])
    assert unreadable == []
    assert (counts.suppressed, counts.suppressions_unreadable) == (1, 0)
    assert counts.suppressed_by_reason == {"unsubscribed": 1}
    assert user not in set(kept["user_id"])
    assert len(kept) == len(AUDIENCE) - 1


def test_a_null_suppression_next_to_others_is_counted_not_a_crash(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    """The issue's crash: a NULL email among other rows (``'float' has no attribute 'lower'``
    when the frame turns NULL into NaN)."""
    counts, kept, unreadable = run_extract(
        spec,
        tmp_path,
        [("ann@example.com", "bounced"), (None, "unsubscribed"), ("bob.smith@example.org", None)],
    )
    assert counts.suppressed_by_reason == {"bounced": 1, "suppressed": 1}
    assert counts.suppressions_unreadable == 1
    assert unreadable == [{"row": "2", "reason": "empty", "value_masked": ""}]
    assert set(kept["user_id"]) == {"u3", "u4", "u5"}


def test_unreadable_rows_are_counted_and_listed_masked_and_the_rest_applied(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    rows: list[tuple[object, object]] = [
        ("", "blank"),
        ("   ", "blank"),
        ("not an address", "garbage"),
        ("ann@example.com, bob.smith@example.org", "a list"),
        ("Ann <ann@example.com> <bob.smith@example.org>", "two brackets"),
        ("ann@x@example.com", "two ats"),
        ('"ann,x"@example.com', "quoted"),
        ("@example.com", "no local part"),
        ("mailto:", "empty mailto"),
        (42, "a number"),
        ("zoe@bücher.example", "unsubscribed"),
    ]
    counts, kept, unreadable = run_extract(spec, tmp_path, rows)
    assert counts.suppressions_unreadable == 10
    assert counts.suppressed_by_reason == {"unsubscribed": 1}
    assert [r["row"] for r in unreadable] == [str(i) for i in range(1, 11)]
    reasons = [r["reason"] for r in unreadable]
    assert reasons[:3] == ["empty", "empty", "no address (no @)"]
    assert set(reasons[3:6]) == {"more than one address"}
    assert reasons[6] == "text, a list or quoting around the address"
    # Masked: the row can be found, no address read off the run folder.
    text = (tmp_path / "audience" / UNREADABLE_SUPPRESSIONS_FILE).read_text(encoding="utf-8")
    assert "ann@example.com" not in text
    assert "bob.smith@" not in text
    assert "ann,x" not in text
    assert {"u1", "u2", "u3", "u5"} <= set(kept["user_id"])
    assert "u4" not in set(kept["user_id"])


def test_no_unreadable_rows_still_writes_the_list_with_its_header(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    counts, _, unreadable = run_extract(spec, tmp_path, [])
    assert unreadable == []
    assert counts.suppressions_unreadable == 0
    assert (tmp_path / "audience" / UNREADABLE_SUPPRESSIONS_FILE).read_text().strip() == (
        "row,reason,value_masked"
    )
