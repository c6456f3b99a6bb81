"""Tasks, their states and rules: validation, retry back-off, dependency graphs (no I/O)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from tenfold.kernel.errors import FieldError

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 1, 10, 5  # 1 is the most urgent
TIMEOUT_MIN, TIMEOUT_MAX, TIMEOUT_DEFAULT = 1, 86_400, 300
MAX_RETRIES_DEFAULT, MAX_RETRIES_LIMIT = 3, 100
PAYLOAD_LIMIT = 256 * 1024  # bytes of JSON
MAX_DEPENDENCIES = 1_000
MAX_BATCH = 1_000
NAME_MAX = 100


class Status(StrEnum):
    WAITING = "waiting"  # dependencies not yet succeeded
    SCHEDULED = "scheduled"  # run_at in the future (delayed, or backing off for a retry)
    PENDING = "pending"  # ready to run
    RUNNING = "running"  # claimed by a worker under a lease
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # failed after its retries: the dead letter state
    CANCELLED = "cancelled"


FINISHED = frozenset({Status.SUCCEEDED, Status.DEAD, Status.CANCELLED})


class OnDependencyFailure(StrEnum):
    FAIL = "fail"  # a dependant of a dead task dies too
    CANCEL = "cancel"  # a dependant of a dead or cancelled task is cancelled


class TaskError(FieldError):
    """A submitted task is invalid; `field` names the offending input."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential back-off with full jitter: delay = uniform(0, min(cap, base * factor**n))."""

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 600.0
    jitter: bool = True
    non_retryable: tuple[str, ...] = ()  # exception type names that go straight to dead

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.max_delay, self.base * self.factor ** max(0, failures - 1))
        if not self.jitter:
            return ceiling
        # half fixed, half random: never bunches at 0, spreads a thundering herd
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task as submitted, validated."""

    task_type: str
    payload: Any = field(default_factory=dict)
    priority: int = PRIORITY_DEFAULT
    queue: str = "default"
    scheduled_at: datetime | None = None
    timeout_seconds: int = TIMEOUT_DEFAULT
    max_retries: int = MAX_RETRIES_DEFAULT
    dependencies: tuple[str, ...] = ()
    idempotency_key: str | None = None
    on_dependency_failure: OnDependencyFailure = OnDependencyFailure.FAIL
    resources: tuple[str, ...] = ()  # e.g. ("gpu",): only workers offering them claim it
    ref: str | None = None  # a name other tasks of the same batch may depend on

    @property
    def payload_json(self) -> bytes:
        return orjson.dumps(self.payload)


def _name(field_name: str, value: Any, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise TaskError(field_name, "is required")
        return None
    if not isinstance(value, str) or not value or len(value) > NAME_MAX:
        raise TaskError(field_name, f"must be a string of 1 to {NAME_MAX} characters")
    return value


def validate(raw: Mapping[str, Any]) -> TaskSpec:
    """Turn a submitted mapping into a TaskSpec, naming the first invalid field."""
    task_type = _name("task_type", raw.get("task_type"))
    assert task_type is not None
    payload = raw.get("payload", {})
    try:
        encoded = orjson.dumps(payload)
    except TypeError as exc:
        raise TaskError("payload", f"must be JSON: {exc}") from None
    if len(encoded) > PAYLOAD_LIMIT:
        raise TaskError("payload", f"is {len(encoded)} bytes; the limit is {PAYLOAD_LIMIT}")
    priority = _int("priority", raw.get("priority", PRIORITY_DEFAULT), PRIORITY_MIN, PRIORITY_MAX)
    timeout = _int(
        "timeout_seconds", raw.get("timeout_seconds", TIMEOUT_DEFAULT), TIMEOUT_MIN, TIMEOUT_MAX
    )
    retries = _int("max_retries", raw.get("max_retries", MAX_RETRIES_DEFAULT), 0, MAX_RETRIES_LIMIT)
    queue = _name("queue", raw.get("queue", "default")) or "default"
    deps = raw.get("dependencies") or ()
    if not isinstance(deps, list | tuple) or not all(isinstance(d, str) and d for d in deps):
        raise TaskError("dependencies", "must be a list of task ids")
    if len(deps) > MAX_DEPENDENCIES:
        raise TaskError("dependencies", f"at most {MAX_DEPENDENCIES}")
    key = raw.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        raise TaskError("idempotency_key", "must be a string of 1 to 200 characters")
    scheduled = raw.get("scheduled_at")
    if scheduled is not None and not isinstance(scheduled, datetime):
        raise TaskError("scheduled_at", "must be a timestamp")
    if scheduled is not None and scheduled.tzinfo is None:
        raise TaskError("scheduled_at", "must carry a time zone (e.g. 2026-01-01T10:00:00Z)")
    try:
        on_fail = OnDependencyFailure(raw.get("on_dependency_failure", "fail"))
    except ValueError:
        raise TaskError("on_dependency_failure", "must be fail or cancel") from None
    resources = raw.get("resources") or ()
    if not isinstance(resources, list | tuple) or not all(
        isinstance(r, str) and 0 < len(r) <= 50 for r in resources
    ):
        raise TaskError("resources", "must be a list of short names such as cpu, memory, gpu")
    return TaskSpec(
        task_type=task_type,
        payload=payload,
        priority=priority,
        queue=queue,
        scheduled_at=scheduled,
        timeout_seconds=timeout,
        max_retries=retries,
        dependencies=tuple(dict.fromkeys(deps)),
        idempotency_key=key,
        on_dependency_failure=on_fail,
        resources=tuple(sorted(set(resources))),
        ref=_name("ref", raw.get("ref"), required=False),
    )


def _int(field_name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TaskError(field_name, f"must be an integer from {low} to {high}")
    return value


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle in a dependency graph (task -> its dependencies), or None. Iterative DFS."""
    white, grey, black = 0, 1, 2
    color: dict[str, int] = {}
    for start in edges:
        if color.get(start, white) != white:
            continue
        stack: list[tuple[str, Any]] = [(start, iter(edges.get(start, ())))]
        path = [start]
        color[start] = grey
        while stack:
            node, children = stack[-1]
            advanced = False
            for child in children:
                state = color.get(child, white)
                if state == grey:
                    return [*path[path.index(child) :], child]
                if state == white:
                    color[child] = grey
                    stack.append((child, iter(edges.get(child, ()))))
                    path.append(child)
                    advanced = True
                    break
            if not advanced:
                color[node] = black
                stack.pop()
                path.pop()
    return None


@dataclass(frozen=True, slots=True)
class Task:
    """A task as stored."""

    task_id: str
    task_type: str
    queue: str
    payload: Any
    priority: int
    status: Status
    attempt: int
    max_retries: int
    timeout_seconds: int
    created_at: datetime
    run_at: datetime | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    worker_id: str | None = None
    lease_token: str | None = None
    lease_expires_at: datetime | None = None
    error_message: str | None = None
    traceback: str | None = None
    result: Any = None
    idempotency_key: str | None = None
    on_dependency_failure: OnDependencyFailure = OnDependencyFailure.FAIL
    resources: tuple[str, ...] = ()
    dependencies: tuple[str, ...] = ()
    cancel_requested: bool = False
    created_by: str | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a worker receives for one claimed task."""

    task_id: str
    task_type: str
    payload: Any
    attempt: int
    lease_token: str
    lease_expires_at: datetime
    timeout_seconds: int
    max_retries: int
    queue: str
    wait_ms: int = 0  # from due to claimed


def unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


class TaskIds:
    """UUIDv7-style ids (RFC 9562): time-ordered, so ties in a claim's ORDER BY keep
    submission order; a counter keeps ids made in the same millisecond in order."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.SystemRandom()
        self._last_ms = 0
        self._seq = 0

    def new(self, now_ms: int) -> str:
        if now_ms <= self._last_ms:
            now_ms = self._last_ms
            self._seq += 1
            if self._seq > 0xFFF:
                now_ms += 1
                self._seq = 0
        else:
            self._seq = self._rng.getrandbits(8)  # leaves room for 3,800 more this ms
        self._last_ms = now_ms
        tail = self._rng.getrandbits(62)
        value = (now_ms & (2**48 - 1)) << 80 | 0x7 << 76 | self._seq << 64 | 0b10 << 62 | tail
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


TASK_IDS = TaskIds()
