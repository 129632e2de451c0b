"""What the data-quality gate checks: the expectations its two frames must meet.

``explode`` reads the frozen bodies into one row per personalization and one per batch (the
columns are in ``rows``); each rule is one Great Expectations expectation on one column: a count
of what the rule forbids that must be 0, a flag that must be true, a size within SendGrid's limits
(``mailroom.checks.limits``). ``check_envelopes`` validates the personalization rows as the suite
``envelopes``, a chunk of rows at a time, and the batch rows as the suite ``batches``, and any
unexpected row fails the run. Every rule judges each row alone (or counts the rows), so the
verdict is the same however the rows are chunked.

GX is imported inside the functions: it costs seconds, and ``check_envelopes`` makes the rules
while the unsubscribe tokens are being made in a second process.
"""

from __future__ import annotations

from typing import Any

from mailroom.addresses import SINGLE_ADDRESS_PATTERN
from mailroom.checks.limits import MAX_PERSONALIZATIONS, MAX_RECIPIENTS, MAX_REQUEST_BYTES
from mailroom.checks.quality_gate.rows import ONCE_IN_RUN


def for_personalizations(expected_recipients: int) -> list[Any]:
    """Every personalization row: one recipient, alone in ``to``, a single valid address of the
    validated audience, nobody twice and nobody left out, carrying exactly the values
    recomputed from that recipient's own audience row."""
    import great_expectations.expectations as gxe

    return [
        # One personalization per validated recipient.
        gxe.ExpectTableRowCountToEqual(value=expected_recipients),
        # One address in ``to``, none in ``cc`` or ``bcc``.
        gxe.ExpectColumnValuesToBeBetween(column="n_to", min_value=1, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="n_cc", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="n_bcc", min_value=0, max_value=0),
        # That address is one valid address, in no other personalization of the run (whatever
        # its case), and in the validated audience. Nobody twice is a property of the whole
        # run, which no chunk of rows can judge alone: each row carries it, computed over every
        # address key of the run (``rows.ONCE_IN_RUN``), and every copy of a repeated address
        # is unexpected, as a uniqueness check of all the rows at once would count them.
        gxe.ExpectColumnValuesToNotBeNull(column="email"),
        gxe.ExpectColumnValuesToMatchRegex(column="email", regex=SINGLE_ADDRESS_PATTERN),
        gxe.ExpectColumnValuesToBeInSet(column=ONCE_IN_RUN, value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="in_audience", value_set=[True]),
        # Its substitutions and headers (the unsubscribe link among them) are the ones
        # recomputed from that address's own audience row.
        gxe.ExpectColumnValuesToBeInSet(column="values_match", value_set=[True]),
        # No reserved header (``limits.RESERVED_HEADERS``).
        gxe.ExpectColumnValuesToBeBetween(column="reserved_headers", min_value=0, max_value=0),
        # Every tag the shared subject and content use is one of its substitutions.
        gxe.ExpectColumnValuesToBeBetween(column="unknown_tags", min_value=0, max_value=0),
        # Nothing but ``to``, ``substitutions`` and ``headers``.
        gxe.ExpectColumnValuesToBeBetween(column="extra_fields", min_value=0, max_value=0),
        # Every ``to`` entry is exactly ``{"email"}``: no display name, which the spec never
        # declares and which could carry another person's name or address however spelt.
        gxe.ExpectColumnValuesToBeBetween(column="to_entry_problems", min_value=0, max_value=0),
    ]


def for_batches() -> list[Any]:
    """Every batch row: a JSON object within SendGrid's limits, byte for byte as frozen, whose
    shared parts (everything but its personalizations: what every recipient of it sees) show
    no recipient and leave nothing unfilled."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeInSet(column="json_object", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(
            column="personalizations", min_value=1, max_value=MAX_PERSONALIZATIONS
        ),
        # ``to`` + ``cc`` + ``bcc`` over every personalization of the request.
        gxe.ExpectColumnValuesToBeBetween(
            column="recipients", min_value=1, max_value=MAX_RECIPIENTS
        ),
        # Bytes of the request body: SendGrid takes less than MAX_REQUEST_BYTES.
        gxe.ExpectColumnValuesToBeBetween(
            column="size", min_value=1, max_value=MAX_REQUEST_BYTES, strict_max=True
        ),
        # Its SHA-256 is the one in the manifest.
        gxe.ExpectColumnValuesToBeInSet(column="digest_matches", value_set=[True]),
        # Its SHA-256 is the one the outbox staged the batch with, under the manifest the outbox
        # staged, from the inputs the outbox recorded (the spec's copy, the validated audience,
        # and content that is what the gate renders itself): a rewritten run folder, manifest
        # digests recomputed and all, fails here.
        gxe.ExpectColumnValuesToBeInSet(column="staged_matches", value_set=[True]),
        # Everything but its personalizations is exactly what the campaign spec and the
        # locale's rendered content give (read strictly: UTF-8, no key twice in an object).
        gxe.ExpectColumnValuesToBeInSet(column="shared_matches", value_set=[True]),
        # No ``cc``/``bcc`` (nor the ``bcc`` mail setting) and no reserved header at the top.
        gxe.ExpectColumnValuesToBeBetween(column="top_level_cc_bcc", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(
            column="top_level_reserved_headers", min_value=0, max_value=0
        ),
        # No tag a personalization leaves unfilled (``unknown_tags``, summed over the batch),
        # no other template marker left in the subject or content.
        gxe.ExpectColumnValuesToBeBetween(column="unresolved_tags", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="leftover_markers", min_value=0, max_value=0),
        # No audience address in the shared parts, as is, HTML-escaped or %-encoded.
        gxe.ExpectColumnValuesToBeBetween(
            column="audience_addresses_shared", min_value=0, max_value=0
        ),
        # Nor any audience data in the shared part the approved inputs give for the batch, held
        # to everyone the extract read (suppressed and quarantined people too) and read as a
        # person reads it: addresses however written, user ids, unsubscribe tokens and links.
        gxe.ExpectColumnValuesToBeBetween(column="audience_data_shared", min_value=0, max_value=0),
    ]
