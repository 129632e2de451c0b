"""Properties of envelopes and request bodies over generated audiences (hypothesis).

Audiences mix what real ones hold: names in any script (RTL, emoji, combining marks), quotes and
apostrophes, CR/LF and the other line separators, markup, values of a few KB, and addresses at
internationalised domains. Whatever the data, an envelope's values stay on one line, the HTML
ones are escaped, each unsubscribe token is its owner's alone, and the frozen body passes the
envelope guard with exactly its recipients; any mutation that puts a second address into a
personalization is refused.
"""

from __future__ import annotations

import base64
import html
import string
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom.addresses import is_valid_single_address, normalise
from mailroom.batches import sendgrid_request_body, serialise
from mailroom.campaign_spec import CampaignSpec, load_campaign
from mailroom.checks.envelope_guard import recipients_of_body
from mailroom.content import LocaleContent, render_content
from mailroom.envelopes import envelope_values
from mailroom.errors import EnvelopeViolation
from mailroom.substitutions import substitution_tag
from mailroom.unsubscribe import unsubscribe_token, verify_unsubscribe_token

pytestmark = pytest.mark.unit

INCLUDE = Path(__file__).resolve().parents[2] / "include"
SECRET = b"property-test-secret"
LINE_BREAKS = ("\r", "\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c")
FIRST_NAME = substitution_tag("first_name", html=False)
FIRST_NAME_HTML = substitution_tag("first_name", html=True)
UNSUBSCRIBE = substitution_tag("unsubscribe_url", html=False)
UNSUBSCRIBE_HTML = substitution_tag("unsubscribe_url", html=True)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repository; failures print their example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@cache
def spec() -> CampaignSpec:
    return load_campaign(INCLUDE / "campaigns", "winter_update")


@cache
def contents() -> dict[str, LocaleContent]:
    s = spec()
    return render_content(s, INCLUDE / "templates", INCLUDE / "translations")


# --- strategies -------------------------------------------------------------------------------
TRICKY = [
    "\r\n",
    "\r",
    "\n",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",  # line breaks of every kind
    "Bcc: leak@example.com",
    "\r\nTo: all@example.com",  # header injection
    "<script>alert('x')</script>",
    "<b>",
    "</p>",
    "&amp;",
    "&lt;",
    ">",
    "<",  # markup
    '"',
    "'",
    "’",
    "O'Brien",
    '"Q" Person',
    "«Zoë»",  # quotes and apostrophes
    "مرحبا",
    "שלום",
    "\u202e",
    "\u200f",
    "\u200d",  # right-to-left and bidi controls
    "👩‍👩‍👧",
    "🎉",
    "🏳️‍🌈",  # emoji, ZWJ sequences
    "e\u0301",
    "Z\u0351\u0359\u0300",
    "\u0308",  # combining marks
    "%%first_name%%",
    "{{ recipient.email }}",
    "{% if %}",  # look like tags or markers
    "陽翔",
    "Jürgen",
    "   ",
    "\t",
]
piece = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
short_value = st.lists(piece, max_size=8).map("".join)
long_value = st.builds(lambda p, n: (p * n)[:4096], piece.filter(bool), st.integers(200, 2000))
first_names = st.one_of(st.none(), short_value, long_value)

ATOM = string.ascii_letters + string.digits + "_+-'"
local_parts = st.lists(st.text(ATOM, min_size=1, max_size=10), min_size=1, max_size=3).map(".".join)
domains = st.sampled_from(
    [
        "bücher.example",
        "例え.jp",
        "sub.例え.jp",
        "münchen.de",
        "пример.рф",
        "xn--bcher-kva.example",
        "MAIL.Example.NET",
        "ünïcödé.example.org",
    ]
)


@st.composite
def addresses(draw: Any) -> str:
    email = normalise(f"{draw(local_parts)}@{draw(domains)}")
    assert email is not None
    if not is_valid_single_address(email):  # e.g. a local part too long after joining
        email = normalise(f"user{draw(st.integers(0, 10**6))}@{draw(domains)}")
    assert email is not None
    assert is_valid_single_address(email), email
    return email


rows = st.fixed_dictionaries(
    {
        "user_id": st.text(min_size=1, max_size=40),
        "email": addresses(),
        "first_name": first_names,
        "locale": st.sampled_from(["en", "de", "fr", "es", "ja"]),
    }
)
audiences = st.lists(
    rows, min_size=1, max_size=25, unique_by=(lambda r: r["email"].lower(), lambda r: r["user_id"])
)


def envelopes_of(audience: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in audience:
        subs, headers = envelope_values(spec(), SECRET, row)
        out.append({"email": row["email"], "substitutions": subs, "headers": headers})
    return out


def token_in(url: str) -> str:
    """The token of a link made from the campaign's URL template."""
    before, _, after = spec().unsubscribe.url_template.partition("{token}")
    assert url.startswith(before)
    assert url.endswith(after)
    return unquote(url[len(before) : len(url) - len(after)])


def spliced(tag_of: str, ciphertext_of: str) -> str:
    """A token with the SIV tag of one and the ciphertext of another."""

    def sealed(token: str) -> bytes:
        part = token.rpartition(".")[2]
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    mixed = sealed(tag_of)[:16] + sealed(ciphertext_of)[16:]
    prefix = tag_of.rpartition(".")[0]
    return f"{prefix}.{base64.urlsafe_b64encode(mixed).decode().rstrip('=')}"


# --- properties -------------------------------------------------------------------------------
@SETTINGS
@given(audience=audiences)
def test_envelope_values_stay_on_one_line_and_html_is_escaped(
    audience: list[dict[str, Any]],
) -> None:
    for row in audience:
        subs, headers = envelope_values(spec(), SECRET, row)
        for value in [*subs.values(), *headers.values()]:
            assert not any(b in value for b in LINE_BREAKS), repr(value)
        for plain_tag, html_tag in ((FIRST_NAME, FIRST_NAME_HTML), (UNSUBSCRIBE, UNSUBSCRIBE_HTML)):
            escaped = subs[html_tag]
            assert not set(escaped) & set("<>\"'"), repr(escaped)
            assert html.unescape(escaped) == subs[plain_tag]
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert f"<{subs[UNSUBSCRIBE]}>" in headers["List-Unsubscribe"]


@SETTINGS
@given(audience=audiences, other_campaign=st.text(min_size=1, max_size=30))
def test_unsubscribe_tokens_verify_only_for_their_own_user_and_campaign(
    audience: list[dict[str, Any]], other_campaign: str
) -> None:
    name = spec().name
    tokens = {}
    for row in audience:
        subs, _headers = envelope_values(spec(), SECRET, row)
        token = token_in(subs[UNSUBSCRIBE])
        assert token == unsubscribe_token(SECRET, name, row["user_id"])
        assert verify_unsubscribe_token(SECRET, name, token) == row["user_id"]
        if other_campaign != name:
            assert verify_unsubscribe_token(SECRET, other_campaign, token) is None
        assert verify_unsubscribe_token(b"another-secret", name, token) is None
        tokens[row["user_id"]] = token
    assert len(set(tokens.values())) == len(tokens)
    # Another user's SIV tag with this user's ciphertext never verifies, either way round.
    ids = list(tokens)
    for a, b in pairwise(ids):
        for forged in (spliced(tokens[a], tokens[b]), spliced(tokens[b], tokens[a])):
            assert verify_unsubscribe_token(SECRET, name, forged) is None
        # Nor does another user's token for this user: each is its owner's alone.
        assert verify_unsubscribe_token(SECRET, name, tokens[b]) != a


@SETTINGS
@given(audience=audiences, locale=st.sampled_from(["en", "de", "fr", "es", "ja"]))
def test_frozen_bodies_pass_the_guard_with_exactly_their_recipients(
    audience: list[dict[str, Any]], locale: str
) -> None:
    body = sendgrid_request_body(
        spec(), contents()[locale], envelopes_of(audience), {"mailroom_batch": f"{locale}-00001"}
    )
    assert recipients_of_body(serialise(body)) == tuple(r["email"] for r in audience)


def _second_address_mutations() -> Any:
    kinds = st.sampled_from(["to", "cc", "bcc", "joined", "display"])
    separators = st.sampled_from([", ", ",", ";", "; ", " ", "\n", "\r\n", " , "])
    return st.tuples(kinds, separators, st.lists(addresses(), min_size=1, max_size=3))


@SETTINGS
@given(
    audience=audiences,
    where=st.integers(min_value=0),
    mutation=_second_address_mutations(),
    from_batch=st.booleans(),
)
def test_the_guard_refuses_a_second_address_in_any_personalization(
    audience: list[dict[str, Any]],
    where: int,
    mutation: tuple[str, str, list[str]],
    from_batch: bool,
) -> None:
    kind, separator, fresh = mutation
    body = sendgrid_request_body(spec(), contents()["en"], envelopes_of(audience), {})
    parts = body["personalizations"]
    i = where % len(parts)
    own = parts[i]["to"][0]["email"]
    others = [r["email"] for j, r in enumerate(audience) if j != i]
    extra = others[:3] if from_batch and others else fresh
    if kind == "to":
        parts[i]["to"] += [{"email": e} for e in extra]
    elif kind in ("cc", "bcc"):
        parts[i][kind] = [{"email": e} for e in extra]
    elif kind == "joined":
        parts[i]["to"] = [{"email": separator.join([own, *extra])}]
    else:  # a display name carrying the other address
        parts[i]["to"] = [{"email": own, "name": f"{extra[0]}{separator}"}]
    with pytest.raises(EnvelopeViolation):
        recipients_of_body(serialise(body))


# -- the guard's search for other recipients' addresses, all personalizations in one pass --------
def _shown(address: str, how: str) -> str:
    """``address`` as a personalization's value might show it."""
    local, _, domain = address.partition("@")
    return {
        "plain": address,
        "upper": address.upper(),
        "quoted": f"'{address}'",
        "mailto": f"<mailto:{address}?subject=x>",
        "percent": f"{local}%40{domain}",
        "entity": f"{local}&#64;{domain}",
        "named": f"{local}&commat;{domain}",
        "split": f"{local}\n@{domain}",  # a line break ends an address: nobody's
    }[how]


HOW = st.sampled_from(["plain", "upper", "quoted", "mailto", "percent", "entity", "named", "split"])


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.text(max_size=20),  # the person's own, harmless text
            st.lists(st.tuples(st.integers(0, 5), HOW, st.sampled_from(["value", "key", "list"]))),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_guard_finds_a_foreign_address_exactly_as_one_by_one(
    people: list[tuple[str, list[tuple[int, str, str]]]],
) -> None:
    """Reading every personalization in one pass refuses exactly the requests that reading each
    on its own (``shows_address`` on its ``_text_of``, the reference) refuses."""
    from mailroom.checks import envelope_guard as guard

    recipients = [f"user{i}@example.com" for i in range(len(people))]
    personalizations: list[dict[str, Any]] = []
    for i, (own_text, shown) in enumerate(people):
        subs: dict[str, Any] = {FIRST_NAME: own_text, UNSUBSCRIBE: f"https://x.test/u/{i}"}
        for n, (who, how, where) in enumerate(shown):
            text = _shown(f"user{who}@example.com", how)
            if where == "key":
                subs[f"%%{n}{text}%%"] = "v"
            elif where == "list":
                subs[f"%%l{n}%%"] = [text, {"deep": text}]
            else:
                subs[f"%%v{n}%%"] = f"see {text} here"
        personalizations.append(
            {
                "to": [{"email": recipients[i]}],
                "substitutions": subs,
                "headers": {"List-Unsubscribe": "<mailto:unsubscribe@example.net>"},
            }
        )
    everyone = {r.lower() for r in recipients}
    flagged = {
        i
        for i, item in enumerate(personalizations)
        if guard.shows_address(
            guard._text_of({k: v for k, v in item.items() if k != "to"}),
            everyone,
            own=recipients[i],
        )
    }
    try:
        guard._check_no_foreign_addresses({}, personalizations, recipients, frozenset())
        found = None
    except EnvelopeViolation as exc:
        found = int(str(exc).split()[1])
    # Refused exactly when one of them shows another's address, and named as one that does.
    assert (found is None) == (not flagged)
    assert found is None or found in flagged
