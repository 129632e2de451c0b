"""Unsubscribe tokens: ``<user id>.<signature>``, signed with the campaign's secret.

One token per recipient is one HMAC-SHA256, and both the envelope builder and the data-quality
gate (which recomputes every recipient's link rather than trust the builder) make one for every
recipient. In Python that is a microsecond or two each, all of it holding the GIL; so the gate
has them made ahead by ``TokensInBackground``, in a process of its own, and does its other work
meanwhile.

``python -m mailroom.unsubscribe`` is that process: it reads one JSON request on stdin (never
the secret on its command line), reads the user ids from the named Parquet file a batch at a
time, and writes the tokens of each named locale in turn to stdout, as an Arrow IPC stream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import pyarrow as pa

from mailroom.errors import ValidationFailed

log = logging.getLogger(__name__)

_HMAC_BLOCK = 64  # SHA-256's block size (RFC 2104)
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
_URLSAFE = bytes.maketrans(b"+/", b"-_")
# Below this many recipients a second process costs more than it saves.
BACKGROUND_MIN_ROWS = 50_000


def check_secret(secret: bytes) -> bytes:
    """``secret`` if it can sign unsubscribe links: not empty, not only whitespace."""
    if not secret or not secret.strip():
        raise ValidationFailed("the unsubscribe signing secret is empty: it signs every link")
    return secret


def unsubscribe_token(secret: bytes, campaign: str, user_id: str) -> str:
    """``<user id>.<signature>``: the unsubscribe endpoint can tell who, and that we issued it."""
    uid = base64.urlsafe_b64encode(user_id.encode("utf-8")).decode("ascii").rstrip("=")
    mac = hmac.new(secret, f"{campaign}\x00{user_id}".encode(), hashlib.sha256).digest()
    return f"{uid}.{base64.urlsafe_b64encode(mac[:16]).decode('ascii').rstrip('=')}"


def verify_unsubscribe_token(secret: bytes, campaign: str, token: str) -> str | None:
    """The user id a token was issued for, or ``None`` when it is not one of ours."""
    uid_part, _, _ = token.partition(".")
    try:
        user_id = base64.urlsafe_b64decode(uid_part + "=" * (-len(uid_part) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    expected = unsubscribe_token(secret, campaign, user_id)
    # Bytes, not str: compare_digest raises TypeError on a str with non-ASCII characters.
    return user_id if hmac.compare_digest(expected.encode(), token.encode()) else None


def unsubscribe_tokens(secret: bytes, campaign: str, user_ids: Sequence[str]) -> list[str]:
    """``unsubscribe_token`` for many users at once: the same tokens, a few times faster (one
    HMAC key schedule for all of them instead of one per user)."""
    key = hashlib.sha256(secret).digest() if len(secret) > _HMAC_BLOCK else secret
    key = key.ljust(_HMAC_BLOCK, b"\0")
    inner = hashlib.sha256(key.translate(_IPAD))
    inner.update(f"{campaign}\x00".encode())
    outer = hashlib.sha256(key.translate(_OPAD))
    b2a = binascii.b2a_base64
    tokens: list[bytes] = []
    append = tokens.append
    for user_id in user_ids:
        raw = user_id.encode("utf-8")
        mac = inner.copy()
        mac.update(raw)
        signed = outer.copy()
        signed.update(mac.digest())
        append(
            b2a(raw, newline=False).rstrip(b"=")
            + b"."
            + b2a(signed.digest()[:16], newline=False).rstrip(b"=")
        )
    if not tokens:
        return []
    # Base64 never holds a line break: translate the whole lot to the URL-safe alphabet at once.
    return b"\n".join(tokens).translate(_URLSAFE).decode("ascii").split("\n")


def token_column(secret: bytes, campaign: str, user_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``unsubscribe_token`` of every user id of a column (non-text ids as their ``str``)."""
    ids = user_ids.to_pylist()
    return pa.array(
        unsubscribe_tokens(secret, campaign, [u if type(u) is str else str(u) for u in ids]),
        pa.string(),
    )


class TokensInBackground:
    """Unsubscribe tokens of a Parquet file's rows (its ``user_id`` column), made ahead in a
    second process in the order the data-quality gate reads the audience
    (``checks.quality_gate.audience``): locale by locale in ``locales``' order, each locale's
    rows in file order. ``take(locale, rows, user_ids)`` hands over the tokens of a locale's
    next rows.

    The worker makes a few chunks ahead, then waits on the pipe while the caller is busy:
    neither process holds more than a few chunks of tokens, whatever the audience's size. Tokens
    are handed over in that order only: the worker's tokens of a locale before the one asked for
    are dropped (the caller has moved on), and any asked for otherwise (a locale the worker does
    not make or has dropped, rows out of its order) are made here, as is every later one of that
    locale: the tokens are the same either way, only where they are made differs. On a machine
    with one usable core, or for fewer than ``min_rows`` rows, nothing is started and every
    token is made here. A worker that fails raises in ``take``: there is no silent fallback to
    tokens nobody made.
    """

    def __init__(
        self,
        secret: bytes,
        campaign: str,
        parquet: Path,
        *,
        rows: int,
        locales: Sequence[str] = (),
        min_rows: int = BACKGROUND_MIN_ROWS,
    ) -> None:
        self.secret, self.campaign, self.parquet = secret, campaign, parquet
        self.locales = tuple(dict.fromkeys(locales))
        # Tokens received and not yet taken, by locale: (rows, tokens) chunks in the worker's
        # order, and how many; the locale the worker is at; the locales whose tokens are made
        # here from now on.
        self._waiting: dict[int, deque[tuple[np.ndarray, pa.Array]]] = {}
        self._held: dict[int, int] = {}
        self._at_part = -1
        self._passed: set[int] = set()
        self._process: subprocess.Popen[bytes] | None = None
        self._stream: pa.ipc.RecordBatchStreamReader | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        if rows < min_rows or not self.locales or len(os.sched_getaffinity(0)) < 2:
            return
        self._folder = tempfile.TemporaryDirectory(prefix="mailroom-tokens-")
        self._errors = Path(self._folder.name) / "stderr.txt"
        # This very package, whether installed or on a path of the caller's.
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        with self._errors.open("wb") as errors:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mailroom.unsubscribe"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                env={**os.environ, "PYTHONPATH": path},
            )
        request = {
            "secret": secret.hex(),
            "campaign": campaign,
            "parquet": str(parquet),
            "locales": list(self.locales),
        }
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(request).encode())
        self._process.stdin.close()

    @property
    def in_background(self) -> bool:
        return self._process is not None

    def __enter__(self) -> TokensInBackground:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def take(self, locale: str, rows: np.ndarray, user_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The tokens of ``user_ids``, the users of audience ``rows``: the next rows of
        ``locale`` in file order, as the worker makes them (else they are signed here)."""
        if self._process is not None and locale in self.locales and len(rows):
            made = self._from_worker(self.locales.index(locale), rows)
            if made is not None:
                return made
        return token_column(self.secret, self.campaign, user_ids)

    def _from_worker(self, part: int, rows: np.ndarray) -> pa.Array | None:
        """The worker's next tokens of locale ``part`` when they are those of ``rows``, else
        ``None`` (they are made here). Tokens of a locale the worker made before the one asked
        for are dropped, and made here should they be asked for after all."""
        if part in self._passed:
            return None
        while self._held.get(part, 0) < len(rows) and self._at_part <= part:
            received = self._receive()
            if received is None:
                self._at_part = len(self.locales)
                break
            chunk_part, chunk_rows, chunk_tokens = received
            self._at_part = chunk_part
            if chunk_part < part or chunk_part in self._passed:
                self._pass(chunk_part)
                continue
            self._waiting.setdefault(chunk_part, deque()).append((chunk_rows, chunk_tokens))
            self._held[chunk_part] = self._held.get(chunk_part, 0) + len(chunk_rows)
        if self._held.get(part, 0) < len(rows):
            self._pass(part)
            return None
        waiting = self._waiting[part]
        made_rows: list[np.ndarray] = []
        made: list[pa.Array] = []
        needed = len(rows)
        while needed:
            chunk_rows, chunk_tokens = waiting.popleft()
            if len(chunk_rows) > needed:
                waiting.appendleft((chunk_rows[needed:], chunk_tokens[needed:]))
                chunk_rows, chunk_tokens = chunk_rows[:needed], chunk_tokens[:needed]
            made_rows.append(chunk_rows)
            made.append(chunk_tokens)
            needed -= len(chunk_rows)
        self._held[part] -= len(rows)
        if not np.array_equal(np.concatenate(made_rows), rows):  # not in the worker's order
            self._pass(part)
            return None
        return pa.concat_arrays(made) if len(made) > 1 else made[0]

    def _pass(self, part: int) -> None:
        """Make every later token of locale ``part`` here; drop any of the worker's waiting."""
        self._passed.add(part)
        self._held.pop(part, None)
        self._waiting.pop(part, None)

    def _receive(self) -> tuple[int, np.ndarray, pa.Array] | None:
        """The worker's next chunk, ``None`` once it has made every token it makes."""
        assert self._process is not None
        assert self._process.stdout is not None
        try:
            if self._stream is None:
                self._stream = pa.ipc.open_stream(self._process.stdout)
            batch = self._stream.read_next_batch()
        except StopIteration:
            batch = None
        except (pa.ArrowInvalid, OSError) as exc:
            self._failed(exc)
        if batch is None:
            if self._process.wait() != 0:
                self._failed(None)
            return None
        part = batch.column(0)
        return int(part[0].as_py()) if len(part) else 0, batch.column(1).to_numpy(), batch.column(2)

    def _failed(self, exc: BaseException | None) -> NoReturn:
        assert self._process is not None
        self._process.wait()
        errors = self._errors.read_text("utf-8", "replace").strip().splitlines()
        raise RuntimeError(
            f"the unsubscribe token worker stopped (exit {self._process.returncode}) "
            f"before every row had its token: {' | '.join(errors[-3:]) or exc}"
        ) from exc

    def _stop(self) -> None:
        """Stop the worker; every token from now on is made here."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        self._stream = None
        self._waiting.clear()
        self._held.clear()

    def close(self) -> None:
        self._stop()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


_CHUNK_ROWS = 50_000
# Chunks of tokens the worker makes ahead of what the pipe takes: a pipe holds a few kilobytes,
# and a worker held back by it would make each chunk only once the caller waits for it.
_AHEAD_CHUNKS = 8


def _worker() -> int:
    """Read the request from stdin; stream (locale, row, token) record batches to stdout, each
    locale of the request in turn, its rows in file order, a file's batch at a time; a thread
    writes them while the next are made."""
    import queue
    import threading

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    request = json.loads(sys.stdin.read())
    secret, campaign = bytes.fromhex(request["secret"]), request["campaign"]
    # Read a page at a time: a row group can be the whole audience.
    parquet = pq.ParquetFile(request["parquet"], buffer_size=1 << 20, pre_buffer=False)
    missing = sorted({"user_id", "locale"} - set(parquet.schema_arrow.names))
    if missing:
        raise ValueError(f"{request['parquet']} has no {' nor '.join(missing)} column")
    schema = pa.schema([("locale", pa.int32()), ("row", pa.int64()), ("token", pa.string())])
    made: queue.Queue[pa.RecordBatch | None] = queue.Queue(maxsize=_AHEAD_CHUNKS)
    failed: list[BaseException] = []

    def write() -> None:
        try:
            with pa.ipc.new_stream(pa.output_stream(sys.stdout.buffer), schema) as writer:
                while (batch := made.get()) is not None:
                    writer.write_batch(batch)
        except BaseException as exc:  # the caller stopped reading: stop making tokens
            failed.append(exc)
            while made.get() is not None:
                pass

    def chunk(part: int, rows: list[np.ndarray], ids: list[pa.Array]) -> pa.RecordBatch:
        picked = np.concatenate(rows)
        tokens = token_column(secret, campaign, pa.chunked_array(ids))
        parts = pa.array(np.full(len(picked), part, dtype=np.int32))
        return pa.record_batch([parts, pa.array(picked), tokens], schema=schema)

    writing = threading.Thread(target=write, name="tokens-out")
    writing.start()
    try:
        for part, locale in enumerate(request["locales"]):
            start = 0
            rows: list[np.ndarray] = []
            ids: list[pa.Array] = []
            for batch in parquet.iter_batches(
                batch_size=_CHUNK_ROWS, columns=["user_id", "locale"]
            ):
                if failed:
                    break
                mine = pc.fill_null(pc.equal(batch.column(1), locale), False)
                rows.append(start + np.flatnonzero(mine.to_numpy(zero_copy_only=False)))
                ids.append(batch.column(0).filter(mine))
                start += batch.num_rows
                if sum(len(r) for r in rows) >= _CHUNK_ROWS:
                    made.put(chunk(part, rows, ids))
                    rows, ids = [], []
            if sum(len(r) for r in rows):
                made.put(chunk(part, rows, ids))
    finally:
        made.put(None)
        writing.join()
    if failed:
        raise failed[0]
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker())
