"""Where accepted mail-send requests are kept: in memory, or in ``<data_dir>/accepted.jsonl``.

The JSONL file is the contract with other processes (a test harness reads what a server started
by the CLI accepted), so it is written one flushed line per accepted request and is the only
copy when a data directory is given: memory holds just the byte offsets of each line, which keeps
a long bulk run from growing the server's memory with every body it accepted.
"""

import json
import logging
import secrets
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sendgrid_dev.errors import DevServerError
from sendgrid_dev.validation import iter_recipient_addresses

ACCEPTED_FILE_NAME = "accepted.jsonl"
# SendGrid's X-Message-Id is 22 URL-safe characters, i.e. 16 random bytes in unpadded base64.
_MESSAGE_ID_BYTES = 16

logger = logging.getLogger(__name__)

AcceptedRecord = dict[str, Any]


def new_message_id() -> str:
    return secrets.token_urlsafe(_MESSAGE_ID_BYTES)


def _new_record(body: dict[str, Any], size: int) -> AcceptedRecord:
    return {
        "message_id": new_message_id(),
        "received_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "size": size,
        "body": body,
    }


def _encode(record: AcceptedRecord, raw: bytes | None = None, *, utf8: bool = False) -> bytes:
    """One JSONL line. ``raw``: the request's own bytes, which parsed to ``record["body"]``:
    written as they came when they are one line of UTF-8 (reading the line back parses them
    again, to the same body), which spares encoding a large body a second time. ``utf8``: the
    caller already decoded ``raw`` as UTF-8, so that need not be done again here."""
    if raw is not None and _one_utf8_line(raw, utf8=utf8):
        head = {k: v for k, v in record.items() if k != "body"}
        encoded = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode()
        return encoded[:-1] + b',"body":' + raw.strip(b" \t") + b"}\n"
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _one_utf8_line(raw: bytes, *, utf8: bool = False) -> bool:
    if b"\n" in raw or b"\r" in raw or raw.startswith(b"\xef\xbb\xbf"):
        return False
    if utf8:
        return True
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class MessageStore(Protocol):
    """What the server needs from a place that keeps accepted requests, oldest first."""

    def append(
        self, body: dict[str, Any], size: int, raw: bytes | None = None, *, utf8: bool = False
    ) -> AcceptedRecord:
        """Keep ``body`` (``size`` bytes as received). ``raw``: the request's bytes, when they
        are what ``body`` was parsed from; ``utf8``: and they decoded as UTF-8."""
        ...

    def count(self) -> int: ...

    def page(self, offset: int, limit: int) -> list[AcceptedRecord]: ...

    def get(self, message_id: str) -> AcceptedRecord | None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Keeps every accepted request in memory; nothing survives the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[AcceptedRecord] = []
        self._positions: dict[str, int] = {}

    def append(
        self, body: dict[str, Any], size: int, raw: bytes | None = None, *, utf8: bool = False
    ) -> AcceptedRecord:
        record = _new_record(body, size)
        with self._lock:
            self._positions[record["message_id"]] = len(self._records)
            self._records.append(record)
        return record

    def count(self) -> int:
        with self._lock:
            return len(self._records)

    def page(self, offset: int, limit: int) -> list[AcceptedRecord]:
        with self._lock:
            return self._records[offset : offset + limit]

    def get(self, message_id: str) -> AcceptedRecord | None:
        with self._lock:
            position = self._positions.get(message_id)
            return None if position is None else self._records[position]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._positions.clear()

    def close(self) -> None:
        pass


class JsonlStore:
    """Appends each accepted request to ``accepted.jsonl`` and reads bodies back from it.

    An existing file is kept and indexed, so a restarted server still shows what it accepted
    before; ``clear`` (``DELETE /_dev/messages``) is the way to start over.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / ACCEPTED_FILE_NAME
        self._lock = threading.Lock()
        # (start, length) of each record's line, oldest first.
        self._spans: list[tuple[int, int]] = []
        self._positions: dict[str, int] = {}
        self._end = self._index_existing()
        self._writer = self.path.open("ab")

    def _index_existing(self) -> int:
        if not self.path.exists():
            self.path.touch()
            return 0
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            # A line without its newline is a write the server died in the middle of; that
            # request never got its 202, so it was never accepted.
            logger.warning(
                "dropping a torn final line (%d bytes) from %s", len(data) - complete, self.path
            )
            with self.path.open("r+b") as handle:
                handle.truncate(complete)
        start = 0
        for line_number, line in enumerate(data[:complete].splitlines(keepends=True), start=1):
            record = _decode_line(line, self.path, line_number)
            self._positions[record["message_id"]] = len(self._spans)
            self._spans.append((start, len(line)))
            start += len(line)
        return complete

    def append(
        self, body: dict[str, Any], size: int, raw: bytes | None = None, *, utf8: bool = False
    ) -> AcceptedRecord:
        """``raw``: the request's bytes, when they are what ``body`` was parsed from; ``utf8``:
        and they decoded as UTF-8."""
        record = _new_record(body, size)
        line = _encode(record, raw, utf8=utf8)
        with self._lock:
            self._writer.write(line)
            self._writer.flush()
            self._positions[record["message_id"]] = len(self._spans)
            self._spans.append((self._end, len(line)))
            self._end += len(line)
        return record

    def count(self) -> int:
        with self._lock:
            return len(self._spans)

    def page(self, offset: int, limit: int) -> list[AcceptedRecord]:
        with self._lock:
            spans = self._spans[offset : offset + limit]
        if not spans:
            return []
        first_start = spans[0][0]
        last_start, last_length = spans[-1]
        with self.path.open("rb") as handle:
            handle.seek(first_start)
            data = handle.read(last_start + last_length - first_start)
        return [
            _decode_line(line, self.path, offset + number + 1)
            for number, line in enumerate(data.splitlines())
        ]

    def get(self, message_id: str) -> AcceptedRecord | None:
        with self._lock:
            position = self._positions.get(message_id)
        return None if position is None else self.page(position, 1)[0]

    def clear(self) -> None:
        with self._lock:
            self._writer.seek(0)
            self._writer.truncate()
            self._spans.clear()
            self._positions.clear()
            self._end = 0

    def close(self) -> None:
        with self._lock:
            self._writer.close()


def open_store(data_dir: Path | None) -> MessageStore:
    return MemoryStore() if data_dir is None else JsonlStore(data_dir)


def _decode_line(line: bytes, path: Path, line_number: int) -> AcceptedRecord:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise DevServerError(f"{path} line {line_number} is not valid JSON: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("message_id"), str):
        raise DevServerError(f"{path} line {line_number} is not an accepted-request record")
    return record


def read_accepted(data_dir: Path) -> list[AcceptedRecord]:
    """Every request a server (possibly in another process) accepted into ``data_dir``.

    A final line without its newline is ignored for the same reason the server drops it on
    start: it is a write that never finished, so the request was never acknowledged.
    """
    path = Path(data_dir) / ACCEPTED_FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DevServerError(
            f"{path} does not exist; was a dev server started with --data-dir {data_dir}?"
        ) from None
    complete = data[: data.rfind(b"\n") + 1]
    return [
        _decode_line(line, path, number)
        for number, line in enumerate(complete.splitlines(), start=1)
    ]


def accepted_recipients(records: Iterable[AcceptedRecord]) -> list[str]:
    """Every to, cc and bcc address of every record, in order, duplicates kept so a caller can
    see that someone was sent the same message twice."""
    return [address for record in records for address in iter_recipient_addresses(record["body"])]
