"""The flags SDK: event-stream parsing, bootstrap and offline use, typed getters, patches,
usage and exposures without a server; then against a real server in a child process: the
initial load, changes through the stream, polling, reports, a restart, a fork."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tenfold.flags.client import (
    PROVIDER_NOT_READY,
    FlagsClient,
    SSEEvent,
    SSEParser,
    _Resync,
    changed_flags,
)
from tenfold.flags.evaluation import (
    DISABLED,
    FLAG_NOT_FOUND,
    INVALID_CONTEXT,
    STATIC,
    TARGETING_MATCH,
    TYPE_MISMATCH,
    Ruleset,
    bucket,
)
from tests.backends import SqliteTemplate, free_port, wait_ready


def flag(
    key: str,
    flag_type: str = "boolean",
    default: Any = False,
    *,
    variations: list[dict[str, Any]] | None = None,
    targeting: dict[str, Any] | None = None,
    version: int = 1,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "flag_key": key,
        "flag_type": flag_type,
        "default_value": default,
        "targeting": targeting if targeting is not None else {"enabled": True},
        "version": version,
    }
    if variations is not None:
        doc["variations"] = variations
    return doc


def on_for(*users: str) -> dict[str, Any]:
    """Enabled; `on` for the users listed, `off` for everyone else."""
    return {
        "enabled": True,
        "rules": [
            {
                "id": "listed",
                "conditions": [{"attribute": "user_id", "operator": "in", "values": list(users)}],
                "variation": "on",
            }
        ],
        "default_rule": {"variation": "off"},
    }


def document(
    flags: list[dict[str, Any]],
    *,
    revision: int = 1,
    segments: list[dict[str, Any]] | None = None,
    experiments: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "environment": "production",
        "revision": revision,
        "bucketing_version": 1,
        "flags": flags,
        "segments": segments or [],
        "experiments": experiments or [],
    }


BASIC = document(
    [
        flag("dark-mode", targeting=on_for("u-1")),
        flag(
            "banner",
            "string",
            "hello",
            variations=[{"key": "hello", "value": "hello"}, {"key": "hi", "value": "hi"}],
            targeting={"enabled": True, "default_rule": {"variation": "hi"}},
        ),
        flag(
            "limit",
            "number",
            10,
            variations=[{"key": "ten", "value": 10}, {"key": "half", "value": 2.5}],
            targeting={"enabled": True, "default_rule": {"variation": "ten"}},
        ),
        flag(
            "layout",
            "json",
            {"columns": 2},
            variations=[{"key": "two", "value": {"columns": 2}}, {"key": "list", "value": [1]}],
            targeting={"enabled": True, "default_rule": {"variation": "list"}},
        ),
        flag("killed", targeting={"enabled": False, "off_variation": "off"}),
    ],
    revision=7,
)

# Nothing listens here: a connection is refused at once.
CLOSED_URL = "http://127.0.0.1:9"


def unreachable() -> FlagsClient:
    """An online client that is never started (nothing is sent unless a test flushes)."""
    return FlagsClient(CLOSED_URL, "key", bootstrap=BASIC, usage_interval=3600)


# --- the event-stream parser -----------------------------------------------------------------

STREAM = (
    b"\xef\xbb\xbfretry: 2500\r\n"
    b": ping\r\n"
    b"\r\n"
    b"event: put\r\n"
    b"id: 7\r\n"
    b'data: {"a":\r\n'
    b"data:  1}\r\n"
    b"\r\n"
    b"event: patch\n"
    b"id: 8\n"
    b"data\n"
    b"\n"
    b"id: 9\r"
    b"data: last\r"
    b"\r"
    b"event: ignored-without-data\n"
    b"\n"
)
EXPECTED = [
    SSEEvent("put", '{"a":\n 1}', "7"),
    SSEEvent("patch", "", "8"),
    SSEEvent("message", "last", "9"),
]


def test_sse_parser_follows_the_html_rules() -> None:
    parser = SSEParser()
    assert parser.feed(STREAM) == EXPECTED
    assert parser.retry_ms == 2500
    assert parser.last_event_id == "9"


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_sse_parser_gives_the_same_events_however_the_bytes_are_split(size: int) -> None:
    parser = SSEParser()
    events = []
    for i in range(0, len(STREAM), size):
        events += parser.feed(STREAM[i : i + size])
    assert events == EXPECTED


def test_sse_parser_keeps_an_unfinished_event_for_the_next_chunk() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: put\ndata: x") == []
    assert parser.feed(b"yz\n\n") == [SSEEvent("put", "xyz", "")]
    assert parser.feed(b"retry: soon\nid: a\0b\ndata: q\n\n") == [SSEEvent("message", "q", "")]
    assert parser.retry_ms is None


# --- bootstrap, offline, save ----------------------------------------------------------------


def test_offline_serves_the_bootstrap_file_and_save_round_trips(tmp_path: Path) -> None:
    source = tmp_path / "flags.json"
    source.write_bytes(orjson.dumps(BASIC))
    flags = FlagsClient(offline=True, bootstrap=source)
    assert flags.ready and flags.start() and flags.revision == 7 and not flags.stale
    assert flags.boolean("dark-mode", {"user_id": "u-1"}, False) is True
    assert flags.boolean("dark-mode", "u-2", True) is False

    saved = tmp_path / "saved.json"
    flags.save(saved)
    again = FlagsClient(offline=True, bootstrap=saved)
    assert again.ruleset is not None and flags.ruleset is not None
    assert again.ruleset.to_dict() == flags.ruleset.to_dict()
    for key in ("dark-mode", "banner", "limit", "layout", "killed"):
        assert again.evaluate(key, "u-1") == flags.evaluate(key, "u-1")
    flags.close()  # offline: nothing to send, nothing to stop
    assert flags.boolean("dark-mode", "u-1", False) is True


def test_offline_without_bootstrap_answers_defaults() -> None:
    flags = FlagsClient(offline=True)
    assert not flags.ready and not flags.start()
    details = flags.boolean_details("dark-mode", "u-1", True)
    assert (details.value, details.error_code) == (True, PROVIDER_NOT_READY)
    with pytest.raises(RuntimeError):
        flags.save("nowhere.json")


def test_an_online_client_needs_a_url_and_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENFOLD_URL", raising=False)
    monkeypatch.delenv("TENFOLD_API_KEY", raising=False)
    with pytest.raises(ValueError, match="base_url and api_key"):
        FlagsClient("http://x")
    monkeypatch.setenv("TENFOLD_URL", "http://flags.test/")
    monkeypatch.setenv("TENFOLD_API_KEY", "k")
    assert FlagsClient().base_url == "http://flags.test"


# --- typed getters ---------------------------------------------------------------------------


def test_typed_getters_answer_values_of_their_type() -> None:
    flags = FlagsClient(offline=True, bootstrap=BASIC)
    assert flags.boolean("dark-mode", "u-1", False) is True
    assert flags.string("banner", None, "x") == "hi"
    assert flags.number("limit", {}, 0.5) == 10
    assert flags.json("layout", {}, {}) == [1]
    details = flags.string_details("banner", {}, "x")
    assert (details.variation, details.reason, details.error_code) == ("hi", STATIC, None)
    match = flags.boolean_details("dark-mode", {"targetingKey": "u-1"}, False)
    assert (match.value, match.reason, match.rule_id) == (True, TARGETING_MATCH, "listed")
    off = flags.boolean_details("killed", "u-1", True)
    assert (off.value, off.reason) == (False, DISABLED)


@pytest.mark.parametrize(
    ("getter", "key", "default"),
    [
        ("boolean", "banner", True),
        ("string", "limit", "x"),
        ("number", "dark-mode", 1.5),
        ("json", "banner", {"d": 1}),
        ("boolean", "layout", False),
    ],
)
def test_a_value_of_another_type_is_the_default_with_type_mismatch(
    getter: str, key: str, default: Any
) -> None:
    flags = FlagsClient(offline=True, bootstrap=BASIC)
    details = getattr(flags, f"{getter}_details")(key, "u-1", default)
    assert details.value == default
    assert (details.error_code, details.variation) == (TYPE_MISMATCH, None)
    assert getattr(flags, getter)(key, "u-1", default) == default


def test_an_unknown_flag_or_bad_context_is_the_default_never_an_exception() -> None:
    flags = FlagsClient(offline=True, bootstrap=BASIC)
    missing = flags.number_details("nope", "u-1", 3)
    assert (missing.value, missing.error_code) == (3, FLAG_NOT_FOUND)
    bad = flags.boolean_details("dark-mode", 42, True)  # type: ignore[arg-type]
    assert (bad.value, bad.error_code) == (True, INVALID_CONTEXT)


# --- applying the stream ---------------------------------------------------------------------


def put(doc: dict[str, Any]) -> SSEEvent:
    return SSEEvent("put", orjson.dumps(doc).decode(), str(doc["revision"]))


def patch(revision: int, **parts: Any) -> SSEEvent:
    return SSEEvent("patch", orjson.dumps({"revision": revision, **parts}).decode(), str(revision))


def test_put_then_patches_change_answers_and_tell_listeners() -> None:
    flags = unreachable()
    heard: list[frozenset[str]] = []
    flags.on_change(heard.append)
    flags._on_event(put(BASIC))  # what the server sends first: nothing changed
    assert flags.ready and flags.revision == 7 and heard == []

    flags._on_event(patch(8, flags=[flag("dark-mode", targeting=on_for("u-2"), version=2)]))
    assert flags.revision == 8 and heard == [frozenset({"dark-mode"})]
    assert flags.boolean("dark-mode", "u-2", False) is True
    assert flags.boolean("dark-mode", "u-1", True) is False

    flags._on_event(patch(8, deleted_flags=["banner"]))  # already applied: ignored
    assert flags.string("banner", "u-1", "x") == "hi" and len(heard) == 1

    flags._on_event(patch(9, deleted_flags=["banner"], flags=[flag("new", version=1)]))
    assert heard[-1] == frozenset({"banner", "new"})
    assert flags.string_details("banner", "u-1", "x").error_code == FLAG_NOT_FOUND
    assert flags.boolean_details("new", "u-1", True).value is False


def test_a_segment_change_reaches_the_flags_using_it_and_their_dependents() -> None:
    segment = {"segment_key": "beta", "included": ["u-1"]}
    uses_beta = {
        "enabled": True,
        "rules": [
            {"conditions": [{"operator": "in_segment", "values": ["beta"]}], "variation": "on"}
        ],
        "default_rule": {"variation": "off"},
    }
    needs_gated = {
        "enabled": True,
        "prerequisites": [{"flag": "gated", "variation": "on"}],
        "default_rule": {"variation": "on"},
    }
    flags = unreachable()
    flags._on_event(
        put(
            document(
                [
                    flag("gated", targeting=uses_beta),
                    flag("child", targeting=needs_gated),
                    flag("other", targeting=on_for("u-9")),
                ],
                segments=[segment],
            )
        )
    )
    assert flags.boolean("child", "u-2", True) is False
    heard: list[frozenset[str]] = []
    flags.on_change(heard.append)
    flags._on_event(patch(2, segments=[{"segment_key": "beta", "included": ["u-2"]}]))
    assert heard == [frozenset({"gated", "child"})]
    assert flags.boolean("child", "u-2", False) is True


def test_what_cannot_be_applied_asks_for_a_full_resync() -> None:
    flags = unreachable()
    flags._on_event(put(BASIC))
    with pytest.raises(_Resync):
        flags._on_event(patch(8, flags=[{"flag_key": "bad", "flag_type": "colour"}]))
    with pytest.raises(_Resync):
        flags._on_event(SSEEvent("patch", "not json", "9"))
    assert flags.revision == 7  # the ruleset held is untouched
    flags._on_event(SSEEvent("message", "whatever", ""))  # unknown events are ignored


def test_changed_flags_of_a_first_load_is_every_flag() -> None:
    new = Ruleset.from_dict(BASIC)
    assert changed_flags(None, new) == {"dark-mode", "banner", "limit", "layout", "killed"}
    assert changed_flags(new, Ruleset.from_dict(BASIC)) == set()


def test_a_listener_that_raises_does_not_stop_the_others() -> None:
    flags = unreachable()
    heard: list[frozenset[str]] = []

    def broken(keys: frozenset[str]) -> None:
        raise RuntimeError("listener bug")

    flags._on_event(put(BASIC))
    flags.on_change(broken)
    remove = flags.on_change(heard.append)
    flags._on_event(patch(8, flags=[flag("dark-mode", version=2)]))
    remove()
    flags._on_event(patch(9, flags=[flag("dark-mode", version=3)]))
    assert heard == [frozenset({"dark-mode"})]


# --- usage and exposures ---------------------------------------------------------------------


def experiment(rate: float) -> dict[str, Any]:
    split = {
        "enabled": True,
        "default_rule": {
            "split": [{"variation": "on", "weight": 50}, {"variation": "off", "weight": 50}]
        },
    }
    return document(
        [flag("exp", targeting=split), flag("plain", targeting=on_for("u-1"))],
        experiments=[{"flag_key": "exp", "sample_rate": rate}],
    )


def test_usage_counts_every_evaluation_by_variation() -> None:
    flags = unreachable()
    for user in ("u-1", "u-2", "u-3"):
        flags.boolean("dark-mode", user, False)
    flags.string("nope", "u-1", "")  # unknown flags are not counted
    assert flags._usage == {"dark-mode": {"on": 1, "off": 2}}
    assert flags._queue == []  # not in an experiment: no exposures


def test_exposures_sample_users_deterministically_and_once_each() -> None:
    flags = FlagsClient(CLOSED_URL, "key", bootstrap=experiment(0.3), wall_clock=lambda: 1.5)
    users = [f"user-{i}" for i in range(1000)]
    for _ in range(3):
        for user in users:
            flags.boolean("exp", {"user_id": user}, False)
    sampled = {u for u in users if bucket("exposure:exp", u) < 30_000}
    assert 230 < len(sampled) < 370
    assert [e["user_id"] for e in flags._queue] == [u for u in users if u in sampled]
    first = flags._queue[0]
    answer = flags.evaluate("exp", first["user_id"])
    assert first == {
        "kind": "exposure",
        "flag_key": "exp",
        "variation": answer.variation,
        "user_id": first["user_id"],
        "timestamp_ms": 1500,
    }
    assert flags._usage["exp"]["on"] + flags._usage["exp"]["off"] == 3001


def test_no_exposure_without_a_user_or_for_a_disabled_flag() -> None:
    doc = experiment(1.0)
    doc["flags"][0]["targeting"] = {"enabled": False}
    flags = FlagsClient(CLOSED_URL, "key", bootstrap=doc)
    flags.boolean("exp", "u-1", True)
    flags2 = FlagsClient(CLOSED_URL, "key", bootstrap=experiment(1.0))
    flags2.boolean("exp", {"plan": "pro"}, True)  # no user: TARGETING_KEY_MISSING
    assert flags._queue == [] and flags2._queue == []


def test_the_dedup_memory_and_the_queue_are_bounded() -> None:
    flags = FlagsClient(
        CLOSED_URL, "key", bootstrap=experiment(1.0), exposure_cache_size=10, max_queue=15
    )
    for i in range(12):
        flags.boolean("exp", f"u-{i}", False)
    assert len(flags._seen) == 10 and len(flags._queue) == 12
    flags.boolean("exp", "u-0", False)  # forgotten: recorded again
    assert len(flags._queue) == 13
    assert flags.track("signup", "u-0", 3) and flags.track("signup", {"targetingKey": "u-1"})
    assert not flags.track("signup", "u-2")  # the queue is full
    assert not flags.track("signup", {"plan": "pro"})  # no user
    assert flags.dropped_events == 1
    assert flags._queue[-1]["kind"] == "conversion" and flags._queue[-1]["value"] is None
    assert flags._queue[-2]["value"] == 3


def test_reports_add_up_per_flag() -> None:
    flags = unreachable()
    flags.report("dark-mode", requests=10, errors=1)
    flags.report("dark-mode", requests=5)
    assert flags._guard == {"dark-mode": [15, 1]}


def test_offline_records_nothing() -> None:
    flags = FlagsClient(offline=True, bootstrap=experiment(1.0))
    flags.boolean("exp", "u-1", False)
    flags.report("exp", requests=1)
    assert not flags.track("m", "u-1")
    assert flags._usage == {} and flags._queue == [] and flags._guard == {}


# --- connection state ------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_thirty_seconds() -> None:
    flags = FlagsClient(CLOSED_URL, "key", reconnect_delay=1.0)
    for attempt, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16)]):
        assert low <= flags._backoff(attempt) <= high
    assert 15 <= flags._backoff(40) <= 30


def test_an_unreachable_server_serves_the_bootstrap_and_turns_stale() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = FlagsClient(
        f"http://127.0.0.1:{port}",
        "key",
        bootstrap=BASIC,
        stale_after=0.2,
        reconnect_delay=0.01,
    )
    stale = threading.Event()
    flags.on_stale(lambda now: stale.set() if now else None)
    assert flags.start(wait=0) is False
    assert flags.boolean("dark-mode", "u-1", False) is True  # the bootstrap meanwhile
    assert stale.wait(5) and flags.stale and not flags.ready
    assert flags.last_error is not None and flags.last_error.status is None
    flags.close()


def test_after_fork_the_child_starts_once_whoever_asks_first() -> None:
    flags = FlagsClient(CLOSED_URL, "key", bootstrap=BASIC, reconnect_delay=10)
    flags.start(wait=0)
    flags.boolean("dark-mode", "u-1", False)
    parents_stop = flags._stop
    flags._after_fork()  # what the at-fork hook does in a child
    try:
        assert flags._usage == {} and flags._threads == [] and flags._http_client is None
        assert flags.boolean("dark-mode", "u-1", False) is True  # the inherited ruleset
        threads = flags._threads
        assert len(threads) == 2 and all(t.is_alive() for t in threads)
        flags.start(wait=0)
        flags.evaluate("dark-mode", "u-1")
        assert flags._threads is threads  # started once
    finally:
        parents_stop.set()  # (here the "parent's" threads share this process)
        flags.close()


# --- against a real server -------------------------------------------------------------------


class Server:
    """A tenfold server (flags only) in a child process, restartable on the same port and
    database; `admin` calls its admin API with the admin key it created."""

    def __init__(self, directory: Path, database_url: str) -> None:
        self.data_dir = directory / "data"
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = os.environ | {
            "TENFOLD_DATA_DIR": str(self.data_dir),
            "TENFOLD_DATABASE_URL": self.database_url,
            "TENFOLD_REDIS_URL": "",
            "TENFOLD_SERVICES": "flags",
            "TENFOLD_LOG_LEVEL": "warning",
            "TENFOLD_GC_FREEZE": "false",
        }
        cmd = [sys.executable, "-m", "uvicorn", "tenfold.app:build_app", "--factory"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env)
        asyncio.run(wait_ready(self.url, self.proc))

    def kill(self) -> None:
        """A crash: open streams end at once (a graceful stop waits for them to close)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(
            method,
            self.url + path,
            json=body,
            headers={"X-API-Key": self.admin_key},
            timeout=10,
        )
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def sdk_key(self, environment: str = "production") -> str:
        """A key with flags:read only, bound to `environment`."""
        return str(self.admin("POST", f"/api/v1/flags/environments/{environment}/keys")["api_key"])

    def boolean_flag(self, key: str, targeting: dict[str, Any]) -> None:
        self.admin(
            "POST",
            "/api/v1/flags",
            {"flag_key": key, "name": key, "flag_type": "boolean", "default_value": False},
        )
        self.admin("PUT", f"/api/v1/flags/{key}/environments/production", targeting)

    def toggle(self, key: str, enabled: bool) -> None:
        body = {"environment": "production", "enabled": enabled}
        assert self.admin("POST", f"/api/v1/flags/{key}/toggle", body)["status"] == "applied"


@contextmanager
def running_server(sqlite_template: SqliteTemplate, directory: Path) -> Iterator[Server]:
    server = Server(directory, sqlite_template.clone(directory / "db" / "tenfold.db"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def server(
    sqlite_template: SqliteTemplate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with running_server(sqlite_template, tmp_path_factory.mktemp("flags-server")) as s:
        yield s


class Changes:
    """Waits, with a timeout, for what the client's change notifications should bring about."""

    def __init__(self, flags: FlagsClient) -> None:
        self.keys: list[frozenset[str]] = []
        self._event = threading.Event()
        flags.on_change(self._heard)

    def _heard(self, keys: frozenset[str]) -> None:
        self.keys.append(keys)
        self._event.set()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Check `condition` after each change until it holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            assert left > 0 and self._event.wait(left), f"not so within {timeout} s"
            self._event.clear()


# A flag that serves `on` when enabled: toggling it is visible in evaluations.
ON_WHEN_ENABLED = {"enabled": False, "default_rule": {"variation": "on"}, "off_variation": "off"}


@pytest.mark.slow
def test_initial_load_then_changes_arrive_through_the_stream(
    server: Server, tmp_path: Path
) -> None:
    server.boolean_flag("sdk-toggle", ON_WHEN_ENABLED)
    flags = FlagsClient(server.url, server.sdk_key())  # the key's environment: production
    changes = Changes(flags)
    try:
        assert flags.start(wait=10) and flags.ready and not flags.stale
        assert flags.ruleset is not None and flags.ruleset.environment == "production"
        assert any("sdk-toggle" in keys for keys in changes.keys)  # the first load counts
        first = flags.revision
        off = flags.boolean_details("sdk-toggle", "u-1", True)
        assert (off.value, off.reason) == (False, DISABLED)

        changes.keys.clear()
        server.toggle("sdk-toggle", True)
        changes.wait_until(lambda: flags.boolean("sdk-toggle", "u-1", False))
        assert changes.keys == [frozenset({"sdk-toggle"})]
        assert flags.revision is not None and first is not None and flags.revision > first

        # a segment change reaches the flag using it; a deleted flag is gone
        server.admin("PUT", "/api/v1/flags/segments/sdk-beta", {"included": ["u-1"]})
        server.boolean_flag(
            "sdk-beta-only",
            {
                "enabled": True,
                "rules": [
                    {
                        "conditions": [{"operator": "in_segment", "values": ["sdk-beta"]}],
                        "variation": "on",
                    }
                ],
                "default_rule": {"variation": "off"},
            },
        )
        changes.wait_until(lambda: flags.boolean("sdk-beta-only", "u-1", False))
        assert flags.boolean("sdk-beta-only", "u-2", True) is False
        changes.keys.clear()
        server.admin("PUT", "/api/v1/flags/segments/sdk-beta", {"included": ["u-2"]})
        changes.wait_until(lambda: flags.boolean("sdk-beta-only", "u-2", False))
        assert changes.keys == [frozenset({"sdk-beta-only"})]  # through the segment

        server.admin("DELETE", "/api/v1/flags/sdk-toggle")
        changes.wait_until(lambda: flags.evaluate("sdk-toggle", "u-1").error_code == FLAG_NOT_FOUND)

        # what it saves, an offline client serves
        flags.save(tmp_path / "flags.json")
        offline = FlagsClient(offline=True, bootstrap=tmp_path / "flags.json")
        assert offline.revision == flags.revision
        assert offline.boolean("sdk-beta-only", "u-2", False) is True
        assert flags.last_error is None
    finally:
        flags.close()


@pytest.mark.slow
def test_polling_follows_changes_too(server: Server) -> None:
    server.boolean_flag("sdk-polled", ON_WHEN_ENABLED)
    flags = FlagsClient(server.url, server.sdk_key(), stream=False, poll_interval=0.05)
    try:
        assert flags.start(wait=10)
        changes = Changes(flags)  # after the first load
        assert flags._etag is not None
        server.toggle("sdk-polled", True)
        changes.wait_until(lambda: flags.boolean("sdk-polled", "u-1", False))
    finally:
        flags.close()


@pytest.mark.slow
def test_a_refused_key_stops_for_good_and_start_returns_at_once(server: Server) -> None:
    flags = FlagsClient(server.url, "tf_not_a_key", bootstrap=BASIC)
    stale = threading.Event()
    flags.on_stale(lambda now: stale.set() if now else None)
    try:
        assert flags.start(wait=30) is False
        assert stale.wait(5) and flags.stale
        assert flags.last_error is not None and flags.last_error.status == 401
        assert flags.boolean("dark-mode", "u-1", False) is True  # the bootstrap still serves
    finally:
        flags.close()


@pytest.mark.slow
def test_usage_exposures_conversions_and_guard_reports_reach_the_server(server: Server) -> None:
    split = {
        "enabled": True,
        "default_rule": {
            "split": [{"variation": "on", "weight": 50}, {"variation": "off", "weight": 50}]
        },
    }
    server.boolean_flag("sdk-exp", split)
    server.admin(
        "POST",
        "/api/v1/experiments",
        {
            "experiment_key": "sdk-exp-1",
            "flag_key": "sdk-exp",
            "environment": "production",
            "metric": "signup",
            "sample_rate": 0.5,
        },
    )
    guarded = {**ON_WHEN_ENABLED, "enabled": True}
    guarded["guard"] = {"threshold": 0.1, "min_requests": 10, "window_seconds": 60}
    server.boolean_flag("sdk-guarded", guarded)
    flags = FlagsClient(server.url, server.sdk_key(), usage_interval=3600)
    try:
        assert flags.start(wait=10)
        changes = Changes(flags)  # after the first load
        assert flags._experiments == {"sdk-exp": 0.5}
        users = [f"user-{i}" for i in range(200)]
        served = {u: flags.boolean_details("sdk-exp", u, False).variation for u in users}
        for u in users:
            flags.boolean("sdk-exp", u, False)  # exposures are sent once per user
        sampled = [u for u in users if bucket("exposure:sdk-exp", u) < 50_000]
        converted = sampled[::4]
        for u in converted:
            flags.track("signup", u)
        flags.report("sdk-guarded", requests=20, errors=10)
        flags.flush()
        assert flags.last_error is None and flags.dropped_events == 0

        results = server.admin("GET", "/api/v1/experiments/sdk-exp-1/results")
        by_variation = {v["variation"]: v for v in results["variations"]}
        for variation in ("on", "off"):
            assert by_variation[variation]["exposures"] == sum(
                1 for u in sampled if served[u] == variation
            )
            assert by_variation[variation]["conversions"] == sum(
                1 for u in converted if served[u] == variation
            )

        # the guard breached: the server turned the flag off, and the stream says so
        changes.wait_until(lambda: flags.evaluate("sdk-guarded", "u-1").reason == DISABLED)
    finally:
        flags.close()


@pytest.mark.slow
def test_the_stream_resumes_after_a_server_restart_with_last_event_id(
    sqlite_template: SqliteTemplate, tmp_path: Path
) -> None:
    with running_server(sqlite_template, tmp_path) as server:
        server.boolean_flag("sdk-restart", ON_WHEN_ENABLED)
        flags = FlagsClient(server.url, server.sdk_key(), stale_after=0.2, reconnect_delay=0.05)
        puts: list[int] = []
        apply_put = flags._apply_put

        def counting_put(doc: Any) -> None:
            puts.append(int(doc["revision"]))
            apply_put(doc)

        flags._apply_put = counting_put  # type: ignore[method-assign]
        stale, fresh = threading.Event(), threading.Event()
        flags.on_stale(lambda now: (stale if now else fresh).set())
        try:
            assert flags.start(wait=10)
            changes = Changes(flags)  # after the first load
            held = flags.revision
            server.kill()
            assert stale.wait(10) and flags.stale
            assert flags.boolean("sdk-restart", "u-1", True) is False  # served while down
            server.start()
            assert fresh.wait(30) and not flags.stale
            server.toggle("sdk-restart", True)
            changes.wait_until(lambda: flags.boolean("sdk-restart", "u-1", False))
            # one full ruleset (the first load): the reconnection sent Last-Event-ID and the
            # server, at that revision still, sent no put
            assert puts == [held]
        finally:
            flags.close()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_opens_its_own_stream_and_sees_later_changes(server: Server) -> None:
    server.boolean_flag("sdk-fork", ON_WHEN_ENABLED)
    flags = FlagsClient(server.url, server.sdk_key())
    assert flags.start(wait=10)
    parent_changes = Changes(flags)
    flags.boolean("sdk-fork", "u-1", True)  # a count the child must not send again
    child_ready_r, child_ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: exit with 0 only if it saw the toggle through its own stream
        status = 1
        try:
            os.close(child_ready_r)
            inherited = {t.ident for t in threading.enumerate()}
            assert flags._usage == {} and flags._http_client is None
            changes = Changes(flags)
            assert flags.boolean("sdk-fork", "u-1", True) is False  # starts the stream
            assert any(t.ident not in inherited for t in flags._threads)
            os.write(child_ready_w, b"1")
            changes.wait_until(lambda: flags.boolean("sdk-fork", "u-1", False), timeout=15)
            flags.close()
            status = 0
        except BaseException:
            traceback.print_exc()
            status = 2
        finally:
            os._exit(status)
    os.close(child_ready_w)
    try:
        ready, _, _ = select.select([child_ready_r], [], [], 15)
        assert ready and os.read(child_ready_r, 1) == b"1", "the child did not start"
        server.toggle("sdk-fork", True)
        parent_changes.wait_until(lambda: flags.boolean("sdk-fork", "u-1", False))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert flags.boolean("sdk-fork", "u-1", False) is True
    finally:
        os.close(child_ready_r)
        flags.close()
