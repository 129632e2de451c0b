"""SendGrid's Mail Send limits are written once, in ``mailroom.checks.limits``, and every part that
enforces them reads them from there (the dev server's agreement with SendGrid's published
document is in test_sendgrid_openapi.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from mailroom.campaign_spec import parse_campaign
from mailroom.checks import limits
from mailroom.checks.envelope_guard import recipients_of_body
from mailroom.errors import CampaignSpecError, EnvelopeViolation

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LIMITS = REPO / "src" / "mailroom" / "checks" / "limits.py"
CAMPAIGNS = REPO / "include" / "campaigns"
# The names the limits had before they were written once; none may come back.
FORMER_NAMES = {"MAX_BODY_BYTES", "MAX_TOTAL_RECIPIENTS", "SENDGRID_MAX_PERSONALIZATIONS"}


def _limit_names() -> set[str]:
    tree = ast.parse(LIMITS.read_text("utf-8"))
    return {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def test_no_module_defines_a_limit_of_its_own() -> None:
    names = _limit_names() | FORMER_NAMES
    assert {"MAX_PERSONALIZATIONS", "MAX_RECIPIENTS", "MAX_REQUEST_BYTES"} <= names
    defined_elsewhere = []
    for folder in ("src", "bench", "dags", "plugins"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == LIMITS:
                continue
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, ast.AnnAssign):
                    targets = [node.target]
                defined_elsewhere += [
                    f"{path.relative_to(REPO)}:{node.lineno} {target.id}"
                    for target in targets
                    if isinstance(target, ast.Name) and target.id in names
                ]
    assert defined_elsewhere == []


def test_the_guard_refuses_a_request_of_the_size_limit_and_reads_one_a_byte_smaller() -> None:
    with pytest.raises(EnvelopeViolation, match=f"less than {limits.MAX_REQUEST_BYTES}"):
        recipients_of_body(b" " * limits.MAX_REQUEST_BYTES)
    one_byte_smaller = b"[" + b" " * (limits.MAX_REQUEST_BYTES - 3) + b"]"
    # Past the size check: refused for what it is, not for its size.
    with pytest.raises(EnvelopeViolation, match="not a JSON object"):
        recipients_of_body(one_byte_smaller)


def test_a_campaign_batch_is_at_most_one_request_of_personalizations() -> None:
    raw = yaml.safe_load((CAMPAIGNS / "winter_update.yaml").read_text("utf-8"))
    raw.pop("batch_size", None)

    assert parse_campaign(raw, source="x.yaml").batch_size == limits.MAX_PERSONALIZATIONS
    with pytest.raises(CampaignSpecError, match=f"1..{limits.MAX_PERSONALIZATIONS}"):
        parse_campaign({**raw, "batch_size": limits.MAX_PERSONALIZATIONS + 1}, source="x.yaml")


def test_the_gate_refuses_a_batch_of_the_size_limit_as_the_guard_does() -> None:
    import pandas as pd

    from mailroom.checks.quality_gate import rules
    from mailroom.gx_runtime import validate_frame

    size_rule = [e for e in rules.for_batches() if getattr(e, "column", None) == "size"]
    assert len(size_rule) == 1
    sizes = [limits.MAX_REQUEST_BYTES - 1, limits.MAX_REQUEST_BYTES]
    result = validate_frame(
        pd.DataFrame({"size": sizes}), suite_name="size_limit", expectations=size_rule
    )
    assert result.results[0].result["unexpected_count"] == 1
