"""In-process counters: the embedded default and the fastest path (no I/O at all)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from tenfold.ratelimit.algorithms import (
    Algorithm,
    Decision,
    Limit,
    SlidingLog,
    fixed_window,
    gcra,
    sliding_log,
    sliding_window_counter,
    token_bucket,
)
from tenfold.ratelimit.store import Probe

Step = Callable[[Limit, Any, int, int], tuple[Decision, Any]]
_STEP: dict[Algorithm, Step] = {
    Algorithm.TOKEN_BUCKET: token_bucket,
    Algorithm.GCRA: gcra,
    Algorithm.FIXED_WINDOW: fixed_window,
    Algorithm.SLIDING_WINDOW_COUNTER: sliding_window_counter,
}
_SWEEP_EVERY = 50_000


class MemoryCounterStore:
    """Counter states in a dict, each with the time after which it equals a fresh state."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[int, Any]] = {}  # key -> (expires_ms, state)
        self._lock = threading.Lock()
        self._writes = 0

    def hit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]:
        with self._lock:
            if len(probes) == 1:
                return [self._one(probes[0], now_ms, weight, commit)]
            return self._many(probes, now_ms, weight, commit)

    def hit_key(self, key: str, limit: Limit, now_ms: int, weight: int) -> Decision:
        """`hit` of one unshadowed probe, committed: the in-process limiter's call, without
        building the probe and the list."""
        with self._lock:
            if limit.algorithm is Algorithm.SLIDING_WINDOW:
                return self._sliding(key, limit, now_ms, weight, True)
            return self._stepped(key, limit, now_ms, weight, True)

    async def ahit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]:
        return self.hit(probes, now_ms, weight, commit)

    def _state(self, key: str, now_ms: int) -> Any:
        entry = self._states.get(key)
        if entry is None:
            return None
        if entry[0] <= now_ms:
            del self._states[key]
            return None
        return entry[1]

    def _log(self, key: str, now_ms: int) -> SlidingLog:
        log = self._state(key, now_ms)
        if log is None:
            log = SlidingLog()
            self._states[key] = (now_ms + 1, log)
        return log  # type: ignore[no-any-return]

    def _sliding(self, key: str, limit: Limit, now_ms: int, weight: int, commit: bool) -> Decision:
        log = self._log(key, now_ms)
        decision = sliding_log(limit, log, now_ms, weight)
        if commit and decision.allowed:
            log.entries.append((now_ms, weight))
            log.total += weight
            self._states[key] = (now_ms + limit.window_ms, log)
            self._count_write(now_ms)
        elif not log.entries:
            del self._states[key]
        return decision

    def _stepped(self, key: str, limit: Limit, now_ms: int, weight: int, commit: bool) -> Decision:
        """One key under an algorithm with a small state (all but the sliding-window log)."""
        decision, state = _STEP[limit.algorithm](limit, self._state(key, now_ms), now_ms, weight)
        if commit and decision.allowed:
            self._states[key] = (now_ms + decision.reset_ms + 1, state)
            self._count_write(now_ms)
        return decision

    def _one(self, probe: Probe, now_ms: int, weight: int, commit: bool) -> Decision:
        limit = probe.limit
        if limit.algorithm is Algorithm.SLIDING_WINDOW:
            return self._sliding(probe.key, limit, now_ms, weight, commit)
        return self._stepped(probe.key, limit, now_ms, weight, commit)

    def _many(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool
    ) -> list[Decision]:
        decisions: list[Decision] = []
        writes: list[tuple[Probe, Any, Decision]] = []
        denied = False
        for probe in probes:
            limit = probe.limit
            if limit.algorithm is Algorithm.SLIDING_WINDOW:
                log = self._log(probe.key, now_ms)
                decision = sliding_log(limit, log, now_ms, weight)
                state: Any = log
            else:
                decision, state = _STEP[limit.algorithm](
                    limit, self._state(probe.key, now_ms), now_ms, weight
                )
            decisions.append(decision)
            if decision.allowed:
                writes.append((probe, state, decision))
            elif not probe.shadow:
                denied = True
        if commit and not denied:
            for probe, state, decision in writes:
                if isinstance(state, SlidingLog):
                    state.entries.append((now_ms, weight))
                    state.total += weight
                    self._states[probe.key] = (now_ms + probe.limit.window_ms, state)
                else:
                    self._states[probe.key] = (now_ms + decision.reset_ms + 1, state)
            self._count_write(now_ms)
        return decisions

    def _count_write(self, now_ms: int) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            expired = [k for k, (exp, _) in self._states.items() if exp <= now_ms]
            for key in expired:
                del self._states[key]

    async def clear(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._states.pop(key, None)

    def __len__(self) -> int:
        return len(self._states)

    def close(self) -> None:
        self._states.clear()

    async def aclose(self) -> None:
        self.close()
