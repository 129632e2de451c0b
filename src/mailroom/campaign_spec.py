"""Campaign specs: the YAML files in ``include/campaigns/``, parsed once into frozen values.

A spec names everything a run needs that is not data: template, sender, audience source,
locales, approvers, rate. It is read strictly, because a spec is written by hand and a typo must
not become a silent default: an unknown key (a misspelt ``bacth_size`` would otherwise leave
the default batch size in place), a key given twice (YAML keeps the last), NaN or infinity, a
line break in a value that ends up in a header, or a limit the provider would refuse at send
are all refused here, before anything is read or sent. Errors name the file and the field (a
dotted path such as ``sender.name``) and say what is allowed; they never repeat a value that
could be a credential.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mailroom.addresses import address_key, is_valid_single_address
from mailroom.checks.limits import (
    DEFAULT_MAX_FIELD_LENGTH,
    MAX_CATEGORIES,
    MAX_CATEGORY_LENGTH,
    MAX_FIELD_LENGTH_CAP,
    MAX_PERSONALIZATIONS,
)
from mailroom.errors import CampaignSpecError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
TEMPLATE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
LOCALE_PATTERN = re.compile(r"[a-z]{2,3}(_[A-Z]{2})?")
FIELD_PATTERN = re.compile(r"[a-z_][a-z0-9_]*")
TRANSPORTS = ("sendgrid", "smtp", "file")
# The Airflow connection a transport uses when the spec names none.
DEFAULT_CONNECTIONS = {
    "sendgrid": "mailroom_sendgrid",
    "smtp": "mailroom_smtp",
    "file": "mailroom_sendgrid",
}
DEFAULT_RESPONSE_TIMEOUT_HOURS = 24.0
DEFAULT_MAX_INVALID_FRACTION = 0.05
# Requests one send shard keeps in flight at once (``max_in_flight``; through SMTP, messages, one
# per connection), and the most it may ask.
DEFAULT_MAX_IN_FLIGHT = 4
MAX_IN_FLIGHT_CAP = 32
# Seconds between a send shard's try that ended (failed, or its process killed) and the next.
DEFAULT_SEND_RETRY_DELAY_SECONDS = 10.0

# What a one-line value may not hold: the C0 and C1 controls (CR, LF, TAB, NUL, ESC, NEL…), DEL,
# and the Unicode line and paragraph separators. Any of them in a sender name, a subject or a
# category would end up in a header, or split one.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Characters a URL sent as ``<url>`` in List-Unsubscribe may not hold (RFC 3986 excludes them).
_NOT_IN_URL = re.compile(r"[\s<>\"\\^`|]")
# Key names that suggest someone put a credential in the spec.
_SECRET_LIKE = re.compile(r"key|password|passwd|secret|token|credential|auth", re.IGNORECASE)

# The keys each mapping of a spec may have; anything else is refused with a suggestion.
SENDER_KEYS = ("email", "name")
AUDIENCE_KEYS = ("connection_id", "query", "suppressions_query", "url", "suppressions_url")
UNSUBSCRIBE_KEYS = ("url", "mailto")
RATE_KEYS = ("requests_per_second", "recipients_per_second")
TOP_LEVEL_KEYS = (
    "name",
    "description",
    "template",
    "sender",
    "reply_to",
    "company_address",
    "audience",
    "fields",
    "max_field_length",
    "locales",
    "default_locale",
    "approvers",
    "response_timeout_hours",
    "unsubscribe",
    "max_invalid_fraction",
    "batch_size",
    "rate",
    "max_in_flight",
    "transport",
    "connection_id",
    "max_consecutive_failures",
    "send_retry_delay_seconds",
    "categories",
    "seed_list",
)


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
    # Seconds a send shard's next try waits after a try that ended without finishing (it raised,
    # or its worker was killed): positive, finite; 10 by default.
    send_retry_delay_seconds: float = DEFAULT_SEND_RETRY_DELAY_SECONDS
    categories: tuple[str, ...] = field(default_factory=tuple)
    seed_list: tuple[str, ...] = field(default_factory=tuple)
    # The longest value, in characters, any recipient field may hold; validation quarantines a
    # row with a longer one before approval.
    max_field_length: int = DEFAULT_MAX_FIELD_LENGTH
    # How many requests each send shard keeps in flight at once, over as many kept-alive
    # connections, within the campaign's ``rate``: 1..32, 4 by default. Past 4 to 8 little is
    # gained on a fast link; a slow or distant one gains more.
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

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
    spec = load_campaign_file(path)
    if spec.name != name:
        raise CampaignSpecError(f"{path}: field 'name' is {spec.name!r}, expected {name!r}")
    return spec


def load_campaign_file(path: Path) -> CampaignSpec:
    """The spec in one file, wherever it lives (a run's frozen copy too), read as strictly as
    ``load_campaign`` reads the campaigns folder."""
    return parse_campaign(read_spec_yaml(path), source=str(path))


def read_spec_yaml(path: Path) -> object:
    """The YAML document of a spec file: UTF-8, one document, no key given twice.

    The error says where (line and column) and what, but shows no excerpt of the file: the line
    it would quote is the user's, and may hold anything."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CampaignSpecError(
            f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded); save the spec as UTF-8"
        ) from exc
    except OSError as exc:
        raise CampaignSpecError(f"{path}: cannot be read: {exc.strerror}") from exc
    try:
        # A SafeLoader subclass: no arbitrary Python objects.
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = "; ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise CampaignSpecError(f"{path}: not valid YAML{where}: {what}") from exc
    except yaml.YAMLError as exc:
        raise CampaignSpecError(f"{path}: not valid YAML: {exc}") from exc


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives one key twice.

    YAML itself forbids a repeated key, but PyYAML keeps the last one silently: a second
    ``approvers:`` further down a long spec would replace the first without a word. Merge keys
    (``<<: *defaults``) may still be overridden, which is what they are for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class refuses it with its own message
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {first}); YAML keeps only the "
                    "last, so give it once",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_campaign(raw: object, *, source: str) -> CampaignSpec:
    """The spec in ``raw`` (a parsed YAML document), every field checked; ``source`` names the
    file in errors."""
    top = _Fields(raw, source, "", TOP_LEVEL_KEYS)
    sender = top.mapping("sender", SENDER_KEYS, required=True)
    audience = top.mapping("audience", AUDIENCE_KEYS, required=True)
    unsubscribe = top.mapping("unsubscribe", UNSUBSCRIBE_KEYS, required=True)
    rate = top.mapping("rate", RATE_KEYS, required=False)

    name = top.line("name", required=True)
    if not NAME_PATTERN.fullmatch(name):
        raise top.error(
            "name",
            "is not a valid campaign name: use 1 to 64 lower-case letters, digits, '_' "
            "and '-', starting with a letter or digit",
        )

    locales = tuple(top.names("locales", LOCALE_PATTERN, "a locale such as 'en' or 'pt_BR'"))
    if not locales:
        raise top.error("locales", "must list at least one locale")
    for index, locale in enumerate(locales):
        if not _known_locale(locale):
            raise top.error(
                f"locales[{index}]", f"{locale!r} is not a locale Babel knows (CLDR has no data)"
            )
    default_locale = top.line("default_locale") or locales[0]
    if default_locale not in locales:
        raise top.error("default_locale", f"{default_locale!r} is not one of the locales")
    template = top.line("template", required=True)
    if not TEMPLATE_PATTERN.fullmatch(template):
        raise top.error(
            "template",
            f"must be the name of a folder in templates/ (letters, digits, '_' and '-'), got "
            f"{template!r}",
        )

    source_spec = AudienceSource(
        connection_id=audience.line("connection_id") or None,
        query=audience.text("query") or None,
        suppressions_query=audience.text("suppressions_query") or None,
        url=audience.line("url") or None,
        suppressions_url=audience.line("suppressions_url") or None,
    )
    if bool(source_spec.query) == bool(source_spec.url):
        raise CampaignSpecError(f"{source}: audience needs exactly one of 'query' or 'url'")
    if source_spec.query and not source_spec.connection_id:
        raise audience.error("connection_id", "is required with 'audience.query'")

    sender_email = sender.address("email", required=True) or ""
    reply_to = top.address("reply_to")
    mailto = unsubscribe.address("mailto")
    url_template = _unsubscribe_url(unsubscribe)

    batch_size = top.integer("batch_size", default=MAX_PERSONALIZATIONS)
    if not 1 <= batch_size <= MAX_PERSONALIZATIONS:
        raise top.error("batch_size", f"must be 1..{MAX_PERSONALIZATIONS}, got {batch_size}")
    max_invalid = top.number("max_invalid_fraction")
    if max_invalid is None:
        max_invalid = DEFAULT_MAX_INVALID_FRACTION
    if not 0.0 <= max_invalid <= 1.0:
        raise top.error("max_invalid_fraction", f"must be within 0..1, got {max_invalid!r}")

    fields = tuple(top.names("fields", FIELD_PATTERN, "a column name such as 'first_name'"))
    max_field_length = top.integer("max_field_length", default=DEFAULT_MAX_FIELD_LENGTH)
    if not 1 <= max_field_length <= MAX_FIELD_LENGTH_CAP:
        raise top.error(
            "max_field_length",
            f"must be 1..{MAX_FIELD_LENGTH_CAP} characters, got {max_field_length}",
        )

    approvers = _approvers(top)

    transport = top.line("transport") or "sendgrid"
    if transport not in TRANSPORTS:
        raise top.error("transport", f"must be one of {', '.join(repr(t) for t in TRANSPORTS)}")

    seed_list = tuple(top.strings("seed_list"))
    for index, addr in enumerate(seed_list):
        if not is_valid_single_address(addr):
            raise top.error(f"seed_list[{index}]", f"{addr!r} is not a valid address")

    return CampaignSpec(
        name=name,
        description=top.line("description"),
        template=template,
        sender=Sender(email=sender_email, name=sender.line("name")),
        reply_to=reply_to,
        company_address=top.line("company_address", required=True),
        audience=source_spec,
        fields=fields,
        locales=locales,
        default_locale=default_locale,
        approvers=approvers,
        response_timeout_hours=_response_timeout_hours(top),
        unsubscribe=Unsubscribe(url_template=url_template, mailto=mailto),
        max_invalid_fraction=max_invalid,
        batch_size=batch_size,
        rate=Rate(
            requests_per_second=_positive(rate, "requests_per_second"),
            recipients_per_second=_positive(rate, "recipients_per_second"),
        ),
        transport=transport,
        connection_id=top.line("connection_id") or DEFAULT_CONNECTIONS[transport],
        max_consecutive_failures=_positive_int(top, "max_consecutive_failures", 10),
        send_retry_delay_seconds=_send_retry_delay_seconds(top),
        categories=_categories(top),
        seed_list=seed_list,
        max_field_length=max_field_length,
        max_in_flight=_max_in_flight(top),
    )


def _approvers(top: _Fields) -> tuple[str, ...]:
    """Airflow user names: an empty or null entry would name nobody, and a name with spaces
    around it would never match the user who answers."""
    approvers = top.items("approvers", required=True)
    if not approvers:
        raise top.error("approvers", "must name at least one approver (an Airflow user name)")
    for index, approver in enumerate(approvers):
        where = f"approvers[{index}]"
        if not isinstance(approver, str) or not approver.strip():
            raise top.error(where, f"must be an Airflow user name, got {_describe(approver)}")
        if approver != approver.strip() or _CONTROL.search(approver):
            raise top.error(where, "must be a user name without spaces around it, on one line")
    return tuple(approvers)


def _categories(top: _Fields) -> tuple[str, ...]:
    """SendGrid's limits on ``categories``: a request breaking one fails at the provider, for
    every batch of the run, after approval."""
    categories = top.strings("categories")
    if len(categories) > MAX_CATEGORIES:
        raise top.error(
            "categories", f"may list at most {MAX_CATEGORIES} categories, got {len(categories)}"
        )
    for index, category in enumerate(categories):
        where = f"categories[{index}]"
        if not category:
            raise top.error(where, "must not be empty")
        if len(category) > MAX_CATEGORY_LENGTH:
            raise top.error(
                where, f"may be at most {MAX_CATEGORY_LENGTH} characters, got {len(category)}"
            )
        if not category.isascii():
            raise top.error(where, "must be ASCII only (SendGrid's rule for category names)")
        if _CONTROL.search(category):
            raise top.error(where, "must be one line without control characters")
        if category in categories[:index]:
            raise top.error(where, f"repeats {category!r}; each category may be given once")
    return tuple(categories)


def _unsubscribe_url(unsubscribe: _Fields) -> str:
    """The link every message carries, in its body and its ``List-Unsubscribe`` header: an
    https URL on one line with a ``{token}`` placeholder. The URL itself is not repeated in
    errors (it could carry credentials)."""
    key = "url"
    url = unsubscribe.text(key, required=True)
    if _CONTROL.search(url) or _NOT_IN_URL.search(url):
        raise unsubscribe.error(
            key, 'must be one line without spaces, control characters or any of < > " \\ ^ ` |'
        )
    try:
        parts = urlsplit(url.replace("{token}", "token"))
        host = parts.hostname
        credentials = parts.username is not None or parts.password is not None
    except ValueError as exc:
        raise unsubscribe.error(key, f"is not a valid URL ({exc})") from exc
    if parts.scheme.lower() != "https":
        got = f"{parts.scheme}:" if parts.scheme else "no scheme"
        raise unsubscribe.error(key, f"must be an https:// URL, got {got}")
    if not host:
        raise unsubscribe.error(key, "must name a host (https://host/path?token={token})")
    if credentials:
        raise unsubscribe.error(key, "must not carry a user name or password")
    if "{token}" not in url:
        raise unsubscribe.error(key, "must contain '{token}', where each recipient's token goes")
    return url


def _response_timeout_hours(top: _Fields) -> float:
    """Hours the approver has before an unanswered approval counts as Reject."""
    return _duration(top, "response_timeout_hours", "hours", DEFAULT_RESPONSE_TIMEOUT_HOURS)


def _send_retry_delay_seconds(top: _Fields) -> float:
    """Seconds before a send shard is tried again."""
    return _duration(top, "send_retry_delay_seconds", "seconds", DEFAULT_SEND_RETRY_DELAY_SECONDS)


def _duration(top: _Fields, key: str, unit: str, default: float) -> float:
    """A positive duration in ``unit`` (``hours`` or ``seconds``). Leaving the key out means the
    default; 0 or less is refused, never read as the default (NaN and infinity are refused as
    numbers), and so is one too large for a ``timedelta``."""
    value = top.number(key)
    if value is None:
        return default
    if value <= 0:
        raise top.error(key, f"must be more than 0 {unit}, got {value!r}")
    try:
        timedelta(**{unit: value})
    except OverflowError as exc:
        raise top.error(key, f"is too large for a duration, got {value!r}") from exc
    return value


def _max_in_flight(top: _Fields) -> int:
    """Requests a send shard keeps in flight at once. Leaving the key out means the default; a
    count outside 1..``MAX_IN_FLIGHT_CAP`` is refused (each is a connection to the provider,
    and the campaign's ``rate`` bounds the send anyway)."""
    key = "max_in_flight"
    count = top.integer(key, default=DEFAULT_MAX_IN_FLIGHT)
    if not 1 <= count <= MAX_IN_FLIGHT_CAP:
        raise top.error(key, f"must be 1..{MAX_IN_FLIGHT_CAP} requests, got {count}")
    return count


def _positive_int(reader: _Fields, key: str, default: int) -> int:
    value = reader.integer(key, default=default)
    if value < 1:
        raise reader.error(key, f"must be at least 1, got {value}")
    return value


def _positive(rate: _Fields, key: str) -> float | None:
    value = rate.number(key)
    if value is None:
        return None
    if value <= 0:
        raise rate.error(key, f"must be positive, got {value!r}")
    return value


_KIND_NAMES = {
    str: "text",
    int: "whole number",
    float: "number",
    list: "list",
    dict: "mapping",
}


def _known_locale(locale: str) -> bool:
    from babel import Locale, UnknownLocaleError

    try:
        Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return False
    return True


def _describe(value: object) -> str:
    """How YAML read a value, in the user's words (never the value itself when it is text)."""
    if value is None:
        return "null (an empty entry)"
    if isinstance(value, str):
        return "an empty name" if not value.strip() else "text"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, date):
        return f"the date {value.isoformat()}"
    return f"a {_KIND_NAMES.get(type(value), type(value).__name__)}"


class _Fields:
    """One mapping of a spec, read by key: each read checks the value's type and names the
    field by its dotted path in errors. Keys it does not know are refused on construction."""

    def __init__(self, raw: object, source: str, path: str, known: tuple[str, ...]) -> None:
        if not isinstance(raw, dict):
            if not path:
                got = "an empty document" if raw is None else _describe(raw)
                raise CampaignSpecError(
                    f"{source}: expected a mapping of campaign fields, got {got}"
                )
            raise CampaignSpecError(
                f"{source}: field {path!r} must be a mapping (of {', '.join(known)}), "
                f"got {_describe(raw)}"
            )
        self.raw: dict[Any, Any] = raw
        self.source = source
        self.path = path
        problems = [self._unknown(key, known) for key in raw if key not in known]
        if problems:
            raise CampaignSpecError(f"{source}: " + "; ".join(problems))

    def _unknown(self, key: object, known: tuple[str, ...]) -> str:
        if not isinstance(key, str):
            return (
                f"a key in {self.path or 'the spec'} is {_describe(key)}, not a field name "
                "(put it in quotes if it is meant as one)"
            )
        where = self.where(key)
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            return f"unknown key {where!r} (did you mean {self.where(close[0])!r}?)"
        if _SECRET_LIKE.search(key):
            return (
                f"unknown key {where!r}: a campaign spec holds no secrets; keep credentials "
                "in the Airflow connection the spec names"
            )
        return f"unknown key {where!r} (known keys: {', '.join(known)})"

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> CampaignSpecError:
        return CampaignSpecError(f"{self.source}: field {self.where(key)!r} {message}")

    def _get(self, key: str, required: bool) -> Any:
        value = self.raw.get(key)
        if value is None and required:
            raise self.error(key, "is required")
        return value

    def mapping(self, key: str, known: tuple[str, ...], *, required: bool) -> _Fields:
        value = self._get(key, required)
        return _Fields({} if value is None else value, self.source, self.where(key), known)

    def text(self, key: str, *, required: bool = False) -> str:
        """A text value (several lines allowed); absent is ''."""
        value = self._get(key, required)
        if value is None:
            return ""
        if not isinstance(value, str):
            hint = "" if isinstance(value, list | dict) else "; put it in quotes"
            raise self.error(key, f"must be text, got {_describe(value)}{hint}")
        if required and not value.strip():
            raise self.error(key, "is required and may not be empty")
        return value

    def line(self, key: str, *, required: bool = False) -> str:
        """A one-line text value: no line break or other control character."""
        value = self.text(key, required=required)
        found = _CONTROL.search(value)
        if found:
            raise self.error(
                key,
                f"must be one line without control characters, got U+{ord(found.group()):04X} "
                f"at character {found.start() + 1}",
            )
        return value

    def address(self, key: str, *, required: bool = False) -> str | None:
        value = self.line(key, required=required)
        if not value:
            return None
        if not is_valid_single_address(value):
            raise self.error(key, f"{value!r} is not one valid email address")
        return value

    def items(self, key: str, *, required: bool = False) -> list[Any]:
        value = self._get(key, required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, got {_describe(value)}")
        return value

    def strings(self, key: str) -> list[str]:
        values = self.items(key)
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise self.error(
                    f"{key}[{index}]", f"must be text, got {_describe(value)}; put it in quotes"
                )
        return values

    def names(self, key: str, pattern: re.Pattern[str], what: str) -> list[str]:
        """A list of distinct names, each matching ``pattern``."""
        values = self.items(key, required=key == "locales")
        for index, value in enumerate(values):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                shown = repr(value) if isinstance(value, str) else _describe(value)
                raise self.error(f"{key}[{index}]", f"must be {what}, got {shown}")
            if value in values[:index]:
                raise self.error(f"{key}[{index}]", f"repeats {value!r}")
        return values

    def number(self, key: str) -> float | None:
        """A finite int or float (a YAML boolean is not a number), as a float; absent is None."""
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise self.error(key, f"must be a finite number, got {value!r}")
        return float(value)

    def integer(self, key: str, *, default: int) -> int:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, got {_describe(value)}")
        return value
