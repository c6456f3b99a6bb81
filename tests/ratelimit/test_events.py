"""Sampled decision events and `async` checks."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from tenfold.kernel.clock import ManualClock
from tenfold.kernel.kv import RedisKV
from tenfold.kernel.sql import create_engine
from tenfold.ratelimit.api import build_policy
from tenfold.ratelimit.models import CheckContext
from tenfold.ratelimit.service import EVENT_QUEUE, EVENTS_DROPPED, RateLimitService
from tenfold.ratelimit.stores.memory import MemoryCounterStore
from tenfold.ratelimit.stores.redis import RedisCounterStore
from tenfold.ratelimit.stores.sql import SqlPolicyStore, events
from tests.backends import REDIS_URL, delete_prefix, new_prefix, redis_available


async def make_service(
    db_url: str, counters: Any, clock: ManualClock, sample: float, prefix: str = "tftest"
) -> Any:
    engine = create_engine(db_url)
    store = SqlPolicyStore(engine)
    policy = build_policy(
        {
            "name": "p",
            "algorithm": "fixed_window",
            "rate_limit": 2,
            "time_window": 60,
            "applies_to_all": True,
        }
    )
    await store.create(policy, datetime.fromtimestamp(clock.now(), UTC))
    service = RateLimitService(
        store, counters, clock=clock, events_sample=sample, rng=random.Random(7), prefix=prefix
    )
    await service.reload()
    return service, engine


async def test_denials_are_recorded_and_allowed_ones_sampled(
    db_url: str, clock: ManualClock
) -> None:
    service, engine = await make_service(db_url, MemoryCounterStore(), clock, sample=0.0001)
    ctx = CheckContext("c1", resource="/x")
    outcomes = [(await service.check(ctx)).allowed for _ in range(5)]
    assert outcomes == [True, True, False, False, False]
    assert await service.flush_events() == 3
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(events))).mappings().all()
    assert sorted(r["action"] for r in rows) == ["deny", "deny", "deny"]
    assert rows[0]["client_id"] == "c1" and rows[0]["request_metadata"]["resource"] == "/x"
    await engine.dispose()


async def test_a_full_event_queue_drops_with_a_counter(db_url: str, clock: ManualClock) -> None:
    service, engine = await make_service(db_url, MemoryCounterStore(), clock, sample=1.0)
    ctx = CheckContext("c1")
    for _ in range(EVENT_QUEUE):
        service.events.put_nowait({})
    before = EVENTS_DROPPED._value.get()
    await service.check(ctx)  # answered although its event cannot be queued
    assert EVENTS_DROPPED._value.get() == before + 1
    await engine.dispose()


async def test_async_checks_answer_locally_and_reach_redis_in_a_batch(
    db_url: str, clock: ManualClock
) -> None:
    redis_available()
    prefix = new_prefix()
    kv = RedisKV(REDIS_URL, prefix, clock)
    service, engine = await make_service(db_url, RedisCounterStore(kv), clock, 0.0, prefix)
    try:
        ctx = CheckContext("c1")
        local = [(await service.check(ctx, background=True)).allowed for _ in range(3)]
        assert local == [True, True, False]  # the local view enforces the limit at once
        shared = await service.status(ctx)
        assert shared.applied[0].decision.remaining == 2  # nothing reached Redis yet
        assert await service.flush_pending() == 3
        shared = await service.status(ctx)
        assert shared.applied[0].decision.remaining == 0
    finally:
        await kv.close()
        await engine.dispose()
        delete_prefix(prefix)
