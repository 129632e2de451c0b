from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailroom.addresses import (
    address_key,
    addresses_shown,
    is_valid_single_address,
    mask,
    mask_addresses,
    normalise,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Anna@Example.COM ", "Anna@example.com"),
        ("user@bücher.example", "user@xn--bcher-kva.example"),
        ("user@例え.jp", "user@xn--r8jz45g.jp"),
        ("x@example.com.", "x@example.com"),
        (None, None),
        ("   ", None),
    ],
)
def test_normalise_trims_lowercases_domain_and_encodes_idna(
    raw: object, expected: str | None
) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    "value",
    [
        "a@example.com",
        "first.last+tag@sub.example.org",
        "o'brien@example.ie",
        "u@xn--bcher-kva.example",
    ],
)
def test_single_addresses_are_valid(value: str) -> None:
    assert is_valid_single_address(value)


@pytest.mark.parametrize(
    "value",
    [
        "a@x.com, b@y.com",
        "a@x.com;b@y.com",
        "a@x.com b@y.com",
        "Anna <a@x.com>",
        '"a,b"@x.com',
        "a@x.com\r\nBcc: b@y.com",
        "no-at.example.com",
        "a@@x.com",
        "a@x",
        "",
        None,
        42,
        "a" * 250 + "@x.com",
    ],
)
def test_anything_that_could_hold_two_addresses_is_invalid(value: object) -> None:
    assert not is_valid_single_address(value)


def test_masking_keeps_domain_and_first_letter_only() -> None:
    assert mask("anna.smith@example.com") == "a***@example.com"
    text = "rejected: anna@example.com and bob@example.org"
    assert mask_addresses(text) == "rejected: a***@example.com and b***@example.org"


# -- address_key: one key per mailbox ----------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "user@xn--bcher-kva.example",
        "user@bücher.example",
        "USER@BÜCHER.EXAMPLE",
        "  User@Bücher.Example. ",
        "us\u00ader@bücher.example",
        "u\u200bser@bu\u0308cher.example",
        "\ufeffuser@bücher.example\u2060",
        "ｕｓｅｒ＠bücher.example",
        "USER@XN--BCHER-KVA.EXAMPLE",
    ],
)
def test_every_spelling_of_one_mailbox_has_one_key(spelling: str) -> None:
    assert address_key(spelling) == "user@xn--bcher-kva.example"


def test_distinct_mailboxes_keep_distinct_keys() -> None:
    mailboxes = [
        "ann@example.com",
        "anne@example.com",
        "a.nn@example.com",
        "ann+x@example.com",
        "ann@exаmple.com",  # a Cyrillic "а": another domain
        "ann@example.co",
        "ann@sub.example.com",
    ]
    keys = [address_key(m) for m in mailboxes]
    assert None not in keys
    assert len(set(keys)) == len(mailboxes)
    assert address_key("ann@exаmple.com") == "ann@xn--exmple-4nf.com"


@pytest.mark.parametrize(
    "raw", [None, 42, "", "   ", "no-at.example.com", "@example.com", "a@", "a@."]
)
def test_what_is_no_address_has_no_key(raw: object) -> None:
    assert address_key(raw) is None


def test_normalise_still_keeps_the_local_parts_case() -> None:
    assert normalise("Ann@Bücher.example") == "Ann@xn--bcher-kva.example"
    assert address_key("Ann@Bücher.example") == "ann@xn--bcher-kva.example"


# -- addresses_shown: what a person reading the text sees --------------------------------------

ANN = "ann@example.com"


@pytest.mark.parametrize(
    "text",
    [
        "ann@example.com",
        "Write to ANN@Example.COM today",
        "ann@<span></span>example.com",
        "an<b>n</b>@exa<i>mple</i>.com",
        "<p>Bob</p>ann@<span></span>example.com",
        "<td>bob</td><td>ann@example.com</td>",
        '<a href="mailto:ann@example.com">write</a>',
        "an\u00adn@example.com",
        "ann\u200b@example.com",
        "ann@exam\u200cple\u200d.com",
        "a\u2060nn@example\ufeff.com",
        "ann&#64;example.com",
        "ann&#x40;example.com",
        "ann&commat;example.com",
        "ann&amp;#64;example.com",
        "ann&#64;example&period;com",
        "ann＠example.com",
        "ann﹫example．com",
        "ａｎｎ＠ｅｘａｍｐｌｅ．ｃｏｍ",
        "ann (at) example (dot) com",
        "ann [at] example [dot] com",
        "ann {at} example {dot} com",
        "ann[ AT ]example[ DOT ]com",
        "ann at example dot com",
        "ann AT example DOT com",
        "ann (at) example.com, see you",
        "ann @ example.com",
        "mailto:ann%40example.com",
        "ann%2540example.com",
        "?email=ann@example.com&x=1",
        "https://example.org/u/ann@example.com",
        "{{ann@example.com}}",
        "'ann@example.com'",
        "(ann@example.com)",
        "ann@example.com.",
        "Mail ann@example.com. Next sentence",
        "ann (at) example (dot) com. Next sentence",
    ],
)
def test_every_obfuscation_of_an_address_is_read(text: str) -> None:
    assert ANN in addresses_shown(text)


def test_an_ampersand_in_the_local_part_is_read_escaped_or_not() -> None:
    assert "tom&jerry@example.com" in addresses_shown("tom&amp;jerry@example.com")
    assert "tom&jerry@example.com" in addresses_shown("tom&jerry@example.com")
    assert "tom&jerry@example.com" in addresses_shown("tom%26jerry%40example.com")


@pytest.mark.parametrize(
    "text",
    [
        "user@bücher.example",
        "user@xn--bcher-kva.example",
        "USER@BÜCHER.EXAMPLE",
        "user&#64;b&uuml;cher.example",
        "user＠bücher。example",
        "user at bücher dot example",
    ],
)
def test_an_idn_domain_is_read_in_either_form(text: str) -> None:
    assert "user@xn--bcher-kva.example" in addresses_shown(text)


@pytest.mark.parametrize(
    ("text", "not_shown"),
    [
        ("anne@example.com", "ann@example.com"),
        ("a.nn@example.com", "nn@example.com"),
        ("a.nn@example.com", "ann@example.com"),
        ("ann+x@example.com", "ann@example.com"),
        ("ann+x@example.com", "x@example.com"),
        ("joann@example.com", "ann@example.com"),
        ("o'brien@example.com", "brien@example.com"),
        ("ann@exаmple.com", "ann@example.com"),
        ("ann@example.com.au", "ann@example.com"),
        ("ann@example.community", "ann@example.com"),
        ("ann@sub.example.com", "ann@example.com"),
    ],
)
def test_a_look_alike_is_not_read_as_another_mailbox(text: str, not_shown: str) -> None:
    shown = addresses_shown(text)
    assert address_key(text) in shown
    assert not_shown not in shown


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello Ann, your order shipped.",
        "<p style='width:100%'>Spring sale &amp; more</p>",
        "Meet us at the shop at noon",
        "ann dot smith",
    ],
)
def test_text_without_an_address_shows_none_of_the_audience(text: str) -> None:
    assert not addresses_shown(text) & {ANN, "ann.smith@example.com"}


def test_long_markup_without_an_at_returns_quickly() -> None:
    """Long HTML (a newsletter) without anything that reads as "@": early and linear."""
    import time

    page = "<p style='color:red'>Spring sale, see the shop soon. <b>Now</b></p>\n" * 20_000
    started = time.perf_counter()
    assert addresses_shown(page) == frozenset()
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "text",
    [
        "@" * 100_000,
        " " * 100_000 + "at",
        "<" * 100_000,
        "a" * 100_000 + "@" + "b" * 100_000,
        "(at " * 30_000,
        "a." * 100_000 + "@",
        "&#" * 50_000,
        "%4" * 50_000,
        ".@" * 50_000,
        " @ " * 50_000,
        "\u200b" * 100_000 + "@",
    ],
)
def test_pathological_text_is_read_in_linear_time(text: str) -> None:
    import time

    started = time.perf_counter()
    addresses_shown(text)
    assert time.perf_counter() - started < 2.0


# -- a property: plain text shows exactly the addresses written in it --------------------------

_ATOM = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-+", min_size=1, max_size=8)
_LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
_ADDRESS = st.builds(
    lambda locals_, labels, tld: ".".join(locals_) + "@" + ".".join([*labels, tld]),
    st.lists(_ATOM, min_size=1, max_size=3),
    st.lists(_LABEL, min_size=1, max_size=3),
    st.from_regex(r"[a-zA-Z]{2,6}", fullmatch=True),
)
# Prose words: never "at" or "dot", which are spellings of "@" and ".".
_WORD = st.from_regex(r"[A-Za-z]{1,10}", fullmatch=True).filter(
    lambda w: w.lower() not in {"at", "dot"}
)
_SEPARATOR = st.sampled_from([" ", "  ", "\n", ", ", "; ", " (", ") ", ": ", " <", "> "])


@settings(database=None, max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(_WORD, _ADDRESS.map(lambda a: ("address", a))), max_size=12),
    st.data(),
)
def test_plain_text_shows_exactly_the_addresses_in_it(
    items: list[str | tuple[str, str]], data: st.DataObject
) -> None:
    """The reference reading of plain text (words and addresses between separators) is the set
    of the addresses written in it; ``addresses_shown`` must find each of them, and nothing
    that is not one of them."""
    parts: list[str] = []
    expected: set[str] = set()
    for item in items:
        if isinstance(item, tuple):
            parts.append(item[1])
            expected.add(str(address_key(item[1])))
        else:
            parts.append(item)
        parts.append(data.draw(_SEPARATOR))
    text = "".join(parts)
    assert addresses_shown(text) == expected


# -- the fast paths agree with the library (email-validator, idna) ------------------------------

_ASCII_LOCAL = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\"-]{1,70}", fullmatch=True)
_ASCII_LABEL = st.one_of(
    st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True),
    st.sampled_from(["xn--bcher-kva", "XN--zz", "ab--c", "xn--", "test", "local", "onion", "c0m"]),
    st.from_regex(r"[a-z]{60,66}", fullmatch=True),
)
_ASCII_DOMAIN = st.lists(_ASCII_LABEL, min_size=1, max_size=4).map(".".join)
_ASCII_CANDIDATE = st.one_of(
    st.builds(lambda a, b: f"{a}@{b}", _ASCII_LOCAL, _ASCII_DOMAIN),
    st.builds(
        lambda a, b: f"{a}@{b}", st.from_regex(r"[a-z]{1,200}", fullmatch=True), _ASCII_DOMAIN
    ),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=40),
)


@settings(database=None, max_examples=1500, deadline=None)
@given(_ASCII_CANDIDATE)
def test_the_single_address_fast_path_is_the_library(value: str) -> None:
    """``is_valid_single_address`` (the pattern, and the library for Punycode domains only)
    and the GX pattern answer what ``email-validator`` answers."""
    import re

    from mailroom.addresses import SINGLE_ADDRESS_PATTERN, library_ascii_address

    expected = library_ascii_address(value) is not None
    assert is_valid_single_address(value) == expected
    if "xn--" not in value.lower():
        assert (re.search(SINGLE_ADDRESS_PATTERN, value) is not None) == expected


_UNICODE_LABEL = st.one_of(
    st.sampled_from(["bücher", "BÜCHER", "bu\u0308cher", "例え", "faß", "exаmple", "ΑΒΓ", "ǅ"]),
    st.text(
        alphabet=st.characters(codec="utf-8", categories=["Ll", "Lu", "Lo", "Nd"]),
        min_size=1,
        max_size=6,
    ),
    _ASCII_LABEL,
)
_ANY_DOMAIN = st.lists(_UNICODE_LABEL, min_size=2, max_size=3).map(".".join)


@settings(database=None, max_examples=1000, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9._+-]{1,20}", fullmatch=True), _ANY_DOMAIN)
def test_normalise_sends_the_librarys_ascii_domain(local: str, domain: str) -> None:
    """For every address the library accepts, ``normalise`` (IDNA once per domain) gives the
    library's ASCII domain, and keeps the local part as written."""
    from mailroom.addresses import library_ascii_address

    checked = library_ascii_address(f"{local}@{domain}")
    if checked is not None:
        got = normalise(f"{local}@{domain}")
        assert got is not None
        assert got.rpartition("@")[2] == checked.rpartition("@")[2]
        assert got.rpartition("@")[0] == local
        assert address_key(got) == address_key(f"{local}@{domain}")


@example(raw="0@ .")
@example(raw="0@\r.")
@settings(database=None, max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.builds(lambda a, b: f"{a}@{b}", _ASCII_LOCAL, _ANY_DOMAIN),
        st.text(max_size=30),
        st.builds(lambda a, b: f" {a}@{b}. ", st.text(max_size=8), st.text(max_size=8)),
    )
)
def test_the_column_wise_keys_are_address_key(raw: str) -> None:
    """``address_keys`` (Arrow, lower-casing ASCII) gives ``address_key`` of what extract
    writes (``normalise``), which suppressions and the gate compare with."""
    import pandas as pd

    from mailroom.audience.extract import address_keys

    sent = normalise(raw)
    (got,) = address_keys(pd.Series([sent], dtype=object)).tolist()
    assert got == address_key(sent)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("faß@faß.de", "faß@xn--fa-hia.de"),  # IDNA 2008: not "fass.de", another domain
        ("a@☃.net", "a@☃.net"),  # IDNA 2008 refuses it: kept, then quarantined as invalid
        ("a@Ｂücher。example", "a@xn--bcher-kva.example"),
    ],
)
def test_domains_are_encoded_by_idna_2008(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    "value",
    [
        "a" * 65 + "@example.com",  # local part over 64
        "a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 60 + ".com",
        "a@x.local",
        "a@x.onion",
        "a@ab--cd.com",
        "a@xn--zz.com",
        "a@example.com\n",
        "a@bücher.example",
    ],
)
def test_the_library_limits_are_refused(value: str) -> None:
    assert not is_valid_single_address(value)


@pytest.mark.parametrize("value", ["a" * 64 + "@example.com", "a@x.test", "a@x.c0m"])
def test_what_the_library_accepts_is_valid(value: str) -> None:
    assert is_valid_single_address(value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ann <Ann@Example.com>", "Ann@Example.com"),
        ("mailto:a%40b.example?subject=x", "a@b.example"),
        (" 'a@b.example'; ", "a@b.example"),
    ],
)
def test_single_address_unwraps_what_people_write(raw: str, expected: str) -> None:
    from mailroom.addresses import single_address

    assert single_address(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty"),
        (float("nan"), "empty"),
        ("  ", "empty"),
        ("hello", "no address (no @)"),
        ("a@x.com b@y.com", "more than one address"),
        ("a@x.com b", "text, a list or quoting around the address"),
        ("a@", "no address (nothing before or after the @)"),
        (3, "not text (int)"),
    ],
)
def test_single_address_names_why_it_cannot_read_a_value(raw: object, reason: str) -> None:
    from mailroom.addresses import UnreadableAddress, single_address

    with pytest.raises(UnreadableAddress) as caught:
        single_address(raw)
    assert str(caught.value) == reason
