"""Invariant 1, tried for real: mutant body builders against each layer on its own.

Every mutant breaks the one-recipient-per-envelope rule in one way. Each is frozen into a fresh
copy of one prepared run and then meets one layer alone:

* ``gate``: the pipeline as deployed: the data-quality gate runs on the frozen batches and must
  raise ``ValidationFailed`` (so approval is never reached); had it passed, the run would go on
  to send, so the dev server's request count shows what would have left.
* ``guard-sendgrid``: the gate is skipped; the run is sent as the DAG sends it after approval
  (the guard's pass over every request, then the shards, through the real ``SendGridTransport``
  to the SendGrid-compatible dev server), and the envelope guard must refuse the exact bytes
  (``EnvelopeViolation``) before the first request of the run leaves, wherever the mutated
  request is.
* ``guard-smtp``: the same, through the real ``SmtpTransport`` to a real SMTP server (aiosmtpd),
  which must receive no message and no byte (and the SendGrid dev server no request).

A mutant is a broken body builder, a broken serialiser (the freeze writes bytes no ``json.dumps``
writes: a key twice, a BOM, trailing data, bytes that are not UTF-8; their digests are taken of
those bytes, as a broken freeze would), or an edit of the frozen files after the freeze.

The outcome of every (mutant, layer) pair is recorded as it happened and printed as a table at
the end of the module (through the terminal reporter, so the CI log shows it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailroom import batches, pipeline
from mailroom.addresses import mask_addresses
from mailroom.audience.sample import generate
from mailroom.batches import (
    BodyBuilder,
    Envelope,
    iter_envelopes_by_locale,
    load_manifest,
    personalization,
    sendgrid_request_body,
    serialise,
    sha256_hex,
)
from mailroom.campaign_spec import CampaignSpec
from mailroom.content import LocaleContent
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.base import Transport
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.delivery.transports.smtp import SmtpSettings, SmtpTransport
from mailroom.errors import EnvelopeViolation, MailroomError, ValidationFailed
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import RunStaging, read_json, write_json
from mailroom.substitutions import substitution_tag
from sendgrid_dev import SendGridDevServer, accepted_recipients
from support.runs import built_run

pytestmark = pytest.mark.unit

SECRET = b"mutant-test-secret"
INCLUDE = Path(__file__).resolve().parents[2] / "include"
OUTSIDER = "intruder@example.net"
FIRST_NAME = substitution_tag("first_name", html=False)
FIRST_NAME_HTML = substitution_tag("first_name", html=True)
UNSUBSCRIBE = substitution_tag("unsubscribe_url", html=False)
UNSUBSCRIBE_HTML = substitution_tag("unsubscribe_url", html=True)

Body = dict[str, Any]


# --- mutant body builders ------------------------------------------------------------------
def clean(spec: CampaignSpec, content: LocaleContent, envelopes: Any, custom_args: Any) -> Body:
    return sendgrid_request_body(spec, content, envelopes, custom_args)


def wrapping(mutate: Callable[[Body, LocaleContent], None]) -> Callable[[Run], BodyBuilder]:
    """A stateless mutant: the real body with one thing broken in every request."""

    def factory(_run: Run) -> BodyBuilder:
        def build(spec: CampaignSpec, content: LocaleContent, envelopes: Any, args: Any) -> Body:
            body = clean(spec, content, envelopes, args)
            mutate(body, content)
            return body

        return build

    return factory


def _to(body: Body, i: int) -> str:
    return str(body["personalizations"][i]["to"][0]["email"])


def everyone_in_one_to(body: Body, _content: LocaleContent) -> None:
    """The 2019 change: the whole batch in one personalization's ``to``."""
    parts = body["personalizations"]
    body["personalizations"] = [
        {
            "to": [p["to"][0] for p in parts],
            "substitutions": parts[0]["substitutions"],
            "headers": parts[0]["headers"],
        }
    ]


def sdk_default(_run: Run) -> BodyBuilder:
    """The SendGrid SDK's default: ``Mail(to_emails=[...])`` without ``is_multiple``."""
    from sendgrid.helpers.mail import Mail

    def build(spec: CampaignSpec, content: LocaleContent, envelopes: Any, _args: Any) -> Body:
        mail = Mail(
            from_email=spec.sender.email,
            to_emails=[e["email"] for e in envelopes],
            subject=content.subject,
            plain_text_content=content.text,
            html_content=content.html,
        )
        body: Body = mail.get()
        return body

    return build


def cc_other_user(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][0]["cc"] = [{"email": _to(body, 1)}]


def bcc_other_user(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][0]["bcc"] = [{"email": _to(body, 1)}]


def top_level_bcc(body: Body, _content: LocaleContent) -> None:
    body["bcc"] = [{"email": OUTSIDER}]


def mail_settings_bcc(body: Body, _content: LocaleContent) -> None:
    """SendGrid's ``bcc`` mail setting: a copy of every message of the request to one address."""
    body["mail_settings"] = {"bcc": {"enable": True, "email": OUTSIDER}}


def same_address_twice_in_request(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][1] = copy.deepcopy(body["personalizations"][0])


def _batches(run: Run) -> list[list[Envelope]]:
    """The envelopes of every request, in the order freeze_batches builds them."""
    spec = run.spec()
    return [
        chunk
        for locale in spec.locales
        for chunk in iter_envelopes_by_locale(run.staging.envelopes, locale, spec.batch_size)
    ]


def address_in_two_requests(_run: Run) -> BodyBuilder:
    """The brief's shape: request 2's first recipient replaced by request 1's first (whole
    personalization, so only the duplicate itself is wrong). Request 1 is clean."""
    first: list[Body] = []

    def build(spec: CampaignSpec, content: LocaleContent, envelopes: Any, args: Any) -> Body:
        body = clean(spec, content, envelopes, args)
        first.append(body["personalizations"][0])
        if len(first) == 2:  # the second request; the others stay clean
            body["personalizations"][0] = copy.deepcopy(first[0])
        return body

    return build


def address_in_two_requests_first(run: Run) -> BodyBuilder:
    """The same address in two requests, the copy in the first request sent: request 2's first
    recipient also takes the place of request 1's first."""
    intruder = _batches(run)[1][0]
    calls: list[int] = []

    def build(spec: CampaignSpec, content: LocaleContent, envelopes: Any, args: Any) -> Body:
        body = clean(spec, content, envelopes, args)
        if not calls:
            body["personalizations"][0] = personalization(intruder)
        calls.append(1)
        return body

    return build


def other_users_substitutions(body: Body, _content: LocaleContent) -> None:
    """User B's envelope carries user A's substitution values (a shared or shifted dict)."""
    parts = body["personalizations"]
    parts[1]["substitutions"] = copy.deepcopy(parts[0]["substitutions"])


def first_name_only(body: Body, _content: LocaleContent) -> None:
    """Only user A's first name in user B's envelope, B's own link and headers kept."""
    parts = body["personalizations"]
    a = parts[0]["substitutions"]
    b = next(p for p in parts[1:] if p["substitutions"][FIRST_NAME] != a[FIRST_NAME])
    b["substitutions"][FIRST_NAME] = a[FIRST_NAME]
    b["substitutions"][FIRST_NAME_HTML] = a[FIRST_NAME_HTML]


def other_users_unsubscribe(body: Body, _content: LocaleContent) -> None:
    """User A's unsubscribe link in user B's envelope: substitutions and List-Unsubscribe."""
    a, b = body["personalizations"][0], body["personalizations"][1]
    for tag in (UNSUBSCRIBE, UNSUBSCRIBE_HTML):
        b["substitutions"][tag] = a["substitutions"][tag]
    b["headers"]["List-Unsubscribe"] = a["headers"]["List-Unsubscribe"]


def comma_joined_address(body: Body, _content: LocaleContent) -> None:
    parts = body["personalizations"]
    parts[0]["to"] = [{"email": f"{_to(body, 0)}, {_to(body, 1)}"}]
    del parts[1]


def reserved_bcc_header(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][0]["headers"]["Bcc"] = _to(body, 1)


def header_with_other_users_address(body: Body, _content: LocaleContent) -> None:
    """A non-reserved header that shows (and mails read receipts to) another recipient."""
    body["personalizations"][1]["headers"]["Disposition-Notification-To"] = _to(body, 0)


def address_in_shared_content(body: Body, _content: LocaleContent) -> None:
    """The shared HTML rendered with the first recipient's address instead of a tag."""
    html = next(c for c in body["content"] if c["type"] == "text/html")
    html["value"] += f"<p>This message was sent to {_to(body, 0)}</p>"


def display_name_hides_address(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][0]["to"][0]["name"] = _to(body, 1)


def personal_subject_with_other_users_name(body: Body, content: LocaleContent) -> None:
    parts = body["personalizations"]
    parts[1]["subject"] = content.subject.replace(FIRST_NAME, parts[0]["substitutions"][FIRST_NAME])


def leftover_jinja_marker(body: Body, _content: LocaleContent) -> None:
    html = next(c for c in body["content"] if c["type"] == "text/html")
    html["value"] += "<p>{{ recipient.first_name }}</p>"


def unresolved_tag(body: Body, _content: LocaleContent) -> None:
    body["subject"] = f"{body['subject']} %%account_balance%%"


def recipient_not_in_audience(body: Body, _content: LocaleContent) -> None:
    """An address nobody validated (a different one per request) in place of a recipient's."""
    batch = body["custom_args"]["mailroom_batch"]
    body["personalizations"][0]["to"] = [{"email": OUTSIDER.replace("@", f"+{batch}@")}]


# --- shared parts the approved inputs do not give (the guard rebuilds them) -------------------
def smtpapi_fan_out(body: Body, _content: LocaleContent) -> None:
    """SendGrid's SMTP-relay header: every recipient of the request in one ``to`` list."""
    to = [p["to"][0]["email"] for p in body["personalizations"]]
    body["headers"] = {"X-SMTPAPI": json.dumps({"to": to})}


def read_receipt_to_outsider(body: Body, _content: LocaleContent) -> None:
    body["headers"] = {"Disposition-Notification-To": OUTSIDER}


def reply_to_outsider(body: Body, _content: LocaleContent) -> None:
    body["reply_to"] = {"email": OUTSIDER}


def template_replaces_content(body: Body, _content: LocaleContent) -> None:
    body["template_id"] = "d-0123456789abcdef0123456789abcdef"


def unsubscribe_group(body: Body, _content: LocaleContent) -> None:
    body["asm"] = {"group_id": 1}


def attachment_of_addresses(body: Body, _content: LocaleContent) -> None:
    """A CSV of the request's own addresses, attached for everyone."""
    import base64

    rows = "\n".join(p["to"][0]["email"] for p in body["personalizations"])
    body["attachments"] = [
        {"content": base64.b64encode(rows.encode()).decode(), "filename": "list.csv"}
    ]


def subject_rendered_for_the_first(body: Body, content: LocaleContent) -> None:
    """The shared subject rendered once with the first recipient's own value."""
    first = body["personalizations"][0]["substitutions"][FIRST_NAME]
    assert FIRST_NAME in content.subject, "the example subject is personal"
    body["subject"] = content.subject.replace(FIRST_NAME, first)


def literal_unsubscribe_link_in_html(body: Body, _content: LocaleContent) -> None:
    """The first recipient's own unsubscribe link written into the shared HTML."""
    link = body["personalizations"][0]["substitutions"][UNSUBSCRIBE_HTML]
    html = next(c for c in body["content"] if c["type"] == "text/html")
    html["value"] = html["value"].replace(UNSUBSCRIBE_HTML, link)


def fullwidth_at_address_in_html(body: Body, _content: LocaleContent) -> None:
    html = next(c for c in body["content"] if c["type"] == "text/html")
    fullwidth_at = "\uff20"
    html["value"] += f"<p>{_to(body, 1).replace('@', fullwidth_at)}</p>"


def spelled_out_address_in_text(body: Body, _content: LocaleContent) -> None:
    text = next(c for c in body["content"] if c["type"] == "text/plain")
    local, domain = _to(body, 1).split("@")
    text["value"] += f"\n{local} (at) {domain.replace('.', ' (dot) ')}"


def address_split_by_markup(body: Body, _content: LocaleContent) -> None:
    html = next(c for c in body["content"] if c["type"] == "text/html")
    local, domain = _to(body, 1).split("@")
    html["value"] += f"<p>{local}@<span></span>{domain}</p>"


def sender_name_with_a_recipient(body: Body, _content: LocaleContent) -> None:
    body["from"] = {**body["from"], "name": _to(body, 0)}


def category_with_a_recipient(body: Body, _content: LocaleContent) -> None:
    body["categories"] = [_to(body, 0)]


def custom_args_with_a_recipient(body: Body, _content: LocaleContent) -> None:
    body["custom_args"] = {**body["custom_args"], "user": _to(body, 0)}


def footer_setting_with_a_recipient(body: Body, _content: LocaleContent) -> None:
    body["mail_settings"] = {"footer": {"enable": True, "text": f"For {_to(body, 0)}"}}


def extra_content_part(body: Body, _content: LocaleContent) -> None:
    body["content"] = [*body["content"], {"type": "text/x-amp-html", "value": _to(body, 0)}]


def scheduled_send(body: Body, _content: LocaleContent) -> None:
    body["send_at"] = 4102444800


def personal_custom_args(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][1]["custom_args"] = {"seen_with": _to(body, 0)}


def personal_send_at(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][0]["send_at"] = 4102444800


def _plainly_named(body: Body) -> list[dict[str, Any]]:
    """The personalizations whose first name is letters only: a name that no pattern for a
    hidden address or header (``@``, ``<``, a line break, …) can object to."""
    return [
        p
        for p in body["personalizations"]
        if re.fullmatch(r"[^\W\d_]+", p["substitutions"][FIRST_NAME])
    ]


def display_name_with_another_first_name(body: Body, _content: LocaleContent) -> None:
    """No address at all: user A's first name as user B's display name."""
    a, b = _plainly_named(body)[:2]
    b["to"][0]["name"] = a["substitutions"][FIRST_NAME]


# --- an audience address disguised, a name, values: every one differs from the reconstruction ---
def _part(body: Body, content_type: str) -> dict[str, Any]:
    part: dict[str, Any] = next(c for c in body["content"] if c["type"] == content_type)
    return part


def spelled_out_address_as_display_name(body: Body, _content: LocaleContent) -> None:
    """B's address spelled out as A's display name: no '@' anywhere for a pattern to find."""
    local, domain = _to(body, 1).split("@")
    spelled = f"{local} (at) {domain.replace('.', ' (dot) ')}"
    body["personalizations"][0]["to"][0]["name"] = spelled


def fullwidth_at_display_name(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][0]["to"][0]["name"] = _to(body, 1).replace("@", "\uff20")


def own_first_name_as_display_name(body: Body, _content: LocaleContent) -> None:
    """Harmless as it stands (the recipient's own name), but a field the freeze never writes: a
    display name could carry anything, so it is refused whatever it holds."""
    own = _plainly_named(body)[0]
    own["to"][0]["name"] = own["substitutions"][FIRST_NAME]


def soft_hyphen_address_in_html(body: Body, _content: LocaleContent) -> None:
    """B's address with an invisible soft hyphen (U+00AD) in it: a reader sees the address."""
    address = _to(body, 1)
    _part(body, "text/html")["value"] += f"<p>{address[:2]}\u00ad{address[2:]}</p>"


def zero_width_address_in_text(body: Body, _content: LocaleContent) -> None:
    """B's address with a zero-width space (U+200B) after its '@'."""
    _part(body, "text/plain")["value"] += "\n" + _to(body, 1).replace("@", "@\u200b")


def entity_at_address_in_html(body: Body, _content: LocaleContent) -> None:
    _part(body, "text/html")["value"] += f"<p>{_to(body, 1).replace('@', '&#64;')}</p>"


def entity_encoded_address_in_html(body: Body, _content: LocaleContent) -> None:
    """B's address written entirely as character references: the browser shows it whole."""
    encoded = "".join(f"&#x{ord(c):x};" for c in _to(body, 1))
    _part(body, "text/html")["value"] += f"<a href='mailto:{encoded}'>{encoded}</a>"


def idn_address_in_its_other_form(run: Run) -> BodyBuilder:
    """An audience address with an internationalised domain, written into every request's shared
    HTML in the form the requests do not use (Unicode for an ``xn--`` domain, and back): the same
    mailbox, other bytes."""
    address = next(
        str(e["email"])
        for batch in _batches(run)
        for e in batch
        if not str(e["email"]).isascii() or "@xn--" in str(e["email"])
    )
    local, domain = address.split("@")
    if domain.isascii():
        other = domain.encode("ascii").decode("idna")
    else:
        other = domain.encode("idna").decode("ascii")

    def build(spec: CampaignSpec, content: LocaleContent, envelopes: Any, args: Any) -> Body:
        body = clean(spec, content, envelopes, args)
        _part(body, "text/html")["value"] += f"<p>{local}@{other}</p>"
        return body

    return build


def ampersand_joined_local_parts(body: Body, _content: LocaleContent) -> None:
    """One valid address ('&' is allowed in a local part) made of A's and B's: whoever owns it
    reads a message meant for A."""
    a_local = _to(body, 0).split("@")[0]
    b_local, b_domain = _to(body, 1).split("@")
    body["personalizations"][0]["to"] = [{"email": f"{a_local}&{b_local}@{b_domain}"}]


def text_rendered_for_the_first(body: Body, content: LocaleContent) -> None:
    """The shared text part rendered once with the first recipient's own first name."""
    first = body["personalizations"][0]["substitutions"][FIRST_NAME]
    assert FIRST_NAME in content.text, "the example text is personal"
    _part(body, "text/plain")["value"] = content.text.replace(FIRST_NAME, first)


def other_users_html_unsubscribe_only(body: Body, _content: LocaleContent) -> None:
    """Only the HTML form of A's unsubscribe link in B's substitutions; B's plain link and
    List-Unsubscribe header stay B's own, so only one of four places shows it."""
    a, b = body["personalizations"][0], body["personalizations"][1]
    b["substitutions"][UNSUBSCRIBE_HTML] = a["substitutions"][UNSUBSCRIBE_HTML]


# --- fields the freeze never writes --------------------------------------------------------
def ip_pool_named_after_a_recipient(body: Body, _content: LocaleContent) -> None:
    body["ip_pool_name"] = _to(body, 0).split("@")[0]


def tracking_footer_with_a_recipient(body: Body, _content: LocaleContent) -> None:
    """SendGrid's subscription-tracking footer, appended to every message of the request."""
    body["tracking_settings"] = {
        "subscription_tracking": {"enable": True, "text": f"Sent to {_to(body, 0)}"}
    }


def batch_id_set(body: Body, _content: LocaleContent) -> None:
    body["batch_id"] = "MWQ4OGI0NjktNWU3Ny0xMWVlLTg5ZDAtMGUzMGE3ZmY0ZGY2"


def send_each_at_list(body: Body, _content: LocaleContent) -> None:
    """The SMTP API's per-recipient schedule, which the v3 API does not know."""
    body["send_each_at"] = [4102444800 + i for i, _ in enumerate(body["personalizations"])]


def reply_to_list_of_recipients(body: Body, _content: LocaleContent) -> None:
    """Every recipient of the request as a reply-to: anyone who replies writes to them all."""
    body["reply_to_list"] = [p["to"][0] for p in body["personalizations"]]


def personal_from_another_user(body: Body, _content: LocaleContent) -> None:
    body["personalizations"][1]["from"] = {"email": _to(body, 0)}


def personal_template_data(body: Body, _content: LocaleContent) -> None:
    parts = body["personalizations"]
    parts[1]["dynamic_template_data"] = {"first_name": parts[0]["substitutions"][FIRST_NAME]}


def smtpapi_header_in_a_personalization(body: Body, _content: LocaleContent) -> None:
    """The SMTP relay's fan-out header in one recipient's own headers."""
    to = [p["to"][0]["email"] for p in body["personalizations"]]
    body["personalizations"][0]["headers"]["X-SMTPAPI"] = json.dumps({"to": to})


# --- a broken serialiser: bytes json.dumps never writes (the digests are of these bytes) ----
def unchanged(_run: Run) -> BodyBuilder:
    """The real body; the mutant is in how it is written (``Mutant.rewrite``)."""
    return clean


def _personalizations_end(data: bytes) -> int:
    """Where the personalizations array of a serialised body ends (it is the first key)."""
    assert data.startswith(b'{"personalizations":[')
    body = json.loads(data)
    head = serialise({"personalizations": body["personalizations"]})
    assert data.startswith(head[:-1])
    return len(head) - 1


def personalizations_twice(data: bytes) -> bytes:
    """A second ``personalizations`` key with the whole batch in one ``to``: a parser where the
    last copy wins sees the 2019 change, one where the first wins sees a clean request."""
    body = json.loads(data)
    everyone = [{"to": [p["to"][0] for p in body["personalizations"]]}]
    second = b',"personalizations":' + json.dumps(everyone, separators=(",", ":")).encode()
    return data[:-1] + second + b"}"


def personalizations_twice_escaped(data: bytes) -> bytes:
    """The second copy's key spelled with a JSON escape (``\\u0061`` for 'a'): the same key
    once parsed, other bytes to any check that looks for the name."""
    doubled = personalizations_twice(data)
    return doubled.replace(b',"personalizations":', b',"person\\u0061lizations":', 1)


def email_twice(data: bytes) -> bytes:
    """A's ``to`` entry with a second ``email`` key holding B's address."""
    body = json.loads(data)
    a, b = (p["to"][0]["email"] for p in body["personalizations"][:2])
    own = serialise({"email": a})
    both = own[:-1] + b',"email":' + json.dumps(b, ensure_ascii=False).encode() + b"}"
    assert own in data
    return data.replace(own, both, 1)


def trailing_second_object(data: bytes) -> bytes:
    """A second JSON object after the body (JSON Lines): a lenient reader takes either."""
    body = json.loads(data)
    return data + b"\n" + serialise({"bcc": [p["to"][0] for p in body["personalizations"]]})


def byte_order_mark(data: bytes) -> bytes:
    return b"\xef\xbb\xbf" + data


def latin1_byte_in_subject(data: bytes) -> bytes:
    """A Latin-1 no-break space in the subject: not UTF-8, so two readers read two subjects."""
    assert b'"subject":"' in data
    return data.replace(b'"subject":"', b'"subject":"\xa0', 1)


def swapped_between_requests(run: Run) -> None:
    """The first personalizations of requests 1 and 2 swapped after the freeze, and the
    manifest's digests recomputed to match: every body is then in the manifest, but not the
    manifest that was approved (nor the digests the outbox staged)."""
    st = run.staging
    raw = read_json(st.manifest)
    first, second = (st.batches_dir / entry["file"] for entry in raw["batches"][:2])
    a, b = json.loads(first.read_bytes()), json.loads(second.read_bytes())
    a["personalizations"][0], b["personalizations"][0] = (
        b["personalizations"][0],
        a["personalizations"][0],
    )
    first.write_bytes(serialise(a))
    second.write_bytes(serialise(b))
    for entry in raw["batches"]:
        data = (st.batches_dir / entry["file"]).read_bytes()
        entry["sha256"], entry["size"] = sha256_hex(data), len(data)
    write_json(st.manifest, raw)


def edit_after_freeze(run: Run) -> None:
    """Rewrite the first frozen request (a new subject) after the manifest pinned its digest."""
    manifest = load_manifest(run.staging.manifest)
    path = run.staging.batches_dir / manifest.batches[0].file
    body = json.loads(path.read_bytes())
    body["subject"] = "Urgent: verify your wallet"
    path.write_bytes(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Mutant:
    name: str
    builder: Callable[[Run], BodyBuilder] | None
    gate_reasons: frozenset[str]  # the gate must fail at least one of these checks
    guard_reason: str  # a regex the guard's refusal must match
    after_freeze: Callable[[Run], None] | None = None
    # The freeze's serialiser broken: every body's bytes rewritten as the freeze writes them.
    rewrite: Callable[[bytes], bytes] | None = None
    # The first request is left clean: only the guard's pass over the whole run, not the check
    # of each request as it leaves, can stop this mutant before anything is sent.
    first_request_clean: bool = False
    # What the mutation would do through SMTP, when that is not what it does through SendGrid
    # (printed in the table: the row still runs, and still must be refused).
    smtp_note: str = ""


def _m(
    name: str,
    builder: Callable[[Run], BodyBuilder] | None,
    gate: set[str],
    guard: str,
    **kwargs: Any,
) -> Mutant:
    return Mutant(name, builder, frozenset(gate), guard, **kwargs)


SHARED = r"not what the approved spec and content give"
NEVER_WRITTEN = r"field\(s\) the freeze never writes"
SMTP_DROPS = "a SendGrid field the SMTP transport would not send"
SMTP_FIRST_TO = "through SMTP: one message, to the first address of the 'to' list"
MUTANTS = [
    _m(
        "2019 change: batch in one 'to'",
        wrapping(everyone_in_one_to),
        {"n_to"},
        r"recipients in 'to', not 1",
        smtp_note=SMTP_FIRST_TO,
    ),
    _m(
        "SDK default Mail(to_emails=[...])",
        sdk_default,
        {"n_to"},
        r"recipients in 'to', not 1|" + SHARED,
        smtp_note=SMTP_FIRST_TO,
    ),
    _m(
        "cc of another user",
        wrapping(cc_other_user),
        {"n_cc"},
        r"has \['cc'\]",
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "bcc of another user",
        wrapping(bcc_other_user),
        {"n_bcc"},
        r"has \['bcc'\]",
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "top-level bcc",
        wrapping(top_level_bcc),
        {"top_level_cc_bcc"},
        r"top-level 'bcc'|" + SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "mail_settings.bcc copy",
        wrapping(mail_settings_bcc),
        {"top_level_cc_bcc"},
        r"'bcc' mail setting|" + SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "same address twice in a request",
        wrapping(same_address_twice_in_request),
        {"email_key_once_in_run"},
        r"appears twice in the request",
    ),
    _m(
        "same address in two requests (1st)",
        address_in_two_requests_first,
        {"email_key_once_in_run"},
        r"outside its batch",
    ),
    _m(
        "same address in two requests (2nd)",
        address_in_two_requests,
        {"email_key_once_in_run"},
        r"outside its batch",
        first_request_clean=True,
    ),
    _m(
        "A's substitutions in B's envelope",
        wrapping(other_users_substitutions),
        {"values_match"},
        r"belong to different recipients|another personalization's unsubscribe",
    ),
    _m(
        "A's unsubscribe link+header in B's",
        wrapping(other_users_unsubscribe),
        {"values_match"},
        r"another personalization's unsubscribe link",
    ),
    _m(
        "A's first name only in B's envelope",
        wrapping(first_name_only),
        {"values_match"},
        r"not its recipient's own",
    ),
    _m(
        "'a@x, b@y' in one address field",
        wrapping(comma_joined_address),
        {"email"},
        r"not exactly one valid address",
    ),
    _m(
        "batch edited after freeze",
        None,
        {"digest_matches"},
        r"not in the approved manifest",
        after_freeze=edit_after_freeze,
    ),
    _m(
        "reserved header Bcc per person",
        wrapping(reserved_bcc_header),
        {"reserved_headers"},
        r"reserved header 'Bcc'",
    ),
    _m(
        "A's address in a header of B's",
        wrapping(header_with_other_users_address),
        {"values_match"},
        r"shows the address of another recipient",
    ),
    _m(
        "A's address in the shared content",
        wrapping(address_in_shared_content),
        {"audience_addresses_shared"},
        r"parts every recipient sees|" + SHARED,
    ),
    _m(
        "display name holding an address",
        wrapping(display_name_hides_address),
        {"to_entry_problems"},
        r"'to' is not exactly one \{email\}",
    ),
    _m(
        "A's name in B's own subject",
        wrapping(personal_subject_with_other_users_name),
        {"extra_fields"},
        r"personalization \d+ has 1 field\(s\) the freeze never writes",
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "leftover {{ }} marker in content",
        wrapping(leftover_jinja_marker),
        {"leftover_markers"},
        r"template marker left|" + SHARED,
    ),
    _m(
        "unresolved %%tag%% in subject",
        wrapping(unresolved_tag),
        {"unresolved_tags"},
        r"substitution tag\(s\) of the content unfilled|" + SHARED,
    ),
    _m(
        "recipient not in the audience",
        wrapping(recipient_not_in_audience),
        {"in_audience"},
        r"outside its batch",
    ),
    # Shared parts the approved inputs do not give: both layers rebuild every body's shared part
    # from the campaign spec and the locale's rendered content and refuse any difference.
    _m(
        "X-SMTPAPI fan-out header",
        wrapping(smtpapi_fan_out),
        {"audience_addresses_shared", "shared_matches"},
        SHARED,
    ),
    _m(
        "read receipts to an outsider",
        wrapping(read_receipt_to_outsider),
        {"shared_matches"},
        SHARED,
    ),
    _m(
        "reply_to an outsider",
        wrapping(reply_to_outsider),
        {"shared_matches"},
        SHARED,
    ),
    _m(
        "template_id replaces the content",
        wrapping(template_replaces_content),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "asm unsubscribe group",
        wrapping(unsubscribe_group),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "CSV of the addresses attached",
        wrapping(attachment_of_addresses),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "subject rendered for the first",
        wrapping(subject_rendered_for_the_first),
        {"shared_matches"},
        r"differs in subject",
    ),
    _m(
        "A's unsubscribe link in shared HTML",
        wrapping(literal_unsubscribe_link_in_html),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "fullwidth ＠ address in shared HTML",
        wrapping(fullwidth_at_address_in_html),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "'user (at) x (dot) com' in text",
        wrapping(spelled_out_address_in_text),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "address split by markup in HTML",
        wrapping(address_split_by_markup),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "a recipient as the sender's name",
        wrapping(sender_name_with_a_recipient),
        {"audience_addresses_shared", "shared_matches"},
        r"differs in from",
    ),
    _m(
        "a recipient as a category",
        wrapping(category_with_a_recipient),
        {"audience_addresses_shared", "shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "a recipient in custom_args",
        wrapping(custom_args_with_a_recipient),
        {"audience_addresses_shared", "shared_matches"},
        r"differs in custom_args",
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "a recipient in the footer setting",
        wrapping(footer_setting_with_a_recipient),
        {"audience_addresses_shared", "shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "a third content part",
        wrapping(extra_content_part),
        {"audience_addresses_shared", "shared_matches"},
        r"differs in content",
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "scheduled send_at",
        wrapping(scheduled_send),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "custom_args in a personalization",
        wrapping(personal_custom_args),
        {"extra_fields"},
        NEVER_WRITTEN,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "send_at in a personalization",
        wrapping(personal_send_at),
        {"extra_fields"},
        NEVER_WRITTEN,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "A's first name as B's display name",
        wrapping(display_name_with_another_first_name),
        {"to_entry_problems"},
        r"'to' is not exactly one \{email\}",
    ),
    # A recipient's name or an audience address, disguised.
    _m(
        "B's address spelled out as A's name",
        wrapping(spelled_out_address_as_display_name),
        {"to_entry_problems"},
        r"'to' is not exactly one \{email\}",
    ),
    _m(
        "B's address with ＠ as A's name",
        wrapping(fullwidth_at_display_name),
        {"to_entry_problems"},
        r"'to' is not exactly one \{email\}",
    ),
    _m(
        "own first name as display name",
        wrapping(own_first_name_as_display_name),
        {"to_entry_problems"},
        r"'to' is not exactly one \{email\}",
    ),
    _m(
        "address with a soft hyphen in HTML",
        wrapping(soft_hyphen_address_in_html),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "address with a zero-width space",
        wrapping(zero_width_address_in_text),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "address with &#64; in HTML",
        wrapping(entity_at_address_in_html),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "address as &#x..; references in HTML",
        wrapping(entity_encoded_address_in_html),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "IDN address in its other form",
        idn_address_in_its_other_form,
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "'a&b@x': A's and B's local parts",
        wrapping(ampersand_joined_local_parts),
        {"in_audience"},
        r"outside its batch",
    ),
    _m(
        "text rendered for the first",
        wrapping(text_rendered_for_the_first),
        {"shared_matches"},
        r"differs in content",
    ),
    _m(
        "A's HTML unsubscribe link only",
        wrapping(other_users_html_unsubscribe_only),
        {"values_match"},
        r"the HTML unsubscribe link is not its own link",
    ),
    # Fields the freeze never writes.
    _m(
        "ip_pool_name after a recipient",
        wrapping(ip_pool_named_after_a_recipient),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "tracking footer with a recipient",
        wrapping(tracking_footer_with_a_recipient),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m("batch_id", wrapping(batch_id_set), {"shared_matches"}, SHARED, smtp_note=SMTP_DROPS),
    _m(
        "send_each_at list",
        wrapping(send_each_at_list),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "reply_to_list of the recipients",
        wrapping(reply_to_list_of_recipients),
        {"shared_matches"},
        SHARED,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "A as B's personal from",
        wrapping(personal_from_another_user),
        {"extra_fields"},
        NEVER_WRITTEN,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "A's name in B's template data",
        wrapping(personal_template_data),
        {"extra_fields"},
        NEVER_WRITTEN,
        smtp_note=SMTP_DROPS,
    ),
    _m(
        "X-SMTPAPI in a personal header",
        wrapping(smtpapi_header_in_a_personalization),
        {"values_match"},
        r"shows the address of another recipient|not its recipient's own",
    ),
    # Bytes json.dumps never writes, from a broken serialiser: the manifest digests them as they
    # are, so only a strict reading of the bytes can refuse them.
    _m(
        "'personalizations' twice",
        unchanged,
        {"shared_matches"},
        r"repeats a key",
        rewrite=personalizations_twice,
    ),
    _m(
        "'personalizations' twice, \\u-escaped",
        unchanged,
        {"shared_matches"},
        r"repeats a key",
        rewrite=personalizations_twice_escaped,
    ),
    _m(
        "'email' twice in a 'to'",
        unchanged,
        {"shared_matches"},
        r"repeats a key",
        rewrite=email_twice,
    ),
    _m(
        "a second object after the body",
        unchanged,
        {"shared_matches"},
        r"not one JSON value",
        rewrite=trailing_second_object,
    ),
    _m(
        "a byte order mark",
        unchanged,
        {"shared_matches"},
        r"not one JSON value",
        rewrite=byte_order_mark,
    ),
    _m(
        "a Latin-1 byte (not UTF-8)",
        unchanged,
        {"shared_matches"},
        r"not UTF-8",
        rewrite=latin1_byte_in_subject,
    ),
    # Edited after the freeze, the manifest's digests recomputed to cover the edit.
    _m(
        "swapped between requests, rehashed",
        None,
        {"staged_matches"},
        r"not the approved",
        after_freeze=swapped_between_requests,
    ),
]
BY_NAME = {m.name: m for m in MUTANTS}
LAYERS = ("gate", "guard-sendgrid", "guard-smtp")


# --- one prepared run, copied per (mutant, layer) ---------------------------------------------
@dataclass(frozen=True)
class Prepared:
    run: Run
    paths: ProjectPaths
    baseline: dict[str, bytes]  # batch id -> the clean frozen bytes


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    root = tmp_path_factory.mktemp("mutants")
    audience = generate(root / "users.sqlite", users=600)
    paths = ProjectPaths.under(INCLUDE)
    # One shard: requests leave in manifest order, so "before the first request" is well-defined.
    run = built_run(
        paths,
        users_url=audience.url(),
        staging_root=root / "staging",
        run_id="manual__mutants",
        shard_count=1,
        secret=SECRET,
    )
    clean_run = copy_run(run, root / "baseline")
    outbox = Outbox(f"sqlite:///{root / 'baseline.sqlite'}")
    try:
        pipeline.freeze_batches(clean_run, outbox=outbox)
        # The unmutated run passes: the mutants are the cause.
        pipeline.check_envelopes(clean_run, paths, secret=SECRET, outbox=outbox)
    finally:
        outbox.dispose()
    manifest = load_manifest(clean_run.staging.manifest)
    assert len(manifest.batches) >= 2, "the mutants need at least two requests"
    baseline = {
        b.batch_id: (clean_run.staging.batches_dir / b.file).read_bytes() for b in manifest.batches
    }
    return Prepared(run, paths, baseline)


def copy_run(run: Run, dest: Path) -> Run:
    shutil.copytree(run.staging.root, dest)
    return Run(run.campaign, run.run_id, RunStaging(dest), run.shard_count, run.dry_run)


@dataclass
class Frozen:
    run: Run
    outbox: Outbox
    summary: dict[str, Any]
    first_mutated: int | None  # position of the first request that differs from the clean one


def freeze_mutant(prepared: Prepared, mutant: Mutant | None, where: Path) -> Frozen:
    """A fresh copy of the prepared run frozen with ``mutant`` (None: as the freeze is)."""
    run = copy_run(prepared.run, where / "run")
    outbox = Outbox(f"sqlite:///{where / 'outbox.sqlite'}")
    builder = mutant.builder(run) if mutant and mutant.builder else None
    with pytest.MonkeyPatch.context() as patch:
        if mutant and mutant.rewrite:
            patch.setattr(batches, "serialise", _serialiser(mutant.rewrite))
        summary = pipeline.freeze_batches(run, outbox=outbox, build_body=builder)
    if mutant and mutant.after_freeze:
        mutant.after_freeze(run)
    manifest = load_manifest(run.staging.manifest)
    first_mutated = next(
        (
            i
            for i, b in enumerate(manifest.batches)
            if prepared.baseline.get(b.batch_id) != (run.staging.batches_dir / b.file).read_bytes()
        ),
        None,
    )
    return Frozen(run, outbox, summary, first_mutated)


def _serialiser(rewrite: Callable[[bytes], bytes]) -> Callable[[Body], bytes]:
    """The freeze's serialiser, broken by ``rewrite``."""

    def broken(body: Body) -> bytes:
        return rewrite(serialise(body))

    return broken


def send_everything(frozen: Frozen, new_transport: Callable[[], Transport]) -> None:
    """What the DAG does after approval: every shard's guard pass, then every shard's send,
    each shard through a transport of its own."""
    shards = frozen.summary["shards"]
    for shard in shards:
        pipeline.guard_shard(
            frozen.run,
            manifest_sha256=frozen.summary["manifest_sha256"],
            outbox=frozen.outbox,
            shard=shard,
            shard_count=len(shards),
        )
    for shard in shards:
        pipeline.send_shard(
            frozen.run,
            shard=shard,
            manifest_sha256=frozen.summary["manifest_sha256"],
            transport=new_transport(),
            outbox=frozen.outbox,
            shard_count=len(shards),
        )


# --- the servers: what reached each -----------------------------------------------------------
@dataclass
class SmtpSink:
    """An SMTP server's handler (aiosmtpd): takes every message and counts what reached it."""

    transactions: int = 0  # MAIL FROM commands
    recipients: list[str] = field(default_factory=list)  # accepted RCPT TO, lower-cased
    messages: int = 0
    bytes: int = 0  # the DATA of every message

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.transactions += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.recipients.append(address.lower())
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        self.bytes += len(envelope.original_content or b"")
        return "250 Message accepted"


@dataclass(frozen=True)
class SmtpServer:
    sink: SmtpSink
    port: int


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpServer(sink, port)
    finally:
        controller.stop()


def sendgrid_transport(server: SendGridDevServer) -> Callable[[], Transport]:
    return lambda: SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=10))


def smtp_transport(server: SmtpServer) -> Callable[[], Transport]:
    settings = SmtpSettings(
        "127.0.0.1",
        port=server.port,
        security="none",
        timeout_seconds=10.0,
        local_hostname="mailroom.test",
    )
    return lambda: SmtpTransport(settings)


@dataclass(frozen=True)
class Reached:
    """What reached a server: requests (SendGrid) or messages (SMTP), and their bytes (the
    request bodies the dev server recorded; the DATA the SMTP server received)."""

    count: int
    unit: str
    bytes: int


def at_sendgrid(server: SendGridDevServer) -> Reached:
    size = sum(len(serialise(record["body"])) for record in server.accepted())
    return Reached(server.stats().received, "req", size)


def at_smtp(server: SmtpServer) -> Reached:
    return Reached(server.sink.messages, "msg", server.sink.bytes)


# --- outcomes and the table -------------------------------------------------------------------
@dataclass
class Outcome:
    caught: bool
    reached: Reached
    reason: str


RESULTS: dict[tuple[str, str], Outcome] = {}


def render_table() -> list[str]:
    """One row per (mutant, layer) that ran, from the recorded outcomes; under a gate row, the
    gate's known gap that lets the mutant through; under a guard-smtp row, what shape the leak
    would take through SMTP when that is not its shape through SendGrid."""
    width = max(len(m.name) for m in MUTANTS)
    layer_width = max(len(layer) for layer in LAYERS)
    head = (
        f"{'mutant':<{width}}  {'layer':<{layer_width}}  {'result':<7}  "
        f"{'reached':>7}  {'bytes':>7}  reason"
    )
    lines = [head, "-" * len(head)]
    for mutant in MUTANTS:
        for layer in LAYERS:
            outcome = RESULTS.get((mutant.name, layer))
            if outcome is None:
                continue
            result = "caught" if outcome.caught else "MISSED"
            reached = f"{outcome.reached.count} {outcome.reached.unit}"
            lines.append(
                f"{mutant.name:<{width}}  {layer:<{layer_width}}  {result:<7}  "
                f"{reached:>7}  {outcome.reached.bytes:>7}  {outcome.reason[:72]}"
            )
            note = mutant.smtp_note if layer == "guard-smtp" else ""
            if note:
                lines.append(f"{'':<{width + layer_width + 30}}  ({note})")
    return lines


@pytest.fixture(scope="module", autouse=True)
def mutant_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: the table, written past output capturing (as ``capsys.disabled()``)."""
    yield
    if not RESULTS:
        return
    lines = render_table()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is None:  # e.g. on an xdist worker
            print("\n".join(lines))
            return
        reporter.write("\n")
        reporter.write_sep(
            "=", "invariant 1: mutant x layer (reached = requests or messages at the server)"
        )
        for line in lines:
            reporter.write_line(line)


def _gate_failures(run: Run) -> list[str]:
    result = read_json(run.staging.gate_result)
    return [
        c.get("column") or c["expectation"]
        for part in ("personalization_checks", "request_checks")
        for c in result[part]["checks"]
        if not c["success"]
    ]


# --- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["sendgrid", "smtp"])
def test_the_clean_run_reaches_every_recipient_once(
    transport: str,
    prepared: Prepared,
    tmp_path: Path,
    dev_server: SendGridDevServer,
    smtp_server: SmtpServer,
) -> None:
    """The control: unmutated, the same run does reach each server, whole, so the zeros in the
    table are the layers' doing."""
    frozen = freeze_mutant(prepared, None, tmp_path)
    assert frozen.first_mutated is None
    try:
        if transport == "sendgrid":
            send_everything(frozen, sendgrid_transport(dev_server))
            reached = accepted_recipients(dev_server.accepted())
        else:
            send_everything(frozen, smtp_transport(smtp_server))
            reached = smtp_server.sink.recipients
            assert smtp_server.sink.messages == len(reached)
        staged = frozen.outbox.counts(frozen.run.run_key)
    finally:
        frozen.outbox.dispose()
    recipients = sum(b.recipients for b in load_manifest(frozen.run.staging.manifest).batches)
    assert len(reached) == len({r.lower() for r in reached}) == recipients
    assert staged["sent"]["recipients"] == recipients


def _cases() -> Iterator[Any]:
    for mutant in MUTANTS:
        for layer in LAYERS:
            yield pytest.param(mutant.name, layer, id=f"{layer}-{mutant.name}")


@pytest.mark.parametrize(("name", "layer"), list(_cases()))
def test_each_layer_alone_stops_the_mutant(
    name: str,
    layer: str,
    prepared: Prepared,
    tmp_path: Path,
    dev_server: SendGridDevServer,
    request: pytest.FixtureRequest,
) -> None:
    mutant = BY_NAME[name]
    smtp = request.getfixturevalue("smtp_server") if layer == "guard-smtp" else None
    frozen = freeze_mutant(prepared, mutant, tmp_path)
    try:
        _check_layer(mutant, layer, frozen, prepared, dev_server, smtp)
    finally:
        frozen.outbox.dispose()


def _check_layer(
    mutant: Mutant,
    layer: str,
    frozen: Frozen,
    prepared: Prepared,
    dev_server: SendGridDevServer,
    smtp: SmtpServer | None,
) -> None:
    # The mutant really changed what would leave, where it says it does.
    assert frozen.first_mutated is not None, "the mutant changed no request"
    assert (frozen.first_mutated > 0) == mutant.first_request_clean

    if layer == "gate":
        caught, reason = _through_the_gate(frozen, prepared.paths, dev_server)
        reached = at_sendgrid(dev_server)
    elif smtp is None:
        caught, reason = _through_the_guard(frozen, sendgrid_transport(dev_server))
        reached = at_sendgrid(dev_server)
    else:
        caught, reason = _through_the_guard(frozen, smtp_transport(smtp))
        reached = at_smtp(smtp)
    RESULTS[(mutant.name, layer)] = Outcome(caught, reached, reason)

    assert caught, f"{layer} let the mutant through: {reason}"
    if layer == "gate":
        assert set(reason.split(", ")) & mutant.gate_reasons, reason
    else:
        assert re.search(mutant.guard_reason, reason), reason
    # Nothing at all reached a server, even where the mutation is in a later request.
    assert (reached.count, reached.bytes) == (0, 0)
    assert dev_server.stats().received == 0
    assert dev_server.accepted() == []
    if smtp is not None:
        assert smtp.sink.transactions == 0  # not even a MAIL FROM
        assert smtp.sink.recipients == []


def _through_the_gate(
    frozen: Frozen, paths: ProjectPaths, server: SendGridDevServer
) -> tuple[bool, str]:
    try:
        pipeline.check_envelopes(frozen.run, paths, secret=SECRET, outbox=frozen.outbox)
    except ValidationFailed:
        return True, ", ".join(_gate_failures(frozen.run))
    # Approval would now be asked for and the run would send: see what would have left.
    try:
        send_everything(frozen, sendgrid_transport(server))
    except MailroomError as exc:
        return False, f"gate passed; then {type(exc).__name__}: {mask_addresses(str(exc))}"
    return False, "gate passed; everything was sent"


def _through_the_guard(frozen: Frozen, new_transport: Callable[[], Transport]) -> tuple[bool, str]:
    try:
        send_everything(frozen, new_transport)
    except EnvelopeViolation as exc:
        return True, mask_addresses(str(exc))
    except MailroomError as exc:
        return False, f"{type(exc).__name__}: {mask_addresses(str(exc))}"
    return False, "sent"
