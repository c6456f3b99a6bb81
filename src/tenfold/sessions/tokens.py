"""Opaque session and refresh tokens, and the derivation of a refresh token's successor.

A session token is `<session_id>.<secret>`; a refresh token `<session_id>.<generation>.<secret>`.
Secrets are 256 random bits (urlsafe base64); the store keeps only their SHA-256.

Rotation: presenting refresh token R(n) yields R(n+1) and a new session token, both derived
from R(n) with HMAC under a server-side key. Deriving rather than drawing them at random means
a retried or concurrent refresh inside the grace window gets exactly the same successor, and
an older token of the family can be recognised as genuine (walk it forward to the newest
superseded one) without storing any token in clear. No I/O here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SECRET_BYTES = 32
SESSION_ID_BYTES = 16
MAX_TOKEN = 128


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_session_id() -> str:
    return _b64(secrets.token_bytes(SESSION_ID_BYTES))


def new_secret() -> str:
    return _b64(secrets.token_bytes(SECRET_BYTES))


def digest(secret: str) -> bytes:
    """What the store keeps of a secret."""
    return hashlib.sha256(secret.encode()).digest()


_SESSION_TOKEN = re.compile(r"([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")
_REFRESH_TOKEN = re.compile(r"([A-Za-z0-9_-]{22})\.([0-9]{1,9})\.([A-Za-z0-9_-]{43})")


def parse_session_token(token: object) -> tuple[str, str] | None:
    """(session_id, secret), or None when the token cannot be one of ours."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        return None
    match = _SESSION_TOKEN.fullmatch(token)
    if match is None:
        return None
    return match[1], match[2]


def looks_like_jwt(token: str) -> bool:
    """A signed access token (compact JWS) rather than one of the opaque tokens."""
    return token.count(".") == 2 and token.startswith("eyJ")


@dataclass(frozen=True, slots=True)
class RefreshToken:
    session_id: str
    generation: int
    secret: str

    def __str__(self) -> str:
        return f"{self.session_id}.{self.generation}.{self.secret}"


def parse_refresh_token(token: object) -> RefreshToken | None:
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        return None
    match = _REFRESH_TOKEN.fullmatch(token)
    if match is None:
        return None
    return RefreshToken(match[1], int(match[2]), match[3])


@dataclass(frozen=True, slots=True)
class Successor:
    """What a refresh with a given token yields: always the same for the same token and key."""

    refresh: RefreshToken
    session_secret: str


def successor(token: RefreshToken, key: bytes) -> Successor:
    seed = str(token).encode()
    refresh_secret = hmac.new(key, b"refresh\x00" + seed, hashlib.sha256).digest()
    session_secret = hmac.new(key, b"session\x00" + seed, hashlib.sha256).digest()
    nxt = RefreshToken(token.session_id, token.generation + 1, _b64(refresh_secret))
    return Successor(nxt, _b64(session_secret))


def walk_forward(token: RefreshToken, key: bytes, generation: int) -> RefreshToken:
    """The family's token of `generation` derived from an older `token` (generation above it)."""
    current = token
    while current.generation < generation:
        current = successor(current, key).refresh
    return current


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
