"""Injectable time. Services never call `time.time()` themselves."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def now_ms(self) -> int:
        """Whole milliseconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to; used by tests instead of sleeps."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._ms = round(start * 1000)

    def now(self) -> float:
        return self._ms / 1000

    def now_ms(self) -> int:
        return self._ms

    def advance(self, seconds: float) -> None:
        self._ms += round(seconds * 1000)

    def set(self, seconds: float) -> None:
        self._ms = round(seconds * 1000)


SYSTEM_CLOCK = SystemClock()
