"""`tenfold ratelimit ...`: manage policies and try checks from the shell."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tenfold.kernel.commands import run_command
from tenfold.kernel.http import Problem

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Runtime

T = TypeVar("T")

app = typer.Typer(help="Rate limiter: policies, assignments, checks.", no_args_is_help=True)
policies_app = typer.Typer(help="Create, list and assign policies.", no_args_is_help=True)
app.add_typer(policies_app, name="policies")
console = Console()


def _explain(exc: Exception) -> tuple[str, int] | None:
    return (exc.detail, 2) if isinstance(exc, Problem) else None


def _with_service(job: Callable[[Any, Any, Any], Awaitable[T]]) -> T:
    """Run `job(runtime, service, store)` with the policies loaded; tell every process after."""

    async def run(runtime: Runtime) -> T:
        from tenfold.ratelimit.api import service_for
        from tenfold.ratelimit.service import POLICY_CHANNEL
        from tenfold.ratelimit.stores.sql import SqlPolicyStore

        service = service_for(runtime)
        try:
            await service.reload()
            result = await job(runtime, service, SqlPolicyStore(runtime.engine))
            await runtime.kv.publish(POLICY_CHANNEL, b"cli")
            return result
        finally:
            await service.counters.aclose()

    return run_command(run, _explain)


@policies_app.command("list")
def list_policies() -> None:
    """List every policy."""

    async def job(_runtime: Any, service: Any, _store: Any) -> list[Any]:
        return sorted(service.book.by_id.values(), key=lambda p: p.policy_id)

    table = Table("id", "name", "algorithm", "rate", "window s", "burst", "key by", "flags")
    for p in _with_service(job):
        flags = " ".join(
            f
            for f, on in (("all", p.applies_to_all), ("shadow", p.shadow), ("off", not p.is_active))
            if on
        )
        tier = f"tier={p.tier}" if p.tier else ""
        table.add_row(
            str(p.policy_id),
            p.name,
            str(p.algorithm),
            str(p.rate_limit),
            str(p.time_window),
            str(p.burst_capacity),
            ",".join(p.key_by),
            f"{flags} {tier}".strip(),
        )
    console.print(table)


@policies_app.command("create")
def create_policy(
    name: Annotated[str, typer.Option(help="Unique name")],
    algorithm: Annotated[str, typer.Option(help="token_bucket, gcra, fixed_window, ...")],
    rate: Annotated[int, typer.Option(help="Requests per window")],
    window: Annotated[int, typer.Option(help="Window in seconds (1..86400)")],
    burst: Annotated[int | None, typer.Option(help="Bucket capacity (>= rate)")] = None,
    key_by: Annotated[str, typer.Option(help="Comma-separated dimensions")] = "client_id",
    resource: Annotated[str | None, typer.Option(help="Resource glob")] = None,
    tier: Annotated[str | None, typer.Option(help="Tier (policy group)")] = None,
    all_clients: Annotated[bool, typer.Option("--all-clients", help="Apply to everyone")] = False,
    shadow: Annotated[bool, typer.Option(help="Decide and count, never deny")] = False,
) -> None:
    """Create a policy."""
    from tenfold.ratelimit.api import build_policy

    data = {
        "name": name,
        "algorithm": algorithm,
        "rate_limit": rate,
        "time_window": window,
        "burst_capacity": burst,
        "key_by": [d for d in key_by.split(",") if d],
        "match_resource": resource,
        "tier": tier,
        "applies_to_all": all_clients,
        "shadow": shadow,
    }

    async def job(_runtime: Any, service: Any, store: Any) -> Any:
        policy = build_policy(data)
        if await store.name_taken(name):
            raise Problem(409, "policy-name-taken", f"a policy named {name!r} exists")
        return await store.create(policy, datetime.fromtimestamp(service.clock.now(), UTC))

    created = _with_service(job)
    console.print(f"created policy {created.policy_id} ({created.name})")


@policies_app.command("assign")
def assign(
    policy_id: int,
    client_ids: Annotated[list[str], typer.Argument(help="Clients to assign")],
    override: Annotated[int | None, typer.Option(help="Override the rate")] = None,
    priority: Annotated[int, typer.Option(help="Higher wins")] = 1,
) -> None:
    """Assign a policy to clients."""
    from tenfold.ratelimit.models import Assignment

    async def job(_runtime: Any, _service: Any, store: Any) -> int:
        if await store.get(policy_id) is None:
            raise Problem(404, "policy-not-found", f"policy {policy_id} does not exist")
        rows = [Assignment(c, policy_id, override, priority) for c in client_ids]
        await store.assign(rows)
        return len(rows)

    console.print(f"assigned policy {policy_id} to {_with_service(job)} client(s)")


@app.command("check")
def check(
    client_id: str,
    resource: Annotated[str, typer.Option(help="Resource")] = "",
    api_key: Annotated[str, typer.Option(help="API key being limited")] = "",
    weight: Annotated[int, typer.Option(help="Request weight")] = 1,
) -> None:
    """Run one check (it consumes quota) and print the decision.

    Counters are shared with running servers through Redis; without TENFOLD_REDIS_URL they
    live only for this command, which still shows which policies apply."""
    from tenfold.ratelimit.models import CheckContext

    async def job(_runtime: Any, service: Any, _store: Any) -> Any:
        try:
            return await service.check(CheckContext(client_id, api_key, resource), weight)
        except ValueError as exc:
            raise Problem(422, "validation-error", str(exc)) from None

    result = _with_service(job)
    d = result.deciding
    verdict = "[green]allowed[/]" if result.allowed else "[red]denied[/]"
    if d is None:
        console.print(f"{verdict} (no policy applies)")
        return
    console.print(
        f"{verdict} by {d.policy.name}: remaining {d.decision.remaining}/{d.decision.limit}, "
        f"retry after {d.decision.retry_ms / 1000:g} s"
    )
    if not result.allowed:
        raise typer.Exit(1)
