"""`tenfold worker`: the autoscale rule, option checks, handler log context, and real worker
processes (the asyncio pool on SQLite, autoscaling on PostgreSQL)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from tenfold.kernel.sql import create_engine
from tenfold.tasks import TaskClient, TaskRegistry
from tenfold.tasks.autoscale import (
    Autoscaler,
    Load,
    Reason,
    ScaleError,
    ScalePolicy,
    ScaleState,
    decide,
    parse_range,
)
from tenfold.tasks.supervisor import (
    Supervisor,
    WorkerOptions,
    WorkerSetupError,
    bind_task_logging,
    load_registry,
)
from tenfold.tasks.worker import TaskContext
from tests.tasks.apps.harness import WorkerProcess, live_workers, status_counts, until

POLICY = ScalePolicy(1, 8, wait_threshold=5.0, cooldown=30.0)


# -- the autoscale rule ------------------------------------------------------------------


def test_depth_scales_up_only_by_two_or_more() -> None:
    state = ScaleState(2)
    # pending 25 -> target 3: one more than now, within the hysteresis band
    assert decide(POLICY, state, Load(pending=25), 0).reason is Reason.HOLD
    grown = decide(POLICY, state, Load(pending=45), 0)  # target 5
    assert (grown.workers, grown.reason) == (5, Reason.DEPTH)
    capped = decide(POLICY, state, Load(pending=10_000), 0)
    assert capped.workers == 8


def test_the_last_step_to_the_maximum_needs_no_band() -> None:
    small = ScalePolicy(1, 2)
    assert decide(small, ScaleState(1), Load(pending=10), 0).workers == 2


def test_a_long_wait_for_two_checks_adds_one_worker() -> None:
    state = ScaleState(3)
    first = decide(POLICY, state, Load(pending=5, average_wait=9.0), 0)
    assert first.reason is Reason.HOLD and first.state.slow_checks == 1
    second = decide(POLICY, first.state, Load(pending=5, average_wait=9.0), 5)
    assert (second.workers, second.reason) == (4, Reason.WAIT)
    assert second.state.slow_checks == 0
    # a fast check in between resets the count
    reset = decide(POLICY, first.state, Load(pending=5, average_wait=1.0), 5)
    assert reset.state.slow_checks == 0 and reset.workers == 3


def test_pending_work_never_scales_down() -> None:
    decision = decide(POLICY, ScaleState(6), Load(pending=1), 1_000)
    assert decision.workers == 6 and decision.reason is Reason.HOLD


def test_idle_scales_down_one_at_a_time_after_the_cooldown() -> None:
    now = 0.0
    scaler = Autoscaler(POLICY, clock=lambda: now, workers=4)
    assert scaler.observe(Load(0)).reason is Reason.HOLD  # idle from t=0
    now = 29.0
    assert scaler.observe(Load(0)).workers == 4
    now = 30.0
    assert (scaler.observe(Load(0)).workers, scaler.state.last_removal) == (3, 30.0)
    now = 45.0
    assert scaler.observe(Load(0)).workers == 3  # another cool-down before the next one
    now = 60.0
    assert scaler.observe(Load(0)).workers == 2
    now = 61.0
    assert scaler.observe(Load(3)).workers == 2  # work again: the idle clock restarts
    now = 62.0
    assert scaler.observe(Load(0)).workers == 2
    now = 92.0
    assert scaler.observe(Load(0)).workers == 1
    now = 500.0
    assert scaler.observe(Load(0)).workers == 1  # never below the minimum


def test_a_size_outside_the_bounds_is_brought_back() -> None:
    assert decide(POLICY, ScaleState(12), Load(0), 0).workers == 8
    assert decide(POLICY, ScaleState(0), Load(0), 0).reason is Reason.BOUNDS


@pytest.mark.parametrize("text", ["4", "a:b", "0:3", "5:2", ":", "1:2:3"])
def test_bad_autoscale_ranges(text: str) -> None:
    with pytest.raises(ScaleError, match="autoscale"):
        parse_range(text)
    assert parse_range("2:6") == (2, 6)


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"pool": "threads"}, "--pool"),
        ({"pool": "asyncio", "autoscale": "1:3"}, "--autoscale"),
        ({"autoscale": "3:1"}, "--autoscale"),
        ({"concurrency": 0}, "--concurrency"),
        ({"lease_seconds": 10, "heartbeat_seconds": 10}, "--heartbeat-seconds"),
        ({"queues": " , "}, "--queues"),
        ({"grace_seconds": 0}, "--grace-seconds"),
        ({"prefetch": 0}, "--prefetch"),
    ],
)
def test_bad_options_name_their_flag(kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(WorkerSetupError) as err:
        WorkerOptions.build("tests.tasks.apps.naps:registry", **kwargs)
    assert str(err.value).startswith(flag)


def test_options_round_trip_to_a_child() -> None:
    options = WorkerOptions.build(
        "tests.tasks.apps.naps:registry",
        queues="a,b",
        autoscale="1:4",
        resources="gpu,cpu",
        lease_seconds=6,
    )
    assert options.heartbeat_seconds == 2.0
    assert options.resources == ("cpu", "gpu")
    assert WorkerOptions.from_json(options.to_json()) == options


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("no_colon", "expected module:attribute"),
        ("tests.tasks.apps.nothing_here:registry", "cannot import"),
        ("tests.tasks.apps.naps:missing", "is nothing; expected a TaskRegistry"),
        ("tests.tasks.apps.naps:log", "expected a TaskRegistry"),
    ],
)
def test_bad_app_references(ref: str, words: str) -> None:
    with pytest.raises(WorkerSetupError, match=words):
        load_registry(ref)


def test_the_cli_rejects_bad_flags_with_exit_code_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from tenfold.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["worker", "--app", "tests.tasks.apps.nope:registry"])
    assert result.exit_code == 2
    assert "cannot import" in result.output
    monkeypatch.setenv("TENFOLD_WORKER_CONCURRENCY", "0")
    result = runner.invoke(app, ["worker", "--app", "tests.tasks.apps.naps:registry"])
    assert result.exit_code == 2
    assert "--concurrency" in result.output


# -- handler log context --------------------------------------------------------------------


async def test_handlers_log_with_their_task_id() -> None:
    registry = TaskRegistry()
    seen: list[dict[str, Any]] = []

    @registry.task("plain")
    def plain(x: int) -> int:
        seen.append(structlog.contextvars.get_contextvars())
        return x

    @registry.task("aware")
    async def aware(ctx: TaskContext, x: int) -> str:
        seen.append(structlog.contextvars.get_contextvars())
        return ctx.task_id

    bind_task_logging(registry)
    bind_task_logging(registry)  # idempotent
    assert registry["plain"].wants_context and registry["aware"].is_async
    ctx = TaskContext("t-1", 2, "plain")
    assert registry["plain"].fn(x=1, ctx=ctx) == 1
    assert registry["plain"](5) == 5  # a direct call still works
    assert await registry["aware"].fn(x=1, ctx=TaskContext("t-2", 1, "aware")) == "t-2"
    assert seen[0] == {"task_id": "t-1", "task_type": "plain", "attempt": 2}
    assert seen[1] == {}
    assert seen[2]["task_id"] == "t-2"
    assert structlog.contextvars.get_contextvars() == {}


# -- real worker processes ----------------------------------------------------------------


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_asyncio_pool_runs_tasks_and_stops_on_sigterm(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    client = TaskClient.from_engine(engine)
    words = [f"w{i}" for i in range(10)]
    ids = await client.submit_many([{"task_type": "shout", "payload": {"word": w}} for w in words])
    with WorkerProcess(
        db_url, tmp_path, "--pool", "asyncio", "--concurrency", "4", "--poll-seconds", "0.1"
    ) as worker:
        results = [await client.result(task_id, wait=30) for task_id in ids]
        assert results == [w.upper() for w in words]
        assert await worker.stop(signal.SIGTERM) == 0
    output = worker.output()
    assert "pool asyncio (4 tasks at once)" in output
    assert "task types nap, overrun, shout" in output
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    shouts = [line for line in lines if line.get("event") == "apps.shout"]
    assert sorted(line["task_id"] for line in shouts) == sorted(ids)
    assert await live_workers(engine) == []  # it unregistered on the way out


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_autoscale_grows_with_a_burst_and_shrinks_when_idle(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    client = TaskClient.from_engine(engine)
    await client.submit_many([{"task_type": "nap", "payload": {"ms": 150}}] * 60)
    args: tuple[str, ...] = ("--autoscale", "1:3", "--scale-check-seconds", "0.3")
    args += ("--scale-cooldown-seconds", "1", "--poll-seconds", "0.2", "--lease-seconds", "5")
    with WorkerProcess(db_url, tmp_path, *args) as worker:

        async def workers_are(n: int) -> bool:
            return len(await live_workers(engine)) == n

        await until(lambda: workers_are(3), 30, "three worker processes under load")

        async def drained() -> bool:
            return await status_counts(engine) == {"succeeded": 60}

        await until(drained, 30, "every task done")
        await until(lambda: workers_are(1), 20, "back to one worker when idle")
        assert await worker.stop() == 0
    events = [
        orjson.loads(line)
        for line in worker.output().splitlines()
        if line.startswith("{") and '"tasks.autoscale"' in line
    ]
    reasons = [(e["was"], e["workers"], e["reason"]) for e in events]
    assert reasons[0] == (1, 3, "depth")
    assert reasons[-2:] == [(3, 2, "idle"), (2, 1, "idle")]


# -- the supervisor's restart policy, with stand-in children ----------------------------


async def _supervise(db_url: str, exit_code: int, spawns: int) -> tuple[Supervisor, list[float]]:
    options = WorkerOptions.build("tests.tasks.apps.naps:registry", concurrency=1)
    stand_in = [sys.executable, "-S", "-c", f"raise SystemExit({exit_code})"]
    supervisor = Supervisor(options, db_url, child_command=stand_in)
    started: list[float] = []
    spawn = supervisor._spawn

    def counting(slot: int) -> None:
        started.append(time.monotonic())
        spawn(slot)

    supervisor._spawn = counting  # type: ignore[method-assign]
    run = asyncio.create_task(supervisor.run())
    deadline = time.monotonic() + 30
    while len(started) < spawns:
        assert time.monotonic() < deadline, f"only {len(started)} children started"
        await asyncio.sleep(0.02)
    supervisor._on_signal("SIGTERM")
    assert await asyncio.wait_for(run, 10) == 0
    return supervisor, started


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_child_that_keeps_dying_is_restarted_with_growing_back_off(db_url: str) -> None:
    supervisor, started = await _supervise(db_url, exit_code=1, spawns=4)
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[2] >= 2.0
    assert supervisor.failures[0] >= 3


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_recycled_child_is_replaced_at_once(db_url: str) -> None:
    supervisor, started = await _supervise(db_url, exit_code=3, spawns=4)
    assert started[-1] - started[0] < 1.5 * 3  # no back-off (start-up time only)
    assert supervisor.failures.get(0, 0) == 0
