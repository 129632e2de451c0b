"""Campaign specs: the example loads, and every malformed field is refused by name."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom.campaign_spec import (
    CampaignSpec,
    available_campaigns,
    campaign_path,
    load_campaign,
    parse_campaign,
)
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
    ):
        raw.pop(optional)

    spec = parse(raw)

    assert spec.default_locale == "en"
    assert spec.batch_size == 1000
    assert spec.max_invalid_fraction == 0.05
    assert (spec.rate.requests_per_second, spec.rate.recipients_per_second) == (None, None)
    assert spec.transport == "sendgrid"
    assert spec.reply_to is None


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


def _both_query_and_url(raw: dict[str, Any]) -> None:
    raw["audience"]["url"] = "file:///data/users.csv"


def _neither_query_nor_url(raw: dict[str, Any]) -> None:
    del raw["audience"]["query"]


# (change to the example, words the error must contain: the field it is about)
MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "missing sender": (_drop("sender"), ("'sender'", "required")),
    "sender not a mapping": (_set("sender", "news@example.test"), ("sender",)),
    "missing sender email": (_drop("sender.email"), ("sender", "'email'")),
    "invalid sender email": (_set("sender.email", "news at example"), ("sender.email",)),
    "two sender addresses": (
        _set("sender.email", "a@example.com, b@example.com"),
        ("sender.email",),
    ),
    "invalid reply_to": (_set("reply_to", "support at example"), ("reply_to",)),
    "two reply_to addresses": (_set("reply_to", "a@example.com;b@example.com"), ("reply_to",)),
    "invalid unsubscribe mailto": (
        _set("unsubscribe.mailto", "unsubscribe"),
        ("unsubscribe.mailto",),
    ),
    "batch_size 0": (_set("batch_size", 0), ("'batch_size'", "1..1000")),
    "batch_size 1001": (_set("batch_size", 1001), ("'batch_size'", "1..1000")),
    "batch_size negative": (_set("batch_size", -5), ("'batch_size'",)),
    "batch_size not a number": (_set("batch_size", "many"), ("'batch_size'",)),
    "batch_size a boolean": (_set("batch_size", True), ("'batch_size'",)),
    "no locales": (_set("locales", []), ("'locales'",)),
    "missing locales": (_drop("locales"), ("'locales'", "required")),
    "malformed locale": (_set("locales", ["en", "de-DE"]), ("'locales'", "de-DE")),
    "default_locale not in locales": (_set("default_locale", "it"), ("'default_locale'", "it")),
    "unsubscribe url without token": (
        _set("unsubscribe.url", "https://example-exchange.test/unsubscribe"),
        ("unsubscribe.url", "{token}"),
    ),
    "missing unsubscribe url": (_drop("unsubscribe.url"), ("unsubscribe", "'url'")),
    "both query and url": (_both_query_and_url, ("audience", "'query'", "'url'")),
    "neither query nor url": (_neither_query_nor_url, ("audience", "'query'", "'url'")),
    "query without connection": (_drop("audience.connection_id"), ("'connection_id'",)),
    "bad transport": (_set("transport", "smtp-relay"), ("'transport'",)),
    "no approvers": (_set("approvers", []), ("'approvers'",)),
    "missing approvers": (_drop("approvers"), ("'approvers'",)),
    "approvers not a list": (_set("approvers", "approver"), ("'approvers'",)),
    "max_invalid_fraction above 1": (
        _set("max_invalid_fraction", 1.5),
        ("'max_invalid_fraction'",),
    ),
    "invalid field name": (_set("fields", ["first-name"]), ("'fields'", "first-name")),
    "invalid seed address": (_set("seed_list", ["qa at example"]), ("seed_list",)),
    "zero request rate": (_set("rate", {"requests_per_second": 0}), ("requests_per_second",)),
    "negative recipient rate": (
        _set("rate", {"recipients_per_second": -1}),
        ("recipients_per_second",),
    ),
    "missing template": (_drop("template"), ("'template'",)),
    "missing company address": (_drop("company_address"), ("'company_address'",)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_field_is_refused_by_name(case: str) -> None:
    change, words = MALFORMED[case]
    raw = example()
    change(raw)

    with pytest.raises(CampaignSpecError) as caught:
        parse(raw)

    message = str(caught.value)
    assert message.startswith("campaigns/test.yaml"), message
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"


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
