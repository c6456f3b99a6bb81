"""`tenfold sessions ...`: list a user's sessions, revoke, rotate keys; straight on the database.

No server is needed. A revocation reaches running servers at once through Redis in scale-out;
in embedded mode a running `tenfold serve` drops its cached copy within its local TTL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tenfold.kernel.commands import CliError, fail, run_command
from tenfold.sessions.models import SessionType

if TYPE_CHECKING:
    from tenfold.kernel.crypto import KeyRing, Purpose
    from tenfold.kernel.runtime import Runtime
    from tenfold.sessions.client import UserSession
    from tenfold.sessions.service import SessionService
    from tenfold.sessions.stores.sql import SqlSessionStore

T = TypeVar("T")

app = typer.Typer(
    help="Sessions: list a user's sessions, revoke them, rotate the encryption keys.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

ACTOR = "cli"  # recorded in the sessions' audit events
REVOKE_CHUNK = 1_000  # sessions per revocation round trip in bulk
MAX_UNREADABLE = 10_000  # sessions that cannot be decrypted before rotate-keys gives up
SETTLE_MARGIN_SECONDS = 5.0


def _with_service(job: Callable[[SessionService], Awaitable[T]]) -> T:
    """Run `job` with this settings' SessionService (its key ring open), then close it all."""
    from tenfold.kernel.crypto import CryptoError
    from tenfold.sessions.api import open_ring, service_for
    from tenfold.sessions.models import SessionError

    async def run(runtime: Runtime) -> T:
        service = service_for(runtime)
        service.ring = await open_ring(runtime)
        try:
            return await job(service)
        finally:
            await service.stop()

    def explain(exc: Exception) -> tuple[str, int] | None:
        if isinstance(exc, SessionError):
            return f"{exc.field}: {exc.message}", 2
        if isinstance(exc, CryptoError):
            return f"key ring: {exc}", 1
        return None

    return run_command(run, explain)


def _when(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _show(ms: int) -> str:
    return _when(ms).strftime("%Y-%m-%d %H:%M:%S")


def _cache_note(service: SessionService) -> str:
    if service.kv is not None:
        return ""
    seconds = service.config.local_ttl_ms / 1000
    return f" (a running embedded server drops its cached copy within {seconds:g} s)"


# --- list ----------------------------------------------------------------------------------


@app.command("list")
def list_sessions(
    user: Annotated[str, typer.Option("--user", help="The user whose sessions to list")],
    all_: Annotated[bool, typer.Option("--all", help="Include ended sessions")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """List a user's sessions and devices, newest first (active ones unless --all)."""
    from tenfold.sessions.client import SessionClient

    async def job(service: SessionService) -> list[UserSession]:
        return await SessionClient.in_process(service).sessions_of(user, include_ended=all_)

    found = _with_service(job)
    if as_json:
        import orjson

        rows = [
            {
                "session_id": s.session_id,
                "session_type": str(s.session_type),
                "ip": s.ip,
                "user_agent": s.user_agent,
                "location": s.location,
                "created_at": _when(s.created_at_ms),
                "last_seen_at": _when(s.last_seen_at_ms),
                "expires_at": _when(s.expires_at_ms),
                "remember_me": s.remember_me,
                "active": s.active,
                "revoke_reason": s.revoke_reason,
            }
            for s in found
        ]
        typer.echo(orjson.dumps(rows, option=orjson.OPT_UTC_Z | orjson.OPT_INDENT_2).decode())
        return
    if not found:
        console.print(f"no {'' if all_ else 'active '}sessions for user {user!r}", highlight=False)
        return
    table = Table(title=f"sessions of {user}")
    table.add_column("session id", no_wrap=True)
    for name in ("type", "ip", "user agent", "created", "last seen", "expires", "active"):
        table.add_column(name, overflow="fold")
    for s in found:
        state = "[green]yes[/]" if s.active else f"no ({s.revoke_reason or 'expired'})"
        table.add_row(
            s.session_id,
            str(s.session_type),
            s.ip,
            s.user_agent,
            _show(s.created_at_ms),
            _show(s.last_seen_at_ms),
            _show(s.expires_at_ms),
            state,
        )
    console.print(table)


# --- revoke --------------------------------------------------------------------------------


def _instant(text: str) -> int:
    """An ISO 8601 time (UTC unless it says otherwise) in ms since the epoch."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise fail(
            f"--created-before: {text!r} is not an ISO 8601 time; e.g. 2026-01-31 or "
            "2026-01-31T12:00:00Z",
            2,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@app.command()
def revoke(
    session_id: Annotated[str | None, typer.Argument(help="The session to end")] = None,
    user: Annotated[str | None, typer.Option("--user", help="End this user's sessions")] = None,
    keep: Annotated[
        str | None, typer.Option("--keep", help="With --user: leave this session active")
    ] = None,
    created_before: Annotated[
        str | None,
        typer.Option("--created-before", help="End sessions created before this ISO 8601 time"),
    ] = None,
    session_type: Annotated[
        SessionType | None, typer.Option("--type", help="Only sessions of this type")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """End one session (SESSION_ID), a user's sessions (--user [--keep ID] [--type]), or many at
    once (--created-before and/or --type, optionally with --user; asks first)."""
    before_ms = _instant(created_before) if created_before is not None else None
    if session_id is not None:
        if user is not None or keep is not None or before_ms is not None or session_type:
            raise fail("give a SESSION_ID or filters (--user, --created-before, --type)", 2)
        _revoke_one(session_id)
    elif user is not None and before_ms is None:
        _revoke_user(user, keep, session_type)
    elif before_ms is not None or session_type is not None:
        if keep is not None:
            raise fail("--keep only applies with --user alone (no --created-before)", 2)
        _revoke_bulk(user, before_ms, session_type, yes)
    else:
        if keep is not None:
            raise fail("--keep needs --user", 2)
        raise fail(
            "what to revoke? give a SESSION_ID, --user USER, or --created-before/--type; "
            "see `tenfold sessions revoke --help`",
            2,
        )


def _revoke_one(session_id: str) -> None:
    async def job(service: SessionService) -> tuple[bool, str]:
        record = await service.get(session_id)
        if record is None:
            raise CliError(
                f"no session {session_id!r}; find ids with `tenfold sessions list --user USER`"
            )
        if record.revoked_at_ms is not None:
            return False, f"session {session_id} had already ended ({record.revoke_reason})"
        await service.revoke(session_id, reason="admin", actor=ACTOR)
        return True, f"revoked session {session_id} of user {record.user_id}{_cache_note(service)}"

    _, message = _with_service(job)
    console.print(message, highlight=False)


def _revoke_user(user: str, keep: str | None, session_type: SessionType | None) -> None:
    async def job(service: SessionService) -> tuple[list[str], str]:
        if keep is not None:
            kept = await service.get(keep)
            if kept is None or kept.user_id != user or not kept.active(service.clock.now_ms()):
                raise CliError(
                    f"--keep {keep!r} is not an active session of user {user!r}; nothing was "
                    "revoked (see `tenfold sessions list --user USER`)"
                )
        ended = await service.revoke_user(
            user, keep=keep, session_type=session_type, actor=ACTOR, reason="admin"
        )
        return ended, _cache_note(service) if ended else ""

    ended, note = _with_service(job)
    kind = f"{session_type} " if session_type else ""
    kept = f", kept {keep}" if keep else ""
    console.print(
        f"revoked {len(ended)} {kind}session(s) of user {user}{kept}{note}", highlight=False
    )


def _confirm(question: str) -> bool:
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:  # end of input: no terminal to ask
        raise CliError("no answer to the question; nothing was revoked (--yes skips it)") from None


def _revoke_bulk(
    user: str | None, before_ms: int | None, session_type: SessionType | None, yes: bool
) -> None:
    from rich.progress import Progress

    what = " ".join(
        part
        for part in (
            f"active {session_type} session(s)" if session_type else "active session(s)",
            f"of user {user}" if user else "",
            f"created before {_when(before_ms).isoformat()}" if before_ms is not None else "",
        )
        if part
    )

    async def job(service: SessionService) -> tuple[int, int, str]:
        now = service.clock.now_ms()
        ids = await service.store.active_ids(
            now_ms=now,
            user_ids=[user] if user is not None else None,
            # sessions created while this runs are not among those counted and confirmed
            created_before_ms=min(before_ms, now + 1) if before_ms is not None else now + 1,
            session_type=session_type,
            limit=2**62,
        )
        if not ids:
            return 0, 0, ""
        console.print(f"{len(ids)} {what}", highlight=False)
        if not yes and not _confirm(f"Revoke these {len(ids)} session(s)?"):
            raise CliError("aborted; nothing was revoked")
        ended = 0
        with Progress(console=console) as progress:
            bar = progress.add_task("revoking", total=len(ids))
            for start in range(0, len(ids), REVOKE_CHUNK):
                chunk = ids[start : start + REVOKE_CHUNK]
                ended += len(await service.revoke_many(chunk, reason="bulk", actor=ACTOR))
                progress.advance(bar, len(chunk))
        return len(ids), ended, _cache_note(service)

    counted, ended, note = _with_service(job)
    if not counted:
        console.print(f"no {what}", highlight=False)
        return
    gone = f" ({counted - ended} had ended meanwhile)" if ended < counted else ""
    console.print(f"revoked {ended} session(s){gone}{note}", highlight=False)


# --- rotate-keys ---------------------------------------------------------------------------


class KeyPurpose(StrEnum):
    AEAD = "aead"  # seals session data and device details at rest
    HMAC = "hmac"  # derives refresh tokens, hashes device attributes
    JWT = "jwt"  # signs access tokens
    ALL = "all"


PURPOSES: dict[KeyPurpose, Purpose] = {
    KeyPurpose.AEAD: "aead",
    KeyPurpose.HMAC: "hmac",
    KeyPurpose.JWT: "jwt",
}


@dataclass
class Resealed:
    key_id: str
    done: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # session id -> why


async def _reseal(store: SqlSessionStore, ring: KeyRing, batch_size: int) -> Resealed:
    """Seal every session that another AEAD key sealed with the primary, batch by batch.

    Interrupted, it loses at most the batch in flight: what it did is committed row by row and
    a new run starts from what is left (sessions whose `key_id` is not the primary)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tenfold.kernel.crypto import CryptoError

    primary = ring.key_ids("aead")[0]
    out = Resealed(primary)
    total = await store.count_sealed_with_other_keys(primary)
    if not total:
        return out
    reloaded = False
    columns = (TextColumn("re-sealing"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("re-sealing", total=total)
        while len(out.unreadable) <= MAX_UNREADABLE:
            # Sessions that cannot be read stay behind; ask past them.
            batch = await store.sealed_with_other_keys(primary, batch_size + len(out.unreadable))
            todo = [r for r in batch if r.session_id not in out.unreadable]
            if not todo:
                break
            for record in todo:
                aad = record.session_id.encode()
                try:
                    plain = ring.decrypt(record.key_id, record.sealed, aad)
                except CryptoError as exc:
                    if not reloaded and record.key_id not in ring.key_ids(
                        "aead", include_retired=True
                    ):
                        reloaded = True  # a key added by another process since we opened
                        await ring.reload()
                        if ring.key_ids("aead")[0] != primary:
                            raise CliError(
                                "another process rotated the aead key meanwhile; run "
                                "`tenfold sessions rotate-keys --purpose aead` again to re-seal "
                                "to the newest key"
                            ) from None
                        break
                    out.unreadable[record.session_id] = str(exc)
                    progress.advance(bar)
                    continue
                key_id, sealed = ring.encrypt(plain, aad)
                if await store.reseal(record.session_id, key_id, sealed, record.key_id):
                    out.done += 1
                progress.advance(bar)
            progress.update(bar, total=max(total, out.done + len(out.unreadable)))
    return out


async def _activated_at(store: SqlSessionStore, key_id: str) -> datetime:
    import sqlalchemy as sa

    from tenfold.kernel.crypto import crypto_keys

    async with store.engine.connect() as conn:
        value = (
            await conn.execute(
                sa.select(crypto_keys.c.activated_at).where(crypto_keys.c.key_id == key_id)
            )
        ).scalar_one()
    moment: datetime = value if value.tzinfo else value.replace(tzinfo=UTC)
    return moment


@app.command("rotate-keys")
def rotate_keys(
    purpose: Annotated[
        KeyPurpose, typer.Option(help="Which keys to rotate (all: aead, hmac and jwt)")
    ] = KeyPurpose.ALL,
    retire_old: Annotated[
        bool,
        typer.Option("--retire-old", help="Then retire older aead keys, once no session uses them"),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            envvar="TENFOLD_SESSIONS_RESEAL_BATCH",
            min=1,
            max=10_000,
            help="Sessions read per re-seal batch",
        ),
    ] = 500,
    force_rotate: Annotated[
        bool,
        typer.Option(
            "--force-rotate",
            help="Rotate the aead key even when an earlier re-seal is unfinished",
        ),
    ] = False,
    settle_seconds: Annotated[
        float | None,
        typer.Option(
            envvar="TENFOLD_SESSIONS_SETTLE_SECONDS",
            min=0,
            help="With --retire-old: how long after a rotation to wait before retiring, so "
            "running servers have loaded the new key (default: their reload period + 5 s)",
        ),
    ] = None,
) -> None:
    """Rotate the key ring, then re-seal every session with the new aead key.

    Resumable: run it again after an interruption and it finishes the re-seal (without
    rotating the aead key again, unless --force-rotate). Older keys keep working until
    retired; running servers pick up new keys within 30 s."""
    from tenfold.sessions.api import KEYRING_RELOAD_SECONDS

    settle = KEYRING_RELOAD_SECONDS + SETTLE_MARGIN_SECONDS
    if settle_seconds is not None:
        settle = settle_seconds
    purposes: list[Purpose] = (
        ["aead", "hmac", "jwt"] if purpose is KeyPurpose.ALL else [PURPOSES[purpose]]
    )

    async def job(service: SessionService) -> int:
        from tenfold.kernel.crypto import KeyRing

        ring = service.ring
        assert isinstance(ring, KeyRing)
        store = service.store
        primary = ring.key_ids("aead")[0]
        pending = await store.count_sealed_with_other_keys(primary)
        for p in purposes:
            if p == "aead" and pending and not force_rotate:
                console.print(
                    f"aead: {pending} session(s) still sealed with older keys; finishing the "
                    f"re-seal to {primary} (not rotating again: --force-rotate would)",
                    highlight=False,
                )
                continue
            old = ring.key_ids(p)[0]
            new = await ring.rotate(p)
            console.print(f"rotated {p}: {old} -> {new}", highlight=False)
        done = await _reseal(store, ring, batch_size)
        _report(done)
        if done.unreadable:
            return 1
        if retire_old:
            return await _retire(service, ring, batch_size, settle)
        return 0

    if _with_service(job):
        raise typer.Exit(1)


def _report(done: Resealed) -> None:
    if done.done:
        console.print(f"re-sealed {done.done} session(s) with {done.key_id}", highlight=False)
    elif not done.unreadable:
        console.print(f"every session is sealed with {done.key_id}", highlight=False)
    if done.unreadable:
        first, why = next(iter(done.unreadable.items()))
        err.print(
            f"[red]error:[/] {len(done.unreadable)} session(s) could not be decrypted and keep "
            f"their old key (first: {first}: {why}); older keys cannot be retired while they "
            "do: check that the master key (TENFOLD_SECRET_KEY, or <data dir>/secret.key) is the "
            "one that sealed the keys, then run this again",
            highlight=False,
            soft_wrap=True,
        )


async def _retire(service: SessionService, ring: KeyRing, batch_size: int, settle: float) -> int:
    primary = ring.key_ids("aead")[0]
    older = ring.key_ids("aead")[1:]
    if not older:
        console.print("no older aead key to retire", highlight=False)
        return 0
    age = (datetime.now(UTC) - await _activated_at(service.store, primary)).total_seconds()
    if age < settle:
        # A server that has not reloaded yet still seals new sessions with an older key.
        with console.status(
            f"waiting {settle - age:.0f} s for running servers to load {primary} before "
            "retiring older keys"
        ):
            await asyncio.sleep(settle - age)
        done = await _reseal(service.store, ring, batch_size)
        if done.done or done.unreadable:
            _report(done)
        if done.unreadable:
            return 1
    left = await service.store.count_sealed_with_other_keys(primary)
    if left:
        err.print(
            f"[red]error:[/] not retiring: {left} session(s) are still sealed with older keys "
            "(servers created them meanwhile); run `tenfold sessions rotate-keys --purpose aead "
            "--retire-old` again",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    for key_id in older:
        await ring.retire(key_id)
        console.print(f"retired aead key {key_id}", highlight=False)
    return 0
