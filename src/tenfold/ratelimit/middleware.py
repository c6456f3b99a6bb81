"""Rate limiting for any ASGI app: 429 + problem+json + Retry-After, and the IETF
`RateLimit-Policy` / `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers) on every
limited response. Also the guard in front of tenfold's own API."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenfold.kernel.auth import key_from_headers, key_from_scope
from tenfold.kernel.errors import BackendUnavailable
from tenfold.kernel.http import (
    PROBLEM_CONTENT_TYPE,
    Gate,
    GateVerdict,
    Problem,
    RawHeaders,
    client_ip,
    parse_networks,
)
from tenfold.kernel.runtime import Mount, Runtime
from tenfold.ratelimit.algorithms import Algorithm, Decision, Limit
from tenfold.ratelimit.limiter import RateLimiter
from tenfold.ratelimit.models import CheckContext
from tenfold.ratelimit.stores.memory import MemoryCounterStore


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the middleware reports for one request under one (deciding) policy."""

    policy: str
    decision: Decision
    window_s: int


Decide = Callable[[Scope], Awaitable[Verdict | None]]


def _sf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def verdict_headers(verdict: Verdict, legacy: bool = False) -> list[tuple[bytes, bytes]]:
    d = verdict.decision
    name = _sf_string(verdict.policy)
    reset_s = max(0, math.ceil(d.reset_ms / 1000))
    headers = [
        (b"ratelimit-policy", f"{name};q={d.limit};w={verdict.window_s}".encode()),
        (b"ratelimit", f"{name};r={max(0, d.remaining)};t={reset_s}".encode()),
    ]
    if legacy:
        headers += [
            (b"x-ratelimit-limit", str(d.limit).encode()),
            (b"x-ratelimit-remaining", str(max(0, d.remaining)).encode()),
            (b"x-ratelimit-reset", str(reset_s).encode()),
        ]
    if not d.allowed:
        headers.append((b"retry-after", str(max(1, math.ceil(d.retry_ms / 1000))).encode()))
    return headers


class RateLimitMiddleware:
    """Wraps an ASGI app; `decide` returns the deciding verdict, or None for "not limited"."""

    def __init__(self, app: ASGIApp, decide: Decide, *, legacy_headers: bool = False) -> None:
        self.app = app
        self.decide = decide
        self.legacy_headers = legacy_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = await self.decide(scope)
        if verdict is None:
            await self.app(scope, receive, send)
            return
        headers = verdict_headers(verdict, self.legacy_headers)
        if not verdict.decision.allowed:
            body = orjson.dumps(rejection(verdict).body())
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [
                        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                        (b"content-length", str(len(body)).encode()),
                        *headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @classmethod
    def for_limit(
        cls,
        app: ASGIApp,
        limit: Limit,
        *,
        limiter: RateLimiter | None = None,
        key: str | Callable[[Scope], str | None] = "ip",
        name: str = "default",
        trusted_proxies: Sequence[str] = (),
        legacy_headers: bool = False,
    ) -> RateLimitMiddleware:
        """One limit for a whole app, keyed by client IP, API key, or a function of the scope."""
        limiter = limiter or RateLimiter()
        networks = parse_networks(trusted_proxies)
        window_s = limit.window_ms // 1000

        def identity(scope: Scope) -> str | None:
            if callable(key):
                return key(scope)
            if key == "api_key":
                return key_from_headers(RawHeaders(scope))
            return client_ip(scope, networks)

        async def decide(scope: Scope) -> Verdict | None:
            who = identity(scope)
            if who is None:
                return None
            return Verdict(name, await limiter.ahit(limit, who), window_s)

        return cls(app, decide, legacy_headers=legacy_headers)


def guard(
    runtime: Runtime, public_paths: Callable[[], set[str]]
) -> tuple[Callable[[ASGIApp], ASGIApp], Gate]:
    """tenfold's own API guard: anonymous calls limited per IP; a key only by its policies."""
    from tenfold.ratelimit.api import service_for

    settings = runtime.settings
    service = service_for(runtime)
    networks = parse_networks(settings.ratelimit_trusted_proxies)
    anonymous = Limit.of(
        Algorithm.SLIDING_WINDOW_COUNTER,
        settings.ratelimit_anonymous_limit,
        settings.ratelimit_anonymous_window,
    )
    shared = RateLimiter(service.counters, clock=runtime.clock, prefix=settings.redis_prefix)
    local = RateLimiter(MemoryCounterStore(), clock=runtime.clock, prefix=settings.redis_prefix)
    public_prefixes = ("/r/",)
    limit_public = settings.ratelimit_limit_public
    cache: dict[str, set[str]] = {}
    keys = runtime.keys

    async def decide(scope: Scope) -> Verdict | None:
        path: str = scope["path"]
        if not limit_public:
            if getattr(scope.get("route"), "public", False):
                return None  # a public lean route (a short link on a branded host)
            public = cache.get("paths")
            if public is None:
                public = cache["paths"] = public_paths()
            if path in public or path.startswith(public_prefixes):
                return None
        presented = key_from_scope(scope)
        if presented:
            principal = keys.verified(presented) or await keys.verify(presented)
            if principal is not None:
                scope.setdefault("state", {})["principal"] = principal
                client_id = f"key:{principal.key_id}"
                if not service.book.has_own(client_id):
                    return None  # a key is limited only by policies assigned to it
                ctx = CheckContext(client_id=client_id, resource=path)
                result = await service.check(ctx, assigned_only=True)
                if result.deciding is None:
                    return None
                d = result.deciding
                return Verdict(d.policy.name, d.decision, d.policy.time_window)
        ip = client_ip(scope, networks) or "unknown"
        try:
            decision = await shared.ahit(anonymous, f"guard-ip:{ip}")
        except BackendUnavailable:
            decision = await local.ahit(anonymous, f"guard-ip:{ip}")
        return Verdict("anonymous", decision, settings.ratelimit_anonymous_window)

    def wrap(app: ASGIApp) -> ASGIApp:
        return RateLimitMiddleware(app, decide, legacy_headers=settings.ratelimit_legacy_headers)

    full_gate = as_gate(decide, legacy=settings.ratelimit_legacy_headers)

    async def gate(scope: Scope) -> GateVerdict | None:
        # The usual lean call first: a key verified lately, with no policy of its own, is not
        # limited on any route (what `decide` concludes too, after the public-path checks).
        presented = key_from_scope(scope)
        if presented:
            principal = keys.verified(presented)
            if principal is not None and not service.book.has_own("key:" + principal.key_id):
                scope["state"]["principal"] = principal
                return None
        return await full_gate(scope)

    return wrap, gate


def rejection(verdict: Verdict) -> Problem:
    """The 429 problem for a denied verdict."""
    retry = verdict.decision.retry_ms / 1000
    return Problem(
        429,
        "rate-limited",
        f"rate limit {verdict.policy!r} exceeded; retry in {retry:g} s",
        retry_after=retry,
        policy=verdict.policy,
    )


def as_gate(decide: Decide, *, legacy: bool = False) -> Gate:
    """The same decision for the lean routes, which the middleware does not wrap."""

    async def gate(scope: Scope) -> GateVerdict | None:
        verdict = await decide(scope)
        if verdict is None:
            return None
        headers = verdict_headers(verdict, legacy)
        return GateVerdict(headers, None if verdict.decision.allowed else rejection(verdict))

    return gate


def guard_mount(runtime: Runtime, public_paths: Callable[[], set[str]]) -> Mount:
    from tenfold.ratelimit.api import service_for, start_hooks

    on_start, on_stop = start_hooks(runtime, service_for(runtime))
    wrap, gate = guard(runtime, public_paths)
    return Mount(
        name="ratelimit-guard",
        on_start=[on_start],
        on_stop=[on_stop],
        wrap=wrap,
        gate=gate,
    )
