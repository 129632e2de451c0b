"""The error the dev server raises when it is misused or its recording is unreadable."""

from mailroom.errors import MailroomError


class DevServerError(MailroomError):
    """The dev server cannot do what was asked: bad fault settings, not started, corrupt log."""
