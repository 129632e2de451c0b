"""What the provider reports after a send, who an unsubscribe link was for, and who took
someone off the suppression list.

Revision ID: 0007
Revises: 0006

- ``mailroom_delivery_events``: one row per provider event (SendGrid's Event Webhook), keyed by
  the provider's event id so a retried event is kept once, with the run, request, locale and
  address key it was matched to (NULL when it is no recipient's of this outbox), its outcome
  (delivered, bounced, dropped, complained, unsubscribed) and the provider's reason;
- ``mailroom_soft_bounces``: soft bounces in a row per address key;
- ``mailroom_suppression_removals``: who took someone off the suppression list, when, why, and
  the reason and source the record had;
- indexes: recipients by user id (a one-click unsubscribe names the user), batches by message id
  (an event without the run's custom args names its request's ``X-Message-Id``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "mailroom_delivery_events",
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
    )
    op.create_index(
        "ix_mailroom_delivery_events_run",
        "mailroom_delivery_events",
        ["run_key", "outcome", "locale"],
    )
    op.create_index(
        "ix_mailroom_delivery_events_recipient",
        "mailroom_delivery_events",
        ["run_key", "email_key"],
    )
    op.create_table(
        "mailroom_soft_bounces",
        sa.Column("email_key", sa.String(320), primary_key=True),
        sa.Column("in_a_row", sa.Integer, nullable=False),
        sa.Column("last_reason", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "mailroom_suppression_removals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("removed_by", sa.String(250), nullable=False),
        sa.Column("why", sa.Text, nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_mailroom_suppression_removals_email",
        "mailroom_suppression_removals",
        ["email_key", "id"],
    )
    op.create_index("ix_mailroom_recipients_user", "mailroom_recipients", ["user_id", "run_key"])
    op.create_index("ix_mailroom_batches_message_id", "mailroom_batches", ["message_id"])


def downgrade() -> None:
    op.drop_index("ix_mailroom_batches_message_id", table_name="mailroom_batches")
    op.drop_index("ix_mailroom_recipients_user", table_name="mailroom_recipients")
    op.drop_table("mailroom_suppression_removals")
    op.drop_table("mailroom_soft_bounces")
    op.drop_table("mailroom_delivery_events")
