"""Errors every layer understands. Driver exceptions are turned into these in the kernel."""

from __future__ import annotations


class TenfoldError(Exception):
    """Base of tenfold's own errors."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class StorageError(TenfoldError):
    """A storage backend failed."""


class BackendUnavailable(StorageError):
    """A storage backend could not be reached."""


class MigrationError(StorageError):
    """A database migration failed; the database was left at its previous revision."""


class FieldError(ValueError):
    """Input is invalid; `field` names the offending input (422 over HTTP)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
