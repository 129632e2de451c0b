"""Unsubscribe tokens made in a second process are the tokens made here, row for row, in the
order the data-quality gate asks for them and in any other (then made here)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mailroom.errors import ValidationFailed
from mailroom.unsubscribe import (
    TokensInBackground,
    check_secret,
    token_column,
    unsubscribe_token,
)

pytestmark = pytest.mark.unit
SECRET = b"tokens-secret"
CAMPAIGN = "winter_update"


def audience_file(path: Path, rows: int, *, user_ids: list[object] | None = None) -> Path:
    """Rows of several locales, interleaved, some without one."""
    locales = ["de", "en", None, "ja", "en", "fr"]
    table = pa.table(
        {
            "user_id": user_ids if user_ids is not None else [f"ü-{i}" for i in range(rows)],
            "email": [f"user{i}@example.com" for i in range(rows)],
            "locale": [locales[i % len(locales)] for i in range(rows)],
        }
    )
    pq.write_table(table, path)
    return path


def rows_of(path: Path, locale: str) -> tuple[np.ndarray, pa.Array]:
    """The rows of ``locale`` in file order, and their user ids."""
    table = pq.read_table(path)
    rows = np.flatnonzero(table.column("locale").to_numpy(zero_copy_only=False) == locale)
    return rows, table.column("user_id").take(pa.array(rows))


def take_in_steps(
    background: TokensInBackground, path: Path, locale: str, step: int
) -> list[str | None]:
    rows, ids = rows_of(path, locale)
    tokens: list[str | None] = []
    for start in range(0, len(rows), step):
        tokens += background.take(
            locale, rows[start : start + step], ids.slice(start, step)
        ).to_pylist()
    return tokens


def test_tokens_from_the_worker_are_the_tokens_made_here(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 120_003)
    ids = pq.read_table(path).column("user_id")
    expected = token_column(SECRET, CAMPAIGN, ids).to_pylist()
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=len(ids), locales=("en", "de", "fr"), min_rows=0
    )
    try:
        assert background.in_background
        # In the worker's order, in steps that do not match its chunks.
        for locale, step in (("en", 7_001), ("de", 65_536), ("fr", 1)):
            rows, _ = rows_of(path, locale)
            if locale == "fr":
                rows = rows[:3]
                tokens = [
                    background.take(
                        locale, rows[i : i + 1], ids.take(pa.array(rows[i : i + 1]))
                    ).to_pylist()[0]
                    for i in range(len(rows))
                ]
            else:
                tokens = take_in_steps(background, path, locale, step)
            assert tokens == [expected[i] for i in rows]
        assert background.in_background
    finally:
        background.close()
    assert expected[0] == unsubscribe_token(SECRET, CAMPAIGN, "ü-0")


def test_tokens_asked_for_out_of_the_workers_order_are_made_here(tmp_path: Path) -> None:
    """A locale the worker has passed, rows it skipped, a locale it does not make: the same
    tokens, made here."""
    path = audience_file(tmp_path / "valid.parquet", 30_000)
    ids = pq.read_table(path).column("user_id")
    expected = token_column(SECRET, CAMPAIGN, ids).to_pylist()
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=len(ids), locales=("en", "de", "fr"), min_rows=0
    )
    try:
        de, de_ids = rows_of(path, "de")
        assert background.take("de", de[:10], de_ids[:10]).to_pylist() == [
            expected[i] for i in de[:10]
        ]
        en, en_ids = rows_of(path, "en")  # the worker made every "en" token before "de"
        assert background.take("en", en[:10], en_ids[:10]).to_pylist() == [
            expected[i] for i in en[:10]
        ]
        # Rows of "de" it made for nobody: skipped.
        assert background.take("de", de[20:30], de_ids[20:30]).to_pylist() == [
            expected[i] for i in de[20:30]
        ]
        ja, ja_ids = rows_of(path, "ja")
        assert background.take("ja", ja[:5], ja_ids[:5]).to_pylist() == [
            expected[i] for i in ja[:5]
        ]
        fr, fr_ids = rows_of(path, "fr")
        assert background.take("fr", fr, fr_ids).to_pylist() == [expected[i] for i in fr]
    finally:
        background.close()

    # "fr" asked for first: the worker's "en" tokens are dropped, and "en" is made here.
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=len(ids), locales=("en", "fr"), min_rows=0
    )
    try:
        fr, fr_ids = rows_of(path, "fr")
        assert background.take("fr", fr[:5], fr_ids[:5]).to_pylist() == [
            expected[i] for i in fr[:5]
        ]
        assert take_in_steps(background, path, "en", 999) == [
            expected[i] for i in rows_of(path, "en")[0]
        ]
        assert background.in_background
    finally:
        background.close()


def test_ids_that_are_not_text_are_signed_as_their_text(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 10, user_ids=list(range(100, 110)))
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=10, locales=("en",), min_rows=0)
    try:
        rows, ids = rows_of(path, "en")
        tokens = background.take("en", rows, ids).to_pylist()
    finally:
        background.close()
    assert tokens == [unsubscribe_token(SECRET, CAMPAIGN, str(100 + i)) for i in rows]


def test_small_audiences_are_signed_in_this_process(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 50)
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=50, locales=("en",))
    assert not background.in_background
    ids = pq.read_table(path).column("user_id")
    rows = np.array([3, 1])
    assert background.take("en", rows, ids.take(pa.array(rows))).to_pylist() == [
        unsubscribe_token(SECRET, CAMPAIGN, ids[3].as_py()),
        unsubscribe_token(SECRET, CAMPAIGN, ids[1].as_py()),
    ]


def test_a_worker_that_fails_is_an_error_not_missing_tokens(tmp_path: Path) -> None:
    path = tmp_path / "no_user_ids.parquet"
    pq.write_table(pa.table({"email": ["a@example.com"] * 3, "locale": ["en"] * 3}), path)
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=3, locales=("en",), min_rows=0)
    try:
        with pytest.raises(RuntimeError, match=r"token worker stopped .*exit 1.*user_id"):
            background.take("en", np.arange(3), pa.array(["a", "b", "c"]))
    finally:
        background.close()


def test_the_worker_makes_only_a_few_chunks_ahead_of_the_caller(tmp_path: Path) -> None:
    """The worker is held back by what the caller has taken, not by the audience's size: here
    it stops a few chunks in, while nothing is taken."""
    path = audience_file(tmp_path / "valid.parquet", 1_500_000)
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=1_500_000, locales=("en", "de", "fr", "ja"), min_rows=0
    )
    try:
        process = background._process
        assert process is not None
        time.sleep(3)
        assert process.poll() is None  # still waiting to hand over the rest
    finally:
        background.close()


def test_closing_stops_the_worker_and_removes_its_files(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 200_000)
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=200_000, locales=("en",), min_rows=0
    )
    process = background._process
    folder = background._folder
    assert process is not None
    assert folder is not None
    background.close()
    assert process.poll() is not None
    assert not Path(folder.name).exists()
    background.close()  # twice is fine


@pytest.mark.parametrize("secret", [b"", b"   ", b"\t\n"])
def test_an_empty_signing_secret_is_refused(secret: bytes) -> None:
    with pytest.raises(ValidationFailed, match="the unsubscribe signing secret is empty"):
        check_secret(secret)


def test_a_signing_secret_is_returned_as_given() -> None:
    assert check_secret(b" s3cret ") == b" s3cret "
