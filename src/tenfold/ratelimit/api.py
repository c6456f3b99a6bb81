"""Rate limiter HTTP API, at the spec's paths."""

from __future__ import annotations

import contextlib
import math
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from tenfold.kernel.auth import Principal, authenticate, known_principal, require
from tenfold.kernel.clock import rfc3339_ms
from tenfold.kernel.http import (
    Conflict,
    InvalidField,
    LeanFunction,
    LeanResult,
    LeanRoute,
    NotFound,
    RawHeaders,
    json_object,
    lean_response,
)
from tenfold.kernel.kv import RedisKV
from tenfold.kernel.runtime import Mount, Runtime
from tenfold.ratelimit.algorithms import Algorithm, LimitError
from tenfold.ratelimit.models import (
    DIMENSIONS,
    Assignment,
    CheckContext,
    FailureMode,
    Policy,
    validate_policy_fields,
)
from tenfold.ratelimit.service import POLICY_CHANNEL, CheckResult, RateLimitService, conflicting
from tenfold.ratelimit.store import CounterStore
from tenfold.ratelimit.stores.memory import MemoryCounterStore
from tenfold.ratelimit.stores.sql import SqlPolicyStore

log = structlog.get_logger(__name__)

MAX_ID = 255
MAX_RESOURCE = 2048
MAX_LABEL = 64  # ip, region
MAX_POLICY_ID = 2**31 - 1  # the column is a 32-bit integer on PostgreSQL
MAX_CLIENTS_PER_CALL = 1_000
POLL_SECONDS = 1.0  # fallback when a pub/sub message is lost, and for CLI changes
FLUSH_SECONDS = 0.05  # async checks reach the shared store within this


# --- schemas -------------------------------------------------------------------------------


class CheckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(min_length=1, max_length=MAX_ID)
    api_key: str = Field(max_length=MAX_ID)
    resource: str = Field(max_length=MAX_RESOURCE)
    weight: int = Field(default=1, ge=1)
    async_: bool = Field(default=False, alias="async")
    ip: str = Field(default="", max_length=MAX_LABEL)
    region: str = Field(default="", max_length=MAX_LABEL)


class AppliedOut(BaseModel):
    policy_id: int
    name: str
    allowed: bool
    shadow: bool
    limit: int
    remaining_quota: int
    reset_time: datetime
    retry_after: float


class CheckResponse(BaseModel):
    allowed: bool
    remaining_quota: int | None
    reset_time: datetime | None
    retry_after: float
    policy_applied: str | None
    limit: int | None
    degraded: bool
    policies: list[AppliedOut]


class StatusEntry(BaseModel):
    policy_id: int
    name: str
    limit: int
    remaining_quota: int
    reset_time: datetime
    current_usage: int


class StatusResponse(BaseModel):
    client_id: str
    policies: list[StatusEntry]


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=255)
    algorithm: str = Field(description=", ".join(Algorithm))
    rate_limit: int
    time_window: int = Field(description="seconds, 1 to 86400")
    burst_capacity: int | None = None
    key_by: list[str] = Field(default=["client_id"], max_length=len(DIMENSIONS))
    match_resource: str | None = Field(default=None, max_length=200)
    match_region: str | None = Field(default=None, max_length=100)
    tier: str | None = Field(default=None, max_length=100)
    applies_to_all: bool = Field(
        default=False, validation_alias=AliasChoices("applies_to_all", "default")
    )
    shadow: bool = False
    failure_mode: FailureMode = FailureMode.LOCAL
    is_active: bool = True


class PolicyPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=255)
    algorithm: str | None = None
    rate_limit: int | None = None
    time_window: int | None = None
    burst_capacity: int | None = None
    key_by: list[str] | None = Field(default=None, max_length=len(DIMENSIONS))
    match_resource: str | None = Field(default=None, max_length=200)
    match_region: str | None = Field(default=None, max_length=100)
    tier: str | None = Field(default=None, max_length=100)
    applies_to_all: bool | None = None
    shadow: bool | None = None
    failure_mode: FailureMode | None = None
    is_active: bool | None = None


class PolicyOut(BaseModel):
    policy_id: int
    name: str
    algorithm: str
    rate_limit: int
    time_window: int
    burst_capacity: int
    key_by: list[str]
    match_resource: str | None
    match_region: str | None
    tier: str | None
    applies_to_all: bool
    shadow: bool
    failure_mode: str
    is_active: bool
    version: int
    created_at: datetime | None
    updated_at: datetime | None


class PolicyList(BaseModel):
    policies: list[PolicyOut]
    next_after: int | None


class AssignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_ids: list[Annotated[str, Field(min_length=1, max_length=MAX_ID)]] = Field(
        min_length=1, max_length=MAX_CLIENTS_PER_CALL
    )
    override_rate_limit: int | None = Field(default=None, ge=1)
    priority: int = Field(default=1, ge=0, le=1_000)
    effective_from: datetime | None = None
    effective_to: datetime | None = None


class AssignmentOut(BaseModel):
    client_id: str
    policy_id: int
    override_rate_limit: int | None
    priority: int
    effective_from: datetime | None
    effective_to: datetime | None


class AssignOut(BaseModel):
    policy_id: int
    assigned: list[AssignmentOut]


class AssignmentList(BaseModel):
    assignments: list[AssignmentOut]


class TierIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_ids: list[Annotated[str, Field(min_length=1, max_length=MAX_ID)]] = Field(
        min_length=1, max_length=MAX_CLIENTS_PER_CALL
    )


class TierOut(BaseModel):
    tier: str
    client_ids: list[str]


# --- helpers -------------------------------------------------------------------------------


def _at(now_ms: int, delta_ms: int) -> datetime:
    return datetime.fromtimestamp((now_ms + delta_ms) / 1000, UTC)


def check_body(result: CheckResult, now_ms: int) -> dict[str, Any]:
    """The check response as a plain dict (serialised with orjson on the hot path)."""
    policies = [
        {
            "policy_id": a.policy.policy_id,
            "name": a.policy.name,
            "allowed": a.decision.allowed,
            "shadow": a.policy.shadow,
            "limit": a.decision.limit,
            "remaining_quota": a.decision.remaining,
            "reset_time": rfc3339_ms(now_ms + a.decision.reset_ms),
            "retry_after": a.decision.retry_ms / 1000,
        }
        for a in result.applied
    ]
    d = result.deciding
    deciding = policies[result.applied.index(d)] if d is not None else None
    return {
        "allowed": result.allowed,
        "remaining_quota": deciding["remaining_quota"] if deciding else None,
        "reset_time": deciding["reset_time"] if deciding else None,
        "retry_after": result.retry_ms / 1000,
        "policy_applied": deciding["name"] if deciding else None,
        "limit": deciding["limit"] if deciding else None,
        "degraded": result.degraded,
        "policies": policies,
    }


def policy_out(p: Policy) -> PolicyOut:
    return PolicyOut(
        policy_id=p.policy_id,
        name=p.name,
        algorithm=str(p.algorithm),
        rate_limit=p.rate_limit,
        time_window=p.time_window,
        burst_capacity=p.burst_capacity,
        key_by=list(p.key_by),
        match_resource=p.match_resource,
        match_region=p.match_region,
        tier=p.tier,
        applies_to_all=p.applies_to_all,
        shadow=p.shadow,
        failure_mode=str(p.failure_mode),
        is_active=p.is_active,
        version=p.version,
        created_at=p.created_at,
        updated_at=p.updated_at,
    )


def assignment_out(a: Assignment) -> AssignmentOut:
    return AssignmentOut(
        client_id=a.client_id,
        policy_id=a.policy_id,
        override_rate_limit=a.override_rate_limit,
        priority=a.priority,
        effective_from=a.effective_from,
        effective_to=a.effective_to,
    )


def build_policy(data: dict[str, Any], policy_id: int = 0, version: int = 1) -> Policy:
    try:
        algorithm, burst, pattern = validate_policy_fields(
            name=data["name"],
            algorithm=data["algorithm"],
            rate_limit=data["rate_limit"],
            time_window=data["time_window"],
            burst_capacity=data.get("burst_capacity"),
            key_by=data.get("key_by") or [],
            match_resource=data.get("match_resource"),
        )
    except LimitError as exc:
        raise InvalidField(exc.field, exc.message) from None
    return Policy(
        policy_id=policy_id,
        name=data["name"],
        algorithm=algorithm,
        rate_limit=data["rate_limit"],
        time_window=data["time_window"],
        burst_capacity=burst,
        key_by=tuple(data.get("key_by") or ()),
        match_resource=data.get("match_resource"),
        match_region=data.get("match_region"),
        tier=data.get("tier"),
        applies_to_all=bool(data.get("applies_to_all")),
        shadow=bool(data.get("shadow")),
        failure_mode=FailureMode(data.get("failure_mode") or FailureMode.LOCAL),
        is_active=data.get("is_active", True),
        version=version,
        created_at=data.get("created_at"),
        updated_at=data.get("updated_at"),
        _resource_re=pattern,
    )


def _policy_dict(p: Policy) -> dict[str, Any]:
    return policy_out(p).model_dump()


PolicyId = Annotated[int, Path(ge=1, le=MAX_POLICY_ID)]


# --- router --------------------------------------------------------------------------------


CHECK_PATH = "/api/v1/ratelimit/check"


def check_handler(service: RateLimitService, runtime: Runtime) -> LeanFunction:
    """POST /api/v1/ratelimit/check, the hot path: parsed by hand, no framework in between."""
    keys = runtime.keys

    async def handle(scope: Any, raw: bytes) -> LeanResult:
        known_principal(scope, "ratelimit:write") or await authenticate(
            scope, RawHeaders(scope), keys, "ratelimit:write"
        )
        client_id, api_key, resource, ip, region, weight, background = _parse_check(
            json_object(raw)
        )
        ctx = CheckContext(client_id, api_key, resource, ip, region)
        now = service.clock.now_ms()
        try:
            result = await service.check(ctx, weight, background=background)
        except LimitError as exc:
            raise InvalidField(exc.field, exc.message) from None
        headers = []
        if not result.allowed:
            headers.append(
                (b"retry-after", str(max(1, math.ceil(result.retry_ms / 1000))).encode())
            )
        return 200, orjson.dumps(check_body(result, now), option=orjson.OPT_UTC_Z), headers

    return handle


def build_router(
    service: RateLimitService, store: SqlPolicyStore, runtime: Runtime, lean_check: LeanFunction
) -> APIRouter:
    router = APIRouter(tags=["ratelimit"])
    admin = require("ratelimit:admin")
    reader = require("ratelimit:read")
    writer = require("ratelimit:write")

    async def changed() -> None:
        await service.reload()
        await runtime.kv.publish(POLICY_CHANNEL, str(service.book.version).encode())

    async def get_policy(policy_id: int) -> Policy:
        policy = await store.get(policy_id)
        if policy is None:
            raise NotFound("policy", policy_id)
        return policy

    @router.post(
        CHECK_PATH,
        summary="Decide whether a request may proceed",
        response_model=CheckResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": CheckRequest.model_json_schema(by_alias=True)}
                },
            }
        },
    )
    async def check(request: Request, _: Principal = writer) -> Response:
        # Served by the lean route below (mounted ahead of FastAPI); declared here for OpenAPI.
        return await lean_response(lean_check, request)

    @router.get("/api/v1/ratelimit/status", response_model=StatusResponse)
    async def status(
        client_id: Annotated[str, Query(min_length=1, max_length=MAX_ID)],
        policy_id: Annotated[int | None, Query(ge=1, le=MAX_POLICY_ID)] = None,
        api_key: Annotated[str, Query(max_length=MAX_ID)] = "",
        resource: Annotated[str, Query(max_length=2048)] = "",
        ip: Annotated[str, Query(max_length=64)] = "",
        region: Annotated[str, Query(max_length=64)] = "",
        _: Principal = reader,
    ) -> StatusResponse:
        """Current quota of every policy that applies to the client (nothing is consumed)."""
        ctx = CheckContext(client_id, api_key, resource, ip, region)
        result = await service.status(ctx)
        now = service.clock.now_ms()
        entries = [
            StatusEntry(
                policy_id=a.policy.policy_id,
                name=a.policy.name,
                limit=a.decision.limit,
                remaining_quota=a.decision.remaining,
                reset_time=_at(now, a.decision.reset_ms),
                current_usage=max(0, a.decision.limit - a.decision.remaining),
            )
            for a in result.applied
            if policy_id is None or a.policy.policy_id == policy_id
        ]
        return StatusResponse(client_id=client_id, policies=entries)

    @router.post("/api/v1/policies", status_code=201, response_model=PolicyOut)
    async def create_policy(body: PolicyIn, _: Principal = admin) -> PolicyOut:
        policy = build_policy(body.model_dump())
        if await store.name_taken(policy.name):
            raise Conflict(f"a policy named {policy.name!r} exists", "policy-name-taken")
        now = datetime.fromtimestamp(service.clock.now(), UTC)
        created = await store.create(policy, now)
        await changed()
        return policy_out(created)

    @router.get("/api/v1/policies", response_model=PolicyList)
    async def list_policies(
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        tier: Annotated[str | None, Query(max_length=100)] = None,
        _: Principal = reader,
    ) -> PolicyList:
        items = sorted(service.book.by_id.values(), key=lambda p: p.policy_id)
        items = [p for p in items if p.policy_id > after and (tier is None or p.tier == tier)]
        page = items[:limit]
        next_after = page[-1].policy_id if len(items) > limit else None
        return PolicyList(policies=[policy_out(p) for p in page], next_after=next_after)

    @router.get("/api/v1/policies/{policy_id}", response_model=PolicyOut)
    async def read_policy(policy_id: PolicyId, _: Principal = reader) -> PolicyOut:
        return policy_out(await get_policy(policy_id))

    @router.patch("/api/v1/policies/{policy_id}", response_model=PolicyOut)
    async def update_policy(
        policy_id: PolicyId, body: PolicyPatch, _: Principal = admin
    ) -> PolicyOut:
        current = await get_policy(policy_id)
        merged = _policy_dict(current) | body.model_dump(exclude_unset=True)
        if "rate_limit" in body.model_fields_set and "burst_capacity" not in body.model_fields_set:
            if current.burst_capacity == current.rate_limit:
                merged["burst_capacity"] = None
        for field in ("name", "algorithm", "rate_limit", "time_window", "key_by"):
            if merged.get(field) is None:
                raise InvalidField(field, "may not be null")
        policy = build_policy(merged, policy_id, current.version)
        if policy.name != current.name and await store.name_taken(policy.name, policy_id):
            raise Conflict(f"a policy named {policy.name!r} exists", "policy-name-taken")
        now = datetime.fromtimestamp(service.clock.now(), UTC)
        updated = await store.update(policy, now)
        await changed()
        return policy_out(updated)

    @router.delete("/api/v1/policies/{policy_id}", status_code=204, response_class=Response)
    async def delete_policy(policy_id: PolicyId, _: Principal = admin) -> Response:
        await get_policy(policy_id)
        await store.delete(policy_id)
        await changed()
        return Response(status_code=204)

    @router.put("/api/v1/policies/{policy_id}/clients", response_model=AssignOut)
    async def assign(policy_id: PolicyId, body: AssignIn, _: Principal = admin) -> AssignOut:
        """Assign the policy to clients (replacing an assignment with the same start)."""
        policy = await get_policy(policy_id)
        if body.effective_from and body.effective_to and body.effective_to <= body.effective_from:
            raise InvalidField("effective_to", "must be after effective_from")
        if body.override_rate_limit is not None:
            try:
                policy.limit(body.override_rate_limit)
            except LimitError as exc:
                raise InvalidField("override_rate_limit", exc.message) from None
        rows = [
            Assignment(
                client_id=c,
                policy_id=policy_id,
                override_rate_limit=body.override_rate_limit,
                priority=body.priority,
                effective_from=body.effective_from,
                effective_to=body.effective_to,
            )
            for c in dict.fromkeys(body.client_ids)
        ]
        existing: dict[str, list[Assignment]] = {}
        for a in await store.assignments([r.client_id for r in rows]):
            existing.setdefault(a.client_id, []).append(a)
        for row in rows:
            clash = conflicting(existing.get(row.client_id, []), row)
            if clash is not None:
                raise InvalidField(
                    "effective_from",
                    f"client {row.client_id!r} already has this policy at priority "
                    f"{row.priority} over an overlapping period; use another priority",
                )
        await store.assign(rows)
        await changed()
        return AssignOut(policy_id=policy_id, assigned=[assignment_out(a) for a in rows])

    @router.get("/api/v1/policies/{policy_id}/clients", response_model=AssignmentList)
    async def list_assignments(policy_id: PolicyId, _: Principal = reader) -> AssignmentList:
        await get_policy(policy_id)
        found = [
            a
            for items in service.book.by_client.values()
            for a in items
            if a.policy_id == policy_id
        ]
        found.sort(
            key=lambda a: (a.client_id, a.effective_from or datetime.min.replace(tzinfo=UTC))
        )
        return AssignmentList(assignments=[assignment_out(a) for a in found])

    @router.put("/api/v1/tiers/{tier}/clients", response_model=TierOut)
    async def set_tier(
        tier: Annotated[str, Path(min_length=1, max_length=100)], body: TierIn, _: Principal = admin
    ) -> TierOut:
        """Put clients in a tier: every policy of the tier applies to them."""
        clients = list(dict.fromkeys(body.client_ids))
        await store.set_tier(tier, clients)
        await changed()
        return TierOut(tier=tier, client_ids=clients)

    return router


CheckFields = tuple[str, str, str, str, str, int, bool]
_CHECK_FIELDS = frozenset({"client_id", "api_key", "resource", "ip", "region", "weight", "async"})


def _parse_check(body: dict[str, Any]) -> CheckFields:
    """(client_id, api_key, resource, ip, region, weight, async) of a check body. A body of
    the usual shape is taken at a glance; anything else goes through `_check_fields`, which
    says what is wrong with it."""
    client_id = body.get("client_id")
    api_key = body.get("api_key")
    resource = body.get("resource")
    ip = body.get("ip", "")
    region = body.get("region", "")
    weight = body.get("weight", 1)
    background = body.get("async", False)
    if (
        type(client_id) is str
        and 0 < len(client_id) <= MAX_ID
        and type(api_key) is str
        and len(api_key) <= MAX_ID
        and type(resource) is str
        and len(resource) <= MAX_RESOURCE
        and type(ip) is str
        and len(ip) <= MAX_LABEL
        and type(region) is str
        and len(region) <= MAX_LABEL
        and type(weight) is int
        and weight >= 1
        and type(background) is bool
        and body.keys() <= _CHECK_FIELDS
    ):
        return client_id, api_key, resource, ip, region, weight, background
    return _check_fields(body)


def _check_fields(body: dict[str, Any]) -> CheckFields:
    out: dict[str, Any] = {}
    for name, required, limit in (
        ("client_id", True, MAX_ID),
        ("api_key", True, MAX_ID),
        ("resource", True, MAX_RESOURCE),
        ("ip", False, MAX_LABEL),
        ("region", False, MAX_LABEL),
    ):
        value = body.get(name)
        if value is None:
            if required:
                raise InvalidField(name, "is required")
            value = ""
        if not isinstance(value, str) or len(value) > limit:
            raise InvalidField(name, f"must be a string of at most {limit} characters")
        out[name] = value
    if not out["client_id"]:
        raise InvalidField("client_id", "must not be empty")
    weight = body.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise InvalidField("weight", "must be a positive integer")
    background = body.get("async", False)
    if not isinstance(background, bool):
        raise InvalidField("async", "must be true or false")
    unknown = set(body) - _CHECK_FIELDS
    if unknown:
        raise InvalidField(sorted(unknown)[0], "is not a known field")
    return (
        out["client_id"],
        out["api_key"],
        out["resource"],
        out["ip"],
        out["region"],
        weight,
        background,
    )


# --- wiring --------------------------------------------------------------------------------


def counter_store(runtime: Runtime) -> CounterStore:
    if isinstance(runtime.kv, RedisKV):
        from tenfold.ratelimit.stores.redis import RedisCounterStore

        return RedisCounterStore(runtime.kv)
    return MemoryCounterStore()


def service_for(runtime: Runtime) -> RateLimitService:
    """The one RateLimitService of this process (shared by the API and the guard)."""
    existing = runtime.services.get("ratelimit")
    if isinstance(existing, RateLimitService):
        return existing
    settings = runtime.settings
    service = RateLimitService(
        SqlPolicyStore(runtime.engine),
        counter_store(runtime),
        clock=runtime.clock,
        prefix=settings.redis_prefix,
        replicas=settings.ratelimit_replicas,
        events_sample=settings.ratelimit_events_sample,
    )
    runtime.services["ratelimit"] = service
    return service


def start_hooks(runtime: Runtime, service: RateLimitService) -> tuple[Any, Any]:
    subscription: list[Any] = []

    async def on_start() -> None:
        if runtime.services.get("ratelimit:started"):
            return
        runtime.services["ratelimit:started"] = True
        await service.reload()

        async def on_message(_: bytes) -> None:
            await service.reload()

        subscription.append(await runtime.kv.subscribe(POLICY_CHANNEL, on_message))
        runtime.every(POLL_SECONDS, service.reload_if_stale, "ratelimit-poll")
        runtime.every(1.0, service.flush_events, "ratelimit-events")
        runtime.every(FLUSH_SECONDS, service.flush_pending, "ratelimit-async")

    async def on_stop() -> None:
        for sub in subscription:
            await sub.close()
        subscription.clear()
        with contextlib.suppress(Exception):
            await service.flush_pending()
            while await service.flush_events():
                pass
        await service.counters.aclose()
        runtime.services.pop("ratelimit:started", None)

    return on_start, on_stop


def mount(runtime: Runtime) -> Mount:
    service = service_for(runtime)
    on_start, on_stop = start_hooks(runtime, service)
    lean = check_handler(service, runtime)
    router = build_router(service, SqlPolicyStore(runtime.engine), runtime, lean)
    return Mount(
        name="ratelimit",
        routers=[router],
        on_start=[on_start],
        on_stop=[on_stop],
        lean_routes=[LeanRoute("POST", CHECK_PATH, lean)],
    )
