"""The shortener's Python client: in-process or over HTTP, one interface.

    client = ShortenerClient.in_process(service, "account:42")      # inside a tenfold process
    client = ShortenerClient.over_http("http://sho.rt:8000", api_key)
    link = await client.shorten("https://example.com/launch", custom_alias="launch")
    done = await client.bulk([{"url": u} for u in urls])   # any number; 1,000 per call
    async for link in client.iterate(search="example.com"):
        ...

Both transports answer the API's JSON shapes as dicts (times as RFC 3339 strings) and raise one
error, `ShortenerClientError`: HTTP status, RFC 9457 problem type, detail, and the problem's
`errors` (`field`, `reason`, `message`). In process, short URLs are built from
`TENFOLD_SHORTENER_BASE_URL` (there is no request to take an origin from).
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, date, datetime
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx
import orjson
import pydantic

from tenfold.kernel.auth import Principal
from tenfold.kernel.errors import BackendUnavailable, FieldError
from tenfold.kernel.http import NotFound, Problem
from tenfold.shortener.api import (
    MAX_PAGE,
    BulkIn,
    CreateIn,
    Origins,
    UpdateIn,
    as_problem,
    bulk_out,
    changes_of,
    decode_cursor,
    encode_cursor,
    link_error,
    link_out,
)
from tenfold.shortener.models import MAX_BULK, Link, LinkError, NotOwner
from tenfold.shortener.service import ShortenerService

__all__ = [
    "HttpShortenerClient",
    "InProcessShortenerClient",
    "ShortenerClient",
    "ShortenerClientError",
]

PROBLEM_BASE: Final = "urn:tenfold:problem:"
DEFAULT_TIMEOUT = 30.0  # seconds, per request over HTTP (a bulk call of 1,000 takes a while)
Sort = Literal["created", "clicks"]
Order = Literal["asc", "desc"]
Granularity = Literal["hour", "day", "week"]


class ShortenerClientError(Exception):
    """The shortener refused a call; `status`, `problem_type`, `detail` and `errors` say why.

    `status` is None when no answer came back (the server could not be reached)."""

    def __init__(
        self,
        status: int | None,
        problem_type: str,
        detail: str,
        problem: dict[str, Any] | None = None,
    ) -> None:
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{where} {problem_type}: {detail}")
        self.status = status
        self.problem_type = problem_type  # e.g. urn:tenfold:problem:alias-taken
        self.detail = detail
        self.problem = problem or {}
        errors = self.problem.get("errors")
        # each {"field": ..., "message": ..., and for link rules "reason": ...}
        self.errors: builtins.list[dict[str, Any]] = (
            [e for e in errors if isinstance(e, dict)] if isinstance(errors, builtins.list) else []
        )

    @property
    def kind(self) -> str:
        """The problem type without tenfold's prefix: `alias-taken`, `link-not-found`, ..."""
        return self.problem_type.removeprefix(PROBLEM_BASE)


def _from_problem(problem: Problem) -> ShortenerClientError:
    body = problem.body()
    return ShortenerClientError(problem.status, body["type"], problem.detail, body)


def _from_validation(exc: pydantic.ValidationError) -> ShortenerClientError:
    """What the API answers when a body does not fit its schema (kernel/http.py does this)."""
    fields = [
        {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
        for err in exc.errors()
    ]
    first = fields[0] if fields else {"field": "body", "message": "invalid"}
    return _from_problem(
        Problem(422, "validation-error", f"{first['field']}: {first['message']}", errors=fields)
    )


def _shorten_body(
    url: str,
    custom_alias: str | None,
    expires_at: datetime | str | None,
    description: str,
    domain: str | None,
    redirect_type: int | None,
    max_visits: int | None,
    password: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    optional = {
        "custom_alias": custom_alias,
        "expires_at": expires_at,
        "domain": domain,
        "redirect_type": redirect_type,
        "max_visits": max_visits,
        "password": password,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if description:
        body["description"] = description
    return body


class ShortenerClient(ABC):
    """Shorten, list, change and delete links, read their analytics; either transport."""

    @staticmethod
    def in_process(
        service: ShortenerService, principal: Principal | str
    ) -> InProcessShortenerClient:
        """Call a ShortenerService of this process directly, as `principal` (an API key's
        principal, or an owner such as `account:42`, which may read and write its own links)."""
        return InProcessShortenerClient(service, principal)

    @staticmethod
    def over_http(
        base_url: str,
        api_key: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> HttpShortenerClient:
        """Call a tenfold server's shortener API with an API key (`shortener:write` to create
        and change links, `shortener:read` to read them).

        With `client`, its connection pool is used and it is left open by `aclose()`."""
        return HttpShortenerClient(base_url, api_key, client=client, timeout=timeout)

    async def shorten(
        self,
        url: str,
        *,
        custom_alias: str | None = None,
        expires_at: datetime | str | None = None,
        description: str = "",
        domain: str | None = None,
        redirect_type: int | None = None,
        max_visits: int | None = None,
        password: str | None = None,
    ) -> dict[str, Any]:
        """A new short link (the API's link object: short_code, short_url, long_url, ...)."""
        body = _shorten_body(
            url, custom_alias, expires_at, description, domain, redirect_type, max_visits, password
        )
        return await self._shorten(body)

    @abstractmethod
    async def _shorten(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create one link from the API's request body."""

    async def bulk(self, items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Shorten many URLs, 1,000 per call: `{created, failed, results}`, one result per item
        (`index` counts from 0 over all of `items`; `status` is created or failed, a failure
        carries `error: {field, reason, detail}`). Items take `shorten`'s keyword names."""
        rows = [dict(item) for item in items]
        out: dict[str, Any] = {"created": 0, "failed": 0, "results": []}
        for start in range(0, len(rows), MAX_BULK):
            done = await self._bulk_call(rows[start : start + MAX_BULK])
            out["created"] += done["created"]
            out["failed"] += done["failed"]
            for result in done["results"]:
                out["results"].append({**result, "index": start + int(result["index"])})
        return out

    @abstractmethod
    async def _bulk_call(self, rows: builtins.list[dict[str, Any]]) -> dict[str, Any]:
        """One bulk call of at most 1,000 items."""

    @abstractmethod
    async def get(self, code: str, domain: str | None = None) -> dict[str, Any]:
        """One of your links; `link-not-found` (404) for a missing one or someone else's."""

    @abstractmethod
    async def update(
        self, code: str, *, domain: str | None = None, **changes: Any
    ) -> dict[str, Any]:
        """Change a link: `expires_at`, `is_active`, `long_url`, `description`,
        `redirect_type`, `max_visits`, `password` ("" removes it); None clears a field."""

    @abstractmethod
    async def delete(self, code: str, domain: str | None = None) -> bool:
        """Delete a link and its analytics."""

    @abstractmethod
    async def list(
        self,
        limit: int = 50,
        cursor: str | None = None,
        sort: Sort = "created",
        order: Order = "desc",
        search: str = "",
        *,
        domain: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """One page of your links: `{items, next_cursor}` (pass `next_cursor` back, with the
        same sort and order, for the next page). `owner`: another owner's (admins only)."""

    async def iterate(
        self,
        sort: Sort = "created",
        order: Order = "desc",
        search: str = "",
        *,
        domain: str | None = None,
        owner: str | None = None,
        page_size: int = MAX_PAGE,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every link `list` would show, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list(
                page_size, cursor, sort, order, search, domain=domain, owner=owner
            )
            for item in page["items"]:
                yield item
            cursor = page.get("next_cursor")
            if not cursor:
                return

    @abstractmethod
    async def analytics(
        self,
        code: str,
        start: date | None = None,
        end: date | None = None,
        granularity: Granularity = "day",
        *,
        domain: str | None = None,
        include_bots: bool = False,
    ) -> dict[str, Any]:
        """Click analytics over UTC days `start`..`end`: totals, `click_timeline`,
        `geographic_distribution`, `device_breakdown`, `referrer_stats`."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release what the client holds (an HTTP connection pool it created)."""

    async def __aenter__(self) -> ShortenerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --- in process ----------------------------------------------------------------------------


class InProcessShortenerClient(ShortenerClient):
    """The API router's rules, without HTTP: the same owners, checks and answers."""

    def __init__(self, service: ShortenerService, principal: Principal | str) -> None:
        if isinstance(principal, str):
            principal = Principal(
                "in-process", "in-process client", frozenset({"shortener:write"}), principal
            )
        self.service = service
        self.principal = principal
        self._origins = Origins(service.config)

    def _url(self, link: Link) -> str:
        return self._origins.short_url(link, None)

    def _json(self, link: Link) -> dict[str, Any]:
        return link_out(link, self._url(link)).model_dump(mode="json")

    async def _create(self, items: builtins.list[CreateIn]) -> builtins.list[Link | Exception]:
        principal = self.principal
        can_alias = True if principal.can("shortener:admin") else None
        try:
            return await self.service.create(
                principal.subject, [i.item() for i in items], can_alias=can_alias
            )
        except LookupError as exc:
            raise _from_problem(Problem(403, "no-account", str(exc))) from None
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc

    async def _shorten(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            item = CreateIn.model_validate(body)
        except pydantic.ValidationError as exc:
            raise _from_validation(exc) from None
        [outcome] = await self._create([item])
        if not isinstance(outcome, Link):
            raise _from_problem(as_problem(outcome))
        return self._json(outcome)

    async def _bulk_call(self, rows: builtins.list[dict[str, Any]]) -> dict[str, Any]:
        try:
            body = BulkIn.model_validate({"urls": rows})
        except pydantic.ValidationError as exc:
            raise _from_validation(exc) from None
        outcomes = await self._create(body.urls)
        return bulk_out(outcomes, self._url).model_dump(mode="json")

    async def _owned(self, code: str, domain: str | None) -> Link:
        try:
            return await self.service.owned(
                (domain or "").lower(),
                code,
                self.principal.subject,
                admin=self.principal.can("shortener:admin"),
            )
        except (LookupError, NotOwner):
            raise _from_problem(NotFound("link", code)) from None
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc

    async def get(self, code: str, domain: str | None = None) -> dict[str, Any]:
        link = await self._owned(code, domain)
        fresh = await self.service.get(link.domain, link.short_code)
        return self._json(fresh or link)

    async def update(
        self, code: str, *, domain: str | None = None, **changes: Any
    ) -> dict[str, Any]:
        try:
            body = UpdateIn.model_validate(changes)
        except pydantic.ValidationError as exc:
            raise _from_validation(exc) from None
        link = await self._owned(code, domain)
        try:
            values = changes_of(body)
        except Problem as exc:
            raise _from_problem(exc) from None
        try:
            return self._json(await self.service.update(link, values))
        except LinkError as exc:
            raise _from_problem(link_error(exc)) from None
        except LookupError:
            raise _from_problem(NotFound("link", code)) from None
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc

    async def delete(self, code: str, domain: str | None = None) -> bool:
        link = await self._owned(code, domain)
        try:
            return await self.service.delete(link)
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc

    async def list(
        self,
        limit: int = 50,
        cursor: str | None = None,
        sort: Sort = "created",
        order: Order = "desc",
        search: str = "",
        *,
        domain: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE:
            raise _field("limit", f"between 1 and {MAX_PAGE}")
        if sort not in ("created", "clicks"):
            raise _field("sort", "created or clicks")
        if order not in ("asc", "desc"):
            raise _field("order", "asc or desc")
        who: str | None = self.principal.subject
        if owner is not None:
            if not self.principal.can("shortener:admin"):
                raise _from_problem(
                    Problem(403, "forbidden", "listing another owner's links needs shortener:admin")
                )
            who = owner
        descending = order == "desc"
        try:
            after = decode_cursor(cursor, sort, descending) if cursor else None
        except Problem as problem:
            raise _from_problem(problem) from None
        try:
            page = await self.service.page(
                who,
                limit=limit + 1,
                sort=sort,
                descending=descending,
                after=after,
                search=search,
                domain=domain.lower() if domain is not None else None,
            )
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc
        more = len(page) > limit
        page = page[:limit]
        return {
            "items": [self._json(link) for link in page],
            "next_cursor": encode_cursor(sort, descending, page[-1]) if more and page else None,
        }

    async def analytics(
        self,
        code: str,
        start: date | None = None,
        end: date | None = None,
        granularity: Granularity = "day",
        *,
        domain: str | None = None,
        include_bots: bool = False,
    ) -> dict[str, Any]:
        link = await self._owned(code, domain)
        recorder = self.service.recorder
        if recorder is None:
            raise _from_problem(
                Problem(404, "analytics-disabled", "click analytics are turned off here")
            )
        if start and end and end < start:
            raise _field("end_date", "before start_date")
        try:
            report = await recorder.report(
                link.domain,
                link.short_code,
                start=start,
                end=end,
                granularity=granularity,
                include_bots=include_bots,
            )
        except FieldError as exc:
            raise _field(exc.field, exc.message) from None
        except BackendUnavailable as exc:
            raise _unavailable(exc) from exc
        return {**report, "short_code": link.short_code, "domain": link.domain or None}

    async def aclose(self) -> None:
        return None  # the service belongs to its runtime


def _ms(when: datetime | None) -> int | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _field(field: str, message: str) -> ShortenerClientError:
    return _from_problem(
        Problem(
            422,
            "validation-error",
            f"{field}: {message}",
            errors=[{"field": field, "message": message}],
        )
    )


def _unavailable(exc: BackendUnavailable) -> ShortenerClientError:
    return _from_problem(Problem(503, "backend-unavailable", str(exc)))


# --- over HTTP -----------------------------------------------------------------------------


def _error(response: httpx.Response) -> ShortenerClientError:
    status = response.status_code
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        text = response.text.strip().replace("\n", " ")[:200]
        return ShortenerClientError(status, "about:blank", text or response.reason_phrase)
    detail = body.get("detail") or body.get("title") or response.reason_phrase
    return ShortenerClientError(status, str(body.get("type") or "about:blank"), str(detail), body)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime | date) else value


class HttpShortenerClient(ShortenerClient):
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owned = client is None
        self._http = client or httpx.AsyncClient(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        try:
            response = await self._http.request(
                method,
                self.base_url + path,
                content=orjson.dumps(body, default=_jsonable) if body is not None else None,
                params=params,
                headers=self._json_headers if body is not None else self._headers,
            )
        except httpx.TransportError as exc:
            raise ShortenerClientError(
                None, "about:blank", f"{type(exc).__name__}: {exc} ({self.base_url})"
            ) from exc
        if response.status_code >= 400:
            raise _error(response)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ShortenerClientError(
                response.status_code,
                "about:blank",
                f"unexpected response: not JSON (is {self.base_url} a tenfold server?)",
            ) from None

    @staticmethod
    def _path(code: str) -> str:
        return f"/api/v1/urls/{quote(code, safe='')}"

    @staticmethod
    def _domain(domain: str | None) -> dict[str, str] | None:
        return {"domain": domain} if domain is not None else None

    async def _shorten(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("POST", "/api/v1/urls", body))

    async def _bulk_call(self, rows: builtins.list[dict[str, Any]]) -> dict[str, Any]:
        return dict(await self._call("POST", "/api/v1/urls/bulk", {"urls": rows}))

    async def get(self, code: str, domain: str | None = None) -> dict[str, Any]:
        return dict(await self._call("GET", self._path(code), params=self._domain(domain)))

    async def update(
        self, code: str, *, domain: str | None = None, **changes: Any
    ) -> dict[str, Any]:
        out = await self._call("PUT", self._path(code), changes, params=self._domain(domain))
        return dict(out)

    async def delete(self, code: str, domain: str | None = None) -> bool:
        out = await self._call("DELETE", self._path(code), params=self._domain(domain))
        return bool(out["deleted"])

    async def list(
        self,
        limit: int = 50,
        cursor: str | None = None,
        sort: Sort = "created",
        order: Order = "desc",
        search: str = "",
        *,
        domain: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        params = {"limit": str(limit), "sort": sort, "order": order}
        optional = {"cursor": cursor, "search": search or None, "domain": domain, "owner": owner}
        params.update({k: v for k, v in optional.items() if v is not None})
        return dict(await self._call("GET", "/api/v1/urls", params=params))

    async def analytics(
        self,
        code: str,
        start: date | None = None,
        end: date | None = None,
        granularity: Granularity = "day",
        *,
        domain: str | None = None,
        include_bots: bool = False,
    ) -> dict[str, Any]:
        params: dict[str, str] = {"granularity": granularity}
        if start is not None:
            params["start_date"] = start.isoformat()
        if end is not None:
            params["end_date"] = end.isoformat()
        if domain is not None:
            params["domain"] = domain
        if include_bots:
            params["include_bots"] = "true"
        path = f"/api/v1/analytics/{quote(code, safe='')}"
        return dict(await self._call("GET", path, params=params))

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()
