"""Sessions: types, lifetime policies and the validation outcome (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from tenfold.kernel.errors import FieldError

MAX_USER_ID = 255
MAX_PERMISSIONS = 100
MAX_PERMISSION = 100


class SessionError(FieldError):
    """A session request is invalid; `field` names the offending input (422 over HTTP)."""


class SessionType(StrEnum):
    WEB = "web"
    MOBILE = "mobile"
    API = "api"


class OnLimit(StrEnum):
    EVICT_OLDEST = "evict_oldest"  # the new session wins; the least recently created one ends
    DENY = "deny"  # the new session is refused


class RiskAction(StrEnum):
    ALLOW = "allow"  # record the event, answer valid
    STEP_UP = "step_up_required"  # valid, but the caller should re-authenticate the user
    REVOKE = "revoke"  # end the session, answer invalid


class Reason(StrEnum):
    """Why a token is not valid (the `reason` of `valid: false`)."""

    MALFORMED = "malformed"
    UNKNOWN = "unknown_session"
    BAD_SECRET = "invalid_token"  # noqa: S105 - a reason code, not a secret
    EXPIRED = "expired"
    IDLE = "idle_timeout"
    REVOKED = "revoked"
    RISK = "risk_revoked"


@dataclass(frozen=True, slots=True)
class TypePolicy:
    """Lifetimes and limits of one session type (seconds)."""

    idle_timeout: int
    absolute_lifetime: int
    remember_me_lifetime: int  # the absolute lifetime of a remember-me session
    allow_remember_me: bool
    max_sessions: int  # per user, 0: unlimited
    on_limit: OnLimit = OnLimit.EVICT_OLDEST
    remember_me_idle_timeout: int = 0  # 0: the same as idle_timeout

    def lifetime(self, remember_me: bool) -> int:
        return self.remember_me_lifetime if remember_me else self.absolute_lifetime

    def idle(self, remember_me: bool) -> int:
        return (
            (self.remember_me_idle_timeout or self.idle_timeout)
            if remember_me
            else (self.idle_timeout)
        )


DEFAULT_POLICIES: dict[SessionType, TypePolicy] = {
    # Browser sessions: OWASP's guidance for an ordinary application, 30 min idle, 12 h absolute;
    # "remember me" keeps a browser signed in for 30 days unless unused for 7.
    SessionType.WEB: TypePolicy(
        30 * 60, 12 * 3600, 30 * 86400, True, 10, OnLimit.EVICT_OLDEST, 7 * 86400
    ),
    SessionType.MOBILE: TypePolicy(30 * 86400, 90 * 86400, 365 * 86400, True, 5),
    SessionType.API: TypePolicy(86400, 30 * 86400, 30 * 86400, False, 20),
}


@dataclass(frozen=True, slots=True)
class RiskPolicy:
    """What a validation does when the presented request differs from the session's device."""

    network_changed: RiskAction = RiskAction.ALLOW  # another /24 (IPv4) or /48 (IPv6)
    country_changed: RiskAction = RiskAction.STEP_UP  # needs a GeoIP database
    fingerprint_changed: RiskAction = RiskAction.REVOKE

    def action(self, signals: tuple[str, ...]) -> RiskAction:
        """The strictest action any of the signals calls for."""
        order = (RiskAction.ALLOW, RiskAction.STEP_UP, RiskAction.REVOKE)
        worst = RiskAction.ALLOW
        for signal in signals:
            act: RiskAction = getattr(self, signal)
            if order.index(act) > order.index(worst):
                worst = act
        return worst


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the creating backend knows of the device; stored encrypted."""

    user_agent: str = ""
    ip: str = ""
    fingerprint: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Validation:
    """The outcome of validating a token. Read-only by convention: not a frozen dataclass,
    whose construction costs a microsecond more - a quarter of a cached validation."""

    valid: bool
    reason: Reason | None = None
    session_id: str | None = None
    user_id: str | None = None
    session_type: SessionType | None = None
    permissions: tuple[str, ...] = ()
    expires_at: float | None = None  # the session ends then unless it is used (idle) or refreshed
    absolute_expires_at: float | None = None
    step_up_required: bool = False
    risk: tuple[str, ...] = ()


def check_user_id(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise SessionError("user_id", "is required: a non-empty string")
    if len(user_id) > MAX_USER_ID:
        raise SessionError("user_id", f"must be at most {MAX_USER_ID} characters")
    return user_id


def check_permissions(permissions: object) -> tuple[str, ...]:
    if not isinstance(permissions, list | tuple):
        raise SessionError("permissions", "must be a list of strings")
    if len(permissions) > MAX_PERMISSIONS:
        raise SessionError("permissions", f"at most {MAX_PERMISSIONS} entries")
    for p in permissions:
        if not isinstance(p, str) or not p or len(p) > MAX_PERMISSION:
            raise SessionError("permissions", f"entries are strings of 1 to {MAX_PERMISSION} chars")
    return tuple(dict.fromkeys(permissions))


def session_type(value: object) -> SessionType:
    try:
        return SessionType(str(value))
    except ValueError:
        choices = ", ".join(t.value for t in SessionType)
        raise SessionError("session_type", f"must be one of {choices}") from None


@dataclass(slots=True)
class SessionRecord:
    """One session as stored (digests and sealed data only; times in ms since the epoch)."""

    session_id: str
    user_id: str
    session_type: SessionType
    permissions: tuple[str, ...]
    remember_me: bool
    token_digest: bytes
    refresh_digest: bytes
    refresh_generation: int
    previous_digest: bytes | None
    rotated_at_ms: int | None
    hmac_key_id: str
    created_at_ms: int
    last_seen_at_ms: int
    idle_timeout_s: int
    expires_at_ms: int
    revoked_at_ms: int | None
    revoke_reason: str | None
    device_network: str
    device_fingerprint: str
    country: str
    key_id: str
    sealed: bytes
    origin_session_id: str | None = None

    def idle_deadline_ms(self, last_seen_ms: int) -> int:
        return min(last_seen_ms + self.idle_timeout_s * 1000, self.expires_at_ms)

    def active(self, now_ms: int) -> bool:
        return self.revoked_at_ms is None and now_ms < self.expires_at_ms


@dataclass(frozen=True, slots=True)
class SessionEvent:
    event_id: int
    session_id: str
    user_id: str
    at_ms: int
    kind: str
    actor: str | None
    detail: dict[str, object]


class LimitReached(SessionError):
    """The user has as many sessions of this type as the policy allows (policy `deny`)."""


class InvalidGrant(Exception):
    """A refresh token or handoff code cannot be used (RFC 6749 `invalid_grant`)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description
