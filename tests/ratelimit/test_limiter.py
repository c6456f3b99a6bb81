"""The in-process Python API: sync and asyncio reach the same decisions, on memory and Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tenfold.kernel.clock import ManualClock
from tenfold.ratelimit import Algorithm, Limit, LimitError, RateLimiter
from tests.backends import REDIS_URL, delete_prefix, new_prefix, redis_available


@pytest.fixture(params=["memory", "redis"])
def url(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    if request.param == "memory":
        yield "", "tftest"
        return
    redis_available()
    prefix = new_prefix()
    yield REDIS_URL, prefix
    delete_prefix(prefix)


@pytest.mark.parametrize("algorithm", list(Algorithm))
async def test_sync_and_async_agree(
    url: tuple[str, str], algorithm: Algorithm, clock: ManualClock
) -> None:
    sync = RateLimiter.from_url(url[0], prefix=url[1] + "s", clock=clock)
    asyn = RateLimiter.from_url(url[0], prefix=url[1] + "a", clock=clock)
    limit = Limit.of(algorithm, 3, 10)
    try:
        for step in range(8):
            a = sync.hit(limit, "user", weight=1 + step % 2)
            b = await asyn.ahit(limit, "user", weight=1 + step % 2)
            assert a == b
            assert sync.peek(limit, "user") == await asyn.apeek(limit, "user")
            clock.advance(1.7)
    finally:
        sync.close()
        await asyn.aclose()


async def test_weight_is_validated(clock: ManualClock) -> None:
    limiter = RateLimiter(clock=clock)
    limit = Limit.of("token_bucket", 5, 1, 8)
    assert limiter.hit(limit, "k", weight=8).allowed
    for bad in (0, -1, 9):
        with pytest.raises(LimitError) as err:
            limiter.hit(limit, "k", weight=bad)
        assert err.value.field == "weight"


async def test_reset_forgets_a_key(clock: ManualClock) -> None:
    limiter = RateLimiter(clock=clock)
    limit = Limit.of("fixed_window", 1, 60)
    assert limiter.hit(limit, "k").allowed
    assert not limiter.hit(limit, "k").allowed
    await limiter.reset(limit, "k")
    assert limiter.hit(limit, "k").allowed
