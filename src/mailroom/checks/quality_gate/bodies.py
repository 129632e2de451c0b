"""The frozen bodies read back a group at a time, and what their shared texts hold.

``read_groups`` reads, hashes and (given the regular shape's ``parse``) parses the next group of
requests in a second thread while the caller checks the current one. It also holds each body's
shared part (everything but its personalizations, read strictly: UTF-8, no key twice in an
object) against what the approved inputs give (``batches.shared_parts``): a field the freeze
never writes, or a shared value it would not write, fails ``shared_matches``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from mailroom.batches import BatchEntry, sha256_hex
from mailroom.substitutions import LEFTOVER_MARKER, TAG_PATTERN

# Requests parsed together by the strict reader (a few dozen MB); the next group is read and
# parsed in a second thread while this one is checked. Twice as many is no faster and holds
# about 100 MB more.
CHUNK_BATCHES = 32


@dataclass(frozen=True)
class Group:
    """Some requests as frozen: their manifest entries, bytes, whether each is as frozen, and
    (when every one has the regular shape) their strict parse."""

    entries: Sequence[BatchEntry]
    datas: Sequence[bytes]
    digests_match: Sequence[bool]
    staged_match: Sequence[bool]
    shared_match: Sequence[bool]
    audience_data: Sequence[int]
    parsed: pa.StructArray | None = None

    def split(self) -> list[Group]:
        return [
            Group([e], [d], [ok], [staged], [same], [data])
            for e, d, ok, staged, same, data in zip(
                self.entries,
                self.datas,
                self.digests_match,
                self.staged_match,
                self.shared_match,
                self.audience_data,
                strict=True,
            )
        ]


def read_groups(
    batches: Sequence[BatchEntry],
    folder: Path,
    parse: Callable[[Sequence[bytes]], pa.StructArray | None] | None,
    shared: Mapping[str, Mapping[str, Any]],
    staged: Mapping[str, str],
    audience_data: Mapping[str, int],
) -> Iterator[Group]:
    """The requests a group at a time; the next group is read, hashed and parsed in a second
    thread meanwhile (file reads, SHA-256 and Arrow's parser all release the GIL). ``staged``:
    the digest the outbox staged each batch with, by batch id; ``audience_data``: how much
    audience data the shared part the approved inputs give for a body shows, by its digest in
    the manifest (``checks.audience_data``)."""

    def load(entries: list[BatchEntry]) -> Group:
        datas = [(folder / e.file).read_bytes() for e in entries]
        hashes = [sha256_hex(d) for d in datas]
        digests = [h == e.sha256 for h, e in zip(hashes, entries, strict=True)]
        as_staged = [h == staged.get(e.batch_id) for h, e in zip(hashes, entries, strict=True)]
        same = [
            _shared_part_is(d, shared.get(e.sha256)) for d, e in zip(datas, entries, strict=True)
        ]
        shown = [audience_data.get(e.sha256, 0) for e in entries]
        parsed = parse(datas) if parse is not None else None
        return Group(entries, datas, digests, as_staged, same, shown, parsed)

    groups = [list(batches[i : i + CHUNK_BATCHES]) for i in range(0, len(batches), CHUNK_BATCHES)]
    if not groups:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-read") as pool:
        pending: Future[Group] = pool.submit(load, groups[0])
        for i in range(len(groups)):
            group = pending.result()
            if i + 1 < len(groups):
                pending = pool.submit(load, groups[i + 1])
            yield group


def _shared_part_is(data: bytes, expected: Mapping[str, Any] | None) -> bool:
    """Whether everything of the body but its personalizations is exactly ``expected``."""
    if expected is None:
        return False
    try:
        body = json.loads(data.decode("utf-8"), object_pairs_hook=_object_without_repeats)
    except ValueError:  # not UTF-8, not one JSON value, or a key twice in an object
        return False
    return (
        isinstance(body, dict)
        and {k: v for k, v in body.items() if k != "personalizations"} == expected
    )


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a key twice in one object")
    return data


def tags_and_markers(texts: Sequence[str]) -> tuple[set[str], int]:
    """The substitution tags the shared texts use, and how many other markers they hold."""
    tags = {m.group(0) for t in texts for m in TAG_PATTERN.finditer(t)}
    leftovers = sum(len(LEFTOVER_MARKER.findall(TAG_PATTERN.sub("", t))) for t in texts)
    return tags, leftovers
