"""Policy hierarchy through the HTTP API: every matching policy, tiers, assignments, shadow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tenfold.kernel.clock import ManualClock
from tests.conftest import make_settings, serve_app


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Api:
    def __init__(self, client: httpx.AsyncClient, key: str) -> None:
        self.client, self.key = client, key

    async def policy(self, **fields: Any) -> int:
        body = {"algorithm": "fixed_window", "time_window": 60} | fields
        r = await self.client.post("/api/v1/policies", json=body, headers=auth(self.key))
        assert r.status_code == 201, r.text
        return int(r.json()["policy_id"])

    async def check(self, **fields: Any) -> dict[str, Any]:
        body = {"client_id": "c1", "api_key": "", "resource": "/x"} | fields
        r = await self.client.post("/api/v1/ratelimit/check", json=body, headers=auth(self.key))
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def assign(self, policy_id: int, **fields: Any) -> httpx.Response:
        return await self.client.put(
            f"/api/v1/policies/{policy_id}/clients", json=fields, headers=auth(self.key)
        )


@pytest.fixture
async def api(stack: dict[str, Any], clock: ManualClock, admin_key_of: Any) -> Any:
    settings = make_settings(**stack)
    async with serve_app(settings, clock) as (_, client):
        yield Api(client, admin_key_of(settings))


async def test_most_restrictive_policy_decides(api: Api) -> None:
    await api.policy(name="per-client", rate_limit=5, applies_to_all=True)
    await api.policy(name="per-key", rate_limit=2, key_by=["api_key"], applies_to_all=True)
    first = await api.check(api_key="secret-1")
    assert first["policy_applied"] == "per-key" and first["remaining_quota"] == 1
    assert len(first["policies"]) == 2
    await api.check(api_key="secret-1")
    denied = await api.check(api_key="secret-1")
    assert not denied["allowed"] and denied["policy_applied"] == "per-key"
    # a policy keyed by api_key does not apply when no key is given
    keyless = await api.check()
    assert [p["name"] for p in keyless["policies"]] == ["per-client"]
    assert keyless["remaining_quota"] == 5 - 3


async def test_resource_region_and_ip_keys(api: Api) -> None:
    await api.policy(
        name="uploads-eu",
        rate_limit=1,
        key_by=["region", "resource"],
        match_resource="/upload*",
        match_region="eu",
        applies_to_all=True,
    )
    await api.policy(name="per-ip", rate_limit=3, key_by=["ip"], applies_to_all=True)
    assert (await api.check(resource="/upload/a", region="eu", ip="1.1.1.1"))["allowed"]
    again = await api.check(client_id="other", resource="/upload/a", region="eu", ip="2.2.2.2")
    assert not again["allowed"] and again["policy_applied"] == "uploads-eu"
    us = await api.check(resource="/upload/a", region="us", ip="1.1.1.1")
    assert us["allowed"] and [p["name"] for p in us["policies"]] == ["per-ip"]
    assert us["remaining_quota"] == 3 - 2  # 1.1.1.1: the first check and this one


async def test_assignment_override_priority_and_effective_range(
    api: Api, clock: ManualClock
) -> None:
    pid = await api.policy(name="std", rate_limit=2)
    assert (await api.check())["policies"] == []  # not assigned, not global
    assert (await api.assign(pid, client_ids=["c1"])).status_code == 200
    assert (await api.check())["limit"] == 2
    now = datetime.fromtimestamp(clock.now(), UTC)
    boost = await api.assign(
        pid,
        client_ids=["c1"],
        override_rate_limit=10,
        priority=2,
        effective_from=(now + timedelta(hours=1)).isoformat(),
        effective_to=(now + timedelta(hours=2)).isoformat(),
    )
    assert boost.status_code == 200, boost.text
    assert (await api.check())["limit"] == 2
    clock.advance(3600)
    assert (await api.check())["limit"] == 10
    clock.advance(3600)
    assert (await api.check())["limit"] == 2
    clash = await api.assign(
        pid,
        client_ids=["c1"],
        priority=2,
        effective_from=(now + timedelta(minutes=90)).isoformat(),
    )
    assert clash.status_code == 422
    assert clash.json()["errors"][0]["field"] == "effective_from"


async def test_tiers_are_policy_groups(api: Api) -> None:
    await api.policy(name="free-minute", rate_limit=1, tier="free")
    await api.policy(name="pro-minute", rate_limit=100, tier="pro")
    r = await api.client.put(
        "/api/v1/tiers/free/clients", json={"client_ids": ["c1"]}, headers=auth(api.key)
    )
    assert r.status_code == 200
    assert (await api.check())["policy_applied"] == "free-minute"
    assert not (await api.check())["allowed"]
    await api.client.put(
        "/api/v1/tiers/pro/clients", json={"client_ids": ["c1"]}, headers=auth(api.key)
    )
    upgraded = await api.check()
    assert upgraded["allowed"] and upgraded["policy_applied"] == "pro-minute"


async def test_shadow_policy_counts_but_never_denies(api: Api) -> None:
    await api.policy(name="trial", rate_limit=1, shadow=True, applies_to_all=True)
    results = [await api.check() for _ in range(3)]
    assert all(r["allowed"] for r in results)
    assert [p["allowed"] for p in results[2]["policies"]] == [False]
    metrics = (await api.client.get("/metrics")).text
    assert 'tenfold_ratelimit_decisions_total{outcome="shadow_denied",policy="trial"}' in metrics


async def test_update_and_delete_take_effect_at_once(api: Api) -> None:
    pid = await api.policy(name="p", rate_limit=1, applies_to_all=True)
    await api.check()
    assert not (await api.check())["allowed"]
    r = await api.client.patch(
        f"/api/v1/policies/{pid}", json={"rate_limit": 5}, headers=auth(api.key)
    )
    assert r.status_code == 200 and r.json()["burst_capacity"] == 5 and r.json()["version"] == 2
    assert (await api.check())["allowed"]
    r = await api.client.delete(f"/api/v1/policies/{pid}", headers=auth(api.key))
    assert r.status_code == 204
    assert (await api.check())["policies"] == []
    missing = await api.client.get(f"/api/v1/policies/{pid}", headers=auth(api.key))
    assert missing.status_code == 404
    assert missing.json()["type"] == "urn:tenfold:problem:policy-not-found"


async def test_status_reports_usage_without_consuming(api: Api) -> None:
    pid = await api.policy(name="p", rate_limit=4, applies_to_all=True)
    await api.check()
    for _ in range(3):
        r = await api.client.get(
            "/api/v1/ratelimit/status", params={"client_id": "c1"}, headers=auth(api.key)
        )
        entry = r.json()["policies"][0]
        assert entry == entry | {"policy_id": pid, "current_usage": 1, "remaining_quota": 3}


async def test_bad_checks(api: Api) -> None:
    await api.policy(name="p", rate_limit=4, applies_to_all=True)
    for body, field in (
        ({"weight": 0}, "weight"),
        ({"weight": 5}, "weight"),
        ({"weight": "2"}, "weight"),
        ({"client_id": ""}, "client_id"),
        ({"async": "yes"}, "async"),
        ({"extra": 1}, "extra"),
    ):
        payload = {"client_id": "c1", "api_key": "", "resource": "/x"} | body
        r = await api.client.post("/api/v1/ratelimit/check", json=payload, headers=auth(api.key))
        assert r.status_code == 422, body
        assert r.json()["errors"][0]["field"] == field
    missing = await api.client.post(
        "/api/v1/ratelimit/check", json={"client_id": "c1"}, headers=auth(api.key)
    )
    assert missing.json()["errors"][0]["field"] == "api_key"
    assert (await api.check())["remaining_quota"] == 3  # nothing was consumed by bad checks
    unknown = await api.assign(999, client_ids=["c1"])
    assert unknown.status_code == 404
