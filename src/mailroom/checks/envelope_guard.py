"""The envelope guard: the last check on the exact bytes a transport is about to send.

It parses the serialised body strictly (UTF-8, one JSON object, no key twice in an object; never
the object that produced it) and refuses it unless its SHA-256 is in the approved manifest and
everything but its personalizations is exactly what the approved inputs give: the shared part
that ``batches.shared_part`` rebuilds from the campaign spec and the locale's rendered content
(``ApprovedManifest.shared``), not from the frozen bodies, so a field the freeze never writes or
a shared value that differs (a header, a reply-to, a template, an attachment, a subject or HTML
rendered with someone's data) is refused whatever it holds. Then every personalization must be
exactly ``to`` (one ``{email}``), ``substitutions`` and ``headers``, with nothing in cc/bcc (nor
a ``bcc`` mail setting), no address twice, every address one valid address, no reserved header,
no recipient's address in another recipient's personalization or in the shared parts, each
personalization's own unsubscribe link (the same link in its substitutions and its
``List-Unsubscribe`` header, and no other personalization's), every substitution tag the
content uses filled and no template marker left, within the provider's limits, and (when the
outbox says who this batch is for) its recipients exactly those, each with their own values.

Transports cannot skip it: ``Transport.send`` runs it and only hands ``GuardedBody`` values to
the provider-specific code.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from bisect import bisect_right
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, chain
from typing import Any
from urllib.parse import unquote

from mailroom.addresses import addresses_shown, is_valid_single_address
from mailroom.checks.limits import (
    MAX_PERSONALIZATIONS,
    MAX_RECIPIENTS,
    MAX_REQUEST_BYTES,
    RESERVED_HEADERS,
)
from mailroom.errors import EnvelopeViolation
from mailroom.substitutions import LEFTOVER_MARKER, TAG_PATTERN, UNSUBSCRIBE_FIELD, substitution_tag

# A personalization is exactly what the freeze writes (``batches.personalization``): anything
# else (a ``subject``, ``dynamic_template_data``, ``custom_args``, ``send_at``, a display name)
# is a field Mailroom never sets, and could carry another user's data past every other rule.
_PERSONALIZATION_KEYS = frozenset({"to", "substitutions", "headers"})
_TO_KEYS = frozenset({"email"})
_UNSUBSCRIBE_TAG = substitution_tag(UNSUBSCRIBE_FIELD, html=False)
_UNSUBSCRIBE_HTML_TAG = substitution_tag(UNSUBSCRIBE_FIELD, html=True)
# Around an "@": the local part's tail and the domain's head, in lower-cased text.
_LOCAL_TAIL_REVERSED = re.compile(r"[a-z0-9._+'-]{1,64}")
_DOMAIN_HEAD = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")


@dataclass(frozen=True)
class ApprovedManifest:
    """What the approver approved: the manifest's digest, every body digest in it, and, by body
    digest, what the approved inputs (the campaign spec and the locale's rendered content) give
    for everything of that body but its personalizations (``batches.shared_parts``)."""

    sha256: str
    digests: frozenset[str]
    shared: Mapping[str, Mapping[str, Any]]
    # The campaign's own addresses (``CampaignSpec.public_addresses``): every recipient sees
    # them, so they are no one's address shown to another, even when staff are on the list.
    public: frozenset[str] = frozenset()


@dataclass(frozen=True)
class GuardedBody:
    """Bytes that passed the guard, with the one recipient of each personalization."""

    body: bytes
    sha256: str
    recipients: tuple[str, ...]


def values_digest(substitutions: Any, headers: Any) -> str:
    """SHA-256 of one envelope's own values (substitutions and headers), in a canonical form.

    Recorded per recipient when the batches are staged, from the envelopes rather than from the
    request bodies, so the guard can tell whose values a personalization carries.
    """
    canonical = _CANONICAL.encode([substitutions or {}, headers or {}])
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# json.dumps(..., sort_keys=True, ensure_ascii=False, separators=(",", ":")), built once.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def check_envelope(
    body: bytes,
    approved: ApprovedManifest,
    expected_recipients: Collection[str] | Mapping[str, str | None] | None = None,
) -> GuardedBody:
    """Guard one request. ``expected_recipients``: who the batch is for, from the outbox; as a
    mapping, also each recipient's ``values_digest``, so nobody can carry another's values."""
    digest = hashlib.sha256(body).hexdigest()
    if digest not in approved.digests:
        raise EnvelopeViolation(
            f"request {digest[:12]}… is not in the approved manifest {approved.sha256[:12]}…"
        )
    expected_shared = approved.shared.get(digest)
    if expected_shared is None:
        raise EnvelopeViolation(f"request {digest[:12]}… has no reconstruction to compare with")
    data = _parse(body)
    _check_shared_part(data, expected_shared, digest)
    recipients = _check(data, approved.public)
    if expected_recipients is not None:
        expected = {e.lower() for e in expected_recipients}
        got = {r.lower() for r in recipients}
        if got != expected:
            raise EnvelopeViolation(
                f"request {digest[:12]}… is addressed to {len(got - expected)} recipient(s) "
                f"outside its batch and misses {len(expected - got)} of its own"
            )
        if isinstance(expected_recipients, Mapping):
            own = {k.lower(): v for k, v in expected_recipients.items()}
            for i, (item, email) in enumerate(
                zip(data["personalizations"], recipients, strict=True)
            ):
                wanted = own[email.lower()]
                found = values_digest(item.get("substitutions"), item.get("headers"))
                if wanted is not None and found != wanted:
                    raise EnvelopeViolation(
                        f"personalization {i} carries values that are not its recipient's own"
                    )
    return GuardedBody(body=body, sha256=digest, recipients=recipients)


def recipients_of_body(body: bytes) -> tuple[str, ...]:
    """Check the one-recipient rules on a serialised request; returns its recipients in order."""
    return _check(_parse(body))


def _parse(body: bytes) -> dict[str, Any]:
    """The body as one JSON object, parsed strictly: UTF-8, no key twice in an object."""
    if len(body) >= MAX_REQUEST_BYTES:
        raise EnvelopeViolation(
            f"request is {len(body)} bytes; SendGrid takes less than {MAX_REQUEST_BYTES}"
        )
    try:
        data = json.loads(body.decode("utf-8"), object_pairs_hook=_object_without_repeats)
    except UnicodeDecodeError:
        raise EnvelopeViolation("request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise EnvelopeViolation(f"request body is not one JSON value: {exc.msg}") from None
    if not isinstance(data, dict):
        raise EnvelopeViolation("request body is not a JSON object")
    return data


def _check(data: dict[str, Any], public: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The one-recipient rules; returns the recipient of each personalization, in order."""
    for key in ("cc", "bcc"):
        if key in data:
            raise EnvelopeViolation(f"request sets a top-level {key!r}")
    mail_settings = data.get("mail_settings")
    if mail_settings is not None and (
        not isinstance(mail_settings, dict) or "bcc" in mail_settings
    ):
        raise EnvelopeViolation("request sets a 'bcc' mail setting (a copy of every message)")
    _check_headers(data.get("headers"), "request")
    personalizations = data.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        raise EnvelopeViolation("request has no personalizations")
    if len(personalizations) > MAX_PERSONALIZATIONS:
        raise EnvelopeViolation(
            f"request has {len(personalizations)} personalizations, over {MAX_PERSONALIZATIONS}"
        )
    recipients: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(personalizations):
        recipients.append(_single_recipient(item, i))
        key = recipients[-1].lower()
        if key in seen:
            raise EnvelopeViolation(f"personalization {i}: an address appears twice in the request")
        seen.add(key)
    if len(recipients) > MAX_RECIPIENTS:
        raise EnvelopeViolation(f"request has {len(recipients)} recipients, over {MAX_RECIPIENTS}")
    _check_content(data, personalizations)
    _check_unsubscribe_links(personalizations)
    _check_no_foreign_addresses(data, personalizations, recipients, public)
    return tuple(recipients)


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key appears twice in it: parsers disagree about which copy
    wins, so a repeated ``personalizations`` or ``email`` could show one reader other bytes."""
    data = dict(pairs)
    if len(data) != len(pairs):
        raise EnvelopeViolation("request body repeats a key within one JSON object")
    return data


def _check_shared_part(data: dict[str, Any], expected: Mapping[str, Any], digest: str) -> None:
    """Everything but the personalizations is exactly what the approved inputs give."""
    shared = {k: v for k, v in data.items() if k != "personalizations"}
    if shared == expected:
        return
    unexpected = set(shared) - set(expected)
    differing = sorted(
        k for k in expected if k not in shared or shared[k] != expected[k]
    )  # names of fields the freeze writes: no value, no address
    raise EnvelopeViolation(
        f"request {digest[:12]}… is not what the approved spec and content give: "
        + "; ".join(
            part
            for part in (
                f"{len(unexpected)} field(s) the freeze never writes" if unexpected else "",
                f"differs in {', '.join(differing)}" if differing else "",
            )
            if part
        )
    )


def _single_recipient(item: Any, i: int) -> str:
    if not isinstance(item, dict):
        raise EnvelopeViolation(f"personalization {i} is not an object")
    extra = set(item) - _PERSONALIZATION_KEYS
    if extra & {"cc", "bcc"}:
        raise EnvelopeViolation(f"personalization {i} has {sorted(extra & {'cc', 'bcc'})}")
    if extra:
        raise EnvelopeViolation(
            f"personalization {i} has {len(extra)} field(s) the freeze never writes"
        )
    to = item.get("to")
    if not isinstance(to, list) or len(to) != 1:
        count = len(to) if isinstance(to, list) else 0
        raise EnvelopeViolation(f"personalization {i} has {count} recipients in 'to', not 1")
    entry = to[0]
    if not isinstance(entry, dict) or set(entry) != _TO_KEYS:
        raise EnvelopeViolation(f"personalization {i}: 'to' is not exactly one {{email}}")
    email = entry["email"]
    if not is_valid_single_address(email):
        raise EnvelopeViolation(f"personalization {i}: 'to' is not exactly one valid address")
    _check_headers(item.get("headers"), f"personalization {i}")
    return str(email)


def _check_headers(headers: Any, where: str) -> None:
    if headers is None:
        return
    if not isinstance(headers, dict):
        raise EnvelopeViolation(f"{where}: headers are not an object")
    for name, value in headers.items():
        if str(name).lower() in RESERVED_HEADERS:
            raise EnvelopeViolation(f"{where}: sets the reserved header {name!r}")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise EnvelopeViolation(f"{where}: header {name!r} has a line break or is not text")


def _check_content(data: dict[str, Any], personalizations: list[Any]) -> None:
    """Every tag the shared parts use is filled in every personalization; no marker is left."""
    texts = [data.get("subject")] + [
        c.get("value") for c in data.get("content") or [] if isinstance(c, dict)
    ]
    tags: set[str] = set()
    for text in texts:
        if not isinstance(text, str):
            continue
        tags.update(m.group(0) for m in TAG_PATTERN.finditer(text))
        if LEFTOVER_MARKER.search(TAG_PATTERN.sub("", text)):
            raise EnvelopeViolation("the content has a template marker left in it")
    for i, item in enumerate(personalizations):
        subs = item.get("substitutions")
        if subs is not None and not isinstance(subs, dict):
            raise EnvelopeViolation(f"personalization {i}: substitutions are not an object")
        if tags - set(subs or {}):
            raise EnvelopeViolation(
                f"personalization {i} leaves {len(tags - set(subs or {}))} substitution tag(s) "
                "of the content unfilled"
            )


def _check_unsubscribe_links(personalizations: list[Any]) -> None:
    """Each personalization carries its own unsubscribe link, consistently, and nobody else's."""
    seen: set[str] = set()
    for i, item in enumerate(personalizations):
        subs = item.get("substitutions") or {}
        headers = item.get("headers") or {}
        url = subs.get(_UNSUBSCRIBE_TAG)
        html_url = subs.get(_UNSUBSCRIBE_HTML_TAG)
        list_unsubscribe = next(
            (v for k, v in headers.items() if str(k).lower() == "list-unsubscribe"), None
        )
        if url is not None:
            if not isinstance(url, str) or not url:
                raise EnvelopeViolation(f"personalization {i}: the unsubscribe link is not text")
            if html_url is not None and html_url != html.escape(url, quote=True):
                raise EnvelopeViolation(
                    f"personalization {i}: the HTML unsubscribe link is not its own link"
                )
            if list_unsubscribe is not None and f"<{url}>" not in list_unsubscribe:
                raise EnvelopeViolation(
                    f"personalization {i}: the List-Unsubscribe header and the unsubscribe link "
                    "belong to different recipients"
                )
        for link in {url, list_unsubscribe} - {None}:
            if link in seen:
                raise EnvelopeViolation(
                    f"personalization {i} carries another personalization's unsubscribe link"
                )
            seen.add(str(link))


def _check_no_foreign_addresses(
    data: dict[str, Any], personalizations: list[Any], recipients: list[str], public: frozenset[str]
) -> None:
    """No recipient's address shows in another's personalization or in the shared parts (read
    as a person reads them: ``addresses.addresses_shown``); the campaign's public addresses are
    no one's to hide."""
    everyone = {r.lower() for r in recipients} - public
    # Field by field (no address spans two: a line break ends any), so that the fields every
    # request of a locale shares (its content) are read once, not once per request.
    for key, value in data.items():
        if key != "personalizations" and _addresses_shown(_text_of({key: value})) & everyone:
            raise EnvelopeViolation(
                "a recipient's address appears in the parts every recipient sees"
            )
    texts = [_personalization_text(item) for item in personalizations]
    # All personalizations in one pass: a line break ends any address, so joined by line
    # breaks no address spans two of them, and each "@" belongs to the one its offset is in.
    joined = "\n".join(texts).lower()
    ends = list(accumulate(len(t) + 1 for t in texts))
    for at, address in _addresses_at(joined):
        i = bisect_right(ends, at)
        if address != recipients[i].lower() and address in everyone:
            raise EnvelopeViolation(
                f"personalization {i} shows the address of another recipient of the request"
            )
    # Those holding what could be an encoded "@" are read again, decoded, one by one.
    encoded = {bisect_right(ends, found.start()) for found in _ENCODED_AT_PATTERN.finditer(joined)}
    for i in sorted(encoded):
        if shows_address(texts[i], everyone, own=recipients[i].lower()):
            raise EnvelopeViolation(
                f"personalization {i} shows the address of another recipient of the request"
            )


@lru_cache(maxsize=64)
def _addresses_shown(text: str) -> frozenset[str]:
    """``addresses_shown``, remembered: the requests of a locale share their content."""
    return addresses_shown(text)


def _personalization_text(item: dict[str, Any]) -> str:
    """``_text_of`` the personalization but its ``to``, the lines in another order (which no
    check depends on): an object of strings, as substitutions and headers are, at C speed."""
    parts: list[str] = []
    for key, value in item.items():
        if key == "to":
            continue
        parts.append(key)
        if type(value) is dict:
            try:
                parts.append("\n".join(chain(value, value.values())))
                continue
            except TypeError:  # not all strings
                pass
        parts.append(_text_of(value))
    return "\n".join(parts)


def _text_of(value: Any) -> str:
    """Every key and string in ``value``, one per line (a line break ends any address)."""
    parts: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, dict):
            parts.extend(str(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return "\n".join(parts)


def shows_address(text: str, candidates: Collection[str], own: str | None = None) -> bool:
    """Whether a candidate address other than ``own`` occurs in ``text``, also HTML-escaped or
    %-encoded."""
    low = text.lower()
    variants = [low]
    if any(code in low for code in _ENCODED_AT):
        variants.append(unquote(html.unescape(low)).lower())
    return any(
        address != own and address in candidates
        for variant in variants
        for _, address in _addresses_at(variant)
    )


_ENCODED_AT = ("%40", "&#", "&commat")
_ENCODED_AT_PATTERN = re.compile("|".join(re.escape(code) for code in _ENCODED_AT))


def _addresses_at(text: str) -> Iterator[tuple[int, str]]:
    """Each "@" of lower-cased ``text`` with the addresses it can be read as: the run of
    local-part characters before it ("email=a@x" and "mailto:a@x" hold "a@x"), also without a
    leading quote ("'a@x'"), and the domain after it."""
    at = text.find("@")
    while at != -1:
        domain = _DOMAIN_HEAD.match(text, at + 1)
        # The run read backwards from the "@" (searching forwards for a run that ends at the
        # "@" would try every start in the window).
        tail = _LOCAL_TAIL_REVERSED.match(text[max(0, at - 64) : at][::-1])
        if domain and tail:
            local = tail.group(0)[::-1]
            for candidate in {local, local.lstrip("'.")}:
                yield at, f"{candidate}@{domain.group(0)}"
        at = text.find("@", at + 1)
