"""A minimal RESP2 client for hot paths: one round trip, as little Python as possible.

redis-py spends most of a local round trip in Python (connection pool, command packing, response
callbacks). This client sends pre-packed commands (`hiredis.pack_command`) over a raw socket and
parses replies with `hiredis.Reader`; it does only what the hot paths need:

* `SyncWire`: one blocking socket per thread, for the synchronous APIs;
* `AsyncWire`: one pipelined asyncio connection shared by every task of the event loop.

Both answer `call(*args)` and `evalsha(sha, source, keys, args)` (which loads the script and
retries once when the server answers NOSCRIPT). An error reply raises `StorageError`; a refused,
broken or timed-out connection raises `BackendUnavailable`, is dropped, and the next call
reconnects. TLS (`rediss://`) is not supported: `parse_redis_url` raises `WireUnsupported` and
callers fall back to redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from tenfold.kernel.errors import BackendUnavailable, StorageError

__all__ = [
    "AsyncWire",
    "RedisAddress",
    "SyncWire",
    "WireUnsupported",
    "encode_command",
    "parse_redis_url",
]

Arg = bytes | str | int | float

DEFAULT_TIMEOUT = 2.0
# Above this many bytes queued in the transport, callers wait for the socket to drain.
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18

# hiredis' stub types the argument as a one-item tuple; it takes any number of items.
_pack: Callable[[tuple[Arg, ...]], bytes] = hiredis.pack_command  # type: ignore[assignment]
_ReplyError = hiredis.ReplyError
_ProtocolError = hiredis.ProtocolError


class WireUnsupported(ValueError):
    """The URL asks for something the fast path does not do (TLS); use redis-py instead."""


class RedisAddress(NamedTuple):
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    unix_path: str | None


def parse_redis_url(url: str) -> RedisAddress:
    """`redis://[[user]:password@]host[:port][/db]` or `unix:///path[?db=N&password=...]`.

    `rediss://` raises `WireUnsupported`: TLS is not supported by the fast path.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "rediss":
        raise WireUnsupported("TLS is not supported by the fast path")
    if scheme not in ("redis", "unix"):
        raise WireUnsupported(f"unsupported Redis URL scheme {parts.scheme!r} in {url!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items() if v}
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    username = query.get("username", username) or None
    password = query.get("password", password)
    if password == "":
        password = None
    db_text = query.get("db")
    if scheme == "redis" and db_text is None:
        path = parts.path.strip("/")
        db_text = path or None
    try:
        db = int(db_text) if db_text is not None else 0
    except ValueError:
        raise ValueError(f"invalid database number {db_text!r} in Redis URL") from None
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"unix:// Redis URL without a socket path: {url!r}")
        return RedisAddress("", 0, db, username, password, unquote(parts.path))
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"invalid port in Redis URL {url!r}") from None
    host = parts.hostname or "localhost"
    return RedisAddress(host, port, db, username, password, None)


def encode_command(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings (`str` as UTF-8, numbers in decimal)."""
    return _pack(args)


def _handshake(address: RedisAddress) -> list[bytes]:
    commands: list[bytes] = []
    if address.password is not None:
        if address.username:
            commands.append(encode_command(b"AUTH", address.username, address.password))
        else:
            commands.append(encode_command(b"AUTH", address.password))
    if address.db:
        commands.append(encode_command(b"SELECT", address.db))
    return commands


def _where(address: RedisAddress) -> str:
    return address.unix_path or f"{address.host}:{address.port}"


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, _ReplyError) and str(reply).startswith("NOSCRIPT")


def _checked(reply: Any) -> Any:
    if isinstance(reply, _ReplyError):
        raise StorageError(f"redis error: {reply}")
    return reply


def _evalsha_command(sha: str | bytes, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
    if isinstance(sha, str):
        sha = sha.encode()  # hiredis packs bytes faster than str
    return _pack((b"EVALSHA", sha, len(keys), *keys, *args))


# Bumped in a forked child: connections inherited from the parent are never reused.
_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


# --- blocking ------------------------------------------------------------------------------

# On Linux the kernel enforces the read/write timeout (SO_RCVTIMEO/SO_SNDTIMEO, EAGAIN when it
# expires) and the socket stays in blocking mode: Python then calls recv() directly instead of
# poll() + recv(), one system call less per direction on the hot path.
_KERNEL_TIMEOUTS = sys.platform.startswith("linux")


def _set_timeout(sock: socket.socket, timeout: float) -> None:
    if not _KERNEL_TIMEOUTS or timeout <= 0:
        sock.settimeout(timeout if timeout > 0 else None)
        return
    seconds, micros = divmod(max(1, round(timeout * 1_000_000)), 1_000_000)
    timeval = struct.pack("ll", seconds, micros)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


# A blocking client waits for each reply. Asleep in recv(2), it is woken after the reply
# lands, which on a VM costs as much as a local Redis takes to answer (a 55 us PING became 23
# us polled). So it first polls the socket, without sleeping, for up to SPIN_SECONDS, when no
# other thread waits on Redis (several polling threads starve each other); a connection whose
# replies keep taking longer (a distant Redis) stops polling for a while.
SPIN_SECONDS = 0.0002
SPIN_MISSES = 8  # replies in a row that outlasted the poll: then stop polling...
SPIN_PAUSE = 1024  # ...for this many replies, and try again
_WAITING: set[_SyncConn] = set()  # connections whose thread waits for a reply (set ops: atomic)


class _SyncConn:
    __slots__ = ("__weakref__", "epoch", "generation", "misses", "paused", "reader", "sock")

    def __init__(self, sock: socket.socket, epoch: int) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()
        self.epoch = epoch
        self.generation = _fork_generation
        self.misses = 0
        self.paused = 0

    def poll_reply(self, budget: float) -> bytes | None:
        """The next bytes of a reply if they come within `budget` seconds; None (then block)."""
        if self.paused:
            self.paused -= 1
            return None
        recv = self.sock.recv
        deadline = time.perf_counter() + budget
        while True:
            try:
                data = recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() < deadline:
                    continue
                self.misses += 1
                if self.misses >= SPIN_MISSES:
                    self.misses, self.paused = 0, SPIN_PAUSE
                return None
            self.misses = 0
            return data

    def __del__(self) -> None:
        # A thread that ended took its connection with it: close the socket quietly.
        with contextlib.suppress(Exception):
            self.sock.close()


class SyncWire:
    """Blocking RESP2 client: one socket per thread, created on the thread's first call."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        spin: float = SPIN_SECONDS,
    ) -> None:
        self.address = parse_redis_url(url)
        self.timeout = timeout
        # Polling needs a blocking socket (kernel timeouts): with Python's own timeouts a
        # recv waits in poll(2) first, whatever its flags.
        self.spin = spin if _KERNEL_TIMEOUTS and timeout > 0 else 0.0
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._handshake = _handshake(self.address)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[_SyncConn] = weakref.WeakSet()
        self._epoch = 0

    def _connect(self) -> _SyncConn:
        old: _SyncConn | None = getattr(self._local, "conn", None)
        if old is not None:
            self._drop(old)
        address = self.address
        try:
            if address.unix_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.connect_timeout)
                    sock.connect(address.unix_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(
                    (address.host, address.port), timeout=self.connect_timeout
                )
            try:
                if address.unix_path is None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _set_timeout(sock, self.timeout)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise BackendUnavailable(f"redis unreachable at {_where(address)}: {exc}") from exc
        conn = _SyncConn(sock, self._epoch)
        with self._lock:
            self._conns.add(conn)
        self._local.conn = conn
        try:
            for command in self._handshake:
                _checked(self._exchange(conn, command))
        except BaseException:
            self._drop(conn)
            raise
        return conn

    def _drop(self, conn: _SyncConn) -> None:
        with self._lock:
            self._conns.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _exchange(self, conn: _SyncConn, payload: bytes) -> Any:
        sock = conn.sock
        reader = conn.reader
        waiting = _WAITING
        waiting.add(conn)
        try:
            sock.sendall(payload)
            reply = reader.gets()
            while reply is False:
                # Poll only while no other thread waits on Redis: polling threads would take
                # the CPU and the GIL from each other (4 threads ran at 40% of blocking ones).
                spin = self.spin if len(waiting) == 1 else 0.0
                data = (spin and conn.poll_reply(spin)) or sock.recv(65536)
                if not data:
                    raise ConnectionResetError("connection closed by the server")
                reader.feed(data)
                reply = reader.gets()
        except (OSError, _ProtocolError) as exc:
            self._drop(conn)
            if isinstance(exc, TimeoutError | BlockingIOError):
                raise BackendUnavailable(f"redis did not answer within {self.timeout}s") from exc
            raise BackendUnavailable(f"redis unreachable: {exc}") from exc
        except BaseException:
            self._drop(conn)  # interrupted mid-reply: the stream is out of step
            raise
        finally:
            waiting.discard(conn)
        return reply

    def _request(self, payload: bytes) -> Any:
        conn: _SyncConn | None = getattr(self._local, "conn", None)
        if conn is None or conn.epoch != self._epoch or conn.generation != _fork_generation:
            conn = self._connect()
        return self._exchange(conn, payload)

    def call(self, *args: Arg) -> Any:
        """Send one command, return its reply (bytes, int, list or None)."""
        return _checked(self._request(_pack(args)))

    def evalsha(
        self, sha: str | bytes, source: str | bytes, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> Any:
        """EVALSHA; on NOSCRIPT, SCRIPT LOAD the source and retry once."""
        return self.evalsha_packed(_evalsha_command(sha, keys, args), source)

    def evalsha_packed(self, payload: bytes, source: str | bytes) -> Any:
        """`evalsha` for an EVALSHA command the caller packed itself (of `source`'s SHA1)."""
        reply = self._request(payload)
        if isinstance(reply, _ReplyError):
            if not _is_noscript(reply):
                raise StorageError(f"redis error: {reply}")
            self.call(b"SCRIPT", b"LOAD", source)
            reply = _checked(self._request(payload))
        return reply

    def close(self) -> None:
        """Close every thread's socket; a later call reconnects."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
            self._epoch += 1
        self._local.conn = None
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.close()


# --- asyncio -------------------------------------------------------------------------------


class _AsyncConn(asyncio.Protocol):
    """One pipelined connection: replies resolve the pending futures in FIFO order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self._writable: list[asyncio.Future[None]] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = loop.create_future()
        self._keeper: asyncio.Task[None] | None = None

    # protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but offer the same calls
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        pending = self.pending
        try:
            reader.feed(data)
            reply = reader.gets()
            while reply is not False:
                future = pending.popleft()[0]
                if not future.done():
                    future.set_result(reply)
                reply = reader.gets()
        except _ProtocolError as exc:
            self.abort(f"redis protocol error: {exc}")
        except IndexError:
            self.abort("redis sent a reply nobody asked for")

    def eof_received(self) -> bool | None:
        self.closed = True
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"redis connection lost: {exc}" if exc else "redis connection lost")
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiters, self._writable = self._writable, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # used by AsyncWire

    def keep(self) -> None:
        """Tie the connection to its event loop: shutting the loop down closes it.

        asyncio.run() and asyncio.Runner cancel every task before closing the loop; this task's
        cancellation aborts the transport while the loop can still close its socket.
        """
        self._keeper = self.loop.create_task(self._keep(), name="tenfold-redis-wire")

    async def _keep(self) -> None:
        try:
            await asyncio.shield(self._lost)
        except asyncio.CancelledError:
            self.abort("event loop shutting down")
            raise

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise BackendUnavailable("redis connection lost")
        loop = self.loop
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append((future, loop.time()))
        self.transport.write(payload)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout, self._watch)
        return future

    async def writable(self) -> None:
        while self.paused:
            if self.closed:
                raise BackendUnavailable("redis connection lost")
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._writable.append(waiter)
            await waiter

    def _watch(self) -> None:
        self._watchdog = None
        if self.closed or not self.pending:
            return
        now = self.loop.time()
        due = self.pending[0][1] + self.timeout
        if now >= due - 1e-3:
            self.abort(f"redis did not answer within {self.timeout}s")
        else:
            self._watchdog = self.loop.call_at(due, self._watch)

    def _fail(self, message: str) -> None:
        """Mark the connection closed; every pending call fails with BackendUnavailable."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self.pending = self.pending, collections.deque()
        waiters, self._writable = self._writable, []
        if self.loop.is_closed():
            return  # nobody is left to wait on them
        for future, _ in pending:
            if not future.done():
                future.set_exception(BackendUnavailable(message))
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(BackendUnavailable(message))

    def abort(self, message: str) -> None:
        """Fail every pending call now and drop the connection."""
        self._fail(message)
        transport = self.transport
        if transport is not None and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                transport.abort()

    async def aclose(self) -> None:
        self._fail("redis connection closed")
        transport = self.transport
        if transport is None or self.loop.is_closed():
            return
        transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._lost), 1.0)
        if not self._lost.done():
            transport.abort()


class AsyncWire:
    """asyncio RESP2 client: one pipelined connection, opened on first use.

    The connection belongs to the event loop that opened it; a call from another loop (after
    the first one was closed, say) replaces it.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        spin: float = SPIN_SECONDS,
    ) -> None:
        self.address = parse_redis_url(url)
        self.timeout = timeout
        # Polling needs a blocking socket (kernel timeouts): with Python's own timeouts a
        # recv waits in poll(2) first, whatever its flags.
        self.spin = spin if _KERNEL_TIMEOUTS and timeout > 0 else 0.0
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._handshake = _handshake(self.address)
        self._conn: _AsyncConn | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    async def _connection(self) -> _AsyncConn:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed and conn.loop is loop:
                return conn
            if conn is not None:
                self._conn = None
                conn.abort("redis connection replaced")
            conn = await self._open(loop)
            self._conn = conn
            return conn

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _AsyncConn:
        address = self.address
        conn = _AsyncConn(loop, self.timeout)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if address.unix_path is not None:
                    await loop.create_unix_connection(lambda: conn, address.unix_path)
                else:
                    await loop.create_connection(lambda: conn, address.host, address.port)
        except (OSError, TimeoutError) as exc:
            conn.abort("connect failed")
            if isinstance(exc, TimeoutError):
                detail = f"no answer within {self.connect_timeout}s"
            else:
                detail = str(exc)
            raise BackendUnavailable(f"redis unreachable at {_where(address)}: {detail}") from exc
        conn.keep()
        if self._handshake:
            try:
                futures = [conn.send(command) for command in self._handshake]
                for reply in await asyncio.gather(*futures, return_exceptions=True):
                    _checked(reply)  # an error reply (hiredis returns, not raises, those)
                    if isinstance(reply, BaseException):
                        raise reply
            except BaseException:
                conn.abort("redis handshake failed")
                raise
        return conn

    async def _request(self, payload: bytes) -> Any:
        conn = self._conn
        if conn is None or conn.closed or conn.loop is not asyncio.get_running_loop():
            conn = await self._connection()
        if conn.paused:
            await conn.writable()
        return await conn.send(payload)

    async def call(self, *args: Arg) -> Any:
        """Send one command, return its reply (bytes, int, list or None)."""
        return _checked(await self._request(_pack(args)))

    async def evalsha(
        self, sha: str | bytes, source: str | bytes, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> Any:
        """EVALSHA; on NOSCRIPT, SCRIPT LOAD the source and retry once."""
        return await self.evalsha_packed(_evalsha_command(sha, keys, args), source)

    async def evalsha_packed(self, payload: bytes, source: str | bytes) -> Any:
        """`evalsha` for an EVALSHA command the caller packed itself (of `source`'s SHA1)."""
        reply = await self._request(payload)
        if isinstance(reply, _ReplyError):
            if not _is_noscript(reply):
                raise StorageError(f"redis error: {reply}")
            await self.call(b"SCRIPT", b"LOAD", source)
            reply = _checked(await self._request(payload))
        return reply

    def abort(self) -> None:
        """Drop the connection without waiting (pending calls fail); a later call reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort("redis connection closed")

    async def close(self) -> None:
        """Close the connection (pending calls fail); a later call reconnects."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - close() is always awaited in a loop
            running = None
        if conn.loop is running:
            await conn.aclose()
        else:
            conn.abort("redis connection closed")
