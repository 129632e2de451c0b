"""Unsubscribe tokens: ``<key id>.<campaign>.<AES-SIV of the user id>``, opaque, deterministic,
refused when any character changes, and verified against a ring of secrets (rotation); the batch
maker gives exactly the tokens made one by one; ``mailroom unsubscribe-link``; and tokens made
in a second process are the tokens made here, row for row, in the order the data-quality gate
asks for them and in any other (then made here)."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom import unsubscribe
from mailroom.campaign_spec import NAME_PATTERN, load_campaign
from mailroom.cli.main import main
from mailroom.envelopes import envelope_values
from mailroom.errors import ValidationFailed
from mailroom.substitutions import substitution_tag
from mailroom.unsubscribe import (
    SECRETS_ENV,
    TokensInBackground,
    UnsubscribeKeys,
    check_secret,
    key_id,
    token_column,
    token_length,
    unsubscribe_token,
    unsubscribe_tokens,
    verify_unsubscribe_token,
)

pytestmark = pytest.mark.unit
SECRET = b"tokens-secret"
CAMPAIGN = "winter_update"
INCLUDE = Path(__file__).resolve().parents[2] / "include"
NEW, OLD = "the-newest-unsubscribe-secret", "the-older-unsubscribe-secret"
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Ids that are prefixes of each other, and not ASCII.
USER_IDS = ["u00000042", "u0000004", "u00000042x", "ユーザー42", "ユーザー4", "alice@example.com"]
PROPERTIES = settings(max_examples=150, deadline=None, database=None)


def audience_file(path: Path, rows: int, *, user_ids: list[object] | None = None) -> Path:
    """Rows of several locales, interleaved, some without one."""
    locales = ["de", "en", None, "ja", "en", "fr"]
    table = pa.table(
        {
            "user_id": user_ids if user_ids is not None else [f"ü-{i}" for i in range(rows)],
            "email": [f"user{i}@example.com" for i in range(rows)],
            "locale": [locales[i % len(locales)] for i in range(rows)],
        }
    )
    pq.write_table(table, path)
    return path


def rows_of(path: Path, locale: str) -> tuple[np.ndarray, pa.Array]:
    """The rows of ``locale`` in file order, and their user ids."""
    table = pq.read_table(path)
    rows = np.flatnonzero(table.column("locale").to_numpy(zero_copy_only=False) == locale)
    return rows, table.column("user_id").take(pa.array(rows))


def take_in_steps(
    background: TokensInBackground, path: Path, locale: str, step: int
) -> list[str | None]:
    rows, ids = rows_of(path, locale)
    tokens: list[str | None] = []
    for start in range(0, len(rows), step):
        tokens += background.take(
            locale, rows[start : start + step], ids.slice(start, step)
        ).to_pylist()
    return tokens


def test_tokens_from_the_worker_are_the_tokens_made_here(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 120_003)
    ids = pq.read_table(path).column("user_id")
    expected = token_column(SECRET, CAMPAIGN, ids).to_pylist()
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=len(ids), locales=("en", "de", "fr"), min_rows=0
    )
    try:
        assert background.in_background
        # In the worker's order, in steps that do not match its chunks.
        for locale, step in (("en", 7_001), ("de", 65_536), ("fr", 1)):
            rows, _ = rows_of(path, locale)
            if locale == "fr":
                rows = rows[:3]
                tokens = [
                    background.take(
                        locale, rows[i : i + 1], ids.take(pa.array(rows[i : i + 1]))
                    ).to_pylist()[0]
                    for i in range(len(rows))
                ]
            else:
                tokens = take_in_steps(background, path, locale, step)
            assert tokens == [expected[i] for i in rows]
        assert background.in_background
    finally:
        background.close()
    assert expected[0] == unsubscribe_token(SECRET, CAMPAIGN, "ü-0")


def test_tokens_asked_for_out_of_the_workers_order_are_made_here(tmp_path: Path) -> None:
    """A locale the worker has passed, rows it skipped, a locale it does not make: the same
    tokens, made here."""
    path = audience_file(tmp_path / "valid.parquet", 30_000)
    ids = pq.read_table(path).column("user_id")
    expected = token_column(SECRET, CAMPAIGN, ids).to_pylist()
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=len(ids), locales=("en", "de", "fr"), min_rows=0
    )
    try:
        de, de_ids = rows_of(path, "de")
        assert background.take("de", de[:10], de_ids[:10]).to_pylist() == [
            expected[i] for i in de[:10]
        ]
        en, en_ids = rows_of(path, "en")  # the worker made every "en" token before "de"
        assert background.take("en", en[:10], en_ids[:10]).to_pylist() == [
            expected[i] for i in en[:10]
        ]
        # Rows of "de" it made for nobody: skipped.
        assert background.take("de", de[20:30], de_ids[20:30]).to_pylist() == [
            expected[i] for i in de[20:30]
        ]
        ja, ja_ids = rows_of(path, "ja")
        assert background.take("ja", ja[:5], ja_ids[:5]).to_pylist() == [
            expected[i] for i in ja[:5]
        ]
        fr, fr_ids = rows_of(path, "fr")
        assert background.take("fr", fr, fr_ids).to_pylist() == [expected[i] for i in fr]
    finally:
        background.close()

    # "fr" asked for first: the worker's "en" tokens are dropped, and "en" is made here.
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=len(ids), locales=("en", "fr"), min_rows=0
    )
    try:
        fr, fr_ids = rows_of(path, "fr")
        assert background.take("fr", fr[:5], fr_ids[:5]).to_pylist() == [
            expected[i] for i in fr[:5]
        ]
        assert take_in_steps(background, path, "en", 999) == [
            expected[i] for i in rows_of(path, "en")[0]
        ]
        assert background.in_background
    finally:
        background.close()


def test_ids_that_are_not_text_are_signed_as_their_text(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 10, user_ids=list(range(100, 110)))
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=10, locales=("en",), min_rows=0)
    try:
        rows, ids = rows_of(path, "en")
        tokens = background.take("en", rows, ids).to_pylist()
    finally:
        background.close()
    assert tokens == [unsubscribe_token(SECRET, CAMPAIGN, str(100 + i)) for i in rows]


def test_small_audiences_are_signed_in_this_process(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 50)
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=50, locales=("en",))
    assert not background.in_background
    ids = pq.read_table(path).column("user_id")
    rows = np.array([3, 1])
    assert background.take("en", rows, ids.take(pa.array(rows))).to_pylist() == [
        unsubscribe_token(SECRET, CAMPAIGN, ids[3].as_py()),
        unsubscribe_token(SECRET, CAMPAIGN, ids[1].as_py()),
    ]


def test_a_worker_that_fails_is_an_error_not_missing_tokens(tmp_path: Path) -> None:
    path = tmp_path / "no_user_ids.parquet"
    pq.write_table(pa.table({"email": ["a@example.com"] * 3, "locale": ["en"] * 3}), path)
    background = TokensInBackground(SECRET, CAMPAIGN, path, rows=3, locales=("en",), min_rows=0)
    try:
        with pytest.raises(RuntimeError, match=r"token worker stopped .*exit 1.*user_id"):
            background.take("en", np.arange(3), pa.array(["a", "b", "c"]))
    finally:
        background.close()


def test_the_worker_makes_only_a_few_chunks_ahead_of_the_caller(tmp_path: Path) -> None:
    """The worker is held back by what the caller has taken, not by the audience's size: here
    it stops a few chunks in, while nothing is taken."""
    path = audience_file(tmp_path / "valid.parquet", 1_500_000)
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=1_500_000, locales=("en", "de", "fr", "ja"), min_rows=0
    )
    try:
        process = background._process
        assert process is not None
        time.sleep(3)
        assert process.poll() is None  # still waiting to hand over the rest
    finally:
        background.close()


def test_closing_stops_the_worker_and_removes_its_files(tmp_path: Path) -> None:
    path = audience_file(tmp_path / "valid.parquet", 200_000)
    background = TokensInBackground(
        SECRET, CAMPAIGN, path, rows=200_000, locales=("en",), min_rows=0
    )
    process = background._process
    folder = background._folder
    assert process is not None
    assert folder is not None
    background.close()
    assert process.poll() is not None
    assert not Path(folder.name).exists()
    background.close()  # twice is fine


@pytest.mark.parametrize("secret", [b"", b"   ", b"\t\n"])
def test_an_empty_signing_secret_is_refused(secret: bytes) -> None:
    with pytest.raises(ValidationFailed, match="the unsubscribe signing secret is empty"):
        check_secret(secret)


def test_a_signing_secret_is_returned_as_given() -> None:
    assert check_secret(b" s3cret ") == b" s3cret "


# --- the token --------------------------------------------------------------------------------
def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_a_token_is_the_key_id_the_campaign_and_the_user_id_sealed_with_aes_siv() -> None:
    """The format, from its definition: anyone holding the secret can read a token with a
    stock AES-SIV."""
    token = unsubscribe_token(SECRET, CAMPAIGN, "u00000042")
    kid, campaign, sealed = token.split(".")
    digest = hashlib.sha256(b"mailroom-unsubscribe-key-id\0" + SECRET).digest()
    assert kid == base64.urlsafe_b64encode(digest).decode()[:6] == key_id(SECRET)
    assert campaign == CAMPAIGN
    assert "=" not in sealed
    siv = AESSIV(hashlib.sha512(b"mailroom-unsubscribe-siv\0" + SECRET).digest())
    assert siv.decrypt(_unb64(sealed), [kid.encode(), campaign.encode()]) == b"u00000042"
    assert len(token) == token_length(CAMPAIGN, len(b"u00000042"))
    assert unsubscribe_token(SECRET, CAMPAIGN, "u00000042") == token  # deterministic
    assert verify_unsubscribe_token(SECRET, CAMPAIGN, token) == "u00000042"


@pytest.mark.parametrize("user_id", USER_IDS)
def test_a_token_shows_nothing_of_the_user_id(user_id: str) -> None:
    for secret in (SECRET, b"another secret"):
        token = unsubscribe_token(secret, CAMPAIGN, user_id)
        assert user_id not in token
        assert user_id.lower() not in token.lower()
        for part in token.split("."):
            for start in range(4):  # every alignment of the base64
                try:
                    decoded = _unb64(part[start:])
                except ValueError:
                    continue
                assert user_id.encode() not in decoded
        assert verify_unsubscribe_token(secret, CAMPAIGN, token) == user_id


def test_the_tokens_of_ids_that_are_prefixes_of_each_other_share_nothing_but_their_prefix() -> None:
    tokens = [unsubscribe_token(SECRET, CAMPAIGN, u) for u in ("u4", "u42", "u420", "u4200")]
    sealed = [t.split(".")[2] for t in tokens]
    for i, a in enumerate(sealed):
        for b in sealed[i + 1 :]:
            assert a[:4] != b[:4]
    assert len({t.rpartition(".")[0] for t in tokens}) == 1  # key id and campaign


def _changed_by_one_character(token: str) -> set[str]:
    changed = set()
    for i, char in enumerate(token):
        for other in BASE64URL + ".é":
            if other != char:
                changed.add(token[:i] + other + token[i + 1 :])
        changed.add(token[:i] + token[i + 1 :])
        changed.add(token[:i] + "A" + token[i:])
    changed.add(token + "A")
    return changed - {token}


@pytest.mark.parametrize("user_id", ["u00000042", "ユーザー42", ""])
def test_changing_any_one_character_of_a_token_fails_verification(user_id: str) -> None:
    token = unsubscribe_token(SECRET, CAMPAIGN, user_id)
    keys = UnsubscribeKeys((SECRET,))
    assert keys.verify(token) == (CAMPAIGN, user_id)
    changed = _changed_by_one_character(token)
    assert len(changed) > 60 * len(token)
    for forged in changed:
        assert verify_unsubscribe_token(SECRET, CAMPAIGN, forged) is None, forged
        assert keys.verify(forged) is None, forged


def test_a_token_of_one_campaign_does_not_verify_for_another() -> None:
    token = unsubscribe_token(SECRET, "spring-sale", "u00000042")
    keys = UnsubscribeKeys((SECRET,))
    assert verify_unsubscribe_token(SECRET, "summer_sale", token) is None
    kid, _, sealed = token.split(".")
    relabelled = f"{kid}.summer_sale.{sealed}"
    assert verify_unsubscribe_token(SECRET, "summer_sale", relabelled) is None
    assert keys.verify(relabelled) is None
    assert keys.verify(token) == ("spring-sale", "u00000042")


def test_a_token_of_another_secret_or_an_unknown_key_id_does_not_verify() -> None:
    keys = UnsubscribeKeys.parse(NEW)
    stranger = unsubscribe_token(b"a secret we never had", CAMPAIGN, "u00000042")
    assert keys.verify(stranger) is None
    assert verify_unsubscribe_token(NEW.encode(), CAMPAIGN, stranger) is None
    # Our key id on a stranger's seal: the seal does not verify with our key.
    ours = f"{key_id(NEW.encode())}.{stranger.split('.', 1)[1]}"
    assert keys.verify(ours) is None


def test_rotation_the_newest_signs_and_every_listed_secret_verifies() -> None:
    keys = UnsubscribeKeys.parse(f"{NEW},{OLD}")
    assert keys.newest == NEW.encode()
    assert keys.kids == (key_id(NEW.encode()), key_id(OLD.encode()))
    signed = keys.sign(CAMPAIGN, "ユーザー42")
    assert signed == unsubscribe_token(NEW.encode(), CAMPAIGN, "ユーザー42")
    assert signed.startswith(key_id(NEW.encode()) + ".")
    old_token = unsubscribe_token(OLD.encode(), CAMPAIGN, "u00000042")
    assert keys.verify(signed) == (CAMPAIGN, "ユーザー42")
    assert keys.verify(old_token) == (CAMPAIGN, "u00000042")
    # Before the rotation, the old secret alone knows nothing of the new one's tokens.
    before = UnsubscribeKeys.parse(OLD)
    assert before.verify(old_token) == (CAMPAIGN, "u00000042")
    assert before.verify(signed) is None
    # After the old secret is dropped, its tokens no longer verify.
    assert UnsubscribeKeys.parse(NEW).verify(old_token) is None


def test_the_secrets_list_is_read_as_the_variable_and_the_environment_hold_it() -> None:
    keys = UnsubscribeKeys.parse(f"  {NEW} ,\n\n{OLD}\r\n, ,")
    assert keys.secrets == (NEW.encode(), OLD.encode())
    assert UnsubscribeKeys.parse(f"{NEW}\n{OLD}\n") == keys
    assert NEW not in repr(keys)
    assert OLD not in repr(keys)
    assert key_id(NEW.encode()) in repr(keys)


@pytest.mark.parametrize("text", ["", "   ", ",", " , ,\n,", "\n\n"])
def test_a_secrets_list_without_a_secret_is_refused(text: str) -> None:
    with pytest.raises(ValidationFailed, match="no unsubscribe secret: give at least one"):
        UnsubscribeKeys.parse(text)


def test_a_secret_given_twice_is_refused_without_showing_it() -> None:
    with pytest.raises(ValidationFailed) as refused:
        UnsubscribeKeys.parse(f"{NEW}, {OLD}, {NEW} ")
    message = str(refused.value)
    assert message == (
        f"unsubscribe secrets 1 and 3 of the list are the same secret (key id "
        f"{key_id(NEW.encode())}): give each secret once"
    )
    assert NEW not in message
    with pytest.raises(ValidationFailed, match="the unsubscribe signing secret is empty"):
        UnsubscribeKeys((NEW.encode(), b"  "))


def test_the_secrets_come_from_the_environment_variable() -> None:
    assert SECRETS_ENV == "MAILROOM_UNSUBSCRIBE_SECRETS"
    keys = UnsubscribeKeys.from_env({SECRETS_ENV: f"{NEW},{OLD}"})
    assert keys.secrets == (NEW.encode(), OLD.encode())
    for environ in ({}, {SECRETS_ENV: ""}, {SECRETS_ENV: " \n "}):
        with pytest.raises(ValidationFailed, match=f"^{SECRETS_ENV} is not set"):
            UnsubscribeKeys.from_env(environ)
    with pytest.raises(ValidationFailed, match=f"^{SECRETS_ENV}: no unsubscribe secret"):
        UnsubscribeKeys.from_env({SECRETS_ENV: ", ,"})
    with pytest.raises(ValidationFailed, match=f"^{SECRETS_ENV}: unsubscribe secrets 1 and 2") as e:
        UnsubscribeKeys.from_env({SECRETS_ENV: f"{NEW},{NEW}"})
    assert NEW not in str(e.value)


GARBAGE = [
    "",
    ".",
    "..",
    "...",
    "a.b.c",
    "a.b.c.d",
    "not a token",
    "A" * 100_000,
    "A" * 6 + "." + CAMPAIGN + "." + "A" * 100_000,
    "é.é.é",
    "\x00.\x00.\x00",
    "\ud800",
]


@pytest.mark.parametrize("token", GARBAGE)
def test_garbage_never_verifies_and_never_raises(token: str) -> None:
    keys = UnsubscribeKeys.parse(f"{NEW},{OLD}")
    assert keys.verify(token) is None
    assert verify_unsubscribe_token(NEW.encode(), CAMPAIGN, token) is None
    prefix = f"{key_id(NEW.encode())}.{CAMPAIGN}."
    assert keys.verify(prefix + token) is None


@PROPERTIES
@given(text=st.text(max_size=200))
def test_arbitrary_text_never_verifies_and_never_raises(text: str) -> None:
    keys = UnsubscribeKeys.parse(NEW)
    prefix = f"{key_id(NEW.encode())}.{CAMPAIGN}."
    for token in (text, prefix + text):
        assert keys.verify(token) is None
        assert verify_unsubscribe_token(NEW.encode(), CAMPAIGN, token) is None


@PROPERTIES
@given(user_id=st.text(max_size=80), campaign=st.from_regex(NAME_PATTERN, fullmatch=True))
def test_every_token_verifies_as_its_user_and_campaign(user_id: str, campaign: str) -> None:
    keys = UnsubscribeKeys.parse(f"{NEW},{OLD}")
    token = keys.sign(campaign, user_id)
    assert keys.verify(token) == (campaign, user_id)
    assert verify_unsubscribe_token(NEW.encode(), campaign, token) == user_id
    assert len(token) == token_length(campaign, len(user_id.encode()))


@PROPERTIES
@given(user_ids=st.lists(st.text(max_size=40), max_size=40), secret=st.binary(max_size=80))
def test_the_batch_maker_gives_the_tokens_made_one_by_one(
    user_ids: list[str], secret: bytes
) -> None:
    expected = [unsubscribe_token(secret, CAMPAIGN, u) for u in user_ids]
    assert unsubscribe_tokens(secret, CAMPAIGN, user_ids) == expected
    assert token_column(secret, CAMPAIGN, pa.array(user_ids, pa.string())).to_pylist() == expected


@PROPERTIES
@given(stem=st.text(max_size=70), count=st.integers(16, 40))
def test_the_batch_maker_gives_the_tokens_made_one_by_one_for_many_ids_of_a_length(
    stem: str, count: int
) -> None:
    """Many ids of one length are sealed as arrays, not one by one: the same tokens."""
    user_ids = [f"{stem}{i:03d}" for i in range(count)]
    expected = [unsubscribe_token(SECRET, CAMPAIGN, u) for u in user_ids]
    assert unsubscribe_tokens(SECRET, CAMPAIGN, user_ids) == expected


def test_the_batch_maker_gives_the_tokens_made_one_by_one_for_every_length() -> None:
    """Every id length up to a few AES blocks (0, under one block, whole blocks, more), many
    ids of each, interleaved, ASCII and not, across a batch boundary, sliced and large."""
    rng = np.random.default_rng(7)
    user_ids = []
    for n in range(0, 100):
        for i in range(20):
            text = "".join(rng.choice(list("abcXYZ019_-@.")) for _ in range(n))
            user_ids.append(text if i % 2 else text[: max(0, n - 3)] + ("ü" if n >= 3 else ""))
    order = rng.permutation(len(user_ids))
    user_ids = [user_ids[i] for i in order]
    expected = [unsubscribe_token(SECRET, CAMPAIGN, u) for u in user_ids]
    assert unsubscribe_tokens(SECRET, CAMPAIGN, user_ids) == expected
    column = pa.array(user_ids, pa.string())
    assert token_column(SECRET, CAMPAIGN, column).to_pylist() == expected
    assert token_column(SECRET, CAMPAIGN, column.slice(5, 300)).to_pylist() == expected[5:305]
    chunked = pa.chunked_array([column.slice(0, 7), column.slice(7)])
    assert token_column(SECRET, CAMPAIGN, chunked).to_pylist() == expected
    large = pa.array(user_ids, pa.large_string())
    assert token_column(SECRET, CAMPAIGN, large).to_pylist() == expected
    many = [f"u{i:08d}" for i in range(unsubscribe._BATCH_IDS + 5)] + ["ユーザー42"] * 20
    made = unsubscribe_tokens(SECRET, CAMPAIGN, many)
    for i in (0, 1, unsubscribe._BATCH_IDS - 1, unsubscribe._BATCH_IDS, len(many) - 1):
        assert made[i] == unsubscribe_token(SECRET, CAMPAIGN, many[i])
    assert token_column(SECRET, CAMPAIGN, pa.array([None, 7, 42])).to_pylist() == [
        unsubscribe_token(SECRET, CAMPAIGN, u) for u in ("None", "7", "42")
    ]
    assert token_column(SECRET, CAMPAIGN, pa.array(["x", None])).to_pylist() == [
        unsubscribe_token(SECRET, CAMPAIGN, u) for u in ("x", "None")
    ]
    assert unsubscribe_tokens(SECRET, CAMPAIGN, []) == []
    assert token_column(SECRET, CAMPAIGN, pa.array([], pa.string())).to_pylist() == []


def test_a_batch_that_differs_from_the_librarys_aes_siv_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = unsubscribe._Sealer.seal

    def other(self: unsubscribe._Sealer, campaign: str, user_id: bytes) -> bytes:
        return real(self, campaign, user_id + b"!")[: 16 + len(user_id)]

    monkeypatch.setattr(unsubscribe._Sealer, "seal", other)
    with pytest.raises(RuntimeError, match="differs from the library"):
        unsubscribe_tokens(SECRET, CAMPAIGN, [f"u{i:08d}" for i in range(20)])


def test_a_campaign_name_that_cannot_be_in_a_token_is_refused() -> None:
    assert unsubscribe.CAMPAIGN_PATTERN.pattern == NAME_PATTERN.pattern
    for name in ("winter.update", "Winter", "", "a" * 65):
        with pytest.raises(ValueError, match="cannot be in an unsubscribe token"):
            unsubscribe_token(SECRET, name, "u1")
        with pytest.raises(ValueError, match="cannot be in an unsubscribe token"):
            unsubscribe_tokens(SECRET, name, ["u1"])
        assert verify_unsubscribe_token(SECRET, name, "x.y.z") is None


# --- mailroom unsubscribe-link ----------------------------------------------------------------
@pytest.fixture
def link_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRETS_ENV, f"{NEW},{OLD}")
    monkeypatch.setenv("MAILROOM_INCLUDE_DIR", str(INCLUDE))


def test_the_command_prints_the_users_link_as_the_campaigns_messages_carry_it(
    link_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["unsubscribe-link", CAMPAIGN, "ユーザー42"]) == 0
    out, err = capsys.readouterr()
    spec = load_campaign(INCLUDE / "campaigns", CAMPAIGN)
    subs, _ = envelope_values(spec, NEW.encode(), {"user_id": "ユーザー42"})
    assert out == subs[substitution_tag("unsubscribe_url", html=False)] + "\n"
    assert err == ""
    before, _, after = spec.unsubscribe.url_template.partition("{token}")
    token = out.strip().removeprefix(before).removesuffix(after)
    assert UnsubscribeKeys.parse(f"{NEW},{OLD}").verify(token) == (CAMPAIGN, "ユーザー42")
    assert "ユーザー42" not in out


@pytest.mark.parametrize(
    ("argv", "environ", "error"),
    [
        (["nope", "u1"], {}, "unknown campaign 'nope' (known: winter_update)"),
        (["../winter_update", "u1"], {}, "campaign name '../winter_update' is not valid"),
        ([CAMPAIGN, ""], {}, "the user id is empty"),
        ([CAMPAIGN, "  "], {}, "the user id is empty"),
        ([CAMPAIGN, "u1"], {SECRETS_ENV: None}, f"{SECRETS_ENV} is not set"),
        ([CAMPAIGN, "u1"], {SECRETS_ENV: " "}, f"{SECRETS_ENV} is not set"),
        ([CAMPAIGN, "u1"], {SECRETS_ENV: f"{NEW},{NEW}"}, "are the same secret"),
    ],
)
def test_the_command_refuses_what_it_cannot_sign(
    link_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str | None],
    error: str,
) -> None:
    for name, value in environ.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    assert main(["unsubscribe-link", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mailroom unsubscribe-link: ")
    assert error in err
    assert NEW not in err


def test_the_command_reads_the_campaigns_folder_it_is_given(
    link_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "campaigns").mkdir()
    source = (INCLUDE / "campaigns" / f"{CAMPAIGN}.yaml").read_text()
    url = load_campaign(INCLUDE / "campaigns", CAMPAIGN).unsubscribe.url_template
    moved = source.replace(url, "https://elsewhere.test/leave?t={token}&from=mail")
    (tmp_path / "campaigns" / f"{CAMPAIGN}.yaml").write_text(moved)
    assert main(["unsubscribe-link", CAMPAIGN, "u1", "--include-dir", str(tmp_path)]) == 0
    token = unsubscribe_token(NEW.encode(), CAMPAIGN, "u1")
    assert capsys.readouterr().out == f"https://elsewhere.test/leave?t={token}&from=mail\n"
