"""The Airflow adapter builds each campaign's transport from its connection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

pytestmark = pytest.mark.dag


def _connection(conn_type: str, **fields: Any) -> Any:
    from airflow.sdk import Connection

    extra = fields.pop("extra", None)
    return Connection(
        conn_id="mailroom_smtp",
        conn_type=conn_type,
        extra=json.dumps(extra) if extra is not None else None,
        **fields,
    )


def _transport(conn: Any, kind: str, tmp_path: Path, dry_run: bool = False) -> Any:
    from mailroom_airflow import settings

    with mock.patch.object(settings, "_connection", return_value=conn) as lookup:
        transport = settings.transport(
            "mailroom_smtp", dry_run=dry_run, dry_run_dir=tmp_path, kind=kind
        )
    return transport, lookup


def test_an_smtp_connection_builds_the_smtp_transport(tmp_path: Path) -> None:
    from mailroom.delivery.transports.smtp import SmtpTransport

    conn = _connection(
        "smtp",
        host="smtp.mailroom.test",
        port=2525,
        login="mailroom",
        password="hunter2-secret",
        extra={
            "security": "starttls",
            "timeout": 12,
            "local_hostname": "mx.mailroom.test",
            "chunk_size": "250",
        },
    )

    transport, lookup = _transport(conn, "smtp", tmp_path)

    lookup.assert_called_once_with("mailroom_smtp")
    assert isinstance(transport, SmtpTransport)
    s = transport.settings
    assert (s.host, s.port, s.username, s.password) == (
        "smtp.mailroom.test",
        2525,
        "mailroom",
        "hunter2-secret",
    )
    assert (s.security, s.timeout_seconds, s.local_hostname, s.chunk_size) == (
        "starttls",
        12.0,
        "mx.mailroom.test",
        250,
    )
    assert "hunter2" not in repr(s)


def test_smtp_defaults_to_starttls_and_the_port_of_the_security_mode(tmp_path: Path) -> None:
    plain, _ = _transport(_connection("smtp", host="smtp.mailroom.test"), "smtp", tmp_path)
    implicit, _ = _transport(
        _connection("smtp", host="smtp.mailroom.test", extra={"security": "tls"}), "smtp", tmp_path
    )

    assert (plain.settings.security, plain.settings.port) == ("starttls", 587)
    assert (implicit.settings.security, implicit.settings.port) == ("tls", 465)
    assert plain.settings.username is None
    assert plain.settings.chunk_size == 100


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        (lambda: _connection("http", host="https://api.sendgrid.com"), "'smtp' connection"),
        (
            lambda: _connection("smtp", host="smtp.mailroom.test", extra={"security": "ssl"}),
            "security",
        ),
        (
            lambda: _connection("smtp", host="smtp.mailroom.test", extra={"chunk_size": "lots"}),
            "'chunk_size' must be a whole number",
        ),
        (
            lambda: _connection("smtp", host="smtp.mailroom.test", extra={"chunk_size": 0}),
            "chunk size must be 1 to 5000",
        ),
    ],
    ids=["not an smtp connection", "unknown security", "chunk size not a number", "chunk size 0"],
)
def test_a_wrong_smtp_connection_is_a_clear_error(conn: Any, expected: str, tmp_path: Path) -> None:
    from mailroom.errors import MailroomError

    with pytest.raises(MailroomError, match=expected):  # TransportError is a MailroomError
        _transport(conn(), "smtp", tmp_path)


def test_a_dry_run_and_the_file_transport_never_reach_a_connection(tmp_path: Path) -> None:
    from mailroom.delivery.transports.file import FileTransport

    for kind, dry_run in (("smtp", True), ("sendgrid", True), ("file", False)):
        transport, lookup = _transport(None, kind, tmp_path, dry_run=dry_run)
        assert isinstance(transport, FileTransport)
        lookup.assert_not_called()
