"""The gate's baseline: the same one-recipient checks in bare pyarrow/pandas, without GX.

What a careful engineer would write without Great Expectations: read every frozen body, let
Arrow's JSON reader infer the schema and parse them all at once (on every core it has), explode
the personalizations column-wise and count what breaks each rule. No Data Docs, no strict
schema, no fallback for irregular bodies: it is only a yardstick for ``check_envelopes``, which
``bench/run.py`` reports as a ratio to it, measured in the same run.

Expected values are recomputed from the validated audience exactly as the gate does
(``envelope_value_columns``): that cost belongs to the check, not to GX.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from mailroom.addresses import SINGLE_ADDRESS_PATTERN
from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.limits import (
    MAX_PERSONALIZATIONS,
    MAX_RECIPIENTS,
    MAX_REQUEST_BYTES,
    RESERVED_HEADERS,
)
from mailroom.envelopes import envelope_value_columns
from mailroom.substitutions import LEFTOVER_MARKER, TAG_PATTERN

_ADDRESS_LIKE = re.compile(r"[a-z0-9._%+'-]{1,64}@[a-z0-9-]+(?:\.[a-z0-9-]+)+")


def bare_gate(
    spec: CampaignSpec, *, manifest_path: Path, valid_audience: Path, secret: bytes, expected: int
) -> dict[str, int]:
    """How many personalizations or requests break each rule (all zero: the run may go on)."""
    manifest = json.loads(manifest_path.read_bytes())
    datas = [(manifest_path.parent / b["file"]).read_bytes() for b in manifest["batches"]]
    digests_ok = sum(
        hashlib.sha256(d).hexdigest() == b["sha256"]
        for d, b in zip(datas, manifest["batches"], strict=True)
    )
    bodies = pajson.read_json(pa.BufferReader(b"\n".join(datas))).combine_chunks()
    fails: dict[str, int] = {
        "digest": len(datas) - digests_ok,
        "size": sum(not 1 <= len(d) < MAX_REQUEST_BYTES for d in datas),
    }

    parts = bodies.column("personalizations").combine_chunks()
    per_request = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    items = parts.flatten()
    item_fields = {f.name for f in items.type}
    to = items.field("to")
    n_to = pc.list_value_length(to).fill_null(0).to_numpy(zero_copy_only=False)
    first = np.cumsum(n_to) - n_to
    email = to.flatten().field("email").take(pa.array(first, mask=n_to == 0))
    key = pc.utf8_lower(email)
    fails["rows"] = int(len(n_to) != expected)
    fails["n_to"] = int((n_to != 1).sum())
    for name in ("cc", "bcc"):
        fails[name] = (
            int(pc.sum(pc.list_value_length(items.field(name)).fill_null(0)).as_py() or 0)
            if name in item_fields
            else 0
        )
    fails["email_null"] = email.null_count
    # Python's regex engine, as the gate's expectation runs it: the pattern's length limits are
    # lookaheads, which Arrow's RE2 does not have.
    fails["email_regex"] = int(
        (~email.to_pandas().str.match(SINGLE_ADDRESS_PATTERN).fillna(False).astype(bool)).sum()
    )
    fails["unique"] = int(pd.Series(key.to_pandas()).duplicated(keep=False).sum())

    audience = pq.read_table(valid_audience)
    audience_keys = pc.utf8_lower(audience.column("email"))
    row = pc.index_in(key, value_set=audience_keys)
    known = row.is_valid().to_numpy(zero_copy_only=False)
    fails["in_audience"] = int((~known).sum())
    own_subs, own_headers = envelope_value_columns(
        spec, secret, audience.take(row.filter(pa.array(known)))
    )
    same = np.ones(int(known.sum()), dtype=bool)
    subs, headers = items.field("substitutions"), items.field("headers")
    for got, own in [(subs.field(t), v) for t, v in own_subs.items()] + [
        (headers.field(h), v) for h, v in own_headers.items()
    ]:
        same &= pc.fill_null(pc.equal(got.filter(pa.array(known)), own), False).to_numpy(
            zero_copy_only=False
        )
    fails["values_match"] = int((~same).sum() + (~known).sum())
    header_names = {f.name.lower() for f in headers.type}
    fails["reserved_headers"] = len(header_names & RESERVED_HEADERS)
    fails["extra_fields"] = len(item_fields - {"to", "substitutions", "headers"})
    fails["to_entry_fields"] = len({f.name for f in to.type.value_type} - {"email", "name"})

    subjects = bodies.column("subject").to_pylist()
    contents = bodies.column("content").to_pylist()
    sub_tags = {f.name for f in subs.type}
    shared = bodies.drop_columns(["personalizations"]).to_pylist()
    known_addresses = set(audience_keys.to_pylist())
    unresolved = leftovers = in_shared = 0
    for i, subject in enumerate(subjects):
        texts = [subject] + [c["value"] for c in contents[i]]
        tags = {m.group(0) for t in texts for m in TAG_PATTERN.finditer(t)}
        unresolved += len(tags - sub_tags) * int(per_request[i])
        leftovers += sum(len(LEFTOVER_MARKER.findall(TAG_PATTERN.sub("", t))) for t in texts)
        in_shared += _audience_addresses_in(shared[i], known_addresses)
    fails["unresolved_tags"] = unresolved
    fails["leftover_markers"] = leftovers
    fails["audience_addresses_shared"] = in_shared
    fails["personalizations"] = int(
        ((per_request < 1) | (per_request > MAX_PERSONALIZATIONS)).sum()
    )
    recipients = np.bincount(
        np.repeat(np.arange(len(per_request)), per_request), weights=n_to, minlength=len(datas)
    )
    fails["recipients"] = int(((recipients < 1) | (recipients > MAX_RECIPIENTS)).sum())
    top = set(bodies.column_names)
    fails["top_level_cc_bcc"] = len(top & {"cc", "bcc", "mail_settings"})
    fails["top_level_headers"] = int("headers" in top)
    return fails


def _audience_addresses_in(shared: dict[str, Any], audience: set[str]) -> int:
    text = json.dumps(shared, ensure_ascii=False).lower()
    found = set()
    for variant in (text, unquote(html.unescape(text)).lower()):
        for match in _ADDRESS_LIKE.finditer(variant):
            for candidate in {match.group(0), match.group(0).lstrip("'.%")}:
                if candidate in audience:
                    found.add(candidate)
    return len(found)
