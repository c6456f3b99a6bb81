"""The feature-flag SDK: flags evaluated in this process, kept current by the server's stream.

    flags = FlagsClient("http://tenfold:8000", api_key, environment="production")
    flags.start()                          # waits up to 5 s for the first ruleset
    if flags.boolean("new-checkout", {"user_id": "u-42", "plan": "pro"}, False):
        ...
    flags.track("checkout-completed", "u-42", value=59.0)
    flags.close()                          # stops the stream, flushes usage and events

Evaluation is pure and in memory (no I/O, no lock, never raises), so the same synchronous
calls serve threads and asyncio code alike; only `start(wait)`, `flush()` and `close()` block
(from a coroutine, `start(wait=0)` or `await asyncio.to_thread(flags.start)`).

- **Data.** `start()` loads the ruleset (`GET /api/v1/flags/ruleset`), then a daemon thread
  follows `GET /api/v1/flags/stream` (Server-Sent Events): `put` replaces the ruleset, `patch`
  changes some flags and segments. A dropped stream is reopened with exponential back-off and
  jitter (at most 30 s) and `Last-Event-ID` set to the revision held, so nothing is resent
  when nothing changed. With `stream=False` the ruleset is polled instead (`If-None-Match`).
- **Failures.** While the server cannot be reached the client serves what it has: the last
  ruleset, else `bootstrap`, else the caller's defaults (error `PROVIDER_NOT_READY`). After
  `stale_after` seconds without a connection it is `stale` (listeners hear of it, and again
  when it recovers). 401, 403 and 404 stop the stream for good (`last_error` says why).
- **Offline.** `offline=True` never touches the network: flags come from `bootstrap`, a JSON
  file as written by `save(path)` (or the server's ruleset document) or a mapping.
- **Usage and experiments.** Evaluations are counted per flag and variation, and sent every
  `usage_interval` seconds and at `close()`. For flags in an experiment a sample of users
  (the same users in every process) records an exposure, once per user and variation;
  `track()` records a conversion. `report()` feeds a flag's guard metric (requests, errors).
- **fork().** A child process (gunicorn `--preload`, multiprocessing) inherits the ruleset
  but not the connection: an at-fork hook drops the parent's threads, sockets, locks and
  unsent counts, and the child's first evaluation starts its own stream (with the inherited
  revision as `Last-Event-ID`). A child that never evaluates never opens a connection.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import httpx
import orjson

from tenfold.flags.evaluation import (
    DISABLED,
    ERROR,
    GENERAL,
    INVALID_CONTEXT,
    PREREQUISITE_FAILED,
    TYPE_MISMATCH,
    Evaluation,
    Ruleset,
    bucket_text,
    exposure_sampled,
    parse_flag_doc,
)
from tenfold.flags.models import is_number, parse_segment

__all__ = [
    "PROVIDER_NOT_READY",
    "Context",
    "FlagsClient",
    "FlagsClientError",
    "SSEEvent",
    "SSEParser",
]

log = logging.getLogger(__name__)

PROVIDER_NOT_READY: Final = "PROVIDER_NOT_READY"  # OpenFeature's code: no ruleset yet
MAX_RECONNECT_DELAY = 30.0  # seconds between reconnection attempts, at most
HEALTHY_STREAM = 60.0  # seconds a stream must stay up (or deliver an event) to reset back-off
STREAM_READ_TIMEOUT = 45.0  # three missed pings (the server pings every ~15 s)
EVENTS_PER_CALL = 10_000  # the events endpoint's limit
FLUSH_AT = 1_000  # queued events that trigger a flush before the interval
MAX_LINE = 64 << 20  # bytes of one SSE line (a whole ruleset arrives as one `data:` line)
USER_AGENT = "tenfold-python-flags/0.1"
_NOT_EXPOSED = frozenset({DISABLED, ERROR, PREREQUISITE_FAILED})

# A context: a mapping of attributes (`user_id` or OpenFeature's `targetingKey` identifies the
# user), a user id alone, or None (no attributes).
Context = Mapping[str, Any] | str | None
ChangeListener = Callable[[frozenset[str]], None]
StaleListener = Callable[[bool], None]


class FlagsClientError(Exception):
    """A call to the flags API failed; `status` is None when no answer came back."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status is not None else detail)
        self.status = status
        self.detail = detail

    @property
    def recoverable(self) -> bool:
        """Worth retrying: no answer, 5xx, 400, 408 or 429 (as LaunchDarkly's SDKs decide)."""
        s = self.status
        return s is None or s >= 500 or s in (400, 408, 429)


class _Resync(Exception):
    """The stream sent what cannot be applied: reconnect without Last-Event-ID (a full put)."""


# --- Server-Sent Events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str  # "message" unless the server named it
    data: str
    id: str  # the last event id seen so far ("" if none)


_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental parser of an event stream (the WHATWG HTML rules): feed it bytes as they
    arrive, get the complete events back. Lines end with CRLF, LF or CR; `data` lines are
    joined with LF; comments (`: ping`) are skipped; `retry` is kept in `retry_ms`."""

    def __init__(self) -> None:
        self._buffer = b""
        self._after_cr = False  # the last chunk ended in CR: an LF opening the next is its pair
        self._first_line = True
        self._event = ""
        self._data: list[str] = []
        self.last_event_id = ""
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SSEEvent] = []
        start = 0
        for match in _EOL.finditer(buffer):
            event = self._line(buffer[start : match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
            if match.group() == b"\r" and start == len(buffer):
                self._after_cr = True
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_LINE:
            raise ValueError(f"an event stream line longer than {MAX_LINE} bytes")
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        line = raw.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data), self.last_event_id)
        self._event, self._data = "", []
        return event


# --- the ruleset document --------------------------------------------------------------------


def _experiments(raw: object) -> dict[str, float]:
    """flag key -> exposure sample rate (0..1), from a document's `experiments` list."""
    out: dict[str, float] = {}
    if not isinstance(raw, list):
        return out
    for item in raw:
        if not isinstance(item, Mapping):
            continue
        key, rate = item.get("flag_key"), item.get("sample_rate", 1.0)
        if isinstance(key, str) and is_number(rate):
            out[key] = min(1.0, max(0.0, float(rate)))
    return out


def _load_document(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    doc = orjson.loads(Path(source).read_bytes())
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: a ruleset document is a JSON object")
    return doc


def changed_flags(old: Ruleset | None, new: Ruleset) -> set[str]:
    """The flags whose answers may differ between two rulesets: those changed, added or
    deleted, those using a changed segment, and those depending on any of them."""
    if old is None:
        return set(new.docs)
    changed = {k for k in old.docs.keys() | new.docs.keys() if old.docs.get(k) != new.docs.get(k)}
    segments = {
        k
        for k in old.segments.keys() | new.segments.keys()
        if old.segments.get(k) != new.segments.get(k)
    }
    if segments:
        changed |= {k for k, d in new.docs.items() if d.targeting.segments() & segments}
    while True:
        more = {
            k
            for k, d in new.docs.items()
            if k not in changed and any(p.flag in changed for p in d.targeting.prerequisites)
        }
        if not more:
            return changed
        changed |= more


def _as_context(context: Context) -> Mapping[str, Any] | None:
    if context is None:
        return {}
    if isinstance(context, str):
        return {"user_id": context}
    if isinstance(context, Mapping):
        return context
    return None


def _user_of(ctx: Mapping[str, Any]) -> str | None:
    user = ctx.get("user_id")
    if user is None:
        user = ctx.get("targetingKey")
    return bucket_text(user)


def _is_boolean(value: object) -> bool:
    return isinstance(value, bool)


def _is_string(value: object) -> bool:
    return isinstance(value, str)


def _is_json(value: object) -> bool:
    return isinstance(value, dict | list)


# --- the client ------------------------------------------------------------------------------


class FlagsClient:
    """Evaluates feature flags locally from a ruleset the server streams (see the module)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        environment: str | None = None,
        bootstrap: str | Path | Mapping[str, Any] | None = None,
        offline: bool = False,
        stream: bool = True,
        usage_interval: float = 30.0,  # seconds between flushes of usage, events and reports
        timeout: float = 5.0,  # seconds, to connect and for each call other than the stream
        stale_after: float = 60.0,  # seconds without a connection before the client is stale
        reconnect_delay: float | None = None,  # first back-off; None: the server's `retry:`
        poll_interval: float = 30.0,  # seconds between polls when stream=False
        exposure_cache_size: int = 10_000,  # (flag, user, variation) remembered to deduplicate
        max_queue: int = 10_000,  # exposures and conversions waiting to be sent
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,  # event timestamps
    ) -> None:
        self.offline = offline
        self.environment = environment
        self.base_url = (base_url or os.environ.get("TENFOLD_URL") or "").rstrip("/")
        self._api_key = api_key or os.environ.get("TENFOLD_API_KEY") or ""
        if not offline and not (self.base_url and self._api_key):
            raise ValueError(
                "FlagsClient needs base_url and api_key (or TENFOLD_URL and TENFOLD_API_KEY), "
                "or offline=True with a bootstrap"
            )
        self._streaming = stream
        self._usage_interval = usage_interval
        self._timeout = timeout
        self._stale_after = stale_after
        self._reconnect_delay = reconnect_delay
        self._server_retry = 1.0  # seconds, until the server's `retry:` says otherwise
        self._poll_interval = poll_interval
        self._exposure_cache_size = exposure_cache_size
        self._max_queue = max_queue
        self._clock = clock
        self._wall_clock = wall_clock

        self._ruleset: Ruleset | None = None
        self._experiments: dict[str, float] = {}
        self._server_revision: int | None = None  # of the last ruleset the server sent
        self._etag: str | None = None
        self._ready = False
        self._stale = False
        self._down_since: float | None = None
        self.last_error: FlagsClientError | None = None
        self.dropped_events = 0  # exposures and conversions dropped (queue full, send failed)

        self._change_listeners: tuple[ChangeListener, ...] = ()
        self._stale_listeners: tuple[StaleListener, ...] = ()
        self._fresh_process_state()
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._started = False
        self._closed = False
        self._restart_pending = False

        if bootstrap is not None:
            doc = _load_document(bootstrap)
            self._ruleset = Ruleset.from_dict(doc)
            self._experiments = _experiments(doc.get("experiments"))
            if offline:
                self._set_ready()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def after_in_child() -> None:
                client = ref()
                if client is not None:
                    client._after_fork()

            os.register_at_fork(after_in_child=after_in_child)

    def _fresh_process_state(self) -> None:
        """Locks, threads, connections and unsent counts: what a forked child must not share."""
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ready_event = threading.Event()
        if getattr(self, "_ready", False):
            self._ready_event.set()
        self._http_client: httpx.Client | None = None
        self._response: httpx.Response | None = None
        self._threads: list[threading.Thread] = []
        self._usage: dict[str, dict[str, int]] = {}
        self._queue: list[dict[str, Any]] = []
        self._guard: dict[str, list[int]] = {}

    # --- state --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once a ruleset came from the server (offline: from the bootstrap)."""
        return self._ready

    @property
    def stale(self) -> bool:
        """True while the server has been unreachable for longer than `stale_after`."""
        return self._stale

    @property
    def revision(self) -> int | None:
        """The revision of the ruleset served (the bootstrap's until the server answers)."""
        ruleset = self._ruleset
        return ruleset.revision if ruleset is not None else None

    @property
    def ruleset(self) -> Ruleset | None:
        """The compiled ruleset served now; None before any was loaded."""
        return self._ruleset

    def on_change(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener(keys)` with the flags whose answers may have changed, each time the
        ruleset changes (the first load included). Listeners run on the client's thread: keep
        them short. Returns a function that removes the listener."""
        with self._lock:
            self._change_listeners = (*self._change_listeners, listener)

        def remove() -> None:
            with self._lock:
                self._change_listeners = tuple(
                    x for x in self._change_listeners if x is not listener
                )

        return remove

    def on_stale(self, listener: StaleListener) -> Callable[[], None]:
        """Call `listener(True)` when the client becomes stale, `listener(False)` when it
        reconnects. Returns a function that removes the listener."""
        with self._lock:
            self._stale_listeners = (*self._stale_listeners, listener)

        def remove() -> None:
            with self._lock:
                self._stale_listeners = tuple(x for x in self._stale_listeners if x is not listener)

        return remove

    # --- life cycle ---------------------------------------------------------------------------

    def start(self, wait: float = 5.0) -> bool:
        """Connect in the background and wait up to `wait` seconds for the server's ruleset;
        True if it came. Until it does, the bootstrap (or the callers' defaults) is served and
        the client keeps trying. Calling it again only waits."""
        if self.offline:
            return self._ready
        with self._start_lock:
            if self._closed:
                raise RuntimeError("the FlagsClient is closed")
            if not self._started:
                self._started = True
                self._restart_pending = False
                self._down_since = self._clock()
                self._spawn()
        if wait > 0:
            self._ready_event.wait(wait)
        return self._ready

    def _spawn(self) -> None:
        target = self._run_stream if self._streaming else self._run_poll
        self._threads = [
            threading.Thread(target=target, name="tenfold-flags-stream", daemon=True),
            threading.Thread(target=self._run_events, name="tenfold-flags-events", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the stream, send what is waiting (usage, events, guard reports), release the
        connections. The client still evaluates afterwards, from the ruleset it holds."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            self._restart_pending = False
        self._stop.set()
        self._wake.set()
        self._interrupt_stream()
        for thread in self._threads:
            thread.join(self._timeout)
        if not self.offline:
            self.flush()
        with self._lock:
            http, self._http_client = self._http_client, None
        if http is not None:
            http.close()

    def __enter__(self) -> FlagsClient:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's threads, sockets, locks and unsent counts
        (the parent sends those); the first evaluation here starts this process's stream."""
        self._fresh_process_state()
        self._restart_pending = self._started and not self._closed
        self._started = False
        if not self.offline:
            self._down_since = self._clock()

    def _resume_after_fork(self) -> None:
        with self._start_lock:
            if not self._restart_pending or self._started:
                return
            self._restart_pending = False
            self._started = True
            self._spawn()

    def save(self, path: str | Path) -> None:
        """Write the ruleset served now as JSON (atomically), for `bootstrap=` or offline use."""
        ruleset = self._ruleset
        if ruleset is None:
            raise RuntimeError("no ruleset to save yet")
        doc = ruleset.to_dict()
        doc["experiments"] = [
            {"flag_key": k, "sample_rate": rate} for k, rate in self._experiments.items()
        ]
        target = Path(path)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        os.replace(temporary, target)

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, flag_key: str, context: Context = None) -> Evaluation:
        """The flag's answer for `context`: the flag's own value and reason, or an error
        (FLAG_NOT_FOUND, PROVIDER_NOT_READY, TARGETING_KEY_MISSING, ...). Never raises."""
        if self._restart_pending:
            self._resume_after_fork()
        ruleset = self._ruleset
        if ruleset is None:
            return Evaluation(
                flag_key,
                None,
                None,
                ERROR,
                PROVIDER_NOT_READY,
                error_message="no ruleset loaded yet (the server has not answered)",
            )
        ctx = _as_context(context)
        if ctx is None:
            return Evaluation(
                flag_key,
                None,
                None,
                ERROR,
                INVALID_CONTEXT,
                error_message="a context is a mapping of attributes or a user id",
            )
        try:
            result = ruleset.evaluate(flag_key, ctx)
        except Exception as exc:  # a bug, never the caller's problem
            log.exception("evaluating flag %r failed", flag_key)
            return Evaluation(flag_key, None, None, ERROR, GENERAL, error_message=repr(exc))
        if result.variation is not None and not self.offline:
            self._record(result, ctx)
        return result

    def boolean(self, flag_key: str, context: Context, default: bool) -> bool:
        value: bool = self.boolean_details(flag_key, context, default).value
        return value

    def string(self, flag_key: str, context: Context, default: str) -> str:
        value: str = self.string_details(flag_key, context, default).value
        return value

    def number(self, flag_key: str, context: Context, default: float) -> float:
        value: float = self.number_details(flag_key, context, default).value
        return value

    def json(self, flag_key: str, context: Context, default: Any) -> Any:
        return self.json_details(flag_key, context, default).value

    def boolean_details(self, flag_key: str, context: Context, default: bool) -> Evaluation:
        """Like `evaluate`, but the value is `default` whenever the answer is an error or not
        a boolean (error TYPE_MISMATCH)."""
        return self._typed(flag_key, context, default, _is_boolean, "boolean")

    def string_details(self, flag_key: str, context: Context, default: str) -> Evaluation:
        return self._typed(flag_key, context, default, _is_string, "string")

    def number_details(self, flag_key: str, context: Context, default: float) -> Evaluation:
        return self._typed(flag_key, context, default, is_number, "number")

    def json_details(self, flag_key: str, context: Context, default: Any) -> Evaluation:
        """Like `evaluate`; a JSON value is an object or an array."""
        return self._typed(flag_key, context, default, _is_json, "json")

    def _typed(
        self,
        flag_key: str,
        context: Context,
        default: Any,
        fits: Callable[[object], bool],
        wanted: str,
    ) -> Evaluation:
        result = self.evaluate(flag_key, context)
        if result.error_code is not None:
            return replace(result, value=default)
        if not fits(result.value):
            return Evaluation(
                flag_key,
                default,
                None,
                ERROR,
                TYPE_MISMATCH,
                error_message=f"flag {flag_key!r} served {type(result.value).__name__}, "
                f"not a {wanted}",
            )
        return result

    # --- usage, experiments, guards -----------------------------------------------------------

    def _record(self, result: Evaluation, ctx: Mapping[str, Any]) -> None:
        key, variation = result.flag_key, result.variation or ""
        rate = self._experiments.get(key)
        exposure = None
        if rate and result.error_code is None and result.reason not in _NOT_EXPOSED:
            user = _user_of(ctx)
            if user is not None and exposure_sampled(key, user, rate):
                exposure = (key, user, variation)
        with self._lock:
            counts = self._usage.get(key)
            if counts is None:
                counts = self._usage[key] = {}
            counts[variation] = counts.get(variation, 0) + 1
            if exposure is None:
                return
            seen = self._seen
            if exposure in seen:
                seen.move_to_end(exposure)
                return
            seen[exposure] = None
            if len(seen) > self._exposure_cache_size:
                seen.popitem(last=False)
            self._enqueue(
                {
                    "kind": "exposure",
                    "flag_key": key,
                    "variation": variation,
                    "user_id": exposure[1],
                    "timestamp_ms": int(self._wall_clock() * 1000),
                }
            )

    def _enqueue(self, event: dict[str, Any]) -> None:
        """Under self._lock."""
        if len(self._queue) >= self._max_queue:
            self.dropped_events += 1
            return
        self._queue.append(event)
        if len(self._queue) >= FLUSH_AT:
            self._wake.set()

    def track(self, metric: str, context: Context, value: float | None = None) -> bool:
        """Record a conversion of `metric` (with an optional number, such as revenue) for the
        user of `context` (a user id or a context with `user_id`/`targetingKey`). False when
        there is no user, or offline."""
        ctx = _as_context(context)
        user = _user_of(ctx) if ctx is not None else None
        if user is None or self.offline:
            return False
        if self._restart_pending:
            self._resume_after_fork()
        event = {
            "kind": "conversion",
            "metric": metric,
            "user_id": user,
            "value": value if is_number(value) else None,
            "timestamp_ms": int(self._wall_clock() * 1000),
        }
        with self._lock:
            before = self.dropped_events
            self._enqueue(event)
            return self.dropped_events == before

    def report(self, flag_key: str, *, requests: int, errors: int = 0) -> None:
        """Add to the flag's guard metric: `requests` served its new variations, `errors` of
        them failed. Sent with the next flush; the server turns the flag off on a breach."""
        if self.offline or requests < 0 or errors < 0:
            return
        if self._restart_pending:
            self._resume_after_fork()
        with self._lock:
            totals = self._guard.setdefault(flag_key, [0, 0])
            totals[0] += requests
            totals[1] += errors

    def flush(self) -> None:
        """Send the usage counts, queued events and guard reports now (blocking)."""
        if self.offline:
            return
        with self._flush_lock:
            with self._lock:
                usage, self._usage = self._usage, {}
                queue, self._queue = self._queue, []
                guard, self._guard = self._guard, {}
            if usage:
                body: dict[str, Any] = {"environment": self.environment, "flags": usage}
                if not self._send("/api/v1/flags/usage", body):
                    self._merge_usage(usage)
            for start in range(0, len(queue), EVENTS_PER_CALL):
                chunk = queue[start : start + EVENTS_PER_CALL]
                if not self._send(
                    "/api/v1/flags/events", {"environment": self.environment, "events": chunk}
                ):
                    with self._lock:
                        self.dropped_events += len(chunk)
            for key, (requests, errors) in guard.items():
                path = f"/api/v1/flags/{quote(key, safe='')}/guard"
                body = {"environment": self.environment, "requests": requests, "errors": errors}
                answer = self._send(path, body)
                if answer is None:
                    self.report(key, requests=requests, errors=errors)
                elif isinstance(answer, dict) and answer.get("breached"):
                    log.warning("flag %r breached its guard: the server turns it off", key)

    def _merge_usage(self, usage: dict[str, dict[str, int]]) -> None:
        with self._lock:
            for key, counts in usage.items():
                mine = self._usage.setdefault(key, {})
                for variation, n in counts.items():
                    mine[variation] = mine.get(variation, 0) + n

    def _send(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body`; the answer's JSON (True if none), or None when it failed."""
        try:
            try:
                response = self._http().post(
                    path,
                    content=orjson.dumps(body),
                    headers={"Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                raise FlagsClientError(None, f"{type(exc).__name__}: {exc}") from exc
            self._check(response)
        except FlagsClientError as exc:
            self.last_error = exc
            log.warning("sending to %s failed: %s", path, exc)
            return None
        try:
            return orjson.loads(response.content) if response.content else True
        except orjson.JSONDecodeError:
            return True

    def _run_events(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._usage_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except Exception:
                log.exception("flushing flag usage failed")

    # --- talking to the server ----------------------------------------------------------------

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._http_client is None:
                self._http_client = httpx.Client(
                    base_url=self.base_url,
                    headers={
                        "X-API-Key": self._api_key,
                        "User-Agent": USER_AGENT,
                        "Accept": "application/json",
                    },
                    timeout=self._timeout,
                )
            return self._http_client

    def _params(self) -> dict[str, str]:
        return {"environment": self.environment} if self.environment else {}

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = orjson.loads(response.read())
            detail = str(body.get("detail") or body.get("title") or response.reason_phrase)
        except (orjson.JSONDecodeError, AttributeError):
            detail = response.reason_phrase
        raise FlagsClientError(response.status_code, detail)

    def _fetch(self) -> None:
        """GET the ruleset (If-None-Match the one held) and apply it."""
        headers = {}
        if self._etag and self._server_revision is not None:
            headers["If-None-Match"] = self._etag
        try:
            response = self._http().get(
                "/api/v1/flags/ruleset", params=self._params(), headers=headers
            )
        except httpx.HTTPError as exc:
            raise FlagsClientError(None, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 304:
            return
        self._check(response)
        self._apply_put(orjson.loads(response.content))
        self._etag = response.headers.get("ETag")

    def _stream_once(self) -> bool:
        """Follow the stream until it ends; True if it was healthy (delivered an event or
        stayed up a minute), which resets the back-off."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self._server_revision is not None:
            headers["Last-Event-ID"] = str(self._server_revision)
        timeout = httpx.Timeout(self._timeout, read=STREAM_READ_TIMEOUT)
        healthy = False
        opened = self._clock()
        try:
            with self._http().stream(
                "GET",
                "/api/v1/flags/stream",
                params=self._params(),
                headers=headers,
                timeout=timeout,
            ) as response:
                self._check(response)
                kind = response.headers.get("content-type", "")
                if not kind.startswith("text/event-stream"):
                    raise FlagsClientError(response.status_code, f"not an event stream: {kind}")
                self._response = response
                if self._stop.is_set():
                    return healthy
                self._mark_up()
                parser = SSEParser()
                for chunk in response.iter_bytes():
                    for event in parser.feed(chunk):
                        if self._stop.is_set():
                            return healthy
                        self._on_event(event)
                        healthy = True
                    if parser.retry_ms is not None:
                        self._server_retry = parser.retry_ms / 1000
        except httpx.HTTPError as exc:
            if not self._stop.is_set():
                raise FlagsClientError(None, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._response = None
        return healthy or self._clock() - opened >= HEALTHY_STREAM

    def _interrupt_stream(self) -> None:
        """Wake the stream thread from its blocking read (closing alone would not)."""
        response = self._response
        if response is None:
            return
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run_stream(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                if self._server_revision is None:
                    self._fetch()
                    self._mark_up()
                if self._stream_once():
                    attempt = 0
                if self._stop.is_set():
                    return
                log.info("flag stream ended; reconnecting")
            except FlagsClientError as exc:
                if self._stop.is_set():
                    return
                self.last_error = exc
                if not exc.recoverable:
                    log.error("flag stream stopped for good: %s", exc)
                    self._give_up()
                    return
                log.warning("flag stream failed: %s", exc)
            except _Resync as exc:
                log.error("flag stream sent what cannot be applied (%s); resynchronising", exc)
                self._server_revision = None
            except Exception:
                log.exception("flag stream failed")
            self._mark_down()
            self._wait(self._backoff(attempt))
            attempt += 1

    def _run_poll(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self._fetch()
                self._mark_up()
                attempt = 0
                delay = self._poll_interval
            except Exception as exc:
                error = (
                    exc if isinstance(exc, FlagsClientError) else FlagsClientError(None, repr(exc))
                )
                self.last_error = error
                if not error.recoverable:
                    log.error("flag polling stopped for good: %s", exc)
                    self._give_up()
                    return
                log.warning("polling flags failed: %s", exc)
                self._mark_down()
                delay = self._backoff(attempt)
                attempt += 1
            self._wait(delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential from the first delay, at most 30 s, with jitter (half to all of it)."""
        base = self._reconnect_delay if self._reconnect_delay is not None else self._server_retry
        delay = min(MAX_RECONNECT_DELAY, base * 2.0 ** min(attempt, 16))
        return delay / 2 + random.random() * delay / 2

    def _wait(self, seconds: float) -> None:
        """Sleep for a reconnection (woken by close), noticing staleness on time."""
        self._check_stale()
        first = seconds
        if not self._stale and self._down_since is not None:
            until_stale = self._down_since + self._stale_after - self._clock()
            first = min(seconds, max(0.0, until_stale))
        if self._stop.wait(first):
            return
        self._check_stale()
        if seconds > first and not self._stop.wait(seconds - first):
            self._check_stale()

    def _mark_up(self) -> None:
        self._down_since = None
        if self._stale:
            self._stale = False
            self._notify_stale(False)

    def _give_up(self) -> None:
        """The server refused for good: what is served now will not be refreshed (and `start`
        stops waiting)."""
        self._down_since = self._down_since or self._clock()
        self._ready_event.set()
        if not self._stale:
            self._stale = True
            self._notify_stale(True)

    def _mark_down(self) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
        self._check_stale()

    def _check_stale(self) -> None:
        since = self._down_since
        if self._stale or since is None or self._stop.is_set():
            return
        if self._clock() - since >= self._stale_after:
            self._stale = True
            self._notify_stale(True)

    # --- applying what the server sends -------------------------------------------------------

    def _on_event(self, event: SSEEvent) -> None:
        if event.event not in ("put", "patch"):
            return
        try:
            doc = orjson.loads(event.data)
            if not isinstance(doc, dict):
                raise ValueError("the event's data is not a JSON object")
            if event.event == "put":
                self._apply_put(doc)
            else:
                self._apply_patch(doc)
        except Exception as exc:
            raise _Resync(f"{event.event} {event.id}: {exc}") from exc

    def _apply_put(self, doc: Mapping[str, Any]) -> None:
        ruleset = Ruleset.from_dict(doc)
        self._swap(ruleset, _experiments(doc.get("experiments")))

    def _apply_patch(self, doc: Mapping[str, Any]) -> None:
        old = self._ruleset
        revision = int(doc["revision"])
        if old is None or self._server_revision is None:
            raise ValueError("a patch before any put")
        if revision <= old.revision:
            return  # already applied
        flags = dict(old.docs)
        for raw in doc.get("flags") or ():
            flag = parse_flag_doc(raw)
            flags[flag.flag.key] = flag
        for key in doc.get("deleted_flags") or ():
            flags.pop(key, None)
        segments = dict(old.segments)
        for raw in doc.get("segments") or ():
            segment = parse_segment(raw)
            segments[segment.key] = segment
        for key in doc.get("deleted_segments") or ():
            segments.pop(key, None)
        ruleset = Ruleset(old.environment, revision, flags.values(), segments.values())
        experiments = (
            _experiments(doc["experiments"]) if "experiments" in doc else self._experiments
        )
        self._swap(ruleset, experiments)

    def _swap(self, ruleset: Ruleset, experiments: dict[str, float]) -> None:
        old = self._ruleset
        changed = changed_flags(old, ruleset)
        self._experiments = experiments
        self._ruleset = ruleset  # the one assignment evaluations see
        self._server_revision = ruleset.revision
        self._set_ready()
        if changed:
            keys = frozenset(changed)
            for listener in self._change_listeners:
                try:
                    listener(keys)
                except Exception:
                    log.exception("a flag change listener failed")

    def _set_ready(self) -> None:
        self._ready = True
        self._ready_event.set()

    def _notify_stale(self, stale: bool) -> None:
        for listener in self._stale_listeners:
            try:
                listener(stale)
            except Exception:
                log.exception("a flag staleness listener failed")
