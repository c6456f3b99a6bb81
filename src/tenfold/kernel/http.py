"""HTTP plumbing every service shares: RFC 9457 problems, request ids, body limits."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from random import getrandbits
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenfold.kernel.errors import BackendUnavailable, FieldError
from tenfold.kernel.telemetry import observe_request

log = structlog.get_logger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "urn:tenfold:problem:"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An error answered as `application/problem+json` (RFC 9457); `kind` is its stable type."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": PROBLEM_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc


class NotFound(Problem):
    def __init__(self, what: str, key: object) -> None:
        super().__init__(404, f"{what}-not-found", f"{what.replace('-', ' ')} {key} does not exist")


class InvalidField(Problem):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(
            422,
            "validation-error",
            f"{field}: {message}",
            errors=[{"field": field, "message": message}],
        )


class Conflict(Problem):
    def __init__(self, detail: str, kind: str = "conflict") -> None:
        super().__init__(409, kind, detail)


def problem_response(problem: Problem, request_id: str | None = None) -> Response:
    headers = dict(problem.headers)
    body = problem.body()
    if request_id:
        body["request_id"] = request_id
    return Response(
        orjson.dumps(body), problem.status, headers=headers, media_type=PROBLEM_CONTENT_TYPE
    )


def _request_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def _field_path(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc, _request_id(request))


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        problem = Problem(400, "malformed-json", "the request body is not valid JSON")
    else:
        fields = [
            {"field": _field_path(err.get("loc", ())), "message": str(err.get("msg", ""))}
            for err in errors
        ]
        first = fields[0] if fields else {"field": "body", "message": "invalid"}
        problem = Problem(
            422, "validation-error", f"{first['field']}: {first['message']}", errors=fields
        )
    return problem_response(problem, _request_id(request))


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    kinds = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}
    problem = Problem(
        exc.status_code,
        kinds.get(exc.status_code, f"http-{exc.status_code}"),
        str(exc.detail),
        headers=dict(exc.headers or {}),
    )
    return problem_response(problem, _request_id(request))


async def _on_field(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FieldError)
    return problem_response(InvalidField(exc.field, exc.message), _request_id(request))


def unavailable(exc: Exception, **where: Any) -> Problem:
    """The 503 for an unreachable backend. The log keeps the whole reason; the caller learns
    which backend failed, not the driver's message (addresses, ports, user names)."""
    log.warning("http.backend_unavailable", error=str(exc), **where)
    what = str(exc).split(":", 1)[0].split(" at ", 1)[0].strip() or "a backend is unreachable"
    return Problem(
        503, "backend-unavailable", f"{what}; retry shortly", headers={"Retry-After": "1"}
    )


async def _on_unavailable(request: Request, exc: Exception) -> Response:
    return problem_response(unavailable(exc), _request_id(request))


async def _on_crash(request: Request, exc: Exception) -> Response:
    log.exception("http.unhandled", path=request.url.path)
    problem = Problem(500, "internal-error", "an unexpected error occurred; see the server log")
    return problem_response(problem, _request_id(request))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(FieldError, _on_field)
    app.add_exception_handler(BackendUnavailable, _on_unavailable)
    app.add_exception_handler(Exception, _on_crash)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _edge_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, bytes, int | None]:
    """(the caller's request id if well-formed else "", Content-Type, Content-Length): the
    length is -1 when absent, None when unreadable."""
    request_id = ""
    content_type = b""
    content_length: int | None = -1
    for name, value in headers:
        if name == b"content-length":
            try:
                content_length = int(value)
            except ValueError:
                content_length = None
        elif name == b"content-type":
            content_type = value
        elif name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                request_id = candidate
    return request_id, content_type, content_length


def new_request_id() -> str:
    """24 hex digits: unique enough to find one request in the logs, and no system call."""
    return getrandbits(96).to_bytes(12, "big").hex()


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _raw_problem(status: int, kind: str, detail: str, request_id: str) -> tuple[bytes, list[Any]]:
    body = Problem(status, kind, detail).body()
    body["request_id"] = request_id
    payload = orjson.dumps(body)
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    return payload, headers


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


class EdgeMiddleware:
    """One lean ASGI layer: request id in and out, body size limit, JSON content type,
    and the request count / latency metrics per route template."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        raw_body_prefixes: tuple[str, ...] = (),
        lean_routes: Sequence[LeanRoute] = (),
        gates: Sequence[Gate] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.raw_body_prefixes = raw_body_prefixes
        # Hot paths are served here, behind the gates only: no middleware stack, no framework.
        self.lane = FastLane(app, lean_routes) if lean_routes else None
        self.gates = tuple(gates)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lane
        if lane is None or scope["type"] != "http":
            await self._framework(scope, receive, send)
            return
        route = lane.match(scope)
        if route is None:
            await self._framework(scope, receive, send)
            return
        # A lean route: served here unless its body is over the limit, has no length, or is
        # not JSON, which the framework path answers (413, 415) or reads (chunked).
        started = time.perf_counter()
        request_id, content_type, content_length = _edge_headers(scope["headers"])
        method = scope["method"]
        if (
            content_length is None  # unreadable
            or content_length > self.max_body_bytes
            or (content_length < 0 and method != "GET")
            or (
                content_type != b"application/json"
                and self._reject(method, scope["path"], content_type, -1)
            )
        ):
            await self._framework(scope, receive, send)
            return
        if not request_id:
            request_id = new_request_id()
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["request_id"] = request_id
        scope["route"] = route
        status = 500
        try:
            status = await serve_lean(route, scope, receive, send, self.gates, request_id)
        finally:
            observe_request(method, route.path, status, time.perf_counter() - started)

    async def _framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id, content_type, length = _edge_headers(scope["headers"])
        content_length = -1 if length is None else length  # unreadable: counted as it arrives
        if not request_id:
            request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        method = scope["method"]
        status_holder = [500]
        response_started = [False]
        rid = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                response_started[0] = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        try:
            rejection = self._reject(method, scope["path"], content_type, content_length)
            if rejection is not None:
                status, kind, detail = rejection
                await self._send_raw(send_with_id, status, kind, detail, request_id)
                return
            limited_receive = receive
            if method in _BODY_METHODS and content_length < 0:
                # No Content-Length (chunked): count as it arrives. With one, the server reads
                # exactly that many bytes, and _reject has checked it against the limit.
                limited_receive = self._limited(receive)
            try:
                await self.app(scope, limited_receive, send_with_id)
            except _BodyTooLarge:
                await self._send_raw(
                    send_with_id, 413, "body-too-large", self._too_large(), request_id
                )
            # The safety net for the layers outside FastAPI's handlers (guards, lean routes):
            # their failures are problems too. Once a response started, the server deals.
            except BackendUnavailable as exc:
                if response_started[0]:
                    raise
                problem = unavailable(exc, path=scope["path"])
                await self._send_raw(
                    send_with_id,
                    503,
                    "backend-unavailable",
                    problem.detail,
                    request_id,
                    [(b"retry-after", b"1")],
                )
            except Exception:
                if response_started[0]:
                    raise
                log.exception("http.unhandled", path=scope["path"])
                await self._send_raw(
                    send_with_id,
                    500,
                    "internal-error",
                    "an unexpected error occurred; see the server log",
                    request_id,
                )
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            observe_request(method, template, status_holder[0], time.perf_counter() - started)

    def _too_large(self) -> str:
        return f"the request body exceeds the limit of {self.max_body_bytes} bytes"

    def _reject(
        self, method: str, path: str, content_type: bytes, content_length: int
    ) -> tuple[int, str, str] | None:
        if method not in _BODY_METHODS:
            return None
        if content_length > self.max_body_bytes:
            return 413, "body-too-large", self._too_large()
        if content_length == 0 or path.startswith(self.raw_body_prefixes):
            return None
        media = content_type.split(b";", 1)[0].strip().lower()
        if media and media != b"application/json" and not media.endswith(b"+json"):
            return (
                415,
                "unsupported-media-type",
                f"expected Content-Type application/json, got {media.decode('latin-1')}",
            )
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        return wrapped

    async def _send_raw(
        self,
        send: Send,
        status: int,
        kind: str,
        detail: str,
        rid: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        payload, headers = _raw_problem(status, kind, detail, rid)
        headers = [h for h in headers if h[0] != b"x-request-id"] + (extra or [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class RawHeaders:
    """Just enough of a headers mapping over a raw ASGI scope (no per-request dict)."""

    __slots__ = ("_items",)

    def __init__(self, scope: Scope) -> None:
        self._items = scope.get("headers", ())

    def get(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for k, v in self._items:
            if k == wanted:
                return str(v.decode("latin-1"))
        return None


# --- the client's address ------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The networks whose X-Forwarded-For is believed. Remembers what it answered for each
    address (a few proxies and recurring clients): parsing an address costs more than a
    lean request's whole handler."""

    __slots__ = ("_known", "networks")

    def __init__(self, networks: Sequence[Network]) -> None:
        self.networks = tuple(networks)
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        known = self._known.get(address)
        if known is None:
            if len(self._known) >= 4096:
                self._known.clear()
            known = self._known[address] = _trusted(address, self.networks)
        return known


def parse_networks(items: Sequence[str]) -> TrustedProxies:
    return TrustedProxies([ipaddress.ip_network(i, strict=False) for i in items])


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip(scope: Scope, trusted: TrustedProxies) -> str | None:
    """The peer address; through trusted proxies, the right-most untrusted X-Forwarded-For hop."""
    client = scope.get("client")
    peer: str | None = str(client[0]) if client else None
    if peer is None or not trusted or peer not in trusted:
        return peer
    forwarded = RawHeaders(scope).get("x-forwarded-for")
    if not forwarded:
        return peer
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            return hop
    return hops[0] if hops else peer


LeanResult = tuple[int, bytes, list[tuple[bytes, bytes]]]
_NO_BODY: Message = {"type": "http.request", "body": b"", "more_body": False}
LeanFunction = Callable[[Scope, bytes], Awaitable[LeanResult]]


@dataclass(frozen=True, slots=True)
class LeanRoute:
    """A hot path served ahead of the framework: `fn(scope, body)` -> (status, JSON, headers).

    The same route is declared to FastAPI for the OpenAPI document; this one answers first.
    A handler answering something other than JSON puts its own `content-type` header first.
    `when(scope)`, if given, decides whether a request that fits the path is this route's (a
    short link on a branded host, say); `public` routes are open to anyone, like redirects.
    """

    method: str
    path: str
    fn: LeanFunction
    when: Callable[[Scope], bool] | None = None
    public: bool = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_lean(self, scope, receive, send, (), scope.get("state", {}).get("request_id"))


def json_object(raw: bytes) -> dict[str, Any]:
    """A lean handler's body: a JSON object, or the 400/422 problem saying why not."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Problem(400, "malformed-json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidField("body", "must be a JSON object")
    return body


async def lean_response(fn: LeanFunction, request: Request) -> Response:
    """Serve a lean handler from its FastAPI declaration (a request the edge did not serve)."""
    status, payload, headers = await fn(request.scope, await request.body())
    return Response(
        payload,
        status,
        headers={k.decode(): v.decode() for k, v in headers},
        media_type="application/json",
    )


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """What a gate in front of the lean routes (the rate-limit guard) says of one request."""

    headers: list[tuple[bytes, bytes]]  # added to the response, whatever it is
    problem: Problem | None = None  # answered instead of serving the request


Gate = Callable[[Scope], Awaitable[GateVerdict | None]]


async def serve_lean(
    route: LeanRoute,
    scope: Scope,
    receive: Receive,
    send: Send,
    gates: Sequence[Gate],
    request_id: str | None,
) -> int:
    """Serve one request on a lean route, behind `gates`; the status code answered."""
    extra: list[tuple[bytes, bytes]] = []
    if request_id:
        extra.append((b"x-request-id", request_id.encode()))
    failure: Problem | None = None
    try:
        for gate in gates:
            verdict = await gate(scope)
            if verdict is not None:
                extra += verdict.headers
                if verdict.problem is not None:
                    raise verdict.problem
        if scope["method"] == "GET":  # no body to read
            message: Message = _NO_BODY
        else:
            message = await receive()
        if message["type"] == "http.disconnect":
            return 499
        payload = message.get("body", b"")
        if message.get("more_body", False):
            chunks = [payload]
            while message.get("more_body", False):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return 499
                chunks.append(message.get("body", b""))
            payload = b"".join(chunks)
        status, payload, headers = await route.fn(scope, payload)
        content_type = b"application/json"
        if headers and headers[0][0] == b"content-type":
            content_type = headers[0][1]
            headers = headers[1:]
    except Problem as exc:
        failure = exc
    except FieldError as exc:
        failure = InvalidField(exc.field, exc.message)
    except BackendUnavailable as exc:
        failure = unavailable(exc, path=route.path)
    except Exception:
        log.exception("http.unhandled", path=route.path)
        failure = Problem(500, "internal-error", "an unexpected error occurred; see the log")
    if failure is not None:
        body = failure.body()
        if request_id:
            body["request_id"] = request_id
        status, payload = failure.status, orjson.dumps(body)
        headers = [(k.lower().encode(), v.encode()) for k, v in failure.headers.items()]
        content_type = PROBLEM_CONTENT_TYPE.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(payload)).encode()),
                *headers,
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
    return status


class FastLane:
    """Sends a few hot (method, path) pairs straight to their lean handlers.

    A path is exact, or holds one `{name}` parameter filling a whole segment (such as
    `/api/v1/sessions/{session_id}/validate`); the value lands in `scope["path_params"]`.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[LeanRoute]) -> None:
        self.app = app
        self.routes = {(r.method, r.path): r for r in routes if "{" not in r.path}
        self.templates: list[tuple[str, str, str, str, LeanRoute]] = []
        for r in routes:
            if "{" in r.path:
                head, _, rest = r.path.partition("{")
                name, _, tail = rest.partition("}")
                if "{" in tail or not head.endswith("/") or (tail and not tail.startswith("/")):
                    raise ValueError(f"lean route {r.path!r}: one parameter, a whole segment")
                self.templates.append((r.method, head, tail, name, r))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.match(scope)
            if route is not None:
                scope["route"] = route
                await route(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def match(self, scope: Scope) -> LeanRoute | None:
        """The lean route serving this request, if any (its path parameter set on the scope)."""
        method, path = scope["method"], scope["path"]
        route = self.routes.get((method, path))
        if route is None and self.templates:
            route = self._match(scope, method, path)
        return route

    def _match(self, scope: Scope, method: str, path: str) -> LeanRoute | None:
        for m, head, tail, name, route in self.templates:
            if m == method and path.startswith(head) and path.endswith(tail):
                value = path[len(head) : len(path) - len(tail)]
                if value and "/" not in value and (route.when is None or route.when(scope)):
                    scope["path_params"] = {name: value}
                    return route
        return None


# --- the OpenAPI document ------------------------------------------------------------------

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document; `type` is stable per kind of error.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "examples": [PROBLEM_BASE + "validation-error"]},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "additionalProperties": True,
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_OPERATIONS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
_EDGE_ERRORS = {  # what the shared layers may answer, by what an operation has
    "security": (401, 403, 429, 503),
    "body": (400, 413, 415, 422),
    "parameters": (422,),
    "path": (404,),
}


def _problem_response(status: int, description: str | None = None) -> dict[str, Any]:
    return {
        "description": description or _TITLES.get(status, "Error"),
        "content": {PROBLEM_CONTENT_TYPE: {"schema": _PROBLEM_REF}},
    }


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what errors really look like (idempotent).

    Every operation lists the problems the shared layers may answer for it (auth, body limit,
    content type, validation, unknown resource), each as `application/problem+json`; a 4xx/5xx
    a service declared without a body gets the problem body too. FastAPI's default 422 schema,
    which tenfold never sends, is replaced.
    """
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if method not in _OPERATIONS:
                continue
            statuses: set[int] = set()
            parameters = operation.get("parameters", [])
            if operation.get("security"):
                statuses.update(_EDGE_ERRORS["security"])
            if "requestBody" in operation or method in ("post", "put", "patch"):
                statuses.update(_EDGE_ERRORS["body"])
            if parameters:
                statuses.update(_EDGE_ERRORS["parameters"])
            if any(p.get("in") == "path" for p in parameters):
                statuses.update(_EDGE_ERRORS["path"])
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):
                responses.setdefault(str(status), _problem_response(status))
            for code, response in responses.items():
                if code[:1] not in ("4", "5"):
                    continue
                content = response.get("content") or {}
                if not content or _is_fastapi_422(content):
                    response["content"] = _problem_response(int(code))["content"]
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and unused not in orjson.dumps(schema.get("paths", {})).decode():
            del schemas[unused]
    return schema


def _is_fastapi_422(content: dict[str, Any]) -> bool:
    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
    return str(ref).endswith("/HTTPValidationError")
