"""Audience data in what every recipient sees: the whole audience (suppressed people too), read
as a person reads it, and the campaign's own public addresses left out.

The fast path (``People``: the audience files scanned a batch at a time, one scan per lookup) is
compared with a plain Python reference on generated audiences and texts; a run whose template
shows a suppressed person's address is refused by the gate and by the guard, each on its own.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom import pipeline
from mailroom.audience.sample import generate
from mailroom.campaign_spec import load_campaign
from mailroom.checks.audience_data import (
    People,
    audience_data_in,
    shared_audience_data,
    text_of,
)
from mailroom.delivery.outbox import Outbox
from mailroom.errors import EnvelopeViolation, ValidationFailed
from mailroom.pipeline import ProjectPaths
from mailroom.staging import read_json
from mailroom.unsubscribe import unsubscribe_token
from sendgrid_dev import SendGridDevServer
from support.runs import built_run

pytestmark = pytest.mark.unit

INCLUDE = Path(__file__).resolve().parents[2] / "include"
SPEC = load_campaign(INCLUDE / "campaigns", "winter_update")

# Ways a person writes an address so a reader still sees it.
WRITINGS = {
    "plain": lambda local, domain: f"{local}@{domain}",
    "upper": lambda local, domain: f"{local}@{domain}".upper(),
    "entity": lambda local, domain: f"{local}&#64;{domain}",
    "fullwidth": lambda local, domain: f"{local}\uff20{domain}",
    "soft hyphen": lambda local, domain: f"{local[:1]}\u00ad{local[1:]}@{domain}",
    "zero width": lambda local, domain: f"{local}\u200b@{domain}",
    "markup": lambda local, domain: f"{local}@<span></span>{domain}",
    "spelled": lambda local, domain: f"{local} (at) {domain.replace('.', ' (dot) ')}",
    "percent": lambda local, domain: f"{local}%40{domain}",
}


def people_of(emails: list[str], user_ids: list[str]) -> People:
    return People([pa.table({"email": pa.array(emails, pa.string()), "user_id": user_ids})])


locals_ = st.text("abcdefghij", min_size=3, max_size=8)
domains = st.sampled_from(["example.com", "mail.example.org", "b\u00fccher.example"])


@settings(max_examples=200, deadline=None)
@given(
    audience=st.lists(st.tuples(locals_, domains), min_size=1, max_size=6, unique=True),
    shown=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(sorted(WRITINGS))), max_size=3),
    filler=st.lists(st.sampled_from(["Hello", "<p>", "</p>", "\n", " ", "news", "."]), max_size=8),
)
def test_audience_data_in_finds_exactly_the_audience_addresses_written_in_the_text(
    audience: list[tuple[str, str]],
    shown: list[tuple[int, str]],
    filler: list[str],
) -> None:
    from mailroom.addresses import address_key

    keys = [address_key(f"{local}@{domain}") for local, domain in audience]
    known = [k for k in keys if k]
    people = people_of(known, [f"uid-{i:06d}" for i in range(len(known))])
    parts = list(filler)
    expected: set[str] = set()
    for index, writing in shown:
        if index >= len(audience):
            continue
        local, domain = audience[index]
        parts.insert(len(parts) // 2, f" {WRITINGS[writing](local, domain)} ")
        expected.add(str(keys[index]))
    text = " ".join(parts)
    # The reference: the addresses put in, however written, and nothing else.
    assert (audience_data_in(text, people, SPEC) > 0) == bool(expected)
    # The fast lookup agrees with a Python set on every candidate the text shows.
    from mailroom.addresses import addresses_shown

    candidates = addresses_shown(text)
    assert people.known_addresses(candidates) == candidates & set(known)


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(
        st.dictionaries(
            st.sampled_from(["subject", "content", "custom_args"]),
            st.lists(
                st.sampled_from(["Hi ann@example.com", "u00000042", "hello", "x"]), max_size=3
            ),
            max_size=3,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_the_batched_lookup_counts_what_each_text_on_its_own_counts(
    parts: list[dict[str, list[str]]],
) -> None:
    """``shared_audience_data`` scans the audience once for every text; the reference reads
    each field on its own (``audience_data_in``)."""
    people = people_of(["ann@example.com"], ["u00000042"])
    shared = {f"digest{i}": part for i, part in enumerate(parts)}
    expected = {
        digest: sum(audience_data_in(text_of({k: v}), people, SPEC) for k, v in part.items())
        for digest, part in shared.items()
    }
    assert shared_audience_data(SPEC, shared, people) == expected


def test_people_are_read_from_their_files_a_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``People.read`` never holds a file whole: the lookups scan it in batches (made tiny here),
    and give what the same people held in memory give; a missing file adds nobody."""
    import mailroom.checks.audience_data as audience_data

    monkeypatch.setattr(audience_data, "SCAN_ROWS", 7)
    emails = [
        f"Person{i}@Example.com" if i % 3 else f" zo\u00eb{i}@b\u00fccher.example"
        for i in range(60)
    ]
    ids = [f"user-{i:06d}" for i in range(60)]
    files = [tmp_path / "snapshot.parquet", tmp_path / "suppressed.parquet"]
    pq.write_table(pa.table({"user_id": ids[:40], "email": emails[:40]}), files[0])
    pq.write_table(pa.table({"user_id": ids[40:], "email": emails[40:]}), files[1])
    on_disk = People.read([*files, tmp_path / "missing.parquet"])
    in_memory = people_of(emails, ids)
    addresses = {"person1@example.com", "zo\u00eb0@xn--bcher-kva.example", "nobody@example.com"}
    user_ids = {"user-000059", "user-000001", "user-999999"}
    assert on_disk.known(addresses, user_ids) == in_memory.known(addresses, user_ids)
    assert on_disk.known(addresses, user_ids) == (
        {"person1@example.com", "zo\u00eb0@xn--bcher-kva.example"},
        {"user-000059", "user-000001"},
    )
    assert People.read([]).known(addresses, user_ids) == (set(), set())


def test_user_ids_tokens_and_literal_unsubscribe_links_are_audience_data() -> None:
    people = people_of(["ann@example.com"], ["u00000042"])
    assert audience_data_in("Your account u00000042 is ready", people, SPEC) == 1
    # A token shows nobody's id, and whose it is cannot be told without the secret: any token is
    # someone's, in or out of this audience, of this campaign or another.
    token = unsubscribe_token(b"any secret", SPEC.name, "u00000042")
    assert audience_data_in(f"ref {token}.", people, SPEC) == 1
    assert audience_data_in(f"ref {token} and {token}", people_of([], []), SPEC) == 1
    other = unsubscribe_token(b"another secret", "spring-sale", "ユーザー42")
    assert audience_data_in(f"(see {other})", people_of([], []), SPEC) == 1
    # Dotted words that are not one: a version, a host name, a file name.
    assert (
        audience_data_in("v1.2.3 at mail.example-exchange.test, report.2026.pdf", people, SPEC) == 0
    )
    prefix = SPEC.unsubscribe.url_template.split("{token}")[0]
    assert audience_data_in(f"Leave: {prefix}abc", people_of([], []), SPEC) == 1
    # Short ids, the tag itself and the unsubscribe page without a token are not.
    assert audience_data_in("Order 42 of 2026: %%unsubscribe_url%%", people, SPEC) == 0


def test_the_campaigns_public_addresses_are_not_audience_data() -> None:
    public = sorted(SPEC.public_addresses)
    assert public, "the example campaign has a sender, a reply-to and an unsubscribe mailbox"
    people = people_of(public, [f"staff{i:04d}" for i in range(len(public))])
    assert audience_data_in(" ".join(public), people, SPEC) == 0


def test_a_template_showing_a_suppressed_persons_address_is_refused_by_each_layer(
    tmp_path: Path, dev_server: SendGridDevServer
) -> None:
    audience = generate(tmp_path / "users.sqlite", users=200)
    with sqlite3.connect(audience.path) as conn:
        (suppressed,) = conn.execute(
            "SELECT s.email FROM suppressions s JOIN users u ON lower(u.email) = lower(s.email) "
            "LIMIT 1"
        ).fetchone()
    project = tmp_path / "include"
    shutil.copytree(INCLUDE, project)
    template = project / "templates" / "winter_update" / "body.txt"
    local, _, domain = suppressed.partition("@")
    spelled = f"{local} (at) {domain.replace('.', ' (dot) ')}"
    source = template.read_text()
    template.write_text(
        source.replace("{% block content %}", f"{{% block content %}}\nQuestions? Ask {spelled}", 1)
    )
    paths = ProjectPaths.under(project)
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=tmp_path / "staging",
        run_id="manual__suppressed",
        shard_count=1,
        secret=b"s",
    )
    assert run.staging.suppressed.exists()
    outbox = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    try:
        frozen = pipeline.freeze_batches(run, outbox=outbox)
        with pytest.raises(ValidationFailed, match="audience_data_shared"):
            pipeline.check_envelopes(run, paths, secret=b"s", outbox=outbox)
        assert read_json(run.staging.gate_result)["success"] is False
        with pytest.raises(EnvelopeViolation, match="audience data"):
            pipeline.guard_shard(run, manifest_sha256=frozen["manifest_sha256"], outbox=outbox)
    finally:
        outbox.dispose()
    assert dev_server.stats().received == 0
