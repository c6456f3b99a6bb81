"""What every `tenfold <service> ...` command shares: one-line errors and their exit codes."""

from __future__ import annotations

import typer
from rich.console import Console

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
