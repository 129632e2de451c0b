"""The frozen request bodies are byte for byte the standard builder's, however they are built.

``freeze_batches`` splices the bodies of the standard builder from the envelopes' own JSON
(``json_columns``); any other builder is called batch by batch. These tests hold the two to the
same bytes, on generated text and on the sample audience with its tricky rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom import pipeline
from mailroom.audience.sample import generate
from mailroom.batches import freeze_batches, sendgrid_request_body
from mailroom.campaign_spec import CampaignSpec, load_campaign
from mailroom.content import LocaleContent
from mailroom.envelopes import build_envelopes
from mailroom.json_columns import json_objects, json_strings
from mailroom.pipeline import ProjectPaths
from support.runs import built_run

pytestmark = pytest.mark.unit
SECRET = b"unit-test-secret"
REPO = Path(__file__).resolve().parents[2]
TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",))
    | st.sampled_from('"\\\n\r\t\x00\x1f\u2028/'),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TEXT, max_size=30))
def test_json_strings_are_what_json_dumps_writes(values: list[str]) -> None:
    got = json_strings(pa.array(values, pa.string())).to_pylist()
    assert got == [json.dumps(v, ensure_ascii=False) for v in values]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(TEXT, st.lists(TEXT, min_size=3, max_size=3), max_size=5))
def test_json_objects_are_what_json_dumps_writes(columns: dict[str, list[str]]) -> None:
    arrays = {k: pa.array(v, pa.string()) for k, v in columns.items()}
    got = json_objects(arrays, 3).to_pylist()
    want = [
        json.dumps({k: v[i] for k, v in columns.items()}, ensure_ascii=False, separators=(",", ":"))
        for i in range(3)
    ]
    assert got == want
    assert [json.loads(g) for g in got] == [json.loads(w) for w in want]


def test_a_null_value_is_refused_not_written_as_json_null() -> None:
    with pytest.raises(ValueError, match="null"):
        json_strings(pa.array(["a", None], pa.string()))


def _generic(spec: CampaignSpec, content: LocaleContent, chunk: Any, args: Any) -> dict[str, Any]:
    """The standard builder, called batch by batch (any builder but the standard one is)."""
    return sendgrid_request_body(spec, content, chunk, args)


def _freeze_both_ways(
    spec: CampaignSpec, envelopes: Path, contents: dict[str, LocaleContent], tmp_path: Path
) -> tuple[list[bytes], list[bytes]]:
    out: list[list[bytes]] = []
    for name, builder in (("spliced", sendgrid_request_body), ("generic", _generic)):
        folder = tmp_path / name
        manifest = freeze_batches(
            spec,
            run_id="manual__t",
            envelopes=envelopes,
            contents=contents,
            batches_dir=folder,
            manifest_path=folder / "manifest.json",
            build_body=builder,
        )
        out.append([(folder / b.file).read_bytes() for b in manifest.batches])
    return out[0], out[1]


def test_spliced_bodies_are_the_standard_builders_bytes_on_the_sample_audience(
    tmp_path: Path,
) -> None:
    paths = ProjectPaths.under(REPO / "include")
    users = generate(tmp_path / "users.sqlite", users=2500)
    run = built_run(
        paths,
        users_url=users.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__t",
        shard_count=1,
        secret=SECRET,
        dry_run=True,
    )
    spec = dataclasses.replace(run.spec(), batch_size=333)  # a partial last batch per locale
    spliced, generic = _freeze_both_ways(
        spec, run.staging.envelopes, pipeline.load_contents(run), tmp_path
    )
    assert len(spliced) == len(generic) > len(spec.locales)
    assert spliced == generic


@settings(max_examples=25, deadline=None)
@given(
    names=st.lists(TEXT, min_size=1, max_size=12),
    subject=TEXT,
    reply_to=st.booleans(),
)
def test_spliced_bodies_are_the_standard_builders_bytes_on_generated_values(
    tmp_path_factory: pytest.TempPathFactory, names: list[str], subject: str, reply_to: bool
) -> None:
    tmp_path = tmp_path_factory.mktemp("bodies")
    spec = load_campaign(REPO / "include" / "campaigns", "winter_update")
    spec = dataclasses.replace(
        spec, batch_size=5, reply_to="reply@example.com" if reply_to else None
    )
    valid = tmp_path / "valid.parquet"
    pd.DataFrame(
        {
            "user_id": [f'u{i}"{n[:3]}' for i, n in enumerate(names)],
            "email": [f"p{i}@example.com" for i in range(len(names))],
            "locale": [spec.locales[i % len(spec.locales)] for i in range(len(names))],
            "first_name": names,
        }
    ).to_parquet(valid, index=False)
    envelopes = tmp_path / "envelopes.parquet"
    build_envelopes(spec, valid_audience=valid, out=envelopes, secret=SECRET)
    contents = {
        loc: LocaleContent(loc, f"{subject} %%first_name%%", f"<p>{subject}</p>", subject, ())
        for loc in spec.locales
    }
    spliced, generic = _freeze_both_ways(spec, envelopes, contents, tmp_path)
    assert spliced == generic
    assert sum(len(json.loads(b)["personalizations"]) for b in spliced) == len(names)
