"""Unsubscribe tokens: ``<user id>.<signature>``, signed with the campaign's secret.

One token per recipient is one HMAC-SHA256, and both the envelope builder and the data-quality
gate (which recomputes every recipient's link rather than trust the builder) make one for every
recipient. In Python that is a few microseconds each, all of it holding the GIL; so the gate
starts ``TokensInBackground`` for the whole audience at once, in a process of its own, and does
its other work meanwhile.

``python -m mailroom.unsubscribe`` is that process: it reads one JSON request on stdin (never
the secret on its command line), reads the user ids from the named Parquet file, and writes the
tokens, in the file's row order, to the named Arrow IPC file.
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
from collections.abc import Sequence
from pathlib import Path

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
    """Every user's token of a Parquet file's ``user_id`` column, made in a second process
    while the caller goes on, and handed over as they are made: ``take(rows)`` waits only
    until the tokens of those rows have arrived.

    The worker makes them locale by locale in ``locales``' order (the order the bodies are
    frozen and read in), each locale's rows in file order, then the rest, and streams them in
    chunks with their row numbers. On a machine with one usable core, or for fewer than
    ``min_rows`` rows, nothing is started and the first ``take`` makes every token here. A
    worker that fails raises in ``take``: there is no silent fallback to tokens nobody made.
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
        self._position = np.full(rows, -1, dtype=np.int64)  # row → index into the chunks
        self._chunks: list[pa.Array] = []
        self._received = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stream: pa.ipc.RecordBatchStreamReader | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        if rows < min_rows or len(os.sched_getaffinity(0)) < 2:
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
            "locales": list(locales),
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

    def take(self, rows: np.ndarray) -> pa.Array:
        """The tokens of audience ``rows``, in that order."""
        if not self._chunks and self._process is None:
            import pyarrow.parquet as pq

            ids = pq.read_table(self.parquet, columns=["user_id"]).column("user_id")
            self._add(
                np.arange(len(ids), dtype=np.int64), token_column(self.secret, self.campaign, ids)
            )
        positions = self._position[rows] if len(rows) else np.empty(0, dtype=np.int64)
        while len(positions) and positions.min() < 0:
            self._receive()
            positions = self._position[rows]
        if not len(positions):
            return pa.array([], pa.string())
        return (
            pa.chunked_array(self._chunks, pa.string()).take(pa.array(positions)).combine_chunks()
        )

    def _add(self, rows: np.ndarray, tokens: pa.Array) -> None:
        self._position[rows] = self._received + np.arange(len(rows), dtype=np.int64)
        self._chunks.append(tokens)
        self._received += len(rows)

    def _receive(self) -> None:
        if self._process is None or self._process.stdout is None:
            raise RuntimeError("an audience row has no unsubscribe token")
        try:
            if self._stream is None:
                self._stream = pa.ipc.open_stream(self._process.stdout)
            batch = self._stream.read_next_batch()
        except (StopIteration, pa.ArrowInvalid, OSError) as exc:
            self._process.wait()
            errors = self._errors.read_text("utf-8", "replace").strip().splitlines()
            raise RuntimeError(
                f"the unsubscribe token worker stopped (exit {self._process.returncode}) "
                f"before every row had its token: {' | '.join(errors[-3:]) or exc}"
            ) from exc
        rows = batch.column(0).to_numpy()
        self._add(rows, batch.column(1))

    def close(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


_CHUNK_ROWS = 50_000


def _worker() -> int:
    """Read the request from stdin; stream (row, token) record batches to stdout."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    request = json.loads(sys.stdin.read())
    secret, campaign = bytes.fromhex(request["secret"]), request["campaign"]
    columns = pq.read_schema(request["parquet"]).names
    table = pq.read_table(
        request["parquet"], columns=[c for c in ("user_id", "locale") if c in columns]
    )
    ids = table.column("user_id").combine_chunks()
    order = []
    if "locale" in table.column_names and request["locales"]:
        locale = table.column("locale").combine_chunks()
        for name in request["locales"]:
            order.append(
                np.flatnonzero(
                    pc.fill_null(pc.equal(locale, name), False).to_numpy(zero_copy_only=False)
                )
            )
    taken = np.zeros(len(ids), dtype=bool)
    for rows in order:
        taken[rows] = True
    order.append(np.flatnonzero(~taken))
    schema = pa.schema([("row", pa.int64()), ("token", pa.string())])
    sink = pa.output_stream(sys.stdout.buffer)
    with pa.ipc.new_stream(sink, schema) as writer:
        for rows in order:
            for start in range(0, len(rows), _CHUNK_ROWS):
                chunk = rows[start : start + _CHUNK_ROWS]
                tokens = token_column(secret, campaign, ids.take(pa.array(chunk)))
                writer.write_batch(pa.record_batch([pa.array(chunk), tokens], schema=schema))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker())
