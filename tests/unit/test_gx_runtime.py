"""The GX runtime: what Mailroom asks of Great Expectations beyond its defaults."""

from __future__ import annotations

import pandas as pd
import pytest

from mailroom.gx_runtime import Suite, validate_frame, validate_suites

pytestmark = pytest.mark.unit


def _markers(result: object) -> dict[str, object]:
    return dict(result.meta["batch_markers"])  # type: ignore[attr-defined]


def test_batches_are_not_fingerprinted() -> None:
    """GX would hash every value of every frame (seconds per million rows) only to label the
    batch in its result; Mailroom's frames live for one check, so no fingerprint is made."""
    import great_expectations.expectations as gxe

    frame = pd.DataFrame({"email": ["a@example.com", "b@example.com"], "n": [1, 2]})
    expectation = gxe.ExpectColumnValuesToNotBeNull(column="email")

    single = validate_frame(frame, suite_name="one", expectations=[expectation])
    (suite,) = validate_suites([Suite("two", [frame], [expectation])])

    for result in (single, suite):
        assert result.success
        assert "ge_load_time" in _markers(result)  # the markers are there, the fingerprint not
        assert "pandas_data_fingerprint" not in _markers(result)


def _audience_like(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(rows)],
            "email": [None if i % 7 == 3 else f"p{i}@example.com" for i in range(rows)],
            "n": [i % 5 for i in range(rows)],
            "word": [None if i % 11 == 5 else ("ok" if i % 4 else "bad") for i in range(rows)],
        }
    )


def _rules(rows: int) -> list[object]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToEqual(value=rows),
        gxe.ExpectColumnValuesToNotBeNull(column="email"),
        gxe.ExpectColumnValuesToBeBetween(column="n", min_value=0, max_value=3),
        gxe.ExpectColumnValuesToMatchRegex(column="word", regex="^ok$"),
        gxe.ExpectColumnValuesToBeInSet(column="n", value_set=[0, 1, 2, 4]),
        gxe.ExpectColumnValueLengthsToBeBetween(column="user_id", min_value=1, max_value=3),
    ]


@pytest.mark.parametrize("size", [1, 2, 5, 17, 40])
def test_chunks_merge_into_the_whole_tables_result(size: int) -> None:
    """Counts, percentages, successes and the row count of a table validated a chunk at a time
    are those of the same table in one frame; each chunk's own result names its failing rows."""
    from mailroom.gx_runtime import summarise, validate_chunks

    frame = _audience_like(40)
    rules = _rules(40)
    whole = validate_chunks([frame], suite_name="t", expectations=rules)
    failing: list[str] = []

    def each(chunk: pd.DataFrame, result: object) -> None:
        for item in result.results:  # type: ignore[attr-defined]
            failing.extend(r["user_id"] for r in item.result.get("unexpected_index_list") or ())

    chunks = (frame.iloc[i : i + size] for i in range(0, len(frame), size))
    merged = validate_chunks(
        chunks, suite_name="t", expectations=rules, index_columns=["user_id"], each=each
    )
    assert summarise(merged) == summarise(whole)
    assert [r.result for r in merged.results] == [r.result for r in whole.results]
    assert merged.success is False
    assert merged.results[0].success
    expected = validate_frame(
        frame, suite_name="t", expectations=rules[1:], index_columns=["user_id"]
    )
    assert sorted(failing) == sorted(
        r["user_id"] for item in expected.results for r in item.result["unexpected_index_list"]
    )


def test_the_row_count_is_judged_on_every_chunks_rows() -> None:
    from mailroom.gx_runtime import validate_chunks

    frame = _audience_like(10)
    for expected, success in ((10, True), (9, False), (11, False)):
        merged = validate_chunks(
            [frame.iloc[:4], frame.iloc[4:]],
            suite_name="t",
            expectations=_rules(expected)[:1],
        )
        assert merged.success is success
        assert merged.results[0].result["observed_value"] == 10


def test_a_check_that_is_not_row_by_row_is_refused_in_chunks_but_not_on_the_whole_table() -> None:
    """Uniqueness judged per chunk would miss a value in two chunks: refused, whereas the
    whole table in one frame may be judged by anything."""
    import great_expectations.expectations as gxe

    from mailroom.gx_runtime import validate_chunks

    frame = pd.DataFrame({"k": ["a", "b", "a"]})
    unique = [gxe.ExpectColumnValuesToBeUnique(column="k")]
    with pytest.raises(ValueError, match="cannot be validated chunk by chunk"):
        validate_chunks([frame.iloc[:2], frame.iloc[2:]], suite_name="t", expectations=unique)
    with pytest.raises(ValueError, match="cannot be validated chunk by chunk"):
        validate_chunks(iter([frame]), suite_name="t", expectations=unique)
    mostly = [gxe.ExpectColumnValuesToNotBeNull(column="k", mostly=0.5)]
    with pytest.raises(ValueError, match="mostly"):
        validate_chunks([frame.iloc[:2], frame.iloc[2:]], suite_name="t", expectations=mostly)
    with pytest.raises(ValueError, match="no chunk"):
        validate_chunks([], suite_name="t", expectations=mostly[:0])
    assert not validate_chunks([frame], suite_name="t", expectations=unique).success


def test_data_docs_are_built_from_the_merged_results(tmp_path) -> None:  # type: ignore[no-untyped-def]
    frame = _audience_like(30)
    chunks = (frame.iloc[i : i + 7] for i in range(0, 30, 7))
    (result,) = validate_suites([Suite("audience", chunks, _rules(30))], data_docs_dir=tmp_path)
    pages = [p for p in tmp_path.rglob("*.html") if p.name != "index.html"]
    assert (tmp_path / "index.html").exists()
    assert pages
    page = "\n".join(p.read_text("utf-8") for p in pages)
    # The merged counts are what the page shows: 30 rows, 4 missing addresses.
    unexpected = result.results[1].result["unexpected_count"]
    assert unexpected == 4
    assert "p3@example.com" not in page
