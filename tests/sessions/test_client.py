"""SessionClient: in process and over HTTP, against the same running app, answer alike."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from tenfold.kernel.clock import ManualClock
from tenfold.sessions.client import (
    HttpSessionClient,
    InProcessSessionClient,
    InvalidGrant,
    NotCached,
    SessionClient,
    SessionClientError,
    UserSession,
)
from tenfold.sessions.models import DeviceInfo, Reason, SessionType, Validation
from tenfold.sessions.service import Issued, SessionService
from tests.conftest import make_settings, serve_app

DEVICE = DeviceInfo(user_agent="Firefox/130", ip="198.51.100.7", fingerprint="fp-1")


@dataclass
class Both:
    service: SessionService
    local: InProcessSessionClient
    remote: HttpSessionClient
    clock: ManualClock

    @property
    def clients(self) -> tuple[SessionClient, SessionClient]:
        return self.local, self.remote


@pytest.fixture
async def both(stack: dict[str, str], clock: ManualClock) -> AsyncIterator[Both]:
    settings = make_settings(
        **{"secret_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(), **stack},
        services=["sessions"],
        sessions_access_tokens=True,
        sessions_policies={"api": {"max_sessions": 1, "on_limit": "deny"}},
    )
    async with serve_app(settings, clock) as (app, http):
        key = (Path(settings.data_dir) / "admin.key").read_text().strip()
        service = app.state.runtime.services["sessions"]
        local = SessionClient.in_process(service)
        remote = SessionClient.over_http("http://tenfold.test", key, client=http)
        yield Both(service, local, remote, clock)
        await local.aclose()
        await remote.aclose()
        assert not http.is_closed  # a client handed in stays its owner's


async def validate_both(b: Both, token: str, **kw: str) -> Validation:
    """Validate on both transports; they must agree. Returns the verdict."""
    local = await b.local.validate(token, **kw)
    remote = await b.remote.validate(token, **kw)
    assert local == remote
    return local


async def test_validations_agree(both: Both) -> None:
    for creator in both.clients:
        issued = await creator.create(
            "alice", device=DEVICE, permissions=["orders:read", "cart:write"], data={"cart": 3}
        )
        verdict = await validate_both(both, issued.session_token)
        assert verdict.valid and verdict.reason is None
        assert verdict.session_id == issued.session_id and verdict.user_id == "alice"
        assert verdict.session_type is SessionType.WEB
        assert verdict.permissions == ("orders:read", "cart:write")
        assert verdict.expires_at == issued.expires_at_ms / 1000
        assert verdict.absolute_expires_at == issued.refresh_expires_at_ms / 1000
        # the same device, then another network: allowed by default, but reported
        same = await validate_both(both, issued.session_token, ip=DEVICE.ip, fingerprint="fp-1")
        assert same == verdict
        moved = await validate_both(both, issued.session_token, ip="203.0.113.50")
        assert moved.valid and moved.risk == ("network_changed",)
        # by id: its own session, and a token of another session
        by_id = await validate_both(both, issued.session_token, session_id=issued.session_id)
        assert by_id == verdict
        other = await validate_both(both, issued.session_token, session_id="A" * 22)
        assert other == Validation(False, Reason.MALFORMED)


async def test_refusals_agree(both: Both) -> None:
    issued = await both.remote.create("bob", device=DEVICE)
    sid, _, secret = issued.session_token.partition(".")
    wrong = sid + "." + ("A" * 43 if secret != "A" * 43 else "B" * 43)
    cases = {
        "not-a-token": Reason.MALFORMED,
        "A" * 22 + "." + "A" * 43: Reason.UNKNOWN,
        wrong: Reason.BAD_SECRET,
    }
    for token, reason in cases.items():
        assert await validate_both(both, token) == Validation(False, reason)
    # fingerprint changed: the default policy ends the session, on either transport
    stolen = await both.local.create("bob", device=DEVICE)
    local = await both.local.validate(stolen.session_token, fingerprint="other")
    assert (local.valid, local.reason) == (False, Reason.RISK)
    assert await validate_both(both, stolen.session_token) == Validation(False, Reason.REVOKED)
    stolen = await both.remote.create("bob", device=DEVICE)
    remote = await both.remote.validate(stolen.session_token, fingerprint="other")
    assert (remote.valid, remote.reason) == (False, Reason.RISK)
    assert await validate_both(both, stolen.session_token) == Validation(False, Reason.REVOKED)
    # idle: 30 minutes without a validation ends a web session
    both.clock.advance(31 * 60)
    assert await validate_both(both, issued.session_token) == Validation(False, Reason.IDLE)


async def test_refresh_rotates_alike_and_reuse_is_invalid_grant(both: Both) -> None:
    issued = await both.local.create("carol", device=DEVICE)
    first = await both.local.refresh(issued.refresh_token)
    # the same token again within the grace window: the same successor, on either transport
    again = await both.remote.refresh(issued.refresh_token)
    assert again == first
    assert first.refresh_token != issued.refresh_token
    assert (await validate_both(both, first.session_token)).valid
    for client in both.clients:
        with pytest.raises(InvalidGrant, match="malformed"):
            await client.refresh("garbage")
    both.clock.advance(11)  # past the grace window: a reuse is theft and ends the session
    with pytest.raises(InvalidGrant, match="already used"):
        await both.remote.refresh(issued.refresh_token)
    for client in both.clients:
        with pytest.raises(InvalidGrant, match="ended"):
            await client.refresh(first.refresh_token)
    assert await validate_both(both, first.session_token) == Validation(False, Reason.REVOKED)


async def test_created_sessions_have_the_same_shape(both: Both) -> None:
    a = await both.local.create("dave", session_type="mobile", remember_me=True)
    b = await both.remote.create("dave", session_type=SessionType.MOBILE, remember_me=True)

    def shape(i: Issued) -> tuple[object, ...]:
        return (i.user_id, i.expires_at_ms, i.refresh_expires_at_ms, i.evicted)

    assert shape(a) == shape(b)
    assert a.access_token and b.access_token  # access tokens are on in this app
    for issued in (a, b):
        verdict = await validate_both(both, issued.access_token or "")
        assert verdict.valid and verdict.session_id == issued.session_id
        assert verdict.session_type is SessionType.MOBILE
        with pytest.raises(NotCached, match="access token"):
            both.local.validate_sync(issued.access_token or "")


async def test_errors_are_problems_on_both(both: Both) -> None:
    for client in both.clients:
        with pytest.raises(SessionClientError) as caught:
            await client.create("  ")
        assert (caught.value.status, caught.value.kind) == (422, "validation-error")
        with pytest.raises(SessionClientError) as caught:
            await client.create("erin", session_type="desktop")
        assert (caught.value.status, caught.value.kind) == (422, "validation-error")
        with pytest.raises(SessionClientError) as caught:
            await client.create("erin", session_type="api", remember_me=True)
        assert caught.value.status == 422
        with pytest.raises(SessionClientError) as caught:
            await client.revoke_user("")
        assert caught.value.problem_type == "urn:tenfold:problem:validation-error"
    # the api policy here allows one session and denies the next
    await both.local.create("erin", session_type="api")
    for client in both.clients:
        with pytest.raises(SessionClientError) as caught:
            await client.create("erin", session_type="api")
        assert (caught.value.status, caught.value.kind) == (409, "session-limit-reached")


async def test_http_errors_carry_status_and_type(both: Both) -> None:
    http = both.remote._http
    anonymous = SessionClient.over_http("http://tenfold.test", "tf_bad_key", client=http)
    with pytest.raises(SessionClientError) as caught:
        await anonymous.validate("x")
    assert (caught.value.status, caught.value.kind) == (401, "unauthorized")
    assert caught.value.problem["status"] == 401
    elsewhere = SessionClient.over_http("http://tenfold.test/not-here", "k", client=http)
    with pytest.raises(SessionClientError) as caught:
        await elsewhere.revoke("A" * 22)  # a 404 of no session API is not "no such session"
    assert (caught.value.status, caught.value.kind) == (404, "not-found")
    nowhere = SessionClient.over_http("http://127.0.0.1:1", "k", timeout=2)
    with pytest.raises(SessionClientError) as caught:
        await nowhere.validate("x")
    assert caught.value.status is None
    await nowhere.aclose()
    assert nowhere._http.is_closed  # a client it made itself is closed


async def test_revocation_agrees(both: Both) -> None:
    for client in both.clients:
        assert await client.revoke("A" * 22) is False  # no such session
        assert await client.revoke("not/an id") is False
        issued = await client.create("frank")
        assert await client.revoke(issued.session_id) is True
        assert await client.revoke(issued.session_id) is True  # already ended: still there
        assert await validate_both(both, issued.session_token) == Validation(False, Reason.REVOKED)

    for user, client in (("gina", both.local), ("hal", both.remote)):
        kept, *others = [await client.create(user) for _ in range(3)]
        ended = await client.revoke_user(user, keep=kept.session_id)
        assert sorted(ended) == sorted(o.session_id for o in others)
        assert (await validate_both(both, kept.session_token)).valid
        assert await client.revoke_user(user) == [kept.session_id]
        assert await client.revoke_user(user) == []


async def test_sessions_of_agree_and_page(both: Both) -> None:
    first = await both.remote.create("ivy", device=DEVICE)
    for i in range(104):  # 105 web sessions: 10 stay active, 95 were evicted (limit 10)
        both.clock.advance(1)
        await both.local.create("ivy", device=replace(DEVICE, user_agent=f"agent/{i}"))
    await both.local.validate(first.session_token)  # evicted: no effect on last_seen
    for include_ended, count in ((False, 10), (True, 105)):
        local = await both.local.sessions_of("ivy", include_ended=include_ended)
        remote = await both.remote.sessions_of("ivy", include_ended=include_ended)
        assert local == remote
        assert len(local) == count
        assert len({s.session_id for s in local}) == count
        assert [s.created_at_ms for s in local] == sorted(
            (s.created_at_ms for s in local), reverse=True
        )
    newest = local[0]
    assert isinstance(newest, UserSession)
    assert (newest.ip, newest.user_agent, newest.active) == (DEVICE.ip, "agent/103", True)
    oldest = local[-1]
    assert oldest.session_id == first.session_id
    assert (oldest.active, oldest.revoke_reason) == (False, "evicted")
    assert await both.remote.sessions_of("nobody") == []


async def test_validate_sync_needs_a_warm_cache(both: Both) -> None:
    issued = await both.remote.create("jack", device=DEVICE)
    with pytest.raises(NotCached, match=r"await client\.validate"):
        both.local.validate_sync(issued.session_token)
    warm = await both.local.validate(issued.session_token)
    assert both.local.validate_sync(issued.session_token) == warm
    assert both.local.validate_sync("garbage") == Validation(False, Reason.MALFORMED)
    # another network needs the full path (a risk decision may write)
    with pytest.raises(NotCached):
        both.local.validate_sync(issued.session_token, ip="203.0.113.50")
    both.clock.advance(both.service.config.local_ttl_ms / 1000)
    with pytest.raises(NotCached):
        both.local.validate_sync(issued.session_token)
    await both.local.validate(issued.session_token)
    assert both.local.validate_sync(issued.session_token).valid
    # a revocation elsewhere (here: over HTTP) drops the cached copy
    assert await both.remote.revoke(issued.session_id)
    with pytest.raises(NotCached):
        both.local.validate_sync(issued.session_token)


async def test_own_client_is_closed_by_aclose() -> None:
    async with SessionClient.over_http("http://127.0.0.1:1/", "k") as client:
        assert isinstance(client, HttpSessionClient)
        assert client.base_url == "http://127.0.0.1:1"
    assert client._http.is_closed
    shared = httpx.AsyncClient()
    async with SessionClient.over_http("http://127.0.0.1:1", "k", client=shared):
        pass
    assert not shared.is_closed
    await shared.aclose()
