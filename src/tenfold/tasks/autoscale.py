"""How many worker processes a supervisor should run: queue depth and wait time in, a number
of workers out (no I/O; time is handed in).

The spec's rule sets the target: one worker per 10 pending tasks plus one, within MIN..MAX.
Hysteresis keeps the pool from thrashing:

- up by depth only when the target exceeds the current size by at least `min_step` (or by
  whatever is left below the maximum);
- up by one when the average wait stayed above `wait_threshold` for `wait_checks` checks
  in a row, even if the depth rule would not move;
- down by one only when nothing was pending for `cooldown` seconds, and then at most one
  worker per `cooldown` seconds; never down while work is pending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum


class ScaleError(ValueError):
    """An autoscale setting is invalid."""


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    minimum: int
    maximum: int
    tasks_per_worker: int = 10  # the spec: target = pending // 10 + 1
    min_step: int = 2  # a depth target must differ by this much before the pool moves
    wait_threshold: float = 5.0  # seconds of average wait that count as falling behind
    wait_checks: int = 2  # ... for this many consecutive checks
    cooldown: float = 30.0  # seconds without pending work before a worker is removed

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ScaleError(
                f"autoscale: expected 1 <= MIN <= MAX, got {self.minimum}:{self.maximum}"
            )
        if self.tasks_per_worker < 1 or self.min_step < 1 or self.wait_checks < 1:
            raise ScaleError("autoscale: tasks_per_worker, min_step and wait_checks must be >= 1")
        if self.cooldown < 0 or self.wait_threshold < 0:
            raise ScaleError("autoscale: cooldown and wait_threshold must be >= 0")

    def bound(self, workers: int) -> int:
        return max(self.minimum, min(self.maximum, workers))

    def target(self, pending: int) -> int:
        return self.bound(pending // self.tasks_per_worker + 1)


def parse_range(text: str) -> tuple[int, int]:
    """`MIN:MAX` as given to `--autoscale`, e.g. `2:8`."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        minimum, maximum = int(low), int(high)
    except ValueError:
        raise ScaleError(f"autoscale: expected MIN:MAX such as 1:8, got {text!r}") from None
    ScalePolicy(minimum, maximum)  # validates the bounds
    return minimum, maximum


@dataclass(frozen=True, slots=True)
class Load:
    """What the queues look like at one check."""

    pending: int  # ready to run now
    average_wait: float = 0.0  # seconds from due to started, recent attempts


@dataclass(frozen=True, slots=True)
class ScaleState:
    workers: int
    slow_checks: int = 0  # consecutive checks with the wait above the threshold
    idle_since: float | None = None  # when pending work was last seen gone
    last_removal: float | None = None


class Reason(StrEnum):
    HOLD = "hold"
    BOUNDS = "bounds"
    DEPTH = "depth"
    WAIT = "wait"
    IDLE = "idle"


@dataclass(frozen=True, slots=True)
class Decision:
    workers: int
    state: ScaleState
    reason: Reason

    @property
    def changed(self) -> bool:
        return self.reason is not Reason.HOLD


def decide(policy: ScalePolicy, state: ScaleState, load: Load, now: float) -> Decision:
    """The pool size after one check."""
    current = state.workers
    if policy.bound(current) != current:
        workers = policy.bound(current)
        return Decision(workers, ScaleState(workers), Reason.BOUNDS)
    if load.pending <= 0:
        idle_since = state.idle_since if state.idle_since is not None else now
        last = state.last_removal
        quiet_from = idle_since if last is None else max(idle_since, last)
        if current > policy.minimum and now - quiet_from >= policy.cooldown:
            smaller = ScaleState(current - 1, idle_since=idle_since, last_removal=now)
            return Decision(current - 1, smaller, Reason.IDLE)
        return Decision(current, replace(state, slow_checks=0, idle_since=idle_since), Reason.HOLD)
    slow = state.slow_checks + 1 if load.average_wait > policy.wait_threshold else 0
    busy = ScaleState(current, slow, None, state.last_removal)
    target = policy.target(load.pending)
    step = min(policy.min_step, policy.maximum - current)
    if target > current and target - current >= step:
        return Decision(target, replace(busy, workers=target, slow_checks=0), Reason.DEPTH)
    if slow >= policy.wait_checks and current < policy.maximum:
        return Decision(current + 1, replace(busy, workers=current + 1, slow_checks=0), Reason.WAIT)
    return Decision(current, busy, Reason.HOLD)


class Autoscaler:
    """`decide` with its state kept between checks and time from an injected clock."""

    def __init__(self, policy: ScalePolicy, clock: Callable[[], float], workers: int) -> None:
        self.policy = policy
        self.clock = clock
        self.state = ScaleState(policy.bound(workers))

    @property
    def workers(self) -> int:
        return self.state.workers

    def observe(self, load: Load) -> Decision:
        decision = decide(self.policy, self.state, load, self.clock())
        self.state = decision.state
        return decision
