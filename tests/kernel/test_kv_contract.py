"""The KV contract: every test runs against the memory backend and against real Redis.

Memory follows the manual clock, so expiry is driven by `clock.advance`; Redis expires keys in
real time, so for Redis the tests assert the TTL the server holds instead of waiting for it.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.crc import key_slot

from tenfold.kernel.clock import ManualClock
from tenfold.kernel.errors import BackendUnavailable, StorageError
from tenfold.kernel.kv import KV, MemoryKV, RedisKV, kv_from_url

DELIVERY_TIMEOUT = 5.0  # seconds; generous, only reached when a message is lost


def follows_clock(kv: KV) -> bool:
    """Whether expiry in this backend is driven by the injected clock."""
    return isinstance(kv, MemoryKV)


async def expires_after(kv: KV, clock: ManualClock, key: str, ttl: float) -> None:
    """The key holds a TTL of `ttl`; on a clock-driven backend it is gone exactly then.

    Redis expires keys in real time, so there the TTL the server holds is all that is checked.
    """
    remaining = await kv.ttl(key)
    assert remaining is not None
    assert ttl - 1 < remaining <= ttl
    if not follows_clock(kv):
        return
    clock.advance(ttl - 0.001)
    assert await kv.get(key) is not None
    assert await kv.ttl(key) == pytest.approx(0.001, abs=1e-6)
    clock.advance(0.001)
    assert await kv.get(key) is None


class Inbox:
    """A pub/sub handler that records messages and lets a test wait for the n-th one."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self._changed = asyncio.Event()

    async def __call__(self, message: bytes) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> list[bytes]:
        async def until() -> None:
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), DELIVERY_TIMEOUT)
        return self.messages


# --- keys ----------------------------------------------------------------------------------


async def test_key_puts_the_tag_in_braces_after_the_prefix(kv: KV) -> None:
    assert kv.key("policy", "7", "tokens") == f"{kv.prefix}:{{policy}}:7:tokens"
    assert kv.key("policy") == f"{kv.prefix}:{{policy}}"


async def test_keys_of_one_tag_share_a_cluster_slot(kv: KV) -> None:
    slots = {key_slot(kv.key("client-42", part).encode()) for part in ("a", "b", "c", "d")}
    assert len(slots) == 1
    assert key_slot(kv.key("client-42").encode()) in slots


# --- get / set / delete --------------------------------------------------------------------


async def test_get_of_a_missing_key_is_none(kv: KV) -> None:
    assert await kv.get(kv.key("t", "missing")) is None


async def test_set_then_get_round_trips_binary_values(kv: KV) -> None:
    key = kv.key("t", "bin")
    value = bytes(range(256))
    assert await kv.set(key, value) is True
    assert await kv.get(key) == value
    assert await kv.set(key, b"second") is True
    assert await kv.get(key) == b"second"


async def test_only_if_absent_refuses_to_overwrite(kv: KV) -> None:
    key = kv.key("t", "nx")
    assert await kv.set(key, b"first", only_if_absent=True) is True
    assert await kv.set(key, b"second", only_if_absent=True) is False
    assert await kv.get(key) == b"first"


async def test_delete_counts_only_keys_that_existed(kv: KV) -> None:
    a, b, c = kv.key("t", "a"), kv.key("t", "b"), kv.key("t", "c")
    await kv.set(a, b"1")
    await kv.set(b, b"2")
    assert await kv.delete(a, b, c) == 2
    assert await kv.get(a) is None
    assert await kv.get(b) is None
    assert await kv.delete(a) == 0
    assert await kv.delete() == 0


# --- ttl -----------------------------------------------------------------------------------


async def test_ttl_is_none_for_missing_keys_and_keys_without_expiry(kv: KV) -> None:
    assert await kv.ttl(kv.key("t", "missing")) is None
    await kv.set(kv.key("t", "forever"), b"x")
    assert await kv.ttl(kv.key("t", "forever")) is None


async def test_set_with_ttl_expires(kv: KV, clock: ManualClock) -> None:
    key = kv.key("t", "expiring")
    await kv.set(key, b"x", ttl=10)
    await expires_after(kv, clock, key, 10)
    if follows_clock(kv):
        assert await kv.ttl(key) is None
        assert await kv.delete(key) == 0


async def test_only_if_absent_succeeds_once_the_old_value_expired(
    kv: KV, clock: ManualClock
) -> None:
    key = kv.key("t", "lock")
    assert await kv.set(key, b"holder-1", ttl=5, only_if_absent=True) is True
    await expires_after(kv, clock, key, 5)
    if follows_clock(kv):
        assert await kv.set(key, b"holder-2", ttl=5, only_if_absent=True) is True
        assert await kv.get(key) == b"holder-2"


async def test_set_without_ttl_clears_a_previous_ttl(kv: KV, clock: ManualClock) -> None:
    key = kv.key("t", "persist")
    await kv.set(key, b"x", ttl=10)
    await kv.set(key, b"y")
    assert await kv.ttl(key) is None
    clock.advance(60)
    assert await kv.get(key) == b"y"


# --- sets ----------------------------------------------------------------------------------


async def test_add_members_answers_only_the_new_ones(kv: KV) -> None:
    key = kv.key("t", "visitors")
    assert await kv.add_members(key, [b"a", b"b", b"a"]) == [b"a", b"b"]
    assert await kv.add_members(key, [b"b", b"c", b"\x00\xff"]) == [b"c", b"\x00\xff"]
    assert await kv.add_members(key, []) == []
    assert await kv.add_members(kv.key("t", "other"), [b"a"]) == [b"a"]


async def test_add_members_ttl_applies_on_creation(kv: KV, clock: ManualClock) -> None:
    key = kv.key("t", "day")
    await kv.add_members(key, [b"a"], ttl=10)
    first = await kv.ttl(key)
    assert first is not None and 9 < first <= 10
    clock.advance(4)
    await kv.add_members(key, [b"b"], ttl=100)
    later = await kv.ttl(key)
    assert later is not None and later <= 10  # a later addition does not push it out
    if follows_clock(kv):  # Redis expires in real time: there the TTL held is what is checked
        assert later == pytest.approx(6)
        clock.advance(6)
        assert await kv.ttl(key) is None
        assert await kv.add_members(key, [b"a"]) == [b"a"]  # a new set


async def test_delete_removes_a_set(kv: KV) -> None:
    key = kv.key("t", "gone")
    await kv.add_members(key, [b"a"])
    assert await kv.delete(key) == 1
    assert await kv.add_members(key, [b"a"]) == [b"a"]


# --- incr ----------------------------------------------------------------------------------


async def test_incr_starts_from_zero_and_adds(kv: KV) -> None:
    key = kv.key("t", "n")
    assert await kv.incr(key) == 1
    assert await kv.incr(key, 5) == 6
    assert await kv.incr(key, -2) == 4
    assert await kv.get(key) == b"4"


async def test_incr_with_ttl_sets_it_on_creation_only(kv: KV, clock: ManualClock) -> None:
    key = kv.key("t", "window")
    assert await kv.incr(key, ttl=10) == 1
    first = await kv.ttl(key)
    assert first is not None
    assert 9 < first <= 10
    clock.advance(4)
    assert await kv.incr(key, ttl=100) == 2
    later = await kv.ttl(key)
    assert later is not None
    assert later <= 10  # a later increment does not push the window out


async def test_incr_with_ttl_restarts_after_expiry(kv: KV, clock: ManualClock) -> None:
    key = kv.key("t", "window")
    await kv.incr(key, ttl=10)
    await kv.incr(key, ttl=10)
    await expires_after(kv, clock, key, 10)
    if follows_clock(kv):
        assert await kv.incr(key, ttl=10) == 1
        assert await kv.ttl(key) == pytest.approx(10)


async def test_incr_of_a_non_integer_is_a_storage_error(kv: KV) -> None:
    key = kv.key("t", "text")
    await kv.set(key, b"not a number")
    with pytest.raises(StorageError):
        await kv.incr(key)
    assert await kv.get(key) == b"not a number"


# --- pub/sub -------------------------------------------------------------------------------


async def test_publish_reaches_every_subscriber_in_order(kv: KV) -> None:
    first, second = Inbox(), Inbox()
    sub1 = await kv.subscribe("news", first)
    sub2 = await kv.subscribe("news", second)
    try:
        for n in range(3):
            await kv.publish("news", f"m{n}".encode())
        assert await first.wait_for(3) == [b"m0", b"m1", b"m2"]
        assert await second.wait_for(3) == [b"m0", b"m1", b"m2"]
    finally:
        await sub1.close()
        await sub2.close()


async def test_publish_only_reaches_the_named_channel(kv: KV) -> None:
    news, other = Inbox(), Inbox()
    sub1 = await kv.subscribe("news", news)
    sub2 = await kv.subscribe("other", other)
    try:
        await kv.publish("other", b"for-other")
        await kv.publish("news", b"for-news")
        assert await news.wait_for(1) == [b"for-news"]
        assert await other.wait_for(1) == [b"for-other"]
    finally:
        await sub1.close()
        await sub2.close()


async def test_a_failing_handler_does_not_stop_delivery(kv: KV) -> None:
    calls: list[bytes] = []

    async def broken(message: bytes) -> None:
        calls.append(message)
        raise RuntimeError("handler bug")

    healthy = Inbox()
    sub1 = await kv.subscribe("news", broken)
    sub2 = await kv.subscribe("news", healthy)
    try:
        await kv.publish("news", b"one")
        await kv.publish("news", b"two")
        assert await healthy.wait_for(2) == [b"one", b"two"]
        assert calls == [b"one", b"two"]  # the broken handler stayed subscribed
    finally:
        await sub1.close()
        await sub2.close()


async def test_closed_subscription_receives_nothing_more(kv: KV) -> None:
    closing, staying = Inbox(), Inbox()
    sub1 = await kv.subscribe("news", closing)
    sub2 = await kv.subscribe("news", staying)
    try:
        await kv.publish("news", b"before")
        await closing.wait_for(1)
        await staying.wait_for(1)
        await sub1.close()
        await kv.publish("news", b"after-1")
        await kv.publish("news", b"after-2")
        # The staying subscriber is the barrier: once it has both messages, a live
        # subscription on the same channel would have had them too.
        assert await staying.wait_for(3) == [b"before", b"after-1", b"after-2"]
        assert closing.messages == [b"before"]
        await sub1.close()  # closing twice is harmless
    finally:
        await sub2.close()


# --- health --------------------------------------------------------------------------------


async def test_ping_answers(kv: KV) -> None:
    await kv.ping()


async def test_redis_ping_on_a_closed_port_is_backend_unavailable(clock: ManualClock) -> None:
    store = RedisKV("redis://127.0.0.1:1/0", "tftest", clock, socket_timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable):
            await store.ping()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "backend"),
    [("", MemoryKV), ("memory://", MemoryKV), ("redis://127.0.0.1:6379/0", RedisKV)],
)
async def test_backend_is_chosen_by_url(url: str, backend: type) -> None:
    store = kv_from_url(url)
    try:
        assert isinstance(store, backend)
    finally:
        await store.close()


def test_unknown_kv_url_is_refused() -> None:
    with pytest.raises(ValueError, match="memcached"):
        kv_from_url("memcached://127.0.0.1:11211")
