"""Rate-limit use cases: resolve the policies that apply, decide, degrade when Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from prometheus_client import Counter, Gauge

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.errors import BackendUnavailable
from tenfold.kernel.telemetry import LATENCY_BUCKETS, REGISTRY, HotCounter, HotHistogram
from tenfold.ratelimit.algorithms import Decision, Limit
from tenfold.ratelimit.limiter import check_weight
from tenfold.ratelimit.models import Assignment, CheckContext, FailureMode, Policy, overlaps
from tenfold.ratelimit.store import CounterStore, Probe
from tenfold.ratelimit.stores.memory import MemoryCounterStore

log = structlog.get_logger(__name__)

DECISIONS = HotCounter(
    "tenfold_ratelimit_decisions_total",
    "Rate-limit decisions per policy and outcome (allowed, denied, shadow_denied).",
    ("policy", "outcome"),
    registry=REGISTRY,
)
NEAR_LIMIT = HotCounter(
    "tenfold_ratelimit_near_limit_total",
    "Allowed checks that left a policy at 80% or more of its quota.",
    ("policy",),
    registry=REGISTRY,
)
CHECK_SECONDS = HotHistogram(
    "tenfold_ratelimit_check_seconds",
    "Time to decide one rate-limit check.",
    (),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BACKEND_STATE = Gauge(
    "tenfold_ratelimit_backend_degraded",
    "1 while the counter backend is unreachable and checks use the failure modes.",
    registry=REGISTRY,
)
BACKEND_TRANSITIONS = Counter(
    "tenfold_ratelimit_backend_transitions_total",
    "Counter backend state changes (to degraded or back to healthy).",
    ("to",),
    registry=REGISTRY,
)
EVENTS_DROPPED = Counter(
    "tenfold_ratelimit_events_dropped_total",
    "Sampled decision events dropped because the write queue was full.",
    registry=REGISTRY,
)

POLICY_CHANNEL = "ratelimit:policies"
EVENT_QUEUE = 10_000
EVENT_BATCH = 500


class PolicyStore(Protocol):
    async def load(self) -> tuple[list[Policy], list[Assignment], dict[str, str], int]: ...
    async def version(self) -> int: ...
    async def record_events(self, rows: Sequence[dict[str, Any]]) -> None: ...


# Applied and CheckResult are made on every check: read-only by convention, not frozen (cost).
@dataclass(slots=True)
class Applied:
    policy: Policy
    limit: Limit
    decision: Decision


@dataclass(frozen=True, slots=True)
class Plan:
    """What one check context resolves to: the policies, their limits and counter probes."""

    policies: tuple[Policy, ...]
    limits: tuple[Limit, ...]
    probes: tuple[Probe, ...]
    until: float  # the plan holds until then (seconds): an assignment of the client starts or ends


PLAN_CACHE = 10_000


@dataclass(slots=True)
class CheckResult:
    allowed: bool
    applied: tuple[Applied, ...]
    deciding: Applied | None  # the most restrictive enforced policy
    degraded: bool = False

    @property
    def retry_ms(self) -> int:
        return self.deciding.decision.retry_ms if self.deciding and not self.allowed else 0


class PolicyBook:
    """An immutable snapshot of every policy and assignment, held in memory by every process."""

    def __init__(
        self,
        policies: Sequence[Policy],
        assignments: Sequence[Assignment],
        tiers: dict[str, str],
        version: int,
    ) -> None:
        self.version = version
        self.by_id = {p.policy_id: p for p in policies}
        active = [p for p in policies if p.is_active]
        self.global_ = [p for p in active if p.applies_to_all]
        self.by_tier: dict[str, list[Policy]] = {}
        for p in active:
            if p.tier is not None and not p.applies_to_all:
                self.by_tier.setdefault(p.tier, []).append(p)
        self.tiers = tiers
        self.by_client: dict[str, list[Assignment]] = {}
        for a in assignments:
            self.by_client.setdefault(a.client_id, []).append(a)
        self._limits: dict[tuple[int, int | None], Limit] = {}
        # Resolved plans per (context, assigned_only), for this book only: a reload starts afresh.
        self.plans: dict[tuple[str, str, str, str, str, bool], Plan] = {}

    def limit(self, policy: Policy, override: int | None) -> Limit:
        """The policy's validated limit (with an assignment's override), built once."""
        cache_key = (policy.policy_id, override)
        limit = self._limits.get(cache_key)
        if limit is None:
            limit = self._limits[cache_key] = policy.limit(override)
        return limit

    def horizon(self, client_id: str, now: float) -> float:
        """When the client's set of effective assignments next changes (seconds)."""
        until = math.inf
        for a in self.by_client.get(client_id, ()):
            for edge in (a.effective_from, a.effective_to):
                if edge is not None and now < (at := edge.timestamp()) < until:
                    until = at
        return until

    def has_own(self, client_id: str) -> bool:
        """Does the client have a tier or an assignment of its own?"""
        return client_id in self.by_client or client_id in self.tiers

    def resolve(
        self, ctx: CheckContext, now: float, *, assigned_only: bool = False
    ) -> list[tuple[Policy, int | None]]:
        """Policies for everyone, for the client's tier, and assigned to the client (the
        highest-priority effective assignment per policy). `assigned_only` skips the first."""
        chosen: dict[int, tuple[Policy, int | None]] = {}
        if not assigned_only:
            chosen.update((p.policy_id, (p, None)) for p in self.global_)
        tier = self.tiers.get(ctx.client_id)
        if tier is not None:
            for p in self.by_tier.get(tier, ()):
                chosen[p.policy_id] = (p, None)
        best: dict[int, Assignment] = {}
        own = self.by_client.get(ctx.client_id)
        if own:
            at = datetime.fromtimestamp(now, UTC)
            for a in own:
                if a.effective(at) and (
                    a.policy_id not in best or a.priority > best[a.policy_id].priority
                ):
                    best[a.policy_id] = a
        for policy_id, a in best.items():
            assigned = self.by_id.get(policy_id)
            if assigned is not None and assigned.is_active:
                chosen[policy_id] = (assigned, a.override_rate_limit)
        return [
            (p, override)
            for p, override in chosen.values()
            if p.matches(ctx.resource, ctx.region or None)
        ]


def conflicting(existing: Sequence[Assignment], new: Assignment) -> Assignment | None:
    """An assignment of the same client and policy, same priority, overlapping in time."""
    for a in existing:
        same_row = a.effective_from == new.effective_from
        if (
            a.policy_id == new.policy_id
            and a.priority == new.priority
            and not same_row
            and overlaps(a, new)
        ):
            return a
    return None


class Breaker:
    """Opens on a backend failure; tries the backend again after `cooldown` seconds."""

    def __init__(self, clock: Clock, cooldown: float = 1.0) -> None:
        self.clock = clock
        self.cooldown = cooldown
        self.open_until: float | None = None

    @property
    def degraded(self) -> bool:
        return self.open_until is not None

    def allow_attempt(self) -> bool:
        return self.open_until is None or self.clock.now() >= self.open_until

    def failed(self, error: Exception) -> None:
        if self.open_until is None:
            BACKEND_STATE.set(1)
            BACKEND_TRANSITIONS.labels("degraded").inc()
            log.warning("ratelimit.backend_degraded", error=str(error))
        self.open_until = self.clock.now() + self.cooldown

    def succeeded(self) -> None:
        if self.open_until is not None:
            self.open_until = None
            BACKEND_STATE.set(0)
            BACKEND_TRANSITIONS.labels("healthy").inc()
            log.info("ratelimit.backend_recovered")


class RateLimitService:
    def __init__(
        self,
        policies: PolicyStore,
        counters: CounterStore,
        *,
        clock: Clock = SYSTEM_CLOCK,
        prefix: str = "tf",
        replicas: int = 1,
        events_sample: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.policies = policies
        self.counters = counters
        self.clock = clock
        self.prefix = prefix
        self.replicas = replicas
        self.events_sample = events_sample
        self.rng = rng or random.Random()
        self.book = PolicyBook([], [], {}, 0)
        self.local = MemoryCounterStore()  # the `local` failure mode's counters
        self.view = MemoryCounterStore()  # the per-process view behind `async` checks
        self.breaker = Breaker(clock)
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE)
        self._pending: list[tuple[tuple[Probe, ...], int, int]] = []
        self._reload_lock = asyncio.Lock()
        self._counters: dict[tuple[str, str], Any] = {}

    # -- policies -------------------------------------------------------------------------

    async def reload(self) -> None:
        async with self._reload_lock:
            policies, assignments, tiers, version = await self.policies.load()
            self.book = PolicyBook(policies, assignments, tiers, version)
        log.debug("ratelimit.policies_loaded", version=version, policies=len(policies))

    async def reload_if_stale(self) -> bool:
        if await self.policies.version() != self.book.version:
            await self.reload()
            return True
        return False

    # -- checks ---------------------------------------------------------------------------

    def plan(self, ctx: CheckContext, *, assigned_only: bool = False) -> Plan:
        """The context's policies, limits and probes; resolved once per book and context."""
        book = self.book
        now = self.clock.now()
        # A plain tuple: hashed in C, where the dataclass's own hash runs Python code.
        cache_key = (ctx.client_id, ctx.api_key, ctx.resource, ctx.ip, ctx.region, assigned_only)
        plan = book.plans.get(cache_key)
        if plan is not None and now < plan.until:
            return plan
        chosen, limits, probes = [], [], []
        for policy, override in book.resolve(ctx, now, assigned_only=assigned_only):
            subject = ctx.subject(policy.key_by)
            if subject is None:
                continue
            limit = book.limit(policy, override)
            key = f"{self.prefix}:rl:{{p{policy.policy_id}|{subject}}}:{limit.algorithm}"
            chosen.append(policy)
            limits.append(limit)
            probes.append(Probe(key, limit, policy.shadow))
        plan = Plan(tuple(chosen), tuple(limits), tuple(probes), book.horizon(ctx.client_id, now))
        if len(book.plans) >= PLAN_CACHE:
            book.plans.clear()
        book.plans[cache_key] = plan
        return plan

    async def check(
        self,
        ctx: CheckContext,
        weight: int = 1,
        *,
        background: bool = False,
        assigned_only: bool = False,
    ) -> CheckResult:
        started = time.perf_counter()
        plan = self.plan(ctx, assigned_only=assigned_only)
        policies, limits, probes = plan.policies, plan.limits, plan.probes
        if not probes:
            return CheckResult(True, (), None)
        if weight != 1:  # every capacity is at least 1
            for limit in limits:
                check_weight(limit, weight)
        now = self.clock.now_ms()
        degraded = False
        if background:
            decisions = await self._decide_in_background(probes, now, weight)
        elif type(self.counters) is MemoryCounterStore:  # cannot fail: no breaker to consult
            decisions = self.counters.hit(probes, now, weight)
        else:
            decisions, degraded = await self._decide(policies, probes, now, weight)
        result = self._summarise(policies, limits, decisions, degraded)
        self._observe(ctx, result)
        CHECK_SECONDS.observe(time.perf_counter() - started)
        return result

    async def status(self, ctx: CheckContext) -> CheckResult:
        plan = self.plan(ctx)
        policies, limits, probes = plan.policies, plan.limits, plan.probes
        if not probes:
            return CheckResult(True, (), None)
        decisions, degraded = await self._decide(policies, probes, self.clock.now_ms(), 0, False)
        return self._summarise(policies, limits, decisions, degraded)

    async def _decide(
        self,
        policies: Sequence[Policy],
        probes: Sequence[Probe],
        now: int,
        weight: int,
        commit: bool = True,
    ) -> tuple[list[Decision], bool]:
        if self.breaker.allow_attempt():
            try:
                decisions = await self.counters.ahit(probes, now, weight, commit)
            except BackendUnavailable as exc:
                self.breaker.failed(exc)
            else:
                self.breaker.succeeded()
                return decisions, False
        return self._fallback(policies, probes, now, weight, commit), True

    def _fallback(
        self,
        policies: Sequence[Policy],
        probes: Sequence[Probe],
        now: int,
        weight: int,
        commit: bool,
    ) -> list[Decision]:
        local: list[Probe] = []
        for policy, probe in zip(policies, probes, strict=True):
            if policy.failure_mode is FailureMode.LOCAL:
                limit = probe.limit
                share = max(1, limit.rate // self.replicas)
                burst = max(share, limit.burst // self.replicas)
                local.append(replace(probe, limit=replace(limit, rate=share, burst=burst)))
        local_decisions = iter(self.local.hit(local, now, weight, commit) if local else ())
        decisions = []
        for policy, probe in zip(policies, probes, strict=True):
            limit = probe.limit
            if policy.failure_mode is FailureMode.LOCAL:
                decisions.append(next(local_decisions))
            elif policy.failure_mode is FailureMode.FAIL_OPEN:
                decisions.append(Decision(True, limit.capacity, limit.capacity, 0, 0))
            else:
                decisions.append(Decision(False, limit.capacity, 0, 1000, 1000))
        return decisions

    async def _decide_in_background(
        self, probes: Sequence[Probe], now: int, weight: int
    ) -> list[Decision]:
        """Answer from the local view at once; the count reaches the shared store in a batch."""
        if isinstance(self.counters, MemoryCounterStore):
            return self.counters.hit(probes, now, weight)
        view = self.view.hit(probes, now, weight)
        self._pending.append((tuple(probes), now, weight))
        return view

    async def flush_pending(self) -> int:
        batch, self._pending = self._pending, []
        for probes, now, weight in batch:
            with contextlib.suppress(BackendUnavailable):
                await self.counters.ahit(probes, now, weight)
        return len(batch)

    def _summarise(
        self,
        policies: Sequence[Policy],
        limits: Sequence[Limit],
        decisions: Sequence[Decision],
        degraded: bool,
    ) -> CheckResult:
        if len(decisions) == 1:  # the common case, decided without the general machinery
            one = Applied(policies[0], limits[0], decisions[0])
            return CheckResult(one.decision.allowed or one.policy.shadow, (one,), one, degraded)
        applied = tuple(
            Applied(p, lim, d) for p, lim, d in zip(policies, limits, decisions, strict=True)
        )
        enforced = [a for a in applied if not a.policy.shadow]
        denials = [a for a in enforced if not a.decision.allowed]
        if denials:
            deciding = max(denials, key=lambda a: a.decision.retry_ms)
            return CheckResult(False, applied, deciding, degraded)
        pool = enforced or list(applied)
        deciding = min(pool, key=lambda a: (a.decision.remaining, a.decision.reset_ms))
        return CheckResult(True, applied, deciding, degraded)

    def _observe(self, ctx: CheckContext, result: CheckResult) -> None:
        counters = self._counters
        for a in result.applied:
            name = a.policy.name
            d = a.decision
            if d.allowed:
                outcome = "allowed" if result.allowed or a.policy.shadow else "denied"
                if d.remaining <= d.limit // 5:
                    NEAR_LIMIT.labels(name).inc()
            else:
                outcome = "shadow_denied" if a.policy.shadow else "denied"
            child = counters.get((name, outcome))
            if child is None:
                child = counters[(name, outcome)] = DECISIONS.labels(name, outcome)
            child.inc()
            if self.events_sample and (
                outcome != "allowed" or self.rng.random() < self.events_sample
            ):
                self._queue_event(ctx, a, outcome)

    def _queue_event(self, ctx: CheckContext, a: Applied, outcome: str) -> None:
        action = {"allowed": "allow", "denied": "deny", "shadow_denied": "shadow_deny"}[outcome]
        row = {
            "client_id": ctx.client_id[:255],
            "policy_id": a.policy.policy_id,
            "action": action,
            "timestamp": datetime.fromtimestamp(self.clock.now(), UTC),
            "remaining_quota": a.decision.remaining,
            "request_metadata": {"resource": ctx.resource[:200], "region": ctx.region},
        }
        try:
            self.events.put_nowait(row)
        except asyncio.QueueFull:
            EVENTS_DROPPED.inc()

    async def flush_events(self) -> int:
        rows: list[dict[str, Any]] = []
        while len(rows) < EVENT_BATCH and not self.events.empty():
            rows.append(self.events.get_nowait())
        if rows:
            await self.policies.record_events(rows)
        return len(rows)
