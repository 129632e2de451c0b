"""check_envelopes: the data-quality gate on the frozen payloads themselves.

It reads back the exact request bodies from the staging area, explodes them to one row per
personalization and one row per request, and validates both with Great Expectations. It knows
nothing of how the bodies were built: expected values are recomputed from the validated audience,
so a broken payload builder cannot vouch for itself.
"""

from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pandas as pd

from mailroom.addresses import SINGLE_ADDRESS_PATTERN
from mailroom.campaign_spec import CampaignSpec
from mailroom.envelope_guard import (
    MAX_BODY_BYTES,
    MAX_PERSONALIZATIONS,
    MAX_RECIPIENTS,
    RESERVED_HEADERS,
)
from mailroom.envelopes import envelope_values
from mailroom.gx_runtime import summarise, validate_frame
from mailroom.payloads import load_manifest, sha256_hex
from mailroom.substitutions import LEFTOVER_MARKER, TAG_PATTERN

log = logging.getLogger(__name__)

# Anything shaped like an address in lower-cased text; matched against the audience.
_ADDRESS_LIKE = re.compile(r"[a-z0-9._%+'-]{1,64}@[a-z0-9-]+(?:\.[a-z0-9-]+)+")
_NAME_HIDING_AN_ADDRESS = re.compile(r"[\r\n,;<>@]")


@dataclass(frozen=True)
class GateResult:
    success: bool
    personalizations: int
    requests: int
    personalization_checks: dict[str, Any]
    request_checks: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def failures(self) -> list[str]:
        out = []
        for part in (self.personalization_checks, self.request_checks):
            for check in part["checks"]:
                if not check["success"]:
                    column = f"({check['column']})" if check.get("column") else ""
                    out.append(
                        f"{check['expectation']}{column}: {check['unexpected_count']} unexpected"
                    )
        return out


def explode_payloads(
    spec: CampaignSpec, *, manifest_path: Path, valid_audience: Path, secret: bytes
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per personalization and one row per request, read from the frozen bytes."""
    manifest = load_manifest(manifest_path)
    expected = _expected_by_address(spec, valid_audience, secret)
    people: dict[str, list[Any]] = {
        k: []
        for k in (
            "batch_id",
            "n_to",
            "n_cc",
            "n_bcc",
            "email",
            "email_key",
            "in_audience",
            "values_match",
            "reserved_headers",
            "unknown_tags",
            "extra_fields",
            "to_entry_problems",
        )
    }
    requests: dict[str, list[Any]] = {
        k: []
        for k in (
            "batch_id",
            "personalizations",
            "recipients",
            "size",
            "digest_matches",
            "top_level_cc_bcc",
            "top_level_reserved_headers",
            "unresolved_tags",
            "leftover_markers",
            "audience_addresses_shared",
        )
    }
    for entry in manifest.batches:
        data = (manifest_path.parent / entry.file).read_bytes()
        body = json.loads(data)
        parts = body.get("personalizations") or []
        texts = [str(body.get("subject", ""))] + [
            str(c.get("value", "")) for c in body.get("content") or []
        ]
        tags_used = set().union(*(set(m.group(0) for m in TAG_PATTERN.finditer(t)) for t in texts))
        leftovers = sum(len(LEFTOVER_MARKER.findall(TAG_PATTERN.sub("", t))) for t in texts)
        unresolved = 0
        recipient_count = 0
        for item in parts:
            to, cc, bcc = (item.get(k) or [] for k in ("to", "cc", "bcc"))
            recipient_count += len(to) + len(cc) + len(bcc)
            email = to[0].get("email") if to and isinstance(to[0], dict) else None
            key = email.lower() if isinstance(email, str) else None
            subs = item.get("substitutions") or {}
            headers = item.get("headers") or {}
            own = expected.get(key) if key else None
            people["batch_id"].append(entry.batch_id)
            people["n_to"].append(len(to))
            people["n_cc"].append(len(cc))
            people["n_bcc"].append(len(bcc))
            people["email"].append(email)
            people["email_key"].append(key)
            people["in_audience"].append(own is not None)
            people["values_match"].append(own is not None and own == _canonical(subs, headers))
            people["reserved_headers"].append(
                sum(1 for h in headers if str(h).lower() in RESERVED_HEADERS)
            )
            people["unknown_tags"].append(len(tags_used - set(subs)))
            people["extra_fields"].append(len(set(item) - {"to", "substitutions", "headers"}))
            people["to_entry_problems"].append(_to_entry_problems(to))
            unresolved += len(tags_used - set(subs))
        requests["batch_id"].append(entry.batch_id)
        requests["personalizations"].append(len(parts))
        requests["recipients"].append(recipient_count)
        requests["size"].append(len(data))
        requests["digest_matches"].append(sha256_hex(data) == entry.sha256)
        mail_settings = body.get("mail_settings")
        requests["top_level_cc_bcc"].append(
            int("cc" in body)
            + int("bcc" in body)
            + int(isinstance(mail_settings, dict) and "bcc" in mail_settings)
        )
        requests["top_level_reserved_headers"].append(
            sum(1 for h in body.get("headers") or {} if str(h).lower() in RESERVED_HEADERS)
        )
        requests["unresolved_tags"].append(unresolved)
        requests["leftover_markers"].append(leftovers)
        shared = {k: v for k, v in body.items() if k != "personalizations"}
        requests["audience_addresses_shared"].append(_audience_addresses_in(shared, expected))
    return pd.DataFrame(people), pd.DataFrame(requests)


def check_envelopes(
    spec: CampaignSpec,
    *,
    manifest_path: Path,
    valid_audience: Path,
    secret: bytes,
    expected_recipients: int,
) -> GateResult:
    """Validate the frozen payloads; unless ``success``, nothing may be sent (``pipeline.gate``
    raises ValidationFailed)."""
    import great_expectations.expectations as gxe

    people, requests = explode_payloads(
        spec, manifest_path=manifest_path, valid_audience=valid_audience, secret=secret
    )
    people_result = validate_frame(
        people,
        suite_name="envelopes",
        expectations=[
            gxe.ExpectTableRowCountToEqual(value=expected_recipients),
            gxe.ExpectColumnValuesToBeBetween(column="n_to", min_value=1, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="n_cc", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="n_bcc", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToNotBeNull(column="email"),
            gxe.ExpectColumnValuesToMatchRegex(column="email", regex=SINGLE_ADDRESS_PATTERN),
            gxe.ExpectColumnValuesToBeUnique(column="email_key"),
            gxe.ExpectColumnValuesToBeInSet(column="in_audience", value_set=[True]),
            gxe.ExpectColumnValuesToBeInSet(column="values_match", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="reserved_headers", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="unknown_tags", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="extra_fields", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="to_entry_problems", min_value=0, max_value=0),
        ],
    )
    request_result = validate_frame(
        requests,
        suite_name="requests",
        expectations=[
            gxe.ExpectColumnValuesToBeBetween(
                column="personalizations", min_value=1, max_value=MAX_PERSONALIZATIONS
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="recipients", min_value=1, max_value=MAX_RECIPIENTS
            ),
            gxe.ExpectColumnValuesToBeBetween(column="size", min_value=1, max_value=MAX_BODY_BYTES),
            gxe.ExpectColumnValuesToBeInSet(column="digest_matches", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="top_level_cc_bcc", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(
                column="top_level_reserved_headers", min_value=0, max_value=0
            ),
            gxe.ExpectColumnValuesToBeBetween(column="unresolved_tags", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(column="leftover_markers", min_value=0, max_value=0),
            gxe.ExpectColumnValuesToBeBetween(
                column="audience_addresses_shared", min_value=0, max_value=0
            ),
        ],
    )
    result = GateResult(
        success=bool(people_result.success and request_result.success),
        personalizations=len(people),
        requests=len(requests),
        personalization_checks=summarise(people_result),
        request_checks=summarise(request_result),
    )
    log.info(
        "check_envelopes: %d personalizations in %d requests, success=%s",
        result.personalizations,
        result.requests,
        result.success,
    )
    return result


def _expected_by_address(spec: CampaignSpec, valid_audience: Path, secret: bytes) -> dict[str, str]:
    audience = pd.read_parquet(valid_audience)
    out: dict[str, str] = {}
    for row in audience.to_dict("records"):
        subs, headers = envelope_values(spec, secret, row)
        out[str(row["email"]).lower()] = _canonical(subs, headers)
    return out


def _canonical(subs: Any, headers: Any) -> str:
    return json.dumps([subs, headers], sort_keys=True, ensure_ascii=False)


def _to_entry_problems(to: list[Any]) -> int:
    """A ``to`` entry is ``{"email"}`` with at most a display name that cannot hide an address."""
    problems = 0
    for entry in to:
        if not isinstance(entry, dict):
            problems += 1
            continue
        problems += len(set(entry) - {"email", "name"})
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or _NAME_HIDING_AN_ADDRESS.search(name)):
            problems += 1
    return problems


def _audience_addresses_in(shared: dict[str, Any], audience: dict[str, str]) -> int:
    """How many audience addresses the parts every recipient sees show (also HTML-escaped or
    %-encoded)."""
    text = json.dumps(shared, ensure_ascii=False).lower()
    found = set()
    for variant in (text, unquote(html.unescape(text)).lower()):
        for match in _ADDRESS_LIKE.finditer(variant):
            for candidate in {match.group(0), match.group(0).lstrip("'.%")}:
                if candidate in audience:
                    found.add(candidate)
    return len(found)
