"""Injectable time. Services never call `time.time()` themselves."""

from __future__ import annotations

import time
from datetime import UTC, datetime
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


_SECONDS: dict[int, str] = {}  # whole seconds -> "YYYY-MM-DDTHH:MM:SS", for rfc3339_ms


def rfc3339_ms(ms: int) -> str:
    """A millisecond timestamp as RFC 3339 text in UTC, exactly as orjson writes the aware
    datetime (OPT_UTC_Z): "2026-11-28T08:02:28.421000Z", no fraction on a whole second.

    Hot paths answer timestamps a few seconds apart, so each second's text is made once.
    """
    seconds, milli = divmod(ms, 1000)
    text = _SECONDS.get(seconds)
    if text is None:
        if len(_SECONDS) >= 512:
            _SECONDS.clear()
        moment = datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
        text = _SECONDS[seconds] = moment.isoformat()
    return f"{text}.{milli:03d}000Z" if milli else text + "Z"
