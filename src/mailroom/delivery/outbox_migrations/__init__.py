"""The outbox's schema as Alembic revisions, run from code (no ``alembic.ini``).

``upgrade(engine)`` brings an outbox database to this release's newest revision (its head); the
``Outbox`` calls it on every open and ``mailroom outbox upgrade`` calls it on purpose. The
database records its revision in ``mailroom_alembic_version`` (not Alembic's default
``alembic_version``), so the outbox can share a database with other applications, Airflow's
metadata included.

- A new database is created by the revisions, from the first.
- An outbox of a release before versioned migrations (its tables, no version table) is brought
  to the first revision in place by that revision itself (it adds the columns those releases
  added on open), then upgraded like any other.
- A database at a revision this release does not know (upgraded by a newer release) is refused
  with ``UnknownOutboxRevision``: nothing is changed.

Several task processes opening a new outbox at once upgrade it one at a time: whoever finds it
behind takes a lock first (PostgreSQL: a transaction-level advisory lock; SQLite: the database's
write lock, ``BEGIN IMMEDIATE``), looks again under the lock and runs the revisions in that same
transaction, so the others wait and then find it at head. An outbox already at head is only read.

A new schema change is a new file in ``versions/`` (the previous head as its ``down_revision``),
and the same change to the tables in ``mailroom.delivery.outbox``; the unit tests hold the two to
the same schema. ``alembic.command.revision(config(), message=..., rev_id="0002")`` writes the
file from ``script.py.mako``; with ``config(connection)`` and ``autogenerate=True`` it also
compares that connection's database with the tables.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from mailroom.errors import MailroomError

log = logging.getLogger(__name__)

VERSION_TABLE = "mailroom_alembic_version"
# One of the outbox's tables: present without the version table = a release before migrations.
_AN_OUTBOX_TABLE = "mailroom_runs"
# pg_advisory_xact_lock's key while upgrading: the bytes of "mailroom" (advisory locks are per
# database, so outboxes in several schemas of one database upgrade one at a time; harmless).
_PG_LOCK_KEY = int.from_bytes(b"mailroom", "big")
_HERE = Path(__file__).resolve().parent
# Alembic runs env.py through one module-wide proxy (``alembic.context``): one upgrade at a time
# in this process, whichever database (taken after the database's own lock, never before it).
_IN_PROCESS = threading.Lock()


class UnknownOutboxRevision(MailroomError):
    """The outbox is at a revision this release does not know: a newer release upgraded it."""


@dataclass(frozen=True)
class SchemaUpgrade:
    """What opening (or upgrading) an outbox did to its schema."""

    before: str | None  # the revision found; None: no version table
    after: str
    unversioned: bool = False  # tables of a release before versioned migrations were found

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def describe_before(self) -> str:
        if self.before is not None:
            return self.before
        if self.unversioned:
            return "none (tables of a release before versioned migrations)"
        return "none (no outbox tables yet)"


def config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration for the outbox's revisions; ``connection`` is what env.py runs
    them on (in its transaction)."""
    cfg = Config()
    # A ConfigParser value: "%" would start an interpolation.
    cfg.set_main_option("script_location", str(_HERE).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    """This release's newest revision."""
    revision = _script().get_current_head()
    if revision is None:  # pragma: no cover - the package ships its revisions
        raise RuntimeError("the outbox's migrations have no revision")
    return revision


def current(connection: sa.Connection) -> str | None:
    """The revision the database records; None when it has no version table (or no row)."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    revisions = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
    found = sorted(set(revisions))
    if len(found) > 1:
        raise UnknownOutboxRevision(
            f"the outbox records several revisions at once ({', '.join(found)}) in "
            f"{VERSION_TABLE}: its migrations branched; this release has one line up to {head()}"
        )
    return found[0] if found else None


def upgrade(engine: sa.Engine) -> SchemaUpgrade:
    """Bring the outbox behind ``engine`` to ``head()``; safe to run from many processes at once.

    Raises ``UnknownOutboxRevision`` (changing nothing) for a database a newer release upgraded.
    """
    target = head()
    with engine.connect() as conn:
        found = current(conn)
    _refuse_unknown(found, target)
    if found == target:
        return SchemaUpgrade(found, target)
    with engine.connect() as conn:
        _lock(conn)
        found = current(conn)  # another process may have upgraded it while we waited
        _refuse_unknown(found, target)
        unversioned = found is None and sa.inspect(conn).has_table(_AN_OUTBOX_TABLE)
        if found != target:
            with _IN_PROCESS:
                command.upgrade(config(conn), target)
        after = current(conn)
        conn.commit()
    if after != target:  # pragma: no cover - Alembic ran every revision up to the target
        raise RuntimeError(f"the outbox's schema is at {after}, not {target}, after upgrading")
    upgraded = SchemaUpgrade(found, target, unversioned)
    if upgraded.changed:
        log.info("outbox schema: %s -> %s", upgraded.describe_before(), target)
    return upgraded


def _refuse_unknown(found: str | None, target: str) -> None:
    if found is None or found == target:
        return
    known = {script.revision for script in _script().walk_revisions()}
    if found not in known:
        raise UnknownOutboxRevision(
            f"the outbox's schema is at revision {found!r}, which this release of mailroom does "
            f"not know (its newest is {target!r}): a newer release upgraded it. Run that release, "
            "or give this one an outbox of its own; nothing was changed"
        )


def _lock(conn: sa.Connection) -> None:
    """Begin the upgrade's transaction holding a lock no other upgrade can share."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        # Released at COMMIT or ROLLBACK; PostgreSQL's DDL is transactional, so a waiting
        # process sees either no tables or all of them at head.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    elif dialect == "sqlite":
        # The write lock, waited for (the busy timeout) like any writer; SQLite's DDL is
        # transactional too. (The driver itself would begin only before the first INSERT.)
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    # Other databases: no lock of our own; the revisions' DDL is the only guard.
