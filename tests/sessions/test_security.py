"""What an attacker with the database, or an outage, must not get: secrets, data, resurrection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel.clock import ManualClock
from tenfold.sessions.service import _decode
from tests.conftest import TEST_SECRET_KEY, make_settings, serve_app
from tests.ratelimit.test_outage import RedisServer, private_redis

__all__ = ["private_redis"]  # the fixture, shared with the rate limiter's outage test

PRIVATE = "very-private-value-31337"


async def dump(engine: AsyncEngine) -> bytes:
    """Every row of every table, as bytes (what a database dump would hold)."""
    out = []
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        for name in names:
            rows = (await conn.execute(sa.text(f'SELECT * FROM "{name}"'))).all()
            for row in rows:
                for value in row:
                    out.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(out)


async def test_the_database_holds_no_secret_and_no_plain_session_data(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(**stack, services=["sessions"])
    async with serve_app(settings, clock) as (app, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        r = await client.post(
            "/api/v1/sessions",
            json={
                "user_id": "u1",
                "device_info": {"ip": "198.51.100.23", "user_agent": "UA-" + PRIVATE},
                "data": {"note": PRIVATE},
            },
            headers=headers,
        )
        first = r.json()
        second = (
            await client.post(
                "/api/v1/sessions/refresh",
                json={"refresh_token": first["refresh_token"]},
                headers=headers,
            )
        ).json()
        code = (
            await client.post(
                f"/api/v1/sessions/{first['session_id']}/handoff",
                json={"audience": "a"},
                headers=headers,
            )
        ).json()["code"]
        contents = await dump(app.state.runtime.engine)
        if settings.embedded:  # the file itself, write-ahead log included
            db = Path(settings.database_url.removeprefix("sqlite:///"))
            contents += b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    secrets = [
        first["session_token"].split(".")[1],
        first["refresh_token"].split(".")[2],
        second["session_token"].split(".")[1],
        second["refresh_token"].split(".")[2],
        code,
    ]
    for secret in secrets:
        assert secret.encode() not in contents
    assert PRIVATE.encode() not in contents
    assert b"198.51.100.23" not in contents
    assert first["session_id"].encode() in contents  # the dump is real: ids are there


async def test_signed_access_tokens_validate_without_the_store(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(**stack, services=["sessions"], sessions_access_tokens=True)
    async with serve_app(settings, clock) as (_, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        issued = (
            await client.post(
                "/api/v1/sessions",
                json={"user_id": "u1", "permissions": ["a"]},
                headers=headers,
            )
        ).json()
        token = issued["access_token"]
        jwks = (await client.get("/.well-known/jwks.json")).json()
        key = jwt.PyJWK(jwks["keys"][0])
        claims = jwt.decode(token, key=key, algorithms=["EdDSA"], options={"verify_exp": False})
        assert claims["sub"] == "u1" and claims["sid"] == issued["session_id"]
        assert claims["exp"] - claims["iat"] == 300
        v = await client.post(
            "/api/v1/sessions/validate", json={"session_token": token}, headers=headers
        )
        assert v.json()["valid"] and v.json()["permissions"] == ["a"]
        clock.advance(301)
        late = await client.post(
            "/api/v1/sessions/validate", json={"session_token": token}, headers=headers
        )
        assert late.json() == {"valid": False, "reason": "expired"}
        tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
        bad = await client.post(
            "/api/v1/sessions/validate", json={"session_token": tampered}, headers=headers
        )
        assert bad.json()["valid"] is False


@pytest.mark.parametrize("stack", ["scale"], indirect=True)  # the outage concerns Redis
async def test_redis_outage_falls_back_to_sql_and_revocations_hold_after(
    private_redis: RedisServer,
    tmp_path: Path,
    stack: dict[str, Any],
    clock: ManualClock,
    admin_key_of: Any,
) -> None:
    settings = make_settings(
        **{**stack, "redis_url": private_redis.url, "redis_prefix": "sess-outage"},
        services=["sessions"],
    )
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == (
        TEST_SECRET_KEY
    )
    direct = redis.Redis(port=private_redis.port)
    async with serve_app(settings, clock) as (app, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        service = app.state.runtime.services["sessions"]
        s = (await client.post("/api/v1/sessions", json={"user_id": "u1"}, headers=headers)).json()

        async def validate() -> dict[str, Any]:
            r = await client.post(
                "/api/v1/sessions/validate",
                json={"session_token": s["session_token"]},
                headers=headers,
            )
            assert r.status_code == 200, r.text
            return dict(r.json())

        assert (await validate())["valid"]
        cached = f"sess-outage:{{sess}}:{s['session_id']}"
        assert direct.exists(cached)  # the shared copy exists ...
        direct.save()  # ... and survives the restart below
        private_redis.kill()

        clock.advance(2)  # past the local copy's lifetime: the next read goes to SQL
        assert (await validate())["valid"]
        ended = await client.delete(f"/api/v1/sessions/{s['session_id']}", headers=headers)
        assert ended.status_code == 204
        assert (await validate())["reason"] == "revoked"

        private_redis.start()  # comes back with the stale copy from its snapshot
        direct = redis.Redis(port=private_redis.port)
        assert direct.exists(cached)
        clock.advance(2)
        assert (await validate())["reason"] == "revoked"  # never the stale copy
        await service.retry_invalidations()
        # The stale copy is dropped for every other process too. (The server's own once-a-second
        # retry may have dropped it first, and a validation since then have put the revoked
        # record back: that copy is a fresh one.)
        left = direct.get(cached)
        assert left is None or _decode(left).revoked_at_ms is not None
        assert (await validate())["reason"] == "revoked"


async def test_keys_rotated_by_another_process_are_picked_up(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(**stack, services=["sessions"], sessions_access_tokens=True)
    async with (
        serve_app(settings, clock) as (app_a, client_a),
        serve_app(settings, clock) as (_, client_b),
    ):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        ring = app_a.state.runtime.services["keyring"]
        for purpose in ("aead", "hmac", "jwt"):
            await ring.rotate(purpose)
        issued = (
            await client_a.post(
                "/api/v1/sessions",
                json={"user_id": "u1", "device_info": {"ip": "192.0.2.4"}},
                headers=headers,
            )
        ).json()
        for token in (issued["session_token"], issued["access_token"]):
            v = await client_b.post(
                "/api/v1/sessions/validate", json={"session_token": token}, headers=headers
            )
            assert v.json()["valid"], v.text
        devices = await client_b.get("/api/v1/users/u1/sessions", headers=headers)
        assert devices.json()["sessions"][0]["ip"] == "192.0.2.4"
        refreshed = await client_b.post(
            "/api/v1/sessions/refresh",
            json={"refresh_token": issued["refresh_token"]},
            headers=headers,
        )
        assert refreshed.status_code == 200, refreshed.text


async def test_a_revocation_reaches_every_process_within_a_second(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(**stack, services=["sessions"])
    async with (
        serve_app(settings, clock) as (_, client_a),
        serve_app(settings, clock) as (app_b, client_b),
    ):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        s = (
            await client_a.post("/api/v1/sessions", json={"user_id": "u1"}, headers=headers)
        ).json()

        async def valid_in_b() -> bool:
            r = await client_b.post(
                "/api/v1/sessions/validate",
                json={"session_token": s["session_token"]},
                headers=headers,
            )
            return bool(r.json()["valid"])

        assert await valid_in_b()  # now cached in process B
        ended = await client_a.delete(f"/api/v1/sessions/{s['session_id']}", headers=headers)
        assert ended.status_code == 204
        cached = app_b.state.runtime.services["sessions"]._local
        if settings.redis_url:  # the pub/sub message drops B's copy at once
            for _ in range(200):
                if s["session_id"] not in cached:
                    break
                await asyncio.sleep(0.01)  # waits for the message to arrive, then moves on
            assert s["session_id"] not in cached
            assert not await valid_in_b()
        else:  # embedded processes share no bus: the copy's one-second lifetime bounds it
            assert await valid_in_b()
            clock.advance(1.0)
            assert not await valid_in_b()
