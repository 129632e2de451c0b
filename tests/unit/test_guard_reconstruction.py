"""The envelope guard rebuilds each body's shared part from the approved inputs and parses the
bytes strictly: what the mutant suite cannot express as a body builder (bytes no ``dict`` can
serialise to) and what it takes for granted (a legitimate body passes)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from mailroom.batches import (
    batch_custom_args,
    sendgrid_request_body,
    serialise,
    shared_part,
)
from mailroom.campaign_spec import CampaignSpec, load_campaign
from mailroom.checks.envelope_guard import ApprovedManifest, check_envelope
from mailroom.content import LocaleContent, render_content
from mailroom.envelopes import envelope_values
from mailroom.errors import EnvelopeViolation

pytestmark = pytest.mark.unit

INCLUDE = Path(__file__).resolve().parents[2] / "include"
SECRET = b"guard-reconstruction"
RUN_ID = "manual__guard"
BATCH_ID = "en-00001"


@pytest.fixture(scope="module")
def spec() -> CampaignSpec:
    return load_campaign(INCLUDE / "campaigns", "winter_update")


@pytest.fixture(scope="module")
def contents(spec: CampaignSpec) -> dict[str, LocaleContent]:
    return render_content(spec, INCLUDE / "templates", INCLUDE / "translations")


def _body(spec: CampaignSpec, content: LocaleContent) -> dict[str, Any]:
    envelopes = []
    for i in range(3):
        row: dict[str, Any] = {"user_id": f"u{i}", "email": f"person{i}@example.com"}
        row.update({field: f"Name{i}" for field in spec.fields})
        subs, headers = envelope_values(spec, SECRET, row)
        envelopes.append({"email": row["email"], "substitutions": subs, "headers": headers})
    return sendgrid_request_body(
        spec, content, envelopes, batch_custom_args(spec, RUN_ID, BATCH_ID)
    )


def _approve(data: bytes, shared: dict[str, Any]) -> ApprovedManifest:
    digest = hashlib.sha256(data).hexdigest()
    return ApprovedManifest("m" * 64, frozenset({digest}), {digest: shared})


def test_a_body_the_freeze_writes_passes(
    spec: CampaignSpec, contents: dict[str, LocaleContent]
) -> None:
    data = serialise(_body(spec, contents["en"]))
    expected = shared_part(spec, contents["en"], RUN_ID, BATCH_ID)
    assert check_envelope(data, _approve(data, expected)).recipients == (
        "person0@example.com",
        "person1@example.com",
        "person2@example.com",
    )


def test_the_shared_part_is_compared_with_the_inputs_not_with_the_body(
    spec: CampaignSpec, contents: dict[str, LocaleContent]
) -> None:
    """The same clean body, held against another locale's content or another batch's custom
    args: what the approved inputs give decides, whatever the body says of itself."""
    data = serialise(_body(spec, contents["en"]))
    for other in (
        shared_part(spec, contents["de"], RUN_ID, BATCH_ID),
        shared_part(spec, contents["en"], RUN_ID, "en-00002"),
    ):
        with pytest.raises(EnvelopeViolation, match="not what the approved spec and content"):
            check_envelope(data, _approve(data, other))


def test_a_body_without_a_reconstruction_is_refused(
    spec: CampaignSpec, contents: dict[str, LocaleContent]
) -> None:
    data = serialise(_body(spec, contents["en"]))
    approved = ApprovedManifest("m" * 64, frozenset({hashlib.sha256(data).hexdigest()}), {})
    with pytest.raises(EnvelopeViolation, match="no reconstruction"):
        check_envelope(data, approved)


def _variants(clean: bytes) -> dict[str, bytes]:
    """Bytes a parser might read two ways, or not as the UTF-8 JSON the freeze writes."""
    text = clean.decode("utf-8")
    return {
        # Parsers disagree about which copy of a repeated key wins.
        "repeated personalizations": clean[:-1]
        + b',"personalizations":[{"to":[{"email":"outsider@evil.example"}]}]}',
        "repeated email": text.replace(
            '"to":[{"email":"person0@example.com"}]',
            '"to":[{"email":"person0@example.com","email":"person1@example.com"}]',
            1,
        ).encode("utf-8"),
        "utf-16": text.encode("utf-16"),
        "latin-1 byte": clean.replace(b'"subject":"', b'"subject":"\xe9', 1),
        "trailing data": clean + b'{"personalizations":[]}',
    }


@pytest.mark.parametrize(
    ("variant", "refusal"),
    [
        ("repeated personalizations", "repeats a key"),
        ("repeated email", "repeats a key"),
        ("utf-16", "not UTF-8"),
        ("latin-1 byte", "not UTF-8"),
        ("trailing data", "not one JSON value"),
    ],
)
def test_bytes_that_parse_two_ways_are_refused(
    spec: CampaignSpec, contents: dict[str, LocaleContent], variant: str, refusal: str
) -> None:
    body = _body(spec, contents["en"])
    expected = shared_part(spec, contents["en"], RUN_ID, BATCH_ID)
    data = _variants(serialise(body))[variant]
    assert data != serialise(body)
    # Approved byte for byte, with the right reconstruction: only the parse can refuse it.
    with pytest.raises(EnvelopeViolation, match=refusal):
        check_envelope(data, _approve(data, expected))
