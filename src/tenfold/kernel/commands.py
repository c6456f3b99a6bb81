"""What every `tenfold <service> ...` command shares: one-line errors and their exit codes,
and running a job on this process's settings."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Runtime

T = TypeVar("T")
Explain = Callable[[Exception], "tuple[str, int] | None"]

err = Console(stderr=True)


class CliError(Exception):
    """A one-line error for the user, with the exit code to leave with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr; raise the answer to leave with `code`."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def database_message(exc: Exception) -> str:
    """A database failure in one line, naming what to run next."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    lowered = reason.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"database: {reason}; the database is not migrated: run `tenfold migrate`"
    return f"database: {reason}; run `tenfold doctor`"


def _unexplained(_exc: Exception) -> tuple[str, int] | None:
    return None


def run_command(job: Callable[[Runtime], Awaitable[T]], explain: Explain = _unexplained) -> T:
    """Run `job` with a runtime built from this process's settings, then close it.

    Every failure leaves as one line and an exit code: a `CliError` as it says, a service's
    own errors as `explain` words them (asked first), then invalid settings (2) and an
    unreachable or unmigrated database (1).
    """
    from sqlalchemy.exc import DBAPIError

    from tenfold.kernel.errors import TenfoldError
    from tenfold.kernel.runtime import Runtime
    from tenfold.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise fail(str(exc), 2) from None

    async def main() -> T:
        runtime = Runtime.from_settings(settings)
        try:
            return await job(runtime)
        finally:
            await runtime.close()

    try:
        return asyncio.run(main())
    except CliError as exc:
        message, code = str(exc), exc.code
    except Exception as exc:
        explained = explain(exc)
        if explained is not None:
            message, code = explained
        elif isinstance(exc, SettingsError):
            message, code = str(exc), 2
        elif isinstance(exc, DBAPIError | OSError | TenfoldError):
            message, code = database_message(exc), 1
        else:
            raise
    raise fail(message, code)
