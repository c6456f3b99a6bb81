"""The hot-path RESP client: encoding, round trips, errors, pipelining, outages and timeouts."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tenfold.kernel.errors import BackendUnavailable, StorageError
from tenfold.kernel.redis_wire import (
    AsyncWire,
    RedisAddress,
    SyncWire,
    WireUnsupported,
    encode_command,
    parse_redis_url,
)
from tests.backends import IN_CI, REDIS_URL, delete_prefix, free_port, redis_available

PASSWORD = "s3cret"


def fresh_script(body: str) -> tuple[str, str]:
    """A script whose SHA the server has never seen (a random comment), and that SHA."""
    source = f"-- tfwire {uuid.uuid4().hex}\n{body}"
    return source, hashlib.sha1(source.encode()).hexdigest()


# --- encoding and URLs ---------------------------------------------------------------------


def test_encode_command() -> None:
    assert encode_command(b"PING") == b"*1\r\n$4\r\nPING\r\n"
    assert encode_command("SET", "k", "é") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n"
    assert encode_command(b"INCRBY", b"k", -12) == b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$3\r\n-12\r\n"
    assert (
        encode_command(b"X", 0, 2**60)
        == b"*3\r\n$1\r\nX\r\n$1\r\n0\r\n$19\r\n1152921504606846976\r\n"
    )
    assert encode_command(b"SET", b"k", b"") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
    binary = bytes(range(256))
    assert encode_command(binary) == b"*1\r\n$256\r\n" + binary + b"\r\n"
    with pytest.raises(TypeError):
        encode_command(b"SET", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_command(b"SET", True)  # bools are refused, as redis-py does


def test_parse_redis_url() -> None:
    assert parse_redis_url("redis://127.0.0.1:6379/0") == RedisAddress(
        "127.0.0.1", 6379, 0, None, None, None
    )
    assert parse_redis_url("redis://localhost") == RedisAddress(
        "localhost", 6379, 0, None, None, None
    )
    assert parse_redis_url("redis://:p%40ss@h:7000/3") == RedisAddress(
        "h", 7000, 3, None, "p@ss", None
    )
    assert parse_redis_url("redis://alice:pw@h/2") == RedisAddress(
        "h", 6379, 2, "alice", "pw", None
    )
    assert parse_redis_url("redis://h:1/?db=5&password=x") == RedisAddress(
        "h", 1, 5, None, "x", None
    )
    assert parse_redis_url("unix:///run/redis.sock?db=4&password=pw") == RedisAddress(
        "", 0, 4, None, "pw", "/run/redis.sock"
    )
    with pytest.raises(WireUnsupported, match="TLS is not supported by the fast path"):
        parse_redis_url("rediss://h:6380/0")
    with pytest.raises(ValueError, match="scheme"):
        parse_redis_url("memcached://h")
    with pytest.raises(ValueError, match="database"):
        parse_redis_url("redis://h/notadb")


# --- the shared Redis ----------------------------------------------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    redis_available()
    name = f"tfwire{uuid.uuid4().hex[:10]}"
    yield name
    delete_prefix(name)


@pytest.fixture
def sync_wire() -> Iterator[SyncWire]:
    redis_available()
    wire = SyncWire(REDIS_URL)
    yield wire
    wire.close()


@pytest.fixture
async def async_wire() -> AsyncIterator[AsyncWire]:
    redis_available()
    wire = AsyncWire(REDIS_URL)
    yield wire
    await wire.close()


def test_sync_round_trips(sync_wire: SyncWire, prefix: str) -> None:
    key = f"{prefix}:a"
    assert sync_wire.call(b"PING") == b"PONG"
    assert sync_wire.call("SET", key, "v", "PX", 60_000) == b"OK"
    assert sync_wire.call("GET", key) == b"v"
    assert sync_wire.call("GET", f"{prefix}:missing") is None
    assert sync_wire.call("INCRBY", f"{prefix}:n", 5) == 5
    assert sync_wire.call("RPUSH", f"{prefix}:l", "x", "y") == 2
    assert sync_wire.call("LRANGE", f"{prefix}:l", 0, -1) == [b"x", b"y"]
    big = b"z" * 300_000  # bigger than one recv
    assert sync_wire.call("SET", f"{prefix}:big", big) == b"OK"
    assert sync_wire.call("GET", f"{prefix}:big") == big


def test_sync_evalsha_loads_a_script_the_server_does_not_know(
    sync_wire: SyncWire, prefix: str
) -> None:
    source, sha = fresh_script("return {KEYS[1], tonumber(ARGV[1]) + 1, {ARGV[2]}}")
    assert sync_wire.call("SCRIPT", "EXISTS", sha) == [0]
    key = f"{prefix}:k"
    assert sync_wire.evalsha(sha, source, [key], [41, "x"]) == [key.encode(), 42, [b"x"]]
    assert sync_wire.call("SCRIPT", "EXISTS", sha) == [1]
    assert sync_wire.evalsha(sha, source, [key], [1, "y"]) == [key.encode(), 2, [b"y"]]


def test_sync_error_replies_raise_storage_error(sync_wire: SyncWire, prefix: str) -> None:
    sync_wire.call("SET", f"{prefix}:s", "text")
    with pytest.raises(StorageError, match="not an integer") as caught:
        sync_wire.call("INCR", f"{prefix}:s")
    assert not isinstance(caught.value, BackendUnavailable)
    with pytest.raises(StorageError, match="unknown command"):
        sync_wire.call("NOSUCHCOMMAND")
    source, sha = fresh_script("return redis.error_reply('tfwire boom')")
    with pytest.raises(StorageError, match="tfwire boom"):
        sync_wire.evalsha(sha, source, [], [])
    source, sha = fresh_script("this is not lua")
    with pytest.raises(StorageError):
        sync_wire.evalsha(sha, source, [], [])
    assert sync_wire.call(b"PING") == b"PONG"  # the connection survived every error


def test_sync_wire_is_one_connection_per_thread(sync_wire: SyncWire) -> None:
    import threading

    mine = sync_wire.call("CLIENT", "ID")
    assert sync_wire.call("CLIENT", "ID") == mine
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(sync_wire.call("CLIENT", "ID")))
    thread.start()
    thread.join()
    assert other and other[0] != mine
    sync_wire.close()
    assert sync_wire.call("CLIENT", "ID") not in (mine, other[0])  # reconnected after close


async def test_async_round_trips(async_wire: AsyncWire, prefix: str) -> None:
    key = f"{prefix}:a"
    assert await async_wire.call(b"PING") == b"PONG"
    assert await async_wire.call("SET", key, "v", "PX", 60_000) == b"OK"
    assert await async_wire.call("GET", key) == b"v"
    assert await async_wire.call("GET", f"{prefix}:missing") is None
    assert await async_wire.call("INCRBY", f"{prefix}:n", 5) == 5
    big = b"z" * 300_000
    assert await async_wire.call("SET", f"{prefix}:big", big) == b"OK"
    assert await async_wire.call("GET", f"{prefix}:big") == big


async def test_async_evalsha_loads_a_script_the_server_does_not_know(
    async_wire: AsyncWire, prefix: str
) -> None:
    source, sha = fresh_script("return {KEYS[1], tonumber(ARGV[1]) + 1}")
    assert await async_wire.call("SCRIPT", "EXISTS", sha) == [0]
    key = f"{prefix}:k"
    assert await async_wire.evalsha(sha, source, [key], [41]) == [key.encode(), 42]
    assert await async_wire.call("SCRIPT", "EXISTS", sha) == [1]
    # Many callers at once on an unknown script: every one loads-and-retries, all succeed.
    source, sha = fresh_script("return tonumber(ARGV[1]) * 2")
    got = await asyncio.gather(*(async_wire.evalsha(sha, source, [], [i]) for i in range(50)))
    assert got == [i * 2 for i in range(50)]


async def test_async_error_replies_raise_storage_error(async_wire: AsyncWire, prefix: str) -> None:
    await async_wire.call("SET", f"{prefix}:s", "text")
    with pytest.raises(StorageError, match="not an integer") as caught:
        await async_wire.call("INCR", f"{prefix}:s")
    assert not isinstance(caught.value, BackendUnavailable)
    source, sha = fresh_script("return redis.error_reply('tfwire boom')")
    with pytest.raises(StorageError, match="tfwire boom"):
        await async_wire.evalsha(sha, source, [], [])
    # An error among pipelined calls fails that call only.
    results = await asyncio.gather(
        async_wire.call("ECHO", "a"),
        async_wire.call("INCR", f"{prefix}:s"),
        async_wire.call("ECHO", "b"),
        return_exceptions=True,
    )
    assert results[0] == b"a" and results[2] == b"b"
    assert isinstance(results[1], StorageError)


async def test_500_concurrent_calls_get_their_own_replies(
    async_wire: AsyncWire, prefix: str
) -> None:
    echoes = [async_wire.call("ECHO", f"value-{i}") for i in range(500)]
    incrs = [async_wire.call("INCRBY", f"{prefix}:c{i}", i + 1) for i in range(500)]
    results = await asyncio.gather(*(x for pair in zip(echoes, incrs, strict=True) for x in pair))
    assert results[0::2] == [f"value-{i}".encode() for i in range(500)]
    assert results[1::2] == [i + 1 for i in range(500)]
    ids = await asyncio.gather(*(async_wire.call("CLIENT", "ID") for _ in range(20)))
    assert len(set(ids)) == 1  # all pipelined over one connection


async def test_concurrent_first_calls_open_one_connection() -> None:
    redis_available()
    wire = AsyncWire(REDIS_URL)
    try:
        ids = await asyncio.gather(*(wire.call("CLIENT", "ID") for _ in range(50)))
        assert len(set(ids)) == 1
    finally:
        await wire.close()


def test_an_unclosed_async_wire_closes_with_its_event_loop() -> None:
    redis_available()
    wire = AsyncWire(REDIS_URL)
    assert asyncio.run(wire.call("PING")) == b"PONG"
    first = wire._conn
    assert first is not None and first.closed  # asyncio.run's shutdown closed it
    assert asyncio.run(wire.call("PING")) == b"PONG"  # another loop: a new connection
    assert wire._conn is not first
    asyncio.run(wire.close())
    gc.collect()  # an unclosed socket or transport would warn here, failing the test


async def test_a_cancelled_call_does_not_shift_the_replies(async_wire: AsyncWire) -> None:
    await async_wire.call("PING")
    first = asyncio.ensure_future(async_wire.call("ECHO", "first"))
    second = asyncio.ensure_future(async_wire.call("ECHO", "second"))
    await asyncio.sleep(0)  # both sent
    first.cancel()
    assert await second == b"second"
    assert await async_wire.call("ECHO", "third") == b"third"


# --- a private redis-server: kill, restart, pause ------------------------------------------


class PrivateRedis:
    """A redis-server of the test's own, with a password and a unix socket, to kill at will."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.unix_path = str(directory / "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                self.unix_path,
                "--unixsocketperm",
                "700",
                "--requirepass",
                PASSWORD,
                "--enable-debug-command",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(encode_command("AUTH", PASSWORD) + encode_command("PING"))
                    answer = b""
                    while answer.count(b"\r\n") < 2:
                        chunk = s.recv(100)
                        if not chunk:
                            break
                        answer += chunk
                    if answer == b"+OK\r\n+PONG\r\n":
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited")
            time.sleep(0.02)  # polls the child's readiness; the loop ends on PONG
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def pause(self, seconds: float) -> socket.socket:
        """Make the server busy for `seconds` (DEBUG SLEEP) from a connection of its own."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.sendall(encode_command("AUTH", PASSWORD))
        assert s.recv(100) == b"+OK\r\n"
        s.sendall(encode_command("DEBUG", "SLEEP", seconds))
        return s


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is needed for the wire's outage tests")
        pytest.skip("redis-server not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    if server.proc and server.proc.poll() is None:
        server.kill()


def test_sync_auth_select_and_unix_socket(private_redis: PrivateRedis) -> None:
    three = SyncWire(private_redis.url(3))
    zero = SyncWire(private_redis.url(0))
    unix = SyncWire(f"unix://{private_redis.unix_path}?db=3&password={PASSWORD}")
    wrong = SyncWire(f"redis://:nope@127.0.0.1:{private_redis.port}/0")
    try:
        assert three.call("SET", "k", "in-three") == b"OK"
        assert zero.call("GET", "k") is None
        assert unix.call("GET", "k") == b"in-three"
        with pytest.raises(StorageError):
            wrong.call("PING")
    finally:
        for wire in (three, zero, unix, wrong):
            wire.close()


async def test_async_auth_select_and_unix_socket(private_redis: PrivateRedis) -> None:
    three = AsyncWire(private_redis.url(3))
    zero = AsyncWire(private_redis.url(0))
    unix = AsyncWire(f"unix://{private_redis.unix_path}?db=3&password={PASSWORD}")
    wrong = AsyncWire(f"redis://:nope@127.0.0.1:{private_redis.port}/0")
    try:
        assert await three.call("SET", "k", "in-three") == b"OK"
        assert await zero.call("GET", "k") is None
        assert await unix.call("GET", "k") == b"in-three"
        with pytest.raises(StorageError):
            await wrong.call("PING")
    finally:
        for wire in (three, zero, unix, wrong):
            await wire.close()


def test_sync_wire_survives_a_restart(private_redis: PrivateRedis) -> None:
    wire = SyncWire(private_redis.url())
    source, sha = fresh_script("return 7")
    try:
        assert wire.evalsha(sha, source, [], []) == 7
        private_redis.kill()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            wire.call("PING")  # the dead connection
        with pytest.raises(BackendUnavailable):
            wire.call("PING")  # a new connection, refused
        assert time.monotonic() - started < 1.5
        private_redis.start()
        assert wire.call("PING") == b"PONG"
        assert wire.evalsha(sha, source, [], []) == 7  # the new server had to load it again
    finally:
        wire.close()


async def test_async_wire_survives_a_restart(private_redis: PrivateRedis) -> None:
    wire = AsyncWire(private_redis.url())
    source, sha = fresh_script("return 7")
    try:
        assert await wire.evalsha(sha, source, [], []) == 7
        # A blocking command holds the pipeline: everything behind it is pending at the kill.
        calls = [asyncio.ensure_future(wire.call("BLPOP", "nothing", 5))]
        calls += [asyncio.ensure_future(wire.call("ECHO", str(i))) for i in range(20)]
        await asyncio.sleep(0.05)
        assert not any(c.done() for c in calls)
        started = time.monotonic()
        private_redis.kill()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        with pytest.raises(BackendUnavailable):
            await wire.call("PING")  # refused
        assert time.monotonic() - started < 1.5
        private_redis.start()
        assert await wire.call("PING") == b"PONG"
        assert await wire.evalsha(sha, source, [], []) == 7
    finally:
        await wire.close()


def test_sync_call_times_out(private_redis: PrivateRedis) -> None:
    wire = SyncWire(private_redis.url(), timeout=0.2)
    try:
        assert wire.call("PING") == b"PONG"
        pauser = private_redis.pause(1)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"within 0\.2s"):
            wire.call("PING")
        assert 0.15 < time.monotonic() - started < 0.9
        pauser.recv(100)  # the sleep is over
        pauser.close()
        assert wire.call("PING") == b"PONG"  # a fresh connection
    finally:
        wire.close()


async def test_async_calls_time_out_together(private_redis: PrivateRedis) -> None:
    wire = AsyncWire(private_redis.url(), timeout=0.2)
    try:
        assert await wire.call("PING") == b"PONG"
        pauser = private_redis.pause(1)
        started = time.monotonic()
        results = await asyncio.gather(
            *(wire.call("ECHO", str(i)) for i in range(10)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        assert 0.15 < elapsed < 0.9
        await asyncio.to_thread(pauser.recv, 100)  # the sleep is over
        pauser.close()
        assert await wire.call("ECHO", "back") == b"back"
    finally:
        await wire.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A socket that accepts connections (in the backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def test_sync_timeout_on_a_silent_server(silent_server: int) -> None:
    wire = SyncWire(f"redis://127.0.0.1:{silent_server}/0", timeout=0.2)
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                wire.call("PING")
            assert 0.15 < time.monotonic() - started < 0.9
    finally:
        wire.close()


async def test_async_timeout_on_a_silent_server(silent_server: int) -> None:
    wire = AsyncWire(f"redis://127.0.0.1:{silent_server}/0", timeout=0.2)
    try:
        for _ in range(2):  # the second round reconnects and times out again
            started = time.monotonic()
            results = await asyncio.gather(
                *(wire.call("PING") for _ in range(5)), return_exceptions=True
            )
            assert all(isinstance(r, BackendUnavailable) for r in results), results
            assert 0.15 < time.monotonic() - started < 0.9
    finally:
        await wire.close()


async def test_refused_connection_is_backend_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    sync = SyncWire(url)
    with pytest.raises(BackendUnavailable):
        sync.call("PING")
    sync.close()
    wire = AsyncWire(url)
    with pytest.raises(BackendUnavailable):
        await wire.call("PING")
    await wire.close()


async def test_backpressure_keeps_every_reply(private_redis: PrivateRedis) -> None:
    wire = AsyncWire(private_redis.url())
    try:
        value = b"v" * 200_000
        sets = await asyncio.gather(*(wire.call("SET", f"k{i}", value) for i in range(60)))
        assert sets == [b"OK"] * 60
        gets = await asyncio.gather(*(wire.call("STRLEN", f"k{i}") for i in range(60)))
        assert gets == [200_000] * 60
    finally:
        await wire.close()


# --- the rate limiter's counter store on the wire ------------------------------------------


def test_counter_store_packs_its_command_as_encode_command_does() -> None:
    import random

    from tenfold.ratelimit.algorithms import Algorithm, Limit
    from tenfold.ratelimit.store import Probe
    from tenfold.ratelimit.stores.redis import CHECK_SHA, _args, _packed

    rng = random.Random(5)
    for _ in range(200):
        probes = [
            Probe(
                "".join(rng.choices("ab:{}é", k=rng.randint(0, 40))),
                Limit.of(rng.choice(list(Algorithm)), rng.randint(1, 10**5), rng.randint(1, 86400)),
                rng.random() < 0.3,
            )
            for _ in range(rng.randint(1, 12))
        ]
        now, weight, commit = rng.randint(0, 2**50), rng.randint(1, 10**5), rng.random() < 0.5
        keys, args = _args(probes, now, weight, commit)
        expected = encode_command(b"EVALSHA", CHECK_SHA, len(keys), *keys, *args)
        assert _packed(probes, now, weight, commit) == expected


async def test_counter_store_decides_the_same_on_the_wire_and_on_redis_py(prefix: str) -> None:
    from tenfold.kernel.kv import RedisKV
    from tenfold.ratelimit.algorithms import Algorithm, Limit
    from tenfold.ratelimit.store import Probe
    from tenfold.ratelimit.stores.redis import RedisCounterStore

    tls = RedisCounterStore(RedisKV("rediss://127.0.0.1:6380/0"), owns_kv=True)
    assert not tls._use_wire  # TLS: redis-py
    await tls.aclose()
    wire = RedisCounterStore(RedisKV(REDIS_URL, prefix), owns_kv=True)
    fallback = RedisCounterStore(RedisKV(REDIS_URL, prefix), owns_kv=True)
    fallback._use_wire = False  # as for a rediss:// URL
    try:
        now = 1_700_000_000_000
        for algorithm in Algorithm:
            limit = Limit.of(algorithm, 3, 60)
            for step in range(5):
                pair = []
                for name, store in (("w", wire), ("f", fallback)):
                    probes = [Probe(f"{prefix}:{{{name}}}:{algorithm}", limit)]
                    if step % 2:
                        pair.append(store.hit(probes, now + step, 1))
                    else:
                        pair.append(await store.ahit(probes, now + step, 1))
                assert pair[0] == pair[1]
        assert wire._sync_wire is not None and wire._async_wire is not None
        assert fallback._sync_wire is None and fallback._async_wire is None
    finally:
        await wire.aclose()
        await fallback.aclose()


def test_async_wire_runs_on_uvloop() -> None:
    """uvicorn serves on uvloop, whose transports are not asyncio.Transport subclasses."""
    redis_available()
    import uvloop

    async def main() -> bytes:
        wire = AsyncWire(REDIS_URL)
        try:
            return bytes(await wire.call("ECHO", "uvloop"))
        finally:
            await wire.close()

    assert uvloop.run(main()) == b"uvloop"


class SlowPong:
    """A server answering every command +PONG after `delay` seconds (on one connection)."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while data := conn.recv(65536):
                for _ in range(data.count(b"*")):
                    if self.delay:
                        time.sleep(self.delay)
                    conn.sendall(b"+PONG\r\n")


def test_sync_wire_polls_alone_for_fast_replies_and_stops_polling_for_slow_ones() -> None:
    from tenfold.kernel import redis_wire

    server = SlowPong()
    wire = SyncWire(f"redis://127.0.0.1:{server.port}/0", timeout=5.0)
    try:
        assert wire.spin == redis_wire.SPIN_SECONDS  # on Linux: kernel timeouts
        assert wire.call(b"PING") == b"PONG"
        conn = wire._local.conn
        for _ in range(3):  # a VM's stolen time can make SPIN_MISSES late replies in a row
            conn.paused = conn.misses = 0
            for _ in range(20):
                assert wire.call(b"PING") == b"PONG"
            if conn.paused == 0:
                break
        assert conn.paused == 0  # answered while polling (a late one now and then is no pause)
        server.delay = redis_wire.SPIN_SECONDS * 10
        other = object()  # another thread waiting on Redis: nobody polls meanwhile
        redis_wire._WAITING.add(other)
        try:
            for _ in range(redis_wire.SPIN_MISSES):
                assert wire.call(b"PING") == b"PONG"
            assert conn.misses == 0 and conn.paused == 0  # it blocked, never polled
        finally:
            redis_wire._WAITING.discard(other)
        assert redis_wire._WAITING == set()  # each call takes itself out
        for _ in range(redis_wire.SPIN_MISSES):
            assert wire.call(b"PING") == b"PONG"  # too slow for the poll: then blocked
        assert conn.paused == redis_wire.SPIN_PAUSE and conn.misses == 0
        server.delay = 0.0
        assert wire.call(b"PING") == b"PONG"
        assert conn.paused == redis_wire.SPIN_PAUSE - 1  # not polling for a while
    finally:
        wire.close()
        server.listener.close()
