"""The transports, for tools that drive runs outside Airflow: one interface (``Transport``) and
its implementations. They live in ``mailroom.delivery.transports``; this is their public name."""

from mailroom.delivery.transports.base import Delivery, Transport
from mailroom.delivery.transports.file import FileTransport
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.delivery.transports.smtp import SmtpSettings, SmtpTransport

__all__ = [
    "Delivery",
    "FileTransport",
    "SendGridSettings",
    "SendGridTransport",
    "SmtpSettings",
    "SmtpTransport",
    "Transport",
]
