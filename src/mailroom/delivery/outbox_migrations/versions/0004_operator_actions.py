"""What operators did to a run after it was staged, and why.

Revision ID: 0004
Revises: 0003

``mailroom_operator_actions``: one row per operator decision on a run's outbox (settling
``unknown`` requests as sent or not sent after checking the provider, resending, halting,
resuming): who, when, why, which requests and how many recipients, and the run's counts per
state just before and just after, taken in the same transaction as the change. The report lists
them as the run's history, so a run that ends "sent, balanced" still says how it got there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "mailroom_operator_actions",
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


def downgrade() -> None:
    op.drop_table("mailroom_operator_actions")
