"""SendGrid's published OpenAPI document as the dev server uses it: vendored and packaged, in
agreement with Mailroom's limits, corrected only where it is known to be wrong, and compiled into
a validator that reports exactly what jsonschema's own validator reports."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from mailroom.checks import limits
from sendgrid_dev import validate_mail_send
from sendgrid_dev.schema import (
    DOCUMENT_FILE,
    compile_validator,
    is_valid_address,
    load_document,
    mail_send_schema,
    mail_send_validator,
)
from support.request_bodies import mailroom_request_body

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
OPENAPI = REPO / "src" / "sendgrid_dev" / "openapi"


def published_request_schema() -> dict[str, Any]:
    """The mail-send request schema exactly as published (still with its ``$ref``s)."""
    document = load_document()
    schema: dict[str, Any] = document["components"]["requestBodies"]["PostMailSend"]["content"][
        "application/json"
    ]["schema"]
    return schema


def described_bytes(description: str) -> int:
    found = re.search(r"([\d,]+) bytes", description)
    assert found, description
    return int(found.group(1).replace(",", ""))


def mail_body(*addresses: str, **top_level: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "personalizations": [{"to": [{"email": address}]} for address in addresses],
        "from": {"email": "news@example.org", "name": "News"},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "Hi"}],
    }
    body.update(top_level)
    return body


# -- vendored, packaged, nothing outside the package needed -----------------------------------


def test_the_vendored_document_is_the_one_its_source_note_names() -> None:
    note = (OPENAPI / "SOURCE.txt").read_text("utf-8")
    digest = hashlib.sha256((OPENAPI / DOCUMENT_FILE).read_bytes()).hexdigest()

    assert f"{digest}  {DOCUMENT_FILE}" in note
    assert "twilio/sendgrid-oai" in note
    assert (OPENAPI / "LICENSE").read_text("utf-8").startswith("MIT License")
    document = load_document()
    assert document["openapi"].startswith("3.1")
    assert "post" in document["paths"]["/v3/mail/send"]


def test_every_vendored_file_is_package_data() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sendgrid_dev"]
    vendored = sorted(p.relative_to(OPENAPI.parent).as_posix() for p in OPENAPI.iterdir())

    assert vendored == ["openapi/LICENSE", "openapi/SOURCE.txt", f"openapi/{DOCUMENT_FILE}"]
    for name in vendored:
        assert any(fnmatch(name, pattern) for pattern in patterns), name
    assert "jsonschema" in " ".join(pyproject["project"]["dependencies"])


# -- the limits Mailroom reads agree with the document ----------------------------------------


def test_the_limits_in_mailroom_agree_with_the_published_document() -> None:
    published = published_request_schema()["properties"]
    personalization = published["personalizations"]["items"]["properties"]

    assert published["personalizations"]["maxItems"] == limits.MAX_PERSONALIZATIONS
    assert published["categories"]["maxItems"] == limits.MAX_CATEGORIES
    assert published["categories"]["items"]["maxLength"] == limits.MAX_CATEGORY_LENGTH
    assert (
        described_bytes(personalization["substitutions"]["description"])
        == limits.MAX_SUBSTITUTIONS_BYTES
    )
    assert (
        described_bytes(personalization["custom_args"]["description"])
        == limits.MAX_CUSTOM_ARGS_BYTES
    )
    assert described_bytes(published["custom_args"]["description"]) == limits.MAX_CUSTOM_ARGS_BYTES
    for headers in (published["headers"], personalization["headers"]):
        reserved = headers["description"].split("You may not override the following headers:")[1]
        names = {name.lower() for name in re.findall(r"`([^`]+)`", reserved)}
        assert names == limits.SENDGRID_RESERVED_HEADERS
    assert limits.SENDGRID_RESERVED_HEADERS < limits.RESERVED_HEADERS


# -- references resolved, defects corrected ---------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_compiled_schema_has_every_reference_resolved() -> None:
    assert set(_refs(published_request_schema())) == {
        "#/components/schemas/MailFrom",
        "#/components/schemas/MailTo",
        "#/components/schemas/Disposition",
    }
    schema = mail_send_schema(load_document())

    assert list(_refs(schema)) == []
    recipient = schema["properties"]["personalizations"]["items"]["properties"]["to"]["items"]
    assert recipient["required"] == ["email"]
    assert recipient["properties"]["email"]["format"] == "email"
    # A $ref beside other keywords applies alongside them, as in draft 2020-12.
    disposition = schema["properties"]["attachments"]["items"]["properties"]["disposition"]
    assert disposition["type"] == "string"
    assert disposition["allOf"] == [{"type": "string", "enum": ["inline", "attachment"]}]


def test_loading_leaves_the_published_document_as_it_is() -> None:
    document = load_document()
    before = copy.deepcopy(document)

    mail_send_schema(document)

    assert document == before


def test_the_top_level_custom_args_correction_is_still_needed_and_applied() -> None:
    # When this fails, SendGrid fixed its document: drop the correction in schema._corrected.
    assert published_request_schema()["properties"]["custom_args"]["type"] == "string"

    corrected = mail_send_schema(load_document())["properties"]["custom_args"]
    assert corrected["type"] == "object"
    assert corrected["description"].startswith("Values that are specific to the entire send")


def test_a_mailroom_request_is_valid_and_the_published_document_disagrees_only_on_custom_args() -> (
    None
):
    body = mailroom_request_body()

    assert validate_mail_send(body) == []
    as_published = Draft202012Validator(
        {"$ref": "#/components/requestBodies/PostMailSend/content/application~1json/schema"}
        | {"components": load_document()["components"]},
        format_checker=FormatChecker(),
    )
    assert [(list(e.absolute_path), e.validator) for e in as_published.iter_errors(body)] == [
        (["custom_args"], "type")
    ]


# -- the compiled validator reports what jsonschema's own does --------------------------------


def _report(validator: Any, body: object) -> list[tuple[Any, ...]]:
    return sorted(
        (
            [str(p) for p in error.absolute_path],
            [str(p) for p in error.absolute_schema_path],
            error.validator,
            error.message,
        )
        for error in validator.iter_errors(body)
    )


@cache
def reference_validator() -> Any:
    """jsonschema's own draft 2020-12 validator on the same schema and format checker."""
    compiled = mail_send_validator()
    return Draft202012Validator(compiled.schema, format_checker=compiled.format_checker)


BROKEN: dict[str, object] = {
    "not an object": ["personalizations"],
    "nothing": {},
    "every type wrong": {
        "personalizations": [
            {
                "to": [{"email": 1, "name": ["Ada"]}, "bob@example.com", {}],
                "cc": {"email": "c@example.com"},
                "substitutions": {"%%a%%": 1, "%%b%%": None, "%%c%%": "fine"},
                "custom_args": [],
                "headers": "X-A: 1",
                "send_at": 1.5,
                "subject": "",
            },
            "second",
        ],
        "from": {"email": "not an address", "name": None},
        "reply_to_list": [{"email": "r@example.com"}, {"email": "r@example.com"}],
        "content": [{"type": "", "value": 3}, {}],
        "attachments": [{"content": "", "disposition": "sideways"}],
        "categories": ["a"] * 11 + ["x" * 256],
        "asm": {"groups_to_display": list(range(26))},
        "mail_settings": {"sandbox_mode": {"enable": "true"}, "footer": []},
        "tracking_settings": {"ganalytics": {"utm_source": 7}},
        "ip_pool_name": "p" * 65,
        "send_at": "tomorrow",
        "custom_args": "a=b",
    },
    "too many personalizations": mail_body(*(f"u{i}@example.com" for i in range(1001))),
    "a valid body": mail_body("ada@example.com", custom_args={"a": "b"}),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_compiled_validator_reports_exactly_what_jsonschema_reports(case: str) -> None:
    compiled = mail_send_validator()
    report = _report(compiled, BROKEN[case])

    assert report == _report(reference_validator(), BROKEN[case])
    assert (report == []) == (case == "a valid body")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_compiled_validator_agrees_with_jsonschema_on_any_one_changed_value(
    data: st.DataObject,
) -> None:
    body = copy.deepcopy(mailroom_request_body())
    body["attachments"] = [{"content": "SGk=", "filename": "a.txt", "disposition": "inline"}]
    body["mail_settings"] = {"sandbox_mode": {"enable": False}}
    body["personalizations"][1]["cc"] = [{"email": "c@example.com", "name": "C"}]
    path = data.draw(st.sampled_from(list(_paths(body))[1:]))
    *parents, last = path
    target = body
    for key in parents:
        target = target[key]
    target[last] = data.draw(json_values)

    assert _report(mail_send_validator(), body) == _report(reference_validator(), body)


# -- compiled once ----------------------------------------------------------------------------


def test_the_validator_is_compiled_once_per_process() -> None:
    assert mail_send_validator() is mail_send_validator()
    fresh = compile_validator(mail_send_schema(load_document()))
    assert fresh is not mail_send_validator()
    assert fresh.is_valid(mailroom_request_body())


@pytest.mark.parametrize(
    ("address", "valid"),
    [
        ("ada@example.com", True),
        ("ada.lovelace+news@sub.example.co.uk", True),
        ("ada@example", False),
        ("Ada <ada@example.com>", False),
        ("a@x.com, b@y.com", False),
        ("ada..l@example.com", False),
        (".ada@example.com", False),
        ("a" * 250 + "@x.com", False),
    ],
)
def test_format_email_means_one_bare_address(address: str, valid: bool) -> None:
    assert is_valid_address(address) is valid
    body = mail_body(address)
    assert mail_send_validator().is_valid(body) is valid


@pytest.mark.parametrize(
    "settings_", [{}, {"sandbox_mode": {"enable": True}}], ids=["plain", "sandbox"]
)
def test_a_body_valid_by_the_schema_may_still_break_a_documented_rule(
    settings_: dict[str, Any],
) -> None:
    body = mail_body("ada@example.com", "ADA@example.com", mail_settings=settings_)

    assert mail_send_validator().is_valid(body)
    assert [error.field for error in validate_mail_send(body)] == ["personalizations.1.to.0.email"]


def test_a_body_the_schema_refuses_gets_only_the_schema_errors() -> None:
    body = mail_body("ada@example.com", "ada@example.com", send_at="soon")

    assert [(e.field, e.message) for e in validate_mail_send(body)] == [
        ("send_at", "The send_at value must be of type integer.")
    ]


def test_the_answer_is_bounded_however_broken_the_body() -> None:
    body = mail_body(*(f"u{i}@example" for i in range(500)))

    errors = validate_mail_send(body)

    assert len(errors) == 50
    assert json.dumps([e.to_json() for e in errors]).count("Does not contain a valid address") == 50
