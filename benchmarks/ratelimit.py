"""Rate limiter benchmarks: tenfold against the `limits` library (alisaifee/limits).

Three groups, all in one run:

* memory-*: in-process memory storage, sync API, one thread, decisions per second;
* redis-*:  both libraries on the same Redis (127.0.0.1:6379), sync, with Redis commands and
            round trips per decision;
* http-check-<server>: tenfold's `POST /api/v1/ratelimit/check` on uvicorn and on granian,
            loaded by wrk, as a share of the bare-ASGI ceiling measured in the same run
            (see benchmarks/http.py).

A side that fails (e.g. tenfold's API not importable yet) yields a record with an "error" key and
nulls for its figures; the other side is still measured and the runner exits non-zero.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import http as bench_http
from benchmarks._runner import (
    Timing,
    admin_key,
    delete_prefix,
    log,
    measure,
    result,
    server_env,
    tenfold_command,
    timing_result,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
RATE = 100_000  # per key per window: tenfold's sliding_window log allows at most 100,000
WINDOW_S = 60
KEYS = [f"user:{i}" for i in range(1_000)]

Check = Callable[[str], bool]
T = TypeVar("T")

# (scenario suffix, tenfold algorithm, limits strategy class name, peer label)
PAIRS = (
    ("token_bucket", "token_bucket", "MovingWindowRateLimiter", "limits-moving_window"),
    ("sliding_window", "sliding_window", "MovingWindowRateLimiter", "limits-moving_window"),
    ("fixed_window", "fixed_window", "FixedWindowRateLimiter", "limits-fixed_window"),
    (
        "sliding_window_counter",
        "sliding_window_counter",
        "SlidingWindowCounterRateLimiter",
        "limits-sliding_window_counter",
    ),
)


@dataclass(frozen=True, slots=True)
class Sizes:
    calls: int
    sample: int
    warmup: int


def memory_sizes(quick: bool) -> Sizes:
    return Sizes(50_000, 5_000, 2_000) if quick else Sizes(200_000, 20_000, 5_000)


def redis_sizes(quick: bool) -> Sizes:
    return Sizes(5_000, 2_000, 500) if quick else Sizes(20_000, 5_000, 1_000)


def attempt(fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run one side of a comparison; an exception becomes a one-line error."""
    try:
        return fn(), None
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        log(f"  error: {message}")
        return None, message


def both(
    ours: Callable[[], T], theirs: Callable[[], T], *, ours_first: bool
) -> tuple[T | None, str | None, T | None, str | None]:
    """Measure both sides, alternating which goes first from pair to pair (less order bias)."""
    if ours_first:
        mine, err = attempt(ours)
        other, peer_err = attempt(theirs)
    else:
        other, peer_err = attempt(theirs)
        mine, err = attempt(ours)
    return mine, err, other, peer_err


def join_errors(*errors: str | None) -> str | None:
    found = [e for e in errors if e]
    return "; ".join(found) if found else None


# --- the two libraries ---------------------------------------------------------------------


@contextmanager
def tenfold_check(algorithm: str, url: str | None, prefix: str) -> Iterator[Check]:
    try:
        from tenfold.ratelimit import Limit, RateLimiter
    except ImportError as exc:
        raise RuntimeError(
            f"tenfold.ratelimit's in-process API (RateLimiter, Limit) is not importable: {exc}"
        ) from exc
    limit = Limit.of(algorithm, rate=RATE, window=WINDOW_S, burst=RATE)
    limiter = RateLimiter.from_url(url, prefix=prefix) if url else RateLimiter()
    hit = limiter.hit
    try:
        yield lambda key: hit(limit, key).allowed
    finally:
        limiter.close()


@contextmanager
def limits_check(strategy: str, url: str | None, prefix: str) -> Iterator[Check]:
    import limits.strategies
    from limits import RateLimitItemPerMinute
    from limits.storage import MemoryStorage, RedisStorage, Storage

    item = RateLimitItemPerMinute(RATE)
    storage: Storage = RedisStorage(url, key_prefix=prefix) if url else MemoryStorage()
    limiter = getattr(limits.strategies, strategy)(storage)
    hit = limiter.hit
    try:
        yield lambda key: hit(item, key)
    finally:
        if isinstance(storage, MemoryStorage):
            # Stop its expiry timer before clearing, or the timer may race the clear.
            storage.timer.cancel()
            if storage.timer.is_alive():
                storage.timer.join(timeout=5)
            storage.reset()


# --- Redis command counting ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandCount:
    per_op: float  # INFO commandstats calls (including commands run inside Lua scripts)
    mix: dict[str, float]  # per command name, per op
    round_trips_per_op: float | None  # writes to a redis-py connection, per op


def _commandstats(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


@contextmanager
def _count_round_trips() -> Iterator[list[int]]:
    """Count redis-py `send_packed_command` calls (one per command or pipeline sent)."""
    from redis.connection import AbstractConnection

    counter = [0]
    original: Callable[..., None] = AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        counter[0] += 1
        original(self, command, check_health)

    AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def count_commands(client: Any, check: Check, ops: int = 1_000, repeats: int = 3) -> CommandCount:
    """Commands per decision, from INFO commandstats before and after `ops` decisions.

    The stats are server-wide, so another client's traffic adds to them; it can only add, so the
    repeat with the fewest commands is kept, and figures are rounded to 0.01 per decision.
    """
    best: CommandCount | None = None
    best_total = None
    for r in range(repeats):
        before = _commandstats(client)
        with _count_round_trips() as trips:
            for i in range(ops):
                check(KEYS[(i + r * ops) % len(KEYS)])
        after = _commandstats(client)
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
        total = sum(delta.values())
        if best_total is None or total < best_total:
            best_total = total
            # Below 0.01 per decision is another client's traffic (HELLO, SCAN, ...), not ours.
            best = CommandCount(
                per_op=round(total / ops, 2),
                mix={k: round(v / ops, 2) for k, v in sorted(delta.items()) if v / ops >= 0.01},
                round_trips_per_op=trips[0] / ops if trips[0] else None,
            )
    assert best is not None
    return best


# --- groups --------------------------------------------------------------------------------


def memory_results(quick: bool) -> list[dict[str, Any]]:
    sizes = memory_sizes(quick)
    records = []
    for index, (name, algorithm, strategy, peer) in enumerate(PAIRS):
        log(f"ratelimit: memory {name} vs {peer}")

        def ours(algorithm: str = algorithm) -> Timing:
            with tenfold_check(algorithm, None, "bench") as check:
                return measure(
                    check, KEYS, calls=sizes.calls, sample=sizes.sample, warmup=sizes.warmup
                )

        def theirs(strategy: str = strategy) -> Timing:
            with limits_check(strategy, None, "bench") as check:
                return measure(
                    check, KEYS, calls=sizes.calls, sample=sizes.sample, warmup=sizes.warmup
                )

        mine, err, other, peer_err = both(ours, theirs, ours_first=index % 2 == 0)
        records.append(
            timing_result(
                f"memory-{name}",
                mine,
                peer,
                other,
                error=join_errors(err, peer_err and f"peer: {peer_err}"),
            )
        )
    return records


def redis_results(quick: bool) -> list[dict[str, Any]]:
    sizes = redis_sizes(quick)
    prefix = f"bench:{secrets.token_hex(4)}:"
    records = []
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        client.ping()
    except Exception as exc:
        message = f"Redis at {REDIS_URL} not reachable: {type(exc).__name__}: {exc}"
        log(f"ratelimit: {message}")
        return [
            result(f"redis-{name}", None, None, None, peer, None, error=message)
            for name, _, _, peer in PAIRS
        ]
    try:
        for index, (name, algorithm, strategy, peer) in enumerate(PAIRS):
            log(f"ratelimit: redis {name} vs {peer}")

            # Each pair has its own prefix: limits' strategies share key names for one item.
            def ours(algorithm: str = algorithm, name: str = name) -> tuple[Timing, CommandCount]:
                with tenfold_check(algorithm, REDIS_URL, f"{prefix}{name}:tf") as check:
                    timing = measure(
                        check, KEYS, calls=sizes.calls, sample=sizes.sample, warmup=sizes.warmup
                    )
                    return timing, count_commands(client, check)

            def theirs(strategy: str = strategy, name: str = name) -> tuple[Timing, CommandCount]:
                with limits_check(strategy, REDIS_URL, f"{prefix}{name}:limits") as check:
                    timing = measure(
                        check, KEYS, calls=sizes.calls, sample=sizes.sample, warmup=sizes.warmup
                    )
                    return timing, count_commands(client, check)

            mine, err, other, peer_err = both(ours, theirs, ours_first=index % 2 == 0)
            records.append(
                timing_result(
                    f"redis-{name}",
                    mine[0] if mine else None,
                    peer,
                    other[0] if other else None,
                    redis_commands_per_op=mine[1].per_op if mine else None,
                    peer_redis_commands_per_op=other[1].per_op if other else None,
                    redis_round_trips_per_op=mine[1].round_trips_per_op if mine else None,
                    peer_redis_round_trips_per_op=other[1].round_trips_per_op if other else None,
                    redis_command_mix=mine[1].mix if mine else None,
                    peer_redis_command_mix=other[1].mix if other else None,
                    error=join_errors(err, peer_err and f"peer: {peer_err}"),
                )
            )
    finally:
        deleted = delete_prefix(client, prefix)
        log(f"ratelimit: deleted {deleted} Redis keys under {prefix}")
        client.close()
    return records


CHECK_PATH = "/api/v1/ratelimit/check"
POLICY = {
    "name": "bench",
    "algorithm": "token_bucket",
    "rate_limit": 100_000_000,
    "time_window": 60,
    "burst_capacity": 100_000_000,
    "default": True,
}
CHECK_BODY = {"client_id": "c1", "api_key": "k1", "resource": "/x", "weight": 1}


def _post(url: str, body: dict[str, Any], key: str) -> tuple[int, str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def _admin_key(data_dir: Path, env: dict[str, str]) -> str:
    try:
        return admin_key(data_dir)
    except RuntimeError:
        log("ratelimit: no admin.key written; creating a key with the CLI")
        made = tenfold_command(["keys", "create", "--name", "bench", "--scope", "*"], env)
        return [ln.strip() for ln in made.splitlines() if ln.strip()][-1]


def http_result(
    quick: bool, ceiling: dict[str, Any], server: bench_http.Server = "uvicorn"
) -> dict[str, Any]:
    """tenfold's check endpoint on one server process (memory backends)."""
    peer = ceiling["scenario"]
    data_dir = Path(tempfile.mkdtemp(prefix="tenfold-bench-"))
    env = server_env(data_dir, "ratelimit")

    def measure_check() -> bench_http.HttpFigures:
        tenfold_command(["migrate"], env)
        with bench_http.serve_app("tenfold.app:build_app", env, server) as base_url:
            key = _admin_key(data_dir, env)
            status, text = _post(base_url + "/api/v1/policies", POLICY, key)
            if status == 404:
                raise RuntimeError("POST /api/v1/policies is not served (404): route missing")
            if not 200 <= status < 300:
                raise RuntimeError(f"POST /api/v1/policies answered {status}: {text[:300]}")
            status, text = _post(base_url + CHECK_PATH, CHECK_BODY, key)
            if status == 404:
                raise RuntimeError(f"POST {CHECK_PATH} is not served (404): route missing")
            if status != 200:
                raise RuntimeError(f"POST {CHECK_PATH} answered {status}: {text[:300]}")
            return bench_http.load(
                base_url + CHECK_PATH,
                quick,
                method="POST",
                body=json.dumps(CHECK_BODY),
                headers={"Authorization": f"Bearer {key}"},
            )

    log(f"ratelimit: http check on {server}")
    scenario = f"http-check-{server}"
    try:
        figures, err = attempt(measure_check)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    uvicorn_ceiling = ceiling["by_server"].get("uvicorn")
    if figures is None:
        return result(scenario, None, None, None, peer, ceiling["ops_per_s"], error=err)
    if figures.non_2xx:
        log(f"ratelimit: http check had {figures.non_2xx} non-2xx responses")
    return result(
        scenario,
        figures.ops_per_s,
        figures.p50_ms,
        figures.p99_ms,
        peer,
        ceiling["ops_per_s"],
        share_of_ceiling=figures.ops_per_s / ceiling["ops_per_s"],
        share_of_uvicorn_ceiling=figures.ops_per_s / uvicorn_ceiling if uvicorn_ceiling else None,
        server=server,
        non_2xx=figures.non_2xx,
        socket_errors=figures.socket_errors,
    )


def run(quick: bool) -> list[dict[str, Any]]:
    records = memory_results(quick)
    records += redis_results(quick)
    records += bench_http.ceiling_results(quick)
    for server in bench_http.SERVERS:
        records.append(http_result(quick, bench_http.ceiling(quick), server))
    return records
