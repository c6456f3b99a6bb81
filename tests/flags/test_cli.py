"""`tenfold flags ...` on a migrated database of each SQL backend."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from typer.testing import CliRunner, Result

from tenfold.cli import app
from tenfold.flags.api import service_for
from tenfold.flags.cli import actor
from tenfold.flags.service import FlagsService
from tenfold.kernel.runtime import Runtime
from tenfold.settings import load_settings
from tests.backends import SqliteTemplate
from tests.conftest import TEST_SECRET_KEY

T = TypeVar("T")


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's environment: a migrated database, no Redis, no server."""
    for name in list(os.environ):
        if name.startswith("TENFOLD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TENFOLD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TENFOLD_DATABASE_URL", db_url)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at 80 columns otherwise
    if not db_url.startswith("sqlite"):
        monkeypatch.setenv("TENFOLD_SECRET_KEY", TEST_SECRET_KEY)
    return tmp_path


def tenfold(*args: str) -> Result:
    return CliRunner().invoke(app, ["flags", *args])


def ok(*args: str) -> str:
    done = tenfold(*args)
    assert done.exit_code == 0, done.output
    return done.stdout


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def on_service(job: Callable[[FlagsService], Awaitable[T]]) -> T:
    """Run `job` on the flags service of the database the CLI uses, as a server would."""

    async def main() -> T:
        runtime = Runtime.from_settings(load_settings())
        try:
            service = service_for(runtime)
            await service.load()
            return await job(service)
        finally:
            await runtime.close()

    return asyncio.run(main())


def reason_for(key: str, user: str, environment: str = "production") -> tuple[Any, str]:
    """What a server evaluating `key` for `user` serves now, and why."""

    async def job(service: FlagsService) -> tuple[Any, str]:
        got = service.ruleset(environment).evaluate(key, {"user_id": user})
        return got.value, got.reason

    return on_service(job)


def value_for(key: str, user: str, environment: str = "production") -> Any:
    return reason_for(key, user, environment)[0]


def exported(*args: str) -> dict[str, Any]:
    return dict(orjson.loads(ok("export", *args)))


def require_approvals(environment: str = "production") -> None:
    async def job(service: FlagsService) -> None:
        await service.update_environment(environment, {"approval_required": True}, "admin")

    on_service(job)


def pending_requests() -> list[Any]:
    async def job(service: FlagsService) -> list[Any]:
        found = await service.store.change_requests(status="pending", flag_key=None, limit=100)
        return list(found)

    return on_service(job)


# --- create and list -----------------------------------------------------------------------


def test_create_and_list(env: Path) -> None:
    made = ok("create", "new-checkout", "--tag", "web", "--description", "the new checkout")
    assert one_line(made).startswith("created new-checkout (boolean: on, off; default off)")
    ok("create", "color", "--type", "string", "--variation", "blue=blue", "--variation", "red=red")
    ok(
        "create",
        "limits",
        "--type",
        "json",
        "--variations",
        '[{"key": "small", "value": {"max": 1}}, {"key": "big", "value": {"max": 9}}]',
        "--default",
        '{"max": 1}',
        "--name",
        "Limits",
    )

    table = ok("list")
    for text in ("new-checkout", "color", "limits", "boolean", "string", "json"):
        assert text in table
    for environment in ("development", "staging", "production"):
        assert environment in table
    assert " on " not in table and table.count(" off ") == 9  # everything starts off
    assert table.index("color") < table.index("limits") < table.index("new-checkout")

    rows = orjson.loads(ok("list", "--json"))
    by_key = {r["flag_key"]: r for r in rows}
    assert by_key["limits"]["name"] == "Limits" and by_key["new-checkout"]["tags"] == ["web"]
    assert by_key["color"]["enabled"] == {
        "development": False,
        "staging": False,
        "production": False,
    }
    assert [r["flag_key"] for r in orjson.loads(ok("list", "--tag", "web", "--json"))] == [
        "new-checkout"
    ]
    assert [r["flag_key"] for r in orjson.loads(ok("list", "--search", "lim", "--json"))] == [
        "limits"
    ]
    one = ok("list", "--environment", "staging")
    assert "staging" in one and "production" not in one
    assert "no flags matching 'nowhere'" in ok("list", "--search", "nowhere")

    async def defaults(service: FlagsService) -> dict[str, Any]:
        return {k: (await service.get_flag(k))[0].default_value for k in ("color", "limits")}

    assert on_service(defaults) == {"color": "blue", "limits": {"max": 1}}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("new-checkout",), 1, "flag new-checkout already exists"),
        (("n", "--type", "number", "--default", "x"), 2, "--default: 'x' is not JSON"),
        (("n", "--type", "number", "--default", '"x"'), 2, "--default: must be a number value"),
        (("n", "--type", "string"), 2, "--default: a string flag needs a default value"),
        (("n", "--variation", "a=true", "--variation", "a=false"), 2, "listed twice"),
        (("bad key!",), 2, "KEY: a flag key is 1-200 letters"),
        (("stream",), 2, "'stream' is reserved"),
    ],
)
def test_create_errors_are_one_line(
    env: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    ok("create", "new-checkout")
    done = tenfold("create", *args)
    assert done.exit_code == code, done.output
    assert message in one_line(done.stderr)


# --- toggle and rollout --------------------------------------------------------------------


def test_toggle_on_and_off_is_what_evaluation_serves(env: Path) -> None:
    ok("create", "new-checkout")
    assert reason_for("new-checkout", "u-1") == (False, "DISABLED")
    on = ok("toggle", "new-checkout", "on")
    assert on.startswith("applied: new-checkout is on in production")
    assert "it serves its default, off; `tenfold flags rollout new-checkout 100`" in on
    assert reason_for("new-checkout", "u-1") == (False, "STATIC")  # on, serving its default
    ok("rollout", "new-checkout", "100")
    assert reason_for("new-checkout", "u-1") == (True, "STATIC")
    again = one_line(ok("toggle", "new-checkout", "on"))
    assert again.startswith("unchanged: new-checkout is already on in production")
    off = one_line(ok("toggle", "new-checkout", "off"))
    assert off.startswith("applied: new-checkout is off in production")
    assert reason_for("new-checkout", "u-1") == (False, "DISABLED")
    assert exported()["flags"][0]["environments"]["production"]["enabled"] is False
    ok("toggle", "new-checkout", "on")
    assert reason_for("new-checkout", "u-1") == (True, "STATIC")  # the roll-out is kept
    assert reason_for("new-checkout", "u-1", "staging") == (False, "DISABLED")

    async def history(service: FlagsService) -> list[dict[str, Any]]:
        return await service.store.history("new-checkout", before=None, limit=10)  # type: ignore[no-any-return]

    entries = on_service(history)
    assert [e["action"] for e in entries][:3] == ["toggled_on", "toggled_off", "rollout"]
    assert {e["user_id"] for e in entries} == {actor()}
    assert actor().startswith("cli:")


def test_toggle_errors_are_one_line(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = tenfold("toggle", "nope", "on")
    assert unknown.exit_code == 1
    assert "flag nope does not exist" in one_line(unknown.stderr)
    ok("create", "new-checkout")
    bad_env = tenfold("toggle", "new-checkout", "on", "--environment", "moon")
    assert bad_env.exit_code == 2
    assert "unknown environment 'moon'" in one_line(bad_env.stderr)
    monkeypatch.setenv("TENFOLD_FLAGS_ENVIRONMENT", "moon")  # the option's variable
    assert tenfold("toggle", "new-checkout", "on").exit_code == 2
    monkeypatch.setenv("TENFOLD_FLAGS_ENVIRONMENT", "staging")
    ok("toggle", "new-checkout", "on")
    assert reason_for("new-checkout", "u-1", "staging")[1] == "STATIC"
    bad_state = tenfold("toggle", "new-checkout", "maybe")
    assert bad_state.exit_code == 2


def test_toggle_where_approvals_are_required_prints_the_change_request(env: Path) -> None:
    ok("create", "new-checkout")
    require_approvals()
    on = one_line(ok("toggle", "new-checkout", "on"))
    [request] = pending_requests()
    assert on.startswith(f"pending approval: change request {request.request_id}")
    assert request.author == actor() and request.environment == "production"
    assert reason_for("new-checkout", "u-1") == (False, "DISABLED")  # not until approved
    assert ok("toggle", "new-checkout", "on", "-e", "staging").startswith("applied:")


def test_rollout(env: Path) -> None:
    ok("create", "new-checkout")
    done = one_line(ok("rollout", "new-checkout", "25"))
    assert done.startswith("applied: new-checkout is on in production, serving on to 25%")
    production = exported()["flags"][0]["environments"]["production"]
    assert production["enabled"] is True
    assert production["default_rule"] == {
        "split": [{"variation": "on", "weight": 25.0}, {"variation": "off", "weight": 75.0}]
    }

    async def share(service: FlagsService) -> int:
        ruleset = service.ruleset("production")
        return sum(
            ruleset.evaluate("new-checkout", {"user_id": f"u-{i}"}).value is True
            for i in range(2_000)
        )

    quarter = on_service(share)
    assert 400 < quarter < 600
    ok("rollout", "new-checkout", "50")
    assert on_service(share) > quarter  # the first quarter stays in
    ok("rollout", "new-checkout", "100")
    assert on_service(share) == 2_000

    ok("create", "color", "--type", "string", "--variation", "blue=blue", "--variation", "red=red")
    colors = ok(
        "rollout", "color", "10", "-e", "staging", "--variation", "red", "--baseline", "blue"
    )
    assert "serving red to 10% and blue to 90%" in colors
    needs = tenfold("rollout", "color", "10")
    assert needs.exit_code == 2
    assert "needs --variation and --baseline" in one_line(needs.stderr)
    wrong = tenfold("rollout", "color", "10", "--variation", "green", "--baseline", "blue")
    assert wrong.exit_code == 2
    assert "--variation: color has no variation 'green'" in one_line(wrong.stderr)
    assert tenfold("rollout", "color", "101", "--variation", "red").exit_code == 2
    assert tenfold("rollout", "nope", "5").exit_code == 1


# --- export and import ---------------------------------------------------------------------


def build_flags() -> None:
    """Flags using every part of targeting: segments, rules, splits, prerequisites, guards."""

    async def job(service: FlagsService) -> None:
        who = "admin"
        await service.put_segment(
            {
                "segment_key": "beta",
                "included": ["u-1", "u-2"],
                "excluded": ["u-3"],
                "conditions": [{"attribute": "plan", "operator": "in", "values": ["pro"]}],
            },
            who,
        )
        await service.put_segment({"segment_key": "staff", "included": ["u-9"]}, who)
        await service.create_flag({"flag_key": "base", "default_value": False}, who)
        await service.create_flag(
            {
                "flag_key": "checkout",
                "flag_type": "string",
                "default_value": "old",
                "variations": [
                    {"key": "old", "value": "old"},
                    {"key": "new", "value": "new", "name": "New"},
                ],
                "tags": ["web", "payments"],
                "description": "which checkout",
            },
            who,
        )
        await service.create_flag(
            {"flag_key": "limits", "flag_type": "json", "default_value": {"max": 1}}, who
        )
        await service.set_targeting(
            "checkout",
            "production",
            {
                "enabled": True,
                "rules": [
                    {
                        "id": "beta-users",
                        "conditions": [{"operator": "in_segment", "values": ["beta"]}],
                        "variation": "new",
                    },
                    {
                        "conditions": [
                            {"attribute": "app_version", "operator": "semver_gte", "value": "2.1.0"}
                        ],
                        "split": [
                            {"variation": "new", "weight": 33.333},
                            {"variation": "old", "weight": 66.667},
                        ],
                    },
                ],
                "default_rule": {"variation": "old"},
                "off_variation": "old",
                "prerequisites": [{"flag": "base", "variation": "on"}],
                "guard": {"threshold": 0.05, "min_requests": 50},
            },
            who,
        )
        await service.rollout("base", "production", 100, who)
        await service.rollout("base", "staging", 12.5, who)

    on_service(job)


def use_fresh_database(
    tmp_path: Path, sqlite_template: SqliteTemplate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "TENFOLD_DATABASE_URL", sqlite_template.clone(tmp_path / "fresh" / "tenfold.db")
    )


def test_export_then_import_into_a_fresh_database_round_trips(
    env: Path, sqlite_template: SqliteTemplate, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_flags()
    document = exported()
    assert document["version"] == 1
    assert [f["flag_key"] for f in document["flags"]] == ["base", "checkout", "limits"]
    assert [s["segment_key"] for s in document["segments"]] == ["beta", "staff"]
    checkout = document["flags"][1]
    assert checkout["tags"] == ["web", "payments"]
    assert set(checkout["environments"]) == {"development", "staging", "production"}
    assert checkout["environments"]["production"]["rules"][0]["id"] == "beta-users"
    staging = exported("--environment", "staging")
    assert {e for f in staging["flags"] for e in f["environments"]} == {"staging"}
    saved = env / "flags.json"
    assert "exported 3 flag(s) and 2 segment(s)" in ok("export", "--output", str(saved))
    assert orjson.loads(saved.read_bytes()) == document

    use_fresh_database(env, sqlite_template, monkeypatch)
    assert exported()["flags"] == []
    dry = ok("import", str(saved), "--dry-run")
    assert "dry run, nothing written" in dry and "3 created" in dry
    assert exported()["flags"] == []
    first = ok("import", str(saved))
    assert "importing" in first
    assert "flags: 3 created, 0 updated, 0 unchanged, 0 pending approval" in first
    assert "segments: 2 created, 0 updated, 0 unchanged" in first
    assert exported() == document
    assert value_for("checkout", "u-1") == "new"  # in segment beta, base being on
    assert value_for("checkout", "u-3") == "old"

    again = ok("import", str(saved))
    assert "flags: 0 created, 0 updated, 3 unchanged, 0 pending approval" in again
    assert "segments: 0 created, 0 updated, 2 unchanged" in again

    async def history(service: FlagsService) -> set[str]:
        entries = await service.store.history("checkout", before=None, limit=50)
        return {e["user_id"] for e in entries}

    assert on_service(history) == {actor()}


def test_import_replaces_what_differs_and_leaves_the_rest(env: Path) -> None:
    build_flags()
    document = exported()
    checkout = document["flags"][1]
    checkout["description"] = "which checkout page"
    checkout["environments"]["staging"]["enabled"] = True
    del checkout["environments"]["development"]  # left as it is
    document["flags"][2]["environments"] = {}
    document["flags"].append(
        {
            "flag_key": "dark-mode",
            "default_value": False,
            "environments": {"development": {"enabled": True}},
        }
    )
    document["segments"][1]["included"] = ["u-9", "u-10"]
    source = env / "changed.json"
    source.write_bytes(orjson.dumps(document))
    done = ok("import", str(source))
    assert "flags: 1 created, 1 updated, 2 unchanged, 0 pending approval" in done
    assert "segments: 0 created, 1 updated, 1 unchanged" in done
    after = {f["flag_key"]: f for f in exported()["flags"]}
    assert after["checkout"]["description"] == "which checkout page"
    assert after["checkout"]["environments"]["staging"]["enabled"] is True
    assert after["dark-mode"]["environments"]["development"]["enabled"] is True
    assert after["dark-mode"]["environments"]["production"]["enabled"] is False
    assert "unchanged" in ok("import", str(source)) and "0 updated" in ok("import", str(source))


def test_import_adds_and_removes_variations_in_the_order_that_works(env: Path) -> None:
    build_flags()
    document = exported()
    checkout = document["flags"][1]
    checkout["variations"].append({"key": "next", "value": "next"})
    checkout["environments"]["staging"] = {"enabled": True, "default_rule": {"variation": "next"}}
    source = env / "added.json"
    source.write_bytes(orjson.dumps(document))
    assert "1 updated" in ok("import", str(source))  # the definition, then the targeting
    assert value_for("checkout", "u-5", "staging") == "next"

    kept = exported()
    kept["flags"][1]["variations"] = [{"key": "old", "value": "old"}]
    kept["flags"][1]["environments"]["production"]["rules"] = []
    del kept["flags"][1]["environments"]["staging"]  # still serves next
    source.write_bytes(orjson.dumps(kept))
    refused = tenfold("import", str(source))
    assert refused.exit_code == 2
    line = one_line(refused.stderr)
    assert "flags[1]: the definition does not fit the targeting in staging" in line
    assert len(exported()["flags"][1]["variations"]) == 3  # nothing written

    fewer = exported()
    checkout = fewer["flags"][1]
    checkout["variations"] = [{"key": "old", "value": "old"}]
    production = checkout["environments"]["production"]
    production["rules"] = []
    checkout["environments"]["staging"] = {
        "enabled": False,
        "rules": [],
        "default_rule": None,
        "off_variation": None,
        "prerequisites": [],
        "guard": None,
    }
    source.write_bytes(orjson.dumps(fewer))
    done = ok("import", str(source))  # the targeting first, then the definition
    assert "flags: 0 created, 1 updated, 2 unchanged" in done
    assert exported() == fewer
    assert "0 updated, 3 unchanged" in ok("import", str(source))


def test_import_where_approvals_are_required_is_pending_and_does_not_repeat(env: Path) -> None:
    build_flags()
    document = exported()
    document["flags"][1]["environments"]["production"]["enabled"] = False  # a kill: applies
    document["flags"][2]["environments"]["production"]["enabled"] = True  # waits
    source = env / "flags.json"
    source.write_bytes(orjson.dumps(document))
    require_approvals()
    dry = ok("import", str(source), "--dry-run")
    assert "1 updated, 1 unchanged, 1 pending approval" in dry
    done = ok("import", str(source))
    assert "flags: 0 created, 1 updated, 1 unchanged, 1 pending approval" in done
    [request] = pending_requests()
    assert f"limits: change request(s) {request.request_id}" in done
    assert value_for("checkout", "u-1") == "old"  # turned off at once
    again = ok("import", str(source))
    assert "0 updated, 2 unchanged, 1 pending approval" in again
    assert request.request_id in again
    assert len(pending_requests()) == 1  # the same request, not a second one


def bad_weights(document: dict[str, Any]) -> None:
    rule = document["flags"][1]["environments"]["production"]["rules"][1]
    rule["split"][0]["weight"] = 40


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            bad_weights,
            "flags[1].environments.production.rules[1].split: weights must sum to 100 "
            "(they sum to 106.667)",
        ),
        (
            lambda d: d["flags"][2]["environments"].update({"qa": {}}),
            "flags[2].environments.qa: unknown environment",
        ),
        (
            lambda d: d["segments"].pop(0),
            "flags[1].environments.production.rules[0].conditions[0].values[0]: "
            "segment 'beta' does not exist",
        ),
        (
            lambda d: d["flags"][0]["environments"]["production"].update(
                {"prerequisites": [{"flag": "checkout", "variation": "new"}]}
            ),
            "flags[0].environments.production.prerequisites: prerequisites would form a cycle",
        ),
        (lambda d: d.update({"version": 2}), "version: must be 1"),
        (lambda d: d["flags"].append(d["flags"][0]), "flags[3].flag_key: 'base' is listed twice"),
        (
            lambda d: d["flags"][2].update({"flag_type": "number"}),
            "flags[2].default_value: must be a number value",
        ),
    ],
)
def test_a_bad_import_names_the_json_path_and_writes_nothing(
    env: Path,
    sqlite_template: SqliteTemplate,
    monkeypatch: pytest.MonkeyPatch,
    spoil: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    build_flags()
    document = exported()
    spoil(document)
    source = env / "bad.json"
    source.write_bytes(orjson.dumps(document))
    use_fresh_database(env, sqlite_template, monkeypatch)
    done = tenfold("import", str(source))
    assert done.exit_code == 2, done.output
    line = one_line(done.stderr)
    assert f"bad.json: {message}" in line and line.endswith("nothing was imported")
    assert exported() == {"version": 1, "flags": [], "segments": []}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not a JSON document"),
        (b"[]", "the document must be a JSON object"),
        (b'{"version": 1, "flags": {}}', "flags: must be a list"),
        (b'{"version": 1, "extra": 1}', "extra: is not a known field"),
    ],
)
def test_an_unreadable_import_is_a_one_line_error(env: Path, content: bytes, message: str) -> None:
    source = env / "flags.json"
    source.write_bytes(content)
    done = tenfold("import", str(source))
    assert done.exit_code == 2
    assert message in one_line(done.stderr)
    missing = tenfold("import", str(env / "nowhere.json"))
    assert missing.exit_code == 2 and "nowhere.json: cannot read it" in one_line(missing.stderr)


# --- set-up errors -------------------------------------------------------------------------


def test_an_unmigrated_database_says_so(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_DATABASE_URL", f"sqlite:///{env / 'empty.sqlite'}")
    done = tenfold("list")
    assert done.exit_code == 1
    assert "run `tenfold migrate`" in one_line(done.stderr)


def test_import_waits_for_a_definition_before_the_targeting_that_needs_it(env: Path) -> None:
    build_flags()
    require_approvals()
    document = exported()
    limits = document["flags"][2]
    limits["variations"].append({"key": "big", "value": {"max": 9}})
    limits["environments"]["production"].update(enabled=True, default_rule={"variation": "big"})
    source = env / "flags.json"
    source.write_bytes(orjson.dumps(document))
    first = ok("import", str(source))
    [request] = pending_requests()
    assert request.kind == "flag"
    assert "0 updated, 2 unchanged, 1 pending approval" in first
    assert f"limits: change request(s) {request.request_id}; run the import again" in first
    again = ok("import", str(source))
    assert "1 pending approval" in again and len(pending_requests()) == 1

    async def approve(service: FlagsService) -> None:
        await service.decide(request.request_id, "reviewer", True)

    on_service(approve)
    last = ok("import", str(source))
    [targeting] = pending_requests()
    assert targeting.kind == "targeting" and targeting.environment == "production"
    assert f"limits: change request(s) {targeting.request_id}" in last
    assert "run the import again" not in last
