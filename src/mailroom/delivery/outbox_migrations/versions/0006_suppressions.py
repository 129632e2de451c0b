"""The suppression list: who no campaign may send to.

Revision ID: 0006
Revises: 0005

``mailroom_suppressions``: one row per mailbox, keyed by its address key
(``addresses.address_key``, the one comparison key, so two spellings of one mailbox are one
row), with the address as it was given (for operators), why (``reason``: unsubscribed, bounced,
spam_report, manual…), where it came from (``source``: cli, import…), an optional detail, when
and by whom. Every campaign's ``extract_audience`` leaves these people out, beside the
campaign's own suppression source; ``mailroom suppressions`` keeps the list.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "mailroom_suppressions",
        sa.Column("email_key", sa.String(320), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(250)),
    )


def downgrade() -> None:
    op.drop_table("mailroom_suppressions")
