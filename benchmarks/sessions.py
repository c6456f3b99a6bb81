"""Session management benchmarks: the issue's four performance targets, in one run.

* validate-sync / validate-sync-ttl / validate-async: in-process validation of opaque tokens
  with a warm cache, on an embedded (SQLite) service, through `SessionClient.in_process`;
* jwt-verify: `KeyRing.verify_jwt` against PyJWT's `jwt.decode` of the same EdDSA token;
* http-validate-<server>: `POST /api/v1/sessions/validate` on one granian and one uvicorn process,
  beside the bare-ASGI ceiling measured in the same run (see benchmarks/http.py);
* create-pg-service / create-pg-http: sessions created per second by one process on PostgreSQL,
  through the service with concurrent asyncio tasks and through `POST /api/v1/sessions`.

A scenario that fails is recorded with an "error" key and null figures; the others still run.
Temporary directories and the throwaway database `tenfold_bench_<random>` are removed at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import http as bench_http
from benchmarks._runner import (
    Timing,
    admin_key,
    log,
    measure,
    percentile_ms,
    result,
    server_env,
    tenfold_command,
    timing_result,
)
from benchmarks._runner import attempt as _attempt
from benchmarks._wrk import ensure_wrk, parse

attempt = partial(_attempt, "sessions")  # a measurement whose failure is logged

VALIDATE_TARGET_PER_S = 250_000  # in-process, warm cache, one core
JWT_TARGET_RATIO = 0.8  # tenfold's verify vs PyJWT's decode
HTTP_TARGET_SHARE = 0.5  # of the HTTP ceiling
HTTP_TARGET_P99_MS = 5.0
CREATE_TARGET_PER_S = 2_000  # one process on PostgreSQL
CREATE_CONCURRENCY = 32  # asyncio tasks creating sessions at once (the engine pools 20)

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
VALIDATE_PATH = "/api/v1/sessions/validate"
CREATE_PATH = "/api/v1/sessions"
DEVICE = {"user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130", "ip": "203.0.113.7"}

# wrk: a different user for every creation (one user's sessions are capped and serialised).
CREATE_LUA = """
local auth = os.getenv("WRK_AUTH")
local threads = 0
local n = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function request()
  n = n + 1
  local body = string.format(
    '{"user_id":"bench-%d-%d","device_info":{"ip":"203.0.113.%d","user_agent":"wrk"}}',
    tid, n, n % 250)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
    ["Authorization"] = auth}, body)
end
"""


@dataclass(frozen=True, slots=True)
class Sizes:
    sessions: int  # sessions validated in turn
    calls: int
    sample: int
    warmup: int
    jwt_calls: int  # a signature check costs about 30 validations from the cache
    jwt_sample: int
    seconds: float  # per timed creation run


YIELD_EVERY = 64  # in-process validations between two turns of the event loop


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(200, 200_000, 20_000, 5_000, 10_000, 2_000, seconds=3.0)
    return Sizes(1_000, 1_000_000, 100_000, 20_000, 50_000, 10_000, seconds=10.0)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop, as the servers use, when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


# --- 1. in-process validation --------------------------------------------------------------


@dataclass
class Embedded:
    loop: asyncio.AbstractEventLoop
    service: Any  # SessionService
    client: Any  # InProcessSessionClient
    ring: Any  # KeyRing
    tokens: list[str]


@contextmanager
def embedded(n_sessions: int) -> Iterator[Embedded]:
    """A migrated SQLite database in a temporary directory, its key ring and a SessionService
    holding `n_sessions` sessions, each validated once (the cache is warm)."""
    from tenfold.kernel import sql
    from tenfold.kernel.crypto import KeyRing
    from tenfold.sessions.client import SessionClient
    from tenfold.sessions.models import DeviceInfo
    from tenfold.sessions.service import SessionConfig, SessionService
    from tenfold.sessions.stores.sql import SqlSessionStore

    tmp = Path(tempfile.mkdtemp(prefix="tenfold-bench-sessions-"))
    url = f"sqlite:///{tmp / 'tenfold.db'}"
    sql.upgrade(url)
    loop = new_loop()
    engine = sql.create_engine(url)
    try:
        ring = loop.run_until_complete(KeyRing.open(engine, secrets.token_bytes(32)))
        service = SessionService(SqlSessionStore(engine), ring, None, config=SessionConfig())
        client = SessionClient.in_process(service)
        device = DeviceInfo(user_agent=DEVICE["user_agent"], ip=DEVICE["ip"])

        async def fill() -> list[str]:
            made = [
                await client.create(f"user-{i}", device=device, permissions=["orders:read"])
                for i in range(n_sessions)
            ]
            return [m.session_token for m in made]

        tokens = loop.run_until_complete(fill())
        yield Embedded(loop, service, client, ring, tokens)
    finally:
        loop.run_until_complete(engine.dispose())
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)


def warm(env: Embedded) -> None:
    async def all_of_them() -> None:
        for token in env.tokens:
            assert (await env.client.validate(token)).valid

    env.loop.run_until_complete(all_of_them())


def measure_async(
    loop: asyncio.AbstractEventLoop,
    call: Callable[[str], Awaitable[bool]],
    keys: Sequence[str],
    *,
    calls: int,
    sample: int,
    warmup: int,
) -> Timing:
    """`benchmarks._runner.measure` for a coroutine: each loop runs inside one coroutine, so
    the figures include `await` but not the event loop's scheduling (nothing suspends)."""
    nkeys = len(keys)

    async def run() -> Timing:
        for i in range(warmup):
            await call(keys[i % nkeys])
        sequence = [keys[i % nkeys] for i in range(calls)]
        allowed = 0
        start = time.perf_counter_ns()
        for key in sequence:
            if await call(key):
                allowed += 1
        elapsed = time.perf_counter_ns() - start
        samples: list[int] = []
        clock = time.perf_counter_ns
        for key in sequence[:sample]:
            t0 = clock()
            await call(key)
            samples.append(clock() - t0)
        samples.sort()
        return Timing(
            calls / (elapsed / 1e9),
            percentile_ms(samples, 50),
            percentile_ms(samples, 99),
            calls,
            allowed / calls,
        )

    import gc

    gc.collect()
    return loop.run_until_complete(run())


def validation_results(quick: bool) -> list[dict[str, Any]]:
    scenarios = ("validate-sync", "validate-async-ttl", "validate-async", "jwt-verify")
    try:
        with embedded(sizes(quick).sessions) as env:
            return _validations(quick, env)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log(f"sessions: embedded service: error: {message}")
        return [result(scenario, None, None, None, error=message) for scenario in scenarios]


def _validations(quick: bool, env: Embedded) -> list[dict[str, Any]]:
    s = sizes(quick)
    records: list[dict[str, Any]] = []
    service, client, loop = env.service, env.client, env.loop
    default_ttl = service.config.local_ttl_ms

    def sync_warm(token: str) -> bool:
        return bool(client.validate_sync(token).valid)

    calls_made = [0]

    async def async_with_reloads(token: str) -> bool:
        # As in a server: other tasks (here, the background reloads) run between requests.
        calls_made[0] += 1
        if calls_made[0] % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        return bool((await client.validate(token)).valid)

    async def async_validate(token: str) -> bool:
        return bool((await client.validate(token)).valid)

    # The hot path alone: no cached copy ages out during the run.
    service.config.local_ttl_ms = 3_600_000
    warm(env)
    log(f"sessions: validate_sync, warm cache, {len(env.tokens)} sessions")
    sync, err = attempt(
        "validate-sync",
        lambda: measure(sync_warm, env.tokens, calls=s.calls, sample=s.sample, warmup=s.warmup),
    )
    log("sessions: async validate, warm cache")
    asyn, async_err = attempt(
        "validate-async",
        lambda: measure_async(
            loop, async_validate, env.tokens, calls=s.calls, sample=s.sample, warmup=s.warmup
        ),
    )
    # The service's own local TTL: each copy is reloaded from SQLite in the background past
    # half its life (a copy that expires anyway is reloaded in line).
    service.config.local_ttl_ms = default_ttl
    log(f"sessions: async validate with the default local TTL ({default_ttl} ms)")
    ttl, ttl_err = attempt(
        "validate-async-ttl",
        lambda: measure_async(
            loop, async_with_reloads, env.tokens, calls=s.calls, sample=s.sample, warmup=s.warmup
        ),
    )
    records.append(
        result(
            "validate-sync",
            sync.ops_per_s if sync else None,
            sync.p50_ms if sync else None,
            sync.p99_ms if sync else None,
            calls=s.calls,
            valid_share=sync.allowed_share if sync else None,
            target_ops_per_s=VALIDATE_TARGET_PER_S,
            meets_target=sync.ops_per_s >= VALIDATE_TARGET_PER_S if sync else None,
            path="SessionClient.in_process(...).validate_sync -> validate_cached",
            local_ttl_ms=3_600_000,
            sessions=len(env.tokens),
            error=err,
        )
    )
    records.append(
        timing_result(
            "validate-async-ttl",
            ttl,
            "validate-sync",
            sync,
            path=f"await validate, yielding to the loop every {YIELD_EVERY} calls",
            local_ttl_ms=default_ttl,
            sessions=len(env.tokens),
            error=ttl_err or (err and f"peer: {err}"),
        )
    )
    records.append(
        timing_result(
            "validate-async",
            asyn,
            "validate-sync",
            sync,
            path="await SessionClient.in_process(...).validate (validate_cached first)",
            local_ttl_ms=3_600_000,
            sessions=len(env.tokens),
            error=async_err or (err and f"peer: {err}"),
        )
    )
    records.append(jwt_result(quick, env))
    return records


# --- 2. signed access tokens ---------------------------------------------------------------


def jwt_result(quick: bool, env: Embedded) -> dict[str, Any]:
    s = sizes(quick)
    calls, sample = s.jwt_calls, s.jwt_sample
    ring = env.ring
    now = int(time.time())
    tokens = [
        ring.sign_jwt(
            {
                "iss": "tenfold",
                "sub": f"user-{i}",
                "sid": f"session-{i}",
                "typ": "web",
                "perms": ["orders:read"],
                "iat": now,
                "exp": now + 3600,
            }
        )
        for i in range(100)
    ]
    verify = ring.verify_jwt
    clock = time.time

    def ours(token: str) -> bool:
        return bool(verify(token, now=clock()))

    def theirs_factory() -> Callable[[str], bool]:
        import jwt

        public = jwt.PyJWK(ring.jwks()["keys"][0]).key
        decode = jwt.decode
        options: Any = {"require": ["exp"]}  # as verify_jwt: exp is required, then checked

        def theirs(token: str) -> bool:
            return bool(decode(token, key=public, algorithms=["EdDSA"], options=options))

        return theirs

    log("sessions: jwt verify vs PyJWT decode")
    mine, err = attempt("jwt-verify", lambda: measure(ours, tokens, calls=calls, sample=sample))
    other, peer_err = attempt(
        "jwt-verify peer", lambda: measure(theirs_factory(), tokens, calls=calls, sample=sample)
    )
    version = None
    try:
        import jwt

        version = jwt.__version__
    except ImportError:
        peer_err = peer_err or "PyJWT is not installed: pip install -e '.[bench]'"
    ratio = mine.ops_per_s / other.ops_per_s if mine and other else None
    return timing_result(
        "jwt-verify",
        mine,
        f"pyjwt-{version}" if version else "pyjwt",
        other,
        target_ratio=JWT_TARGET_RATIO,
        meets_target=ratio >= JWT_TARGET_RATIO if ratio is not None else None,
        alg="EdDSA (Ed25519)",
        error="; ".join(e for e in (err, peer_err and f"peer: {peer_err}") if e) or None,
    )


# --- HTTP helpers --------------------------------------------------------------------------


def _post(url: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        return int(exc.code), {"error": text[:300]}


# --- 3. HTTP validation --------------------------------------------------------------------


def http_validate_results(quick: bool) -> list[dict[str, Any]]:
    ceiling = bench_http.ceiling(quick)
    figures = bench_http.measure_ceilings(quick)
    data_dir = Path(tempfile.mkdtemp(prefix="tenfold-bench-sessions-http-"))
    env = server_env(data_dir, "sessions")
    records = []
    token: str | None = None
    try:
        _, migrate_err = attempt("migrate", lambda: tenfold_command(["migrate"], env))
        for server in ("granian", "uvicorn"):
            scenario = f"http-validate-{server}"
            if migrate_err:
                records.append(result(scenario, None, None, None, error=migrate_err))
                continue

            def run(server: bench_http.Server = server) -> bench_http.HttpFigures:
                nonlocal token
                with bench_http.serve_app("tenfold.app:build_app", env, server) as base_url:
                    key = admin_key(data_dir)
                    if token is None:
                        status, body = _post(
                            base_url + CREATE_PATH, {"user_id": "u1", "device_info": DEVICE}, key
                        )
                        if status != 201:
                            raise RuntimeError(f"POST {CREATE_PATH} answered {status}: {body}")
                        token = str(body["session_token"])
                    payload = {"session_token": token}
                    status, body = _post(base_url + VALIDATE_PATH, payload, key)
                    if status != 200 or body.get("valid") is not True:
                        raise RuntimeError(f"POST {VALIDATE_PATH} answered {status}: {body}")
                    return bench_http.load(
                        base_url + VALIDATE_PATH,
                        quick,
                        method="POST",
                        body=json.dumps(payload),
                        headers={"Authorization": f"Bearer {key}"},
                    )

            log(f"sessions: http validate on {server}")
            got, err = attempt(scenario, run)
            same = figures[server].ops_per_s
            records.append(
                result(
                    scenario,
                    got.ops_per_s if got else None,
                    got.p50_ms if got else None,
                    got.p99_ms if got else None,
                    ceiling["scenario"],
                    ceiling["ops_per_s"],
                    share_of_ceiling=got.ops_per_s / ceiling["ops_per_s"] if got else None,
                    **{f"share_of_{server}_ceiling": got.ops_per_s / same if got else None},
                    server=server,
                    target_share=HTTP_TARGET_SHARE,
                    target_p99_ms=HTTP_TARGET_P99_MS,
                    meets_target=(
                        got.ops_per_s / ceiling["ops_per_s"] >= HTTP_TARGET_SHARE
                        and got.p99_ms is not None
                        and got.p99_ms < HTTP_TARGET_P99_MS
                        if got
                        else None
                    ),
                    config="embedded (SQLite, memory), rate-limit guard on, one process",
                    non_2xx=got.non_2xx if got else None,
                    socket_errors=got.socket_errors if got else None,
                    error=err,
                )
            )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return records


# --- 4. creation on PostgreSQL -------------------------------------------------------------


async def _pg_admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn=PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A new, migrated PostgreSQL database `tenfold_bench_<random>`; dropped afterwards."""
    from tenfold.kernel import sql

    name = f"tenfold_bench_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
        sql.upgrade(url)
        yield url
    finally:
        try:
            asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except Exception as exc:
            log(f"sessions: could not drop database {name}: {exc}")


def create_with_service(url: str, master: bytes, seconds: float) -> tuple[float, float, float, int]:
    """Sessions created per second by CREATE_CONCURRENCY tasks; (ops/s, p50, p99, created)."""
    from tenfold.kernel import sql
    from tenfold.kernel.crypto import KeyRing
    from tenfold.sessions.models import DeviceInfo
    from tenfold.sessions.service import SessionService
    from tenfold.sessions.stores.sql import SqlSessionStore

    async def run() -> tuple[float, float, float, int]:
        engine = sql.create_engine(url)
        try:
            ring = await KeyRing.open(engine, master)
            service = SessionService(SqlSessionStore(engine), ring)
            device = DeviceInfo(user_agent=DEVICE["user_agent"], ip=DEVICE["ip"])
            samples: list[int] = []
            deadline = 0.0

            async def worker(w: int, timed: bool) -> None:
                i = 0
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter_ns()
                    await service.create(f"svc-{w}-{i}-{timed}", device=device, data={"cart": i})
                    if timed:
                        samples.append(time.perf_counter_ns() - t0)
                    i += 1

            deadline = time.perf_counter() + 1.0  # warm-up: connections, caches
            await asyncio.gather(*(worker(w, False) for w in range(CREATE_CONCURRENCY)))
            start = time.perf_counter()
            deadline = start + seconds
            await asyncio.gather(*(worker(w, True) for w in range(CREATE_CONCURRENCY)))
            elapsed = time.perf_counter() - start
            samples.sort()
            return (
                len(samples) / elapsed,
                percentile_ms(samples, 50),
                percentile_ms(samples, 99),
                len(samples),
            )
        finally:
            await engine.dispose()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(run())


def create_over_http(url: str, master: bytes, quick: bool) -> bench_http.HttpFigures:
    data_dir = Path(tempfile.mkdtemp(prefix="tenfold-bench-sessions-pg-"))
    secret = base64.urlsafe_b64encode(master).decode()  # the key that sealed the data keys
    env = server_env(data_dir, "sessions", TENFOLD_DATABASE_URL=url, TENFOLD_SECRET_KEY=secret)
    script = data_dir / "create.lua"
    script.write_text(CREATE_LUA)
    wrk = ensure_wrk()
    duration = bench_http.duration_s(quick)
    try:
        with bench_http.serve_app("tenfold.app:build_app", env, "uvicorn") as base_url:
            key = admin_key(data_dir)
            status, body = _post(base_url + CREATE_PATH, {"user_id": "probe"}, key)
            if status != 201:
                raise RuntimeError(f"POST {CREATE_PATH} answered {status}: {body}")

            def wrk_run(threads: int, connections: int, seconds: int) -> Any:
                command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
                command += ["--timeout=5s", "--latency", "-s", str(script)]
                proc = subprocess.run(
                    [*command, base_url + CREATE_PATH],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "WRK_AUTH": f"Bearer {key}"},
                    timeout=seconds + 40,
                    check=False,
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}")
                return parse(proc.stdout)

            wrk_run(1, bench_http.LATENCY_CONNECTIONS, 1)  # warm-up
            tput = wrk_run(2, bench_http.THROUGHPUT_CONNECTIONS, duration)
            lat = wrk_run(1, bench_http.LATENCY_CONNECTIONS, duration)
            return bench_http.HttpFigures(
                ops_per_s=tput.ops_per_s,
                p50_ms=lat.p50_ms,
                p99_ms=lat.p99_ms,
                non_2xx=tput.non_2xx + lat.non_2xx,
                socket_errors=tput.socket_errors + lat.socket_errors,
            )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def creation_results(quick: bool) -> list[dict[str, Any]]:
    s = sizes(quick)
    common: dict[str, Any] = {"target_ops_per_s": CREATE_TARGET_PER_S, "store": "postgresql"}
    try:
        with throwaway_database() as url:
            master = secrets.token_bytes(32)
            log(f"sessions: create on PostgreSQL, service, {CREATE_CONCURRENCY} tasks")
            direct, err = attempt(
                "create-pg-service", lambda: create_with_service(url, master, s.seconds)
            )
            log("sessions: create on PostgreSQL, POST /api/v1/sessions on uvicorn")
            http, http_err = attempt("create-pg-http", lambda: create_over_http(url, master, quick))
    except Exception as exc:
        message = f"PostgreSQL at {PG_ADMIN_DSN}: {type(exc).__name__}: {exc}".splitlines()[0]
        log(f"sessions: {message}")
        return [
            result(name, None, None, None, error=message, **common)
            for name in ("create-pg-service", "create-pg-http")
        ]
    return [
        result(
            "create-pg-service",
            direct[0] if direct else None,
            direct[1] if direct else None,
            direct[2] if direct else None,
            concurrency=CREATE_CONCURRENCY,
            created=direct[3] if direct else None,
            meets_target=direct[0] >= CREATE_TARGET_PER_S if direct else None,
            error=err,
            **common,
        ),
        result(
            "create-pg-http",
            http.ops_per_s if http else None,
            http.p50_ms if http else None,
            http.p99_ms if http else None,
            "create-pg-service",
            direct[0] if direct else None,
            server="uvicorn",
            connections=bench_http.THROUGHPUT_CONNECTIONS,
            meets_target=http.ops_per_s >= CREATE_TARGET_PER_S if http else None,
            non_2xx=http.non_2xx if http else None,
            socket_errors=http.socket_errors if http else None,
            error=http_err,
            **common,
        ),
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    records = validation_results(quick)
    records += bench_http.ceiling_results(quick)
    records += http_validate_results(quick)
    records += creation_results(quick)
    return records
