"""The dev server's quick answers give exactly the answers of the full paths they stand before.

A valid body is answered by a compiled yes-or-no of the schema (``schema.mail_send_is_valid``)
and of the documented rules (``validation._documented_rules_hold``); only a no runs the full
layers (``validation.validate_in_full``), which alone make errors. The request's bytes are
decoded once (``server._utf8_text``) for ``json.loads`` and the store. Here each quick answer is
held to its full one: on Mailroom's own requests, on every listed way of breaking one, and on
bodies broken at random, personalizations above all, since they are what the quick path reads.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from mailroom.checks import limits
from sendgrid_dev import SendGridDevServer, read_accepted, server, store, validation
from sendgrid_dev.schema import (
    compile_is_valid,
    is_valid_address,
    mail_send_is_valid,
    mail_send_validator,
)
from sendgrid_dev.validation import (
    count_recipients,
    iter_recipient_addresses,
    validate_in_full,
    validate_mail_send,
)
from support.request_bodies import mailroom_request_body

pytestmark = pytest.mark.unit


def mailroom_body(recipients: int = 3) -> dict[str, Any]:
    """A request exactly as Mailroom's standard builder makes it, a copy to change."""
    return copy.deepcopy(mailroom_request_body(recipients))


def answers(validate: Callable[[object], list[Any]], body: object) -> object:
    """What ``validate`` answers: its errors, or the exception it raises (which the server
    answers with a 500)."""
    try:
        return validate(body)
    except Exception as error:
        return type(error)


def assert_same_answers(body: object) -> object:
    """The quick and the full path answer ``body`` alike, and the schema's quick yes is its
    validator's; returns the answer."""
    full = answers(validate_in_full, body)
    assert answers(validate_mail_send, body) == full
    assert mail_send_is_valid()(body) is mail_send_validator().is_valid(body)
    return full


# -- Mailroom's requests take the quick path --------------------------------------------------


@pytest.mark.parametrize("recipients", [1, 3, 1000])
def test_a_mailroom_request_is_valid_without_the_full_layers(
    recipients: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = mailroom_body(recipients)
    assert validate_in_full(body) == []

    def refuse(*args: object) -> None:
        raise AssertionError("the full layers ran for a valid body")

    monkeypatch.setattr(validation, "schema_errors", refuse)
    monkeypatch.setattr(validation, "_check_documented_rules", refuse)
    assert validate_mail_send(body) == []


# -- listed ways of breaking a request ---------------------------------------------------------


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """Set ``value`` at a dotted ``path`` (list positions as numbers) of a body."""

    def change(body: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target: Any = body
        for key in parents:
            target = target[key]
        target[last] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target: Any = body
        for key in parents:
            target = target[key]
        del target[last]

    return change


def _cc(count: int, start: int = 0, domain: str = "example.net") -> list[dict[str, str]]:
    return [{"email": f"c{i}@{domain}"} for i in range(start, start + count)]


def _substitutions_of(size: int, filler: str) -> dict[str, str]:
    """One substitution of exactly ``size`` UTF-8 bytes, key included."""
    key = "%%k%%"
    return {key: filler * ((size - len(key)) // len(filler.encode()))}


def _every_personalization(change: Callable[[dict[str, Any]], None]) -> Callable[[Any], None]:
    def apply(body: dict[str, Any]) -> None:
        for personalization in body["personalizations"]:
            change(personalization)

    return apply


def _many_errors_then_a_lone_surrogate(body: dict[str, Any]) -> None:
    # 60 repeated addresses: the full rules stop at 50 errors before they measure (and fail
    # to encode) the surrogate's substitutions; the answer is those 50 errors, not a 500.
    body["personalizations"][0]["bcc"] = [{"email": "u1@example.com"} for _ in range(60)]
    body["personalizations"][2]["substitutions"]["%%x%%"] = "\ud800"


CHANGES: dict[str, tuple[Callable[[dict[str, Any]], None], bool]] = {
    # (change, still valid)
    "as built": (lambda body: None, True),
    "an unknown key in a personalization": (_set("personalizations.0.x-extra", [1]), True),
    "a personalization's own subject": (_set("personalizations.1.subject", "Hi"), True),
    "an empty personalization subject": (_set("personalizations.1.subject", ""), False),
    "a personalization that is a list": (_set("personalizations.1", []), False),
    "a personalization without to": (_delete("personalizations.0.to"), False),
    "an empty to": (_set("personalizations.0.to", []), False),
    "a to that is an object": (_set("personalizations.0.to", {"email": "a@b.co"}), False),
    "a recipient that is a string": (_set("personalizations.0.to.0", "a@example.com"), False),
    "a recipient without email": (_set("personalizations.0.to.0", {"name": "A"}), False),
    "an address that is a number": (_set("personalizations.0.to.0.email", 7), False),
    "an address with a display name": (
        _set("personalizations.0.to.0.email", "Ada <a@example.com>"),
        False,
    ),
    "an address with two dots": (_set("personalizations.0.to.0.email", "a..b@x.com"), False),
    "an address ending in a dot": (_set("personalizations.0.to.0.email", "a.@x.com"), False),
    "an address of 255 characters": (
        _set("personalizations.0.to.0.email", "a" * 249 + "@x.com"),
        False,
    ),
    "an address of 254 characters": (
        _set("personalizations.0.to.0.email", "a" * 248 + "@x.com"),
        True,
    ),
    "a name with a comma": (_set("personalizations.0.to.0.name", "Lovelace, Ada"), False),
    "a name with a semicolon": (_set("personalizations.2.to.0.name", "A;B"), False),
    "a name that is a number": (_set("personalizations.0.to.0.name", 1), False),
    "an empty name": (_set("personalizations.0.to.0.name", ""), True),
    "the same address in another personalization": (
        _set("personalizations.2.to.0.email", "U0@EXAMPLE.com"),
        False,
    ),
    "the same address in cc": (_set("personalizations.1.cc", [{"email": "u1@example.com"}]), False),
    "an empty cc": (_set("personalizations.1.cc", []), False),
    "an empty bcc": (_set("personalizations.1.bcc", []), False),
    "1000 recipients": (_set("personalizations.0.cc", _cc(997)), True),
    "1001 recipients": (_set("personalizations.0.cc", _cc(998)), False),
    "1001 cc in one personalization": (_set("personalizations.0.cc", _cc(1001)), False),
    "1001 personalizations": (
        lambda body: body.__setitem__("personalizations", mailroom_body(1001)["personalizations"]),
        False,
    ),
    "no personalizations": (_set("personalizations", []), False),
    "personalizations that are an object": (_set("personalizations", {}), False),
    "a substitution that is a number": (_set("personalizations.0.substitutions.%%n%%", 1), False),
    "a substitution that is null": (_set("personalizations.1.substitutions.%%n%%", None), False),
    "substitutions that are a list": (_set("personalizations.0.substitutions", ["a"]), False),
    "empty substitutions": (_set("personalizations.0.substitutions", {}), True),
    "substitutions of 10,000 ASCII bytes": (
        _set("personalizations.0.substitutions", _substitutions_of(10_000, "x")),
        True,
    ),
    "substitutions of 10,001 ASCII bytes": (
        _set("personalizations.0.substitutions", _substitutions_of(10_001, "x")),
        False,
    ),
    "substitutions of 10,000 bytes in two-byte characters": (
        _set("personalizations.0.substitutions", {"%%k%%": "x" + "é" * 4997}),
        True,
    ),
    "substitutions of 10,002 bytes in two-byte characters": (
        _set("personalizations.0.substitutions", {"%%k%%": "x" + "é" * 4998}),
        False,
    ),
    "substitutions over 10,000 bytes in four-byte characters": (
        _set("personalizations.0.substitutions", {"%%k%%": "𝄞" * 2499}),
        False,
    ),
    "substitutions within 10,000 bytes in four-byte characters": (
        _set("personalizations.0.substitutions", {"%%k%%": "𝄞" * 2498}),
        True,
    ),
    "a lone surrogate in a substitution": (
        _set("personalizations.1.substitutions.%%first_name%%", "\udc00"),
        False,  # the full rules cannot measure it and raise: the server's 500
    ),
    "many errors, then a lone surrogate": (_many_errors_then_a_lone_surrogate, False),
    "a reserved header in a personalization": (
        _set("personalizations.0.headers.Reply-To", "x@example.com"),
        False,
    ),
    "a reserved header in capitals": (
        _set("personalizations.0.headers.DKIM-SIGNATURE", "x"),
        False,
    ),
    "a header value that is a number": (_set("personalizations.1.headers.X-N", 1), False),
    "headers that are a string": (_set("personalizations.1.headers", "X-A: 1"), False),
    "a custom argument in a personalization": (
        _set("personalizations.0.custom_args", {"k": "v"}),
        True,
    ),
    "a custom argument that is a number": (
        _set("personalizations.0.custom_args", {"k": 1}),
        False,
    ),
    "custom arguments over 10,000 bytes": (
        _set("personalizations.0.custom_args", {"k": "ü" * 5000}),
        False,
    ),
    "send_at as a string": (_set("personalizations.0.send_at", "soon"), False),
    "send_at as a whole float": (_set("personalizations.0.send_at", 1.0), True),
    "send_at as true": (_set("personalizations.0.send_at", True), False),
    "dynamic template data of any shape": (
        _set("personalizations.0.dynamic_template_data", {"a": [1, {"b": None}]}),
        True,
    ),
    "a personalization from": (
        _set("personalizations.0.from", {"email": "other@example.org"}),
        True,
    ),
    "a personalization from without email": (_set("personalizations.0.from", {}), False),
    "every personalization with its subject, none at the top": (
        lambda body: (
            _every_personalization(lambda p: p.__setitem__("subject", "S"))(body),
            body.pop("subject"),
        ),
        True,
    ),
    "no subject anywhere": (_delete("subject"), False),
    "a template instead of subject and content": (
        lambda body: (body.pop("subject"), body.pop("content"), body.update(template_id="d-1")),
        True,
    ),
    "an empty template id": (_set("template_id", ""), False),
    "html before plain": (
        lambda body: body["content"].reverse(),
        False,
    ),
    "an empty content": (_set("content", []), False),
    "reply_to and reply_to_list": (_set("reply_to_list", [{"email": "r@example.com"}]), False),
    "an empty reply_to_list": (
        lambda body: (body.pop("reply_to"), _set("reply_to_list", [])(body)),
        False,
    ),
    "a reply_to_list of two": (
        lambda body: (
            body.pop("reply_to"),
            _set("reply_to_list", [{"email": "r@example.com"}, {"email": "s@example.com"}])(body),
        ),
        True,
    ),
    "a reply_to_list repeating one": (
        lambda body: (
            body.pop("reply_to"),
            _set("reply_to_list", [{"email": "r@example.com"}, {"email": "r@example.com"}])(body),
        ),
        False,
    ),
    "categories repeating one": (_set("categories", ["a", "b", "a"]), False),
    "eleven categories": (_set("categories", [str(i) for i in range(11)]), False),
    "an unknown attachment disposition": (
        _set("attachments", [{"content": "SGk=", "filename": "a", "disposition": "x"}]),
        False,
    ),
    "an inline attachment": (
        _set("attachments", [{"content": "SGk=", "filename": "a", "disposition": "inline"}]),
        True,
    ),
    "a disposition that is a number": (
        _set("attachments", [{"content": "SGk=", "filename": "a", "disposition": 1}]),
        False,
    ),
    "unsubscribe groups repeating one": (
        _set("asm", {"group_id": 1, "groups_to_display": [1, 2, 1]}),
        True,  # the document asks no uniqueItems of them
    ),
    "26 unsubscribe groups": (
        _set("asm", {"group_id": 1, "groups_to_display": list(range(26))}),
        False,
    ),
    "unsubscribe groups 1 and true": (
        _set("asm", {"group_id": 1, "groups_to_display": [1, True]}),
        False,  # true is no integer
    ),
    "a reserved header at the top": (_set("headers", {"x-sg-id": "1"}), False),
    "campaign custom arguments with a number": (_set("custom_args.attempt", 2), False),
    "a body that is a list": (lambda body: None, False),
}


def _changed(case: str) -> object:
    if case == "a body that is a list":
        return [mailroom_body()]
    body = mailroom_body()
    CHANGES[case][0](body)
    return body


@pytest.mark.parametrize("case", CHANGES, ids=list(CHANGES))
def test_the_quick_path_answers_each_listed_change_as_the_full_one(case: str) -> None:
    body = _changed(case)
    full = answers(validate_in_full, body)

    assert answers(validate_mail_send, body) == full
    assert mail_send_is_valid()(body) is mail_send_validator().is_valid(body)
    assert (full == []) is CHANGES[case][1]


def test_a_lone_surrogate_is_still_the_error_it_was_unless_other_errors_come_first() -> None:
    assert answers(validate_mail_send, _changed("a lone surrogate in a substitution")) is (
        UnicodeEncodeError
    )
    errors = validate_mail_send(_changed("many errors, then a lone surrogate"))
    assert len(errors) == validation.MAX_REPORTED_ERRORS


# -- bodies broken at random -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
ADDRESS_ALPHABET = 'aZ09.-_+@ ,;<>()[]":\\é\t'
addresses = st.one_of(
    st.text(alphabet=ADDRESS_ALPHABET, max_size=24),
    st.builds(
        "{}@{}.{}".format,
        st.text(alphabet="ab.+-é", min_size=1, max_size=6),
        st.text(alphabet="cd.-", min_size=1, max_size=5),
        st.sampled_from(["com", "org", "x"]),
    ),
    st.sampled_from(["u0@example.com", "U1@Example.COM", "a@b.co", "a" * 248 + "@x.com"]),
)
names = st.one_of(st.text(alphabet="Ab ,;é", max_size=6), json_values)
text_values = st.one_of(
    st.text(max_size=6),
    st.integers(0, 10_100).map(lambda n: "x" * n),
    st.integers(0, 5_100).map(lambda n: "é" * n),
    st.integers(0, 2_600).map(lambda n: "𝄞" * n),
    st.just("\ud800"),
)
PERSONALIZATION_KEYS = [
    "to",
    "cc",
    "bcc",
    "from",
    "subject",
    "headers",
    "substitutions",
    "dynamic_template_data",
    "custom_args",
    "send_at",
    "anything",
]
RESERVED_HEADER_NAMES = sorted(limits.SENDGRID_RESERVED_HEADERS)


def _recipients(draw: st.DrawFn) -> list[Any]:
    count = draw(st.sampled_from([0, 1, 2, 3, 600]))
    recipients: list[Any] = []
    for index in range(count):
        recipient: dict[str, Any] = {"email": f"r{index}@example.org"}
        if index < 3:
            if draw(st.booleans()):
                recipient["email"] = draw(addresses)
            if draw(st.booleans()):
                recipient["name"] = draw(names)
        recipients.append(recipient)
    return recipients


def _dicts(node: object) -> list[dict[str, Any]]:
    """The objects in ``node`` if it is a list (an earlier change may have replaced it)."""
    return [each for each in node if isinstance(each, dict)] if isinstance(node, list) else []


@st.composite
def personalization_changes(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """One change to one personalization of ``body`` (none if an earlier change left it no
    personalization to change)."""
    personalizations = _dicts(body.get("personalizations"))
    if not personalizations:
        return
    personalization = draw(st.sampled_from(personalizations))
    kind = draw(
        st.sampled_from(
            [
                "key",
                "recipients",
                "address",
                "name",
                "substitution",
                "header",
                "custom_args",
                "repeat",
                "drop",
            ]
        )
    )
    recipients = _dicts(personalization.get("to"))
    if kind == "key":
        personalization[draw(st.sampled_from(PERSONALIZATION_KEYS))] = draw(json_values)
    elif kind == "recipients":
        personalization[draw(st.sampled_from(["to", "cc", "bcc"]))] = _recipients(draw)
    elif kind == "address" and recipients:
        draw(st.sampled_from(recipients))["email"] = draw(addresses)
    elif kind == "name" and recipients:
        draw(st.sampled_from(recipients))["name"] = draw(names)
    elif kind == "substitution":
        key = draw(st.sampled_from(["%%first_name%%", "%%new%%", "%%ü%%", "\ud800"]))
        substitutions = personalization.get("substitutions")
        if not isinstance(substitutions, dict):
            substitutions = personalization["substitutions"] = {}
        substitutions[key] = draw(st.one_of(text_values, json_values))
    elif kind == "header":
        name = draw(st.one_of(st.sampled_from(RESERVED_HEADER_NAMES), st.just("X-Fine")))
        name = name.upper() if draw(st.booleans()) else name
        headers = personalization.get("headers")
        if not isinstance(headers, dict):
            headers = personalization["headers"] = {}
        headers[name] = draw(st.one_of(text_values, json_values))
    elif kind == "custom_args":
        personalization["custom_args"] = {
            draw(st.text(max_size=3)): draw(st.one_of(text_values, json_values))
        }
    elif kind == "repeat":
        others = [r for p in personalizations for r in _dicts(p.get("to")) if "email" in r]
        if others:
            address = draw(st.sampled_from(others))["email"]
            if isinstance(address, str) and draw(st.booleans()):
                address = address.upper()
            bcc = personalization.get("bcc")
            if not isinstance(bcc, list):
                bcc = personalization["bcc"] = []
            bcc.append({"email": address})
    elif kind == "drop" and personalization:
        del personalization[draw(st.sampled_from(sorted(personalization)))]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


@st.composite
def changed_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A Mailroom request of 1 to 6 recipients, with up to four changes, most of them to its
    personalizations, one perhaps anywhere at all."""
    body = mailroom_body(draw(st.integers(1, 6)))
    if draw(st.booleans()):
        body["attachments"] = [{"content": "SGk=", "filename": "a.txt", "disposition": "inline"}]
        body["asm"] = {"group_id": 1, "groups_to_display": [1, 2]}
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)):
            draw(personalization_changes(body))
        else:
            path = draw(st.sampled_from(list(_paths(body))[1:]))
            *parents, last = path
            target: Any = body
            for key in parents:
                target = target[key]
            target[last] = draw(json_values)
    return body


@settings(max_examples=400, deadline=None, database=None)
@given(body=changed_bodies())
def test_the_quick_path_answers_any_changed_body_as_the_full_one(body: dict[str, Any]) -> None:
    assert_same_answers(body)


@settings(max_examples=300, deadline=None, database=None)
@given(body=changed_bodies())
def test_the_quick_rules_agree_with_the_full_rules_on_any_body_the_schema_takes(
    body: dict[str, Any],
) -> None:
    if not mail_send_validator().is_valid(body):
        return
    full = answers(validation._documented_rule_errors, body)

    assert validation._documented_rules_hold(body) is (full == [])


# -- the schema's yes-or-no, keyword by keyword ------------------------------------------------

SCHEMAS: dict[str, object] = {
    "true": True,
    "false": False,
    "integer": {"type": "integer"},
    "number or null": {"type": ["number", "null"]},
    "boolean": {"type": "boolean"},
    "an object of bounded size": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "no additional properties": {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": False,
    },
    "additional properties of a type": {
        "properties": {"a": True},
        "additionalProperties": {"type": "integer"},
        "required": ["a"],
    },
    "pattern properties (left to the validator)": {
        "patternProperties": {"^x": {"type": "string"}},
        "additionalProperties": {"type": "boolean"},
    },
    "an array of bounded size": {"type": "array", "minItems": 1, "maxItems": 2},
    "items false": {"items": False},
    "prefix items (left to the validator)": {"prefixItems": [{"type": "string"}], "items": False},
    "unique items of any kind": {"uniqueItems": True},
    "unique strings": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    "an enum of mixed values": {"enum": ["a", 1, None, [1], {"a": 1}, False]},
    "a string enum with a type": {"type": "string", "enum": ["inline", "attachment"]},
    "string lengths without a type": {"minLength": 2, "maxLength": 3},
    "an email": {"type": "string", "format": "email"},
    "an email of any type": {"format": "email"},
    "an unchecked format": {"type": "string", "format": "uri"},
    "all of two": {"allOf": [{"type": "string"}, {"maxLength": 2}]},
    "any of (left to the validator)": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "not (left to the validator)": {"properties": {"a": {"not": {"type": "null"}}}},
    "an object whose values are email lists": {
        "type": "object",
        "additionalProperties": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"email": {"type": "string", "format": "email"}},
                "required": ["email"],
            },
            "maxItems": 2,
        },
    },
}


@cache
def _validators(case: str) -> tuple[Any, Callable[[object], bool]]:
    validator = Draft202012Validator(
        SCHEMAS[case], format_checker=mail_send_validator().format_checker
    )
    return validator, compile_is_valid(validator)


instances = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-1, 2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1.0, "a", "x", "inline", "ada@example.com", "a..b@x.com", "ab"])
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "x1", "email"]), inner, max_size=3)
    ),
    max_leaves=10,
)


@pytest.mark.parametrize("case", SCHEMAS, ids=list(SCHEMAS))
@settings(max_examples=150, deadline=None, database=None)
@given(instance=instances)
def test_the_compiled_yes_or_no_is_jsonschemas_own_for_each_keyword(
    case: str, instance: object
) -> None:
    validator, is_valid = _validators(case)

    assert is_valid(instance) is validator.is_valid(instance)


def test_the_compiled_yes_or_no_of_the_published_schema_is_jsonschemas_own() -> None:
    compiled = mail_send_validator()
    reference = Draft202012Validator(compiled.schema, format_checker=FormatChecker(formats=()))
    reference.format_checker.checks("email")(
        lambda value: not isinstance(value, str) or is_valid_address(value)
    )
    of_jsonschema = compile_is_valid(reference)
    for case in CHANGES:
        body = _changed(case)
        assert of_jsonschema(body) is reference.is_valid(body) is compiled.is_valid(body), case


def test_an_exception_on_the_quick_path_is_a_no() -> None:
    def explode(value: object) -> bool:
        raise RuntimeError("a format checker that fails")

    checker = FormatChecker(formats=())
    checker.checks("boom")(explode)
    is_valid = compile_is_valid(Draft202012Validator({"format": "boom"}, format_checker=checker))

    assert is_valid("anything") is False


# -- format: email, as it was defined before it was one regular expression -------------------

_FORBIDDEN = r"\s,;<>()\[\]\"\\:@"
_PREVIOUS_ADDRESS = re.compile(rf"[^{_FORBIDDEN}]+@(?:[^{_FORBIDDEN}.]+\.)+[^{_FORBIDDEN}.]+")


def previous_is_valid_address(address: object) -> bool:
    """``schema.is_valid_address`` as it was (git 1b7a6f8), copied: never change it."""
    if not isinstance(address, str) or len(address) > 254:
        return False
    if not _PREVIOUS_ADDRESS.fullmatch(address):
        return False
    local = address.rsplit("@", 1)[0]
    return not (local.startswith(".") or local.endswith(".") or ".." in local)


@settings(max_examples=2000, deadline=None, database=None)
@given(address=st.one_of(addresses, st.text(alphabet="a.@b", max_size=12), json_values))
def test_an_address_is_valid_exactly_when_it_was(address: object) -> None:
    assert is_valid_address(address) is previous_is_valid_address(address)


@pytest.mark.parametrize(
    "address",
    ["a.b@c.d", ".a@c.d", "a.@c.d", "a..b@c.d", "a@b@c.d", "a@.c.d", "a@c..d", "a@c.d.", "é@ü.x"],
)
def test_the_dots_of_an_address_are_judged_as_they_were(address: str) -> None:
    assert is_valid_address(address) is previous_is_valid_address(address)


# -- decoding once: json.loads and the store see what they saw --------------------------------


def _encodings(text: str) -> dict[str, bytes]:
    return {
        "utf-8": text.encode(),
        "utf-8 with a BOM": b"\xef\xbb\xbf" + text.encode(),
        "utf-16": text.encode("utf-16"),
        "utf-16-le": text.encode("utf-16-le"),
        "utf-16-be": text.encode("utf-16-be"),
        "utf-32": text.encode("utf-32"),
        "latin-1": text.encode("latin-1", "replace"),
        "an encoded surrogate": text.encode() + b"\xed\xa0\x80",
        "an escaped surrogate": text.encode().replace(b"Ada", b"\\ud800"),
        "two lines": text.encode().replace(b", ", b",\n"),
    }


RAW_TEXTS = [
    json.dumps(mailroom_body(1), ensure_ascii=False),
    json.dumps(mailroom_body(1)),
    '{"personalizations": [{"to": [{"email": "ada@example.com", "name": "Ada Zoë"}]}]}',
    "[1, 2]",
    "",
    " ",
    "not json",
]


@pytest.mark.parametrize("encoding", list(_encodings("")), ids=list(_encodings("")))
@pytest.mark.parametrize("text", RAW_TEXTS, ids=range(len(RAW_TEXTS)))
def test_the_decoded_text_parses_as_the_bytes_did_and_is_stored_as_they_were(
    text: str, encoding: str
) -> None:
    raw = _encodings(text)[encoding]
    decoded = server._utf8_text(raw)

    # Compared as written: ``NaN`` reads as a float that equals nothing, itself included.
    once = answers(json.loads, raw if decoded is None else decoded)
    assert repr(once) == repr(answers(json.loads, raw))
    if decoded is not None:
        assert decoded == raw.decode("utf-8")
        assert store._one_utf8_line(raw, utf8=True) is store._one_utf8_line(raw)
        record = {"message_id": "m", "received_at": "t", "size": len(raw), "body": {"a": 1}}
        assert store._encode(record, raw, utf8=True) == store._encode(record, raw)


@settings(max_examples=300, deadline=None, database=None)
@given(raw=st.one_of(st.binary(max_size=12), st.text(max_size=12).map(str.encode)))
def test_decoding_once_changes_nothing_for_any_bytes(raw: bytes) -> None:
    decoded = server._utf8_text(raw)

    # Compared as written: ``NaN`` reads as a float that equals nothing, itself included.
    once = answers(json.loads, raw if decoded is None else decoded)
    assert repr(once) == repr(answers(json.loads, raw))
    if decoded is not None:
        assert store._one_utf8_line(raw, utf8=True) is store._one_utf8_line(raw)


def test_a_utf16_body_is_still_accepted_and_recorded_as_its_value() -> None:
    body = mailroom_body(2)
    raw = json.dumps(body).encode("utf-16")
    with (
        tempfile.TemporaryDirectory() as data_dir,
        SendGridDevServer(data_dir=Path(data_dir)) as running,
    ):
        response = requests.post(
            running.url + "/v3/mail/send",
            data=raw,
            headers={"Authorization": "Bearer SG.test"},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        [record] = read_accepted(Path(data_dir))
    assert record["body"] == body
    assert record["size"] == len(raw)


# -- counting recipients -----------------------------------------------------------------------


def test_to_cc_and_bcc_are_all_counted() -> None:
    body = mailroom_body(3)
    body["personalizations"][0]["cc"] = _cc(2)
    body["personalizations"][1]["bcc"] = _cc(3, start=2)
    body["personalizations"][2]["cc"] = _cc(1, start=5)
    body["personalizations"][2]["bcc"] = _cc(1, start=6)
    assert validate_in_full(body) == []

    assert count_recipients(body) == len(list(iter_recipient_addresses(body))) == 3 + 7


@settings(max_examples=200, deadline=None, database=None)
@given(body=changed_bodies())
def test_recipients_are_counted_as_they_are_listed(body: dict[str, Any]) -> None:
    if answers(validate_in_full, body) != []:
        return
    assert count_recipients(body) == len(list(iter_recipient_addresses(body)))
