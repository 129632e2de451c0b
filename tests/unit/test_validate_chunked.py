"""validate_audience a chunk at a time is validate_audience on the whole audience at once.

The audience is read, checked and written ``chunk_rows`` rows at a time; what spans the whole
audience (an address or a user id twice, a name showing another member's address) is computed
from every row's keys first. Whatever the chunks, the outcome (counts, reasons, locales and
GX's summary), the valid and quarantine files and the verdict are those of one chunk holding
every row: on hand-picked audiences whose duplicates and shown addresses straddle the chunks,
and on generated ones.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mailroom.audience.validate as validate_module
from mailroom import gx_runtime
from mailroom.audience.extract import SUPPRESSED_SCHEMA, snapshot_schema
from mailroom.audience.validate import audience_expectations, validate_audience
from mailroom.campaign_spec import CampaignSpec, load_campaign
from mailroom.errors import ValidationFailed
from mailroom.gx_runtime import summarise, validate_frame

pytestmark = pytest.mark.unit

CAMPAIGNS = Path(__file__).resolve().parents[2] / "include" / "campaigns"
USER_ID_TWICE = "expect_column_values_to_be_in_set(user_id__once_in_audience)"
ADDRESS_TWICE = "expect_column_values_to_be_in_set(email_key__once_in_audience)"
SHOWS_ANOTHER = "expect_column_values_to_be_in_set(first_name__shows_another_address)"
NOT_AN_ADDRESS = "expect_column_values_to_match_regex(email)"
MISSING = "user_id missing"
SENDER = "news@example-exchange.test"  # the example campaign's own, public, address

Row = tuple[str | None, str | None, str | None, str | None]  # user id, email, first name, locale


@cache
def campaign() -> CampaignSpec:
    return load_campaign(CAMPAIGNS, "winter_update")


@dataclass(frozen=True)
class Validated:
    """Everything validate_audience decides: its outcome or its refusal, and both files."""

    outcome: dict[str, Any] | None
    refused: str | None
    valid: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]
    schemas: tuple[pa.Schema, pa.Schema]


def validated(
    spec: CampaignSpec,
    folder: Path,
    rows: list[Row],
    *,
    suppressed: Iterable[str] = (),
    chunk_rows: int,
) -> Validated:
    snapshot = folder / "snapshot.parquet"
    columns = ("user_id", "email", "first_name", "locale")
    pq.write_table(
        pa.Table.from_pylist(
            [dict(zip(columns, row, strict=True)) for row in rows],
            schema=snapshot_schema(spec.fields),
        ),
        snapshot,
    )
    suppressed_file = folder / "suppressed.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"user_id": f"s{i}", "email": email} for i, email in enumerate(suppressed)],
            schema=SUPPRESSED_SCHEMA,
        ),
        suppressed_file,
    )
    valid_out, quarantine_out = folder / "valid.parquet", folder / "quarantine.parquet"
    outcome, refused = None, None
    try:
        outcome = validate_audience(
            spec,
            snapshot=snapshot,
            valid_out=valid_out,
            quarantine_out=quarantine_out,
            suppressed=suppressed_file,
            chunk_rows=chunk_rows,
        ).to_dict()
    except ValidationFailed as failure:
        refused = str(failure)
    valid, quarantine = pq.read_table(valid_out), pq.read_table(quarantine_out)
    return Validated(
        outcome,
        refused,
        valid.to_pylist(),
        quarantine.to_pylist(),
        (valid.schema, quarantine.schema),
    )


def whole_and_chunked(
    spec: CampaignSpec, rows: list[Row], *, suppressed: Iterable[str] = (), chunk_rows: int
) -> tuple[Validated, Validated]:
    suppressed = list(suppressed)
    with tempfile.TemporaryDirectory() as whole_dir, tempfile.TemporaryDirectory() as chunked_dir:
        whole = validated(
            spec, Path(whole_dir), rows, suppressed=suppressed, chunk_rows=len(rows) + 1
        )
        chunked = validated(
            spec, Path(chunked_dir), rows, suppressed=suppressed, chunk_rows=chunk_rows
        )
    return whole, chunked


# Chunks of three: every duplicate and every shown address below is in another chunk than its
# counterpart.
AUDIENCE: list[Row] = [
    ("u01", "ann@example.com", "Ann", "en"),
    ("u02", "bob@example.com", "Bob", "de"),
    ("u03", "cy@example.com", "Cy", "fr"),
    # Ann's address again, in capitals: both copies are held back.
    ("u04", "ANN@Example.COM", "Annie", "en"),
    (None, "nobody@example.com", "Nobody", "en"),
    ("   ", "blank@example.com", "Blank", "es"),  # a user id of blanks is no id
    # u03 again, with an address that is none and a locale the campaign lacks: the user id
    # twice is the reason for both copies, each in its own chunk.
    ("u03", "not-an-address", "Cy again", "xx"),
    ("u05", "dee@example.com", "Dee (BOB@example.com)", "ja"),  # Bob's, two chunks back
    ("u06", "eve@example.com", "eve@example.com", "en"),  # her own: no danger
    ("u07", "fay@example.com", "gone&#64;example.com", "de"),  # a suppressed person's
    ("u08", "gus@example.com", SENDER, "fr"),  # the campaign's own: no danger
    # Nobody's quarantined row is still a member: showing its address is showing a member's.
    ("u09", "hal@example.com", "Hi nobody@example.com", "es"),
    ("u10", "ivy@example.com", "ivy@elsewhere.example", "en"),  # nobody's address
    ("u11", "jo@example.com", "Jo", "en"),
]
SUPPRESSED = ["gone@example.com"]


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5])
def test_chunked_and_whole_audience_agree_on_duplicates_across_chunks(chunk_rows: int) -> None:
    spec = dataclasses.replace(campaign(), max_invalid_fraction=1.0)

    whole, chunked = whole_and_chunked(spec, AUDIENCE, suppressed=SUPPRESSED, chunk_rows=chunk_rows)

    assert chunked == whole
    reasons = [(row["user_id"], row["reason"]) for row in chunked.quarantine]
    assert reasons == [
        ("u01", ADDRESS_TWICE),
        ("u03", USER_ID_TWICE),
        ("u04", ADDRESS_TWICE),
        (None, MISSING),
        (None, MISSING),
        ("u03", USER_ID_TWICE),
        ("u05", SHOWS_ANOTHER),
        ("u07", SHOWS_ANOTHER),
        ("u09", SHOWS_ANOTHER),
    ]
    # In the snapshot's order, as build and freeze read it.
    assert [row["user_id"] for row in chunked.valid] == ["u02", "u06", "u08", "u10", "u11"]
    assert chunked.outcome is not None
    assert chunked.outcome["per_locale"] == {"de": 1, "en": 3, "fr": 1}
    checks = {c["column"]: c for c in chunked.outcome["gx"]["checks"]}
    assert checks["user_id__once_in_audience"]["unexpected_count"] == 2
    assert checks["email_key__once_in_audience"]["unexpected_count"] == 2
    # Every row is counted, the ones with no user id too.
    assert checks["user_id__once_in_audience"]["element_count"] == len(AUDIENCE)


def test_chunked_and_whole_audience_agree_on_the_verdict() -> None:
    spec = campaign()  # 9 of 14 is far above its limit

    whole, chunked = whole_and_chunked(spec, AUDIENCE, suppressed=SUPPRESSED, chunk_rows=3)

    assert chunked == whole
    assert chunked.refused is not None
    assert chunked.refused.startswith("9 of 14 recipients")


def test_an_empty_audience_is_refused_in_chunks_as_whole() -> None:
    whole, chunked = whole_and_chunked(campaign(), [], chunk_rows=3)

    assert chunked == whole
    assert chunked.refused == "the audience is empty: nothing to send"
    assert chunked.schemas[1].names == ["user_id", "email", "locale", "first_name", "reason"]


def test_the_files_have_the_columns_of_the_snapshot_read_into_pandas(tmp_path: Path) -> None:
    """As the whole snapshot in one frame writes them (build and freeze read these files),
    whatever the first chunk holds: here no user id at all."""
    spec = dataclasses.replace(campaign(), max_invalid_fraction=1.0)
    rows: list[Row] = [(None, "a@example.com", "A", "en"), ("u2", "b@example.com", "B", "en")]

    chunked = validated(spec, tmp_path, rows, chunk_rows=1)

    frame = pd.read_parquet(tmp_path / "snapshot.parquet")
    frame["user_id"] = frame["user_id"].astype(object)
    frame.to_parquet(tmp_path / "one_frame.parquet", index=False)
    one_frame = pq.read_schema(tmp_path / "one_frame.parquet")
    assert chunked.schemas[0].equals(one_frame, check_metadata=True)
    frame.assign(reason="x").to_parquet(tmp_path / "one_frame.parquet", index=False)
    one_frame = pq.read_schema(tmp_path / "one_frame.parquet")
    assert chunked.schemas[1].equals(one_frame, check_metadata=True)


def test_the_merged_gx_summary_is_gx_on_every_chunk_as_one_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What validate_chunks merges is what GX says of the same rows in one frame; and the
    run-wide columns flag exactly the rows GX's own uniqueness check flags on that frame."""
    import great_expectations.expectations as gxe

    spec = dataclasses.replace(campaign(), max_invalid_fraction=1.0)
    seen: list[pd.DataFrame] = []
    chunked = gx_runtime.validate_chunks

    def keeping(chunks: Iterable[pd.DataFrame], **kwargs: Any) -> Any:
        def tee() -> Iterator[pd.DataFrame]:
            for chunk in chunks:
                seen.append(chunk.copy())
                yield chunk

        return chunked(tee(), **kwargs)

    monkeypatch.setattr(validate_module, "validate_chunks", keeping)
    outcome = validated(spec, tmp_path, AUDIENCE, suppressed=SUPPRESSED, chunk_rows=3).outcome
    assert outcome is not None
    assert len(seen) == 5

    frame = pd.concat(seen, ignore_index=True)
    one = validate_frame(frame, suite_name="audience", expectations=audience_expectations(spec))
    assert outcome["gx"] == summarise(one)

    frame["row"] = [str(i) for i in range(len(frame))]
    for column in ("user_id", "email_key"):
        unique = validate_frame(
            frame,
            suite_name="unique",
            expectations=[gxe.ExpectColumnValuesToBeUnique(column=column)],
            index_columns=["row"],
        )
        flagged = {r["row"] for r in unique.results[0].result["unexpected_index_list"]}
        once = frame[f"{column}__once_in_audience"]
        assert flagged == set(frame.loc[once.eq(False), "row"])
        assert once.isna().equals(frame[column].isna())


# -- generated audiences -----------------------------------------------------------------------

ADDRESSES = [
    "ann@example.com",
    "ANN@example.com",
    "bob@example.org",
    "cy@bücher.example",
    "cy@xn--bcher-kva.example",
    "gone@example.com",
]
NAMES = [
    "Ann",
    "Björn",
    "",
    "   ",
    "Ann\r\nBcc: x@example.com",
    "Hi bob@example.org",
    "BOB%40example.org",
    "bob (at) example (dot) org",
    "<b>ann</b>@example.com",
    "gone＠example.com",
    "cy@bücher.example",
    SENDER,
    "at home",
]
audiences = st.lists(
    st.tuples(
        st.sampled_from(["u1", "u2", "u3", "U1", "u4", "u5", "", " ", None]),
        st.one_of(st.sampled_from(ADDRESSES), st.sampled_from([None, "nope", "a@b.c, d@e.f"])),
        st.one_of(st.sampled_from(NAMES), st.none(), st.text(max_size=8)),
        st.sampled_from(["en", "de", "ja", "xx", None]),
    ),
    max_size=8,
)


@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rows=audiences,
    suppressed=st.lists(st.sampled_from([*ADDRESSES, "zed@example.com"]), max_size=2),
    chunk_rows=st.integers(min_value=2, max_value=4),
    limit=st.sampled_from([0.25, 1.0]),
)
def test_generated_audiences_validate_alike_in_chunks_and_whole(
    rows: list[Row], suppressed: list[str], chunk_rows: int, limit: float
) -> None:
    spec = dataclasses.replace(campaign(), max_invalid_fraction=limit)

    whole, chunked = whole_and_chunked(spec, rows, suppressed=suppressed, chunk_rows=chunk_rows)

    assert chunked == whole
    assert len(chunked.valid) + len(chunked.quarantine) == len(rows)
