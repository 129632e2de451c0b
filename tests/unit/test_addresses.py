from __future__ import annotations

import pytest

from mailroom.addresses import is_valid_single_address, mask, mask_addresses, normalise

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
