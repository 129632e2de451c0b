"""Who an earlier run of the same campaign already sent to: left out, unless a resend is asked.

Exactly-once holds per campaign, not only per run: a second trigger of a campaign must not mail
everyone again. ``build_envelopes`` asks the outbox for everyone the other runs of the campaign
sent to (``already_sent``) or left in doubt (``unknown_earlier``: the provider may have the
message) and builds no envelope for them, so every later stage (freeze, the gate, the guard, the
approval, the report) sees exactly the audience this run sends to. What was left out, and why,
is written to the run folder: ``audience/left_out.json`` (counts by reason and by earlier run,
and the resend choice; never an address) and ``audience/left_out.parquet`` (who, for
``not_sent.csv``, like the quarantine file).

A run triggered with ``resend_to_earlier_recipients`` and a reason leaves nobody out; the choice
and the reason are recorded in the same file, shown to the approver and staged with the run in
the outbox, whose ``claim`` otherwise refuses a batch holding anyone another run of the campaign
sent to after this run was built.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from mailroom.errors import ValidationFailed
from mailroom.staging import RunStaging, read_json, write_json

ALREADY_SENT = "already_sent"
UNKNOWN_EARLIER = "unknown_earlier"
REASONS = (ALREADY_SENT, UNKNOWN_EARLIER)
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class ResendChoice:
    """Whether the run sends again to people an earlier run of its campaign sent to, and why."""

    resend: bool = False
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"resend_to_earlier_recipients": self.resend, "resend_reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ResendChoice:
        data = data or {}
        return cls(bool(data.get("resend_to_earlier_recipients")), data.get("resend_reason"))


def resend_choice(resend: object, reason: object) -> ResendChoice:
    """The trigger's resend option, checked: a resend needs a reason (one line of text, which
    the approver reads and the outbox keeps), and a reason without the option is refused as a
    sign the option was meant but not set."""
    if resend not in (True, False, None):
        raise ValidationFailed(
            f"resend_to_earlier_recipients must be true or false, got {type(resend).__name__}"
        )
    text = "" if reason is None else reason
    if not isinstance(text, str):
        raise ValidationFailed(f"resend_reason must be text, got {type(reason).__name__}")
    text = text.strip()
    if not resend:
        if text:
            raise ValidationFailed(
                "resend_reason is given but resend_to_earlier_recipients is false: set it to "
                "true to send again to people an earlier run of this campaign sent to, or leave "
                "the reason empty"
            )
        return ResendChoice()
    if not text:
        raise ValidationFailed(
            "resend_to_earlier_recipients is true but resend_reason is empty: say why everyone "
            "an earlier run of this campaign sent to (or may have) should get it again"
        )
    if len(text) > MAX_REASON_CHARS or any(ch < " " or ch == "\x7f" for ch in text):
        raise ValidationFailed(
            f"resend_reason must be one line of at most {MAX_REASON_CHARS} characters without "
            "control characters"
        )
    return ResendChoice(True, text)


def left_out_json(st: RunStaging) -> Path:
    return st.audience_dir / "left_out.json"


def left_out_parquet(st: RunStaging) -> Path:
    return st.audience_dir / "left_out.parquet"


def earliest_reasons(outcomes: Iterable[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    """Per address key: why it is left out and the run behind that. ``sent`` anywhere wins
    over a doubt elsewhere (the person has it); among equals the first run key in order."""
    found: dict[str, tuple[str, str]] = {}
    for email, state, run_key in sorted(outcomes, key=lambda o: o[2]):
        reason = ALREADY_SENT if state == "sent" else UNKNOWN_EARLIER
        before = found.get(email)
        if before is None or (before[0] == UNKNOWN_EARLIER and reason == ALREADY_SENT):
            found[email] = (reason, run_key)
    return found


class EarlierRecipients:
    """``earliest_reasons`` of ``outcomes`` (the outbox's ``earlier_outcomes``), kept in a
    scratch SQLite file rather than in memory: a campaign that already reached ten million people
    has ten million of them, and ``build_envelopes`` asks about one chunk of the audience at a
    time (``reasons``). The file goes with ``close`` (or the end of a ``with`` block)."""

    def __init__(
        self,
        outcomes: Iterable[tuple[str, str, str]],
        *,
        directory: Path | None = None,
        chunk_rows: int = 50_000,
    ) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="mailroom-earlier-", dir=directory)
        self._db = sqlite3.connect(Path(self._folder.name) / "earlier.sqlite")
        try:
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-65536"):
                self._db.execute(f"PRAGMA {pragma}")
            # Per address key the earliest reason: "sent" anywhere first, then the first run key.
            self._db.execute(
                "CREATE TABLE found (email TEXT PRIMARY KEY, sent INTEGER NOT NULL, "
                "run_key TEXT NOT NULL) WITHOUT ROWID"
            )
            rows = iter(outcomes)
            while chunk := list(islice(rows, chunk_rows)):
                self._db.executemany(
                    "INSERT INTO found VALUES (?, ?, ?) ON CONFLICT (email) DO UPDATE SET "
                    "sent = excluded.sent, run_key = excluded.run_key "
                    "WHERE (excluded.sent, found.run_key) > (found.sent, excluded.run_key)",
                    ((email, int(state == "sent"), key) for email, state, key in chunk),
                )
            self._db.commit()
            self._count = int(self._db.execute("SELECT count(*) FROM found").fetchone()[0])
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self._count

    def reasons(self, keys: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Why each of ``keys`` (address keys) an earlier run reached is left out, and that run;
        keys no earlier run reached are not in it."""
        if not self._count or not keys:
            return {}
        found = self._db.execute(
            "SELECT f.email, f.sent, f.run_key FROM json_each(?) AS k "
            "CROSS JOIN found AS f ON f.email = k.value",
            (json.dumps(list(keys)),),
        )
        return {
            email: (ALREADY_SENT if sent else UNKNOWN_EARLIER, run_key)
            for email, sent, run_key in found
        }

    def close(self) -> None:
        self._db.close()
        self._folder.cleanup()

    def __enter__(self) -> EarlierRecipients:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def write_record(
    st: RunStaging,
    *,
    choice: ResendChoice,
    valid: int,
    left_out: Counter[str],
    by_run: Counter[str],
    would_leave_out: Counter[str],
    sending_run: str | None,
) -> dict[str, Any]:
    """``audience/left_out.json``: the resend choice, and counts only (no address)."""
    record = {
        **choice.to_dict(),
        "valid": valid,
        "left_out": {reason: int(left_out.get(reason, 0)) for reason in REASONS},
        "left_out_total": int(sum(left_out.values())),
        "left_out_by_earlier_run": dict(sorted((k, int(v)) for k, v in by_run.items())),
        # With a resend, whom the earlier runs would have kept out (all included here).
        "earlier_recipients_included": {
            reason: int(would_leave_out.get(reason, 0)) for reason in REASONS
        },
        "to_envelope": valid - int(sum(left_out.values())),
        "sending_run_when_built": sending_run,
    }
    write_json(left_out_json(st), record)
    return record


def read_record(st: RunStaging) -> dict[str, Any] | None:
    """The run's ``left_out.json``; None for a run built before campaign-level exactly-once."""
    path = left_out_json(st)
    return read_json(path) if path.exists() else None


def left_out_total(st: RunStaging) -> int:
    record = read_record(st)
    return int(record["left_out_total"]) if record else 0
