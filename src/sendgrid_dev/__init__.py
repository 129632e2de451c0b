"""A SendGrid-compatible local server, like Mailpit is for SMTP, for demos and tests.

Point the official SDK at it with ``SendGridAPIClient(key, host=server.url)``; inspect what
arrived with ``server.accepted()``, ``read_accepted(data_dir)`` or the ``/_dev`` endpoints.
"""

from sendgrid_dev.errors import DevServerError
from sendgrid_dev.faults import Faults
from sendgrid_dev.rendering import apply_substitutions, render_personalization
from sendgrid_dev.server import DevServerStats, SendGridDevServer
from sendgrid_dev.store import (
    ACCEPTED_FILE_NAME,
    AcceptedRecord,
    accepted_recipients,
    read_accepted,
)
from sendgrid_dev.validation import FieldError, validate_mail_send

__all__ = [
    "ACCEPTED_FILE_NAME",
    "AcceptedRecord",
    "DevServerError",
    "DevServerStats",
    "Faults",
    "FieldError",
    "SendGridDevServer",
    "accepted_recipients",
    "apply_substitutions",
    "read_accepted",
    "render_personalization",
    "validate_mail_send",
]
