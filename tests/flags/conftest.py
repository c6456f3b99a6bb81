from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tenfold.kernel.clock import ManualClock
from tenfold.settings import Settings
from tests.conftest import make_settings, serve_app


@dataclass
class FlagsApi:
    app: Any
    http: httpx.AsyncClient
    admin: dict[str, str]
    settings: Settings
    clock: ManualClock

    @property
    def service(self) -> Any:
        return self.app.state.runtime.services["flags"]

    async def create(self, key: str, **fields: Any) -> dict[str, Any]:
        body = {"flag_key": key, "flag_type": "boolean", "default_value": False, **fields}
        r = await self.http.post("/api/v1/flags", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def target(self, key: str, env: str = "production", **targeting: Any) -> httpx.Response:
        return await self.http.put(
            f"/api/v1/flags/{key}/environments/{env}", json=targeting, headers=self.admin
        )

    async def evaluate(
        self, keys: list[str] | None, ctx: dict[str, Any], env: str | None = "production"
    ) -> dict[str, dict[str, Any]]:
        body: dict[str, Any] = {"user_context": ctx}
        if keys is not None:
            body["flag_keys"] = keys
        if env is not None:
            body["environment"] = env
        r = await self.http.post("/api/v1/evaluate", json=body, headers=self.admin)
        assert r.status_code == 200, r.text
        return {e["flag_key"]: e for e in r.json()["evaluations"]}

    async def key_with(self, *scopes: str) -> dict[str, str]:
        _, plaintext = await self.app.state.runtime.keys.create("test", list(scopes))
        return {"X-API-Key": plaintext}


@pytest.fixture
def flags_api(stack: dict[str, str], admin_key_of: Callable[[Settings], str]) -> Callable[..., Any]:
    """An app serving the flags API on each stack, with its admin key."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def open_api(**overrides: Any) -> AsyncIterator[FlagsApi]:
        clock = ManualClock()
        settings = make_settings(**stack, **{"services": ["flags"], **overrides})
        async with serve_app(settings, clock) as (app, http):
            admin = {"X-API-Key": admin_key_of(settings)}
            yield FlagsApi(app, http, admin, settings, clock)

    return open_api
