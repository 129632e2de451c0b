"""Unsubscribe tokens: ``<key id>.<campaign>.<sealed user id>``, opaque, deterministic, and
verified against a ring of secrets so the secret can be rotated.

* ``key id``: six base64url characters of a SHA-256 of the secret that signed the token
  (``key_id``): which secret of the ring to verify it with; it shows nothing of the secret.
* ``campaign``: the campaign's name in clear (``[a-z0-9][a-z0-9_-]{0,63}``, never a ``.``).
* ``sealed``: base64url, unpadded, of AES-SIV (RFC 5297: deterministic, authenticated) of the
  user id's UTF-8, with a 64-byte key derived from the secret and the key id and the campaign
  as associated data. The user id is not readable without the secret; another campaign, key
  id or a changed character fails the SIV tag check (constant-time) and the token is refused.

Deterministic, because the envelope builder, the data-quality gate and the envelope guard each
make every recipient's link and must get the same one. ``UnsubscribeKeys`` is the ring of
secrets as ``MAILROOM_UNSUBSCRIBE_SECRETS`` (and the Airflow Variable
``mailroom_unsubscribe_secret``) give it, newest first: the newest signs new links, each of them
still verifies the links it signed.

``unsubscribe_tokens`` makes many at once, the same tokens as ``unsubscribe_token`` one by one:
it computes AES-SIV a batch of user ids of one length at a time, one AES call over the whole
batch per block (each batch's first token is checked against the library's AES-SIV), and
base64-encodes and assembles them with array operations: well under a microsecond a token. The
gate still has them made ahead by ``TokensInBackground``, in a process of its own, and does its
other work meanwhile.

``python -m mailroom.unsubscribe`` is that process: it reads one JSON request on stdin (never
the secret on its command line), reads the user ids from the named Parquet file a batch at a
time, and writes the tokens of each named locale in turn to stdout, as an Arrow IPC stream.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np
import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from mailroom.errors import ValidationFailed

log = logging.getLogger(__name__)
IntOrArray = TypeVar("IntOrArray", int, np.ndarray)

SECRETS_ENV = "MAILROOM_UNSUBSCRIBE_SECRETS"
KEY_ID_LENGTH = 6
SIV_TAG_BYTES = 16
# The longest token ``verify_unsubscribe_token`` looks at: anything longer is not one of ours
# (a user id of a few thousand characters), and is refused before any work.
MAX_TOKEN_LENGTH = 8192
# ``campaign_spec.NAME_PATTERN``, repeated so the token worker does not import the spec parser.
CAMPAIGN_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KEY_ID_LABEL = b"mailroom-unsubscribe-key-id\0"
_SIV_LABEL = b"mailroom-unsubscribe-siv\0"
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
# User ids sealed a batch at a time by ``unsubscribe_tokens``; a length with fewer ids than
# ``_ARRAY_MIN_IDS`` in a batch is sealed one id at a time (arrays cost more than they save).
_BATCH_IDS = 65_536
_ARRAY_MIN_IDS = 16
_NEWLINE = ord("\n")
# Below this many recipients a second process costs more than it saves.
BACKGROUND_MIN_ROWS = 50_000


def check_secret(secret: bytes) -> bytes:
    """``secret`` if it can sign unsubscribe links: not empty, not only whitespace."""
    if not secret or not secret.strip():
        raise ValidationFailed("the unsubscribe signing secret is empty: it signs every link")
    return secret


def key_id(secret: bytes) -> str:
    """The key id tokens signed with ``secret`` carry: a stable name of the secret that shows
    nothing of it."""
    return _sealer(secret).kid


def token_length(campaign: str, id_bytes: IntOrArray) -> IntOrArray:
    """The length of a token of ``campaign`` for a user id of ``id_bytes`` UTF-8 bytes (or of
    each of an array of them), whatever the secret: the key id, the campaign, two dots, and the
    unpadded base64 of the SIV tag and the ciphertext (as long as the user id)."""
    return KEY_ID_LENGTH + len(campaign) + 2 + (4 * (SIV_TAG_BYTES + id_bytes) + 2) // 3


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


class _Sealer:
    """One secret's key id and AES-SIV key (made once per secret: ``_sealer``)."""

    def __init__(self, secret: bytes) -> None:
        self.kid = _b64(hashlib.sha256(_KEY_ID_LABEL + secret).digest())[:KEY_ID_LENGTH]
        self.key = hashlib.sha512(_SIV_LABEL + secret).digest()
        self.siv = AESSIV(self.key)

    def seal(self, campaign: str, user_id: bytes) -> bytes:
        return self.siv.encrypt(user_id, [self.kid.encode("ascii"), campaign.encode("ascii")])

    def token(self, campaign: str, user_id: str) -> str:
        return f"{self.kid}.{campaign}.{_b64(self.seal(campaign, user_id.encode('utf-8')))}"


@functools.lru_cache(maxsize=32)
def _sealer(secret: bytes) -> _Sealer:
    return _Sealer(secret)


def _campaign(campaign: str) -> str:
    if not CAMPAIGN_PATTERN.fullmatch(campaign):
        raise ValueError(
            f"campaign name {campaign!r} cannot be in an unsubscribe token: "
            "use lower-case letters, digits, '_' and '-'"
        )
    return campaign


def unsubscribe_token(secret: bytes, campaign: str, user_id: str) -> str:
    """``<key id>.<campaign>.<sealed user id>``: the unsubscribe endpoint can tell who, for
    which campaign, and that we issued it; nobody else can read who."""
    return _sealer(secret).token(_campaign(campaign), user_id)


def verify_unsubscribe_token(secret: bytes, campaign: str, token: str) -> str | None:
    """The user id ``token`` was issued for by ``secret`` for ``campaign``, or ``None`` when it
    is not one of those (whatever the text: this never raises on what a client sends)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    kid, named, sealed = parts
    sealer = _sealer(secret)
    if kid != sealer.kid or named != campaign or not _BASE64URL.fullmatch(sealed):
        return None
    try:
        data = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    except (binascii.Error, ValueError):
        return None
    # One encoding only: a changed last character whose bits base64 drops decodes alike.
    if _b64(data) != sealed:
        return None
    try:
        user_id = sealer.siv.decrypt(data, [kid.encode("ascii"), named.encode("ascii")])
        return user_id.decode("utf-8")
    except (InvalidTag, ValueError):
        return None


def unsubscribe_tokens(secret: bytes, campaign: str, user_ids: Sequence[str]) -> list[str]:
    """``unsubscribe_token`` for many users at once: the same tokens, several times faster."""
    if not len(user_ids):
        return []
    made, _ = _tokens(secret, campaign, pa.array(user_ids, pa.string()), separator=True)
    # Every token ends in a line break (base64url has none): one decode, one split.
    return str(made.data[:-1], "ascii").split("\n")


def token_column(secret: bytes, campaign: str, user_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``unsubscribe_token`` of every user id of a column (non-text ids as their ``str``)."""
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks()
    if user_ids.null_count or not (
        pa.types.is_string(user_ids.type) or pa.types.is_large_string(user_ids.type)
    ):
        ids = user_ids.to_pylist()
        user_ids = pa.array([u if type(u) is str else str(u) for u in ids], pa.string())
    if not len(user_ids):
        return pa.array([], pa.string())
    made, starts = _tokens(secret, campaign, user_ids, separator=False)
    if starts[-1] >= 2**31:
        column = pa.Array.from_buffers(
            pa.large_string(), len(user_ids), [None, pa.py_buffer(starts), pa.py_buffer(made)]
        )
        return column.cast(pa.string())
    offsets = pa.py_buffer(starts.astype(np.int32))
    return pa.Array.from_buffers(pa.string(), len(user_ids), [None, offsets, pa.py_buffer(made)])


def _offsets(user_ids: pa.Array) -> np.ndarray:
    """Where each id of a string array without nulls starts in its data, and where the last
    ends."""
    width = np.int32 if pa.types.is_string(user_ids.type) else np.int64
    buffer = user_ids.buffers()[1]
    assert buffer is not None
    start = user_ids.offset
    return np.frombuffer(buffer, width)[start : start + len(user_ids) + 1].astype(np.int64)


def _tokens(
    secret: bytes, campaign: str, user_ids: pa.Array, *, separator: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of ``user_ids`` (a string array without nulls) one after another, each
    followed by a line break if ``separator``, and where each starts (and the last ends).
    A batch of ids at a time, the ids of one length together."""
    sealer = _sealer(secret)
    prefix = f"{sealer.kid}.{_campaign(campaign)}.".encode("ascii")
    data_buffer = user_ids.buffers()[2]
    data = (
        np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    )
    offsets = _offsets(user_ids)
    id_lengths = np.diff(offsets)
    sizes = token_length(campaign, id_lengths) + int(separator)
    starts = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=starts[1:])
    out = np.empty(int(starts[-1]), np.uint8)
    siv = _BatchSiv(sealer, campaign)
    prefix_row = np.frombuffer(prefix, np.uint8)
    for first in range(0, len(id_lengths), _BATCH_IDS):
        batch_lengths = id_lengths[first : first + _BATCH_IDS]
        low, high = int(batch_lengths.min()), int(batch_lengths.max())
        for n in [low] if low == high else np.unique(batch_lengths).tolist():
            rows = first + np.flatnonzero(batch_lengths == n)
            encoded = _base64url_rows(siv.seal(_gather(data, offsets[rows], n)))
            width = len(prefix) + encoded.shape[1] + int(separator)
            tokens = np.empty((len(rows), width), np.uint8)
            tokens[:, : len(prefix)] = prefix_row
            tokens[:, len(prefix) : len(prefix) + encoded.shape[1]] = encoded
            if separator:
                tokens[:, -1] = _NEWLINE
            _scatter(out, starts[rows], tokens)
    return out, starts


def _gather(data: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` bytes at each of ``starts``, one row each."""
    if n == 0:
        return np.zeros((len(starts), 0), np.uint8)
    if len(starts) > 1 and np.all(np.diff(starts) == n):  # back to back: a view
        first = int(starts[0])
        return data[first : first + n * len(starts)].reshape(len(starts), n)
    return data[starts[:, None] + np.arange(n)]


def _scatter(out: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> None:
    """Each row of ``rows`` into ``out`` at its start."""
    width = rows.shape[1]
    if len(starts) > 1 and np.all(np.diff(starts) == width):
        first = int(starts[0])
        out[first : first + width * len(starts)] = rows.reshape(-1)
    else:
        out[starts[:, None] + np.arange(width)] = rows


def _base64url_rows(rows: np.ndarray) -> np.ndarray:
    """Unpadded base64url of each row of an (n, width) byte array, one row each: the rows padded
    with zero bytes to whole 3-byte groups and encoded at once, each row's extra characters
    (the zero bytes') cut off."""
    count, width = rows.shape
    whole = -(-width // 3) * 3
    if whole != width:
        padded = np.zeros((count, whole), np.uint8)
        padded[:, :width] = rows
        rows = padded
    encoded = binascii.b2a_base64(np.ascontiguousarray(rows).tobytes(), newline=False)
    chars = np.frombuffer(encoded.translate(_URLSAFE), np.uint8).reshape(count, whole // 3 * 4)
    return chars[:, : (4 * width + 2) // 3]


def _dbl(block: bytes) -> bytes:
    """RFC 5297's doubling in GF(2^128)."""
    value = int.from_bytes(block, "big") << 1
    if value >> 128:
        value ^= 0x87
    return (value & ((1 << 128) - 1)).to_bytes(16, "big")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


class _BatchSiv:
    """AES-SIV (RFC 5297) of many plaintexts of one length at once, for one key and one set of
    associated data (the key id and the campaign): S2V's work on the associated data is done
    once, and each step of CMAC and of CTR is one AES-ECB call over every plaintext's block.
    ``seal`` checks its first result against the library's ``AESSIV``."""

    def __init__(self, sealer: _Sealer, campaign: str) -> None:
        self.sealer, self.campaign = sealer, campaign
        mac_key, ctr_key = sealer.key[:32], sealer.key[32:]
        self._mac = Cipher(algorithms.AES(mac_key), modes.ECB()).encryptor()
        self._ctr = Cipher(algorithms.AES(ctr_key), modes.ECB()).encryptor()
        # CMAC's subkeys (RFC 4493): for a last block that is whole, and for one padded.
        self._k1 = _dbl(self._aes_mac(bytes(16)))
        self._k2 = _dbl(self._k1)
        d = self._cmac(bytes(16))
        for associated in (sealer.kid.encode("ascii"), campaign.encode("ascii")):
            d = _xor(_dbl(d), self._cmac(associated))
        self._d = np.frombuffer(d, np.uint8)
        # What a plaintext shorter than a block is folded with: dbl(D), then CMAC's subkey.
        self._short = np.frombuffer(_xor(_dbl(d), self._k1), np.uint8)

    def _aes_mac(self, block: bytes) -> bytes:
        return self._mac.update(block)

    def _cmac(self, message: bytes) -> bytes:
        """AES-CMAC of one short message (the associated data)."""
        blocks = [message[i : i + 16] for i in range(0, len(message), 16)] or [b""]
        last = blocks[-1]
        if len(last) == 16:
            blocks[-1] = _xor(last, self._k1)
        else:
            blocks[-1] = _xor(last + b"\x80" + bytes(15 - len(last)), self._k2)
        state = bytes(16)
        for block in blocks:
            state = self._aes_mac(_xor(state, block))
        return state

    def _ecb(self, encryptor: CipherContext, blocks: np.ndarray) -> np.ndarray:
        """AES of each 16-byte block of ``blocks``, in one call."""
        done = encryptor.update(np.ascontiguousarray(blocks).tobytes())
        return np.frombuffer(done, np.uint8).reshape(blocks.shape)

    def seal(self, plaintexts: np.ndarray) -> np.ndarray:
        """``V || C`` of each row of an (m, n) byte array: its SIV tag and its ciphertext."""
        count, n = plaintexts.shape
        if count < _ARRAY_MIN_IDS:
            sealed = b"".join(self.sealer.seal(self.campaign, row.tobytes()) for row in plaintexts)
            return np.frombuffer(sealed, np.uint8).reshape(count, 16 + n)
        # S2V's last step: the plaintext with D folded in, then CMAC of that.
        if n >= 16:
            blocks = -(-n // 16)
            t = np.zeros((count, blocks * 16), np.uint8)
            t[:, :n] = plaintexts
            t[:, n - 16 : n] ^= self._d
            if n % 16:
                t[:, n] = 0x80
                t[:, -16:] ^= np.frombuffer(self._k2, np.uint8)
            else:
                t[:, -16:] ^= np.frombuffer(self._k1, np.uint8)
            v = np.zeros((count, 16), np.uint8)
            for i in range(blocks):
                v = self._ecb(self._mac, v ^ t[:, i * 16 : (i + 1) * 16])
        else:
            padded = self._short.copy()
            padded[n] ^= 0x80
            t = np.tile(padded, (count, 1))
            t[:, :n] ^= plaintexts
            v = self._ecb(self._mac, t)
        out = np.empty((count, 16 + n), np.uint8)
        out[:, :16] = v
        if n:
            # CTR from V with bit 31 of its last two 32-bit words cleared (RFC 5297 2.6): the
            # counter's last word never carries into the others.
            counter = v.copy()
            counter[:, 8] &= 0x7F
            counter[:, 12] &= 0x7F
            low = counter[:, 12:].copy().view(">u4")
            stream = np.empty((count, -(-n // 16) * 16), np.uint8)
            for i in range(-(-n // 16)):
                counter[:, 12:] = (low + np.uint32(i)).astype(">u4").view(np.uint8)
                stream[:, i * 16 : (i + 1) * 16] = self._ecb(self._ctr, counter)
            out[:, 16:] = plaintexts ^ stream[:, :n]
        if self.sealer.seal(self.campaign, plaintexts[0].tobytes()) != out[0].tobytes():
            raise RuntimeError("unsubscribe tokens: the batch AES-SIV differs from the library's")
        return out


@dataclass(frozen=True, repr=False)
class UnsubscribeKeys:
    """The secrets unsubscribe tokens are signed and verified with, newest first: the newest
    signs new links, every one of them verifies the links it signed (a rotated-out secret stays
    in the list until its links have expired). Shown as their key ids, never the secrets."""

    secrets: tuple[bytes, ...]
    _by_kid: dict[str, bytes] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ValidationFailed(
                "no unsubscribe secret: give at least one (newest first, separated by commas "
                "or line breaks)"
            )
        by_kid: dict[str, bytes] = {}
        first_of: dict[str, int] = {}
        for number, secret in enumerate(self.secrets, 1):
            check_secret(secret)
            kid = key_id(secret)
            if kid in by_kid:
                raise ValidationFailed(
                    f"unsubscribe secrets {first_of[kid]} and {number} of the list are the same "
                    f"secret (key id {kid}): give each secret once"
                )
            by_kid[kid] = secret
            first_of[kid] = number
        object.__setattr__(self, "_by_kid", by_kid)

    @classmethod
    def parse(cls, text: str) -> UnsubscribeKeys:
        """The secrets of ``MAILROOM_UNSUBSCRIBE_SECRETS``' format: newest first, separated by
        commas or line breaks, surrounding whitespace stripped, blank entries ignored."""
        entries = (entry.strip() for entry in re.split(r"[,\n]", text))
        return cls(tuple(e.encode("utf-8", "surrogateescape") for e in entries if e))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> UnsubscribeKeys:
        text = environ.get(SECRETS_ENV, "")
        if not text.strip():
            raise ValidationFailed(
                f"{SECRETS_ENV} is not set: it holds the unsubscribe secrets, newest first, "
                "separated by commas"
            )
        try:
            return cls.parse(text)
        except ValidationFailed as exc:
            raise ValidationFailed(f"{SECRETS_ENV}: {exc}") from None

    @property
    def newest(self) -> bytes:
        """The secret new links are signed with."""
        return self.secrets[0]

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._by_kid)

    def sign(self, campaign: str, user_id: str) -> str:
        return unsubscribe_token(self.newest, campaign, user_id)

    def verify(self, token: str) -> tuple[str, str] | None:
        """``(campaign, user id)`` of a token one of the secrets signed, else ``None`` (an
        unknown key id, a changed character, anything else: never an exception)."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return None
        parts = token.split(".")
        if len(parts) != 3:
            return None
        secret = self._by_kid.get(parts[0])
        if secret is None:
            return None
        user_id = verify_unsubscribe_token(secret, parts[1], token)
        return None if user_id is None else (parts[1], user_id)

    def __repr__(self) -> str:
        return f"UnsubscribeKeys(kids={self.kids!r})"


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
