"""Feature flags HTTP API: the spec's paths, OFREP, the SDK stream, and the admin API.

Evaluation (`POST /api/v1/evaluate`, OFREP) runs on lean routes against the in-memory
ruleset. Admin bodies are parsed by the flags models, so an error names its JSON path.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from tenfold.flags.evaluation import (
    DISABLED,
    ERROR,
    FLAG_NOT_FOUND,
    INVALID_CONTEXT,
    PREREQUISITE_FAILED,
    Context,
    Evaluation,
    Ruleset,
)
from tenfold.flags.models import ChangeRequest, Conflict, Missing
from tenfold.flags.service import CHANNEL, Applied, FlagsService, Pending
from tenfold.flags.stores.sql import SqlFlagStore
from tenfold.kernel.auth import Principal, authenticate, known_principal, require
from tenfold.kernel.errors import FieldError
from tenfold.kernel.http import (
    InvalidField,
    LeanFunction,
    LeanResult,
    LeanRoute,
    NotFound,
    Problem,
    RawHeaders,
    json_object,
    lean_response,
)
from tenfold.kernel.runtime import Mount, Runtime

log = structlog.get_logger(__name__)

EVALUATE_PATH = "/api/v1/evaluate"
OFREP_ONE = "/ofrep/v1/evaluate/flags/{key}"
OFREP_ALL = "/ofrep/v1/evaluate/flags"
OFREP_CONFIGURATION = "/ofrep/v1/configuration"
MAX_FLAG_KEYS = 1_000
MAX_CONTEXT_BYTES = 32 * 1024
MAX_EVENTS = 10_000
FLUSH_SECONDS = 5.0  # usage counts and experiment events reach SQL within this
SYNC_SECONDS = 2.0  # a change whose message was lost is picked up within this
PING_SECONDS = 15.0  # SSE keep-alive comments
RETRY_MS = 1_000  # what the stream tells a client to wait before reconnecting

OFREP_ERROR_RESPONSE: dict[str, Any] = {
    "description": "an OFREP evaluation error (or a problem from the shared layers)",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "errorCode": {"type": "string"},
                    "errorDetails": {"type": "string"},
                },
                "required": ["errorCode"],
            }
        },
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}},
    },
}

FlagKey = Annotated[str, Path(min_length=1, max_length=200)]
EnvKey = Annotated[str, Path(min_length=1, max_length=100)]
JsonBody = Annotated[dict[str, Any], Body()]


class _Errors:
    """Turns the service's domain errors into problem+json (a FieldError the kernel's handlers
    answer already)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, Missing):
            raise NotFound(exc.what.replace(" ", "-"), exc.key) from None
        if isinstance(exc, Conflict):
            raise Problem(409, exc.kind, exc.message) from None


errors = _Errors()


def _context(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    ctx = body.get(name)
    if ctx is None:
        return {}
    if not isinstance(ctx, dict):
        raise InvalidField(name, "must be a JSON object")
    return ctx


def _count(
    service: FlagsService, env: str, results: list[Evaluation], ctx: Mapping[str, Any]
) -> None:
    service.count_all(env, results)
    exps = service.experiments.get(env)
    if not exps:
        return
    user = ctx.get("user_id") or ctx.get("targetingKey")
    if not isinstance(user, str):
        return
    for r in results:
        if r.error_code is None and r.variation is not None:
            service.expose(env, r.flag_key, r.variation, user, service.clock.now_ms())


# --- evaluation (lean) -----------------------------------------------------------------------


_EVALUATE_FIELDS = frozenset({"flag_keys", "user_context", "environment"})


def _string_keys(flag_keys: list[Any]) -> None:
    for i, k in enumerate(flag_keys):
        if not isinstance(k, str):
            raise InvalidField(f"flag_keys[{i}]", "must be a string")


def _evaluate_keys(ruleset: Ruleset, flag_keys: list[Any], ctx: Context) -> list[Evaluation]:
    """`ruleset.evaluate` of each key, the compiled flags called in place. A key that is not
    a string finds no flag, or cannot be looked up: then the keys are checked one by one."""
    flags = ruleset.flags

    def absent(key: Any) -> Evaluation:
        if not isinstance(key, str):
            _string_keys(flag_keys)
        return ruleset.evaluate(key, ctx)

    try:
        return [
            c.evaluate(ctx, flags) if (c := flags.get(k)) is not None else absent(k)
            for k in flag_keys
        ]
    except TypeError:  # an unhashable key (a list, an object)
        _string_keys(flag_keys)
        raise


def evaluate_handler(service: FlagsService, runtime: Runtime) -> LeanFunction:
    """POST /api/v1/evaluate {flag_keys, user_context, environment}."""
    keys = runtime.keys

    async def handle(scope: Any, raw: bytes) -> LeanResult:
        principal = known_principal(scope, "flags:read") or await authenticate(
            scope, RawHeaders(scope), keys, "flags:read"
        )
        if len(raw) > MAX_CONTEXT_BYTES + 64 * MAX_FLAG_KEYS:
            raise Problem(413, "body-too-large", "the evaluation request is too large")
        body = json_object(raw)
        if not body.keys() <= _EVALUATE_FIELDS:
            unknown = body.keys() - _EVALUATE_FIELDS
            raise InvalidField(sorted(unknown)[0], "is not a known field")
        ctx = _context(body, "user_context")
        env_name = body.get("environment")
        if env_name is not None and not isinstance(env_name, str):
            raise InvalidField("environment", "must be a string")
        bound = service.key_environments.get(principal.key_id)
        if bound is not None and (env_name is None or env_name == bound):
            env = bound  # an SDK key bound to its environment: the usual call
        else:
            with errors:
                env = service.environment_for(env_name, principal.key_id)
        ruleset = service.rulesets[env]
        flag_keys = body.get("flag_keys")
        if flag_keys is None:
            results = ruleset.evaluate_all(ctx)
        else:
            if not isinstance(flag_keys, list) or len(flag_keys) > MAX_FLAG_KEYS:
                raise InvalidField("flag_keys", f"must be a list of at most {MAX_FLAG_KEYS} keys")
            results = _evaluate_keys(ruleset, flag_keys, ctx)
        _count(service, env, results, ctx)
        payload = {
            "environment": env,
            "revision": ruleset.revision,
            "evaluations": [r.doc for r in results],
        }
        return 200, orjson.dumps(payload), []

    return handle


def _ofrep_reason(r: Evaluation) -> str:
    return DISABLED if r.reason == PREREQUISITE_FAILED else r.reason


def _ofrep_success(r: Evaluation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key": r.flag_key,
        "value": r.value,
        "reason": _ofrep_reason(r),
        "variant": r.variation,
        "metadata": {},
    }
    if r.reason == PREREQUISITE_FAILED:
        out["metadata"]["tenfold_reason"] = PREREQUISITE_FAILED
    if r.rule_id is not None:
        out["metadata"]["rule_id"] = r.rule_id
    return out


def _ofrep_error(key: str, code: str, details: str) -> dict[str, Any]:
    return {"key": key, "errorCode": code, "errorDetails": details}


def _ofrep_failure(r: Evaluation) -> dict[str, Any]:
    return _ofrep_error(r.flag_key, r.error_code or "GENERAL", r.error_message or "")


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    return if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]


class _Refused(Exception):
    """An OFREP request answered with an OFREP error body."""

    def __init__(self, status: int, code: str, details: str) -> None:
        super().__init__(details)
        self.result: LeanResult = (status, orjson.dumps(_ofrep_error("", code, details)), [])


async def _ofrep_request(
    service: FlagsService, runtime: Runtime, scope: Any, raw: bytes
) -> tuple[str, Ruleset, dict[str, Any]]:
    """The environment, its ruleset and the context of an OFREP request, or `_Refused`."""
    principal = known_principal(scope, "flags:read") or await authenticate(
        scope, RawHeaders(scope), runtime.keys, "flags:read"
    )
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise _Refused(400, "PARSE_ERROR", "the body is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("context", {}), dict):
        raise _Refused(400, INVALID_CONTEXT, 'the body must be {"context": {...}}')
    ctx = body.get("context") or {}
    env_name = ctx.get("environment") if isinstance(ctx.get("environment"), str) else None
    try:
        env = service.environment_for(env_name, principal.key_id)
    except (FieldError, Conflict) as exc:
        raise _Refused(400, INVALID_CONTEXT, str(exc)) from None
    return env, service.rulesets[env], ctx


def ofrep_one_handler(service: FlagsService, runtime: Runtime) -> LeanFunction:
    async def handle(scope: Any, raw: bytes) -> LeanResult:
        key = scope["path_params"]["key"]
        try:
            env, ruleset, ctx = await _ofrep_request(service, runtime, scope, raw)
        except _Refused as refused:
            return refused.result
        r = ruleset.evaluate(key, ctx)
        if r.reason == ERROR:
            status = 404 if r.error_code == FLAG_NOT_FOUND else 400
            return status, orjson.dumps(_ofrep_failure(r)), []
        _count(service, env, [r], ctx)
        return 200, orjson.dumps(_ofrep_success(r)), []

    return handle


def ofrep_all_handler(service: FlagsService, runtime: Runtime) -> LeanFunction:
    async def handle(scope: Any, raw: bytes) -> LeanResult:
        try:
            env, ruleset, ctx = await _ofrep_request(service, runtime, scope, raw)
        except _Refused as refused:
            return refused.result
        tag = hashlib.sha256(orjson.dumps(ctx, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        etag = f'"{env}-{ruleset.revision}-{tag}"'
        headers = [(b"etag", etag.encode())]
        if etag_matches(RawHeaders(scope).get("if-none-match"), etag):
            return 304, b"", headers
        results = ruleset.evaluate_all(ctx)
        _count(service, env, results, ctx)
        flags = [_ofrep_failure(r) if r.reason == ERROR else _ofrep_success(r) for r in results]
        return (
            200,
            orjson.dumps({"flags": flags, "metadata": {"revision": ruleset.revision}}),
            headers,
        )

    return handle


# --- the change stream -----------------------------------------------------------------------


def _sse(event: str, event_id: int, data: bytes) -> bytes:
    """One server-sent event (the data is one line of JSON)."""
    return b"event: %s\nid: %d\ndata: %s\n\n" % (event.encode(), event_id, data)


class Streams:
    """Server-sent event streams of ruleset changes, one queue per connected client."""

    def __init__(self, service: FlagsService, max_seconds: float) -> None:
        self.service = service
        self.max_seconds = max_seconds  # then the client reconnects (to any process)
        self.queues: dict[str, set[asyncio.Queue[bytes | None]]] = {}
        service.listeners.add(self.on_change)

    def on_change(self, env: str, revision: int, event: str, data: bytes) -> None:
        frame = _sse(event, revision, data)
        for q in list(self.queues.get(env, ())):
            try:
                q.put_nowait(frame)
            except asyncio.QueueFull:  # too far behind: close it; it reconnects and gets a put
                self.queues[env].discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    async def stream(self, env: str, last_event_id: str | None) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        self.queues.setdefault(env, set()).add(queue)
        try:
            yield f"retry: {RETRY_MS}\n\n".encode()
            ruleset = self.service.rulesets[env]
            if last_event_id != str(ruleset.revision):
                doc = orjson.dumps(self.service.ruleset_document(env))
                yield _sse("put", ruleset.revision, doc)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.max_seconds
            while (left := deadline - loop.time()) > 0:
                try:
                    frame = await asyncio.wait_for(queue.get(), min(PING_SECONDS, left))
                except TimeoutError:
                    yield b": ping\n\n"
                    continue
                if frame is None:
                    return
                yield frame
        finally:
            self.queues.get(env, set()).discard(queue)


# --- router ----------------------------------------------------------------------------------


def _outcome(result: Applied | Pending, response: Response) -> dict[str, Any]:
    if isinstance(result, Pending):
        response.status_code = 202
        return {"status": "pending_approval", "change_request": change_request_out(result.request)}
    return {"status": "applied", "version": result.version}


def change_request_out(cr: ChangeRequest) -> dict[str, Any]:
    return {
        "request_id": cr.request_id,
        "flag_key": cr.flag_key,
        "environment": cr.environment,
        "kind": cr.kind,
        "payload": cr.payload,
        "base_version": cr.base_version,
        "author": cr.author,
        "comment": cr.comment,
        "status": cr.status,
        "required_approvals": cr.required_approvals,
        "approvals": cr.approvals,
        "decisions": [
            {
                "approver": d.approver,
                "decision": d.decision,
                "comment": d.comment,
                "decided_at_ms": d.decided_at_ms,
            }
            for d in cr.decisions
        ],
        "created_at_ms": cr.created_at_ms,
        "decided_at_ms": cr.decided_at_ms,
    }


def _flag_out(service: FlagsService, key: str) -> dict[str, Any]:
    out: dict[str, Any] = {"environments": {}}
    for env, ruleset in service.rulesets.items():
        doc = ruleset.docs.get(key)
        if doc is None:
            continue
        if "flag_key" not in out:
            out.update(doc.flag.to_dict())
        out["environments"][env] = {**doc.targeting.to_dict(), "version": doc.version}
    return out


def build_router(
    service: FlagsService,
    runtime: Runtime,
    streams: Streams,
    lean: dict[str, LeanFunction],
) -> APIRouter:
    router = APIRouter(tags=["flags"])
    reader = require("flags:read")
    writer = require("flags:write")
    admin = require("flags:admin")

    # evaluation: declared here for the OpenAPI document; the lean routes answer first

    @router.post(EVALUATE_PATH, summary="Evaluate flags for a user context")
    async def evaluate(request: Request, body: JsonBody, _: Principal = reader) -> Response:
        return await lean_response(lean["evaluate"], request)

    @router.post(
        OFREP_ONE,
        tags=["ofrep"],
        summary="OFREP: evaluate one flag",
        responses={400: OFREP_ERROR_RESPONSE, 404: OFREP_ERROR_RESPONSE},
    )
    async def ofrep_one(request: Request, key: FlagKey, _: Principal = reader) -> Response:
        return await lean_response(lean["ofrep_one"], request)

    @router.post(
        OFREP_ALL,
        tags=["ofrep"],
        summary="OFREP: evaluate every flag (ETag, 304)",
        responses={
            304: {"description": "unchanged since the ETag sent"},
            400: OFREP_ERROR_RESPONSE,
        },
    )
    async def ofrep_all(request: Request, _: Principal = reader) -> Response:
        return await lean_response(lean["ofrep_all"], request)

    @router.get(OFREP_CONFIGURATION, tags=["ofrep"], summary="OFREP: provider configuration")
    async def ofrep_configuration(_: Principal = reader) -> dict[str, Any]:
        return {
            "name": "tenfold",
            "capabilities": {
                "cacheInvalidation": {"polling": {"enabled": True, "minPollingIntervalMs": 1000}},
                "flagEvaluation": {"unsupportedTypes": []},
            },
        }

    # SDK: ruleset, stream, reports

    def env_of(principal: Principal, requested: str | None) -> str:
        with errors:
            return service.environment_for(requested, principal.key_id)

    @router.get("/api/v1/flags/ruleset", summary="The environment's whole ruleset (for SDKs)")
    async def ruleset(
        environment: str | None = None,
        if_none_match: Annotated[str | None, Header()] = None,
        principal: Principal = reader,
    ) -> Response:
        env = env_of(principal, environment)
        etag = f'"{env}-{service.rulesets[env].revision}"'
        if etag_matches(if_none_match, etag):
            return Response(status_code=304, headers={"ETag": etag})
        body = orjson.dumps(service.ruleset_document(env))
        return Response(body, media_type="application/json", headers={"ETag": etag})

    @router.get(
        "/api/v1/flags/stream",
        summary="Server-sent events: the ruleset (put), then every change (patch)",
        response_class=StreamingResponse,
    )
    async def stream(
        environment: str | None = None,
        last_event_id: Annotated[str | None, Header()] = None,
        principal: Principal = reader,
    ) -> StreamingResponse:
        env = env_of(principal, environment)
        return StreamingResponse(
            streams.stream(env, last_event_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.post("/api/v1/flags/usage", status_code=202, summary="SDK usage counts")
    async def usage(body: JsonBody, principal: Principal = reader) -> dict[str, Any]:
        env = env_of(principal, body.get("environment"))
        counts = body.get("flags") or {}
        if not isinstance(counts, dict) or len(counts) > 10_000:
            raise InvalidField("flags", "must map at most 10,000 flag keys to {variation: count}")
        total = 0
        for flag_key, per in counts.items():
            if not isinstance(per, dict):
                raise InvalidField(f"flags.{flag_key}", "must map variations to counts")
            for variation, n in per.items():
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise InvalidField(f"flags.{flag_key}.{variation}", "must be a count")
                if flag_key in service.rulesets[env].docs:
                    service.count(env, flag_key, variation, n)
                    total += n
        return {"accepted": total}

    @router.post("/api/v1/flags/events", status_code=202, summary="Exposures and conversions")
    async def events(body: JsonBody, principal: Principal = reader) -> dict[str, Any]:
        env = env_of(principal, body.get("environment"))
        items = body.get("events") or []
        if not isinstance(items, list) or len(items) > MAX_EVENTS:
            raise InvalidField("events", f"must be a list of at most {MAX_EVENTS} events")
        now = service.clock.now_ms()
        accepted = 0
        for i, e in enumerate(items):
            if not isinstance(e, dict):
                raise InvalidField(f"events[{i}]", "must be an object")
            user = e.get("user_id")
            if not isinstance(user, str) or not 1 <= len(user) <= 200:
                raise InvalidField(f"events[{i}].user_id", "must be a string of 1-200 characters")
            at = e.get("timestamp_ms", now)
            if not isinstance(at, int) or isinstance(at, bool):
                raise InvalidField(
                    f"events[{i}].timestamp_ms", "must be milliseconds since the epoch"
                )
            kind = e.get("kind")
            if kind == "exposure":
                flag_key, variation = e.get("flag_key"), e.get("variation")
                if not isinstance(flag_key, str) or not isinstance(variation, str):
                    raise InvalidField(f"events[{i}]", "an exposure names flag_key and variation")
                accepted += service.expose(env, flag_key, variation, user, at)
            elif kind == "conversion":
                metric, value = e.get("metric"), e.get("value")
                if not isinstance(metric, str) or not 1 <= len(metric) <= 200:
                    raise InvalidField(
                        f"events[{i}].metric", "must be a string of 1-200 characters"
                    )
                if value is not None and (
                    not isinstance(value, int | float) or isinstance(value, bool)
                ):
                    raise InvalidField(f"events[{i}].value", "must be a number")
                service.convert(env, metric, user, value, at)
                accepted += 1
            else:
                raise InvalidField(f"events[{i}].kind", "must be exposure or conversion")
        return {"accepted": accepted}

    @router.post(
        "/api/v1/flags/{flag_key}/guard", status_code=202, summary="Report guard metric samples"
    )
    async def guard(
        flag_key: FlagKey, body: JsonBody, principal: Principal = reader
    ) -> dict[str, Any]:
        env = env_of(principal, body.get("environment"))
        requests, failed = body.get("requests"), body.get("errors")
        for name, value in (("requests", requests), ("errors", failed)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidField(name, "must be a count")
        if failed > requests:  # type: ignore[operator]
            raise InvalidField("errors", "cannot exceed requests")
        with errors:
            breached = await service.guard_report(flag_key, env, requests, failed)  # type: ignore[arg-type]
        return {"breached": breached}

    # environments and SDK keys

    @router.get("/api/v1/flags/environments", summary="Environments")
    async def list_environments(_: Principal = reader) -> dict[str, Any]:
        return {"environments": [e.to_dict() for e in service.environments.values()]}

    @router.post("/api/v1/flags/environments", status_code=201, summary="Create an environment")
    async def create_environment(body: JsonBody, principal: Principal = admin) -> dict[str, Any]:
        with errors:
            env = await service.create_environment(body, principal.subject)
        return env.to_dict()

    @router.patch(
        "/api/v1/flags/environments/{environment}", summary="Change an environment (approvals)"
    )
    async def update_environment(
        environment: EnvKey, body: JsonBody, principal: Principal = admin
    ) -> dict[str, Any]:
        with errors:
            env = await service.update_environment(environment, body, principal.subject)
        return env.to_dict()

    @router.post(
        "/api/v1/flags/environments/{environment}/keys",
        status_code=201,
        summary="Create an SDK key bound to an environment (shown once)",
    )
    async def create_sdk_key(environment: EnvKey, principal: Principal = admin) -> dict[str, Any]:
        if environment not in service.environments:
            raise NotFound("environment", environment)
        record, plaintext = await runtime.keys.create(f"flags sdk ({environment})", ["flags:read"])
        await service.bind_key(record.key_id, environment)
        return {"key_id": record.key_id, "api_key": plaintext, "environment": environment}

    # segments

    @router.get("/api/v1/flags/segments", summary="Segments")
    async def list_segments(_: Principal = reader) -> dict[str, Any]:
        segs = await service.store.segments()
        return {"segments": [s.to_dict() for s in segs]}

    @router.put(
        "/api/v1/flags/segments/{segment_key}",
        summary="Create or replace a segment",
        responses={
            201: {"description": "the segment was created"},
            202: {"description": "a change request waits for approvals (a gated flag uses it)"},
        },
    )
    async def put_segment(
        segment_key: FlagKey, body: JsonBody, response: Response, principal: Principal = writer
    ) -> dict[str, Any]:
        comment = body.pop("comment", "")
        doc = {**body, "segment_key": segment_key}
        with errors:
            outcome = await service.put_segment(
                doc, principal.subject, comment if isinstance(comment, str) else ""
            )
        if isinstance(outcome, Pending):
            return _outcome(outcome, response)
        segment, created = outcome
        response.status_code = 201 if created else 200
        return segment.to_dict()

    @router.get("/api/v1/flags/segments/{segment_key}", summary="One segment")
    async def get_segment(segment_key: FlagKey, _: Principal = reader) -> dict[str, Any]:
        seg = await service.store.segment(segment_key)
        if seg is None:
            raise NotFound("segment", segment_key)
        return seg.to_dict()  # type: ignore[no-any-return]

    @router.delete(
        "/api/v1/flags/segments/{segment_key}", status_code=204, summary="Delete a segment"
    )
    async def delete_segment(segment_key: FlagKey, principal: Principal = writer) -> Response:
        with errors:
            await service.delete_segment(segment_key, principal.subject)
        return Response(status_code=204)

    # change requests

    @router.get("/api/v1/flags/change-requests", summary="Change requests")
    async def list_change_requests(
        status: str | None = None,
        flag_key: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        _: Principal = reader,
    ) -> dict[str, Any]:
        items = await service.store.change_requests(status=status, flag_key=flag_key, limit=limit)
        return {"change_requests": [change_request_out(c) for c in items]}

    @router.get("/api/v1/flags/change-requests/{request_id}", summary="One change request")
    async def get_change_request(request_id: FlagKey, _: Principal = reader) -> dict[str, Any]:
        with errors:
            return change_request_out(await service.change_request(request_id))

    @router.post(
        "/api/v1/flags/change-requests/{request_id}/approve", summary="Approve (not its author)"
    )
    async def approve(
        request_id: FlagKey,
        principal: Principal = writer,
        body: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        return await decide(request_id, principal, body, approve=True)

    @router.post("/api/v1/flags/change-requests/{request_id}/reject", summary="Reject")
    async def reject(
        request_id: FlagKey,
        principal: Principal = writer,
        body: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        return await decide(request_id, principal, body, approve=False)

    async def decide(
        request_id: str, principal: Principal, body: dict[str, Any] | None, *, approve: bool
    ) -> dict[str, Any]:
        comment = str((body or {}).get("comment", ""))
        with errors:
            decided = await service.decide(request_id, principal.subject, approve, comment)
        return change_request_out(decided)

    @router.post("/api/v1/flags/change-requests/{request_id}/cancel", summary="Cancel (its author)")
    async def cancel(request_id: FlagKey, principal: Principal = writer) -> dict[str, Any]:
        with errors:
            return change_request_out(await service.cancel(request_id, principal.subject))

    # hygiene

    @router.get(
        "/api/v1/flags/stale", summary="Flags not evaluated, or serving one variation, for N days"
    )
    async def stale(
        environment: str | None = None,
        days: Annotated[int, Query(ge=1, le=3650)] = 30,
        principal: Principal = reader,
    ) -> dict[str, Any]:
        env = env_of(principal, environment)
        await service.flush()
        return {"environment": env, "days": days, "flags": await service.stale(env, days)}

    # experiments

    @router.post("/api/v1/experiments", status_code=201, summary="Start an experiment on a flag")
    async def create_experiment(body: JsonBody, principal: Principal = writer) -> dict[str, Any]:
        with errors:
            exp = await service.create_experiment(body, principal.subject)
        return exp.to_dict()

    @router.get("/api/v1/experiments", summary="Experiments")
    async def list_experiments(
        environment: str | None = None, _: Principal = reader
    ) -> dict[str, Any]:
        return {"experiments": [e.to_dict() for e in await service.store.experiments(environment)]}

    @router.get("/api/v1/experiments/{experiment_key}", summary="One experiment")
    async def get_experiment(experiment_key: FlagKey, _: Principal = reader) -> dict[str, Any]:
        with errors:
            return (await service.experiment(experiment_key)).to_dict()

    @router.get("/api/v1/experiments/{experiment_key}/results", summary="Per-variation results")
    async def experiment_results(
        experiment_key: FlagKey,
        confidence: Annotated[float, Query(gt=0.5, lt=1)] = 0.95,
        _: Principal = reader,
    ) -> dict[str, Any]:
        with errors:
            return await service.results(experiment_key, confidence)

    @router.post("/api/v1/experiments/{experiment_key}/stop", summary="Stop an experiment")
    async def stop_experiment(
        experiment_key: FlagKey, principal: Principal = writer
    ) -> dict[str, Any]:
        with errors:
            return (await service.stop_experiment(experiment_key, principal.subject)).to_dict()

    # flags

    @router.post("/api/v1/flags", status_code=201, summary="Create a flag (disabled everywhere)")
    async def create_flag(body: JsonBody, principal: Principal = writer) -> dict[str, Any]:
        with errors:
            flag_id, flag = await service.create_flag(body, principal.subject)
        return {"flag_id": flag_id, **flag.to_dict()}

    @router.get("/api/v1/flags", summary="Flags, by key (keyset pages)")
    async def list_flags(
        tag: str | None = None,
        q: Annotated[str | None, Query(max_length=200)] = None,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        _: Principal = reader,
    ) -> dict[str, Any]:
        rows = await service.store.list_flags(tag=tag, query=q, after=after, limit=limit)
        items = []
        for flag, row in rows:
            out = flag.to_dict()
            out["flag_id"] = row.flag_id
            out["created_at_ms"] = row.created_at_ms
            out["updated_at_ms"] = row.updated_at_ms
            out["created_by"] = row.created_by
            out["enabled"] = {
                env: bool(rs.docs[flag.key].targeting.enabled)
                for env, rs in service.rulesets.items()
                if flag.key in rs.docs
            }
            items.append(out)
        return {
            "flags": items,
            "next_after": items[-1]["flag_key"] if len(items) == limit else None,
        }

    @router.get("/api/v1/flags/{flag_key}", summary="A flag and its targeting in every environment")
    async def get_flag(flag_key: FlagKey, _: Principal = reader) -> dict[str, Any]:
        with errors:
            flag, row = await service.get_flag(flag_key)
        out = _flag_out(service, flag_key)
        out.update(flag.to_dict())
        out.update({"flag_id": row.flag_id, "version": row.version, "created_by": row.created_by})
        return out

    @router.patch("/api/v1/flags/{flag_key}", summary="Change a flag's definition")
    async def update_flag(
        flag_key: FlagKey, body: JsonBody, response: Response, principal: Principal = writer
    ) -> dict[str, Any]:
        comment = str(body.pop("comment", ""))
        with errors:
            result = await service.update_flag(flag_key, body, principal.subject, comment)
        return _outcome(result, response)

    @router.delete("/api/v1/flags/{flag_key}", status_code=204, summary="Delete a flag")
    async def delete_flag(flag_key: FlagKey, principal: Principal = writer) -> Response:
        with errors:
            await service.delete_flag(flag_key, principal.subject)
        return Response(status_code=204)

    @router.get(
        "/api/v1/flags/{flag_key}/environments/{environment}",
        summary="Targeting in one environment",
    )
    async def get_targeting(
        flag_key: FlagKey, environment: EnvKey, _: Principal = reader
    ) -> dict[str, Any]:
        with errors:
            targeting, version = await service.targeting(flag_key, environment)
        return {**targeting.to_dict(), "version": version}

    @router.put(
        "/api/v1/flags/{flag_key}/environments/{environment}",
        summary="Replace the targeting in one environment (202: waiting for approvals)",
    )
    async def put_targeting(
        flag_key: FlagKey,
        environment: EnvKey,
        body: JsonBody,
        response: Response,
        principal: Principal = writer,
    ) -> dict[str, Any]:
        comment = body.pop("comment", "")
        expected = body.pop("version", None)
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
            raise InvalidField("version", "must be the version last read")
        with errors:
            result = await service.set_targeting(
                flag_key,
                environment,
                body,
                principal.subject,
                comment=str(comment),
                expected_version=expected,
            )
        return _outcome(result, response)

    @router.post("/api/v1/flags/{flag_key}/toggle", summary="Kill switch: turn a flag on or off")
    async def toggle(
        flag_key: FlagKey, body: JsonBody, response: Response, principal: Principal = writer
    ) -> dict[str, Any]:
        unknown = set(body) - {"environment", "enabled"}
        if unknown:
            raise InvalidField(sorted(unknown)[0], "is not a known field")
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise InvalidField("enabled", "must be true or false")
        env = body.get("environment") or service.default_environment
        if not isinstance(env, str):
            raise InvalidField("environment", "must be a string")
        with errors:
            service.ruleset(env)
            result = await service.toggle(flag_key, env, enabled, principal.subject)
        out = _outcome(result, response)
        out.update({"flag_key": flag_key, "environment": env, "updated_at": service.clock.now_ms()})
        out["enabled"] = enabled if isinstance(result, Applied) else not enabled
        return out

    @router.post("/api/v1/flags/{flag_key}/rollout", summary="Roll a variation out to a percentage")
    async def rollout(
        flag_key: FlagKey, body: JsonBody, response: Response, principal: Principal = writer
    ) -> dict[str, Any]:
        unknown = set(body) - {"environment", "percentage", "variation", "baseline"}
        if unknown:
            raise InvalidField(sorted(unknown)[0], "is not a known field")
        pct = body.get("percentage")
        if not isinstance(pct, int | float) or isinstance(pct, bool):
            raise InvalidField("percentage", "must be a number from 0 to 100")
        env = str(body.get("environment") or service.default_environment)
        with errors:
            service.ruleset(env)
            result = await service.rollout(
                flag_key,
                env,
                float(pct),
                principal.subject,
                variation=body.get("variation"),
                baseline=body.get("baseline"),
            )
        return _outcome(result, response)

    @router.get("/api/v1/flags/{flag_key}/history", summary="Every change to a flag (audit log)")
    async def history(
        flag_key: FlagKey,
        before: int | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        _: Principal = reader,
    ) -> dict[str, Any]:
        entries = await service.store.history(flag_key, before=before, limit=limit)
        return {"flag_key": flag_key, "history": entries}

    return router


# --- mount -----------------------------------------------------------------------------------


def service_for(runtime: Runtime) -> FlagsService:
    existing = runtime.services.get("flags")
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    kv = runtime.kv
    channel = CHANNEL

    async def publish(message: bytes) -> None:
        await kv.publish(channel, message)

    service = FlagsService(
        SqlFlagStore(runtime.engine),
        runtime.clock,
        publish,
        default_environment=runtime.settings.flags_default_environment,
    )
    runtime.services["flags"] = service
    return service


def mount(runtime: Runtime) -> Mount:
    service = service_for(runtime)
    streams = Streams(service, runtime.settings.flags_stream_max_seconds)
    lean = {
        "evaluate": evaluate_handler(service, runtime),
        "ofrep_one": ofrep_one_handler(service, runtime),
        "ofrep_all": ofrep_all_handler(service, runtime),
    }
    subscription: list[Any] = []

    async def on_start() -> None:
        await service.load()
        subscription.append(await runtime.kv.subscribe(CHANNEL, service.on_message))
        runtime.every(SYNC_SECONDS, service.sync, "flags-sync")
        runtime.every(FLUSH_SECONDS, service.flush, "flags-flush")

    async def on_stop() -> None:
        for sub in subscription:
            await sub.close()
        for queues in streams.queues.values():
            for q in queues:
                q.put_nowait(None)
        try:
            await service.flush()
        except Exception as exc:
            log.warning("flags.flush_failed", error=f"{type(exc).__name__}: {exc}")

    return Mount(
        name="flags",
        routers=[build_router(service, runtime, streams, lean)],
        on_start=[on_start],
        on_stop=[on_stop],
        lean_routes=[
            LeanRoute("POST", EVALUATE_PATH, lean["evaluate"]),
            LeanRoute("POST", OFREP_ONE, lean["ofrep_one"]),
            LeanRoute("POST", OFREP_ALL, lean["ofrep_all"]),
        ],
    )
