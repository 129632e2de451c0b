"""A deterministic sample users database for the demo and the tests.

It mixes in what real audiences contain: suppressed users, invalid and multi-address strings,
case and whitespace duplicates, IDN domains, names with quotes, markup and line breaks, and
locales in other spellings. It also knows, independently of the pipeline, exactly which
addresses should receive the message: the oracle the end-to-end checks compare against.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

FIRST_NAMES = {
    "en": ["Oliver", "Amelia", "Jack", "Isla", "Harry", "Ava", "O'Brien", "Zoë"],
    "de": ["Lukas", "Mia", "Jürgen", "Sophie", "Maximilian", "Greta", "Björn"],
    "fr": ["Léa", "Hugo", "Chloé", "Théo", "Élodie", "François", "Anaïs"],
    "es": ["Lucía", "Mateo", "Sofía", "Martín", "Begoña", "Iñaki", "Valentina"],
    "ja": ["陽翔", "結衣", "蓮", "さくら", "大翔", "美咲", "ゆうと"],
}
LOCALE_SPELLINGS = {
    "en": ["en", "en-GB", "en_US"],
    "de": ["de", "de-DE"],
    "fr": ["fr", "fr_FR"],
    "es": ["es", "es-ES"],
    "ja": ["ja", "ja_JP"],
}
DOMAINS = ["example.com", "example.org", "mail.example.net", "bücher.example", "例え.jp"]
TRICKY_NAMES = ["<b>Bold</b>", "Ann\r\nBcc: leak@example.com", 'Quote "Q" Person', "Ünïcödé ✨"]
INVALID_ADDRESSES = [
    "no-at-sign.example.com",
    "two@@example.com",
    "x@y.com, z@example.com",
    "semi;colon@example.com",
    "spaces in@example.com",
    "trailing@",
    "@example.com",
    "",
]


@dataclass(frozen=True)
class SampleAudience:
    path: Path
    users: int
    suppressed: int
    invalid: int  # rows validation must quarantine: a bad address, or a line break in a name
    duplicates: int
    expected: frozenset[str]  # lower-cased addresses that must receive the message exactly once

    def url(self) -> str:
        return f"sqlite:///{self.path}"


def generate(path: Path, users: int = 10_000, seed: int = 2019) -> SampleAudience:
    """Create (or replace) the SQLite users database at ``path``."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    rows: list[tuple[str, str, str, str]] = []
    suppressions: list[tuple[str, str]] = []
    expected: set[str] = set()
    invalid = duplicates = 0
    locales = list(FIRST_NAMES)
    for i in range(users):
        uid = f"u{i:08d}"
        language = locales[i % len(locales)]
        locale = rng.choice(LOCALE_SPELLINGS[language]) if i % 7 else language
        name = rng.choice(FIRST_NAMES[language]) if i % 97 else TRICKY_NAMES[i % len(TRICKY_NAMES)]
        domain = DOMAINS[i % len(DOMAINS)]
        email = f"user{i}@{domain}"
        roll = i % 100
        if roll == 13:  # an invalid or multi-address string: must be quarantined
            email = INVALID_ADDRESSES[(i // 100) % len(INVALID_ADDRESSES)]
            invalid += 1
        elif roll == 29 and i > 0:  # the same person again, spelled differently
            email = f"  USER{i - 1}@{DOMAINS[(i - 1) % len(DOMAINS)].upper()} "
            duplicates += 1
        elif roll in (41, 42):  # unsubscribed, bounced or complained
            suppressions.append(
                (
                    email.upper() if roll == 42 else email,
                    ["unsubscribed", "bounced", "complained"][i % 3],
                )
            )
        elif any(c in name for c in "\r\n"):  # a line break in a field: quarantined
            invalid += 1
        else:
            expected.add(_normalised_oracle(email))
        rows.append((uid, email, name, locale))
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE users (user_id TEXT PRIMARY KEY, email TEXT, first_name TEXT, "
            "locale TEXT, created_at TEXT DEFAULT CURRENT_TIMESTAMP)"
        )
        conn.execute("CREATE TABLE suppressions (email TEXT, reason TEXT)")
        conn.executemany(
            "INSERT INTO users (user_id, email, first_name, locale) VALUES (?,?,?,?)", rows
        )
        conn.executemany("INSERT INTO suppressions VALUES (?,?)", suppressions)
    return SampleAudience(path, users, len(suppressions), invalid, duplicates, frozenset(expected))


def _normalised_oracle(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local}@{domain.encode('idna').decode('ascii')}".lower()
