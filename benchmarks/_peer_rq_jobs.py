"""RQ job functions for `python -m benchmarks tasks` (imported by `rq worker` by name)."""

from __future__ import annotations

import time


def noop() -> None:
    return None


def stamp() -> float:
    return time.time()
