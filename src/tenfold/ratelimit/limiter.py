"""The in-process Python API: limit anything, no network hop, sync or asyncio."""

from __future__ import annotations

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.kv import RedisKV
from tenfold.ratelimit.algorithms import Decision, Limit, LimitError
from tenfold.ratelimit.store import CounterStore, Probe
from tenfold.ratelimit.stores.memory import MemoryCounterStore


def check_weight(limit: Limit, weight: int) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
        raise LimitError("weight", "must be a positive integer")
    if weight > limit.capacity:
        raise LimitError("weight", f"{weight} exceeds the capacity {limit.capacity}")


class RateLimiter:
    """`RateLimiter().hit(Limit.of("token_bucket", 100, 60), "user:1")` -> Decision.

    Memory by default; `RateLimiter.from_url("redis://...")` shares counters through Redis.
    Both reach the same decisions for the same sequence of hits.
    """

    def __init__(
        self, store: CounterStore | None = None, *, clock: Clock = SYSTEM_CLOCK, prefix: str = "tf"
    ) -> None:
        self.store: CounterStore = store or MemoryCounterStore()
        # The in-process store's own single-key path (not a subclass: it may behave otherwise).
        self._memory = self.store if type(self.store) is MemoryCounterStore else None
        self.clock = clock
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "tf", clock: Clock = SYSTEM_CLOCK) -> RateLimiter:
        if not url or url.startswith("memory://"):
            return cls(clock=clock, prefix=prefix)
        from tenfold.ratelimit.stores.redis import RedisCounterStore

        store = RedisCounterStore(RedisKV(url, prefix, clock), owns_kv=True)
        return cls(store, clock=clock, prefix=prefix)

    def key(self, limit: Limit, key: str) -> str:
        return f"{self.prefix}:rl:{{{key}}}{limit.key_tail}"

    def hit(self, limit: Limit, key: str, weight: int = 1) -> Decision:
        """Consume `weight` if allowed."""
        if weight != 1:
            check_weight(limit, weight)
        full = self.key(limit, key)
        if self._memory is not None:
            return self._memory.hit_key(full, limit, self.clock.now_ms(), weight)
        return self.store.hit((Probe(full, limit),), self.clock.now_ms(), weight)[0]

    def peek(self, limit: Limit, key: str, weight: int = 1) -> Decision:
        """Would a request of `weight` be allowed? Consumes nothing."""
        check_weight(limit, weight)
        probe = Probe(self.key(limit, key), limit)
        return self.store.hit((probe,), self.clock.now_ms(), weight, commit=False)[0]

    async def ahit(self, limit: Limit, key: str, weight: int = 1) -> Decision:
        if weight != 1:
            check_weight(limit, weight)
        probe = Probe(self.key(limit, key), limit)
        return (await self.store.ahit((probe,), self.clock.now_ms(), weight))[0]

    async def apeek(self, limit: Limit, key: str, weight: int = 1) -> Decision:
        check_weight(limit, weight)
        probe = Probe(self.key(limit, key), limit)
        return (await self.store.ahit((probe,), self.clock.now_ms(), weight, commit=False))[0]

    async def reset(self, limit: Limit, key: str) -> None:
        await self.store.clear([self.key(limit, key)])

    def close(self) -> None:
        self.store.close()

    async def aclose(self) -> None:
        await self.store.aclose()
