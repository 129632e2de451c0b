"""The audience read through ADBC gives exactly what the SQLAlchemy reader gives.

Both readers run on the same SQLite or PostgreSQL data and must leave the same files byte for
byte (the snapshot, who was left out for a suppression, the unreadable suppressions, and the
temporary files an error leaves), return the same counts, or raise the same error with the same
message. Audiences are messy on purpose, many generated: addresses in every spelling, NULLs,
numbers, REALs and BLOBs where text belongs, text that is not UTF-8, bad SQL. Where ADBC would
read a value differently the extract goes back to SQLAlchemy; ``reader="adbc"`` shows which
data ADBC read itself (it refuses instead of going back).
"""

from __future__ import annotations

import re
import sqlite3
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom.audience import extract
from mailroom.audience.adbc_source import AdbcTarget, NotExact, adbc_target, text_chunks
from mailroom.audience.extract import extract_audience
from mailroom.audience.sample import generate
from mailroom.campaign_spec import CampaignSpec, load_campaign

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CAMPAIGN = load_campaign(REPO / "include" / "campaigns", "winter_update")
QUERY = "SELECT user_id, email, first_name, locale FROM users ORDER BY rowid"
SUPPRESSIONS_QUERY = "SELECT email, reason FROM suppressions ORDER BY rowid"
PG_QUERY = "SELECT user_id, email, first_name, locale FROM adbc_users ORDER BY n"
PG_SUPPRESSIONS_QUERY = "SELECT email, reason FROM adbc_suppressions ORDER BY n"
REFUSED = "the audience cannot be read exactly through ADBC: "

Row = tuple[object, object, object, object]


def campaign(query: str, suppressions_query: str | None) -> CampaignSpec:
    audience = replace(CAMPAIGN.audience, query=query, suppressions_query=suppressions_query)
    return replace(CAMPAIGN, audience=audience)


SQLITE_SPEC = campaign(QUERY, SUPPRESSIONS_QUERY)
PG_SPEC = campaign(PG_QUERY, PG_SUPPRESSIONS_QUERY)


@dataclass(frozen=True)
class Outcome:
    """What one extract left: its counts or its error, and every file it wrote."""

    counts: dict[str, Any] | None
    error: tuple[str, str] | None
    files: dict[str, bytes]


def run(spec: CampaignSpec, url: str | None, folder: Path, reader: extract.Reader) -> Outcome:
    out = folder / reader / "audience"
    counts = error = None
    try:
        counts = extract_audience(
            spec,
            sql_url=url,
            snapshot=out / "snapshot.parquet",
            suppressed_out=out / "suppressed.parquet",
            reader=reader,
        ).to_dict()
    except Exception as exc:
        error = (type(exc).__name__, str(exc))
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*"))} if out.exists() else {}
    return Outcome(counts, error, files)


def compare(spec: CampaignSpec, url: str | None, folder: Path) -> tuple[Outcome, Outcome]:
    """The SQLAlchemy reader's outcome and the default reader's, which must be equal; and
    whether ADBC read it alone (``reader="adbc"`` gives the same) or refused."""
    old = run(spec, url, folder, "sqlalchemy")
    new = run(spec, url, folder, "auto")
    assert new == old
    assert old.files  # the comparison saw the files
    strict = run(spec, url, folder, "adbc")
    return old, strict


def adbc_read_it(old: Outcome, strict: Outcome) -> bool:
    if strict.error and strict.error[1].startswith(REFUSED):
        return False
    assert strict == old
    return True


def sqlite_db(
    path: Path, rows: Sequence[Row], suppressions: Sequence[tuple[object, object]]
) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (user_id, email, first_name, locale)")
        conn.execute("CREATE TABLE suppressions (email, reason)")
        conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO suppressions VALUES (?, ?)", suppressions)
    conn.close()
    return f"sqlite:///{path}"


@pytest.fixture
def chunk_rows(monkeypatch: pytest.MonkeyPatch) -> int:
    """Small chunks, so that dedupe across chunks and each chunk's own typing are exercised."""
    monkeypatch.setattr(extract, "CHUNK_ROWS", 3)
    return 3


# --- messy audiences ------------------------------------------------------------------------

SPACES = ["", " ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0", "\x1c", "\x0b"]
INVISIBLE = ["", "", "\u200b", "\u00ad", "\ufeff", "\u2060", "\u200e"]
LOCAL_PARTS = [
    "ann",
    "Ann",
    "ANN",
    "a.nn",
    "ann+x",
    "o'brien",
    "ｕｓｅｒ",
    "üser",
    "陽翔",
    "a@b",
    "",
]
ATS = ["@", "@", "@", "@", "＠", "﹫", "@@", "", " @ "]
DOMAINS = [
    "example.com",
    "Example.COM",
    "bücher.example",
    "BÜCHER.EXAMPLE",
    "xn--bcher-kva.example",
    "例え.jp",
    "exa mple.com",
    "example.com.",
    "example。com",
    "ex\u200bample.com",
    "a_b.example",
    "-x.example",
    "xn--zz.example",
    ".",
    "",
]
# Text that a SQLite REAL or INTEGER becomes, and text that only looks like one.
NUMBER_TEXTS = ["7", "-3", "007", "1.5", "1.0e+20", "Inf", "nan", "1e5", "0x10"]
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)


@st.composite
def addresses(draw: st.DrawFn) -> str:
    parts = (SPACES, LOCAL_PARTS, INVISIBLE, ATS, DOMAINS, INVISIBLE, SPACES)
    text = "".join(draw(st.sampled_from(p)) for p in parts)
    return draw(st.sampled_from([text, text, text, text.upper(), text.lower()]))


def texts(*pool: str) -> st.SearchStrategy[str]:
    return st.one_of(addresses(), TEXT, st.sampled_from([*pool, "", " "]))


def values(*pool: str) -> st.SearchStrategy[object]:
    """A SQLite value of any storage class, mostly text."""
    return st.one_of(
        texts(*pool),
        texts(*pool),
        st.none(),
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, 7, -3, 2**53 + 1]),
        st.floats(allow_nan=False),
        st.binary(max_size=6),
        st.sampled_from([b"\xff\xfe", b"ann@example.com", "Zoë".encode()]),
    )


LOCALES = ["en", "EN", "de-DE", "de_de", " fr ", "pt-BR", "ja_JP", "es-ES ", "xx", "en_"]


@st.composite
def messy_audiences(
    draw: st.DrawFn, value: st.SearchStrategy[object] | None = None
) -> tuple[list[Row], list[tuple[object, object]]]:
    def pick(*pool: str) -> st.SearchStrategy[object]:
        return value if value is not None else values(*pool)

    rows = draw(
        st.lists(
            st.tuples(
                pick("u1", "u2"),
                pick(),
                pick("Ann", "Zoë"),
                st.one_of(st.sampled_from(LOCALES), pick(*LOCALES)),
            ),
            max_size=14,
        )
    )
    # Suppressions: some spell an audience address their own way, some are anything.
    emails = [r[1] for r in rows if isinstance(r[1], str)]
    spelt = st.sampled_from(emails).map(lambda e: f" <{e.upper()}> ") if emails else st.nothing()
    suppressions = draw(
        st.lists(
            st.tuples(
                st.one_of(spelt, st.sampled_from(emails) if emails else st.nothing(), pick()),
                st.sampled_from([None, "bounced", " unsubscribed ", "", 7]),
            ),
            max_size=5,
        )
    )
    return rows, suppressions


@settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(audience=messy_audiences(), rows_per_chunk=st.sampled_from([2, 5, 100_000]))
def test_a_messy_sqlite_audience_reads_the_same_through_adbc(
    audience: tuple[list[Row], list[tuple[object, object]]], rows_per_chunk: int
) -> None:
    rows, suppressions = audience
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "CHUNK_ROWS", rows_per_chunk)
        url = sqlite_db(Path(tmp) / "users.sqlite", rows, suppressions)
        compare(SQLITE_SPEC, url, Path(tmp))


@settings(
    max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    audience=messy_audiences(),
    rows_per_chunk=st.sampled_from([2, 3, 5]),
    in_memory=st.sampled_from([0, 1, 3, 6]),
)
def test_dedupe_past_the_keys_held_in_memory_leaves_the_same_files(
    audience: tuple[list[Row], list[tuple[object, object]]], rows_per_chunk: int, in_memory: int
) -> None:
    """Past ``SEEN_IN_MEMORY`` keys, the later copies of an address are found on disk after the
    source is read and left out in one more pass: the same snapshot, suppressed file and
    counts (duplicates, defaulted locales, kept) as dedupe with every key in memory, through
    either reader, and no file of the pass left behind."""
    rows, suppressions = audience
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "CHUNK_ROWS", rows_per_chunk)
        url = sqlite_db(Path(tmp) / "users.sqlite", rows, suppressions)
        held = {reader: run(SQLITE_SPEC, url, Path(tmp) / "held", reader) for reader in READERS}
        patch.setattr(extract, "SEEN_IN_MEMORY", in_memory)
        for reader in READERS:
            assert run(SQLITE_SPEC, url, Path(tmp) / "disk", reader) == held[reader]


READERS: tuple[extract.Reader, ...] = ("auto", "sqlalchemy")


def test_dedupe_on_disk_writes_the_snapshot_dedupe_in_memory_writes_empty_chunks_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk of which nobody is kept (everyone suppressed) is an empty row group of the
    snapshot; the pass that leaves out later copies keeps it, so the file is byte for byte the
    one dedupe in memory writes."""
    rows: list[Row] = [
        ("u1", "a@example.com", "A", "en"),
        ("u2", "b@example.com", "B", "en"),
        ("u3", "gone@example.com", "G", "en"),
        ("u4", "left@example.com", "L", "en"),
        ("u5", "A@EXAMPLE.COM", "A again", "en"),
        ("u6", "c@example.com", "C", "en"),
    ]
    suppressions: list[tuple[object, object]] = [
        ("gone@example.com", "bounced"),
        ("left@example.com", None),
    ]
    url = sqlite_db(tmp_path / "users.sqlite", rows, suppressions)
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    for reader in READERS:
        held = run(SQLITE_SPEC, url, tmp_path / "held", reader)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(extract, "SEEN_IN_MEMORY", 0)
            on_disk = run(SQLITE_SPEC, url, tmp_path / "disk", reader)
        assert held.counts is not None
        assert held.counts["duplicates"] == 1
        assert on_disk == held


def test_dedupe_on_disk_keeps_the_first_row_of_each_address_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[Row] = [(f"u{i}", f"p{i % 4}@example.com", "P", "en") for i in range(12)]
    rows += [("u99", "P1@EXAMPLE.COM", "Again", "zz")]
    url = sqlite_db(tmp_path / "users.sqlite", rows, [])
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    monkeypatch.setattr(extract, "SEEN_IN_MEMORY", 1)
    for reader in READERS:
        outcome = run(SQLITE_SPEC, url, tmp_path, reader)
        assert outcome.counts is not None
        assert outcome.counts["duplicates"] == 9
        assert outcome.counts["kept"] == 4
        assert outcome.counts["locale_defaulted"] == 0  # the "zz" row was a copy
        snapshot = tmp_path / reader / "audience" / "snapshot.parquet"
        import pyarrow.parquet as pq

        assert pq.read_table(snapshot, columns=["user_id"]).column(0).to_pylist() == [
            "u0",
            "u1",
            "u2",
            "u3",
        ]
        assert sorted(outcome.files) == ["snapshot.parquet", "suppressed.parquet"] or sorted(
            outcome.files
        ) == ["snapshot.parquet", "suppressed.parquet", "suppressions_unreadable.csv"]


# One row of plain text in every column: no column is all digits, none all NULL.
PLAIN_ROW: Row = ("zz-plain", "plain@example.com", "Plain", "en")
_REAL_LOOKING = re.compile(r"-?(?:[0-9]+\.[0-9]+(?:e[+-][0-9]+)?|[Ii]nf|nan)")
TEXT_ONLY = st.one_of(texts(*LOCALES, "Ann", "u1"), st.none()).filter(
    lambda v: v is None or not _REAL_LOOKING.fullmatch(v)
)


@settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(audience=messy_audiences(TEXT_ONLY), rows_per_chunk=st.sampled_from([2, 5, 100_000]))
def test_adbc_itself_reads_messy_sqlite_text_as_sqlalchemy_does(
    audience: tuple[list[Row], list[tuple[object, object]]], rows_per_chunk: int
) -> None:
    """Text and NULLs: ADBC reads and normalises them column-wise, without going back."""
    rows, suppressions = audience
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "CHUNK_ROWS", rows_per_chunk)
        url = sqlite_db(Path(tmp) / "users.sqlite", [PLAIN_ROW, *rows], suppressions)
        old, strict = compare(SQLITE_SPEC, url, Path(tmp))
        assert adbc_read_it(old, strict), strict.error


# --- one case at a time ---------------------------------------------------------------------

BASE: list[Row] = [
    ("u1", "Ann@Example.com", "Ann", "en"),
    ("u2", " ann@EXAMPLE.com ", "Ann again", "de-DE"),
    ("u3", "zoe@bücher.example", "Zoë", "xx"),
    ("u4", "gone@example.org", "Gone", "fr"),
    ("u5", "no address", "Nobody", None),
]
BASE_SUPPRESSIONS: list[tuple[object, object]] = [("GONE@example.org", "bounced"), (7, None)]


FILLER: Row = ("u6", "f@example.net", "F", "es")
NULL_ID: Row = (None, "c@example.net", "C", "en")


@dataclass(frozen=True)
class Case:
    id: str
    adbc: bool  # ADBC reads it itself (else the extract goes back to SQLAlchemy)
    rows: tuple[Row, ...] = ()
    query: str = QUERY
    sql: str = ""  # run on the database after the rows are written


SQLITE_CASES = [
    Case("plain", True),
    Case(
        "integer-ids", True, rows=((7, "a@example.com", "A", "en"), (8, "b@example.com", "B", "en"))
    ),
    # A chunk (of 3 rows) of integers and NULLs is floats to pandas ("7.0"): ADBC goes back to
    # SQLAlchemy, for digits in text too (it cannot tell them apart).
    Case("integer-ids-with-a-null", False, rows=(FILLER, (7, "a@example.com", "A", "en"), NULL_ID)),
    Case(
        "integer-ids-a-null-in-another-chunk", True, rows=((7, "a@example.com", "A", "en"), NULL_ID)
    ),
    Case(
        "digit-text-ids-with-a-null",
        False,
        rows=(FILLER, ("7", "a@example.com", "A", "en"), NULL_ID),
    ),
    Case("a-real-first-name", False, rows=(("x1", "a@example.com", 1.5, "en"),)),
    Case("a-real-spelt-as-text", False, rows=(("x1", "a@example.com", "1.5", "en"),)),
    Case("an-integer-among-names", True, rows=(("x1", "a@example.com", 12, "en"),)),
    Case("a-blob-name", True, rows=(("x1", "a@example.com", "Zoë".encode(), "en"),)),
    Case("a-blob-name-not-utf8", False, rows=(("x1", "a@example.com", b"\xff\xfeXa", "en"),)),
    Case(
        "text-not-utf8",
        False,
        sql="UPDATE users SET first_name = CAST(x'6265726e64406578616d706c652e6f7267ff' AS TEXT) "
        "WHERE user_id = 'u1'",
    ),
    Case("unknown-table", False, query="SELECT * FROM userz"),
    Case("syntax-error", False, query="SELEC user_id FROM users"),
    Case("missing-column", True, query="SELECT user_id, email, first_name FROM users"),
    Case("no-rows-missing-column", True, query="SELECT user_id FROM users WHERE 0"),
    Case("no-rows", True, query=QUERY + " LIMIT 0"),
    Case(
        "case-of-a-column-name", True, query="SELECT user_id, EMAIL, first_name, locale FROM users"
    ),
    Case(
        "a-column-twice", False, query="SELECT user_id, email, first_name, locale, email FROM users"
    ),
    Case("unread-columns", True, query="SELECT *, 1.5 AS score, x'4142' AS raw FROM users"),
    Case("unread-blob-not-utf8", False, query="SELECT *, x'ff' AS raw FROM users"),
    Case(
        "a-first-chunk-of-null-names",
        False,
        query="SELECT user_id, email, CASE WHEN rowid > 3 THEN first_name END AS first_name, "
        "locale FROM users",
    ),
    Case("unread-column-not-utf8", False, query="SELECT *, CAST(x'ff' AS TEXT) AS bad FROM users"),
    Case(
        "a-colon-in-a-literal",
        False,
        query="SELECT user_id, email, first_name, 'a :b' AS locale FROM users",
    ),
    Case(
        "a-colon-after-a-word",
        True,
        query="SELECT user_id, email, first_name, 'a:b' AS locale FROM users",
    ),
    Case(
        "a-second-statement",
        False,
        query="SELECT user_id, email, first_name, locale FROM users; SELECT 1",
    ),
    Case(
        "a-trailing-semicolon", True, query="SELECT user_id, email, first_name, locale FROM users;"
    ),
    Case("a-placeholder", False, query="SELECT user_id, email, first_name, ? AS locale FROM users"),
    Case(
        "a-division-by-zero-is-null",
        True,
        query="SELECT user_id, email, first_name, 1/0 AS locale FROM users",
    ),
]


@pytest.mark.parametrize("case", SQLITE_CASES, ids=lambda c: c.id)
def test_each_sqlite_case_reads_the_same(case: Case, tmp_path: Path, chunk_rows: int) -> None:
    url = sqlite_db(tmp_path / "users.sqlite", [*BASE, *case.rows], BASE_SUPPRESSIONS)
    if case.sql:
        with sqlite3.connect(tmp_path / "users.sqlite") as conn:
            conn.execute(case.sql)
        conn.close()
    old, strict = compare(
        campaign(case.query, SQLITE_SPEC.audience.suppressions_query), url, tmp_path
    )
    assert adbc_read_it(old, strict) is case.adbc, strict.error


def test_errors_keep_their_message_and_hide_the_value(tmp_path: Path) -> None:
    """The SQLAlchemy reader's errors, word for word (checked equal above), and still without
    the value SQLite quotes."""
    (case,) = [c for c in SQLITE_CASES if c.id == "text-not-utf8"]
    url = sqlite_db(tmp_path / "users.sqlite", BASE, BASE_SUPPRESSIONS)
    with sqlite3.connect(tmp_path / "users.sqlite") as conn:
        conn.execute(case.sql)
    conn.close()
    outcome = run(SQLITE_SPEC, url, tmp_path, "auto")
    assert outcome.error == (
        "AudienceError",
        f"cannot read the audience database ({url}): Could not decode to UTF-8 column "
        "'first_name' (the value is not shown)",
    )


@pytest.mark.parametrize(
    "url",
    [None, "sqlite:///:memory:", "sqlite:///{tmp}/missing.sqlite", "mysql://nobody@127.0.0.1:1/x"],
)
def test_a_url_adbc_does_not_take_gives_the_sqlalchemy_outcome(
    url: str | None, tmp_path: Path
) -> None:
    url = url.format(tmp=tmp_path) if url else url
    old, strict = compare(campaign(QUERY, None), url, tmp_path)
    assert old.error is not None
    assert url is None or not adbc_read_it(old, strict)


def test_the_sample_audience_in_many_chunks_reads_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract, "CHUNK_ROWS", 700)
    sample = generate(tmp_path / "users.sqlite", users=3000)
    spec = campaign(QUERY, CAMPAIGN.audience.suppressions_query)
    old, strict = compare(spec, sample.url(), tmp_path)
    assert adbc_read_it(old, strict)
    assert old.counts is not None
    assert old.counts["extracted"] == 3000
    assert old.counts["duplicates"] > 0


def test_chunks_are_the_sqlalchemy_readers_size_and_the_reading_thread_ends(tmp_path: Path) -> None:
    rows = [(f"u{i}", f"u{i}@example.com", "N", "en") for i in range(2500)]
    url = sqlite_db(tmp_path / "users.sqlite", rows, [])
    target = adbc_target(url)
    names = ("user_id", "email", "first_name", "locale")
    sizes = [c.rows for c in text_chunks(target, QUERY, names, 1000)]
    assert sizes == [1000, 1000, 500]
    # Stopped after the first chunk: the read-ahead thread is joined, the connection closed.
    chunks = text_chunks(target, QUERY, names, 1000)
    next(chunks)
    chunks.close()
    assert not [t for t in threading.enumerate() if t.name == "adbc-read-ahead"]


# --- URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "conninfo"),
    [
        (
            "postgresql://u:p%40ss@db.example:5433/users",
            "host='db.example' port='5433' user='u' password='p@ss' dbname='users'",
        ),
        (
            "postgresql+psycopg2://u@127.0.0.1/users?sslmode=require&connect_timeout=5",
            "host='127.0.0.1' user='u' dbname='users' sslmode='require' connect_timeout='5'",
        ),
        (
            "postgresql+psycopg://u:it's%5Cme@h/d",
            "host='h' user='u' password='it\\'s\\\\me' dbname='d'",
        ),
        (
            "postgresql://u@/users?host=/var/run/postgresql",
            "user='u' dbname='users' host='/var/run/postgresql'",
        ),
        ("postgresql:///users", "dbname='users'"),
        (
            "postgresql://u@h/d?options=-c%20search_path%3Dmine",
            "host='h' user='u' dbname='d' options='-c search_path=mine'",
        ),
    ],
)
def test_postgresql_urls_become_the_libpq_parameters_sqlalchemy_passes(
    url: str, conninfo: str
) -> None:
    import psycopg2.extensions

    assert adbc_target(url) == AdbcTarget("postgresql", conninfo)
    # libpq reads them back as the parameters SQLAlchemy's dialect gives psycopg.
    from sqlalchemy import create_engine

    engine = create_engine(url)
    _, params = engine.dialect.create_connect_args(engine.url)
    expected = {k: str(v) for k, v in params.items() if isinstance(v, str | int)}
    assert psycopg2.extensions.parse_dsn(conninfo) == expected


def test_sqlite_urls_become_the_file_sqlite3_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "users.sqlite").touch()
    monkeypatch.chdir(tmp_path)
    assert adbc_target(f"sqlite:///{tmp_path}/users.sqlite").uri == f"{tmp_path}/users.sqlite"
    assert adbc_target("sqlite+pysqlite:///users.sqlite") == AdbcTarget("sqlite", "users.sqlite")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///missing.sqlite",
        "sqlite:///file:users.sqlite?mode=ro&uri=true",
        "sqlite+aiosqlite:///users.sqlite",
        "postgresql+pg8000://u@h/d",
        "postgresql+asyncpg://u@h/d",
        "postgresql://u@h/d?host=/tmp",
        "postgresql://u@/d?host=h1,h2",
        "postgresql://u@/d?host=h1:5433",
        "postgresql://u@/d?sslmode=a&sslmode=b",
        "mysql://u@h/d",
        "not a url",
    ],
)
def test_urls_adbc_does_not_read_as_sqlalchemy_would_are_refused(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "users.sqlite").touch()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotExact):
        adbc_target(url)


# --- PostgreSQL -----------------------------------------------------------------------------


def pg_load(
    url: str,
    rows: Sequence[Row],
    suppressions: Sequence[tuple[object, object]],
    columns: str = "user_id text, email text, first_name text, locale text",
) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS adbc_users, adbc_suppressions")
            cur.execute(f"CREATE TABLE adbc_users (n serial, {columns})")
            cur.execute("CREATE TABLE adbc_suppressions (n serial, email text, reason text)")
            names = [c.split()[0] for c in columns.split(", ")][:4]
            cur.executemany(
                f"INSERT INTO adbc_users ({', '.join(names)}) VALUES (%s, %s, %s, %s)", rows
            )
            cur.executemany(
                "INSERT INTO adbc_suppressions (email, reason) VALUES (%s, %s)",
                [
                    (None if e is None else str(e), None if r is None else str(r))
                    for e, r in suppressions
                ],
            )
    finally:
        conn.close()


PG_TEXT = st.one_of(texts(*LOCALES, "Ann", "u1").map(lambda v: v.replace("\x00", "")), st.none())


@pytest.mark.postgres
@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(audience=messy_audiences(PG_TEXT), rows_per_chunk=st.sampled_from([2, 100_000]))
def test_adbc_itself_reads_a_messy_postgresql_audience_as_sqlalchemy_does(
    postgres_url: str,
    audience: tuple[list[Row], list[tuple[object, object]]],
    rows_per_chunk: int,
) -> None:
    rows, suppressions = audience
    pg_load(postgres_url, rows, [(e, r) for e, r in suppressions if not isinstance(e, bytes)])
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "CHUNK_ROWS", rows_per_chunk)
        old, strict = compare(PG_SPEC, postgres_url, Path(tmp))
        assert adbc_read_it(old, strict), strict.error


PG_ROWS: list[Row] = [
    (1, "Ann@Example.com", "A", "en"),
    (2, " ann@EXAMPLE.com ", "B", "de-DE"),
    (None, "zoe@bücher.example", None, "xx"),
    (4, "gone@example.org", "C", None),
]


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("columns", "first_names", "adbc"),
    [
        ("user_id int8, email text, first_name text, locale text", None, True),
        ("user_id int4, email varchar(40), first_name bpchar(6), locale varchar", None, True),
        ("user_id int2, email text, first_name int4, locale text", [3, None, 5, 6], True),
        ("user_id int8, email text, first_name bool, locale text", [True, False, None, True], True),
        ("user_id int8, email text, first_name float8, locale text", [1.5, 1e20, None, 0.1], True),
        (
            "user_id int8, email text, first_name bytea, locale text",
            [b"Zo\xc3\xab", b"\xff", None, b""],
            True,
        ),
        ("user_id int8, email text, first_name float4, locale text", [1.1, 2.5, None, 3.0], False),
        ("user_id int8, email text, first_name numeric, locale text", [1.5, 2, None, 3], False),
        (
            "user_id int8, email text, first_name timestamptz, locale text, x int",
            ["2024-01-01", None, "2025-02-03", "2026-12-06"],
            False,
        ),
        (
            "user_id int8, email text, first_name text, locale text, "
            "seen timestamptz DEFAULT now()",
            None,
            False,
        ),
        (
            "user_id int8, email text, first_name text, locale text, "
            "score numeric DEFAULT 1.5, id uuid DEFAULT gen_random_uuid()",
            None,
            True,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_postgresql_column_type_reads_the_same(
    postgres_url: str,
    tmp_path: Path,
    chunk_rows: int,
    columns: str,
    first_names: list[object] | None,
    adbc: bool,
) -> None:
    rows = [
        (u, e, f, loc)
        for (u, e, _, loc), f in zip(PG_ROWS, first_names or [r[2] for r in PG_ROWS], strict=True)
    ]
    pg_load(postgres_url, rows, [("GONE@example.org", "bounced")], columns)
    spec = campaign("SELECT * FROM adbc_users ORDER BY n", PG_SUPPRESSIONS_QUERY)
    old, strict = compare(spec, postgres_url, tmp_path)
    assert adbc_read_it(old, strict) is adbc, strict.error


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("query", "adbc"),
    [
        ("SELECT * FROM adbc_userz", False),
        ("SELEC user_id FROM adbc_users", False),
        ("SELECT user_id, email, first_name FROM adbc_users", True),
        ("SELECT user_id, email, first_name, 'a :b' AS locale FROM adbc_users", False),
        ("SELECT user_id, email, first_name, locale FROM adbc_users; SELECT 1", False),
        ("SELECT user_id, email, first_name, locale FROM adbc_users WHERE email LIKE '%@%'", True),
        ("SELECT user_id, email, first_name, locale::text FROM adbc_users ORDER BY n;", True),
    ],
)
def test_postgresql_sql_and_its_errors_read_the_same(
    postgres_url: str, tmp_path: Path, query: str, adbc: bool
) -> None:
    pg_load(postgres_url, PG_ROWS, [])
    old, strict = compare(campaign(query, None), postgres_url, tmp_path)
    assert adbc_read_it(old, strict) is adbc, strict.error


@pytest.mark.postgres
def test_an_unreachable_postgresql_gives_the_sqlalchemy_error(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://nobody@127.0.0.1:1/users"
    old, _ = compare(campaign(PG_QUERY, None), url, tmp_path)
    assert old.error is not None
    assert old.error[1].startswith(
        "cannot read the audience database (postgresql+psycopg2://nobody@127.0.0.1:1/users)"
    )


@pytest.mark.postgres
def test_the_sample_audience_from_postgresql_reads_the_same_in_chunks(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's batches are sized in bytes: they are cut into the SQLAlchemy reader's."""
    monkeypatch.setattr(extract, "CHUNK_ROWS", 700)
    sample = generate(tmp_path / "users.sqlite", users=3000)
    with sqlite3.connect(sample.path) as conn:
        rows = conn.execute("SELECT user_id, email, first_name, locale FROM users").fetchall()
        suppressions = conn.execute("SELECT email, reason FROM suppressions").fetchall()
    conn.close()
    pg_load(postgres_url, rows, suppressions)
    old, strict = compare(PG_SPEC, postgres_url, tmp_path)
    assert adbc_read_it(old, strict)
    assert old.counts is not None
    assert old.counts["suppressed"] > 0
    assert old.counts["duplicates"] > 0
