"""Redis killed mid-run and restarted: each policy follows its failure mode; nothing is lost."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tenfold.kernel.clock import ManualClock
from tenfold.kernel.telemetry import REGISTRY
from tests.backends import IN_CI, free_port
from tests.conftest import make_settings, serve_app


class RedisServer:
    """A private redis-server the test can kill and restart."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited") from None
                time.sleep(0.02)  # polls the child's readiness; the loop exits on PONG
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is needed for the outage test")
        pytest.skip("redis-server not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc and server.proc.poll() is None:
        server.kill()


async def test_failure_modes_follow_each_policy_and_recover(
    private_redis: RedisServer,
    tmp_path: Path,
    sqlite_template: Any,
    admin_key_of: Any,
    clock: ManualClock,
) -> None:
    settings = make_settings(
        data_dir=str(tmp_path / "data"),
        database_url=sqlite_template.clone(tmp_path / "db.sqlite"),
        redis_url=private_redis.url,
        redis_prefix="outage",
        ratelimit_replicas=2,
    )
    async with serve_app(settings, clock) as (_, client):
        key = {"X-API-Key": admin_key_of(settings)}
        for name, mode in (("open", "fail_open"), ("closed", "fail_closed"), ("local", "local")):
            r = await client.post(
                "/api/v1/policies",
                json={
                    "name": name,
                    "algorithm": "fixed_window",
                    "rate_limit": 4,
                    "time_window": 60,
                    "failure_mode": mode,
                    "tier": name,
                },
                headers=key,
            )
            assert r.status_code == 201
            await client.put(
                f"/api/v1/tiers/{name}/clients", json={"client_ids": [name]}, headers=key
            )

        async def check(client_id: str) -> dict[str, Any]:
            body = {"client_id": client_id, "api_key": "", "resource": "/"}
            r = await client.post("/api/v1/ratelimit/check", json=body, headers=key)
            assert r.status_code == 200, r.text
            return dict(r.json())

        def transitions(to: str) -> float:
            name = "tenfold_ratelimit_backend_transitions_total"
            return REGISTRY.get_sample_value(name, {"to": to}) or 0.0

        degraded_before, healthy_before = transitions("degraded"), transitions("healthy")
        assert (await check("local"))["remaining_quota"] == 3  # counted in Redis
        private_redis.kill()
        opened = [await check("open") for _ in range(6)]
        assert all(r["allowed"] and r["degraded"] for r in opened)
        closed = await check("closed")
        assert not closed["allowed"] and closed["retry_after"] > 0
        # local: the rate divided among 2 replicas -> 2 per window in this process
        local = [(await check("local"))["allowed"] for _ in range(3)]
        assert local == [True, True, False]
        assert transitions("degraded") == degraded_before + 1
        assert "tenfold_ratelimit_backend_degraded 1.0" in (await client.get("/metrics")).text

        private_redis.start()  # empty: Redis kept nothing on disk
        clock.advance(1.5)  # past the breaker's cool-down
        back = await check("closed")
        assert back["allowed"] and not back["degraded"]
        assert transitions("healthy") == healthy_before + 1
        listed = (await client.get("/api/v1/policies", headers=key)).json()["policies"]
        assert sorted(p["name"] for p in listed) == ["closed", "local", "open"]
