"""check_envelopes: the data-quality gate on the frozen batches themselves.

It reads back the exact request bodies from the staging area, explodes them to one row per
personalization and one row per batch, and validates both with Great Expectations, whose Data
Docs (counts only: an unexpected value here is an address) it leaves with the run. It knows
nothing of how the bodies were built: expected values are recomputed from the validated audience,
so a broken body builder cannot vouch for itself.

Its memory does not grow with the audience: the bodies are read a group at a time, the
audience a locale's rows at a time alongside them (with any address out of place looked up by
key on disk), the personalization rows are spilled to disk and reach GX ``chunk_rows`` at a
time, and nobody twice, the one rule about the whole run, is worked out over every row first
and reaches GX as a column of each. How the rows are cut never changes the verdict or a count.

The package, in reading order:

* ``rules``: what the gate checks, the expectations every personalization row and every
  batch row must meet (SendGrid's limits from ``mailroom.checks.limits``);
* ``explode``: how those rows are made from the frozen bytes (``bodies`` reads them a group at a
  time; ``regular`` reads the shape Mailroom writes column-wise, ``generic`` any other body;
  ``rows`` holds the columns) and kept until GX reads them;
* ``audience``: the validated audience, who may receive and what each one's envelope must carry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.quality_gate import rules
from mailroom.checks.quality_gate.audience import Audience, audience_tokens
from mailroom.checks.quality_gate.explode import CHUNK_ROWS, explode_batches, explode_run
from mailroom.checks.quality_gate.rows import (
    BATCH_COLUMNS,
    ONCE_IN_RUN,
    PERSONALIZATION_COLUMNS,
    PERSONALIZATION_FRAME_COLUMNS,
)
from mailroom.gx_runtime import Suite, summarise, validate_suites
from mailroom.staging import RunStaging

__all__ = [
    "BATCH_COLUMNS",
    "CHUNK_ROWS",
    "ONCE_IN_RUN",
    "PERSONALIZATION_COLUMNS",
    "PERSONALIZATION_FRAME_COLUMNS",
    "GateResult",
    "check_envelopes",
    "explode_batches",
]

log = logging.getLogger(__name__)


def check_envelopes(
    spec: CampaignSpec,
    *,
    manifest_path: Path,
    valid_audience: Path,
    secret: bytes,
    expected_recipients: int,
    shared: Mapping[str, Mapping[str, Any]],
    staged: Mapping[str, str],
    audience_data: Mapping[str, int],
    data_docs_dir: Path | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> GateResult:
    """Validate the frozen batches; unless ``success``, nothing may be sent
    (``pipeline.check_envelopes`` raises ValidationFailed). ``shared``: each batch's shared part
    as the approved inputs give it, by body digest (``batches.shared_parts``); ``staged``: the
    digest the outbox staged each batch with, by batch id (``staged_matches``); ``audience_data``:
    the audience data each batch's rebuilt shared part shows, by body digest
    (``audience_data_shared``).

    GX's Data Docs for both suites are written to ``data_docs_dir`` (by default the run's
    ``gate/data_docs``, when the manifest is where a run keeps it), whether the gate passes or
    not, before this returns. GX validates the personalization rows ``chunk_rows`` at a time:
    the verdict and every count are the same whatever their number.
    """
    run = RunStaging(manifest_path.parent.parent)
    if data_docs_dir is None and run.manifest == manifest_path:
        data_docs_dir = run.gate_data_docs

    with contextlib.ExitStack() as stack:
        # The tokens are started, and the audience split by locale, before Great Expectations
        # is imported (seconds, in a task process of its own): making the rules imports it.
        with (
            audience_tokens(spec, secret, valid_audience) as tokens,
            Audience(spec, secret, valid_audience, tokens) as audience,
        ):
            people_rules = rules.for_personalizations(expected_recipients)
            batch_rules = rules.for_batches()
            exploded = stack.enter_context(
                explode_run(
                    spec,
                    manifest_path=manifest_path,
                    audience=audience,
                    shared=shared,
                    staged=staged,
                    audience_data=audience_data,
                )
            )
        people_result, batch_result = validate_suites(
            [
                Suite(
                    name="envelopes",
                    chunks=exploded.personalization_chunks(chunk_rows),
                    expectations=people_rules,
                ),
                Suite(name="batches", chunks=[exploded.batches], expectations=batch_rules),
            ],
            data_docs_dir=data_docs_dir,
        )
    batch_rows = exploded.batches
    docs = None
    if data_docs_dir is not None:
        index = data_docs_dir / "index.html"
        docs = str(index.relative_to(run.root)) if index.is_relative_to(run.root) else str(index)
    result = GateResult(
        success=bool(people_result.success and batch_result.success),
        personalizations=exploded.personalizations,
        batches=len(batch_rows),
        personalization_checks=summarise(people_result),
        request_checks=summarise(batch_result),
        data_docs=docs,
    )
    log.info(
        "check_envelopes: %d personalizations in %d batches, success=%s, data docs %s",
        result.personalizations,
        result.batches,
        result.success,
        docs,
    )
    return result


@dataclass(frozen=True)
class GateResult:
    success: bool
    personalizations: int
    batches: int
    personalization_checks: dict[str, Any]
    request_checks: dict[str, Any]
    data_docs: str | None = None  # GX's Data Docs index, relative to the run folder

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
