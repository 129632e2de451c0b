"""A legitimate, messy audience goes out exactly once per mailbox, with no false positive.

Real lists hold one mailbox spelt several ways (its IDN domain in Unicode and in punycode, in
upper case, with an invisible character pasted in), mailboxes that look alike and are distinct,
the campaign's own staff addresses (the sender, the reply-to and the unsubscribe mailbox as
seed addresses), and users whose first name is their own address. Taken through the real
pipeline (extract, validate, render, build, freeze, the gate, the guard and the SendGrid
transport to the dev server), each mailbox must receive exactly one personalization, and no
row may be quarantined, suppressed by mistake or fail a check.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from mailroom import pipeline
from mailroom.addresses import address_key
from mailroom.audience.extract import extract_audience
from mailroom.audience.validate import validate_audience
from mailroom.campaign_spec import CampaignSpec, load_campaign
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.pipeline import ProjectPaths
from sendgrid_dev import SendGridDevServer, accepted_recipients
from support.runs import built_run

pytestmark = pytest.mark.unit
SECRET = b"messy-audience"

# The example campaign's own public addresses (include/campaigns/winter_update.yaml).
SENDER = "news@example-exchange.test"
REPLY_TO = "support@example-exchange.test"
UNSUBSCRIBE_MAILBOX = "unsubscribe@example-exchange.test"

# (user id, email as the source holds it, first name, locale)
MESSY = [
    # One mailbox, four spellings: only the first is sent to.
    ("u01", "user@bücher.example", "Björn", "de"),
    ("u02", "user@xn--bcher-kva.example", "Björn again", "de"),
    ("u03", "  USER@BÜCHER.EXAMPLE ", "BJÖRN", "de-DE"),
    ("u04", "us\u200ber@bücher.example", "Björn, pasted", "de"),
    # Look-alikes: each a mailbox of its own.
    ("u05", "ann@example.com", "Ann", "en"),
    ("u06", "anne@example.com", "Anne", "en"),
    ("u07", "a.nn@example.com", "A. Nn", "en"),
    ("u08", "ann+x@example.com", "Ann X", "en"),
    ("u09", "ann@exаmple.com", "Ann Cyrillic", "en"),  # a Cyrillic "а" in the domain
    ("u10", "joann@example.com", "Jo", "en"),
    ("u11", "Ann@Example.org", "Ann of .org", "en"),
    # The campaign's staff on their own list, as seed addresses.
    ("u12", SENDER, "News desk", "en"),
    ("u13", REPLY_TO, "Support", "en"),
    ("u14", UNSUBSCRIBE_MAILBOX, "Unsubscribe desk", "en"),
    # Names that are the user's own address, in any spelling, or a public address of the
    # campaign's: none shows another recipient anything.
    ("u15", "self@example.org", "self@example.org", "en"),
    ("u16", "zoe@xn--bcher-kva.example", "zoe@bücher.example", "de"),
    ("u17", "max@example.net", "MAX (at) example (dot) net", "en"),
    ("u18", "pat@example.net", f"Pat, write to {REPLY_TO}", "en"),
    ("u19", "ann.smith@example.com", "Ann Smith <ann.smith&#64;example.com>", "en"),
    # Suppressed, in a spelling other than the suppression list's.
    ("u20", "Gone@Bücher.example", "Gone", "de"),
]
# The suppression list spells its addresses its own way: whitespace, case, a Unicode domain,
# an invisible character.
SUPPRESSIONS = [(" gone@XN--BCHER-KVA.example\u2060 ", "unsubscribed")]
SUPPRESSED = {"gone@xn--bcher-kva.example"}
DUPLICATES = 3  # u02, u03, u04: u01's mailbox again
MAILBOXES = {address_key(email) for _, email, _, _ in MESSY} - SUPPRESSED


def write_audience(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (user_id TEXT, email TEXT, first_name TEXT, locale TEXT)")
        conn.execute("CREATE TABLE suppressions (email TEXT, reason TEXT)")
        conn.executemany("INSERT INTO users VALUES (?,?,?,?)", MESSY)
        conn.executemany("INSERT INTO suppressions VALUES (?,?)", SUPPRESSIONS)
    conn.close()
    return f"sqlite:///{path}"


@pytest.fixture
def spec(project_paths: ProjectPaths) -> CampaignSpec:
    campaign = load_campaign(project_paths.campaigns, "winter_update")
    # The test is about these three: the example campaign must keep setting them.
    assert (campaign.sender.email, campaign.reply_to, campaign.unsubscribe.mailto) == (
        SENDER,
        REPLY_TO,
        UNSUBSCRIBE_MAILBOX,
    )
    return campaign


def test_the_messy_audience_has_the_mailboxes_the_test_means() -> None:
    """The oracle itself: 20 rows, 16 distinct mailboxes, one of them suppressed."""
    assert len(MAILBOXES) == len(MESSY) - DUPLICATES - len(SUPPRESSED) == 16
    assert {"ann@example.com", "anne@example.com", "a.nn@example.com", "ann+x@example.com"} < (
        MAILBOXES
    )
    assert "ann@xn--exmple-4nf.com" in MAILBOXES


def test_extract_keeps_one_row_per_mailbox_and_matches_any_spelling_of_a_suppression(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    snapshot = tmp_path / "snapshot.parquet"
    counts = extract_audience(
        spec, sql_url=write_audience(tmp_path / "users.sqlite"), snapshot=snapshot
    )
    kept = pd.read_parquet(snapshot)

    assert (counts.extracted, counts.duplicates, counts.suppressed) == (20, DUPLICATES, 1)
    assert counts.suppressed_by_reason == {"unsubscribed": 1}
    # The first spelling of a mailbox is the one kept, IDNA-encoded, its local part's case kept.
    by_user = dict(zip(kept["user_id"], kept["email"], strict=True))
    assert by_user["u01"] == "user@xn--bcher-kva.example"
    assert by_user["u11"] == "Ann@example.org"
    assert by_user["u09"] == "ann@xn--exmple-4nf.com"
    assert not {"u02", "u03", "u04", "u20"} & set(by_user)
    assert {address_key(e) for e in kept["email"]} == MAILBOXES
    assert len(kept) == len(MAILBOXES)


def test_a_pasted_invisible_character_is_not_sent_and_does_not_hide_a_duplicate(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    """The spelling with a zero-width space comes first: it is the one kept, sent as it reads
    (without the invisible character), and the clean spelling after it is its duplicate."""
    path = tmp_path / "users.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (user_id TEXT, email TEXT, first_name TEXT, locale TEXT)")
        conn.execute("CREATE TABLE suppressions (email TEXT, reason TEXT)")
        conn.executemany(
            "INSERT INTO users VALUES (?,?,?,?)",
            [
                ("u1", "ｅｖａ\u200b@Example.com", "Eva", "en"),
                ("u2", "eva@example.com", "Eva", "en"),
            ],
        )
    conn.close()
    snapshot = tmp_path / "snapshot.parquet"
    counts = extract_audience(spec, sql_url=f"sqlite:///{path}", snapshot=snapshot)
    assert counts.duplicates == 1
    assert pd.read_parquet(snapshot)["email"].tolist() == ["eva@example.com"]


@pytest.mark.parametrize(
    ("name", "shows_another"),
    [
        ("anne@example.com", True),  # another user's address, as typed
        ("ANN&#64;EXAMPLE.COM", True),
        ("ann (at) example (dot) com", True),
        ("ann@<span></span>example.com", True),
        ("an\u00adn＠example.com", True),
        ("user%40b%C3%BCcher.example", True),  # u01's mailbox, %-encoded IDN
        ("user@xn--bcher-kva.example", True),
        ("Ann", False),
        ("ann.smith@example.com", False),  # the row's own address
        (SENDER, False),  # a public address of the campaign, on the list or not
        (f"{UNSUBSCRIBE_MAILBOX.upper()}", False),
        ("annex@example.com", False),  # nobody's address
    ],
)
def test_validation_quarantines_a_name_showing_another_users_address_in_any_spelling(
    spec: CampaignSpec, tmp_path: Path, name: str, shows_another: bool
) -> None:
    audience = pd.DataFrame(
        [
            ("v1", "ann@example.com", "Ann", "en"),
            ("v2", "anne@example.com", "Anne", "en"),
            ("v3", "user@xn--bcher-kva.example", "Björn", "de"),
            ("v4", SENDER, "News desk", "en"),
            ("v5", UNSUBSCRIBE_MAILBOX, "Unsubscribe desk", "en"),
            *((f"w{i:02d}", f"person{i}@example.com", f"P{i}", "en") for i in range(40)),
            ("x1", "ann.smith@example.com", name, "en"),
        ],
        columns=["user_id", "email", "first_name", "locale"],
    )
    snapshot = tmp_path / "snapshot.parquet"
    audience.to_parquet(snapshot, index=False)
    outcome = validate_audience(
        spec,
        snapshot=snapshot,
        valid_out=tmp_path / "valid.parquet",
        quarantine_out=tmp_path / "quarantine.parquet",
    )
    quarantine = pd.read_parquet(tmp_path / "quarantine.parquet")
    if shows_another:
        assert quarantine["user_id"].tolist() == ["x1"]
        assert quarantine["reason"].tolist() == [
            "expect_column_values_to_be_in_set(first_name__shows_another_address)"
        ]
    else:
        assert outcome.quarantined == 0, quarantine["reason"].tolist()


def test_a_messy_legitimate_audience_goes_out_exactly_once_per_mailbox(
    tmp_path: Path, project_paths: ProjectPaths, dev_server: SendGridDevServer, spec: CampaignSpec
) -> None:
    run = built_run(
        project_paths,
        users_url=write_audience(tmp_path / "users.sqlite"),
        staging_root=tmp_path / "staging",
        run_id="manual__messy",
        shard_count=1,
        secret=SECRET,
    )
    assert pd.read_parquet(run.staging.quarantine).empty

    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    try:
        frozen = pipeline.freeze_batches(run, outbox=outbox)
        gate = pipeline.check_envelopes(run, project_paths, secret=SECRET, outbox=outbox)
        pipeline.guard_shard(run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox)
        sent = pipeline.send_shard(
            run,
            shard=0,
            manifest_sha256=frozen["manifest_sha256"],
            transport=SendGridTransport(SendGridSettings("SG.test", dev_server.url, 10.0)),
            outbox=outbox,
            shard_count=1,
        )
    finally:
        outbox.dispose()

    assert gate["success"]
    assert gate["personalizations"] == len(MAILBOXES)
    assert sent["states"] == {"sent": frozen["batches"]}
    received = Counter(address_key(a) for a in accepted_recipients(dev_server.accepted()))
    assert set(received) == MAILBOXES
    assert set(received.values()) == {1}
    assert sum(received.values()) == len(MAILBOXES)
