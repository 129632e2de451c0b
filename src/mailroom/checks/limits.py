"""SendGrid's Mail Send limits, written once: the campaign spec, the data-quality gate, the
envelope guard and the SendGrid-compatible dev server all read them from here.

Sources: SendGrid's published OpenAPI document for ``POST /v3/mail/send`` (``maxItems`` and the
field descriptions; vendored with the dev server) and the "Mail Send limitations" in its docs.
"""

from __future__ import annotations

# personalizations.maxItems.
MAX_PERSONALIZATIONS = 1000
# "Mail Send limitations": to + cc + bcc across every personalization of one request.
MAX_RECIPIENTS = 1000
# "The total size of your email, including attachments, must be less than 30MB." The request
# body is the closest measure a sender has; decimal MB is the stricter reading. "Less than":
# a body of this many bytes or more is refused (``len(body) >= MAX_REQUEST_BYTES``).
MAX_REQUEST_BYTES = 30_000_000
# personalizations[].substitutions: "may not exceed 10,000 bytes per personalization object".
MAX_SUBSTITUTIONS_BYTES = 10_000
# personalizations[].custom_args and custom_args: "may not exceed 10,000 bytes".
MAX_CUSTOM_ARGS_BYTES = 10_000
# categories.maxItems and categories.items.maxLength.
MAX_CATEGORIES = 10
MAX_CATEGORY_LENGTH = 255
# categories.uniqueItems is true as well, and SendGrid's "Working with Categories" page adds that
# a category name is 7-bit US-ASCII (the published document does not say so): the campaign spec
# refuses a repeated or non-ASCII category rather than letting every request fail at send.

# Not SendGrid's: the longest value (in characters) one recipient field may hold unless the
# campaign sets ``max_field_length``. A first name of 100 KB is bad data, not a name, and it would
# otherwise reach the subject of every message that recipient gets.
DEFAULT_MAX_FIELD_LENGTH = 256
# The most a campaign may raise that cap to: one value of more characters than this cannot fit
# in the substitutions of a personalization (``MAX_SUBSTITUTIONS_BYTES``) whatever its encoding.
MAX_FIELD_LENGTH_CAP = MAX_SUBSTITUTIONS_BYTES

# headers (top level and per personalization): "You may not override" these. ``Sender`` and
# ``Return-Path`` are not on SendGrid's list; Mailroom never sets them and refuses them too.
SENDGRID_RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "Content-Type",
        "Content-Transfer-Encoding",
        "To",
        "From",
        "Subject",
        "Reply-To",
        "CC",
        "BCC",
    )
)
RESERVED_HEADERS = SENDGRID_RESERVED_HEADERS | {"sender", "return-path"}
