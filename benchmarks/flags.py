"""Feature flag benchmarks: tenfold's local evaluation against Unleash and GrowthBook, in one run.

* local-ruleset-vs-<peer>: one boolean flag with three targeting rules and a roll-out, evaluated
  in process for 10,000 precomputed user contexts (cycled through), by tenfold's
  `Ruleset.evaluate` and by each peer SDK doing the equivalent evaluation locally from a
  bootstrapped definition, with no server and no network.

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
import random
import socket
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from benchmarks._runner import log, percentile_ms, result

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


SECTIONS: tuple[Callable[[bool], list[dict[str, Any]]], ...] = (local_evaluation,)


def run(quick: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for section in SECTIONS:
        records += section(quick)
    return records
