"""The shortener's use cases: create, resolve, manage, account, verify domains, sweep.

Redirects resolve through three layers: an in-process LRU (also remembering unknown codes for
a few seconds), then (scale-out) a Redis copy, then SQL. A change to a link drops every copy
(Redis delete + a pub/sub message to every process); the local entries also expire on their own.
Clicks never wait: the redirect bumps an in-memory counter and hands the click to the analytics
recorder's bounded buffer; a background flush writes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson
import structlog
from prometheus_client import REGISTRY

from tenfold.kernel.errors import BackendUnavailable
from tenfold.kernel.telemetry import HotCounter
from tenfold.shortener.codes import CodeGenerator
from tenfold.shortener.models import (
    DEFAULT_PLANS,
    RESERVED,
    Account,
    AliasTaken,
    Blocklist,
    Link,
    LinkError,
    NotOwner,
    Plan,
    Target,
    account_of_owner,
    hash_password,
    is_own_host,
    normalise_url,
    owner_of_account,
    target_of,
    validate_alias,
    validate_email,
)
from tenfold.shortener.stores.sql import Batch, NewLink, Sort, SqlLinkStore

if TYPE_CHECKING:
    from tenfold.kernel.clock import Clock
    from tenfold.kernel.kv import KV

log = structlog.get_logger(__name__)

INVALIDATE_CHANNEL = "shortener:invalidate"
MAX_GROUP = 200  # creation requests sharing one transaction
CODE_ATTEMPTS = 3  # a generated code may equal someone's alias: the link gets another
REDIS_TTL_SECONDS = 86_400.0
_MISSING = object()

REDIRECTS = HotCounter(
    "tenfold_shortener_redirects_total",
    "Short-link requests by outcome (redirected, not_found, gone, password_required, ...).",
    ("outcome",),
    registry=REGISTRY,
)


class Recorder(Protocol):
    """The click analytics the redirect feeds (tenfold.shortener.clicks.ClickRecorder)."""

    def record(
        self, at_ms: int, domain: str, code: str, ip: str, user_agent: str, referrer: str
    ) -> bool: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def flush(self) -> int: ...
    async def forget(self, domain: str, code: str) -> None: ...
    async def report(
        self,
        domain: str,
        code: str,
        *,
        start: date | None,
        end: date | None,
        granularity: Literal["hour", "day", "week"] = "day",
        include_bots: bool = False,
    ) -> dict[str, Any]: ...


Verifier = Callable[[str, str], Awaitable[bool]]
"""verify(domain, token) -> whether the domain proves it holds the token."""


@dataclass
class ShortenerConfig:
    code_length: int = 7
    block: int = 1_000
    base_url: str = ""  # the default domain's origin (https://sho.rt); "" = the request's own
    short_hosts: frozenset[str] = frozenset()  # hosts of the default domain (GET /{code} there)
    plans: dict[str, Plan] = field(default_factory=lambda: dict(DEFAULT_PLANS))
    anonymous: bool = False
    blocklist: Blocklist = field(default_factory=Blocklist)
    reserved: frozenset[str] = RESERVED
    cache_size: int = 100_000
    cache_seconds: float = 60.0  # how long a process trusts its own copy of a link
    negative_seconds: float = 5.0  # ... and its memory of an unknown code
    retention_days: int = 1_826  # links are kept 5 years, then purged; 0 = forever
    default_redirect: int = 302


@dataclass(slots=True)
class CreateItem:
    url: str
    custom_alias: str | None = None
    expires_at_ms: int | None = None
    description: str = ""
    domain: str = ""
    redirect_status: int = 0
    max_visits: int | None = None
    password: str | None = None


@dataclass(slots=True)
class _Pending:
    batch: Batch
    future: asyncio.Future[list[Link | Exception]]


def month_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m")


class ShortenerService:
    def __init__(
        self,
        store: SqlLinkStore,
        *,
        master: bytes | Callable[[], bytes],
        kv: KV | None = None,
        recorder: Recorder | None = None,
        clock: Clock,
        config: ShortenerConfig | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.store = store
        self.kv = kv
        self.recorder = recorder
        self.clock = clock
        self.config = config or ShortenerConfig()
        self.verifier = verifier
        self._master = master
        self._codes: CodeGenerator | None = None
        self._cache: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Future[Target | None]] = {}
        self._counts: dict[int, int] = {}
        self.branded: dict[str, str] = {}  # verified host -> its domain (the same name)
        self._hosts: dict[bytes, Any] = {}  # raw Host header -> domain_of_host's answer
        self._pending: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self._subscription: Any = None
        self._code_lock = asyncio.Lock()

    @property
    def codes(self) -> CodeGenerator:
        """The code generator, keyed by the master key (read on first use: at start-up)."""
        if self._codes is None:
            master = self._master() if callable(self._master) else self._master
            self._codes = CodeGenerator(
                master, self.store.reserve, length=self.config.code_length, block=self.config.block
            )
        return self._codes

    # --- the redirect ----------------------------------------------------------------------

    def cached(self, domain: str, code: str) -> Any:
        """The local copy: a Target, None for a known-unknown code, or _MISSING."""
        entry = self._cache.get((domain, code))
        if entry is None or entry[1] < self.clock.now():
            return _MISSING
        return entry[0]

    async def resolve(self, domain: str, code: str) -> Target | None:
        """What `code` redirects to (None: unknown), through the local copy, Redis, then SQL."""
        found = self.cached(domain, code)
        if found is not _MISSING:
            return found  # type: ignore[no-any-return]
        key = (domain, code)
        loading = self._loading.get(key)
        if loading is not None:  # one load per code, however many requests wait for it
            return await asyncio.shield(loading)
        future: asyncio.Future[Target | None] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            target = await self._load(domain, code)
            future.set_result(target)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            self._loading.pop(key, None)
        self._remember(domain, code, target)
        return target

    async def _load(self, domain: str, code: str) -> Target | None:
        rkey = self.kv.key("link", domain, code) if self.kv is not None else ""
        if self.kv is not None:
            with contextlib.suppress(BackendUnavailable):
                raw = await self.kv.get(rkey)
                if raw is not None:
                    return None if raw == b"-" else _decode(raw)
        link = await self.store.get(domain, code)
        target = target_of(link) if link else None
        if self.kv is not None:
            with contextlib.suppress(BackendUnavailable):
                ttl = REDIS_TTL_SECONDS if target else self.config.negative_seconds
                await self.kv.set(rkey, _encode(target) if target else b"-", ttl=ttl)
        return target

    def _remember(self, domain: str, code: str, target: Target | None) -> None:
        seconds = self.config.cache_seconds if target else self.config.negative_seconds
        self._cache[(domain, code)] = (target, self.clock.now() + seconds)
        self._cache.move_to_end((domain, code))
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def visit(
        self,
        domain: str,
        code: str,
        target: Target,
        ip: str,
        user_agent: str,
        referrer: str,
        at_ms: int = 0,
    ) -> None:
        """Count a redirect and hand its click to analytics; never waits, never fails."""
        if not target.max_visits:
            self._counts[target.link_id] = self._counts.get(target.link_id, 0) + 1
        if self.recorder is not None:
            at = at_ms or self.clock.now_ms()
            self.recorder.record(at, domain, code, ip, user_agent, referrer)

    async def take_visit(self, target: Target) -> bool:
        """A capped link's visit, counted exactly in SQL; False once the cap is reached."""
        return await self.store.take_visit(target.link_id)

    def domain_of_raw_host(self, raw: bytes) -> str | None:
        """domain_of_host for a raw Host header, remembered (the redirect asks on every hit)."""
        found = self._hosts.get(raw, _MISSING)
        if found is _MISSING:
            if len(self._hosts) >= 1_024:  # Host headers are the client's to choose
                self._hosts.clear()
            found = self._hosts[raw] = self.domain_of_host(raw.decode("latin-1").lower())
        return found  # type: ignore[no-any-return]

    def domain_of_host(self, host: str) -> str | None:
        """The code space a Host serves at `/{code}`: a verified branded domain, the default
        domain ("") on a configured short host, else None (not a short-link host)."""
        host = host.partition(":")[0].lower() if ":" in host and not host.endswith("]") else host
        found = self.branded.get(host)
        if found is not None:
            return found
        return "" if host in self.config.short_hosts else None

    # --- creation --------------------------------------------------------------------------

    async def create(
        self, owner: str, items: Sequence[CreateItem], *, can_alias: bool | None = None
    ) -> list[Link | Exception]:
        """Create links for `owner`; each item answers its Link or the error that stopped it.

        Items are validated first; the valid ones go to SQL in one transaction (shared with
        other requests arriving meanwhile), counted against the owner's account quota.
        """
        now = self.clock.now_ms()
        account_id = account_of_owner(owner)
        plan: Plan | None = None
        if account_id is not None:
            account = await self.store.account(account_id)
            if account is None:
                raise LookupError(f"no shortener account {account_id}")
            plan = self.config.plans.get(account.plan)
        aliases_ok = can_alias if can_alias is not None else (plan is None or plan.custom_aliases)
        results: list[Link | Exception | None] = [None] * len(items)
        new: list[tuple[int, NewLink]] = []
        owned_domains: dict[str, bool] = {}
        for i, item in enumerate(items):
            try:
                new.append((i, await self._prepare(item, owner, now, aliases_ok, owned_domains)))
            except (LinkError, PermissionError) as exc:
                results[i] = exc
        for _ in range(CODE_ATTEMPTS):
            if not new:
                break
            await self._assign_codes([n for _, n in new])
            created = await self._submit(Batch([n for _, n in new], account_id, month_of(now)))
            retry = []
            for (i, made), outcome in zip(new, created, strict=True):
                if isinstance(outcome, LookupError):
                    if not made.is_custom:  # a generated code equal to an alias: another code
                        retry.append((i, made))
                        continue
                    outcome = AliasTaken(made.domain, made.short_code)
                results[i] = outcome
            new = retry
        done = [r for r in results if isinstance(r, Link)]
        if done:
            await self._forget([(link.domain, link.short_code) for link in done])
        return [r if r is not None else RuntimeError("not created") for r in results]

    async def _prepare(
        self,
        item: CreateItem,
        owner: str,
        now: int,
        aliases_ok: bool,
        owned_domains: dict[str, bool],
    ) -> NewLink:
        url = normalise_url(item.url)
        if is_own_host(url, self.config.short_hosts | frozenset(self.branded)):
            raise LinkError("url", "redirect-loop", "the URL points at a short link domain")
        reason = self.config.blocklist.match(url)
        if reason is not None:
            raise LinkError("url", "blocked", f"the URL is blocked ({reason})")
        if item.expires_at_ms is not None and item.expires_at_ms <= now:
            raise LinkError("expires_at", "in-the-past", "the expiry time is in the past")
        if item.domain:
            if item.domain not in owned_domains:
                record = await self.store.domain(item.domain)
                owned_domains[item.domain] = bool(
                    record and record["verified_at_ms"] and record["owner"] == owner
                )
            if not owned_domains[item.domain]:
                raise LinkError(
                    "domain", "domain-not-yours", f"{item.domain} is not a verified domain of yours"
                )
        alias = None
        if item.custom_alias is not None:
            if not aliases_ok:
                raise LinkError(
                    "custom_alias",
                    "plan-feature",
                    "custom aliases are not part of this account's plan",
                )
            alias = validate_alias(item.custom_alias, self.config.reserved)
        status = item.redirect_status or self.config.default_redirect
        if status not in (301, 302, 307, 308):
            raise LinkError("redirect_type", "invalid", "the redirect type is 301, 302, 307 or 308")
        if item.max_visits is not None and item.max_visits < 1:
            raise LinkError("max_visits", "invalid", "max_visits is at least 1")
        if len(item.description) > 500:
            raise LinkError("description", "too-long", "the description is at most 500 characters")
        password = None
        if item.password is not None:  # scrypt: tens of milliseconds, not on the event loop
            password = await asyncio.to_thread(hash_password, item.password)
        return NewLink(
            domain=item.domain,
            short_code=alias or "",
            long_url=url,
            owner=owner,
            description=item.description,
            created_at_ms=now,
            expires_at_ms=item.expires_at_ms,
            is_custom=alias is not None,
            redirect_status=status,
            max_visits=item.max_visits,
            password_hash=password,
        )

    async def _assign_codes(self, items: list[NewLink]) -> None:
        by_domain: dict[str, list[NewLink]] = {}
        for new in items:
            if not new.is_custom:
                by_domain.setdefault(new.domain, []).append(new)
        async with self._code_lock:  # counter blocks are shared by every request of the process
            for domain, group in by_domain.items():
                codes = await self.codes.take(domain, len(group))
                for new, code in zip(group, codes, strict=True):
                    new.short_code = code

    async def _submit(self, batch: Batch) -> list[Link | Exception]:
        future: asyncio.Future[list[Link | Exception]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(batch, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        return await future

    async def _write(self) -> None:
        """Group commit: every request waiting meanwhile shares the next transaction."""
        while self._pending:
            group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            try:
                outcomes = await self.store.create([p.batch for p in group])
            except Exception as exc:
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, outcome in zip(group, outcomes, strict=True):
                if not p.future.done():
                    p.future.set_result(outcome)

    # --- management ------------------------------------------------------------------------

    async def get(self, domain: str, code: str) -> Link | None:
        link = await self.store.get(domain, code)
        if link is not None and link.max_visits is None:
            link.click_count += self._counts.get(link.link_id, 0)
        return link

    async def owned(self, domain: str, code: str, owner: str, *, admin: bool) -> Link:
        link = await self.store.get(domain, code)
        if link is None:
            raise LookupError(code)
        if link.owner != owner and not admin:
            raise NotOwner()
        return link

    async def update(self, link: Link, changes: dict[str, Any]) -> Link:
        now = self.clock.now_ms()
        values: dict[str, Any] = {"updated_at_ms": now}
        if "long_url" in changes:
            url = normalise_url(changes["long_url"], field_name="long_url")
            if is_own_host(url, self.config.short_hosts | frozenset(self.branded)):
                raise LinkError(
                    "long_url", "redirect-loop", "the URL points at a short link domain"
                )
            reason = self.config.blocklist.match(url)
            if reason is not None:
                raise LinkError("long_url", "blocked", f"the URL is blocked ({reason})")
            values["long_url"] = url
        if "expires_at_ms" in changes:
            expires = changes["expires_at_ms"]
            if expires is not None and expires <= now:
                raise LinkError("expires_at", "in-the-past", "the expiry time is in the past")
            values["expires_at_ms"] = expires
        if "is_active" in changes:
            values["is_active"] = bool(changes["is_active"])
        if "description" in changes:
            values["description"] = changes["description"] or ""
        if "max_visits" in changes:
            cap = changes["max_visits"]
            if cap is not None and cap < 1:
                raise LinkError("max_visits", "invalid", "max_visits is at least 1")
            values["max_visits"] = cap
        if "redirect_status" in changes:
            if changes["redirect_status"] not in (301, 302, 307, 308):
                raise LinkError(
                    "redirect_type", "invalid", "the redirect type is 301, 302, 307 or 308"
                )
            values["redirect_status"] = changes["redirect_status"]
        if "password" in changes:
            pw = changes["password"]
            values["password_hash"] = await asyncio.to_thread(hash_password, pw) if pw else None
        updated = await self.store.update(link.link_id, values)
        if updated is None:
            raise LookupError(link.short_code)
        await self._forget([(link.domain, link.short_code)])
        return updated

    async def delete(self, link: Link) -> bool:
        deleted = await self.store.delete(link.link_id)
        self._counts.pop(link.link_id, None)
        await self._forget([(link.domain, link.short_code)])
        if deleted and self.recorder is not None:
            with contextlib.suppress(BackendUnavailable):
                await self.recorder.forget(link.domain, link.short_code)
        return deleted

    async def page(
        self,
        owner: str | None,
        *,
        limit: int,
        sort: Sort,
        descending: bool,
        after: tuple[int, int] | None,
        search: str,
        domain: str | None,
    ) -> list[Link]:
        return await self.store.page(
            owner,
            limit=limit,
            sort=sort,
            descending=descending,
            after=after,
            search=search,
            domain=domain,
        )

    # --- caches across processes -----------------------------------------------------------

    async def _forget(self, keys: list[tuple[str, str]]) -> None:
        """Drop every copy of these links: here, in Redis, and (pub/sub) in every process. New
        codes go through here too, so that no process keeps remembering them as unknown."""
        for key in keys:
            self._cache.pop(key, None)
        if self.kv is not None:
            try:
                await self.kv.delete(*(self.kv.key("link", d, c) for d, c in keys))
                await self.kv.publish(INVALIDATE_CHANNEL, _keys_message(keys))
            except BackendUnavailable:
                log.warning("shortener.invalidation_failed", links=len(keys))

    async def on_invalidate(self, message: bytes) -> None:
        for key in orjson.loads(message):
            self._cache.pop((key[0], key[1]), None)

    # --- accounts --------------------------------------------------------------------------

    async def create_account(
        self, email: str, plan_name: str, make_key: Callable[[str, str], Awaitable[tuple[str, str]]]
    ) -> tuple[Account, str]:
        """A new account and its API key (plaintext, shown once). `make_key(name, owner)` ->
        (key id, plaintext) creates the key."""
        email = validate_email(email)
        plan = self.config.plans.get(plan_name)
        if plan is None:
            raise LinkError(
                "plan",
                "unknown-plan",
                f"no plan {plan_name!r}; plans: {', '.join(self.config.plans)}",
            )
        account_id = secrets.token_hex(8)
        key_id, plaintext = await make_key(
            f"shortener account {email}", owner_of_account(account_id)
        )
        now = self.clock.now_ms()
        account = Account(
            account_id, email, plan.name, plan.monthly_quota, month_of(now), 0, now, key_id
        )
        if not await self.store.add_account(account):
            raise LinkError("email", "taken", f"an account with {email} exists")
        return account, plaintext

    # --- branded domains -------------------------------------------------------------------

    async def add_domain(self, owner: str, domain: str) -> str:
        """Register `domain` for `owner`; the verification token to publish."""
        domain = domain.strip().lower().rstrip(".")
        if (
            not domain
            or len(domain) > 253
            or "." not in domain
            or not all(
                label and len(label) <= 63 and label.replace("-", "").isalnum()
                for label in domain.split(".")
            )
        ):
            raise LinkError("domain", "invalid-domain", "not a domain name")
        if domain in self.config.short_hosts:
            raise LinkError("domain", "taken", f"{domain} is taken")
        account_id = account_of_owner(owner)
        if account_id is not None:
            account = await self.store.account(account_id)
            plan = self.config.plans.get(account.plan) if account else None
            allowed = plan.branded_domains if plan else 0
            if len(await self.store.domains(owner)) >= allowed:
                raise LinkError(
                    "domain", "plan-feature", f"this plan allows {allowed} branded domains"
                )
        token = secrets.token_urlsafe(24)
        if not await self.store.add_domain(domain, owner, token, self.clock.now_ms()):
            raise LinkError("domain", "taken", f"{domain} is registered already")
        return token

    async def verify_domain(self, domain: str, owner: str, *, admin: bool) -> bool:
        record = await self.store.domain(domain)
        if record is None or (record["owner"] != owner and not admin):
            raise LookupError(domain)
        if record["verified_at_ms"]:
            return True
        if self.verifier is None or not await self.verifier(domain, record["token"]):
            return False
        await self.store.verify_domain(domain, self.clock.now_ms())
        await self.load_domains()
        return True

    async def load_domains(self) -> None:
        rows = await self.store.domains(verified=True)
        self.branded = {r["domain"]: r["domain"] for r in rows}
        self._hosts = {}

    # --- background work -------------------------------------------------------------------

    async def flush(self) -> None:
        """Write click counts to the links, and clicks to analytics."""
        counts, self._counts = self._counts, {}
        if counts:
            try:
                await self.store.add_clicks(counts)
            except Exception:
                for link_id, n in counts.items():  # keep them for the next flush
                    self._counts[link_id] = self._counts.get(link_id, 0) + n
                raise
        if self.recorder is not None:
            await self.recorder.flush()

    async def recheck_blocklist(self, *, page: int = 1_000) -> dict[str, int]:
        """Walk every link; block what the blocklist now matches, unblock what it no longer does."""
        after, seen, blocked, cleared = 0, 0, 0, 0
        while True:
            batch = await self.store.links_after(after, page)
            if not batch:
                break
            changes: dict[int, str | None] = {}
            keys = []
            for link in batch:
                reason = self.config.blocklist.match(link.long_url)
                if reason != link.blocked_reason:
                    changes[link.link_id] = reason
                    keys.append((link.domain, link.short_code))
                    if reason:
                        blocked += 1
                    else:
                        cleared += 1
            if changes:
                await self.store.block(changes)
                await self._forget(keys)
            seen += len(batch)
            after = batch[-1].link_id
        return {"checked": seen, "blocked": blocked, "unblocked": cleared}

    async def purge(self) -> int:
        """Delete links past the retention period."""
        if not self.config.retention_days:
            return 0
        cutoff = self.clock.now_ms() - self.config.retention_days * 86_400_000
        gone = await self.store.purge_created_before(cutoff)
        if gone:
            await self._forget(gone)
        return len(gone)

    async def start(self) -> None:
        await self.load_domains()
        if self.kv is not None and self._subscription is None:
            self._subscription = await self.kv.subscribe(INVALIDATE_CHANNEL, self.on_invalidate)

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.close()
            self._subscription = None
        with contextlib.suppress(Exception):
            await self.flush()


def _keys_message(keys: list[tuple[str, str]]) -> bytes:
    return orjson.dumps([list(k) for k in keys])


def _encode(target: Target) -> bytes:
    return orjson.dumps(
        [
            target.link_id,
            target.long_url,
            target.status,
            target.expires_at_ms,
            target.active,
            target.max_visits,
            target.protected,
        ]
    )


def _decode(raw: bytes) -> Target:
    link_id, url, status, expires, active, cap, protected = orjson.loads(raw)
    return Target(link_id, url, status, expires, active, cap, protected)
