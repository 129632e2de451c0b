"""Email addresses: normalisation, the single-address rule, and masking for logs."""

from __future__ import annotations

import re
from functools import lru_cache

# RFC 5322 dot-atom local part (ASCII) and an ASCII (IDNA-encoded) domain with a dot. Quoted local
# parts are refused on purpose: they are where separators hide.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.(?:[A-Za-z]{{2,63}}|xn--[A-Za-z0-9-]{{1,59}})"
SINGLE_ADDRESS = re.compile(rf"{_LOCAL}@{_DOMAIN}")
SINGLE_ADDRESS_PATTERN = rf"^{_LOCAL}@{_DOMAIN}$"
MAX_ADDRESS_LENGTH = 254


def normalise(raw: object) -> str | None:
    """Trim, lower-case and IDNA-encode the domain; ``None`` when it cannot be an address.

    The local part keeps its case (it is the mailbox owner's), the domain does not.
    """
    if not isinstance(raw, str):
        return None
    value = raw.strip()
    local, sep, domain = value.rpartition("@")
    if not sep or not local or not domain:
        return value or None
    return f"{local}@{_ascii_domain(domain)}"


@lru_cache(maxsize=65_536)
def _ascii_domain(domain: str) -> str:
    """The lower-cased, IDNA-encoded domain (as given when it cannot be encoded). An audience
    has few distinct domains, and IDNA encoding is the dearest step of normalising: once each."""
    domain = domain.rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def is_valid_single_address(value: object) -> bool:
    """True for exactly one syntactically valid address and nothing else around it."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_ADDRESS_LENGTH
        and SINGLE_ADDRESS.fullmatch(value) is not None
    )


def mask(address: str) -> str:
    """``j***@example.com``: enough for an operator to tell cases apart, not to harvest."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return "***"
    return f"{local[:1]}***@{domain}"


_ANY_ADDRESS = re.compile(r"[^\s<>\"',;:()\[\]]+@[^\s<>\"',;:()\[\]]+")


def mask_addresses(text: str) -> str:
    """Mask every address-looking token in free text (provider errors, exceptions) for logs."""
    return _ANY_ADDRESS.sub(lambda m: mask(m.group(0)), text)
