"""The OpenFeature provider, through OpenFeature's own API: without a server, then against a
real one (the SDK's tests start it)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import EventDetails, ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.provider import ProviderStatus
from openfeature.track import TrackingEventDetails

from tenfold.flags.client import FlagsClient
from tenfold.flags.provider import TenfoldProvider, to_context
from tests.backends import SqliteTemplate
from tests.flags.test_client import (
    BASIC,
    CLOSED_URL,
    ON_WHEN_ENABLED,
    document,
    flag,
    on_for,
    patch,
    put,
    running_server,
)


@pytest.fixture(autouse=True)
def no_providers() -> Iterator[None]:
    yield
    api.clear_providers()


class Events:
    """The provider's OpenFeature events of one kind, as they arrive on OpenFeature's handler
    threads (a handler also hears at once of the default no-op provider's state: skipped)."""

    def __init__(self, kind: ProviderEvent) -> None:
        self.kind = kind
        self.seen: list[EventDetails] = []
        self.arrived = threading.Event()
        api.add_handler(kind, self.handle)

    def handle(self, details: EventDetails) -> None:
        if details.provider_name != "tenfold":
            return
        self.seen.append(details)
        self.arrived.set()

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[EventDetails]:
        while len(self.seen) < count:
            assert self.arrived.wait(timeout), f"no {self.kind} within {timeout} s"
            self.arrived.clear()
        return self.seen

    def close(self) -> None:
        api.remove_handler(self.kind, self.handle)


RICH = document(
    [
        *BASIC["flags"],
        flag(
            "ratio",
            "number",
            0.25,
            variations=[{"key": "quarter", "value": 0.25}, {"key": "whole", "value": 3.0}],
            targeting={"enabled": True, "default_rule": {"variation": "whole"}},
        ),
        flag(
            "needs-dark",
            targeting={
                "enabled": True,
                "prerequisites": [{"flag": "dark-mode", "variation": "on"}],
                "off_variation": "off",
                "default_rule": {"variation": "on"},
            },
        ),
        flag(
            "launch",
            targeting={
                "enabled": True,
                "rules": [
                    {
                        "id": "after-launch",
                        "conditions": [
                            {
                                "attribute": "signed_up",
                                "operator": "after",
                                "values": ["2024-01-01T00:00:00Z"],
                            }
                        ],
                        "variation": "on",
                    }
                ],
                "default_rule": {"variation": "off"},
            },
        ),
    ]
)


def offline_provider() -> TenfoldProvider:
    provider = TenfoldProvider(offline=True, bootstrap=RICH)
    api.set_provider_and_wait(provider)
    return provider


def test_all_five_resolvers_through_openfeature() -> None:
    offline_provider()
    assert api.get_provider_metadata().name == "tenfold"
    client = api.get_client()
    user = EvaluationContext("u-1")
    on = client.get_boolean_details("dark-mode", False, user)
    assert (on.value, on.variant, on.reason, on.error_code) == (
        True,
        "on",
        Reason.TARGETING_MATCH,
        None,
    )
    assert on.flag_metadata == {"rule_id": "listed", "revision": 1}
    assert client.get_string_details("banner", "x", user).value == "hi"
    assert client.get_string_details("banner", "x", user).reason == Reason.STATIC
    assert client.get_integer_details("limit", 0, user).value == 10
    assert client.get_float_details("limit", 0.0, user).value == 10.0
    assert client.get_float_details("ratio", 0.0, user).value == 3.0
    assert client.get_integer_details("ratio", 1, user).value == 3  # an integral float
    assert client.get_object_details("layout", {}, user).value == [1]
    off = client.get_boolean_details("killed", True, user)
    assert (off.value, off.reason) == (False, Reason.DISABLED)


@pytest.mark.parametrize(
    ("kind", "key", "default"),
    [
        ("boolean", "banner", True),
        ("string", "dark-mode", "x"),
        ("integer", "banner", 5),
        ("float", "layout", 1.5),
        ("object", "limit", {"d": 1}),
    ],
)
def test_a_value_of_another_type_is_the_default_with_type_mismatch(
    kind: str, key: str, default: Any
) -> None:
    offline_provider()
    details = getattr(api.get_client(), f"get_{kind}_details")(key, default, EvaluationContext("u"))
    assert (details.value, details.error_code, details.reason) == (
        default,
        ErrorCode.TYPE_MISMATCH,
        Reason.ERROR,
    )


def test_an_integer_resolution_refuses_a_fraction() -> None:
    doc = document(
        [
            flag(
                "ratio",
                "number",
                0.5,
                variations=[{"key": "half", "value": 0.5}],
                targeting={"enabled": True},
            )
        ]
    )
    provider = TenfoldProvider(FlagsClient(offline=True, bootstrap=doc))
    details = provider.resolve_integer_details("ratio", 7)
    assert (details.value, details.error_code) == (7, ErrorCode.TYPE_MISMATCH)
    assert provider.resolve_float_details("ratio", 7.0).value == 0.5


def test_errors_and_tenfold_reasons_pass_through() -> None:
    offline_provider()
    client = api.get_client()
    missing = client.get_boolean_details("nope", True)
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    blocked = client.get_boolean_details("needs-dark", True, EvaluationContext("u-2"))
    assert (blocked.value, blocked.reason) == (False, "PREREQUISITE_FAILED")
    passed = client.get_boolean_details("needs-dark", False, EvaluationContext("u-1"))
    assert (passed.value, passed.reason) == (True, Reason.STATIC)


def test_the_context_maps_targeting_key_and_dates() -> None:
    when = datetime(2024, 6, 1, tzinfo=UTC)
    ctx = EvaluationContext("u-1", {"plan": "pro", "signed_up": when, "tags": ["a"]})
    assert to_context(ctx) == {
        "plan": "pro",
        "signed_up": when.timestamp() * 1000,
        "tags": ["a"],
        "targetingKey": "u-1",
        "user_id": "u-1",
    }
    assert to_context(EvaluationContext(None, {"user_id": "x"})) == {"user_id": "x"}
    assert to_context(None) == {}
    offline_provider()
    launch = api.get_client().get_boolean_value("launch", False, ctx)
    early = EvaluationContext("u-2", {"signed_up": datetime(2023, 1, 1)})
    assert launch is True
    assert api.get_client().get_boolean_value("launch", True, early) is False


def test_changes_are_announced_with_the_flags_changed() -> None:
    flags = FlagsClient(CLOSED_URL, "key", bootstrap=BASIC, usage_interval=3600)
    provider = TenfoldProvider(flags)
    changed = Events(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED)
    try:
        flags._on_event(put(BASIC))
        flags._on_event(patch(8, flags=[flag("dark-mode", targeting=on_for("u-7"), version=2)]))
        assert provider.resolve_boolean_details("dark-mode", False, EvaluationContext("u-7")).value
        # Not registered yet: events only reach OpenFeature from a registered provider.
        assert changed.seen == []
        api.set_provider_and_wait(provider)  # starts the client: it never connects here
        flags._on_event(patch(9, flags=[flag("dark-mode", targeting=on_for("u-8"), version=3)]))
        assert changed.wait()[0].flags_changed == ["dark-mode"]
    finally:
        changed.close()


def test_a_provider_without_data_fails_to_start_then_turns_ready() -> None:
    flags = FlagsClient(offline=True)
    provider = TenfoldProvider(flags)
    ready = Events(ProviderEvent.PROVIDER_READY)
    errors = Events(ProviderEvent.PROVIDER_ERROR)
    try:
        api.set_provider(provider)
        assert errors.wait()[0].message is not None
        assert api.get_client().get_provider_status() == ProviderStatus.ERROR
        flags._on_event(put(BASIC))  # data arrives (as a stream would bring it)
        assert ready.wait()[0].flags_changed is not None
        assert api.get_client().get_provider_status() == ProviderStatus.READY
        assert api.get_client().get_boolean_value("dark-mode", False, EvaluationContext("u-1"))
    finally:
        ready.close()
        errors.close()


def test_an_unreachable_server_makes_the_provider_stale() -> None:
    flags = FlagsClient(CLOSED_URL, "key", bootstrap=BASIC, stale_after=0.1, reconnect_delay=0.01)
    stale = Events(ProviderEvent.PROVIDER_STALE)
    try:
        api.set_provider(TenfoldProvider(flags, start_wait=0))
        assert "stream is down" in (stale.wait()[0].message or "")
        assert api.get_client().get_provider_status() == ProviderStatus.STALE
        # a stale provider still answers from what it holds
        assert api.get_client().get_boolean_value("dark-mode", False, EvaluationContext("u-1"))
    finally:
        stale.close()


def test_track_queues_a_conversion() -> None:
    flags = FlagsClient(CLOSED_URL, "key", bootstrap=BASIC)
    provider = TenfoldProvider(flags)
    provider.track("checkout", EvaluationContext("u-1"), TrackingEventDetails(value=12.5))
    provider.track("visit", EvaluationContext("u-2"))
    assert [(e["metric"], e["user_id"], e["value"]) for e in flags._queue] == [
        ("checkout", "u-1", 12.5),
        ("visit", "u-2", None),
    ]


def test_a_client_or_its_arguments_not_both() -> None:
    with pytest.raises(TypeError):
        TenfoldProvider(FlagsClient(offline=True), offline=True)


def test_without_openfeature_the_import_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "openfeature.provider", None)
    monkeypatch.delitem(sys.modules, "tenfold.flags.provider")
    with pytest.raises(ImportError, match=r"pip install 'tenfold\[openfeature\]'"):
        importlib.import_module("tenfold.flags.provider")


def test_the_sdk_itself_does_not_import_openfeature() -> None:
    code = "import sys, tenfold.flags.client; assert 'openfeature' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_through_a_real_server_changes_staleness_and_recovery(
    sqlite_template: SqliteTemplate, tmp_path: Path
) -> None:
    with running_server(sqlite_template, tmp_path) as server:
        server.boolean_flag("of-toggle", ON_WHEN_ENABLED)
        provider = TenfoldProvider(
            base_url=server.url,
            api_key=server.sdk_key(),
            stale_after=0.2,
            reconnect_delay=0.05,
        )
        changed = Events(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED)
        stale = Events(ProviderEvent.PROVIDER_STALE)
        ready = Events(ProviderEvent.PROVIDER_READY)
        try:
            api.set_provider_and_wait(provider)
            ready.wait()
            client = api.get_client()
            user = EvaluationContext("u-1", {"plan": "pro"})
            off = client.get_boolean_details("of-toggle", True, user)
            assert (off.value, off.variant, off.reason) == (False, "off", Reason.DISABLED)

            server.toggle("of-toggle", True)
            assert changed.wait()[0].flags_changed == ["of-toggle"]
            on = client.get_boolean_details("of-toggle", False, user)
            assert (on.value, on.variant, on.reason) == (True, "on", Reason.STATIC)

            server.kill()
            stale.wait()
            assert client.get_provider_status() == ProviderStatus.STALE
            assert client.get_boolean_value("of-toggle", False, user) is True  # still served
            server.start()
            ready.wait(2, timeout=30)
            assert client.get_provider_status() == ProviderStatus.READY
        finally:
            for events in (changed, stale, ready):
                events.close()
