"""Runs registered tasks: claims in batches under leases, heart-beats them, enforces timeouts,
reports results in batches, and stops gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import traceback as tb
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.tasks.models import Claimed
from tenfold.tasks.registry import NonRetryable, TaskDef, TaskRegistry
from tenfold.tasks.service import FINISHED_TOTAL, RUN_SECONDS, WAIT_SECONDS
from tenfold.tasks.stores.notify import LocalNotifier, Notifier
from tenfold.tasks.stores.sql import SqlTaskStore, release

log = structlog.get_logger(__name__)


class TaskCancelled(Exception):
    """The task was cancelled while running."""


@dataclass
class TaskContext:
    """Handed to a handler that takes a `ctx` parameter."""

    task_id: str
    attempt: int
    task_type: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    _worker: Worker | None = None
    _claim: Claimed | None = None
    _conn: AsyncConnection | None = None

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise TaskCancelled(self.task_id)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on tenfold's database that also records this task's success: the
        handler's writes and the completion commit together, or neither does."""
        assert self._worker is not None
        if self._conn is not None:
            raise RuntimeError("transaction() may be entered once per attempt")
        async with self._worker.store.engine.begin() as conn:
            self._conn = conn
            yield conn
            await self._worker._complete_in(conn, self)


@dataclass
class _Running:
    claim: Claimed
    ctx: TaskContext
    started: float
    deadline: float
    future: asyncio.Future[Any] | None = None


class Worker:
    def __init__(
        self,
        store: SqlTaskStore,
        registry: TaskRegistry,
        *,
        queues: tuple[str, ...] = ("default",),
        concurrency: int = 1,
        prefetch: int | None = None,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 5.0,
        poll_seconds: float = 1.0,
        flush_seconds: float = 0.05,
        cancel_grace_seconds: float = 10.0,
        resources: tuple[str, ...] = (),
        pool: str = "default",
        worker_id: str | None = None,
        notifier: Notifier | None = None,
        clock: Clock = SYSTEM_CLOCK,
        hard_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.queues = queues
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else max(concurrency, 32)
        self.lease_ms = int(lease_seconds * 1000)
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.flush_seconds = flush_seconds
        self.cancel_grace = cancel_grace_seconds
        self.resources = resources
        self.pool = pool
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.notifier = notifier or LocalNotifier()
        self.clock = clock
        self.hard_exit = hard_exit  # called when a sync handler overran: stop this process
        self.executor = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="task")
        self._backlog: list[Claimed] = []
        self._running: dict[str, _Running] = {}
        self._done: list[tuple[Claimed, Any]] = []
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._flush_wanted = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._exit_after_report = False  # a sync handler overran: stop once it is reported
        self.completed = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        await self.store.register_worker(
            {
                "worker_id": self.worker_id,
                "pool_id": self.pool,
                "queues": orjson.dumps(list(self.queues)).decode(),
                "task_types": orjson.dumps(self.registry.names()).decode(),
                "resources": orjson.dumps(list(self.resources)).decode(),
                "status": "idle",
                "current_task": None,
                "concurrency": self.concurrency,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "started_at_ms": self.clock.now_ms(),
                "last_heartbeat_ms": self.clock.now_ms(),
            }
        )
        log.info("tasks.worker_started", worker_id=self.worker_id, queues=self.queues)
        side = [
            asyncio.create_task(self._heartbeats(), name="tasks-heartbeat"),
            asyncio.create_task(self._flusher(), name="tasks-flush"),
            asyncio.create_task(self._watchdog(), name="tasks-watchdog"),
        ]
        try:
            await self._loop()
        finally:
            await self._drain()
            for task in side:
                task.cancel()
            for task in side:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._flush()
            with contextlib.suppress(Exception):
                await self.store.remove_worker(self.worker_id)
            self.executor.shutdown(wait=False, cancel_futures=True)
            log.info("tasks.worker_stopped", worker_id=self.worker_id, completed=self.completed)

    def stop(self) -> None:
        """Stop claiming; finish what is running; hand back what never started."""
        self._stopping.set()

    async def _drain(self) -> None:
        unstarted, self._backlog = self._backlog, []
        if unstarted:
            with contextlib.suppress(Exception):
                await release(self.store, [(c.task_id, c.lease_token) for c in unstarted])
        waiting = [r.future for r in self._running.values() if r.future is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=self.cancel_grace)

    # -- the claim loop -------------------------------------------------------------------

    async def _loop(self) -> None:
        names = self.registry.names()
        while not self._stopping.is_set():
            if not self._backlog:
                want = self.prefetch - len(self._running)
                if want > 0:
                    try:
                        self._backlog = await self.store.claim(
                            self.worker_id,
                            queues=self.queues,
                            task_types=names,
                            resources=self.resources,
                            limit=want,
                            lease_ms=self.lease_ms,
                            now_ms=self.clock.now_ms(),
                        )
                    except Exception as exc:
                        log.warning("tasks.claim_failed", error=str(exc))
                        await self._pause(self.poll_seconds)
                        continue
                if not self._backlog:
                    await self._idle()
                    continue
            if not await self._acquire_slot():
                break
            claim = self._backlog.pop(0)
            self._start(claim)

    async def _acquire_slot(self) -> bool:
        """Wait for a free slot; False if the worker is told to stop meanwhile."""
        if self._stopping.is_set():
            return False
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        slot = asyncio.ensure_future(self._slots.acquire())
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({slot, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if slot.done() and not slot.cancelled():
            if self._stopping.is_set():
                self._slots.release()
                return False
            return True
        slot.cancel()
        return False

    async def _idle(self) -> None:
        """Nothing to do: flush results, then sleep until new work, a freed slot, a stop, or
        the poll interval."""
        self._flush_wanted.set()
        self._slot_freed.clear()
        stop = asyncio.ensure_future(self._stopping.wait())
        freed = asyncio.ensure_future(self._slot_freed.wait())
        wake = asyncio.ensure_future(self.notifier.wait(self.poll_seconds))
        try:
            await asyncio.wait({stop, freed, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (stop, freed, wake):
                f.cancel()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _start(self, claim: Claimed) -> None:
        definition = self.registry.tasks[claim.task_type]
        ctx = TaskContext(claim.task_id, claim.attempt, claim.task_type, _worker=self, _claim=claim)
        now = time.monotonic()
        running = _Running(claim, ctx, now, now + claim.timeout_seconds)
        WAIT_SECONDS.labels(claim.queue).observe(claim.wait_ms / 1000)
        self._running[claim.task_id] = running
        running.future = asyncio.ensure_future(self._run(definition, running))

    async def _run(self, definition: TaskDef, running: _Running) -> None:
        claim, ctx = running.claim, running.ctx
        try:
            result = await self._call(definition, claim, ctx)
        except asyncio.CancelledError:
            if not ctx.cancelled.is_set():
                raise  # the worker itself is shutting down
            await self._failed(definition, running, TaskCancelled(claim.task_id), "cancelled")
        except TimeoutError as exc:
            await self._failed(definition, running, exc, "timeout")
        except BaseException as exc:
            await self._failed(definition, running, exc, "failed")
        else:
            if ctx._conn is None:  # completed inside ctx.transaction() otherwise
                self._done.append((claim, result))
                if len(self._done) >= 100:
                    self._flush_wanted.set()
            self.completed += 1
            RUN_SECONDS.labels(claim.queue).observe(time.monotonic() - running.started)
        finally:
            self._running.pop(claim.task_id, None)
            self._slots.release()
            self._slot_freed.set()

    async def _call(self, definition: TaskDef, claim: Claimed, ctx: TaskContext) -> Any:
        payload = claim.payload
        args: tuple[Any, ...]
        kwargs: dict[str, Any]
        if isinstance(payload, dict):
            args, kwargs = (), dict(payload)
        else:
            args, kwargs = (payload,), {}
        if definition.wants_context:
            kwargs["ctx"] = ctx
        timeout = claim.timeout_seconds
        if definition.is_async:
            async with asyncio.timeout(timeout):
                return await definition.fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, lambda: definition.fn(*args, **kwargs))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            # A thread cannot be stopped: fail the attempt, then stop this process so the
            # supervisor replaces it (the runaway thread dies with it).
            if self.hard_exit is not None:
                self._exit_after_report = True
            raise

    async def _failed(
        self, definition: TaskDef, running: _Running, exc: BaseException, outcome: str
    ) -> None:
        claim = running.claim
        name = type(exc).__name__
        retryable = not (
            isinstance(exc, NonRetryable | TaskCancelled) or name in definition.retry.non_retryable
        )
        now = self.clock.now_ms()
        retry_at = now + int(definition.retry.delay(claim.attempt) * 1000) if retryable else None
        message = f"{name}: {exc}" if str(exc) else name
        if outcome == "timeout":
            message = f"timed out after {claim.timeout_seconds} s"
        try:
            result = await self.store.fail(
                claim.task_id,
                claim.lease_token,
                error=message,
                traceback="".join(tb.format_exception(exc)),
                retry_at_ms=retry_at,
                now_ms=now,
                outcome=outcome,
            )
        except Exception as err:
            log.error("tasks.report_failed", task_id=claim.task_id, error=str(err))
            return
        final = result.status.value if result.status else "stale"
        FINISHED_TOTAL.labels(claim.queue, final if final != "scheduled" else "retried").inc()
        log.info(
            "tasks.attempt_failed",
            task_id=claim.task_id,
            attempt=claim.attempt,
            error=message,
            now=final,
        )
        if self._exit_after_report and self.hard_exit is not None:
            log.error("tasks.worker_recycled", reason="a synchronous task overran its timeout")
            self.hard_exit(3)

    # -- results --------------------------------------------------------------------------

    async def _complete_in(self, conn: AsyncConnection, ctx: TaskContext) -> None:
        assert ctx._claim is not None
        result = await self.store.complete(
            [(ctx.task_id, ctx._claim.lease_token, None)], self.clock.now_ms(), conn=conn
        )
        if not result[0]:
            raise RuntimeError(f"task {ctx.task_id}: lease lost; the transaction is rolled back")

    async def _flusher(self) -> None:
        """Results go out in batches: when 100 are waiting, when the worker falls idle, and
        at least every `flush_seconds`."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wanted.wait(), self.flush_seconds)
            self._flush_wanted.clear()
            if self._done:
                await self._flush()

    async def _flush(self) -> None:
        batch, self._done = self._done, []
        if not batch:
            return
        now = self.clock.now_ms()
        try:
            accepted = await self.store.complete(
                [(c.task_id, c.lease_token, r) for c, r in batch], now
            )
        except asyncio.CancelledError:
            self._done = batch + self._done  # run() flushes them once more on the way out
            raise
        except Exception as exc:
            log.warning("tasks.complete_failed", error=str(exc), tasks=len(batch))
            self._done = batch + self._done  # keep them; the lease covers the retry
            await asyncio.sleep(0.5)
            return
        for (claim, _), ok in zip(batch, accepted, strict=True):
            FINISHED_TOTAL.labels(claim.queue, "succeeded" if ok else "stale").inc()
            if not ok:
                log.warning("tasks.stale_completion", task_id=claim.task_id)

    # -- leases, cancellation, timeouts ---------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            now = self.clock.now_ms()
            held = [(r.claim.task_id, r.claim.lease_token) for r in self._running.values()]
            held += [(c.task_id, c.lease_token) for c in self._backlog]
            try:
                states = await self.store.heartbeat_many(held, self.lease_ms, now)
                current = next(iter(self._running), None)
                await self.store.worker_heartbeat(
                    self.worker_id, now, "busy" if current else "idle", current
                )
            except Exception as exc:
                log.warning("tasks.heartbeat_failed", error=str(exc))
                continue
            for task_id, (held_still, cancel) in states.items():
                running = self._running.get(task_id)
                if running is None:
                    continue
                if cancel or not held_still:
                    running.ctx.cancelled.set()
                    running.deadline = min(running.deadline, time.monotonic() + self.cancel_grace)

    async def _watchdog(self) -> None:
        """A cancelled task past its grace period is stopped: an async handler is cancelled;
        a thread cannot be, so the attempt is failed and this process stops."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for running in list(self._running.values()):
                if not running.ctx.cancelled.is_set() or now < running.deadline:
                    continue
                future = running.future
                if future is None or future.done():
                    continue
                definition = self.registry.tasks[running.claim.task_type]
                if definition.is_async:
                    future.cancel()
                elif self.hard_exit is not None:
                    await self._failed(
                        definition, running, TaskCancelled(running.claim.task_id), "cancelled"
                    )
                    self.hard_exit(3)
