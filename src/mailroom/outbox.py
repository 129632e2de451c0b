"""The outbox: every batch's state and every recipient's batch, in a real SQL database.

Batch states: ``staged → sending → sent | failed | unknown | halted``. Each change is a
compare-and-set UPDATE in its own transaction, so two shards (or a retried shard) can never both
send one batch, and a batch left ``sending`` by a killed worker becomes ``unknown`` rather than
being sent again. Recipients are keyed by (run, address): the database itself refuses an address
in two batches of one run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import sqlalchemy as sa

log = logging.getLogger(__name__)

STAGED, SENDING, SENT, FAILED, UNKNOWN, HALTED = (
    "staged",
    "sending",
    "sent",
    "failed",
    "unknown",
    "halted",
)
FINAL_STATES = (SENT, FAILED, UNKNOWN, HALTED)
ALL_STATES = (STAGED, SENDING, *FINAL_STATES)

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
)
recipients = sa.Table(
    "mailroom_recipients",
    metadata,
    sa.Column("run_key", sa.String(250), primary_key=True),
    sa.Column("email_key", sa.String(320), primary_key=True),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("values_sha256", sa.String(64)),
    sa.Index("ix_mailroom_recipients_batch", "run_key", "batch_id"),
)


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
class BatchState:
    batch_id: str
    state: str
    attempts: int
    message_id: str | None
    last_error: str | None


class OutboxConflict(Exception):
    """The run is already past staging, or its staged batches differ from these."""


def _now() -> datetime:
    return datetime.now(UTC)


class Outbox:
    def __init__(self, url: str) -> None:
        self.url = url
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            connect_args = {"timeout": 60}
        self.engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # staging --------------------------------------------------------------------------------
    def stage(
        self,
        run_key: str,
        manifest_sha256: str,
        staged: Sequence[StagedBatch],
        members: Iterable[Member | tuple[str, str, str]],
    ) -> None:
        """Register a run's batches and (email, user_id, batch_id) members, all ``staged``.

        Re-staging a run is allowed only while nothing of it has been sent; it replaces the old
        rows, so a re-run of the freeze task cannot leave stale batches behind.
        """
        now = _now()
        with self.engine.begin() as conn:
            started = conn.execute(
                sa.select(sa.func.count())
                .select_from(batches)
                .where(batches.c.run_key == run_key, batches.c.state != STAGED)
            ).scalar_one()
            if started:
                raise OutboxConflict(
                    f"run {run_key} already has {started} batch(es) past 'staged': not re-staging"
                )
            for table in (recipients, batches, runs):
                conn.execute(table.delete().where(table.c.run_key == run_key))
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
                            "state": STAGED,
                            "attempts": 0,
                            "updated_at": now,
                        }
                        for b in staged
                    ],
                )
            chunk: list[dict[str, str | None]] = []
            for member in members:
                m = member if isinstance(member, Member) else Member(*member)
                chunk.append(
                    {
                        "run_key": run_key,
                        "email_key": m.email.lower(),
                        "user_id": m.user_id,
                        "batch_id": m.batch_id,
                        "values_sha256": m.values_sha256,
                    }
                )
                if len(chunk) >= 20_000:
                    conn.execute(recipients.insert(), chunk)
                    chunk = []
            if chunk:
                conn.execute(recipients.insert(), chunk)

    def manifest_sha256(self, run_key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(runs.c.manifest_sha256).where(runs.c.run_key == run_key)
            ).scalar_one_or_none()

    # sending --------------------------------------------------------------------------------
    def claim(self, run_key: str, batch_id: str) -> bool:
        """``staged|halted → sending``; False when someone else has it or it is done."""
        return self._move(run_key, batch_id, (STAGED, HALTED), SENDING, attempts=True)

    def finish(
        self,
        run_key: str,
        batch_id: str,
        state: str,
        *,
        message_id: str | None = None,
        error: str | None = None,
    ) -> None:
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state}")
        if not self._move(run_key, batch_id, (SENDING,), state, message_id=message_id, error=error):
            raise OutboxConflict(f"batch {batch_id} of {run_key} was not 'sending'")

    def release(self, run_key: str, batch_id: str, error: str) -> None:
        """``sending → staged`` when the request certainly did not leave (e.g. refused connect)."""
        self._move(run_key, batch_id, (SENDING,), STAGED, error=error)

    def mark_interrupted(self, run_key: str, batch_ids: Sequence[str]) -> int:
        """Batches left ``sending`` by a dead worker may have been accepted: ``unknown``."""
        with self.engine.begin() as conn:
            result = conn.execute(
                batches.update()
                .where(
                    batches.c.run_key == run_key,
                    batches.c.batch_id.in_(batch_ids),
                    batches.c.state == SENDING,
                )
                .values(
                    state=UNKNOWN,
                    updated_at=_now(),
                    last_error="interrupted while sending: the provider may have accepted it",
                )
            )
            return int(result.rowcount or 0)

    def halt_remaining(self, run_key: str, batch_ids: Sequence[str]) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(
                batches.update()
                .where(
                    batches.c.run_key == run_key,
                    batches.c.batch_id.in_(batch_ids),
                    batches.c.state == STAGED,
                )
                .values(
                    state=HALTED,
                    updated_at=_now(),
                    last_error=sa.func.coalesce(
                        sa.select(runs.c.halt_reason)
                        .where(runs.c.run_key == run_key)
                        .scalar_subquery(),
                        "halted by an operator",
                    ),
                )
            )
            return int(result.rowcount or 0)

    def requeue(self, run_key: str, states: Sequence[str]) -> int:
        """Operator's explicit choice to send ``unknown``/``failed`` batches again."""
        with self.engine.begin() as conn:
            result = conn.execute(
                batches.update()
                .where(batches.c.run_key == run_key, batches.c.state.in_(states))
                .values(state=STAGED, updated_at=_now())
            )
            return int(result.rowcount or 0)

    def request_halt(self, run_key: str, halted: bool = True, reason: str | None = None) -> bool:
        """Ask every shard of a run to stop before its next request (or, with False, resume)."""
        reason = (reason or "halted by an operator") if halted else None
        with self.engine.begin() as conn:
            result = conn.execute(
                runs.update()
                .where(runs.c.run_key == run_key)
                .values(halt_requested=halted, halt_reason=reason)
            )
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

    # reading --------------------------------------------------------------------------------
    def states(self, run_key: str, batch_ids: Sequence[str] | None = None) -> dict[str, BatchState]:
        query = sa.select(batches).where(batches.c.run_key == run_key)
        if batch_ids is not None:
            query = query.where(batches.c.batch_id.in_(batch_ids))
        with self.engine.connect() as conn:
            return {
                row.batch_id: BatchState(
                    row.batch_id, row.state, row.attempts, row.message_id, row.last_error
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
        """Per state: how many batches and recipients."""
        query = (
            sa.select(
                batches.c.state,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(batches.c.recipients), 0),
            )
            .where(batches.c.run_key == run_key)
            .group_by(batches.c.state)
        )
        out = {s: {"batches": 0, "recipients": 0} for s in ALL_STATES}
        with self.engine.connect() as conn:
            for state, n, people in conn.execute(query):
                out[state] = {"batches": int(n), "recipients": int(people)}
        return out

    def not_sent(self, run_key: str) -> Iterator[dict[str, Any]]:
        """Every recipient whose batch did not end ``sent``, with the batch's state and error."""
        query = (
            sa.select(
                recipients.c.user_id,
                recipients.c.email_key,
                batches.c.batch_id,
                batches.c.state,
                batches.c.last_error,
            )
            .join(
                batches,
                sa.and_(
                    batches.c.run_key == recipients.c.run_key,
                    batches.c.batch_id == recipients.c.batch_id,
                ),
            )
            .where(recipients.c.run_key == run_key, batches.c.state != SENT)
            .order_by(batches.c.batch_index)
        )
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                yield dict(row._mapping)

    def _move(
        self,
        run_key: str,
        batch_id: str,
        from_states: Sequence[str],
        to_state: str,
        *,
        attempts: bool = False,
        message_id: str | None = None,
        error: str | None = None,
    ) -> bool:
        values: dict[str, Any] = {"state": to_state, "updated_at": _now()}
        if attempts:
            values["attempts"] = batches.c.attempts + 1
        if message_id is not None:
            values["message_id"] = message_id
        if error is not None:
            values["last_error"] = error[:2000]
        with self.engine.begin() as conn:
            result = conn.execute(
                batches.update()
                .where(
                    batches.c.run_key == run_key,
                    batches.c.batch_id == batch_id,
                    batches.c.state.in_(from_states),
                )
                .values(**values)
            )
            return result.rowcount == 1


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
