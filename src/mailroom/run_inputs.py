"""The files a run's requests are rebuilt from and checked against, and their digests when the
run was staged.

The gate and the envelope guard never trust a request because it is on disk: each rebuilds what
it must be from the approved inputs (the campaign spec's copy, each locale's rendered content,
the validated audience) and compares, and holds what every recipient sees to the whole audience
(the snapshot and the suppressed: ``checks.audience_data``). Those inputs live in the run folder
too, so the freeze
records their SHA-256 in the outbox, in the transaction that stages the run
(``Outbox.staged_inputs``); every later reader checks the files it rebuilds from against that
record first (``check_inputs``). A run folder rewritten after staging (a content file edited, a
spec copy swapped, with the manifest's digests recomputed to match) is refused by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mailroom.batches import sha256_hex
from mailroom.content import LocaleContent
from mailroom.errors import EnvelopeViolation
from mailroom.staging import RunStaging, json_bytes


def rebuilt_from(staging: RunStaging, locales: Sequence[str]) -> list[Path]:
    """The files every request of the run is rebuilt from and checked against: the spec's copy,
    each locale's rendered content, the validated audience and the whole audience (the snapshot,
    and the suppressed when the extract left anyone out)."""
    return [
        staging.campaign_spec,
        *(staging.content_file(locale) for locale in dict.fromkeys(locales)),
        staging.valid_audience,
        *audience_files(staging),
    ]


def audience_files(staging: RunStaging) -> list[Path]:
    """Everyone the extract read: the snapshot, and the suppressed when there are any."""
    return [staging.snapshot, *([staging.suppressed] if staging.suppressed.exists() else [])]


def relative(staging: RunStaging, path: Path) -> str:
    """A file's name in the record: its path in the run folder."""
    return path.relative_to(staging.root).as_posix()


def input_digests(staging: RunStaging, locales: Sequence[str]) -> dict[str, str]:
    """The SHA-256 of each file the run is rebuilt from, by its path in the run folder."""
    return {relative(staging, path): file_sha256(path) for path in rebuilt_from(staging, locales)}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read a block at a time: the audience files grow with the
    audience, and a digest needs none of it held at once."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_digest(content: LocaleContent) -> str:
    """The SHA-256 the content file of ``content`` has (``staging.write_json`` of it): the gate
    compares the record with the content it renders itself."""
    return sha256_hex(json_bytes(content.to_dict()))


def check_inputs(staging: RunStaging, recorded: Mapping[str, str], paths: Iterable[Path]) -> None:
    """Refuse unless each of ``paths`` is, byte for byte, the file the run was staged from."""
    if not recorded:
        raise EnvelopeViolation(
            "the outbox records no inputs for this run: it was not staged by this release's "
            "freeze_batches, so what its requests are rebuilt from cannot be checked"
        )
    for path in paths:
        name = relative(staging, path)
        expected = recorded.get(name)
        if expected is None:
            raise EnvelopeViolation(f"{name} is not among the inputs the run was staged from")
        if not path.exists():
            raise EnvelopeViolation(f"{name}, which the run was staged from, is missing")
        if file_sha256(path) != expected:
            raise EnvelopeViolation(
                f"{name} is not the file the run was staged from (SHA-256 "
                f"{expected[:12]}… when staged): the run folder was rewritten after staging"
            )
