"""RunKeys: every row's keys on disk, asked about all at once (DuckDB, bounded memory)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom.run_keys import RunKeys

pytestmark = pytest.mark.unit


def test_repeated_keys_across_chunks_and_missing_keys() -> None:
    with RunKeys(["email_key", "user_id"]) as keys:
        keys.add(email_key=pa.array(["a", "b", None, "a"]), user_id=pa.array(["1", "2", "3", None]))
        keys.add(email_key=pa.array(["c", "b", None]), user_id=pa.array(["4", "5", None]))
        assert sorted(keys.repeated("email_key").to_pylist()) == ["a", "b"]
        assert keys.repeated("user_id").to_pylist() == []  # two missing ids are no id twice
        assert keys.present("email_key", ["a", "z", "c", "c"]) == {"a", "c"}
        assert keys.present("user_id", []) == set()
        assert keys.rows == 7


def test_no_rows_no_keys() -> None:
    with RunKeys(["k"]) as keys:
        assert keys.repeated("k").to_pylist() == []
        assert keys.present("k", ["a"]) == set()


def test_refuses_what_it_was_not_made_for() -> None:
    with RunKeys(["k"]) as keys:
        with pytest.raises(ValueError, match="expected"):
            keys.add(j=pa.array(["a"]))
        with pytest.raises(ValueError, match="expected"):
            keys.add(k=pa.array(["a"]), j=pa.array(["b"]))
        keys.add(k=pa.array(["a"]))
        keys.repeated("k")
        with pytest.raises(RuntimeError):
            keys.add(k=pa.array(["a"]))
        with pytest.raises(KeyError):
            keys.repeated("j")


def test_the_scratch_folder_is_removed_unless_given(tmp_path: Path) -> None:
    with RunKeys(["k"]) as keys:
        keys.add(k=pa.array(["a", "a"]))
        keys.repeated("k")
        made = keys.folder
    assert not made.exists()
    given_folder = tmp_path / "keys"
    with RunKeys(["k"], folder=given_folder) as keys:
        keys.add(k=pa.array(["a"]))
    assert given_folder.exists()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.one_of(st.none(), st.sampled_from("abcdefg")), max_size=6), max_size=6),
    st.sets(st.sampled_from("abcxyz")),
)
def test_as_a_counter_of_every_row_says(chunks: list[list[str | None]], wanted: set[str]) -> None:
    counts = Counter(k for chunk in chunks for k in chunk if k is not None)
    with RunKeys(["k"]) as keys:
        for chunk in chunks:
            keys.add(k=pa.array(chunk, pa.string()))
        assert sorted(keys.repeated("k").to_pylist()) == sorted(
            k for k, n in counts.items() if n > 1
        )
        assert keys.present("k", wanted) == {k for k in wanted if counts[k]}
