"""Invariant 1, tried for real: mutant body builders against each layer on its own.

Every mutant breaks the one-recipient-per-envelope rule in one way. Each is frozen into a fresh
copy of one prepared run and then meets one layer alone:

* ``gate``: the pipeline as deployed: the data-quality gate runs on the frozen batches and must
  raise ``ValidationFailed`` (so approval is never reached); had it passed, the run would go on
  to send, so the dev server's request count shows what would have left.
* ``guard``: the gate is skipped; the run is sent as the DAG sends it after approval (the guard's
  pass over every request, then the shards, through the real ``SendGridTransport`` to the
  SendGrid-compatible dev server), and the envelope guard must refuse the exact bytes
  (``EnvelopeViolation``) before the first request of the run leaves, wherever the mutated
  request is.

The outcome of every (mutant, layer) pair is recorded as it happened and printed as a table at
the end of the module (through the terminal reporter, so the CI log shows it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailroom import pipeline
from mailroom.addresses import mask_addresses
from mailroom.audience.sample import generate
from mailroom.batches import (
    BodyBuilder,
    Envelope,
    iter_envelopes_by_locale,
    load_manifest,
    personalization,
    sendgrid_request_body,
)
from mailroom.campaign_spec import CampaignSpec
from mailroom.content import LocaleContent
from mailroom.delivery.outbox import Outbox
from mailroom.delivery.transports.sendgrid import SendGridSettings, SendGridTransport
from mailroom.errors import EnvelopeViolation, MailroomError, ValidationFailed
from mailroom.pipeline import ProjectPaths, Run
from mailroom.staging import RunStaging, read_json
from mailroom.substitutions import substitution_tag
from sendgrid_dev import SendGridDevServer
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


def display_name_with_another_first_name(body: Body, _content: LocaleContent) -> None:
    """No address at all: user A's first name as user B's display name."""
    parts = body["personalizations"]
    parts[1]["to"][0]["name"] = parts[0]["substitutions"][FIRST_NAME]


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
    # The first request is left clean: only the guard's pass over the whole run, not the check
    # of each request as it leaves, can stop this mutant before anything is sent.
    first_request_clean: bool = False


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
MUTANTS = [
    _m(
        "2019 change: batch in one 'to'",
        wrapping(everyone_in_one_to),
        {"n_to"},
        r"recipients in 'to', not 1",
    ),
    _m(
        "SDK default Mail(to_emails=[...])",
        sdk_default,
        {"n_to"},
        r"recipients in 'to', not 1|" + SHARED,
    ),
    _m("cc of another user", wrapping(cc_other_user), {"n_cc"}, r"has \['cc'\]"),
    _m("bcc of another user", wrapping(bcc_other_user), {"n_bcc"}, r"has \['bcc'\]"),
    _m(
        "top-level bcc", wrapping(top_level_bcc), {"top_level_cc_bcc"}, r"top-level 'bcc'|" + SHARED
    ),
    _m(
        "mail_settings.bcc copy",
        wrapping(mail_settings_bcc),
        {"top_level_cc_bcc"},
        r"'bcc' mail setting|" + SHARED,
    ),
    _m(
        "same address twice in a request",
        wrapping(same_address_twice_in_request),
        {"email_key"},
        r"appears twice in the request",
    ),
    _m(
        "same address in two requests (1st)",
        address_in_two_requests_first,
        {"email_key"},
        r"outside its batch",
    ),
    _m(
        "same address in two requests (2nd)",
        address_in_two_requests,
        {"email_key"},
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
    ),
    _m(
        "asm unsubscribe group",
        wrapping(unsubscribe_group),
        {"shared_matches"},
        SHARED,
    ),
    _m(
        "CSV of the addresses attached",
        wrapping(attachment_of_addresses),
        {"shared_matches"},
        SHARED,
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
    ),
    _m(
        "a recipient in custom_args",
        wrapping(custom_args_with_a_recipient),
        {"audience_addresses_shared", "shared_matches"},
        r"differs in custom_args",
    ),
    _m(
        "a recipient in the footer setting",
        wrapping(footer_setting_with_a_recipient),
        {"audience_addresses_shared", "shared_matches"},
        SHARED,
    ),
    _m(
        "a third content part",
        wrapping(extra_content_part),
        {"audience_addresses_shared", "shared_matches"},
        r"differs in content",
    ),
    _m("scheduled send_at", wrapping(scheduled_send), {"shared_matches"}, SHARED),
    _m(
        "custom_args in a personalization",
        wrapping(personal_custom_args),
        {"extra_fields"},
        NEVER_WRITTEN,
    ),
    _m("send_at in a personalization", wrapping(personal_send_at), {"extra_fields"}, NEVER_WRITTEN),
    _m(
        "A's first name as B's display name",
        wrapping(display_name_with_another_first_name),
        {"to_entry_problems"},
        r"'to' is not exactly one \{email\}",
    ),
]
BY_NAME = {m.name: m for m in MUTANTS}
LAYERS = ("gate", "guard")


# --- one prepared run, copied per (mutant, layer) ---------------------------------------------
@dataclass(frozen=True)
class Prepared:
    run: Run
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
    pipeline.freeze_batches(clean_run, outbox=Outbox(f"sqlite:///{root / 'baseline.sqlite'}"))
    # The unmutated run passes: the mutants are the cause.
    pipeline.check_envelopes(clean_run, secret=SECRET)
    manifest = load_manifest(clean_run.staging.manifest)
    assert len(manifest.batches) >= 2, "the mutants need at least two requests"
    baseline = {
        b.batch_id: (clean_run.staging.batches_dir / b.file).read_bytes() for b in manifest.batches
    }
    return Prepared(run, baseline)


def copy_run(run: Run, dest: Path) -> Run:
    shutil.copytree(run.staging.root, dest)
    return Run(run.campaign, run.run_id, RunStaging(dest), run.shard_count, run.dry_run)


@dataclass
class Frozen:
    run: Run
    outbox: Outbox
    summary: dict[str, Any]
    first_mutated: int | None  # position of the first request that differs from the clean one


def freeze_mutant(prepared: Prepared, mutant: Mutant, where: Path) -> Frozen:
    run = copy_run(prepared.run, where / "run")
    outbox = Outbox(f"sqlite:///{where / 'outbox.sqlite'}")
    builder = mutant.builder(run) if mutant.builder else None
    summary = pipeline.freeze_batches(run, outbox=outbox, build_body=builder)
    if mutant.after_freeze:
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


def send_everything(frozen: Frozen, server: SendGridDevServer) -> None:
    """What the DAG does after approval: every shard's guard pass, then every shard's send."""
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
        transport = SendGridTransport(SendGridSettings("SG.test", server.url, timeout_seconds=10))
        pipeline.send_shard(
            frozen.run,
            shard=shard,
            manifest_sha256=frozen.summary["manifest_sha256"],
            transport=transport,
            outbox=frozen.outbox,
            shard_count=len(frozen.summary["shards"]),
        )


# --- outcomes and the table -------------------------------------------------------------------
@dataclass
class Outcome:
    caught: bool
    received: int
    reason: str


RESULTS: dict[tuple[str, str], Outcome] = {}


def render_table() -> list[str]:
    """One row per (mutant, layer) that ran, from the recorded outcomes."""
    width = max(len(m.name) for m in MUTANTS)
    head = f"{'mutant':<{width}}  {'layer':<5}  {'result':<7}  {'requests':>8}  reason"
    lines = [head, "-" * len(head)]
    for mutant in MUTANTS:
        for layer in LAYERS:
            outcome = RESULTS.get((mutant.name, layer))
            if outcome is None:
                continue
            result = "caught" if outcome.caught else "MISSED"
            lines.append(
                f"{mutant.name:<{width}}  {layer:<5}  {result:<7}  "
                f"{outcome.received:>8}  {outcome.reason[:72]}"
            )
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
        reporter.write_sep("=", "invariant 1: mutant x layer (requests = what reached the server)")
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
def _cases() -> Iterator[Any]:
    for mutant in MUTANTS:
        for layer in LAYERS:
            yield pytest.param(mutant.name, layer, id=f"{layer}-{mutant.name}")


@pytest.mark.parametrize(("name", "layer"), list(_cases()))
def test_each_layer_alone_stops_the_mutant(
    name: str, layer: str, prepared: Prepared, tmp_path: Path, dev_server: SendGridDevServer
) -> None:
    mutant = BY_NAME[name]
    frozen = freeze_mutant(prepared, mutant, tmp_path)
    try:
        _check_layer(mutant, layer, frozen, prepared, dev_server)
    finally:
        frozen.outbox.dispose()


def _check_layer(
    mutant: Mutant, layer: str, frozen: Frozen, prepared: Prepared, dev_server: SendGridDevServer
) -> None:
    # The mutant really changed what would leave, where it says it does.
    assert frozen.first_mutated is not None, "the mutant changed no request"
    assert (frozen.first_mutated > 0) == mutant.first_request_clean

    if layer == "gate":
        caught, reason = _through_the_gate(frozen, dev_server)
    else:
        caught, reason = _through_the_guard(frozen, dev_server)
    received = dev_server.stats().received
    RESULTS[(mutant.name, layer)] = Outcome(caught, received, reason)

    assert caught, f"{layer} let the mutant through: {reason}"
    if layer == "gate":
        assert set(reason.split(", ")) & mutant.gate_reasons, reason
    else:
        assert re.search(mutant.guard_reason, reason), reason
    # Nothing at all reached the server, even where the mutation is in a later request.
    assert received == 0
    assert dev_server.accepted() == []


def _through_the_gate(frozen: Frozen, server: SendGridDevServer) -> tuple[bool, str]:
    try:
        pipeline.check_envelopes(frozen.run, secret=SECRET)
    except ValidationFailed:
        return True, ", ".join(_gate_failures(frozen.run))
    # Approval would now be asked for and the run would send: see what would have left.
    try:
        send_everything(frozen, server)
    except MailroomError as exc:
        return False, f"gate passed; then {type(exc).__name__}: {mask_addresses(str(exc))}"
    return False, "gate passed; everything was sent"


def _through_the_guard(frozen: Frozen, server: SendGridDevServer) -> tuple[bool, str]:
    try:
        send_everything(frozen, server)
    except EnvelopeViolation as exc:
        return True, mask_addresses(str(exc))
    except MailroomError as exc:
        return False, f"{type(exc).__name__}: {mask_addresses(str(exc))}"
    return False, "sent"
