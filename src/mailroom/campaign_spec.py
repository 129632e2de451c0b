"""Campaign specs: the YAML files in ``include/campaigns/``, parsed once into frozen values.

A spec names everything a run needs that is not data: template, sender, audience source,
locales, approvers, rate. Errors name the file and the field, and are raised before anything
is read or sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mailroom.addresses import address_key, is_valid_single_address
from mailroom.checks.limits import MAX_PERSONALIZATIONS
from mailroom.errors import CampaignSpecError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
LOCALE_PATTERN = re.compile(r"[a-z]{2,3}(_[A-Z]{2})?")
TRANSPORTS = ("sendgrid", "smtp", "file")
# The Airflow connection a transport uses when the spec names none.
DEFAULT_CONNECTIONS = {
    "sendgrid": "mailroom_sendgrid",
    "smtp": "mailroom_smtp",
    "file": "mailroom_sendgrid",
}


@dataclass(frozen=True)
class Sender:
    email: str
    name: str


@dataclass(frozen=True)
class AudienceSource:
    """Where recipients come from: a SQL query through a named connection, or a file URL."""

    connection_id: str | None
    query: str | None
    suppressions_query: str | None
    url: str | None
    suppressions_url: str | None


@dataclass(frozen=True)
class Unsubscribe:
    url_template: str
    mailto: str | None


@dataclass(frozen=True)
class Rate:
    requests_per_second: float | None
    recipients_per_second: float | None


@dataclass(frozen=True)
class CampaignSpec:
    name: str
    description: str
    template: str
    sender: Sender
    reply_to: str | None
    company_address: str
    audience: AudienceSource
    fields: tuple[str, ...]
    locales: tuple[str, ...]
    default_locale: str
    approvers: tuple[str, ...]
    response_timeout_hours: float
    unsubscribe: Unsubscribe
    max_invalid_fraction: float
    batch_size: int
    rate: Rate
    transport: str
    connection_id: str
    max_consecutive_failures: int = 10
    categories: tuple[str, ...] = field(default_factory=tuple)
    seed_list: tuple[str, ...] = field(default_factory=tuple)

    @property
    def public_addresses(self) -> frozenset[str]:
        """The ``address_key`` of the campaign's own addresses every recipient sees in the
        message: the sender, the reply-to and the unsubscribe mailbox. They are not audience
        data, even when the campaign's staff are on the list."""
        own = (self.sender.email, self.reply_to, self.unsubscribe.mailto)
        return frozenset(k for k in (address_key(a) for a in own) if k is not None)

    def summary(self) -> dict[str, Any]:
        """Plain values for XCom and reports (no secrets live in a spec)."""
        return {
            "name": self.name,
            "template": self.template,
            "locales": list(self.locales),
            "approvers": list(self.approvers),
            "batch_size": self.batch_size,
            "transport": self.transport,
        }


def campaign_path(campaigns_dir: Path, name: str) -> Path:
    if not NAME_PATTERN.fullmatch(name):
        raise CampaignSpecError(
            f"campaign name {name!r} is not valid: use lower-case letters, digits, '_' and '-'"
        )
    path = campaigns_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_campaigns(campaigns_dir)) or "none"
        raise CampaignSpecError(f"unknown campaign {name!r} (known: {known}) in {campaigns_dir}")
    return path


def available_campaigns(campaigns_dir: Path) -> list[str]:
    if not campaigns_dir.is_dir():
        return []
    return sorted(p.stem for p in campaigns_dir.glob("*.yaml"))


def load_campaign(campaigns_dir: Path, name: str) -> CampaignSpec:
    path = campaign_path(campaigns_dir, name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CampaignSpecError(f"{path}: not valid YAML: {exc}") from exc
    spec = parse_campaign(raw, source=str(path))
    if spec.name != name:
        raise CampaignSpecError(f"{path}: field 'name' is {spec.name!r}, expected {name!r}")
    return spec


def parse_campaign(raw: object, *, source: str) -> CampaignSpec:
    reader = _Fields(raw, source)
    sender = _Fields(reader.required("sender", dict), f"{source}: sender")
    audience = _Fields(reader.required("audience", dict), f"{source}: audience")
    unsubscribe = _Fields(reader.required("unsubscribe", dict), f"{source}: unsubscribe")
    rate = _Fields(reader.optional("rate", dict) or {}, f"{source}: rate")

    locales = tuple(reader.required("locales", list))
    if not locales:
        raise CampaignSpecError(f"{source}: field 'locales' must list at least one locale")
    for loc in locales:
        if not isinstance(loc, str) or not LOCALE_PATTERN.fullmatch(loc):
            raise CampaignSpecError(f"{source}: field 'locales' has an invalid locale {loc!r}")
    default_locale = reader.optional("default_locale", str) or locales[0]
    if default_locale not in locales:
        raise CampaignSpecError(
            f"{source}: field 'default_locale' {default_locale!r} is not one of the locales"
        )

    source_spec = AudienceSource(
        connection_id=audience.optional("connection_id", str),
        query=audience.optional("query", str),
        suppressions_query=audience.optional("suppressions_query", str),
        url=audience.optional("url", str),
        suppressions_url=audience.optional("suppressions_url", str),
    )
    if bool(source_spec.query) == bool(source_spec.url):
        raise CampaignSpecError(f"{source}: audience needs exactly one of 'query' or 'url'")
    if source_spec.query and not source_spec.connection_id:
        raise CampaignSpecError(f"{source}: audience 'query' needs a 'connection_id'")

    sender_email = sender.required("email", str)
    if not is_valid_single_address(sender_email):
        raise CampaignSpecError(f"{source}: sender.email {sender_email!r} is not a valid address")

    reply_to = reader.optional("reply_to", str)
    if reply_to is not None and not is_valid_single_address(reply_to):
        raise CampaignSpecError(f"{source}: field 'reply_to' {reply_to!r} is not a valid address")
    mailto = unsubscribe.optional("mailto", str)
    if mailto is not None and not is_valid_single_address(mailto):
        raise CampaignSpecError(f"{source}: unsubscribe.mailto {mailto!r} is not a valid address")

    url_template = unsubscribe.required("url", str)
    if "{token}" not in url_template:
        raise CampaignSpecError(f"{source}: unsubscribe.url must contain '{{token}}'")

    batch_size = reader.optional("batch_size", int)
    if batch_size is None:
        batch_size = MAX_PERSONALIZATIONS
    if not 1 <= batch_size <= MAX_PERSONALIZATIONS:
        raise CampaignSpecError(f"{source}: field 'batch_size' must be 1..{MAX_PERSONALIZATIONS}")
    max_invalid = reader.optional("max_invalid_fraction", (int, float))
    max_invalid = 0.05 if max_invalid is None else float(max_invalid)
    if not 0.0 <= max_invalid <= 1.0:
        raise CampaignSpecError(f"{source}: field 'max_invalid_fraction' must be within 0..1")

    fields = tuple(reader.optional("fields", list) or ())
    for name in fields:
        if not isinstance(name, str) or not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise CampaignSpecError(f"{source}: field 'fields' has an invalid name {name!r}")

    approvers = tuple(str(a) for a in (reader.optional("approvers", list) or ()))
    if not approvers:
        raise CampaignSpecError(f"{source}: field 'approvers' must name at least one approver")

    transport = reader.optional("transport", str) or "sendgrid"
    if transport not in TRANSPORTS:
        raise CampaignSpecError(
            f"{source}: field 'transport' must be one of {', '.join(repr(t) for t in TRANSPORTS)}"
        )

    seed_list = tuple(str(a) for a in (reader.optional("seed_list", list) or ()))
    for addr in seed_list:
        if not is_valid_single_address(addr):
            raise CampaignSpecError(f"{source}: seed_list address {addr!r} is not valid")

    return CampaignSpec(
        name=reader.required("name", str),
        description=reader.optional("description", str) or "",
        template=reader.required("template", str),
        sender=Sender(email=sender_email, name=sender.optional("name", str) or ""),
        reply_to=reply_to,
        company_address=reader.required("company_address", str),
        audience=source_spec,
        fields=fields,
        locales=locales,
        default_locale=default_locale,
        approvers=approvers,
        response_timeout_hours=float(reader.optional("response_timeout_hours", (int, float)) or 24),
        unsubscribe=Unsubscribe(url_template=url_template, mailto=mailto),
        max_invalid_fraction=max_invalid,
        batch_size=batch_size,
        rate=Rate(
            requests_per_second=_positive(rate, "requests_per_second"),
            recipients_per_second=_positive(rate, "recipients_per_second"),
        ),
        transport=transport,
        connection_id=reader.optional("connection_id", str) or DEFAULT_CONNECTIONS[transport],
        max_consecutive_failures=_positive_int(reader, "max_consecutive_failures", 10),
        categories=tuple(str(c) for c in (reader.optional("categories", list) or ())),
        seed_list=seed_list,
    )


def _positive_int(reader: _Fields, key: str, default: int) -> int:
    value = reader.optional(key, int)
    if value is None:
        return default
    if value < 1:
        raise CampaignSpecError(f"{reader.source}: field {key!r} must be at least 1")
    return int(value)


def _positive(rate: _Fields, key: str) -> float | None:
    value = rate.optional(key, (int, float))
    if value is None:
        return None
    if value <= 0:
        raise CampaignSpecError(f"{rate.source}.{key} must be positive, got {value!r}")
    return float(value)


class _Fields:
    def __init__(self, raw: object, source: str) -> None:
        if not isinstance(raw, dict):
            raise CampaignSpecError(f"{source}: expected a mapping, got {type(raw).__name__}")
        self.raw: dict[str, Any] = raw
        self.source = source

    def required(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.raw or self.raw[key] is None:
            raise CampaignSpecError(f"{self.source}: field {key!r} is required")
        return self.optional(key, kind)

    def optional(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise CampaignSpecError(f"{self.source}: field {key!r} must be a {expected}")
        return value
