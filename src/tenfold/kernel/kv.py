"""Keys, counters and pub/sub: one contract, an in-process memory backend and a Redis backend.

Keys are built with `KV.key(tag, *parts)`: the tag goes in `{braces}` so every key of one
logical object hashes to the same Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.errors import BackendUnavailable, StorageError

log = structlog.get_logger(__name__)

Handler = Callable[[bytes], Awaitable[None]]


class Subscription(Protocol):
    async def close(self) -> None: ...


class KV(Protocol):
    """The contract every key-value backend meets (see tests/kernel/test_kv_contract.py)."""

    prefix: str
    clock: Clock

    def key(self, tag: str, *parts: str) -> str: ...
    async def get(self, key: str) -> bytes | None: ...
    async def set(
        self, key: str, value: bytes, *, ttl: float | None = None, only_if_absent: bool = False
    ) -> bool: ...
    async def delete(self, *keys: str) -> int: ...
    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int: ...
    async def add_members(
        self, key: str, members: Sequence[bytes], *, ttl: float | None = None
    ) -> list[bytes]:
        """Add `members` to the set at `key`; answer those it did not hold yet (each once, in
        the order given). `ttl` applies when the set is created."""
        ...

    async def ttl(self, key: str) -> float | None: ...
    async def publish(self, channel: str, message: bytes) -> None: ...
    async def subscribe(self, channel: str, handler: Handler) -> Subscription: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


def build_key(prefix: str, tag: str, parts: Sequence[str]) -> str:
    tail = ":".join(parts)
    return f"{prefix}:{{{tag}}}:{tail}" if tail else f"{prefix}:{{{tag}}}"


class _MemorySubscription:
    def __init__(self, bus: dict[str, list[Handler]], channel: str, handler: Handler) -> None:
        self._bus, self._channel, self._handler = bus, channel, handler

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._bus[self._channel].remove(self._handler)


class MemoryKV:
    """In-process backend: the embedded default, and the reference the Redis backend must match."""

    def __init__(self, prefix: str = "tf", clock: Clock = SYSTEM_CLOCK) -> None:
        self.prefix = prefix
        self.clock = clock
        self._data: dict[str, bytes] = {}
        self._sets: dict[str, set[bytes]] = {}
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._bus: dict[str, list[Handler]] = defaultdict(list)

    def key(self, tag: str, *parts: str) -> str:
        return build_key(self.prefix, tag, parts)

    def _alive(self, key: str) -> bool:
        deadline = self._expiry.get(key)
        if deadline is not None and deadline <= self.clock.now():
            self._data.pop(key, None)
            self._sets.pop(key, None)
            self._expiry.pop(key, None)
            return False
        return key in self._data or key in self._sets

    def _sweep(self) -> None:
        now = self.clock.now()
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            self._alive(key)

    def _set_ttl(self, key: str, ttl: float | None) -> None:
        if ttl is None:
            self._expiry.pop(key, None)
            return
        deadline = self.clock.now() + ttl
        self._expiry[key] = deadline
        heapq.heappush(self._heap, (deadline, key))

    async def get(self, key: str) -> bytes | None:
        return self._data.get(key) if self._alive(key) else None

    async def set(
        self, key: str, value: bytes, *, ttl: float | None = None, only_if_absent: bool = False
    ) -> bool:
        self._sweep()
        if only_if_absent and self._alive(key):
            return False
        self._data[key] = value
        self._set_ttl(key, ttl)
        return True

    async def delete(self, *keys: str) -> int:
        removed = 0
        for key in keys:
            if self._alive(key):
                removed += 1
            self._data.pop(key, None)
            self._sets.pop(key, None)
            self._expiry.pop(key, None)
        return removed

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        self._sweep()
        fresh = not self._alive(key)
        try:
            value = (0 if fresh else int(self._data[key])) + amount
        except ValueError:
            raise StorageError(f"value at {key!r} is not an integer") from None
        self._data[key] = str(value).encode()
        if fresh and ttl is not None:
            self._set_ttl(key, ttl)
        return value

    async def add_members(
        self, key: str, members: Sequence[bytes], *, ttl: float | None = None
    ) -> list[bytes]:
        self._sweep()
        if key in self._data and self._alive(key):
            raise StorageError(f"value at {key!r} is not a set")
        held = self._sets.get(key) if self._alive(key) else None
        fresh = held is None
        if held is None:
            held = set()
        distinct = list(dict.fromkeys(members))  # in order, once each
        if held.isdisjoint(distinct):  # all new (a batch of first visits): no loop in Python
            added = distinct
            held.update(distinct)
        else:
            added = [m for m in distinct if m not in held]
            held.update(added)
        if fresh and added:
            self._sets[key] = held
            self._set_ttl(key, ttl)
        return added

    async def ttl(self, key: str) -> float | None:
        if not self._alive(key):
            return None
        deadline = self._expiry.get(key)
        return None if deadline is None else max(0.0, deadline - self.clock.now())

    async def publish(self, channel: str, message: bytes) -> None:
        for handler in list(self._bus.get(channel, ())):
            try:
                await handler(message)
            except Exception:
                log.exception("kv.handler_failed", channel=channel)

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        self._bus[channel].append(handler)
        return _MemorySubscription(self._bus, channel, handler)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._bus.clear()


def _redis_module() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - depends on the install
        raise StorageError(
            "TENFOLD_REDIS_URL is set but redis is not installed; run `pip install tenfold[redis]`"
        ) from None
    return aioredis


@contextlib.contextmanager
def redis_errors() -> Any:
    """Turn redis-py errors into StorageError / BackendUnavailable, in this one place."""
    from redis import exceptions as rex

    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise BackendUnavailable(f"redis unreachable: {exc}") from exc
    except rex.RedisError as exc:
        raise StorageError(f"redis error: {exc}") from exc


def sync_redis_client(url: str, socket_timeout: float = 2.0) -> Any:
    """A blocking redis-py client, for the synchronous Python APIs."""
    _redis_module()
    import redis

    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
    )


_ADD_MEMBERS = """
local added = {}
for i = 2, #ARGV do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then added[#added + 1] = ARGV[i] end
end
local px = tonumber(ARGV[1])
if #added > 0 and px > 0 and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], px)
end
return added
"""


class RedisScript:
    """A Lua script loaded once and called by SHA (re-loaded if the server forgot it)."""

    def __init__(self, kv: RedisKV, source: str) -> None:
        self._kv = kv
        self._script = kv.client.register_script(source)

    @property
    def sha(self) -> str:
        return str(self._script.sha)

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async with self._kv.errors():
            return await self._script(keys=list(keys), args=list(args))


class _RedisSubscription:
    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


class RedisKV:
    """Redis backend (redis-py asyncio with hiredis)."""

    def __init__(
        self,
        url: str,
        prefix: str = "tf",
        clock: Clock = SYSTEM_CLOCK,
        *,
        socket_timeout: float = 2.0,
    ) -> None:
        aioredis = _redis_module()
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
            max_connections=256,
        )
        self._add_members: RedisScript | None = None

    def key(self, tag: str, *parts: str) -> str:
        return build_key(self.prefix, tag, parts)

    @contextlib.asynccontextmanager
    async def errors(self) -> Any:
        with redis_errors():
            yield

    def script(self, source: str | Path) -> RedisScript:
        text = source.read_text() if isinstance(source, Path) else source
        return RedisScript(self, text)

    async def get(self, key: str) -> bytes | None:
        async with self.errors():
            value = await self.client.get(key)
        return None if value is None else bytes(value)

    async def set(
        self, key: str, value: bytes, *, ttl: float | None = None, only_if_absent: bool = False
    ) -> bool:
        px = None if ttl is None else max(1, round(ttl * 1000))
        async with self.errors():
            done = await self.client.set(key, value, px=px, nx=only_if_absent)
        return bool(done)

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        async with self.errors():
            return int(await self.client.delete(*keys))

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        async with self.errors():
            if ttl is None:
                return int(await self.client.incrby(key, amount))
            pipe = self.client.pipeline(transaction=True)
            pipe.incrby(key, amount)
            pipe.pexpire(key, max(1, round(ttl * 1000)), nx=True)
            value, _ = await pipe.execute()
            return int(value)

    async def add_members(
        self, key: str, members: Sequence[bytes], *, ttl: float | None = None
    ) -> list[bytes]:
        if not members:
            return []
        if self._add_members is None:
            self._add_members = self.script(_ADD_MEMBERS)
        px = 0 if ttl is None else max(1, round(ttl * 1000))
        added = await self._add_members([key], [px, *members])
        return [bytes(m) for m in added]

    async def ttl(self, key: str) -> float | None:
        async with self.errors():
            ms = int(await self.client.pttl(key))
        return None if ms < 0 else ms / 1000

    async def publish(self, channel: str, message: bytes) -> None:
        async with self.errors():
            await self.client.publish(f"{self.prefix}:{channel}", message)

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        full = f"{self.prefix}:{channel}"
        ready = asyncio.Event()

        async def pump() -> None:
            backoff = 0.1
            while True:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(full)
                    ready.set()
                    backoff = 0.1
                    while True:
                        msg = await pubsub.get_message(timeout=1.0)
                        if msg is not None and msg["type"] == "message":
                            try:
                                await handler(bytes(msg["data"]))
                            except Exception:
                                log.exception("kv.handler_failed", channel=channel)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("kv.subscription_lost", channel=channel, error=str(exc))
                    ready.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

        task = asyncio.create_task(pump(), name=f"kv-subscribe:{channel}")
        await ready.wait()
        return _RedisSubscription(task)

    async def ping(self) -> None:
        async with self.errors():
            await self.client.ping()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


def kv_from_url(url: str, prefix: str = "tf", clock: Clock = SYSTEM_CLOCK) -> KV:
    """Pick the backend by URL: empty or memory:// for in-process, redis:// for Redis."""
    if not url or url.startswith("memory://"):
        return MemoryKV(prefix, clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisKV(url, prefix, clock)
    raise ValueError(f"unsupported KV URL {url!r}; expected redis://host:port/db or memory://")
