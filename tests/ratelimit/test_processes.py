"""Two server processes sharing one Redis and one PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tenfold.kernel.auth import KeyStore
from tenfold.kernel.sql import create_engine
from tests.backends import REDIS_URL, free_port, wait_ready

# Two processes share counters only through Redis: the scale-out stack.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("stack", ["scale"], indirect=True)]


@pytest.fixture
async def two_servers(stack: dict[str, Any], tmp_path: Any) -> AsyncIterator[tuple[list[str], str]]:
    engine = create_engine(stack["database_url"])
    _, key = await KeyStore(engine).create("test", ["*"])
    await engine.dispose()
    env = os.environ | {
        "TENFOLD_DATA_DIR": str(tmp_path / "data"),
        "TENFOLD_DATABASE_URL": stack["database_url"],
        "TENFOLD_REDIS_URL": REDIS_URL,
        "TENFOLD_REDIS_PREFIX": stack["redis_prefix"],
        "TENFOLD_SECRET_KEY": stack["secret_key"],
        "TENFOLD_LOG_LEVEL": "warning",
        "TENFOLD_RATELIMIT_EVENTS_SAMPLE": "0",
    }
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "tenfold.app:build_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        procs.append(subprocess.Popen(cmd, env=env))  # noqa: ASYNC220 - starting is instant
        urls.append(f"http://127.0.0.1:{port}")
    try:
        await asyncio.gather(*(wait_ready(u, p) for u, p in zip(urls, procs, strict=True)))
        yield urls, key
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


async def test_exactly_the_limit_is_admitted_across_processes(
    two_servers: tuple[list[str], str],
) -> None:
    (a, b), key = two_servers
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        r = await client.post(
            f"{a}/api/v1/policies",
            json={
                "name": "hundred",
                "algorithm": "sliding_window",
                "rate_limit": 100,
                "time_window": 60,
                "applies_to_all": True,
            },
        )
        assert r.status_code == 201
        policy_id = r.json()["policy_id"]
        body = {"client_id": "shared", "api_key": "", "resource": "/"}

        # the new policy reaches the other process through pub/sub within a second
        deadline = time.monotonic() + 1.0
        while True:
            seen = await client.get(f"{b}/api/v1/ratelimit/status", params={"client_id": "x"})
            if seen.json()["policies"]:
                break
            assert time.monotonic() < deadline, "policy did not reach the second process in 1 s"
            await asyncio.sleep(0.01)

        async def one(i: int) -> bool:
            url = a if i % 2 else b
            r = await client.post(f"{url}/api/v1/ratelimit/check", json=body)
            assert r.status_code == 200, r.text
            return bool(r.json()["allowed"])

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert sum(results) == 100

        # an update reaches both processes, too
        await client.patch(f"{b}/api/v1/policies/{policy_id}", json={"rate_limit": 150})
        deadline = time.monotonic() + 1.0
        while True:
            r = await client.post(f"{a}/api/v1/ratelimit/check", json=body)
            if r.json()["limit"] == 150:
                break
            assert time.monotonic() < deadline, "update did not reach the first process in 1 s"
            await asyncio.sleep(0.01)
