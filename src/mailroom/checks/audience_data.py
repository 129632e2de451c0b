"""Audience data in the parts every recipient of a request sees.

The shared parts of a request (subject, content, sender, reply-to, categories, custom args…) are
rebuilt from the campaign spec and the rendered content, so anything personal in them came in
with those inputs: a template or catalog holding someone's address, a subject rendered once for
one recipient, a literal unsubscribe link. Both layers hold the rebuilt shared parts to the run's
whole audience (``People``: every person the extract read, the suppressed and the quarantined
included, not only those about to be mailed, read from their files a batch at a time) and refuse
any of:

* an address of anyone in the audience, read as a person reads it (``addresses.addresses_shown``:
  markup, entities, invisible characters, fullwidth forms, "(at)" spellings, Unicode domains);
  the campaign's own public addresses (sender, reply-to, unsubscribe mailbox) are not audience
  data, even when staff are on the list;
* a user id of anyone in the audience (ids shorter than ``MIN_USER_ID_LENGTH`` are left out:
  "42" in a text is not evidence of anyone);
* an unsubscribe token (``<key id>.<campaign>.<sealed user id>``: whose it is cannot be read
  without the secret, so any text of that shape is one), or a literal unsubscribe link (the
  campaign's unsubscribe URL with a token in it rather than the substitution tag).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mailroom.addresses import address_key, addresses_shown
from mailroom.campaign_spec import CampaignSpec

MIN_USER_ID_LENGTH = 6
# Rows of an audience file read at a time by each lookup.
SCAN_ROWS = 131_072
# Runs of characters a user id is made of.
_WORDS = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)?")
# An unsubscribe token (``unsubscribe.unsubscribe_token``): a key id of 6 base64url characters, a
# campaign name, and the sealed user id (a 16-byte SIV tag and more: 22 characters at least).
_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]{6}\.[a-z0-9][a-z0-9_\-]{0,63}\.[A-Za-z0-9_\-]{22,}"
    r"(?![A-Za-z0-9_\-])"
)


class People:
    """Every person the run's extract read (``sources``: their files, or tables), asked about a
    handful of candidates at a time without being held: each question is one scan of their
    address and user id columns, a batch at a time (a file read whole would be two arrays the
    size of the audience, for a few lookups)."""

    def __init__(self, sources: Sequence[Path | pa.Table] = ()) -> None:
        self.sources = tuple(sources)

    @classmethod
    def read(cls, paths: Iterable[Path]) -> People:
        """The people of the run's audience files (the snapshot, the suppressed); a file that is
        not there adds nobody."""
        return cls([path for path in paths if path.exists()])

    def known(self, addresses: Iterable[str], user_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """Which of the candidate address keys and which of the candidate user ids are
        someone's, in one scan."""
        wanted_addresses = pa.array(sorted(set(addresses)), pa.string())
        wanted_ids = pa.array(sorted(set(user_ids)), pa.string())
        found_addresses: set[str] = set()
        found_ids: set[str] = set()
        columns = [
            name
            for name, wanted in (("email", wanted_addresses), ("user_id", wanted_ids))
            if len(wanted)
        ]
        if not columns:
            return found_addresses, found_ids
        for batch in self._batches(columns):
            if len(wanted_addresses):
                keys = _keys(batch.column("email"))
                found_addresses |= _present(keys, wanted_addresses)
            if len(wanted_ids):
                ids = pc.cast(batch.column("user_id"), pa.string())
                found_ids |= _present(ids, wanted_ids)
        return found_addresses, found_ids

    def known_addresses(self, candidates: Iterable[str]) -> set[str]:
        return self.known(candidates, ())[0]

    def known_user_ids(self, candidates: Iterable[str]) -> set[str]:
        return self.known((), candidates)[1]

    def _batches(self, columns: list[str]) -> Iterator[pa.RecordBatch | pa.Table]:
        for source in self.sources:
            if isinstance(source, pa.Table):
                yield source.select(columns)
            else:
                # A page at a time: a row group can be the whole audience.
                file = pq.ParquetFile(source, buffer_size=1 << 20, pre_buffer=False)
                yield from file.iter_batches(batch_size=SCAN_ROWS, columns=columns)


@dataclass(frozen=True)
class _Candidates:
    """What a text could show of someone: address keys, user ids, and literal links and
    unsubscribe tokens (each someone's, whoever it is)."""

    addresses: frozenset[str]
    user_ids: frozenset[str]
    links: int


def _candidates(text: str, spec: CampaignSpec) -> _Candidates:
    words = {w for w in _WORDS.findall(text) if len(w) >= MIN_USER_ID_LENGTH}
    ids = {w for w in words if "." not in w}
    ids |= {part for w in words if "." in w for part in w.split(".")}
    return _Candidates(
        addresses=frozenset(addresses_shown(text) - spec.public_addresses),
        user_ids=frozenset(i for i in ids if len(i) >= MIN_USER_ID_LENGTH),
        links=_literal_unsubscribe_links(text, spec) + len(set(_TOKEN.findall(text))),
    )


def audience_data_in(text: str, people: People, spec: CampaignSpec) -> int:
    """How many pieces of audience data ``text`` shows (addresses, user ids, unsubscribe tokens
    and literal unsubscribe links); the campaign's public addresses are not counted."""
    found = _candidates(text, spec)
    addresses, user_ids = people.known(found.addresses, found.user_ids)
    return len(addresses) + len(user_ids) + found.links


def shared_audience_data(
    spec: CampaignSpec, shared: Mapping[str, Mapping[str, Any]], people: People
) -> dict[str, int]:
    """``audience_data_in`` each shared part of ``shared`` (by body digest), field by field (no
    address spans two fields), each distinct text read once (the requests of a locale share
    everything but their custom args), and the audience scanned once for every candidate of
    every text together rather than once per text. Each distinct text is held once, however
    many requests show it: ten thousand requests of five locales hold five copies of the
    content, not ten thousand."""
    distinct: dict[str, str] = {}
    texts = {
        digest: [
            distinct.setdefault(text, text)
            for text in (text_of({key: value}) for key, value in part.items())
        ]
        for digest, part in shared.items()
    }
    candidates = {t: _candidates(t, spec) for t in {t for ts in texts.values() for t in ts}}
    addresses, user_ids = people.known(
        (a for c in candidates.values() for a in c.addresses),
        (i for c in candidates.values() for i in c.user_ids),
    )
    shown = {
        t: len(c.addresses & addresses) + len(c.user_ids & user_ids) + c.links
        for t, c in candidates.items()
    }
    return {digest: sum(shown[t] for t in ts) for digest, ts in texts.items()}


def text_of(value: Any) -> str:
    """Every key and string of a JSON value as a reader sees it (no JSON escapes), one per line:
    a line break ends any address, so none spans two of them."""
    return "\n".join(_strings(value))


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _literal_unsubscribe_links(text: str, spec: CampaignSpec) -> int:
    """The campaign's unsubscribe URL with something in the token's place: a recipient's link,
    where only the substitution tag may be."""
    prefix = spec.unsubscribe.url_template.split("{token}", 1)[0]
    if not prefix:
        return 0
    return len(re.findall(re.escape(prefix) + r"[A-Za-z0-9_\-]", text))


def _keys(emails: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``address_key`` of each address (ASCII ones lower-cased by Arrow, the rest in Python)."""
    if len(emails) == 0 or pc.all(pc.string_is_ascii(emails)).as_py() is not False:
        return pc.ascii_lower(pc.utf8_trim_whitespace(emails))
    return pa.array([address_key(e) for e in emails.to_pylist()], pa.string())


def _present(values: pa.Array | pa.ChunkedArray, wanted: pa.Array) -> set[str]:
    """Which of the ``wanted`` few are among ``values``: one scan of the values against them
    (no hash table of a million values for a handful of lookups)."""
    if not len(wanted) or not len(values):
        return set()
    hits = pc.filter(values, pc.is_in(values, value_set=wanted))
    return {str(hit) for hit in hits.to_pylist()}
