from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenfold.ratelimit.algorithms import (
    Algorithm,
    Decision,
    Limit,
    LimitError,
    SlidingLog,
    fixed_window,
    gcra,
    sliding_log,
    sliding_window_counter,
    token_bucket,
)
from tests.ratelimit.reference import RefBucket, RefCounter, RefFixed, RefLog

# (time step in ms, weight) sequences
steps = st.lists(st.tuples(st.integers(0, 400), st.integers(1, 4)), min_size=1, max_size=40)
T0 = 1_700_000_000_000


def run_state(fn, limit: Limit, seq: list[tuple[int, int]]) -> list[Decision]:  # type: ignore[no-untyped-def]
    state, now, out = None, T0, []
    for dt, weight in seq:
        now += dt
        decision, new = fn(limit, state, now, weight)
        if decision.allowed:
            state = new
        out.append(decision)
    return out


@settings(max_examples=150, deadline=None)
@given(rate=st.integers(1, 12), window=st.integers(50, 2000), extra=st.integers(0, 6), seq=steps)
def test_token_bucket_matches_continuous_reference(rate, window, extra, seq) -> None:  # type: ignore[no-untyped-def]
    burst = rate + extra
    seq = [(dt, min(w, burst)) for dt, w in seq]
    limit = Limit(Algorithm.TOKEN_BUCKET, rate, window, burst)
    ref = RefBucket(rate, window, burst)
    now = T0
    for (dt, weight), got in zip(seq, run_state(token_bucket, limit, seq), strict=True):
        now += dt
        assert (got.allowed, got.remaining, got.retry_ms) == ref.hit(now, weight)


@settings(max_examples=150, deadline=None)
@given(rate=st.integers(1, 12), window=st.integers(50, 2000), extra=st.integers(0, 6), seq=steps)
def test_gcra_decides_exactly_like_the_token_bucket(rate, window, extra, seq) -> None:  # type: ignore[no-untyped-def]
    seq = [(dt, min(w, rate + extra)) for dt, w in seq]
    bucket = Limit(Algorithm.TOKEN_BUCKET, rate, window, rate + extra)
    cell = Limit(Algorithm.GCRA, rate, window, rate + extra)
    a = run_state(token_bucket, bucket, seq)
    b = run_state(gcra, cell, seq)
    assert [(d.allowed, d.remaining, d.retry_ms, d.reset_ms) for d in a] == [
        (d.allowed, d.remaining, d.retry_ms, d.reset_ms) for d in b
    ]


@settings(max_examples=150, deadline=None)
@given(rate=st.integers(1, 12), window=st.integers(50, 2000), seq=steps)
def test_fixed_window_matches_reference(rate, window, seq) -> None:  # type: ignore[no-untyped-def]
    seq = [(dt, min(w, rate)) for dt, w in seq]
    ref = RefFixed(rate, window)
    now = T0
    for (dt, weight), got in zip(
        seq,
        run_state(fixed_window, Limit(Algorithm.FIXED_WINDOW, rate, window, rate), seq),
        strict=True,
    ):
        now += dt
        assert (got.allowed, got.remaining, got.retry_ms) == ref.hit(now, weight)


@settings(max_examples=150, deadline=None)
@given(rate=st.integers(1, 12), window=st.integers(50, 2000), seq=steps)
def test_sliding_log_matches_reference(rate, window, seq) -> None:  # type: ignore[no-untyped-def]
    limit = Limit(Algorithm.SLIDING_WINDOW, rate, window, rate)
    ref, log, now = RefLog(rate, window), SlidingLog(), T0
    for dt, weight in seq:
        now += dt
        weight = min(weight, rate)
        got = sliding_log(limit, log, now, weight)
        if got.allowed:
            log.entries.append((now, weight))
            log.total += weight
        assert (got.allowed, got.remaining, got.retry_ms) == ref.hit(now, weight)
        assert got.retry_ms > 0 or got.allowed


@settings(max_examples=100, deadline=None)
@given(rate=st.integers(1, 8), window=st.integers(20, 300), seq=steps)
def test_sliding_counter_matches_reference(rate, window, seq) -> None:  # type: ignore[no-untyped-def]
    seq = [(dt, min(w, rate)) for dt, w in seq]
    ref, now = RefCounter(rate, window), T0
    limit = Limit(Algorithm.SLIDING_WINDOW_COUNTER, rate, window, rate)
    for (dt, weight), got in zip(seq, run_state(sliding_window_counter, limit, seq), strict=True):
        now += dt
        assert (got.allowed, got.remaining, got.retry_ms) == ref.hit(now, weight)


STEPS = {
    Algorithm.TOKEN_BUCKET: token_bucket,
    Algorithm.GCRA: gcra,
    Algorithm.FIXED_WINDOW: fixed_window,
    Algorithm.SLIDING_WINDOW_COUNTER: sliding_window_counter,
}


class Runner:
    """Feeds hits of weight 1 to one algorithm, committing allowed ones."""

    def __init__(self, algorithm: Algorithm, limit: Limit) -> None:
        self.algorithm, self.limit = algorithm, limit
        self.state: object = None
        self.log = SlidingLog()

    def hit(self, at: int) -> Decision:
        if self.algorithm is Algorithm.SLIDING_WINDOW:
            d = sliding_log(self.limit, self.log, at, 1)
            if d.allowed:
                self.log.entries.append((at, 1))
                self.log.total += 1
            return d
        d, new = STEPS[self.algorithm](self.limit, self.state, at, 1)  # type: ignore[operator]
        if d.allowed:
            self.state = new
        return d


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_retry_after_is_when_the_request_is_first_allowed(algorithm: Algorithm) -> None:
    runner = Runner(algorithm, Limit.of(algorithm, 5, 10))
    now = T0 + 1234
    while runner.hit(now).allowed:
        now += 100
    denied = runner.hit(now)
    assert denied.retry_ms > 0
    assert not runner.hit(now + denied.retry_ms - 1).allowed
    assert runner.hit(now + denied.retry_ms).allowed


def test_limit_validation_names_the_field() -> None:
    cases = [
        (("nope", 1, 1), "algorithm"),
        (("token_bucket", 0, 1), "rate_limit"),
        (("token_bucket", 1, 0.5), "time_window"),
        (("token_bucket", 1, 86_401), "time_window"),
        (("token_bucket", 10, 1, 5), "burst_capacity"),
        (("sliding_window", 1_000_000, 60), "rate_limit"),
        (("token_bucket", 10**9, 86_400), "rate_limit"),
    ]
    for args, field in cases:
        try:
            Limit.of(*args)  # type: ignore[arg-type]
        except LimitError as exc:
            assert exc.field == field, args
        else:
            raise AssertionError(f"{args} accepted")
    assert Limit.of("gcra", 10, 60, 20).capacity == 20
    assert Limit.of("fixed_window", 10, 60).capacity == 10
