"""SendGrid's published OpenAPI document for Mail Send, compiled once into a JSON Schema validator.

The document (``openapi/tsg_mail_v3.json``, vendored unchanged; see ``openapi/SOURCE.txt``) is
OpenAPI 3.1, whose schemas are JSON Schema draft 2020-12. The request body schema of
``POST /v3/mail/send`` is taken from the operation itself, its ``$ref``s are resolved with
``referencing`` (the library ``jsonschema`` resolves references with) and inlined, the published
document's known defects are corrected (``_corrected``), and the result is compiled once per
process (``mail_send_validator``), never per request.

Compiling also builds the validator of every subschema once. ``jsonschema`` otherwise creates a
new validator object for each subschema it descends into, for every personalization of every
request; reusing them, and testing the plain JSON types with one ``isinstance``, takes one
1,000-personalization body from about 60 ms to about 10 ms. The errors, their paths and their
schema paths stay exactly those of ``jsonschema``'s own draft 2020-12 validator
(``tests/unit/test_sendgrid_openapi.py`` holds the two to the same errors).
"""

import functools
import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker, validators
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from sendgrid_dev.errors import DevServerError

DOCUMENT_FILE = "tsg_mail_v3.json"
# Only names the document inside the registry: nothing is ever fetched.
DOCUMENT_URI = "urn:mailroom:sendgrid-oai:tsg_mail_v3.json"
MAIL_SEND_PATH = "/v3/mail/send"
REQUEST_MEDIA_TYPE = "application/json"

# Where draft 2020-12 keeps subschemas: one, a map of them, or a list of them. Everything else in
# a schema is data (enum, default, example, ...) and is left as it is.
_ONE_SCHEMA = frozenset(
    {
        "additionalProperties",
        "contains",
        "else",
        "if",
        "items",
        "not",
        "propertyNames",
        "then",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
_SCHEMA_MAP = frozenset({"$defs", "dependentSchemas", "patternProperties", "properties"})
_SCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})

# The JSON types that jsonschema's own draft 2020-12 type checker tests with one isinstance.
_PLAIN_TYPES: dict[str, type] = {"array": list, "boolean": bool, "object": dict, "string": str}
_STOCK = Draft202012Validator.VALIDATORS

# What ``format: email`` means here: one bare address; no display name, no list separators, no
# whitespace or angle brackets. Stricter than SendGrid is known to be, never looser.
_FORBIDDEN_IN_ADDRESS = r"\s,;<>()\[\]\"\\:@"
_EMAIL_ADDRESS = re.compile(
    rf"[^{_FORBIDDEN_IN_ADDRESS}]+@(?:[^{_FORBIDDEN_IN_ADDRESS}.]+\.)+[^{_FORBIDDEN_IN_ADDRESS}.]+"
)
_MAX_ADDRESS_LENGTH = 254


def is_valid_address(address: object) -> bool:
    """Whether ``address`` is one syntactically valid bare email address."""
    if not isinstance(address, str) or len(address) > _MAX_ADDRESS_LENGTH:
        return False
    if not _EMAIL_ADDRESS.fullmatch(address):
        return False
    local = address.rsplit("@", 1)[0]
    return not (local.startswith(".") or local.endswith(".") or ".." in local)


def load_document() -> dict[str, Any]:
    """The vendored OpenAPI document, as published."""
    source = resources.files(__package__).joinpath("openapi", DOCUMENT_FILE)
    document: dict[str, Any] = json.loads(source.read_text("utf-8"))
    return document


def mail_send_schema(document: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a ``POST /v3/mail/send`` body: self-contained (no ``$ref`` left),
    with Mailroom's corrections. ``document`` itself is not changed."""
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, DRAFT202012.create_resource(document)
    )
    resolver = registry.resolver(base_uri=DOCUMENT_URI)
    request_body: Any = document["paths"][MAIL_SEND_PATH]["post"]["requestBody"]
    if "$ref" in request_body:  # an OpenAPI Reference Object into components.requestBodies
        resolved = resolver.lookup(request_body["$ref"])
        request_body, resolver = resolved.contents, resolved.resolver
    schema = _inlined(request_body["content"][REQUEST_MEDIA_TYPE]["schema"], resolver, ())
    return _corrected(schema)


def _inlined(schema: Any, resolver: Any, refs: tuple[str, ...]) -> Any:
    """``schema`` as a new tree with each ``$ref`` replaced by what it refers to. A ``$ref``
    with sibling keywords becomes one more ``allOf`` entry, which is what it means in 2020-12."""
    if not isinstance(schema, dict):
        return schema  # true or false
    inlined: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword == "$ref":
            continue
        if keyword in _ONE_SCHEMA:
            inlined[keyword] = _inlined(value, resolver, refs)
        elif keyword in _SCHEMA_MAP:
            inlined[keyword] = {k: _inlined(v, resolver, refs) for k, v in value.items()}
        elif keyword in _SCHEMA_LIST:
            inlined[keyword] = [_inlined(v, resolver, refs) for v in value]
        else:
            inlined[keyword] = value
    ref = schema.get("$ref")
    if ref is None:
        return inlined
    if ref in refs:
        raise DevServerError(f"the OpenAPI document refers to {ref} inside itself")
    resolved = resolver.lookup(ref)
    target = _inlined(resolved.contents, resolved.resolver, (*refs, ref))
    if not inlined:
        return target
    inlined["allOf"] = [*inlined.get("allOf", ()), target]
    return inlined


def _corrected(schema: dict[str, Any]) -> dict[str, Any]:
    """The published document's known defects, corrected here rather than in the vendored file
    (``tests/unit/test_sendgrid_openapi.py`` fails once the document no longer has them)."""
    properties = schema["properties"]
    # The top-level custom_args is typed "string", yet its own description speaks of a size in
    # bytes across arguments, personalizations[].custom_args is an object, SendGrid takes an
    # object of strings and its Python SDK sends one (Mail.get()). As published, every request
    # that sets campaign-wide custom_args, as Mailroom's do, would be refused.
    properties["custom_args"] = {**properties["custom_args"], "type": "object"}
    return schema


def _subschemas(schema: Any) -> Iterator[dict[str, Any]]:
    """Every subschema of ``schema`` (an inlined one), itself first."""
    if not isinstance(schema, dict):
        return
    yield schema
    for keyword, value in schema.items():
        if keyword in _ONE_SCHEMA:
            yield from _subschemas(value)
        elif keyword in _SCHEMA_MAP:
            for subschema in value.values():
                yield from _subschemas(subschema)
        elif keyword in _SCHEMA_LIST:
            for subschema in value:
                yield from _subschemas(subschema)


def _email_format() -> FormatChecker:
    checker = FormatChecker(formats=())
    # Only strings have a format to check; anything else is the type keyword's to refuse.
    checker.checks("email")(lambda value: not isinstance(value, str) or is_valid_address(value))
    return checker


def compile_validator(schema: dict[str, Any]) -> Any:
    """A draft 2020-12 validator of ``schema`` (an inlined one, which must not change while it
    is in use) that asserts ``format: email`` and builds each subschema's validator once."""
    Draft202012Validator.check_schema(schema)
    compiled: dict[int, Any] = {}

    def child(validator: Any, subschema: Any) -> Any:
        found = compiled.get(id(subschema))
        return found if found is not None else validator.evolve(schema=subschema)

    # The four keywords below do what jsonschema's own do, reusing the compiled subschema
    # validators; anything they do not cover goes to jsonschema's own.
    def properties(validator: Any, properties: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if not isinstance(instance, dict):
            return
        for name, subschema in properties.items():
            if name in instance:
                for error in child(validator, subschema).iter_errors(instance[name]):
                    error.path.appendleft(name)
                    error.schema_path.appendleft(name)
                    yield error

    def items(validator: Any, items: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if not isinstance(items, dict) or "prefixItems" in schema:
            yield from _STOCK["items"](validator, items, instance, schema)
            return
        if not isinstance(instance, list):
            return
        item_validator = child(validator, items)
        for index, item in enumerate(instance):
            for error in item_validator.iter_errors(item):
                error.path.appendleft(index)
                yield error

    def additional_properties(
        validator: Any, additional: Any, instance: Any, schema: Any
    ) -> Iterator[Any]:
        if not isinstance(additional, dict) or "patternProperties" in schema:
            yield from _STOCK["additionalProperties"](validator, additional, instance, schema)
            return
        if not isinstance(instance, dict):
            return
        declared = schema.get("properties", {})
        value_validator = child(validator, additional)
        for name, value in instance.items():
            if name not in declared:
                for error in value_validator.iter_errors(value):
                    error.path.appendleft(name)
                    yield error

    def type_(validator: Any, types: Any, instance: Any, schema: Any) -> Iterator[Any]:
        plain = _PLAIN_TYPES.get(types) if isinstance(types, str) else None
        if plain is None or not isinstance(instance, plain):
            yield from _STOCK["type"](validator, types, instance, schema)

    cls = validators.extend(
        Draft202012Validator,
        {
            "additionalProperties": additional_properties,
            "items": items,
            "properties": properties,
            "type": type_,
        },
    )
    root = cls(schema, format_checker=_email_format())
    for subschema in _subschemas(schema):
        compiled[id(subschema)] = root if subschema is schema else root.evolve(schema=subschema)
    return root


@functools.cache
def mail_send_validator() -> Any:
    """The compiled validator of a mail-send body, built on first use and kept for the process."""
    return compile_validator(mail_send_schema(load_document()))
