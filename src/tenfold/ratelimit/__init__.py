"""Rate limiter (spec Problem 1): the public surface other code may import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenfold.ratelimit.algorithms import Algorithm, Decision, Limit, LimitError
from tenfold.ratelimit.limiter import RateLimiter

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Mount, Runtime

__all__ = ["Algorithm", "Decision", "Limit", "LimitError", "RateLimiter", "mount"]


def mount(runtime: Runtime) -> Mount:
    from tenfold.ratelimit.api import mount as _mount

    return _mount(runtime)
