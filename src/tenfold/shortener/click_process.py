"""Click analytics in a process of its own, beside the server.

Enriching and rolling up clicks costs 6-15 us of CPU per distinct click: in the serving process
that is a quarter of a redirect's budget, and the work holds the GIL the event loop needs. So by
default the server only counts raw clicks, added up by what the recorder groups them by
(second, link, address, user agent, referrer: a reload or a busy client is one entry), and
ships them each second, as one JSON frame on a pipe, to a child process that runs the
ClickRecorder: enrichment, visitor sets, roll-ups and the analytics store are all its own.
The bound is in clicks, as in the recorder.
Reports and deletions are asked of it over the same pipe.

Frames are a 4-byte big-endian length and an orjson document. Parent to child: the config
first, then {"op": "clicks", "keys": [[at_ms, domain, code, ip, agent, referrer], ...],
"counts": [n, ...]} (no answer), and requests with an "id" — "flush", "report", "forget",
"stop" — each answered {"id", "ok"} or {"id", "error"}.
The child exits when its stdin closes (the server went away), after a last flush.

If the child dies it is started again at the next flush; clicks wait in the server's bounded
buffer meanwhile (and count as dropped beyond it), as they do when the store is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson
import structlog

from tenfold.kernel.errors import BackendUnavailable, FieldError
from tenfold.shortener.clicks import _WRITTEN, ClickBuffer, Granularity

log = structlog.get_logger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024
START_SECONDS = 30.0  # the child imports DuckDB and ua-parser, and opens the store
ASK_SECONDS = 60.0
FLUSH_SECONDS = 1.0  # the child flushes on its own too
NICENESS = 10  # serving redirects comes first; analytics catch up (the buffer absorbs bursts)


@dataclass(frozen=True)
class ChildConfig:
    analytics_url: str
    data_dir: str
    salt_key: str  # hex
    capacity: int
    geoip_db: str
    count_bots: bool
    raw_clicks: bool
    redis_url: str
    redis_prefix: str


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_LENGTH.size)
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return orjson.loads(await reader.readexactly(size))


def _frame(doc: Any) -> bytes:
    body = orjson.dumps(doc)
    return _LENGTH.pack(len(body)) + body


# --- the server's side ---------------------------------------------------------------------


class ClickProcess(ClickBuffer):
    """The Recorder the redirect feeds, with the work done in a child process."""

    def __init__(self, config: ChildConfig, *, capacity: int) -> None:
        super().__init__(capacity)
        # Clicks wait here added up by what the child would group them by (second, link,
        # address, user agent, referrer): a reload or a busy client costs one entry, and
        # the pipe and the child see each distinct click once with its count.
        self._pending: dict[tuple[int, str, str, str, str, str], int] = {}
        self.config = config
        self._child_dropped = 0
        self._child_buffered = 0
        self._child_written = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._lock = asyncio.Lock()

    def record(
        self, at_ms: int, domain: str, code: str, ip: str, user_agent: str, referrer: str
    ) -> bool:
        if self._full():
            return False
        key = (at_ms - at_ms % 1000, domain, code, ip, user_agent, referrer)
        pending = self._pending
        pending[key] = pending.get(key, 0) + 1
        return True

    def _take(self) -> dict[str, Any]:
        """The waiting clicks as the child takes them: their keys and counts, in two lists
        (orjson writes those without a Python step per click)."""
        pending, self._pending = self._pending, {}
        self._clicks = 0
        return {"op": "clicks", "keys": list(pending), "counts": list(pending.values())}

    def _restore(self, frame: dict[str, Any]) -> None:
        """Clicks the child did not get, back in the buffer within the bound."""
        for key, n in zip(frame["keys"], frame["counts"], strict=True):
            kept = self._admit(n)
            if kept:
                self._pending[key] = self._pending.get(key, 0) + kept

    @property
    def buffered(self) -> int:
        return self._clicks + self._child_buffered

    @property
    def dropped(self) -> int:
        return self._dropped + self._child_dropped

    async def start(self) -> None:
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None and self._reader is not None:
            if not self._reader.done():
                return self._proc
        await self._discard()
        self._child_written = self._child_dropped = self._child_buffered = 0
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tenfold.shortener.click_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_frame(self.config.__dict__))
        self._proc = proc
        self._reader = asyncio.ensure_future(self._read(proc.stdout))
        await self._ask("ping", {}, within=START_SECONDS, started=True)
        log.info("shortener.click_process_started", pid=proc.pid)
        return proc

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        try:
            while True:
                doc = await _read_frame(stdout)
                waiter = self._waiting.pop(doc.get("id"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(doc)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(BackendUnavailable("the click analytics process ended"))
            self._waiting.clear()

    async def _ask(
        self, op: str, args: dict[str, Any], *, within: float = ASK_SECONDS, started: bool = False
    ) -> Any:
        proc = self._proc if started else await self._ensure()
        assert proc is not None and proc.stdin is not None
        self._next_id += 1
        ask_id = self._next_id
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ask_id] = answer
        try:
            proc.stdin.write(_frame({"op": op, "id": ask_id, **args}))
            await proc.stdin.drain()
            doc = await asyncio.wait_for(answer, within)
        except (ConnectionError, TimeoutError) as exc:
            self._waiting.pop(ask_id, None)
            raise BackendUnavailable(f"the click analytics process did not answer: {exc}") from exc
        if "error" in doc:
            error = doc["error"]
            if error.get("kind") == "field":
                raise FieldError(error["field"], error["message"])
            raise BackendUnavailable(error.get("message", "click analytics failed"))
        return doc.get("ok")

    async def flush(self) -> int:
        """Ship what is waiting, and have the child write it; the clicks it wrote."""
        async with self._lock:
            proc = await self._ensure()
            assert proc.stdin is not None
            if self._pending:
                clicks = self._take()
                try:
                    proc.stdin.write(_frame(clicks))
                    await proc.stdin.drain()
                except ConnectionError as exc:
                    self._restore(clicks)
                    raise BackendUnavailable(f"click analytics process: {exc}") from exc
            done = await self._ask("flush", {})
        self._child_dropped = int(done["dropped"])
        self._child_buffered = int(done["buffered"])
        _WRITTEN.inc(max(0, int(done["written_total"]) - self._child_written))
        self._child_written = int(done["written_total"])
        if done.get("error"):
            raise BackendUnavailable(str(done["error"]))
        return int(done["written"])

    async def report(
        self,
        domain: str,
        code: str,
        *,
        start: date | None,
        end: date | None,
        granularity: Granularity = "day",
        include_bots: bool = False,
    ) -> dict[str, Any]:
        async with self._lock:
            answer: dict[str, Any] = await self._ask(
                "report",
                {
                    "domain": domain,
                    "code": code,
                    "start": start.isoformat() if start else None,
                    "end": end.isoformat() if end else None,
                    "granularity": granularity,
                    "include_bots": include_bots,
                },
            )
        return answer

    async def forget(self, domain: str, code: str) -> None:
        async with self._lock:
            self._pending = {
                k: n for k, n in self._pending.items() if k[1] != domain or k[2] != code
            }
            self._clicks = sum(self._pending.values())
            await self._ask("forget", {"domain": domain, "code": code})

    async def close(self) -> None:
        async with self._lock:
            proc = self._proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(Exception):
                    if self._pending:
                        assert proc.stdin is not None
                        proc.stdin.write(_frame(self._take()))
                    await self._ask("stop", {}, within=15.0, started=True)
            await self._discard()

    async def _discard(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 15.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None


# --- the child's side ----------------------------------------------------------------------


async def _child(out: Any) -> None:
    from tenfold.kernel.analytics import analytics_from_url
    from tenfold.kernel.clock import SYSTEM_CLOCK
    from tenfold.kernel.kv import kv_from_url
    from tenfold.shortener.clicks import ClickRecorder

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, out)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    config = ChildConfig(**await _read_frame(reader))
    kv = kv_from_url(config.redis_url, config.redis_prefix, SYSTEM_CLOCK)
    recorder = ClickRecorder(
        analytics_from_url(config.analytics_url, config.data_dir),
        clock=SYSTEM_CLOCK,
        salt_key=bytes.fromhex(config.salt_key),
        capacity=config.capacity,
        geoip_db=config.geoip_db,
        count_bots=config.count_bots,
        kv=kv,
        raw_clicks=config.raw_clicks,
    )
    last_error: list[str] = []
    total = [0]
    try:  # open the store now (embedded: this process holds the DuckDB file from here on)
        await recorder.start()
    except Exception as exc:  # down: clicks wait in the buffer until it answers
        last_error[:] = [f"{type(exc).__name__}: {exc}"]

    async def flush() -> int:
        try:
            written = await recorder.flush()
            total[0] += written
            last_error.clear()
            return written
        except Exception as exc:  # the store is down: the recorder keeps the clicks
            last_error[:] = [f"{type(exc).__name__}: {exc}"]
            return 0

    async def every_second() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await flush()

    ticker = asyncio.ensure_future(every_second())

    def answer(doc: dict[str, Any]) -> None:
        writer.write(_frame(doc))

    try:
        while True:
            try:
                doc = await _read_frame(reader)
            except asyncio.IncompleteReadError:
                break  # the server went away
            op = doc.get("op")
            ask_id = doc.get("id")
            try:
                if op == "clicks":
                    recorder.add_many(doc["keys"], doc["counts"])
                    continue
                if op == "ping":
                    answer({"id": ask_id, "ok": True})
                elif op == "flush":
                    written = await flush()
                    answer(
                        {
                            "id": ask_id,
                            "ok": {
                                "written": written,
                                "written_total": total[0],
                                "dropped": recorder.dropped,
                                "buffered": recorder.buffered,
                                "error": last_error[0] if last_error else None,
                            },
                        }
                    )
                elif op == "report":
                    report = await recorder.report(
                        doc["domain"],
                        doc["code"],
                        start=date.fromisoformat(doc["start"]) if doc["start"] else None,
                        end=date.fromisoformat(doc["end"]) if doc["end"] else None,
                        granularity=doc["granularity"],
                        include_bots=doc["include_bots"],
                    )
                    answer({"id": ask_id, "ok": report})
                elif op == "forget":
                    await recorder.forget(doc["domain"], doc["code"])
                    answer({"id": ask_id, "ok": True})
                elif op == "stop":
                    await flush()
                    answer({"id": ask_id, "ok": True})
                    break
                else:
                    answer({"id": ask_id, "error": {"message": f"unknown op {op!r}"}})
            except FieldError as exc:
                answer(
                    {
                        "id": ask_id,
                        "error": {"kind": "field", "field": exc.field, "message": exc.message},
                    }
                )
            except Exception as exc:
                answer({"id": ask_id, "error": {"message": f"{type(exc).__name__}: {exc}"}})
            await writer.drain()
    finally:
        ticker.cancel()
        with contextlib.suppress(Exception):
            await recorder.flush()
        with contextlib.suppress(Exception):
            await recorder.close()
        with contextlib.suppress(Exception):
            await kv.close()
        with contextlib.suppress(Exception):
            await writer.drain()


def main() -> None:
    from tenfold.kernel.telemetry import configure_logging

    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    # The frames own the original stdout; anything printed goes to stderr with the logs.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    configure_logging(os.environ.get("TENFOLD_LOG_LEVEL", "info"), "json")
    asyncio.run(_child(out))


if __name__ == "__main__":
    main()
