"""The digests of the inputs a run was staged from.

Revision ID: 0002
Revises: 0001

``mailroom_run_inputs``: one row per file of the run folder that the gate and the envelope guard
rebuild each request from (the campaign spec's copy, each locale's rendered content, the
validated audience), with its SHA-256 as it was when the run was staged. A run folder rewritten
after staging is then told apart from the one approved, whichever layer reads it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "mailroom_run_inputs",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("path", sa.String(250), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mailroom_run_inputs")
