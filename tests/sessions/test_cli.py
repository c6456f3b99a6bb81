"""`tenfold sessions ...` against an embedded database (no server)."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from tenfold.cli import app
from tenfold.kernel.clock import SYSTEM_CLOCK, Clock, ManualClock
from tenfold.kernel.crypto import KeyRing
from tenfold.kernel.runtime import Runtime
from tenfold.sessions.api import open_ring, service_for
from tenfold.sessions.models import DeviceInfo, Reason, SessionType
from tenfold.sessions.service import Issued, SessionService
from tenfold.sessions.stores.sql import SqlSessionStore
from tenfold.sessions.tables import sessions
from tenfold.settings import load_settings

T = TypeVar("T")
SECRET_KEY = base64.urlsafe_b64encode(bytes(range(32, 64))).decode()  # scale-out needs one
PHONE = DeviceInfo(user_agent="TenfoldApp/3.1 (iPhone)", ip="198.51.100.23", fingerprint="fp")
LAPTOP = DeviceInfo(user_agent="Firefox/130", ip="203.0.113.9")


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's environment: a migrated database of each SQL backend, no Redis, no server."""
    for name in list(os.environ):
        if name.startswith("TENFOLD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TENFOLD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TENFOLD_DATABASE_URL", db_url)
    if not db_url.startswith("sqlite"):
        monkeypatch.setenv("TENFOLD_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at 80 columns otherwise
    return tmp_path


def tenfold(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def with_service(job: Callable[[SessionService], Awaitable[T]], clock: Clock = SYSTEM_CLOCK) -> T:
    """Run `job` on a SessionService over the CLI's database (as a server would)."""

    async def main() -> T:
        runtime = Runtime.from_settings(load_settings(), clock)
        try:
            service = service_for(runtime)
            service.ring = await open_ring(runtime)
            return await job(service)
        finally:
            await runtime.close()

    return asyncio.run(main())


def create(
    user: str,
    n: int = 1,
    *,
    device: DeviceInfo = LAPTOP,
    kind: SessionType = SessionType.WEB,
    clock: Clock = SYSTEM_CLOCK,
) -> list[Issued]:
    async def job(service: SessionService) -> list[Issued]:
        return [
            await service.create(user, device=device, session_type=kind, data={"cart": i})
            for i in range(n)
        ]

    return with_service(job, clock)


def key_ids_in_use() -> dict[str, int]:
    async def job(service: SessionService) -> dict[str, int]:
        async with service.store.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(sessions.c.key_id, sa.func.count()).group_by(sessions.c.key_id)
            )
            return {str(k): int(n) for k, n in rows.all()}

    return with_service(job)


def validate(token: str) -> Reason | None:
    async def job(service: SessionService) -> Reason | None:
        verdict = await service.validate(token)
        assert verdict.valid == (verdict.reason is None)
        return verdict.reason

    return with_service(job)


def ended(issued: Issued) -> str | None:
    """Why the session was revoked, or None while it was not."""

    async def job(service: SessionService) -> str | None:
        record = await service.get(issued.session_id)
        assert record is not None
        return record.revoke_reason

    return with_service(job)


def aead_keys(include_retired: bool = False) -> list[str]:
    async def job(service: SessionService) -> list[str]:
        assert isinstance(service.ring, KeyRing)
        return service.ring.key_ids("aead", include_retired=include_retired)

    return with_service(job)


# --- list ----------------------------------------------------------------------------------


def test_list_shows_the_users_sessions(env: Path) -> None:
    phone, laptop = create("ana", device=PHONE) + create("ana")
    create("bo")
    done = tenfold("sessions", "list", "--user", "ana")
    assert done.exit_code == 0, done.output
    for text in (phone.session_id, laptop.session_id, PHONE.ip, PHONE.user_agent, LAPTOP.ip):
        assert text in done.stdout
    for title in ("session id", "type", "user agent", "created", "last seen", "expires"):
        assert title in done.stdout
    assert done.stdout.index(laptop.session_id) < done.stdout.index(phone.session_id)  # newest

    assert tenfold("sessions", "revoke", phone.session_id).exit_code == 0
    active = tenfold("sessions", "list", "--user", "ana", "--json")
    assert active.exit_code == 0, active.output
    rows = orjson.loads(active.stdout)
    assert [r["session_id"] for r in rows] == [laptop.session_id]
    assert rows[0]["active"] is True and rows[0]["ip"] == LAPTOP.ip
    assert datetime.fromisoformat(rows[0]["expires_at"]) > datetime.now(UTC)

    everything = orjson.loads(
        tenfold("sessions", "list", "--user", "ana", "--all", "--json").stdout
    )
    assert [(r["session_id"], r["active"], r["revoke_reason"]) for r in everything] == [
        (laptop.session_id, True, None),
        (phone.session_id, False, "admin"),
    ]
    table = tenfold("sessions", "list", "--user", "ana", "--all")
    assert "no (admin)" in table.stdout

    nobody = tenfold("sessions", "list", "--user", "nobody")
    assert nobody.exit_code == 0 and "no active sessions for user 'nobody'" in nobody.stdout
    assert orjson.loads(tenfold("sessions", "list", "--user", "nobody", "--json").stdout) == []


# --- revoke --------------------------------------------------------------------------------


def test_revoke_one_session(env: Path) -> None:
    (issued,) = create("cy")
    done = tenfold("sessions", "revoke", issued.session_id)
    assert done.exit_code == 0, done.output
    assert f"revoked session {issued.session_id} of user cy" in done.stdout
    assert "drops its cached copy within" in done.stdout  # embedded: no Redis to tell servers
    assert validate(issued.session_token) is Reason.REVOKED
    again = tenfold("sessions", "revoke", issued.session_id)
    assert again.exit_code == 0 and "had already ended (admin)" in again.stdout
    missing = tenfold("sessions", "revoke", "A" * 22)
    assert missing.exit_code == 1
    assert "tenfold sessions list --user" in one_line(missing.stderr)


def test_revoke_a_users_sessions_keeping_one(env: Path) -> None:
    kept, *others = create("dee", 3)
    (other_user,) = create("eve")
    typo = tenfold("sessions", "revoke", "--user", "dee", "--keep", other_user.session_id)
    assert typo.exit_code == 1
    assert "nothing was revoked" in one_line(typo.stderr)
    assert validate(others[0].session_token) is None

    done = tenfold("sessions", "revoke", "--user", "dee", "--keep", kept.session_id)
    assert done.exit_code == 0, done.output
    assert f"revoked 2 session(s) of user dee, kept {kept.session_id}" in done.stdout
    assert [validate(i.session_token) for i in (kept, *others)] == [
        None,
        Reason.REVOKED,
        Reason.REVOKED,
    ]
    mobile = create("dee", kind=SessionType.MOBILE)[0]
    done = tenfold("sessions", "revoke", "--user", "dee", "--type", "web")
    assert "revoked 1 web session(s) of user dee" in done.stdout
    assert validate(mobile.session_token) is None
    assert validate(other_user.session_token) is None


def test_bulk_revoke_asks_first(env: Path) -> None:
    hours_ago = ManualClock(time.time() - 3 * 3600)
    old_web = create("fay", 2, clock=hours_ago) + create("gus", clock=hours_ago)
    old_mobile = create("fay", kind=SessionType.MOBILE, clock=hours_ago)
    new_web = create("fay")
    cutoff = datetime.fromtimestamp(time.time() - 3600, UTC).isoformat()
    args = ("sessions", "revoke", "--created-before", cutoff, "--type", "web")

    declined = tenfold(*args, input="n\n")
    assert declined.exit_code == 1
    assert "3 active web session(s) created before" in declined.stdout
    assert "aborted; nothing was revoked" in declined.stderr
    assert [ended(i) for i in old_web] == [None, None, None]

    unanswered = tenfold(*args)  # no input at all
    assert unanswered.exit_code == 1 and "--yes skips it" in unanswered.stderr
    assert [ended(i) for i in old_web] == [None, None, None]

    accepted = tenfold(*args, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert "revoked 3 session(s)" in accepted.stdout
    assert [ended(i) for i in old_web] == ["bulk", "bulk", "bulk"]
    assert ended(old_mobile[0]) is None
    assert ended(new_web[0]) is None

    nothing = tenfold(*args)
    assert nothing.exit_code == 0 and "no active web session(s)" in nothing.stdout

    # --yes: no question; --user narrows a bulk revocation
    create("hal", clock=hours_ago)
    done = tenfold("sessions", "revoke", "--created-before", cutoff, "--user", "fay", "--yes")
    assert done.exit_code == 0, done.output
    assert "1 active session(s) of user fay created before" in done.stdout
    assert "revoked 1 session(s)" in done.stdout
    assert ended(old_mobile[0]) == "bulk"
    assert ended(new_web[0]) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "what to revoke?"),
        (("A" * 22, "--user", "u"), "give a SESSION_ID or filters"),
        (("--keep", "x"), "--keep needs --user"),
        (("--created-before", "yesterday"), "not an ISO 8601 time"),
        (("--created-before", "2026-01-01", "--user", "u", "--keep", "x"), "--keep only applies"),
    ],
)
def test_revoke_usage_errors_are_one_line(env: Path, args: tuple[str, ...], message: str) -> None:
    done = tenfold("sessions", "revoke", *args)
    assert done.exit_code == 2
    assert message in one_line(done.stderr)


# --- rotate-keys ---------------------------------------------------------------------------


def test_rotate_reseal_and_retire(env: Path) -> None:
    issued = create("ivy", 5, device=PHONE)
    (first_key,) = aead_keys()
    done = tenfold("sessions", "rotate-keys", "--purpose", "aead", "--batch-size", "2")
    assert done.exit_code == 0, done.output
    second_key = aead_keys()[0]
    assert f"rotated aead: {first_key} -> {second_key}" in done.stdout
    assert f"re-sealed 5 session(s) with {second_key}" in done.stdout
    assert key_ids_in_use() == {second_key: 5}
    assert aead_keys() == [second_key, first_key]  # the old key still decrypts until retired
    assert all(validate(i.session_token) is None for i in issued)

    # no server runs here, so there is no need to wait for servers to reload their key rings
    done = tenfold(
        "sessions", "rotate-keys", "--purpose", "aead", "--retire-old", "--settle-seconds", "0"
    )
    assert done.exit_code == 0, done.output
    (third_key,) = aead_keys()
    assert f"rotated aead: {second_key} -> {third_key}" in done.stdout
    assert f"retired aead key {second_key}" in done.stdout
    assert f"retired aead key {first_key}" in done.stdout
    assert aead_keys(include_retired=True) == [third_key, second_key, first_key]
    # the data is readable with the new key alone
    rows = orjson.loads(tenfold("sessions", "list", "--user", "ivy", "--json").stdout)
    assert {r["ip"] for r in rows} == {PHONE.ip} and len(rows) == 5


def test_rotate_all_purposes(env: Path) -> None:
    create("jo")
    done = tenfold("sessions", "rotate-keys")
    assert done.exit_code == 0, done.output
    for purpose in ("aead", "hmac", "jwt"):
        assert f"rotated {purpose}: " in done.stdout
    assert "re-sealed 1 session(s)" in done.stdout
    again = tenfold("sessions", "rotate-keys", "--purpose", "jwt")
    assert "rotated jwt" in again.stdout and "every session is sealed with" in again.stdout
    # retiring right after a rotation first waits for servers to reload (here 0.3 s)
    started = time.monotonic()
    retired = tenfold(
        "sessions", "rotate-keys", "--purpose", "aead", "--retire-old", "--settle-seconds", "0.3"
    )
    assert retired.exit_code == 0, retired.output
    assert time.monotonic() - started >= 0.3
    assert retired.stdout.count("retired aead key") == 2


def test_an_interrupted_reseal_continues(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    create("kim", 7)
    original = SqlSessionStore.reseal
    calls = 0

    async def flaky(self: SqlSessionStore, *args: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise OSError("connection reset")
        return await original(self, *args)

    monkeypatch.setattr(SqlSessionStore, "reseal", flaky)
    broken = tenfold("sessions", "rotate-keys", "--purpose", "aead", "--batch-size", "2")
    assert broken.exit_code == 1
    assert "connection reset" in one_line(broken.stderr)
    new_key = aead_keys()[0]
    assert key_ids_in_use()[new_key] == 3

    monkeypatch.setattr(SqlSessionStore, "reseal", original)
    resumed = tenfold("sessions", "rotate-keys", "--purpose", "aead")
    assert resumed.exit_code == 0, resumed.output
    assert "4 session(s) still sealed with older keys" in resumed.stdout
    assert "rotated aead" not in resumed.stdout
    assert f"re-sealed 4 session(s) with {new_key}" in resumed.stdout
    assert key_ids_in_use() == {new_key: 7}

    forced = tenfold("sessions", "rotate-keys", "--purpose", "aead", "--force-rotate")
    assert forced.exit_code == 0 and "rotated aead" in forced.stdout


def test_unreadable_sessions_block_retiring(env: Path) -> None:
    good, bad = create("lu", 2)
    old_key = aead_keys()[0]

    async def tamper(service: SessionService) -> None:
        async with service.store.engine.begin() as conn:
            await conn.execute(
                sessions.update()
                .where(sessions.c.session_id == bad.session_id)
                .values(sealed=b"\x00" * 40)
            )

    with_service(tamper)
    done = tenfold("sessions", "rotate-keys", "--purpose", "aead", "--retire-old")
    assert done.exit_code == 1
    assert "re-sealed 1 session(s)" in done.stdout
    line = one_line(done.stderr)
    assert (
        f"1 session(s) could not be decrypted and keep their old key (first: {bad.session_id}"
        in line
    )
    assert "TENFOLD_SECRET_KEY" in line
    assert "retired" not in done.stdout
    assert old_key in aead_keys()  # not retired
    assert validate(good.session_token) is None


# --- set-up errors -------------------------------------------------------------------------


def test_an_unmigrated_database_says_so(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_DATABASE_URL", f"sqlite:///{env / 'empty.sqlite'}")
    done = tenfold("sessions", "list", "--user", "u")
    assert done.exit_code == 1
    assert "run `tenfold migrate`" in one_line(done.stderr)


def test_scale_out_without_a_master_key_says_so(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    monkeypatch.delenv("TENFOLD_SECRET_KEY", raising=False)
    done = tenfold("sessions", "rotate-keys")
    assert done.exit_code == 2
    assert "TENFOLD_SECRET_KEY" in one_line(done.stderr)
