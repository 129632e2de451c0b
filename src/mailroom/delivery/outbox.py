"""The outbox: every batch's state and every recipient's batch, in a real SQL database.

States are ``BatchState`` members (stored as their string values): ``staged → sending → sent |
failed | unknown | halted``. Every change of state is a compare-and-set UPDATE (``_set_state``:
``WHERE state IN (the states it may come from)``) in a transaction of its own, so two shards (or
a retried shard) can never both send one batch, and a batch left ``sending`` by a killed worker
becomes ``unknown`` rather than being sent again. Recipients are keyed by (run, address): the
database itself refuses an address in two batches of one run.

A transport that sends one message per recipient (SMTP) also records each recipient's own state
(``sending → sent | failed | unknown``, with its message id or error) through a ``BatchLedger``: a
failure in the middle of a 1,000-message batch then leaves the messages already sent on record,
and a retry or resume of the batch skips them. A recipient without a state of its own (NULL:
every recipient of a whole-request transport such as SendGrid) is in its batch's state; counts,
``not_sent`` and ``requeue`` go by each recipient's own state where it has one.

Exactly-once holds per campaign too (a run key is ``<campaign>/<run id>``). The rows every run
leaves are the record of whom a campaign sent to: ``earlier_outcomes`` lists who the other runs
of a campaign sent to or left in doubt (``build_envelopes`` leaves them out), through an index
on the address, rather than a second table of outcomes that every change of state would have
to keep in step. ``claim`` takes the campaign's lock and its sending slot (one run of a
campaign sends at a time: ``CampaignBusy``) and refuses a batch holding anyone another run of
the campaign sent to since, unless the run was staged with a resend reason.

The suppression list (``Suppression``) is who no campaign may send to, by address key: every
run's ``extract_audience`` leaves them out (``suppressed_keys``) beside the campaign's own
suppression source. Adding a person already on it keeps the first record, so an import or a
provider's event may be replayed; ``mailroom suppressions`` keeps it.

The tables below are this release's schema; the database gets it from the Alembic revisions in
``outbox_migrations``, run when an ``Outbox`` opens (or by ``mailroom outbox upgrade``): a new
database is created by them, an outbox of an earlier release is upgraded in place, one at a time
when several tasks open it at once, and a database a newer release upgraded is refused
(``UnknownOutboxRevision``). A change to these tables is a new revision there.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from itertools import islice
from typing import Any, NamedTuple

import sqlalchemy as sa

from mailroom.addresses import UnreadableAddress, mask, mask_value, suppression_address
from mailroom.delivery import outbox_migrations
from mailroom.delivery.delivery_events import OUTCOMES, PROVIDER, DeliveryEvent
from mailroom.delivery.outbox_migrations import SchemaUpgrade as SchemaUpgrade
from mailroom.delivery.outbox_migrations import UnknownOutboxRevision as UnknownOutboxRevision

log = logging.getLogger(__name__)


class BatchState(StrEnum):
    """Where a batch is: ``staged → sending → sent | failed | unknown | halted``.

    A recipient of a batch sent one message per recipient has one of ``sending``, ``sent``,
    ``failed``, ``unknown`` of its own (NULL: in its batch's state). The values are what the
    database stores.
    """

    STAGED = "staged"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    UNKNOWN = "unknown"
    HALTED = "halted"


FINAL_STATES = (BatchState.SENT, BatchState.FAILED, BatchState.UNKNOWN, BatchState.HALTED)
# A recipient's own outcomes, after ``sending``.
_RECIPIENT_OUTCOMES = (BatchState.SENT, BatchState.FAILED, BatchState.UNKNOWN)

metadata = sa.MetaData()
runs = sa.Table(
    "mailroom_runs",
    metadata,
    sa.Column("run_key", sa.String(250), primary_key=True),
    sa.Column("manifest_sha256", sa.String(64), nullable=False),
    sa.Column("halt_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("halt_reason", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # The campaign-wide rate limiter's next free slots (Unix seconds), shared by every shard.
    sa.Column("next_request_at", sa.Float, nullable=False, default=0.0),
    sa.Column("next_recipient_at", sa.Float, nullable=False, default=0.0),
)
batches = sa.Table(
    "mailroom_batches",
    metadata,
    sa.Column("run_key", sa.String(250), primary_key=True),
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("batch_index", sa.Integer, nullable=False),
    sa.Column("locale", sa.String(16), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("recipients", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("message_id", sa.String(128)),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # The digest of the body the envelope guard cleared before any request of the run left
    # (``shards.guard_shard``); a shard sends nothing while any batch of its run lacks it.
    sa.Column("guarded_sha256", sa.String(64)),
    # A provider event without the run's custom args is matched by its request's message id.
    sa.Index("ix_mailroom_batches_message_id", "message_id"),
)
recipients = sa.Table(
    "mailroom_recipients",
    metadata,
    sa.Column("run_key", sa.String(250), primary_key=True),
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("values_sha256", sa.String(64)),
    # Only for transports that send one message per recipient; NULL = in its batch's state.
    sa.Column("state", sa.String(16)),
    sa.Column("message_id", sa.String(255)),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
    sa.Index("ix_mailroom_recipients_batch", "run_key", "batch_id"),
    # Who any run of a campaign sent to, by address (``earlier_outcomes``, ``claim``).
    sa.Index("ix_mailroom_recipients_email", "email_key", "run_key"),
    # Who an unsubscribe link was made for (``unsubscribed_address``).
    sa.Index("ix_mailroom_recipients_user", "user_id", "run_key"),
    # The recipients with a state of their own, and only those (``counts``, ``batch_progress``).
    sa.Index(
        "ix_mailroom_recipients_own_state",
        "run_key",
        "batch_id",
        "state",
        sqlite_where=sa.text("state IS NOT NULL"),
        postgresql_where=sa.text("state IS NOT NULL"),
    ),
)
# The SHA-256 of each file the run's requests are rebuilt from (``mailroom.run_inputs``), as it
# was when the run was staged: a run folder rewritten afterwards is told from the approved one.
run_inputs = sa.Table(
    "mailroom_run_inputs",
    metadata,
    sa.Column("run_key", sa.String(250), primary_key=True),
    sa.Column("path", sa.String(250), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
)
# The run of each campaign that is sending: taken by its first ``claim``, given up by
# ``end_sending`` (reconcile). Two runs of one campaign never have batches in flight together.
# Why a run may send again to people an earlier run of its campaign sent to; a run without a row
# may not (``claim`` refuses such a batch).
run_resends = sa.Table(
    "mailroom_run_resends",
    metadata,
    sa.Column("run_key", sa.String(250), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
)
campaign_sends = sa.Table(
    "mailroom_campaign_sends",
    metadata,
    sa.Column("campaign", sa.String(64), primary_key=True),
    sa.Column("run_key", sa.String(250), nullable=False),
    sa.Column("since", sa.DateTime(timezone=True), nullable=False),
)
# What operators did to a run after it was staged (``OperatorAction``), with the run's counts
# just before and after, for the report's history.
operator_actions = sa.Table(
    "mailroom_operator_actions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_key", sa.String(250), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("by", sa.String(250), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("requests", sa.Text, nullable=False),
    sa.Column("recipients", sa.Integer, nullable=False),
    sa.Column("counts_before", sa.Text, nullable=False),
    sa.Column("counts_after", sa.Text, nullable=False),
    sa.Index("ix_mailroom_operator_actions_run", "run_key", "id"),
)
# The suppression list (``Suppression``): one row per mailbox, by its ``addresses.address_key``.
suppressions = sa.Table(
    "mailroom_suppressions",
    metadata,
    sa.Column("email_key", sa.String(320), primary_key=True),
    # The address as it was given (unwrapped), for operators.
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_by", sa.String(250)),
)
# Who took someone off the suppression list, when and why, with the record that was removed:
# sending again to someone who complained or bounced is a decision someone answers for.
suppression_removals = sa.Table(
    "mailroom_suppression_removals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email_key", sa.String(320), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("removed_by", sa.String(250), nullable=False),
    sa.Column("why", sa.Text, nullable=False),
    sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_mailroom_suppression_removals_email", "email_key", "id"),
)
# What the provider reported after it accepted a request (``delivery_events.DeliveryEvent``):
# one row per event, by the provider's own event id, so a retried or repeated event is kept
# once. ``run_key``, ``batch_id`` and ``locale`` are set when the event is a recipient's of a
# request of a run in this outbox (else NULL: kept, and counted nowhere).
delivery_events = sa.Table(
    "mailroom_delivery_events",
    metadata,
    sa.Column("event_id", sa.String(100), primary_key=True),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("outcome", sa.String(16)),
    sa.Column("email_key", sa.String(320)),
    sa.Column("run_key", sa.String(250)),
    sa.Column("batch_id", sa.String(64)),
    sa.Column("locale", sa.String(16)),
    sa.Column("message_id", sa.String(128)),
    sa.Column("reason", sa.Text),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_mailroom_delivery_events_run", "run_key", "outcome", "locale"),
    sa.Index("ix_mailroom_delivery_events_recipient", "run_key", "email_key"),
)
# Soft bounces (``deferred``, ``blocked``) in a row per address; a delivery sets it back to 0.
soft_bounces = sa.Table(
    "mailroom_soft_bounces",
    metadata,
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("in_a_row", sa.Integer, nullable=False),
    sa.Column("last_reason", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


class Action(StrEnum):
    """What an operator did to a run (``mailroom settle|resend|halt|resume``)."""

    SETTLE_SENT = "settle_sent"
    SETTLE_NOT_SENT = "settle_not_sent"
    RESEND = "resend"
    HALT = "halt"
    RESUME = "resume"
    # Not an operator's: the provider's events showed it accepted requests left unknown.
    SETTLE_BY_EVENTS = "settle_by_events"


@dataclass(frozen=True)
class OperatorAction:
    """Who did it and why; the outbox adds when, which requests, how many recipients and the
    counts before and after."""

    action: Action
    by: str
    reason: str

    def __post_init__(self) -> None:
        if not self.by.strip():
            raise ValueError("an operator action needs who did it")
        if not self.reason.strip():
            raise ValueError(f"{self.action.value} needs a reason")


@dataclass(frozen=True)
class Suppression:
    """One person on the suppression list: their address, why (``unsubscribed``, ``bounced``,
    ``spam_report``, ``manual``…), where it came from (``cli``, ``import``…), and optionally
    more detail, when and by whom (the outbox sets ``created_at`` when not given).

    ``email`` is matched by its address key, so any spelling of the mailbox is the same person.
    ``reason`` and ``source`` are counted by (the approval summary, ``mailroom suppressions
    list``), so each is one line of at most 64 characters."""

    email: str
    reason: str
    source: str
    detail: str | None = None
    created_by: str | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        _require_line("reason", self.reason, _LABEL_CHARS)
        _require_line("source", self.source, _LABEL_CHARS)
        if self.created_by is not None and self.created_by.strip():
            _require_line("created_by", self.created_by, _BY_CHARS)


_LABEL_CHARS = 64
_BY_CHARS = 250
_ADDRESS_CHARS = 320
# Suppression entries read and inserted at a time (all of them in one transaction).
_SUPPRESS_CHUNK = 10_000


def _require_line(what: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a suppression needs a {what}")
    if len(value.strip()) > limit or not value.strip().isprintable():
        raise ValueError(f"a suppression's {what} is one line of at most {limit} characters")


class SuppressionRefused(ValueError):
    """An address the suppression list does not take (not one address, or too long to store).
    The message names its row (its position among the entries given, 1 for the first) and
    shows the value masked: it may be someone's address, and ends up in logs and terminals."""


def listed_address(email: object, row: int | None = None) -> tuple[str, str]:
    """The address a suppression entry spells and its address key (``suppression_address``),
    as the suppression list stores and looks it up; ``SuppressionRefused`` naming ``row`` (when
    there is one) and the masked value when it is not one address or is too long to store."""
    where = f"row {row}: " if row is not None else ""
    try:
        address, key = suppression_address(email)
    except UnreadableAddress as exc:
        raise SuppressionRefused(f"{where}{exc} ({mask_value(email)})") from None
    if max(len(address), len(key)) > _ADDRESS_CHARS:
        raise SuppressionRefused(
            f"{where}longer than {_ADDRESS_CHARS} characters ({mask(address)})"
        )
    return address, key


class NothingToSettle(Exception):
    """A request given to ``settle`` is not in this run, or has no ``unknown`` outcome."""


class Member(NamedTuple):
    """One recipient of a run: which batch carries them, and the digest of their own values."""

    email: str
    user_id: str
    batch_id: str
    values_sha256: str | None = None


@dataclass(frozen=True)
class StagedBatch:
    batch_id: str
    batch_index: int
    locale: str
    sha256: str
    recipients: int


@dataclass(frozen=True)
class BatchRecord:
    """A batch's row: its state, attempts and outcome."""

    batch_id: str
    state: BatchState
    attempts: int
    message_id: str | None
    last_error: str | None


@dataclass(frozen=True)
class BatchProgress:
    """One batch as the run's progress reads it: where it is, and how many of its recipients
    are in each state (its own state for all of them, unless some have one of their own)."""

    batch_id: str
    batch_index: int
    locale: str
    state: BatchState
    recipients: int
    updated_at: datetime
    per_state: dict[str, int]


@dataclass(frozen=True)
class RecipientOutcome:
    """What became of one recipient's message: ``state`` ``sent | failed | unknown``, or None
    when it certainly did not leave (it may be sent later), with the Message-ID or the error."""

    email: str
    state: BatchState | None
    message_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class RecipientRecord:
    """One recipient's own outcome, when its batch was sent one message per recipient."""

    email: str
    batch_id: str
    state: BatchState | None
    message_id: str | None
    last_error: str | None


_STAGE_CHUNK = 50_000
_MEMBER_COLUMNS = ("run_key", "email_key", "user_id", "batch_id", "values_sha256")


def _insert_members(conn: sa.Connection, rows: list[tuple[str, str, str, str, str | None]]) -> None:
    """Insert recipient rows in bulk: PostgreSQL's COPY through psycopg2, the driver's own
    ``executemany`` elsewhere. (SQLAlchemy's ``insert()`` with a million parameter dicts spends
    more time building them than the database spends storing the rows.)"""
    dialect = conn.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg2":
        buffer = io.StringIO()
        # Every value quoted, None not: COPY reads an unquoted empty field as NULL.
        csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC).writerows(rows)
        buffer.seek(0)
        statement = (
            f"COPY {recipients.name} ({', '.join(_MEMBER_COLUMNS)}) "
            "FROM STDIN WITH (FORMAT csv, NULL '')"
        )
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.copy_expert(statement, buffer)
        except dialect.loaded_dbapi.IntegrityError as exc:
            # As SQLAlchemy raises it for an INSERT: callers handle one kind of error.
            raise sa.exc.IntegrityError(statement, None, exc) from exc
        finally:
            cursor.close()
        return
    marks = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
    if marks is None:
        conn.execute(
            recipients.insert(), [dict(zip(_MEMBER_COLUMNS, r, strict=True)) for r in rows]
        )
        return
    conn.exec_driver_sql(
        f"INSERT INTO {recipients.name} ({', '.join(_MEMBER_COLUMNS)}) "
        f"VALUES ({', '.join([marks] * len(_MEMBER_COLUMNS))})",
        rows,
    )


class OutboxConflict(Exception):
    """The run is already past staging, or its staged batches differ from these."""


class CampaignBusy(OutboxConflict):
    """Another run of the same campaign is sending: this one may not start."""


def masked_url(url: str) -> str:
    """An outbox URL as logs, XCom and terminals may show it: any password as ``***``."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def campaign_of(run_key: str) -> str:
    """The campaign of a run key (``<campaign>/<run id>``; a campaign name has no ``/``)."""
    return run_key.split("/", 1)[0]


def _now() -> datetime:
    return datetime.now(UTC)


class Outbox:
    def __init__(self, url: str) -> None:
        """Open the outbox at ``url``, creating or upgrading its tables to this release's schema
        first (``outbox_migrations``); ``schema`` says what that found and did."""
        self.url = url
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            connect_args = {"timeout": 60}
        self.engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            self.schema: SchemaUpgrade = outbox_migrations.upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def dispose(self) -> None:
        self.engine.dispose()

    # staging --------------------------------------------------------------------------------
    def stage(
        self,
        run_key: str,
        manifest_sha256: str,
        staged: Sequence[StagedBatch],
        members: Iterable[Member | tuple[str, str, str] | tuple[str, str, str, str | None]],
        inputs: Mapping[str, str] | None = None,
        *,
        resend_reason: str | None = None,
    ) -> None:
        """Register a run's batches and (email, user_id, batch_id) members, all ``staged``, and
        the digests of the ``inputs`` its requests are rebuilt from (path → SHA-256).
        ``resend_reason``: the run was triggered to send again to people an earlier run of its
        campaign sent to, and why (None: ``claim`` refuses a batch holding any of them).

        Re-staging a run is allowed only while nothing of it has been sent; it replaces the old
        rows, so a re-run of the freeze task cannot leave stale batches behind.
        """
        self.stage_members_first(
            run_key,
            members,
            lambda: (manifest_sha256, staged),
            inputs,
            resend_reason=resend_reason,
        )

    def stage_members_first(
        self,
        run_key: str,
        members: Iterable[Member | tuple[str, str, str] | tuple[str, str, str, str | None]],
        batches_when_frozen: Callable[[], tuple[str, Sequence[StagedBatch]]],
        inputs: Mapping[str, str] | None = None,
        *,
        resend_reason: str | None = None,
    ) -> None:
        """``stage``, in one transaction as well, for a caller still freezing the batches: the
        members go in first, then ``batches_when_frozen()`` (which may wait for the freezing to
        end) gives the manifest digest and the batches. If it raises, nothing is staged."""
        now = _now()
        with self.engine.begin() as conn:
            started = conn.execute(
                sa.select(sa.func.count())
                .select_from(batches)
                .where(batches.c.run_key == run_key, batches.c.state != BatchState.STAGED)
            ).scalar_one()
            if started:
                raise OutboxConflict(
                    f"run {run_key} already has {started} batch(es) past 'staged': not re-staging"
                )
            attempted = conn.execute(
                sa.select(sa.func.count())
                .select_from(recipients)
                .where(recipients.c.run_key == run_key, recipients.c.state.is_not(None))
            ).scalar_one()
            if attempted:
                raise OutboxConflict(
                    f"run {run_key} already has {attempted} message(s) attempted: not re-staging"
                )
            for table in (recipients, batches, run_inputs, run_resends, runs):
                conn.execute(table.delete().where(table.c.run_key == run_key))
            rows = iter(members)
            while chunk := list(islice(rows, _STAGE_CHUNK)):
                _insert_members(
                    conn,
                    [
                        (run_key, m[0].lower(), m[1], m[2], m[3] if len(m) > 3 else None)
                        for m in chunk
                    ],
                )
            manifest_sha256, staged = batches_when_frozen()
            conn.execute(
                runs.insert(),
                {
                    "run_key": run_key,
                    "manifest_sha256": manifest_sha256,
                    "halt_requested": False,
                    "created_at": now,
                    "next_request_at": 0.0,
                    "next_recipient_at": 0.0,
                },
            )
            if resend_reason is not None:
                conn.execute(run_resends.insert(), {"run_key": run_key, "reason": resend_reason})
            if inputs:
                conn.execute(
                    run_inputs.insert(),
                    [
                        {"run_key": run_key, "path": path, "sha256": digest}
                        for path, digest in sorted(inputs.items())
                    ],
                )
            if staged:  # an empty list would insert one row of defaults, not none
                conn.execute(
                    batches.insert(),
                    [
                        {
                            "run_key": run_key,
                            "batch_id": b.batch_id,
                            "batch_index": b.batch_index,
                            "locale": b.locale,
                            "sha256": b.sha256,
                            "recipients": b.recipients,
                            "state": BatchState.STAGED,
                            "attempts": 0,
                            "updated_at": now,
                        }
                        for b in staged
                    ],
                )
        self._refresh_statistics()

    def _refresh_statistics(self) -> None:
        """PostgreSQL plans every claim with its tables' statistics, which right after a run is
        staged still describe the tables without its recipients: a million of them planned as
        none made each claim take 0.15 s instead of 0.01 s (two shards waiting on each other's
        claims: 150 s of a 1M send) until autovacuum got round to them. Taken again here, once
        per staged run."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.exec_driver_sql(f"ANALYZE {recipients.name}, {batches.name}")

    def manifest_sha256(self, run_key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(runs.c.manifest_sha256).where(runs.c.run_key == run_key)
            ).scalar_one_or_none()

    def staged_inputs(self, run_key: str) -> dict[str, str]:
        """The digests of the files the run was staged from: path in the run folder → SHA-256."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(run_inputs.c.path, run_inputs.c.sha256).where(
                    run_inputs.c.run_key == run_key
                )
            )
            return {path: digest for path, digest in rows}

    def staged_digests(self, run_key: str) -> dict[str, str]:
        """The body digest each batch of the run was staged with: batch id → SHA-256."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(batches.c.batch_id, batches.c.sha256).where(batches.c.run_key == run_key)
            )
            return {batch_id: digest for batch_id, digest in rows}

    # the envelope guard's pass over every request, before the first leaves ------------------
    def mark_guarded(self, run_key: str, cleared: Sequence[tuple[str, str]]) -> None:
        """Record (batch id, body digest) pairs the guard cleared; a digest other than the one
        the batch was staged with records nothing (``unguarded`` still counts that batch)."""
        if not cleared:
            return
        statement = (
            batches.update()
            .where(
                batches.c.run_key == run_key,
                batches.c.batch_id == sa.bindparam("b_id"),
                batches.c.sha256 == sa.bindparam("b_sha"),
            )
            .values(guarded_sha256=sa.bindparam("b_sha"))
        )
        with self.engine.begin() as conn:
            conn.execute(statement, [{"b_id": b, "b_sha": d} for b, d in cleared])

    def unguarded(self, run_key: str) -> int:
        """How many batches of the run the envelope guard has not cleared as staged."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(batches)
                    .where(
                        batches.c.run_key == run_key,
                        sa.or_(
                            batches.c.guarded_sha256.is_(None),
                            batches.c.guarded_sha256 != batches.c.sha256,
                        ),
                    )
                ).scalar_one()
            )

    def guarded_digests(self, run_key: str) -> dict[str, str]:
        """The body digest the envelope guard cleared for each batch of the run, where it is
        the one the batch was staged with: batch id → SHA-256 (``guarded_sha256``)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(batches.c.batch_id, batches.c.guarded_sha256).where(
                    batches.c.run_key == run_key,
                    batches.c.guarded_sha256 == batches.c.sha256,
                )
            )
            return {batch_id: digest for batch_id, digest in rows}

    def refuse(self, run_key: str, batch_id: str, error: str) -> bool:
        """``staged|halted → failed`` without a request: the guard refused the batch's body."""
        return self._move(run_key, batch_id, _SENDABLE, BatchState.FAILED, error=error)

    # sending --------------------------------------------------------------------------------
    def claim(self, run_key: str, batch_id: str) -> bool:
        """``staged|halted → sending``; False when someone else has it or it is done, or when
        the run is halted: a halt recorded before the claim's transaction stops the request,
        however long the shard waited for its rate slot since it last looked (on PostgreSQL
        the run's row is locked, so a halt is ordered before or after each claim).

        Campaign-wide, under the campaign's lock (``_campaign_lock``), in the same transaction:

        - the run becomes its campaign's sending run (``mailroom_campaign_sends``), unless
          another run of the campaign is sending: ``CampaignBusy``, nothing claimed;
        - unless the run was staged with a ``resend_reason``, a batch holding anyone another
          run of the campaign sent to, or left in doubt (``sent``, ``unknown``, ``sending``), is
          ``failed`` without a request and False is returned. Build time already left out
          everyone an earlier run had sent to; this catches a run that sent while this one
          waited for its approval (the approved bytes cannot lose a recipient, so the batch
          goes).
        """
        campaign = campaign_of(run_key)
        now = _now()
        the_batch = (batches.c.run_key == run_key, batches.c.batch_id == batch_id)
        with self.engine.begin() as conn:
            _campaign_lock(conn, campaign)
            sendable = conn.execute(
                sa.select(sa.func.count())
                .select_from(batches)
                .where(*the_batch, batches.c.state.in_(_SENDABLE))
            ).scalar_one()
            if not sendable:  # someone else has it, it is done, or it is no batch of this run
                return False
            halted = conn.execute(
                sa.select(runs.c.halt_requested).where(runs.c.run_key == run_key).with_for_update()
            ).scalar_one_or_none()
            if halted:
                return False
            holder = conn.execute(
                sa.select(campaign_sends.c.run_key).where(campaign_sends.c.campaign == campaign)
            ).scalar_one_or_none()
            if holder is not None and holder != run_key and _still_sending(conn, holder):
                raise CampaignBusy(
                    f"run {holder} of campaign {campaign} is sending; two runs of one campaign "
                    f"never send at the same time: {run_key} sends once it is reconciled (a "
                    f"run that will not send again gives the campaign up when its reconcile "
                    f"task runs: `mailroom halt {holder} --reason …`, then clear its reconcile)"
                )
            if holder != run_key:
                conn.execute(campaign_sends.delete().where(campaign_sends.c.campaign == campaign))
                conn.execute(
                    campaign_sends.insert(),
                    {"campaign": campaign, "run_key": run_key, "since": now},
                )
            resend = conn.execute(
                sa.select(run_resends.c.reason).where(run_resends.c.run_key == run_key)
            ).scalar_one_or_none()
            if resend is None:
                taken = _sent_by_other_runs(conn, run_key, batch_id)
                if taken:
                    _set_state(
                        conn,
                        batches,
                        the_batch,
                        _SENDABLE,
                        BatchState.FAILED,
                        error=f"{taken} recipient(s) of this batch were sent to (or left in "
                        "doubt) by another run of this campaign after this run was built: "
                        "not sent again (trigger a run with resend_to_earlier_recipients and a "
                        "reason to send to them anyway)",
                        now=now,
                    )
                    return False
            changed = _set_state(
                conn, batches, the_batch, _SENDABLE, BatchState.SENDING, count_attempt=True, now=now
            )
            return changed == 1

    def end_sending(self, run_key: str) -> bool:
        """The run gives up its campaign's sending slot (reconcile, once every shard has ended);
        True when it held it. A slot whose run has nothing staged or in flight is free anyway,
        so a run that ended without reconcile holds up its campaign only while it could still
        send."""
        with self.engine.begin() as conn:
            result = conn.execute(
                campaign_sends.delete().where(
                    campaign_sends.c.campaign == campaign_of(run_key),
                    campaign_sends.c.run_key == run_key,
                )
            )
            return bool(result.rowcount)

    def sending_run(self, campaign: str) -> str | None:
        """The run of ``campaign`` holding its sending slot while it can still send, if any."""
        with self.engine.connect() as conn:
            holder = conn.execute(
                sa.select(campaign_sends.c.run_key).where(campaign_sends.c.campaign == campaign)
            ).scalar_one_or_none()
            return holder if holder is not None and _still_sending(conn, holder) else None

    def earlier_outcomes(self, run_key: str) -> Iterator[tuple[str, str, str]]:
        """(address key, state, run key) for everyone the other runs of ``run_key``'s campaign
        sent to or left in doubt: state ``sent``, or ``unknown``/``sending`` (the provider may
        have it). A recipient without a state of its own is in its batch's state (a whole
        request: all of its recipients or none). One address may come from several runs."""
        state = sa.func.coalesce(recipients.c.state, batches.c.state)
        query = (
            sa.select(recipients.c.email_key, state, recipients.c.run_key)
            .join(batches, _same_batch())
            .where(
                _runs_of(recipients.c.run_key, campaign_of(run_key)),
                recipients.c.run_key != run_key,
                state.in_(_TAKEN),
            )
        )
        with self.engine.connect() as conn:
            for email, found, key in conn.execute(query):
                yield str(email), str(found), str(key)

    def finish(
        self,
        run_key: str,
        batch_id: str,
        state: BatchState,
        *,
        message_id: str | None = None,
        error: str | None = None,
    ) -> None:
        """``sending →`` a final state, with the provider's message id or the error."""
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state}")
        if not self._move(
            run_key, batch_id, (BatchState.SENDING,), state, message_id=message_id, error=error
        ):
            raise OutboxConflict(f"batch {batch_id} of {run_key} was not 'sending'")

    def release(self, run_key: str, batch_id: str, error: str) -> None:
        """``sending → staged`` when the request certainly did not leave (e.g. refused connect)."""
        self._move(run_key, batch_id, (BatchState.SENDING,), BatchState.STAGED, error=error)

    def mark_interrupted(self, run_key: str, batch_ids: Sequence[str]) -> int:
        """Batches left ``sending`` by a dead worker may have been accepted: ``unknown``.

        A batch sent one message per recipient is more precise: the message in flight (its
        recipient ``sending``) becomes ``unknown``, the messages recorded ``sent`` stay sent, and
        the batch goes back to ``staged`` so the rest (never handed to the server) are sent.
        Returns how many batches were interrupted.
        """
        now = _now()
        these = (batches.c.run_key == run_key, batches.c.batch_id.in_(batch_ids))
        in_flight = (
            sa.select(batches.c.batch_id)
            .where(*these, batches.c.state == BatchState.SENDING)
            .scalar_subquery()
        )
        per_recipient = (
            sa.select(recipients.c.batch_id)
            .where(
                recipients.c.run_key == run_key,
                recipients.c.batch_id.in_(batch_ids),
                recipients.c.state.is_not(None),
            )
            .scalar_subquery()
        )
        with self.engine.begin() as conn:
            _set_state(
                conn,
                recipients,
                (recipients.c.run_key == run_key, recipients.c.batch_id.in_(in_flight)),
                (BatchState.SENDING,),
                BatchState.UNKNOWN,
                error="interrupted while this message was being sent: "
                "the server may have accepted it",
                now=now,
            )
            resumed = _set_state(
                conn,
                batches,
                (*these, batches.c.batch_id.in_(per_recipient)),
                (BatchState.SENDING,),
                BatchState.STAGED,
                error="interrupted mid-batch: the messages on record are not sent again, the "
                "rest continue",
                now=now,
            )
            unknown = _set_state(
                conn,
                batches,
                these,
                (BatchState.SENDING,),
                BatchState.UNKNOWN,
                error="interrupted while sending: the provider may have accepted it",
                now=now,
            )
            return resumed + unknown

    def halt_remaining(self, run_key: str, batch_ids: Sequence[str]) -> int:
        """``staged → halted`` for these batches, with the run's halt reason."""
        reason = sa.func.coalesce(
            sa.select(runs.c.halt_reason).where(runs.c.run_key == run_key).scalar_subquery(),
            "halted by an operator",
        )
        with self.engine.begin() as conn:
            return _set_state(
                conn,
                batches,
                (batches.c.run_key == run_key, batches.c.batch_id.in_(batch_ids)),
                (BatchState.STAGED,),
                BatchState.HALTED,
                error=reason,
            )

    def requeue(
        self,
        run_key: str,
        states: Sequence[BatchState],
        action: OperatorAction | None = None,
    ) -> int:
        """Operator's explicit choice to send ``unknown``/``failed`` batches again.

        For batches sent one message per recipient, only the recipients in those states are
        sent again (their batch becomes ``staged``; recipients already ``sent`` stay sent).
        Returns how many batches became sendable. ``action``: who chose it and why, recorded
        with the requests, the recipients and the counts before and after (``actions``).
        """
        with self.engine.begin() as conn:
            # Requests the provider's events show it accepted are not sent again.
            self._settle_from_events(conn, run_key)
            before = self._counts(conn, run_key)
            affected = _affected(conn, run_key, states, None)
            moved = _requeue(conn, run_key, states, None)
            if action is not None:
                self._record(conn, run_key, action, affected, before)
            return moved

    def settle(self, run_key: str, batch_ids: Sequence[str], action: OperatorAction) -> int:
        """An operator's decision on ``unknown`` requests after checking the provider: as
        ``sent`` (``Action.SETTLE_SENT``: nothing is sent again) or as not sent
        (``Action.SETTLE_NOT_SENT``: they become sendable, as after ``requeue``). Only the
        ``unknown`` outcomes of these requests change (a message of a per-recipient batch
        recorded ``sent`` or ``failed`` stays so). Recorded with who, when, why, and the counts
        before and after. Returns how many recipients were settled; refuses
        (``NothingToSettle``) a request that is not in the run or has nothing ``unknown``."""
        if action.action not in (Action.SETTLE_SENT, Action.SETTLE_NOT_SENT):
            raise ValueError(f"not a settlement: {action.action}")
        wanted = list(dict.fromkeys(batch_ids))
        if not wanted:
            raise NothingToSettle("name at least one request (batch id) to settle")
        unknown = (BatchState.UNKNOWN,)
        with self.engine.begin() as conn:
            self._settle_from_events(conn, run_key)
            before = self._counts(conn, run_key)
            affected = _affected(conn, run_key, unknown, wanted)
            missing = [b for b in wanted if b not in affected]
            if missing:
                states = dict(
                    conn.execute(
                        sa.select(batches.c.batch_id, batches.c.state).where(
                            batches.c.run_key == run_key, batches.c.batch_id.in_(missing)
                        )
                    ).all()
                )
                raise NothingToSettle(
                    "; ".join(
                        f"{b}: not a request of {run_key}"
                        if b not in states
                        else f"{b}: nothing unknown in it (it is {states[b]})"
                        for b in missing
                    )
                )
            if action.action == Action.SETTLE_NOT_SENT:
                _requeue(conn, run_key, unknown, wanted)
            else:
                note = f"settled as sent by {action.by}: {action.reason}"
                now = _now()
                _set_state(
                    conn,
                    recipients,
                    (recipients.c.run_key == run_key, recipients.c.batch_id.in_(wanted)),
                    unknown,
                    BatchState.SENT,
                    error=note,
                    now=now,
                )
                _set_state(
                    conn,
                    batches,
                    (batches.c.run_key == run_key, batches.c.batch_id.in_(wanted)),
                    unknown,
                    BatchState.SENT,
                    error=note,
                    now=now,
                )
            self._record(conn, run_key, action, affected, before)
            return sum(affected.values())

    def actions(self, run_key: str) -> list[dict[str, Any]]:
        """Every operator action on the run, oldest first (see ``OperatorAction``)."""
        query = (
            sa.select(operator_actions)
            .where(operator_actions.c.run_key == run_key)
            .order_by(operator_actions.c.id)
        )
        with self.engine.connect() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        return [
            {
                "action": row["action"],
                "by": row["by"],
                "reason": row["reason"],
                "at": _aware(row["at"]).isoformat(),
                "requests": json.loads(row["requests"]),
                "recipients": row["recipients"],
                "counts_before": json.loads(row["counts_before"]),
                "counts_after": json.loads(row["counts_after"]),
            }
            for row in rows
        ]

    def _record(
        self,
        conn: sa.Connection,
        run_key: str,
        action: OperatorAction,
        affected: Mapping[str, int],
        before: dict[str, dict[str, int]],
    ) -> None:
        conn.execute(
            operator_actions.insert().values(
                run_key=run_key,
                action=action.action.value,
                by=action.by,
                reason=action.reason,
                at=_now(),
                requests=json.dumps(sorted(affected)),
                recipients=sum(affected.values()),
                counts_before=json.dumps(before, sort_keys=True),
                counts_after=json.dumps(self._counts(conn, run_key), sort_keys=True),
            )
        )

    def request_halt(
        self,
        run_key: str,
        halted: bool = True,
        reason: str | None = None,
        action: OperatorAction | None = None,
    ) -> bool:
        """Ask every shard of a run to stop before its next request (or, with False, resume).
        ``action``: the operator who asked and why, recorded (``actions``)."""
        reason = (reason or "halted by an operator") if halted else None
        with self.engine.begin() as conn:
            before = self._counts(conn, run_key) if action is not None else {}
            result = conn.execute(
                runs.update()
                .where(runs.c.run_key == run_key)
                .values(halt_requested=halted, halt_reason=reason)
            )
            if action is not None and result.rowcount:
                self._record(conn, run_key, action, {}, before)
            return bool(result.rowcount)

    def halt_reason(self, run_key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(runs.c.halt_reason).where(runs.c.run_key == run_key)
            ).scalar_one_or_none()

    def reserve_send_slot(
        self,
        run_key: str,
        requests_per_second: float | None,
        recipients_per_second: float | None,
        recipients: int,
        now: float,
    ) -> float:
        """Take the run's next slot for one request; returns how long to wait before sending.

        One atomic UPDATE … RETURNING on the run's row, so every shard on every worker draws
        from the same budget: the campaign's rate holds for the run, not per shard.
        """
        request_cost = 1.0 / requests_per_second if requests_per_second else 0.0
        recipient_cost = recipients / recipients_per_second if recipients_per_second else 0.0
        next_request = sa.case((runs.c.next_request_at > now, runs.c.next_request_at), else_=now)
        next_recipient = sa.case(
            (runs.c.next_recipient_at > now, runs.c.next_recipient_at), else_=now
        )
        with self.engine.begin() as conn:
            row = conn.execute(
                runs.update()
                .where(runs.c.run_key == run_key)
                .values(
                    next_request_at=next_request + request_cost,
                    next_recipient_at=next_recipient + recipient_cost,
                )
                .returning(runs.c.next_request_at, runs.c.next_recipient_at)
            ).one_or_none()
        if row is None:
            raise OutboxConflict(f"run {run_key} is not staged in the outbox")
        start = max(float(row[0]) - request_cost, float(row[1]) - recipient_cost)
        return max(0.0, start - now)

    def halt_requested(self, run_key: str) -> bool:
        with self.engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.select(runs.c.halt_requested).where(runs.c.run_key == run_key)
                ).scalar_one_or_none()
            )

    # one message per recipient -----------------------------------------------------------------
    def ledger(self, run_key: str, batch_id: str, halt_check_interval: float = 0.0) -> BatchLedger:
        """Where a per-recipient transport records the messages of one claimed batch."""
        return BatchLedger(self, run_key, batch_id, halt_check_interval)

    def mark_recipient(
        self,
        run_key: str,
        batch_id: str,
        email: str,
        state: BatchState | None,
        *,
        message_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        """One recipient's own state, compare-and-set: not yet attempted (NULL) → ``sending``;
        ``sending`` → ``sent | failed | unknown``, or back to NULL (``state=None``) when the
        message certainly did not leave. False when the recipient was not in the state before."""
        before: tuple[BatchState | None, ...]
        if state == BatchState.SENDING:
            before = (None,)
        elif state is None or state in _RECIPIENT_OUTCOMES:
            before = (BatchState.SENDING,)
        else:
            raise ValueError(f"not a recipient state: {state}")
        the_recipient = (
            recipients.c.run_key == run_key,
            recipients.c.batch_id == batch_id,
            recipients.c.email_key == email.lower(),
        )
        with self.engine.begin() as conn:
            changed = _set_state(
                conn, recipients, the_recipient, before, state, message_id=message_id, error=error
            )
            return changed == 1

    def begin_recipients(self, run_key: str, batch_id: str, emails: Sequence[str]) -> set[str]:
        """A chunk of one batch's recipients not yet attempted (NULL) → ``sending``, in one
        transaction (one statement). Returns the lower-cased addresses that moved: only those
        may be sent; one held by anyone else (another worker, an earlier attempt) is not."""
        if not emails:
            return set()
        keys = sorted({e.lower() for e in emails})
        statement = (
            recipients.update()
            .where(
                recipients.c.run_key == run_key,
                recipients.c.batch_id == batch_id,
                recipients.c.email_key.in_(keys),
                recipients.c.state.is_(None),
            )
            .values(state=BatchState.SENDING, updated_at=_now())
            .returning(recipients.c.email_key)
        )
        with self.engine.begin() as conn:
            return {str(k) for k in conn.execute(statement).scalars()}

    def finish_recipients(
        self, run_key: str, batch_id: str, outcomes: Sequence[RecipientOutcome]
    ) -> None:
        """A chunk's outcomes, in one transaction: each recipient ``sending →`` its state
        (``sent | failed | unknown``, with its Message-ID or error), or back to NULL (state
        None) when its message certainly did not leave. Raises ``OutboxConflict`` (once all are
        recorded) when any of them was not ``sending``."""
        if not outcomes:
            return
        for outcome in outcomes:
            if outcome.state is not None and outcome.state not in _RECIPIENT_OUTCOMES:
                raise ValueError(f"not a final recipient state: {outcome.state}")
        statement = (
            recipients.update()
            .where(
                recipients.c.run_key == run_key,
                recipients.c.batch_id == batch_id,
                recipients.c.email_key == sa.bindparam("key"),
                recipients.c.state == BatchState.SENDING,
            )
            .values(
                state=sa.bindparam("new_state"),
                message_id=sa.func.coalesce(sa.bindparam("new_id"), recipients.c.message_id),
                last_error=sa.func.coalesce(sa.bindparam("new_error"), recipients.c.last_error),
                updated_at=sa.bindparam("now"),
            )
        )
        now = _now()
        rows = [
            {
                "key": o.email.lower(),
                "new_state": o.state,
                "new_id": o.message_id,
                "new_error": None if o.error is None else o.error[:2000],
                "now": now,
            }
            for o in outcomes
        ]
        with self.engine.begin() as conn:
            changed = int(conn.execute(statement, rows).rowcount or 0)
        if changed != len(rows):
            raise OutboxConflict(
                f"{len(rows) - changed} recipient(s) of batch {batch_id} were not 'sending'"
            )

    def recipient_outcomes(self, run_key: str, batch_id: str) -> dict[str, BatchState]:
        """Recipients of a batch with a state of their own: address → state."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(recipients.c.email_key, recipients.c.state).where(
                    recipients.c.run_key == run_key,
                    recipients.c.batch_id == batch_id,
                    recipients.c.state.is_not(None),
                )
            )
            return {email: BatchState(state) for email, state in rows}

    def unsent_recipients(self, run_key: str, batch_id: str) -> list[str]:
        """Recipients of a batch whose message was never handed to the server, in address
        order."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(recipients.c.email_key)
                    .where(
                        recipients.c.run_key == run_key,
                        recipients.c.batch_id == batch_id,
                        recipients.c.state.is_(None),
                    )
                    .order_by(recipients.c.email_key)
                ).scalars()
            )

    def recipient_states(self, run_key: str, batch_id: str) -> dict[str, RecipientRecord]:
        """Every recipient of a batch with its own state (None: in the batch's state)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    recipients.c.email_key,
                    recipients.c.batch_id,
                    recipients.c.state,
                    recipients.c.message_id,
                    recipients.c.last_error,
                ).where(recipients.c.run_key == run_key, recipients.c.batch_id == batch_id)
            )
            return {
                email: RecipientRecord(
                    email, batch, None if state is None else BatchState(state), message_id, error
                )
                for email, batch, state, message_id, error in rows
            }

    # reading --------------------------------------------------------------------------------
    def states(
        self, run_key: str, batch_ids: Sequence[str] | None = None
    ) -> dict[str, BatchRecord]:
        query = sa.select(batches).where(batches.c.run_key == run_key)
        if batch_ids is not None:
            query = query.where(batches.c.batch_id.in_(batch_ids))
        with self.engine.connect() as conn:
            return {
                row.batch_id: BatchRecord(
                    row.batch_id,
                    BatchState(row.state),
                    row.attempts,
                    row.message_id,
                    row.last_error,
                )
                for row in conn.execute(query)
            }

    def batch_members(self, run_key: str, batch_id: str) -> dict[str, str | None]:
        """Who a batch is for: address → the digest of that recipient's own values."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(recipients.c.email_key, recipients.c.values_sha256).where(
                    recipients.c.run_key == run_key, recipients.c.batch_id == batch_id
                )
            )
            return {email: digest for email, digest in rows}

    def counts(self, run_key: str) -> dict[str, dict[str, int]]:
        """Per state (its value, a plain string): how many batches and recipients."""
        with self.engine.connect() as conn:
            return self._counts(conn, run_key)

    def _counts(self, conn: sa.Connection, run_key: str) -> dict[str, dict[str, int]]:
        query = (
            sa.select(
                batches.c.state,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(batches.c.recipients), 0),
            )
            .where(batches.c.run_key == run_key)
            .group_by(batches.c.state)
        )
        # Recipients with a state of their own that differs from their batch's.
        own = (
            sa.select(batches.c.state, recipients.c.state, sa.func.count())
            .select_from(recipients.join(batches, _same_batch()))
            .where(
                recipients.c.run_key == run_key,
                recipients.c.state.is_not(None),
                recipients.c.state != batches.c.state,
            )
            .group_by(batches.c.state, recipients.c.state)
        )
        out = {s.value: {"batches": 0, "recipients": 0} for s in BatchState}
        for state, n, people in conn.execute(query):
            out[state] = {"batches": int(n), "recipients": int(people)}
        for batch_state, own_state, n in conn.execute(own):
            out[batch_state]["recipients"] -= int(n)
            out[own_state]["recipients"] += int(n)
        return out

    def batch_progress(self, run_key: str) -> list[BatchProgress]:
        """Every batch of the run, in order, with its recipients per state: two queries, one
        over the batches and one over the recipients with a state of their own in batches not
        ``sent`` (a batch ends ``sent`` only when each of its recipients is; the partial index
        ``ix_mailroom_recipients_own_state`` holds only such recipients), so it reads no row of
        a recipient who is simply in their batch's state."""
        batch_rows = sa.select(
            batches.c.batch_id,
            batches.c.batch_index,
            batches.c.locale,
            batches.c.state,
            batches.c.recipients,
            batches.c.updated_at,
        ).where(batches.c.run_key == run_key)
        with self.engine.connect() as conn:
            rows = conn.execute(batch_rows).all()
            # The batches by name, not a subquery: PostgreSQL then looks each one up in the
            # partial index rather than scanning every recipient of the run.
            unsent = [row.batch_id for row in rows if row.state != BatchState.SENT]
            deviations: list[Any] = []
            for start in range(0, len(unsent), 1000):
                own = (
                    sa.select(recipients.c.batch_id, recipients.c.state, sa.func.count())
                    .where(
                        recipients.c.run_key == run_key,
                        recipients.c.batch_id.in_(unsent[start : start + 1000]),
                        recipients.c.state.is_not(None),
                    )
                    .group_by(recipients.c.batch_id, recipients.c.state)
                )
                deviations.extend(conn.execute(own).all())
        out = {
            row.batch_id: BatchProgress(
                row.batch_id,
                int(row.batch_index),
                row.locale,
                BatchState(row.state),
                int(row.recipients),
                _aware(row.updated_at),
                {row.state: int(row.recipients)},
            )
            for row in rows
        }
        for batch_id, state, n in deviations:
            entry = out.get(batch_id)
            if entry is None or state == entry.state:
                continue
            entry.per_state[entry.state.value] -= int(n)
            entry.per_state[state] = entry.per_state.get(state, 0) + int(n)
        return sorted(out.values(), key=lambda b: b.batch_index)

    def not_sent(
        self, run_key: str, batch_ids: Sequence[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every recipient not ``sent`` (of these batches only, when given), with the state and
        error: its own where it has one (a batch sent one message per recipient), else its
        batch's."""
        state = sa.func.coalesce(recipients.c.state, batches.c.state)
        error = sa.case(
            (recipients.c.state.is_(None), batches.c.last_error), else_=recipients.c.last_error
        )
        query = (
            sa.select(
                recipients.c.user_id,
                recipients.c.email_key,
                batches.c.batch_id,
                state.label("state"),
                error.label("last_error"),
            )
            .join(batches, _same_batch())
            .where(recipients.c.run_key == run_key, state != BatchState.SENT)
            .order_by(batches.c.batch_index, recipients.c.email_key)
        )
        if batch_ids is not None:
            query = query.where(recipients.c.batch_id.in_(batch_ids))
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                yield dict(row._mapping)

    # suppressions ---------------------------------------------------------------------------
    def suppress(self, entries: Iterable[Suppression]) -> int:
        """Put ``entries`` on the suppression list, in one transaction; returns how many were
        new. A person already on it (in any spelling: by address key), or given twice, keeps
        the first record: adding them again changes nothing and is not an error, so an import
        or a provider's event may be replayed.

        An entry that is not one address (``addresses.suppression_address``, as the extract
        reads a campaign's suppressions) is refused with ``SuppressionRefused`` naming its row
        and masked value, never guessed at, and nothing of ``entries`` is added."""
        now = _now()
        added = 0
        rows = iter(enumerate(entries, start=1))
        with self.engine.begin() as conn:
            while chunk := list(islice(rows, _SUPPRESS_CHUNK)):
                values: dict[str, dict[str, Any]] = {}
                for row, entry in chunk:
                    address, key = listed_address(entry.email, row)
                    values.setdefault(
                        key,
                        {
                            "email_key": key,
                            "email": address,
                            "reason": entry.reason.strip(),
                            "source": entry.source.strip(),
                            "detail": entry.detail or None,
                            "created_at": _aware(entry.created_at or now),
                            "created_by": entry.created_by.strip() if entry.created_by else None,
                        },
                    )
                added += _insert_new_suppressions(conn, list(values.values()))
        return added

    def unsuppress(self, emails: Iterable[str], *, by: str, why: str) -> int:
        """Take these people off the suppression list (each by address key, in any spelling),
        in one transaction, recording who did it, why, and the record taken off
        (``suppression_removals``); returns how many were on it. An entry that is not one
        address is refused as ``suppress`` refuses it, and nobody is taken off."""
        _require_line("who removes it", by, _BY_CHARS)
        if not isinstance(why, str) or not why.strip():
            raise ValueError("taking someone off the suppression list needs a reason")
        keys = sorted({listed_address(email, row)[1] for row, email in enumerate(emails, start=1)})
        now = _now()
        removed = 0
        with self.engine.begin() as conn:
            for chunk in _chunks(keys, 1000):
                gone = conn.execute(
                    sa.select(
                        suppressions.c.email_key, suppressions.c.reason, suppressions.c.source
                    ).where(suppressions.c.email_key.in_(chunk))
                ).all()
                if not gone:
                    continue
                conn.execute(
                    suppressions.delete().where(
                        suppressions.c.email_key.in_([key for key, _, _ in gone])
                    )
                )
                conn.execute(
                    suppression_removals.insert(),
                    [
                        {
                            "email_key": key,
                            "reason": reason,
                            "source": source,
                            "removed_by": by.strip(),
                            "why": why.strip(),
                            "removed_at": now,
                        }
                        for key, reason, source in gone
                    ],
                )
                removed += len(gone)
        return removed

    def suppression_removals(self, email: str) -> list[dict[str, Any]]:
        """Every time ``email`` (in any spelling) was taken off the suppression list, oldest
        first: the reason and source it had, who removed it, why and when."""
        _, key = listed_address(email)
        query = (
            sa.select(suppression_removals)
            .where(suppression_removals.c.email_key == key)
            .order_by(suppression_removals.c.id)
        )
        with self.engine.connect() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        return [
            {
                "reason": row["reason"],
                "source": row["source"],
                "removed_by": row["removed_by"],
                "why": row["why"],
                "removed_at": _aware(row["removed_at"]),
            }
            for row in rows
        ]

    def suppression(self, email: str) -> Suppression | None:
        """The suppression list's record of ``email`` (by address key: in any spelling), or
        None; ``SuppressionRefused`` when it is not one address."""
        _, key = listed_address(email)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(suppressions).where(suppressions.c.email_key == key)
            ).one_or_none()
        return None if row is None else _suppression_of(row)

    def suppressions(self) -> Iterator[Suppression]:
        """Everyone on the suppression list, by address key."""
        query = sa.select(suppressions).order_by(suppressions.c.email_key)
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True, yield_per=10_000).execute(query):
                yield _suppression_of(row)

    def suppressed_keys(self) -> dict[str, str]:
        """The suppression list as the extract applies it: address key → reason."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(suppressions.c.email_key, suppressions.c.reason))
            return {key: reason for key, reason in rows}

    # provider events -------------------------------------------------------------------------
    def record_delivery_events(
        self, events: Sequence[DeliveryEvent], *, soft_bounce_limit: int = 3
    ) -> EventsRecorded:
        """Keep a webhook body's events and act on the new ones, in one transaction: either all
        of it is on record (and the provider may be answered 2xx) or none of it.

        An event already kept (by its event id: providers retry, and repeat themselves) changes
        nothing. Each new one is matched to the recipient it is about: by the run and request
        its custom args name, else by its request's message id, and then by address within that
        request. A new event then puts its address on the suppression list when it says so
        (``DeliveryEvent.suppression_reason``), counts a soft bounce in a row (a delivery sets
        the count back; at ``soft_bounce_limit`` in a row the address is suppressed as
        ``soft_bounced``), and settles the requests left ``unknown`` that the provider shows it
        accepted (``SETTLE_BY_EVENTS``, in the run's history)."""
        if soft_bounce_limit < 1:
            raise ValueError("soft_bounce_limit must be at least 1")
        unique = list({e.event_id: e for e in reversed(events)}.values())[::-1]
        now = _now()
        with _one_body_at_a_time(self.engine), self.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            where = _match_events(conn, unique)
            # In event id order: two bodies holding the same events (a retry posted while the
            # first is still being kept) take their rows' locks in the same order.
            rows = []
            for e in sorted(unique, key=_event_id):
                found = where.get(e.event_id)
                outcome = e.outcome if found is not None else None
                rows.append(
                    (
                        e.event_id,
                        PROVIDER,
                        e.event,
                        outcome.value if outcome is not None else None,
                        e.email_key,
                        *(found if found is not None else (None, None, None)),
                        e.message_id,
                        e.reason,
                        e.occurred_at,
                        now,
                    )
                )
            kept = _insert_new_events(conn, rows)
            new = [e for e in unique if e.event_id in kept]
            suppress: dict[str, dict[str, Any]] = {}
            for e in new:
                reason = e.suppression_reason
                if reason and e.email_key:
                    suppress.setdefault(e.email_key, _provider_suppression(e, reason, now))
            for e, reason in _count_soft_bounces(conn, new, soft_bounce_limit, now):
                suppress.setdefault(e.email_key or "", _provider_suppression(e, reason, now))
            suppressed = _insert_new_suppressions(conn, [suppress[key] for key in sorted(suppress)])
            proven = sorted(
                {where[e.event_id][0] for e in new if e.proves_acceptance and e.event_id in where}
            )
            settled = sum(self._settle_from_events(conn, run_key) for run_key in proven)
        return EventsRecorded(
            received=len(events),
            new=len(new),
            matched=sum(1 for e in new if e.event_id in where),
            suppressed=suppressed,
            settled_requests=settled,
        )

    def _settle_from_events(self, conn: sa.Connection, run_key: str) -> int:
        """Settle as sent the run's ``unknown`` requests the provider's events show it accepted
        (``processed``, ``delivered``, ``dropped``, ``bounce`` for any of their recipients: a
        request is taken whole or not at all), recorded as ``SETTLE_BY_EVENTS``; how many."""
        # Almost always none: the run's few batch rows say so before its events are read.
        unknown = (
            conn.execute(
                sa.select(batches.c.batch_id).where(
                    batches.c.run_key == run_key, batches.c.state == BatchState.UNKNOWN
                )
            )
            .scalars()
            .all()
        )
        if not unknown:
            return 0
        query = (
            sa.select(
                delivery_events.c.batch_id,
                sa.func.count(sa.distinct(delivery_events.c.email_key)),
                sa.func.min(delivery_events.c.message_id),
            )
            .select_from(delivery_events.join(batches, _event_of_batch()))
            .where(
                delivery_events.c.run_key == run_key,
                delivery_events.c.batch_id.in_(sorted(unknown)),
                delivery_events.c.event.in_(sorted(_ACCEPTANCE_EVENTS)),
                batches.c.state == BatchState.UNKNOWN,
            )
            .group_by(delivery_events.c.batch_id)
        )
        proven = {str(b): (int(n), m) for b, n, m in conn.execute(query)}
        if not proven:
            return 0
        before = self._counts(conn, run_key)
        affected = _affected(conn, run_key, (BatchState.UNKNOWN,), sorted(proven))
        now = _now()
        for batch_id, (shown, message_id) in proven.items():
            note = (
                f"settled as sent: {PROVIDER} reported it accepted the request "
                f"({shown} recipient(s) with events)"
            )
            _set_state(
                conn,
                recipients,
                (recipients.c.run_key == run_key, recipients.c.batch_id == batch_id),
                (BatchState.UNKNOWN,),
                BatchState.SENT,
                error=note,
                now=now,
            )
            _set_state(
                conn,
                batches,
                (batches.c.run_key == run_key, batches.c.batch_id == batch_id),
                (BatchState.UNKNOWN,),
                BatchState.SENT,
                message_id=message_id,
                error=note,
                now=now,
            )
        total = sum(n for n, _ in proven.values())
        reason = (
            f"{PROVIDER} events show it accepted {len(proven)} request(s) left unknown "
            f"({total} recipient(s) with events): they are not sent again"
        )
        self._record(
            conn,
            run_key,
            OperatorAction(Action.SETTLE_BY_EVENTS, f"{PROVIDER} events", reason),
            affected,
            before,
        )
        log.info("%s: %s", run_key, reason)
        return len(proven)

    def delivery_feedback(self, run_key: str) -> dict[str, dict[str, int]]:
        """What the provider reported for the run's recipients, per locale: how many recipients
        each ``delivery_events.Outcome`` (every outcome present, 0 when none; a recipient
        delivered who then complained counts in both)."""
        query = (
            sa.select(
                delivery_events.c.locale,
                delivery_events.c.outcome,
                sa.func.count(sa.distinct(delivery_events.c.email_key)),
            )
            .where(delivery_events.c.run_key == run_key, delivery_events.c.outcome.is_not(None))
            .group_by(delivery_events.c.locale, delivery_events.c.outcome)
        )
        with self.engine.connect() as conn:
            found = conn.execute(query).all()
        feedback: dict[str, dict[str, int]] = {}
        for locale, outcome, n in found:
            feedback.setdefault(str(locale), dict.fromkeys(OUTCOMES, 0))[str(outcome)] = int(n)
        return {locale: feedback[locale] for locale in sorted(feedback)}

    def not_delivered(self, run_key: str, *, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The run's recipients the provider bounced or dropped after accepting their request,
        in request order: ``user_id``, ``email_key``, ``batch_id``, ``state`` (``bounced`` or
        ``dropped``: the outcome of their latest such event) and the provider's ``reason`` (or
        None). Only recipients the outbox holds as ``sent``: anyone else is listed by their own
        state already (``not_sent``)."""
        ev = delivery_events
        latest = (
            sa.select(
                ev.c.email_key,
                ev.c.outcome,
                ev.c.reason,
                sa.func.row_number()
                .over(
                    partition_by=ev.c.email_key,
                    order_by=(ev.c.occurred_at.desc(), ev.c.event_id.desc()),
                )
                .label("n"),
            )
            .where(ev.c.run_key == run_key, ev.c.outcome.in_(NOT_DELIVERED))
            .subquery()
        )
        state = sa.func.coalesce(recipients.c.state, batches.c.state)
        query = (
            sa.select(
                recipients.c.user_id,
                recipients.c.email_key,
                batches.c.batch_id,
                latest.c.outcome.label("state"),
                latest.c.reason,
            )
            .select_from(
                latest.join(
                    recipients,
                    sa.and_(
                        recipients.c.run_key == run_key,
                        recipients.c.email_key == latest.c.email_key,
                    ),
                ).join(batches, _same_batch())
            )
            .where(latest.c.n == 1, state == BatchState.SENT)
            .order_by(batches.c.batch_index, recipients.c.email_key)
        )
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                yield dict(row._mapping)

    def unsubscribed_address(self, campaign: str, user_id: str) -> str | None:
        """The address key the campaign's newest run to stage ``user_id`` sent to (the mailbox
        their unsubscribe link came to); ``None`` when no run of it staged them."""
        with self.engine.connect() as conn:
            found = _newest_recipient(conn, campaign, user_id)
        return None if found is None else found.email_key

    def record_unsubscribe(self, campaign: str, user_id: str) -> str | None:
        """A one-click unsubscribe from ``campaign``'s link for ``user_id``, in one transaction:
        the address its newest run sent them to goes on the suppression list (``unsubscribed``,
        source ``one_click``; someone already on it keeps their record), and that run counts
        them as unsubscribed in its locale (``delivery_feedback``), once however often they
        click. Returns the run's key; ``None`` (and nothing recorded) when no run of the
        campaign staged the user."""
        now = _now()
        with self.engine.begin() as conn:
            found = _newest_recipient(conn, campaign, user_id)
            if found is None:
                return None
            digest = hashlib.sha256(f"{found.run_key}\0{found.email_key}".encode()).hexdigest()
            _insert_new_events(
                conn,
                [
                    (
                        f"{ONE_CLICK}:{digest[:40]}",
                        ONE_CLICK,
                        "unsubscribe",
                        "unsubscribed",
                        found.email_key,
                        found.run_key,
                        found.batch_id,
                        found.locale,
                        None,
                        None,
                        now,
                        now,
                    )
                ],
            )
            _insert_new_suppressions(
                conn,
                [
                    {
                        "email_key": found.email_key,
                        "email": found.email_key,
                        "reason": "unsubscribed",
                        "source": ONE_CLICK,
                        "detail": f"one-click unsubscribe from {found.run_key}",
                        "created_at": now,
                        "created_by": None,
                    }
                ],
            )
        return str(found.run_key)

    def _move(
        self,
        run_key: str,
        batch_id: str,
        from_states: Sequence[BatchState],
        to_state: BatchState,
        *,
        count_attempt: bool = False,
        message_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        """One batch's compare-and-set, in a transaction of its own."""
        the_batch = (batches.c.run_key == run_key, batches.c.batch_id == batch_id)
        with self.engine.begin() as conn:
            changed = _set_state(
                conn,
                batches,
                the_batch,
                from_states,
                to_state,
                message_id=message_id,
                error=error,
                count_attempt=count_attempt,
            )
            return changed == 1


class BatchLedger:
    """The outbox as a ``RecipientLedger`` for one claimed batch (see transports.base)."""

    def __init__(
        self, outbox: Outbox, run_key: str, batch_id: str, halt_check_interval: float = 0.0
    ) -> None:
        self.outbox, self.run_key, self.batch_id = outbox, run_key, batch_id
        self.halt_check_interval = halt_check_interval
        self._halt_checked: float | None = None

    def settled(self) -> dict[str, BatchState]:
        return self.outbox.recipient_outcomes(self.run_key, self.batch_id)

    def begin(self, emails: Sequence[str]) -> set[str]:
        return self.outbox.begin_recipients(self.run_key, self.batch_id, emails)

    def finish(self, outcomes: Sequence[RecipientOutcome]) -> None:
        self.outbox.finish_recipients(self.run_key, self.batch_id, outcomes)

    def stop_reason(self) -> str | None:
        now = time.monotonic()
        if self._halt_checked is not None and now - self._halt_checked < self.halt_check_interval:
            return None
        self._halt_checked = now
        if not self.outbox.halt_requested(self.run_key):
            return None
        return self.outbox.halt_reason(self.run_key) or "halted by an operator"


def _affected(
    conn: sa.Connection,
    run_key: str,
    states: Sequence[BatchState],
    batch_ids: Sequence[str] | None,
) -> dict[str, int]:
    """batch id → how many of its recipients are in ``states`` (their own state where they have
    one, else their batch's), for the run's batches (or only ``batch_ids``) holding any."""
    state = sa.func.coalesce(recipients.c.state, batches.c.state)
    where = [recipients.c.run_key == run_key, state.in_(states)]
    if batch_ids is not None:
        where.append(batches.c.batch_id.in_(batch_ids))
    query = (
        sa.select(batches.c.batch_id, sa.func.count())
        .select_from(recipients.join(batches, _same_batch()))
        .where(*where)
        .group_by(batches.c.batch_id)
    )
    return {str(b): int(n) for b, n in conn.execute(query)}


def _requeue(
    conn: sa.Connection,
    run_key: str,
    states: Sequence[BatchState],
    batch_ids: Sequence[str] | None,
) -> int:
    """``Outbox.requeue`` in ``conn``: batches (all of the run's, or only ``batch_ids``) in
    ``states``, or holding recipients in them, become ``staged``; those recipients go back to
    their batch's state. Returns how many batches moved."""
    now = _now()
    this_run: tuple[sa.ColumnElement[bool], ...] = (batches.c.run_key == run_key,)
    if batch_ids is not None:
        this_run += (batches.c.batch_id.in_(batch_ids),)
    with_such_recipients = (
        sa.select(recipients.c.batch_id)
        .where(recipients.c.run_key == run_key, recipients.c.state.in_(states))
        .scalar_subquery()
    )
    staged = (
        sa.select(batches.c.batch_id)
        .where(*this_run, batches.c.state == BatchState.STAGED)
        .scalar_subquery()
    )
    moved = _set_state(conn, batches, this_run, states, BatchState.STAGED, now=now)
    # A batch that ended otherwise but holds recipients in those states.
    moved += _set_state(
        conn,
        batches,
        (*this_run, batches.c.batch_id.in_(with_such_recipients)),
        (BatchState.FAILED, BatchState.UNKNOWN, BatchState.HALTED),
        BatchState.STAGED,
        now=now,
    )
    _set_state(
        conn,
        recipients,
        (recipients.c.run_key == run_key, recipients.c.batch_id.in_(staged)),
        states,
        None,
        now=now,
    )
    return moved


@dataclass(frozen=True)
class EventsRecorded:
    """What ``record_delivery_events`` did with a webhook body: events in it, new ones (the
    rest were kept before), new ones matched to a recipient of a run, addresses newly
    suppressed, and ``unknown`` requests settled as sent."""

    received: int
    new: int
    matched: int
    suppressed: int
    settled_requests: int


_ACCEPTANCE_EVENTS = frozenset({"processed", "delivered", "dropped", "bounce"})
# Events inserted per statement (each of 12 columns: well within SQLite's 32,766 variables).
_EVENTS_CHUNK = 1000
# A ``delivery_events`` row as ``record_delivery_events`` makes it: a tuple in this order.
_EVENT_COLUMNS = (
    "event_id",
    "provider",
    "event",
    "outcome",
    "email_key",
    "run_key",
    "batch_id",
    "locale",
    "message_id",
    "reason",
    "occurred_at",
    "received_at",
)
# Addresses looked up per statement when events are matched to recipients.
_MATCH_CHUNK = 1000


def _event_id(e: DeliveryEvent) -> str:
    return e.event_id


# SQLite takes one writer at a time, and one that finds the database locked sleeps and tries
# again (for up to its timeout, in growing steps): the service's threads keeping bodies at the
# same time queue here instead, each starting as soon as the one before commits.
_BODY_LOCKS: weakref.WeakKeyDictionary[sa.Engine, threading.Lock] = weakref.WeakKeyDictionary()
_BODY_LOCKS_GUARD = threading.Lock()


def _one_body_at_a_time(engine: sa.Engine) -> AbstractContextManager[Any]:
    """The lock ``record_delivery_events`` holds around its transaction on SQLite (one per
    engine: per outbox in this process); nothing elsewhere."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _BODY_LOCKS_GUARD:
        lock = _BODY_LOCKS.get(engine)
        if lock is None:
            lock = _BODY_LOCKS[engine] = threading.Lock()
    return lock


def _event_of_batch() -> Any:
    return sa.and_(
        batches.c.run_key == delivery_events.c.run_key,
        batches.c.batch_id == delivery_events.c.batch_id,
    )


# The outcomes after which the recipient did not get the message (``not_delivered``).
NOT_DELIVERED = ("bounced", "dropped")
# Where a one-click unsubscribe came from, as the suppression list and the events record it.
ONE_CLICK = "one_click"


def _newest_recipient(conn: sa.Connection, campaign: str, user_id: str) -> Any:
    """(run key, address key, batch id, locale) of ``user_id`` in the newest run of
    ``campaign`` that staged them (by the index of recipients by user id), or None."""
    query = (
        sa.select(
            recipients.c.run_key, recipients.c.email_key, recipients.c.batch_id, batches.c.locale
        )
        .select_from(
            recipients.join(runs, runs.c.run_key == recipients.c.run_key).join(
                batches, _same_batch()
            )
        )
        .where(recipients.c.user_id == user_id, _runs_of(recipients.c.run_key, campaign))
        .order_by(runs.c.created_at.desc(), recipients.c.run_key.desc())
        .limit(1)
    )
    return conn.execute(query).first()


def _match_events(
    conn: sa.Connection, events: Sequence[DeliveryEvent]
) -> dict[str, tuple[str, str, str]]:
    """event id → (run key, batch id, locale) of the events about a recipient of a request in
    this outbox: the request their custom args name (else the one with their message id), and
    their address among its recipients."""
    named: set[tuple[str, str]] = set()
    message_ids: set[str] = set()
    for e in events:
        run_key = e.run_key
        if run_key and e.batch_id:
            named.add((run_key, e.batch_id))
        elif e.message_id:
            message_ids.add(e.message_id)
    locale_of: dict[tuple[str, str], str] = {}
    by_message_id: dict[str, tuple[str, str]] = {}
    for chunk in _chunks(sorted(named)):
        query = sa.select(batches.c.run_key, batches.c.batch_id, batches.c.locale).where(
            sa.tuple_(batches.c.run_key, batches.c.batch_id).in_(chunk)
        )
        for run_key, batch_id, locale in conn.execute(query):
            locale_of[(run_key, batch_id)] = locale
    for chunk in _chunks(sorted(message_ids)):
        with_ids = sa.select(
            batches.c.run_key, batches.c.batch_id, batches.c.locale, batches.c.message_id
        ).where(batches.c.message_id.in_(chunk))
        for row in conn.execute(with_ids):
            locale_of[(row.run_key, row.batch_id)] = row.locale
            by_message_id[row.message_id] = (row.run_key, row.batch_id)
    if not locale_of:
        return {}
    candidates: dict[str, tuple[str, str, str]] = {}  # event id -> run key, batch id, address
    addresses: dict[str, set[str]] = {}  # run key -> the addresses to look up in it
    for e in events:
        run_key = e.run_key
        if run_key and e.batch_id:
            request: tuple[str, str] | None = (run_key, e.batch_id)
        else:
            request = by_message_id.get(e.message_id or "")
        if request is not None and request in locale_of and e.email_key:
            candidates[e.event_id] = (request[0], request[1], e.email_key)
            addresses.setdefault(request[0], set()).add(e.email_key)
    # By run: the recipients' primary key (run key, address) with one run key and a list of
    # addresses, which every database answers from that index (a list of (run key, address)
    # pairs PostgreSQL may plan as a scan of the run's recipients).
    batch_of: dict[tuple[str, str], str] = {}
    for run_key in sorted(addresses):
        for chunk in _chunks(sorted(addresses[run_key]), _MATCH_CHUNK):
            members = sa.select(recipients.c.email_key, recipients.c.batch_id).where(
                recipients.c.run_key == run_key, recipients.c.email_key.in_(chunk)
            )
            for email_key, batch_id in conn.execute(members):
                batch_of[(run_key, email_key)] = batch_id
    return {
        event_id: (run_key, batch_id, locale_of[(run_key, batch_id)])
        for event_id, (run_key, batch_id, key) in candidates.items()
        if batch_of.get((run_key, key)) == batch_id
    }


def _chunks(items: list[Any], size: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _insert_new_events(conn: sa.Connection, rows: list[tuple[Any, ...]]) -> set[str]:
    """Insert the event rows (tuples in ``_EVENT_COLUMNS`` order) whose event id is not kept
    yet; the ids of those inserted. Written for the driver, not through SQLAlchemy's
    ``insert()``, which spends more time on a thousand rows' parameters than the database
    spends storing them: on PostgreSQL through psycopg2 the rows are copied (``COPY``) into a
    temporary table of the session and inserted from there, elsewhere on SQLite and PostgreSQL
    one ``INSERT … ON CONFLICT DO NOTHING RETURNING`` of up to ``_EVENTS_CHUNK`` rows; other
    databases are asked which ids they hold first."""
    kept: set[str] = set()
    dialect = conn.dialect
    marks = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
    if not rows:
        return kept
    if dialect.name == "postgresql" and dialect.driver == "psycopg2":
        return _copy_new_events(conn, rows)
    if dialect.name in {"sqlite", "postgresql"} and marks is not None:
        as_stored = [_bind_processor(delivery_events.c[name], dialect) for name in _EVENT_COLUMNS]
        row_marks = "(" + ", ".join([marks] * len(_EVENT_COLUMNS)) + ")"
        for start in range(0, len(rows), _EVENTS_CHUNK):
            chunk = rows[start : start + _EVENTS_CHUNK]
            columns: list[Any] = list(zip(*chunk, strict=True))
            for i, process in enumerate(as_stored):
                if process is not None:  # once per distinct value: a body's times repeat
                    stored = {value: process(value) for value in set(columns[i])}
                    columns[i] = [stored[value] for value in columns[i]]
            params = tuple(value for row in zip(*columns, strict=True) for value in row)
            statement = (
                f"INSERT INTO {delivery_events.name} ({', '.join(_EVENT_COLUMNS)}) "
                f"VALUES {', '.join([row_marks] * len(chunk))} "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            )
            kept.update(conn.exec_driver_sql(statement, params).scalars())
        return kept
    for start in range(0, len(rows), _EVENTS_CHUNK):
        given = [
            dict(zip(_EVENT_COLUMNS, r, strict=True)) for r in rows[start : start + _EVENTS_CHUNK]
        ]
        present = set(
            conn.execute(
                sa.select(delivery_events.c.event_id).where(
                    delivery_events.c.event_id.in_([r["event_id"] for r in given])
                )
            ).scalars()
        )
        new = [r for r in given if r["event_id"] not in present]
        if new:
            conn.execute(delivery_events.insert(), new)
        kept.update(r["event_id"] for r in new)
    return kept


# The session's temporary table ``_copy_new_events`` copies a body's events into; emptied at
# the end of every transaction that used it.
_EVENTS_IN = "mailroom_delivery_events_in"


def _copy_new_events(conn: sa.Connection, rows: list[tuple[Any, ...]]) -> set[str]:
    """``_insert_new_events`` on PostgreSQL through psycopg2: the rows copied into the session's
    temporary table (``COPY … FROM STDIN``, text format), then ``INSERT … SELECT … ON CONFLICT
    DO NOTHING RETURNING`` in event id order."""
    columns = ", ".join(_EVENT_COLUMNS)
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {_EVENTS_IN} "
        f"(LIKE {delivery_events.name}) ON COMMIT DELETE ROWS"
    )
    statement = f"COPY {_EVENTS_IN} ({columns}) FROM STDIN"
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(statement, io.StringIO(_copy_text(rows)))
    except dbapi.Error as exc:
        # As SQLAlchemy raises it for an INSERT: callers handle one kind of error.
        raise sa.exc.DBAPIError.instance(statement, None, exc, dbapi.Error) from exc
    finally:
        cursor.close()
    inserted = conn.exec_driver_sql(
        f"INSERT INTO {delivery_events.name} ({columns}) SELECT {columns} FROM {_EVENTS_IN} "
        "ORDER BY event_id ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )
    return set(inserted.scalars())


def _copy_text(rows: list[tuple[Any, ...]]) -> str:
    r"""Rows in ``COPY``'s text format: tab-separated, ``\N`` for None, ``str()`` of the rest
    (a datetime as PostgreSQL reads it). Values are written as they are when none of them holds
    a backslash, tab or line break (the counts of those in the whole text show it: events'
    texts are single printable lines); otherwise every value is escaped."""
    text: dict[Any, str] = {None: "\\N"}

    def as_text(value: Any) -> str:
        found = text.get(value)
        if found is None:
            found = text[value] = str(value)
        return found

    lines = ["\t".join([v if type(v) is str else as_text(v) for v in row]) for row in rows]
    plain = "\n".join(lines) + "\n"
    width = len(rows[0]) if rows else 0
    if (
        plain.count("\t") == (width - 1) * len(rows)
        and plain.count("\n") == len(rows)
        and "\r" not in plain
        and plain.count("\\") == sum(row.count(None) for row in rows)
    ):
        return plain
    return "".join(
        "\t".join(
            "\\N"
            if v is None
            else str(v)
            .replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            for v in row
        )
        + "\n"
        for row in rows
    )


def _bind_processor(column: sa.Column[Any], dialect: sa.Dialect) -> Callable[[Any], Any] | None:
    """What SQLAlchemy does to a value of ``column`` before it goes to the driver (SQLite keeps
    a datetime as text in SQLAlchemy's own format), so a statement written for the driver stores
    what SQLAlchemy's would."""
    return column.type.dialect_impl(dialect).bind_processor(dialect)


def _count_soft_bounces(
    conn: sa.Connection, events: Sequence[DeliveryEvent], limit: int, now: datetime
) -> list[tuple[DeliveryEvent, str]]:
    """Count the soft bounces in a row of each address of ``events`` (in the order they
    happened; a delivery sets the count back to 0); the (last soft bounce, reason) of each
    address that reached ``limit``.

    SQLite and PostgreSQL do it in one upsert (of up to ``_EVENTS_CHUNK`` addresses) written
    for the driver, ``RETURNING`` the count it left: an address a delivery set back gets the
    soft bounces since, the others add theirs to the count kept. Another body's events for the
    same address, kept at the same time, wait for the row rather than fail. Other databases
    are asked for the counts first, then written a row at a time."""
    story: dict[str, list[DeliveryEvent]] = {}
    for e in sorted(events, key=lambda e: (e.occurred_at, e.event_id)):
        if e.email_key and (e.soft_bounce or e.event == "delivered"):
            story.setdefault(e.email_key, []).append(e)
    if not story:
        return []
    keys = sorted(story)
    # address -> (set back by a delivery, soft bounces since, the last soft bounce)
    told: dict[str, tuple[bool, int, DeliveryEvent | None]] = {}
    for key in keys:
        reset, n = False, 0
        last: DeliveryEvent | None = None
        for e in story[key]:
            if e.event == "delivered":
                reset, n = True, 0
            else:
                n += 1
            last = e if e.soft_bounce else last
        told[key] = (reset, n, last)
    dialect = conn.dialect
    marks = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
    counts: dict[str, int] = {}
    if dialect.name in {"sqlite", "postgresql"} and marks is not None:
        as_stored = _bind_processor(soft_bounces.c.updated_at, dialect)
        updated_at = as_stored(now) if as_stored is not None else now
        table = soft_bounces.name
        # One statement for every address, in key order (two bodies kept at the same time take
        # their rows in one order): the count is what the body says, plus what was kept for
        # the addresses no delivery set back.
        rows = [
            (key, n, last.reason if last else None, updated_at)
            for key, (_, n, last) in told.items()
        ]
        for start in range(0, len(rows), _EVENTS_CHUNK):
            chunk = rows[start : start + _EVENTS_CHUNK]
            adding = [key for key, *_ in chunk if not told[key][0]]
            in_a_row = "excluded.in_a_row"
            if adding:
                in_a_row += (
                    f" + CASE WHEN excluded.email_key IN ({', '.join([marks] * len(adding))}) "
                    f"THEN {table}.in_a_row ELSE 0 END"
                )
            statement = (
                f"INSERT INTO {table} (email_key, in_a_row, last_reason, updated_at) "
                f"VALUES {', '.join([f'({marks}, {marks}, {marks}, {marks})'] * len(chunk))} "
                f"ON CONFLICT (email_key) DO UPDATE SET in_a_row = {in_a_row}, "
                "last_reason = excluded.last_reason, updated_at = excluded.updated_at "
                "RETURNING email_key, in_a_row"
            )
            params = (*(value for row in chunk for value in row), *adding)
            counts.update({k: int(n) for k, n in conn.exec_driver_sql(statement, params)})
    else:
        had: dict[str, int] = {}
        for start in range(0, len(keys), 500):
            query = sa.select(soft_bounces.c.email_key, soft_bounces.c.in_a_row).where(
                soft_bounces.c.email_key.in_(keys[start : start + 500])
            )
            had.update({k: int(n) for k, n in conn.execute(query)})
        for key, (reset, n, last) in told.items():
            counts[key] = n if reset else had.get(key, 0) + n
            values = {
                "in_a_row": counts[key],
                "last_reason": last.reason if last else None,
                "updated_at": now,
            }
            if key not in had:
                conn.execute(soft_bounces.insert().values(email_key=key, **values))
            else:
                conn.execute(
                    soft_bounces.update().where(soft_bounces.c.email_key == key).values(**values)
                )
    reached: list[tuple[DeliveryEvent, str]] = []
    for key, (_, _, last) in told.items():
        if counts[key] >= limit and last is not None:
            reached.append((last, "soft_bounced"))
    return reached


def _provider_suppression(e: DeliveryEvent, reason: str, now: datetime) -> dict[str, Any]:
    detail = f"{e.event}" + (f": {e.reason}" if e.reason else "")
    return {
        "email_key": e.email_key,
        "email": e.email_key,
        "reason": reason,
        "source": PROVIDER,
        "detail": detail[:1000],
        "created_at": now,
        "created_by": None,
    }


def _insert_new_suppressions(conn: sa.Connection, rows: list[dict[str, Any]]) -> int:
    """Insert the suppression rows whose address key is not on the list yet; returns how many.
    SQLite and PostgreSQL skip the others in the INSERT itself (``ON CONFLICT DO NOTHING``: a
    concurrent writer of the same person is not an error either); other databases are asked
    first."""
    if not rows:
        return 0
    name = conn.dialect.name
    if name in {"sqlite", "postgresql"}:
        from sqlalchemy.dialects import postgresql, sqlite

        insert = sqlite.insert if name == "sqlite" else postgresql.insert
        statement = (
            insert(suppressions)
            .on_conflict_do_nothing(index_elements=[suppressions.c.email_key])
            .returning(suppressions.c.email_key)
        )
        return len(conn.execute(statement, rows).all())
    present: set[str] = set()
    keys = [r["email_key"] for r in rows]
    for start in range(0, len(keys), 1000):
        present.update(
            conn.execute(
                sa.select(suppressions.c.email_key).where(
                    suppressions.c.email_key.in_(keys[start : start + 1000])
                )
            ).scalars()
        )
    new = [r for r in rows if r["email_key"] not in present]
    if new:
        conn.execute(suppressions.insert(), new)
    return len(new)


def _suppression_of(row: Any) -> Suppression:
    return Suppression(
        email=row.email,
        reason=row.reason,
        source=row.source,
        detail=row.detail,
        created_by=row.created_by,
        created_at=_aware(row.created_at),
    )


def _aware(moment: datetime) -> datetime:
    """SQLite gives a stored datetime back without its zone; every one stored is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _same_batch() -> Any:
    return sa.and_(
        batches.c.run_key == recipients.c.run_key, batches.c.batch_id == recipients.c.batch_id
    )


# Where a batch may be claimed (or refused) from.
_SENDABLE = (BatchState.STAGED, BatchState.HALTED)
# A recipient another run of the campaign sent to, or may have: never sent again unasked.
_TAKEN = (BatchState.SENT, BatchState.UNKNOWN, BatchState.SENDING)


def _runs_of(run_key: sa.ColumnElement[str], campaign: str) -> sa.ColumnElement[bool]:
    """Run keys of ``campaign`` (a LIKE on the prefix, ``_`` and ``%`` escaped)."""
    return run_key.startswith(f"{campaign}/", autoescape=True)


def _still_sending(conn: sa.Connection, run_key: str) -> bool:
    """The run has a batch staged or in flight and has not been halted for good: it may still
    send (a halted run's staged batches become ``halted`` at its shards' next look)."""
    return bool(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(batches)
            .where(
                batches.c.run_key == run_key,
                batches.c.state.in_((BatchState.STAGED, BatchState.SENDING)),
            )
        ).scalar_one()
    )


def _sent_by_other_runs(conn: sa.Connection, run_key: str, batch_id: str) -> int:
    """How many recipients of a batch another run of the campaign sent to or left in doubt."""
    return int(
        conn.execute(
            _sent_by_other_runs_query(),
            {
                "run_key": run_key,
                "batch_id": batch_id,
                "runs_of_campaign": _like_prefix(f"{campaign_of(run_key)}/"),
            },
        ).scalar_one()
    )


@lru_cache(maxsize=1)
def _sent_by_other_runs_query() -> sa.Select[int]:
    """``_sent_by_other_runs``'s query, built once (every claim asks it)."""
    mine = recipients.alias("mine")
    other = recipients.alias("other")
    other_batch = batches.alias("other_batch")
    state = sa.func.coalesce(other.c.state, other_batch.c.state)
    return (
        sa.select(sa.func.count(sa.distinct(mine.c.email_key)))
        .select_from(
            mine.join(other, other.c.email_key == mine.c.email_key).join(
                other_batch,
                sa.and_(
                    other_batch.c.run_key == other.c.run_key,
                    other_batch.c.batch_id == other.c.batch_id,
                ),
            )
        )
        .where(
            mine.c.run_key == sa.bindparam("run_key"),
            mine.c.batch_id == sa.bindparam("batch_id"),
            other.c.run_key != sa.bindparam("run_key"),
            other.c.run_key.like(sa.bindparam("runs_of_campaign"), escape=_LIKE_ESCAPE),
            state.in_(_TAKEN),
        )
    )


_LIKE_ESCAPE = "/"


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern for text starting with ``prefix`` (its ``%``, ``_`` and the escape
    character escaped, as ``startswith(…, autoescape=True)`` escapes them)."""
    for special in (_LIKE_ESCAPE, "%", "_"):
        prefix = prefix.replace(special, _LIKE_ESCAPE + special)
    return prefix + "%"


def _campaign_lock(conn: sa.Connection, campaign: str) -> None:
    """Begin ``conn``'s transaction holding its campaign's lock: claims of any run of one
    campaign take turns (PostgreSQL: a transaction-level advisory lock on the campaign's name;
    SQLite: the database's write lock, which every writer shares anyway)."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(
            hashlib.sha256(f"mailroom campaign {campaign}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _set_state(
    conn: sa.Connection,
    table: sa.Table,
    where: Sequence[sa.ColumnElement[bool]],
    from_states: Sequence[BatchState | None],
    to_state: BatchState | None,
    *,
    message_id: str | None = None,
    error: str | sa.ColumnElement[Any] | None = None,
    count_attempt: bool = False,
    now: datetime | None = None,
) -> int:
    """The compare-and-set every change of state is, for batch and recipient rows alike:
    ``UPDATE table SET state = to_state, updated_at [, message_id, last_error, attempts + 1]
    WHERE <where> AND state IN (from_states)`` (None: a recipient without a state of its own).
    Returns how many rows changed; the rows in another state are left alone."""
    known = [s for s in from_states if s is not None]
    was = [table.c.state.in_(known)] if known else []
    if None in from_states:
        was.append(table.c.state.is_(None))
    values: dict[str, Any] = {"state": to_state, "updated_at": now or _now()}
    if message_id is not None:
        values["message_id"] = message_id
    if error is not None:
        values["last_error"] = error[:2000] if isinstance(error, str) else error
    if count_attempt:
        values["attempts"] = table.c.attempts + 1
    result = conn.execute(table.update().where(*where, sa.or_(*was)).values(**values))
    return int(result.rowcount or 0)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # Switching a new database to WAL needs it to itself, and SQLite answers "database is
        # locked" at once, without waiting, while another task's connection is doing the same:
        # wait and look again (a database already in WAL answers at once).
        for attempt in range(_WAL_ATTEMPTS):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except dbapi_connection.OperationalError as exc:
                if "locked" not in str(exc).lower() or attempt == _WAL_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


_WAL_ATTEMPTS = 40  # about 40 s of waiting in all
