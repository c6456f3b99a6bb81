"""API keys: stored as hashes, scoped, accepted in two headers, revocable, bootstrapped once."""

from __future__ import annotations

import asyncio
import hashlib
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tenfold.kernel import sql
from tenfold.kernel.auth import (
    CACHE_SECONDS,
    KeyStore,
    grants,
    key_from_headers,
    key_from_scope,
    parse_scope,
    split_key,
)
from tenfold.kernel.clock import ManualClock
from tenfold.settings import Settings
from tests.conftest import serve_app


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = sql.create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def keys(engine: AsyncEngine, clock: ManualClock) -> KeyStore:
    return KeyStore(engine, clock)


async def rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(sa.text("SELECT * FROM api_keys"))
        return [dict(row) for row in result.mappings()]


# --- the store -----------------------------------------------------------------------------


async def test_create_returns_the_key_once_and_stores_only_its_hash(
    keys: KeyStore, engine: AsyncEngine
) -> None:
    record, plaintext = await keys.create("deploy bot", ["ratelimit:write", "ratelimit:read"])
    parts = split_key(plaintext)
    assert parts is not None
    key_id, secret = parts
    assert record.key_id == key_id
    assert record.scopes == ("ratelimit:read", "ratelimit:write")
    stored = await rows(engine)
    assert len(stored) == 1
    assert stored[0]["key_id"] == key_id
    assert stored[0]["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    for value in stored[0].values():
        assert secret not in str(value)
        assert plaintext not in str(value)


async def test_every_key_is_different(keys: KeyStore) -> None:
    made = [await keys.create(f"k{n}", ["*"]) for n in range(5)]
    assert len({plaintext for _, plaintext in made}) == 5
    assert len({record.key_id for record, _ in made}) == 5


async def test_verify_gives_the_principal_of_a_valid_key(keys: KeyStore) -> None:
    record, plaintext = await keys.create("ops", ["ratelimit:admin"], owner="team-ops")
    principal = await keys.verify(plaintext)
    assert principal is not None
    assert principal.key_id == record.key_id
    assert principal.name == "ops"
    assert principal.scopes == frozenset({"ratelimit:admin"})
    assert principal.subject == "team-ops"
    assert principal.can("ratelimit:read")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # wrong secret
        lambda k: k.replace("tf_", "xx_", 1),  # wrong prefix
        lambda k: k.split("_", 2)[0] + "_" + k.split("_", 2)[1],  # no secret
        lambda k: "tf_ffffffffffff_" + k.split("_", 2)[2],  # unknown id, real secret
        lambda k: "",
    ],
)
async def test_verify_refuses_anything_but_the_exact_key(keys: KeyStore, tamper: Any) -> None:
    _, plaintext = await keys.create("k", ["*"])
    assert await keys.verify(tamper(plaintext)) is None
    assert await keys.verify(plaintext) is not None


async def test_list_shows_active_keys_and_revoked_ones_on_request(keys: KeyStore) -> None:
    kept, _ = await keys.create("kept", ["ratelimit:read"])
    gone, _ = await keys.create("gone", ["ratelimit:read"])
    assert await keys.revoke(gone.key_id) is True
    assert await keys.revoke(gone.key_id) is False  # already revoked
    assert await keys.revoke("nosuchkey") is False
    assert [r.key_id for r in await keys.list()] == [kept.key_id]
    everything = {r.key_id: r for r in await keys.list(include_revoked=True)}
    assert set(everything) == {kept.key_id, gone.key_id}
    assert everything[gone.key_id].revoked_at is not None
    assert everything[kept.key_id].revoked_at is None
    assert await keys.count_active() == 1


async def test_revoked_key_is_refused_by_its_own_process_at_once(keys: KeyStore) -> None:
    record, plaintext = await keys.create("k", ["*"])
    assert await keys.verify(plaintext) is not None
    await keys.revoke(record.key_id)
    assert await keys.verify(plaintext) is None


async def test_revoked_key_is_refused_everywhere_after_the_cache_window(
    engine: AsyncEngine, clock: ManualClock
) -> None:
    here, elsewhere = KeyStore(engine, clock), KeyStore(engine, clock)  # two replicas
    record, plaintext = await here.create("k", ["*"])
    assert await elsewhere.verify(plaintext) is not None  # now cached over there
    await here.revoke(record.key_id)
    clock.advance(CACHE_SECONDS - 0.5)
    assert await elsewhere.verify(plaintext) is not None  # the documented bound, not a bug
    clock.advance(0.5)
    assert await elsewhere.verify(plaintext) is None


async def test_a_busy_key_is_refreshed_before_it_expires(
    engine: AsyncEngine, clock: ManualClock
) -> None:
    keys = KeyStore(engine, clock)
    record, plaintext = await keys.create("k", ["*"])
    assert await keys.verify(plaintext) is not None
    first_expiry = keys._cache[record.key_id][0]
    clock.advance(CACHE_SECONDS * 0.9)  # in the refresh-ahead window
    assert await keys.verify(plaintext) is not None  # answered from the cache at once
    await asyncio.gather(*keys._loading.values())  # the background refresh
    assert keys._cache[record.key_id][0] > first_expiry
    clock.advance(CACHE_SECONDS * 0.2)  # past the first expiry: still cached, no wait
    assert await keys.verify(plaintext) is not None
    assert not keys._loading


async def test_a_verified_key_is_known_without_io_until_its_entry_wants_refreshing(
    keys: KeyStore, clock: ManualClock
) -> None:
    record, plaintext = await keys.create("k", ["*"])
    wrong = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    assert keys.verified(plaintext) is None  # never verified yet
    assert await keys.verify(wrong) is None
    assert keys.verified(wrong) is None  # a refused key is never remembered
    principal = await keys.verify(plaintext)
    assert principal is not None and keys.verified(plaintext) == principal
    clock.advance(CACHE_SECONDS * 0.85)  # in the refresh-ahead window: back to `verify`
    assert keys.verified(plaintext) is None
    assert await keys.verify(plaintext) == principal
    await asyncio.gather(*keys._loading.values())
    assert await keys.verify(plaintext) == principal and keys.verified(plaintext) == principal
    await keys.revoke(record.key_id)
    assert keys.verified(plaintext) is None and await keys.verify(plaintext) is None


@pytest.mark.parametrize("scopes", [[], ["ratelimit"], ["ratelimit:delete"], [":read"], ["*:*"]])
async def test_create_refuses_bad_scopes_and_writes_nothing(
    keys: KeyStore, engine: AsyncEngine, scopes: list[str]
) -> None:
    with pytest.raises(ValueError):
        await keys.create("bad", scopes)
    assert await rows(engine) == []


# --- scopes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "wanted", "granted"),
    [
        ({"ratelimit:admin"}, "ratelimit:admin", True),
        ({"ratelimit:admin"}, "ratelimit:write", True),
        ({"ratelimit:admin"}, "ratelimit:read", True),
        ({"ratelimit:write"}, "ratelimit:write", True),
        ({"ratelimit:write"}, "ratelimit:read", True),
        ({"ratelimit:write"}, "ratelimit:admin", False),
        ({"ratelimit:read"}, "ratelimit:read", True),
        ({"ratelimit:read"}, "ratelimit:write", False),
        ({"ratelimit:read"}, "ratelimit:admin", False),
        ({"shortener:admin"}, "ratelimit:read", False),
        ({"shortener:admin", "ratelimit:read"}, "ratelimit:read", True),
        ({"*"}, "ratelimit:admin", True),
        ({"*"}, "anything:read", True),
        (set(), "ratelimit:read", False),
    ],
)
def test_scope_implication(held: set[str], wanted: str, granted: bool) -> None:
    assert grants(frozenset(held), wanted) is granted


def test_parse_scope() -> None:
    assert parse_scope("ratelimit:write") == ("ratelimit", "write")
    assert parse_scope("*") == ("*", "admin")
    for bad in ("ratelimit", "ratelimit:", "ratelimit:owner", ":read", ""):
        with pytest.raises(ValueError, match=re.escape("expected <service>:read|write|admin")):
            parse_scope(bad)


# --- headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "presented"),
    [
        ({"authorization": "Bearer tf_a_b"}, "tf_a_b"),
        ({"authorization": "bearer   tf_a_b  "}, "tf_a_b"),
        ({"x-api-key": "tf_a_b"}, "tf_a_b"),
        ({"authorization": "Basic dXNlcjpwdw==", "x-api-key": "tf_a_b"}, "tf_a_b"),
        ({"authorization": "Basic dXNlcjpwdw=="}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_key_from_headers(headers: dict[str, str], presented: str | None) -> None:
    assert key_from_headers(headers) == presented
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    assert key_from_scope({"headers": [(b"host", b"t"), *raw]}) == presented


def test_key_from_scope_takes_the_first_of_repeated_headers() -> None:
    raw = [(b"x-api-key", b"tf_first_x"), (b"x-api-key", b"tf_second_x")]
    assert key_from_scope({"headers": raw}) == "tf_first_x"


@pytest.mark.parametrize(
    "header", [lambda k: {"Authorization": f"Bearer {k}"}, lambda k: {"X-API-Key": k}]
)
async def test_both_headers_are_accepted_over_http(
    embedded: Settings, clock: ManualClock, header: Any
) -> None:
    async with serve_app(embedded, clock) as (app, client):
        _, key = await app.state.runtime.keys.create("reader", ["ratelimit:read"])
        ok = await client.get("/api/v1/policies", headers=header(key))
        wrong = await client.get("/api/v1/policies", headers=header(key + "x"))
    assert ok.status_code == 200, ok.text
    assert wrong.status_code == 401


async def test_revoked_key_is_refused_over_http(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded, clock) as (app, client):
        keys: KeyStore = app.state.runtime.keys
        record, key = await keys.create("reader", ["ratelimit:read"])
        headers = {"X-API-Key": key}
        assert (await client.get("/api/v1/policies", headers=headers)).status_code == 200
        await KeyStore(keys.engine, clock).revoke(record.key_id)  # revoked by another replica
        clock.advance(CACHE_SECONDS)
        refused = await client.get("/api/v1/policies", headers=headers)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]


# --- first start ---------------------------------------------------------------------------


async def test_first_start_writes_an_admin_key_once(
    embedded: Settings, clock: ManualClock, admin_key_of: Any
) -> None:
    path = Path(embedded.data_dir) / "admin.key"
    assert not path.exists()
    async with serve_app(embedded, clock) as (app, client):
        first = admin_key_of(embedded)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        principal = await app.state.runtime.keys.verify(first)
        assert principal is not None
        assert principal.scopes == frozenset({"*"})
        assert (await client.get("/api/v1/policies", headers={"X-API-Key": first})).is_success
    async with serve_app(embedded, clock) as (app, _):
        assert admin_key_of(embedded) == first
        assert len(await app.state.runtime.keys.list()) == 1
    left = sorted(p.name for p in path.parent.iterdir())
    # No temp files left (secret.key: the key ring; analytics.duckdb: the analytics store, closed).
    assert left == ["admin.key", "analytics.duckdb", "secret.key"]


async def test_no_admin_key_is_made_when_keys_exist(embedded: Settings, clock: ManualClock) -> None:
    async with serve_app(embedded.model_copy(update={"create_admin_key": False}), clock) as (
        app,
        _,
    ):
        await app.state.runtime.keys.create("existing", ["ratelimit:read"])
    async with serve_app(embedded, clock) as (app, _):
        names = [r.name for r in await app.state.runtime.keys.list()]
    assert names == ["existing"]
    assert not (Path(embedded.data_dir) / "admin.key").exists()
