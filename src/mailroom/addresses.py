"""Email addresses: normalisation, the one comparison key, the addresses a text shows, the
single-address rule, and masking for logs."""

from __future__ import annotations

import html
import math
import re
import unicodedata
from functools import lru_cache
from urllib.parse import unquote

import idna
from email_validator import EmailNotValidError, validate_email

# The library is the definition of a valid address (``library_ascii_address``); these patterns
# are its column-wise fast path for ASCII text (GX runs them over a whole column; the guard and
# the transports call ``is_valid_single_address`` once per envelope, where the library costs
# ~55 µs an address against ~1 µs for the pattern: a minute per million recipients). They
# accept what the library accepts with this module's options, and no more, except an "xn--"
# label that is not valid Punycode, which only the library can tell (``is_valid_single_address``
# asks it for those domains). tests/unit/test_addresses.py checks the two agree.
#
# RFC 5322 dot-atom local part of 1 to 64 characters. Quoted local parts are refused on purpose:
# they are where separators hide.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL = rf"(?=[^@]{{1,64}}@){_ATEXT}+(?:\.{_ATEXT}+)*"
# A hostname label of 1 to 63 characters without "ab--" at its start (RFC 5891's reserved
# R-LDH labels) unless it is Punycode's "xn--"; the last label ends with a letter (every TLD
# does); at least one dot; no special-use name the library refuses ("test" it allows: it is
# what demos and tests send to, and no provider delivers it).
_NOT_R_LDH = r"(?!(?![Xx][Nn])[A-Za-z0-9]{2}--)"
_LABEL = rf"{_NOT_R_LDH}[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?"
_TLD = rf"{_NOT_R_LDH}(?:[A-Za-z0-9][A-Za-z0-9-]{{0,61}})?[A-Za-z]"
_NOT_SPECIAL_USE = r"(?!(?:[A-Za-z0-9-]+\.)*(?i:arpa|invalid|local|localhost|onion)\Z)"
_DOMAIN = rf"{_NOT_SPECIAL_USE}(?:{_LABEL}\.)+{_TLD}"
MAX_ADDRESS_LENGTH = 254
MAX_LOCAL_PART_LENGTH = 64
_ADDRESS = rf"(?=.{{1,{MAX_ADDRESS_LENGTH}}}\Z){_LOCAL}@{_DOMAIN}"
SINGLE_ADDRESS = re.compile(rf"{_ADDRESS}\Z")
# For GX (``re.search`` over a column): anchored at both ends, ``\Z`` rather than ``$``, which
# would let a trailing newline through.
SINGLE_ADDRESS_PATTERN = rf"^{_ADDRESS}\Z"


def library_ascii_address(value: str) -> str | None:
    """The ASCII address ``email-validator`` reads ``value`` as, ``None`` when it refuses it:
    the reference every fast path here is tested against.

    Options: no DNS lookup (extract must not depend on the network), no quoted local part, no
    display name, no domain literal, no SMTPUTF8 (a non-ASCII local part cannot be sent through
    every provider), lengths 254 and 64 (``strict``), ``.test`` allowed, and at least one dot in
    the domain (the library allows a bare ``test`` in a test environment).
    """
    try:
        checked = validate_email(
            value,
            check_deliverability=False,
            allow_smtputf8=False,
            allow_quoted_local=False,
            allow_display_name=False,
            allow_domain_literal=False,
            strict=True,
            test_environment=True,
        )
    except EmailNotValidError:
        return None
    if checked.ascii_email is None or "." not in checked.ascii_domain:
        return None
    return checked.ascii_email


def normalise(raw: object) -> str | None:
    """Trim, lower-case and IDNA-encode the domain; ``None`` when it cannot be an address.

    The local part keeps its case (it is the mailbox owner's), the domain does not. Anything
    else is kept as given, valid or not: validation quarantines it with a reason, where a
    silent repair here would send to an address nobody wrote. For an address the library
    accepts, the domain is the library's ``ascii_domain`` (IDNA 2008, UTS-46), computed here
    once per domain without the library's per-address cost (tests check they agree).
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
    """The domain in IDNA 2008 / UTS-46 ASCII form (lower-cased, Unicode labels in Punycode,
    fullwidth and ideographic dots read as dots), or lower-cased as given when IDNA refuses it
    (the address is then invalid and quarantined, but still has one key). Not Python's "idna"
    codec: IDNA 2003 maps "faß.de" to "fass.de", another domain, and accepts labels IDNA 2008
    forbids. An audience has few distinct domains, and this is the dearest step: once each."""
    domain = domain.rstrip(".").strip()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain.lower()


def ascii_domain(domain: str) -> str:
    """What ``normalise`` writes after the "@" for ``domain`` (the text after the last "@",
    trimmed, as a person reads it): for callers that split addresses column-wise."""
    return _ascii_domain(domain)


@lru_cache(maxsize=4096)
def _library_accepts_domain(domain: str) -> bool:
    """Whether the library accepts an address at ``domain`` (asked with a one-letter local
    part): what the pattern cannot check, Punycode labels that do not decode."""
    return library_ascii_address(f"a@{domain}") is not None


def is_valid_single_address(value: object) -> bool:
    """True for exactly one address and nothing around it, as the library reads it (ASCII, at
    most 254 characters, a local part of at most 64, no quoting, no display name).

    The pattern decides, and the library is asked about domains with a Punycode label (cached
    per domain): the same answer as ``library_ascii_address(value) is not None`` at the
    pattern's speed.
    """
    if not isinstance(value, str) or not value.isascii() or SINGLE_ADDRESS.match(value) is None:
        return False
    domain = value.rpartition("@")[2]
    return "xn--" not in domain.lower() or _library_accepts_domain(domain)


class UnreadableAddress(ValueError):
    """A value that cannot be read as exactly one address. The message is the reason only,
    never the value: it may be someone's address and ends up in logs and run files."""


_WRAPPING_QUOTES = ('"', "'", "`")
_TRAILING_SEPARATORS = ";,"
_AROUND_ONE_ADDRESS = re.compile(r"[\s,;<>()\[\]\"]")


def single_address(raw: object) -> str:
    """The one address a hand-kept list entry spells, unwrapped: ``Name <a@x>``, ``<a@x>``,
    ``mailto:a@x`` (its ``?query`` dropped and %-encoding read), ``a@x;``, quotes and
    whitespace around it, invisible characters and fullwidth forms (as ``readable``). Raises
    ``UnreadableAddress`` with the reason when there is no address, more than one, or text
    around it.

    Suppression lists are kept by people and exported from other tools, so they are written in
    all these ways, and a spelling that is not read is a person mailed after opting out. Only
    wrappers that cannot change whose address it is are taken off; anything that may hide a
    second address (a list, an "@" in a display name, a quoted local part) is refused, so the
    row is listed for an operator rather than guessed.
    """
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        raise UnreadableAddress("empty")
    if not isinstance(raw, str):
        raise UnreadableAddress(f"not text ({type(raw).__name__})")
    text = _clean(raw).strip()
    previous = None
    while text != previous:
        previous = text
        text = text.strip().rstrip(_TRAILING_SEPARATORS).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in _WRAPPING_QUOTES:
            text = text[1:-1]
        if text.endswith(">") and "<" in text:
            name, _, inner = text[:-1].rpartition("<")
            if "@" in name or "<" in name:
                raise UnreadableAddress("more than one address")
            text = inner
        if text[:7].lower() == "mailto:":
            text = _clean(unquote(text[7:].partition("?")[0]))
    if not text:
        raise UnreadableAddress("empty")
    ats = text.count("@")
    if ats == 0:
        raise UnreadableAddress("no address (no @)")
    if ats > 1:
        raise UnreadableAddress("more than one address")
    if _AROUND_ONE_ADDRESS.search(text):
        raise UnreadableAddress("text, a list or quoting around the address")
    if address_key(text) is None:
        raise UnreadableAddress("no address (nothing before or after the @)")
    return text


def suppression_address(raw: object) -> tuple[str, str]:
    """The address a suppression entry spells (``single_address``) and its ``address_key``:
    what a suppression is matched by, wherever it is kept (a campaign's suppression source, the
    outbox's suppression list), so that both read an entry alike. Raises ``UnreadableAddress``."""
    address = single_address(raw)
    key = address_key(address)
    if key is None:  # pragma: no cover - single_address has checked it has a key
        raise UnreadableAddress("no address (nothing before or after the @)")
    return address, key


def mask(address: str) -> str:
    """``j***@example.com``: enough for an operator to tell cases apart, not to harvest."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return "***"
    return f"{local[:1]}***@{domain}"


def mask_value(value: object) -> str:
    """What an operator is shown of a value that should have been an address and may not be
    one (an unreadable suppression entry): ``mask`` of its text, whitespace collapsed; ``***``
    for anything else that is not empty."""
    if isinstance(value, str):
        return mask(" ".join(value.split())) if value.strip() else ""
    return "" if value is None or (isinstance(value, float) and value != value) else "***"


_ANY_ADDRESS = re.compile(r"[^\s<>\"',;:()\[\]]+@[^\s<>\"',;:()\[\]]+")


def mask_addresses(text: str) -> str:
    """Mask every address-looking token in free text (provider errors, exceptions) for logs."""
    return _ANY_ADDRESS.sub(lambda m: mask(m.group(0)), text)


# -- one comparison key, and the addresses a text shows ------------------------------------------

# Characters a reader does not see: soft hyphen, zero-width space/joiners, word joiner and the
# invisible operators, BOM, bidi controls, variation selectors, Hangul fillers, tag characters.
# Written between the letters of an address they hide it from a substring search and not from
# the eye, so no comparison may see them.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb"
    "\U000e0000-\U000e0fff]"
)
# Label separators IDNA accepts that NFKC leaves alone (ideographic and halfwidth full stops).
_IDEOGRAPHIC_STOPS = str.maketrans({"\u3002": ".", "\uff61": "."})


def _clean(text: str) -> str:
    """``text`` without invisible characters, in NFKC (fullwidth ``＠`` is ``@``). ASCII text is
    returned as is: it holds neither, and most of an audience is ASCII."""
    if text.isascii():
        return text
    text = _INVISIBLE.sub("", text)
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_IDEOGRAPHIC_STOPS)


def readable(text: str) -> str:
    """``text`` as a person reads it, character by character: invisible characters (soft
    hyphen, zero-width, BOM, word joiner…) removed and NFKC applied (``ｕｓｅｒ＠`` is
    ``user@``). ASCII text is returned as is."""
    return _clean(text)


def address_key(raw: object) -> str | None:
    """The one comparison key of a mailbox: what dedupe, suppression and every "shows an
    address" check compare, so that two spellings of one mailbox are one key and two mailboxes
    never are.

    NFKC, invisible characters removed, trimmed, the whole address lower-cased and the domain
    IDNA-encoded: ``User@Bücher.example``, ``user@xn--bcher-kva.example`` and ``ｕｓｅｒ@…`` are
    one key. Nothing else is folded (no dots or ``+tags`` dropped): ``ann@``, ``a.nn@`` and
    ``ann+x@`` are different people. ``None`` when it has no local part and domain around an
    ``@``. What is *sent* stays ``normalise`` (the local part's case is its owner's).
    """
    if not isinstance(raw, str):
        return None
    local, sep, domain = _clean(raw).strip().rpartition("@")
    if not sep or not local or not domain:
        return None
    ascii_domain = _ascii_domain(domain)
    if not ascii_domain:
        return None
    return f"{local.lower()}@{ascii_domain}"


# How a reader may be shown an "@" without one in the text: encoded (HTML, %-encoding), in a
# compatibility form NFKC folds, or spelt out. Text with none of these shows no address.
_AT_WORD = re.compile(r"(?<![a-z0-9])at(?![a-z0-9])")
_TAG = re.compile(r"<[^<>]*>")
# Tags a browser renders as a break between the texts around them; the others (span, b, a…)
# join them: "ann<b></b>@x.com" reads "ann@x.com", "<p>bob</p>ann@x.com" reads "ann@x.com".
_BLOCK_TAG = re.compile(
    r"</?(?:address|article|aside|blockquote|body|br|dd|div|dl|dt|footer|h[1-6]|head|header"
    r"|hr|html|li|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|title|tr|ul)\b[^<>]*>"
)
# "(at)", "[ dot ]", "{.}": found by a pattern that starts with a character class (searched at
# C speed), marked, then the spaces around the marks dropped with plain replacements.
_BRACKETED = re.compile(r"[(\[{<] ?(at|dot|\.) ?[)\]}>]")
_AT_MARK, _DOT_MARK = "\x01", "\x02"
_SPELLINGS = (
    (" at ", "@"),
    (" dot ", "."),
    (f" {_AT_MARK}", _AT_MARK),
    (f"{_AT_MARK} ", _AT_MARK),
    (f" {_DOT_MARK}", _DOT_MARK),
    (f"{_DOT_MARK} ", _DOT_MARK),
    (" @", "@"),
    ("@ ", "@"),
    (_AT_MARK, "@"),
    (_DOT_MARK, "."),
)
_SPELLING_HINTS = ("at", "dot", "(.", "[.", "{.", "<.", " @", "@ ")
# Around an "@" (in lower-cased, cleaned text): the local part's tail, read backwards from the
# "@" (bounded: a local part has at most 64 characters) and the domain's head. Non-ASCII word
# characters belong to both, so "éann@x.com" is not read as "ann@x.com" only.
_LOCAL_TAIL_REVERSED = re.compile(r"(?:[a-z0-9!#$%&'*+/=?^_`{|}~.-]|[^\x00-\x7f\W]){1,64}")
_DOMAIN_HEAD = re.compile(r"(?:[a-z0-9-]|[^\x00-\x7f\W])+(?:\.(?:[a-z0-9-]|[^\x00-\x7f\W])+)*")
# Characters that may begin an address inside a longer run ("?to=ann@x.com", "/u/ann@x.com",
# "{{ann@x.com}}"). Not "&", "+", "'", ".", "-" or "_": "tom&jerry@", "x+ann@", "o'ann@" are
# mailboxes of their own, and reading "jerry@" in them would quarantine their owner for showing
# their own address.
_RUN_BREAKS = re.compile(r"[=?/#{}|`^!$*~%]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_MAX_DECODE_ROUNDS = 4


def addresses_shown(text: str) -> frozenset[str]:
    """The ``address_key`` of every address ``text`` shows to a person reading it.

    Read as a person would: HTML entities decoded (again, up to a bound, for double escaping),
    %-encoding decoded, markup tags taken out (joining or breaking the texts around them, both
    readings), invisible characters dropped, NFKC (``＠`` is ``@``), and "(at)", "[at]", " at ",
    "(dot)", " dot " spellings read as "@" and ".". Each reading is scanned for "@" and what
    surrounds it; Unicode domains are IDNA-encoded.

    These are candidates: callers intersect them with a set of keys they care about (the
    audience), so a string that is no one's address is harmless, and a missing one is a leak.
    Reading more than one way (tags kept, joined and broken; spellings rewritten or not) only
    ever adds candidates. Linear in the text: every pattern is bounded or unambiguous, and text
    that could not hold an "@" in any of these forms returns at once.
    """
    if not text:
        return frozenset()
    base = _clean(text).lower()
    if not _may_show_an_address(base):
        return frozenset()
    found: set[str] = set()
    for reading in _readings(base):
        found.update(_addresses_in(reading))
    return frozenset(found)


def _may_show_an_address(low: str) -> bool:
    if "@" in low or "&" in low or "%" in low:
        return True
    if _AT_WORD.search(low):
        return True
    # "(a<i></i>t)": a spelling only a reader of the rendered text sees.
    return "<" in low and _AT_WORD.search(_TAG.sub("", low)) is not None


def _readings(base: str) -> list[str]:
    """Every reading of ``base`` (cleaned, lower-cased) worth scanning, without repeats."""
    stages = [base]
    current = base
    for _ in range(_MAX_DECODE_ROUNDS):
        if "&" not in current and "%" not in current:
            break
        decoded = _clean(unquote(html.unescape(current), errors="replace")).lower()
        if decoded == current:
            break
        stages.append(decoded)
        current = decoded
    readings: dict[str, None] = {}
    for stage in stages:
        untagged = [stage]
        if "<" in stage:
            untagged += [
                _TAG.sub("", stage),
                _TAG.sub("\n", stage),
                _TAG.sub("", _BLOCK_TAG.sub("\n", stage)),
            ]
        for reading in untagged:
            readings[reading] = None
            if any(hint in reading for hint in _SPELLING_HINTS):
                readings[_spelt_out(reading)] = None
    return list(readings)


def _spelt_out(text: str) -> str:
    """``text`` with "@" and "." spelt out or spaced out read back as the characters."""
    text = " ".join(text.split())
    if "(" in text or "[" in text or "{" in text or "<" in text:
        text = _BRACKETED.sub(lambda m: _AT_MARK if m.group(1) == "at" else _DOT_MARK, text)
    for spelling, char in _SPELLINGS:
        if spelling in text:
            text = text.replace(spelling, char)
    return text


def _addresses_in(text: str) -> set[str]:
    """The keys of what each "@" of ``text`` can be read as: the whole run of local-part
    characters before it, that run after a character that may begin an address, without a
    leading quote or dot, or after its last non-ASCII character; and the domain after it."""
    found: set[str] = set()
    at = text.find("@")
    while at != -1:
        domain = _DOMAIN_HEAD.match(text, at + 1)
        tail = _LOCAL_TAIL_REVERSED.match(text[max(0, at - 64) : at][::-1])
        if domain and tail:
            run = tail.group(0)[::-1]
            locals_ = {run, run.lstrip("'.")}
            for brk in _RUN_BREAKS.finditer(run):
                locals_.add(run[brk.end() :])
            last_non_ascii = None
            for last_non_ascii in _NON_ASCII.finditer(run):  # noqa: B007 - the last one
                pass
            if last_non_ascii is not None:
                locals_.add(run[last_non_ascii.end() :])
            for local in locals_:
                key = address_key(f"{local.lstrip('.')}@{domain.group(0)}")
                if key is not None:
                    found.add(key)
        at = text.find("@", at + 1)
    return found
