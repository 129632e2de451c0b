"""The data-quality gate reads a run a chunk at a time, and its verdict does not depend on how.

The gate never holds the whole run: bodies are read a group at a time, the audience a batch of
rows at a time per locale (a cursor alongside the bodies, with a lookup by address for anyone
not where the cursor expects them), the personalization rows are spilled and handed to GX
``chunk_rows`` at a time, and nobody twice is judged over the whole run. Every size involved is
made tiny here (a chunk of 3 rows cuts through every body) and the result, counts and all, is
compared with a run in one chunk of everything:

* on a run of the pipeline, clean and with mutated bodies (an address in two requests far apart,
  one outside the audience, another recipient's values, a reordered or shortened body, an
  irregular one);
* on generated audiences (case, non-ASCII addresses, locales the campaign does not have, an
  address the audience holds twice, people the run leaves out) and generated mutations, where
  the counts are also held to a plain Python reading of the same bodies.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom import pipeline
from mailroom.audience.sample import generate
from mailroom.batches import (
    batch_custom_args,
    load_manifest,
    sendgrid_request_body,
    serialise,
    sha256_hex,
    shared_parts,
)
from mailroom.campaign_spec import load_campaign
from mailroom.checks import quality_gate
from mailroom.checks.quality_gate import ONCE_IN_RUN, audience, bodies, explode
from mailroom.content import LocaleContent
from mailroom.delivery.outbox import Outbox
from mailroom.envelopes import envelope_values
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import RunStaging, read_json
from mailroom.unsubscribe import TokensInBackground
from support.runs import built_run

pytestmark = pytest.mark.unit

SECRET = b"quality-gate-chunked-secret"
INCLUDE = Path(__file__).resolve().parents[2] / "include"
OUTSIDER = "intruder@example.net"
ONE_CHUNK = 10**9

Body = dict[str, Any]


@contextmanager
def chunked(monkeypatch: pytest.MonkeyPatch, small: bool) -> Iterator[int]:
    """Every size the gate reads in made tiny (``small``) or left as it is; the ``chunk_rows``
    to run the gate with."""
    with monkeypatch.context() as patch:
        if small:
            patch.setattr(bodies, "CHUNK_BATCHES", 2)
            patch.setattr(audience, "READ_ROWS", 4)
            patch.setattr(explode, "SPILL_ROWS", 5)
        yield 3 if small else ONE_CHUNK


def verdict(result: quality_gate.GateResult) -> dict[str, Any]:
    out = result.to_dict()
    out.pop("data_docs")
    return out


# --- a run of the pipeline, clean and mutated ---------------------------------------------------
@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("chunked")
    users = generate(root / "users.sqlite", users=250)
    run = built_run(
        ProjectPaths.under(INCLUDE),
        users_url=users.url(),
        staging_root=root / "staging",
        run_id="manual__chunked",
        shard_count=1,
        secret=SECRET,
    )
    outbox = Outbox(f"sqlite:///{run.staging.root / 'outbox.sqlite'}")
    try:
        pipeline.freeze_batches(run, outbox=outbox)
    finally:
        outbox.dispose()
    assert len(load_manifest(run.staging.manifest).batches) >= 4
    return run


def gate_on(run: Run, chunk_rows: int, docs: Path) -> dict[str, Any]:
    st_ = run.staging
    manifest = load_manifest(st_.manifest)
    outbox = Outbox(f"sqlite:///{st_.root / 'outbox.sqlite'}")
    try:
        staged = outbox.staged_digests(run.run_key)
    finally:
        outbox.dispose()
    return verdict(
        quality_gate.check_envelopes(
            run.spec(),
            manifest_path=st_.manifest,
            valid_audience=st_.valid_audience,
            secret=SECRET,
            expected_recipients=read_json(st_.audience_validation)["valid"],
            shared=shared_parts(run.spec(), pipeline.load_contents(run), manifest),
            staged=staged,
            audience_data={},
            data_docs_dir=docs,
            chunk_rows=chunk_rows,
        )
    )


def _p(body: Body, i: int) -> Body:
    item: Body = body["personalizations"][i]
    return item


def in_last_too(bodies_: list[Body]) -> None:
    """The first body's first recipient also in the last body, far from the first."""
    _p(bodies_[-1], -1)["to"] = copy.deepcopy(_p(bodies_[0], 0)["to"])


def outsider(bodies_: list[Body]) -> None:
    _p(bodies_[1], 2)["to"] = [{"email": OUTSIDER}]


def values_of_another(bodies_: list[Body]) -> None:
    a, b = _p(bodies_[2], 0), _p(bodies_[2], 4)
    a["substitutions"], b["substitutions"] = b["substitutions"], a["substitutions"]


def reordered(bodies_: list[Body]) -> None:
    bodies_[1]["personalizations"].reverse()


def shortened(bodies_: list[Body]) -> None:
    """Personalizations gone from the middle of a body: everyone after is one place earlier
    than the audience's order would have them."""
    del bodies_[0]["personalizations"][3:9]


def irregular(bodies_: list[Body]) -> None:
    _p(bodies_[3], 1)["cc"] = [{"email": OUTSIDER}]


def upper_case(bodies_: list[Body]) -> None:
    entry = _p(bodies_[-1], 0)["to"][0]
    entry["email"] = entry["email"].upper()


MUTATIONS: dict[str, tuple[Callable[[list[Body]], None] | None, set[str]]] = {
    "clean": (None, set()),
    "an address in two requests far apart": (in_last_too, {ONCE_IN_RUN}),
    "an address outside the audience": (outsider, {"in_audience", "values_match"}),
    "another recipient's values": (values_of_another, {"values_match"}),
    "a reordered body": (reordered, set()),
    "a shortened body": (shortened, {"expect_table_row_count_to_equal"}),
    "an irregular body": (irregular, {"n_cc"}),
    "an address in upper case": (upper_case, set()),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_verdict_is_the_same_in_chunks_of_three_and_in_one(
    name: str, clean_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mutate, fails_on = MUTATIONS[name]
    root = tmp_path / "run"
    shutil.copytree(clean_run.staging.root, root)
    run = Run(clean_run.campaign, clean_run.run_id, RunStaging(root), 1, False)
    entries = load_manifest(run.staging.manifest).batches
    if mutate is not None:
        paths = [run.staging.batches_dir / e.file for e in entries]
        loaded = [json.loads(p.read_bytes()) for p in paths]
        before = copy.deepcopy(loaded)
        mutate(loaded)
        for path, body, was in zip(paths, loaded, before, strict=True):
            if body != was:
                path.write_bytes(serialise(body))

    results = []
    for small in (True, False):
        with chunked(monkeypatch, small) as chunk_rows:
            results.append(gate_on(run, chunk_rows, tmp_path / f"docs-{small}"))
    in_chunks, in_one = results
    assert in_chunks == in_one
    failed = {
        c.get("column") or c["expectation"]
        for part in ("personalization_checks", "request_checks")
        for c in in_one[part]["checks"]
        if not c["success"]
    }
    if mutate is None:
        assert in_one["success"], failed
    else:
        # Any change to a body fails its digest; the mutation is caught where it should be.
        assert "digest_matches" in failed
        assert fails_on <= failed, failed
    if name == "an address in two requests far apart":
        once = next(
            c for c in in_one["personalization_checks"]["checks"] if c.get("column") == ONCE_IN_RUN
        )
        assert once["unexpected_count"] == 2  # both copies, as a uniqueness check counts them


# --- generated audiences -----------------------------------------------------------------------
SPEC = load_campaign(INCLUDE / "campaigns", "winter_update")
CONTENT = LocaleContent(
    locale="en", subject="News", html="<p>Hello</p>", text="Hello %%first_name%%", untranslated=()
)
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Person:
    local: str
    domain: str
    locale: str | None
    first_name: str | None
    left_out: bool


people = st.lists(
    st.builds(
        Person,
        local=st.text("abcAB.", min_size=1, max_size=4),
        domain=st.sampled_from(["example.com", "Example.ORG", "b\u00fccher.example"]),
        locale=st.sampled_from([*SPEC.locales[:3], "xx", None]),
        first_name=st.one_of(st.none(), st.text(max_size=5)),
        left_out=st.booleans(),
    ),
    min_size=1,
    max_size=40,
)
# (kind, which body, which personalization, which other body, which other personalization)
mutations = st.lists(
    st.tuples(
        st.sampled_from(["swap", "copy address", "outsider", "swap values", "drop", "upper"]),
        st.integers(0, 50),
        st.integers(0, 50),
        st.integers(0, 50),
        st.integers(0, 50),
    ),
    max_size=3,
)


def write_run(
    folder: Path, crowd: list[Person], twice: bool, per_request: int
) -> tuple[Path, Path, list[Path]]:
    """The validated audience of ``crowd`` (one address held twice when ``twice``) and its
    bodies, frozen in audience order per locale, less those left out; the manifest, the
    audience file, the body files."""
    seen: set[str] = set()
    rows = []
    for i, person in enumerate(crowd):
        email = f"{person.local}{i}@{person.domain}"
        if email.lower() in seen:
            continue
        seen.add(email.lower())
        rows.append(
            {
                "user_id": f"user-{i:04d}",
                "email": email,
                "locale": person.locale,
                "first_name": person.first_name,
                "left_out": person.left_out,
            }
        )
    if twice and len(rows) > 1:
        rows.append({**rows[0], "user_id": "user-again", "first_name": "Again"})
    table = pa.Table.from_pylist(rows).drop_columns(["left_out"])
    valid = folder / "valid.parquet"
    pq.write_table(table, valid)
    frozen = folder / "frozen"
    frozen.mkdir()
    entries = []
    files = []
    for locale in SPEC.locales:
        mine = [r for r in rows if r["locale"] == locale and not r["left_out"]]
        for start in range(0, len(mine), per_request):
            batch_id = f"{locale}-{start // per_request + 1:05d}"
            envelopes = []
            for row in mine[start : start + per_request]:
                subs, headers = envelope_values(SPEC, SECRET, row)
                envelopes.append({"email": row["email"], "substitutions": subs, "headers": headers})
            body = sendgrid_request_body(
                SPEC, CONTENT, envelopes, batch_custom_args(SPEC, "run", batch_id)
            )
            data = serialise(body)
            files.append(frozen / f"{batch_id}.json")
            files[-1].write_bytes(data)
            entries.append(
                {
                    "batch_id": batch_id,
                    "file": f"{batch_id}.json",
                    "index": len(entries),
                    "locale": locale,
                    "recipients": len(envelopes),
                    "sha256": sha256_hex(data),
                    "size": len(data),
                }
            )
    manifest = frozen / "manifest.json"
    manifest.write_text(
        json.dumps(
            {"batches": entries, "campaign": SPEC.name, "run_id": "run", "transport": "sendgrid"}
        )
    )
    return manifest, valid, files


def mutate(files: list[Path], changes: list[tuple[str, int, int, int, int]]) -> None:
    loaded = [json.loads(f.read_bytes()) for f in files]
    for kind, body_at, item_at, other_at, other_item_at in changes:
        body, other = loaded[body_at % len(loaded)], loaded[other_at % len(loaded)]
        items, others = body["personalizations"], other["personalizations"]
        if not items or not others:
            continue
        item, another = items[item_at % len(items)], others[other_item_at % len(others)]
        if kind == "swap":
            i, j = item_at % len(items), other_item_at % len(items)
            items[i], items[j] = items[j], items[i]
        elif kind == "copy address":
            item["to"] = copy.deepcopy(another["to"])
        elif kind == "outsider":
            item["to"] = [{"email": OUTSIDER}]
        elif kind == "swap values":
            item["substitutions"], another["substitutions"] = (
                another["substitutions"],
                item["substitutions"],
            )
        elif kind == "drop":
            items.remove(item)
        else:
            item["to"][0]["email"] = item["to"][0]["email"].upper()
    for path, body in zip(files, loaded, strict=True):
        path.write_bytes(serialise(body))


def plain_reading(files: list[Path], valid: Path) -> dict[str, int]:
    """What the rules count, read in Python from the bodies and the whole audience at once:
    an address's row is the last audience row holding it (lower-cased)."""
    rows: dict[str, dict[str, Any]] = {}
    for row in pq.read_table(valid).to_pylist():
        rows[row["email"].lower()] = row
    keys: list[str] = []
    outside = mismatched = 0
    for path in files:
        for item in json.loads(path.read_bytes())["personalizations"]:
            key = item["to"][0]["email"].lower()
            keys.append(key)
            row = rows.get(key)
            if row is None:
                outside += 1
                mismatched += 1
            elif envelope_values(SPEC, SECRET, row) != (item["substitutions"], item["headers"]):
                mismatched += 1
    times = Counter(keys)
    return {
        "personalizations": len(keys),
        ONCE_IN_RUN: sum(1 for k in keys if times[k] > 1),
        "in_audience": outside,
        "values_match": mismatched,
    }


def gate_of(manifest: Path, valid: Path, files: list[Path], chunk_rows: int) -> dict[str, Any]:
    shared = {
        sha256_hex(f.read_bytes()): {
            k: v for k, v in json.loads(f.read_bytes()).items() if k != "personalizations"
        }
        for f in files
    }
    return verdict(
        quality_gate.check_envelopes(
            SPEC,
            manifest_path=manifest,
            valid_audience=valid,
            secret=SECRET,
            expected_recipients=pq.ParquetFile(valid).metadata.num_rows,
            shared=shared,
            staged={},
            audience_data={},
            chunk_rows=chunk_rows,
        )
    )


@SETTINGS
@given(
    crowd=people,
    twice=st.booleans(),
    per_request=st.integers(1, 7),
    changes=mutations,
)
def test_generated_audiences_get_the_same_verdict_in_chunks_and_in_one(
    crowd: list[Person],
    twice: bool,
    per_request: int,
    changes: list[tuple[str, int, int, int, int]],
) -> None:
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as monkeypatch:
        manifest, valid, files = write_run(Path(folder), crowd, twice, per_request)
        if files:
            mutate(files, changes)
        results = []
        for small in (True, False):
            with chunked(monkeypatch, small) as chunk_rows:
                results.append(gate_of(manifest, valid, files, chunk_rows))
        in_chunks, in_one = results
        assert in_chunks == in_one

        expected = plain_reading(files, valid)
        assert in_one["personalizations"] == expected["personalizations"]
        unexpected = {
            c["column"]: c["unexpected_count"]
            for c in in_one["personalization_checks"]["checks"]
            if c.get("column") in (ONCE_IN_RUN, "in_audience", "values_match")
        }
        assert unexpected == {k: v for k, v in expected.items() if k != "personalizations"}


def test_the_cursor_goes_on_past_people_the_run_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that leaves out a stretch of the audience (an earlier run sent to them) costs one
    lookup by address, after which the cursor finds everyone in place again; an address behind
    the cursor, or nobody's, is looked up; every row found is the one holding the address."""
    rows = [
        {"user_id": f"user-{i:04d}", "email": f"P{i}@example.com", "locale": "en"}
        for i in range(300)
    ]
    path = tmp_path / "valid.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    lookups: list[int] = []
    by_address = audience.Audience._lookup

    def counted(self: audience.Audience, keys: pa.Array) -> Any:
        lookups.append(len(keys))
        return by_address(self, keys)

    monkeypatch.setattr(audience.Audience, "_lookup", counted)

    def keys(numbers: range | list[int]) -> pa.Array:
        return pa.array([f"p{i}@example.com" for i in numbers], pa.string())

    tokens = TokensInBackground(SECRET, SPEC.name, path, rows=len(rows), locales=SPEC.locales)
    with tokens, audience.Audience(SPEC, SECRET, path, tokens, read_rows=8) as people_:
        found = people_.find(keys(range(200, 210)), [("en", 10)])
        assert found.rows.tolist() == list(range(200, 210))
        assert lookups == [10]
        found = people_.find(keys(range(210, 240)), [("en", 30)])
        assert found.rows.tolist() == list(range(210, 240))
        assert lookups == [10]
        found = people_.find(keys([240, 5, 241, 999]), [("en", 4)])
        assert found.rows.tolist() == [240, 5, 241, -1]
        assert lookups == [10, 2]
        subs, _ = people_.values(found)
        expected = [envelope_values(SPEC, SECRET, rows[i])[0] for i in (240, 5, 241)]
        assert [{k: v[i].as_py() for k, v in subs.items()} for i in range(3)] == expected
