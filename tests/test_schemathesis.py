"""A bounded schemathesis run over the whole OpenAPI document, in-process over ASGI.

Every operation, with valid and with invalid input, must never answer 5xx and must answer only
what its schema documents (status code, content type, body, headers).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import schemathesis
import structlog
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tenfold import SERVICES
from tenfold.app import build_app
from tests.backends import SqliteTemplate
from tests.conftest import make_settings

# Examples per operation; invalid input is slow to generate. The file runs in well under a minute.
MAX_EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 8}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
METHODS = ("get", "put", "post", "delete", "patch")
SQLITE_MAX_INT = 2**63 - 1


# Bugs found by this run in code its authors may not change, reported to its owners. A case
# matching one of these may answer 5xx. None are open.
KNOWN_BUGS: dict[str, Callable[[schemathesis.Case], bool]] = {}


def dont_wait(case: schemathesis.Case) -> None:
    """A long poll (`wait_seconds`, documented) answers at once: the run stays bounded.
    Invalid values (negative, too large, not a number) are left for the API to reject."""
    body = case.body
    if isinstance(body, dict):
        wait = body.get("wait_seconds")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 < wait <= 60:
            body["wait_seconds"] = 0


def _operations() -> list[tuple[str, bool]]:
    """(label, has input) for every operation of the app with all services (no I/O)."""
    with tempfile.TemporaryDirectory() as data_dir:
        app = build_app(
            make_settings(
                data_dir=data_dir, database_url="sqlite:///:memory:", services=list(SERVICES)
            )
        )
        paths = app.openapi()["paths"]
    return sorted(
        (f"{method.upper()} {path}", bool(op.get("parameters") or op.get("requestBody")))
        for path, item in paths.items()
        for method, op in item.items()
        if method in METHODS
    )


OPERATIONS = _operations()
CASES = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label, has_input in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if has_input or mode is GenerationMode.POSITIVE  # nothing to make invalid otherwise
]


@pytest.fixture(scope="module")
def plain_logs() -> Iterator[None]:
    """Server errors logged as one JSON line through stdlib logging (pytest shows them on
    failure) instead of structlog's default rich tracebacks, which take seconds each."""
    previous = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    yield
    structlog.configure(**previous)


@pytest.fixture(scope="module")
def api(
    plain_logs: None, tmp_path_factory: pytest.TempPathFactory, sqlite_template: SqliteTemplate
) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    """The embedded app, started once for the module; its schema and its admin key."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    app_settings = make_settings(
        data_dir=str(tmp / "data"),
        database_url=sqlite_template.clone(tmp / "db" / "tenfold.db"),
        services=list(SERVICES),
        ratelimit_anonymous_limit=1_000_000,
        flags_stream_max_seconds=0,  # the change stream sends its state and ends
    )
    app = build_app(app_settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # runs the app's lifespan
    try:
        key = (Path(app_settings.data_dir) / "admin.key").read_text().strip()
        yield schema, key
    finally:
        asgi.shutdown_lifespans()


def test_every_route_is_fuzzed() -> None:
    labels = [label for label, _ in OPERATIONS]
    assert len(labels) >= 10
    assert "GET /healthz" in labels


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_operation_conforms_to_its_schema(
    api: tuple[schemathesis.BaseSchema, str], label: str, mode: GenerationMode
) -> None:
    schema, key = api
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    headers = {"Authorization": f"Bearer {key}"}
    known: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: a stable gate
        phases=[Phase.explicit, Phase.generate],  # report the first failure, unshrunk
        suppress_health_check=list(HealthCheck),
    )
    def call(case: schemathesis.Case) -> None:
        dont_wait(case)
        bug = next((name for name, matches in KNOWN_BUGS.items() if matches(case)), None)
        try:
            response = case.call(headers=headers)
        except Exception:  # the app raised: a 500 (the ASGI client re-raises the error)
            if bug is None:
                raise
            known.append(bug)
            return
        if bug is not None and response.status_code >= 500:
            known.append(bug)
            return
        case.validate_response(response, checks=CHECKS, headers=headers)

    call()
    if known:
        pytest.xfail(f"known bug: {known[0]}")


def test_out_of_range_ids_are_refused_not_crashed(
    api: tuple[schemathesis.BaseSchema, str],
) -> None:
    schema, key = api
    response = asgi.get_client(schema.app).get(
        f"/api/v1/policies/{SQLITE_MAX_INT + 1}", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "policy_id"
