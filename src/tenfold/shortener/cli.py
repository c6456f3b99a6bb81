"""`tenfold shortener ...`: create links, list them, read their stats, import a CSV.

Straight on the database by default, as the other services' commands are: links made this way
belong to the owner `cli`, and the commands act with admin rights. With `--url` (or
`TENFOLD_URL`) they call a running server instead, with `--api-key` (or `TENFOLD_API_KEY`), as
that key. In embedded mode the click analytics are a DuckDB file only one process may open:
while `tenfold serve` runs, `stats` must go through it (`--url`).
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tenfold.kernel.commands import CliError, fail, run_command

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Runtime
    from tenfold.shortener.client import ShortenerClient

T = TypeVar("T")

app = typer.Typer(
    help="URL shortener: create links, list them, read their click stats, import a CSV.",
    no_args_is_help=True,
)
console = Console()

OWNER = "cli"  # who owns the links created on the local database
CHUNK = 1_000  # rows per bulk call (the API's limit)
LOOKUPS = 16  # existing aliases checked at once on a re-run
CSV_COLUMNS = ("url", "custom_alias", "expires_at", "description")
TOP = 5  # rows per "top" table of `stats`
TIMELINE = 14  # periods `stats` draws

ServerUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="TENFOLD_URL",
        help="A running tenfold server (e.g. http://127.0.0.1:8000); without it, the local "
        "database",
        show_default=False,
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="TENFOLD_API_KEY",
        help="With --url: an API key holding shortener:write (or :read for list and stats)",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text")]


def _client_message(exc: Exception, url: str | None) -> tuple[str, int]:
    from tenfold.shortener.client import ShortenerClientError

    assert isinstance(exc, ShortenerClientError)
    if exc.status is None:
        return f"cannot reach the server: {exc.detail}", 1
    if exc.status == 401:
        return f"{url}: the API key was refused ({exc.detail}); check --api-key", 1
    if exc.kind == "not-found":
        return f"{url} answered 404 for the shortener API: is the shortener served there?", 1
    fields = "; ".join(
        f"{e.get('field')}: {e.get('message')}" for e in exc.errors[1:] if e.get("field")
    )
    return exc.detail + (f"; {fields}" if fields else ""), 2 if exc.status == 422 else 1


def _with_client(
    job: Callable[[ShortenerClient], Awaitable[T]],
    url: str | None,
    api_key: str | None,
    *,
    analytics: bool = False,
) -> T:
    """Run `job` with a client: over HTTP with --url, else on this settings' database."""
    from tenfold.shortener.client import ShortenerClientError

    if url:
        if not api_key:
            raise fail(
                "--url needs an API key: --api-key KEY or TENFOLD_API_KEY (create one with "
                "`tenfold keys create --name cli --scope shortener:write`)",
                2,
            )
        try:
            return asyncio.run(_over_http(job, url, api_key))
        except ShortenerClientError as exc:
            message, code = _client_message(exc, url)
        except CliError as exc:
            message, code = str(exc), exc.code
        raise fail(message, code)
    return _locally(job, analytics=analytics)


async def _over_http(job: Callable[[ShortenerClient], Awaitable[T]], url: str, key: str) -> T:
    from tenfold.shortener.client import ShortenerClient

    async with ShortenerClient.over_http(url, key) as client:
        return await job(client)


def _locally(job: Callable[[ShortenerClient], Awaitable[T]], *, analytics: bool) -> T:
    from sqlalchemy.exc import DBAPIError

    from tenfold.kernel.analytics import DuckDBStore
    from tenfold.kernel.auth import Principal
    from tenfold.kernel.errors import TenfoldError
    from tenfold.shortener.api import recorder_for, service_for
    from tenfold.shortener.client import ShortenerClient, ShortenerClientError

    principal = Principal(OWNER, "tenfold shortener CLI", frozenset({"shortener:admin"}), OWNER)
    duckdb: DuckDBStore | None = None

    async def run(runtime: Runtime) -> T:
        nonlocal duckdb
        service = service_for(runtime)
        # Only `stats` opens the analytics store (embedded: a file one process may open).
        recorder: Any = recorder_for(runtime, in_process=True) if analytics else None
        service.recorder = recorder
        try:
            if recorder is not None:
                if isinstance(recorder.store, DuckDBStore):
                    duckdb = recorder.store
                await recorder.start()  # its tables, in case no server has made them yet
            return await job(ShortenerClient.in_process(service, principal))
        finally:
            if recorder is not None:
                await recorder.close()

    def explain(exc: Exception) -> tuple[str, int] | None:
        if isinstance(exc, ShortenerClientError):
            if exc.status == 503 and duckdb is not None:
                return _duckdb_busy(duckdb, exc.detail), 1
            return _client_message(exc, None)
        if isinstance(exc, DBAPIError | OSError | TenfoldError):
            if duckdb is not None and "duckdb" in str(exc).lower():
                return _duckdb_busy(duckdb, str(exc)), 1
        return None

    return run_command(run, explain)


def _duckdb_busy(store: Any, detail: str) -> str:
    reason = detail.splitlines()[0]
    return (
        f"cannot open the analytics store {store.path} ({reason}); in embedded mode only one "
        "process may open it, so while `tenfold serve` runs ask the server: --url "
        "http://HOST:PORT --api-key KEY (or TENFOLD_URL and TENFOLD_API_KEY)"
    )


def _instant(text: str, option: str) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise); a date alone is its midnight UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"{option}: {text!r} is not an ISO 8601 time; e.g. 2026-01-31 or 2026-01-31T12:00:00Z",
            2,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _day(text: str | None, option: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise fail(f"{option}: {text!r} is not a date; e.g. 2026-01-31", 2) from None


def _show(value: str | None) -> str:
    return value.replace("T", " ")[:16] if value else ""


def _print_json(value: Any) -> None:
    import orjson

    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


# --- create --------------------------------------------------------------------------------


@app.command()
def create(
    url: Annotated[str, typer.Argument(help="The long URL (http or https)")],
    alias: Annotated[
        str | None, typer.Option("--alias", help="A custom short code (3-20 letters, digits, -_)")
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="When the link stops working (ISO 8601, UTC by default)"),
    ] = None,
    description: Annotated[str, typer.Option("--description", help="A note for yourself")] = "",
    domain: Annotated[
        str | None, typer.Option("--domain", help="A verified branded domain of yours")
    ] = None,
    server: ServerUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Shorten one URL; prints the short URL."""
    try:
        expires_at = _instant(expires, "--expires") if expires is not None else None
    except CliError as exc:
        raise fail(str(exc), exc.code) from None

    async def job(client: ShortenerClient) -> dict[str, Any]:
        return await client.shorten(
            url, custom_alias=alias, expires_at=expires_at, description=description, domain=domain
        )

    link = _with_client(job, server, api_key)
    if as_json:
        _print_json(link)
        return
    typer.echo(link["short_url"])


# --- list ----------------------------------------------------------------------------------


class SortBy(StrEnum):
    CREATED = "created"
    CLICKS = "clicks"


@app.command("list")
def list_links(
    search: Annotated[
        str, typer.Option("--search", help="Only links whose URL, code or note holds this")
    ] = "",
    sort: Annotated[SortBy, typer.Option("--sort", help="Newest or most clicked first")] = (
        SortBy.CREATED
    ),
    limit: Annotated[int, typer.Option("--limit", min=1, max=200, help="Links to show")] = 50,
    all_: Annotated[bool, typer.Option("--all", help="Every link, page after page")] = False,
    owner: Annotated[
        str | None, typer.Option("--owner", help="Another owner's links (admins)")
    ] = None,
    server: ServerUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List your links (the local database: those of owner `cli`, or --owner's)."""

    async def job(client: ShortenerClient) -> tuple[list[dict[str, Any]], bool]:
        if all_:
            found = [link async for link in client.iterate(sort.value, "desc", search, owner=owner)]
            return found, False
        page = await client.list(limit, None, sort.value, "desc", search, owner=owner)
        return page["items"], bool(page["next_cursor"])

    links, more = _with_client(job, server, api_key)
    if as_json:
        _print_json(links)
        return
    if not links:
        console.print("no links" + (f" matching {search!r}" if search else ""), highlight=False)
        return
    table = Table()
    table.add_column("code", no_wrap=True)
    table.add_column("short url", no_wrap=True)
    table.add_column("long url", overflow="fold", max_width=60)
    table.add_column("clicks", justify="right")
    for name in ("created", "expires", "state", "description"):
        table.add_column(name, overflow="fold")
    for link in links:
        state = "active" if link["is_active"] else "[yellow]off[/]"
        if link.get("blocked_reason"):
            state = f"[red]blocked[/] ({link['blocked_reason']})"
        table.add_row(
            link["short_code"],
            link["short_url"],
            link["long_url"],
            str(link["click_count"]),
            _show(link["created_at"]),
            _show(link["expires_at"]),
            state,
            link["description"],
        )
    console.print(table)
    if more:
        console.print(f"first {limit} shown; --all lists every link", highlight=False)


# --- stats ---------------------------------------------------------------------------------


class Granularity(StrEnum):
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"


def _top(label: str, counts: dict[str, int]) -> Table:
    plural = label[:-1] + "ies" if label.endswith("y") else label + "s"
    table = Table(title=f"top {plural}", title_justify="left", show_edge=False)
    table.add_column(label, overflow="fold")
    table.add_column("clicks", justify="right")
    for name, clicks in list(counts.items())[:TOP]:
        table.add_row(name, str(clicks))
    if not counts:
        table.add_row("[dim]none yet[/]", "")
    return table


@app.command()
def stats(
    code: Annotated[str, typer.Argument(help="The link's short code")],
    start: Annotated[
        str | None, typer.Option("--start", help="First UTC day (YYYY-MM-DD)", show_default=False)
    ] = None,
    end: Annotated[
        str | None, typer.Option("--end", help="Last UTC day (YYYY-MM-DD)", show_default=False)
    ] = None,
    granularity: Annotated[
        Granularity, typer.Option("--granularity", help="Timeline periods")
    ] = Granularity.DAY,
    domain: Annotated[
        str | None, typer.Option("--domain", help="The link's branded domain")
    ] = None,
    server: ServerUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """A link's click stats: totals, top countries, devices, browsers, referrers, a timeline."""
    first, last = _day(start, "--start"), _day(end, "--end")

    async def job(client: ShortenerClient) -> dict[str, Any]:
        return await client.analytics(code, first, last, granularity.value, domain=domain)

    report = _with_client(job, server, api_key, analytics=True)
    if as_json:
        _print_json(report)
        return
    span = f"{report.get('start') or 'first click'} .. {report.get('end') or 'now'}"
    console.print(
        f"[bold]{code}[/]  {span}: {report['total_clicks']} clicks, "
        f"{report['unique_clicks']} unique, {report['bot_clicks']} from bots",
        highlight=False,
    )
    geo = report.get("geographic_distribution", {})
    devices = report.get("device_breakdown", {})
    grid = Table.grid(padding=(0, 4))
    grid.add_row(
        _top("country", geo.get("countries", {})),
        _top("device", devices.get("devices", {})),
    )
    grid.add_row(
        _top("browser", devices.get("browsers", {})),
        _top("referrer", report.get("referrer_stats", {})),
    )
    console.print(grid)
    timeline = report.get("click_timeline", [])[-TIMELINE:]
    if timeline:
        most = max(p["clicks"] for p in timeline) or 1
        chart = Table(title=f"clicks per {granularity.value}", title_justify="left", box=None)
        chart.add_column("period", no_wrap=True)
        chart.add_column("clicks", justify="right")
        chart.add_column("", no_wrap=True)
        for point in timeline:
            bar = "█" * max(1, round(30 * point["clicks"] / most)) if point["clicks"] else ""
            chart.add_row(point["period"], str(point["clicks"]), f"[cyan]{bar}[/]")
        console.print(chart)


# --- import --------------------------------------------------------------------------------


@dataclass
class Row:
    line: int  # in the file, the header being line 1
    raw: dict[str, str]  # the row as read, every column
    item: dict[str, Any] = field(default_factory=dict)  # what goes to the API
    problem: tuple[str, str] | None = None  # (reason, detail) found before sending


@dataclass
class Imported:
    created: int = 0
    existed: int = 0
    failed: list[tuple[Row, str, str]] = field(default_factory=list)  # row, reason, detail


def _read_csv(path: Path) -> tuple[list[str], list[Row]]:
    """The header and rows of an import file, or CliError (exit 2) when it cannot be used."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            if not header:
                raise CliError(f"{path}: empty file; the first row names the columns (url, ...)", 2)
            if "url" not in header:
                raise CliError(
                    f"{path}: no `url` column in the header row ({', '.join(header)}); columns: "
                    f"url (required), {', '.join(CSV_COLUMNS[1:])}",
                    2,
                )
            reader.fieldnames = header
            rows = [
                Row(reader.line_num, {k: (v or "") for k, v in raw.items() if k is not None})
                for raw in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CliError(f"{path}: cannot read it as a UTF-8 CSV file: {exc}", 2) from None
    for row in rows:
        _prepare(row)
    return header, rows


def _prepare(row: Row) -> None:
    """The API item of a row, or a problem the API would refuse its whole call for."""
    raw = row.raw
    url = raw.get("url", "").strip()
    alias = raw.get("custom_alias", "").strip()
    description = raw.get("description", "").strip()
    expires = raw.get("expires_at", "").strip()
    item: dict[str, Any] = {"url": url}
    if len(url) > 8_192:
        row.problem = ("too-long", "url: the URL is longer than 2048 characters")
    elif len(alias) > 100:
        row.problem = ("alias-length", "custom_alias: an alias is 3-20 characters long")
    elif len(description) > 500:
        row.problem = ("too-long", "description: the description is at most 500 characters")
    if alias:
        item["custom_alias"] = alias
    if description:
        item["description"] = description
    if expires and row.problem is None:
        try:
            item["expires_at"] = _instant(expires, "expires_at").isoformat()
        except CliError:
            row.problem = ("invalid-time", f"expires_at: {expires!r} is not an ISO 8601 time")
    row.item = item


async def _same_link(client: ShortenerClient, row: Row) -> bool:
    """Whether the alias a row asks for is already a link to the row's URL (a re-run)."""
    from tenfold.shortener.client import ShortenerClientError
    from tenfold.shortener.models import LinkError, normalise_url

    try:
        existing = await client.get(row.item["custom_alias"])
        return bool(existing["long_url"] == normalise_url(row.item["url"]))
    except (ShortenerClientError, LinkError):
        return False


async def _send(client: ShortenerClient, rows: list[Row], done: Imported) -> None:
    ready = [row for row in rows if row.problem is None]
    for row in rows:
        if row.problem is not None:
            done.failed.append((row, *row.problem))
    if not ready:
        return
    answer = await client.bulk([row.item for row in ready])
    taken: list[tuple[Row, str, str]] = []
    for result in answer["results"]:
        row = ready[int(result["index"])]
        if result["status"] == "created":
            done.created += 1
            continue
        error = result.get("error") or {}
        failure = (row, str(error.get("reason", "failed")), str(error.get("detail", "")))
        if failure[1] == "alias-taken" and row.item.get("custom_alias"):
            taken.append(failure)
        else:
            done.failed.append(failure)
    gate = asyncio.Semaphore(LOOKUPS)

    async def check(failure: tuple[Row, str, str]) -> None:
        async with gate:
            if await _same_link(client, failure[0]):
                done.existed += 1
            else:
                done.failed.append(failure)

    await asyncio.gather(*(check(f) for f in taken))


def _write_errors(path: Path, header: list[str], failed: list[tuple[Row, str, str]]) -> None:
    columns = [*header, "line", "reason", "detail"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row, reason, detail in sorted(failed, key=lambda f: f[0].line):
            writer.writerow({**row.raw, "line": row.line, "reason": reason, "detail": detail})


@app.command("import")
def import_csv(
    file: Annotated[Path, typer.Argument(help="A CSV file: url, custom_alias, expires_at, ...")],
    errors: Annotated[
        Path | None,
        typer.Option("--errors", help="Write the rows that failed, with why, to this CSV file"),
    ] = None,
    server: ServerUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Shorten every row of a CSV file (header row: url, and optionally custom_alias,
    expires_at, description), 1,000 per call. Rows with a custom_alias are safe to import
    again: one whose alias already points at its URL counts as existing, not failed.
    Exits 1 when some rows failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    try:
        header, rows = _read_csv(file)
    except CliError as exc:
        raise fail(str(exc), exc.code) from None

    async def job(client: ShortenerClient) -> Imported:
        done = Imported()
        columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("importing", total=len(rows))
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start : start + CHUNK]
                await _send(client, chunk, done)
                progress.advance(bar, len(chunk))
        return done

    done = _with_client(job, server, api_key)
    console.print(
        f"{len(rows)} row(s): {done.created} created, {done.existed} already existed, "
        f"{len(done.failed)} failed",
        highlight=False,
    )
    if not done.failed:
        return
    if errors is not None:
        try:
            _write_errors(errors, header, done.failed)
        except OSError as exc:
            raise fail(f"--errors {errors}: {exc}", 1) from None
        console.print(f"failed rows, with their reason: {errors}", highlight=False)
    else:
        row, reason, detail = min(done.failed, key=lambda f: f[0].line)
        console.print(
            f"first failure, line {row.line}: {reason}: {detail} (--errors FILE writes them all)",
            highlight=False,
        )
    raise typer.Exit(1)
