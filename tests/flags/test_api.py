"""The flags HTTP API on both stacks: lifecycle, semantics, approvals, bad input, OFREP."""

from __future__ import annotations

from typing import Any

import pytest

from tests.flags.conftest import FlagsApi

RULES: list[dict[str, Any]] = [
    {
        "id": "staff",
        "conditions": [{"attribute": "email", "operator": "ends_with", "values": ["@corp.test"]}],
        "variation": "on",
    },
    {
        "id": "eu-half",
        "conditions": [
            {"attribute": "country", "operator": "in", "values": ["DE", "FR"]},
            {"attribute": "app_version", "operator": "semver_gte", "values": ["2.0.0"]},
        ],
        "variation": "on",
        "rollout_percentage": 50,
    },
]


async def test_a_flag_from_creation_to_kill_switch(flags_api: Any) -> None:
    async with flags_api() as api:
        api: FlagsApi
        created = await api.create("new-checkout", name="New checkout")
        assert created["flag_key"] == "new-checkout" and created["flag_id"] > 0
        user = {"user_id": "u-1", "email": "a@corp.test", "country": "US"}

        # a new flag is off everywhere: it serves its default value, reason DISABLED
        for env in ("development", "staging", "production"):
            got = (await api.evaluate(["new-checkout"], user, env))["new-checkout"]
            assert (got["value"], got["variation"], got["reason"]) == (False, "off", "DISABLED")

        r = await api.http.post(
            "/api/v1/flags/new-checkout/toggle",
            json={"environment": "production", "enabled": True},
            headers=api.admin,
        )
        assert r.status_code == 200 and r.json()["enabled"] is True
        got = (await api.evaluate(["new-checkout"], user))["new-checkout"]
        assert (got["value"], got["reason"]) == (False, "STATIC")  # on, no rules

        r = await api.target("new-checkout", enabled=True, rules=RULES)
        assert r.status_code == 200, r.text
        got = await api.evaluate(["new-checkout"], user)
        assert got["new-checkout"]["reason"] == "TARGETING_MATCH"
        assert got["new-checkout"]["rule_id"] == "staff" and got["new-checkout"]["value"] is True
        other = await api.evaluate(["new-checkout"], {"user_id": "u-2", "country": "US"})
        assert other["new-checkout"]["reason"] == "DEFAULT"

        # the roll-out rule: about half of the matching users, SPLIT, the others fall through
        reasons: dict[str, int] = {}
        for i in range(400):
            ctx = {"user_id": f"eu-{i}", "country": "DE", "app_version": "2.1.0"}
            e = (await api.evaluate(["new-checkout"], ctx))["new-checkout"]
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        assert set(reasons) == {"SPLIT", "DEFAULT"}
        assert 150 < reasons["SPLIT"] < 250

        # the kill switch applies at once; other environments never changed
        r = await api.http.post(
            "/api/v1/flags/new-checkout/toggle",
            json={"environment": "production", "enabled": False},
            headers=api.admin,
        )
        assert r.status_code == 200
        assert (await api.evaluate(["new-checkout"], user))["new-checkout"]["reason"] == "DISABLED"
        staging = await api.evaluate(["new-checkout"], user, "staging")
        assert staging["new-checkout"]["reason"] == "DISABLED"

        history = (
            await api.http.get("/api/v1/flags/new-checkout/history", headers=api.admin)
        ).json()["history"]
        actions = [h["action"] for h in history]
        assert actions[:4] == ["toggled_off", "targeting_updated", "toggled_on", "flag_created"]
        assert history[0]["old_value"]["enabled"] is True
        assert history[0]["new_value"]["enabled"] is False


async def test_unknown_flags_answer_the_callers_default_not_an_error(flags_api: Any) -> None:
    async with flags_api() as api:
        got = await api.evaluate(["missing"], {"user_id": "u"})
        assert got["missing"]["reason"] == "ERROR"
        assert got["missing"]["error_code"] == "FLAG_NOT_FOUND"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"flag_keys": ["f", 7]}, "flag_keys[1]"),
        ({"flag_keys": [["f"], "f"]}, "flag_keys[0]"),  # cannot even be looked up
        ({"flag_keys": ["f", {"k": 1}]}, "flag_keys[1]"),
        ({"flag_keys": "f"}, "flag_keys"),
        ({"flag_keys": ["f"], "context": {}}, "context"),
        ({"flag_keys": ["f"], "environment": 3}, "environment"),
        ({"flag_keys": ["f"], "user_context": []}, "user_context"),
    ],
)
async def test_bad_evaluation_requests_are_422_naming_the_field(
    flags_api: Any, body: dict[str, Any], field: str
) -> None:
    async with flags_api() as api:
        await api.create("f")
        r = await api.http.post("/api/v1/evaluate", json=body, headers=api.admin)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == field


async def test_multivariate_split_and_default_rule(flags_api: Any) -> None:
    async with flags_api() as api:
        await api.create(
            "button",
            flag_type="string",
            default_value="blue",
            variations=[
                {"key": "blue", "value": "blue"},
                {"key": "green", "value": "green"},
                {"key": "red", "value": "red"},
            ],
        )
        split = [
            {"variation": "blue", "weight": 50},
            {"variation": "green", "weight": 30},
            {"variation": "red", "weight": 20},
        ]
        r = await api.target("button", enabled=True, default_rule={"split": split})
        assert r.status_code == 200, r.text
        seen: dict[str, int] = {}
        for i in range(1000):
            e = (await api.evaluate(["button"], {"user_id": f"user-{i}"}))["button"]
            assert e["reason"] == "SPLIT" and e["value"] == e["variation"]
            seen[e["variation"]] = seen.get(e["variation"], 0) + 1
        assert 430 < seen["blue"] < 570 and 240 < seen["green"] < 360 and 140 < seen["red"] < 260
        # no key to bucket by: the caller's default with TARGETING_KEY_MISSING
        e = (await api.evaluate(["button"], {"country": "DE"}))["button"]
        assert e["error_code"] == "TARGETING_KEY_MISSING" and e["value"] == "blue"


async def test_segments_and_prerequisites(flags_api: Any) -> None:
    async with flags_api() as api:
        r = await api.http.put(
            "/api/v1/flags/segments/beta",
            json={
                "included": ["u-7"],
                "conditions": [{"attribute": "plan", "operator": "equals", "values": ["pro"]}],
            },
            headers=api.admin,
        )
        assert r.status_code == 201, r.text
        await api.create("parent")
        await api.create("child")
        r = await api.target(
            "parent",
            enabled=True,
            rules=[
                {"conditions": [{"operator": "in_segment", "values": ["beta"]}], "variation": "on"}
            ],
        )
        assert r.status_code == 200, r.text
        r = await api.target(
            "child",
            enabled=True,
            prerequisites=[{"flag": "parent", "variation": "on"}],
            default_rule={"variation": "on"},
        )
        assert r.status_code == 200, r.text
        got = await api.evaluate(["parent", "child"], {"user_id": "u-7"})
        assert got["parent"]["value"] is True and got["child"]["value"] is True
        got = await api.evaluate(["parent", "child"], {"user_id": "u-8", "plan": "pro"})
        assert got["child"]["value"] is True
        got = await api.evaluate(["parent", "child"], {"user_id": "u-9", "plan": "free"})
        assert got["parent"]["reason"] == "DEFAULT"
        assert (got["child"]["value"], got["child"]["reason"]) == (False, "PREREQUISITE_FAILED")

        # a cycle is refused at save time, and nothing changed
        r = await api.target(
            "parent", enabled=True, prerequisites=[{"flag": "child", "variation": "on"}]
        )
        assert r.status_code == 409 and r.json()["type"].endswith("prerequisite-cycle")
        assert "parent -> child -> parent" in r.json()["detail"]
        # a segment or flag in use cannot be deleted
        r = await api.http.delete("/api/v1/flags/segments/beta", headers=api.admin)
        assert r.status_code == 409
        r = await api.http.delete("/api/v1/flags/parent", headers=api.admin)
        assert r.status_code == 409


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"flag_key": "x", "flag_type": "date", "default_value": False}, "flag_type"),
        ({"flag_key": "x", "flag_type": "boolean", "default_value": "no"}, "default_value"),
        (
            {
                "flag_key": "x",
                "flag_type": "number",
                "default_value": 1,
                "variations": [{"key": "a", "value": "1"}],
            },
            "variations[0].value",
        ),
        ({"flag_key": "bad key!", "default_value": False}, "flag_key"),
        ({"flag_key": "stream", "default_value": False}, "flag_key"),
        ({"flag_key": "x", "default_value": False, "colour": 1}, "colour"),
    ],
)
async def test_bad_flags_are_422_with_the_json_path(
    flags_api: Any, body: dict[str, Any], path: str
) -> None:
    async with flags_api() as api:
        r = await api.http.post("/api/v1/flags", json=body, headers=api.admin)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["errors"][0]["field"] == path


@pytest.mark.parametrize(
    ("targeting", "path"),
    [
        (
            {
                "default_rule": {
                    "split": [{"variation": "on", "weight": 60}, {"variation": "off", "weight": 30}]
                }
            },
            "default_rule.split",
        ),
        (
            {
                "rules": [
                    {
                        "conditions": [
                            {"attribute": "email", "operator": "regex", "values": ["(a+)+\\1"]}
                        ],
                        "variation": "on",
                    }
                ]
            },
            "rules[0].conditions[0].values[0]",
        ),
        (
            {
                "rules": [
                    {
                        "conditions": [
                            {"attribute": "email", "operator": "matches", "values": ["a"]}
                        ],
                        "variation": "on",
                    }
                ]
            },
            "rules[0].conditions[0].operator",
        ),
        ({"rules": [{"conditions": [], "variation": "maybe"}]}, "rules[0].variation"),
        (
            {
                "rules": [
                    {
                        "conditions": [
                            {"attribute": "v", "operator": "semver_gt", "values": ["one"]}
                        ],
                        "variation": "on",
                    }
                ]
            },
            "rules[0].conditions[0].values[0]",
        ),
        (
            {
                "rules": [
                    {
                        "conditions": [{"operator": "in_segment", "values": ["nobody"]}],
                        "variation": "on",
                    }
                ]
            },
            "rules[0].conditions[0].values[0]",
        ),
        ({"prerequisites": [{"flag": "ghost", "variation": "on"}]}, "prerequisites[0].flag"),
    ],
)
async def test_bad_targeting_is_422_with_the_json_path(
    flags_api: Any, targeting: dict[str, Any], path: str
) -> None:
    async with flags_api() as api:
        await api.create("f")
        r = await api.target("f", **targeting)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == path


async def test_unknown_environment_is_422(flags_api: Any) -> None:
    async with flags_api() as api:
        await api.create("f")
        r = await api.http.post(
            "/api/v1/evaluate", json={"flag_keys": ["f"], "environment": "moon"}, headers=api.admin
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "environment"
        r = await api.target("f", env="moon", enabled=True)
        assert r.status_code == 422


async def test_a_segment_that_gated_flags_use_changes_only_with_approvals(
    flags_api: Any,
) -> None:
    async with flags_api() as api:
        author = await api.key_with("flags:write")
        reviewer = await api.key_with("flags:write")
        r = await api.http.put(
            "/api/v1/flags/segments/staff", json={"included": ["u-1"]}, headers=author
        )
        assert r.status_code == 201
        await api.create("beta")
        rule = {"id": "staff", "conditions": [{"operator": "in_segment", "values": ["staff"]}]}
        r = await api.target("beta", enabled=True, rules=[{**rule, "variation": "on"}])
        assert r.status_code == 200, r.text
        r = await api.http.patch(
            "/api/v1/flags/environments/production",
            json={"approval_required": True, "required_approvals": 1},
            headers=api.admin,
        )
        assert r.status_code == 200

        # a segment no gated flag uses changes at once
        r = await api.http.put(
            "/api/v1/flags/segments/other", json={"included": []}, headers=author
        )
        assert r.status_code == 201
        # the one production's flag uses waits for approval, and serves as before meanwhile
        r = await api.http.put(
            "/api/v1/flags/segments/staff",
            json={"included": ["u-1", "u-2"], "comment": "add u-2"},
            headers=author,
        )
        assert r.status_code == 202, r.text
        pending = r.json()["change_request"]
        assert pending["kind"] == "segment" and pending["comment"] == "add u-2"
        assert (await api.evaluate(["beta"], {"user_id": "u-2"}))["beta"]["value"] is False
        got = await api.http.get("/api/v1/flags/segments/staff", headers=api.admin)
        assert got.json()["included"] == ["u-1"]
        request_id = pending["request_id"]
        r = await api.http.post(
            f"/api/v1/flags/change-requests/{request_id}/approve", headers=author
        )
        assert r.status_code == 409  # not by its author
        r = await api.http.post(
            f"/api/v1/flags/change-requests/{request_id}/approve", headers=reviewer
        )
        assert r.status_code == 200 and r.json()["status"] == "applied"
        assert (await api.evaluate(["beta"], {"user_id": "u-2"}))["beta"]["value"] is True

        # a request whose segment changed under it no longer applies
        r = await api.http.put(
            "/api/v1/flags/segments/staff", json={"included": ["u-3"]}, headers=author
        )
        first = r.json()["change_request"]["request_id"]
        r = await api.http.put(
            "/api/v1/flags/segments/staff", json={"included": ["u-4"]}, headers=author
        )
        second = r.json()["change_request"]["request_id"]
        r = await api.http.post(f"/api/v1/flags/change-requests/{second}/approve", headers=reviewer)
        assert r.json()["status"] == "applied"
        r = await api.http.post(f"/api/v1/flags/change-requests/{first}/approve", headers=reviewer)
        assert r.status_code == 409 and r.json()["type"].endswith("stale-change")


async def test_approvals_gate_changes_but_never_the_kill_switch(flags_api: Any) -> None:
    async with flags_api() as api:
        await api.create("payments-v2")
        r = await api.http.patch(
            "/api/v1/flags/environments/production",
            json={"approval_required": True, "required_approvals": 1},
            headers=api.admin,
        )
        assert r.status_code == 200 and r.json()["approval_required"] is True
        author = await api.key_with("flags:write")
        reviewer = await api.key_with("flags:write")

        r = await api.http.post(
            "/api/v1/flags/payments-v2/toggle",
            json={"environment": "production", "enabled": True},
            headers=author,
        )
        assert r.status_code == 202, r.text
        request_id = r.json()["change_request"]["request_id"]
        user = {"user_id": "u"}
        assert (await api.evaluate(["payments-v2"], user))["payments-v2"]["reason"] == "DISABLED"

        r = await api.http.post(
            f"/api/v1/flags/change-requests/{request_id}/approve", headers=author
        )
        assert r.status_code == 409 and r.json()["type"].endswith("self-approval")
        r = await api.http.post(
            f"/api/v1/flags/change-requests/{request_id}/approve", headers=reviewer
        )
        assert r.status_code == 200 and r.json()["status"] == "applied"
        assert (await api.evaluate(["payments-v2"], user))["payments-v2"]["reason"] == "STATIC"

        # turning it off needs nobody's approval, and is audited
        r = await api.http.post(
            "/api/v1/flags/payments-v2/toggle",
            json={"environment": "production", "enabled": False},
            headers=author,
        )
        assert r.status_code == 200
        assert (await api.evaluate(["payments-v2"], user))["payments-v2"]["reason"] == "DISABLED"
        history = (
            await api.http.get("/api/v1/flags/payments-v2/history", headers=api.admin)
        ).json()
        assert history["history"][0]["action"] == "kill"
        assert history["history"][1]["action"] == "change_request_applied"

        # a stale request (the flag changed under it) cannot be applied
        r = await api.target("payments-v2", enabled=True, default_rule={"variation": "on"})
        assert r.status_code == 202
        stale_id = r.json()["change_request"]["request_id"]
        r = await api.target("payments-v2", enabled=True)
        fresh_id = r.json()["change_request"]["request_id"]
        r = await api.http.post(
            f"/api/v1/flags/change-requests/{fresh_id}/approve", headers=reviewer
        )
        assert r.json()["status"] == "applied"
        r = await api.http.post(
            f"/api/v1/flags/change-requests/{stale_id}/approve", headers=reviewer
        )
        assert r.status_code == 409


async def test_keys_bound_to_an_environment(flags_api: Any) -> None:
    async with flags_api() as api:
        await api.create("f")
        await api.target("f", env="staging", enabled=True, default_rule={"variation": "on"})
        r = await api.http.post("/api/v1/flags/environments/staging/keys", headers=api.admin)
        assert r.status_code == 201
        sdk = {"X-API-Key": r.json()["api_key"]}
        r = await api.http.post(
            "/api/v1/evaluate",
            json={"flag_keys": ["f"], "user_context": {"user_id": "u"}},
            headers=sdk,
        )
        assert r.json()["environment"] == "staging" and r.json()["evaluations"][0]["value"] is True
        r = await api.http.post(
            "/api/v1/evaluate", json={"flag_keys": ["f"], "environment": "production"}, headers=sdk
        )
        assert r.status_code == 409
        r = await api.http.post(
            "/api/v1/flags", json={"flag_key": "g", "default_value": False}, headers=sdk
        )
        assert r.status_code == 403


async def test_ofrep_single_bulk_and_etag(flags_api: Any) -> None:
    async with flags_api() as api:
        await api.create("dark-mode")
        await api.target(
            "dark-mode",
            enabled=True,
            rules=[
                {
                    "conditions": [{"attribute": "beta", "operator": "equals", "values": [True]}],
                    "variation": "on",
                }
            ],
        )
        body = {"context": {"targetingKey": "u-1", "beta": True}}
        r = await api.http.post("/ofrep/v1/evaluate/flags/dark-mode", json=body, headers=api.admin)
        assert r.status_code == 200
        assert r.json() == {
            "key": "dark-mode",
            "value": True,
            "reason": "TARGETING_MATCH",
            "variant": "on",
            "metadata": {"rule_id": "rule-1"},
        }
        r = await api.http.post("/ofrep/v1/evaluate/flags/nope", json=body, headers=api.admin)
        assert r.status_code == 404 and r.json()["errorCode"] == "FLAG_NOT_FOUND"

        r = await api.http.post("/ofrep/v1/evaluate/flags", json=body, headers=api.admin)
        assert r.status_code == 200 and r.json()["flags"][0]["key"] == "dark-mode"
        etag = r.headers["etag"]
        r = await api.http.post(
            "/ofrep/v1/evaluate/flags", json=body, headers={**api.admin, "If-None-Match": etag}
        )
        assert r.status_code == 304
        await api.target("dark-mode", enabled=False)
        r = await api.http.post(
            "/ofrep/v1/evaluate/flags", json=body, headers={**api.admin, "If-None-Match": etag}
        )
        assert r.status_code == 200 and r.json()["flags"][0]["reason"] == "DISABLED"

        r = await api.http.get("/ofrep/v1/configuration", headers=api.admin)
        assert r.json()["name"] == "tenfold"


async def test_server_sdk_and_a_restarted_server_give_a_user_the_same_answer(
    flags_api: Any,
) -> None:
    from tenfold.flags.evaluation import Ruleset

    users = [{"user_id": f"user-{i}", "country": "DE", "app_version": "2.0.1"} for i in range(300)]
    async with flags_api() as api:
        await api.create("same")
        split = [{"variation": "on", "weight": 30.5}, {"variation": "off", "weight": 69.5}]
        r = await api.target("same", enabled=True, rules=RULES, default_rule={"split": split})
        assert r.status_code == 200, r.text
        before = [(await api.evaluate(["same"], u))["same"]["variation"] for u in users]
        doc = (await api.http.get("/api/v1/flags/ruleset", headers=api.admin)).json()
    sdk = Ruleset.from_dict(doc)  # what every SDK evaluates with
    assert [sdk.evaluate("same", u).variation for u in users] == before
    assert 0 < before.count("on") < 300
    async with flags_api() as api:  # a fresh process over the same database
        after = [(await api.evaluate(["same"], u))["same"]["variation"] for u in users]
    assert after == before
