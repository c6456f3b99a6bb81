"""A key ring: encryption at rest, keys for derived tokens, signed access tokens.

Envelope encryption, as Vault and the cloud KMSs do it. One master key (`TENFOLD_SECRET_KEY`,
or `<data dir>/secret.key` in embedded mode) seals the data keys; the data keys live in the
`crypto_keys` table, sealed (AES-256-GCM, bound to their id and purpose), never in plaintext.
Each purpose has its own keys:

- `aead`: AES-256-GCM for records at rest; the key id is stored beside each record.
- `hmac`: keys for deriving tokens deterministically (HMAC).
- `jwt`: Ed25519 keys signing short-lived access tokens (compact JWS, alg EdDSA), whose public
  halves are published as a JWKS.

The newest key of a purpose that is not retired is its primary: new work uses it, and older
keys keep decrypting and verifying until they are retired. A process sees another's rotation
when it calls `reload()`.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import sqlalchemy as sa
import structlog
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.errors import TenfoldError
from tenfold.kernel.sql import metadata
from tenfold.settings import NEW_MASTER_KEY_COMMAND, Settings, SettingsError, decode_secret_key

log = structlog.get_logger(__name__)

Purpose = Literal["aead", "hmac", "jwt"]
PURPOSES: Final[tuple[Purpose, ...]] = ("aead", "hmac", "jwt")
JwtReason = Literal["malformed", "bad_signature", "unknown_key", "expired", "not_yet_valid"]

KEY_BYTES = 32  # master key, AES-256 and HMAC keys, Ed25519 seeds
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_FILE = "secret.key"  # in the data dir, embedded mode only
MAX_JWT_LENGTH = 8192  # characters; an access token is a few hundred
ROTATE_ATTEMPTS = 5

_SIGNATURE_CHARS = 86  # 64 bytes of Ed25519 signature in unpadded base64url
_SIGNATURE_LAST = frozenset("AQgw")  # the last character carries 2 bits; the other 4 are zero
_base64url = re.compile(r"[A-Za-z0-9_-]+").fullmatch

TZ = sa.DateTime(timezone=True)

crypto_keys = sa.Table(
    "crypto_keys",
    metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("purpose", sa.String(8), nullable=False),
    # 1, 2, 3... within a purpose; unique, so two processes cannot both add "the next" key.
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("material", sa.LargeBinary, nullable=False),  # nonce + AES-GCM under the master key
    sa.Column("public_jwk", sa.Text, nullable=True),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("activated_at", TZ, nullable=False),
    sa.Column("retired_at", TZ, nullable=True),
    sa.UniqueConstraint("purpose", "generation", name="uq_crypto_keys_purpose_generation"),
    sa.CheckConstraint("purpose IN ('aead', 'hmac', 'jwt')", name="purpose"),
)


class CryptoError(TenfoldError):
    """A cryptographic operation failed."""


class JwtError(CryptoError):
    """An access token was refused; `reason` says why, in one word."""

    def __init__(self, reason: JwtReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: JwtReason = reason


# --- the master key ----------------------------------------------------------------------------


def master_key(settings: Settings) -> bytes:
    """The 32-byte master key: TENFOLD_SECRET_KEY, else (embedded mode only) the key file in
    the data dir, created on first use."""
    if settings.secret_key is not None:
        return decode_secret_key(settings.secret_key.get_secret_value())
    url = settings.database_url
    if url and not url.startswith("sqlite"):
        raise SettingsError(
            "TENFOLD_SECRET_KEY: unset, and scale-out needs the same master key on every "
            f"process; generate one with: {NEW_MASTER_KEY_COMMAND} and set TENFOLD_SECRET_KEY to "
            "it everywhere"
        )
    return _key_file(Path(settings.data_dir) / KEY_FILE)


def _key_file(path: Path) -> bytes:
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = _create_key_file(path)
    try:
        return decode_secret_key(text)
    except ValueError as exc:
        raise SettingsError(
            f"{path}: not a master key ({exc}); restore it from a backup, or set TENFOLD_SECRET_KEY"
        ) from None


def _create_key_file(path: Path) -> str:
    """Write a new key, readable by this user only; if another process won the race, its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic and never overwrites: a whole key or none
        except FileExistsError:
            return path.read_text()
    finally:
        tmp.unlink(missing_ok=True)
    log.info("crypto.master_key_created", path=str(path))
    return text


# --- the key ring ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    key_id: str
    purpose: str
    generation: int
    retired: bool


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Unpadded base64url; raises ValueError on anything else."""
    if not _base64url(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _seal_aad(key_id: str, purpose: str) -> bytes:
    return f"{key_id}:{purpose}".encode()


def _public_jwk(key_id: str, public: Ed25519PublicKey) -> dict[str, str]:
    x = _b64encode(public.public_bytes_raw())
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": key_id, "use": "sig", "alg": "EdDSA"}


class KeyRing:
    """The data keys of every purpose, unsealed in memory; create with `await KeyRing.open()`."""

    def __init__(self, engine: AsyncEngine, master: bytes, clock: Clock = SYSTEM_CLOCK) -> None:
        if len(master) != KEY_BYTES:
            raise CryptoError(f"the master key must be {KEY_BYTES} bytes, not {len(master)}")
        self._engine = engine
        self._master = AESGCM(master)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._live: dict[str, list[str]] = {purpose: [] for purpose in PURPOSES}
        self._aead: dict[str, AESGCM] = {}
        self._hmac: dict[str, bytes] = {}
        self._public: dict[str, Ed25519PublicKey] = {}
        self._jwks: list[dict[str, str]] = []
        self._aead_primary: tuple[str, AESGCM] | None = None
        self._signer: tuple[str, Ed25519PrivateKey] | None = None  # (header segment, key)
        # header segment -> (kid, public key): tokens of one key share their header, so the hot
        # path skips decoding and parsing it.
        self._verifiers: dict[str, tuple[str, Ed25519PublicKey]] = {}

    @classmethod
    async def open(cls, engine: AsyncEngine, master: bytes, clock: Clock = SYSTEM_CLOCK) -> KeyRing:
        """Load every key; give each purpose without one its first key. Processes starting at
        once agree: the (purpose, generation) pair is unique, the loser re-reads the winner's."""
        ring = cls(engine, master, clock)
        for _ in range(ROTATE_ATTEMPTS):
            await ring.reload()
            missing = [purpose for purpose in PURPOSES if not ring._live[purpose]]
            if not missing:
                return ring
            for purpose in missing:
                await ring._add(purpose, ring._last_generation(purpose) + 1)
        raise CryptoError(f"could not create the first {', '.join(missing)} key")

    def __repr__(self) -> str:
        primaries = " ".join(f"{p}={self._live[p][0] if self._live[p] else None}" for p in PURPOSES)
        return f"<KeyRing {primaries}>"

    # --- at rest --------------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> tuple[str, bytes]:
        """Encrypt with the primary aead key: (key id, nonce + ciphertext + tag)."""
        if self._aead_primary is None:
            raise CryptoError("no aead key; open the key ring with KeyRing.open()")
        key_id, aead = self._aead_primary
        nonce = os.urandom(NONCE_BYTES)
        return key_id, nonce + aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, key_id: str, blob: bytes, aad: bytes = b"") -> bytes:
        aead = self._aead.get(key_id)
        if aead is None:
            raise CryptoError(self._unusable(key_id, "aead"))
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise CryptoError(f"cannot decrypt: {len(blob)} bytes is too short for a ciphertext")
        try:
            return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CryptoError(
                f"cannot decrypt with {key_id}: the ciphertext was altered, or the aad differs "
                "from the one it was encrypted with"
            ) from None

    # --- derived tokens ---------------------------------------------------------------------------

    def hmac_key(self, key_id: str | None = None) -> tuple[str, bytes]:
        """The primary hmac key, or the named one (for values derived with it earlier)."""
        if key_id is None:
            live = self._live["hmac"]
            if not live:
                raise CryptoError("no hmac key; open the key ring with KeyRing.open()")
            key_id = live[0]
        key = self._hmac.get(key_id)
        if key is None:
            raise CryptoError(self._unusable(key_id, "hmac"))
        return key_id, key

    # --- access tokens ----------------------------------------------------------------------------

    def sign_jwt(self, claims: dict[str, Any]) -> str:
        """A compact JWS of `claims`, signed with the primary jwt key (EdDSA, Ed25519)."""
        if self._signer is None:
            raise CryptoError("no jwt key; open the key ring with KeyRing.open()")
        header, private = self._signer
        signing_input = f"{header}.{_b64encode(orjson.dumps(claims))}"
        return f"{signing_input}.{_b64encode(private.sign(signing_input.encode('ascii')))}"

    def verify_jwt(self, token: str, *, now: float, leeway: float = 0) -> dict[str, Any]:
        """The claims of a token this ring signed, if its signature holds and `now` (seconds
        since the epoch) lies in [nbf - leeway, exp + leeway); `exp` is required."""
        if not isinstance(token, str) or len(token) > MAX_JWT_LENGTH:
            raise JwtError("malformed", "not a token of acceptable size")
        header, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        verifier = self._verifiers.get(header)
        cached = verifier is not None
        if verifier is None:
            verifier = self._verifier(header)
        if (
            len(signature) != _SIGNATURE_CHARS
            or signature[-1] not in _SIGNATURE_LAST
            or not _base64url(signature)
            or not _base64url(payload)
        ):
            raise JwtError("malformed", "expected three base64url segments")
        try:
            raw_payload = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            verifier[1].verify(
                base64.urlsafe_b64decode(signature + "=="),
                token[: len(header) + 1 + len(payload)].encode("ascii"),
            )
        except InvalidSignature:
            raise JwtError("bad_signature") from None
        except ValueError:
            raise JwtError("malformed", "expected three base64url segments") from None
        if not cached:  # only headers of well-signed tokens: strangers cannot fill the cache
            if len(self._verifiers) >= 64:
                self._verifiers = {}
            self._verifiers[header] = verifier
        try:
            claims = orjson.loads(raw_payload)
        except orjson.JSONDecodeError:
            raise JwtError("malformed", "the claims are not JSON") from None
        if type(claims) is not dict:
            raise JwtError("malformed", "the claims are not a JSON object")
        exp = claims.get("exp")
        if type(exp) is not int and type(exp) is not float:
            raise JwtError("malformed", "exp is required and must be a number")
        if now - leeway >= exp:
            raise JwtError("expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if type(nbf) is not int and type(nbf) is not float:
                raise JwtError("malformed", "nbf must be a number")
            if nbf > now + leeway:
                raise JwtError("not_yet_valid")
        return claims

    def _verifier(self, header: str) -> tuple[str, Ed25519PublicKey]:
        try:
            fields = orjson.loads(_b64decode(header))
        except ValueError:  # also orjson.JSONDecodeError
            raise JwtError("malformed", "the header is not base64url JSON") from None
        if type(fields) is not dict or not isinstance(fields.get("alg"), str):
            raise JwtError("malformed", "the header is not a JOSE header")
        if fields["alg"] != "EdDSA":
            raise JwtError("bad_signature", f"alg {fields['alg'][:20]!r} is not accepted")
        if "crit" in fields:
            raise JwtError("malformed", "no critical header extension is understood")
        kid = fields.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtError("malformed", "kid must be a string")
        public = self._public.get(kid) if kid else None
        if kid is None or public is None:
            raise JwtError("unknown_key", "no usable key has this kid")
        return kid, public

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWK of every jwt key not retired, newest first."""
        return {"keys": [dict(jwk) for jwk in self._jwks]}

    # --- the keys ---------------------------------------------------------------------------------

    def key_ids(self, purpose: Purpose, *, include_retired: bool = False) -> list[str]:
        """Key ids of a purpose, newest first: the primary is the first one."""
        _check_purpose(purpose)
        if not include_retired:
            return list(self._live[purpose])
        found = [e for e in self._entries.values() if e.purpose == purpose]
        return [e.key_id for e in sorted(found, key=lambda e: -e.generation)]

    async def rotate(self, purpose: Purpose) -> str:
        """Add a key that becomes the primary of `purpose`; older keys stay usable."""
        _check_purpose(purpose)
        c = crypto_keys.c
        for _ in range(ROTATE_ATTEMPTS):
            async with self._engine.connect() as conn:
                last = (
                    await conn.execute(
                        sa.select(sa.func.max(c.generation)).where(c.purpose == purpose)
                    )
                ).scalar_one()
            key_id = await self._add(purpose, int(last or 0) + 1)
            if key_id is not None:
                await self.reload()
                log.info("crypto.key_rotated", purpose=purpose, key_id=key_id)
                return key_id
        raise CryptoError(f"could not add a {purpose} key: other processes kept adding one first")

    async def retire(self, key_id: str) -> None:
        """Stop using a key: what it encrypted no longer decrypts, what it signed no longer
        verifies. The primary of a purpose cannot be retired (rotate first)."""
        c = crypto_keys.c
        newer = crypto_keys.alias("newer")
        has_newer = (
            sa.exists()
            .where(
                newer.c.purpose == c.purpose,
                newer.c.generation > c.generation,
                newer.c.retired_at.is_(None),
            )
            .correlate(crypto_keys)
        )
        async with self._engine.begin() as conn:
            result = await conn.execute(
                crypto_keys.update()
                .where(c.key_id == key_id, c.retired_at.is_(None), has_newer)
                .values(retired_at=self._now())
            )
            row = None
            if not result.rowcount:
                query = sa.select(c.purpose, c.retired_at).where(c.key_id == key_id)
                row = (await conn.execute(query)).first()
                if row is None:
                    raise CryptoError(f"no key {key_id[:40]!r}")
                if row.retired_at is None:
                    raise CryptoError(
                        f"{key_id} is the primary {row.purpose} key; rotate first, then retire it"
                    )
        await self.reload()
        if row is None:
            log.info("crypto.key_retired", key_id=key_id)

    async def reload(self) -> None:
        """Read the table again (after another process rotated or retired a key)."""
        c = crypto_keys.c
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(c.key_id, c.purpose, c.generation, c.material, c.retired_at).order_by(
                        c.generation.desc()
                    )
                )
            ).all()
        entries: dict[str, _Entry] = {}
        live: dict[str, list[str]] = {purpose: [] for purpose in PURPOSES}
        aead: dict[str, AESGCM] = {}
        hmac: dict[str, bytes] = {}
        public: dict[str, Ed25519PublicKey] = {}
        jwks: list[dict[str, str]] = []
        signer: tuple[str, Ed25519PrivateKey] | None = None
        for row in rows:
            entry = _Entry(row.key_id, row.purpose, row.generation, row.retired_at is not None)
            entries[entry.key_id] = entry
            if entry.retired or entry.purpose not in live:
                continue
            secret = self._unseal(entry, bytes(row.material))
            live[entry.purpose].append(entry.key_id)
            if entry.purpose == "aead":
                aead[entry.key_id] = AESGCM(secret)
            elif entry.purpose == "hmac":
                hmac[entry.key_id] = secret
            else:
                private = Ed25519PrivateKey.from_private_bytes(secret)
                public[entry.key_id] = private.public_key()
                jwks.append(_public_jwk(entry.key_id, public[entry.key_id]))
                if signer is None:
                    header = {"alg": "EdDSA", "typ": "JWT", "kid": entry.key_id}
                    signer = (_b64encode(orjson.dumps(header)), private)
        self._entries, self._live = entries, live
        self._aead, self._hmac, self._public, self._jwks = aead, hmac, public, jwks
        self._aead_primary = (live["aead"][0], aead[live["aead"][0]]) if live["aead"] else None
        self._signer = signer
        self._verifiers = {}

    # --- inside -----------------------------------------------------------------------------------

    async def _add(self, purpose: str, generation: int) -> str | None:
        """Insert a new sealed key of `purpose` at `generation`; None if that generation exists
        already (another process added it first)."""
        key_id = "k_" + secrets.token_hex(4)
        public_jwk = None
        if purpose == "jwt":
            private = Ed25519PrivateKey.generate()
            secret = private.private_bytes_raw()
            public_jwk = orjson.dumps(_public_jwk(key_id, private.public_key())).decode()
        else:
            secret = secrets.token_bytes(KEY_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._master.encrypt(nonce, secret, _seal_aad(key_id, purpose))
        now = self._now()
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    crypto_keys.insert().values(
                        key_id=key_id,
                        purpose=purpose,
                        generation=generation,
                        material=sealed,
                        public_jwk=public_jwk,
                        created_at=now,
                        activated_at=now,
                    )
                )
        except sa.exc.IntegrityError:
            return None
        return key_id

    def _unseal(self, entry: _Entry, sealed: bytes) -> bytes:
        try:
            return self._master.decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _seal_aad(entry.key_id, entry.purpose)
            )
        except InvalidTag:
            raise CryptoError(
                f"cannot unseal data key {entry.key_id}: the master key is not the one that "
                "sealed it (TENFOLD_SECRET_KEY, or <data dir>/secret.key in embedded mode)"
            ) from None

    def _unusable(self, key_id: str, purpose: str) -> str:
        entry = self._entries.get(key_id)
        if entry is None:
            return (
                f"unknown {purpose} key {key_id[:40]!r} (another process may have added it: reload)"
            )
        if entry.purpose != purpose:
            return f"{key_id} is a {entry.purpose} key, not a {purpose} key"
        return f"{purpose} key {key_id} is retired"

    def _last_generation(self, purpose: str) -> int:
        return max(
            (e.generation for e in self._entries.values() if e.purpose == purpose), default=0
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), UTC)


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown key purpose {purpose!r}; expected one of {', '.join(PURPOSES)}")
