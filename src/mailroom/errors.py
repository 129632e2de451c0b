"""Errors the pipeline raises on bad input or a broken invariant.

Every error names what is wrong in words an operator can act on; a stage that raises one has
sent nothing.
"""


class MailroomError(Exception):
    """Base class of every error Mailroom raises on purpose."""


class CampaignSpecError(MailroomError):
    """A campaign spec is missing, unknown or malformed."""


class AudienceError(MailroomError):
    """The audience source cannot be read or is unusable."""


class ContentError(MailroomError):
    """A template or translation catalog cannot be rendered."""


class ValidationFailed(MailroomError):
    """A data-quality check failed; nothing may be sent."""


class EnvelopeViolation(MailroomError):
    """A request body breaks the one-recipient-per-envelope rules or is not the approved one."""


class TransportError(MailroomError):
    """The provider answered with anything but success, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        outcome_unknown: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.outcome_unknown = outcome_unknown
        self.retry_after = retry_after


class SendHalted(MailroomError):
    """A halt was requested while a batch was being sent one message at a time; the messages
    already sent are recorded and the rest wait for a resume."""
