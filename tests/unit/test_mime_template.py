"""The spliced messages against the reference builder, and the quick MIME guard against the full
one.

``MessageTemplate`` must make, for any body the envelope guard lets through, the exact bytes
``build_mime_message`` makes (the oracle) with the same date and boundary, and refuse with the
same words what it refuses. ``MimeGuard`` must refuse every message the full guard
(``check_mime_message``) refuses, with the same words, and pass the messages the builders make.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom.delivery.transports.mime import (
    MESSAGE_POLICY,
    MessageTemplate,
    MimeGuard,
    TemplateSeed,
    build_mime_message,
    check_mime_message,
)
from mailroom.errors import EnvelopeViolation

pytestmark = pytest.mark.unit

DATE = "Sun, 06 Dec 2026 10:00:00 GMT"
BOUNDARY = "===============0123456789012345678=="
MESSAGE_ID = "<179655301340.6738.10208706957789524219@mailroom.test>"
SEED = TemplateSeed(DATE, BOUNDARY, 0, 0)

# Text as campaigns and recipients write it: any Unicode, with line breaks, long lines, tags.
_TEXT = st.text(max_size=300) | st.sampled_from(
    [
        "",
        "\n",
        "plain ascii line\n",
        "x" * 200,
        "trailing space \n",
        "tab\tend\t",
        "=?utf-8?q?not_an_encoded_word?=",
        "Ünïcödé " * 30,
        "a\r\nb\rc\nd",
        ".leading dot\n.\n..",
        "\x0b\x0c\x1c\x85\u2028 odd breaks",
        "a lone surrogate \ud800 here",
        "%%first_name%%",
        "line one\r\nline two %%unsubscribe_url%%",
    ]
)
_ADDRESSES = st.sampled_from(
    [
        "ana.0@inbox.test",
        "B.Jorn+tag@Example.COM",
        "x@y.io",
        "o'neil@example.com",
        "a" * 60 + "@" + "d" * 20 + ".example",
        "first_last-1@sub.domain.example",
    ]
)
_NAMES = st.sampled_from(["", "Ana", "Björn", "Doe, John", "x" * 90, "Ünïcödé Näme"])
_HEADER_NAMES = st.sampled_from(
    ["List-Unsubscribe", "List-Unsubscribe-Post", "X-Campaign", "X-Note", "Subject", "Cc", "to"]
)
_HEADER_VALUES = st.sampled_from(
    [
        "<https://mailroom.test/u?t=" + "9" * 120 + ">, <mailto:u@mailroom.test?subject=u>",
        "List-Unsubscribe=One-Click",
        "plain",
        "",
        "Ünïcödé value",
        "a, b, c, " + "d" * 80,
    ]
)


@st.composite
def bodies(draw: Callable[..., Any]) -> dict[str, Any]:
    tags = ["%%first_name%%", "%%first_name|html%%", "%%unsubscribe_url%%"]
    people = draw(st.lists(_ADDRESSES, min_size=1, max_size=4, unique_by=str.lower))
    personalizations = []
    for email in people:
        subs = {tag: draw(_TEXT) for tag in tags}
        item: dict[str, Any] = {"to": [{"email": email}], "substitutions": subs}
        if name := draw(_NAMES):
            item["to"][0]["name"] = name
        if draw(st.booleans()):
            item["headers"] = draw(st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=3))
        personalizations.append(item)
    content = []
    if draw(st.booleans()):
        content.append({"type": "text/plain", "value": draw(_TEXT) + " %%first_name%% " + tags[2]})
    if draw(st.booleans()):
        content.append({"type": "text/html", "value": f"<p>{draw(_TEXT)} %%first_name|html%%</p>"})
    if draw(st.booleans()):
        content.reverse()
    if draw(st.booleans()):
        content = content[:1]
    body: dict[str, Any] = {
        "personalizations": personalizations,
        "from": {"email": "news@mailroom.test", "name": draw(_NAMES)},
        "subject": draw(_TEXT) + " %%first_name%%",
        "content": content,
    }
    if draw(st.booleans()):
        body["reply_to"] = {"email": "support@mailroom.test"}
    if draw(st.booleans()):
        body["headers"] = draw(st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=2))
    return body


def reference(body: dict[str, Any], index: int) -> tuple[bytes, list[str]]:
    msg = build_mime_message(body, index, MESSAGE_ID, date=DATE, boundary=BOUNDARY)
    try:
        data = msg.as_bytes(policy=MESSAGE_POLICY)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise EnvelopeViolation(f"personalization {index}: cannot serialise: {exc}") from exc
    return data, list(msg.keys())


def outcome(make: Callable[[], tuple[bytes, list[str]]]) -> tuple[bytes, list[str]] | str:
    try:
        return make()
    except EnvelopeViolation as exc:
        return f"refused: {exc}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies())
def test_the_template_makes_the_reference_builders_bytes(body: dict[str, Any]) -> None:
    template = MessageTemplate(body, SEED)
    for index in range(len(body["personalizations"])):
        expected = outcome(lambda: reference(body, index))  # noqa: B023
        assert outcome(lambda: template.message(index, MESSAGE_ID)) == expected  # noqa: B023


def test_the_template_covers_the_encodings_the_reference_chooses() -> None:
    """7bit, 8bit, quoted-printable and base64 parts, each spliced as the package writes it."""
    seen: set[bytes] = set()
    for text in ("short ascii\n", "kurz: Grüße\n", "q" * 100 + "\n", "日本語のテキスト" * 20):
        body = {
            "personalizations": [{"to": [{"email": "ana.0@inbox.test"}]}],
            "from": {"email": "news@mailroom.test"},
            "subject": "s",
            "content": [{"type": "text/plain", "value": text}],
        }
        data, _ = MessageTemplate(body, SEED).message(0, MESSAGE_ID)
        assert (data, _) == reference(body, 0)
        seen.update(re.findall(rb"Content-Transfer-Encoding: (\S+)", data))
    assert seen == {b"7bit", b"8bit", b"quoted-printable", b"base64"}


def test_a_header_that_touches_the_mime_structure_is_built_by_the_reference() -> None:
    body = {
        "personalizations": [
            {"to": [{"email": "ana.0@inbox.test"}], "headers": {"Content-Type": "text/x"}}
        ],
        "from": {"email": "news@mailroom.test"},
        "subject": "s",
        "content": [{"type": "text/plain", "value": "hi"}],
    }
    template = MessageTemplate(body, SEED)
    assert template.message(0, MESSAGE_ID) == reference(body, 0)


# -- the quick guard against the full one ---------------------------------------------------------


def _good() -> tuple[bytes, list[str]]:
    body = {
        "personalizations": [
            {
                "to": [{"email": "ana.0@inbox.test"}],
                "headers": {"List-Unsubscribe": "<https://mailroom.test/u?t=1>"},
            }
        ],
        "from": {"email": "news@mailroom.test", "name": "Mailroom News"},
        "subject": "Hello",
        "content": [
            {"type": "text/plain", "value": "Hi"},
            {"type": "text/html", "value": "<p>Hi</p>"},
        ],
    }
    return MessageTemplate(body, SEED).message(0, MESSAGE_ID)


_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "cc": lambda d: d.replace(b"Subject:", b"Cc: bob@else.test\r\nSubject:", 1),
    "bcc": lambda d: d.replace(b"Subject:", b"Bcc: bob@else.test\r\nSubject:", 1),
    "to someone else": lambda d: d.replace(b"To: ana.0@inbox.test", b"To: bob@else.test", 1),
    "two in To": lambda d: d.replace(
        b"To: ana.0@inbox.test", b"To: ana.0@inbox.test, bob@else.test", 1
    ),
    "To as a group": lambda d: d.replace(
        b"To: ana.0@inbox.test", b"To: all: ana.0@inbox.test, bob@else.test;", 1
    ),
    "display name hiding an address": lambda d: d.replace(
        b"To: ana.0@inbox.test", b'To: "bob@else.test" <ana.0@inbox.test>', 1
    ),
    "folded second address": lambda d: d.replace(
        b"To: ana.0@inbox.test", b"To: ana.0@inbox.test,\r\n bob@else.test", 1
    ),
    "second To": lambda d: d.replace(b"Subject:", b"To: bob@else.test\r\nSubject:", 1),
    "second From": lambda d: d.replace(b"Subject:", b"From: x@else.test\r\nSubject:", 1),
    "From of two": lambda d: d.replace(
        b"From: Mailroom News <news@mailroom.test>", b"From: a@x.test, b@y.test", 1
    ),
    "bare LF": lambda d: d.replace(b"Subject: Hello", b"Subject: Hello\nBcc: bob@else.test", 1),
    "bare CR": lambda d: d.replace(b"Subject: Hello", b"Subject: Hello\rBcc: bob@else.test", 1),
    "long line": lambda d: d.replace(b"Subject: Hello", b"Subject: " + b"x" * 1000, 1),
    "not a field": lambda d: d.replace(b"Subject:", b"Not a field\r\nSubject:", 1),
    "leading continuation": lambda d: b" " + d,
    "no end of headers": lambda d: d.replace(b"\r\n\r\n", b"\r\n"),
    "unset header": lambda d: d.replace(b"Subject:", b"X-Extra: 1\r\nSubject:", 1),
    "header lost": lambda d: re.sub(rb"List-Unsubscribe: [^\r]*\r\n", b"", d, count=1),
}


@pytest.mark.parametrize("mutation", sorted(_MUTATIONS))
def test_the_quick_guard_refuses_what_the_full_guard_refuses(mutation: str) -> None:
    data, names = _good()
    rcpt = ["ana.0@inbox.test"]
    MimeGuard().check(data, rcpt, rcpt[0], names)
    check_mime_message(data, rcpt, rcpt[0], names)
    bad = _MUTATIONS[mutation](data)
    assert bad != data

    with pytest.raises(EnvelopeViolation) as full:
        check_mime_message(bad, rcpt, rcpt[0], names)
    with pytest.raises(EnvelopeViolation) as quick:
        MimeGuard().check(bad, rcpt, rcpt[0], names)
    assert str(quick.value) == str(full.value)


def test_the_quick_guard_refuses_a_wrong_envelope_like_the_full_guard() -> None:
    data, names = _good()
    for rcpt in ([], ["ana.0@inbox.test", "bob@else.test"], ["bob@else.test"], ["not an address"]):
        with pytest.raises(EnvelopeViolation) as full:
            check_mime_message(data, rcpt, "ana.0@inbox.test", names)
        with pytest.raises(EnvelopeViolation) as quick:
            MimeGuard().check(data, rcpt, "ana.0@inbox.test", names)
        assert str(quick.value) == str(full.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(), data=st.data())
def test_the_quick_guard_agrees_with_the_full_guard_on_any_header_line_put_in(
    body: dict[str, Any], data: st.DataObject
) -> None:
    """Any line (a header, a fold, a broken one) put anywhere in the header section: the quick
    guard passes it only when the full guard does."""
    template = MessageTemplate(body, SEED)
    try:
        message, names = template.message(0, MESSAGE_ID)
    except EnvelopeViolation:
        return
    email = body["personalizations"][0]["to"][0]["email"]
    head, _, rest = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    at = data.draw(st.integers(0, len(lines)))
    extra = data.draw(
        st.sampled_from(
            [
                b"Cc: bob@else.test",
                b" bob@else.test",
                b"\tcontinued",
                b"To: bob@else.test",
                b"X-Added: yes",
                b"no colon here",
                b"",
            ]
        )
    )
    bad = b"\r\n".join([*lines[:at], extra, *lines[at:]]) + b"\r\n\r\n" + rest
    verdicts = []
    for check in (check_mime_message, MimeGuard().check):
        try:
            check(bad, [email], email, names)
            verdicts.append("passed")
        except EnvelopeViolation as exc:
            verdicts.append(str(exc))
    assert verdicts[1] == verdicts[0] or (verdicts[1] != "passed" and verdicts[0] != "passed")
    if verdicts[0] != "passed":
        assert verdicts[1] != "passed"


@settings(max_examples=2000, deadline=None)
@given(
    line=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    | st.text(alphabet=st.sampled_from(list("ab= \t.~")), max_size=300).map(str.encode),
    maxlen=st.sampled_from([76, 78, 4, 5, 6]),
)
def test_a_quoted_printable_line_is_encoded_as_the_email_package_encodes_it(
    line: bytes, maxlen: int
) -> None:
    from email import quoprimime

    from mailroom.delivery.transports.mime import quoted_printable_line

    assert quoted_printable_line(line, maxlen) == quoprimime.body_encode(
        line.decode("latin-1"), maxlen, "\r\n"
    )


@settings(max_examples=600, deadline=None)
@given(
    text=st.lists(
        st.lists(st.sampled_from([*"aé= .\t€日", "x" * 20]), max_size=60).map("".join),
        max_size=14,
    ).map("\n".join)
)
def test_a_part_gets_the_encoding_and_payload_the_email_package_gives_it(text: str) -> None:
    """Near the line where quoted-printable and base64 trade places (the first ten lines'
    lengths), the encoding and the payload are the package's own."""
    from email.message import EmailMessage

    from mailroom.delivery.transports.mime import _encoded

    msg = EmailMessage(policy=MESSAGE_POLICY)
    msg.set_content(text, subtype="plain")
    head, _, payload = msg.as_bytes(policy=MESSAGE_POLICY).partition(b"\r\n\r\n")
    cte = re.search(rb"Content-Transfer-Encoding: (\S+)", head)
    assert cte is not None
    assert _encoded(text, {}) == (cte.group(1).decode(), payload)
