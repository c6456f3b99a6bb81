"""The counter store contract: decide a set of probes atomically, consuming only if all pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tenfold.ratelimit.algorithms import Decision, Limit


@dataclass(slots=True)
class Probe:
    """One counter one check touches: its key, its limit, and whether it only observes.
    Read-only by convention (made per check: a frozen dataclass costs more to build)."""

    key: str
    limit: Limit
    shadow: bool = False


class CounterStore(Protocol):
    """Decide every probe for a request of `weight` at `now_ms`.

    When `commit` is true and no enforcing (non-shadow) probe denies, every probe that allowed
    consumes `weight`; otherwise nothing is consumed. All of it happens atomically.
    """

    def hit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]: ...

    async def ahit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]: ...

    async def clear(self, keys: Sequence[str]) -> None: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...
