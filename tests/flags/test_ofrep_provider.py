"""The official OpenFeature OFREP provider (`openfeature-provider-ofrep`) evaluating flags
against a running tenfold server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from tests.backends import SqliteTemplate
from tests.flags.test_client import Server, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(
    sqlite_template: SqliteTemplate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with running_server(sqlite_template, tmp_path_factory.mktemp("ofrep-server")) as s:
        s.boolean_flag(
            "beta-banner",
            {
                "enabled": True,
                "rules": [
                    {
                        "conditions": [
                            {"attribute": "beta", "operator": "equals", "values": [True]}
                        ],
                        "variation": "on",
                    }
                ],
            },
        )
        for key, flag_type, default, variations in (
            (
                "theme",
                "string",
                "light",
                [{"key": "light", "value": "light"}, {"key": "dark", "value": "dark"}],
            ),
            (
                "page-size",
                "number",
                20,
                [{"key": "small", "value": 20}, {"key": "large", "value": 50}],
            ),
            (
                "ratio",
                "number",
                0.25,
                [{"key": "low", "value": 0.25}, {"key": "high", "value": 0.75}],
            ),
            (
                "limits",
                "json",
                {"max": 1},
                [{"key": "basic", "value": {"max": 1}}, {"key": "pro", "value": {"max": 9}}],
            ),
        ):
            s.admin(
                "POST",
                "/api/v1/flags",
                {
                    "flag_key": key,
                    "flag_type": flag_type,
                    "default_value": default,
                    "variations": variations,
                },
            )
            other = variations[1]["key"]
            s.admin(
                "PUT",
                f"/api/v1/flags/{key}/environments/production",
                {"enabled": True, "default_rule": {"variation": other}},
            )
        s.admin(
            "PUT",
            "/api/v1/flags/beta-banner/environments/staging",
            {
                "enabled": True,
                "default_rule": {
                    "split": [{"variation": "on", "weight": 50}, {"variation": "off", "weight": 50}]
                },
            },
        )
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[object]:
    key = server.sdk_key("production")
    api.set_provider(OFREPProvider(server.url, headers_factory=lambda: {"X-API-Key": key}))
    try:
        yield api.get_client()
    finally:
        api.clear_providers()


def test_the_official_provider_resolves_every_type(client: object) -> None:
    c = client
    ctx = EvaluationContext(targeting_key="u-1", attributes={"beta": True})
    details = c.get_boolean_details("beta-banner", False, ctx)  # type: ignore[attr-defined]
    assert (details.value, details.variant, details.reason) == (True, "on", Reason.TARGETING_MATCH)
    plain = c.get_boolean_details("beta-banner", True, EvaluationContext(targeting_key="u-2"))  # type: ignore[attr-defined]
    assert (plain.value, plain.reason) == (False, Reason.DEFAULT)  # rules, none matched
    assert c.get_string_value("theme", "x", ctx) == "dark"  # type: ignore[attr-defined]
    assert c.get_integer_value("page-size", 0, ctx) == 50  # type: ignore[attr-defined]
    assert c.get_float_value("ratio", 0.0, ctx) == 0.75  # type: ignore[attr-defined]
    assert c.get_object_value("limits", {}, ctx) == {"max": 9}  # type: ignore[attr-defined]


def test_errors_come_back_as_openfeature_error_codes(client: object, server: Server) -> None:
    c = client
    ctx = EvaluationContext(targeting_key="u-1")
    missing = c.get_boolean_details("no-such-flag", True, ctx)  # type: ignore[attr-defined]
    assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    mismatch = c.get_integer_details("theme", 7, ctx)  # type: ignore[attr-defined]
    assert (mismatch.value, mismatch.error_code) == (7, ErrorCode.TYPE_MISMATCH)

    # a split with no targeting key: TARGETING_KEY_MISSING (staging key)
    key = server.sdk_key("staging")
    api.set_provider(OFREPProvider(server.url, headers_factory=lambda: {"X-API-Key": key}))
    no_key = api.get_client().get_boolean_details("beta-banner", True, EvaluationContext())
    assert (no_key.value, no_key.error_code) == (True, ErrorCode.TARGETING_KEY_MISSING)
    keyed = api.get_client().get_boolean_details(
        "beta-banner", True, EvaluationContext(targeting_key="u-9")
    )
    assert keyed.reason == Reason.SPLIT and keyed.error_code is None


def test_a_wrong_key_is_a_general_error_not_a_crash(server: Server) -> None:
    api.set_provider(
        OFREPProvider(server.url, headers_factory=lambda: {"X-API-Key": "tf_nope_nope"})
    )
    try:
        details = api.get_client().get_boolean_details("beta-banner", False)
        assert details.value is False and details.error_code == ErrorCode.GENERAL
    finally:
        api.clear_providers()
