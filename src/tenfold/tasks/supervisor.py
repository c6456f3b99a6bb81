"""`tenfold worker`: run task workers, supervised.

`--pool process` (the default): this process supervises N child processes, each one asyncio
`Worker` claiming one task at a time (`python -m tenfold.tasks.supervisor child ...`). A child
that dies is replaced (with back-off when it keeps dying); a child whose synchronous task
overran its timeout exits on purpose (code 3) and is replaced at once. With `--autoscale
MIN:MAX` the number of children follows queue depth and wait time (see `autoscale.py`).

`--pool asyncio`: one process, one Worker running N tasks at once (for I/O-bound handlers).

Either way the supervising process also re-queues tasks whose lease expired (every second)
and fires due cron schedules. Stopping: SIGTERM or SIGINT stops claiming; running tasks finish
or, at the end of the grace period, are released back to pending; a second signal releases
them at once. The supervisor exits 0 after a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import orjson
import sqlalchemy as sa
import structlog

from tenfold.tasks.autoscale import Autoscaler, Load, ScaleError, ScalePolicy, parse_range
from tenfold.tasks.registry import TaskDef, TaskRegistry
from tenfold.tasks.worker import Worker

if TYPE_CHECKING:
    from tenfold.settings import Settings
    from tenfold.tasks.service import TaskService
    from tenfold.tasks.stores.notify import Notifier
    from tenfold.tasks.stores.sql import SqlTaskStore

log = structlog.get_logger(__name__)

RECYCLED = 3  # a child's exit code after a synchronous task overran (Worker.hard_exit)
MIN_UPTIME = 10.0  # a child dying sooner than this counts towards the restart back-off
MAX_BACKOFF = 30.0
SWEEP_SECONDS = 1.0
SCHEDULE_SECONDS = 1.0
FORCED_EXIT_SECONDS = 3.0  # after a second signal, children get this long before SIGKILL


class WorkerSetupError(ValueError):
    """The worker cannot start as configured; the message says what to change."""


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """`tenfold worker`'s flags (each also a TENFOLD_WORKER_* environment variable)."""

    app: str  # module:attribute naming a TaskRegistry
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 1  # process pool: child processes; asyncio pool: tasks at once
    pool: Literal["process", "asyncio"] = "process"
    autoscale: tuple[int, int] | None = None
    resources: tuple[str, ...] = ()
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    prefetch: int | None = None  # claimed ahead per process; None: 2 per child, or Worker default
    grace_seconds: float = 30.0
    pool_id: str = "default"
    schedules: bool = True  # fire cron schedules in this supervisor
    service_tasks: bool = True  # also run tenfold's own services' tasks (in this supervisor)
    scale_check_seconds: float = 5.0
    scale_cooldown_seconds: float = 30.0
    scale_wait_seconds: float = 5.0

    @classmethod
    def build(
        cls,
        app: str,
        *,
        queues: str = "default",
        concurrency: int | None = None,
        pool: str = "process",
        autoscale: str | None = None,
        resources: str = "",
        lease_seconds: float = 30.0,
        heartbeat_seconds: float | None = None,
        poll_seconds: float = 1.0,
        prefetch: int | None = None,
        grace_seconds: float = 30.0,
        pool_id: str = "default",
        schedules: bool = True,
        service_tasks: bool = True,
        scale_check_seconds: float = 5.0,
        scale_cooldown_seconds: float = 30.0,
        scale_wait_seconds: float = 5.0,
    ) -> WorkerOptions:
        """Validate flags as typed on the command line; WorkerSetupError names the bad one."""
        if pool not in ("process", "asyncio"):
            raise WorkerSetupError(f"--pool: expected process or asyncio, got {pool!r}")
        names = tuple(q.strip() for q in queues.split(",") if q.strip())
        if not names:
            raise WorkerSetupError("--queues: expected a comma-separated list such as default,mail")
        tags = tuple(sorted({r.strip() for r in resources.split(",") if r.strip()}))
        bounds: tuple[int, int] | None = None
        if autoscale:
            if pool != "process":
                raise WorkerSetupError("--autoscale: needs --pool process")
            try:
                bounds = parse_range(autoscale)
            except ScaleError as exc:
                raise WorkerSetupError(f"--{exc}") from None
        if concurrency is None:
            concurrency = (os.cpu_count() or 1) if pool == "process" else 10
        if not 1 <= concurrency <= 1024:
            raise WorkerSetupError(f"--concurrency: expected 1 to 1024, got {concurrency}")
        if not 1 <= lease_seconds <= 3600:
            raise WorkerSetupError(f"--lease-seconds: expected 1 to 3600, got {lease_seconds}")
        heartbeat = (
            heartbeat_seconds if heartbeat_seconds is not None else min(5.0, lease_seconds / 3)
        )
        if not 0 < heartbeat < lease_seconds:
            raise WorkerSetupError(
                f"--heartbeat-seconds: expected more than 0 and less than the lease "
                f"({lease_seconds} s), got {heartbeat}"
            )
        for flag, value in (
            ("--poll-seconds", poll_seconds),
            ("--grace-seconds", grace_seconds),
            ("--scale-check-seconds", scale_check_seconds),
        ):
            if value <= 0:
                raise WorkerSetupError(f"{flag}: expected a positive number, got {value}")
        if prefetch is not None and prefetch < 1:
            raise WorkerSetupError(f"--prefetch: expected 1 or more, got {prefetch}")
        if scale_cooldown_seconds < 0 or scale_wait_seconds < 0:
            raise WorkerSetupError("--scale-cooldown-seconds/--scale-wait-seconds: expected >= 0")
        _split_app(app)
        return cls(
            app=app,
            queues=names,
            concurrency=concurrency,
            pool="process" if pool == "process" else "asyncio",
            autoscale=bounds,
            resources=tags,
            lease_seconds=lease_seconds,
            heartbeat_seconds=heartbeat,
            poll_seconds=poll_seconds,
            prefetch=prefetch,
            grace_seconds=grace_seconds,
            pool_id=pool_id,
            schedules=schedules,
            service_tasks=service_tasks,
            scale_check_seconds=scale_check_seconds,
            scale_cooldown_seconds=scale_cooldown_seconds,
            scale_wait_seconds=scale_wait_seconds,
        )

    def to_json(self) -> str:
        return orjson.dumps(dataclasses.asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> WorkerOptions:
        raw = orjson.loads(text)
        raw["queues"] = tuple(raw["queues"])
        raw["resources"] = tuple(raw["resources"])
        raw["autoscale"] = tuple(raw["autoscale"]) if raw["autoscale"] else None
        return cls(**raw)

    def scale_policy(self) -> ScalePolicy | None:
        if self.autoscale is None:
            return None
        return ScalePolicy(
            self.autoscale[0],
            self.autoscale[1],
            wait_threshold=self.scale_wait_seconds,
            cooldown=self.scale_cooldown_seconds,
        )


# -- the application's task registry -----------------------------------------------------


def _split_app(ref: str) -> tuple[str, str]:
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise WorkerSetupError(
            f"--app: expected module:attribute such as myapp.tasks:registry, got {ref!r}"
        )
    return module, attr


def load_registry(ref: str) -> TaskRegistry:
    """Import `module:attribute` (from the current directory too, as `python -m` would)."""
    module_name, attr = _split_app(ref)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkerSetupError(f"--app: cannot import {module_name!r}: {exc}") from None
    registry = getattr(module, attr, None)
    if not isinstance(registry, TaskRegistry):
        found = "nothing" if registry is None else type(registry).__name__
        raise WorkerSetupError(
            f"--app: {ref} is {found}; expected a TaskRegistry (registry = TaskRegistry())"
        )
    if not registry.tasks:
        raise WorkerSetupError(f"--app: {ref} has no tasks; register some with @registry.task()")
    return registry


def bind_task_logging(registry: TaskRegistry) -> None:
    """Put task_id, task_type and attempt in every log line a handler writes (structlog
    context variables), by wrapping each handler so that it receives the task context."""
    for definition in registry.tasks.values():
        if not getattr(definition.fn, "__tenfold_logged__", False):
            _wrap(definition)


def _wrap(definition: TaskDef) -> None:
    fn = definition.fn
    wants = definition.wants_context
    bind = structlog.contextvars.bound_contextvars

    def context(kwargs: dict[str, Any]) -> Any:
        return kwargs.get("ctx") if wants else kwargs.pop("ctx", None)

    wrapper: Callable[..., Any]
    if definition.is_async:

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = context(kwargs)
            if ctx is None:
                return await fn(*args, **kwargs)
            with bind(task_id=ctx.task_id, task_type=ctx.task_type, attempt=ctx.attempt):
                return await fn(*args, **kwargs)

    else:

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = context(kwargs)
            if ctx is None:
                return fn(*args, **kwargs)
            with bind(task_id=ctx.task_id, task_type=ctx.task_type, attempt=ctx.attempt):
                return fn(*args, **kwargs)

    if not wants:  # declare a `ctx` parameter so that the worker hands the context over
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        extra = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next(
            (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
            len(params),
        )
        params.insert(at, extra)
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__tenfold_logged__ = True  # type: ignore[attr-defined]
    definition.fn = wrapper
    definition.__post_init__()


# -- pieces shared by both pools -----------------------------------------------------------


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres"))


async def _notifier(url: str, *, listen: bool) -> Notifier:
    from tenfold.tasks.stores.notify import LocalNotifier, PgNotifier

    if not _is_postgres(url):
        return LocalNotifier()
    notifier = PgNotifier(url)
    if listen:
        await notifier.start()
    return notifier


async def _release_held(store: SqlTaskStore, worker_id: str) -> int:
    """Hand back every task this worker still holds (running or claimed ahead): pending
    again, the attempt not counted."""
    from tenfold.tasks.stores.sql import release
    from tenfold.tasks.tables import tasks

    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(tasks.c.task_id, tasks.c.lease_token).where(
                    tasks.c.worker_id == worker_id, tasks.c.status == "running"
                )
            )
        ).all()
    if not rows:
        return 0
    released = await release(store, [(task_id, token) for task_id, token in rows])
    log.warning("tasks.worker_released", worker_id=worker_id, tasks=released)
    return released


def _exit_now(code: int) -> NoReturn:
    """Leave without waiting for handler threads that cannot be stopped."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Housekeeping:
    """Re-queues tasks whose lease expired and fires due cron schedules, once a second."""

    def __init__(self, service: TaskService, *, schedules: bool) -> None:
        self.service = service
        self.schedules = schedules
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._sweep(), name="tasks-sweep"))
        if self.schedules:
            from tenfold.tasks.schedules import Scheduler

            scheduler = Scheduler(self.service)
            self._tasks.append(
                asyncio.create_task(
                    scheduler.run(self.stopping, SCHEDULE_SECONDS), name="tasks-schedules"
                )
            )

    async def _sweep(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.service.sweep()
            except Exception as exc:
                log.warning("tasks.sweep_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SWEEP_SECONDS)

    async def stop(self) -> None:
        self.stopping.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)


class SettlingWorker(Worker):
    """A Worker whose result flushes finish during shutdown.

    `Worker.run()` cancels its flusher on the way out (a cancelled batch is kept and flushed
    once more). Here each flush is also shielded and `settle()` waits for those in flight, so
    a child's drain deadline never interrupts a write it has started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flushes: set[asyncio.Future[None]] = set()

    async def _flush(self) -> None:
        flush = asyncio.ensure_future(super()._flush())
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)
        await asyncio.shield(flush)

    async def settle(self, seconds: float = 10.0) -> None:
        """Wait for result flushes still in flight."""
        if self._flushes:
            await asyncio.wait(set(self._flushes), timeout=seconds)


def _build_worker(
    options: WorkerOptions,
    registry: TaskRegistry,
    store: SqlTaskStore,
    notifier: Notifier,
    *,
    concurrency: int,
    prefetch: int | None,
    hard_exit: Callable[[int], None] | None,
) -> SettlingWorker:
    return SettlingWorker(
        store,
        registry,
        queues=options.queues,
        concurrency=concurrency,
        prefetch=prefetch,
        lease_seconds=options.lease_seconds,
        heartbeat_seconds=options.heartbeat_seconds,
        poll_seconds=options.poll_seconds,
        resources=options.resources,
        pool=options.pool_id,
        notifier=notifier,
        hard_exit=hard_exit,
    )


class _Stopper:
    """First signal: stop claiming, let running tasks finish, release them at `deadline`.
    Second signal: release at once."""

    def __init__(self, worker: SettlingWorker, store: SqlTaskStore, deadline: float) -> None:
        self.worker = worker
        self.store = store
        self.deadline = deadline
        self.signals = 0
        self._timer: asyncio.Task[None] | None = None

    def request(self, reason: str) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("tasks.worker_stopping", worker_id=self.worker.worker_id, reason=reason)
            self.worker.stop()
            self._timer = asyncio.create_task(self._abandon_after(self.deadline))
        elif self.signals == 2:
            log.warning("tasks.worker_forced", worker_id=self.worker.worker_id, reason=reason)
            asyncio.create_task(self._abandon_after(0.0, code=1))  # noqa: RUF006

    async def _abandon_after(self, seconds: float, code: int = 0) -> None:
        await asyncio.sleep(seconds)
        # Results already computed go out first (the worker flushes every flush_seconds).
        await asyncio.sleep(self.worker.flush_seconds * 2)
        await self.worker.settle(2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_release_held(self.store, self.worker.worker_id), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.remove_worker(self.worker.worker_id), 2)
        log.info("tasks.worker_exit", worker_id=self.worker.worker_id, code=code)
        _exit_now(code)


def _install_signals(on_signal: Callable[[str], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


async def _run_worker_process(
    options: WorkerOptions,
    url: str,
    *,
    concurrency: int,
    prefetch: int | None,
    hard_exit: Callable[[int], None] | None,
    housekeeping: bool,
    drain_seconds: float,
    watch_parent: bool,
) -> int:
    """One process running one Worker until stopped; what both pools' workers do."""
    from tenfold.kernel.sql import create_engine
    from tenfold.tasks.service import TaskService
    from tenfold.tasks.stores.sql import SqlTaskStore

    registry = load_registry(options.app)
    bind_task_logging(registry)
    engine = create_engine(url)
    notifier = await _notifier(url, listen=True)
    store = SqlTaskStore(engine)
    worker = _build_worker(
        options,
        registry,
        store,
        notifier,
        concurrency=concurrency,
        prefetch=prefetch,
        hard_exit=hard_exit,
    )
    stopper = _Stopper(worker, store, drain_seconds)
    _install_signals(stopper.request)
    keeper: Housekeeping | None = None
    if housekeeping:
        keeper = Housekeeping(TaskService(store, notifier=notifier), schedules=options.schedules)
        keeper.start()
    orphan_watch = asyncio.create_task(_watch_parent(stopper)) if watch_parent else None
    try:
        await worker.run()
        await worker.settle()
        # run() returns once nothing is running; anything it could not finish goes back.
        try:
            await _release_held(store, worker.worker_id)
        except Exception as exc:  # the database is down: lease expiry will hand them back
            log.warning("tasks.release_failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
        if keeper is not None:
            await keeper.stop()
        await notifier.close()
        await engine.dispose()
    return 0


async def _watch_parent(stopper: _Stopper) -> None:
    """A child whose supervisor vanished (kill -9) stops by itself."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stopper.request("supervisor gone")
            return


def _child_drain_seconds(grace: float) -> float:
    """A child releases what it still runs this long after the stop signal, a little before
    the supervisor's grace period ends and it would be killed."""
    return max(0.2, grace - min(1.0, grace / 4))


def child_main(options: WorkerOptions) -> None:
    """A process-pool child: one Worker, one task at a time; exits 3 when a synchronous
    task overran its timeout (the supervisor replaces it)."""
    from tenfold.kernel.telemetry import configure_logging
    from tenfold.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    code = asyncio.run(
        _run_worker_process(
            options,
            settings.database_url,
            concurrency=1,
            prefetch=options.prefetch or 2,
            hard_exit=_exit_now,
            housekeeping=False,
            drain_seconds=_child_drain_seconds(options.grace_seconds),
            watch_parent=True,
        )
    )
    _exit_now(code)


# -- the process pool ----------------------------------------------------------------------


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[bytes]
    started: float
    retiring: bool = False


class Supervisor:
    """Starts, watches, restarts, scales and stops worker child processes."""

    def __init__(
        self,
        options: WorkerOptions,
        database_url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        child_command: Sequence[str] | None = None,
    ) -> None:
        self.options = options
        self.url = database_url
        self.clock = clock
        self.command = list(child_command or [sys.executable, "-m", "tenfold.tasks.supervisor"])
        policy = options.scale_policy()
        self.autoscaler = Autoscaler(policy, clock, policy.minimum) if policy is not None else None
        self.wanted = self.autoscaler.workers if self.autoscaler else options.concurrency
        self.children: dict[int, _Child] = {}
        self.retiring: list[_Child] = []
        self.restart_at: dict[int, float] = {}  # slot -> when its dead child is replaced
        self.failures: dict[int, int] = {}  # slot -> consecutive early deaths
        self.signals = 0
        self._busy_pids: set[int] = set()  # children running a task, as last seen
        self._wake = asyncio.Event()

    # child processes

    def _spawn(self, slot: int) -> None:
        env = dict(os.environ, TENFOLD_DATABASE_URL=self.url)
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*self.command, "child", self.options.to_json()],
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
        )
        self.children[slot] = _Child(slot, proc, self.clock())
        self.restart_at.pop(slot, None)
        log.info("tasks.child_started", slot=slot, pid=proc.pid)

    def _reap(self) -> None:
        now = self.clock()
        for child in list(self.retiring):
            if child.proc.poll() is not None:
                self.retiring.remove(child)
                log.info("tasks.child_retired", slot=child.slot, pid=child.proc.pid)
        for slot, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self.children[slot]
            if self.signals:
                continue
            uptime = now - child.started
            if code == RECYCLED:
                delay = 0.0
                self.failures[slot] = 0
            elif uptime < MIN_UPTIME:
                self.failures[slot] = self.failures.get(slot, 0) + 1
                delay = min(MAX_BACKOFF, 0.5 * 2 ** (self.failures[slot] - 1))
            else:
                self.failures[slot] = 0
                delay = 0.1
            self.restart_at[slot] = now + delay
            log.warning(
                "tasks.child_died", slot=slot, pid=child.proc.pid, code=code, restart_in=delay
            )

    def _resize(self) -> None:
        now = self.clock()
        for slot, when in list(self.restart_at.items()):
            if when <= now and slot not in self.children:
                self._spawn(slot)
        while len(self.children) + len(self.restart_at) < self.wanted:
            used = set(self.children) | set(self.restart_at)
            self._spawn(min(set(range(len(used) + 1)) - used))
        while len(self.children) + len(self.restart_at) > self.wanted:
            if self.restart_at:  # a slot waiting for a restart goes first
                slot = max(self.restart_at)
                del self.restart_at[slot]
                continue
            self._retire(self._pick_retiree())

    def _pick_retiree(self) -> _Child:
        busy = self._busy_pids
        ordered = sorted(self.children.values(), key=lambda c: c.slot, reverse=True)
        return next((c for c in ordered if c.proc.pid not in busy), ordered[0])

    def _retire(self, child: _Child) -> None:
        del self.children[child.slot]
        child.retiring = True
        self.retiring.append(child)
        self.failures.pop(child.slot, None)
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)
        log.info("tasks.child_retiring", slot=child.slot, pid=child.proc.pid)

    def _alive(self) -> list[_Child]:
        return [c for c in [*self.children.values(), *self.retiring] if c.proc.poll() is None]

    def _signal_all(self, sig: signal.Signals) -> None:
        for child in self._alive():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    # autoscaling

    async def _autoscale(self, service: TaskService, stopping: asyncio.Event) -> None:
        # Stopped by an event, not by cancellation: a cancelled database call can surface as
        # an ordinary error (BackendUnavailable), which would swallow the cancellation.
        assert self.autoscaler is not None
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.options.scale_check_seconds)
            if stopping.is_set() or self.signals:
                return
            try:
                load = await self._load(service)
            except Exception as exc:
                log.warning("tasks.autoscale_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            decision = self.autoscaler.observe(load)
            if decision.changed and decision.workers != self.wanted:
                log.info(
                    "tasks.autoscale",
                    workers=decision.workers,
                    was=self.wanted,
                    reason=decision.reason.value,
                    pending=load.pending,
                    average_wait=load.average_wait,
                )
                self.wanted = decision.workers
                self._wake.set()

    async def _load(self, service: TaskService) -> Load:
        stats = await service.stats()
        mine = [q for q in stats["queues"] if q["queue"] in self.options.queues]
        host = socket.gethostname()
        self._busy_pids = {
            w["pid"]
            for w in await service.workers()
            if w["status"] == "busy" and w["hostname"] == host
        }
        return Load(
            pending=sum(q["pending_tasks"] for q in mine),
            average_wait=max((q["average_wait_time"] for q in mine), default=0.0),
        )

    # lifecycle

    def _on_signal(self, name: str) -> None:
        self.signals += 1
        log.info("tasks.supervisor_signal", signal=name, count=self.signals)
        self._signal_all(signal.SIGTERM)
        self._wake.set()

    async def run(self) -> int:
        """Supervise until a signal; 0 after a graceful stop, 1 if children had to be killed."""
        from tenfold.kernel.sql import create_engine
        from tenfold.tasks.service import TaskService
        from tenfold.tasks.stores.sql import SqlTaskStore

        engine = create_engine(self.url)
        notifier = await _notifier(self.url, listen=False)
        service = TaskService(SqlTaskStore(engine), notifier=notifier)
        keeper = Housekeeping(service, schedules=self.options.schedules)
        _install_signals(self._on_signal)
        keeper.start()
        scaling_stops = asyncio.Event()
        scaler = (
            asyncio.create_task(self._autoscale(service, scaling_stops), name="tasks-autoscale")
            if self.autoscaler
            else None
        )
        try:
            while not self.signals:
                self._reap()
                if not self.signals:
                    self._resize()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.1)
            return await self._shutdown()
        finally:
            scaling_stops.set()
            if scaler is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(scaler, 10)
            await keeper.stop()
            await notifier.close()
            await engine.dispose()

    async def _shutdown(self) -> int:
        started = self.clock()
        grace_end = started + self.options.grace_seconds
        forced_at: float | None = None
        while self._alive():
            now = self.clock()
            if self.signals >= 2 and forced_at is None:
                forced_at = now
            if now >= grace_end or (
                forced_at is not None and now >= forced_at + FORCED_EXIT_SECONDS
            ):
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.05)
        stragglers = self._alive()
        for child in stragglers:
            log.error("tasks.child_killed", slot=child.slot, pid=child.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
        for child in [*self.children.values(), *self.retiring]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)
        self.children.clear()
        self.retiring.clear()
        code = 1 if stragglers or forced_at is not None else 0
        log.info("tasks.supervisor_stopped", code=code, seconds=round(self.clock() - started, 2))
        return code


# -- entry points --------------------------------------------------------------------------


def describe(options: WorkerOptions, registry: TaskRegistry, database_url: str) -> str:
    """The one-line status shown at start."""
    from sqlalchemy.engine import make_url

    if options.pool == "process":
        size = (
            f"autoscale {options.autoscale[0]}:{options.autoscale[1]}"
            if options.autoscale
            else f"{options.concurrency} processes"
        )
    else:
        size = f"{options.concurrency} tasks at once"
    types = ", ".join(registry.names())
    where = make_url(database_url).render_as_string(hide_password=True)
    parts = [
        f"[bold]tenfold worker[/] pool [cyan]{options.pool}[/] ({size})",
        f"queues [cyan]{','.join(options.queues)}[/]",
        f"task types [cyan]{types}[/]",
    ]
    if options.resources:
        parts.append(f"resources [cyan]{','.join(options.resources)}[/]")
    parts.append(f"database [dim]{where}[/]")
    return " · ".join(parts)


def serve(options: WorkerOptions, settings: Settings) -> NoReturn:
    """Run `tenfold worker` in this process until stopped, then exit (0 after a graceful
    stop). The exit skips interpreter clean-up: it can take seconds, and a handler thread
    that never returned would block it."""
    from rich.console import Console

    from tenfold.kernel.telemetry import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    registry = load_registry(options.app)
    Console(stderr=True).print(
        describe(options, registry, settings.database_url), highlight=False, soft_wrap=True
    )
    if options.pool == "process":
        main = Supervisor(options, settings.database_url).run()
    else:
        main = _run_worker_process(
            options,
            settings.database_url,
            concurrency=options.concurrency,
            prefetch=options.prefetch,
            hard_exit=None,
            housekeeping=True,
            drain_seconds=_child_drain_seconds(options.grace_seconds),
            watch_parent=False,
        )
    _exit_now(asyncio.run(_with_service_tasks(options, settings, main)))


async def _with_service_tasks(
    options: WorkerOptions, settings: Settings, main: Coroutine[Any, Any, int]
) -> int:
    """Run `main` (the pool) and, beside it in this process, tenfold's own services' tasks.
    Schedules are left to the pool's housekeeping (`--schedules`). If the services cannot be
    mounted here, the pool runs anyway and the error is logged."""
    if not options.service_tasks:
        return await main
    from tenfold.tasks.service_tasks import hosted

    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(hosted(settings, schedules=False))
        except Exception as exc:
            log.error(
                "tasks.service_tasks_unavailable",
                error=f"{type(exc).__name__}: {exc}",
                hint="this worker runs --app's tasks only; see --no-service-tasks",
            )
        code = await main
    return code


def _main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[0] != "child":
        sys.exit("usage: python -m tenfold.tasks.supervisor child OPTIONS_JSON")
    child_main(WorkerOptions.from_json(argv[1]))


if __name__ == "__main__":
    _main(sys.argv[1:])
