"""Redis counters: every probe of a check decided in one Lua script, one round trip.

The hot path talks RESP directly (tenfold.kernel.redis_wire); a URL the wire does not support
(TLS) goes through redis-py instead.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenfold.kernel.kv import RedisKV, redis_errors, sync_redis_client
from tenfold.kernel.redis_wire import AsyncWire, SyncWire, WireUnsupported, parse_redis_url
from tenfold.ratelimit.algorithms import ALGORITHM_CODES, Decision, Limit
from tenfold.ratelimit.store import Probe

CHECK_LUA = (Path(__file__).parent / "lua" / "check.lua").read_text()
CHECK_SHA = hashlib.sha1(CHECK_LUA.encode(), usedforsecurity=False).hexdigest()


def _args(
    probes: Sequence[Probe], now_ms: int, weight: int, commit: bool
) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [now_ms, weight, 1 if commit else 0, len(probes)]
    for probe in probes:
        limit = probe.limit
        keys.append(probe.key)
        keys.append(probe.key + ":m")
        args.extend(
            (
                ALGORITHM_CODES[limit.algorithm],
                limit.rate,
                limit.window_ms,
                limit.burst,
                1 if probe.shadow else 0,
            )
        )
    return keys, args


# --- the same command, packed for the wire -------------------------------------------------
# EVALSHA sha numkeys keys... args..., as `encode_command` would pack it (a test checks that),
# built from pre-packed pieces: the command's prefix and each limit's four numbers.


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


_EVALSHA = _bulk(b"EVALSHA") + _bulk(CHECK_SHA.encode())
_FLAG = (_bulk(b"0"), _bulk(b"1"))
_LIMIT_BLOCKS: dict[Limit, bytes] = {}


def _limit_block(limit: Limit) -> bytes:
    block = _LIMIT_BLOCKS.get(limit)
    if block is None:
        numbers = (ALGORITHM_CODES[limit.algorithm], limit.rate, limit.window_ms, limit.burst)
        block = b"".join(_bulk(b"%d" % number) for number in numbers)
        if len(_LIMIT_BLOCKS) >= 4096:
            _LIMIT_BLOCKS.clear()
        _LIMIT_BLOCKS[limit] = block
    return block


def _packed(probes: Sequence[Probe], now_ms: int, weight: int, commit: bool) -> bytes:
    """What `encode_command(b"EVALSHA", CHECK_SHA, len(keys), *keys, *args)` packs for
    `keys, args = _args(...)`, with less Python work per check."""
    n = len(probes)
    count, now, amount = b"%d" % n, b"%d" % now_ms, b"%d" % weight
    parts = [b"*%d\r\n%s%s" % (7 + 7 * n, _EVALSHA, _bulk(b"%d" % (2 * n)))]
    for probe in probes:
        key = probe.key.encode()
        parts.append(b"$%d\r\n%s\r\n$%d\r\n%s:m\r\n" % (len(key), key, len(key) + 2, key))
    parts.append(
        b"$%d\r\n%s\r\n$%d\r\n%s\r\n%s$%d\r\n%s\r\n"
        % (len(now), now, len(amount), amount, _FLAG[1 if commit else 0], len(count), count)
    )
    for probe in probes:
        parts.append(_limit_block(probe.limit))
        parts.append(_FLAG[1 if probe.shadow else 0])
    return b"".join(parts)


def _decisions(reply: Any) -> list[Decision]:
    return [Decision(bool(int(r[0])), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in reply]


class RedisCounterStore:
    """Counter states in Redis, through the RESP wire (or redis-py for a TLS URL)."""

    def __init__(self, kv: RedisKV, *, owns_kv: bool = False) -> None:
        self.kv = kv
        self.owns_kv = owns_kv
        self._script = kv.script(CHECK_LUA)
        self._sync_client: Any = None
        self._sync_script: Any = None
        try:
            parse_redis_url(kv.url)
            self._use_wire = True
        except WireUnsupported:
            self._use_wire = False
        self._sync_wire: SyncWire | None = None
        self._async_wire: AsyncWire | None = None
        self._wire_lock = threading.Lock()

    def _sync(self) -> Any:
        if self._sync_script is None:
            self._sync_client = sync_redis_client(self.kv.url)
            self._sync_script = self._sync_client.register_script(CHECK_LUA)
        return self._sync_script

    def _new_sync_wire(self) -> SyncWire:
        with self._wire_lock:
            if self._sync_wire is None:
                self._sync_wire = SyncWire(self.kv.url)
            return self._sync_wire

    def _new_async_wire(self) -> AsyncWire:
        with self._wire_lock:
            if self._async_wire is None:
                self._async_wire = AsyncWire(self.kv.url)
            return self._async_wire

    def hit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]:
        if self._use_wire:
            wire = self._sync_wire or self._new_sync_wire()
            payload = _packed(probes, now_ms, weight, commit)
            return _decisions(wire.evalsha_packed(payload, CHECK_LUA))
        keys, args = _args(probes, now_ms, weight, commit)
        script = self._sync()
        with redis_errors():
            return _decisions(script(keys=keys, args=args))

    async def ahit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]:
        if self._use_wire:
            wire = self._async_wire or self._new_async_wire()
            payload = _packed(probes, now_ms, weight, commit)
            return _decisions(await wire.evalsha_packed(payload, CHECK_LUA))
        keys, args = _args(probes, now_ms, weight, commit)
        return _decisions(await self._script(keys, args))

    async def clear(self, keys: Sequence[str]) -> None:
        if keys:
            await self.kv.delete(*keys, *(k + ":m" for k in keys))

    def close(self) -> None:
        if self._sync_wire is not None:
            self._sync_wire.close()
        if self._async_wire is not None:
            self._async_wire.abort()
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None
            self._sync_script = None

    async def aclose(self) -> None:
        if self._async_wire is not None:
            await self._async_wire.close()
        self.close()
        if self.owns_kv:
            await self.kv.close()
