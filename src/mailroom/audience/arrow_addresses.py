"""The audience's addresses column-wise, on Arrow string arrays: what is sent and the one key,
value for value what ``extract`` computes row by row (``_sendable``, ``address_keys``).

An address whose local part is ASCII, most of an audience, is split by Arrow; its domain is
read once per distinct domain (an audience has few), by ``addresses`` itself. The rest (no "@",
a non-ASCII local part, a domain that reads as holding an "@") go through ``addresses`` row by
row. Reading the domain apart from the local part gives the same text: an "@" is not changed
by NFKC and composes with no neighbour, and nothing else in ``readable`` crosses it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mailroom.addresses import address_key, ascii_domain, normalise, readable

# What ``str.strip()`` takes off either end of an ASCII text.
_ASCII_SPACE = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"


def map_distinct(
    values: pa.Array, function: Callable[[str], object], type: pa.DataType | None = None
) -> pa.Array:
    """``function`` of each value, called once per distinct value; nulls stay null."""
    encoded = pc.dictionary_encode(values)
    mapped = pa.array(
        [function(v) for v in encoded.dictionary.to_pylist()], type=type or pa.string()
    )
    return pc.take(mapped, encoded.indices)


def sendable(emails: pa.Array) -> pa.Array:
    """``normalise(readable(value))`` of every value: trimmed, the domain lower-cased and
    IDNA-encoded, the local part's case kept; null where there is no text."""
    has_at = pc.fill_null(pc.greater_equal(pc.find_substring(emails, "@"), 0), False)
    # At the last "@" (a value without one is split as "@", and not used).
    split = pc.split_pattern(pc.if_else(has_at, emails, "@"), "@", max_splits=1, reverse=True)
    local, after = pc.list_element(split, 0), pc.list_element(split, 1)
    ascii_local = pc.and_(has_at, pc.string_is_ascii(local))
    local = pc.ascii_ltrim(local, _ASCII_SPACE)
    domain = map_distinct(after, _sent_domain)
    fast = pc.and_(ascii_local, pc.and_(pc.greater(pc.binary_length(local), 0), domain.is_valid()))
    sent = pc.binary_join_element_wise(local, domain, "@")
    rest = pc.and_(pc.invert(fast), emails.is_valid())
    return _by_row(sent, rest, emails, lambda v: normalise(readable(v)))


def _sent_domain(domain: str) -> str | None:
    """What follows the "@" in ``normalise(readable(local + "@" + domain))`` for an ASCII local
    part with text after its leading space; ``None`` when the domain does not decide it alone
    (it reads as holding an "@", or as nothing)."""
    read = readable(domain)
    if "@" in read or not read.rstrip():
        return None
    return ascii_domain(read.rstrip())


def address_keys(sent: pa.Array) -> pa.Array:
    """``address_key`` of every value of ``sent`` (as ``sendable`` writes them), null where
    there is no address: for ASCII values the lower-cased value when an "@" has text on both
    sides; the rest through ``address_key`` itself."""
    is_ascii = pc.fill_null(pc.string_is_ascii(sent), False)
    # ``extract._SHAPED`` for ASCII: the last "@" has a character before it and one after it.
    from_end = pc.find_substring(pc.binary_reverse(sent.view(pa.binary())), "@")
    inside = pc.and_(
        pc.greater_equal(from_end, 1),
        pc.less_equal(from_end, pc.subtract(pc.binary_length(sent), 2)),
    )
    shaped = pc.and_(is_ascii, pc.fill_null(inside, False))
    keys = pc.if_else(shaped, pc.ascii_lower(sent), pa.scalar(None, pa.string()))
    rest = pc.and_(pc.invert(is_ascii), sent.is_valid())
    return _by_row(keys, rest, sent, address_key)


def _by_row(
    values: pa.Array,
    rows: pa.Array,
    source: pa.Array,
    function: Callable[[str], str | None],
) -> pa.Array:
    """``values`` with each of ``rows`` replaced by ``function`` of that row of ``source``."""
    picked = np.flatnonzero(rows.to_numpy(zero_copy_only=False))
    if not len(picked):
        return values
    replaced = [function(v) for v in source.take(pa.array(picked)).to_pylist()]
    return pc.replace_with_mask(values, rows, pa.array(replaced, pa.string()))
