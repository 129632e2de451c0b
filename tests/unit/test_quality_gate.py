"""The data-quality gate's own guarantees, beyond the mutant suite.

* Its two readers agree: a body of the regular shape is read column-wise by Arrow against a
  strict schema, anything else one personalization at a time with ``json.loads``; for every
  kind of body (clean, broken but regular, irregular in each way we can think of) both give
  exactly the same rows, so which reader ran never changes what GX judges.
* Its expected values, recomputed column-wise (``envelope_value_columns``), are exactly what
  ``envelope_values`` gives row by row, whatever the data and the campaign's unsubscribe URL.
* GX's Data Docs are left with the run, pass or fail, and name the failing expectations but
  never an address.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import re
import shutil
from collections.abc import Callable
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

from mailroom import pipeline
from mailroom.audience.sample import generate
from mailroom.batches import load_manifest, serialise, shared_parts
from mailroom.campaign_spec import CampaignSpec, Unsubscribe, load_campaign
from mailroom.checks import quality_gate
from mailroom.checks.quality_gate import ONCE_IN_RUN, bodies
from mailroom.checks.quality_gate.audience import Audience
from mailroom.checks.quality_gate.regular import RegularShape
from mailroom.delivery.outbox import Outbox
from mailroom.envelopes import envelope_value_columns, envelope_values
from mailroom.errors import ValidationFailed
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import RunStaging, read_json
from mailroom.unsubscribe import TokensInBackground, unsubscribe_token, unsubscribe_tokens
from support.runs import built_run

pytestmark = pytest.mark.unit

SECRET = b"quality-gate-test-secret"
INCLUDE = Path(__file__).resolve().parents[2] / "include"
OUTSIDER = "intruder@example.net"
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- one clean, frozen run, shared by the module ------------------------------------------------
@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("gate")
    audience = generate(root / "users.sqlite", users=900)
    paths = ProjectPaths.under(INCLUDE)
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=root / "staging",
        run_id="manual__gate",
        shard_count=1,
        secret=SECRET,
    )
    outbox = outbox_of(run)
    try:
        pipeline.freeze_batches(run, outbox=outbox)
    finally:
        outbox.dispose()
    assert len(load_manifest(run.staging.manifest).batches) >= 3
    return run


def outbox_of(run: Run) -> Outbox:
    """The run's outbox, kept in its folder here so that a copy of the run has a copy of it."""
    return Outbox(f"sqlite:///{run.staging.root / 'outbox.sqlite'}")


def check_envelopes(run: Run) -> dict[str, Any]:
    """The gate task on ``run``, with its own outbox."""
    outbox = outbox_of(run)
    try:
        return pipeline.check_envelopes(
            run, ProjectPaths.under(INCLUDE), secret=SECRET, outbox=outbox
        )
    finally:
        outbox.dispose()


def copy_run(run: Run, dest: Path) -> Run:
    shutil.copytree(run.staging.root, dest)
    return Run(run.campaign, run.run_id, RunStaging(dest), run.shard_count, run.dry_run)


def first_body(run: Run) -> Path:
    return run.staging.batches_dir / load_manifest(run.staging.manifest).batches[0].file


# --- body mutations: (name, bytes -> bytes, read by the strict reader?) -------------------------
Body = dict[str, Any]


def on_body(change: Callable[[Body], None]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        body = json.loads(data)
        change(body)
        return serialise(body)

    return mutate


def _p(body: Body, i: int) -> Body:
    item: Body = body["personalizations"][i]
    return item


def swap_substitutions(b: Body) -> None:
    _p(b, 0)["substitutions"], _p(b, 1)["substitutions"] = (
        _p(b, 1)["substitutions"],
        _p(b, 0)["substitutions"],
    )


def everyone_in_one_to(b: Body) -> None:
    parts = b["personalizations"]
    b["personalizations"] = [{**parts[0], "to": [p["to"][0] for p in parts]}]


def comma_joined(b: Body) -> None:
    _p(b, 0)["to"] = [{"email": f"{_p(b, 0)['to'][0]['email']}, {_p(b, 1)['to'][0]['email']}"}]


def set_in(path: tuple[Any, ...], value: Any) -> Callable[[Body], None]:
    def change(b: Body) -> None:
        target = b
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def delete_in(path: tuple[Any, ...]) -> Callable[[Body], None]:
    def change(b: Body) -> None:
        target = b
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def append_html(text: str) -> Callable[[Body], None]:
    def change(b: Body) -> None:
        part = next(c for c in b["content"] if c["type"] == "text/html")
        part["value"] += text

    return change


def address_in_shared_content(b: Body) -> None:
    append_html(f"<p>sent to {_p(b, 0)['to'][0]['email']}</p>")(b)


def duplicate_key(data: bytes) -> bytes:
    """``"to"`` twice in the first personalization: ``json.loads`` keeps the second."""
    body = json.loads(data)
    first = _p(body, 0)
    second = json.dumps([first["to"][0], {"email": OUTSIDER}])
    return data.replace(b'"to":[', b'"to":' + second.encode() + b',"to":[', 1)


SUBS = "substitutions"
HEADERS = "headers"
FIRST = "%%first_name%%"


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[bytes], bytes]
    regular: bool


MUTATIONS = [
    Mutation("clean", lambda d: d, True),
    Mutation(
        "recipients in another order",
        on_body(lambda b: b["personalizations"].reverse()),
        True,
    ),
    Mutation("A's substitutions in B's", on_body(swap_substitutions), True),
    Mutation(
        "the same personalization twice",
        on_body(lambda b: b["personalizations"].__setitem__(1, copy.deepcopy(_p(b, 0)))),
        True,
    ),
    Mutation("everyone in one 'to'", on_body(everyone_in_one_to), True),
    Mutation("nobody in 'to'", on_body(set_in(("personalizations", 0, "to"), [])), True),
    Mutation("'a@x, b@y' in one address", on_body(comma_joined), True),
    Mutation(
        "an address outside the audience",
        on_body(set_in(("personalizations", 0, "to"), [{"email": OUTSIDER}])),
        True,
    ),
    Mutation(
        "an address in upper case",
        on_body(
            lambda b: _p(b, 0)["to"][0].__setitem__("email", _p(b, 0)["to"][0]["email"].upper())
        ),
        True,
    ),
    Mutation("an unresolved tag", on_body(lambda b: b.__setitem__("subject", "%%balance%%")), True),
    Mutation("a leftover Jinja marker", on_body(append_html("{{ recipient.email }}")), True),
    Mutation("an address in the shared content", on_body(address_in_shared_content), True),
    Mutation("no personalizations", on_body(set_in(("personalizations",), [])), True),
    Mutation("a cc", on_body(set_in(("personalizations", 0, "cc"), [{"email": OUTSIDER}])), False),
    Mutation(
        "a bcc", on_body(set_in(("personalizations", 0, "bcc"), [{"email": OUTSIDER}])), False
    ),
    Mutation("a top-level bcc", on_body(set_in(("bcc",), [{"email": OUTSIDER}])), False),
    Mutation(
        "a bcc mail setting",
        on_body(set_in(("mail_settings",), {"bcc": {"enable": True, "email": OUTSIDER}})),
        False,
    ),
    Mutation(
        "a reserved header",
        on_body(set_in(("personalizations", 0, HEADERS, "Bcc"), OUTSIDER)),
        False,
    ),
    Mutation(
        "another header", on_body(set_in(("personalizations", 0, HEADERS, "X-Note"), "hi")), False
    ),
    Mutation("a top-level To header", on_body(set_in(("headers",), {"To": OUTSIDER})), False),
    Mutation(
        "a display name", on_body(set_in(("personalizations", 0, "to", 0, "name"), "A, B")), False
    ),
    Mutation(
        "a personal subject", on_body(set_in(("personalizations", 1, "subject"), "Hi")), False
    ),
    Mutation("no headers", on_body(delete_in(("personalizations", 0, HEADERS))), False),
    Mutation("no substitutions", on_body(delete_in(("personalizations", 0, SUBS))), False),
    Mutation("a null value", on_body(set_in(("personalizations", 0, SUBS, FIRST), None)), False),
    Mutation("a number value", on_body(set_in(("personalizations", 0, SUBS, FIRST), 7)), False),
    Mutation(
        "an extra substitution", on_body(set_in(("personalizations", 0, SUBS, "%%x%%"), "")), False
    ),
    Mutation(
        "a missing substitution", on_body(delete_in(("personalizations", 0, SUBS, FIRST))), False
    ),
    Mutation(
        "a 'to' entry that is text",
        on_body(set_in(("personalizations", 0, "to"), [OUTSIDER])),
        False,
    ),
    Mutation(
        "a 'to' that is an object",
        on_body(set_in(("personalizations", 0, "to"), {"email": OUTSIDER})),
        False,
    ),
    Mutation("a null 'to'", on_body(set_in(("personalizations", 0, "to"), None)), False),
    Mutation(
        "an address that is a number",
        on_body(set_in(("personalizations", 0, "to", 0, "email"), 5)),
        False,
    ),
    Mutation("a null personalization", on_body(set_in(("personalizations", 0), None)), False),
    Mutation(
        "personalizations that are an object",
        on_body(set_in(("personalizations",), {"to": []})),
        False,
    ),
    Mutation(
        "a non-ASCII address",
        on_body(set_in(("personalizations", 0, "to"), [{"email": "zoë@bücher.example"}])),
        False,
    ),
    Mutation("pretty-printed", lambda d: json.dumps(json.loads(d), indent=2).encode(), False),
    Mutation("two bodies in one file", lambda d: d + d, False),
    Mutation("'to' twice in one personalization", duplicate_key, False),
    Mutation("a byte-order mark", lambda d: b"\xef\xbb\xbf" + d, False),
    Mutation("not JSON", lambda d: b"to: everyone", False),
    Mutation("a JSON array", lambda d: b"[" + d + b"]", False),
    Mutation("empty", lambda d: b"", False),
    Mutation("invalid UTF-8", lambda d: d.replace(b'"subject":"', b'"subject":"\xff', 1), False),
    Mutation(
        "a UTF-8 encoded surrogate",
        lambda d: d.replace(b'"subject":"', b'"subject":"\xed\xa0\x80', 1),
        False,
    ),
    Mutation(
        "a lone surrogate in an address",
        lambda d: d.replace(b'"email":"', b'"email":"\\ud800', 1),
        False,
    ),
    Mutation(
        "a raw tab in a value", lambda d: d.replace(b'"subject":"', b'"subject":"\t', 1), False
    ),
]


def shared(run: Run) -> dict[str, Any]:
    """Each batch's shared part as the run's spec and rendered content give it."""
    return shared_parts(
        run.spec(), pipeline.load_contents(run), load_manifest(run.staging.manifest)
    )


def staged(run: Run) -> dict[str, str]:
    """Each batch's digest as the run's outbox staged it."""
    outbox = outbox_of(run)
    try:
        return outbox.staged_digests(run.run_key)
    finally:
        outbox.dispose()


def explode(run: Run, *, strict: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    return quality_gate.explode_batches(
        run.spec(),
        manifest_path=run.staging.manifest,
        valid_audience=run.staging.valid_audience,
        secret=SECRET,
        shared=shared(run),
        staged=staged(run),
        audience_data={},
        strict_reader=strict,
    )


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_both_readers_give_the_same_rows(
    mutation: Mutation, clean_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two requests per group: several groups, read ahead in the second thread.
    monkeypatch.setattr(bodies, "CHUNK_BATCHES", 2)
    run = copy_run(clean_run, tmp_path / "run")
    path = first_body(run)
    path.write_bytes(mutation.apply(path.read_bytes()))

    shape = RegularShape(run.spec())
    assert (shape.parse([path.read_bytes()]) is not None) == mutation.regular

    lookups: list[int] = []
    by_hash = Audience._lookup

    def counted(self: Any, keys: pa.Array) -> Any:
        lookups.append(len(keys))
        return by_hash(self, keys)

    monkeypatch.setattr(Audience, "_lookup", counted)
    strict_people, strict_requests = explode(run, strict=True)
    if mutation.name == "clean":  # in audience order: every row found by position
        assert lookups == []
    generic_people, generic_requests = explode(run, strict=False)
    pd.testing.assert_frame_equal(strict_people, generic_people)
    pd.testing.assert_frame_equal(strict_requests, generic_requests)
    assert list(strict_people.columns) == [
        *quality_gate.PERSONALIZATION_FRAME_COLUMNS,
        "email_key",
        "audience_row",
    ]
    assert list(strict_requests.columns) == list(quality_gate.BATCH_COLUMNS)
    if mutation.name in ("clean", "recipients in another order"):  # only the order differs
        assert strict_people["values_match"].all()
        assert strict_people["in_audience"].all()
    if mutation.name == "clean":
        assert strict_requests["digest_matches"].all()
        assert strict_requests["staged_matches"].all()
    else:
        assert not strict_requests["digest_matches"].iloc[0]
        assert not strict_requests["staged_matches"].iloc[0]


def test_tokens_made_in_the_background_give_the_same_rows(clean_run: Run) -> None:
    """Large audiences have their tokens made in a second process; forced here on a small one."""
    in_process = explode(clean_run, strict=True)
    tokens = TokensInBackground(
        SECRET,
        clean_run.spec().name,
        clean_run.staging.valid_audience,
        rows=pq.ParquetFile(clean_run.staging.valid_audience).metadata.num_rows,
        locales=clean_run.spec().locales,
        min_rows=0,
    )
    assert tokens.in_background
    background = quality_gate.explode_batches(
        clean_run.spec(),
        manifest_path=clean_run.staging.manifest,
        valid_audience=clean_run.staging.valid_audience,
        secret=SECRET,
        shared=shared(clean_run),
        staged=staged(clean_run),
        audience_data={},
        tokens=tokens,
    )
    assert tokens._process is None  # closed with the audience
    for ours, theirs in zip(in_process, background, strict=True):
        pd.testing.assert_frame_equal(ours, theirs)
    assert in_process[0]["values_match"].all()


# --- Data Docs ---------------------------------------------------------------------------------
def gate_pages(run: Run) -> dict[Path, str]:
    docs = run.staging.gate_data_docs
    return {p: p.read_text("utf-8") for p in docs.rglob("*.html")}


def test_data_docs_are_kept_with_a_passing_run(clean_run: Run, tmp_path: Path) -> None:
    run = copy_run(clean_run, tmp_path / "run")
    summary = check_envelopes(run)
    assert summary["success"]
    result = read_json(run.staging.gate_result)
    assert result["data_docs"] == "gate/data_docs/index.html"
    assert (run.staging.root / result["data_docs"]).is_file()
    pages = gate_pages(run)
    assert any("validations" in p.parts and "envelopes" in p.parts for p in pages)
    assert any("validations" in p.parts and "batches" in p.parts for p in pages)


def audience_addresses(run: Run) -> set[str]:
    emails = pd.read_parquet(run.staging.valid_audience)["email"].tolist()
    return set(emails) | {e.lower() for e in emails}


def test_data_docs_of_a_failing_gate_name_the_checks_but_no_address(
    clean_run: Run, tmp_path: Path
) -> None:
    run = copy_run(clean_run, tmp_path / "run")
    path = first_body(run)
    body = json.loads(path.read_bytes())
    parts = body["personalizations"]
    addresses = [p["to"][0]["email"] for p in parts]
    parts[0]["to"] = [{"email": f"{addresses[0]}, {addresses[1]}"}]  # two in one field
    parts[2] = copy.deepcopy(parts[3])  # the same address twice
    parts[4]["to"] = [{"email": OUTSIDER}]  # someone outside the audience
    parts[5]["substitutions"] = copy.deepcopy(parts[6]["substitutions"])  # B's values in A's
    path.write_bytes(serialise(body))

    with pytest.raises(ValidationFailed, match="values_match"):
        check_envelopes(run)

    result = read_json(run.staging.gate_result)
    failed = {
        c.get("column") or c["expectation"]
        for part in ("personalization_checks", "request_checks")
        for c in result[part]["checks"]
        if not c["success"]
    }
    assert {"email", ONCE_IN_RUN, "in_audience", "values_match", "digest_matches"} <= failed
    assert result["data_docs"] == "gate/data_docs/index.html"
    pages = gate_pages(run)
    assert (run.staging.gate_data_docs / "index.html") in pages
    text = "\n".join(pages.values())
    unescaped = html.unescape(text)
    for column in (ONCE_IN_RUN, "in_audience", "values_match", "digest_matches"):
        assert column in text
    validation = next(
        t for p, t in pages.items() if "validations" in p.parts and "envelopes" in p.parts
    )
    assert re.search(r"(?i)fail", validation)
    # GX's own words for a failed expectation: a count, never the values.
    readable = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", validation))
    assert re.search(r"values_match .{0,300}?\d+ unexpected values found", readable)
    for address in audience_addresses(run) | {OUTSIDER, f"{addresses[0]}, {addresses[1]}"}:
        assert address not in text, "the Data Docs show a recipient's address"
        assert address not in unescaped, "the Data Docs show a recipient's address"


def test_a_run_of_unreadable_bodies_fails_the_gate_with_its_docs(
    clean_run: Run, tmp_path: Path
) -> None:
    run = copy_run(clean_run, tmp_path / "run")
    for entry in load_manifest(run.staging.manifest).batches:
        (run.staging.batches_dir / entry.file).write_bytes(b"to: everyone")
    with pytest.raises(ValidationFailed, match="json_object"):
        check_envelopes(run)
    result = read_json(run.staging.gate_result)
    assert result["personalizations"] == 0
    assert (run.staging.root / result["data_docs"]).is_file()


def test_data_docs_replace_those_of_an_earlier_attempt(clean_run: Run, tmp_path: Path) -> None:
    run = copy_run(clean_run, tmp_path / "run")
    stale = run.staging.gate_data_docs / "validations" / "stale.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier attempt")
    check_envelopes(run)
    assert not stale.exists()
    assert (run.staging.gate_data_docs / "index.html").is_file()


# --- expected values, column-wise --------------------------------------------------------------
@cache
def base_spec() -> CampaignSpec:
    return load_campaign(INCLUDE / "campaigns", "winter_update")


TRICKY = [
    "\r\n",
    "\u2028",
    "\x85",
    "\x0b",
    " ",
    "\t",
    "\u3000",
    "<b>",
    "&amp;",
    '"',
    "'",
    "é",
    "👩‍👩‍👧",
    "%%x%%",
    "Ann\r\nBcc: x@y.z",
]
text = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=8)), max_size=6).map("".join)
templates = st.builds(
    lambda a, b, c, twice: a + "{token}" + b + ("{token}" + c if twice else ""),
    st.sampled_from(
        ["https://x.test/u?t=", "  https://x.test/u?t=", "\nhttps://x.test/<a>&t=", ""]
    ),
    st.sampled_from(["", "&lang=en", " \r\n", "\"'"]),
    st.sampled_from(["", "&again", " "]),
    st.booleans(),
)
specs = st.builds(
    lambda template, mailto, fields: dataclasses.replace(
        base_spec(), unsubscribe=Unsubscribe(url_template=template, mailto=mailto), fields=fields
    ),
    templates,
    st.sampled_from([None, "unsubscribe@example-exchange.test"]),
    st.sampled_from(
        [
            ("first_name",),
            (),
            ("first_name", "last_name"),
            ("first_name", "unsubscribe_url"),
            ("first_name", "first_name"),
        ]
    ),
)
audience_rows = st.lists(
    st.fixed_dictionaries(
        {
            "user_id": st.text(max_size=20),
            "email": st.just("a@example.com"),
            "first_name": st.one_of(st.none(), text),
            "last_name": st.one_of(st.none(), text),
        }
    ),
    min_size=1,
    max_size=20,
)


@SETTINGS
@given(
    spec=specs,
    rows=audience_rows,
    secret=st.sampled_from([SECRET, b"", b"k" * 64, b"k" * 65, b"\xff" * 200]),
)
def test_envelope_value_columns_are_envelope_values_row_by_row(
    spec: CampaignSpec, rows: list[dict[str, Any]], secret: bytes
) -> None:
    table = pa.Table.from_pylist(rows)
    subs, headers = envelope_value_columns(spec, secret, table)
    for i, row in enumerate(table.to_pylist()):
        own_subs, own_headers = envelope_values(spec, secret, row)
        assert list(subs) == list(own_subs)
        assert {k: v[i].as_py() for k, v in subs.items()} == own_subs
        assert list(headers) == list(own_headers)
        assert {k: v[i].as_py() for k, v in headers.items()} == own_headers


def test_envelope_value_columns_of_a_missing_field_and_numbers() -> None:
    spec = dataclasses.replace(base_spec(), fields=("first_name", "score"))
    table = pa.table({"user_id": pa.array([1, 22], pa.int64()), "score": pa.array([1.5, None])})
    subs, headers = envelope_value_columns(spec, SECRET, table)
    for i, row in enumerate(table.to_pylist()):
        assert {k: v[i].as_py() for k, v in subs.items()} == envelope_values(spec, SECRET, row)[0]
        assert {k: v[i].as_py() for k, v in headers.items()} == envelope_values(spec, SECRET, row)[
            1
        ]


@SETTINGS
@given(user_ids=st.lists(st.text(max_size=30), max_size=20), secret=st.binary(max_size=130))
def test_unsubscribe_tokens_are_unsubscribe_token_for_each(
    user_ids: list[str], secret: bytes
) -> None:
    assert unsubscribe_tokens(secret, "winter_update", user_ids) == [
        unsubscribe_token(secret, "winter_update", u) for u in user_ids
    ]
