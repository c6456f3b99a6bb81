"""Reliability of `tenfold worker` as real processes on PostgreSQL: kill -9 of a worker, a
database restart, a synchronous task that overruns its timeout, and SIGTERM with tasks
running. Nothing may be lost, and each task succeeds exactly once in its execution history."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel.sql import create_engine
from tenfold.tasks import Status, TaskClient
from tests.tasks.apps import naps as apps
from tests.tasks.apps.harness import WorkerProcess, live_workers, rows, status_counts, until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("db_url", ["postgres"], indirect=True),
]

FAST_LEASES = ("--lease-seconds", "3", "--heartbeat-seconds", "0.5", "--poll-seconds", "0.2")
STARTUP = 30.0  # seconds allowed for the supervisor and its children to come up


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


async def naps(engine: AsyncEngine, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    client = TaskClient.from_engine(engine)
    return await client.submit_many(
        [{"task_type": "nap", "payload": {"ms": rng.randint(50, 200)}} for _ in range(n)]
    )


def restart_command() -> list[str]:
    """pg_ctlcluster's restart of the one local cluster (fast mode: clients are cut off)."""
    ctl = shutil.which("pg_ctlcluster")
    versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
    if ctl is None or len(versions) != 1:
        pytest.skip("needs a local PostgreSQL cluster managed by pg_ctlcluster")
    return [ctl, "--skip-systemctl-redirect", versions[0], "main", "restart", "-m", "fast"]


async def succeeded(engine: AsyncEngine) -> int:
    return (await status_counts(engine)).get("succeeded", 0)


async def assert_each_succeeded_exactly_once(engine: AsyncEngine, ids: list[str]) -> None:
    wins = dict(
        await rows(
            engine,
            "SELECT task_id, count(*) FROM task_execution_history "
            "WHERE status = 'succeeded' GROUP BY task_id",
        )
    )
    assert wins == dict.fromkeys(ids, 1)
    assert await status_counts(engine) == {"succeeded": len(ids)}


async def test_kill_9_of_a_worker_in_the_middle_of_100_tasks(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    ids = await naps(engine, 100, seed=9)
    with WorkerProcess(db_url, tmp_path, "--concurrency", "2", *FAST_LEASES) as worker:

        async def under_way() -> bool:
            return await succeeded(engine) >= 15

        await until(under_way, STARTUP, "15 tasks done")
        holders = await rows(
            engine,
            "SELECT DISTINCT w.worker_id, w.pid FROM tasks t "
            "JOIN task_workers w ON w.worker_id = t.worker_id WHERE t.status = 'running'",
        )
        assert holders, "no worker holds a running task"
        victim_id, victim_pid = holders[0]
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = await succeeded(engine)

        async def all_done() -> bool:
            return await succeeded(engine) == 100

        await until(all_done, 25, "all 100 tasks succeeded after the kill")
        assert killed_at < 100, "the kill came after the work"
        assert await worker.stop() == 0
    await assert_each_succeeded_exactly_once(engine, ids)
    others = await rows(
        engine,
        "SELECT status, worker_id FROM task_execution_history WHERE status <> 'succeeded'",
    )
    # Only the killed worker's attempts were lost, and lease expiry recorded each of them.
    assert others and {status for status, _ in others} == {"lost"}
    assert {worker_id for _, worker_id in others} == {victim_id}
    assert '"tasks.child_died"' in worker.output()


async def test_postgresql_restart_while_workers_run(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    restart = restart_command()
    ids = await naps(engine, 100, seed=5)
    lease = ("--lease-seconds", "6", "--heartbeat-seconds", "0.5", "--poll-seconds", "0.2")
    with WorkerProcess(db_url, tmp_path, "--concurrency", "2", *lease) as worker:

        async def under_way() -> bool:
            return await succeeded(engine) >= 15

        await until(under_way, STARTUP, "15 tasks done")
        done_before = await succeeded(engine)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *restart, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        said, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, said.decode()
        restart_seconds = time.monotonic() - started

        async def all_done() -> bool:
            return await succeeded(engine) == 100

        await until(all_done, 25, "all 100 tasks succeeded after the restart")
        assert worker.running(), "the supervisor died with the database"
        assert await worker.stop() == 0
    assert done_before < 100, "the restart came after the work"
    assert restart_seconds < 20
    await assert_each_succeeded_exactly_once(engine, ids)
    noticed = ("claim_failed", "complete_failed", "heartbeat_failed", "listen_lost")
    assert any(f'"tasks.{event}"' in worker.output() for event in noticed)


async def test_a_sync_task_overrunning_its_timeout_is_failed_and_its_worker_replaced(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    client = TaskClient.from_engine(engine)
    with WorkerProcess(db_url, tmp_path, "--concurrency", "2", *FAST_LEASES) as worker:

        async def two_workers() -> bool:
            return len(await live_workers(engine)) == 2

        await until(two_workers, STARTUP, "two worker processes")
        first_pids = {pid for _, pid, _ in await live_workers(engine)}
        bad = await client.submit(apps.registry["overrun"].options(payload={"seconds": 60}))
        good = await naps(engine, 20, seed=3)

        async def bad_finished() -> bool:
            task = await client.get(bad)
            return task is not None and task.status is Status.DEAD

        await until(bad_finished, 20, "the overrunning task failed")
        for task_id in good:
            assert isinstance(await client.result(task_id, wait=20), int)

        async def replaced() -> bool:
            pids = {pid for _, pid, _ in await live_workers(engine)}
            return len(pids) == 2 and bool(pids - first_pids)

        await until(replaced, STARTUP, "a new worker process in place of the recycled one")
        assert await worker.stop() == 0
    [attempt] = await client.service.store.history(bad)
    assert attempt["status"] == "timeout"
    task = await client.get(bad)
    assert task is not None and task.error_message == "timed out after 1 s"
    output = worker.output()
    assert '"tasks.worker_recycled"' in output
    assert '"code": 3' in output  # the child left on purpose and was replaced


async def test_sigterm_lets_running_tasks_finish_and_hands_back_the_rest(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    client = TaskClient.from_engine(engine)
    ids = await client.submit_many(
        [{"task_type": "nap", "payload": {"ms": 1500, "mark_dir": str(marks)}}] * 8
    )
    args = ("--concurrency", "2", "--grace-seconds", "10", *FAST_LEASES)
    with WorkerProcess(db_url, tmp_path, *args) as worker:

        async def two_running() -> bool:
            return len(os.listdir(marks)) >= 2

        await until(two_running, STARTUP, "two tasks running", every=0.02)
        started = time.monotonic()
        code = await worker.stop(signal.SIGTERM, within=12)
        elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 10
    ran = set(os.listdir(marks))
    tasks = {t: await client.get(t) for t in ids}
    for task_id, task in tasks.items():
        assert task is not None
        if task_id in ran:
            assert task.status is Status.SUCCEEDED, "a running task did not finish"
        else:
            assert (task.status, task.attempt) == (Status.PENDING, 0), "not handed back"
    assert (
        await rows(engine, "SELECT status FROM task_execution_history WHERE status <> 'succeeded'")
        == []
    )


async def test_sigterm_releases_tasks_that_outlast_the_grace_period(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    client = TaskClient.from_engine(engine)
    ids = await client.submit_many(
        [{"task_type": "nap", "payload": {"ms": 60_000, "mark_dir": str(marks)}}] * 4
    )
    grace = 3.0
    args = ("--concurrency", "2", "--grace-seconds", str(grace), *FAST_LEASES)
    with WorkerProcess(db_url, tmp_path, *args) as worker:

        async def two_running() -> bool:
            return len(os.listdir(marks)) >= 2

        await until(two_running, STARTUP, "two tasks running", every=0.02)
        started = time.monotonic()
        code = await worker.stop(signal.SIGTERM, within=grace + 5)
        elapsed = time.monotonic() - started
    assert code == 0, worker.output()[-3000:]
    assert elapsed < grace + 1
    for task_id in ids:
        task = await client.get(task_id)
        assert task is not None
        assert (task.status, task.attempt, task.worker_id) == (Status.PENDING, 0, None)
    assert await rows(engine, "SELECT status FROM task_execution_history") == []
    assert await live_workers(engine) == []
    assert '"tasks.worker_released"' in worker.output()
