"""Redis counters: every probe of a check decided in one Lua script, one round trip."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenfold.kernel.kv import RedisKV, redis_errors, sync_redis_client
from tenfold.ratelimit.algorithms import ALGORITHM_CODES, Decision
from tenfold.ratelimit.store import Probe

CHECK_LUA = (Path(__file__).parent / "lua" / "check.lua").read_text()


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


def _decisions(reply: Any) -> list[Decision]:
    return [Decision(bool(int(r[0])), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in reply]


class RedisCounterStore:
    """Counter states in Redis; async through the kernel's RedisKV, sync through redis-py."""

    def __init__(self, kv: RedisKV, *, owns_kv: bool = False) -> None:
        self.kv = kv
        self.owns_kv = owns_kv
        self._script = kv.script(CHECK_LUA)
        self._sync_client: Any = None
        self._sync_script: Any = None

    def _sync(self) -> Any:
        if self._sync_script is None:
            self._sync_client = sync_redis_client(self.kv.url)
            self._sync_script = self._sync_client.register_script(CHECK_LUA)
        return self._sync_script

    def hit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]:
        keys, args = _args(probes, now_ms, weight, commit)
        script = self._sync()
        with redis_errors():
            return _decisions(script(keys=keys, args=args))

    async def ahit(
        self, probes: Sequence[Probe], now_ms: int, weight: int, commit: bool = True
    ) -> list[Decision]:
        keys, args = _args(probes, now_ms, weight, commit)
        return _decisions(await self._script(keys, args))

    async def clear(self, keys: Sequence[str]) -> None:
        if keys:
            await self.kv.delete(*keys, *(k + ":m" for k in keys))

    def close(self) -> None:
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None
            self._sync_script = None

    async def aclose(self) -> None:
        self.close()
        if self.owns_kv:
            await self.kv.close()
