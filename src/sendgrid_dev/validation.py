"""Whether SendGrid would take a v3 mail-send body, answered as errors in SendGrid's own shape.

The dev server is only useful if a request it accepts would also be accepted by SendGrid, so a
body is checked in two layers, and errs on the strict side of what is documented:

1. SendGrid's published OpenAPI document (``schema.py``): types, required fields, enums, lengths
   and counts, every address's ``format: email``, anywhere in the body.
2. Only for a body the schema accepts, the documented rules the schema cannot express
   (``_check_documented_rules``): at least one personalization and one ``to``, at most
   ``MAX_RECIPIENTS`` across every personalization, each address once per request, no reserved
   header, the byte limits of ``substitutions`` and ``custom_args``, no ``;`` or ``,`` in a
   recipient's name, a subject and content unless a template gives them, text/plain before
   text/html, ``reply_to`` or ``reply_to_list`` but not both.

Limits come from ``mailroom.checks.limits``, which every part of Mailroom reads.

Both layers are first asked only whether anything is wrong, the way a body that is fine is
answered fastest: the schema by its compiled predicate (``schema.mail_send_is_valid``), the rules
by ``_documented_rules_hold``. Only a no (or an exception on the way) has the full layers run,
and every error an answer carries comes from them alone, so the fast questions change how soon a
valid body is taken, never what any body is told (``tests/unit/test_sendgrid_openapi.py`` holds
the two paths to the same answers).
"""

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from mailroom.checks.limits import (
    MAX_CUSTOM_ARGS_BYTES,
    MAX_RECIPIENTS,
    MAX_SUBSTITUTIONS_BYTES,
    SENDGRID_RESERVED_HEADERS,
)
from sendgrid_dev.schema import mail_send_is_valid, mail_send_validator

# "Mail Send limitations": to.name, cc.name and bcc.name cannot include ";" or ",".
FORBIDDEN_NAME_CHARACTERS = frozenset(";,")
RECIPIENT_KINDS = ("to", "cc", "bcc")

# Bounds the 400 body when a request is wrong in many places at once.
MAX_REPORTED_ERRORS = 50

_TEXT_PLAIN = "text/plain"
_TEXT_HTML = "text/html"

# SendGrid's own answers for a missing required field, and the field it names: (message, suffix).
_MISSING: dict[str, tuple[str, str]] = {
    "personalizations": (
        "The personalizations field is required and must have at least one personalization.",
        "",
    ),
    "from": (
        "The from object must be provided for every email send. It is an object that requires"
        " the email parameter, but may also contain a name parameter.",
        ".email",
    ),
    "to": (
        "The to array is required for all personalization objects, and must have at least one"
        " email object with a valid email address.",
        "",
    ),
}


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


def validate_mail_send(body: object) -> list[FieldError]:
    """What is wrong with ``body`` (up to ``MAX_REPORTED_ERRORS``); empty if SendGrid would take
    it. The schema's errors if it has any, otherwise the documented rules' errors.

    ``body`` is what ``json.loads`` made of a request. The answer is ``validate_in_full``'s; a
    body both quick questions find nothing wrong with is answered without the full layers."""
    if not mail_send_is_valid()(body):
        errors = list(islice(schema_errors(body), MAX_REPORTED_ERRORS))
        if errors:
            return errors
    assert isinstance(body, dict)  # the schema's root is an object
    if _documented_rules_hold(body):
        return []
    return _documented_rule_errors(body)


def validate_in_full(body: object) -> list[FieldError]:
    """``validate_mail_send`` without its quick questions: both layers, always in full."""
    errors = list(islice(schema_errors(body), MAX_REPORTED_ERRORS))
    if errors:
        return errors
    assert isinstance(body, dict)  # the schema's root is an object
    return _documented_rule_errors(body)


def _documented_rule_errors(body: dict[str, Any]) -> list[FieldError]:
    collected = _Errors()
    with contextlib.suppress(_TooManyErrors):
        _check_documented_rules(body, collected)
    return collected.items


# -- layer 1: the published schema ------------------------------------------------------------


def schema_errors(body: object) -> Iterator[FieldError]:
    """Where ``body`` breaks SendGrid's published schema, in the schema's order. Messages name
    the rule and the field, never a value from the body, so an answer is safe to log."""
    missing_reported: set[tuple[Any, ...]] = set()
    for error in mail_send_validator().iter_errors(body):
        path = tuple(error.absolute_path)
        if error.validator == "required":
            # jsonschema reports each missing property on its own, all with the same instance:
            # report them all once, each under its own path.
            if path in missing_reported:
                continue
            missing_reported.add(path)
            for name in error.validator_value:
                if name not in error.instance:
                    message, suffix = _MISSING.get(name, (f"The {name} field is required.", ""))
                    yield FieldError(message, ".".join(map(str, (*path, name))) + suffix)
            continue
        yield FieldError(_message(error.validator, error.validator_value, path), _field(path))


def _field(path: tuple[Any, ...]) -> str | None:
    return ".".join(str(part) for part in path) or None


def _message(keyword: str, expected: Any, path: tuple[Any, ...]) -> str:
    names = [part for part in path if isinstance(part, str)]
    name = names[-1] if names else "request body"
    if keyword == "type":
        if not path:
            return "The request body must be a JSON object."
        kinds = [expected] if isinstance(expected, str) else list(expected)
        return f"The {name} value must be of type {' or '.join(kinds)}."
    if keyword == "format":
        if expected == "email":
            return "Does not contain a valid address."
        return f"The {name} value is not a valid {expected}."
    if keyword == "enum":
        return f"The {name} value must be one of {', '.join(json.dumps(v) for v in expected)}."
    if keyword == "minLength":
        return f"The {name} value must be a string at least {expected} character(s) in length."
    if keyword == "maxLength":
        return f"The {name} value may not exceed {expected} characters."
    if keyword == "minItems":
        return f"The {name} array must have at least {expected} item(s)."
    if keyword == "maxItems":
        return f"The {name} array may not have more than {expected} items."
    if keyword == "uniqueItems":
        return f"The items of {name} must be unique."
    if keyword == "maxProperties":
        return f"The {name} object may not have more than {expected} properties."
    return f"The {name} value does not satisfy {keyword!r} of SendGrid's published schema."


# -- layer 2: what the schema cannot express --------------------------------------------------
# These run only on a body the schema accepted, so every type and required field is as the
# schema says; ``body`` and what it holds need no further isinstance checks.


def _check_documented_rules(body: dict[str, Any], errors: _Errors) -> None:
    personalizations: list[dict[str, Any]] = body["personalizations"]
    if not personalizations:
        errors.add(_MISSING["personalizations"][0], "personalizations")
    _check_recipients(personalizations, errors)
    for index, personalization in enumerate(personalizations):
        path = f"personalizations.{index}"
        _check_headers(personalization.get("headers"), f"{path}.headers", errors)
        _check_size(
            personalization.get("substitutions"),
            f"{path}.substitutions",
            MAX_SUBSTITUTIONS_BYTES,
            errors,
        )
        _check_custom_args(personalization.get("custom_args"), f"{path}.custom_args", errors)
    _check_message_rules(body, personalizations, errors)


def _check_message_rules(
    body: dict[str, Any], personalizations: list[dict[str, Any]], errors: _Errors
) -> None:
    """The rules of the message as a whole, beside its personalizations."""
    if "reply_to" in body and "reply_to_list" in body:
        errors.add("Use either reply_to or reply_to_list, not both.", "reply_to")
    if body.get("reply_to_list") == []:
        errors.add("The reply_to_list must have at least one email object.", "reply_to_list")
    has_template = "template_id" in body
    if has_template and not body["template_id"]:
        errors.add("The template_id must be a non-empty string.", "template_id")
    if "subject" not in body and not (
        has_template or (bool(personalizations) and all("subject" in p for p in personalizations))
    ):
        errors.add(
            "The subject is required. You can get around this requirement if you use a template"
            " with a subject defined or if every personalization has a subject defined.",
            "subject",
        )
    _check_content(body.get("content"), errors, required=not has_template)
    _check_headers(body.get("headers"), "headers", errors)
    _check_custom_args(body.get("custom_args"), "custom_args", errors)


def _check_recipients(personalizations: list[dict[str, Any]], errors: _Errors) -> None:
    first_seen: dict[str, str] = {}
    total = 0
    for index, personalization in enumerate(personalizations):
        path = f"personalizations.{index}"
        for kind in RECIPIENT_KINDS:
            recipients = personalization.get(kind)
            if recipients is None:
                continue  # the schema requires "to"
            if not recipients:
                errors.add(
                    _MISSING["to"][0]
                    if kind == "to"
                    else f"The {kind} array, when present, must have at least one email object.",
                    f"{path}.{kind}",
                )
                continue
            total += len(recipients)
            for position, recipient in enumerate(recipients):
                field = f"{path}.{kind}.{position}"
                if FORBIDDEN_NAME_CHARACTERS.intersection(recipient.get("name", "")):
                    errors.add(
                        "A recipient name may not contain the ; or , characters.", f"{field}.name"
                    )
                key = recipient["email"].lower()
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
    if total > MAX_RECIPIENTS:
        errors.add(
            f"The total number of recipients (to, cc and bcc across all personalizations) must be"
            f" no more than {MAX_RECIPIENTS}; this request has {total}.",
            "personalizations",
        )


def _check_headers(headers: dict[str, Any] | None, field: str, errors: _Errors) -> None:
    for name, value in (headers or {}).items():
        if name.lower() in SENDGRID_RESERVED_HEADERS:
            errors.add(
                f"The header {name} is reserved and may not be set;"
                f" reserved: {', '.join(sorted(SENDGRID_RESERVED_HEADERS))}.",
                f"{field}.{name}",
            )
        elif not isinstance(value, str):
            errors.add("Header values must be strings.", f"{field}.{name}")


def _check_custom_args(custom_args: dict[str, Any] | None, field: str, errors: _Errors) -> None:
    for name, value in (custom_args or {}).items():
        if not isinstance(value, str):
            errors.add("Custom argument values must be strings.", f"{field}.{name}")
    _check_size(custom_args, field, MAX_CUSTOM_ARGS_BYTES, errors)


def _utf8_size(mapping: dict[str, Any]) -> int:
    """Keys plus values in UTF-8, the only reading of SendGrid's "total size" in bytes that
    does not depend on how the client happened to serialise the JSON."""
    return sum(len(key.encode()) + len(str(value).encode()) for key, value in mapping.items())


def _check_size(
    mapping: dict[str, Any] | None, field: str, max_bytes: int, errors: _Errors
) -> None:
    size = _utf8_size(mapping or {})
    if size > max_bytes:
        errors.add(
            f"The total size of {field.rsplit('.', 1)[-1]} may not exceed {max_bytes} bytes;"
            f" this one is {size} bytes.",
            field,
        )


def _documented_rules_hold(body: dict[str, Any]) -> bool:
    """Whether ``_check_documented_rules`` would find nothing wrong with ``body``, one the schema
    accepted: the same rules asked as one yes or no, with no field path made and the addresses
    told apart by one set. An exception on the way is a no: the full rules then raise it
    themselves, or first answer with the errors they find before reaching it, as they did."""
    try:
        return _personalizations_hold(body["personalizations"]) and _message_rules_hold(body)
    except Exception:
        return False


def _personalizations_hold(personalizations: list[dict[str, Any]]) -> bool:
    if not personalizations:
        return False
    addresses: set[str] = set()
    total = 0
    for personalization in personalizations:
        for kind in RECIPIENT_KINDS:
            recipients = personalization.get(kind)
            if recipients is None:
                continue
            if not recipients:
                return False
            total += len(recipients)
            for recipient in recipients:
                name = recipient.get("name")
                if name and not FORBIDDEN_NAME_CHARACTERS.isdisjoint(name):
                    return False
                addresses.add(recipient["email"].lower())
        headers = personalization.get("headers")
        if headers and not _headers_hold(headers):
            return False
        substitutions = personalization.get("substitutions")
        if substitutions and _utf8_size_of_strings(substitutions) > MAX_SUBSTITUTIONS_BYTES:
            return False
        custom_args = personalization.get("custom_args")
        if custom_args and not _custom_args_hold(custom_args):
            return False
    # Every address once: as many distinct lower-cased addresses as recipients.
    return len(addresses) == total <= MAX_RECIPIENTS


def _headers_hold(headers: dict[str, Any]) -> bool:
    for name, value in headers.items():
        if name.lower() in SENDGRID_RESERVED_HEADERS or not isinstance(value, str):
            return False
    return True


def _custom_args_hold(custom_args: dict[str, Any]) -> bool:
    # A value that is not a str (an error of its own) makes the size raise TypeError: a no.
    return _utf8_size_of_strings(custom_args) <= MAX_CUSTOM_ARGS_BYTES


def _utf8_size_of_strings(mapping: dict[str, str]) -> int:
    """``_utf8_size`` of a mapping whose keys and values are all str, as a parsed JSON body's
    are (a value that is not one raises TypeError): the keys and values joined, since UTF-8
    encodes each code point on its own, and only encoded when not ASCII. Raises
    UnicodeEncodeError wherever ``_utf8_size`` does (a lone surrogate). A str subclass is
    measured by its characters, not by its ``__str__``; ``json.loads`` makes none."""
    joined = "".join([*mapping, *mapping.values()])
    return len(joined) if joined.isascii() else len(joined.encode())


def _message_rules_hold(body: dict[str, Any]) -> bool:
    errors = _Errors()
    try:
        _check_message_rules(body, body["personalizations"], errors)
    except _TooManyErrors:
        return False
    return not errors.items


def _content_rank(content_type: str) -> int:
    return {_TEXT_PLAIN: 0, _TEXT_HTML: 1}.get(content_type.lower(), 2)


def _check_content(
    content: list[dict[str, Any]] | None, errors: _Errors, *, required: bool
) -> None:
    if content is None and not required:
        return
    if not content:
        errors.add(
            "Unless a valid template_id is provided, the content parameter is required. There"
            " must be at least one defined content block.",
            "content",
        )
        return
    previous_rank = 0
    for position, block in enumerate(content):
        rank = _content_rank(block["type"])
        if rank < previous_rank:
            errors.add(
                "If present, text/plain content must be first, followed by text/html, followed"
                " by any other content.",
                f"content.{position}.type",
            )
        previous_rank = max(previous_rank, rank)


# -- reading a valid body ---------------------------------------------------------------------


def is_sandbox(body: dict[str, Any]) -> bool:
    """Whether a valid body asks SendGrid to validate only and deliver nothing."""
    sandbox = body.get("mail_settings", {}).get("sandbox_mode", {})
    return sandbox.get("enable") is True


def count_recipients(body: dict[str, Any]) -> int:
    """How many addresses ``iter_recipient_addresses`` yields for a valid body."""
    return sum(
        len(personalization.get("to") or ())
        + len(personalization.get("cc") or ())
        + len(personalization.get("bcc") or ())
        for personalization in body.get("personalizations", [])
    )


def iter_recipient_addresses(body: dict[str, Any]) -> Iterator[str]:
    """Every to, cc and bcc address of a valid body, personalization by personalization."""
    for personalization in body.get("personalizations", []):
        for kind in RECIPIENT_KINDS:
            for recipient in personalization.get(kind) or []:
                yield recipient["email"]
