"""Feature flag benchmarks: local evaluation against Unleash and GrowthBook, the evaluation API
against the HTTP ceiling, and propagation of a change to connected SDKs, in one run.

* local-ruleset-vs-<peer>: one boolean flag with three targeting rules and a roll-out, evaluated
  in process for 10,000 precomputed user contexts (cycled through), by tenfold's
  `Ruleset.evaluate` and by each peer SDK doing the equivalent evaluation locally from a
  bootstrapped definition, with no server and no network.
* ceiling-uvicorn / ceiling-granian: the bare-ASGI ceiling (benchmarks/http.py);
  evaluate-<server>: `POST /api/v1/evaluate` for ten flags on one granian and one uvicorn process
  (embedded tenfold, flags only), from 1,000 distinct users under wrk: >= 40 % of the ceiling's
  requests/s and p99 < 5 ms at 10 connections.
* propagation-sdk-stream: 20 `FlagsClient`s following `GET /api/v1/flags/stream` while a flag is
  toggled on and off through `POST /api/v1/flags/{key}/toggle`; per client and toggle, the time
  from just before the toggle request to the client's `on_change` seeing the new value: p99 < 1 s
  (the spec asks for 30 s; no peer).

Sides are built by the functions in `OURS` and `PEERS`; another way of evaluating (tenfold's SDK
client, say) is one more builder in `OURS`, and every one of ours is compared with every peer.
Sections are the functions in `SECTIONS`, each returning its records.

Every side first answers every context once (warm-up, and the agreement check: its share of users
"on" in each targeting group must match what the rules imply, or its records carry an "error").
A side that fails is recorded with an "error" key and null figures; the others still run.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import http as bench_http
from benchmarks._runner import admin_key, log, percentile_ms, result, server_env, tenfold_command
from benchmarks._runner import attempt as _attempt
from benchmarks._wrk import WrkResult, ensure_wrk, parse

T = TypeVar("T")
attempt = partial(_attempt, "flags")  # a measurement whose failure is logged

FLAG_KEY = "checkout-v2"
CONTEXTS = 10_000
TARGET_RATIO = 2.0  # tenfold's evaluations/s over each peer's
SEED = 20_240_601  # the synthetic population is the same in every run

# How far a side's share of users "on" in a roll-out group may stray from the percentage. The
# smaller group (eu-v2) holds about 1,600 of the 10,000 users: a fair hash lands within 2.5 points
# of 50% there (2 sigma), and 4 points still tells 50% from the 65% two unrelated hashes would give.
SHARE_TOLERANCE = 0.04


@dataclass(frozen=True, slots=True)
class Sizes:
    repeats: int  # timed loops per side; the median is reported
    seconds: float  # aimed-at length of one timed loop
    sample: int  # calls timed one by one, for the latency percentiles


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(repeats=3, seconds=0.15, sample=3_000)
    return Sizes(repeats=7, seconds=0.6, sample=20_000)


# --- the users -------------------------------------------------------------------------------

COUNTRIES = (("DE", 20), ("FR", 15), ("US", 30), ("GB", 15), ("JP", 10), ("BR", 10))
# (version, at least 2.0.0 by SemVer precedence): pre-releases and 2.10 > 2.9 are in on purpose.
VERSIONS = (
    ("1.9.3", False),
    ("1.12.0", False),
    ("2.0.0-rc.1", False),
    ("2.0.0", True),
    ("2.3.1", True),
    ("2.10.0", True),
    ("3.0.0", True),
)
PLANS = (("free", 60), ("pro", 30), ("enterprise", 10))
DOMAINS = ("mail.test", "corp.test", "example.com.evil.test", "example.org")
STAFF_SHARE = 0.08  # emails at @example.com


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    email: str
    country: str
    app_version: str
    plan: str
    group: str  # which rule decides, by construction (see GROUPS)


# Who the rules turn on, in rule order: a user is in the first group that applies.
GROUPS: dict[str, tuple[str, float]] = {
    "staff": ("email ends with @example.com", 1.0),
    "eu-v2": ("country DE/FR and app_version >= 2.0.0, not enterprise: 50% roll-out", 0.5),
    "enterprise": ("plan enterprise", 1.0),
    "rest": ("everyone else: 30% roll-out", 0.3),
}


def population(n: int = CONTEXTS) -> list[User]:
    rng = random.Random(SEED)
    countries = [c for c, _ in COUNTRIES]
    country_weights = [w for _, w in COUNTRIES]
    plans = [p for p, _ in PLANS]
    plan_weights = [w for _, w in PLANS]
    users = []
    for _ in range(n):
        user_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        name = f"u{rng.getrandbits(32):08x}"
        staff = rng.random() < STAFF_SHARE
        email = f"{name}@example.com" if staff else f"{name}@{rng.choice(DOMAINS)}"
        country = rng.choices(countries, country_weights)[0]
        version, v2 = rng.choice(VERSIONS)
        plan = rng.choices(plans, plan_weights)[0]
        # An enterprise user in DE/FR on 2.x is on either way (the roll-out, or rule 3 after it).
        if staff:
            group = "staff"
        elif country in ("DE", "FR") and v2 and plan != "enterprise":
            group = "eu-v2"
        elif plan == "enterprise":
            group = "enterprise"
        else:
            group = "rest"
        users.append(User(user_id, email, country, version, plan, group))
    return users


def expected_share(users: Sequence[User]) -> float:
    """The share of users "on" that the rules imply, with a fair hash.

    Rule 2's roll-out and the final one bucket each user the same way (one bucket per user and
    flag), so the users rule 2 leaves out are out of the 30% too: eu-v2 users are on 50%, not 65%.
    """
    return sum(GROUPS[u.group][1] for u in users) / len(users)


# --- the flag, as each system says it --------------------------------------------------------

TENFOLD_DOC: dict[str, Any] = {
    "environment": "production",
    "revision": 1,
    "flags": [
        {
            "flag_key": FLAG_KEY,
            "flag_type": "boolean",
            "default_value": False,
            "targeting": {
                "enabled": True,
                "rules": [
                    {
                        "id": "staff",
                        "conditions": [
                            {
                                "attribute": "email",
                                "operator": "ends_with",
                                "values": ["@example.com"],
                            }
                        ],
                        "variation": "on",
                    },
                    {
                        "id": "eu-v2",
                        "conditions": [
                            {"attribute": "country", "operator": "in", "values": ["DE", "FR"]},
                            {
                                "attribute": "app_version",
                                "operator": "semver_gte",
                                "value": "2.0.0",
                            },
                        ],
                        "variation": "on",
                        "rollout_percentage": 50,
                    },
                    {
                        "id": "enterprise",
                        "conditions": [
                            {"attribute": "plan", "operator": "equals", "value": "enterprise"}
                        ],
                        "variation": "on",
                    },
                ],
                "default_rule": {
                    "split": [{"variation": "on", "weight": 30}, {"variation": "off", "weight": 70}]
                },
            },
        }
    ],
}

# The client API's features document (GET /api/client/features), as a bootstrap would hold it.
# Strategies are OR-ed, so their order does not matter for a boolean; both roll-outs use the
# same groupId (the flag's name, Unleash's default) so that they hash a user the same way.
UNLEASH_FEATURES: dict[str, Any] = {
    "version": 1,
    "features": [
        {
            "name": FLAG_KEY,
            "type": "release",
            "project": "default",
            "enabled": True,
            "strategies": [
                {
                    "name": "default",
                    "parameters": {},
                    "constraints": [
                        {
                            "contextName": "email",
                            "operator": "STR_ENDS_WITH",
                            "values": ["@example.com"],
                        }
                    ],
                },
                {
                    "name": "flexibleRollout",
                    "parameters": {"rollout": "50", "stickiness": "userId", "groupId": FLAG_KEY},
                    "constraints": [
                        {"contextName": "country", "operator": "IN", "values": ["DE", "FR"]},
                        # No ">=": "not below 2.0.0".
                        {
                            "contextName": "app_version",
                            "operator": "SEMVER_LT",
                            "value": "2.0.0",
                            "inverted": True,
                        },
                    ],
                },
                {
                    "name": "default",
                    "parameters": {},
                    "constraints": [
                        {"contextName": "plan", "operator": "IN", "values": ["enterprise"]}
                    ],
                },
                {
                    "name": "flexibleRollout",
                    "parameters": {"rollout": "30", "stickiness": "userId", "groupId": FLAG_KEY},
                    "constraints": [],
                },
            ],
        }
    ],
}

# The SDK payload's `features`. Force rules with `coverage` are GrowthBook's percentage
# roll-outs; both hash `id` with the same seed (the feature key, the default) and hash version 2.
GROWTHBOOK_FEATURES: dict[str, Any] = {
    FLAG_KEY: {
        "defaultValue": False,
        "rules": [
            {"id": "staff", "condition": {"email": {"$regex": "@example\\.com$"}}, "force": True},
            {
                "id": "eu-v2",
                "condition": {"country": {"$in": ["DE", "FR"]}, "app_version": {"$vgte": "2.0.0"}},
                "force": True,
                "coverage": 0.5,
                "hashAttribute": "id",
                "hashVersion": 2,
            },
            {"id": "enterprise", "condition": {"plan": "enterprise"}, "force": True},
            {
                "id": "rollout",
                "force": True,
                "coverage": 0.3,
                "hashAttribute": "id",
                "hashVersion": 2,
            },
        ],
    }
}

UNLEASH_NOTES = (
    "strategies are OR-ed, not ordered: the same answer for a boolean whose rules all serve on",
    "no >= for versions: NOT SEMVER_LT 2.0.0 (inverted), which also matches a missing or invalid "
    "app_version (tenfold's semver_gte does not)",
    "flexibleRollout, stickiness userId, one groupId for both roll-outs: murmur3, 1% steps "
    "(tenfold: sha256, 0.001% steps)",
    "the final 30% is a flexibleRollout without constraints (Unleash has no default rule)",
)
GROWTHBOOK_NOTES = (
    "no ends-with operator: $regex '@example\\.com$'",
    "$vgte compares padded version strings: an invalid app_version such as 'junk' is >= 2.0.0 "
    "(tenfold refuses it)",
    "roll-outs are force rules with coverage, hashAttribute id, one seed (the feature key), hash "
    "version 2: FNV-1a, 0.01% steps",
)


# --- sides -----------------------------------------------------------------------------------


@dataclass
class Side:
    name: str  # in scenario names
    label: str  # what was measured, with its version
    contexts: list[Any]  # the users in the shape this side takes them, precomputed
    call: Callable[[Any], bool] | None = None
    acall: Callable[[Any], Awaitable[bool]] | None = None  # evaluated inside one coroutine
    usage: str = ""
    notes: tuple[str, ...] = ()
    close: Callable[[], None] = lambda: None
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class Figures:
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int  # per timed loop
    runs: list[float] = field(default_factory=list)  # ops/s of each timed loop
    on_share: float = 0.0
    group_shares: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def tenfold_ruleset(users: Sequence[User]) -> Side:
    from tenfold.flags.evaluation import Ruleset

    ruleset = Ruleset.from_dict(json.loads(json.dumps(TENFOLD_DOC)))  # as received: fresh JSON
    evaluate = ruleset.evaluate

    def call(ctx: dict[str, Any]) -> bool:
        return evaluate(FLAG_KEY, ctx).value is True

    return Side(
        name="ruleset",
        label=f"tenfold-{version_of('tenfold')} Ruleset.evaluate",
        contexts=[
            {
                "user_id": u.user_id,
                "email": u.email,
                "country": u.country,
                "app_version": u.app_version,
                "plan": u.plan,
            }
            for u in users
        ],
        call=call,
        usage="one Ruleset per process; evaluate(flag_key, context) per request",
    )


OURS: tuple[Callable[[Sequence[User]], Side], ...] = (tenfold_ruleset,)


def unleash_contexts(users: Sequence[User]) -> list[dict[str, Any]]:
    return [
        {
            "userId": u.user_id,
            "properties": {
                "email": u.email,
                "country": u.country,
                "app_version": u.app_version,
                "plan": u.plan,
            },
        }
        for u in users
    ]


def _unleash_client() -> tuple[Any, str]:
    from UnleashClient import UnleashClient
    from UnleashClient.cache import BaseCache
    from UnleashClient.constants import FEATURES_URL

    class MemoryCache(BaseCache):
        """A bootstrapped in-memory cache: the features document, nothing on disk."""

        def __init__(self) -> None:
            self.data: dict[str, Any] = {}

        def set(self, key: str, value: Any) -> None:
            self.data[key] = value

        def mset(self, data: dict[str, Any]) -> None:
            self.data.update(data)

        def get(self, key: str, default: Any = None) -> Any:
            return self.data.get(key, default)

        def exists(self, key: str) -> bool:
            return key in self.data

        def destroy(self) -> None:
            self.data.clear()

    cache = MemoryCache()
    cache.set(FEATURES_URL, json.dumps(UNLEASH_FEATURES))
    cache.bootstrapped = True
    client = UnleashClient(
        url="http://127.0.0.1:9",  # never contacted: no fetch, no registration, no metrics
        app_name=f"tenfold-bench-{uuid.uuid4().hex[:8]}",
        disable_metrics=True,
        disable_registration=True,
        refresh_interval=3_600,  # the offline connector reloads the cache this often
        cache=cache,
    )
    client.initialize_client(fetch_toggles=False)
    return client, version_of("UnleashClient")


def unleash_is_enabled(users: Sequence[User]) -> Side:
    client, version = _unleash_client()
    is_enabled = client.is_enabled

    def call(ctx: dict[str, Any]) -> bool:
        return bool(is_enabled(FLAG_KEY, ctx))

    return Side(
        name="unleash",
        label=f"unleashclient-{version} is_enabled",
        contexts=unleash_contexts(users),
        call=call,
        usage="one UnleashClient per process, bootstrapped, initialize_client(fetch_toggles="
        "False); is_enabled(name, context) per request",
        notes=UNLEASH_NOTES,
        close=client.destroy,
    )


def unleash_get_variant(users: Sequence[User]) -> Side:
    client, version = _unleash_client()
    get_variant = client.get_variant

    def call(ctx: dict[str, Any]) -> bool:
        return bool(get_variant(FLAG_KEY, ctx)["feature_enabled"])

    return Side(
        name="unleash-variant",
        label=f"unleashclient-{version} get_variant",
        contexts=unleash_contexts(users),
        call=call,
        usage="as `unleash`, with get_variant(name, context): like Ruleset.evaluate it returns "
        "more than a bool",
        notes=UNLEASH_NOTES,
        close=client.destroy,
    )


def growthbook_attributes(users: Sequence[User]) -> list[dict[str, Any]]:
    return [
        {
            "id": u.user_id,
            "email": u.email,
            "country": u.country,
            "app_version": u.app_version,
            "plan": u.plan,
        }
        for u in users
    ]


def growthbook_per_request(users: Sequence[User]) -> Side:
    from growthbook import GrowthBook

    features = GROWTHBOOK_FEATURES

    def call(attributes: dict[str, Any]) -> bool:
        gb = GrowthBook(attributes=attributes, features=features)
        try:
            return bool(gb.is_on(FLAG_KEY))
        finally:
            gb.destroy()

    return Side(
        name="growthbook",
        label=f"growthbook-{version_of('growthbook')} GrowthBook per request",
        contexts=growthbook_attributes(users),
        call=call,
        usage="the docs' advice for web frameworks: a new GrowthBook(attributes=..., features="
        "<cached features>) per request, is_on(key), destroy() at the end",
        notes=GROWTHBOOK_NOTES,
    )


def growthbook_client(users: Sequence[User]) -> Side:
    from growthbook import GrowthBookClient, UserContext

    client = GrowthBookClient({"client_key": ""})  # never initialize()d: nothing is fetched
    loop = asyncio.new_event_loop()
    loop.run_until_complete(client.set_features(GROWTHBOOK_FEATURES))
    is_on = client.is_on

    async def acall(user: Any) -> bool:
        return bool(await is_on(FLAG_KEY, user))

    return Side(
        name="growthbook-client",
        label=f"growthbook-{version_of('growthbook')} GrowthBookClient (async)",
        contexts=[UserContext(attributes=a) for a in growthbook_attributes(users)],
        acall=acall,
        usage="the docs' recommended async client: one GrowthBookClient per process, features "
        "set once; await is_on(key, UserContext(attributes=...)) per request",
        notes=GROWTHBOOK_NOTES,
        close=loop.close,
        loop=loop,
    )


def growthbook_shared(users: Sequence[User]) -> Side:
    from growthbook import GrowthBook

    gb = GrowthBook(features=GROWTHBOOK_FEATURES)
    set_attributes, is_on = gb.set_attributes, gb.is_on

    def call(attributes: dict[str, Any]) -> bool:
        set_attributes(attributes)
        return bool(is_on(FLAG_KEY))

    return Side(
        name="growthbook-shared",
        label=f"growthbook-{version_of('growthbook')} one GrowthBook, set_attributes",
        contexts=growthbook_attributes(users),
        call=call,
        usage="GrowthBook's cheapest sync path: one instance, set_attributes(...) then is_on(key) "
        "per request (not safe for concurrent requests; a lower bound on its cost)",
        notes=GROWTHBOOK_NOTES,
        close=gb.destroy,
    )


PEERS: tuple[Callable[[Sequence[User]], Side], ...] = (
    unleash_is_enabled,
    unleash_get_variant,
    growthbook_per_request,
    growthbook_client,
    growthbook_shared,
)


# --- measuring -------------------------------------------------------------------------------


class NetworkAttempt(RuntimeError):
    """A side tried to reach the network; local evaluation must not."""


@contextmanager
def no_network() -> Iterator[list[str]]:
    """Every socket connection attempt and name lookup fails (and is listed) while inside."""
    attempts: list[str] = []
    saved = (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args))
        raise NetworkAttempt(f"network access attempted: {attempts[-1]}")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.getaddrinfo = refuse
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = saved  # type: ignore[method-assign]


def run_calls(side: Side, contexts: Sequence[Any]) -> None:
    """Evaluate every context in turn, keeping nothing: the timed loop."""
    if side.acall is not None:
        assert side.loop is not None
        acall = side.acall

        async def each() -> None:
            for ctx in contexts:
                await acall(ctx)

        side.loop.run_until_complete(each())
        return
    assert side.call is not None
    call = side.call
    for ctx in contexts:
        call(ctx)


def answers(side: Side, contexts: Sequence[Any]) -> list[bool]:
    """Every context's answer, in order."""
    if side.acall is not None:
        assert side.loop is not None
        acall = side.acall

        async def each() -> list[bool]:
            return [await acall(ctx) for ctx in contexts]

        return side.loop.run_until_complete(each())
    assert side.call is not None
    return [side.call(ctx) for ctx in contexts]


def run_samples(side: Side, contexts: Sequence[Any]) -> list[int]:
    """Each call timed on its own (the clock's tens of nanoseconds included), sorted."""
    clock = time.perf_counter_ns
    samples: list[int] = []
    append = samples.append
    if side.acall is not None:
        assert side.loop is not None
        acall = side.acall

        async def each() -> None:
            for ctx in contexts:
                t0 = clock()
                await acall(ctx)
                append(clock() - t0)

        side.loop.run_until_complete(each())
    else:
        assert side.call is not None
        call = side.call
        for ctx in contexts:
            t0 = clock()
            call(ctx)
            append(clock() - t0)
    samples.sort()
    return samples


def agreement(side: Side, users: Sequence[User]) -> tuple[float, dict[str, float], float]:
    """Answer every context once: the share "on", overall and per group, and the rate seen."""
    start = time.perf_counter()
    got = answers(side, side.contexts)
    rate = len(got) / (time.perf_counter() - start)
    shares: dict[str, float] = {}
    for group in GROUPS:
        picked = [a for a, u in zip(got, users, strict=True) if u.group == group]
        shares[group] = round(sum(picked) / len(picked), 4) if picked else 0.0
    return sum(got) / len(got), shares, rate


def disagreement(shares: dict[str, float]) -> str | None:
    wrong = [
        f"{group} {shares[group]:.3f} (expected {expected:g})"
        for group, (_, expected) in GROUPS.items()
        if abs(shares[group] - expected) > (0 if expected == 1.0 else SHARE_TOLERANCE)
    ]
    return "does not evaluate the equivalent flag: " + ", ".join(wrong) if wrong else None


def measure_sides(
    sides: Sequence[Side], users: Sequence[User], s: Sizes
) -> dict[str, Figures | str]:
    """Agreement first, then `s.repeats` rounds timing every side once each (the order rotates
    from round to round), then the latency samples. A side's figures or its one-line error."""
    out: dict[str, Figures | str] = {}
    calls: dict[str, int] = {}
    for side in sides:
        try:
            on, shares, rate = agreement(side, users)
            # A timed loop runs about s.seconds, and at least once through the contexts.
            calls[side.name] = max(len(side.contexts), int(round(rate * s.seconds, -3)))
            out[side.name] = Figures(
                0.0,
                0.0,
                0.0,
                calls[side.name],
                on_share=on,
                group_shares=shares,
                error=disagreement(shares),
            )
            log(f"flags: {side.label}: {on:.1%} on, {rate:,.0f}/s untimed")
        except Exception as exc:
            out[side.name] = one_line(exc)
            log(f"flags: {side.label}: error: {out[side.name]}")
    live = [side for side in sides if isinstance(out[side.name], Figures)]
    sequences = {
        side.name: [side.contexts[i % len(side.contexts)] for i in range(calls[side.name])]
        for side in live
    }
    for r in range(s.repeats):
        for side in live[r % len(live) :] + live[: r % len(live)]:
            figures = out[side.name]
            if not isinstance(figures, Figures):
                continue
            try:
                gc.collect()
                start = time.perf_counter()
                run_calls(side, sequences[side.name])
                figures.runs.append(calls[side.name] / (time.perf_counter() - start))
            except Exception as exc:
                out[side.name] = one_line(exc)
        log(f"flags: round {r + 1}/{s.repeats} timed")
    for side in live:
        figures = out[side.name]
        if not isinstance(figures, Figures):
            continue
        try:
            gc.collect()
            samples = run_samples(side, sequences[side.name][: s.sample])
            figures.ops_per_s = statistics.median(figures.runs)
            figures.p50_ms = percentile_ms(samples, 50)
            figures.p99_ms = percentile_ms(samples, 99)
        except Exception as exc:
            out[side.name] = one_line(exc)
    return out


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]


def problem(figures: Figures | str) -> str | None:
    """A side's error: it failed (a string in place of its figures) or disagreed."""
    return figures if isinstance(figures, str) else figures.error


def spread(figures: Figures) -> float | None:
    """(max - min) / median of the timed loops: how steady the machine was."""
    if len(figures.runs) < 2:
        return None
    return (max(figures.runs) - min(figures.runs)) / statistics.median(figures.runs)


# --- sections --------------------------------------------------------------------------------


def local_evaluation(quick: bool) -> list[dict[str, Any]]:
    s = sizes(quick)
    users = population()
    expected = expected_share(users)
    log(f"flags: local evaluation, {len(users):,} users, {expected:.1%} expected on")
    sides: list[Side] = []
    build_errors: dict[str, str] = {}
    ours_names: list[str] = []
    peer_names: list[str] = []
    with no_network() as attempts:
        for group, names in ((OURS, ours_names), (PEERS, peer_names)):
            for build in group:
                try:
                    side = build(users)
                    sides.append(side)
                    names.append(side.name)
                except Exception as exc:
                    name = build.__name__.replace("_", "-")
                    names.append(name)
                    build_errors[name] = one_line(exc)
                    log(f"flags: {name}: cannot be built: {build_errors[name]}")
        try:
            measured = measure_sides(sides, users, s)
        finally:
            for side in sides:
                try:
                    side.close()
                except Exception as exc:
                    log(f"flags: {side.name}: close failed: {one_line(exc)}")
    by_name = {side.name: side for side in sides}
    measured.update(build_errors)
    groups = {g: sum(u.group == g for u in users) / len(users) for g in GROUPS}
    records = []
    for ours in ours_names:
        mine = measured[ours]
        for peer in peer_names:
            theirs = measured[peer]
            m = mine if isinstance(mine, Figures) else None
            t = theirs if isinstance(theirs, Figures) else None
            peer_side = by_name.get(peer)
            errors = []
            if (mine_error := problem(mine)) is not None:
                errors.append(mine_error)
            if (peer_error := problem(theirs)) is not None:
                errors.append(f"peer: {peer_error}")
            if attempts:
                errors.append(f"network access attempted: {attempts[0]}")
            ratio = m.ops_per_s / t.ops_per_s if m and t and t.ops_per_s else None
            records.append(
                result(
                    f"local-{ours}-vs-{peer}",
                    m.ops_per_s if m else None,
                    m.p50_ms if m else None,
                    m.p99_ms if m else None,
                    peer_side.label if peer_side else peer,
                    t.ops_per_s if t else None,
                    peer_p50_ms=t.p50_ms if t else None,
                    peer_p99_ms=t.p99_ms if t else None,
                    target_ratio=TARGET_RATIO,
                    meets_target=ratio >= TARGET_RATIO if ratio is not None else None,
                    ours=by_name[ours].label if ours in by_name else ours,
                    calls=m.calls if m else None,
                    peer_calls=t.calls if t else None,
                    repeats=s.repeats,
                    spread=spread(m) if m else None,
                    peer_spread=spread(t) if t else None,
                    contexts=len(users),
                    expected_on_share=expected,
                    on_share=m.on_share if m else None,
                    peer_on_share=t.on_share if t else None,
                    group_sizes={g: round(v, 4) for g, v in groups.items()},
                    group_shares=m.group_shares if m else None,
                    peer_group_shares=t.group_shares if t else None,
                    peer_usage=peer_side.usage if peer_side else None,
                    peer_notes=list(peer_side.notes) if peer_side else None,
                    network_attempts=len(attempts),
                    error="; ".join(errors) or None,
                )
            )
    return records


# --- over HTTP: POST /api/v1/evaluate, and propagation to connected SDK clients --------------

EVALUATE_PATH = "/api/v1/evaluate"
ENVIRONMENT = "production"
HTTP_TARGET_SHARE = 0.40  # of the HTTP ceiling, requests/s of one process at 50 connections
HTTP_TARGET_P99_MS = 5.0  # at 10 connections
HTTP_SERVERS: tuple[bench_http.Server, ...] = ("granian", "uvicorn")
BODIES = 1_000  # distinct user contexts the wrk requests rotate through
CHECKED_BODIES = 200  # of them, answered once before the load and compared with the ruleset

PROPAGATION_SERVER: bench_http.Server = "uvicorn"  # the server `tenfold serve` runs
PROPAGATION_FLAG = "ops-kill-switch"  # serves on while enabled, off while disabled
PROPAGATION_CONTEXT = {"user_id": "sdk-watcher"}
SDK_CLIENTS = 20
PROPAGATION_TARGET_P99_MS = 1_000.0  # this benchmark's own target
PROPAGATION_SPEC_MS = 30_000.0  # the spec's: a change reaches every connected SDK within 30 s
TOGGLE_TIMEOUT_S = 10.0  # per toggle, for all clients to see it
MAX_TIMEOUTS = 3  # toggles that time out before the run is abandoned
WARMUP_TOGGLES = 2  # not timed: every client's stream is open and has delivered a patch

# wrk: one pre-built request per user context (a JSON body a line in WRK_BODIES), built once
# per thread in init(), so wrk's per-request cost is a table lookup; threads start apart.
EVALUATE_LUA = """
local requests = {}
local n = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  local headers = {["Content-Type"] = "application/json", ["X-API-Key"] = os.getenv("WRK_KEY")}
  for line in io.lines(os.getenv("WRK_BODIES")) do
    if line ~= "" then
      requests[#requests + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  n = ((tid or 1) - 1) * 500 % #requests
end
function request()
  n = n % #requests + 1
  return requests[n]
end
"""


def _boolean(key: str) -> dict[str, Any]:
    return {"flag_key": key, "flag_type": "boolean", "default_value": False}


def _string(key: str, *values: str) -> dict[str, Any]:
    return {
        "flag_key": key,
        "flag_type": "string",
        "default_value": values[0],
        "variations": [{"key": v, "value": v} for v in values],
    }


def _split(**weights: int) -> dict[str, Any]:
    return {"split": [{"variation": v, "weight": w} for v, w in weights.items()]}


def _cond(attribute: str, operator: str, *values: str) -> dict[str, Any]:
    return {"attribute": attribute, "operator": operator, "values": list(values)}


# Ten flags, each (definition for POST /api/v1/flags, production targeting for PUT), all
# enabled: two with three rules and a roll-out, booleans serving on or off to everyone or by
# one rule, a 10% roll-out, and two string splits.
HTTP_FLAGS: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = (
    (_boolean(FLAG_KEY), json.loads(json.dumps(TENFOLD_DOC["flags"][0]["targeting"]))),
    (
        _boolean("search-v3"),
        {
            "enabled": True,
            "rules": [
                {
                    "id": "enterprise",
                    "conditions": [_cond("plan", "in", "enterprise")],
                    "variation": "on",
                },
                {
                    "id": "us-gb-v23",
                    "conditions": [
                        _cond("country", "in", "US", "GB"),
                        _cond("app_version", "semver_gte", "2.3.0"),
                    ],
                    "variation": "on",
                    "rollout_percentage": 25,
                },
                {
                    "id": "testers",
                    "conditions": [_cond("email", "ends_with", "@corp.test")],
                    "variation": "on",
                },
            ],
            "default_rule": _split(on=10, off=90),
        },
    ),
    (_boolean("dark-mode"), {"enabled": True, "default_rule": {"variation": "on"}}),
    (_boolean("legacy-api"), {"enabled": True, "default_rule": {"variation": "off"}}),
    (_boolean(PROPAGATION_FLAG), {"enabled": True, "default_rule": {"variation": "on"}}),
    (
        _boolean("new-onboarding"),
        {
            "enabled": True,
            "rules": [
                {"id": "pro", "conditions": [_cond("plan", "equals", "pro")], "variation": "on"}
            ],
            "default_rule": {"variation": "off"},
        },
    ),
    (
        _boolean("cookie-banner-eu"),
        {
            "enabled": True,
            "rules": [
                {
                    "id": "eu",
                    "conditions": [_cond("country", "in", "DE", "FR", "GB")],
                    "variation": "on",
                }
            ],
            "default_rule": {"variation": "off"},
        },
    ),
    (_boolean("recommendations-v2"), {"enabled": True, "default_rule": _split(on=10, off=90)}),
    (
        _string("button-colour", "blue", "green", "red"),
        {"enabled": True, "default_rule": _split(blue=50, green=30, red=20)},
    ),
    (
        _string("pricing-layout", "grid", "list"),
        {
            "enabled": True,
            "rules": [
                {"id": "jp", "conditions": [_cond("country", "equals", "JP")], "variation": "list"}
            ],
            "default_rule": _split(grid=50, list=50),
        },
    ),
)
HTTP_FLAG_KEYS = [definition["flag_key"] for definition, _ in HTTP_FLAGS]


def _answer(response: Any, what: str, expected: tuple[int, ...] = (200,)) -> Any:
    if response.status_code not in expected:
        raise RuntimeError(f"{what} answered {response.status_code}: {response.text[:300]}")
    return response.json() if response.content else None


def evaluate_bodies(users: Sequence[User]) -> list[str]:
    """One request body per user: the ten flags for that user's context, in production."""
    return [
        json.dumps(
            {
                "flag_keys": HTTP_FLAG_KEYS,
                "user_context": {
                    "user_id": u.user_id,
                    "email": u.email,
                    "country": u.country,
                    "app_version": u.app_version,
                    "plan": u.plan,
                },
                "environment": ENVIRONMENT,
            },
            separators=(",", ":"),
        )
        for u in users
    ]


def setup_flags(http: Any, admin_key: str) -> str:
    """Create the ten flags, turn them on in production with their targeting, and create an
    SDK key bound to production (flags:read); return that key."""
    admin = {"X-API-Key": admin_key}
    for definition, targeting in HTTP_FLAGS:
        key = definition["flag_key"]
        _answer(http.post("/api/v1/flags", json=definition, headers=admin), f"create {key}", (201,))
        got = _answer(
            http.put(
                f"/api/v1/flags/{key}/environments/{ENVIRONMENT}", json=targeting, headers=admin
            ),
            f"PUT targeting of {key}",
        )
        if got.get("status") != "applied":
            raise RuntimeError(f"the targeting of {key} was not applied: {got}")
    made = _answer(
        http.post(f"/api/v1/flags/environments/{ENVIRONMENT}/keys", headers=admin),
        "create an SDK key",
        (201,),
    )
    return str(made["api_key"])


def check_answers(http: Any, sdk_key: str, bodies: Sequence[str]) -> dict[str, Any]:
    """POST some of the bodies once: every answer must be what the server's own ruleset gives
    (evaluated here) with no error. Returns how many were checked and the mix of reasons."""
    from tenfold.flags.evaluation import Ruleset

    headers = {"X-API-Key": sdk_key}
    doc = _answer(
        http.get("/api/v1/flags/ruleset", params={"environment": ENVIRONMENT}, headers=headers),
        "GET /api/v1/flags/ruleset",
    )
    ruleset = Ruleset.from_dict(doc)
    reasons: dict[str, int] = {}
    headers["Content-Type"] = "application/json"
    for body in bodies:
        got = _answer(http.post(EVALUATE_PATH, content=body, headers=headers), EVALUATE_PATH)
        answers = got["evaluations"]
        ctx = json.loads(body)["user_context"]
        want = [ruleset.evaluate(k, ctx).to_dict() for k in HTTP_FLAG_KEYS]
        if answers != want:
            wrong = [(a, w) for a, w in zip(answers, want, strict=False) if a != w][:1]
            raise RuntimeError(
                f"{EVALUATE_PATH} answered {len(answers)} evaluations unlike the ruleset's: {wrong}"
            )
        for answer in answers:
            if answer.get("error_code"):
                raise RuntimeError(f"{EVALUATE_PATH} answered an error: {answer}")
            reasons[answer["reason"]] = reasons.get(answer["reason"], 0) + 1
    total = sum(reasons.values())
    return {
        "checked": len(bodies),
        "revision": doc.get("revision"),
        "reasons": {k: round(v / total, 3) for k, v in sorted(reasons.items())},
    }


def _wrk_evaluate(
    url: str, script: Path, bodies: Path, key: str, threads: int, connections: int, seconds: int
) -> WrkResult:
    command = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
    command += ["--timeout=5s", "--latency", "-s", str(script), url]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "WRK_BODIES": str(bodies), "WRK_KEY": key},
        timeout=seconds + 40,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
    return parse(proc.stdout)


def evaluate_load(
    base_url: str, key: str, script: Path, bodies: Path, quick: bool
) -> bench_http.HttpFigures:
    """The standard load (benchmarks/http.py: `load`) with the rotating bodies: a 1 s warm-up,
    then -t2 -c50 for throughput, -t1 -c10 for latency."""
    duration = bench_http.duration_s(quick)
    url = base_url + EVALUATE_PATH
    _wrk_evaluate(url, script, bodies, key, 1, bench_http.LATENCY_CONNECTIONS, 1)
    tput = _wrk_evaluate(url, script, bodies, key, 2, bench_http.THROUGHPUT_CONNECTIONS, duration)
    lat = _wrk_evaluate(url, script, bodies, key, 1, bench_http.LATENCY_CONNECTIONS, duration)
    return bench_http.HttpFigures(
        ops_per_s=tput.ops_per_s,
        p50_ms=lat.p50_ms,
        p99_ms=lat.p99_ms,
        non_2xx=tput.non_2xx + lat.non_2xx,
        socket_errors=tput.socket_errors + lat.socket_errors,
    )


class Watch:
    """Which SDK clients have seen the value the current toggle serves, and how long after the
    toggle request was about to be sent (nanoseconds)."""

    def __init__(self, clients: int) -> None:
        self.lock = threading.Lock()
        self.clients = clients
        self.expected: bool | None = None  # None between toggles: callbacks are ignored
        self.t0 = 0
        self.seen: dict[int, int] = {}
        self.all_seen = threading.Event()

    def begin(self, expected: bool) -> None:
        with self.lock:
            self.expected = expected
            self.seen = {}
            self.all_seen.clear()
            self.t0 = time.perf_counter_ns()  # the toggle request is sent right after

    def end(self) -> dict[int, int]:
        with self.lock:
            self.expected = None
            return dict(self.seen)

    def listener(self, index: int, client: Any) -> Callable[[frozenset[str]], None]:
        """client.on_change(...): runs on that client's stream thread after a ruleset swap."""

        def on_change(keys: frozenset[str]) -> None:
            if PROPAGATION_FLAG not in keys:
                return
            value = client.evaluate(PROPAGATION_FLAG, PROPAGATION_CONTEXT).value
            now = time.perf_counter_ns()
            with self.lock:
                if self.expected is None or value is not self.expected or index in self.seen:
                    return
                self.seen[index] = now - self.t0
                if len(self.seen) == self.clients:
                    self.all_seen.set()

        return on_change


@dataclass
class Propagation:
    samples_ns: list[int]  # one per client and timed toggle that it saw
    slowest_ns: list[int]  # per timed toggle seen by every client: the last client's
    toggle_ns: list[int]  # per timed toggle: the toggle request's own round trip
    toggles: int  # timed
    missed: int  # (client, toggle) pairs not seen within the timeout
    timeouts: int  # toggles not seen by every client within the timeout
    client_errors: list[str]
    revisions_agree: bool  # every client ends on the server's revision


def propagate(base_url: str, http: Any, admin_key: str, sdk_key: str, quick: bool) -> Propagation:
    """SDK_CLIENTS FlagsClients (each its own stream thread) follow the stream; the flag is
    toggled on and off, each toggle waited for until every client's on_change saw it."""
    from tenfold.flags.client import FlagsClient

    toggles = 30 if quick else 100
    admin = {"X-API-Key": admin_key}
    path = f"/api/v1/flags/{PROPAGATION_FLAG}/environments/{ENVIRONMENT}"
    enabled = bool(_answer(http.get(path, headers=admin), f"GET {path}")["enabled"])
    watch = Watch(SDK_CLIENTS)
    clients = [FlagsClient(base_url, sdk_key, environment=ENVIRONMENT) for _ in range(SDK_CLIENTS)]
    samples: list[int] = []
    slowest: list[int] = []
    toggle_ns: list[int] = []
    missed = timeouts = timed = 0
    try:
        for i, client in enumerate(clients):
            client.on_change(watch.listener(i, client))
            client.start(wait=0)
        deadline = time.monotonic() + 15
        for i, client in enumerate(clients):
            if not client.start(wait=max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"SDK client {i} got no ruleset in 15 s: {client.last_error}")
        log(f"flags: {SDK_CLIENTS} SDK clients ready; {WARMUP_TOGGLES} + {toggles} toggles")
        toggle_url = f"/api/v1/flags/{PROPAGATION_FLAG}/toggle"
        for n in range(WARMUP_TOGGLES + toggles):
            enabled = not enabled
            watch.begin(enabled)
            t0 = watch.t0
            response = http.post(
                toggle_url, json={"environment": ENVIRONMENT, "enabled": enabled}, headers=admin
            )
            answered = time.perf_counter_ns()
            got = _answer(response, f"POST {toggle_url}")
            if got.get("status") != "applied":
                raise RuntimeError(f"the toggle was not applied: {got}")
            complete = watch.all_seen.wait(TOGGLE_TIMEOUT_S)
            seen = watch.end()
            if n < WARMUP_TOGGLES:
                if not complete:
                    raise RuntimeError(
                        f"warm-up toggle {n + 1}: {len(seen)}/{SDK_CLIENTS} clients saw it "
                        f"within {TOGGLE_TIMEOUT_S:.0f} s"
                    )
                continue
            timed += 1
            toggle_ns.append(answered - t0)
            samples += seen.values()
            if complete:
                slowest.append(max(seen.values()))
            else:
                timeouts += 1
                missed += SDK_CLIENTS - len(seen)
                log(f"flags: toggle {n + 1}: {len(seen)}/{SDK_CLIENTS} clients saw it in time")
                if timeouts >= MAX_TIMEOUTS:
                    break
        server_revision = _answer(
            http.get(
                "/api/v1/flags/ruleset",
                params={"environment": ENVIRONMENT},
                headers={"X-API-Key": sdk_key},
            ),
            "GET /api/v1/flags/ruleset",
        )["revision"]
        revisions = {client.revision for client in clients}
        errors = sorted({str(c.last_error) for c in clients if c.last_error is not None})
    finally:
        closers = [threading.Thread(target=c.close, daemon=True) for c in clients]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(15)
    samples.sort()
    slowest.sort()
    toggle_ns.sort()
    return Propagation(
        samples_ns=samples,
        slowest_ns=slowest,
        toggle_ns=toggle_ns,
        toggles=timed,
        missed=missed,
        timeouts=timeouts,
        client_errors=errors,
        revisions_agree=revisions == {server_revision},
    )


def evaluate_record(
    server: bench_http.Server,
    got: bench_http.HttpFigures | None,
    check: dict[str, Any] | None,
    ceiling: dict[str, Any] | None,
    ceilings: dict[bench_http.Server, bench_http.HttpFigures] | None,
    error: str | None,
) -> dict[str, Any]:
    best = ceiling["ops_per_s"] if ceiling else None
    same = ceilings[server].ops_per_s if ceilings else None
    share = got.ops_per_s / best if got and best else None
    met_share = share >= HTTP_TARGET_SHARE if share is not None else None
    met_p99 = got.p99_ms < HTTP_TARGET_P99_MS if got and got.p99_ms is not None else None
    return result(
        f"evaluate-{server}",
        got.ops_per_s if got else None,
        got.p50_ms if got else None,
        got.p99_ms if got else None,
        ceiling["scenario"] if ceiling else None,
        best,
        share_of_ceiling=share,
        **{f"share_of_{server}_ceiling": got.ops_per_s / same if got and same else None},
        server=server,
        target_share=HTTP_TARGET_SHARE,
        target_p99_ms=HTTP_TARGET_P99_MS,
        met_share=met_share,
        met_p99=met_p99,
        meets_target=met_share and met_p99 if None not in (met_share, met_p99) else None,
        flags=len(HTTP_FLAG_KEYS),
        flag_keys=HTTP_FLAG_KEYS,
        bodies=BODIES,
        body=f"{{flag_keys: {len(HTTP_FLAG_KEYS)} keys, user_context: one of {BODIES} users "
        "(user_id, email, country, app_version, plan), environment: production}, rotated per "
        "request (pre-built per wrk thread)",
        auth="X-API-Key: an SDK key bound to production (flags:read)",
        checked=check["checked"] if check else None,
        reasons=check["reasons"] if check else None,
        config="embedded (SQLite, memory KV), TENFOLD_SERVICES=flags, rate-limit guard on, "
        "one process",
        non_2xx=got.non_2xx if got else None,
        socket_errors=got.socket_errors if got else None,
        error=error,
    )


def propagation_record(got: Propagation | None, error: str | None) -> dict[str, Any]:
    p99 = percentile_ms(got.samples_ns, 99) if got and got.samples_ns else None
    problems = [error] if error else []
    if got is not None:
        if got.timeouts:
            problems.append(
                f"{got.timeouts} toggle(s) not seen by every client within {TOGGLE_TIMEOUT_S:.0f} "
                f"s ({got.missed} client observations missing)"
            )
        if not got.revisions_agree:
            problems.append("the clients did not all end on the server's revision")
    return result(
        "propagation-sdk-stream",
        None,
        percentile_ms(got.samples_ns, 50) if got and got.samples_ns else None,
        p99,
        None,
        None,
        max_ms=got.samples_ns[-1] / 1e6 if got and got.samples_ns else None,
        all_clients_p50_ms=percentile_ms(got.slowest_ns, 50) if got and got.slowest_ns else None,
        all_clients_p99_ms=percentile_ms(got.slowest_ns, 99) if got and got.slowest_ns else None,
        toggle_request_p50_ms=percentile_ms(got.toggle_ns, 50) if got and got.toggle_ns else None,
        toggle_request_p99_ms=percentile_ms(got.toggle_ns, 99) if got and got.toggle_ns else None,
        clients=SDK_CLIENTS,
        toggles=got.toggles if got else None,
        warmup_toggles=WARMUP_TOGGLES,
        samples=len(got.samples_ns) if got else None,
        missed=got.missed if got else None,
        timeouts=got.timeouts if got else None,
        client_errors=got.client_errors if got else None,
        revisions_agree=got.revisions_agree if got else None,
        target_p99_ms=PROPAGATION_TARGET_P99_MS,
        spec_target_ms=PROPAGATION_SPEC_MS,
        meets_target=(p99 < PROPAGATION_TARGET_P99_MS and not got.missed)
        if got and p99 is not None
        else None,
        peer_note="none: the spec's target is 30 s for a change to reach connected SDKs; "
        "the 1 s p99 target is this benchmark's own",
        server=PROPAGATION_SERVER,
        how=f"{SDK_CLIENTS} tenfold.flags.client.FlagsClient in this process (each its own "
        "stream thread on GET /api/v1/flags/stream), POST /api/v1/flags/"
        f"{PROPAGATION_FLAG}/toggle alternating off/on, each toggle waited for until every "
        "client's on_change callback evaluated the new value; latency from just before the "
        "toggle request is sent to that evaluation, one sample per client and toggle",
        config="embedded (SQLite, memory KV), TENFOLD_SERVICES=flags, rate-limit guard on, "
        "one process",
        error="; ".join(problems) or None,
    )


@dataclass
class Served:
    """What one server's run measured; an error string where a part failed."""

    figures: bench_http.HttpFigures | None = None
    check: dict[str, Any] | None = None
    moved: Propagation | None = None
    eval_err: str | None = None
    prop_err: str | None = None


def serve_and_measure(
    server: bench_http.Server,
    env: dict[str, str],
    data_dir: Path,
    keys: dict[str, str],
    bodies: Sequence[str],
    script: Path,
    bodies_path: Path,
    quick: bool,
) -> Served:
    """Serve tenfold on `server`, set the flags up the first time (the SDK key goes in `keys`),
    check and load POST /api/v1/evaluate; on PROPAGATION_SERVER also time propagation."""
    import httpx

    out = Served()
    log(f"flags: POST {EVALUATE_PATH}, {len(HTTP_FLAG_KEYS)} flags, on {server}")
    try:
        with (
            bench_http.serve_app("tenfold.app:build_app", env, server) as base_url,
            httpx.Client(base_url=base_url, timeout=10) as http,
        ):
            admin = admin_key(data_dir)
            if "sdk" not in keys:
                keys["sdk"] = setup_flags(http, admin)
            key = keys["sdk"]
            out.check, out.eval_err = attempt(
                "check", lambda: check_answers(http, key, bodies[:CHECKED_BODIES])
            )
            if out.eval_err is None:
                out.figures, out.eval_err = attempt(
                    f"evaluate on {server}",
                    lambda: evaluate_load(base_url, key, script, bodies_path, quick),
                )
            if server == PROPAGATION_SERVER:
                log(f"flags: propagation to {SDK_CLIENTS} SDK clients on {server}")
                out.moved, out.prop_err = attempt(
                    "propagation", lambda: propagate(base_url, http, admin, key, quick)
                )
    except Exception as exc:  # the server failed to start, or died during the run
        message = one_line(exc)
        log(f"flags: {server}: error: {message}")
        out.eval_err = out.eval_err or message
        out.prop_err = out.prop_err or message
    return out


def over_http(quick: bool) -> list[dict[str, Any]]:
    """The HTTP ceiling, then per server: POST /api/v1/evaluate for ten flags under wrk; on
    uvicorn also the propagation of toggles to connected SDK clients."""
    records: list[dict[str, Any]] = []
    ceiling, ceiling_err = attempt("HTTP ceiling", lambda: bench_http.ceiling(quick))
    ceilings = bench_http.measure_ceilings(quick) if ceiling else None
    if ceiling:
        records += bench_http.ceiling_results(quick)
    bodies = evaluate_bodies(population(BODIES))
    data_dir = Path(tempfile.mkdtemp(prefix="tenfold-bench-flags-"))
    try:
        script = data_dir / "evaluate.lua"
        script.write_text(EVALUATE_LUA)
        bodies_path = data_dir / "bodies.jsonl"
        bodies_path.write_text("\n".join(bodies) + "\n")
        env = server_env(data_dir, "flags")
        _, setup_err = attempt("migrate", lambda: tenfold_command(["migrate"], env))
        keys: dict[str, str] = {}
        for server in HTTP_SERVERS:
            if setup_err is None:
                served = serve_and_measure(
                    server, env, data_dir, keys, bodies, script, bodies_path, quick
                )
            else:
                served = Served(eval_err=setup_err, prop_err=setup_err)
            eval_err = served.eval_err
            if ceiling_err and eval_err is None:
                eval_err = f"ceiling: {ceiling_err}"
            records.append(
                evaluate_record(server, served.figures, served.check, ceiling, ceilings, eval_err)
            )
            if server == PROPAGATION_SERVER:
                records.append(propagation_record(served.moved, served.prop_err))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return records


SECTIONS: tuple[Callable[[bool], list[dict[str, Any]]], ...] = (local_evaluation, over_http)


def run(quick: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for section in SECTIONS:
        records += section(quick)
    return records
