"""Outbox databases as releases before versioned migrations left them, for the upgrade tests.

Copied, not imported: the tables of the last such release (git 30c0195, src/mailroom/outbox.py,
created on open by ``metadata.create_all``) and what that release did on opening an outbox of an
earlier one (``_add_missing_columns``: the columns added since the first release, by ALTER
TABLE). The first release (9a53a99) had the same tables without those columns. Never change these
to follow the outbox: they are what is out there.
"""

from __future__ import annotations

import sqlalchemy as sa

# ``_ADDED_COLUMNS`` of the previous release.
ADDED_COLUMNS = {
    "mailroom_runs": ("halt_reason", "next_request_at", "next_recipient_at"),
    "mailroom_batches": ("guarded_sha256",),
    "mailroom_recipients": (
        "values_sha256",
        "state",
        "message_id",
        "last_error",
        "updated_at",
    ),
}
# How a database was made: by the previous release; by the first; by the first, then opened by
# the previous (which added its columns in place).
RELEASES = ("previous", "first", "first, then opened by the previous")


def previous_release_metadata(*, first_release: bool = False) -> sa.MetaData:
    """The previous release's tables; ``first_release``: without ``ADDED_COLUMNS``, as the first
    release made them (it had the index already)."""
    metadata = sa.MetaData()

    def table(name: str, *items: sa.Column[object] | sa.Index) -> None:
        dropped = ADDED_COLUMNS[name] if first_release else ()
        kept = [i for i in items if not (isinstance(i, sa.Column) and i.name in dropped)]
        sa.Table(name, metadata, *kept)

    table(
        "mailroom_runs",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("halt_requested", sa.Boolean, nullable=False, default=False),
        sa.Column("halt_reason", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_request_at", sa.Float, nullable=False, default=0.0),
        sa.Column("next_recipient_at", sa.Float, nullable=False, default=0.0),
    )
    table(
        "mailroom_batches",
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
        sa.Column("guarded_sha256", sa.String(64)),
    )
    table(
        "mailroom_recipients",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("email_key", sa.String(320), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("values_sha256", sa.String(64)),
        sa.Column("state", sa.String(16)),
        sa.Column("message_id", sa.String(255)),
        sa.Column("last_error", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
        sa.Index("ix_mailroom_recipients_batch", "run_key", "batch_id"),
    )
    return metadata


def create(url: str, release: str) -> sa.MetaData:
    """Make the outbox tables at ``url`` as ``release`` (one of ``RELEASES``) left them; returns
    the tables as that release knew them (to put rows in)."""
    engine = sa.create_engine(url)
    try:
        if release == "previous":
            metadata = previous_release_metadata()
            metadata.create_all(engine)
            return metadata
        metadata = previous_release_metadata(first_release=True)
        metadata.create_all(engine)
        if release == "first":
            return metadata
        assert release == "first, then opened by the previous", release
        _add_missing_columns(engine)
        return previous_release_metadata()
    finally:
        engine.dispose()


def _add_missing_columns(engine: sa.Engine) -> None:
    """The previous release's in-place upgrade, as it ran (without its race handling)."""
    later = previous_release_metadata()
    inspector = sa.inspect(engine)
    for table_name, names in ADDED_COLUMNS.items():
        have = {c["name"] for c in inspector.get_columns(table_name)}
        for name in names:
            if name in have:
                continue
            column = later.tables[table_name].c[name]
            ddl = (
                f"ALTER TABLE {table_name} ADD COLUMN {name} "
                f"{column.type.compile(dialect=engine.dialect)}"
            )
            default = getattr(column.default, "arg", None)
            if isinstance(default, int | float):
                ddl += f" DEFAULT {default!r}"
                if not column.nullable:
                    ddl += " NOT NULL"
            with engine.begin() as conn:
                conn.execute(sa.text(ddl))
