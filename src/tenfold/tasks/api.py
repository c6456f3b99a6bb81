"""Task queue HTTP API: the spec's paths, operator actions, and the HTTP worker protocol that
lets a worker in any language claim, heart-beat, complete and fail tasks (see
docs/tasks-worker-protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
import structlog
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from tenfold.kernel.auth import Principal, require
from tenfold.kernel.http import Conflict, InvalidField, NotFound, Problem
from tenfold.kernel.runtime import Mount, Runtime
from tenfold.tasks.models import (
    FINISHED,
    MAX_BATCH,
    NAME_MAX,
    PAYLOAD_LIMIT,
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    TIMEOUT_DEFAULT,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    Claimed,
    RetryPolicy,
    Status,
    Task,
    TaskError,
    TaskSpec,
    validate,
)
from tenfold.tasks.service import (
    FINISHED_TOTAL,
    WAIT_SECONDS,
    Submitted,
    TaskConflict,
    TaskService,
)
from tenfold.tasks.service_tasks import RUNTIME_KEY, service_tasks, service_worker_enabled
from tenfold.tasks.stores.notify import LocalNotifier, Notifier, PgNotifier
from tenfold.tasks.stores.sql import SqlTaskStore, release
from tenfold.tasks.timeutil import from_ms
from tenfold.tasks.worker import Worker

log = structlog.get_logger(__name__)

SWEEP_SECONDS = 1.0  # expired leases are re-queued within this
POLL_SECONDS = 1.0  # a long-poll looks again this often even without a wake-up
CLAIM_WAIT_MAX = 30.0
LEASE_DEFAULT, LEASE_MIN, LEASE_MAX = 60, 1, 3_600
CLAIM_MAX_TASKS = 100
WORKER_REFRESH_MS = 5_000  # an HTTP worker's row is rewritten at most this often per process
PAGE_DEFAULT, PAGE_MAX = 50, 500
HTTP_POOL = "http"
DEFAULT_RETRY = RetryPolicy()

TASK_FIELDS = frozenset(
    {
        "task_type",
        "payload",
        "priority",
        "scheduled_at",
        "timeout_seconds",
        "max_retries",
        "dependencies",
        "idempotency_key",
        "queue",
        "on_dependency_failure",
        "resources",
        "ref",
    }
)
TEXT = r"^[^\x00]*$"  # PostgreSQL text holds no NUL characters
QueueName = Annotated[str, Path(min_length=1, max_length=NAME_MAX, pattern=TEXT)]
TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=TEXT)]


# --- schemas -------------------------------------------------------------------------------


class TaskIn(BaseModel):
    """A task to submit (documents the body; it is parsed strictly by hand)."""

    model_config = ConfigDict(extra="forbid")
    task_type: str = Field(min_length=1, max_length=NAME_MAX)
    payload: Any = Field(
        default_factory=dict, description=f"any JSON, at most {PAYLOAD_LIMIT} bytes"
    )
    priority: int = Field(default=PRIORITY_DEFAULT, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    scheduled_at: datetime | None = Field(default=None, description="run at or after (with tz)")
    timeout_seconds: int = Field(default=TIMEOUT_DEFAULT, ge=TIMEOUT_MIN, le=TIMEOUT_MAX)
    max_retries: int = Field(default=3, ge=0, le=100)
    dependencies: list[str] = Field(default=[], description="task ids, or refs of this batch")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200, pattern=TEXT)
    queue: str = Field(default="default", min_length=1, max_length=NAME_MAX)
    on_dependency_failure: Literal["fail", "cancel"] = "fail"
    resources: list[str] = Field(default=[], description="e.g. gpu: only capable workers")
    ref: str | None = Field(default=None, min_length=1, max_length=NAME_MAX, pattern=TEXT)


def _batch_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["tasks"],
        "additionalProperties": False,
        "properties": {
            "tasks": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH,
                "items": TaskIn.model_json_schema(),
            }
        },
    }


class SubmitOut(BaseModel):
    task_id: str
    status: str
    estimated_execution: datetime | None
    created: bool


class BatchOut(BaseModel):
    task_ids: list[str]
    created: list[bool]


class TaskOut(BaseModel):
    task_id: str
    task_type: str
    queue: str
    status: str
    priority: int
    payload: Any
    attempt: int
    retry_count: int
    max_retries: int
    timeout_seconds: int
    created_at: datetime
    scheduled_at: datetime | None
    run_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    worker_id: str | None
    lease_expires_at: datetime | None
    error_message: str | None
    traceback: str | None
    result: Any
    idempotency_key: str | None
    dependencies: list[str]
    on_dependency_failure: str
    resources: list[str]
    cancel_requested: bool
    created_by: str | None


class TaskSummary(BaseModel):
    task_id: str
    task_type: str
    queue: str
    status: str
    priority: int
    attempt: int
    max_retries: int
    created_at: datetime
    run_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    worker_id: str | None
    error_message: str | None


class TaskPage(BaseModel):
    tasks: list[TaskSummary]
    next_cursor: str | None


class HistoryEntry(BaseModel):
    execution_id: str
    task_id: str
    attempt: int
    worker_id: str | None
    queue: str
    priority: int
    status: str
    started_at: datetime | None
    completed_at: datetime
    wait_ms: int | None
    execution_time_ms: int | None
    error_message: str | None


class HistoryOut(BaseModel):
    task_id: str
    history: list[HistoryEntry]


class GraphNode(BaseModel):
    task_id: str
    task_type: str
    status: str
    queue: str
    priority: int


class GraphEdge(BaseModel):
    task_id: str
    depends_on: str


class GraphOut(BaseModel):
    task_id: str
    nodes: list[GraphNode]
    edges: list[GraphEdge]


class CancelOut(BaseModel):
    cancelled: bool
    message: str
    status: str


class RetryOut(BaseModel):
    retried: bool
    new_task_id: str
    status: str


class WorkerOut(BaseModel):
    worker_id: str
    pool_id: str
    status: str
    current_task: str | None
    last_heartbeat: datetime
    started_at: datetime
    queues: list[str]
    task_types: list[str]
    resources: list[str]
    concurrency: int
    hostname: str | None
    pid: int | None


class WorkerList(BaseModel):
    workers: list[WorkerOut]


class QueueStats(BaseModel):
    queue: str
    priority: int
    pending_tasks: int
    scheduled_tasks: int
    waiting_tasks: int
    processing_tasks: int
    average_wait_time: float = Field(description="seconds, over the last minute")
    tasks_per_minute: int


class Unroutable(BaseModel):
    task_type: str
    tasks: int


class StatsOut(BaseModel):
    queues: list[QueueStats]
    total_workers: int
    dead_letter_tasks: int
    unroutable: list[Unroutable]
    paused_queues: list[str]


class PauseOut(BaseModel):
    queue: str
    paused: bool


class RedriveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_ids: list[Annotated[str, Field(min_length=1, max_length=64, pattern=TEXT)]] = Field(
        default=[], max_length=MAX_BATCH
    )
    all: bool = Field(default=False, description="every dead task (of `queue` if given)")
    queue: str | None = Field(default=None, min_length=1, max_length=NAME_MAX, pattern=TEXT)


class Skipped(BaseModel):
    task_id: str
    reason: str


class RedriveOut(BaseModel):
    redriven: list[str]
    skipped: list[Skipped]


Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=TEXT)]


class ClaimIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker_id: str = Field(min_length=1, max_length=200, pattern=TEXT)
    task_types: list[Name] = Field(min_length=1, max_length=1_000)
    queues: list[Name] = Field(default=["default"], min_length=1, max_length=100)
    resources: list[Annotated[str, Field(min_length=1, max_length=50, pattern=TEXT)]] = Field(
        default=[], max_length=10, description="resource tags this worker offers (cpu, gpu...)"
    )
    max_tasks: int = Field(default=1, ge=1, le=CLAIM_MAX_TASKS)
    wait_seconds: float = Field(default=0.0, ge=0.0, le=CLAIM_WAIT_MAX)
    lease_seconds: int = Field(default=LEASE_DEFAULT, ge=LEASE_MIN, le=LEASE_MAX)
    pool_id: str = Field(default=HTTP_POOL, min_length=1, max_length=100, pattern=TEXT)


class ClaimedOut(BaseModel):
    task_id: str
    task_type: str
    payload: Any
    attempt: int
    max_retries: int
    timeout_seconds: int
    queue: str
    lease_token: str
    lease_expires_at: datetime


class ClaimOut(BaseModel):
    tasks: list[ClaimedOut]


class HeartbeatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_token: str = Field(min_length=1, max_length=64, pattern=TEXT)
    lease_seconds: int = Field(default=LEASE_DEFAULT, ge=LEASE_MIN, le=LEASE_MAX)
    worker_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=TEXT)


class HeartbeatOut(BaseModel):
    lease_expires_at: datetime
    cancel_requested: bool


class CompleteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_token: str = Field(min_length=1, max_length=64, pattern=TEXT)
    result: Any = None
    worker_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=TEXT)


class CompleteOut(BaseModel):
    task_id: str
    status: str


class FailIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_token: str = Field(min_length=1, max_length=64, pattern=TEXT)
    error: str = Field(min_length=1, max_length=10_000)
    retryable: bool = True
    traceback: str | None = Field(default=None, max_length=50_000)
    worker_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=TEXT)


class FailOut(BaseModel):
    task_id: str
    status: str = Field(description="scheduled (a retry is due at retry_at), dead or cancelled")
    retry_at: datetime | None


# --- conversions ---------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def exact_ms(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(milliseconds=1)


def task_out(task: Task) -> TaskOut:
    return TaskOut(
        task_id=task.task_id,
        task_type=task.task_type,
        queue=task.queue,
        status=task.status.value,
        priority=task.priority,
        payload=task.payload,
        attempt=task.attempt,
        retry_count=max(0, task.attempt - 1),
        max_retries=task.max_retries,
        timeout_seconds=task.timeout_seconds,
        created_at=task.created_at,
        scheduled_at=task.scheduled_at,
        run_at=task.run_at,
        started_at=task.started_at,
        completed_at=task.completed_at,
        failed_at=task.failed_at,
        worker_id=task.worker_id,
        lease_expires_at=task.lease_expires_at if task.status is Status.RUNNING else None,
        error_message=task.error_message,
        traceback=task.traceback,
        result=task.result,
        idempotency_key=task.idempotency_key,
        dependencies=list(task.dependencies),
        on_dependency_failure=task.on_dependency_failure.value,
        resources=list(task.resources),
        cancel_requested=task.cancel_requested,
        created_by=task.created_by,
    )


def task_summary(task: Task) -> TaskSummary:
    return TaskSummary(
        task_id=task.task_id,
        task_type=task.task_type,
        queue=task.queue,
        status=task.status.value,
        priority=task.priority,
        attempt=task.attempt,
        max_retries=task.max_retries,
        created_at=task.created_at,
        run_at=task.run_at,
        started_at=task.started_at,
        completed_at=task.completed_at,
        failed_at=task.failed_at,
        worker_id=task.worker_id,
        error_message=task.error_message,
    )


def history_entry(row: dict[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        execution_id=row["execution_id"],
        task_id=row["task_id"],
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        queue=row["queue"],
        priority=row["priority"],
        status=row["status"],
        started_at=from_ms(row["started_at_ms"]),
        completed_at=from_ms(row["completed_at_ms"]),
        wait_ms=row["wait_ms"],
        execution_time_ms=row["execution_time_ms"],
        error_message=row["error_message"],
    )


def worker_out(row: dict[str, Any]) -> WorkerOut:
    return WorkerOut(
        worker_id=row["worker_id"],
        pool_id=row["pool_id"],
        status=row["status"],
        current_task=row["current_task"],
        last_heartbeat=from_ms(row["last_heartbeat_ms"]),
        started_at=from_ms(row["started_at_ms"]),
        queues=orjson.loads(row["queues"]),
        task_types=orjson.loads(row["task_types"]),
        resources=orjson.loads(row["resources"]),
        concurrency=row["concurrency"],
        hostname=row["hostname"],
        pid=row["pid"],
    )


def claimed_out(c: Claimed) -> ClaimedOut:
    return ClaimedOut(
        task_id=c.task_id,
        task_type=c.task_type,
        payload=c.payload,
        attempt=c.attempt,
        max_retries=c.max_retries,
        timeout_seconds=c.timeout_seconds,
        queue=c.queue,
        lease_token=c.lease_token,
        lease_expires_at=c.lease_expires_at,
    )


def encode_cursor(task: Task) -> str:
    return f"{exact_ms(task.created_at)}.{task.task_id}"


def decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    ms, sep, task_id = cursor.partition(".")
    if (
        not sep
        or not (ms.isascii() and ms.isdigit())
        or len(ms) > 15
        or not task_id
        or "\x00" in task_id
    ):
        raise InvalidField("cursor", "is not a cursor this API returned")
    return int(ms), task_id


def parse_task(raw: Any, where: str = "") -> TaskSpec:
    """One submitted task, strictly: unknown fields and loose types are named, not guessed."""
    if not isinstance(raw, dict):
        raise InvalidField(where.rstrip(".") or "body", "must be a JSON object")
    unknown = sorted(set(raw) - TASK_FIELDS)
    if unknown:
        raise InvalidField(where + unknown[0], "is not a known field")
    data = dict(raw)
    when = data.get("scheduled_at")
    if when is not None:
        if not isinstance(when, str):
            raise InvalidField(where + "scheduled_at", "must be an RFC 3339 timestamp")
        try:
            data["scheduled_at"] = datetime.fromisoformat(when)
        except ValueError:
            raise InvalidField(
                where + "scheduled_at", "must be an RFC 3339 timestamp (2026-01-01T10:00:00Z)"
            ) from None
    try:
        spec = validate(data)
    except TaskError as exc:
        raise InvalidField(where + exc.field, exc.message) from None
    for name, texts in (
        ("task_type", [spec.task_type]),
        ("queue", [spec.queue]),
        ("idempotency_key", [spec.idempotency_key or ""]),
        ("ref", [spec.ref or ""]),
        ("dependencies", spec.dependencies),
        ("resources", spec.resources),
    ):
        if any("\x00" in text for text in texts):
            raise InvalidField(where + name, "must not contain NUL characters")
    return spec


async def read_json(request: Request) -> Any:
    """The body parsed as strict JSON (no NaN, no Infinity): payloads stay portable."""
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise Problem(400, "malformed-json", "the request body is not valid JSON") from None


# --- the HTTP worker registry --------------------------------------------------------------


class HttpWorkers:
    """Rows in task_workers for workers that speak HTTP; rewritten at most every few seconds."""

    def __init__(self, service: TaskService) -> None:
        self.service = service
        self._seen: dict[str, tuple[int, str, str | None]] = {}

    async def touch(
        self, body: ClaimIn | None, worker_id: str, status: str, current: str | None, host: str
    ) -> None:
        now = self.service.clock.now_ms()
        last = self._seen.get(worker_id)
        if last is not None and now - last[0] < WORKER_REFRESH_MS and last[1:] == (status, current):
            return
        store = self.service.store
        if last is None and body is not None:
            await store.register_worker(
                {
                    "worker_id": worker_id,
                    "pool_id": body.pool_id,
                    "queues": orjson.dumps(body.queues).decode(),
                    "task_types": orjson.dumps(body.task_types).decode(),
                    "resources": orjson.dumps(body.resources).decode(),
                    "status": status,
                    "current_task": current,
                    "concurrency": body.max_tasks,
                    "hostname": host[:200] or None,
                    "pid": None,
                    "started_at_ms": now,
                    "last_heartbeat_ms": now,
                }
            )
        else:  # updates the row another process (or an earlier claim) wrote, if any
            await store.worker_heartbeat(worker_id, now, status, current)
        self._seen[worker_id] = (now, status, current)
        if len(self._seen) > 10_000:
            cutoff = now - 60_000
            self._seen = {k: v for k, v in self._seen.items() if v[0] >= cutoff}


# --- router --------------------------------------------------------------------------------


CONFLICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "the task's state does not allow this"}
}
LEASE_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"description": "lease-lost: the lease token is stale; stop working on the task"}
}


def lease_lost(task_id: str) -> Problem:
    return Problem(
        409,
        "lease-lost",
        f"the lease on task {task_id} is no longer held (it expired and was re-queued, was "
        "cancelled, or was already reported); stop working on it",
    )


def build_router(service: TaskService) -> APIRouter:
    router = APIRouter(tags=["tasks"])
    reader = require("tasks:read")
    writer = require("tasks:write")
    admin = require("tasks:admin")
    store = service.store
    http_workers = HttpWorkers(service)

    async def existing(task_id: str) -> Task:
        task = await service.get(task_id)
        if task is None:
            raise NotFound("task", task_id)
        return task

    async def submit(specs: Sequence[TaskSpec], principal: Principal) -> list[Submitted]:
        try:
            return await service.submit(specs, created_by=principal.subject)
        except TaskError as exc:
            raise InvalidField(exc.field, exc.message) from None

    @router.post(
        "/api/v1/tasks",
        status_code=201,
        response_model=SubmitOut,
        summary="Submit a task",
        responses={200: {"description": "the idempotency key matched an earlier task"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": TaskIn.model_json_schema()}},
            }
        },
    )
    async def submit_task(
        request: Request, response: Response, principal: Principal = writer
    ) -> SubmitOut:
        spec = parse_task(await read_json(request))
        if spec.ref is not None:
            raise InvalidField("ref", "names a task within a batch; use /api/v1/tasks/batch")
        done = (await submit([spec], principal))[0]
        task = await existing(done.task_id)
        if not done.created:
            response.status_code = 200
        eta: datetime | None = None
        if task.status in (Status.PENDING, Status.SCHEDULED) and task.run_at is not None:
            eta = max(task.run_at, datetime.fromtimestamp(service.clock.now(), UTC))
        elif task.status is Status.RUNNING:
            eta = task.started_at
        return SubmitOut(
            task_id=task.task_id,
            status=task.status.value,
            estimated_execution=eta,
            created=done.created,
        )

    @router.post(
        "/api/v1/tasks/batch",
        status_code=201,
        response_model=BatchOut,
        summary="Submit many tasks, or a DAG, in one transaction",
        responses={200: {"description": "every task matched an earlier idempotency key"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _batch_schema()}},
            }
        },
    )
    async def submit_batch(
        request: Request, response: Response, principal: Principal = writer
    ) -> BatchOut:
        """Tasks may depend on each other by `ref`; the ids come back in order."""
        body = await read_json(request)
        if not isinstance(body, dict):
            raise InvalidField("body", "must be a JSON object")
        unknown = sorted(set(body) - {"tasks"})
        if unknown:
            raise InvalidField(unknown[0], "is not a known field")
        items = body.get("tasks")
        if not isinstance(items, list) or not items:
            raise InvalidField("tasks", "must be a non-empty list of tasks")
        if len(items) > MAX_BATCH:
            raise InvalidField("tasks", f"at most {MAX_BATCH} per call")
        specs = [parse_task(item, f"tasks[{i}].") for i, item in enumerate(items)]
        done = await submit(specs, principal)
        if not any(d.created for d in done):
            response.status_code = 200
        return BatchOut(task_ids=[d.task_id for d in done], created=[d.created for d in done])

    @router.get("/api/v1/tasks", response_model=TaskPage, summary="List tasks, newest first")
    async def list_tasks(
        status: Annotated[Status | None, Query()] = None,
        queue: Annotated[str | None, Query(min_length=1, max_length=NAME_MAX, pattern=TEXT)] = None,
        task_type: Annotated[
            str | None, Query(min_length=1, max_length=NAME_MAX, pattern=TEXT)
        ] = None,
        limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = PAGE_DEFAULT,
        cursor: Annotated[str | None, Query(max_length=200, pattern=TEXT)] = None,
        _: Principal = reader,
    ) -> TaskPage:
        return await page(status, queue, task_type, limit, cursor)

    async def page(
        status: Status | None,
        queue: str | None,
        task_type: str | None,
        limit: int,
        cursor: str | None,
    ) -> TaskPage:
        found = await store.list_tasks(
            status=status.value if status else None,
            queue=queue,
            task_type=task_type,
            before=decode_cursor(cursor),
            limit=limit + 1,
        )
        more = len(found) > limit
        found = found[:limit]
        return TaskPage(
            tasks=[task_summary(t) for t in found],
            next_cursor=encode_cursor(found[-1]) if more and found else None,
        )

    @router.get("/api/v1/tasks/{task_id}", response_model=TaskOut, summary="A task and its state")
    async def read_task(task_id: TaskId, _: Principal = reader) -> TaskOut:
        return task_out(await existing(task_id))

    @router.get(
        "/api/v1/tasks/{task_id}/history",
        response_model=HistoryOut,
        summary="Every finished attempt (task_execution_history)",
    )
    async def task_history(task_id: TaskId, _: Principal = reader) -> HistoryOut:
        found: Any = await store.history(task_id)  # Any: see SqlTaskStore.list's shadowing
        rows: list[dict[str, Any]] = found
        if not rows:
            await existing(task_id)
        return HistoryOut(task_id=task_id, history=[history_entry(r) for r in rows])

    @router.get(
        "/api/v1/tasks/{task_id}/graph",
        response_model=GraphOut,
        summary="The task's dependency graph, upstream and downstream",
    )
    async def task_graph(task_id: TaskId, _: Principal = reader) -> GraphOut:
        graph: Any = await store.graph(task_id)
        nodes: list[Task] = graph[0]
        edges: list[tuple[str, str]] = graph[1]
        if not any(n.task_id == task_id for n in nodes):
            raise NotFound("task", task_id)
        return GraphOut(
            task_id=task_id,
            nodes=[
                GraphNode(
                    task_id=n.task_id,
                    task_type=n.task_type,
                    status=n.status.value,
                    queue=n.queue,
                    priority=n.priority,
                )
                for n in sorted(nodes, key=lambda n: (exact_ms(n.created_at), n.task_id))
            ],
            edges=[GraphEdge(task_id=a, depends_on=b) for a, b in edges],
        )

    @router.post(
        "/api/v1/tasks/{task_id}/cancel",
        response_model=CancelOut,
        summary="Cancel a waiting, scheduled or pending task; ask a running one to stop",
        responses=CONFLICT_RESPONSES,
    )
    async def cancel_task(task_id: TaskId, _: Principal = writer) -> CancelOut:
        before = await existing(task_id)
        if before.status in FINISHED:
            raise Conflict(
                f"task {task_id} is {before.status.value}; a finished task cannot be cancelled",
                "task-finished",
            )
        try:
            status = await service.cancel(task_id)
        except TaskConflict as exc:
            raise Conflict(str(exc), "task-finished") from None
        if status is None:
            raise NotFound("task", task_id)
        if status is Status.RUNNING:
            return CancelOut(
                cancelled=False,
                status=status.value,
                message="the task is running: its worker was asked to stop (it stops at its "
                "next heartbeat, or is stopped after a grace period)",
            )
        return CancelOut(cancelled=True, status=status.value, message="the task was cancelled")

    @router.post(
        "/api/v1/tasks/{task_id}/retry",
        response_model=RetryOut,
        summary="Re-drive a dead or cancelled task (same id, retries restored)",
        responses=CONFLICT_RESPONSES,
    )
    async def retry_task(task_id: TaskId, _: Principal = writer) -> RetryOut:
        try:
            status = await redrive_one(service, task_id)
        except TaskConflict as exc:
            raise Conflict(str(exc), "task-not-retryable") from None
        if status is None:
            raise NotFound("task", task_id)
        return RetryOut(retried=True, new_task_id=task_id, status=status.value)

    @router.get("/api/v1/workers", response_model=WorkerList, summary="Active workers")
    async def list_workers(_: Principal = reader) -> WorkerList:
        return WorkerList(workers=[worker_out(w) for w in await service.workers()])

    @router.get("/api/v1/queues/stats", response_model=StatsOut, summary="Queue statistics")
    async def queue_stats(_: Principal = reader) -> StatsOut:
        """Depth per queue and priority, average wait and throughput over the last minute."""
        return StatsOut.model_validate(await service.stats())

    @router.post(
        "/api/v1/queues/{queue}/pause", response_model=PauseOut, summary="Stop claims from a queue"
    )
    async def pause_queue(queue: QueueName, _: Principal = admin) -> PauseOut:
        await store.set_paused(queue, True, service.clock.now_ms())
        return PauseOut(queue=queue, paused=True)

    @router.post(
        "/api/v1/queues/{queue}/resume", response_model=PauseOut, summary="Resume a paused queue"
    )
    async def resume_queue(queue: QueueName, _: Principal = admin) -> PauseOut:
        await store.set_paused(queue, False, service.clock.now_ms())
        service.notifier.after_commit(queue)
        return PauseOut(queue=queue, paused=False)

    @router.get("/api/v1/dlq", response_model=TaskPage, summary="Dead tasks, newest first")
    async def dead_letters(
        queue: Annotated[str | None, Query(min_length=1, max_length=NAME_MAX, pattern=TEXT)] = None,
        task_type: Annotated[
            str | None, Query(min_length=1, max_length=NAME_MAX, pattern=TEXT)
        ] = None,
        limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = PAGE_DEFAULT,
        cursor: Annotated[str | None, Query(max_length=200, pattern=TEXT)] = None,
        _: Principal = reader,
    ) -> TaskPage:
        return await page(Status.DEAD, queue, task_type, limit, cursor)

    @router.post("/api/v1/dlq/redrive", response_model=RedriveOut, summary="Re-drive dead tasks")
    async def redrive(body: RedriveIn, _: Principal = admin) -> RedriveOut:
        if body.all == bool(body.task_ids):
            raise InvalidField("task_ids", "give either task_ids or all: true")
        if body.queue is not None and not body.all:
            raise InvalidField("queue", "only applies with all: true")
        return await redrive_tasks(service, body.task_ids, everything=body.all, queue=body.queue)

    # -- the HTTP worker protocol -------------------------------------------------------

    @router.post(
        "/api/v1/workers/claim",
        response_model=ClaimOut,
        summary="Claim ready tasks under leases (long-polls up to wait_seconds)",
    )
    async def claim(request: Request, body: ClaimIn, _: Principal = writer) -> ClaimOut:
        host = request.client.host if request.client else ""
        await http_workers.touch(body, body.worker_id, "idle", None, host)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + body.wait_seconds
        types = list(dict.fromkeys(body.task_types))
        queues = list(dict.fromkeys(body.queues))
        while True:
            claimed: list[Claimed] = await store.claim(
                body.worker_id,
                queues=queues,
                task_types=types,
                resources=body.resources,
                limit=body.max_tasks,
                lease_ms=body.lease_seconds * 1000,
                now_ms=service.clock.now_ms(),
            )
            remaining = deadline - loop.time()
            if claimed or remaining <= 0:
                break
            if await request.is_disconnected():
                return ClaimOut(tasks=[])
            await service.notifier.wait(min(remaining, POLL_SECONDS))
            await http_workers.touch(body, body.worker_id, "idle", None, host)
        if claimed and await request.is_disconnected():
            await release(store, [(c.task_id, c.lease_token) for c in claimed])
            return ClaimOut(tasks=[])
        for c in claimed:
            WAIT_SECONDS.labels(c.queue).observe(c.wait_ms / 1000)
        if claimed:
            await http_workers.touch(body, body.worker_id, "busy", claimed[0].task_id, host)
        return ClaimOut(tasks=[claimed_out(c) for c in claimed])

    async def stale(task_id: str) -> Problem:
        await existing(task_id)  # 404 for an id that never existed
        return lease_lost(task_id)

    @router.post(
        "/api/v1/tasks/{task_id}/heartbeat",
        response_model=HeartbeatOut,
        summary="Extend a claimed task's lease",
        responses=LEASE_RESPONSES,
    )
    async def heartbeat(
        request: Request, task_id: TaskId, body: HeartbeatIn, _: Principal = writer
    ) -> HeartbeatOut:
        now = service.clock.now_ms()
        held, cancel = await store.heartbeat(
            task_id, body.lease_token, body.lease_seconds * 1000, now
        )
        if not held:
            raise await stale(task_id)
        if body.worker_id is not None:
            host = request.client.host if request.client else ""
            await http_workers.touch(None, body.worker_id, "busy", task_id, host)
        expires = from_ms(now + body.lease_seconds * 1000)
        assert expires is not None
        return HeartbeatOut(lease_expires_at=expires, cancel_requested=cancel)

    @router.post(
        "/api/v1/tasks/{task_id}/complete",
        response_model=CompleteOut,
        summary="Report a claimed task's success and result",
        responses=LEASE_RESPONSES,
    )
    async def complete(
        request: Request, task_id: TaskId, body: CompleteIn, _: Principal = writer
    ) -> CompleteOut:
        try:
            size = len(orjson.dumps(body.result))
        except TypeError:
            raise InvalidField("result", "must be JSON") from None
        if size > PAYLOAD_LIMIT:
            raise InvalidField("result", f"is {size} bytes; the limit is {PAYLOAD_LIMIT}")
        accepted: Any = await store.complete(
            [(task_id, body.lease_token, body.result)], service.clock.now_ms()
        )
        if not accepted[0]:
            raise await stale(task_id)
        service.notifier.after_commit("*")  # dependants may have become ready
        if body.worker_id is not None:
            host = request.client.host if request.client else ""
            await http_workers.touch(None, body.worker_id, "idle", None, host)
        return CompleteOut(task_id=task_id, status=Status.SUCCEEDED.value)

    @router.post(
        "/api/v1/tasks/{task_id}/fail",
        response_model=FailOut,
        summary="Report a claimed task's failure (retried with back-off, or dead)",
        responses=LEASE_RESPONSES,
    )
    async def fail(
        request: Request, task_id: TaskId, body: FailIn, _: Principal = writer
    ) -> FailOut:
        task = await existing(task_id)
        if task.status is not Status.RUNNING or task.lease_token != body.lease_token:
            raise lease_lost(task_id)
        now = service.clock.now_ms()
        retry_at = now + int(DEFAULT_RETRY.delay(task.attempt) * 1000) if body.retryable else None
        outcome = await store.fail(
            task_id,
            body.lease_token,
            error=body.error.replace("\x00", "\ufffd"),
            traceback=body.traceback.replace("\x00", "\ufffd") if body.traceback else None,
            retry_at_ms=retry_at,
            now_ms=now,
        )
        if not outcome.accepted or outcome.status is None:
            raise lease_lost(task_id)
        final = outcome.status.value
        FINISHED_TOTAL.labels(task.queue, "retried" if final == "scheduled" else final).inc()
        if body.worker_id is not None:
            host = request.client.host if request.client else ""
            await http_workers.touch(None, body.worker_id, "idle", None, host)
        return FailOut(
            task_id=task_id,
            status=final,
            retry_at=from_ms(outcome.retry_at_ms) if outcome.status is Status.SCHEDULED else None,
        )

    return router


async def redrive_one(service: TaskService, task_id: str) -> Status | None:
    """Re-drive one dead or cancelled task; TaskConflict for any other state, None if unknown."""
    return await service.retry(task_id)


async def redrive_tasks(
    service: TaskService, task_ids: Sequence[str], *, everything: bool, queue: str | None = None
) -> RedriveOut:
    """Re-drive dead tasks by id, or every dead task (of one queue)."""
    redriven: list[str] = []
    skipped: list[Skipped] = []

    async def one(task_id: str) -> None:
        try:
            status = await redrive_one(service, task_id)
        except TaskConflict as exc:
            skipped.append(Skipped(task_id=task_id, reason=str(exc)))
            return
        if status is None:
            skipped.append(Skipped(task_id=task_id, reason="no such task"))
        else:
            redriven.append(task_id)

    if not everything:
        for task_id in dict.fromkeys(task_ids):
            await one(task_id)
        return RedriveOut(redriven=redriven, skipped=skipped)
    before: tuple[int, str] | None = None
    while True:
        found = await service.store.list_tasks(status=Status.DEAD.value, queue=queue, before=before)
        if not found:
            break
        for task in found:
            await one(task.task_id)
        before = (exact_ms(found[-1].created_at), found[-1].task_id)
    return RedriveOut(redriven=redriven, skipped=skipped)


# --- wiring --------------------------------------------------------------------------------


def notifier_for(runtime: Runtime) -> Notifier:
    engine = runtime.engine
    if engine.dialect.name == "postgresql":
        return PgNotifier(engine.url.render_as_string(hide_password=False))
    return LocalNotifier()


def service_for(runtime: Runtime) -> TaskService:
    """The one TaskService of this process (shared by the API, the CLI and in-process workers)."""
    existing = runtime.services.get("tasks")
    if isinstance(existing, TaskService):
        return existing
    service = TaskService(
        SqlTaskStore(runtime.engine), clock=runtime.clock, notifier=notifier_for(runtime)
    )
    runtime.services["tasks"] = service
    return service


def mount(runtime: Runtime) -> Mount:
    service = service_for(runtime)

    workers: list[tuple[Worker, asyncio.Task[None]]] = []

    async def on_start() -> None:
        if runtime.services.get("tasks:started"):
            return
        runtime.services["tasks:started"] = True
        if isinstance(service.notifier, PgNotifier):
            await service.notifier.start()
        runtime.every(SWEEP_SECONDS, service.sweep, "tasks-sweep")
        app_ref = runtime.settings.tasks_app
        if app_ref:
            # Embedded: the server runs the application's tasks itself (asyncio pool).
            from tenfold.tasks.supervisor import load_registry

            worker = Worker(
                service.store,
                load_registry(app_ref),
                concurrency=runtime.settings.tasks_concurrency,
                notifier=service.notifier,
                clock=runtime.clock,
                pool="embedded",
            )
            workers.append((worker, asyncio.ensure_future(worker.run())))
        # tenfold's own services' background work (see service_tasks.py).
        own = service_tasks(runtime)
        if own.autostart and service_worker_enabled(runtime.settings):
            await own.start()

    async def on_stop() -> None:
        if RUNTIME_KEY in runtime.services:
            await service_tasks(runtime).stop()
        for worker, task in workers:
            worker.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, worker.cancel_grace + 5)
        workers.clear()
        await service.notifier.close()
        runtime.services.pop("tasks:started", None)

    return Mount(
        name="tasks",
        routers=[build_router(service)],
        on_start=[on_start],
        on_stop=[on_stop],
    )
