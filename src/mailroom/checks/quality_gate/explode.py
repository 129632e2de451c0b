"""The frozen bodies read back into the rows the rules judge: one per personalization and one
per batch (the columns: ``rows``).

Each body is read one of two ways, which give the same rows:

* **the regular shape** (what Mailroom writes: every personalization exactly ``to`` +
  ``substitutions`` + ``headers``, every value a string, every ``to`` entry exactly an ``email``,
  nothing else anywhere) is parsed by Arrow's JSON reader against a strict schema, a few dozen
  requests at a time, and checked column-wise (``regular``);
* **anything else** (an unknown field, a missing or null value, another type, a duplicate key,
  a line break, non-ASCII in an address, not JSON at all) fails that strict parse, and that body
  is read with ``json.loads`` and checked one personalization at a time (``generic``).

The strict parse only decides which of the two reads a body; both produce the same columns
(``tests/unit/test_quality_gate.py`` compares them on every kind of irregular body), and every
rule is then judged by the same Great Expectations suites (``rules``). The next group of requests
is read, hashed and parsed in a second thread while the current one is checked (``bodies``), and
every recipient's unsubscribe token is made in a second process meanwhile
(``unsubscribe.TokensInBackground``, started by ``audience.audience_tokens``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mailroom.batches import load_manifest
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.quality_gate.audience import Audience, audience_tokens
from mailroom.checks.quality_gate.bodies import read_groups
from mailroom.checks.quality_gate.generic import explode_generic
from mailroom.checks.quality_gate.regular import RegularShape, explode_regular
from mailroom.checks.quality_gate.rows import BATCH_COLUMNS, PERSONALIZATION_COLUMNS, Columns
from mailroom.unsubscribe import TokensInBackground


def explode_batches(
    spec: CampaignSpec,
    *,
    manifest_path: Path,
    valid_audience: Path,
    secret: bytes,
    shared: Mapping[str, Mapping[str, Any]],
    staged: Mapping[str, str],
    audience_data: Mapping[str, int],
    strict_reader: bool = True,
    tokens: TokensInBackground | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per personalization and one row per batch, read from the frozen bytes.

    ``email_key`` is the lower-cased address as a number (the same for the same address), as
    uniqueness needs. ``shared``: each batch's shared part as the approved inputs give it, by
    body digest (``batches.shared_parts``). ``staged``: the digest each batch must have, as the
    outbox staged it (by batch id; none for a batch whose inputs are not the recorded ones).
    ``audience_data``: what ``checks.audience_data`` finds in each batch's shared part as the
    approved inputs give it, by body digest.
    ``strict_reader=False`` reads every body the generic
    way (for tests that compare the two readers). ``tokens``: the audience's unsubscribe tokens,
    already being made (``audience_tokens``); by default they are started here. Either way they
    are closed when this returns.
    """
    with tokens or audience_tokens(spec, secret, valid_audience) as made:
        manifest = load_manifest(manifest_path)
        audience = Audience(spec, secret, valid_audience, made)
        shape = RegularShape(spec) if strict_reader else None
        people = Columns(PERSONALIZATION_COLUMNS)
        batch_rows = Columns(BATCH_COLUMNS)
        parse = shape.parse if shape is not None else None
        groups = read_groups(
            manifest.batches, manifest_path.parent, parse, shared, staged, audience_data
        )
        for group in groups:
            if group.parsed is not None and shape is not None:
                explode_regular(group, group.parsed, audience, shape, people, batch_rows)
                continue
            # Something in this group is irregular: find which, and read only those slowly.
            for one in group.split():
                body = shape.parse(one.datas) if shape is not None else None
                if body is not None and shape is not None:
                    explode_regular(one, body, audience, shape, people, batch_rows)
                else:
                    explode_generic(one, audience, people, batch_rows)
    return people.frame(), batch_rows.frame()
