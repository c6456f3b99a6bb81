"""The HTTP worker protocol: claim, heartbeat, complete, fail, fenced leases, long-polls; and a
Node.js worker beside a Python worker on one real server, finishing one submitted batch."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import tenfold.tasks.api as tasks_api
from tenfold.kernel.auth import KeyStore
from tenfold.kernel.clock import ManualClock
from tenfold.kernel.sql import create_engine
from tenfold.tasks import TaskRegistry
from tenfold.tasks.service import TaskService
from tenfold.tasks.stores.notify import LocalNotifier, Notifier, PgNotifier
from tenfold.tasks.stores.sql import SqlTaskStore
from tenfold.tasks.worker import TaskContext, Worker
from tests.backends import free_port, wait_ready
from tests.conftest import make_settings, serve_app
from tests.tasks.test_api import Api, problem_field, until

ROOT = Path(__file__).resolve().parents[2]
NODE_WORKER = ROOT / "examples" / "node-worker" / "worker.mjs"


@pytest.fixture
async def api(stack: dict[str, Any], clock: ManualClock, admin_key_of: Any) -> AsyncIterator[Api]:
    # Only the task queue: other services' own tasks would add a worker to the lists checked.
    settings = make_settings(**stack, services=["tasks"])
    async with serve_app(settings, clock) as (app, client):
        yield Api(client, admin_key_of(settings), app, clock)


def at(api: Api, seconds: float = 0) -> str:
    when = datetime.fromtimestamp(api.clock.now(), UTC) + timedelta(seconds=seconds)
    return when.isoformat().replace("+00:00", "Z")


# --- the protocol --------------------------------------------------------------------------


async def test_claim_heartbeat_complete(api: Api) -> None:
    low = await api.submit(priority=9, payload={"n": 1})
    high = await api.submit(priority=1, payload={"n": 2})
    await api.submit(task_type="t.other")
    claimed = await api.claim(max_tasks=5, lease_seconds=30)
    assert [t["task_id"] for t in claimed] == [high, low]  # most urgent first; t.other not ours
    first = claimed[0]
    assert first["task_type"] == "t.noop" and first["payload"] == {"n": 2}
    assert first["attempt"] == 1 and first["max_retries"] == 3 and first["queue"] == "default"
    assert first["lease_expires_at"] == at(api, 30) and len(first["lease_token"]) >= 16
    assert await api.claim() == []

    api.clock.advance(20)
    beat = await api.post(
        f"/api/v1/tasks/{high}/heartbeat",
        {"lease_token": first["lease_token"], "lease_seconds": 120, "worker_id": "http-1"},
    )
    assert beat.status_code == 200, beat.text
    assert beat.json() == {"lease_expires_at": at(api, 120), "cancel_requested": False}
    task = await api.task(high)
    assert task["status"] == "running" and task["worker_id"] == "http-1"
    assert task["lease_expires_at"] == at(api, 120)

    done = await api.post(
        f"/api/v1/tasks/{high}/complete",
        {"lease_token": first["lease_token"], "result": {"answer": 42}},
    )
    assert done.status_code == 200 and done.json() == {"task_id": high, "status": "succeeded"}
    task = await api.task(high)
    assert task["status"] == "succeeded" and task["result"] == {"answer": 42}
    assert task["completed_at"] == at(api)
    history = (await api.get(f"/api/v1/tasks/{high}/history")).json()["history"]
    assert [
        (h["attempt"], h["status"], h["worker_id"], h["execution_time_ms"]) for h in history
    ] == [(1, "succeeded", "http-1", 20_000)]

    # the lease ended with the completion: the token is stale now
    for path, body in [
        ("complete", {"lease_token": first["lease_token"], "result": 0}),
        ("heartbeat", {"lease_token": first["lease_token"]}),
        ("fail", {"lease_token": first["lease_token"], "error": "late"}),
    ]:
        r = await api.post(f"/api/v1/tasks/{high}/{path}", body)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["type"] == "urn:tenfold:problem:lease-lost"
    assert (await api.task(high))["result"] == {"answer": 42}

    wrong = await api.post(f"/api/v1/tasks/{low}/complete", {"lease_token": "not-the-token"})
    assert wrong.status_code == 409 and await api.status(low) == "running"
    workers = (await api.get("/api/v1/workers")).json()["workers"]
    assert [(w["worker_id"], w["pool_id"], w["task_types"]) for w in workers] == [
        ("http-1", "http", ["t.noop"])
    ]


async def test_fail_retries_with_backoff_then_dead(api: Api) -> None:
    task_id = await api.submit(max_retries=1)
    (first,) = await api.claim()
    r = await api.post(
        f"/api/v1/tasks/{task_id}/fail",
        {"lease_token": first["lease_token"], "error": "ECONNRESET", "traceback": "at x.js:1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "scheduled"
    retry_at = datetime.fromisoformat(r.json()["retry_at"])
    now = datetime.fromtimestamp(api.clock.now(), UTC)
    # the default policy: 1 s base, full jitter on the upper half
    assert timedelta(seconds=0.5) <= retry_at - now <= timedelta(seconds=1)
    task = await api.task(task_id)
    assert task["status"] == "scheduled" and task["error_message"] == "ECONNRESET"
    assert task["traceback"] == "at x.js:1"
    assert await api.claim() == []  # backing off
    api.clock.advance(1)
    (second,) = await api.claim()
    assert second["attempt"] == 2 and second["lease_token"] != first["lease_token"]
    stale = await api.post(
        f"/api/v1/tasks/{task_id}/fail", {"lease_token": first["lease_token"], "error": "x"}
    )
    assert stale.status_code == 409
    r = await api.post(
        f"/api/v1/tasks/{task_id}/fail",
        {"lease_token": second["lease_token"], "error": "ECONNRESET again"},
    )
    assert r.json() == {"task_id": task_id, "status": "dead", "retry_at": None}
    history = (await api.get(f"/api/v1/tasks/{task_id}/history")).json()["history"]
    assert [(h["attempt"], h["status"]) for h in history] == [(1, "failed"), (2, "failed")]
    dlq = (await api.get("/api/v1/dlq")).json()["tasks"]
    assert [t["task_id"] for t in dlq] == [task_id]

    hopeless = await api.submit(max_retries=5)
    (claim,) = await api.claim()
    r = await api.post(
        f"/api/v1/tasks/{hopeless}/fail",
        {"lease_token": claim["lease_token"], "error": "bad\x00payload", "retryable": False},
    )
    assert r.json()["status"] == "dead"  # not retryable: straight to the dead letters
    assert (await api.task(hopeless))["error_message"] == "bad\ufffdpayload"  # NUL replaced


async def test_an_expired_lease_is_requeued_and_its_token_fenced(api: Api) -> None:
    task_id = await api.submit()
    (lost,) = await api.claim(worker_id="crashed", lease_seconds=5)
    api.clock.advance(4)
    assert await api.service.sweep() == 0  # still within the lease
    api.clock.advance(2)
    assert await api.service.sweep() == 1
    assert await api.status(task_id) == "scheduled"
    (again,) = await api.claim(worker_id="healthy")
    assert again["attempt"] == 2
    late = await api.post(
        f"/api/v1/tasks/{task_id}/complete", {"lease_token": lost["lease_token"], "result": 1}
    )
    assert late.status_code == 409 and late.json()["type"].endswith("lease-lost")
    ok = await api.post(
        f"/api/v1/tasks/{task_id}/complete", {"lease_token": again["lease_token"], "result": 2}
    )
    assert ok.status_code == 200
    task = await api.task(task_id)
    assert task["result"] == 2 and task["worker_id"] == "healthy"
    history = (await api.get(f"/api/v1/tasks/{task_id}/history")).json()["history"]
    assert [(h["attempt"], h["status"], h["worker_id"]) for h in history] == [
        (1, "lost", "crashed"),
        (2, "succeeded", "healthy"),
    ]


async def test_claims_route_by_type_queue_and_resources(api: Api) -> None:
    gpu = await api.submit(resources=["gpu"])
    mail = await api.submit(queue="mail", task_type="t.mail")
    plain = await api.submit()
    assert [t["task_id"] for t in await api.claim(max_tasks=10)] == [plain]
    assert await api.claim(task_types=["t.mail"]) == []  # wrong queue
    claimed = await api.claim(task_types=["t.mail", "t.noop"], queues=["mail"], max_tasks=10)
    assert [t["task_id"] for t in claimed] == [mail]
    claimed = await api.claim(resources=["cpu", "gpu"], worker_id="gpu-box")
    assert [t["task_id"] for t in claimed] == [gpu]


async def test_bad_protocol_input(api: Api) -> None:
    base = {"worker_id": "w", "task_types": ["t.noop"]}
    for body, field in [
        (base | {"wait_seconds": 31}, "wait_seconds"),
        (base | {"max_tasks": 0}, "max_tasks"),
        (base | {"lease_seconds": 0}, "lease_seconds"),
        (base | {"task_types": []}, "task_types"),
        ({"worker_id": "w"}, "task_types"),
        ({"task_types": ["t.noop"]}, "worker_id"),
        (base | {"queues": [""]}, "queues.0"),
        (base | {"colour": 1}, "colour"),
        (base | {"worker_id": "w\x00"}, "worker_id"),
    ]:
        r = await api.post("/api/v1/workers/claim", body)
        assert r.status_code == 422, (body, r.text)
        assert problem_field(r) == field, r.text
    task_id = await api.submit()
    (claim,) = await api.claim()
    r = await api.post(f"/api/v1/tasks/{task_id}/heartbeat", {})
    assert r.status_code == 422 and problem_field(r) == "lease_token"
    r = await api.post(f"/api/v1/tasks/{task_id}/fail", {"lease_token": claim["lease_token"]})
    assert r.status_code == 422 and problem_field(r) == "error"
    r = await api.post("/api/v1/tasks/x/heartbeat", {"lease_token": "a\x00"})
    assert r.status_code == 422 and problem_field(r) == "lease_token"
    big = {"lease_token": claim["lease_token"], "result": "x" * (256 * 1024 + 1)}
    r = await api.post(f"/api/v1/tasks/{task_id}/complete", big)
    assert r.status_code == 422 and problem_field(r) == "result"
    assert await api.status(task_id) == "running"


async def test_long_poll_wakes_when_a_task_is_submitted(
    api: Api, stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a wake-up can end this long-poll early: its fallback polling is an hour apart.
    monkeypatch.setattr(tasks_api, "POLL_SECONDS", 3600.0)
    notifier = api.service.notifier
    elsewhere: TaskService | None = None
    if isinstance(notifier, PgNotifier):
        # Submit from another "process" (its own engine): the wake-up must come by NOTIFY.
        async def listening() -> bool:
            async with api.service.store.engine.begin() as conn:
                await conn.execute(sa.text("SELECT pg_notify('tenfold_tasks', 'probe')"))
            return await notifier.wait(0.2)

        await until(listening)
        engine = create_engine(stack["database_url"])
        elsewhere = TaskService(
            SqlTaskStore(engine), clock=api.clock, notifier=PgNotifier(stack["database_url"])
        )

    started = time.monotonic()
    assert await api.claim(wait_seconds=0.3) == []  # nothing comes: empty after the wait
    assert time.monotonic() - started >= 0.3

    waiting = asyncio.Event()
    original = notifier.wait

    async def wait(seconds: float) -> bool:
        waiting.set()
        return await original(seconds)

    monkeypatch.setattr(notifier, "wait", wait)
    started = time.monotonic()
    poll = asyncio.create_task(api.claim(wait_seconds=25))
    await asyncio.wait_for(waiting.wait(), 10)
    if elsewhere is not None:
        (done,) = await elsewhere.submit([{"task_type": "t.noop"}])
        task_id = done.task_id
        await elsewhere.store.engine.dispose()
    else:
        task_id = await api.submit()
    claimed = await asyncio.wait_for(poll, 15)
    assert [t["task_id"] for t in claimed] == [task_id]
    assert time.monotonic() - started < 15


# --- a Node.js worker and a Python worker on one server ------------------------------------


def spawn(cmd: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(cmd, env=env)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=out)


@pytest.fixture
async def server(stack: dict[str, Any], tmp_path: Path) -> AsyncIterator[tuple[str, str, str]]:
    """A real `tenfold serve`-like process: (url, admin key, worker key)."""
    engine = create_engine(stack["database_url"])
    keys = KeyStore(engine)
    _, admin = await keys.create("test admin", ["*"])
    _, worker = await keys.create("node worker", ["tasks:write"])
    await engine.dispose()
    env = os.environ | {
        "TENFOLD_DATA_DIR": str(tmp_path / "data"),
        "TENFOLD_DATABASE_URL": stack["database_url"],
        "TENFOLD_REDIS_URL": stack["redis_url"],
        "TENFOLD_REDIS_PREFIX": stack.get("redis_prefix", "tf"),
        "TENFOLD_LOG_LEVEL": "warning",
        **({"TENFOLD_SECRET_KEY": stack["secret_key"]} if "secret_key" in stack else {}),
        "TENFOLD_RATELIMIT_EVENTS_SAMPLE": "0",
        "TENFOLD_SERVICES": "ratelimit,tasks",  # no other service's own tasks in the worker lists
    }
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "tenfold.app:build_app", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log_path = tmp_path / "server.log"
    proc = spawn(cmd, env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_ready(url, proc)
        except RuntimeError as exc:
            pytest.fail(f"{exc}:\n{log_path.read_text()}")
        yield url, admin, worker
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the server did not stop within 30 s:\n{log_path.read_text()}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_node_and_python_workers_finish_one_batch(
    server: tuple[str, str, str], stack: dict[str, Any], tmp_path: Path
) -> None:
    url, admin, worker_key = server
    log_path = tmp_path / "node.log"
    env = os.environ | {
        "TENFOLD_URL": url,
        "TENFOLD_API_KEY": worker_key,
        "TASK_TYPES": "node.reverse,node.fail,node.sleep",
        "WORKER_ID": "node-test",
        "WAIT_SECONDS": "5",
        "LEASE_SECONDS": "30",
    }
    node = spawn(["node", str(NODE_WORKER)], env, log_path)

    registry = TaskRegistry()

    @registry.task("py.upper")
    async def upper(text: str) -> dict[str, str]:
        return {"text": text.upper(), "by": "python"}

    engine = create_engine(stack["database_url"])
    store = SqlTaskStore(engine)
    upstream: dict[str, list[str]] = {}  # task id -> its dependencies' states when it ran

    @registry.task("py.sum")
    async def total(values: list[int], ctx: TaskContext) -> int:
        me = await store.get(ctx.task_id)
        assert me is not None
        states = [await store.get(d) for d in me.dependencies]
        upstream[ctx.task_id] = [t.status.value if t else "missing" for t in states]
        return sum(values)

    notifier: Notifier = (
        PgNotifier(stack["database_url"])
        if engine.dialect.name == "postgresql"
        else LocalNotifier()
    )
    if isinstance(notifier, PgNotifier):
        await notifier.start()
    python = Worker(store, registry, notifier=notifier, poll_seconds=0.2, worker_id="py-test")
    python_run = asyncio.create_task(python.run())
    headers = {"Authorization": f"Bearer {admin}"}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            batch: list[dict[str, Any]] = [
                {"ref": "up", "task_type": "py.upper", "payload": {"text": "hello"}},
                {
                    "ref": "rev",
                    "task_type": "node.reverse",
                    "payload": {"text": "stressed"},
                    "dependencies": ["up"],
                },
                {
                    "ref": "sum",
                    "task_type": "py.sum",
                    "payload": {"values": [1, 2, 3]},
                    "dependencies": ["rev"],
                },
                {"ref": "bad", "task_type": "node.fail", "payload": {"message": "nope"}},
            ]
            batch += [
                {"task_type": "node.reverse", "payload": {"text": f"abc{i}"}} for i in range(8)
            ]
            batch += [{"task_type": "py.sum", "payload": {"values": [i, i]}} for i in range(8)]
            r = await client.post("/api/v1/tasks/batch", json={"tasks": batch})
            assert r.status_code == 201, r.text
            ids = r.json()["task_ids"]

            async def finished() -> list[dict[str, Any]]:
                tasks = [(await client.get(f"/api/v1/tasks/{i}")).json() for i in ids]
                done = all(t["status"] in ("succeeded", "dead") for t in tasks)
                return tasks if done else []

            tasks = await until(finished, 60)
            by_id = dict(zip(ids, tasks, strict=True))
            up, rev, sum_, bad = (by_id[i] for i in ids[:4])
            assert up["result"] == {"text": "HELLO", "by": "python"}
            assert rev["result"] == {"text": "desserts", "by": "node"}
            assert sum_["result"] == 6
            assert bad["status"] == "dead" and bad["attempt"] == 1  # NonRetryable in Node
            assert bad["error_message"] == "NonRetryable: nope"
            assert "worker.mjs" in bad["traceback"]
            for t in tasks[4:12]:
                n = t["payload"]["text"][3:]
                assert t["result"] == {"text": f"{n}cba", "by": "node"}
            assert [t["result"] for t in tasks[12:]] == [2 * i for i in range(8)]
            for t in tasks:
                expected = "node-test" if t["task_type"].startswith("node.") else "py-test"
                assert t["worker_id"] == expected, t

            # the workflow ran in order across the two languages: the Python task ran only
            # after the Node task it depends on had succeeded
            assert upstream[sum_["task_id"]] == ["succeeded"]
            assert rev["dependencies"] == [up["task_id"]] and rev["attempt"] == 1

            workers = (await client.get("/api/v1/workers")).json()["workers"]
            pools = {w["worker_id"]: w["pool_id"] for w in workers}
            assert pools == {"node-test": "http", "py-test": "default"}

            # SIGTERM: the Node worker finishes the task in hand, reports it, and exits 0
            r = await client.post(
                "/api/v1/tasks", json={"task_type": "node.sleep", "payload": {"ms": 1500}}
            )
            slow = r.json()["task_id"]

            async def in_hand() -> bool:  # the worker has it (not just the server's claim)
                return f'"event":"running","worker_id":"node-test","task_id":"{slow}"' in (
                    log_path.read_text()
                )

            await until(in_hand, 30)
            node.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(node.wait, 20)
            assert code == 0, log_path.read_text()
            task = (await client.get(f"/api/v1/tasks/{slow}")).json()
            assert task["status"] == "succeeded" and task["result"] == {"slept": 1500}
            assert '"event":"stopped"' in log_path.read_text()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
        python.stop()
        await asyncio.wait_for(python_run, 15)
        await notifier.close()
        await engine.dispose()
