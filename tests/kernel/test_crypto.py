"""The key ring: sealed data keys, encryption at rest, hmac keys, EdDSA tokens, the master key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel import sql
from tenfold.kernel.clock import ManualClock
from tenfold.kernel.crypto import (
    KEY_FILE,
    MAX_JWT_LENGTH,
    PURPOSES,
    CryptoError,
    JwtError,
    KeyRing,
    master_key,
)
from tenfold.settings import SettingsError, load_settings
from tests.backends import SqliteTemplate
from tests.conftest import make_settings

MASTER = bytes(range(32))
FAR_FUTURE = 4_000_000_000  # 2096


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(autouse=True)
def no_secret_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENFOLD_SECRET_KEY", raising=False)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = sql.create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def ring(engine: AsyncEngine, clock: ManualClock) -> KeyRing:
    return await KeyRing.open(engine, MASTER, clock)


async def table(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(sa.text("SELECT * FROM crypto_keys"))
        return [dict(row) for row in result.mappings()]


async def unsealed(engine: AsyncEngine, master: bytes = MASTER) -> dict[str, bytes]:
    """Every data key, unsealed here independently of the ring: nonce + AES-GCM(master),
    with `<key id>:<purpose>` as associated data."""
    found = {}
    for row in await table(engine):
        sealed = bytes(row["material"])
        aad = f"{row['key_id']}:{row['purpose']}".encode()
        found[row["key_id"]] = AESGCM(master).decrypt(sealed[:12], sealed[12:], aad)
    return found


async def private_key(engine: AsyncEngine, key_id: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes((await unsealed(engine))[key_id])


def sign_raw(private: Ed25519PrivateKey, header: dict[str, Any], payload: bytes) -> str:
    signing_input = f"{b64(orjson.dumps(header))}.{b64(payload)}"
    return f"{signing_input}.{b64(private.sign(signing_input.encode()))}"


def reason(ring: KeyRing, token: Any, now: float, leeway: float = 0) -> str:
    with pytest.raises(JwtError) as caught:
        ring.verify_jwt(token, now=now, leeway=leeway)
    return caught.value.reason


# --- opening -----------------------------------------------------------------------------------


async def test_open_creates_one_key_per_purpose(ring: KeyRing, engine: AsyncEngine) -> None:
    rows = await table(engine)
    assert sorted(row["purpose"] for row in rows) == ["aead", "hmac", "jwt"]
    for purpose in PURPOSES:
        (key_id,) = ring.key_ids(purpose)
        assert key_id.startswith("k_") and len(key_id) == 10
    jwt_row = next(row for row in rows if row["purpose"] == "jwt")
    assert orjson.loads(jwt_row["public_jwk"]) == ring.jwks()["keys"][0]
    assert all(row["public_jwk"] is None for row in rows if row["purpose"] != "jwt")
    assert all(row["retired_at"] is None for row in rows)


async def test_reopening_reuses_the_keys(ring: KeyRing, engine: AsyncEngine) -> None:
    key_id, blob = ring.encrypt(b"kept")
    again = await KeyRing.open(engine, MASTER)
    assert again.decrypt(key_id, blob) == b"kept"
    assert len(await table(engine)) == 3


async def test_concurrent_opens_end_with_one_primary_per_purpose(db_url: str) -> None:
    engines = [sql.create_engine(db_url) for _ in range(4)]
    try:
        rings = await asyncio.gather(*(KeyRing.open(e, MASTER) for e in engines))
        rows = await table(engines[0])
    finally:
        for e in engines:
            await e.dispose()
    assert sorted(row["purpose"] for row in rows) == ["aead", "hmac", "jwt"]
    for purpose in PURPOSES:
        assert {tuple(r.key_ids(purpose)) for r in rings} == {(rings[0].key_ids(purpose)[0],)}


async def test_a_process_that_read_an_empty_table_takes_the_keys_another_added(
    ring: KeyRing, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_reload = KeyRing.reload
    calls = 0

    async def reload_seeing_nothing_first(self: KeyRing) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:  # the first read happened before `ring` committed its keys
            await real_reload(self)

    monkeypatch.setattr(KeyRing, "reload", reload_seeing_nothing_first)
    late = await KeyRing.open(engine, MASTER)
    assert calls == 2
    for purpose in PURPOSES:
        assert late.key_ids(purpose) == ring.key_ids(purpose)
    assert len(await table(engine)) == 3


async def test_a_different_master_key_cannot_open_the_ring(
    ring: KeyRing, engine: AsyncEngine
) -> None:
    with pytest.raises(CryptoError, match="master key is not the one that sealed it"):
        await KeyRing.open(engine, bytes(32))


async def test_the_master_key_must_be_32_bytes(engine: AsyncEngine) -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        await KeyRing.open(engine, b"short")


async def test_the_database_holds_no_plaintext_key_material(
    ring: KeyRing, engine: AsyncEngine
) -> None:
    await ring.rotate("aead")
    await ring.rotate("jwt")
    keys = await unsealed(engine)
    assert len(keys) == 5
    assert keys[ring.hmac_key()[0]] == ring.hmac_key()[1]
    dump = repr(await table(engine)).encode()
    stored = b"".join(bytes(row["material"]) for row in await table(engine))
    for secret in [*keys.values(), MASTER]:
        assert len(secret) == 32
        for form in (secret, secret.hex().encode(), b64(secret).encode(), secret[:16]):
            assert form not in dump
            assert form not in stored


async def test_repr_shows_key_ids_only(ring: KeyRing, engine: AsyncEngine) -> None:
    text = repr(ring)
    assert ring.key_ids("aead")[0] in text
    for secret in (await unsealed(engine)).values():
        assert secret.hex() not in text and b64(secret) not in text


# --- encryption at rest ------------------------------------------------------------------------


async def test_encrypt_round_trips_with_the_primary_key(ring: KeyRing) -> None:
    key_id, blob = ring.encrypt(b"secret record", b"sessions:s_1")
    assert key_id == ring.key_ids("aead")[0]
    assert len(blob) == 12 + len(b"secret record") + 16
    assert b"secret record" not in blob
    assert ring.decrypt(key_id, blob, b"sessions:s_1") == b"secret record"
    assert ring.encrypt(b"secret record", b"sessions:s_1")[1] != blob  # a fresh nonce each time
    assert ring.decrypt(*ring.encrypt(b"")) == b""


@pytest.mark.parametrize("position", [0, 11, 12, 20, -1])
async def test_a_tampered_ciphertext_does_not_decrypt(ring: KeyRing, position: int) -> None:
    key_id, blob = ring.encrypt(b"a record of some length")
    altered = bytearray(blob)
    altered[position] ^= 0x01
    with pytest.raises(CryptoError, match="altered"):
        ring.decrypt(key_id, bytes(altered))


async def test_the_wrong_aad_or_key_or_length_does_not_decrypt(
    ring: KeyRing, engine: AsyncEngine
) -> None:
    key_id, blob = ring.encrypt(b"record", b"user:1")
    calls: list[Callable[[], bytes]] = [
        lambda: ring.decrypt(key_id, blob, b"user:2"),
        lambda: ring.decrypt(key_id, blob),
        lambda: ring.decrypt("k_00000000", blob, b"user:1"),
        lambda: ring.decrypt(ring.hmac_key()[0], blob, b"user:1"),
        lambda: ring.decrypt(key_id, blob[:27], b"user:1"),
    ]
    errors = []
    for call in calls:
        with pytest.raises(CryptoError) as caught:
            call()
        errors.append(str(caught.value))
    assert "aad" in errors[0]
    assert "unknown aead key 'k_00000000'" in errors[2]
    assert "is a hmac key" in errors[3]
    assert "too short" in errors[4]
    for secret in (await unsealed(engine)).values():
        for message in errors:
            assert secret.hex() not in message and b64(secret) not in message
            assert repr(secret)[2:-1] not in message


async def test_rotation_keeps_old_ciphertext_readable_until_the_key_is_retired(
    ring: KeyRing,
) -> None:
    old_id, old_blob = ring.encrypt(b"before")
    new_id = await ring.rotate("aead")
    assert new_id != old_id
    assert ring.key_ids("aead") == [new_id, old_id]
    key_id, blob = ring.encrypt(b"after")
    assert key_id == new_id
    assert ring.decrypt(old_id, old_blob) == b"before"
    assert ring.decrypt(new_id, blob) == b"after"

    await ring.retire(old_id)
    with pytest.raises(CryptoError, match="retired"):
        ring.decrypt(old_id, old_blob)
    assert ring.key_ids("aead") == [new_id]
    assert ring.key_ids("aead", include_retired=True) == [new_id, old_id]
    await ring.retire(old_id)  # retiring twice is harmless
    assert ring.decrypt(new_id, blob) == b"after"


async def test_the_primary_key_cannot_be_retired(ring: KeyRing) -> None:
    primary = ring.key_ids("aead")[0]
    with pytest.raises(CryptoError, match="primary aead key; rotate first"):
        await ring.retire(primary)
    with pytest.raises(CryptoError, match="no key"):
        await ring.retire("k_nothere")
    assert ring.key_ids("aead") == [primary]


async def test_rotate_refuses_an_unknown_purpose(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="unknown key purpose"):
        await ring.rotate("rsa")  # type: ignore[arg-type]


async def test_another_process_sees_a_rotation_after_reload(
    ring: KeyRing, engine: AsyncEngine
) -> None:
    other = await KeyRing.open(engine, MASTER)
    new_id = await ring.rotate("aead")
    key_id, blob = ring.encrypt(b"new")
    with pytest.raises(CryptoError, match="reload"):
        other.decrypt(key_id, blob)
    await other.reload()
    assert other.decrypt(key_id, blob) == b"new"
    assert other.encrypt(b"x")[0] == new_id


# --- hmac keys ---------------------------------------------------------------------------------


async def test_hmac_keys_rotate_and_stay_available_by_id(ring: KeyRing) -> None:
    old_id, old_key = ring.hmac_key()
    assert len(old_key) == 32
    new_id = await ring.rotate("hmac")
    assert ring.hmac_key() == (new_id, ring.hmac_key(new_id)[1])
    assert ring.hmac_key(old_id) == (old_id, old_key)
    assert ring.hmac_key()[1] != old_key
    with pytest.raises(CryptoError, match="unknown hmac key"):
        ring.hmac_key("k_ffffffff")
    await ring.retire(old_id)
    with pytest.raises(CryptoError, match="retired"):
        ring.hmac_key(old_id)


# --- access tokens -----------------------------------------------------------------------------


async def test_a_signed_token_verifies(ring: KeyRing, clock: ManualClock) -> None:
    now = clock.now()
    claims = {"sub": "user_1", "sid": "s_1", "iat": now, "exp": now + 900, "roles": ["a"]}
    token = ring.sign_jwt(claims)
    header, _, signature = token.split(".")
    assert "=" not in token
    assert orjson.loads(base64.urlsafe_b64decode(header + "==")) == {
        "alg": "EdDSA",
        "typ": "JWT",
        "kid": ring.key_ids("jwt")[0],
    }
    assert len(base64.urlsafe_b64decode(signature + "==")) == 64
    assert ring.verify_jwt(token, now=now) == claims
    assert ring.verify_jwt(token, now=now) == claims  # the cached header path


async def test_expiry_and_not_before(ring: KeyRing, clock: ManualClock) -> None:
    start = clock.now()
    token = ring.sign_jwt({"sub": "u", "nbf": start + 10, "exp": start + 60})
    assert reason(ring, token, clock.now()) == "not_yet_valid"
    assert ring.verify_jwt(token, now=clock.now(), leeway=10)["sub"] == "u"
    clock.advance(10)
    assert ring.verify_jwt(token, now=clock.now())["sub"] == "u"
    clock.advance(49.999)
    assert ring.verify_jwt(token, now=clock.now())["sub"] == "u"
    clock.advance(0.001)
    assert reason(ring, token, clock.now()) == "expired"
    assert ring.verify_jwt(token, now=clock.now(), leeway=5)["sub"] == "u"
    clock.advance(5)
    assert reason(ring, token, clock.now(), leeway=5) == "expired"


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "u"},
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": None},
        {"exp": FAR_FUTURE, "nbf": "x"},
    ],
)
async def test_exp_is_required_and_numeric(
    ring: KeyRing, clock: ManualClock, claims: dict[str, Any]
) -> None:
    assert reason(ring, ring.sign_jwt(claims), clock.now()) == "malformed"


@pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b'"exp"', b""])
async def test_claims_must_be_a_json_object(
    ring: KeyRing, engine: AsyncEngine, clock: ManualClock, payload: bytes
) -> None:
    kid = ring.key_ids("jwt")[0]
    private = await private_key(engine, kid)
    token = sign_raw(private, {"alg": "EdDSA", "typ": "JWT", "kid": kid}, payload)
    assert reason(ring, token, clock.now()) == "malformed"


async def test_alg_none_and_hs256_are_refused(
    ring: KeyRing, engine: AsyncEngine, clock: ManualClock
) -> None:
    kid = ring.key_ids("jwt")[0]
    claims = b64(orjson.dumps({"sub": "admin", "exp": FAR_FUTURE}))
    valid_signature = ring.sign_jwt({"sub": "admin", "exp": FAR_FUTURE}).rsplit(".", 1)[1]
    for alg in ("none", "None", "NONE"):
        header = b64(orjson.dumps({"alg": alg, "typ": "JWT", "kid": kid}))
        assert reason(ring, f"{header}.{claims}.", clock.now()) == "bad_signature"
        assert reason(ring, f"{header}.{claims}.{valid_signature}", clock.now()) == "bad_signature"
    # The classic confusion: HMAC keyed with the public key everyone can fetch from the JWKS.
    x = base64.urlsafe_b64decode(ring.jwks()["keys"][0]["x"] + "=")
    for secret in (x, ring.jwks()["keys"][0]["x"].encode()):
        header = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}))
        mac = hmac.new(secret, f"{header}.{claims}".encode(), hashlib.sha256).digest()
        assert reason(ring, f"{header}.{claims}.{b64(mac)}", clock.now()) == "bad_signature"


async def test_header_rules(ring: KeyRing, engine: AsyncEngine, clock: ManualClock) -> None:
    kid = ring.key_ids("jwt")[0]
    private = await private_key(engine, kid)
    claims = orjson.dumps({"exp": FAR_FUTURE})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"alg": "EdDSA", "kid": kid, "crit": ["b64"], "b64": False}, "malformed"),
        ({"alg": "EdDSA", "kid": 7}, "malformed"),
        ({"kid": kid}, "malformed"),
        ({"alg": "EdDSA"}, "unknown_key"),
        ({"alg": "EdDSA", "kid": "k_00000000"}, "unknown_key"),
    ]
    for header, why in cases:
        assert reason(ring, sign_raw(private, header, claims), clock.now()) == why
    # A key that is not this ring's, naming one of its kids, does not verify.
    stranger = Ed25519PrivateKey.generate()
    token = sign_raw(stranger, {"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims)
    assert reason(ring, token, clock.now()) == "bad_signature"


async def test_an_old_token_verifies_after_rotation_until_its_key_is_retired(
    ring: KeyRing, engine: AsyncEngine, clock: ManualClock
) -> None:
    other = await KeyRing.open(engine, MASTER)
    old_kid = ring.key_ids("jwt")[0]
    old = ring.sign_jwt({"sub": "u", "exp": clock.now() + 900})
    new_kid = await ring.rotate("jwt")
    new = ring.sign_jwt({"sub": "u", "exp": clock.now() + 900})
    assert new.split(".")[0] != old.split(".")[0]
    assert [key["kid"] for key in ring.jwks()["keys"]] == [new_kid, old_kid]
    for token in (old, new):
        assert ring.verify_jwt(token, now=clock.now())["sub"] == "u"
    assert reason(other, new, clock.now()) == "unknown_key"  # until it reloads

    await ring.retire(old_kid)
    assert reason(ring, old, clock.now()) == "unknown_key"
    assert ring.verify_jwt(new, now=clock.now())["sub"] == "u"
    assert [key["kid"] for key in ring.jwks()["keys"]] == [new_kid]
    assert other.verify_jwt(old, now=clock.now())["sub"] == "u"  # until it reloads
    await other.reload()
    assert reason(other, old, clock.now()) == "unknown_key"
    assert other.verify_jwt(new, now=clock.now())["sub"] == "u"


async def test_jwks_lists_public_keys_only(ring: KeyRing, engine: AsyncEngine) -> None:
    (key,) = ring.jwks()["keys"]
    assert key == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": key["x"],
        "kid": ring.key_ids("jwt")[0],
        "use": "sig",
        "alg": "EdDSA",
    }
    private = await private_key(engine, key["kid"])
    assert base64.urlsafe_b64decode(key["x"] + "=") == private.public_key().public_bytes_raw()
    ring.jwks()["keys"][0]["kid"] = "changed by a caller"
    assert ring.jwks() == {"keys": [key]}


async def test_tokens_interoperate_with_pyjwt(
    ring: KeyRing, engine: AsyncEngine, clock: ManualClock
) -> None:
    claims = {"sub": "user_1", "iat": int(clock.now()), "exp": FAR_FUTURE}
    public = jwt.PyJWKSet.from_dict(ring.jwks())[ring.key_ids("jwt")[0]].key
    token = ring.sign_jwt(claims)
    assert jwt.decode(token, public, algorithms=["EdDSA"]) == claims
    assert jwt.get_unverified_header(token)["kid"] == ring.key_ids("jwt")[0]

    kid = ring.key_ids("jwt")[0]
    theirs = jwt.encode(
        claims, await private_key(engine, kid), algorithm="EdDSA", headers={"kid": kid}
    )
    assert ring.verify_jwt(theirs, now=clock.now()) == claims


# --- malformed tokens --------------------------------------------------------------------------


async def test_malformed_tokens(ring: KeyRing, clock: ManualClock) -> None:
    token = ring.sign_jwt({"sub": "u", "exp": FAR_FUTURE})
    header, payload, signature = token.split(".")
    now = clock.now()
    for cut in range(len(token)):
        assert reason(ring, token[:cut], now) == "malformed", cut
    for bad in [
        "",
        ".",
        "..",
        f"{header}.{payload}",
        f"{header}.{payload}.{signature}.",
        f"{header}.{payload}.{signature}.{signature}",
        f"{header}.{payload}.{signature}==",
        f"{header}.{payload}=.{signature}",
        f"{header}.{payload[:-1]}!.{signature}",
        f"{header}.{payload[:-1]}é.{signature}",
        f"{header}.{payload}.{signature[:-1]}+",
        f"{header}==.{payload}.{signature}",
        f"{header[:-1]}*.{payload}.{signature}",
        f"WzFd.{payload}.{signature}",  # [1]
        f"{header}. {payload}.{signature}",
        "a" * (MAX_JWT_LENGTH + 1),
        f"{header}.{'A' * 10_000_000}.{signature}",
        b"bytes.are.not_a_token",
        None,
    ]:
        assert reason(ring, bad, now) == "malformed", bad


async def test_the_signature_has_one_spelling(ring: KeyRing, clock: ManualClock) -> None:
    token = ring.sign_jwt({"exp": FAR_FUTURE})
    last = token[-1]
    assert last in "AQgw"
    # The last character holds 2 bits of the signature and 4 unused ones; decoders ignore those,
    # so these spellings would otherwise verify too.
    siblings = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"]
    index = siblings.index(last)
    for other in siblings[index + 1 : index + 16]:
        assert reason(ring, token[:-1] + other, clock.now()) == "malformed"


@pytest.fixture(scope="module")
def fuzz_ring(
    sqlite_template: SqliteTemplate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KeyRing, str]]:
    url = sqlite_template.clone(tmp_path_factory.mktemp("fuzz") / "tenfold.db")

    async def make() -> KeyRing:
        engine = sql.create_engine(url)
        try:
            return await KeyRing.open(engine, MASTER)
        finally:
            await engine.dispose()

    ring = asyncio.run(make())
    yield ring, ring.sign_jwt({"sub": "u", "exp": FAR_FUTURE})


TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=400), st.text(alphabet=TOKEN_CHARS, max_size=400)))
def test_random_strings_are_malformed(fuzz_ring: tuple[KeyRing, str], text: str) -> None:
    ring, _ = fuzz_ring
    with pytest.raises(JwtError) as caught:
        ring.verify_jwt(text, now=1_700_000_000)
    assert caught.value.reason == "malformed"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_no_altered_token_verifies(fuzz_ring: tuple[KeyRing, str], data: st.DataObject) -> None:
    ring, token = fuzz_ring
    position = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.sampled_from(TOKEN_CHARS).filter(lambda c: c != token[position]))
    altered = token[:position] + char + token[position + 1 :]
    with pytest.raises(JwtError) as caught:
        ring.verify_jwt(altered, now=1_700_000_000)
    assert caught.value.reason in ("malformed", "bad_signature", "unknown_key")


# --- the master key ----------------------------------------------------------------------------


def test_embedded_mode_creates_a_private_key_file_once(tmp_path: Path) -> None:
    settings = make_settings(data_dir=str(tmp_path / "data"), database_url="")
    path = tmp_path / "data" / KEY_FILE
    assert not path.exists()
    first = master_key(settings)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert base64.urlsafe_b64decode(text.strip()) == first
    assert master_key(settings) == first
    assert path.read_text() == text
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temporary file left


def test_a_key_file_written_by_another_process_is_used(tmp_path: Path) -> None:
    key = os.urandom(32)
    (tmp_path / KEY_FILE).write_text(base64.urlsafe_b64encode(key).decode())
    assert master_key(make_settings(data_dir=str(tmp_path), database_url="")) == key


def test_a_damaged_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not a key\n")
    with pytest.raises(SettingsError, match=r"secret\.key: not a master key"):
        master_key(make_settings(data_dir=str(tmp_path), database_url=""))


def test_the_secret_key_setting_wins(tmp_path: Path) -> None:
    key = os.urandom(32)
    text = base64.urlsafe_b64encode(key).decode()
    for url in ("", "postgresql://app@db:5432/tenfold"):
        settings = make_settings(data_dir=str(tmp_path), database_url=url, secret_key=text)
        assert master_key(settings) == key
    assert not (tmp_path / KEY_FILE).exists()
    assert text not in repr(settings)


def test_scale_out_requires_the_secret_key(tmp_path: Path) -> None:
    settings = make_settings(data_dir=str(tmp_path), database_url="postgresql://app@db/tenfold")
    with pytest.raises(SettingsError) as caught:
        master_key(settings)
    message = str(caught.value)
    assert message.startswith("TENFOLD_SECRET_KEY: ")
    assert "every process" in message
    assert "base64.urlsafe_b64encode(secrets.token_bytes(32))" in message
    assert "\n" not in message
    assert not (tmp_path / KEY_FILE).exists()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("TENFOLD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


@pytest.mark.parametrize(
    ("value", "found"),
    [
        (base64.urlsafe_b64encode(bytes(16)).decode(), "decodes to 16 bytes"),
        (base64.urlsafe_b64encode(bytes(33)).decode(), "decodes to 33 bytes"),
        ("not base64 at all!", "is not urlsafe base64"),
        (base64.b64encode(b"\xfb" * 32).decode(), "is not urlsafe base64"),  # + and /
    ],
)
def test_secret_key_is_validated(env: pytest.MonkeyPatch, value: str, found: str) -> None:
    env.setenv("TENFOLD_SECRET_KEY", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"TENFOLD_SECRET_KEY: {found}; expected the urlsafe base64 of 32")
    assert "secrets.token_bytes(32)" in message
    assert value not in message


def test_secret_key_is_read_with_or_without_padding(env: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    for text in (base64.urlsafe_b64encode(key).decode(), b64(key), f"  {b64(key)}\n"):
        env.setenv("TENFOLD_SECRET_KEY", text)
        settings = load_settings()
        assert settings.secret_key is not None
        assert master_key(settings) == key
    env.setenv("TENFOLD_SECRET_KEY", "")
    assert load_settings().secret_key is None
