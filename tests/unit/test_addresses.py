from __future__ import annotations

import pytest
from hypothesis import given, settings
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
