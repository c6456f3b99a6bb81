from __future__ import annotations

from typing import Any

import pytest

from tenfold.kernel.clock import ManualClock
from tests.conftest import make_settings, serve_app


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


POLICY = {"name": "p1", "algorithm": "token_bucket", "rate_limit": 3, "time_window": 60}


async def test_check_applies_policy_then_denies_with_exact_retry(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(**stack)
    async with serve_app(settings, clock) as (_, client):
        key = admin_key_of(settings)
        created = await client.post(
            "/api/v1/policies", json=POLICY | {"applies_to_all": True}, headers=auth(key)
        )
        assert created.status_code == 201, created.text
        body = {"client_id": "c1", "api_key": "k1", "resource": "/videos"}
        answers = [
            (await client.post("/api/v1/ratelimit/check", json=body, headers=auth(key))).json()
            for _ in range(4)
        ]
        assert [a["allowed"] for a in answers] == [True, True, True, False]
        assert [a["remaining_quota"] for a in answers] == [2, 1, 0, 0]
        assert answers[3]["retry_after"] == 20.0  # one token per 20 s
        assert answers[3]["policy_applied"] == "p1"
        clock.advance(20)
        again = await client.post("/api/v1/ratelimit/check", json=body, headers=auth(key))
        assert again.json()["allowed"] is True
        other = await client.post(
            "/api/v1/ratelimit/check", json=body | {"client_id": "c2"}, headers=auth(key)
        )
        assert other.json()["remaining_quota"] == 2


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"algorithm": "leaky"}, "algorithm"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"time_window": 0}, "time_window"),
        ({"time_window": 86_401}, "time_window"),
        ({"burst_capacity": 2}, "burst_capacity"),
        ({"key_by": ["user"]}, "key_by"),
    ],
)
async def test_bad_policy_is_422_naming_the_field_and_writes_nothing(
    tmp_path: Any, patch: dict[str, Any], field: str, admin_key_of: Any, sqlite_template: Any
) -> None:
    url = sqlite_template.clone(tmp_path / "db.sqlite")
    settings = make_settings(data_dir=str(tmp_path), database_url=url)
    async with serve_app(settings) as (_, client):
        key = admin_key_of(settings)
        bad = await client.post("/api/v1/policies", json=POLICY | patch, headers=auth(key))
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        assert bad.json()["errors"][0]["field"] == field
        listed = await client.get("/api/v1/policies", headers=auth(key))
        assert listed.json()["policies"] == []
