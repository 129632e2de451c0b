"""Outcomes per campaign and address, across runs, and one sending run per campaign.

Revision ID: 0003
Revises: 0002

- ``ix_mailroom_recipients_email`` on ``mailroom_recipients (email_key, run_key)``: the rows the
  outbox already keeps for every run are the record of who a campaign sent to (a run key is
  ``<campaign>/<run id>``); this index answers "did an earlier run of this campaign send to
  this address, or leave it in doubt" from them, for one batch at claim time and for a whole
  audience at build time, without a second copy of every outcome to keep in step.
- ``mailroom_run_resends``: the reason given when a run was triggered to send again to people
  an earlier run of its campaign sent to (no row: it was not, as no run before this revision
  was). A table of its own rather than a column of ``mailroom_runs``: SQLite would keep an
  added column's DDL text apart from the tables' own, and most runs have no reason.
- ``mailroom_campaign_sends``: which run of a campaign is sending (one row per campaign), taken
  when a run claims its first batch and given up when the run is reconciled.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_mailroom_recipients_email", "mailroom_recipients", ["email_key", "run_key"])
    op.create_table(
        "mailroom_run_resends",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_table(
        "mailroom_campaign_sends",
        sa.Column("campaign", sa.String(64), primary_key=True),
        sa.Column("run_key", sa.String(250), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mailroom_campaign_sends")
    op.drop_table("mailroom_run_resends")
    op.drop_index("ix_mailroom_recipients_email", "mailroom_recipients")
