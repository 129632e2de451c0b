"""Campaign specs: the example loads, and every malformed field is refused by name."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom.campaign_spec import (
    CampaignSpec,
    Rate,
    available_campaigns,
    campaign_path,
    load_campaign,
    load_campaign_file,
    parse_campaign,
)
from mailroom.checks import limits
from mailroom.errors import CampaignSpecError

pytestmark = pytest.mark.unit

CAMPAIGNS = Path(__file__).resolve().parents[2] / "include" / "campaigns"
EXAMPLE = CAMPAIGNS / "winter_update.yaml"


def example() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))


def parse(raw: object) -> CampaignSpec:
    return parse_campaign(raw, source="campaigns/test.yaml")


def test_the_example_campaign_loads() -> None:
    spec = load_campaign(CAMPAIGNS, "winter_update")

    assert spec.name == "winter_update"
    assert spec.template == "winter_update"
    assert spec.sender.email == "news@example-exchange.test"
    assert spec.sender.name == "Example Exchange"
    assert spec.reply_to == "support@example-exchange.test"
    assert spec.audience.connection_id == "mailroom_users"
    assert spec.audience.query is not None
    assert "FROM users" in spec.audience.query
    assert spec.audience.url is None
    assert spec.fields == ("first_name",)
    assert spec.locales == ("en", "de", "fr", "es", "ja")
    assert spec.default_locale == "en"
    assert spec.approvers == ("approver",)
    assert "{token}" in spec.unsubscribe.url_template
    assert spec.unsubscribe.mailto == "unsubscribe@example-exchange.test"
    assert spec.batch_size == 1000
    assert spec.max_invalid_fraction == 0.05
    assert spec.rate.requests_per_second == 50.0
    assert spec.rate.recipients_per_second is None
    assert spec.transport == "sendgrid"
    assert spec.connection_id == "mailroom_sendgrid"
    assert spec.categories == ("winter-update",)
    assert spec.max_field_length == limits.DEFAULT_MAX_FIELD_LENGTH
    assert spec.response_timeout_hours == 24.0
    assert spec.summary()["locales"] == list(spec.locales)
    assert available_campaigns(CAMPAIGNS) == ["winter_update"]


def test_defaults_fill_what_a_minimal_spec_leaves_out() -> None:
    raw = example()
    for optional in (
        "default_locale",
        "batch_size",
        "max_invalid_fraction",
        "rate",
        "transport",
        "connection_id",
        "categories",
        "reply_to",
        "description",
        "response_timeout_hours",
    ):
        raw.pop(optional)

    spec = parse(raw)

    assert spec.default_locale == "en"
    assert spec.batch_size == 1000
    assert spec.max_invalid_fraction == 0.05
    assert (spec.rate.requests_per_second, spec.rate.recipients_per_second) == (None, None)
    assert spec.transport == "sendgrid"
    assert spec.reply_to is None
    assert spec.response_timeout_hours == 24.0
    assert spec.max_field_length == 256


@pytest.mark.parametrize("batch_size", [1, 500, 1000])
def test_batch_sizes_within_the_provider_limit_are_kept(batch_size: int) -> None:
    raw = example()
    raw["batch_size"] = batch_size
    assert parse(raw).batch_size == batch_size


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = raw
        for key in parents:
            target = target[key]
        target[leaf] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = raw
        for key in parents:
            target = target[key]
        del target[leaf]

    return change


def _rename(path: str, new: str) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = raw
        for key in parents:
            target = target[key]
        target[new] = target.pop(leaf)

    return change


def _both_query_and_url(raw: dict[str, Any]) -> None:
    raw["audience"]["url"] = "file:///data/users.csv"


def _neither_query_nor_url(raw: dict[str, Any]) -> None:
    del raw["audience"]["query"]


def _numbered_sender_key(raw: dict[str, Any]) -> None:
    raw["sender"][1] = "x"


def _two_unknown_keys(raw: dict[str, Any]) -> None:
    raw["bacth_size"] = raw.pop("batch_size")
    raw["aprovers"] = raw.pop("approvers")


@dataclass(frozen=True)
class Text:
    """A change to the example's YAML text, for what a parsed mapping cannot show: a key given
    twice, or YAML's own spelling of NaN and infinity."""

    old: str
    new: str

    def __call__(self, text: str) -> str:
        assert self.old in text, self.old
        return text.replace(self.old, self.new, 1)


def _text_added(lines: str) -> Text:
    return Text("categories: [winter-update]\n", f"categories: [winter-update]\n{lines}")


Change = Callable[[dict[str, Any]], None] | Text
KNOWN_TOP = "name, description, template, sender, reply_to, company_address, audience, fields, "
TOKEN_URL = "https://example-exchange.test/unsubscribe?token={token}"

# (change to the example, the error after "<file>: ", as a regex): each names its field.
BAD_SPECS: dict[str, tuple[Change, str]] = {
    # --- unknown and misspelt keys, at every level
    "misspelt batch_size": (
        _rename("batch_size", "bacth_size"),
        r"unknown key 'bacth_size' \(did you mean 'batch_size'\?\)",
    ),
    "misspelt approvers": (
        _rename("approvers", "aprovers"),
        r"unknown key 'aprovers' \(did you mean 'approvers'\?\)",
    ),
    "misspelt categories": (
        _rename("categories", "category"),
        r"unknown key 'category' \(did you mean 'categories'\?\)",
    ),
    "misspelt response timeout": (
        _rename("response_timeout_hours", "response_timeout"),
        r"unknown key 'response_timeout' \(did you mean 'response_timeout_hours'\?\)",
    ),
    "misspelt sender name": (
        _rename("sender.name", "nmae"),
        r"unknown key 'sender\.nmae' \(did you mean 'sender\.name'\?\)",
    ),
    "misspelt audience query": (
        _rename("audience.query", "querry"),
        r"unknown key 'audience\.querry' \(did you mean 'audience\.query'\?\)",
    ),
    "misspelt unsubscribe url": (
        _rename("unsubscribe.url", "ulr"),
        r"unknown key 'unsubscribe\.ulr' \(did you mean 'unsubscribe\.url'\?\)",
    ),
    "misspelt rate": (
        _rename("rate.requests_per_second", "request_per_second"),
        r"unknown key 'rate\.request_per_second' \(did you mean 'rate\.requests_per_second'\?\)",
    ),
    "unknown key with no near name": (
        _set("colour", "blue"),
        rf"unknown key 'colour' \(known keys: {KNOWN_TOP}.*, seed_list\)",
    ),
    "two unknown keys, both named": (
        _two_unknown_keys,
        r"unknown key 'bacth_size' \(did you mean 'batch_size'\?\); "
        r"unknown key 'aprovers' \(did you mean 'approvers'\?\)",
    ),
    "a credential in the spec": (
        _set("api_key", "SG.not-a-real-key"),
        r"unknown key 'api_key': a campaign spec holds no secrets; keep credentials in the "
        r"Airflow connection the spec names",
    ),
    "a key YAML reads as a number": (
        _numbered_sender_key,
        r"a key in sender is the number 1, not a field name \(put it in quotes if it is meant "
        r"as one\)",
    ),
    # --- keys given twice
    "approvers given twice": (
        _text_added("approvers: [analyst]"),
        r"not valid YAML at line 33, column 1: key 'approvers' is given twice \(first on line "
        r"21\); YAML keeps only the last, so give it once",
    ),
    "sender name given twice": (
        Text("  name: Example Exchange\n", "  name: Example Exchange\n  name: Evil Corp\n"),
        r"not valid YAML at line 8, column 3: key 'name' is given twice \(first on line 7\).*",
    ),
    "a key twice in a flow mapping": (
        Text("  requests_per_second: 50", "  {requests_per_second: 50, requests_per_second: 5}"),
        r"not valid YAML at line 29, column 29: key 'requests_per_second' is given twice \(first "
        r"on line 29\).*",
    ),
    "rate given twice in flow style": (
        _text_added("rate: {requests_per_second: 1, requests_per_second: 2}"),
        r"not valid YAML at line 33, column 1: key 'rate' is given twice \(first on line 28\).*",
    ),
    # --- NaN and infinity, for every number
    "rate NaN": (
        Text("requests_per_second: 50", "requests_per_second: .nan"),
        r"field 'rate\.requests_per_second' must be a finite number, got nan",
    ),
    "rate infinite": (
        Text("requests_per_second: 50", "requests_per_second: .inf"),
        r"field 'rate\.requests_per_second' must be a finite number, got inf",
    ),
    "timeout NaN": (
        Text("response_timeout_hours: 24", "response_timeout_hours: .NaN"),
        r"field 'response_timeout_hours' must be a finite number, got nan",
    ),
    "timeout infinite": (
        Text("response_timeout_hours: 24", "response_timeout_hours: .inf"),
        r"field 'response_timeout_hours' must be a finite number, got inf",
    ),
    "invalid fraction minus infinity": (
        Text("max_invalid_fraction: 0.05", "max_invalid_fraction: -.inf"),
        r"field 'max_invalid_fraction' must be a finite number, got -inf",
    ),
    "invalid fraction NaN": (
        Text("max_invalid_fraction: 0.05", "max_invalid_fraction: .nan"),
        r"field 'max_invalid_fraction' must be a finite number, got nan",
    ),
    # --- approvers: a non-empty list of names
    "no approvers": (
        _set("approvers", []),
        r"field 'approvers' must name at least one approver \(an Airflow user name\)",
    ),
    "missing approvers": (_drop("approvers"), r"field 'approvers' is required"),
    "approvers not a list": (
        _set("approvers", "approver"),
        r"field 'approvers' must be a list, got text",
    ),
    "an empty approver": (
        _set("approvers", [""]),
        r"field 'approvers\[0\]' must be an Airflow user name, got an empty name",
    ),
    "a blank approver": (
        _set("approvers", ["approver", "  "]),
        r"field 'approvers\[1\]' must be an Airflow user name, got an empty name",
    ),
    "a null approver": (
        _set("approvers", ["", None]),
        r"field 'approvers\[0\]' must be an Airflow user name, got an empty name",
    ),
    "a null approver after a name": (
        _set("approvers", ["approver", None]),
        r"field 'approvers\[1\]' must be an Airflow user name, got null \(an empty entry\)",
    ),
    "a number as approver": (
        _set("approvers", [42]),
        r"field 'approvers\[0\]' must be an Airflow user name, got the number 42",
    ),
    "a boolean as approver": (
        _set("approvers", [True]),
        r"field 'approvers\[0\]' must be an Airflow user name, got the boolean true",
    ),
    "an approver with spaces around": (
        _set("approvers", [" approver"]),
        r"field 'approvers\[0\]' must be a user name without spaces around it, on one line",
    ),
    "an approver on two lines": (
        _set("approvers", ["appro\nver"]),
        r"field 'approvers\[0\]' must be a user name without spaces around it, on one line",
    ),
    # --- the unsubscribe URL: https, one line, with {token}
    "unsubscribe url over http": (
        _set("unsubscribe.url", "http://example-exchange.test/u?token={token}"),
        r"field 'unsubscribe\.url' must be an https:// URL, got http:",
    ),
    "unsubscribe url javascript": (
        _set("unsubscribe.url", "javascript:alert(1)//{token}"),
        r"field 'unsubscribe\.url' must be an https:// URL, got javascript:",
    ),
    "unsubscribe url relative": (
        _set("unsubscribe.url", "/unsubscribe?token={token}"),
        r"field 'unsubscribe\.url' must be an https:// URL, got no scheme",
    ),
    "unsubscribe url with CR LF": (
        _set("unsubscribe.url", TOKEN_URL + "\r\nBcc: all@example.com"),
        r"field 'unsubscribe\.url' must be one line without spaces, control characters or any "
        r"of < > \" \\ \^ ` \|",
    ),
    "unsubscribe url with a space": (
        _set("unsubscribe.url", "https://example-exchange.test/un subscribe?token={token}"),
        r"field 'unsubscribe\.url' must be one line without spaces.*",
    ),
    "unsubscribe url with an angle bracket": (
        _set("unsubscribe.url", "https://example-exchange.test/>?token={token}"),
        r"field 'unsubscribe\.url' must be one line without spaces.*",
    ),
    "unsubscribe url without host": (
        _set("unsubscribe.url", "https:///unsubscribe?token={token}"),
        r"field 'unsubscribe\.url' must name a host \(https://host/path\?token=\{token\}\)",
    ),
    "unsubscribe url with credentials": (
        _set("unsubscribe.url", "https://admin:hunter2@example-exchange.test/u?t={token}"),
        r"field 'unsubscribe\.url' must not carry a user name or password",
    ),
    "unsubscribe url without token": (
        _set("unsubscribe.url", "https://example-exchange.test/unsubscribe"),
        r"field 'unsubscribe\.url' must contain '\{token\}', where each recipient's token goes",
    ),
    "unsubscribe url not text": (
        _set("unsubscribe.url", ["https://example-exchange.test/{token}"]),
        r"field 'unsubscribe\.url' must be text, got a list",
    ),
    "missing unsubscribe url": (_drop("unsubscribe.url"), r"field 'unsubscribe\.url' is required"),
    # --- names and subjects: one line, no control characters
    "sender name with CR LF": (
        _set("sender.name", "Example\r\nBcc: all@example.com"),
        r"field 'sender\.name' must be one line without control characters, got U\+000D at "
        r"character 8",
    ),
    "sender name with NUL": (
        _set("sender.name", "Example\x00"),
        r"field 'sender\.name' must be one line without control characters, got U\+0000 at "
        r"character 8",
    ),
    "sender name with a tab": (
        _set("sender.name", "Example\tExchange"),
        r"field 'sender\.name' must be one line without control characters, got U\+0009.*",
    ),
    "description on two lines": (
        _set("description", "Winter\nupdate"),
        r"field 'description' must be one line without control characters, got U\+000A.*",
    ),
    "company address with a line separator": (
        _set("company_address", "1 Harbour Street\u2028Dublin"),
        r"field 'company_address' must be one line without control characters, got U\+2028.*",
    ),
    "company address with NEL": (
        Text('company_address: "Example', 'company_address: "\\NExample'),
        r"field 'company_address' must be one line without control characters, got U\+0085.*",
    ),
    "sender name a number": (
        _set("sender.name", 2024),
        r"field 'sender\.name' must be text, got the number 2024; put it in quotes",
    ),
    "description a date": (
        _set("description", date(2026, 1, 5)),
        r"field 'description' must be text, got the date 2026-01-05; put it in quotes",
    ),
    "empty template": (_set("template", " "), r"field 'template' is required and may not be empty"),
    "name not a campaign name": (
        _set("name", "Winter Update"),
        r"field 'name' is not a valid campaign name: use 1 to 64 lower-case letters, digits, "
        r"'_' and '-', starting with a letter or digit",
    ),
    # --- categories: SendGrid's limits
    "eleven categories": (
        _set("categories", [f"c{i}" for i in range(limits.MAX_CATEGORIES + 1)]),
        r"field 'categories' may list at most 10 categories, got 11",
    ),
    "a category of 256 characters": (
        _set("categories", ["ok", "c" * (limits.MAX_CATEGORY_LENGTH + 1)]),
        r"field 'categories\[1\]' may be at most 255 characters, got 256",
    ),
    "a non-ASCII category": (
        _set("categories", ["hiver-été"]),
        r"field 'categories\[0\]' must be ASCII only \(SendGrid's rule for category names\)",
    ),
    "a category on two lines": (
        _set("categories", ["winter\nupdate"]),
        r"field 'categories\[0\]' must be one line without control characters",
    ),
    "an empty category": (
        _set("categories", ["winter", ""]),
        r"field 'categories\[1\]' must not be empty",
    ),
    "a category twice": (
        _set("categories", ["winter", "update", "winter"]),
        r"field 'categories\[2\]' repeats 'winter'; each category may be given once",
    ),
    "a number as category": (
        _set("categories", [2026]),
        r"field 'categories\[0\]' must be text, got the number 2026; put it in quotes",
    ),
    "categories not a list": (
        _set("categories", "winter-update"),
        r"field 'categories' must be a list, got text",
    ),
    # --- timeouts and rates: positive, finite
    "timeout -1": (
        _set("response_timeout_hours", -1),
        r"field 'response_timeout_hours' must be more than 0 hours, got -1\.0",
    ),
    "timeout 0": (
        _set("response_timeout_hours", 0),
        r"field 'response_timeout_hours' must be more than 0 hours, got 0\.0",
    ),
    "timeout a boolean": (
        _set("response_timeout_hours", True),
        r"field 'response_timeout_hours' must be a number, got the boolean true",
    ),
    "timeout with a unit": (
        _set("response_timeout_hours", "24h"),
        r"field 'response_timeout_hours' must be a number, got text",
    ),
    "timeout too large for a duration": (
        _set("response_timeout_hours", 1e300),
        r"field 'response_timeout_hours' is too large for a duration, got 1e\+300",
    ),
    "zero request rate": (
        _set("rate", {"requests_per_second": 0}),
        r"field 'rate\.requests_per_second' must be positive, got 0\.0",
    ),
    "negative recipient rate": (
        _set("rate", {"recipients_per_second": -1}),
        r"field 'rate\.recipients_per_second' must be positive, got -1\.0",
    ),
    "rate in words": (
        _set("rate.requests_per_second", "fast"),
        r"field 'rate\.requests_per_second' must be a number, got text",
    ),
    "rate not a mapping": (
        _set("rate", 50),
        r"field 'rate' must be a mapping \(of requests_per_second, recipients_per_second\), "
        r"got the number 50",
    ),
    "max consecutive failures 0": (
        _set("max_consecutive_failures", 0),
        r"field 'max_consecutive_failures' must be at least 1, got 0",
    ),
    # --- the per-value length cap
    "max field length 0": (
        _set("max_field_length", 0),
        r"field 'max_field_length' must be 1\.\.10000 characters, got 0",
    ),
    "max field length above the substitutions limit": (
        _set("max_field_length", limits.MAX_FIELD_LENGTH_CAP + 1),
        r"field 'max_field_length' must be 1\.\.10000 characters, got 10001",
    ),
    "max field length a fraction": (
        _set("max_field_length", 2.5),
        r"field 'max_field_length' must be a whole number, got the number 2\.5",
    ),
    # --- the rest of the spec
    "missing sender": (_drop("sender"), r"field 'sender' is required"),
    "sender not a mapping": (
        _set("sender", "news@example.test"),
        r"field 'sender' must be a mapping \(of email, name\), got text",
    ),
    "missing sender email": (_drop("sender.email"), r"field 'sender\.email' is required"),
    "invalid sender email": (
        _set("sender.email", "news at example"),
        r"field 'sender\.email' 'news at example' is not one valid email address",
    ),
    "two sender addresses": (
        _set("sender.email", "a@example.com, b@example.com"),
        r"field 'sender\.email' .* is not one valid email address",
    ),
    "sender email with CR LF": (
        _set("sender.email", "news@example.com\r\nBcc: x@example.com"),
        r"field 'sender\.email' must be one line without control characters.*",
    ),
    "invalid reply_to": (
        _set("reply_to", "support at example"),
        r"field 'reply_to' 'support at example' is not one valid email address",
    ),
    "two reply_to addresses": (
        _set("reply_to", "a@example.com;b@example.com"),
        r"field 'reply_to' .* is not one valid email address",
    ),
    "invalid unsubscribe mailto": (
        _set("unsubscribe.mailto", "unsubscribe"),
        r"field 'unsubscribe\.mailto' 'unsubscribe' is not one valid email address",
    ),
    "batch_size 0": (_set("batch_size", 0), r"field 'batch_size' must be 1\.\.1000, got 0"),
    "batch_size 1001": (
        _set("batch_size", 1001),
        r"field 'batch_size' must be 1\.\.1000, got 1001",
    ),
    "batch_size negative": (
        _set("batch_size", -5),
        r"field 'batch_size' must be 1\.\.1000, got -5",
    ),
    "batch_size not a number": (
        _set("batch_size", "many"),
        r"field 'batch_size' must be a whole number, got text",
    ),
    "batch_size a boolean": (
        _set("batch_size", True),
        r"field 'batch_size' must be a whole number, got the boolean true",
    ),
    "no locales": (_set("locales", []), r"field 'locales' must list at least one locale"),
    "missing locales": (_drop("locales"), r"field 'locales' is required"),
    "malformed locale": (
        _set("locales", ["en", "de-DE"]),
        r"field 'locales\[1\]' must be a locale such as 'en' or 'pt_BR', got 'de-DE'",
    ),
    "a locale twice": (_set("locales", ["en", "de", "en"]), r"field 'locales\[2\]' repeats 'en'"),
    "default_locale not in locales": (
        _set("default_locale", "it"),
        r"field 'default_locale' 'it' is not one of the locales",
    ),
    "both query and url": (
        _both_query_and_url,
        r"audience needs exactly one of 'query' or 'url'",
    ),
    "neither query nor url": (
        _neither_query_nor_url,
        r"audience needs exactly one of 'query' or 'url'",
    ),
    "query without connection": (
        _drop("audience.connection_id"),
        r"field 'audience\.connection_id' is required with 'audience\.query'",
    ),
    "bad transport": (
        _set("transport", "smtp-relay"),
        r"field 'transport' must be one of 'sendgrid', 'smtp', 'file'",
    ),
    "connection id on two lines": (
        _set("connection_id", "mailroom\nsendgrid"),
        r"field 'connection_id' must be one line without control characters.*",
    ),
    "max_invalid_fraction above 1": (
        _set("max_invalid_fraction", 1.5),
        r"field 'max_invalid_fraction' must be within 0\.\.1, got 1\.5",
    ),
    "invalid field name": (
        _set("fields", ["first-name"]),
        r"field 'fields\[0\]' must be a column name such as 'first_name', got 'first-name'",
    ),
    "a field twice": (
        _set("fields", ["first_name", "first_name"]),
        r"field 'fields\[1\]' repeats 'first_name'",
    ),
    "invalid seed address": (
        _set("seed_list", ["qa@example.com", "qa at example"]),
        r"field 'seed_list\[1\]' 'qa at example' is not a valid address",
    ),
    "missing template": (_drop("template"), r"field 'template' is required"),
    "missing company address": (_drop("company_address"), r"field 'company_address' is required"),
}


def spec_file(folder: Path, change: Change) -> Path:
    """The example with one change, written as a spec file (as a user would write it)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    if isinstance(change, Text):
        text = change(text)
    else:
        raw = example()
        change(raw)
        text = yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)
    path = folder / "winter_update.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_each_bad_spec_is_refused_naming_the_file_and_the_field(case: str, tmp_path: Path) -> None:
    change, expected = BAD_SPECS[case]
    path = spec_file(tmp_path, change)

    with pytest.raises(CampaignSpecError) as caught:
        load_campaign(tmp_path, "winter_update")

    message = str(caught.value)
    assert re.fullmatch(re.escape(f"{path}: ") + expected, message), message


def test_the_table_covers_every_kind_the_brief_names() -> None:
    assert len(BAD_SPECS) >= 30


def test_what_the_strict_rules_still_allow() -> None:
    """The edges of each rule are kept: a timeout of seconds (the end-to-end gate uses one),
    SendGrid's category limits exactly, an upper-case scheme, and a cap the campaign sets."""
    raw = example()
    raw["response_timeout_hours"] = 0.004
    raw["categories"] = [f"{i}" + "c" * (limits.MAX_CATEGORY_LENGTH - 1) for i in range(10)]
    raw["unsubscribe"]["url"] = "HTTPS://example-exchange.test/u/{token}?lang=de#top"
    raw["max_field_length"] = limits.MAX_FIELD_LENGTH_CAP
    raw["rate"] = {"requests_per_second": 0.5, "recipients_per_second": 100}
    raw["approvers"] = ["approver", "Ana María"]

    spec = parse(raw)

    assert spec.response_timeout_hours == 0.004
    assert len(spec.categories) == limits.MAX_CATEGORIES
    assert {len(c) for c in spec.categories} == {limits.MAX_CATEGORY_LENGTH}
    assert spec.max_field_length == limits.MAX_FIELD_LENGTH_CAP
    assert spec.rate == Rate(requests_per_second=0.5, recipients_per_second=100.0)
    assert spec.approvers == ("approver", "Ana María")


def test_a_merge_key_may_be_overridden_without_counting_as_a_key_given_twice(
    tmp_path: Path,
) -> None:
    text = EXAMPLE.read_text(encoding="utf-8").replace("rate:\n  requests_per_second: 50\n", "")
    text += "rate: {<<: {requests_per_second: 10}, requests_per_second: 50}\n"
    path = tmp_path / "winter_update.yaml"
    path.write_text(text, encoding="utf-8")

    assert load_campaign_file(path).rate.requests_per_second == 50.0


def test_a_frozen_copy_is_read_as_strictly_as_the_campaigns_folder(tmp_path: Path) -> None:
    path = tmp_path / "campaign.yaml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8") + "batch_size: 10\n", encoding="utf-8")

    with pytest.raises(CampaignSpecError, match=r"key 'batch_size' is given twice"):
        load_campaign_file(path)


def test_a_spec_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = campaigns_dir(tmp_path, {})
    (folder / "latin.yaml").write_bytes(b"name: latin\ndescription: caf\xe9\n")

    with pytest.raises(CampaignSpecError) as caught:
        load_campaign(folder, "latin")

    assert str(caught.value) == (
        f"{folder / 'latin.yaml'}: not UTF-8 text (byte 28 cannot be decoded); save the spec as "
        "UTF-8"
    )


def test_a_yaml_error_names_line_and_column_but_quotes_nothing(tmp_path: Path) -> None:
    folder = campaigns_dir(tmp_path, {"broken": "name: broken\nsender: [SG.secret-ish\n"})

    with pytest.raises(CampaignSpecError) as caught:
        load_campaign(folder, "broken")

    message = str(caught.value)
    assert re.fullmatch(
        re.escape(f"{folder / 'broken.yaml'}: not valid YAML at line ") + r"\d+, column \d+: .*",
        message,
    ), message
    assert "secret-ish" not in message


def test_a_spec_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(CampaignSpecError, match="expected a mapping"):
        parse(["not", "a", "mapping"])


def campaigns_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "campaigns"
    folder.mkdir()
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def test_invalid_yaml_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = campaigns_dir(tmp_path, {"broken": "name: broken\nsender: [unclosed\n"})

    with pytest.raises(CampaignSpecError, match="not valid YAML") as caught:
        load_campaign(folder, "broken")

    assert str(folder / "broken.yaml") in str(caught.value)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    folder = campaigns_dir(tmp_path, {"empty": ""})
    with pytest.raises(CampaignSpecError, match="expected a mapping"):
        load_campaign(folder, "empty")


def test_an_unknown_campaign_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(CampaignSpecError, match=r"unknown campaign 'summer_sale'") as caught:
        load_campaign(CAMPAIGNS, "summer_sale")
    assert "known: winter_update" in str(caught.value)

    empty = campaigns_dir(tmp_path, {})
    with pytest.raises(CampaignSpecError, match=r"known: none"):
        campaign_path(empty, "winter_update")


@pytest.mark.parametrize(
    "name",
    ["../x", "../../etc/passwd", "sub/dir", "/abs", "Winter", "winter.update", "", "-x", "a" * 65],
)
def test_a_campaign_name_with_path_or_odd_characters_is_refused(name: str) -> None:
    with pytest.raises(CampaignSpecError, match="is not valid"):
        load_campaign(CAMPAIGNS, name)


def test_a_spec_whose_name_differs_from_its_file_is_refused(tmp_path: Path) -> None:
    folder = campaigns_dir(tmp_path, {"copied": EXAMPLE.read_text(encoding="utf-8")})
    with pytest.raises(CampaignSpecError, match=r"field 'name' is 'winter_update'"):
        load_campaign(folder, "copied")
