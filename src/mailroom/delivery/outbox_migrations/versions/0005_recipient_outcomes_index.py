"""An index of the recipients that have a state of their own.

Revision ID: 0005
Revises: 0004

Only recipients of a batch sent one message per recipient (SMTP) get a state of their own; the
others keep NULL and are in their batch's state. The run's counts (``Outbox.counts``) and the
console's progress (``Outbox.batch_progress``) look only for the recipients with a state, so a
partial index of exactly those rows (``state IS NOT NULL``) answers them without reading the
rows of a run sent in whole requests: at a million recipients that read took most of a second.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index(
        "ix_mailroom_recipients_own_state",
        "mailroom_recipients",
        ["run_key", "batch_id", "state"],
        sqlite_where=sa.text("state IS NOT NULL"),
        postgresql_where=sa.text("state IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_mailroom_recipients_own_state", table_name="mailroom_recipients")
