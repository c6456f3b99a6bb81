"""Sessions over HTTP, embedded and scale-out: lifecycle, rotation, theft, limits, risk."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tenfold.kernel.clock import ManualClock
from tests.conftest import make_settings, serve_app


class Api:
    def __init__(self, client: httpx.AsyncClient, key: str, app: Any) -> None:
        self.client, self.key, self.app = client, key, app
        self.headers = {"Authorization": f"Bearer {key}"}

    @property
    def service(self) -> Any:
        return self.app.state.runtime.services["sessions"]

    async def create(self, user_id: str = "u1", status: int = 201, **fields: Any) -> dict[str, Any]:
        r = await self.client.post(
            "/api/v1/sessions", json={"user_id": user_id, **fields}, headers=self.headers
        )
        assert r.status_code == status, r.text
        return dict(r.json())

    async def validate(self, token: str, **fields: Any) -> dict[str, Any]:
        r = await self.client.post(
            "/api/v1/sessions/validate",
            json={"session_token": token, **fields},
            headers=self.headers,
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def refresh(self, token: str) -> httpx.Response:
        return await self.client.post(
            "/api/v1/sessions/refresh", json={"refresh_token": token}, headers=self.headers
        )


@pytest.fixture
async def api(stack: dict[str, Any], clock: ManualClock, admin_key_of: Any) -> Any:
    settings = make_settings(
        **stack,
        services=["sessions"],
        sessions_policies={
            "web": {"max_sessions": 3},
            "mobile": {"max_sessions": 2, "on_limit": "deny"},
        },
    )
    async with serve_app(settings, clock) as (app, client):
        yield Api(client, admin_key_of(settings), app)


DEVICE = {"ip": "198.51.100.7", "user_agent": "Mozilla/5.0 (X11)", "fingerprint": "fp-1"}


async def test_create_validate_and_end(api: Api) -> None:
    s = await api.create(device_info=DEVICE, permissions=["orders:read"], data={"cart": 2})
    assert set(s) >= {"session_id", "session_token", "refresh_token", "expires_at"}
    assert s["session_token"].startswith(s["session_id"] + ".")
    v = await api.validate(s["session_token"])
    assert v["valid"] and v["user_id"] == "u1" and v["permissions"] == ["orders:read"]
    by_id = await api.client.post(
        f"/api/v1/sessions/{s['session_id']}/validate",
        json={"session_token": s["session_token"]},
        headers=api.headers,
    )
    assert by_id.json()["valid"]
    other = await api.create("u2")
    mismatch = await api.client.post(
        f"/api/v1/sessions/{other['session_id']}/validate",
        json={"session_token": s["session_token"]},
        headers=api.headers,
    )
    assert mismatch.json() == {"valid": False, "reason": "malformed"}
    r = await api.client.delete(f"/api/v1/sessions/{s['session_id']}", headers=api.headers)
    assert r.status_code == 204
    assert await api.validate(s["session_token"]) == {"valid": False, "reason": "revoked"}
    missing = await api.client.delete("/api/v1/sessions/nope", headers=api.headers)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_bad_tokens_answer_invalid_with_a_reason(api: Api) -> None:
    s = await api.create()
    sid, secret = s["session_token"].split(".")
    forged_secret = ("A" if secret[0] != "A" else "B") + secret[1:]
    cases = {
        "": "malformed",
        "garbage": "malformed",
        s["session_token"][:-1]: "malformed",  # truncated
        s["session_token"] + "x": "malformed",
        f"{sid}.{forged_secret}": "invalid_token",  # right session, wrong secret
        f"{'Z' * 22}.{secret}": "unknown_session",  # another deployment's token shape
        s["refresh_token"]: "malformed",  # a refresh token is not a session token
        "é" * 40: "malformed",
        "x" * 2000: "malformed",
    }
    for token, reason in cases.items():
        assert await api.validate(token) == {"valid": False, "reason": reason}, token
    wrong_type = await api.client.post(
        "/api/v1/sessions/validate", json={"session_token": 5}, headers=api.headers
    )
    assert wrong_type.status_code == 422
    assert wrong_type.json()["errors"][0]["field"] == "session_token"


async def test_validation_needs_a_key_with_sessions_read(api: Api) -> None:
    s = await api.create()
    anonymous = await api.client.post(
        "/api/v1/sessions/validate", json={"session_token": s["session_token"]}
    )
    assert anonymous.status_code == 401
    keys = api.app.state.runtime.keys
    _, plaintext = await keys.create("tasks-only", ["tasks:write"])
    forbidden = await api.client.post(
        "/api/v1/sessions/validate",
        json={"session_token": s["session_token"]},
        headers={"X-API-Key": plaintext},
    )
    assert forbidden.status_code == 403
    _, reader = await keys.create("reader", ["sessions:read"])
    ok = await api.client.post(
        "/api/v1/sessions/validate",
        json={"session_token": s["session_token"]},
        headers={"X-API-Key": reader},
    )
    assert ok.json()["valid"]
    cannot_create = await api.client.post(
        "/api/v1/sessions", json={"user_id": "u"}, headers={"X-API-Key": reader}
    )
    assert cannot_create.status_code == 403


async def test_refresh_rotates_and_a_retry_in_the_grace_window_gets_the_same_successor(
    api: Api, clock: ManualClock
) -> None:
    s = await api.create()
    first = await api.refresh(s["refresh_token"])
    assert first.status_code == 200, first.text
    new = first.json()
    assert new["session_id"] == s["session_id"]
    assert new["refresh_token"] != s["refresh_token"]
    assert (await api.validate(new["session_token"]))["valid"]
    assert (await api.validate(s["session_token"]))["reason"] == "invalid_token"
    clock.advance(9)
    again = await api.refresh(s["refresh_token"])  # a retry: same successor, no fork
    assert again.status_code == 200
    assert again.json()["refresh_token"] == new["refresh_token"]
    assert again.json()["session_token"] == new["session_token"]
    assert (await api.validate(new["session_token"]))["valid"]


async def test_concurrent_refreshes_both_get_the_same_successor(api: Api) -> None:
    s = await api.create()
    answers = await asyncio.gather(*(api.refresh(s["refresh_token"]) for _ in range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.json()["refresh_token"] for a in answers}) == 1
    assert len({a.json()["session_token"] for a in answers}) == 1
    assert (await api.validate(answers[0].json()["session_token"]))["valid"]


async def test_replay_after_the_grace_window_revokes_the_family(
    api: Api, clock: ManualClock
) -> None:
    s = await api.create()
    new = (await api.refresh(s["refresh_token"])).json()
    clock.advance(11)
    replay = await api.refresh(s["refresh_token"])
    assert replay.status_code == 400
    body = replay.json()
    assert body["error"] == "invalid_grant" and "revoked" in body["error_description"]
    assert replay.headers["content-type"] == "application/problem+json"
    assert (await api.validate(new["session_token"]))["reason"] == "revoked"
    assert (await api.refresh(new["refresh_token"])).status_code == 400  # the family is gone
    timeline = await api.client.get(
        f"/api/v1/sessions/{s['session_id']}/timeline", headers=api.headers
    )
    kinds = [e["kind"] for e in timeline.json()["events"]]
    assert kinds == ["created", "refreshed", "revoked"]
    revoked = timeline.json()["events"][-1]["detail"]
    assert revoked["event"] == "TOKEN_THEFT_DETECTED" and revoked["reason"] == "token_reuse"


async def test_an_older_ancestor_token_is_recognised_as_theft(api: Api, clock: ManualClock) -> None:
    s = await api.create()
    token = s["refresh_token"]
    for _ in range(3):
        r = await api.refresh(token)
        token = r.json()["refresh_token"]
        clock.advance(60)
    replay = await api.refresh(s["refresh_token"])  # generation 0, three rotations ago
    assert replay.status_code == 400 and "revoked" in replay.json()["detail"]
    assert (await api.refresh(token)).status_code == 400


async def test_a_forged_refresh_token_does_not_revoke_anything(api: Api) -> None:
    s = await api.create()
    sid, gen, secret = s["refresh_token"].split(".")
    forged = f"{sid}.{gen}.{('A' if secret[0] != 'A' else 'B') + secret[1:]}"
    r = await api.refresh(forged)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert (await api.validate(s["session_token"]))["valid"]
    for bad in ("", "a.b", f"{sid}.-1.{secret}", f"{sid}.x.{secret}", "x" * 3000):
        r = await api.refresh(bad)
        assert r.status_code in (400, 422), bad
    assert (await api.refresh(s["refresh_token"])).status_code == 200


async def test_idle_timeout_absolute_lifetime_and_remember_me(api: Api, clock: ManualClock) -> None:
    web = await api.create()
    clock.advance(29 * 60)
    assert (await api.validate(web["session_token"]))["valid"]  # use resets the idle clock
    clock.advance(29 * 60)
    assert (await api.validate(web["session_token"]))["valid"]
    clock.advance(31 * 60)
    assert (await api.validate(web["session_token"]))["reason"] == "idle_timeout"
    refreshed = await api.refresh(web["refresh_token"])  # refresh works until the absolute end
    assert refreshed.status_code == 200
    assert (await api.validate(refreshed.json()["session_token"]))["valid"]

    short = await api.create("u3")
    remembered = await api.create("u3", remember_me=True)
    for _ in range(13 * 2):  # 13 hours of use every 30 minutes
        clock.advance(29 * 60)
        await api.validate(short["session_token"])
        await api.validate(remembered["session_token"])
    assert (await api.validate(short["session_token"]))["reason"] == "expired"
    assert (await api.validate(remembered["session_token"]))["valid"]
    assert (await api.refresh(short["refresh_token"])).status_code == 400
    clock.advance(6 * 86400)  # remembered: idle for six days, still signed in
    assert (await api.validate(remembered["session_token"]))["valid"]
    clock.advance(7 * 86400 + 1)
    assert (await api.validate(remembered["session_token"]))["reason"] == "idle_timeout"


async def test_session_limit_evicts_the_oldest_or_denies(api: Api, clock: ManualClock) -> None:
    web = []
    for _ in range(3):
        web.append(await api.create("u9"))
        clock.advance(1)
    fourth = await api.create("u9")
    assert fourth["evicted_sessions"] == [web[0]["session_id"]]
    assert (await api.validate(web[0]["session_token"]))["reason"] == "revoked"
    assert (await api.validate(web[1]["session_token"]))["valid"]
    await api.create("u9", session_type="mobile")
    await api.create("u9", session_type="mobile")
    denied = await api.create("u9", status=409, session_type="mobile")
    assert denied["type"].endswith("session-limit-reached")


async def test_concurrent_creations_respect_the_limit(api: Api) -> None:
    results = await asyncio.gather(
        *(
            api.client.post(
                "/api/v1/sessions",
                json={"user_id": "racer", "session_type": "mobile"},
                headers=api.headers,
            )
            for _ in range(6)
        )
    )
    assert sorted(r.status_code for r in results) == [201, 201, 409, 409, 409, 409]
    listing = await api.client.get("/api/v1/users/racer/sessions", headers=api.headers)
    assert len(listing.json()["sessions"]) == 2


async def test_risk_checks(api: Api) -> None:
    s = await api.create(device_info=DEVICE)
    same = await api.validate(s["session_token"], ip="198.51.100.99", fingerprint="fp-1")
    assert same["valid"] and same["risk"] == []  # same /24, same fingerprint
    moved = await api.validate(s["session_token"], ip="203.0.113.5")
    assert moved["valid"] and moved["risk"] == ["network_changed"]
    assert not moved["step_up_required"]
    stolen = await api.validate(s["session_token"], fingerprint="fp-other")
    assert stolen == {
        "valid": False,
        "reason": "risk_revoked",
        "session_id": s["session_id"],
        "risk": ["fingerprint_changed"],
    }
    assert (await api.validate(s["session_token"]))["reason"] == "revoked"
    metrics = (await api.client.get("/metrics")).text
    assert 'tenfold_sessions_suspicious_total{action="revoke",signal="fingerprint_changed"}' in (
        metrics
    )
    timeline = await api.client.get(
        f"/api/v1/sessions/{s['session_id']}/timeline", headers=api.headers
    )
    kinds = [e["kind"] for e in timeline.json()["events"]]
    assert kinds.count("risk") == 2 and kinds[-1] == "revoked"


async def test_devices_revoke_others_and_bulk(api: Api, clock: ManualClock) -> None:
    phone = await api.create("u5", session_type="mobile", device_info=DEVICE)
    clock.advance(1)
    laptop = await api.create("u5", device_info={"ip": "192.0.2.1", "user_agent": "Safari"})
    clock.advance(10)
    tablet = await api.create("u5")
    listing = (await api.client.get("/api/v1/users/u5/sessions", headers=api.headers)).json()
    assert [d["session_id"] for d in listing["sessions"]] == [
        tablet["session_id"],
        laptop["session_id"],
        phone["session_id"],
    ]
    assert listing["sessions"][2]["ip"] == DEVICE["ip"]
    assert listing["sessions"][1]["user_agent"] == "Safari"
    others = await api.client.post(
        "/api/v1/users/u5/sessions/revoke",
        json={"except_session_id": laptop["session_id"]},
        headers=api.headers,
    )
    assert sorted(others.json()["revoked"]) == sorted([phone["session_id"], tablet["session_id"]])
    assert (await api.validate(laptop["session_token"]))["valid"]
    page = await api.client.get(
        "/api/v1/users/u5/sessions",
        params={"include_ended": "true", "limit": 2},
        headers=api.headers,
    )
    assert len(page.json()["sessions"]) == 2 and page.json()["next_before"]
    rest = await api.client.get(
        "/api/v1/users/u5/sessions",
        params={"include_ended": "true", "limit": 2, "before": page.json()["next_before"]},
        headers=api.headers,
    )
    assert [d["session_id"] for d in rest.json()["sessions"]] == [phone["session_id"]]

    old = await api.create("u6")
    clock.advance(100)
    new = await api.create("u6")
    cutoff = api.service.clock.now() - 50
    from datetime import UTC, datetime

    bulk = await api.client.post(
        "/api/v1/sessions/revoke",
        json={"created_before": datetime.fromtimestamp(cutoff, UTC).isoformat()},
        headers=api.headers,
    )
    assert old["session_id"] in bulk.json()["revoked"]
    assert new["session_id"] not in bulk.json()["revoked"]
    assert (await api.validate(new["session_token"]))["valid"]
    empty = await api.client.post("/api/v1/sessions/revoke", json={}, headers=api.headers)
    assert empty.status_code == 422


async def test_inspection_is_redacted(api: Api) -> None:
    s = await api.create(device_info=DEVICE, data={"card_last4": "4242", "cart": [1, 2]})
    r = await api.client.get(f"/api/v1/sessions/{s['session_id']}", headers=api.headers)
    body = r.json()
    assert body["device"]["ip"] == "198.51.100.0/24"
    assert body["device"]["fingerprint"] == "present"
    assert body["data_keys"] == ["card_last4", "cart"]
    assert "4242" not in r.text and s["session_token"].split(".")[1] not in r.text
    keys = api.app.state.runtime.keys
    _, reader = await keys.create("reader", ["sessions:read"])
    denied = await api.client.get(
        f"/api/v1/sessions/{s['session_id']}", headers={"X-API-Key": reader}
    )
    assert denied.status_code == 403


async def test_handoff_code_mints_one_session_once(api: Api, clock: ManualClock) -> None:
    s = await api.create("u7", permissions=["p"])
    r = await api.client.post(
        f"/api/v1/sessions/{s['session_id']}/handoff",
        json={"audience": "video.example"},
        headers=api.headers,
    )
    assert r.status_code == 200, r.text
    code = r.json()["code"]
    wrong = await api.client.post(
        "/api/v1/sessions/exchange",
        json={"code": code, "audience": "shop.example"},
        headers=api.headers,
    )
    assert wrong.status_code == 400  # consumed even so: a code is tried once
    r = await api.client.post(
        f"/api/v1/sessions/{s['session_id']}/handoff",
        json={"audience": "video.example"},
        headers=api.headers,
    )
    code = r.json()["code"]
    minted = await api.client.post(
        "/api/v1/sessions/exchange",
        json={"code": code, "audience": "video.example"},
        headers=api.headers,
    )
    assert minted.status_code == 201, minted.text
    new = minted.json()
    assert new["user_id"] == "u7" and new["session_id"] != s["session_id"]
    v = await api.validate(new["session_token"])
    assert v["valid"] and v["permissions"] == ["p"]
    reuse = await api.client.post(
        "/api/v1/sessions/exchange", json={"code": code}, headers=api.headers
    )
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    late = await api.client.post(
        f"/api/v1/sessions/{s['session_id']}/handoff",
        json={"audience": "video.example"},
        headers=api.headers,
    )
    clock.advance(61)
    expired = await api.client.post(
        "/api/v1/sessions/exchange", json={"code": late.json()["code"]}, headers=api.headers
    )
    assert expired.status_code == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u", "session_type": "desktop"}, "session_type"),
        ({"user_id": "u", "data": {"blob": "x" * 20_000}}, "data"),
        ({"user_id": "u", "session_type": "api", "remember_me": True}, "remember_me"),
        ({"user_id": "u", "permissions": [""]}, "permissions"),
        ({"user_id": "u", "surprise": 1}, "surprise"),
    ],
)
async def test_bad_creation_input(api: Api, body: dict[str, Any], field: str) -> None:
    r = await api.client.post("/api/v1/sessions", json=body, headers=api.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["field"].split(".")[0] == field


async def test_last_seen_is_written_at_most_once_a_minute(api: Api, clock: ManualClock) -> None:
    s = await api.create()
    store = api.service.store
    created = (await store.get(s["session_id"])).last_seen_at_ms
    for _ in range(30):
        clock.advance(1)
        await api.validate(s["session_token"])
    await api.service.flush()
    assert (await store.get(s["session_id"])).last_seen_at_ms == created
    clock.advance(31)
    await api.validate(s["session_token"])
    await api.service.flush()
    assert (await store.get(s["session_id"])).last_seen_at_ms == created + 61_000


async def test_country_change_asks_for_step_up(
    tmp_path: Any, stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country")
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"country": {"iso_code": "FR"}})
    path = tmp_path / "countries.mmdb"
    writer.to_db_file(str(path))
    settings = make_settings(**stack, services=["sessions"], geoip_db=str(path))
    async with serve_app(settings, clock) as (app, client):
        api = Api(client, admin_key_of(settings), app)
        s = await api.create(device_info={"ip": "198.51.100.7"})
        home = await api.validate(s["session_token"], ip="198.51.100.8")
        assert home["valid"] and home["risk"] == [] and not home["step_up_required"]
        abroad = await api.validate(s["session_token"], ip="203.0.113.9")
        assert abroad["valid"] and abroad["step_up_required"]
        assert abroad["risk"] == ["network_changed", "country_changed"]
        devices = await client.get("/api/v1/users/u1/sessions", headers=api.headers)
        assert devices.json()["sessions"][0]["location"] == "DE"


async def test_copies_are_confirmed_by_polling_the_change_log(
    api: Api, clock: ManualClock, stack: dict[str, Any], admin_key_of: Any
) -> None:
    service = api.service
    s = await api.create()
    other = await api.create("u2")
    reads: list[str] = []
    original = service.store.get

    async def counting_get(session_id: str) -> Any:
        reads.append(session_id)
        return await original(session_id)

    service.store.get = counting_get
    for token in (s["session_token"], other["session_token"]):
        assert (await service.validate(token)).valid
    assert reads == [s["session_id"], other["session_id"]]  # first reads (scale-out: fill Redis)
    await asyncio.gather(*(t for t in [service._polling] if t))
    for _ in range(5):  # five seconds of use: the copies are confirmed, never read again
        clock.advance(0.6)
        assert service.validate_cached(s["session_token"]).valid
        await asyncio.gather(*(t for t in [service._polling] if t))
    assert len(reads) == 2

    # Another process (here: the store directly, as the CLI does) ends a session: the next
    # poll, within a second, drops that copy and that copy only.
    await service.store.revoke(
        [other["session_id"]], now_ms=clock.now_ms(), reason="cli", actor=None
    )
    clock.advance(0.6)
    assert service.validate_cached(s["session_token"]).valid
    await asyncio.gather(*(t for t in [service._polling] if t))
    assert service.validate_cached(other["session_token"]) is None  # dropped: read it again
    assert (await service.validate(other["session_token"])).reason == "revoked"
    assert service.validate_cached(s["session_token"]).valid


async def test_user_ids_may_hold_slashes(api: Api) -> None:
    s = await api.create("org/acme/alice")
    listing = await api.client.get("/api/v1/users/org/acme/alice/sessions", headers=api.headers)
    assert listing.status_code == 200, listing.text
    assert [d["session_id"] for d in listing.json()["sessions"]] == [s["session_id"]]
    encoded = await api.client.get("/api/v1/users/org%2Facme%2Falice/sessions", headers=api.headers)
    assert encoded.json()["sessions"] == listing.json()["sessions"]
    ended = await api.client.post(
        "/api/v1/users/org/acme/alice/sessions/revoke", json={}, headers=api.headers
    )
    assert ended.json()["revoked"] == [s["session_id"]]


async def test_two_processes_racing_creations_respect_the_limit(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(
        **stack,
        services=["sessions"],
        sessions_policies={"mobile": {"max_sessions": 3, "on_limit": "deny"}},
    )
    async with (
        serve_app(settings, clock) as (_, a),
        serve_app(settings, clock) as (_, b),
    ):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        body = {"user_id": "racer", "session_type": "mobile"}
        answers = await asyncio.gather(
            *(c.post("/api/v1/sessions", json=body, headers=headers) for c in [a, b] * 8)
        )
        codes = sorted(r.status_code for r in answers)
        assert codes == [201] * 3 + [409] * 13
        listing = await a.get("/api/v1/users/racer/sessions", headers=headers)
        assert len(listing.json()["sessions"]) == 3
