"""Everything Mailroom reads from Airflow: connections, variables and folders.

Called only inside running tasks, never while a DAG file is parsed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import Connection, Variable

from mailroom.errors import MailroomError, ValidationFailed
from mailroom.run import ProjectPaths
from mailroom.staging import is_url, local_path

if TYPE_CHECKING:
    from mailroom.campaign_spec import CampaignSpec
    from mailroom.delivery.transports.base import Transport
    from mailroom.staging_store import RunStore

REPO_ROOT = Path(__file__).resolve().parents[2]
SENDGRID_DEFAULT_HOST = "https://api.sendgrid.com"


def project_paths() -> ProjectPaths:
    return ProjectPaths.under(Path(os.environ.get("MAILROOM_INCLUDE_DIR", REPO_ROOT / "include")))


STAGING_CONNECTION = "mailroom_staging"


def staging_root() -> str:
    """A local folder, or an object-storage URL (``s3://bucket/prefix``) every worker reaches."""
    default = os.environ.get("MAILROOM_STAGING_ROOT") or str(
        Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "mailroom" / "staging"
    )
    return str(Variable.get("mailroom_staging_root", default=default))


def run_store(location: str) -> RunStore:
    """A run folder; on object storage with the credentials of connection ``mailroom_staging``
    (login = access key id, password = secret key, extra = further fsspec storage options such as
    ``{"endpoint_url": "http://minio:9000"}``), or without it the filesystem's own defaults
    (for S3 the standard AWS variables, profile or instance role)."""
    from mailroom.staging_store import RunStore

    if not is_url(location):
        return RunStore(location)
    try:
        conn = _connection(STAGING_CONNECTION)
    except _MissingConnection:
        return RunStore(location)
    options = {k: v for k, v in (conn.extra_dejson or {}).items() if v not in (None, "")}
    if conn.login:
        options["key"] = conn.login
    if conn.password:
        options["secret"] = conn.password
    return RunStore(location, storage_options=options)


def sql_url(conn_id: str) -> str:
    """A SQLAlchemy URL for a database connection (extra ``sqlalchemy_url`` wins)."""
    conn = _connection(conn_id)
    extra = conn.extra_dejson or {}
    if extra.get("sqlalchemy_url"):
        return str(extra["sqlalchemy_url"])
    kind = (conn.conn_type or "").lower()
    if kind == "sqlite":
        return f"sqlite:///{conn.host}"
    if kind in {"postgres", "postgresql"}:
        auth = ""
        if conn.login:
            auth = quote(conn.login, safe="")
            if conn.password:
                auth += ":" + quote(conn.password, safe="")
            auth += "@"
        port = f":{conn.port}" if conn.port else ""
        return f"postgresql+psycopg2://{auth}{conn.host}{port}/{conn.schema or ''}"
    raise MailroomError(
        f"connection {conn_id!r} has type {kind!r}; "
        "use sqlite, postgres, or set extra.sqlalchemy_url"
    )


def outbox_url() -> str:
    """The outbox database: connection ``mailroom_outbox`` if defined, else SQLite in staging."""
    try:
        return sql_url("mailroom_outbox")
    except _MissingConnection:
        root = staging_root()
        if is_url(root):
            raise MailroomError(
                "the staging root is on object storage, so workers may run on different hosts: "
                "define the Airflow connection 'mailroom_outbox' (PostgreSQL) for the outbox; "
                "a SQLite file cannot be shared between them"
            ) from None
        path = local_path(root) / "outbox.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"


def unsubscribe_secret() -> bytes:
    """The secret new unsubscribe links are signed with: the first of the Variable's list, in
    the format of ``MAILROOM_UNSUBSCRIBE_SECRETS`` (newest first, separated by commas or line
    breaks), so the same list can be pasted into both; the older ones only verify."""
    from mailroom.unsubscribe import UnsubscribeKeys

    secret = Variable.get("mailroom_unsubscribe_secret", default=None)
    if not secret or not str(secret).strip():
        raise MailroomError(
            "Airflow Variable 'mailroom_unsubscribe_secret' is not set: it signs unsubscribe links"
        )
    try:
        return UnsubscribeKeys.parse(str(secret)).newest
    except ValidationFailed as exc:
        raise MailroomError(f"Airflow Variable 'mailroom_unsubscribe_secret': {exc}") from None


def resolve(spec: CampaignSpec, *, dry_run: bool) -> None:
    """Everything a run of ``spec`` will read from Airflow, read once in ``prepare``: the
    unsubscribe secret, the outbox, the audience's connection and (unless it is a dry run) the
    transport's connection and key. A missing or unusable one fails the run there, naming it,
    before extract; not at send, after an approval."""
    needs: list[tuple[str, Callable[[], object]]] = [
        ("the unsubscribe secret", unsubscribe_secret),
        ("the outbox", outbox_url),
    ]
    if spec.audience.connection_id:
        conn_id = spec.audience.connection_id
        needs.append((f"the audience connection {conn_id!r}", lambda: sql_url(conn_id)))
    if not dry_run and spec.transport != "file":
        needs.append(
            (
                f"the {spec.transport} connection {spec.connection_id!r}",
                lambda: transport(
                    spec.connection_id, dry_run=False, dry_run_dir=Path(), kind=spec.transport
                ),
            )
        )
    needs.append(("the approvers", lambda: approvers(spec.name, list(spec.approvers))))
    for what, read in needs:
        try:
            read()
        except (MailroomError, ValueError) as exc:
            raise MailroomError(f"{what}: {exc}. Nothing was extracted or sent.") from None


def halt_variable_key(run_id: str) -> str:
    return "mailroom_halt__" + re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_")


def halt_variable(run_id: str) -> str | None:
    """A halt set through Airflow (UI or REST): any non-empty value of the run's halt Variable."""
    key = halt_variable_key(run_id)
    value = Variable.get(key, default=None)
    return f"halted through Airflow Variable {key}: {value}" if value else None


def approvers(campaign: str, from_spec: list[str]) -> list[str]:
    """The spec's approvers, or the Variable ``mailroom_approvers__<campaign>`` (names separated
    by commas) when it is set. A Variable with an empty name in it (``", ,"``, ``"ann,,bob"``)
    is refused, not read as fewer approvers."""
    key = f"mailroom_approvers__{campaign}"
    override = Variable.get(key, default=None)
    if override is None or not str(override).strip():
        return from_spec
    names = [a.strip() for a in str(override).split(",")]
    if not all(names):
        raise MailroomError(
            f"Airflow Variable {key} holds an empty approver name ({len(names)} comma-separated "
            f"entries, {sum(not n for n in names)} empty): write the names separated by commas, "
            "or delete the Variable to use the campaign spec's approvers"
        )
    return names


def transport(
    conn_id: str, *, dry_run: bool, dry_run_dir: Path, kind: str = "sendgrid"
) -> Transport:
    """The campaign's transport (``kind``: the spec's ``transport``) from connection
    ``conn_id``; a dry run, or ``transport: file``, writes the requests to ``dry_run_dir``."""
    if dry_run or kind == "file":
        from mailroom.delivery.transports.file import FileTransport

        return FileTransport(dry_run_dir)
    if kind == "smtp":
        return smtp_transport(conn_id)
    if kind != "sendgrid":
        raise MailroomError(f"unknown transport {kind!r}")
    from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport

    conn = _connection(conn_id)
    host = conn.host or SENDGRID_DEFAULT_HOST
    if "://" not in host:
        host = f"{conn.schema or 'https'}://{host}"
    if conn.port and host.count(":") < 2:
        host = f"{host}:{conn.port}"
    extra = conn.extra_dejson or {}
    timeout = float(extra.get("timeout", 30))
    # extra "ca_bundle": a PEM file of the certificates to trust instead of the system's.
    ca_bundle = str(extra["ca_bundle"]) if extra.get("ca_bundle") else None
    return SendGridTransport(
        SendGridSettings(
            api_key=conn.password or "", host=host, timeout_seconds=timeout, ca_bundle=ca_bundle
        )
    )


def smtp_transport(conn_id: str) -> Transport:
    """An SMTP connection: host, port, login, password; extra ``security`` (``starttls``, the
    default, ``tls`` or ``none``), ``timeout`` (seconds), ``local_hostname`` (EHLO name) and
    ``chunk_size`` (recipients recorded per outbox transaction, default 100: a crash leaves at
    most one chunk 'unknown')."""
    from mailroom.delivery.transports.smtp import (
        DEFAULT_CHUNK_SIZE,
        DEFAULT_PORTS,
        SmtpSettings,
        SmtpTransport,
    )

    conn = _connection(conn_id)
    if (conn.conn_type or "").lower() != "smtp":
        raise MailroomError(
            f"connection {conn_id!r} has type {conn.conn_type!r}; the smtp transport needs an "
            '\'smtp\' connection (host, port, login, password, extra {"security": "starttls"})'
        )
    extra = conn.extra_dejson or {}
    security = str(extra.get("security", "starttls")).lower()
    if security not in DEFAULT_PORTS:
        raise MailroomError(
            f"connection {conn_id!r}: extra 'security' is {security!r}; "
            f"use one of {', '.join(DEFAULT_PORTS)}"
        )
    return SmtpTransport(
        SmtpSettings(
            host=conn.host or "",
            port=int(conn.port or DEFAULT_PORTS[security]),
            username=conn.login or None,
            password=conn.password or None,
            security=security,
            timeout_seconds=float(extra.get("timeout", 30)),
            local_hostname=extra.get("local_hostname") or None,
            chunk_size=_whole_number(conn_id, extra, "chunk_size", DEFAULT_CHUNK_SIZE),
        )
    )


def _whole_number(conn_id: str, extra: dict[str, Any], key: str, default: int) -> int:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise MailroomError(
            f"connection {conn_id!r}: extra {key!r} must be a whole number, got {value!r}"
        )
    return int(value)


class _MissingConnection(MailroomError):
    pass


def _connection(conn_id: str) -> Connection:
    try:
        conn: Connection = Connection.get(conn_id)
    except Exception as exc:
        if "not found" in str(exc).lower() or "isn't defined" in str(exc).lower():
            raise _MissingConnection(f"Airflow connection {conn_id!r} is not defined") from exc
        raise
    return conn


def lift_halt_variable(run_id: str) -> bool:
    """Delete the run's halt Variable, if set (the console's resume lifts every halt of the
    run). Runs in Airflow's API server, which reads and writes Variables directly."""
    from airflow.models.variable import Variable as StoredVariable

    key = halt_variable_key(run_id)
    if StoredVariable.get(key, default_var=None) is None:
        return False
    StoredVariable.delete(key)
    return True


def console_url(run_id: str) -> str | None:
    """The run's page of the campaign console in Airflow's UI (``[api] base_url``)."""
    from airflow.sdk.configuration import conf

    from mailroom_airflow.console import run_view_in_airflow

    base = conf.get("api", "base_url", fallback=None)
    return run_view_in_airflow(base, run_id) if base else None
