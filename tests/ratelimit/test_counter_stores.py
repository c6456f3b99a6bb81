"""The counter-store contract, over memory and Redis; and memory == Redis, decision for decision."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenfold.kernel.kv import RedisKV
from tenfold.ratelimit.algorithms import Algorithm, Limit
from tenfold.ratelimit.store import CounterStore, Probe
from tenfold.ratelimit.stores.memory import MemoryCounterStore
from tenfold.ratelimit.stores.redis import RedisCounterStore
from tests.backends import REDIS_URL, delete_prefix, new_prefix, redis_available

T0 = 1_700_000_000_000


@pytest.fixture(params=["memory", "redis"])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[tuple[CounterStore, str]]:
    if request.param == "memory":
        yield MemoryCounterStore(), "tftest"
        return
    redis_available()
    prefix = new_prefix()
    store = RedisCounterStore(RedisKV(REDIS_URL, prefix), owns_kv=True)
    yield store, prefix
    await store.aclose()
    delete_prefix(prefix)


@pytest.fixture
def redis_pair() -> Iterator[tuple[MemoryCounterStore, RedisCounterStore, str]]:
    redis_available()
    prefix = new_prefix()
    store = RedisCounterStore(RedisKV(REDIS_URL, prefix))
    yield MemoryCounterStore(), store, prefix
    store.close()
    delete_prefix(prefix)


def key(prefix: str, name: str) -> str:
    return f"{prefix}:rl:{{{name}}}:x"


async def test_a_denial_by_one_policy_consumes_from_none(
    counters: tuple[CounterStore, str],
) -> None:
    store, prefix = counters
    roomy = Probe(key(prefix, "roomy"), Limit.of("fixed_window", 100, 60))
    tight = Probe(key(prefix, "tight"), Limit.of("token_bucket", 2, 60))
    assert [d.allowed for d in await store.ahit([roomy, tight], T0, 1)] == [True, True]
    assert [d.allowed for d in await store.ahit([roomy, tight], T0, 1)] == [True, True]
    third = await store.ahit([roomy, tight], T0, 1)
    assert [d.allowed for d in third] == [True, False]
    # roomy was not charged for the denied request
    alone = await store.ahit([roomy], T0, 1)
    assert alone[0].remaining == 100 - 3


async def test_a_shadow_denial_does_not_deny(counters: tuple[CounterStore, str]) -> None:
    store, prefix = counters
    enforced = Probe(key(prefix, "e"), Limit.of("sliding_window", 10, 60))
    shadow = Probe(key(prefix, "s"), Limit.of("sliding_window", 1, 60), shadow=True)
    first = await store.ahit([enforced, shadow], T0, 1)
    second = await store.ahit([enforced, shadow], T0 + 1, 1)
    assert [d.allowed for d in first] == [True, True]
    assert [d.allowed for d in second] == [True, False]
    assert (await store.ahit([enforced], T0 + 2, 1))[0].remaining == 10 - 3


async def test_peek_consumes_nothing(counters: tuple[CounterStore, str]) -> None:
    store, prefix = counters
    for algorithm in Algorithm:
        probe = Probe(key(prefix, str(algorithm)), Limit.of(algorithm, 3, 60))
        for _ in range(5):
            peeked = await store.ahit([probe], T0, 1, commit=False)
            assert peeked[0].allowed and peeked[0].remaining == 2
        assert (await store.ahit([probe], T0, 1))[0].remaining == 2


async def test_state_expires_into_a_fresh_quota(counters: tuple[CounterStore, str]) -> None:
    store, prefix = counters
    probe = Probe(key(prefix, "exp"), Limit.of("fixed_window", 1, 1))
    t = (T0 // 1000) * 1000
    assert (await store.ahit([probe], t, 1))[0].allowed
    assert not (await store.ahit([probe], t + 999, 1))[0].allowed
    assert (await store.ahit([probe], t + 1000, 1))[0].allowed


ALGOS = list(Algorithm)
probe_specs = st.lists(
    st.tuples(st.sampled_from(ALGOS), st.integers(1, 6), st.integers(1, 3), st.booleans()),
    min_size=1,
    max_size=3,
)
ops = st.lists(
    st.tuples(st.integers(0, 900), st.integers(1, 3), st.booleans()), min_size=1, max_size=30
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=probe_specs, seq=ops)
def test_memory_and_redis_decide_identically(
    redis_pair: tuple[MemoryCounterStore, RedisCounterStore, str],
    specs: list[tuple[Algorithm, int, int, bool]],
    seq: list[tuple[int, int, bool]],
) -> None:
    memory, redis, prefix = redis_pair
    run = uuid.uuid4().hex[:8]
    probes = []
    for i, (algorithm, rate, window_s, shadow) in enumerate(specs):
        limit = Limit.of(algorithm, rate, window_s, rate + (i % 2))
        probes.append(Probe(key(prefix, f"{run}-{i}"), limit, shadow))
    capacity = min(p.limit.capacity for p in probes)
    now = T0 + 17
    for dt, weight, commit in seq:
        now += dt
        weight = min(weight, capacity)
        a = memory.hit(probes, now, weight, commit)
        b = redis.hit(probes, now, weight, commit)
        assert a == b, (now, weight, commit)
