"""The shortener's domain: links, aliases, target URLs, the blocklist, plans and passwords."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from tenfold.kernel.errors import FieldError

MAX_URL = 2_048
MAX_DESCRIPTION = 500
ALIAS_MIN = 3
ALIAS_MAX = 20
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
MAX_BULK = 1_000
MAX_PASSWORD = 200
RETENTION_YEARS = 5

# Words no alias may take (compared case-insensitively), on top of every top-level path
# segment tenfold serves, which the service adds at start-up.
RESERVED = frozenset(
    {
        "api", "www", "admin", "app", "short", "link", "links", "url", "urls", "redirect",
        "analytics", "dashboard", "r", "s", "qr", "login", "logout", "signin", "signup",
        "account", "accounts", "console", "static", "assets", "favicon.ico", "robots.txt",
        "well-known", ".well-known", "healthz", "readyz", "metrics", "docs", "redoc",
        "openapi.json", "ofrep", "help", "about", "settings", "status", "new",
    }
)  # fmt: skip


class LinkError(FieldError):
    """Invalid link input; `field` names it, `reason` is a stable code."""

    def __init__(self, field: str, reason: str, message: str) -> None:
        super().__init__(field, message)
        self.reason = reason


class AliasTaken(Exception):
    def __init__(self, domain: str, alias: str) -> None:
        super().__init__(f"the alias {alias!r} is taken on {domain or 'the default domain'}")
        self.domain, self.alias = domain, alias


class QuotaExceeded(Exception):
    def __init__(self, quota: int, used: int, wanted: int) -> None:
        super().__init__(
            f"this account's monthly quota of {quota} links is used up "
            f"({used} created this month, {wanted} more asked)"
        )
        self.quota, self.used, self.wanted = quota, used, wanted


class NotOwner(Exception):
    """The link belongs to another principal."""


# --- target URLs ---------------------------------------------------------------------------


def _host(parts: SplitResult) -> str:
    host = parts.hostname or ""
    if not host:
        raise LinkError("url", "no-host", "the URL has no host")
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise LinkError("url", "invalid-host", f"the host {host!r} is not a valid name") from None
    ascii_host = ascii_host.lower().rstrip(".")
    if not ascii_host or any(c in ascii_host for c in " \t\r\n<>\"'\\{}|^`"):
        raise LinkError("url", "invalid-host", f"the host {host!r} is not a valid name")
    return ascii_host


def normalise_url(raw: str, *, field_name: str = "url") -> str:
    """A target URL in canonical form: http(s) only, lower-case scheme and host (IDNA),
    no default port, no fragment-less empty path, percent-encoding normalised; or LinkError."""
    text = raw.strip()
    if not text:
        raise LinkError(field_name, "empty", "the URL is empty")
    if len(text) > MAX_URL:
        raise LinkError(field_name, "too-long", f"the URL is longer than {MAX_URL} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise LinkError(field_name, "invalid-characters", "the URL holds control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise LinkError(field_name, "malformed", f"the URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = scheme or "none"
        raise LinkError(
            field_name, "scheme-not-allowed", f"only http and https URLs, not scheme {shown!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise LinkError(field_name, "credentials", "the URL must not hold a user name or password")
    host = _host(parts)
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = (
        host if port is None or port == (443 if scheme == "https" else 80) else f"{host}:{port}"
    )
    path = quote(unquote(parts.path), safe="/:@!$&'()*+,;=-._~%") or "/"
    query = quote(unquote(parts.query), safe="=&/:@!$'()*+,;?-._~%")
    fragment = quote(unquote(parts.fragment), safe="=&/:@!$'()*+,;?-._~%#")
    url = urlunsplit((scheme, netloc, path, query, fragment))
    if len(url) > MAX_URL:
        raise LinkError(field_name, "too-long", f"the URL is longer than {MAX_URL} characters")
    return url


def url_host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


# --- aliases -------------------------------------------------------------------------------


def validate_alias(alias: str, reserved: frozenset[str] = RESERVED) -> str:
    """A custom alias as given (codes are case-sensitive), or LinkError saying why not.

    3-20 letters, digits, `-` or `_`; not a reserved word in any letter case.
    """
    if not ALIAS_MIN <= len(alias) <= ALIAS_MAX:
        raise LinkError(
            "custom_alias",
            "alias-length",
            f"an alias is {ALIAS_MIN}-{ALIAS_MAX} characters long, got {len(alias)}",
        )
    if not ALIAS_PATTERN.fullmatch(alias):
        raise LinkError(
            "custom_alias",
            "alias-characters",
            "an alias holds only letters, digits, '-' and '_'",
        )
    if alias.lower() in reserved:
        raise LinkError("custom_alias", "alias-reserved", f"the alias {alias!r} is reserved")
    return alias


# --- the blocklist -------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocklist:
    """Target domains (a domain blocks its subdomains too) and glob patterns over the whole URL
    (`*` any run of characters, `?` one), matched case-insensitively."""

    domains: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()

    @classmethod
    def of(cls, entries: list[str]) -> Blocklist:
        domains, patterns = set(), []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            if any(c in entry for c in "*?[/:"):
                patterns.append(entry)
            else:
                domains.add(entry.lstrip(".").rstrip("."))
        return cls(frozenset(domains), tuple(patterns))

    def match(self, url: str) -> str | None:
        """What blocks `url`, or None."""
        host = url_host(url)
        labels = host.split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self.domains:
                return f"domain {candidate}"
        lowered = url.lower()
        for pattern in self.patterns:
            if fnmatchcase(lowered, pattern):
                return f"pattern {pattern}"
        return None

    def __bool__(self) -> bool:
        return bool(self.domains or self.patterns)


def is_own_host(url: str, own_hosts: frozenset[str]) -> bool:
    """Whether `url` points at one of tenfold's own short domains (a redirect loop)."""
    host = url_host(url)
    if host in own_hosts:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback and "localhost" in own_hosts
    except ValueError:
        return False


# --- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    monthly_quota: int  # links per calendar month (UTC); 0 = unlimited
    custom_aliases: bool
    branded_domains: int  # how many domains an account may register


DEFAULT_PLANS = {
    "free": Plan("free", 1_000, custom_aliases=False, branded_domains=0),
    "pro": Plan("pro", 100_000, custom_aliases=True, branded_domains=5),
    "business": Plan("business", 0, custom_aliases=True, branded_domains=100),
}


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    email: str
    plan: str
    monthly_quota: int
    usage_month: str  # YYYY-MM
    current_usage: int
    created_at_ms: int
    key_id: str

    @property
    def owner(self) -> str:
        return owner_of_account(self.account_id)


def owner_of_account(account_id: str) -> str:
    return f"account:{account_id}"


def account_of_owner(owner: str) -> str | None:
    prefix, sep, rest = owner.partition(":")
    return rest if sep and prefix == "account" else None


EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


def validate_email(email: str) -> str:
    email = email.strip()
    if len(email) > 254 or not EMAIL.fullmatch(email) or "." not in email.rpartition("@")[2]:
        raise LinkError("email", "invalid-email", "not an email address")
    return email.lower()


# --- links ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Link:
    link_id: int
    domain: str  # "" for the default short domain
    short_code: str
    long_url: str
    owner: str
    created_at_ms: int
    updated_at_ms: int
    expires_at_ms: int | None
    is_active: bool
    is_custom: bool
    redirect_status: int  # 302 or 301
    max_visits: int | None
    click_count: int
    description: str = ""
    password_hash: str | None = None
    blocked_reason: str | None = None


@dataclass(slots=True)
class Target:
    """What the redirect needs to know of one link (what the caches hold)."""

    link_id: int
    long_url: str
    status: int  # 301 / 302
    expires_at_ms: int  # 0 = never
    active: bool
    max_visits: int  # 0 = no cap
    protected: bool
    location: bytes = field(default=b"")  # the Location header's value, encoded once

    def __post_init__(self) -> None:
        if not self.location:
            self.location = self.long_url.encode()  # normalised URLs are ASCII


def target_of(link: Link) -> Target:
    return Target(
        link.link_id,
        link.long_url,
        link.redirect_status,
        link.expires_at_ms or 0,
        link.is_active and not link.blocked_reason,
        link.max_visits or 0,
        link.password_hash is not None,
    )


# --- passwords -----------------------------------------------------------------------------

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    if not 1 <= len(password) <= MAX_PASSWORD:
        raise LinkError("password", "password-length", f"a password is 1-{MAX_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, salt_b64, digest_b64 = stored.split("$")
        salt = base64.urlsafe_b64decode(salt_b64)
        expected = base64.urlsafe_b64decode(digest_b64)
    except ValueError:
        return False
    if kind != "scrypt" or len(password) > MAX_PASSWORD:
        return False
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return hmac.compare_digest(digest, expected)
