"""Build and freeze read the audience a chunk at a time, and the chunk size changes nothing.

``build_envelopes`` and ``freeze_batches`` hold a bounded number of rows at once (``chunk_rows``)
so that neither grows with the audience. A chunk can end anywhere: in the middle of a request,
of a locale, between the rows an earlier run left out. These tests hold a run made with chunks
of a few rows to the same envelopes, request bodies, manifest, outbox rows and left-out records
as a run made in one chunk, on the sample audience and on generated ones.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom import envelopes as envelopes_module
from mailroom import pipeline
from mailroom.audience.sample import SampleAudience, generate
from mailroom.batches import freeze_batches, in_batches, locale_envelopes, sendgrid_request_body
from mailroom.campaign_spec import CampaignSpec, load_campaign
from mailroom.content import LocaleContent
from mailroom.delivery.outbox import Outbox
from mailroom.earlier_runs import EarlierRecipients, earliest_reasons
from mailroom.envelopes import build_envelopes
from mailroom.pipeline import ProjectPaths

pytestmark = pytest.mark.unit
SECRET = b"unit-test-secret"
REPO = Path(__file__).resolve().parents[2]
WHOLE = 10**9  # one chunk, whatever the audience
NAMES = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\\n<&'),
    max_size=12,
)


@pytest.fixture(scope="module")
def audience(tmp_path_factory: pytest.TempPathFactory) -> SampleAudience:
    return generate(tmp_path_factory.mktemp("users") / "users.sqlite", users=700)


@pytest.fixture
def small_batches(tmp_path: Path, project_paths: ProjectPaths) -> ProjectPaths:
    """The project with ``winter_update`` sending 23 recipients a request: several requests
    per locale, and a partial last one."""
    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    spec = (project_paths.campaigns / "winter_update.yaml").read_text("utf-8")
    assert "batch_size: 1000" in spec
    (campaigns / "winter_update.yaml").write_text(
        spec.replace("batch_size: 1000", "batch_size: 23"), "utf-8"
    )
    return ProjectPaths(campaigns, project_paths.templates, project_paths.translations)


def _no_whole_file(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("build and freeze read the audience and the envelopes in chunks")


def _frozen_run(
    paths: ProjectPaths,
    audience: SampleAudience,
    folder: Path,
    chunk_rows: int,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> dict[str, Any]:
    """A run built and frozen ``chunk_rows`` at a time: everything it wrote and staged. With
    ``monkeypatch``, build and freeze may not read a whole Parquet file at once."""
    run = pipeline.prepare(
        paths,
        campaign="winter_update",
        run_id="manual__chunks",
        staging_root=folder / "staging",
        shard_count=2,
        dry_run=True,
    )
    pipeline.extract_audience(run, sql_url=audience.url())
    pipeline.validate_audience(run)
    pipeline.render_content(run, paths)
    outbox = Outbox(f"sqlite:///{folder / 'outbox.sqlite'}")
    try:
        if monkeypatch is not None:
            monkeypatch.setattr(pq, "read_table", _no_whole_file)
        pipeline.build_envelopes(run, secret=SECRET, chunk_rows=chunk_rows)
        frozen = pipeline.freeze_batches(run, outbox=outbox, chunk_rows=chunk_rows)
        if monkeypatch is not None:
            monkeypatch.undo()
        with outbox.engine.connect() as conn:
            staged = {
                table: conn.exec_driver_sql(
                    f"SELECT {columns} FROM {table} WHERE run_key = ? ORDER BY rowid",
                    (run.run_key,),
                ).all()
                for table, columns in (
                    ("mailroom_recipients", "email_key, user_id, batch_id, values_sha256"),
                    ("mailroom_batches", "batch_id, batch_index, locale, sha256, recipients"),
                    ("mailroom_run_inputs", "path, sha256"),
                    ("mailroom_runs", "manifest_sha256"),
                )
            }
    finally:
        outbox.dispose()
    st_ = run.staging
    return {
        "summary": frozen,
        "manifest": st_.manifest.read_bytes(),
        "bodies": {p.name: p.read_bytes() for p in sorted(st_.batches_dir.glob("*-*.json"))},
        "staged": staged,
        "envelopes": _by_locale(st_.envelopes),
        "left_out": st_.audience_dir.joinpath("left_out.json").read_bytes(),
    }


def _by_locale(envelopes: Path) -> dict[str, list[dict[str, Any]]]:
    """Each locale's envelope rows in file order (what every later stage reads)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in pq.ParquetFile(envelopes).read().to_pylist():
        rows.setdefault(row["locale"], []).append(row)
    return rows


def test_a_run_frozen_seven_rows_at_a_time_is_the_run_frozen_in_one_chunk(
    tmp_path: Path,
    small_batches: ProjectPaths,
    audience: SampleAudience,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = _frozen_run(small_batches, audience, tmp_path / "whole", WHOLE)
    chunked = _frozen_run(small_batches, audience, tmp_path / "chunked", 7, monkeypatch)

    assert chunked["summary"]["batches"] > 2 * len(chunked["summary"]["per_locale"])
    assert len(chunked["bodies"]) == chunked["summary"]["batches"]
    assert chunked["bodies"] == whole["bodies"]
    assert chunked["manifest"] == whole["manifest"]
    assert chunked["summary"] == whole["summary"]
    assert chunked["staged"] == whole["staged"]
    assert len(chunked["staged"]["mailroom_recipients"]) == len(audience.expected)
    assert chunked["envelopes"] == whole["envelopes"]
    assert chunked["left_out"] == whole["left_out"]


def _generic(spec: CampaignSpec, content: LocaleContent, chunk: Any, args: Any) -> dict[str, Any]:
    """The standard builder, called batch by batch (any builder but the standard one is)."""
    return sendgrid_request_body(spec, content, chunk, args)


@dataclasses.dataclass(frozen=True)
class Frozen:
    envelopes: dict[str, list[dict[str, Any]]]
    left_out: list[dict[str, Any]]
    bodies: list[bytes]
    manifest: bytes
    plan: list[tuple[str, str, int]]
    members: list[tuple[str, str, str, str]]


def _build_and_freeze(
    spec: CampaignSpec,
    valid: Path,
    earlier: list[tuple[str, str, str]],
    folder: Path,
    chunk_rows: int,
    builder: Any = sendgrid_request_body,
) -> Frozen:
    folder.mkdir()
    envelopes = folder / "envelopes.parquet"
    left_out = folder / "left_out.parquet"
    with EarlierRecipients(earlier, directory=folder, chunk_rows=3) as found:
        build_envelopes(
            spec,
            valid_audience=valid,
            out=envelopes,
            secret=SECRET,
            leave_out=found,
            left_out_out=left_out,
            chunk_rows=chunk_rows,
        )
    contents = {
        loc: LocaleContent(loc, f"Hi {loc} %%first_name%%", f"<p>{loc}</p>", loc, ())
        for loc in spec.locales
    }
    manifest = freeze_batches(
        spec,
        run_id="manual__t",
        envelopes=envelopes,
        contents=contents,
        batches_dir=folder / "batches",
        manifest_path=folder / "manifest.json",
        build_body=builder,
        chunk_rows=chunk_rows,
    )
    plan = pipeline._batch_plan(spec, envelopes, chunk_rows=chunk_rows)
    return Frozen(
        envelopes=_by_locale(envelopes),
        left_out=pq.ParquetFile(left_out).read().to_pylist(),
        bodies=[(folder / "batches" / b.file).read_bytes() for b in manifest.batches],
        manifest=(folder / "manifest.json").read_bytes(),
        plan=plan,
        members=list(pipeline._members_by_envelope(plan, envelopes, chunk_rows=chunk_rows)),
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    people=st.lists(
        st.tuples(st.integers(0, 4), NAMES, st.sampled_from([None, "sent", "unknown"])),
        max_size=60,
    ),
    batch_size=st.integers(1, 9),
    chunk_rows=st.integers(1, 10),
)
def test_any_chunk_size_freezes_a_generated_audience_as_one_chunk_does(
    tmp_path_factory: pytest.TempPathFactory,
    people: list[tuple[int, str, str | None]],
    batch_size: int,
    chunk_rows: int,
) -> None:
    """Locales interleaved in any order (one may have nobody), any names, some people an
    earlier run sent to or left in doubt: the chunked build and freeze (spliced bodies, and a
    builder called batch by batch) give what one chunk gives."""
    tmp_path = tmp_path_factory.mktemp("chunks")
    spec = load_campaign(REPO / "include" / "campaigns", "winter_update")
    spec = dataclasses.replace(spec, batch_size=batch_size)
    valid = tmp_path / "valid.parquet"
    pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(len(people))],
            "email": [f"P{i}@Example.com" for i in range(len(people))],
            "locale": [spec.locales[loc] for loc, _, _ in people],
            "first_name": [name for _, name, _ in people],
        },
        columns=["user_id", "email", "locale", "first_name"],
    ).to_parquet(valid, index=False)
    earlier = [
        (f"p{i}@example.com", state, f"winter_update/r{i % 3}")
        for i, (_, _, state) in enumerate(people)
        if state is not None
    ]

    whole = _build_and_freeze(spec, valid, earlier, tmp_path / "whole", WHOLE)
    chunked = _build_and_freeze(spec, valid, earlier, tmp_path / "chunked", chunk_rows)
    generic = _build_and_freeze(spec, valid, earlier, tmp_path / "generic", chunk_rows, _generic)

    assert chunked == whole
    assert generic == whole
    assert len(whole.members) == sum(n for _, _, n in whole.plan) == len(people) - len(earlier)
    assert len(whole.left_out) == len(earlier)
    shutil.rmtree(tmp_path)


def test_envelopes_go_out_one_locale_per_row_group_in_audience_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made 7 at a time and written whenever 10 are waiting: every row group holds one locale,
    each locale spans several of them, and a reader of one locale gets the audience's order."""
    monkeypatch.setattr(envelopes_module, "ROW_GROUP_ROWS", 10)
    spec = load_campaign(REPO / "include" / "campaigns", "winter_update")
    valid = tmp_path / "valid.parquet"
    locales = [spec.locales[(i * 7) % 3 if i % 4 else 0] for i in range(90)]
    pd.DataFrame(
        {
            "user_id": [f"u{i:03d}" for i in range(90)],
            "email": [f"p{i}@example.com" for i in range(90)],
            "locale": locales,
            "first_name": [f"Name {i}" for i in range(90)],
        }
    ).to_parquet(valid, index=False)
    out = tmp_path / "envelopes.parquet"
    assert build_envelopes(spec, valid_audience=valid, out=out, secret=SECRET, chunk_rows=7) == 90

    parquet = pq.ParquetFile(out)
    groups = [
        set(parquet.read_row_group(g, columns=["locale"]).column(0).to_pylist())
        for g in range(parquet.num_row_groups)
    ]
    assert all(len(group) == 1 for group in groups)
    for locale in set(locales):
        assert sum(group == {locale} for group in groups) > 1
        got = [
            uid
            for rows in locale_envelopes(out, locale, ["user_id"], 4)
            for uid in rows.column("user_id").to_pylist()
        ]
        assert got == [f"u{i:03d}" for i in range(90) if locales[i] == locale]


def test_a_locale_is_read_from_row_groups_holding_several(tmp_path: Path) -> None:
    """A file whose row groups mix locales (or have no statistics) is read all the same."""
    mixed = ["en", "de", "en", "fr", "de", "de", "en", "fr", "en"]
    table = pa.table({"locale": mixed, "email": [f"p{i}@example.com" for i in range(9)]})
    for statistics in (True, False):
        path = tmp_path / f"mixed-{statistics}.parquet"
        pq.write_table(table, path, row_group_size=4, write_statistics=statistics)
        for locale in ("en", "de", "fr", "ja"):
            got = [
                email
                for rows in locale_envelopes(path, locale, ["email"], 3)
                for email in rows.column("email").to_pylist()
            ]
            assert got == [f"p{i}@example.com" for i, loc in enumerate(mixed) if loc == locale]


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), max_size=12),
    size=st.integers(1, 7),
)
def test_in_batches_regroups_chunks_into_requests_of_the_batch_size(
    sizes: list[int], size: int
) -> None:
    values = iter(range(sum(sizes)))
    chunks = [
        pa.table({"n": pa.array([next(values) for _ in range(n)], pa.int64())}) for n in sizes
    ]
    got = [t.column("n").to_pylist() for t in in_batches(chunks, size)]
    everything = list(range(sum(sizes)))
    assert got == [everything[i : i + size] for i in range(0, len(everything), size)]


OUTCOMES = st.lists(
    st.tuples(
        st.sampled_from(["a@x.org", "b@x.org", "c@x.org", "é@x.org", "d'x@x.org"]),
        st.sampled_from(["sent", "unknown", "sending"]),
        st.sampled_from(["c/r1", "c/r2", "c/r10", "c/ä"]),
    ),
    max_size=25,
)


@settings(max_examples=100, deadline=None)
@given(outcomes=OUTCOMES)
def test_earlier_recipients_give_the_earliest_reasons(
    tmp_path_factory: pytest.TempPathFactory, outcomes: list[tuple[str, str, str]]
) -> None:
    """The scratch file build_envelopes asks, a chunk of the audience at a time, says what
    ``earliest_reasons`` says: ``sent`` anywhere first, then the first run key in order."""
    expected = earliest_reasons(outcomes)
    folder = tmp_path_factory.mktemp("earlier")
    with EarlierRecipients(iter(outcomes), directory=folder, chunk_rows=2) as found:
        assert len(found) == len(expected)
        asked = ["nobody@x.org", *sorted({email for email, _, _ in outcomes})]
        assert found.reasons(asked) == expected
        assert found.reasons(asked[:2]) == {k: v for k, v in expected.items() if k in asked[:2]}
        assert found.reasons([]) == {}
    assert list(folder.iterdir()) == []
