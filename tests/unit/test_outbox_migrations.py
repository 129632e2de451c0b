"""The outbox's schema through its Alembic revisions, on a real SQLite file and real PostgreSQL.

Databases of earlier releases are made with the very tables those releases created
(``outbox_previous_release``), filled with rows, then opened (or ``mailroom outbox upgrade``d) by
this release. Each PostgreSQL case gets a schema of its own in the session's database (its
``search_path``), so it starts as empty as a new SQLite file.
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from outbox_previous_release import RELEASES, create, previous_release_metadata

from mailroom.cli.main import main
from mailroom.delivery.outbox import BatchState, Outbox, UnknownOutboxRevision, metadata
from mailroom.delivery.outbox_migrations import VERSION_TABLE, config, head

pytestmark = pytest.mark.unit

KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
RUN = "winter_update/manual__2026-01-05"
OUTBOX_TABLES = (
    "mailroom_batches",
    "mailroom_campaign_sends",
    "mailroom_delivery_events",
    "mailroom_operator_actions",
    "mailroom_recipients",
    "mailroom_run_inputs",
    "mailroom_run_resends",
    "mailroom_runs",
    "mailroom_soft_bounces",
    "mailroom_suppression_removals",
    "mailroom_suppressions",
)
# One batch of the earlier release's run in each state, with what the row said.
EARLIER_BATCHES = {
    "en-00000": (BatchState.STAGED, 0, None, None),
    "en-00001": (BatchState.SENDING, 1, None, None),
    "en-00002": (BatchState.SENT, 1, "sg-2", None),
    "en-00003": (BatchState.FAILED, 2, None, "HTTP 400"),
    "en-00004": (BatchState.UNKNOWN, 1, None, "answer lost"),
    "en-00005": (BatchState.HALTED, 0, None, "halted by an operator"),
}


def empty_database(kind: str, request: pytest.FixtureRequest, tmp_path: Path, name: str) -> str:
    """The URL of an empty database: a new SQLite file, or a new PostgreSQL schema."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.sqlite'}"
    base = request.getfixturevalue("postgres_url")
    schema = f"{name}_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(base)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    finally:
        engine.dispose()
    return f"{base}?options=-csearch_path%3D{schema}"


def recorded_revisions(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    finally:
        engine.dispose()


def set_revision(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


def schema_of(url: str) -> dict[str, Any]:
    """Every table's columns (name, type, nullable), primary key and indexes, as the database
    reports them; on SQLite also the exact DDL it stored for the outbox's tables."""
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        found: dict[str, Any] = {}
        for name in sorted(inspector.get_table_names()):
            found[name] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)
                ],
                "primary key": inspector.get_pk_constraint(name)["constrained_columns"],
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(name)
                ),
            }
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                # The outbox's own tables and indexes (the version table is Alembic's).
                found["ddl"] = sorted(
                    tuple(row)
                    for row in conn.exec_driver_sql(
                        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name IN "
                        f"{OUTBOX_TABLES!r}"
                    )
                )
        return found
    finally:
        engine.dispose()


def differences_from_the_tables(url: str) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match ``outbox.metadata``
    (types and nullability included)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={"compare_type": True, "version_table": VERSION_TABLE},
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def fill_as_an_earlier_release(url: str, release: str) -> None:
    """A staged-and-partly-sent run in the tables ``release`` made, with its own rows."""
    tables = create(url, release).tables
    now = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    full = release != "first"  # the first release's tables lack the later columns
    run: dict[str, Any] = {
        "run_key": RUN,
        "manifest_sha256": "m" * 64,
        "halt_requested": False,
        "created_at": now,
    }
    if full:
        run |= {"halt_reason": None, "next_request_at": 0.0, "next_recipient_at": 0.0}
    batches = [
        {
            "run_key": RUN,
            "batch_id": batch_id,
            "batch_index": index,
            "locale": "en",
            "sha256": f"{index:064x}",
            "recipients": 2,
            "state": str(state),
            "attempts": attempts,
            "message_id": message_id,
            "last_error": error,
            "updated_at": now,
        }
        for index, (batch_id, (state, attempts, message_id, error)) in enumerate(
            EARLIER_BATCHES.items()
        )
    ]
    members: list[dict[str, Any]] = [
        {
            "run_key": RUN,
            "email_key": f"user{index}.{n}@example.com",
            "user_id": f"u{index}-{n}",
            "batch_id": batch_id,
        }
        for index, batch_id in enumerate(EARLIER_BATCHES)
        for n in range(2)
    ]
    if full:
        for member in members:
            member["values_sha256"] = "v" * 64
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(tables["mailroom_runs"].insert(), run)
            conn.execute(tables["mailroom_batches"].insert(), batches)
            conn.execute(tables["mailroom_recipients"].insert(), members)
    finally:
        engine.dispose()


def assert_the_earlier_rows_are_intact(box: Outbox) -> None:
    assert box.manifest_sha256(RUN) == "m" * 64
    assert box.halt_requested(RUN) is False
    assert {
        batch_id: (r.state, r.attempts, r.message_id, r.last_error)
        for batch_id, r in box.states(RUN).items()
    } == EARLIER_BATCHES
    assert set(box.batch_members(RUN, "en-00003")) == {
        "user3.0@example.com",
        "user3.1@example.com",
    }
    assert box.counts(RUN) == {str(s): {"batches": 1, "recipients": 2} for s in BatchState}
    assert len(list(box.not_sent(RUN))) == 10


def assert_the_state_machine_works(box: Outbox) -> None:
    # The new columns are there and usable: the guard's digests, the rate slots, a recipient's
    # own state.
    assert box.unguarded(RUN) == 6
    box.mark_guarded(RUN, [("en-00000", f"{0:064x}")])
    assert box.unguarded(RUN) == 5
    assert box.reserve_send_slot(RUN, 10.0, None, recipients=2, now=100.0) == 0.0
    assert box.reserve_send_slot(RUN, 10.0, None, recipients=2, now=100.0) == pytest.approx(0.1)
    # A staged batch is claimed and finished; a halted one resumes; a sent one is never claimed.
    assert box.claim(RUN, "en-00000")
    assert box.mark_recipient(RUN, "en-00000", "user0.0@example.com", BatchState.SENDING)
    assert box.mark_recipient(RUN, "en-00000", "user0.0@example.com", BatchState.SENT)
    box.finish(RUN, "en-00000", BatchState.SENT, message_id="sg-0")
    assert box.claim(RUN, "en-00005")
    box.finish(RUN, "en-00005", BatchState.FAILED, error="refused")
    assert not box.claim(RUN, "en-00002")
    # The batch an earlier release left 'sending' was interrupted.
    assert box.mark_interrupted(RUN, list(EARLIER_BATCHES)) == 1
    states = {batch_id: r.state for batch_id, r in box.states(RUN).items()}
    assert states == {
        "en-00000": BatchState.SENT,
        "en-00001": BatchState.UNKNOWN,
        "en-00002": BatchState.SENT,
        "en-00003": BatchState.FAILED,
        "en-00004": BatchState.UNKNOWN,
        "en-00005": BatchState.FAILED,
    }
    assert box.requeue(RUN, [BatchState.UNKNOWN]) == 2


# -- a new database --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_database_is_created_at_head_by_the_revisions(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = empty_database(kind, request, tmp_path, "new")

    box = Outbox(url)
    box.dispose()

    assert (box.schema.before, box.schema.after, box.schema.changed) == (None, head(), True)
    assert recorded_revisions(url) == [head()]
    assert differences_from_the_tables(url) == []
    assert sorted(schema_of(url).keys() - {"ddl"}) == sorted([*OUTBOX_TABLES, VERSION_TABLE])


@pytest.mark.parametrize("kind", KINDS)
def test_the_outbox_shares_a_database_with_another_alembic_application(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Airflow's metadata database, say: its revisions in Alembic's default version table.
    url = empty_database(kind, request, tmp_path, "shared")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            conn.execute(sa.text("INSERT INTO alembic_version VALUES ('29ce7909c52b')"))
    finally:
        engine.dispose()

    box = Outbox(url)
    box.dispose()

    assert box.schema.after == head()
    assert recorded_revisions(url) == [head()]
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            other = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
            assert list(other) == ["29ce7909c52b"]
    finally:
        engine.dispose()


def created_by(url: str, tables: sa.MetaData) -> dict[str, Any]:
    engine = sa.create_engine(url)
    try:
        tables.create_all(engine)
    finally:
        engine.dispose()
    return schema_of(url)


@pytest.mark.parametrize("kind", KINDS)
def test_the_revisions_make_exactly_the_tables_the_code_describes(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    by_revisions = empty_database(kind, request, tmp_path, "revisions")
    Outbox(by_revisions).dispose()

    made = schema_of(by_revisions)

    assert made.pop(VERSION_TABLE)
    assert made == created_by(empty_database(kind, request, tmp_path, "create_all"), metadata)
    assert sorted(made) == [*(["ddl"] if kind == "sqlite" else []), *OUTBOX_TABLES]


@pytest.mark.parametrize("kind", KINDS)
def test_the_first_revision_is_the_schema_the_previous_release_created(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = empty_database(kind, request, tmp_path, "first_revision")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            command.upgrade(config(conn), "0001")
            conn.commit()
    finally:
        engine.dispose()

    made = schema_of(url)

    assert made.pop(VERSION_TABLE)
    previous = created_by(
        empty_database(kind, request, tmp_path, "previous"), previous_release_metadata()
    )
    assert made == previous


# -- an outbox of an earlier release -----------------------------------------------------------


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("kind", KINDS)
def test_an_outbox_of_an_earlier_release_is_upgraded_when_opened(
    kind: str, release: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = empty_database(kind, request, tmp_path, "earlier")
    fill_as_an_earlier_release(url, release)

    box = Outbox(url)
    try:
        assert (box.schema.before, box.schema.after, box.schema.unversioned) == (
            None,
            head(),
            True,
        )
        assert recorded_revisions(url) == [head()]
        assert_the_earlier_rows_are_intact(box)
        assert_the_state_machine_works(box)
    finally:
        box.dispose()
    assert differences_from_the_tables(url) == []


@pytest.mark.parametrize("kind", KINDS)
def test_mailroom_outbox_upgrade_upgrades_an_earlier_outbox_and_prints_the_revisions(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = empty_database(kind, request, tmp_path, "cli")
    fill_as_an_earlier_release(url, "first")

    assert main(["outbox", "upgrade", "--outbox-url", url]) == 0

    out = capsys.readouterr().out
    assert "before: none (tables of a release before versioned migrations)" in out
    assert f"after:  {head()}" in out
    assert url not in out  # a URL may carry a password
    assert recorded_revisions(url) == [head()]
    box = Outbox(url)
    try:
        assert not box.schema.changed
        assert_the_earlier_rows_are_intact(box)
        assert_the_state_machine_works(box)
    finally:
        box.dispose()


@pytest.mark.parametrize("kind", KINDS)
def test_upgrading_an_outbox_at_head_changes_nothing(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = empty_database(kind, request, tmp_path, "twice")
    fill_as_an_earlier_release(url, "previous")
    Outbox(url).dispose()
    upgraded = schema_of(url)
    capsys.readouterr()

    monkeypatch.setenv("MAILROOM_OUTBOX_URL", url)  # as the other operator commands read it
    assert main(["outbox", "upgrade"]) == 0
    assert main(["outbox", "upgrade"]) == 0
    box = Outbox(url)
    box.dispose()

    out = capsys.readouterr().out
    assert out.count(f"before: {head()}") == 2
    assert out.count("nothing to do") == 2
    assert (box.schema.before, box.schema.after, box.schema.changed) == (head(), head(), False)
    assert schema_of(url) == upgraded
    assert recorded_revisions(url) == [head()]
    box = Outbox(url)
    try:
        assert_the_earlier_rows_are_intact(box)
    finally:
        box.dispose()


@pytest.mark.parametrize("kind", KINDS)
def test_an_outbox_at_a_revision_this_release_does_not_know_is_refused(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = empty_database(kind, request, tmp_path, "newer")
    Outbox(url).dispose()
    set_revision(url, "0999_from_a_newer_release")
    before = schema_of(url)

    with pytest.raises(UnknownOutboxRevision, match="'0999_from_a_newer_release'"):
        Outbox(url)
    assert main(["outbox", "upgrade", "--outbox-url", url]) == 1

    err = capsys.readouterr().err
    assert "'0999_from_a_newer_release', which this release of mailroom does not know" in err
    assert f"its newest is '{head()}'" in err
    assert recorded_revisions(url) == ["0999_from_a_newer_release"]
    assert schema_of(url) == before


# -- several tasks opening one new outbox at once -------------------------------------------------

OPENERS = 4


def open_outboxes(urls: Any, results: Any, barrier: Any) -> None:
    """A task process: for each URL, wait for the other openers, then open that outbox."""
    while (url := urls.get()) is not None:
        barrier.wait(timeout=60)
        try:
            box = Outbox(url)
            box.dispose()
            results.put(("opened", box.schema.before))
        except BaseException as exc:  # reported to the test, which fails on it
            results.put(("failed", repr(exc)))


@pytest.mark.parametrize(
    ("kind", "rounds"), [("sqlite", 60), pytest.param("postgresql", 30, marks=pytest.mark.postgres)]
)
def test_tasks_opening_a_new_outbox_at_once_do_not_race(
    kind: str, rounds: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Task processes of their own (a lock inside one process would prove nothing), started once;
    # each round, all of them open one new database at the same moment. Without the upgrade
    # lock they collide creating the tables and the version table (round 0 already); SQLite
    # also while switching the new file to WAL.
    spawn = multiprocessing.get_context("spawn")
    urls, results, barrier = spawn.Queue(), spawn.Queue(), spawn.Barrier(OPENERS)
    openers = [
        spawn.Process(target=open_outboxes, args=(urls, results, barrier)) for _ in range(OPENERS)
    ]
    for opener in openers:
        opener.start()
    try:
        for round_ in range(rounds):
            url = empty_database(kind, request, tmp_path, f"race{round_}")
            for _ in openers:
                urls.put(url)
            outcomes = [results.get(timeout=180) for _ in openers]
            assert [o for o in outcomes if o[0] == "failed"] == [], f"round {round_}"
            # One of them upgraded it from nothing; the others found it at head.
            assert Counter(outcomes) == {
                ("opened", None): 1,
                ("opened", head()): OPENERS - 1,
            }, f"round {round_}"
            assert recorded_revisions(url) == [head()]
    finally:
        for _ in openers:
            urls.put(None)
        for opener in openers:
            opener.join(timeout=60)
            if opener.is_alive():
                opener.kill()
