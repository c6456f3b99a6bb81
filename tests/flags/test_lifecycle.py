"""Experiments, guarded roll-outs and flag hygiene, through the HTTP API on both stacks."""

from __future__ import annotations

from typing import Any

from tests.flags.conftest import FlagsApi

DAY = 86_400.0


async def _split_flag(api: FlagsApi, key: str, on: float = 50) -> None:
    await api.create(key)
    split = [{"variation": "on", "weight": on}, {"variation": "off", "weight": 100 - on}]
    r = await api.target(key, enabled=True, default_rule={"split": split})
    assert r.status_code == 200, r.text


async def test_an_experiment_from_exposures_to_results(flags_api: Any) -> None:
    async with flags_api() as api:
        api: FlagsApi
        await _split_flag(api, "checkout")
        r = await api.http.post(
            "/api/v1/experiments",
            json={
                "experiment_key": "checkout-test",
                "flag_key": "checkout",
                "environment": "production",
                "control": "off",
                "metric": "purchase",
            },
            headers=api.admin,
        )
        assert r.status_code == 201, r.text
        # the ruleset SDKs load names the experiment, so they send exposures for it
        ruleset = (await api.http.get("/api/v1/flags/ruleset", headers=api.admin)).json()
        assert ruleset["experiments"] == [{"flag_key": "checkout", "sample_rate": 1.0}]

        served: dict[str, str] = {}
        for i in range(600):
            user = f"user-{i}"
            got = await api.evaluate(["checkout"], {"user_id": user})
            served[user] = got["checkout"]["variation"]
        api.clock.advance(1)
        # treatment converts 30% of the time, control 10%; one conversion before any
        # exposure does not count
        events = []
        for i, (user, variation) in enumerate(sorted(served.items())):
            if i % 10 < (3 if variation == "on" else 1):
                events.append({"kind": "conversion", "metric": "purchase", "user_id": user})
        events.append(
            {"kind": "conversion", "metric": "purchase", "user_id": "user-0", "timestamp_ms": 1}
        )
        r = await api.http.post("/api/v1/flags/events", json={"events": events}, headers=api.admin)
        assert r.status_code == 202 and r.json()["accepted"] == len(events)

        r = await api.http.get("/api/v1/experiments/checkout-test/results", headers=api.admin)
        assert r.status_code == 200, r.text
        results = r.json()
        rows = {v["variation"]: v for v in results["variations"]}
        exposed_on = sum(1 for v in served.values() if v == "on")
        assert rows["on"]["exposures"] == exposed_on
        assert rows["off"]["exposures"] == 600 - exposed_on
        treatment = rows["on"]["comparison"]
        assert treatment["significant"] is True and treatment["absolute_lift"] > 0.1
        assert treatment["probability_to_beat_control"] > 0.99
        assert results["srm"]["mismatch"] is False  # a fair 50/50 split

        r = await api.http.post("/api/v1/experiments/checkout-test/stop", headers=api.admin)
        assert r.json()["status"] == "stopped"
        ruleset = (await api.http.get("/api/v1/flags/ruleset", headers=api.admin)).json()
        assert ruleset["experiments"] == []


async def test_bad_experiments_and_events(flags_api: Any) -> None:
    async with flags_api() as api:
        await api.create("f")
        bad = {"experiment_key": "e", "flag_key": "f", "metric": "m", "control": "maybe"}
        r = await api.http.post("/api/v1/experiments", json=bad, headers=api.admin)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "control"
        r = await api.http.post(
            "/api/v1/flags/events",
            json={"events": [{"kind": "click", "user_id": "u"}]},
            headers=api.admin,
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "events[0].kind"


async def test_a_breached_guard_turns_the_flag_off(flags_api: Any) -> None:
    async with flags_api() as api:
        await api.create("risky")
        r = await api.target(
            "risky",
            enabled=True,
            default_rule={
                "split": [{"variation": "on", "weight": 20}, {"variation": "off", "weight": 80}]
            },
            guard={"threshold": 0.1, "min_requests": 100, "window_seconds": 60},
        )
        assert r.status_code == 200, r.text

        async def report(requests: int, errors: int) -> bool:
            r = await api.http.post(
                "/api/v1/flags/risky/guard",
                json={"environment": "production", "requests": requests, "errors": errors},
                headers=api.admin,
            )
            assert r.status_code == 202, r.text
            return bool(r.json()["breached"])

        assert await report(50, 20) is False  # too few requests to judge
        api.clock.advance(120)  # that window has passed
        assert await report(100, 5) is False  # 5%: under the threshold
        assert await report(100, 30) is True  # 35 of 200: 17.5%
        got = await api.evaluate(["risky"], {"user_id": "u"})
        assert got["risky"]["reason"] == "DISABLED"
        history = (await api.http.get("/api/v1/flags/risky/history", headers=api.admin)).json()
        entry = history["history"][0]
        assert (entry["action"], entry["user_id"]) == ("guard_reverted", "guard")
        assert await report(100, 100) is False  # already off


async def test_stale_flags(flags_api: Any) -> None:
    async with flags_api() as api:
        for key in ("unused", "steady", "forgotten"):
            await api.create(key)
        await api.evaluate(["unused", "steady"], {"user_id": "u"})
        await api.service.flush()
        api.clock.advance(31 * DAY)
        r = await api.http.post(
            "/api/v1/flags/usage",
            json={"flags": {"steady": {"off": 1200}}},
            headers=api.admin,
        )
        assert r.status_code == 202 and r.json()["accepted"] == 1200
        await api.create("newborn")
        r = await api.http.get("/api/v1/flags/stale?days=30", headers=api.admin)
        assert r.status_code == 200
        stale = {f["flag_key"]: f for f in r.json()["flags"]}
        assert stale["unused"]["reason"] == "not_evaluated"
        assert stale["unused"]["last_evaluated_ms"] is not None
        assert stale["forgotten"]["reason"] == "not_evaluated"
        assert stale["forgotten"]["last_evaluated_ms"] is None
        assert (stale["steady"]["reason"], stale["steady"]["variation"]) == (
            "single_variation",
            "off",
        )
        assert "newborn" not in stale


async def test_evaluations_are_counted_by_variation_in_bounded_batches(flags_api: Any) -> None:
    from tenfold.flags import service as flags_service

    async with flags_api() as api:
        service = api.service
        await _split_flag(api, "counted")
        for i in range(40):
            await api.evaluate(["counted", "no-such-flag"], {"user_id": f"user-{i}"})
        assert len(service._evaluated) == 40  # queued by the requests, added up later
        await service.flush()
        assert service._evaluated == [] and service._usage == {}
        rows = await service.store.usage_since("production", "1970-01-01")
        served = {variation: n for flag, _, variation, n, _ in rows if flag == "counted"}
        assert sum(served.values()) == 40 and set(served) <= {"on", "off"}
        assert {flag for flag, *_ in rows} == {"counted"}  # a failed evaluation is not a use

        results = service.rulesets["production"].evaluate_all({"user_id": "u"})
        per_request = len([r for r in results if r.error_code is None])
        requests = flags_service.FOLD_EVERY + 5
        for _ in range(requests):
            service.count_all("production", results)
        assert len(service._evaluated) < flags_service.FOLD_EVERY  # added up as it filled
        counted = sum(service._usage.values()) + len(service._evaluated) * per_request
        assert counted == requests * per_request
