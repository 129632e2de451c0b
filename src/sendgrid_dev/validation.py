"""The checks SendGrid documents for a v3 mail-send body, as errors in SendGrid's own shape.

The dev server is only useful if a request it accepts would also be accepted by SendGrid, so
these rules err on the strict side of what is documented. Limits come from SendGrid's published
OpenAPI spec (twilio/sendgrid-oai, ``tsg_mail_v3.yaml``) and its "Mail Send limitations" page;
they are copied here because nothing may read the spec at run time.
"""

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# tsg_mail_v3.yaml: personalizations.maxItems.
MAX_PERSONALIZATIONS = 1000
# "Mail Send limitations": to + cc + bcc across every personalization of one request.
MAX_TOTAL_RECIPIENTS = 1000
# tsg_mail_v3.yaml, personalizations[].substitutions: "may not exceed 10,000 bytes per
# personalization object".
MAX_SUBSTITUTIONS_BYTES = 10_000
# tsg_mail_v3.yaml, personalizations[].custom_args and custom_args: "may not exceed 10,000 bytes".
MAX_CUSTOM_ARGS_BYTES = 10_000
# "Mail Send limitations": "The total size of your email, including attachments, must be less
# than 30MB." The request body is the closest measure the server has; decimal MB is the
# stricter reading.
MAX_REQUEST_BYTES = 30_000_000
# tsg_mail_v3.yaml: categories.maxItems and categories.items.maxLength.
MAX_CATEGORIES = 10
MAX_CATEGORY_LENGTH = 255
# tsg_mail_v3.yaml, headers (top level and per personalization): "You may not override".
RESERVED_HEADERS = frozenset(
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
# "Mail Send limitations": to.name, cc.name and bcc.name cannot include ";" or ",".
FORBIDDEN_NAME_CHARACTERS = frozenset(";,")
RECIPIENT_KINDS = ("to", "cc", "bcc")

# Bounds the 400 body when a request is wrong in many places at once.
MAX_REPORTED_ERRORS = 50

# One bare address: no display name, no list separators, no whitespace or angle brackets.
_FORBIDDEN_IN_ADDRESS = r"\s,;<>()\[\]\"\\:@"
_EMAIL_ADDRESS = re.compile(
    rf"[^{_FORBIDDEN_IN_ADDRESS}]+@(?:[^{_FORBIDDEN_IN_ADDRESS}.]+\.)+[^{_FORBIDDEN_IN_ADDRESS}.]+"
)
_MAX_ADDRESS_LENGTH = 254

_TEXT_PLAIN = "text/plain"
_TEXT_HTML = "text/html"


@dataclass(frozen=True)
class FieldError:
    """One entry of SendGrid's ``errors`` array; ``field`` is a dotted path such as
    ``personalizations.0.to.1.email``, or None when the whole request is at fault."""

    message: str
    field: str | None

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "field": self.field, "help": None}


class _TooManyErrors(Exception):
    pass


class _Errors:
    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, message: str, field: str | None) -> None:
        self.items.append(FieldError(message, field))
        if len(self.items) >= MAX_REPORTED_ERRORS:
            raise _TooManyErrors


def is_valid_address(address: object) -> bool:
    """Whether ``address`` is one syntactically valid bare email address."""
    if not isinstance(address, str) or len(address) > _MAX_ADDRESS_LENGTH:
        return False
    if not _EMAIL_ADDRESS.fullmatch(address):
        return False
    local = address.rsplit("@", 1)[0]
    return not (local.startswith(".") or local.endswith(".") or ".." in local)


def _utf8_size(mapping: dict[str, Any]) -> int:
    """Keys plus values in UTF-8, the only reading of SendGrid's "total size" in bytes that
    does not depend on how the client happened to serialise the JSON."""
    return sum(len(key.encode()) + len(str(value).encode()) for key, value in mapping.items())


def validate_mail_send(body: object) -> list[FieldError]:
    """Every documented rule ``body`` breaks (up to ``MAX_REPORTED_ERRORS``); empty if valid."""
    errors = _Errors()
    if not isinstance(body, dict):
        return [FieldError("The request body must be a JSON object.", None)]
    with contextlib.suppress(_TooManyErrors):
        _check_body(body, errors)
    return errors.items


def _check_body(body: dict[str, Any], errors: _Errors) -> None:
    personalizations = body.get("personalizations")
    every_personalization_has_subject = False
    if not isinstance(personalizations, list) or not personalizations:
        errors.add(
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
        )
    elif len(personalizations) > MAX_PERSONALIZATIONS:
        errors.add(
            f"You may not have more than {MAX_PERSONALIZATIONS} personalizations per request.",
            "personalizations",
        )
    else:
        _check_personalizations(personalizations, errors)
        every_personalization_has_subject = all(
            isinstance(p, dict) and isinstance(p.get("subject"), str) and p["subject"]
            for p in personalizations
        )

    _check_sender(body.get("from"), "from", errors, required=True)
    _check_reply_to(body, errors)
    has_template = "template_id" in body
    if has_template and not (isinstance(body["template_id"], str) and body["template_id"]):
        errors.add("The template_id must be a non-empty string.", "template_id")
    _check_subject(body, errors, required=not (has_template or every_personalization_has_subject))
    _check_content(body.get("content"), errors, required=not has_template)
    _check_headers(body.get("headers"), "headers", errors)
    _check_string_map(body.get("custom_args"), "custom_args", MAX_CUSTOM_ARGS_BYTES, errors)
    _check_categories(body.get("categories"), errors)
    _check_sandbox_flag(body.get("mail_settings"), errors)


def _check_personalizations(personalizations: list[Any], errors: _Errors) -> None:
    first_seen: dict[str, str] = {}
    total_recipients = 0
    for index, personalization in enumerate(personalizations):
        path = f"personalizations.{index}"
        if not isinstance(personalization, dict):
            errors.add("Each personalization must be a JSON object.", path)
            continue
        for kind in RECIPIENT_KINDS:
            recipients = personalization.get(kind)
            if recipients is None and kind != "to":
                continue
            if not isinstance(recipients, list) or not recipients:
                errors.add(
                    f"The {kind} array is required for all personalization objects, and must have"
                    " at least one email object with a valid email address."
                    if kind == "to"
                    else f"The {kind} array, when present, must have at least one email object.",
                    f"{path}.{kind}",
                )
                continue
            total_recipients += len(recipients)
            for position, recipient in enumerate(recipients):
                field = f"{path}.{kind}.{position}"
                address = _check_recipient(recipient, field, errors)
                if address is None:
                    continue
                key = address.lower()
                if key in first_seen:
                    # The message names the first occurrence, never the address, so the error
                    # body is safe to log on the client side.
                    errors.add(
                        "Each email address must be unique across to, cc and bcc of every"
                        f" personalization; this one repeats {first_seen[key]}.",
                        f"{field}.email",
                    )
                else:
                    first_seen[key] = f"{field}.email"
        if "from" in personalization:
            _check_sender(personalization["from"], f"{path}.from", errors, required=True)
        if "subject" in personalization:
            _check_non_empty_string(personalization["subject"], f"{path}.subject", errors)
        _check_headers(personalization.get("headers"), f"{path}.headers", errors)
        _check_string_map(
            personalization.get("substitutions"),
            f"{path}.substitutions",
            MAX_SUBSTITUTIONS_BYTES,
            errors,
        )
        _check_string_map(
            personalization.get("custom_args"), f"{path}.custom_args", MAX_CUSTOM_ARGS_BYTES, errors
        )
    if total_recipients > MAX_TOTAL_RECIPIENTS:
        errors.add(
            f"The total number of recipients (to, cc and bcc across all personalizations) must be"
            f" no more than {MAX_TOTAL_RECIPIENTS}; this request has {total_recipients}.",
            "personalizations",
        )


def _check_recipient(recipient: object, field: str, errors: _Errors) -> str | None:
    """The recipient's address when it is usable for the duplicate check, else None."""
    if not isinstance(recipient, dict):
        errors.add("Each recipient must be an object with an email property.", field)
        return None
    name = recipient.get("name")
    if name is not None and (
        not isinstance(name, str) or FORBIDDEN_NAME_CHARACTERS.intersection(name)
    ):
        errors.add(
            "A recipient name must be a string without the ; or , characters.", f"{field}.name"
        )
    address = recipient.get("email")
    if not is_valid_address(address):
        errors.add("Does not contain a valid address.", f"{field}.email")
        return None
    assert isinstance(address, str)
    return address


def _check_sender(sender: object, field: str, errors: _Errors, *, required: bool) -> None:
    if sender is None and not required:
        return
    if not isinstance(sender, dict) or "email" not in sender:
        errors.add(
            "The from object must be provided for every email send. It is an object that requires"
            " the email parameter, but may also contain a name parameter.",
            f"{field}.email",
        )
        return
    if not is_valid_address(sender["email"]):
        errors.add("The from email does not contain a valid address.", f"{field}.email")


def _check_reply_to(body: dict[str, Any], errors: _Errors) -> None:
    if "reply_to" in body and "reply_to_list" in body:
        errors.add("Use either reply_to or reply_to_list, not both.", "reply_to")
    reply_to = body.get("reply_to")
    if reply_to is not None and not (
        isinstance(reply_to, dict) and is_valid_address(reply_to.get("email"))
    ):
        errors.add("The reply_to email does not contain a valid address.", "reply_to.email")
    reply_to_list = body.get("reply_to_list")
    if reply_to_list is None:
        return
    if not isinstance(reply_to_list, list) or not reply_to_list:
        errors.add("The reply_to_list must have at least one email object.", "reply_to_list")
        return
    for position, entry in enumerate(reply_to_list):
        if not (isinstance(entry, dict) and is_valid_address(entry.get("email"))):
            errors.add("Does not contain a valid address.", f"reply_to_list.{position}.email")


def _check_subject(body: dict[str, Any], errors: _Errors, *, required: bool) -> None:
    if "subject" in body:
        _check_non_empty_string(body["subject"], "subject", errors)
    elif required:
        errors.add(
            "The subject is required. You can get around this requirement if you use a template"
            " with a subject defined or if every personalization has a subject defined.",
            "subject",
        )


def _check_non_empty_string(value: object, field: str, errors: _Errors) -> None:
    if not isinstance(value, str) or not value:
        errors.add("The value must be a string at least one character in length.", field)


def _content_rank(content_type: str) -> int:
    return {_TEXT_PLAIN: 0, _TEXT_HTML: 1}.get(content_type.lower(), 2)


def _check_content(content: object, errors: _Errors, *, required: bool) -> None:
    if content is None and not required:
        return
    if not isinstance(content, list) or not content:
        errors.add(
            "Unless a valid template_id is provided, the content parameter is required. There"
            " must be at least one defined content block.",
            "content",
        )
        return
    previous_rank = 0
    for position, block in enumerate(content):
        field = f"content.{position}"
        if not isinstance(block, dict):
            errors.add("Each content block must be an object with type and value.", field)
            continue
        content_type, value = block.get("type"), block.get("value")
        if not isinstance(content_type, str) or not content_type:
            errors.add(
                "The content type must be a string at least one character in length.",
                f"{field}.type",
            )
            continue
        if not isinstance(value, str) or not value:
            errors.add(
                "The content value must be a string at least one character in length.",
                f"{field}.value",
            )
        rank = _content_rank(content_type)
        if rank < previous_rank:
            errors.add(
                "If present, text/plain content must be first, followed by text/html, followed"
                " by any other content.",
                f"{field}.type",
            )
        previous_rank = max(previous_rank, rank)


def _check_headers(headers: object, field: str, errors: _Errors) -> None:
    if headers is None:
        return
    if not isinstance(headers, dict):
        errors.add("Headers must be an object of header names to string values.", field)
        return
    for name, value in headers.items():
        if name.lower() in RESERVED_HEADERS:
            errors.add(
                f"The header {name} is reserved and may not be set;"
                f" reserved: {', '.join(sorted(RESERVED_HEADERS))}.",
                f"{field}.{name}",
            )
        elif not isinstance(value, str):
            errors.add("Header values must be strings.", f"{field}.{name}")


def _check_string_map(mapping: object, field: str, max_bytes: int, errors: _Errors) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        errors.add("Must be an object of string keys to string values.", field)
        return
    for key, value in mapping.items():
        if not isinstance(value, str):
            errors.add("Values must be strings.", f"{field}.{key}")
    size = _utf8_size(mapping)
    if size > max_bytes:
        errors.add(
            f"The total size of {field.rsplit('.', 1)[-1]} may not exceed {max_bytes} bytes;"
            f" this one is {size} bytes.",
            field,
        )


def _check_categories(categories: object, errors: _Errors) -> None:
    if categories is None:
        return
    if not isinstance(categories, list) or len(categories) > MAX_CATEGORIES:
        errors.add(f"The categories must be a list of at most {MAX_CATEGORIES}.", "categories")
        return
    if len({c for c in categories if isinstance(c, str)}) != len(categories):
        errors.add("Categories must be unique strings.", "categories")
    for position, category in enumerate(categories):
        if isinstance(category, str) and len(category) > MAX_CATEGORY_LENGTH:
            errors.add(
                f"A category may not exceed {MAX_CATEGORY_LENGTH} characters.",
                f"categories.{position}",
            )


def _check_sandbox_flag(mail_settings: object, errors: _Errors) -> None:
    if mail_settings is None:
        return
    if not isinstance(mail_settings, dict):
        errors.add("The mail_settings must be an object.", "mail_settings")
        return
    sandbox = mail_settings.get("sandbox_mode")
    if sandbox is not None and not (
        isinstance(sandbox, dict) and isinstance(sandbox.get("enable", False), bool)
    ):
        errors.add(
            "The sandbox_mode.enable setting must be a boolean.",
            "mail_settings.sandbox_mode.enable",
        )


def is_sandbox(body: dict[str, Any]) -> bool:
    """Whether a valid body asks SendGrid to validate only and deliver nothing."""
    settings = body.get("mail_settings")
    if not isinstance(settings, dict):
        return False
    sandbox = settings.get("sandbox_mode")
    return isinstance(sandbox, dict) and sandbox.get("enable") is True


def iter_recipient_addresses(body: dict[str, Any]) -> Iterator[str]:
    """Every to, cc and bcc address of a valid body, personalization by personalization."""
    for personalization in body.get("personalizations", []):
        for kind in RECIPIENT_KINDS:
            for recipient in personalization.get(kind) or []:
                yield recipient["email"]
