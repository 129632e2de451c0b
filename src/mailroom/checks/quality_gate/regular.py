"""The regular shape, what Mailroom writes (``explode`` says what it is and why): bodies parsed
by Arrow's JSON reader against a strict schema, a group at a time, and exploded column-wise into
the same rows ``generic`` gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from mailroom.campaign_spec import CampaignSpec
from mailroom.checks.quality_gate.audience import Audience, audience_addresses_in
from mailroom.checks.quality_gate.bodies import Group, tags_and_markers
from mailroom.checks.quality_gate.rows import Columns
from mailroom.envelopes import envelope_value_names


class RegularShape:
    """The strict Arrow schema of the bodies Mailroom writes; ``parse`` returns ``None`` for
    any group with a body outside it."""

    def __init__(self, spec: CampaignSpec) -> None:
        text = pa.string()
        self.tags, self.headers = envelope_value_names(spec)
        personalization = pa.struct(
            [
                ("to", pa.list_(pa.struct([("email", text)]))),
                ("substitutions", pa.struct([(t, text) for t in self.tags])),
                ("headers", pa.struct([(h, text) for h in self.headers])),
            ]
        )
        body = pa.struct(
            [
                ("personalizations", pa.list_(personalization)),
                ("from", pa.struct([("email", text), ("name", text)])),
                ("subject", text),
                ("content", pa.list_(pa.struct([("type", text), ("value", text)]))),
                (
                    "custom_args",
                    pa.struct(
                        [(k, text) for k in ("mailroom_campaign", "mailroom_run", "mailroom_batch")]
                    ),
                ),
                ("reply_to", pa.struct([("email", text)])),
                ("categories", pa.list_(text)),
            ]
        )
        self.schema = pa.schema([("body", body)])
        self.options = pajson.ParseOptions(
            explicit_schema=self.schema, unexpected_field_behavior="error"
        )

    def parse(self, datas: Sequence[bytes]) -> pa.StructArray | None:
        # One line per body, each wrapped in an object of our own, so that a body holding two
        # JSON values (or none) cannot shift the rows: it is simply not valid JSON any more.
        if not datas or any(b"\n" in d or b"\r" in d for d in datas):
            return None
        pieces = [b'{"body":']
        for data in datas:
            pieces += [data, b'}\n{"body":']
        pieces[-1] = b"}\n"
        lines = b"".join(pieces)
        block = max(1 << 23, 2 * max(len(d) for d in datas) + 64)
        try:
            table = pajson.read_json(
                pa.BufferReader(lines),
                read_options=pajson.ReadOptions(block_size=block),
                parse_options=self.options,
            )
        except (pa.ArrowInvalid, UnicodeDecodeError):
            return None
        if table.num_rows != len(datas):
            return None
        bodies = table.column("body").combine_chunks()
        try:
            # Arrow's reader does not check that strings are UTF-8; json.loads would refuse.
            bodies.validate(full=True)
        except pa.ArrowInvalid:
            return None
        return bodies if self._complete(bodies) else None

    def _complete(self, bodies: pa.StructArray) -> bool:
        """Nothing the checks read is null (null and absent would read alike), and every
        recipient address is ASCII (where Arrow's lower-casing is Python's)."""
        parts = bodies.field("personalizations")
        items = parts.flatten()
        to = items.field("to")
        entries = to.flatten()
        subs = items.field("substitutions")
        headers = items.field("headers")
        content = bodies.field("content")
        contents = content.flatten()
        required = [
            bodies,
            parts,
            items,
            to,
            entries,
            entries.field("email"),
            subs,
            *(subs.field(t) for t in self.tags),
            headers,
            *(headers.field(h) for h in self.headers),
            bodies.field("subject"),
            content,
            contents,
            contents.field("type"),
            contents.field("value"),
        ]
        if any(a.null_count for a in required):
            return False
        return bool(pc.all(pc.string_is_ascii(entries.field("email"))).as_py() is not False)


def explode_regular(
    group: Group,
    bodies: pa.StructArray,
    audience: Audience,
    shape: RegularShape,
    people: Columns,
    batch_rows: Columns,
) -> None:
    parts = bodies.field("personalizations")
    per_request = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    items = parts.flatten()
    to = items.field("to")
    n_to = pc.list_value_length(to).to_numpy(zero_copy_only=False).astype(np.int64)
    addresses = to.flatten().field("email")
    first = np.cumsum(n_to) - n_to
    email = addresses.take(pa.array(first, mask=n_to == 0)) if len(n_to) else addresses
    email_key = pc.ascii_lower(email)
    found = audience.find(
        email_key, [(e.locale, int(n)) for e, n in zip(group.entries, per_request, strict=True)]
    )
    known = found.rows >= 0
    values_match = known.copy()
    if known.any():
        own_subs, own_headers = audience.values(found)
        everyone = bool(known.all())
        mask = pa.array(known)
        subs, headers = items.field("substitutions"), items.field("headers")
        pairs = [(subs.field(t), own_subs[t]) for t in shape.tags]
        pairs += [(headers.field(h), own_headers[h]) for h in shape.headers]
        same = np.ones(int(known.sum()), dtype=bool)
        for got, own in pairs:
            mine = got if everyone else got.filter(mask)
            same &= pc.equal(mine, own).to_numpy(zero_copy_only=False)
        values_match[known] = same

    # Per request: the content's tags that no personalization can fill (every regular one has
    # exactly the campaign's tags), template markers left over, audience addresses in the parts
    # every recipient sees.
    subjects = bodies.field("subject").to_pylist()
    contents = bodies.field("content").to_pylist()
    shared_fields = [f.name for f in bodies.type if f.name != "personalizations"]
    shared = pa.StructArray.from_arrays(
        [bodies.field(f) for f in shared_fields], names=shared_fields
    ).to_pylist()
    count = len(group.entries)
    unknown = np.zeros(count, dtype=np.int64)
    recipients = np.bincount(
        np.repeat(np.arange(count), per_request), weights=n_to, minlength=count
    ).astype(np.int64)
    for i, entry in enumerate(group.entries):
        texts = [subjects[i]] + [c["value"] for c in contents[i]]
        tags_used, leftovers = tags_and_markers(texts)
        unknown[i] = len(tags_used - set(shape.tags))
        batch_rows.append_row(
            batch_id=entry.batch_id,
            json_object=True,
            personalizations=int(per_request[i]),
            recipients=int(recipients[i]),
            size=len(group.datas[i]),
            digest_matches=group.digests_match[i],
            staged_matches=group.staged_match[i],
            shared_matches=group.shared_match[i],
            audience_data_shared=group.audience_data[i],
            top_level_cc_bcc=0,
            top_level_reserved_headers=0,
            unresolved_tags=int(unknown[i] * per_request[i]),
            leftover_markers=leftovers,
            audience_addresses_shared=audience_addresses_in(
                {k: v for k, v in shared[i].items() if v is not None}, audience
            ),
        )
    zeros = np.zeros(len(n_to), dtype=np.int64)
    people.append_columns(
        n_to=n_to,
        n_cc=zeros,
        n_bcc=zeros,
        email=email,
        email_key=email_key,
        audience_row=found.rows,
        in_audience=known,
        values_match=values_match,
        reserved_headers=zeros,
        unknown_tags=np.repeat(unknown, per_request),
        extra_fields=zeros,
        to_entry_problems=zeros,
    )
