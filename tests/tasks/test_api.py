"""The task queue's HTTP API on both stacks: submit, inspect, cancel, retry, statistics,
pause/resume, the dead letter queue, dependency graphs, and every kind of bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from tenfold.kernel.clock import ManualClock
from tenfold.tasks import TaskRegistry
from tenfold.tasks.service import TaskService
from tenfold.tasks.worker import Worker
from tests.conftest import make_settings, serve_app

T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T]], seconds: float = 15.0) -> T:
    """Poll `probe` until it returns something truthy; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {seconds} s"
        await asyncio.sleep(0.01)


class Api:
    def __init__(self, client: httpx.AsyncClient, key: str, app: Any, clock: ManualClock) -> None:
        self.client, self.clock = client, clock
        self.keys = app.state.runtime.keys
        self.service: TaskService = app.state.runtime.services["tasks"]
        self.headers = {"Authorization": f"Bearer {key}"}

    async def post(self, path: str, body: Any = None) -> httpx.Response:
        return await self.client.post(path, json=body, headers=self.headers)

    async def raw(self, path: str, content: bytes) -> httpx.Response:
        headers = self.headers | {"Content-Type": "application/json"}
        return await self.client.post(path, content=content, headers=headers)

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(path, params=params, headers=self.headers)

    async def submit(self, **fields: Any) -> str:
        r = await self.post("/api/v1/tasks", {"task_type": "t.noop", "payload": {}} | fields)
        assert r.status_code == 201, r.text
        return str(r.json()["task_id"])

    async def task(self, task_id: str) -> dict[str, Any]:
        r = await self.get(f"/api/v1/tasks/{task_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def status(self, task_id: str) -> str:
        return str((await self.task(task_id))["status"])

    async def claim(self, **fields: Any) -> list[dict[str, Any]]:
        body = {"worker_id": "http-1", "task_types": ["t.noop"]} | fields
        r = await self.post("/api/v1/workers/claim", body)
        assert r.status_code == 200, r.text
        return list(r.json()["tasks"])

    def worker(self, registry: TaskRegistry, **options: Any) -> Worker:
        return Worker(
            self.service.store,
            registry,
            notifier=self.service.notifier,
            clock=self.clock,
            poll_seconds=0.05,
            **options,
        )


@pytest.fixture
async def api(stack: dict[str, Any], clock: ManualClock, admin_key_of: Any) -> AsyncIterator[Api]:
    # Only the task queue: other services' own tasks would add a worker to the lists checked.
    settings = make_settings(**stack, services=["tasks"])
    async with serve_app(settings, clock) as (app, client):
        yield Api(client, admin_key_of(settings), app, clock)


@pytest.fixture
async def running_worker(api: Api) -> AsyncIterator[Callable[[TaskRegistry], Worker]]:
    """Start in-process workers; each is stopped and awaited when the test ends."""
    started: list[tuple[Worker, asyncio.Task[None]]] = []

    def start(registry: TaskRegistry, **options: Any) -> Worker:
        worker = api.worker(registry, **options)
        started.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, _ in started:
        worker.stop()
    for _, task in started:
        await asyncio.wait_for(task, 15)


def problem_field(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    return str(r.json()["errors"][0]["field"])


# --- submit and read -----------------------------------------------------------------------


async def test_submit_and_read_every_field(api: Api) -> None:
    dep = await api.submit()
    r = await api.post(
        "/api/v1/tasks",
        {
            "task_type": "emails.send",
            "payload": {"to": "a@example.com", "n": [1, 2.5, None, True]},
            "priority": 2,
            "timeout_seconds": 60,
            "max_retries": 5,
            "dependencies": [dep],
            "queue": "mail",
            "on_dependency_failure": "cancel",
            "resources": ["gpu", "cpu"],
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "waiting" and body["created"] is True
    assert body["estimated_execution"] is None  # it waits for its dependency
    task = await api.task(body["task_id"])
    assert task["task_type"] == "emails.send" and task["queue"] == "mail"
    assert task["payload"] == {"to": "a@example.com", "n": [1, 2.5, None, True]}
    assert (task["priority"], task["timeout_seconds"], task["max_retries"]) == (2, 60, 5)
    assert task["dependencies"] == [dep] and task["resources"] == ["cpu", "gpu"]
    assert task["on_dependency_failure"] == "cancel"
    assert task["attempt"] == 0 and task["retry_count"] == 0
    assert task["result"] is None and task["error_message"] is None
    assert task["created_at"] == "2023-11-14T22:13:20Z"
    assert task["created_by"].startswith("key:")
    pending = await api.get(f"/api/v1/tasks/{dep}")
    assert pending.json()["status"] == "pending"


async def test_scheduled_task_reports_its_estimated_execution(api: Api) -> None:
    at = datetime.fromtimestamp(api.clock.now(), UTC) + timedelta(seconds=90)
    r = await api.post("/api/v1/tasks", {"task_type": "t.noop", "scheduled_at": at.isoformat()})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "scheduled"
    assert r.json()["estimated_execution"] == "2023-11-14T22:14:50Z"
    assert await api.claim() == []  # not due yet
    api.clock.advance(90)
    assert [t["task_id"] for t in await api.claim()] == [r.json()["task_id"]]


async def test_idempotency_key_returns_the_first_task(api: Api) -> None:
    body = {"task_type": "t.noop", "payload": {"n": 1}, "idempotency_key": "order-42"}
    first = await api.post("/api/v1/tasks", body)
    again = await api.post("/api/v1/tasks", body | {"payload": {"n": 2}})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.json()["created"] is False
    assert (await api.task(first.json()["task_id"]))["payload"] == {"n": 1}
    listed = await api.get("/api/v1/tasks")
    assert len(listed.json()["tasks"]) == 1


async def test_list_filters_and_pages_newest_first(api: Api) -> None:
    ids = []
    for i in range(5):
        ids.append(await api.submit(queue="a" if i % 2 else "b", task_type=f"t.k{i % 2}"))
        api.clock.advance(0.001 * (i % 2))  # some share a millisecond: ties break by id
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await api.get("/api/v1/tasks", **params)).json()
        seen += [t["task_id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    created = [datetime.fromisoformat((await api.task(i))["created_at"]) for i in seen]
    assert created == sorted(created, reverse=True)
    only_a = (await api.get("/api/v1/tasks", queue="a")).json()["tasks"]
    assert {t["task_id"] for t in only_a} == {ids[1], ids[3]}
    by_type = (await api.get("/api/v1/tasks", task_type="t.k0")).json()["tasks"]
    assert {t["task_id"] for t in by_type} == {ids[0], ids[2], ids[4]}
    claimed = await api.claim(task_types=["t.k1"], queues=["a"], max_tasks=1)
    running = (await api.get("/api/v1/tasks", status="running")).json()["tasks"]
    assert [t["task_id"] for t in running] == [claimed[0]["task_id"]]
    bad = await api.get("/api/v1/tasks", status="sleeping")
    assert bad.status_code == 422 and problem_field(bad) == "status"
    bad = await api.get("/api/v1/tasks", cursor="nonsense")
    assert bad.status_code == 422 and problem_field(bad) == "cursor"


# --- bad input -----------------------------------------------------------------------------


BAD_TASKS: list[tuple[dict[str, Any], str]] = [
    ({"priority": 0}, "priority"),
    ({"priority": 11}, "priority"),
    ({"priority": "5"}, "priority"),
    ({"priority": 2.5}, "priority"),
    ({"timeout_seconds": 0}, "timeout_seconds"),
    ({"timeout_seconds": 86_401}, "timeout_seconds"),
    ({"max_retries": -1}, "max_retries"),
    ({"dependencies": ["00000000-0000-0000-0000-000000000000"]}, "dependencies"),
    ({"dependencies": "abc"}, "dependencies"),
    ({"payload": {"blob": "x" * (256 * 1024)}}, "payload"),
    ({"scheduled_at": "tomorrow"}, "scheduled_at"),
    ({"scheduled_at": "2030-01-01T10:00:00"}, "scheduled_at"),  # no time zone
    ({"scheduled_at": 1_900_000_000}, "scheduled_at"),
    ({"on_dependency_failure": "ignore"}, "on_dependency_failure"),
    ({"queue": ""}, "queue"),
    ({"task_type": None}, "task_type"),
    ({"task_type": "x" * 101}, "task_type"),
    ({"resources": ["gpu", 3]}, "resources"),
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"colour": "blue"}, "colour"),
    ({"ref": "a"}, "ref"),  # refs name tasks of one batch
    ({"task_type": "a\x00b"}, "task_type"),  # PostgreSQL text cannot hold NUL
    ({"queue": "q\x00"}, "queue"),
    ({"resources": ["g\x00"]}, "resources"),
]


async def test_bad_task_fields_are_named(api: Api) -> None:
    for fields, field in BAD_TASKS:
        r = await api.post("/api/v1/tasks", {"task_type": "t.noop"} | fields)
        assert r.status_code == 422, (fields, r.text)
        assert problem_field(r) == field, (fields, r.text)
    assert (await api.get("/api/v1/tasks")).json()["tasks"] == []
    for path in ("/api/v1/tasks/a%00b", "/api/v1/tasks?queue=a%00b", "/api/v1/dlq?cursor=1.%00"):
        r = await api.client.get(path, headers=api.headers)
        assert r.status_code == 422, (path, r.text)
    r = await api.get("/api/v1/tasks", cursor="²3.abc")
    assert r.status_code == 422 and problem_field(r) == "cursor"


async def test_bad_bodies(api: Api) -> None:
    r = await api.raw("/api/v1/tasks", b'{"task_type": "t.noop", "payload": ')
    assert r.status_code == 400 and r.json()["type"].endswith("malformed-json")
    # NaN is not JSON: it would be stored as null and surprise a worker in another language
    r = await api.raw("/api/v1/tasks", b'{"task_type": "t.noop", "payload": {"x": NaN}}')
    assert r.status_code == 400 and r.json()["type"].endswith("malformed-json")
    r = await api.post("/api/v1/tasks", ["t.noop"])
    assert r.status_code == 422 and problem_field(r) == "body"
    # over the kernel's 1 MiB body limit: refused before it is read
    r = await api.post("/api/v1/tasks", {"task_type": "t.noop", "payload": "x" * (1 << 20)})
    assert r.status_code == 413
    r = await api.client.post(
        "/api/v1/tasks",
        content=b"task_type=x",
        headers=api.headers | {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415
    assert (await api.get("/api/v1/tasks")).json()["tasks"] == []


async def test_bad_batches_write_nothing(api: Api) -> None:
    existing = await api.submit()
    cases: list[tuple[Any, str]] = [
        ({"tasks": []}, "tasks"),
        ({"tasks": "x"}, "tasks"),
        ({"tasks": [{"task_type": "a"}], "extra": 1}, "extra"),
        ({"tasks": [{"task_type": "a"}, {"task_type": "b", "priority": 99}]}, "tasks[1].priority"),
        ({"tasks": [{"task_type": "a"}, 7]}, "tasks[1]"),
        (
            {
                "tasks": [
                    {"task_type": "a", "ref": "a", "dependencies": ["c"]},
                    {"task_type": "b", "ref": "b", "dependencies": ["a", existing]},
                    {"task_type": "c", "ref": "c", "dependencies": ["b"]},
                ]
            },
            "dependencies",
        ),
        (
            {"tasks": [{"task_type": "a", "ref": "x"}, {"task_type": "b", "ref": "x"}]},
            "ref",
        ),
        (
            {"tasks": [{"task_type": "a", "ref": "a"}, {"task_type": "b", "dependencies": ["z"]}]},
            "dependencies",
        ),
        ({"tasks": [{"task_type": "a"}] * 1001}, "tasks"),
    ]
    for body, field in cases:
        r = await api.post("/api/v1/tasks/batch", body)
        assert r.status_code == 422, (field, r.text)
        assert problem_field(r) == field, r.text
    cycle = await api.post("/api/v1/tasks/batch", cases[5][0])
    assert "cycle" in cycle.json()["detail"]
    listed = (await api.get("/api/v1/tasks")).json()["tasks"]
    assert [t["task_id"] for t in listed] == [existing]


async def test_unknown_ids_are_404(api: Api) -> None:
    missing = "00000000-0000-7000-8000-000000000000"
    for method, path, body in [
        ("GET", f"/api/v1/tasks/{missing}", None),
        ("GET", f"/api/v1/tasks/{missing}/history", None),
        ("GET", f"/api/v1/tasks/{missing}/graph", None),
        ("POST", f"/api/v1/tasks/{missing}/cancel", None),
        ("POST", f"/api/v1/tasks/{missing}/retry", None),
        ("POST", f"/api/v1/tasks/{missing}/heartbeat", {"lease_token": "x"}),
        ("POST", f"/api/v1/tasks/{missing}/complete", {"lease_token": "x"}),
        ("POST", f"/api/v1/tasks/{missing}/fail", {"lease_token": "x", "error": "e"}),
    ]:
        if method == "GET":
            r = await api.get(path)
        else:
            r = await api.post(path, body)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["type"].endswith("task-not-found")


async def test_scopes(api: Api) -> None:
    _, reader = await api.keys.create("reader", ["tasks:read"])
    _, writer = await api.keys.create("writer", ["tasks:write"])
    as_reader = {"Authorization": f"Bearer {reader}"}
    as_writer = {"Authorization": f"Bearer {writer}"}
    body = {"task_type": "t.noop"}
    assert (await api.client.post("/api/v1/tasks", json=body)).status_code == 401
    assert (await api.client.post("/api/v1/tasks", json=body, headers=as_reader)).status_code == 403
    r = await api.client.post("/api/v1/tasks", json=body, headers=as_writer)
    assert r.status_code == 201
    assert (await api.client.get("/api/v1/queues/stats", headers=as_reader)).status_code == 200
    pause = await api.client.post("/api/v1/queues/default/pause", headers=as_writer)
    assert pause.status_code == 403 and pause.json()["required_scope"] == "tasks:admin"


# --- running tasks -------------------------------------------------------------------------


async def test_a_dag_runs_in_order_and_is_shown_as_a_graph(
    api: Api, running_worker: Callable[..., Worker]
) -> None:
    registry = TaskRegistry()
    order: list[str] = []

    @registry.task("t.step")
    async def step(name: str) -> dict[str, str]:
        order.append(name)
        return {"done": name}

    r = await api.post(
        "/api/v1/tasks/batch",
        {
            "tasks": [
                {
                    "task_type": "t.step",
                    "payload": {"name": "report"},
                    "ref": "report",
                    "dependencies": ["extract", "transform"],
                },
                {
                    "task_type": "t.step",
                    "payload": {"name": "transform"},
                    "ref": "transform",
                    "dependencies": ["extract"],
                },
                {
                    "task_type": "t.step",
                    "payload": {"name": "extract"},
                    "ref": "extract",
                    "priority": 9,
                },
            ]
        },
    )
    assert r.status_code == 201, r.text
    report, transform, extract = r.json()["task_ids"]
    assert r.json()["created"] == [True, True, True]
    assert [await api.status(t) for t in (report, transform, extract)] == [
        "waiting",
        "waiting",
        "pending",
    ]
    graph = (await api.get(f"/api/v1/tasks/{transform}/graph")).json()
    assert {n["task_id"] for n in graph["nodes"]} == {report, transform, extract}
    assert {(e["task_id"], e["depends_on"]) for e in graph["edges"]} == {
        (report, extract),
        (report, transform),
        (transform, extract),
    }

    worker = running_worker(registry)

    async def all_done() -> bool:
        return all([await api.status(t) == "succeeded" for t in (report, transform, extract)])

    await until(all_done)
    assert order == ["extract", "transform", "report"]
    task = await api.task(report)
    assert task["result"] == {"done": "report"} and task["attempt"] == 1
    assert task["worker_id"] == worker.worker_id
    history = (await api.get(f"/api/v1/tasks/{report}/history")).json()["history"]
    assert [(h["attempt"], h["status"], h["worker_id"]) for h in history] == [
        (1, "succeeded", worker.worker_id)
    ]
    workers = (await api.get("/api/v1/workers")).json()["workers"]
    assert [(w["worker_id"], w["pool_id"], w["task_types"]) for w in workers] == [
        (worker.worker_id, "default", ["t.step"])
    ]
    stats = (await api.get("/api/v1/queues/stats")).json()
    assert stats["total_workers"] == 1
    done = {q["priority"]: q["tasks_per_minute"] for q in stats["queues"]}
    assert done == {5: 2, 9: 1}


async def test_dead_letters_retry_and_redrive(
    api: Api, running_worker: Callable[..., Worker]
) -> None:
    registry = TaskRegistry()
    healed: set[str] = set()

    @registry.task("t.flaky")
    async def flaky(key: str) -> str:
        if key not in healed:
            raise RuntimeError(f"{key} is broken")
        return key

    running_worker(registry)
    ids = {
        k: await api.submit(task_type="t.flaky", payload={"key": k}, max_retries=0)
        for k in ("a", "b", "c")
    }

    async def dead() -> list[dict[str, Any]]:
        page = (await api.get("/api/v1/dlq")).json()["tasks"]
        return page if len(page) == 3 else []

    letters = await until(dead)
    assert {t["task_id"] for t in letters} == set(ids.values())
    task = await api.task(ids["a"])
    assert task["status"] == "dead" and task["error_message"] == "RuntimeError: a is broken"
    assert "raise RuntimeError" in task["traceback"]
    stats = (await api.get("/api/v1/queues/stats")).json()
    assert stats["dead_letter_tasks"] == 3
    page = (await api.get("/api/v1/dlq", limit=2)).json()
    assert len(page["tasks"]) == 2 and page["next_cursor"]

    healed.update({"a", "b", "c"})
    api.clock.advance(1)  # the re-driven attempts finish after the failed ones
    r = await api.post(f"/api/v1/tasks/{ids['a']}/retry")
    assert r.status_code == 200, r.text
    assert r.json() == {"retried": True, "new_task_id": ids["a"], "status": "pending"}
    await until(lambda: _is(api, ids["a"], "succeeded"))
    again = await api.post(f"/api/v1/tasks/{ids['a']}/retry")
    assert again.status_code == 409 and again.json()["type"].endswith("task-not-retryable")

    r = await api.post("/api/v1/dlq/redrive", {"task_ids": [ids["b"], ids["a"], "nope"]})
    assert r.status_code == 200, r.text
    assert r.json()["redriven"] == [ids["b"]]
    assert [s["task_id"] for s in r.json()["skipped"]] == [ids["a"], "nope"]
    r = await api.post("/api/v1/dlq/redrive", {"all": True})
    assert r.json()["redriven"] == [ids["c"]]
    await until(lambda: _is(api, ids["b"], "succeeded"))
    await until(lambda: _is(api, ids["c"], "succeeded"))
    history = (await api.get(f"/api/v1/tasks/{ids['c']}/history")).json()["history"]
    assert [h["status"] for h in history] == ["failed", "succeeded"]
    for body, field in [
        ({}, "task_ids"),
        ({"task_ids": ["x"], "all": True}, "task_ids"),
        ({"task_ids": ["x"], "queue": "q"}, "queue"),
    ]:
        r = await api.post("/api/v1/dlq/redrive", body)
        assert r.status_code == 422 and problem_field(r) == field


async def _is(api: Api, task_id: str, status: str) -> bool:
    return await api.status(task_id) == status


async def test_cancel(api: Api) -> None:
    pending = await api.submit()
    downstream = await api.submit(dependencies=[pending], on_dependency_failure="cancel")
    r = await api.post(f"/api/v1/tasks/{pending}/cancel")
    assert r.status_code == 200
    assert r.json() == {
        "cancelled": True,
        "status": "cancelled",
        "message": "the task was cancelled",
    }
    assert await api.status(downstream) == "cancelled"  # its dependency will never succeed
    again = await api.post(f"/api/v1/tasks/{pending}/cancel")
    assert again.status_code == 409 and again.json()["type"].endswith("task-finished")

    running = await api.submit()
    (claimed,) = await api.claim()
    assert claimed["task_id"] == running
    r = await api.post(f"/api/v1/tasks/{running}/cancel")
    assert r.status_code == 200 and r.json()["cancelled"] is False
    assert r.json()["status"] == "running"
    assert (await api.task(running))["cancel_requested"] is True
    beat = await api.post(
        f"/api/v1/tasks/{running}/heartbeat", {"lease_token": claimed["lease_token"]}
    )
    assert beat.json()["cancel_requested"] is True
    failed = await api.post(
        f"/api/v1/tasks/{running}/fail",
        {"lease_token": claimed["lease_token"], "error": "stopped on request", "retryable": False},
    )
    assert failed.json()["status"] == "cancelled"

    finished = await api.submit()
    (claimed,) = await api.claim()
    done = await api.post(
        f"/api/v1/tasks/{finished}/complete", {"lease_token": claimed["lease_token"]}
    )
    assert done.status_code == 200
    r = await api.post(f"/api/v1/tasks/{finished}/cancel")
    assert r.status_code == 409 and "succeeded" in r.json()["detail"]
    r = await api.post(f"/api/v1/tasks/{pending}/retry")  # a cancelled task can be re-driven
    assert r.status_code == 200 and await api.status(pending) == "pending"
    # ... and a re-driven dependant waits for its dependencies again
    r = await api.post(f"/api/v1/tasks/{downstream}/retry")
    assert r.status_code == 200 and await api.status(downstream) == "waiting"
    (claimed,) = await api.claim()
    await api.post(f"/api/v1/tasks/{pending}/complete", {"lease_token": claimed["lease_token"]})
    assert await api.status(downstream) == "pending"


async def test_pause_and_resume_a_queue(api: Api) -> None:
    r = await api.post("/api/v1/queues/mail/pause")
    assert r.status_code == 200 and r.json() == {"queue": "mail", "paused": True}
    held = await api.submit(queue="mail")
    other = await api.submit(queue="default")
    claimed = await api.claim(queues=["mail", "default"], max_tasks=5)
    assert [t["task_id"] for t in claimed] == [other]
    stats = (await api.get("/api/v1/queues/stats")).json()
    assert stats["paused_queues"] == ["mail"]
    assert [(q["queue"], q["pending_tasks"]) for q in stats["queues"]] == [
        ("default", 0),
        ("mail", 1),
    ]
    r = await api.post("/api/v1/queues/mail/resume")
    assert r.json() == {"queue": "mail", "paused": False}
    claimed = await api.claim(queues=["mail"])
    assert [t["task_id"] for t in claimed] == [held]
    assert (await api.get("/api/v1/queues/stats")).json()["paused_queues"] == []


async def test_stats_per_priority_and_unroutable_types(api: Api) -> None:
    for priority in (1, 1, 5, 5, 5):
        await api.submit(priority=priority)
    await api.submit(task_type="t.nobody", priority=7)
    api.clock.advance(2)
    (first,) = await api.claim()  # registers http-1, which serves t.noop only
    assert first["attempt"] == 1
    stats = (await api.get("/api/v1/queues/stats")).json()
    rows = {q["priority"]: q for q in stats["queues"]}
    assert (rows[1]["pending_tasks"], rows[1]["processing_tasks"]) == (1, 1)  # 1 goes first
    assert rows[5]["pending_tasks"] == 3 and rows[7]["pending_tasks"] == 1
    assert stats["total_workers"] == 1
    assert stats["unroutable"] == [{"task_type": "t.nobody", "tasks": 1}]
    await api.post(
        f"/api/v1/tasks/{first['task_id']}/complete", {"lease_token": first["lease_token"]}
    )
    stats = (await api.get("/api/v1/queues/stats")).json()
    rows = {q["priority"]: q for q in stats["queues"]}
    assert rows[1]["tasks_per_minute"] == 1 and rows[1]["average_wait_time"] == 2.0


async def test_payload_round_trips_exactly(api: Api) -> None:
    payload = {"unicode": "naïve ✓ 漢字", "big": 2**53, "nested": {"l": [[], {}]}, "f": 0.1}
    task_id = await api.submit(payload=payload)
    assert (await api.task(task_id))["payload"] == payload
    (claimed,) = await api.claim()
    assert claimed["payload"] == payload
    raw = orjson.dumps({"task_type": "t.noop", "payload": "just a string"})
    r = await api.raw("/api/v1/tasks", raw)
    assert r.status_code == 201 and (await api.task(r.json()["task_id"]))["payload"] == (
        "just a string"
    )
