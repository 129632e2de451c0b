"""Envelopes and the audience they are built from: extraction, validation, per-recipient values.

Extraction reads a real CSV file and a real SQLite database; validation runs the real Great
Expectations suite on a real Parquet snapshot.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

import mailroom.envelopes as envelopes_module
from mailroom.audience.extract import extract_audience, snapshot_schema
from mailroom.audience.validate import validate_audience
from mailroom.campaign_spec import AudienceSource, CampaignSpec, load_campaign
from mailroom.checks.envelope_guard import values_digest
from mailroom.envelopes import build_envelopes, clean_value, envelope_values
from mailroom.errors import AudienceError, ValidationFailed
from mailroom.unsubscribe import unsubscribe_token, verify_unsubscribe_token

pytestmark = pytest.mark.unit

CAMPAIGNS = Path(__file__).resolve().parents[2] / "include" / "campaigns"
SECRET = b"unit-test-unsubscribe-secret"
NAME_TAG, NAME_HTML_TAG = "%%first_name%%", "%%first_name|html%%"
UNSUB_TAG, UNSUB_HTML_TAG = "%%unsubscribe_url%%", "%%unsubscribe_url|html%%"


@pytest.fixture(scope="module")
def spec() -> CampaignSpec:
    return load_campaign(CAMPAIGNS, "winter_update")


def row(user_id: str = "u1", first_name: object = "Ada", **extra: Any) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "email": "ada@example.com",
        "locale": "en",
        "first_name": first_name,
        **extra,
    }


# -- per-recipient values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ann\r\nBcc: leak@example.com", "Ann Bcc: leak@example.com"),
        ("a\rb\nc", "a b c"),
        ("line\u2028sep\u2029para\x85nel\x0bvt\x0cff", "line sep para nel vt ff"),
        ("  padded\n", "padded"),
        (None, ""),
        (42, "42"),
    ],
)
def test_clean_value_leaves_one_line(raw: object, expected: str) -> None:
    assert clean_value(raw) == expected


def test_line_breaks_are_stripped_from_every_substitution_and_header(spec: CampaignSpec) -> None:
    subs, headers = envelope_values(spec, SECRET, row(first_name="Ann\r\nBcc: leak@example.com"))

    assert subs[NAME_TAG] == "Ann Bcc: leak@example.com"
    for value in [*subs.values(), *headers.values()]:
        assert "\r" not in value
        assert "\n" not in value


def test_the_html_variant_is_escaped_and_the_plain_one_is_not(spec: CampaignSpec) -> None:
    name = '<script>alert("x")</script> & O\'Brien'
    subs, _ = envelope_values(spec, SECRET, row(first_name=name))

    assert subs[NAME_TAG] == name
    assert subs[NAME_HTML_TAG] == (
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; O&#x27;Brien"
    )
    assert "&amp;" not in subs[UNSUB_TAG]
    assert subs[UNSUB_HTML_TAG].startswith("https://example-exchange.test/u/")


def test_each_envelope_has_its_own_one_click_unsubscribe(spec: CampaignSpec) -> None:
    subs, headers = envelope_values(spec, SECRET, row(user_id="u1"))
    other, other_headers = envelope_values(spec, SECRET, row(user_id="u2"))

    url = subs[UNSUB_TAG]
    token = unquote(url.rsplit("/u/", 1)[1])
    assert verify_unsubscribe_token(SECRET, spec.name, token) == "u1"
    # RFC 8058: an HTTPS URI in List-Unsubscribe plus the one-click POST marker.
    assert set(headers) == {"List-Unsubscribe", "List-Unsubscribe-Post"}
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https, mailto = (part.strip() for part in headers["List-Unsubscribe"].split(","))
    assert https == f"<{url}>"
    assert url.startswith("https://")
    assert mailto.startswith("<mailto:unsubscribe@example-exchange.test?subject=unsubscribe")
    assert other[UNSUB_TAG] != url
    assert other_headers["List-Unsubscribe"] != headers["List-Unsubscribe"]


def test_without_a_mailto_only_the_https_link_is_listed(spec: CampaignSpec) -> None:
    no_mailto = dataclasses.replace(
        spec, unsubscribe=dataclasses.replace(spec.unsubscribe, mailto=None)
    )
    subs, headers = envelope_values(no_mailto, SECRET, row())
    assert headers["List-Unsubscribe"] == f"<{subs[UNSUB_TAG]}>"


@pytest.mark.parametrize("user_id", ["u00000001", "ユーザー/42", "a.b.c", ""])
def test_unsubscribe_tokens_round_trip(user_id: str) -> None:
    token = unsubscribe_token(SECRET, "winter_update", user_id)
    assert verify_unsubscribe_token(SECRET, "winter_update", token) == user_id


def _tampered(token: str) -> dict[str, str]:
    kid, campaign, sealed = [*token.split("."), "", ""][:3]
    other = unsubscribe_token(SECRET, "winter_update", "u2").rpartition(".")[2]
    flipped = sealed[:-1] + ("A" if sealed[-1:] != "A" else "B")
    # The SIV tag is the first 16 bytes of the seal (21 characters and 2 bits): another
    # user's tag with this user's ciphertext.
    tag_swapped = other[:21] + sealed[21:]
    return {
        "flipped seal": f"{kid}.{campaign}.{flipped}",
        "another user's tag": f"{kid}.{campaign}.{tag_swapped}",
        "another campaign": f"{kid}.summer_sale.{sealed}",
        "another key id": f"{'A' if kid[:1] != 'A' else 'B'}{kid[1:]}.{campaign}.{sealed}",
        "no seal": f"{kid}.{campaign}",
        "empty seal": f"{kid}.{campaign}.",
        "a part too many": f"{token}.{sealed}",
        "truncated": token[:-3],
        "extended": token + "AA",
        "empty": "",
        "garbage": "not a token",
        "non-ASCII seal": f"{kid}.{campaign}.{sealed[:-1]}é",
        "non-ASCII campaign": f"{kid}.wïnter_update.{sealed}",
        "bad base64 seal": f"{kid}.{campaign}.@@@{sealed[3:]}",
        "padded seal": f"{token}==",
    }


@pytest.mark.parametrize("case", list(_tampered("x.y.z")))
def test_a_tampered_unsubscribe_token_is_rejected(case: str) -> None:
    token = unsubscribe_token(SECRET, "winter_update", "u1")
    assert verify_unsubscribe_token(SECRET, "winter_update", _tampered(token)[case]) is None


def test_a_token_only_verifies_for_its_campaign_and_secret() -> None:
    token = unsubscribe_token(SECRET, "winter_update", "u1")
    assert verify_unsubscribe_token(b"another-secret", "winter_update", token) is None
    assert verify_unsubscribe_token(SECRET, "summer_sale", token) is None


def test_build_envelopes_writes_one_envelope_per_recipient(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    valid = tmp_path / "valid.parquet"
    people = [
        row("u1", "Ann\nBcc: x@example.com"),
        {**row("u2", "<b>Bo</b>"), "email": "bo@example.org", "locale": "de"},
    ]
    pd.DataFrame(people).to_parquet(valid, index=False)

    assert (
        build_envelopes(spec, valid_audience=valid, out=tmp_path / "env.parquet", secret=SECRET)
        == 2
    )

    envelopes = sorted(
        pq.read_table(tmp_path / "env.parquet").to_pylist(), key=lambda e: e["user_id"]
    )
    assert [(e["user_id"], e["email"], e["locale"]) for e in envelopes] == [
        ("u1", "ada@example.com", "en"),
        ("u2", "bo@example.org", "de"),
    ]
    for envelope, person in zip(envelopes, people, strict=True):
        subs, headers = envelope_values(spec, SECRET, person)
        # The very text a request body carries, and the digest the outbox keeps.
        assert envelope["substitutions"] == json.dumps(
            subs, ensure_ascii=False, separators=(",", ":")
        )
        assert envelope["headers"] == json.dumps(headers, ensure_ascii=False, separators=(",", ":"))
        assert envelope["values_sha256"] == values_digest(subs, headers)
    first, second = (json.loads(e["substitutions"]) for e in envelopes)
    assert first[NAME_TAG] == "Ann Bcc: x@example.com"
    assert second[NAME_HTML_TAG] == "&lt;b&gt;Bo&lt;/b&gt;"
    assert json.loads(envelopes[1]["headers"])["List-Unsubscribe-Post"] == (
        "List-Unsubscribe=One-Click"
    )
    with pytest.raises(ValueError, match="secret"):
        build_envelopes(spec, valid_audience=valid, out=tmp_path / "x.parquet", secret=b"")


def test_envelopes_are_grouped_by_locale_in_audience_order(
    spec: CampaignSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row group per locale and chunk (a reader of one locale skips the others), and each
    locale's envelopes in the audience's order, whatever the chunking."""
    monkeypatch.setattr(envelopes_module, "CHUNK_ROWS", 7)
    valid = tmp_path / "valid.parquet"
    locales = ["en", "de", "fr"]
    people = [
        {
            **row(f"u{i:03d}", f"Name {i}"),
            "email": f"p{i}@example.com",
            "locale": locales[i % 3 if i % 5 else 0],
        }
        for i in range(40)
    ]
    pd.DataFrame(people).to_parquet(valid, index=False)
    out = tmp_path / "env.parquet"
    assert build_envelopes(spec, valid_audience=valid, out=out, secret=SECRET) == 40

    parquet = pq.ParquetFile(out)
    for group in range(parquet.num_row_groups):
        assert (
            len(set(parquet.read_row_group(group, columns=["locale"]).column(0).to_pylist())) == 1
        )
    for locale in locales:
        got = pq.read_table(out, filters=[("locale", "=", locale)]).column("user_id").to_pylist()
        assert got == [p["user_id"] for p in people if p["locale"] == locale]


# -- extract_audience ------------------------------------------------------------------------------

USERS = [
    ("u01", "ada@example.com", "Ada", "en"),
    ("u02", "  ADA@Example.COM ", "Ada again", "en"),  # duplicate: case and whitespace
    ("u03", "Bob@Example.org", "Bob", "de-DE"),  # → de
    ("u04", "carol@example.net", "Carol", "pt-BR"),  # not a campaign language → en
    ("u05", "dave@example.com", "Dave", "fr_CA"),  # → fr
    ("u06", "erin@example.com", "Erin", ""),  # no locale → en
    ("u07", "frank@example.com", "Frank", "DE"),  # → de (only spelled differently)
    ("u08", "Suppressed@Example.com", "Sam", "en"),  # suppressed, other case
    ("u09", "grace@example.com", "Grace", "es"),  # suppressed as GRACE@EXAMPLE.COM
    ("u10", "henry@bücher.example", "Henry", "ja_JP"),  # IDN domain, → ja
    ("u11", "ivan@example.com", "Ivan", "en"),
    ("u12", "ivan@example.com\t", "Ivan twin", "en"),  # duplicate: whitespace
]
SUPPRESSIONS = [
    ("suppressed@EXAMPLE.com", "unsubscribed"),
    ("GRACE@EXAMPLE.COM", "bounced"),
    ("nobody@example.com", "complained"),
]
EXPECTED_KEPT = {
    "u01": ("ada@example.com", "en"),
    "u03": ("Bob@example.org", "de"),
    "u04": ("carol@example.net", "en"),
    "u05": ("dave@example.com", "fr"),
    "u06": ("erin@example.com", "en"),
    "u07": ("frank@example.com", "de"),
    "u10": ("henry@xn--bcher-kva.example", "ja"),
    "u11": ("ivan@example.com", "en"),
}


def with_source(spec: CampaignSpec, **source: str | None) -> CampaignSpec:
    fields = {
        "connection_id": None,
        "query": None,
        "suppressions_query": None,
        "url": None,
        "suppressions_url": None,
        **source,
    }
    return dataclasses.replace(spec, audience=AudienceSource(**fields))


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return f"file://{path}"


def check_extracted(counts: Any, snapshot: Path) -> None:
    kept = pd.read_parquet(snapshot)
    assert list(kept.columns) == ["user_id", "email", "locale", "first_name"]
    assert {r.user_id: (r.email, r.locale) for r in kept.itertuples()} == EXPECTED_KEPT
    assert counts.to_dict() == {
        "extracted": 12,
        "suppressed": 2,
        "suppressed_by_reason": {"bounced": 1, "unsubscribed": 1},
        "duplicates": 2,
        # Rows whose locale, as given, is not one of the campaign's: u03 u04 u05 u06 u10.
        "locale_defaulted": 5,
        "kept": 8,
    }


def test_extract_from_csv_files_drops_suppressed_and_duplicates_and_maps_locales(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    users = write_csv(tmp_path / "users.csv", ("user_id", "email", "first_name", "locale"), USERS)
    suppressions = write_csv(tmp_path / "suppressions.csv", ("email", "reason"), SUPPRESSIONS)
    csv_spec = with_source(spec, url=users, suppressions_url=suppressions)

    counts = extract_audience(csv_spec, sql_url=None, snapshot=tmp_path / "snap.parquet")

    check_extracted(counts, tmp_path / "snap.parquet")


def test_extract_from_sqlite_drops_suppressed_and_duplicates_and_maps_locales(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    db = tmp_path / "users.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (user_id TEXT, email TEXT, first_name TEXT, locale TEXT)")
        conn.execute("CREATE TABLE suppressions (email TEXT, reason TEXT)")
        conn.executemany("INSERT INTO users VALUES (?,?,?,?)", USERS)
        conn.executemany("INSERT INTO suppressions VALUES (?,?)", SUPPRESSIONS)
    conn.close()
    assert spec.audience.query is not None
    assert spec.audience.suppressions_query is not None

    counts = extract_audience(spec, sql_url=f"sqlite:///{db}", snapshot=tmp_path / "snap.parquet")

    check_extracted(counts, tmp_path / "snap.parquet")


@pytest.mark.postgres
def test_extract_from_postgresql_reads_every_row(
    spec: CampaignSpec, tmp_path: Path, postgres_url: str
) -> None:
    """The same source on PostgreSQL, read with a server-side cursor: not one row lost (the
    first row of each query once was, and the counts still balanced)."""
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE users (user_id TEXT, email TEXT, first_name TEXT, locale TEXT)"
            )
            conn.exec_driver_sql("CREATE TABLE suppressions (email TEXT, reason TEXT)")
            conn.exec_driver_sql("INSERT INTO users VALUES (%s, %s, %s, %s)", USERS)
            conn.exec_driver_sql("INSERT INTO suppressions VALUES (%s, %s)", SUPPRESSIONS)

        counts = extract_audience(spec, sql_url=postgres_url, snapshot=tmp_path / "snap.parquet")

        check_extracted(counts, tmp_path / "snap.parquet")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS users, suppressions")
        engine.dispose()


def test_extract_fails_loudly_on_an_unusable_source(spec: CampaignSpec, tmp_path: Path) -> None:
    with pytest.raises(AudienceError, match="resolved to no database URL"):
        extract_audience(spec, sql_url=None, snapshot=tmp_path / "a.parquet")
    missing = with_source(spec, url=f"file://{tmp_path / 'nope.csv'}")
    with pytest.raises(AudienceError, match="not found"):
        extract_audience(missing, sql_url=None, snapshot=tmp_path / "b.parquet")
    no_locale = write_csv(
        tmp_path / "u.csv", ("user_id", "email", "first_name"), [("u1", "a@example.com", "A")]
    )
    with pytest.raises(AudienceError, match="locale"):
        extract_audience(
            with_source(spec, url=no_locale), sql_url=None, snapshot=tmp_path / "c.parquet"
        )


# -- validate_audience -----------------------------------------------------------------------------

# An address key more than one row of the audience holds: every copy is quarantined.
ADDRESS_TWICE = "expect_column_values_to_be_in_set(email_key__once_in_audience)"
VALID_ROWS = [(f"v{i:02d}", f"person{i}@example.com", f"Name {i}", "en") for i in range(16)]
# user id → (row, the reason it must be quarantined with)
INVALID_ROWS: dict[str | None, tuple[tuple[str | None, ...], str]] = {
    "x1": (
        ("x1", "x@example.com, z@example.com", "Two", "en"),
        "expect_column_values_to_not_match_regex(email)",
    ),
    "x2": (
        ("x2", "no-at-sign.example.com", "NoAt", "de"),
        "expect_column_values_to_match_regex(email)",
    ),
    "x3": (("x3", "loc@example.com", "Loc", "xx"), "expect_column_values_to_be_in_set(locale)"),
    "x4": (
        ("x4", "noname@example.com", None, "fr"),
        "expect_column_values_to_not_be_null(first_name)",
    ),
    "x5": (
        ("x5", "empty@example.com", "", "es"),
        "expect_column_value_lengths_to_be_between(first_name)",
    ),
    # v00's address again: uniqueness holds back both copies, not just the later one.
    "x6": (
        ("x6", "PERSON0@example.com", "Twin", "en"),
        ADDRESS_TWICE,
    ),
    "v00": (VALID_ROWS[0], ADDRESS_TWICE),
    None: ((None, "nouid@example.com", "Nobody", "en"), "user_id missing"),
}


def write_snapshot(path: Path, spec: CampaignSpec) -> Path:
    rows = [*VALID_ROWS, *(r for uid, (r, _) in INVALID_ROWS.items() if uid != "v00")]
    table = pa.Table.from_pylist(
        [dict(zip(("user_id", "email", "first_name", "locale"), r, strict=True)) for r in rows],
        schema=snapshot_schema(spec.fields),
    )
    pq.write_table(table, path)
    return path


def test_validate_quarantines_invalid_rows_with_a_reason(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    lenient = dataclasses.replace(spec, max_invalid_fraction=0.5)
    snapshot = write_snapshot(tmp_path / "snap.parquet", spec)

    outcome = validate_audience(
        lenient,
        snapshot=snapshot,
        valid_out=tmp_path / "valid.parquet",
        quarantine_out=tmp_path / "quarantine.parquet",
    )

    assert (outcome.total, outcome.valid, outcome.quarantined) == (23, 15, 8)
    valid = pd.read_parquet(tmp_path / "valid.parquet")
    assert sorted(valid["user_id"]) == [r[0] for r in VALID_ROWS[1:]]
    assert list(valid.columns) == ["user_id", "email", "locale", "first_name"]
    quarantine = pd.read_parquet(tmp_path / "quarantine.parquet")
    reasons = {
        (uid if isinstance(uid, str) else None): reason
        for uid, reason in zip(quarantine["user_id"], quarantine["reason"], strict=True)
    }
    assert reasons == {uid: reason for uid, (_, reason) in INVALID_ROWS.items()}
    assert outcome.quarantined_by_reason[ADDRESS_TWICE] == 2
    assert sum(outcome.quarantined_by_reason.values()) == 8
    assert outcome.per_locale == {"en": 15}
    # Counts only: the summary must not carry the addresses GX found.
    assert "example.com" not in json.dumps(outcome.to_dict(), default=str)


def test_validate_fails_the_run_above_the_invalid_threshold(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    assert spec.max_invalid_fraction == 0.05  # 8 of 23 is far above it
    snapshot = write_snapshot(tmp_path / "snap.parquet", spec)

    with pytest.raises(ValidationFailed, match=r"8 of 23 recipients .* above the campaign's limit"):
        validate_audience(
            spec,
            snapshot=snapshot,
            valid_out=tmp_path / "valid.parquet",
            quarantine_out=tmp_path / "quarantine.parquet",
        )

    # The quarantine is still written, so an operator can see why.
    assert len(pd.read_parquet(tmp_path / "quarantine.parquet")) == 8


def test_validate_passes_at_the_threshold_and_fails_just_above_it(
    spec: CampaignSpec, tmp_path: Path
) -> None:
    snapshot = write_snapshot(tmp_path / "snap.parquet", spec)
    paths = {"valid_out": tmp_path / "valid.parquet", "quarantine_out": tmp_path / "q.parquet"}

    at_limit = dataclasses.replace(spec, max_invalid_fraction=8 / 23)
    assert validate_audience(at_limit, snapshot=snapshot, **paths).quarantined == 8
    below = dataclasses.replace(spec, max_invalid_fraction=7 / 23)
    with pytest.raises(ValidationFailed):
        validate_audience(below, snapshot=snapshot, **paths)


def test_an_empty_audience_fails_validation(spec: CampaignSpec, tmp_path: Path) -> None:
    snapshot = tmp_path / "empty.parquet"
    pq.write_table(snapshot_schema(spec.fields).empty_table(), snapshot)
    with pytest.raises(ValidationFailed, match="empty"):
        validate_audience(
            spec,
            snapshot=snapshot,
            valid_out=tmp_path / "v.parquet",
            quarantine_out=tmp_path / "q.parquet",
        )


_VALUES = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.text(alphabet="<>&\"' \u00e9\u3042\U0001f600\n\r\u2028\t", max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.text(min_size=1, max_size=30), _VALUES, _VALUES), min_size=1, max_size=8
    ),
    url=st.sampled_from(
        [
            "https://example-exchange.test/unsubscribe?token={token}",
            '  https://x.test/u/{token}&a=<b>&c="d"  ',
            "https://x.test/{token}/again/{token}",
        ]
    ),
)
def test_substitutions_bytes_is_the_size_of_the_substitutions_made(
    spec: CampaignSpec, rows: list[tuple[str, str | None, str | None]], url: str
) -> None:
    """What the validation holds against SendGrid's 10,000 bytes, computed without the secret,
    is exactly the size (keys plus values in UTF-8) of each envelope's substitutions."""
    spec = dataclasses.replace(
        spec,
        fields=("first_name", "last_name"),
        unsubscribe=dataclasses.replace(spec.unsubscribe, url_template=url),
    )
    table = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "first_name": pa.array([r[1] for r in rows], pa.string()),
            "last_name": pa.array([r[2] for r in rows], pa.string()),
        }
    )

    sizes = envelopes_module.substitutions_bytes(spec, table).to_pylist()

    for size, (user_id, first, last) in zip(sizes, rows, strict=True):
        row = {"user_id": user_id, "first_name": first, "last_name": last}
        subs, _ = envelope_values(spec, b"any secret", row)
        assert size == sum(len(k.encode()) + len(v.encode()) for k, v in subs.items())


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(st.text(min_size=1, max_size=30), _VALUES), min_size=1, max_size=8),
    limit=st.integers(min_value=0, max_value=400),
)
def test_substitutions_fit_is_the_exact_size_held_to_the_limit(
    spec: CampaignSpec, rows: list[tuple[str, str | None]], limit: int
) -> None:
    """The validation's fast reading (a bound column-wise, exact only near the limit) says
    what the exact size says, on both sides of the limit."""
    table = pa.table(
        {"user_id": [r[0] for r in rows], "first_name": pa.array([r[1] for r in rows], pa.string())}
    )

    fits = envelopes_module.substitutions_fit(spec, table, limit).to_pylist()

    sizes = envelopes_module.substitutions_bytes(spec, table).to_pylist()
    assert fits == [size <= limit for size in sizes]
