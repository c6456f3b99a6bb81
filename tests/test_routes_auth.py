"""Every route of the app is public by name, or demands a key with the right scope.

Walks the app built with every service: a non-public route must carry a `require(...)`
dependency, answer 401 without a key, 403 with a key of an unrelated scope, and neither with a
key holding exactly the scope it declares.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tenfold import SERVICES
from tenfold.app import App, public_paths
from tenfold.kernel.clock import ManualClock
from tests.backends import SqliteTemplate
from tests.conftest import make_settings, serve_app

BODY_METHODS = {"POST", "PUT", "PATCH"}


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    scopes: frozenset[str]  # from the require(...) dependencies
    sample_path: str  # path params filled in

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _route_contexts(app: App) -> list[Any]:
    try:  # FastAPI >= 0.13x keeps included routers lazily; this is how its OpenAPI walks them
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI flattens include_router into app.routes
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def _scopes(dependant: Any) -> Iterator[str]:
    for dep in getattr(dependant, "dependencies", ()):
        scope = getattr(dep.call, "required_scope", None)
        if scope is not None:
            yield scope
        yield from _scopes(dep)


def _sample(path: str, dependant: Any) -> str:
    for param in getattr(dependant, "path_params", ()):
        value = "1" if param.field_info.annotation is int else "x"
        path = path.replace("{" + param.name + "}", value)
        path = path.replace("{" + param.name + ":path}", value)
    assert "{" not in path, f"unfilled path parameter in {path}"
    return path


def endpoints(app: App) -> list[Endpoint]:
    found = []
    for route in _route_contexts(app):
        dependant = getattr(route, "dependant", None)
        endpoint_scope = getattr(getattr(route, "endpoint", None), "required_scope", None)
        scopes = set(_scopes(dependant))
        if endpoint_scope:  # a lean (non-FastAPI) route declares its scope on the endpoint
            scopes.add(endpoint_scope)
        for method in sorted(route.methods or ()):
            if method == "HEAD" and "GET" in route.methods:
                continue
            found.append(
                Endpoint(method, route.path, frozenset(scopes), _sample(route.path, dependant))
            )
    return found


@pytest.fixture
def settings(tmp_path: Path, sqlite_template: SqliteTemplate) -> Any:
    return make_settings(
        data_dir=str(tmp_path / "data"),
        database_url=sqlite_template.clone(tmp_path / "db" / "tenfold.db"),
        services=list(SERVICES),
        ratelimit_anonymous_limit=100_000,  # this test makes many anonymous calls
        flags_stream_max_seconds=0,  # the change stream sends its state and ends
    )


async def test_every_route_is_public_or_requires_a_scope(settings: Any, clock: ManualClock) -> None:
    async with serve_app(settings, clock) as (app, client):
        public = public_paths(app)
        routes = endpoints(app)
        keys = app.state.runtime.keys
        _, unrelated = await keys.create("unrelated", ["nothing:read"])
        protected = [e for e in routes if e.path not in public]
        assert len(protected) >= 10  # the walk found the services' routes
        assert {e.path for e in routes} >= public - {"/docs/oauth2-redirect"}

        failures = []
        for e in protected:
            if not e.scopes:
                failures.append(f"{e}: not public and has no require(...) dependency")
                continue
            body: dict[str, Any] | None = {} if e.method in BODY_METHODS else None
            anonymous = await client.request(e.method, e.sample_path, json=body)
            if anonymous.status_code != 401:
                failures.append(f"{e}: {anonymous.status_code} without a key, expected 401")
            wrong = await client.request(
                e.method, e.sample_path, headers={"X-API-Key": unrelated}, json=body
            )
            if wrong.status_code != 403:
                failures.append(f"{e}: {wrong.status_code} with scope nothing:read, expected 403")
            _, right = await keys.create("exact", sorted(e.scopes))
            allowed = await client.request(
                e.method, e.sample_path, headers={"X-API-Key": right}, json=body
            )
            if allowed.status_code in (401, 403):
                failures.append(
                    f"{e}: {allowed.status_code} with its own scopes {sorted(e.scopes)}"
                )

        for e in routes:
            if e.path in public:
                answer = await client.request(e.method, e.sample_path)
                if answer.status_code in (401, 403):
                    failures.append(f"{e}: public but answered {answer.status_code}")
    assert failures == []
