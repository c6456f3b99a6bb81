"""The session use cases: create, validate, refresh with rotation, revoke, hand off.

Validation is the hot path. Each process keeps the sessions it validated in a local cache;
in scale-out a Redis copy sits between the processes and SQL, the source of truth. A change
to a session (revocation, rotation) is written to SQL first, then its cached copies are
dropped: locally at once, in Redis, and in every other process through a pub/sub message.
A local copy is trusted for `local_ttl` at most (1 s in scale-out), so a lost message still
takes effect within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import structlog

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.errors import BackendUnavailable
from tenfold.kernel.telemetry import REGISTRY, HotCounter
from tenfold.sessions import risk, tokens
from tenfold.sessions.models import (
    DEFAULT_POLICIES,
    DeviceInfo,
    InvalidGrant,
    Reason,
    RiskAction,
    RiskPolicy,
    SessionError,
    SessionEvent,
    SessionRecord,
    SessionType,
    TypePolicy,
    Validation,
    check_permissions,
    check_user_id,
)

if TYPE_CHECKING:
    from tenfold.kernel.kv import KV
    from tenfold.sessions.stores.sql import EventRow, SqlSessionStore

log = structlog.get_logger(__name__)

VALIDATIONS = HotCounter(
    "tenfold_sessions_validations_total",
    "Session validations by outcome (valid, or the reason a token was refused).",
    ("outcome",),
    registry=REGISTRY,
)
VALID = VALIDATIONS.labels("valid")
SUSPICIOUS = HotCounter(
    "tenfold_sessions_suspicious_total",
    "Risk signals seen on validation (network, country, fingerprint changes; token theft).",
    ("signal", "action"),
    registry=REGISTRY,
)

INVALIDATE_CHANNEL = "sessions:invalidate"
TOUCH_EVERY_MS = 60_000  # last_seen is written at most once a minute per session
MAX_WALK = 10_000  # generations an old refresh token is walked forward to recognise it
HANDOFF_SECONDS = 60
LOCAL_CACHE_MAX = 200_000
REDIS_TTL_SECONDS = 60
SECOND_DROP_SECONDS = 1.0  # a change's Redis copy is dropped again after this (racing refills)
CHANGE_MARGIN_MS = 5_000  # polls overlap by this: late commits, clocks a little apart
KEEP_CHANGES_MS = 3_600_000  # the change log keeps an hour
PRUNE_CHANGES_MS = 60_000
_DUMMY_DIGEST = tokens.digest("x" * 43)


class KeyRing(Protocol):
    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> tuple[str, bytes]: ...
    def decrypt(self, key_id: str, blob: bytes, aad: bytes = b"") -> bytes: ...
    def hmac_key(self, key_id: str | None = None) -> tuple[str, bytes]: ...
    def sign_jwt(self, claims: dict[str, Any]) -> str: ...
    def verify_jwt(self, token: str, *, now: float, leeway: float = 0) -> dict[str, Any]: ...
    def key_ids(self, purpose: Any, *, include_retired: bool = False) -> list[str]: ...
    async def reload(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Issued:
    """What creation, refresh and exchange answer; tokens are shown only here."""

    session_id: str
    user_id: str
    session_token: str
    refresh_token: str
    expires_at_ms: int
    refresh_expires_at_ms: int
    access_token: str | None = None
    evicted: tuple[str, ...] = ()


@dataclass(slots=True)
class _Entry:
    record: SessionRecord
    fetched_ms: int
    last_seen_ms: int
    persisted_seen_ms: int
    presented: dict[str, str] = field(default_factory=dict)  # raw value -> keyed hash


@dataclass
class SessionConfig:
    policies: dict[SessionType, TypePolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    risk: RiskPolicy = field(default_factory=RiskPolicy)
    grace_seconds: float = 10.0
    max_data_bytes: int = 16 * 1024
    local_ttl_ms: int = 1_000
    access_tokens: bool = False
    access_token_ttl: int = 300
    issuer: str = "tenfold"


Country = Callable[[str], str]  # ip -> ISO country code, '' when unknown


class SessionService:
    def __init__(
        self,
        store: SqlSessionStore,
        ring: KeyRing,
        kv: KV | None = None,
        *,
        config: SessionConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        country: Country | None = None,
    ) -> None:
        self.store = store
        self.ring = ring
        self.kv = kv  # None: one process, no shared cache
        self.config = config or SessionConfig()
        self.clock = clock
        self.country = country
        self._local: dict[str, _Entry] = {}
        self._seen: dict[str, int] = {}  # session_id -> last_seen to persist
        self._events: list[tuple[EventRow, int]] = []  # with the time each happened
        self._invalidations: set[str] = set()  # to drop from Redis once it answers again
        self._subscription: Any = None
        self._ring_reloaded = 0.0
        # Bumped whenever a session's copies are dropped: a load that read before the bump
        # must not put what it read back into a cache (it may predate the change).
        self._epochs: dict[str, int] = {}
        self._loading: dict[str, asyncio.Future[_Entry | None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Every copy is confirmed at once by polling the log of changed sessions: when the
        # last poll that found nothing to drop started (ms); 0 before the first.
        self._confirmed_ms = 0
        self._polling: asyncio.Task[None] | None = None
        self._changes_pruned_ms = 0
        self._from_sql: set[str] = set()  # changed sessions whose Redis copy is not trusted

    # -- creation -------------------------------------------------------------------------

    async def create(
        self,
        user_id: str,
        *,
        device: DeviceInfo | None = None,
        session_type: SessionType = SessionType.WEB,
        remember_me: bool = False,
        data: dict[str, Any] | None = None,
        permissions: Sequence[str] = (),
        actor: str | None = None,
        origin_session_id: str | None = None,
    ) -> Issued:
        user_id = check_user_id(user_id)
        perms = check_permissions(list(permissions))
        policy = self.config.policies[session_type]
        if remember_me and not policy.allow_remember_me:
            raise SessionError(
                "remember_me", f"{session_type} sessions cannot be remembered (policy)"
            )
        device = device or DeviceInfo()
        plain = orjson.dumps(
            {
                "device_info": {
                    "user_agent": device.user_agent,
                    "ip": device.ip,
                    "fingerprint": device.fingerprint,
                    **device.extra,
                },
                "data": data or {},
            }
        )
        if len(plain) > self.config.max_data_bytes:
            raise SessionError(
                "data", f"session data and device info exceed {self.config.max_data_bytes} bytes"
            )
        now = self.clock.now_ms()
        session_id = tokens.new_session_id()
        secret = tokens.new_secret()
        refresh = tokens.RefreshToken(session_id, 0, tokens.new_secret())
        hmac_key_id, hmac_key = self.ring.hmac_key()
        key_id, sealed = self.ring.encrypt(plain, session_id.encode())
        net = risk.network(device.ip) if device.ip else None
        country = self._country(device.ip)
        record = SessionRecord(
            session_id=session_id,
            user_id=user_id,
            session_type=session_type,
            permissions=perms,
            remember_me=remember_me,
            token_digest=tokens.digest(secret),
            refresh_digest=tokens.digest(refresh.secret),
            refresh_generation=0,
            previous_digest=None,
            rotated_at_ms=None,
            hmac_key_id=hmac_key_id,
            created_at_ms=now,
            last_seen_at_ms=now,
            idle_timeout_s=policy.idle(remember_me),
            expires_at_ms=now + policy.lifetime(remember_me) * 1000,
            revoked_at_ms=None,
            revoke_reason=None,
            device_network=risk.keyed(hmac_key, "network", net or ""),
            device_fingerprint=risk.keyed(hmac_key, "fingerprint", device.fingerprint),
            country=country,
            key_id=key_id,
            sealed=sealed,
            origin_session_id=origin_session_id,
        )
        detail: dict[str, object] = {
            "session_type": str(session_type),
            "remember_me": remember_me,
            "network": net or "",
            "country": country,
        }
        if origin_session_id:
            detail["origin_session_id"] = origin_session_id
        evicted = await self.store.create(
            record,
            max_sessions=policy.max_sessions,
            on_limit=policy.on_limit,
            actor=actor,
            detail=detail,
        )
        if evicted:
            await self._invalidate(evicted)
        return self._issued(record, f"{session_id}.{secret}", str(refresh), now, tuple(evicted))

    def _issued(
        self,
        record: SessionRecord,
        session_token: str,
        refresh_token: str,
        now: int,
        evicted: tuple[str, ...] = (),
    ) -> Issued:
        access = None
        if self.config.access_tokens:
            ttl = self.config.access_token_ttl
            access = self.ring.sign_jwt(
                {
                    "iss": self.config.issuer,
                    "sub": record.user_id,
                    "sid": record.session_id,
                    "typ": str(record.session_type),
                    "perms": list(record.permissions),
                    "iat": now // 1000,
                    "exp": min(now // 1000 + ttl, record.expires_at_ms // 1000),
                }
            )
        return Issued(
            session_id=record.session_id,
            user_id=record.user_id,
            session_token=session_token,
            refresh_token=refresh_token,
            expires_at_ms=record.idle_deadline_ms(now),
            refresh_expires_at_ms=record.expires_at_ms,
            access_token=access,
            evicted=evicted,
        )

    # -- validation -----------------------------------------------------------------------

    def validate_cached(
        self, token: str, *, ip: str = "", fingerprint: str = "", session_id: str | None = None
    ) -> Validation | None:
        """Validate from this process's cache alone; None when the session is not cached
        (then call `validate`). The in-process fast path."""
        if tokens.looks_like_jwt(token):
            return None  # an access token: `validate` checks it (and may reload keys)
        parsed = tokens.parse_session_token(token)
        if parsed is None or (session_id is not None and parsed[0] != session_id):
            return self._refused(Reason.MALFORMED)
        entry = self._local.get(parsed[0])
        now = self.clock.now_ms()
        if entry is None or not self._trusted(entry, now):
            return None
        return self._decide(entry, parsed[1], now, ip, fingerprint, cached_only=True)

    async def validate(
        self, token: str, *, ip: str = "", fingerprint: str = "", session_id: str | None = None
    ) -> Validation:
        """A session token (or a signed access token) -> valid, or `valid: false` + reason."""
        if tokens.looks_like_jwt(token):
            return await self._validate_jwt(token)
        parsed = tokens.parse_session_token(token)
        if parsed is None or (session_id is not None and parsed[0] != session_id):
            return self._refused(Reason.MALFORMED)
        sid, secret = parsed
        now = self.clock.now_ms()
        entry = self._local.get(sid)
        if entry is None or not self._trusted(entry, now):
            entry = await self._load_once(sid, now, entry)
            if entry is None:
                tokens.same(tokens.digest(secret), _DUMMY_DIGEST)  # the same work either way
                return self._refused(Reason.UNKNOWN)
        verdict = self._decide(entry, secret, now, ip, fingerprint)
        assert verdict is not None  # only the cached-only path declines
        if verdict.reason is Reason.RISK:
            with contextlib.suppress(BackendUnavailable):
                await self.flush()  # the risk event goes before the revocation it caused
            await self.revoke(
                sid, reason="risk", actor="system", detail={"risk": list(verdict.risk)}
            )
        return verdict

    def _decide(
        self,
        entry: _Entry,
        secret: str,
        now: int,
        ip: str,
        fingerprint: str,
        *,
        cached_only: bool = False,
    ) -> Validation | None:
        rec = entry.record
        if not tokens.same(tokens.digest(secret), rec.token_digest):
            return self._refused(Reason.BAD_SECRET)
        if rec.revoked_at_ms is not None:
            return self._refused(Reason.REVOKED)
        if now >= rec.expires_at_ms:
            return self._refused(Reason.EXPIRED)
        if now >= rec.idle_deadline_ms(entry.last_seen_ms):
            return self._refused(Reason.IDLE)
        found: tuple[str, ...] = ()
        step_up = False
        if ip or fingerprint:
            found = self._signals(entry, ip, fingerprint)
            if found and cached_only:
                return None  # a risk decision may have to write: take the full path
            if found:
                action = self.config.risk.action(found)
                for signal in found:
                    SUSPICIOUS.labels(signal, str(action)).inc()
                self._event(rec, "risk", {"signals": list(found), "action": str(action)})
                if action is RiskAction.REVOKE:
                    VALIDATIONS.labels(Reason.RISK).inc()
                    return Validation(False, Reason.RISK, rec.session_id, risk=found)
                step_up = action is RiskAction.STEP_UP
        entry.last_seen_ms = now
        if now - entry.persisted_seen_ms >= TOUCH_EVERY_MS:
            entry.persisted_seen_ms = now
            self._seen[rec.session_id] = now
        VALID.inc()
        return Validation(
            True,
            None,
            rec.session_id,
            rec.user_id,
            rec.session_type,
            rec.permissions,
            rec.idle_deadline_ms(now) / 1000,
            rec.expires_at_ms / 1000,
            step_up,
            found,
        )

    def _signals(self, entry: _Entry, ip: str, fingerprint: str) -> tuple[str, ...]:
        rec = entry.record
        memo = entry.presented
        net_hash = fp_hash = ""
        if ip:
            net_hash = memo.get("ip:" + ip, "")
            if not net_hash:
                net = risk.network(ip) or ""
                net_hash = risk.keyed(self._hmac(rec), "network", net)
                memo["ip:" + ip] = net_hash
        if fingerprint:
            fp_hash = memo.get("fp:" + fingerprint, "")
            if not fp_hash:
                fp_hash = risk.keyed(self._hmac(rec), "fingerprint", fingerprint)
                memo["fp:" + fingerprint] = fp_hash
        if len(memo) > 16:
            memo.clear()
        return risk.signals(
            stored_network=rec.device_network,
            stored_fingerprint=rec.device_fingerprint,
            stored_country=rec.country,
            network_hash=net_hash,
            fingerprint_hash=fp_hash,
            country=self._country(ip),
        )

    def _hmac(self, rec: SessionRecord) -> bytes:
        return self.ring.hmac_key(rec.hmac_key_id)[1]

    def _country(self, ip: str) -> str:
        if not ip or self.country is None:
            return ""
        try:
            return self.country(ip)
        except Exception:  # a broken GeoIP lookup must not fail a validation
            return ""

    def _refused(self, reason: Reason) -> Validation:
        VALIDATIONS.labels(reason).inc()
        return Validation(False, reason)

    async def _validate_jwt(self, token: str) -> Validation:
        from tenfold.kernel.crypto import JwtError

        try:
            try:
                claims = self.ring.verify_jwt(token, now=self.clock.now())
            except JwtError as exc:
                now = self.clock.now()
                if exc.reason != "unknown_key" or now - self._ring_reloaded < 1.0:
                    raise
                self._ring_reloaded = now  # a key another process started: look once a second
                await self.ring.reload()
                claims = self.ring.verify_jwt(token, now=now)
        except JwtError as exc:
            reason = Reason.EXPIRED if exc.reason == "expired" else Reason.BAD_SECRET
            if exc.reason == "malformed":
                reason = Reason.MALFORMED
            return self._refused(reason)
        if claims.get("iss") != self.config.issuer:
            return self._refused(Reason.BAD_SECRET)
        VALID.inc()
        return Validation(
            True,
            None,
            claims.get("sid"),
            claims.get("sub"),
            SessionType(claims["typ"]) if claims.get("typ") in set(SessionType) else None,
            tuple(claims.get("perms") or ()),
            float(claims["exp"]),
        )

    async def _load_once(self, session_id: str, now: int, stale: _Entry | None) -> _Entry | None:
        """Load a session; concurrent requests for the same one share a single load."""
        loading = self._loading.get(session_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(session_id, now, stale))
            self._loading[session_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(session_id, None))
        return await asyncio.shield(loading)

    def _trusted(self, entry: _Entry, now: int) -> bool:
        """Is the copy known to be current within the last `local_ttl_ms`? Either it was read
        that recently, or a poll of the change log that recently found no change to it."""
        ttl = self.config.local_ttl_ms
        confirmed = self._confirmed_ms
        if now - confirmed >= ttl // 2:
            self._poll_soon()  # before the copies run out: busy sessions never wait
        return now - max(entry.fetched_ms, confirmed) < ttl

    def _poll_soon(self) -> None:
        if self._polling is not None and not self._polling.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a synchronous caller: copies simply expire, and are read again
        self._polling = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        """Drop the copies of sessions changed since the last poll; confirm all the others."""
        started = self.clock.now_ms()
        since = (self._confirmed_ms or started) - CHANGE_MARGIN_MS
        try:
            changed = await self.store.changed_since(since)
            if started - self._changes_pruned_ms >= PRUNE_CHANGES_MS:
                self._changes_pruned_ms = started
                await self.store.forget_changes(started - KEEP_CHANGES_MS)
        except Exception as exc:  # copies expire by themselves; the next request polls again
            log.warning("sessions.poll_failed", error=str(exc))
            return
        self._drop_local(changed)
        if self.kv is not None:  # whoever changed them may not have reached Redis: read SQL
            self._from_sql.update(changed)
            if len(self._from_sql) > LOCAL_CACHE_MAX:
                self._from_sql.clear()
        # A copy read before the window this poll looked at cannot be confirmed by it.
        stale = [sid for sid, e in self._local.items() if e.fetched_ms < since]
        self._drop_local(stale)
        self._confirmed_ms = max(self._confirmed_ms, started)

    async def _load(self, session_id: str, now: int, stale: _Entry | None) -> _Entry | None:
        for _ in range(3):
            epoch = self._epochs.get(session_id, 0)
            record = await self._read_shared(session_id, epoch)
            if self._epochs.get(session_id, 0) == epoch:
                break  # nothing changed the session while it was read
        else:
            record = await self.store.get(session_id)  # keeps changing: the source of truth
        if record is None:
            self._local.pop(session_id, None)
            return None
        await self.ensure_keys(record)
        seen = max(record.last_seen_at_ms, stale.last_seen_ms if stale else 0)
        persisted = max(record.last_seen_at_ms, stale.persisted_seen_ms if stale else 0)
        entry = _Entry(record, self.clock.now_ms(), seen, persisted)
        if stale is not None:
            entry.presented = stale.presented
        if self._epochs.get(session_id, 0) == epoch:
            if len(self._local) >= LOCAL_CACHE_MAX:
                self._local.clear()
            self._local[session_id] = entry
        return entry

    async def _read_shared(self, session_id: str, epoch: int) -> SessionRecord | None:
        """Redis when configured (and answering), else SQL; SQL fills Redis."""
        if self.kv is None or session_id in self._invalidations:
            # No shared cache, or its copy may be stale (changed while Redis was away).
            return await self.store.get(session_id)
        key = self.kv.key("sess", session_id)
        cached = None
        if session_id in self._from_sql:
            self._from_sql.discard(session_id)  # read SQL this once, and heal Redis's copy
        else:
            try:
                cached = await self.kv.get(key)
            except BackendUnavailable:
                return await self.store.get(session_id)
        if cached is not None:
            return _decode(cached) if cached != b"-" else None
        record = await self.store.get(session_id)
        if self._epochs.get(session_id, 0) == epoch:  # else what was read may be outdated
            with contextlib.suppress(BackendUnavailable):
                await self.kv.set(key, _encode(record) if record else b"-", ttl=REDIS_TTL_SECONDS)
        return record

    # -- refresh --------------------------------------------------------------------------

    async def refresh(self, refresh_token: str, *, actor: str | None = None) -> Issued:
        """Rotate: the presented refresh token for its successor (and a new session token).

        The same token presented again within the grace window gets the same successor; a
        superseded token presented after it revokes the session (token theft).
        """
        parsed = tokens.parse_refresh_token(refresh_token)
        if parsed is None:
            raise InvalidGrant("the refresh token is malformed")
        for _ in range(3):  # a concurrent rotation may move the family under us
            rec = await self.store.get(parsed.session_id)
            now = self.clock.now_ms()
            if rec is None:
                tokens.same(tokens.digest(parsed.secret), _DUMMY_DIGEST)
                raise InvalidGrant("the refresh token is not valid")
            presented = tokens.digest(parsed.secret)
            await self.ensure_keys(rec)
            key = self.ring.hmac_key(rec.hmac_key_id)[1]
            current = rec.refresh_generation
            if parsed.generation == current and tokens.same(presented, rec.refresh_digest):
                self._check_usable(rec, now)
                nxt = tokens.successor(parsed, key)
                rotated = await self.store.rotate(
                    rec.session_id,
                    generation=current,
                    token_digest=tokens.digest(nxt.session_secret),
                    refresh_digest=tokens.digest(nxt.refresh.secret),
                    previous_digest=presented,
                    now_ms=now,
                    event=(
                        rec.session_id,
                        rec.user_id,
                        "refreshed",
                        actor,
                        {"generation": current + 1},
                    ),
                )
                if not rotated:
                    continue
                await self._invalidate([rec.session_id])
                rec.refresh_generation = current + 1
                return self._issued(
                    rec, f"{rec.session_id}.{nxt.session_secret}", str(nxt.refresh), now
                )
            if self._is_previous(parsed, rec, presented, key):
                within = rec.rotated_at_ms is not None and (
                    now - rec.rotated_at_ms <= self.config.grace_seconds * 1000
                )
                if within and parsed.generation == current - 1:
                    self._check_usable(rec, now)
                    nxt = tokens.successor(parsed, key)
                    self._event(rec, "refresh_retried", {"generation": current}, actor)
                    return self._issued(
                        rec, f"{rec.session_id}.{nxt.session_secret}", str(nxt.refresh), now
                    )
                await self._theft(rec, parsed.generation, actor)
                raise InvalidGrant("the refresh token was already used; the session is revoked")
            raise InvalidGrant("the refresh token is not valid")
        raise InvalidGrant("the session is being refreshed concurrently; try again")

    def _is_previous(
        self, token: tokens.RefreshToken, rec: SessionRecord, presented: bytes, key: bytes
    ) -> bool:
        """Is the token a genuine, superseded token of this family?"""
        previous = rec.previous_digest
        if previous is None or not 0 <= token.generation < rec.refresh_generation:
            return False
        if token.generation == rec.refresh_generation - 1:
            return tokens.same(presented, previous)
        if rec.refresh_generation - 1 - token.generation > MAX_WALK:
            return False
        walked = tokens.walk_forward(token, key, rec.refresh_generation - 1)
        return tokens.same(tokens.digest(walked.secret), previous)

    def _check_usable(self, rec: SessionRecord, now: int) -> None:
        if rec.revoked_at_ms is not None:
            raise InvalidGrant("the session has ended")
        if now >= rec.expires_at_ms:
            raise InvalidGrant("the session has expired")

    async def _theft(self, rec: SessionRecord, generation: int, actor: str | None) -> None:
        SUSPICIOUS.labels("token_reuse", "revoke").inc()
        log.warning(
            "sessions.token_theft_detected",
            session_id=rec.session_id,
            user_id=rec.user_id,
            presented_generation=generation,
            current_generation=rec.refresh_generation,
        )
        await self.revoke(
            rec.session_id,
            reason="token_reuse",
            actor=actor or "system",
            detail={
                "event": "TOKEN_THEFT_DETECTED",
                "presented_generation": generation,
                "current_generation": rec.refresh_generation,
            },
        )

    # -- revocation -----------------------------------------------------------------------

    async def revoke(
        self,
        session_id: str,
        *,
        reason: str = "logout",
        actor: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> bool:
        ended = await self.revoke_many([session_id], reason=reason, actor=actor, detail=detail)
        return bool(ended)

    async def revoke_many(
        self,
        session_ids: Sequence[str],
        *,
        reason: str,
        actor: str | None = None,
        detail: dict[str, object] | None = None,
    ) -> list[str]:
        ended: list[str] = []
        for start in range(0, len(session_ids), 500):
            chunk = list(session_ids[start : start + 500])
            ended += await self.store.revoke(
                chunk, now_ms=self.clock.now_ms(), reason=reason, actor=actor, detail=detail
            )
            await self._invalidate(chunk)
        return ended

    async def revoke_user(
        self,
        user_id: str,
        *,
        keep: str | None = None,
        session_type: SessionType | None = None,
        actor: str | None = None,
        reason: str = "logout_all",
    ) -> list[str]:
        """End every active session of the user (but `keep`, for "sign out other devices")."""
        ids = await self.store.active_ids(
            now_ms=self.clock.now_ms(), user_ids=[user_id], session_type=session_type
        )
        return await self.revoke_many([i for i in ids if i != keep], reason=reason, actor=actor)

    async def revoke_bulk(
        self,
        *,
        user_ids: Sequence[str] | None = None,
        created_before_ms: int | None = None,
        session_type: SessionType | None = None,
        actor: str | None = None,
        limit: int = 100_000,
    ) -> list[str]:
        ids = await self.store.active_ids(
            now_ms=self.clock.now_ms(),
            user_ids=user_ids,
            created_before_ms=created_before_ms,
            session_type=session_type,
            limit=limit,
        )
        return await self.revoke_many(ids, reason="bulk", actor=actor)

    def _drop_local(self, session_ids: Sequence[str]) -> None:
        if len(self._epochs) > LOCAL_CACHE_MAX:
            self._epochs.clear()
        for sid in session_ids:
            self._local.pop(sid, None)
            self._epochs[sid] = self._epochs.get(sid, 0) + 1

    async def _invalidate(self, session_ids: Sequence[str]) -> None:
        self._drop_local(session_ids)
        if self.kv is None or not session_ids:
            return
        try:
            await self._drop_shared(session_ids)
        except BackendUnavailable:
            # SQL holds the change; Redis's copies are dropped as soon as it answers again.
            self._invalidations.update(session_ids)
            return
        # Another process may have read the session from SQL just before the change and be
        # about to store that copy in Redis: drop it once more after that window.
        task = asyncio.ensure_future(self._drop_again(list(session_ids)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drop_shared(self, session_ids: Sequence[str]) -> None:
        assert self.kv is not None
        await self.kv.delete(*(self.kv.key("sess", sid) for sid in session_ids))
        await self.kv.publish(INVALIDATE_CHANNEL, ",".join(session_ids).encode())

    async def _drop_again(self, session_ids: list[str]) -> None:
        await asyncio.sleep(SECOND_DROP_SECONDS)
        try:
            await self._drop_shared(session_ids)
        except BackendUnavailable:
            self._invalidations.update(session_ids)

    async def on_invalidate(self, message: bytes) -> None:
        self._drop_local(message.decode().split(","))

    async def retry_invalidations(self) -> int:
        if not self._invalidations or self.kv is None:
            return 0
        pending = sorted(self._invalidations)
        await self._drop_shared(pending)
        self._invalidations.difference_update(pending)
        return len(pending)

    # -- reading --------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRecord | None:
        return await self.store.get(session_id)

    async def ensure_keys(self, record: SessionRecord) -> None:
        """Reload the key ring when a session names a key this process has not seen yet
        (another process rotated it), at most once a second."""
        if record.hmac_key_id in self.ring.key_ids("hmac") and record.key_id in self.ring.key_ids(
            "aead", include_retired=True
        ):
            return
        now = self.clock.now()
        if now - self._ring_reloaded >= 1.0:
            self._ring_reloaded = now
            await self.ring.reload()

    async def unseal(self, record: SessionRecord) -> dict[str, Any]:
        """The session's device info and data, decrypted."""
        await self.ensure_keys(record)
        plain = self.ring.decrypt(record.key_id, record.sealed, record.session_id.encode())
        value: dict[str, Any] = orjson.loads(plain)
        return value

    def last_seen(self, record: SessionRecord) -> int:
        entry = self._local.get(record.session_id)
        return max(record.last_seen_at_ms, entry.last_seen_ms if entry else 0)

    async def for_user(
        self,
        user_id: str,
        *,
        include_ended: bool = False,
        limit: int = 100,
        before: tuple[int, str] | None = None,
    ) -> list[SessionRecord]:
        return await self.store.for_user(
            user_id,
            now_ms=self.clock.now_ms(),
            include_ended=include_ended,
            limit=limit,
            before=before,
        )

    async def timeline(
        self, session_id: str, *, after: tuple[int, int] = (0, 0), limit: int = 100
    ) -> list[SessionEvent]:
        await self.flush()
        return await self.store.events(session_id, after=after, limit=limit)

    # -- cross-domain handoff ---------------------------------------------------------------

    async def handoff(
        self, session_id: str, audience: str, *, actor: str | None = None
    ) -> tuple[str, int]:
        """A one-time code (valid 60 s) that mints a session for the same user elsewhere."""
        rec = await self.store.get(session_id)
        now = self.clock.now_ms()
        if rec is None or not rec.active(now):
            raise InvalidGrant("the session is not active")
        code = tokens.new_secret()
        expires = now + HANDOFF_SECONDS * 1000
        await self.store.add_handoff(tokens.digest(code), session_id, audience, now, expires)
        self._event(rec, "handoff_created", {"audience": audience}, actor)
        return code, expires

    async def exchange(
        self,
        code: str,
        *,
        device: DeviceInfo | None = None,
        audience: str | None = None,
        actor: str | None = None,
    ) -> Issued:
        if not isinstance(code, str) or len(code) > tokens.MAX_TOKEN:
            raise InvalidGrant("the code is not valid")
        now = self.clock.now_ms()
        used = await self.store.use_handoff(tokens.digest(code), now)
        if used is None:
            raise InvalidGrant("the code is not valid, expired or already used")
        origin_id, bound = used
        if audience is not None and audience != bound:
            raise InvalidGrant("the code was issued for another audience")
        origin = await self.store.get(origin_id)
        if origin is None or not origin.active(now):
            raise InvalidGrant("the originating session has ended")
        return await self.create(
            origin.user_id,
            device=device,
            session_type=origin.session_type,
            remember_me=False,
            permissions=origin.permissions,
            actor=actor,
            origin_session_id=origin_id,
        )

    # -- background -------------------------------------------------------------------------

    def _event(
        self,
        rec: SessionRecord,
        kind: str,
        detail: dict[str, object],
        actor: str | None = None,
    ) -> None:
        if len(self._events) < 10_000:  # bounded: an event storm must not exhaust memory
            row: EventRow = (rec.session_id, rec.user_id, kind, actor, detail)
            self._events.append((row, self.clock.now_ms()))

    async def flush(self) -> None:
        """Write pending last-seen times and events (run every few seconds, and on stop)."""
        seen, self._seen = self._seen, {}
        events, self._events = self._events, []
        try:
            if seen:
                await self.store.touch(seen)
            if events:
                await self.store.add_events(events)
        except BackendUnavailable:
            for sid, at in seen.items():
                self._seen[sid] = max(at, self._seen.get(sid, 0))
            self._events[:0] = events
            raise

    async def start(self) -> None:
        if self.kv is not None:
            self._subscription = await self.kv.subscribe(INVALIDATE_CHANNEL, self.on_invalidate)

    async def stop(self) -> None:
        if self._polling is not None:
            self._background.add(self._polling)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.flush()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.close()


def _encode(record: SessionRecord) -> bytes:
    values = {name: getattr(record, name) for name in record.__slots__}
    for name in ("token_digest", "refresh_digest", "previous_digest", "sealed"):
        if values[name] is not None:
            values[name] = values[name].hex()
    return orjson.dumps(values)


def _decode(raw: bytes) -> SessionRecord:
    values = orjson.loads(raw)
    for name in ("token_digest", "refresh_digest", "previous_digest", "sealed"):
        if values[name] is not None:
            values[name] = bytes.fromhex(values[name])
    values["session_type"] = SessionType(values["session_type"])
    values["permissions"] = tuple(values["permissions"])
    return SessionRecord(**values)
