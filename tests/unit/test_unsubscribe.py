"""Unsubscribe tokens made in a second process are the tokens made here, row for row."""

from __future__ import annotations

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


def test_tokens_from_the_worker_are_the_tokens_made_here(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 120_003)
    ids = pq.read_table(path).column("user_id")
    expected = token_column(SECRET, CAMPAIGN, ids).to_pylist()
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=len(ids), locales=("en", "de"), min_rows=0
    )
    try:
        assert background.in_background
        rng = np.random.default_rng(7)
        # In the order the worker makes them, against it, and at random.
        for rows in (
            np.flatnonzero(
                pq.read_table(path).column("locale").to_numpy(zero_copy_only=False) == "en"
            ),
            np.arange(len(ids))[::-1],
            rng.permutation(len(ids))[:5000],
            np.array([], dtype=np.int64),
        ):
            assert background.take(rows).to_pylist() == [expected[i] for i in rows]
    finally:
        background.close()
    assert expected[0] == unsubscribe_token(SECRET, CAMPAIGN, "ü-0")


def test_ids_that_are_not_text_are_signed_as_their_text(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 10, user_ids=list(range(100, 110)))
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=10, min_rows=0)
    try:
        tokens = background.take(np.arange(10)).to_pylist()
    finally:
        background.close()
    assert tokens == [unsubscribe_token(SECRET, CAMPAIGN, str(u)) for u in range(100, 110)]


def test_small_audiences_are_signed_in_this_process(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 50)
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=50)
    assert not background.in_background
    ids = pq.read_table(path).column("user_id").to_pylist()
    assert background.take(np.array([3, 1])).to_pylist() == [
        unsubscribe_token(SECRET, CAMPAIGN, ids[3]),
        unsubscribe_token(SECRET, CAMPAIGN, ids[1]),
    ]


def test_a_worker_that_fails_is_an_error_not_missing_tokens(tmp_path: Path) -> None:
    path = tmp_path / "no_user_ids.parquet"
    pq.write_table(pa.table({"email": ["a@example.com"] * 3}), path)
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=3, min_rows=0)
    try:
        with pytest.raises(RuntimeError, match=r"token worker stopped .*exit 1.*user_id"):
            background.take(np.arange(3))
    finally:
        background.close()


def test_closing_stops_the_worker_and_removes_its_files(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 200_000)
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=200_000, min_rows=0)
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
