"""The outbox's tables as the last release before versioned migrations made them.

Revision ID: 0001
Revises: (none: the first revision)

On an empty database: ``mailroom_runs``, ``mailroom_batches`` and ``mailroom_recipients`` with
the index of a batch's recipients. On an outbox of an earlier release (these tables, no version
table) it creates only what is missing, and adds in place the columns that releases after the
first added when they opened an outbox (the first release had none of them): the rows already
there take NULL, or 0.0 for the rate limiter's two NOT NULL columns, as those releases gave them.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

INDEX = ("ix_mailroom_recipients_batch", "mailroom_recipients", ["run_key", "batch_id"])
# Columns added by releases after the first, in place, on an outbox they opened.
ADDED_AFTER_THE_FIRST_RELEASE = {
    "mailroom_runs": {"halt_reason", "next_request_at", "next_recipient_at"},
    "mailroom_batches": {"guarded_sha256"},
    "mailroom_recipients": {"values_sha256", "state", "message_id", "last_error", "updated_at"},
}


def tables() -> dict[str, list[sa.Column[Any]]]:
    """Each table's columns, new objects on every call (a column belongs to one table)."""
    return {
        "mailroom_runs": [
            sa.Column("run_key", sa.String(250), primary_key=True),
            sa.Column("manifest_sha256", sa.String(64), nullable=False),
            sa.Column("halt_requested", sa.Boolean, nullable=False),
            sa.Column("halt_reason", sa.Text),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("next_request_at", sa.Float, nullable=False),
            sa.Column("next_recipient_at", sa.Float, nullable=False),
        ],
        "mailroom_batches": [
            sa.Column("run_key", sa.String(250), primary_key=True),
            sa.Column("batch_id", sa.String(64), primary_key=True),
            sa.Column("batch_index", sa.Integer, nullable=False),
            sa.Column("locale", sa.String(16), nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("recipients", sa.Integer, nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("message_id", sa.String(128)),
            sa.Column("last_error", sa.Text),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("guarded_sha256", sa.String(64)),
        ],
        "mailroom_recipients": [
            sa.Column("run_key", sa.String(250), primary_key=True),
            sa.Column("email_key", sa.String(320), primary_key=True),
            sa.Column("user_id", sa.String(128), nullable=False),
            sa.Column("batch_id", sa.String(64), nullable=False),
            sa.Column("values_sha256", sa.String(64)),
            sa.Column("state", sa.String(16)),
            sa.Column("message_id", sa.String(255)),
            sa.Column("last_error", sa.Text),
            sa.Column("updated_at", sa.DateTime(timezone=True)),
        ],
    }


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names())
    for name, columns in tables().items():
        if name not in existing:
            op.create_table(name, *columns)
            continue
        have = {c["name"] for c in inspector.get_columns(name)}
        for column in columns:
            if column.name in have:
                continue
            if column.name not in ADDED_AFTER_THE_FIRST_RELEASE[name]:
                raise RuntimeError(
                    f"table {name} has no column {column.name}, which every release of the "
                    "outbox had: not an outbox this revision can upgrade"
                )
            if not column.nullable:
                # Only the rate limiter's next free slots (0.0: free now), as those releases
                # added them: existing rows need a value.
                column = sa.Column(
                    column.name, column.type, nullable=False, server_default=sa.text("0.0")
                )
            op.add_column(name, column)
    index_name, table_name, index_columns = INDEX
    if index_name not in {i["name"] for i in inspector.get_indexes(table_name)}:
        op.create_index(index_name, table_name, index_columns)


def downgrade() -> None:
    """Drops the outbox, rows and all."""
    for name in reversed(tables()):
        op.drop_table(name)
