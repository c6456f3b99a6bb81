"""The `tenfold` command."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tenfold import SERVICES, __version__
from tenfold.kernel.commands import fail
from tenfold.kernel.errors import MigrationError
from tenfold.settings import Settings, SettingsError, load_settings

T = TypeVar("T")

app = typer.Typer(
    name="tenfold",
    help="Ten backend building blocks in one package.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

GRACEFUL_STOP_SECONDS = 5  # requests still open when a stop begins get this long

console = Console()


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        raise fail(str(exc), 2) from None


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def _migrate(settings: Settings) -> None:
    from tenfold.kernel import sql

    try:
        with console.status("applying migrations…"):
            sql.upgrade(settings.database_url)
    except MigrationError as exc:
        raise fail(
            f"{exc}\n  the database is unchanged; run `tenfold doctor` for details"
        ) from None


def _check_backends(settings: Settings) -> None:
    from tenfold.kernel.runtime import Runtime

    async def probe() -> dict[str, str]:
        runtime = Runtime.from_settings(settings)
        try:
            return await runtime.check()
        finally:
            await runtime.close()

    results = run(probe)
    bad = {k: v for k, v in results.items() if v != "ok"}
    if bad:
        hints = {
            "database": "check TENFOLD_DATABASE_URL and that the server is running",
            "kv": "check TENFOLD_REDIS_URL and that Redis is running (or unset it for memory)",
        }
        lines = [f"{name}: {msg}; {hints[name]}" for name, msg in bad.items()]
        raise fail("backend unreachable at start-up:\n  " + "\n  ".join(lines))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(envvar="TENFOLD_HOST", help="Address")] = None,
    port: Annotated[int | None, typer.Option(envvar="TENFOLD_PORT", help="Port")] = None,
    workers: Annotated[
        int | None, typer.Option(envvar="TENFOLD_WORKERS", help="Worker processes")
    ] = None,
    services: Annotated[
        str | None,
        typer.Option(envvar="TENFOLD_SERVICES", help=f"Comma-separated: {','.join(SERVICES)}"),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            envvar="TENFOLD_SERVER", help="HTTP server: uvicorn, or granian (tenfold[granian])"
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (migrating first in embedded mode)."""
    settings = settings_or_exit(
        host=host, port=port, workers=workers, services=services, server=server
    )
    if settings.server == "granian":
        try:
            import granian  # noqa: F401
        except ImportError:
            raise fail(
                "TENFOLD_SERVER=granian needs granian: pip install 'tenfold[granian]'"
            ) from None
    for name, value in (
        ("TENFOLD_HOST", settings.host),
        ("TENFOLD_PORT", str(settings.port)),
        ("TENFOLD_SERVICES", ",".join(settings.services)),
    ):
        os.environ[name] = value
    _check_backends(settings)
    if settings.should_migrate_on_serve:
        _migrate(settings)
    else:
        _require_migrated(settings)
    if settings.create_admin_key:
        from tenfold.kernel.runtime import Runtime, ensure_admin_key

        async def bootstrap() -> str | None:
            runtime = Runtime.from_settings(settings)
            try:
                return await ensure_admin_key(runtime)
            finally:
                await runtime.close()

        plaintext = run(bootstrap)
        if plaintext:
            console.print(
                "[bold]Created an admin API key[/] (shown once; also in "
                f"{settings.data_dir}/admin.key):\n  {plaintext}",
                highlight=False,
            )
    from tenfold.kernel.telemetry import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if settings.server == "granian":
        _serve_granian(settings)
        return
    import uvicorn

    uvicorn.run(
        "tenfold.app:build_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        # Open SDK event streams would otherwise hold a stop for their whole lifetime; SDKs
        # reconnect to another process with Last-Event-ID.
        timeout_graceful_shutdown=GRACEFUL_STOP_SECONDS,
    )


def _serve_granian(settings: Settings) -> None:
    from granian import Granian
    from granian.constants import Interfaces

    Granian(
        "tenfold.app:build_app",
        factory=True,
        interface=Interfaces.ASGI,
        address=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_enabled=False,  # tenfold logs for itself (structlog)
        log_access=False,
        websockets=False,
        workers_kill_timeout=GRACEFUL_STOP_SECONDS,
    ).serve()


def _require_migrated(settings: Settings) -> None:
    from tenfold.kernel import sql

    current = sql.current_revision(settings.database_url)
    if current != sql.head_revision():
        raise fail(
            f"the database is at revision {current or 'none'}, the code needs "
            f"{sql.head_revision()}; run `tenfold migrate` first"
        )


@app.command()
def migrate() -> None:
    """Apply database migrations up to the latest revision."""
    from tenfold.kernel import sql

    settings = settings_or_exit()
    _check_backends(settings)
    _migrate(settings)
    console.print(f"database at revision {sql.current_revision(settings.database_url)}")


@app.command()
def doctor() -> None:
    """Check each configured backend; say what is wrong and how to fix it."""
    from tenfold.kernel import sql
    from tenfold.kernel.runtime import Runtime

    settings = settings_or_exit()
    table = Table("check", "state", "what to do")
    problems = 0

    def row(name: str, ok: bool, detail: str, fix: str = "") -> None:
        nonlocal problems
        problems += 0 if ok else 1
        table.add_row(name, ("[green]ok[/] " if ok else "[red]FAIL[/] ") + detail, fix)

    data_dir = Path(settings.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".doctor"
        probe.write_text("ok")
        probe.unlink()
        row("data dir", True, str(data_dir))
    except OSError as exc:
        row("data dir", False, str(exc), "set TENFOLD_DATA_DIR to a writable directory")

    async def checks() -> dict[str, str]:
        runtime = Runtime.from_settings(settings)
        try:
            return await runtime.check()
        finally:
            await runtime.close()

    results = run(checks)
    db_ok = results["database"] == "ok"
    row(
        "database",
        db_ok,
        settings.database_url.split("@")[-1] if db_ok else results["database"],
        "" if db_ok else "start the server or fix TENFOLD_DATABASE_URL",
    )
    if db_ok:
        current, head = sql.current_revision(settings.database_url), sql.head_revision()
        row(
            "migrations",
            current == head,
            f"at {current or 'none'}, code needs {head}",
            "" if current == head else "run `tenfold migrate`",
        )
    kv_name = settings.redis_url or "memory (in-process)"
    kv_ok = results["kv"] == "ok"
    row(
        "kv",
        kv_ok,
        kv_name if kv_ok else results["kv"],
        "" if kv_ok else "start Redis or fix TENFOLD_REDIS_URL",
    )
    console.print(table)
    if problems:
        raise typer.Exit(1)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for")],
    scope: Annotated[list[str], typer.Option(help="e.g. ratelimit:admin; repeat for more")],
    owner: Annotated[str | None, typer.Option(help="Who owns what the key creates")] = None,
) -> None:
    """Create an API key; its secret is printed once."""
    from tenfold.kernel.runtime import Runtime

    settings = settings_or_exit()

    async def create() -> str:
        runtime = Runtime.from_settings(settings)
        try:
            _, plaintext = await runtime.keys.create(name, scope, owner)
            return plaintext
        finally:
            await runtime.close()

    try:
        plaintext = run(create)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    console.print(plaintext, highlight=False)


@keys_app.command("list")
def keys_list(
    all_: Annotated[bool, typer.Option("--all", help="Include revoked keys")] = False,
) -> None:
    """List API keys (never their secrets)."""
    from tenfold.kernel.runtime import Runtime

    settings = settings_or_exit()

    async def fetch() -> Any:
        runtime = Runtime.from_settings(settings)
        try:
            return await runtime.keys.list(include_revoked=all_)
        finally:
            await runtime.close()

    table = Table("key id", "name", "scopes", "owner", "created", "revoked")
    for rec in run(fetch):
        table.add_row(
            rec.key_id,
            rec.name,
            " ".join(rec.scopes),
            rec.owner or "",
            f"{rec.created_at:%Y-%m-%d %H:%M}",
            f"{rec.revoked_at:%Y-%m-%d %H:%M}" if rec.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key (effective everywhere within seconds)."""
    from tenfold.kernel.runtime import Runtime

    settings = settings_or_exit()

    async def revoke() -> bool:
        runtime = Runtime.from_settings(settings)
        try:
            return await runtime.keys.revoke(key_id)
        finally:
            await runtime.close()

    if not run(revoke):
        raise fail(f"no active key {key_id!r}; see `tenfold keys list`")
    console.print(f"revoked {key_id}")


@app.command()
def worker(
    app_ref: Annotated[
        str, typer.Option("--app", envvar="TENFOLD_WORKER_APP", help="module:registry to run")
    ],
    queues: Annotated[
        str, typer.Option(envvar="TENFOLD_WORKER_QUEUES", help="Comma-separated queues")
    ] = "default",
    concurrency: Annotated[
        int | None,
        typer.Option(
            envvar="TENFOLD_WORKER_CONCURRENCY",
            help="Processes (process pool; default: CPUs) or tasks at once (asyncio; 10)",
        ),
    ] = None,
    pool: Annotated[
        str, typer.Option(envvar="TENFOLD_WORKER_POOL", help="process or asyncio")
    ] = "process",
    autoscale: Annotated[
        str | None,
        typer.Option(envvar="TENFOLD_WORKER_AUTOSCALE", help="MIN:MAX processes by queue depth"),
    ] = None,
    resources: Annotated[
        str, typer.Option(envvar="TENFOLD_WORKER_RESOURCES", help="Offered tags, e.g. gpu,cpu")
    ] = "",
    lease_seconds: Annotated[
        float, typer.Option(envvar="TENFOLD_WORKER_LEASE_SECONDS", help="Task lease")
    ] = 30.0,
    heartbeat_seconds: Annotated[
        float | None,
        typer.Option(envvar="TENFOLD_WORKER_HEARTBEAT_SECONDS", help="Default: lease/3, max 5"),
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(envvar="TENFOLD_WORKER_POLL_SECONDS", help="Poll without NOTIFY")
    ] = 1.0,
    prefetch: Annotated[
        int | None,
        typer.Option(envvar="TENFOLD_WORKER_PREFETCH", help="Tasks claimed ahead per process"),
    ] = None,
    grace_seconds: Annotated[
        float,
        typer.Option(envvar="TENFOLD_WORKER_GRACE_SECONDS", help="Shutdown grace period"),
    ] = 30.0,
    pool_id: Annotated[
        str, typer.Option(envvar="TENFOLD_WORKER_POOL_ID", help="Worker pool name")
    ] = "default",
    schedules: Annotated[
        bool,
        typer.Option(envvar="TENFOLD_WORKER_SCHEDULES", help="Fire cron schedules here"),
    ] = True,
    service_tasks: Annotated[
        bool,
        typer.Option(
            envvar="TENFOLD_WORKER_SERVICE_TASKS",
            help="Also run the background tasks of tenfold's own services",
        ),
    ] = True,
    scale_check_seconds: Annotated[
        float, typer.Option(envvar="TENFOLD_WORKER_SCALE_CHECK_SECONDS")
    ] = 5.0,
    scale_cooldown_seconds: Annotated[
        float, typer.Option(envvar="TENFOLD_WORKER_SCALE_COOLDOWN_SECONDS")
    ] = 30.0,
    scale_wait_seconds: Annotated[
        float, typer.Option(envvar="TENFOLD_WORKER_SCALE_WAIT_SECONDS")
    ] = 5.0,
) -> None:
    """Run task workers: supervised processes (default) or one asyncio process."""
    from tenfold.tasks.supervisor import WorkerOptions, WorkerSetupError, load_registry, serve

    try:
        options = WorkerOptions.build(
            app_ref,
            queues=queues,
            concurrency=concurrency,
            pool=pool,
            autoscale=autoscale,
            resources=resources,
            lease_seconds=lease_seconds,
            heartbeat_seconds=heartbeat_seconds,
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
        load_registry(options.app)
    except WorkerSetupError as exc:
        raise fail(str(exc), 2) from None
    settings = settings_or_exit()
    _check_backends(settings)
    if settings.should_migrate_on_serve:
        _migrate(settings)
    else:
        _require_migrated(settings)
    serve(options, settings)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def _add_service_commands() -> None:
    import importlib
    import importlib.util

    for name in SERVICES:
        if importlib.util.find_spec(f"tenfold.{name}.cli") is None:
            continue  # a service without commands of its own
        module = importlib.import_module(f"tenfold.{name}.cli")
        app.add_typer(module.app, name=name)


_add_service_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
