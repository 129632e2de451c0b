"""Any body the regular shape does not parse (``explode``), read with ``json.loads`` and exploded
one personalization at a time into the same rows ``regular`` gives.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from mailroom.checks.limits import RESERVED_HEADERS
from mailroom.checks.quality_gate.audience import Audience, Found, audience_addresses_in
from mailroom.checks.quality_gate.bodies import Group, tags_and_markers
from mailroom.checks.quality_gate.rows import Columns


def explode_generic(
    one: Group,
    audience: Audience,
    people: Columns,
    batch_rows: Columns,
) -> None:
    (entry,), (data,) = one.entries, one.datas
    (digest_matches,), (staged_matches,) = one.digests_match, one.staged_match
    (shared_matches,), (audience_data_shared,) = one.shared_match, one.audience_data
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        body = None
    if not isinstance(body, dict):
        batch_rows.append_row(
            batch_id=entry.batch_id,
            json_object=False,
            personalizations=0,
            recipients=0,
            size=len(data),
            digest_matches=digest_matches,
            staged_matches=staged_matches,
            shared_matches=shared_matches,
            audience_data_shared=audience_data_shared,
            top_level_cc_bcc=0,
            top_level_reserved_headers=0,
            unresolved_tags=0,
            leftover_markers=0,
            audience_addresses_shared=0,
        )
        return
    parts = body.get("personalizations")
    items = [p if isinstance(p, dict) else None for p in parts] if isinstance(parts, list) else []
    content = body.get("content")
    texts = [str(body.get("subject", ""))] + [
        str(c.get("value", ""))
        for c in (content if isinstance(content, list) else [])
        if isinstance(c, dict)
    ]
    tags_used, leftovers = tags_and_markers(texts)

    emails: list[str | None] = []
    for item in items:
        to = item.get("to") if item is not None else None
        first = to[0] if isinstance(to, list) and to else None
        emails.append(_as_text(first.get("email") if isinstance(first, dict) else None))
    keys = pa.array([e.lower() if e is not None else None for e in emails], pa.string())
    found = audience.find(keys, [(entry.locale, len(items))])
    rows = found.rows
    own = _own_values(audience, found)

    unresolved = recipient_count = 0
    for position, (item, email, key, row) in enumerate(
        zip(items, emails, keys.to_pylist(), rows, strict=True)
    ):
        extra = 1 if item is None else len(set(item) - {"to", "substitutions", "headers"})
        item = item or {}
        to = item.get("to")
        n_to = len(to) if isinstance(to, list) else 0
        n_cc, n_bcc = (_count(item.get(k)) for k in ("cc", "bcc"))
        recipient_count += n_to + n_cc + n_bcc
        subs = item.get("substitutions")
        headers = item.get("headers")
        sub_keys = set(subs) if isinstance(subs, dict) else set()
        unknown = len(tags_used - sub_keys)
        unresolved += unknown
        people.append_row(
            n_to=n_to,
            n_cc=n_cc,
            n_bcc=n_bcc,
            email=email,
            email_key=key,
            audience_row=int(row),
            in_audience=bool(row >= 0),
            values_match=bool(row >= 0) and own.get(position) == (subs, headers),
            reserved_headers=_reserved(headers),
            unknown_tags=unknown,
            extra_fields=extra,
            to_entry_problems=_to_entry_problems(to)
            if isinstance(to, list)
            else int(to is not None),
        )
    mail_settings = body.get("mail_settings")
    batch_rows.append_row(
        batch_id=entry.batch_id,
        json_object=True,
        personalizations=len(items),
        recipients=recipient_count,
        size=len(data),
        digest_matches=digest_matches,
        staged_matches=staged_matches,
        shared_matches=shared_matches,
        audience_data_shared=audience_data_shared,
        top_level_cc_bcc=int("cc" in body)
        + int("bcc" in body)
        + int(isinstance(mail_settings, dict) and "bcc" in mail_settings),
        top_level_reserved_headers=_reserved(body.get("headers")),
        unresolved_tags=unresolved,
        leftover_markers=leftovers,
        audience_addresses_shared=audience_addresses_in(
            {k: v for k, v in body.items() if k != "personalizations"}, audience
        ),
    )


def _own_values(
    audience: Audience, found: Found
) -> dict[int, tuple[dict[str, str], dict[str, str]]]:
    """Position of each address found → (substitutions, headers) as ``envelope_values`` gives
    them for its audience row."""
    where = np.flatnonzero(found.rows >= 0)
    if not len(where):
        return {}
    subs, headers = audience.values(found)
    sub_lists = {k: v.to_pylist() for k, v in subs.items()}
    header_lists = {k: v.to_pylist() for k, v in headers.items()}
    return {
        int(position): (
            {k: v[i] for k, v in sub_lists.items()},
            {k: v[i] for k, v in header_lists.items()},
        )
        for i, position in enumerate(where)
    }


def _as_text(value: Any) -> str | None:
    """An address as it reads: text as is; anything else (or text Arrow cannot hold, a lone
    surrogate) as its JSON, which is no address either."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value)
        return value
    return json.dumps(value)


def _count(value: Any) -> int:
    """Recipients in a ``cc``/``bcc`` value: a list's length; anything else set counts as one."""
    if isinstance(value, list):
        return len(value)
    return 0 if value is None or value == {} or value == "" else 1


def _reserved(headers: Any) -> int:
    if headers is None:
        return 0
    if not isinstance(headers, dict):
        return 1
    return sum(1 for h in headers if str(h).lower() in RESERVED_HEADERS)


def _to_entry_problems(to: list[Any]) -> int:
    """A ``to`` entry is exactly ``{"email"}``, as the freeze writes it: a display name, which
    the spec never declares, could carry another person's name or address however spelt."""
    return sum(1 for entry in to if not isinstance(entry, dict) or set(entry) != {"email"})
