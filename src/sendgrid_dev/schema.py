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

Most bodies are valid, and for those nothing but the yes is needed: ``compile_is_valid`` builds
once, beside the validator, one plain predicate per subschema that answers "no error anywhere"
without making an error object, a path or a generator (``mail_send_is_valid``). It covers the
keywords this document uses, each with ``jsonschema``'s own meaning; a subschema with any other
keyword is answered by its compiled validator. Its no only sends the body down the validator's
path, so every error still comes from there: the answers are those of the validator alone, for
about a fifth of the time on a valid 1,000-personalization body.
"""

import functools
import json
import re
from collections.abc import Callable, Iterator
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
# The local part may hold dots, but not first, last or two in a row: runs of other characters
# joined by single dots. The domain is two or more such runs. ``@`` is forbidden in both, so an
# address has exactly one.
_FORBIDDEN_IN_ADDRESS = r"\s,;<>()\[\]\"\\:@"
_RUN = rf"[^{_FORBIDDEN_IN_ADDRESS}.]+"
_EMAIL_ADDRESS = re.compile(rf"{_RUN}(?:\.{_RUN})*@(?:{_RUN}\.)+{_RUN}")
_MAX_ADDRESS_LENGTH = 254


def is_valid_address(address: object) -> bool:
    """Whether ``address`` is one syntactically valid bare email address."""
    return (
        isinstance(address, str)
        and len(address) <= _MAX_ADDRESS_LENGTH
        and _EMAIL_ADDRESS.fullmatch(address) is not None
    )


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


def _conforms_to_email(value: object) -> bool:
    # Only strings have a format to check; anything else is the type keyword's to refuse.
    return not isinstance(value, str) or is_valid_address(value)


def _email_format() -> FormatChecker:
    checker = FormatChecker(formats=())
    checker.checks("email")(_conforms_to_email)
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


@functools.cache
def mail_send_is_valid() -> Callable[[object], bool]:
    """``compile_is_valid`` of ``mail_send_validator()``, built once per process."""
    return compile_is_valid(mail_send_validator())


# -- the yes-or-no of a validator, without its errors -----------------------------------------

# What a subschema compiles to: a predicate, True only if the validator reports no error for the
# instance; a class, when all the subschema asks is that the instance be one (a plain type,
# tested with one isinstance where it is used); or None when nothing can fail (no keyword that
# does).
_Check = Callable[[Any], bool]
_Compiled = _Check | type | None
# The keywords ``compile_is_valid`` answers itself; a subschema with any other keyword the
# validator acts on is answered by that subschema's validator.
_FAST_KEYWORDS = frozenset(
    {
        "additionalProperties",
        "allOf",
        "enum",
        "format",
        "items",
        "maxItems",
        "maxLength",
        "maxProperties",
        "minItems",
        "minLength",
        "minProperties",
        "properties",
        "required",
        "type",
        "uniqueItems",
    }
)
_NO_LIMIT = float("inf")


def _never(instance: object) -> bool:
    return False


def _holds(check: _Compiled, instance: object) -> bool:
    if check is None:
        return True
    if isinstance(check, type):
        return isinstance(instance, check)
    return check(instance)


def _as_predicate(check: _Compiled) -> _Check | None:
    """``check`` as a function (None stays None): for a class, its own isinstance test, which
    ``cls.__instancecheck__(x)`` is for the plain types, and made in C."""
    if check is None:
        return None
    if isinstance(check, type):
        instance_check: _Check = check.__instancecheck__
        return instance_check
    return check


def compile_is_valid(validator: Any) -> Callable[[object], bool]:
    """A predicate of ``validator`` (one of ``compile_validator``'s, or jsonschema's own draft
    2020-12 validator): True exactly when ``validator.iter_errors(instance)`` would yield
    nothing. An exception on the way is a False, so whatever the validator does with such an
    instance (raise, or report) stays its own doing: a caller asks the validator on a False."""
    known = validator.VALIDATORS
    format_checker = validator.format_checker
    is_type = validator.is_type
    checks: dict[int, _Compiled] = {}

    def keyword_holds(keyword: str, value: Any, instance: Any, keywords: dict[str, Any]) -> bool:
        """Whether the validator's own function for ``keyword`` (one that reads nothing but its
        value and the instance) finds nothing wrong."""
        errors = known[keyword](validator, value, instance, keywords) or ()
        return next(iter(errors), None) is None

    def check_of(subschema: Any) -> _Compiled:
        key = id(subschema)
        if key not in checks:
            checks[key] = compiled(subschema)
        return checks[key]

    def compiled(subschema: Any) -> _Compiled:
        if subschema is True:
            return None
        if subschema is False:
            return _never
        keywords = {k: v for k, v in subschema.items() if k in known}
        if (
            not keywords.keys() <= _FAST_KEYWORDS
            or "patternProperties" in subschema
            or "prefixItems" in subschema
        ):
            fallback: _Check = validator.evolve(schema=subschema).is_valid
            return fallback
        types = keywords.get("type")
        plain = _PLAIN_TYPES.get(types) if isinstance(types, str) else None
        others = any_type_checks(keywords)
        if plain is None:
            return general_check(types, keywords, others)
        # Only the keywords of that type can fail: the others do nothing to an instance of it.
        if plain is dict:
            own = object_check(keywords, typed=not others)
        elif plain is list:
            own = array_check(keywords, typed=not others)
        elif plain is str:
            own = string_check(keywords, typed=not others)
        else:
            own = None
        if not others:
            return plain if own is None else own
        if plain is str and own is None and others == [_conforms_to_email]:
            return is_valid_address  # False for anything but a str, as the type says
        tests = ([] if own is None else [own]) + others
        return lambda instance: (
            isinstance(instance, plain) and all(test(instance) for test in tests)
        )

    def object_check(keywords: dict[str, Any], *, typed: bool) -> _Check | None:
        """What properties, additionalProperties, required and min/maxProperties ask of a dict;
        ``typed``: and that the instance be one."""
        required: tuple[str, ...] = tuple(keywords.get("required", ()))
        most = keywords.get("maxProperties", _NO_LIMIT)
        least = keywords.get("minProperties", 0)
        declared = {
            name: _as_predicate(check_of(subschema))
            for name, subschema in keywords.get("properties", {}).items()
        }
        extra = _as_predicate(check_of(keywords.get("additionalProperties", True)))
        per_value = extra is not None or any(check is not None for check in declared.values())
        if not (typed or required or per_value or least or most != _NO_LIMIT):
            return None
        bounded = bool(least) or most != _NO_LIMIT
        # A declared name's own check (None: anything goes), else the extras'.
        check_for = declared.get

        def check(instance: dict[str, Any]) -> bool:
            if typed and not isinstance(instance, dict):
                return False
            if bounded and not least <= len(instance) <= most:
                return False
            for name in required:
                if name not in instance:
                    return False
            if per_value:
                for name, value in instance.items():
                    value_check = check_for(name, extra)
                    if value_check is not None and not value_check(value):
                        return False
            return True

        return check

    def array_check(keywords: dict[str, Any], *, typed: bool) -> _Check | None:
        """What items, min/maxItems and uniqueItems ask of a list; ``typed``: and that the
        instance be one."""
        most = keywords.get("maxItems", _NO_LIMIT)
        least = keywords.get("minItems", 0)
        item = check_of(keywords.get("items", True))
        unique = bool(keywords.get("uniqueItems", False))
        if not (typed or item is not None or unique or least or most != _NO_LIMIT):
            return None

        def distinct(instance: list[Any]) -> bool:
            # Items that are all exactly str are equal as jsonschema compares them (==) exactly
            # when they are as a set's members; any other list is for the keyword itself.
            for each in instance:
                if type(each) is not str:
                    return keyword_holds("uniqueItems", True, instance, keywords)
            return len(set(instance)) == len(instance)

        item_check = _as_predicate(item)
        bounded = bool(least) or most != _NO_LIMIT

        def check(instance: list[Any]) -> bool:
            if typed and not isinstance(instance, list):
                return False
            if bounded and not least <= len(instance) <= most:
                return False
            if item_check is not None and not all(map(item_check, instance)):
                return False
            return not unique or distinct(instance)

        return check

    def string_check(keywords: dict[str, Any], *, typed: bool) -> _Check | None:
        """What min/maxLength ask of a str (format is any type's: ``any_type_checks``);
        ``typed``: and that the instance be one."""
        most = keywords.get("maxLength", _NO_LIMIT)
        least = keywords.get("minLength", 0)
        if not least and most == _NO_LIMIT:
            return None

        def check(instance: str) -> bool:
            if typed and not isinstance(instance, str):
                return False
            return bool(least <= len(instance) <= most)

        return check

    def any_type_checks(keywords: dict[str, Any]) -> list[_Check]:
        """format, enum and allOf, which apply whatever the instance's type."""
        found: list[_Check] = []
        if "format" in keywords and format_checker is not None:
            found.append(format_check(keywords["format"]))
        if "enum" in keywords:
            enum = keywords["enum"]
            strings = frozenset(each for each in enum if type(each) is str)

            def one_of(instance: Any) -> bool:
                # jsonschema compares a str with ==, so a str is one of them exactly when it is
                # in the set; anything else is for the keyword itself.
                if type(instance) is str:
                    return instance in strings
                return keyword_holds("enum", enum, instance, keywords)

            found.append(one_of)
        for subschema in keywords.get("allOf", ()):
            check = _as_predicate(check_of(subschema))
            if check is not None:
                found.append(check)
        return found

    def format_check(format_name: str) -> _Check:
        if format_name not in format_checker.checkers:
            return lambda instance: True
        conforms, raises = format_checker.checkers[format_name]
        if conforms is _conforms_to_email and not raises:
            email: _Check = _conforms_to_email
            return email
        return lambda instance: bool(conforms(instance))

    def general_check(types: Any, keywords: dict[str, Any], others: list[_Check]) -> _Compiled:
        """A subschema whose type is not one plain type: every keyword, each on its own type."""
        names = None if types is None else [types] if isinstance(types, str) else list(types)
        own: dict[type, _Check | None] = {
            dict: object_check(keywords, typed=False),
            list: array_check(keywords, typed=False),
            str: string_check(keywords, typed=False),
        }
        if names is None and not others and not any(own.values()):
            return None

        def check(instance: Any) -> bool:
            if names is not None and not any(is_type(instance, name) for name in names):
                return False
            for cls, test in own.items():
                if test is not None and isinstance(instance, cls) and not test(instance):
                    return False
            return all(test(instance) for test in others)

        return check

    root = check_of(validator.schema)

    def is_valid(instance: object) -> bool:
        try:
            return _holds(root, instance)
        except Exception:
            return False

    return is_valid
