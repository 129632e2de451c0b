"""The frozen bodies read back a group at a time, and what their shared texts hold.

``read_groups`` reads, hashes and (given the regular shape's ``parse``) parses the next group of
requests in a second thread while the caller checks the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from mailroom.batches import BatchEntry, sha256_hex
from mailroom.substitutions import LEFTOVER_MARKER, TAG_PATTERN

# Requests parsed together by the strict reader (a few dozen MB); the next group is read and
# parsed in a second thread while this one is checked.
CHUNK_BATCHES = 64


@dataclass(frozen=True)
class Group:
    """Some requests as frozen: their manifest entries, bytes, whether each is as frozen, and
    (when every one has the regular shape) their strict parse."""

    entries: Sequence[BatchEntry]
    datas: Sequence[bytes]
    digests_match: Sequence[bool]
    parsed: pa.StructArray | None = None

    def split(self) -> list[Group]:
        return [
            Group([e], [d], [ok])
            for e, d, ok in zip(self.entries, self.datas, self.digests_match, strict=True)
        ]


def read_groups(
    batches: Sequence[BatchEntry],
    folder: Path,
    parse: Callable[[Sequence[bytes]], pa.StructArray | None] | None,
) -> Iterator[Group]:
    """The requests a group at a time; the next group is read, hashed and parsed in a second
    thread meanwhile (file reads, SHA-256 and Arrow's parser all release the GIL)."""

    def load(entries: list[BatchEntry]) -> Group:
        datas = [(folder / e.file).read_bytes() for e in entries]
        digests = [sha256_hex(d) == e.sha256 for d, e in zip(datas, entries, strict=True)]
        parsed = parse(datas) if parse is not None else None
        return Group(entries, datas, digests, parsed)

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


def tags_and_markers(texts: Sequence[str]) -> tuple[set[str], int]:
    """The substitution tags the shared texts use, and how many other markers they hold."""
    tags = {m.group(0) for t in texts for m in TAG_PATTERN.finditer(t)}
    leftovers = sum(len(LEFTOVER_MARKER.findall(TAG_PATTERN.sub("", t))) for t in texts)
    return tags, leftovers
