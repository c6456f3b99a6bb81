"""`tenfold tasks ...`: submit, inspect, cancel and re-drive tasks, straight on the database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tenfold.kernel.commands import CliError, run_command

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Runtime
    from tenfold.tasks.models import Task
    from tenfold.tasks.service import TaskService

T = TypeVar("T")

app = typer.Typer(
    help="Task queue: submit, show, cancel, retry, statistics, dead letters.",
    no_args_is_help=True,
)
dlq_app = typer.Typer(
    help="The dead letter queue: list and re-drive dead tasks.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")
console = Console()
err = Console(stderr=True)


def _explain(exc: Exception) -> tuple[str, int] | None:
    from tenfold.tasks.models import TaskError

    return (f"{exc.field}: {exc.message}", 2) if isinstance(exc, TaskError) else None


def _with_service(job: Callable[[TaskService], Awaitable[T]]) -> T:
    async def run(runtime: Runtime) -> T:
        from tenfold.tasks.api import service_for

        return await job(service_for(runtime))

    return run_command(run, _explain)


def _at(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


async def _task(service: TaskService, task_id: str) -> Task:
    task = await service.get(task_id)
    if task is None:
        raise CliError(f"task {task_id} does not exist")
    return task


@app.command()
def submit(
    task_type: Annotated[str, typer.Argument(help="The task type, e.g. emails.send")],
    payload: Annotated[str, typer.Option(help="The payload, as JSON")] = "{}",
    priority: Annotated[int, typer.Option(help="1 (most urgent) to 10")] = 5,
    delay: Annotated[float, typer.Option(help="Run no sooner than this many seconds")] = 0.0,
    queue: Annotated[str, typer.Option(help="Queue")] = "default",
    max_retries: Annotated[int, typer.Option(help="Retries after the first attempt")] = 3,
    timeout: Annotated[int, typer.Option(help="Seconds an attempt may run (1..86400)")] = 300,
    depends_on: Annotated[
        list[str] | None, typer.Option(help="A task id this one waits for; repeat for more")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="A repeated key returns the first task")
    ] = None,
) -> None:
    """Submit a task; print its id."""
    import orjson

    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        err.print(f"[red]error:[/] payload: must be JSON ({exc})", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if delay < 0:
        err.print("[red]error:[/] delay: must not be negative", highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    async def job(service: TaskService) -> tuple[str, bool, str]:
        raw: dict[str, Any] = {
            "task_type": task_type,
            "payload": body,
            "priority": priority,
            "queue": queue,
            "max_retries": max_retries,
            "timeout_seconds": timeout,
            "dependencies": depends_on or [],
            "idempotency_key": idempotency_key,
        }
        if delay > 0:
            now = datetime.fromtimestamp(service.clock.now(), UTC)
            raw["scheduled_at"] = now + timedelta(seconds=delay)
        done = (await service.submit([raw], created_by="cli"))[0]
        task = await _task(service, done.task_id)
        return done.task_id, done.created, task.status.value

    task_id, created, status = _with_service(job)
    console.print(task_id, highlight=False, soft_wrap=True)
    if not created:
        err.print(
            f"the idempotency key matched an existing task ({status})",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def show(task_id: str) -> None:
    """Show a task: its state, payload, result or error, and its attempts."""

    async def job(service: TaskService) -> tuple[Task, list[dict[str, Any]]]:
        task = await _task(service, task_id)
        history: Any = await service.store.history(task_id)
        return task, history

    task, history = _with_service(job)
    table = Table(show_header=False, box=None)
    rows: list[tuple[str, str]] = [
        ("task id", task.task_id),
        ("type", task.task_type),
        ("status", task.status.value + (" (cancel requested)" if task.cancel_requested else "")),
        ("queue", task.queue),
        ("priority", str(task.priority)),
        ("attempt", f"{task.attempt} of {task.max_retries + 1}"),
        ("timeout", f"{task.timeout_seconds} s"),
        ("created", _at(task.created_at)),
        ("run at", _at(task.run_at)),
        ("started", _at(task.started_at)),
        ("completed", _at(task.completed_at)),
        ("failed", _at(task.failed_at)),
        ("worker", task.worker_id or ""),
        ("depends on", ", ".join(task.dependencies)),
        ("error", task.error_message or ""),
    ]
    for name, value in rows:
        if value:
            table.add_row(f"[bold]{name}[/]", value)
    table.add_row("[bold]payload[/]", _json(task.payload))
    if task.result is not None:
        table.add_row("[bold]result[/]", _json(task.result))
    console.print(table)
    if task.traceback:
        console.print(task.traceback, highlight=False, markup=False)
    if history:
        attempts = Table("attempt", "status", "worker", "started", "finished", "ms", "error")
        for h in history:
            from tenfold.tasks.timeutil import from_ms

            attempts.add_row(
                str(h["attempt"]),
                h["status"],
                h["worker_id"] or "",
                _at(from_ms(h["started_at_ms"])),
                _at(from_ms(h["completed_at_ms"])),
                "" if h["execution_time_ms"] is None else str(h["execution_time_ms"]),
                (h["error_message"] or "")[:80],
            )
        console.print(attempts)


@app.command()
def cancel(task_id: str) -> None:
    """Cancel a task that has not run; ask a running one to stop."""
    from tenfold.tasks.models import FINISHED, Status

    async def job(service: TaskService) -> Status:
        task = await _task(service, task_id)
        if task.status in FINISHED:
            raise CliError(f"task {task_id} is {task.status.value}; it cannot be cancelled")
        status: Status = await _act(service.cancel, task_id)
        return status

    status = _with_service(job)
    if status is Status.RUNNING:
        console.print(f"task {task_id} is running: its worker was asked to stop")
    else:
        console.print(f"cancelled {task_id}")


@app.command()
def retry(task_id: str) -> None:
    """Re-drive a dead or cancelled task (same id, retries restored)."""

    from tenfold.tasks.api import redrive_one

    async def job(service: TaskService) -> Any:
        return await _act(lambda task_id: redrive_one(service, task_id), task_id)

    _with_service(job)
    console.print(f"re-driven {task_id}: pending")


async def _act(action: Callable[[str], Awaitable[Any]], task_id: str) -> Any:
    from tenfold.tasks.service import TaskConflict

    try:
        status = await action(task_id)
    except TaskConflict as exc:
        raise CliError(str(exc)) from None
    if status is None:
        raise CliError(f"task {task_id} does not exist")
    return status


@app.command()
def stats() -> None:
    """Depth per queue and priority, average wait and throughput over the last minute."""

    async def job(service: TaskService) -> dict[str, Any]:
        return await service.stats()

    data = _with_service(job)
    table = Table(
        "queue",
        "prio",
        "pending",
        "sched",
        "waiting",
        "running",
        "wait s",
        "per min",
        title="task queues (wait and throughput over the last minute)",
    )
    for q in data["queues"]:
        paused = " (paused)" if q["queue"] in data["paused_queues"] else ""
        table.add_row(
            q["queue"] + paused,
            str(q["priority"]),
            str(q["pending_tasks"]),
            str(q["scheduled_tasks"]),
            str(q["waiting_tasks"]),
            str(q["processing_tasks"]),
            f"{q['average_wait_time']:.3f}",
            str(q["tasks_per_minute"]),
        )
    console.print(table)
    console.print(
        f"workers: {data['total_workers']}   dead letters: {data['dead_letter_tasks']}"
        + (f"   paused: {', '.join(data['paused_queues'])}" if data["paused_queues"] else ""),
        highlight=False,
    )
    for item in data["unroutable"]:
        console.print(
            f"[yellow]unroutable:[/] {item['tasks']} ready {item['task_type']} task(s) and no "
            "live worker accepts that type",
            highlight=False,
        )


@dlq_app.command("list")
def dlq_list(
    queue: Annotated[str | None, typer.Option(help="Only this queue")] = None,
    limit: Annotated[int, typer.Option(help="At most this many", min=1, max=500)] = 50,
) -> None:
    """List dead tasks, newest first."""
    from tenfold.tasks.models import Status

    async def job(service: TaskService) -> list[Task]:
        found: Any = await service.store.list_tasks(
            status=Status.DEAD.value, queue=queue, limit=limit
        )
        return list(found)

    dead = _with_service(job)
    if not dead:
        console.print("no dead tasks")
        return
    table = Table(title="dead letters")
    table.add_column("task id", no_wrap=True, min_width=36)
    for name in ("type", "queue", "attempts", "failed", "error"):
        table.add_column(name, overflow="fold")
    for t in dead:
        table.add_row(
            t.task_id,
            t.task_type,
            t.queue,
            str(t.attempt),
            _at(t.failed_at),
            (t.error_message or "")[:80],
        )
    console.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    task_ids: Annotated[list[str] | None, typer.Argument(help="Dead task ids")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead task")] = False,
    queue: Annotated[str | None, typer.Option(help="With --all: only this queue")] = None,
) -> None:
    """Re-drive dead tasks: by id, or --all."""
    if bool(task_ids) == all_:
        err.print(
            "[red]error:[/] give task ids or --all (not both)", highlight=False, soft_wrap=True
        )
        raise typer.Exit(2)
    if queue is not None and not all_:
        err.print("[red]error:[/] --queue only applies with --all", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    from tenfold.tasks.api import RedriveOut, redrive_tasks

    async def job(service: TaskService) -> RedriveOut:
        return await redrive_tasks(service, task_ids or [], everything=all_, queue=queue)

    out = _with_service(job)
    console.print(f"re-driven {len(out.redriven)} task(s)")
    for skip in out.skipped:
        err.print(f"skipped {skip.task_id}: {skip.reason}", highlight=False, soft_wrap=True)
    if out.skipped and not out.redriven:
        raise typer.Exit(1)
