"""Bad input a new user of Mailroom hits, in one table: each case is a named change to a baseline
project (the example campaign, five users, one per locale) and what Mailroom must do with it.

Refused: the stage that raises and its exact message ("{tmp}" for the case's folder), nothing
sent, the report (when the run got that far) balanced. Row-level problems: the row is
quarantined (or suppressed, or dropped as a duplicate) with its exact reason, the run sends the
others, the report balances and ``not_sent.csv`` lists the row. Always: no audience address in
any spelling, no unsubscribe token, no signing secret and no API key in any log record or in the
error. The harness is ``support.bad_input``.

A case marked ``finding`` is one Mailroom gets wrong today: the table holds the right outcome and
the mark says what is wrong (strict: it fails the run once the product is fixed, so the mark goes).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("support.bad_input")

from mailroom.campaign_spec import TOP_LEVEL_KEYS  # noqa: E402
from mailroom.errors import (  # noqa: E402
    AudienceError,
    CampaignSpecError,
    ContentError,
    ValidationFailed,
)
from mailroom.run_record import RunRefused  # noqa: E402
from support.bad_input import (  # noqa: E402
    CAMPAIGNS,
    DB_URL,
    RUN_DIR,
    SPEC,
    TEMPLATES,
    TMP,
    AlreadySent,
    Case,
    Change,
    Delivered,
    Duplicate,
    Expected,
    Quarantined,
    Refused,
    Sent,
    Suppressed,
    Unchanged,
    check_refused,
    check_sent,
    check_unchanged,
    clear_task,
    delete_file,
    earlier_run,
    edit_file,
    leaks,
    play_case,
    po,
    replace_users,
    secret,
    spec_bytes,
    spec_drop,
    spec_rename,
    spec_set,
    spec_text,
    sql,
    suppressions,
    then,
    trigger,
    users,
    write_file,
)

pytestmark = pytest.mark.unit

SHOWS_ANOTHER = "expect_column_values_to_be_in_set(first_name__shows_another_address)"
NO_HTML_UNSUBSCRIBE = (
    "winter_update/body.html (locale en): the HTML part shows no unsubscribe link (an <a "
    'href="{{ unsubscribe_url }}">, outside any comment): every message must let its reader '
    "unsubscribe"
)
NOT_ONE_ADDRESS = "expect_column_values_to_match_regex(email)"
SEPARATORS = "expect_column_values_to_not_match_regex(email)"
EMAIL_NULL = "expect_column_values_to_not_be_null(email)"
NAME_NULL = "expect_column_values_to_not_be_null(first_name)"
NAME_LENGTH = "expect_column_value_lengths_to_be_between(first_name)"
NAME_CONTROL = "expect_column_values_to_not_match_regex(first_name)"
NAME_VISIBLE = "expect_column_values_to_match_regex(first_name)"
SUBSTITUTIONS_FIT = "expect_column_values_to_be_in_set(substitutions_fit)"
USER_ID_UNIQUE = "expect_column_values_to_be_in_set(user_id__once_in_audience)"
DOTS_ONLY = (
    "run id '{0}' would name the run folder '{0}': a name of dots only is, or looks like, the "
    "campaign's folder or the staging root, not a run's own; trigger the run with another run id"
)
BASELINE_IDS = ("u001", "u002", "u003", "u004", "u005")

KNOWN_TOP = ", ".join(TOP_LEVEL_KEYS)  # the spec's keys, as the error lists them
NO_SECRETS = (
    "a campaign spec holds no secrets; keep credentials in the Airflow connection the spec names"
)
URL = "https://example-exchange.test/unsubscribe?token={token}"
ONE_URL_LINE = 'must be one line without spaces, control characters or any of < > " \\ ^ ` |'
ONE_LINE = "must be one line without control characters, got"
RESEND_LINE = "resend_reason must be one line of at most 500 characters without control characters"
NOT_A_PO_LINE = (
    "not a comment, a string, or one of msgid, msgid_plural, msgctxt, msgstr and msgstr[N] "
    "followed by a string"
)
KEY_TWICE = "YAML keeps only the last, so give it once"
THIS_RUN = "run winter_update/manual__bad_input"
FROZEN = (
    f"{THIS_RUN} is frozen (manifest {{sha256}} staged in the outbox): {{stage}} may not run "
    "again, so its files and outbox rows stay as they were approved and sent; nothing was "
    "changed. To send this campaign again, trigger a new run."
)
WRITTEN_ONCE = (
    f"{THIS_RUN} is frozen and {{stage}} has already written {{record}}: it runs once after the "
    "freeze, so what the approver saw stays as it was; nothing was changed"
)
DEPENDS = (
    "the output depends on a recipient's values, not only where they are inserted (a "
    "comparison, a length, a filter or a slice of a recipient field): the content every "
    "recipient of a locale shares cannot"
)

DE_PO = "translations/de/LC_MESSAGES/messages.po"
BODY_HTML = "templates/winter_update/body.html"
BODY_TXT = "templates/winter_update/body.txt"
SUBJECT = "templates/winter_update/subject.txt"
LAYOUT_HTML = "templates/_layouts/email.html"
LAYOUT_TXT = "templates/_layouts/email.txt"
CONTENT = "{% block content %}"
SEED = "qa@example-exchange.test"


# --- how a case is written -----------------------------------------------------------------------


def case(name: str, *changes: Change, expect: Expected, finding: str = "") -> Any:
    """A named change to the baseline and its outcome; ``finding``: what Mailroom gets wrong."""
    marks = [pytest.mark.xfail(strict=True, reason=finding)] if finding else []
    return pytest.param(Case(changes, expect), id=name, marks=marks)


def spec(name: str, change: Change, message: str) -> Any:
    """Refused at prepare, the message naming the spec file; nothing written."""
    return case(
        name, change, expect=Refused("prepare", CampaignSpecError, f"{SPEC}: {message}", True)
    )


def field(name: str, change: Change, path: str, message: str) -> Any:
    """Refused at prepare, naming the field."""
    return spec(name, change, f"field {path!r} {message}")


def content(name: str, change: Change, message: str | re.Pattern[str], finding: str = "") -> Any:
    return case(
        name, change, expect=Refused("render_content", ContentError, message), finding=finding
    )


def catalog(name: str, old: str, new: str, line: int, problem: str) -> Any:
    """A change to the German catalog, refused at render naming the file and the line."""
    message = f"cannot read translation catalog {po('de')}, line {line}: {problem}"
    return content(name, edit_file(DE_PO, old, new), message)


def row(name: str, email: object, first_name: object, reason: str, *, finding: str = "") -> Any:
    """One row added to the baseline, quarantined with ``reason``; the others are sent."""
    return case(
        name,
        users(("x01", email, first_name, "en")),
        expect=Sent({"x01": Quarantined(reason)}),
        finding=finding,
    )


def suppressed_by(name: str, spelling: object) -> Any:
    """A suppression written ``spelling`` keeps the baseline's ann@example.com out."""
    return case(
        name,
        suppressions((spelling, "unsubscribed")),
        expect=Sent({"u001": Suppressed("unsubscribed")}),
    )


def unreadable(name: str, value: object, reason: str, masked: str) -> Any:
    """A suppression row that is not one address: counted and listed, the next row applied."""
    return case(
        name,
        suppressions((value, "unsubscribed"), ("ann@example.com", "bounced")),
        expect=Sent({"u001": Suppressed("bounced")}, unreadable=(("1", reason, masked),)),
    )


def prepare_refused(name: str, change: Change, error: type[Exception], message: str) -> Any:
    return case(name, change, expect=Refused("prepare", error, message, unchanged=True))


def after(text: str, added: str) -> tuple[str, str]:
    """(old, new) for ``edit_file``: ``added`` put right after ``text``."""
    return text, text + added


# --- the table -----------------------------------------------------------------------------------

SPEC_CASES = [
    # Keys: unknown, misspelt, given twice, holding a secret, not text.
    spec(
        "spec-unknown-key-did-you-mean",
        spec_rename("batch_size", "bacth_size"),
        "unknown key 'bacth_size' (did you mean 'batch_size'?)",
    ),
    spec(
        "spec-unknown-nested-key-did-you-mean",
        spec_rename("sender.name", "nmae"),
        "unknown key 'sender.nmae' (did you mean 'sender.name'?)",
    ),
    spec(
        "spec-unknown-key-lists-the-known-ones",
        spec_set("colour", "blue"),
        f"unknown key 'colour' (known keys: {KNOWN_TOP})",
    ),
    case(
        "spec-two-unknown-keys-both-named",
        spec_rename("batch_size", "bacth_size"),
        spec_rename("approvers", "aprovers"),
        expect=Refused(
            "prepare",
            CampaignSpecError,
            f"{SPEC}: unknown key 'bacth_size' (did you mean 'batch_size'?); "
            "unknown key 'aprovers' (did you mean 'approvers'?)",
            unchanged=True,
        ),
    ),
    case(
        "spec-api-key-in-the-spec-not-repeated",
        spec_set("api_key", "SG.live-looking-key-0a1b2c3d"),
        secret("live-looking-key"),
        expect=Refused(
            "prepare", CampaignSpecError, f"{SPEC}: unknown key 'api_key': {NO_SECRETS}", True
        ),
    ),
    case(
        "spec-database-password-in-the-spec-not-repeated",
        spec_set("audience.password", "hunter2-db-pass"),
        secret("hunter2-db-pass"),
        expect=Refused(
            "prepare",
            CampaignSpecError,
            f"{SPEC}: unknown key 'audience.password': {NO_SECRETS}",
            True,
        ),
    ),
    spec(
        "spec-key-read-as-a-number",
        spec_set("sender", {"email": "news@example-exchange.test", 1: "x"}),
        "a key in sender is the number 1, not a field name (put it in quotes if it is meant as "
        "one)",
    ),
    spec(
        "spec-key-given-twice",
        spec_text(*after("categories: [winter-update]\n", "approvers: [analyst]\n")),
        f"not valid YAML at line 33, column 1: key 'approvers' is given twice (first on line "
        f"21); {KEY_TWICE}",
    ),
    spec(
        "spec-nested-key-given-twice",
        spec_text(*after("  name: Example Exchange\n", "  name: Evil\n")),
        f"not valid YAML at line 8, column 3: key 'name' is given twice (first on line 7); "
        f"{KEY_TWICE}",
    ),
    # The file itself.
    spec(
        "spec-yaml-syntax-error-quotes-nothing",
        spec_text("sender:\n", "sender: [unclosed\n"),
        "not valid YAML at line 6, column 8: while parsing a flow sequence; expected ',' or ']', "
        "but got ':'",
    ),
    spec(
        "spec-not-utf8",
        spec_bytes(b"name: winter_update\ndescription: caf\xe9\n"),
        "not UTF-8 text (byte 36 cannot be decoded); save the spec as UTF-8",
    ),
    spec(
        "spec-empty-file",
        spec_bytes(b""),
        "expected a mapping of campaign fields, got an empty document",
    ),
    spec(
        "spec-not-a-mapping",
        spec_bytes(b"- name: winter_update\n- template: winter_update\n"),
        "expected a mapping of campaign fields, got a list",
    ),
    spec(
        "spec-name-differs-from-its-file",
        spec_set("name", "spring_update"),
        "field 'name' is 'spring_update', expected 'winter_update'",
    ),
    # NaN and infinity.
    field(
        "spec-rate-nan",
        spec_text("requests_per_second: 50", "requests_per_second: .nan"),
        "rate.requests_per_second",
        "must be a finite number, got nan",
    ),
    field(
        "spec-rate-infinite",
        spec_text("requests_per_second: 50", "requests_per_second: .inf"),
        "rate.requests_per_second",
        "must be a finite number, got inf",
    ),
    field(
        "spec-timeout-nan",
        spec_text("response_timeout_hours: 24", "response_timeout_hours: .NaN"),
        "response_timeout_hours",
        "must be a finite number, got nan",
    ),
    field(
        "spec-invalid-fraction-minus-infinity",
        spec_text("max_invalid_fraction: 0.5", "max_invalid_fraction: -.inf"),
        "max_invalid_fraction",
        "must be a finite number, got -inf",
    ),
    # Approvers.
    field(
        "spec-approvers-empty",
        spec_set("approvers", []),
        "approvers",
        "must name at least one approver (an Airflow user name)",
    ),
    field(
        "spec-approvers-empty-string-and-null",
        spec_text("approvers: [approver]", "approvers: ['', null]"),
        "approvers[0]",
        "must be an Airflow user name, got an empty name",
    ),
    field(
        "spec-approvers-null-after-a-name",
        spec_text("approvers: [approver]", "approvers: [approver, null]"),
        "approvers[1]",
        "must be an Airflow user name, got null (an empty entry)",
    ),
    field(
        "spec-approver-a-number",
        spec_text("approvers: [approver]", "approvers: [42]"),
        "approvers[0]",
        "must be an Airflow user name, got the number 42",
    ),
    field(
        "spec-approver-yaml-boolean",
        spec_text("approvers: [approver]", "approvers: [yes]"),
        "approvers[0]",
        "must be an Airflow user name, got the boolean true",
    ),
    field(
        "spec-approver-with-spaces-around",
        spec_text("approvers: [approver]", "approvers: [' approver']"),
        "approvers[0]",
        "must be a user name without spaces around it, on one line",
    ),
    field("spec-approvers-missing", spec_drop("approvers"), "approvers", "is required"),
    field(
        "spec-approvers-not-a-list",
        spec_text("approvers: [approver]", "approvers: approver"),
        "approvers",
        "must be a list, got text",
    ),
    # The unsubscribe URL: one https line with {token}, no credentials.
    field(
        "spec-unsubscribe-url-http",
        spec_set("unsubscribe.url", "http://example-exchange.test/u?token={token}"),
        "unsubscribe.url",
        "must be an https:// URL, got http:",
    ),
    field(
        "spec-unsubscribe-url-javascript",
        spec_set("unsubscribe.url", "javascript:alert(1)//{token}"),
        "unsubscribe.url",
        "must be an https:// URL, got javascript:",
    ),
    field(
        "spec-unsubscribe-url-crlf",
        spec_set("unsubscribe.url", URL + "\r\nBcc: all@example.com"),
        "unsubscribe.url",
        ONE_URL_LINE,
    ),
    field(
        "spec-unsubscribe-url-without-token",
        spec_set("unsubscribe.url", "https://example-exchange.test/unsubscribe"),
        "unsubscribe.url",
        "must contain '{token}', where each recipient's token goes",
    ),
    case(
        "spec-unsubscribe-url-with-credentials-not-repeated",
        spec_set("unsubscribe.url", "https://admin:hunter2pw@example-exchange.test/{token}"),
        secret("hunter2pw"),
        expect=Refused(
            "prepare",
            CampaignSpecError,
            f"{SPEC}: field 'unsubscribe.url' must not carry a user name or password",
            True,
        ),
    ),
    field(
        "spec-unsubscribe-url-without-host",
        spec_set("unsubscribe.url", "https:///unsubscribe?token={token}"),
        "unsubscribe.url",
        "must name a host (https://host/path?token={token})",
    ),
    field(
        "spec-unsubscribe-url-relative",
        spec_set("unsubscribe.url", "/unsubscribe?token={token}"),
        "unsubscribe.url",
        "must be an https:// URL, got no scheme",
    ),
    field(
        "spec-unsubscribe-url-missing",
        spec_drop("unsubscribe.url"),
        "unsubscribe.url",
        "is required",
    ),
    # Names and addresses that end up in headers.
    field(
        "spec-sender-name-crlf",
        spec_set("sender.name", "Example\r\nBcc: all@example.com"),
        "sender.name",
        f"{ONE_LINE} U+000D at character 8",
    ),
    field(
        "spec-sender-name-nul",
        spec_set("sender.name", "Example\x00"),
        "sender.name",
        f"{ONE_LINE} U+0000 at character 8",
    ),
    field(
        "spec-sender-name-escape-character",
        spec_set("sender.name", "Example\x1b[31m Exchange"),
        "sender.name",
        f"{ONE_LINE} U+001B at character 8",
    ),
    field(
        "spec-company-address-line-separator",
        spec_set("company_address", "1 Harbour Street\u2028Dublin"),
        "company_address",
        f"{ONE_LINE} U+2028 at character 17",
    ),
    field(
        "spec-sender-name-a-number",
        spec_set("sender.name", 2024),
        "sender.name",
        "must be text, got the number 2024; put it in quotes",
    ),
    field(
        "spec-sender-email-invalid",
        spec_set("sender.email", "news at example"),
        "sender.email",
        "'news at example' is not one valid email address",
    ),
    field(
        "spec-sender-email-with-display-name",
        spec_set("sender.email", "Example <news@example-exchange.test>"),
        "sender.email",
        "'Example <news@example-exchange.test>' is not one valid email address",
    ),
    field(
        "spec-reply-to-two-addresses",
        spec_set("reply_to", "a@example-exchange.test;b@example-exchange.test"),
        "reply_to",
        "'a@example-exchange.test;b@example-exchange.test' is not one valid email address",
    ),
    field(
        "spec-company-address-missing",
        spec_drop("company_address"),
        "company_address",
        "is required",
    ),
    # Timeouts, sizes, rates: positive and within the provider's limits.
    field(
        "spec-timeout-negative",
        spec_set("response_timeout_hours", -1),
        "response_timeout_hours",
        "must be more than 0 hours, got -1.0",
    ),
    field(
        "spec-timeout-zero",
        spec_set("response_timeout_hours", 0),
        "response_timeout_hours",
        "must be more than 0 hours, got 0.0",
    ),
    field(
        "spec-timeout-too-large",
        spec_set("response_timeout_hours", 1e300),
        "response_timeout_hours",
        "is too large for a duration, got 1e+300",
    ),
    field(
        "spec-timeout-with-a-unit",
        spec_set("response_timeout_hours", "24h"),
        "response_timeout_hours",
        "must be a number, got text",
    ),
    field(
        "spec-batch-size-zero",
        spec_set("batch_size", 0),
        "batch_size",
        "must be 1..1000, got 0",
    ),
    field(
        "spec-batch-size-over-sendgrid-limit",
        spec_set("batch_size", 1001),
        "batch_size",
        "must be 1..1000, got 1001",
    ),
    field(
        "spec-batch-size-a-fraction",
        spec_set("batch_size", 10.5),
        "batch_size",
        "must be a whole number, got the number 10.5",
    ),
    field(
        "spec-rate-zero",
        spec_set("rate", {"requests_per_second": 0}),
        "rate.requests_per_second",
        "must be positive, got 0.0",
    ),
    field(
        "spec-rate-negative",
        spec_set("rate", {"recipients_per_second": -5}),
        "rate.recipients_per_second",
        "must be positive, got -5.0",
    ),
    field(
        "spec-rate-not-a-mapping",
        spec_set("rate", 50),
        "rate",
        "must be a mapping (of requests_per_second, recipients_per_second), got the number 50",
    ),
    field(
        "spec-max-consecutive-failures-zero",
        spec_set("max_consecutive_failures", 0),
        "max_consecutive_failures",
        "must be at least 1, got 0",
    ),
    field(
        "spec-max-field-length-zero",
        spec_set("max_field_length", 0),
        "max_field_length",
        "must be 1..10000 characters, got 0",
    ),
    field(
        "spec-max-field-length-over-the-substitutions-limit",
        spec_set("max_field_length", 10001),
        "max_field_length",
        "must be 1..10000 characters, got 10001",
    ),
    field(
        "spec-max-invalid-fraction-above-one",
        spec_set("max_invalid_fraction", 1.5),
        "max_invalid_fraction",
        "must be within 0..1, got 1.5",
    ),
    # Categories: SendGrid's limits.
    field(
        "spec-eleven-categories",
        spec_set("categories", [f"c{i}" for i in range(11)]),
        "categories",
        "may list at most 10 categories, got 11",
    ),
    field(
        "spec-category-over-255-characters",
        spec_set("categories", ["ok", "c" * 256]),
        "categories[1]",
        "may be at most 255 characters, got 256",
    ),
    field(
        "spec-category-twice",
        spec_set("categories", ["winter", "update", "winter"]),
        "categories[2]",
        "repeats 'winter'; each category may be given once",
    ),
    field(
        "spec-category-non-ascii",
        spec_set("categories", ["hiver-été"]),
        "categories[0]",
        "must be ASCII only (SendGrid's rule for category names)",
    ),
    field(
        "spec-category-empty",
        spec_set("categories", ["winter", ""]),
        "categories[1]",
        "must not be empty",
    ),
    # Locales, fields, transport, seeds, template, audience source.
    field(
        "spec-locale-malformed",
        spec_set("locales", ["en", "de-DE"]),
        "locales[1]",
        "must be a locale such as 'en' or 'pt_BR', got 'de-DE'",
    ),
    field(
        "spec-locale-norway-read-as-false",
        spec_text("locales: [en, de, fr, es, ja]", "locales: [en, de, fr, es, ja, no]"),
        "locales[5]",
        "must be a locale such as 'en' or 'pt_BR', got the boolean false",
    ),
    field(
        "spec-locale-twice",
        spec_set("locales", ["en", "de", "en"]),
        "locales[2]",
        "repeats 'en'",
    ),
    field(
        "spec-default-locale-not-listed",
        spec_set("default_locale", "it"),
        "default_locale",
        "'it' is not one of the locales",
    ),
    field(
        "spec-field-name-invalid",
        spec_set("fields", ["first-name"]),
        "fields[0]",
        "must be a column name such as 'first_name', got 'first-name'",
    ),
    field(
        "spec-transport-unknown",
        spec_set("transport", "smtp-relay"),
        "transport",
        "must be one of 'sendgrid', 'smtp', 'file'",
    ),
    field(
        "spec-seed-address-invalid",
        spec_set("seed_list", ["qa at example"]),
        "seed_list[0]",
        "'qa at example' is not a valid address",
    ),
    field("spec-template-missing", spec_drop("template"), "template", "is required"),
    spec(
        "spec-audience-without-source",
        spec_drop("audience.query"),
        "audience needs exactly one of 'query' or 'url'",
    ),
    field(
        "spec-audience-query-without-connection",
        spec_drop("audience.connection_id"),
        "audience.connection_id",
        "is required with 'audience.query'",
    ),
    # The spec is valid; what it points at is not.
    case(
        "spec-field-the-audience-lacks",
        spec_set("fields", ["first_name", "last_name"]),
        expect=Refused(
            "extract_audience",
            AudienceError,
            "audience source lacks required column(s): last_name",
        ),
    ),
    case(
        "spec-query-without-locale-column",
        spec_set("audience.query", "SELECT user_id, email, first_name FROM users"),
        expect=Refused(
            "extract_audience", AudienceError, "audience source lacks required column(s): locale"
        ),
    ),
    case(
        "spec-query-unknown-table",
        spec_set("audience.query", "SELECT * FROM userz"),
        expect=Refused(
            "extract_audience",
            AudienceError,
            f"cannot read the audience database ({DB_URL}): no such table: userz",
        ),
    ),
    case(
        "spec-suppressions-query-without-email",
        spec_set("audience.suppressions_query", "SELECT reason FROM suppressions"),
        suppressions(("ann@example.com", "unsubscribed")),
        expect=Refused(
            "extract_audience", AudienceError, "suppression source lacks the 'email' column"
        ),
    ),
    field(
        "spec-locale-babel-does-not-know",
        spec_set("locales", ["en", "de", "fr", "es", "ja", "xx"]),
        "locales[5]",
        "'xx' is not a locale Babel knows (CLDR has no data)",
    ),
    content(
        "spec-locale-without-catalog",
        spec_set("locales", ["en", "de", "fr", "es", "ja", "it"]),
        f"no translation catalog for locale 'it': {po('it')} does not exist",
    ),
    content(
        "spec-template-unknown",
        spec_set("template", "winter_updat"),
        "winter_updat/subject.txt (locale en): template 'winter_updat/subject.txt' not found in "
        f"{TEMPLATES}",
    ),
    field(
        "spec-template-path-traversal",
        spec_set("template", "../templates/winter_update"),
        "template",
        "must be the name of a folder in templates/ (letters, digits, '_' and '-'), got "
        "'../templates/winter_update'",
    ),
]

TEMPLATE_CASES = [
    content(
        "tpl-syntax-error",
        edit_file(BODY_HTML, *after(CONTENT, "{% if %}")),
        f"{TEMPLATES}/winter_update/body.html:7: template syntax error: Expected an expression, "
        "got 'end of statement block'",
    ),
    content(
        "tpl-block-not-closed",
        edit_file(BODY_TXT, "{% endblock %}", ""),
        f"{TEMPLATES}/winter_update/body.txt:51: template syntax error: Unexpected end of "
        "template. Jinja was looking for the following tags: 'endblock'. The innermost block "
        "that needs to be closed is 'block'.",
    ),
    content(
        "tpl-unknown-variable",
        edit_file(BODY_TXT, *after(CONTENT, "{{ coupon }}")),
        f"{TEMPLATES}/winter_update/body.txt:4: undefined: 'coupon' is undefined "
        "(winter_update/body.txt (locale en))",
    ),
    content(
        "tpl-recipient-field-the-audience-lacks",
        edit_file(BODY_HTML, *after(CONTENT, "{{ recipient.last_name }}")),
        f"{TEMPLATES}/winter_update/body.html:7: undefined: recipient has no field 'last_name' "
        "(the audience provides: first_name) (winter_update/body.html (locale en))",
    ),
    content(
        "tpl-campaign-value-unknown",
        edit_file(BODY_TXT, *after(CONTENT, "{{ campaign.coupon }}")),
        f"{TEMPLATES}/winter_update/body.txt:4: undefined: campaign has no value 'coupon' (it "
        "has: company_address, name, sender_name) (winter_update/body.txt (locale en))",
    ),
    content(
        "tpl-trans-placeholder-undefined",
        edit_file(BODY_TXT, *after(CONTENT, "{% trans %}Hi {{ name }}{% endtrans %}")),
        f"{TEMPLATES}/winter_update/body.txt:4: undefined: 'name' is undefined "
        "(winter_update/body.txt (locale en))",
    ),
    content(
        "tpl-subject-file-missing",
        delete_file(SUBJECT),
        "winter_update/subject.txt (locale en): template 'winter_update/subject.txt' not found "
        f"in {TEMPLATES}",
    ),
    content(
        "tpl-text-body-missing",
        delete_file(BODY_TXT),
        "winter_update/body.txt (locale en): template 'winter_update/body.txt' not found in "
        f"{TEMPLATES}",
    ),
    content(
        "tpl-layout-missing",
        edit_file(BODY_HTML, "_layouts/email.html", "_layouts/gone.html"),
        "winter_update/body.html (locale en): template '_layouts/gone.html' not found in "
        f"{TEMPLATES}",
    ),
    content(
        "tpl-subject-two-lines",
        write_file(SUBJECT, "Your winter update\n{{ recipient.first_name }}\n"),
        "winter_update/subject.txt (locale en): the subject must be one line, got "
        "'Your winter update\\n%%first_name%%'",
    ),
    content(
        "tpl-subject-empty",
        write_file(SUBJECT, "{# nothing #}\n"),
        "winter_update/subject.txt (locale en): the subject is empty",
    ),
    content(
        "tpl-depends-on-a-recipient-value",
        write_file(SUBJECT, "{{ recipient.first_name | upper }}, your winter update\n"),
        f"winter_update/subject.txt (locale en): {DEPENDS}",
    ),
    content(
        "tpl-plain-tag-in-html",
        edit_file(BODY_HTML, *after(CONTENT, "<p>%%first_name%%</p>")),
        "winter_update/body.html (locale en): output uses substitution tags %%first_name%%; "
        "only HTML (|html) tags of the recipient fields may appear here",
    ),
    content(
        "tpl-tag-of-an-unknown-field",
        edit_file(BODY_TXT, *after(CONTENT, "%%coupon%%")),
        "winter_update/body.txt (locale en): output uses substitution tags %%coupon%%; only "
        "plain tags of the recipient fields may appear here",
    ),
    content(
        "tpl-leftover-template-marker",
        edit_file(BODY_TXT, *after(CONTENT, "{{ '{{' }} first_name }}")),
        "winter_update/body.txt (locale en): output contains a leftover template marker '{{' "
        "near '{{ first_name }}\\nHi ,\\n\\nAs the ye'",
    ),
    content(
        "tpl-reserved-word-in-html",
        edit_file(BODY_HTML, *after(CONTENT, "<p>mailroomtag</p>")),
        "winter_update/body.html (locale en): output contains the reserved word 'mailroomtag'",
    ),
    content(
        "tpl-not-utf8",
        edit_file(BODY_TXT, CONTENT.encode(), CONTENT.encode() + b"caf\xe9"),
        f"winter_update/body.txt (locale en): template {TEMPLATES}/winter_update/body.txt, line 4: "
        "not UTF-8 (byte 0xe9); save it as UTF-8",
    ),
    content(
        "tpl-html-without-an-unsubscribe-link",
        edit_file(
            LAYOUT_HTML,
            '<p><a class="unsubscribe" href="{{ unsubscribe_url }}">{% trans %}Unsubscribe from '
            "product updates{% endtrans %}</a></p>",
            "",
        ),
        NO_HTML_UNSUBSCRIBE,
    ),
    content(
        "tpl-text-without-an-unsubscribe-link",
        edit_file(
            LAYOUT_TXT,
            "{% trans url=unsubscribe_url %}Unsubscribe from product updates: {{ url }}"
            "{% endtrans %}",
            "",
        ),
        "winter_update/body.txt (locale en): the text part shows no unsubscribe link "
        "({{ unsubscribe_url }}): every message must let its reader unsubscribe",
    ),
    content(
        "tpl-html-unclosed-comment-hides-the-rest",
        edit_file(BODY_HTML, *after(CONTENT, "<!--")),
        NO_HTML_UNSUBSCRIBE,
    ),
]

CATALOG_CASES = [
    catalog(
        "po-msgid-twice",
        'msgstr "Viele Grüße"',
        'msgstr "Viele Grüße"\n\nmsgid "Best regards,"\nmsgstr "Servus"',
        40,
        "msgid 'Best regards,' again (first on line 37): Babel would keep one translation and "
        "drop the other; keep one entry",
    ),
    catalog(
        "po-unterminated-string",
        'msgstr "Viele Grüße"',
        'msgstr "Viele Grüße',
        38,
        "a string is not closed (a missing '\"' at the end of the line)",
    ),
    catalog(
        "po-unsupported-escape",
        'msgstr "Viele Grüße"',
        'msgstr "Viele\\a Grüße"',
        38,
        "unsupported escape '\\a' (use \\n, \\t, \\r, \\\" or \\\\)",
    ),
    catalog(
        "po-quote-inside-a-string",
        'msgstr "Viele Grüße"',
        'msgstr "Viele "liebe" Grüße"',
        38,
        "text after the closing '\"' (a '\"' inside a string is written '\\\"')",
    ),
    catalog(
        "po-string-without-quotes",
        'msgstr "Viele Grüße"',
        "msgstr Viele Grüße",
        38,
        "a string must be in double quotes",
    ),
    catalog(
        "po-unknown-keyword",
        'msgstr "Viele Grüße"',
        'msgstrr "Viele Grüße"',
        38,
        NOT_A_PO_LINE,
    ),
    catalog(
        "po-plural-index-not-a-number",
        'msgstr "Viele Grüße"',
        'msgid_plural "Best regards,"\nmsgstr[x] "Viele Grüße"',
        39,
        NOT_A_PO_LINE,
    ),
    catalog(
        "po-msgid-without-msgstr",
        'msgstr "Viele Grüße"\n',
        "",
        37,
        "missing msgstr for msgid 'Best regards,'",
    ),
    content(
        "po-placeholder-renamed",
        edit_file(DE_PO, 'msgstr "Hallo %(first_name)s,"', 'msgstr "Hallo %(vorname)s,"'),
        f"translation catalog {po('de')} is broken: 'Hi %(first_name)s,': unknown named "
        "placeholder 'vorname'",
    ),
    content(
        "po-subject-translation-with-a-line-break",
        edit_file(DE_PO, "hier ist Ihr Winter-Update", "hier ist\\nIhr Winter-Update"),
        "winter_update/subject.txt (locale de): the subject must be one line, got "
        "'%%first_name%%, hier ist\\nIhr Winter-Update'",
    ),
    content(
        "po-language-header-of-another-language",
        edit_file(DE_PO, '"Language: de\\n"', '"Language: fr\\n"'),
        f"translation catalog {po('de')} is for language 'fr', not 'de' (check its Language "
        "header)",
    ),
    content(
        "po-no-language-header",
        edit_file(DE_PO, '"Language: de\\n"\n', ""),
        f"translation catalog {po('de')} has no Language header",
    ),
    content(
        "po-catalog-missing",
        delete_file("translations/ja/LC_MESSAGES/messages.po"),
        f"no translation catalog for locale 'ja': {po('ja')} does not exist",
    ),
    content(
        "po-template-marker-in-a-translation",
        edit_file(DE_PO, 'msgstr "Viele Grüße"', 'msgstr "Viele Grüße {{ name }}"'),
        "winter_update/body.html (locale de): output contains a leftover template marker '{{' "
        "near '<p>&nbsp;</p>\\n\\n<p>Viele Grüße {{ name }}<br>\\nIhr Team von Exam'",
    ),
    content(
        "po-not-utf8",
        edit_file(DE_PO, "Viele Grüße".encode(), "Viele Gr\xfc\xdfe".encode("latin-1")),
        f"cannot read translation catalog {po('de')}, line 38: not UTF-8 (byte 0xfc), as its "
        "charset says: save it as UTF-8",
    ),
    case(
        "po-translation-shows-an-audience-address",
        edit_file(DE_PO, 'msgstr "Viele Grüße"', 'msgstr "Viele Grüße, ann@example.com"'),
        expect=Refused(
            "check_envelopes",
            ValidationFailed,
            "the data-quality gate failed on the frozen batches; nothing will be sent: "
            "expect_column_values_to_be_between(audience_addresses_shared): 1 unexpected; "
            "expect_column_values_to_be_between(audience_data_shared): 1 unexpected (Great "
            f"Expectations Data Docs: {RUN_DIR}/gate/data_docs/index.html)",
        ),
    ),
]

ROW_CASES = [
    # The address: one valid address (email-validator's rules), nothing around it.
    row(
        "row-email-255-characters",
        "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 61 + ".com",
        "Long",
        NOT_ONE_ADDRESS,
    ),
    row("row-email-local-part-over-64", "a" * 65 + "@example.com", "Long", NOT_ONE_ADDRESS),
    row("row-email-domain-label-over-63", "x01@" + "b" * 64 + ".com", "Long", NOT_ONE_ADDRESS),
    row("row-email-nul-byte", "x01\x00@example.com", "Nul", NOT_ONE_ADDRESS),
    row("row-email-escape-character", "x01\x1b@example.com", "Esc", NOT_ONE_ADDRESS),
    row(
        "row-email-crlf-header-injection",
        "x01@example.com\r\nBcc: all@example.com",
        "X",
        SEPARATORS,
    ),
    row("row-email-display-name-form", "Xavier <x01@example.com>", "Xavier", SEPARATORS),
    row("row-email-mailto", "mailto:x01@example.com", "Xavier", NOT_ONE_ADDRESS),
    row("row-email-trailing-semicolon", "x01@example.com;", "Xavier", SEPARATORS),
    row("row-email-two-addresses", "x01@example.com, x02@example.com", "Xavier", SEPARATORS),
    row("row-email-without-at", "x01example.com", "Xavier", NOT_ONE_ADDRESS),
    row("row-email-two-ats", "x01@@example.com", "Xavier", NOT_ONE_ADDRESS),
    row("row-email-quoted-local-part", '"x 01"@example.com', "Xavier", SEPARATORS),
    row("row-email-non-ascii-local-part", "jöhn@example.com", "John", NOT_ONE_ADDRESS),
    row("row-email-no-dot-domain", "x01@localhost", "Xavier", NOT_ONE_ADDRESS),
    row("row-email-domain-literal", "x01@[127.0.0.1]", "Xavier", NOT_ONE_ADDRESS),
    row("row-email-empty", "", "Xavier", EMAIL_NULL),
    row("row-email-whitespace-only", "   ", "Xavier", EMAIL_NULL),
    row("row-email-null", None, "Xavier", EMAIL_NULL),
    row("row-email-a-number", 42, "Xavier", NOT_ONE_ADDRESS),
    case(
        "row-email-utf8-blob-read-as-text",
        users(("x01", b"x01@example.com", "Xavier", "en")),
        expect=Sent({"x01": Delivered("x01@example.com")}),
    ),
    # The first name: present, short enough, one line, nobody else's address.
    row("row-first-name-nul-byte", "x01@example.com", "Xa\x00vier", NAME_CONTROL),
    row("row-first-name-crlf", "x01@example.com", "Xavier\r\nBcc: all@example.com", NAME_CONTROL),
    row("row-first-name-escape-character", "x01@example.com", "Xavier\x1b[2J", NAME_CONTROL),
    row("row-first-name-line-separator", "x01@example.com", "Xavier\u2028Bob", NAME_CONTROL),
    row("row-first-name-100-kb", "x01@example.com", "X" * 100_000, NAME_LENGTH),
    case(
        "row-user-id-whose-substitutions-sendgrid-refuses",
        # The unsubscribe link carries the user id: 4,000 characters of it make the
        # personalization's substitutions larger than SendGrid's 10,000 bytes.
        users(("x" * 4_000, "x01@example.com", "Xavier", "en")),
        expect=Sent({"x" * 4_000: Quarantined(SUBSTITUTIONS_FIT)}),
    ),
    row("row-first-name-one-over-max-field-length", "x01@example.com", "X" * 257, NAME_LENGTH),
    row("row-first-name-null", "x01@example.com", None, NAME_NULL),
    row("row-first-name-empty", "x01@example.com", "", NAME_LENGTH),
    row(
        "row-first-name-whitespace-only",
        "x01@example.com",
        "   ",
        NAME_VISIBLE,
    ),
    row(
        "row-first-name-another-users-address",
        "x01@example.com",
        "bernd@example.org",
        SHOWS_ANOTHER,
    ),
    row(
        "row-first-name-another-users-address-upper-case",
        "x01@example.com",
        "Sam (BERND@EXAMPLE.ORG)",
        SHOWS_ANOTHER,
    ),
    row(
        "row-first-name-another-users-address-html-entity",
        "x01@example.com",
        "bernd&#64;example.org",
        SHOWS_ANOTHER,
    ),
    row(
        "row-first-name-another-users-address-percent-encoded",
        "x01@example.com",
        "bernd%40example.org",
        SHOWS_ANOTHER,
    ),
    row(
        "row-first-name-another-users-address-spelt-out",
        "x01@example.com",
        "bernd (at) example (dot) org",
        SHOWS_ANOTHER,
    ),
    row(
        "row-first-name-another-users-address-fullwidth",
        "x01@example.com",
        "ｂｅｒｎｄ＠ｅｘａｍｐｌｅ．ｏｒｇ",
        SHOWS_ANOTHER,
    ),
    row(
        "row-first-name-another-users-address-invisible-characters",
        "x01@example.com",
        "ber\u200bnd@exa\u00admple.org",
        SHOWS_ANOTHER,
    ),
    case(
        "row-first-name-another-users-idn-address-in-unicode",
        users(
            ("x01", "x01@example.com", "user@bücher.example", "de"),
            ("x02", "user@xn--bcher-kva.example", "Björn", "de"),
        ),
        expect=Sent({"x01": Quarantined(SHOWS_ANOTHER)}),
    ),
    case(
        "row-first-name-a-quarantined-users-address",
        users(
            ("x01", "x01@example.com", "x02@example.org", "en"),
            ("x02", "x02@example.org", "X" * 300, "en"),
        ),
        expect=Sent({"x01": Quarantined(SHOWS_ANOTHER), "x02": Quarantined(NAME_LENGTH)}),
    ),
    case(
        "row-first-name-a-suppressed-users-address",
        users(
            ("x01", "x01@example.com", "gone@example.org", "en"),
            ("x02", "gone@example.org", "Gone", "en"),
        ),
        suppressions(("gone@example.org", "unsubscribed")),
        expect=Sent({"x01": Quarantined(SHOWS_ANOTHER), "x02": Suppressed("unsubscribed")}),
    ),
    case(
        "row-first-name-non-utf8-blob",
        users(("x01", "x01@example.com", b"\xff\xfeXa", "en")),
        expect=Sent({"x01": Quarantined(NAME_CONTROL)}),
    ),
    case(
        "row-first-name-invalid-utf8-text",
        users(("x01", "x01@example.com", "Xavier", "en")),
        # "bernd@example.org" and a byte that is not UTF-8, stored as TEXT.
        sql(
            "UPDATE users SET first_name = CAST(x'6265726e64406578616d706c652e6f7267ff' AS TEXT) "
            "WHERE user_id = 'x01'"
        ),
        expect=Refused(
            "extract_audience",
            AudienceError,
            f"cannot read the audience database ({DB_URL}): Could not decode to UTF-8 column "
            "'first_name' (the value is not shown)",
        ),
    ),
    # The user id: present and unique.
    case(
        "row-user-id-twice",
        users(("u001", "x01@example.com", "Xavier", "en")),
        expect=Sent({"u001": Quarantined(USER_ID_UNIQUE)}),
    ),
    case(
        "row-user-id-number-and-text-the-same",
        users((7, "x01@example.com", "Xavier", "en"), ("7", "x02@example.com", "X", "en")),
        expect=Sent({7: Quarantined(USER_ID_UNIQUE), "7": Quarantined(USER_ID_UNIQUE)}),
    ),
    case(
        "row-user-id-null",
        users((None, "x01@example.com", "Xavier", "en")),
        expect=Sent({None: Quarantined("user_id missing")}),
    ),
    case(
        "row-user-id-empty",
        users(("", "x01@example.com", "Xavier", "en")),
        expect=Sent({"": Quarantined("user_id missing")}),
    ),
    case(
        "row-user-id-whitespace-only",
        users(("   ", "x01@example.com", "Xavier", "en")),
        # A blank id is a missing one: not_sent.csv shows it empty.
        expect=Sent({"   ": Quarantined("user_id missing")}),
    ),
    # One mailbox twice, locales the campaign lacks, too many bad rows, nobody left.
    case(
        "row-email-another-spelling-of-a-mailbox",
        users(("x01", "ANN@EXAMPLE.COM", "Ann again", "en")),
        expect=Sent({"x01": Duplicate()}),
    ),
    case(
        "row-email-idn-and-punycode-one-mailbox",
        users(
            ("x01", "user@bücher.example", "Björn", "de"),
            ("x02", "user@xn--bcher-kva.example", "Björn", "de"),
        ),
        expect=Sent({"x01": Delivered("user@xn--bcher-kva.example"), "x02": Duplicate()}),
    ),
    case(
        "row-locale-the-campaign-lacks-defaults",
        users(("x01", "x01@example.com", "Xavier", "pt_BR")),
        expect=Sent(locale_defaulted=1),
    ),
    case(
        "row-locale-null-defaults",
        users(("x01", "x01@example.com", "Xavier", None)),
        expect=Sent(locale_defaulted=1),
    ),
    case(
        "row-quarantined-above-the-campaigns-limit",
        spec_text("max_invalid_fraction: 0.5", "max_invalid_fraction: 0.05"),
        users(("x01", "x01example.com", "Xavier", "en")),
        expect=Refused(
            "validate_audience",
            ValidationFailed,
            "1 of 6 recipients (16.7%) failed validation, above the campaign's limit of 5.0%: "
            "{'expect_column_values_to_match_regex(email)': 1}",
        ),
    ),
    case(
        "row-everyone-suppressed-empty-audience",
        replace_users(("x01", "x01@example.com", "Xavier", "en")),
        suppressions(("x01@example.com", "unsubscribed")),
        expect=Refused(
            "validate_audience", ValidationFailed, "the audience is empty: nothing to send"
        ),
    ),
]

SUPPRESSION_CASES = [
    suppressed_by("supp-display-name-form", "Ann Lee <ann@example.com>"),
    suppressed_by("supp-mailto", "mailto:ann@example.com"),
    suppressed_by("supp-trailing-semicolon", "ann@example.com;"),
    suppressed_by("supp-upper-case", "ANN@EXAMPLE.COM"),
    suppressed_by("supp-quoted-and-padded", "  'ann@example.com'  "),
    suppressed_by("supp-invisible-characters", "an\u200bn@exam\u2060ple.com"),
    suppressed_by("supp-fullwidth", "ａｎｎ＠ｅｘａｍｐｌｅ．ｃｏｍ"),
    case(
        "supp-punycode-suppresses-unicode-domain",
        users(("x01", "user@bücher.example", "Björn", "de")),
        suppressions(("USER@XN--BCHER-KVA.EXAMPLE", "unsubscribed")),
        expect=Sent({"x01": Suppressed("unsubscribed")}),
    ),
    case(
        "supp-reason-null",
        suppressions(("ann@example.com", None)),
        expect=Sent({"u001": Suppressed("suppressed")}),
    ),
    unreadable("supp-email-null", None, "empty", ""),
    unreadable("supp-email-blank", "   ", "empty", ""),
    unreadable(
        "supp-two-addresses",
        "bernd@example.org, diego@example.com",
        "more than one address",
        "b***@example.com",
    ),
    unreadable("supp-not-an-address", "not an address", "no address (no @)", "***"),
    unreadable("supp-a-number", 42, "not text (int)", "***"),
    unreadable("supp-a-blob", b"ann@example.com", "not text (bytes)", "***"),
]

OPERATION_CASES = [
    # The trigger's options.
    prepare_refused(
        "op-resend-without-a-reason",
        trigger(resend=True, reason=""),
        ValidationFailed,
        "resend_to_earlier_recipients is true but resend_reason is empty: say why everyone an "
        "earlier run of this campaign sent to (or may have) should get it again",
    ),
    prepare_refused(
        "op-resend-reason-without-the-option",
        trigger(resend=False, reason="wrong date"),
        ValidationFailed,
        "resend_reason is given but resend_to_earlier_recipients is false: set it to true to send "
        "again to people an earlier run of this campaign sent to, or leave the reason empty",
    ),
    prepare_refused(
        "op-resend-reason-on-two-lines",
        trigger(resend=True, reason="wrong\ndate"),
        ValidationFailed,
        RESEND_LINE,
    ),
    prepare_refused(
        "op-resend-reason-over-500-characters",
        trigger(resend=True, reason="x" * 501),
        ValidationFailed,
        RESEND_LINE,
    ),
    prepare_refused(
        "op-resend-option-not-a-boolean",
        trigger(resend="yes", reason="wrong date"),
        ValidationFailed,
        "resend_to_earlier_recipients must be true or false, got str",
    ),
    prepare_refused(
        "op-shard-count-zero",
        trigger(shards=0),
        ValidationFailed,
        "shard count must be 1..256, got 0",
    ),
    prepare_refused(
        "op-shard-count-over-256",
        trigger(shards=257),
        ValidationFailed,
        "shard count must be 1..256, got 257",
    ),
    prepare_refused(
        "op-unknown-campaign",
        trigger(campaign="summer_sale"),
        CampaignSpecError,
        f"unknown campaign 'summer_sale' (known: winter_update) in {CAMPAIGNS}",
    ),
    prepare_refused(
        "op-campaign-name-path-traversal",
        trigger(campaign="../winter_update"),
        CampaignSpecError,
        "campaign name '../winter_update' is not valid: use lower-case letters, digits, '_' and "
        "'-'",
    ),
    # Run ids and folders.
    case(
        "op-two-run-ids-one-folder",
        earlier_run("manual__x:1"),
        trigger(run_id="manual__x_1"),
        expect=Refused(
            "prepare",
            RunRefused,
            f"run 'manual__x_1' maps to the run folder {TMP}/staging/winter_update/manual__x_1 "
            "(manual__x_1), which belongs to run 'manual__x:1' of campaign winter_update: two "
            "run ids that differ only in characters a folder name cannot hold would share one "
            "folder; prepare refused, nothing was changed. Trigger the run with another run id.",
            unchanged=True,
        ),
    ),
    case(
        "op-run-id-dot-dot",
        trigger(run_id=".."),
        expect=Refused("prepare", ValidationFailed, DOTS_ONLY.format(".."), unchanged=True),
    ),
    case(
        "op-run-id-dot",
        trigger(run_id="."),
        expect=Refused("prepare", ValidationFailed, DOTS_ONLY.format("."), unchanged=True),
    ),
    # The campaign again.
    case(
        "op-campaign-triggered-twice-sends-nobody-again",
        earlier_run(),
        expect=Sent({uid: AlreadySent() for uid in BASELINE_IDS}, status="nothing_to_send"),
    ),
    case(
        "op-campaign-triggered-twice-sends-only-the-new-user",
        earlier_run(),
        then(users(("x01", "x01@example.com", "Xavier", "en"))),
        expect=Sent({uid: AlreadySent() for uid in BASELINE_IDS}),
    ),
    # A sent run whose task is cleared in Airflow: refused, or nothing happens.
    *(
        case(
            f"op-clear-{stage.replace('_', '-')}-of-a-sent-run",
            clear_task(stage),
            expect=Refused(stage, RunRefused, FROZEN.replace("{stage}", stage), unchanged=True),
        )
        for stage in (
            "prepare",
            "extract_audience",
            "validate_audience",
            "render_content",
            "build_envelopes",
            "freeze_batches",
        )
    ),
    case(
        "op-clear-check-envelopes-of-a-sent-run",
        clear_task("check_envelopes"),
        expect=Refused(
            "check_envelopes",
            RunRefused,
            WRITTEN_ONCE.format(stage="check_envelopes", record="gate/result.json"),
            unchanged=True,
        ),
    ),
    case(
        "op-clear-canary-send-of-a-sent-run",
        spec_set("seed_list", [SEED]),
        clear_task("canary_send"),
        expect=Refused(
            "canary_send",
            RunRefused,
            WRITTEN_ONCE.format(stage="canary_send", record="canary/result.json"),
            unchanged=True,
        ),
    ),
    case(
        "op-clear-summarise-of-a-sent-run",
        clear_task("summarise"),
        expect=Refused(
            "summarise",
            RunRefused,
            WRITTEN_ONCE.format(stage="summarise", record="preview/"),
            unchanged=True,
        ),
    ),
    case(
        "op-clear-approve-answers-again",
        clear_task("approve", decision={"decision": "timed_out", "by": None}),
        expect=Refused(
            "approve",
            RunRefused,
            f"{THIS_RUN} already has its approval recorded (approved by approver at 2026-12-06 "
            "10:00:00+00:00); this answer (timed_out) is not recorded and changes nothing",
            unchanged=True,
        ),
    ),
    *(
        case(
            f"op-clear-{stage.replace('_', '-')}-of-a-sent-run",
            clear_task(stage),
            expect=Unchanged(),
        )
        for stage in ("guard_shard", "send_shard", "reconcile")
    ),
]

CASES = (
    SPEC_CASES + TEMPLATE_CASES + CATALOG_CASES + ROW_CASES + SUPPRESSION_CASES + OPERATION_CASES
)


@pytest.mark.parametrize("bad", CASES)
def test_bad_input(bad: Case, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    project, played, seen = play_case(bad, tmp_path)
    if isinstance(bad.expect, Refused):
        check_refused(bad.expect, project, played, seen)
    elif isinstance(bad.expect, Sent):
        check_sent(bad.expect, project, played)
    else:
        check_unchanged(project, played, seen)
    assert leaks(project, caplog.records, played.error) == []


def test_the_table_holds_a_hundred_named_classes() -> None:
    assert len(CASES) >= 100
    assert len({p.id for p in CASES}) == len(CASES)
