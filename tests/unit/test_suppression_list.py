"""The outbox's suppression list: kept by address key (one record per mailbox, the first kept),
kept by operators through ``mailroom suppressions``, and left out by every campaign's extract
in whatever spelling the audience holds, counted apart from the campaign's own suppressions."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from test_adbc_extract import SQLITE_SPEC, sqlite_db

from mailroom import pipeline
from mailroom.audience import extract
from mailroom.cli.main import main
from mailroom.delivery.outbox import Outbox, Suppression, SuppressionRefused
from mailroom.pipeline import ProjectPaths

pytestmark = pytest.mark.unit

AUDIENCE = [
    ("u1", "ann@example.com", "Ann", "en"),
    ("u2", "Bob.Smith@Example.org", "Bob", "en"),
    ("u3", "user@xn--bcher-kva.example", "Björn", "de"),
    ("u4", "zoe@bücher.example", "Zoë", "de"),
    ("u5", "keep@example.com", "Keep", "en"),
]


@pytest.fixture(autouse=True)
def no_outbox_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILROOM_OUTBOX_URL", raising=False)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'outbox.sqlite'}"


@pytest.fixture
def outbox(url: str) -> Outbox:
    return Outbox(url)


def cli(url: str, *args: str) -> int:
    return main(["suppressions", *args, "--outbox-url", url])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- the outbox ----------------------------------------------------------------------------------


def test_suppressing_again_keeps_the_first_record_in_any_spelling(outbox: Outbox) -> None:
    first = Suppression(
        "Ann@Example.com", "bounced", "cli", detail="550 no such user", created_by="olga"
    )
    assert outbox.suppress([first, Suppression("bob@example.org", "unsubscribed", "import")]) == 2

    again = [
        Suppression("ann@example.com", "manual", "cli"),
        Suppression("ＡＮＮ@example.com", "spam_report", "import"),
        Suppression("Bob <BOB@example.org>", "manual", "cli"),
    ]
    assert outbox.suppress(again) == 0
    assert outbox.suppress(again) == 0  # not an error, however often

    record = outbox.suppression("ann@EXAMPLE.com")
    assert record is not None
    assert (record.email, record.reason, record.source, record.detail, record.created_by) == (
        "Ann@Example.com",
        "bounced",
        "cli",
        "550 no such user",
        "olga",
    )
    assert record.created_at is not None
    assert record.created_at.tzinfo is not None
    assert outbox.suppressed_keys() == {
        "ann@example.com": "bounced",
        "bob@example.org": "unsubscribed",
    }
    assert [s.email for s in outbox.suppressions()] == ["Ann@Example.com", "bob@example.org"]


def test_one_person_given_twice_in_one_call_is_one_new_record(outbox: Outbox) -> None:
    entries = [
        Suppression("zoe@bücher.example", "bounced", "import"),
        Suppression("ZOE@xn--bcher-kva.example", "manual", "import"),
    ]
    assert outbox.suppress(entries) == 1
    assert outbox.suppressed_keys() == {"zoe@xn--bcher-kva.example": "bounced"}


def test_unsuppress_takes_people_off_in_any_spelling(outbox: Outbox) -> None:
    outbox.suppress(
        [
            Suppression("ann@example.com", "bounced", "cli"),
            Suppression("zoe@bücher.example", "manual", "cli"),
        ]
    )
    spellings = ["ＡＮＮ@example.com", "zoe@xn--bcher-kva.example", "nobody@example.com"]
    assert outbox.unsuppress(spellings, by="olga", why="asked to be mailed again") == 2
    assert outbox.suppressed_keys() == {}
    assert outbox.unsuppress(["ann@example.com"], by="olga", why="again") == 0
    [removal] = outbox.suppression_removals("Ann@Example.com")
    assert {k: v for k, v in removal.items() if k != "removed_at"} == {
        "reason": "bounced",
        "source": "cli",
        "removed_by": "olga",
        "why": "asked to be mailed again",
    }
    assert outbox.suppression_removals("nobody@example.com") == []


@pytest.mark.parametrize(("by", "why"), [("", "a reason"), ("olga", ""), ("olga", "  ")])
def test_taking_someone_off_needs_who_and_why_and_takes_nobody_off_without(
    outbox: Outbox, by: str, why: str
) -> None:
    outbox.suppress([Suppression("ann@example.com", "spam_report", "sendgrid")])
    with pytest.raises(ValueError, match=r"who removes it|needs a reason"):
        outbox.unsuppress(["ann@example.com"], by=by, why=why)
    assert outbox.suppressed_keys() == {"ann@example.com": "spam_report"}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("ann@example.com, bob@example.org", "more than one address"),
        ("not an address", "no address"),
        ("", "empty"),
        ("a" * 320 + "@example.com", "longer than 320 characters"),
    ],
)
def test_an_entry_that_is_not_one_address_is_refused_by_row_and_nothing_is_added(
    outbox: Outbox, value: str, why: str
) -> None:
    entries = [
        Suppression("keep@example.com", "bounced", "cli"),
        Suppression(value, "bounced", "cli"),
    ]
    with pytest.raises(SuppressionRefused, match=rf"^row 2: {why}") as refused:
        outbox.suppress(entries)
    assert "bob@example.org" not in str(refused.value)
    assert outbox.suppressed_keys() == {}
    with pytest.raises(SuppressionRefused, match=why):
        outbox.unsuppress(["keep@example.com", value], by="olga", why="test")


@pytest.mark.parametrize(
    ("reason", "source", "message"),
    [
        ("", "cli", "needs a reason"),
        ("bounced", "  ", "needs a source"),
        ("x" * 65, "cli", "reason is one line of at most 64"),
        ("bounced\nagain", "cli", "one line"),
    ],
)
def test_a_suppression_needs_a_reason_and_a_source_each_one_short_line(
    reason: str, source: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Suppression("ann@example.com", reason, source)


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listed", "asked"),
    [
        ("ann@example.com", "Ann@EXAMPLE.com"),
        ("ann@example.com", "ａｎｎ@example.com"),
        ("Ann@EXAMPLE.com", "ann@example.com"),
        ("ann@example.com", "Ann <ann@example.com>"),
        ("zoe@bücher.example", "zoe@xn--bcher-kva.example"),
        ("zoe@xn--bcher-kva.example", "ZOE@BÜCHER.example"),
    ],
)
def test_check_finds_every_spelling_of_a_listed_address(
    url: str, outbox: Outbox, capsys: pytest.CaptureFixture[str], listed: str, asked: str
) -> None:
    outbox.suppress([Suppression(listed, "bounced", "cli", created_by="olga")])

    assert cli(url, "check", asked) == 0
    out = capsys.readouterr().out
    assert out.startswith("suppressed: bounced (")
    assert "by olga" in out
    assert listed not in out  # masked

    assert cli(url, "check", "someone.else@example.com") == 1
    assert capsys.readouterr().out.startswith("not suppressed: s***@example.com")


def test_check_refuses_what_is_not_one_address_and_needs_an_outbox(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli(url, "check", "ann@example.com; bob@example.org") == 2
    assert "more than one address" in capsys.readouterr().err
    assert main(["suppressions", "check", "ann@example.com"]) == 2
    assert "MAILROOM_OUTBOX_URL" in capsys.readouterr().err
    monkeypatch.setenv("MAILROOM_OUTBOX_URL", url)
    assert main(["suppressions", "check", "ann@example.com"]) == 1


def test_add_remove_and_list_show_addresses_masked(
    url: str, outbox: Outbox, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli(url, "add", "ann@example.com", "bob@example.org", "--reason", "manual", "--by", "olga")
        == 0
    )
    assert cli(url, "add", "ANN@example.com", "--reason", "bounced") == 0
    out = capsys.readouterr().out
    assert "2 added" in out
    assert "0 added" in out
    assert "1 already on it" in out
    assert outbox.suppressed_keys() == {"ann@example.com": "manual", "bob@example.org": "manual"}

    assert cli(url, "list") == 0
    out = capsys.readouterr().out
    assert "2 address(es) on the suppression list" in out
    assert "by reason: manual 2" in out
    assert "by source: cli 2" in out
    assert "a***@example.com" in out
    assert "b***@example.org" in out
    assert "ann@" not in out
    assert "bob@" not in out

    with pytest.raises(SystemExit) as refused:  # no --reason
        cli(url, "remove", "Ann@Example.com", "carl@example.com")
    assert refused.value.code == 2
    assert "--reason" in capsys.readouterr().err
    assert outbox.suppressed_keys() == {"ann@example.com": "manual", "bob@example.org": "manual"}
    assert (
        cli(
            url, "remove", "Ann@Example.com", "carl@example.com", "--reason", "asked", "--by", "ida"
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 taken off the suppression list by ida" in out
    assert "not on the list: c***@example.com" in out
    assert outbox.suppressed_keys() == {"bob@example.org": "manual"}
    assert cli(url, "check", "ann@example.com") == 1
    out = capsys.readouterr().out
    assert "by ida: asked (was manual, source cli)" in out
    assert "ann@" not in out


def test_add_refuses_every_unreadable_argument_and_adds_nothing(
    url: str, outbox: Outbox, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli(url, "add", "ann@example.com", "ann@example.com bob@example.org", "--reason", "x") == 1
    )
    err = capsys.readouterr().err
    assert "address 2:" in err
    assert "nothing was added" in err
    assert "bob@example.org" not in err
    assert outbox.suppressed_keys() == {}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_import_is_all_or_nothing_and_names_each_bad_row_masked(
    url: str, outbox: Outbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(
        tmp_path / "bad.csv",
        "email,reason,detail\n"
        "ann@example.com,unsubscribed,\n"
        '"carl@example.com, dora@example.com",bounced,two in one cell\n'
        "\n"
        "erin@example.com,,no reason\n"
        "fred@example.com,bounced,fine\n",
    )
    assert cli(url, "import", str(bad)) == 1
    err = capsys.readouterr().err
    assert "2 refused, nothing of" in err
    assert "row 2 (line 3): more than one address (c***@example.com)" in err
    assert "row 3 (line 5): a suppression needs a reason (e***@example.com)" in err
    for shown in ("carl@", "dora@", "erin@"):
        assert shown not in err
    assert outbox.suppressed_keys() == {}

    good = write(
        tmp_path / "good.csv",
        bad.read_text()
        .replace('"carl@example.com, dora@example.com"', "carl@example.com")
        .replace("erin@example.com,,", "erin@example.com,manual,"),
    )
    assert cli(url, "import", str(good), "--by", "olga") == 0
    assert "4 added" in capsys.readouterr().out
    assert outbox.suppressed_keys() == {
        "ann@example.com": "unsubscribed",
        "carl@example.com": "bounced",
        "erin@example.com": "manual",
        "fred@example.com": "bounced",
    }
    erin = outbox.suppression("erin@example.com")
    assert erin is not None
    assert (erin.source, erin.detail, erin.created_by) == ("import", "no reason", "olga")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ann@example.com,unsubscribed\n", "holds an address, not a header"),
        ("email\nann@example.com\n", "lacks the column(s) reason"),
        ("email,reason,note\nann@example.com,bounced,x\n", "does not know: note"),
        ("email,reason\nann@example.com,bounced,extra\n", "more values than the header"),
        ("", "empty"),
    ],
)
def test_import_needs_a_header_naming_known_columns(
    url: str,
    outbox: Outbox,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    assert cli(url, "import", str(write(tmp_path / "list.csv", text))) == 1
    assert message in capsys.readouterr().err
    assert outbox.suppressed_keys() == {}


def test_export_then_import_gives_the_same_list(
    url: str, outbox: Outbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outbox.suppress(
        [
            Suppression(
                "Ann@Example.com", "bounced", "sendgrid_event", detail='550 "no, such user"'
            ),
            Suppression("zoe@bücher.example", "unsubscribed", "one_click", created_by="web"),
            Suppression(
                "bob@example.org",
                "manual",
                "cli",
                detail="asked by phone\nticket 42",
                created_by="olga",
                created_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
            ),
        ]
    )
    exported = tmp_path / "list.csv"
    assert cli(url, "export", str(exported)) == 0
    rows = read_csv(exported)
    assert list(rows[0]) == ["email", "reason", "source", "detail", "created_at", "created_by"]
    assert [r["email"] for r in rows] == [
        "Ann@Example.com",
        "bob@example.org",
        "zoe@bücher.example",
    ]

    other = f"sqlite:///{tmp_path / 'other.sqlite'}"
    assert cli(other, "import", str(exported)) == 0
    again = tmp_path / "again.csv"
    assert cli(other, "export", str(again)) == 0
    assert again.read_bytes() == exported.read_bytes()
    capsys.readouterr()

    assert cli(other, "export", "-") == 0
    assert capsys.readouterr().out.replace("\r\n", "\n") == exported.read_text(
        encoding="utf-8"
    ).replace("\r\n", "\n")


# -- the extract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["sqlalchemy", "adbc"])
def test_the_extract_leaves_out_the_list_in_any_spelling_and_counts_it_apart(
    outbox: Outbox, tmp_path: Path, reader: extract.Reader
) -> None:
    users = sqlite_db(
        tmp_path / "users.sqlite", AUDIENCE, [("user@bücher.example", "unsubscribed")]
    )
    outbox.suppress(
        [
            Suppression("ＢＯＢ.SMITH@example.org", "bounced", "sendgrid_event"),  # u2
            Suppression("USER@xn--bcher-kva.example", "manual", "cli"),  # u3: the campaign's wins
            Suppression("zoe@XN--BCHER-KVA.example", "spam_report", "one_click"),  # u4
            Suppression("nobody@example.com", "bounced", "import"),
        ]
    )
    snapshot = tmp_path / "audience" / "snapshot.parquet"
    suppressed = tmp_path / "audience" / "suppressed.parquet"

    counts = extract.extract_audience(
        SQLITE_SPEC,
        sql_url=users,
        snapshot=snapshot,
        suppressed_out=suppressed,
        reader=reader,
        outbox_suppressions=outbox.suppressed_keys(),
    )

    assert set(pd.read_parquet(snapshot)["user_id"]) == {"u1", "u5"}
    assert set(pd.read_parquet(suppressed)["user_id"]) == {"u2", "u3", "u4"}
    assert counts.suppressed == 3
    assert counts.suppressed_by_reason == {
        "list:bounced": 1,
        "list:spam_report": 1,
        "unsubscribed": 1,
    }


def test_the_pipeline_applies_the_outbox_list_when_given_the_outbox(
    outbox: Outbox, tmp_path: Path, project_paths: ProjectPaths
) -> None:
    users = sqlite_db(tmp_path / "users.sqlite", AUDIENCE, [])
    outbox.suppress([Suppression("Ann@EXAMPLE.com", "unsubscribed", "one_click")])
    run = pipeline.prepare(
        project_paths,
        campaign="winter_update",
        run_id="manual__list",
        staging_root=tmp_path / "staging",
        shard_count=1,
        dry_run=False,
    )

    counts = pipeline.extract_audience(run, sql_url=users, outbox=outbox)

    assert counts["suppressed_by_reason"] == {"list:unsubscribed": 1}
    assert "u1" not in set(pd.read_parquet(run.staging.snapshot)["user_id"])
    assert set(pd.read_parquet(run.staging.suppressed)["user_id"]) == {"u1"}

    # Without the outbox only the campaign's own suppressions apply.
    assert pipeline.extract_audience(run, sql_url=users)["suppressed"] == 0
