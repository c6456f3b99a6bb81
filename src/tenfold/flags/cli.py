"""`tenfold flags ...`: create flags, list them, turn them on and off, roll them out, export
and import them.

Straight on the database, through the flags service, as `tenfold sessions` and (without
--url) `tenfold shortener` do: no server is needed. Changes are written to the audit log as
`cli:<os user>`. Running servers pick them up within seconds (their revision check), at once in
scale-out (Redis). In an environment that requires approvals a change becomes a change request,
whose id is printed; turning a flag off always applies at once.

The export is one JSON document, read back by `import`:

    {"version": 1,
     "flags": [{<definition>, "environments": {"production": <targeting>, ...}}, ...],
     "segments": [<segment>, ...]}

Definitions, targeting and segments are the flags API's own shapes. `import` checks the whole
document (and that it fits what the database holds) before writing anything; it creates missing
flags and segments, replaces what differs and leaves the rest alone, so a re-run changes nothing.
"""

from __future__ import annotations

import getpass
import graphlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tenfold.kernel.commands import CliError, fail, run_command

if TYPE_CHECKING:
    from tenfold.flags.models import ChangeRequest, FlagDef, Segment, Targeting
    from tenfold.flags.service import Applied, FlagsService, Pending
    from tenfold.kernel.runtime import Runtime

T = TypeVar("T")

app = typer.Typer(
    help="Feature flags: create, list, toggle, roll out, export and import.",
    no_args_is_help=True,
)
console = Console()

EXPORT_VERSION = 1
PAGE = 1_000  # flags per listing query
PENDING_LOOKUP = 10_000  # pending change requests an import compares itself with

Environment = Annotated[
    str | None,
    typer.Option(
        "--environment",
        "-e",
        envvar="TENFOLD_FLAGS_ENVIRONMENT",
        help="The environment (default: TENFOLD_FLAGS_DEFAULT_ENVIRONMENT, production)",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text")]


def actor() -> str:
    """Who the audit log names for changes made here."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in the environment nor the password database
        return "cli"


def _with_service(job: Callable[[FlagsService], Awaitable[T]]) -> T:
    """Run `job` with this settings' flags service, every environment loaded; one-line errors."""
    from tenfold.flags.api import service_for
    from tenfold.flags.models import Conflict, Missing
    from tenfold.kernel.errors import FieldError

    async def run(runtime: Runtime) -> T:
        service = service_for(runtime)
        await service.load()
        return await job(service)

    def explain(exc: Exception) -> tuple[str, int] | None:
        if isinstance(exc, Missing):
            hint = "; see `tenfold flags list`" if exc.what == "flag" else ""
            return f"{exc}{hint}", 1
        if isinstance(exc, Conflict):
            return exc.message, 1
        if isinstance(exc, FieldError):
            return f"{exc.field}: {exc.message}", 2
        return None

    return run_command(run, explain)


def _environment(service: FlagsService, requested: str | None) -> str:
    env = requested or service.default_environment
    if env not in service.rulesets:
        known = ", ".join(service.environments) or "none"
        raise CliError(f"--environment: unknown environment {env!r}; the environments: {known}", 2)
    return env


def _show_ms(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _print_json(value: Any) -> None:
    import orjson

    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _outcome(result: Applied | Pending, done: str) -> str:
    from tenfold.flags.service import Pending

    if isinstance(result, Pending):
        cr = result.request
        return (
            f"pending approval: change request {cr.request_id} ({cr.required_approvals} "
            f"approval(s) needed in {cr.environment}; nothing changes until then)"
        )
    return f"applied: {done} (version {result.version})"


# --- create --------------------------------------------------------------------------------


class FlagType(StrEnum):
    BOOLEAN = "boolean"
    STRING = "string"
    NUMBER = "number"
    JSON = "json"


def _value(text: str, flag_type: FlagType, option: str) -> Any:
    """A value given on the command line: JSON, or for a string flag plain text too."""
    import orjson

    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        if flag_type is FlagType.STRING:
            return text
        raise CliError(
            f'{option}: {text!r} is not JSON; e.g. true, 42, "blue" or {{}}', 2
        ) from None
    if flag_type is FlagType.STRING and not isinstance(value, str):
        return text  # `--default 42` on a string flag means the text "42"
    return value


def _variations(
    flag_type: FlagType, as_json: str | None, pairs: list[str]
) -> list[dict[str, Any]] | None:
    import orjson

    if as_json is not None and pairs:
        raise CliError("give --variations or --variation, not both", 2)
    if as_json is not None:
        try:
            items = orjson.loads(as_json)
        except orjson.JSONDecodeError as exc:
            raise CliError(f"--variations: not JSON ({exc})", 2) from None
        if not isinstance(items, list):
            raise CliError('--variations: a JSON list, e.g. [{"key": "blue", "value": "#00f"}]', 2)
        return items
    if not pairs:
        return None
    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise CliError(f"--variation: {pair!r} is not key=value, e.g. blue='\"#00f\"'", 2)
        out.append({"key": key.strip(), "value": _value(text, flag_type, f"--variation {key}")})
    return out


_CREATE_OPTIONS = {
    "flag_key": "KEY",
    "flag_type": "--type",
    "default_value": "--default",
    "variations": "--variation",
    "name": "--name",
    "description": "--description",
    "tags": "--tag",
}


def _create_message(field_name: str, message: str) -> str:
    head = field_name.split("[")[0].split(".")[0]
    option = _CREATE_OPTIONS.get(head)
    if option is None:
        return f"{field_name}: {message}"
    return f"{option}: {message}" if head == field_name else f"{option} ({field_name}): {message}"


@app.command()
def create(
    key: Annotated[str, typer.Argument(help="The flag's key: letters, digits, '_', '.', '-'")],
    flag_type: Annotated[FlagType, typer.Option("--type", help="What it serves")] = (
        FlagType.BOOLEAN
    ),
    default: Annotated[
        str | None,
        typer.Option(
            "--default",
            help="The value served when off or unmatched, as JSON (plain text for a string "
            "flag); default: false, or the first variation's value",
            show_default=False,
        ),
    ] = None,
    variations: Annotated[
        str | None,
        typer.Option(
            "--variations",
            help='Every variation as a JSON list: [{"key": "blue", "value": "#00f"}, ...]',
            show_default=False,
        ),
    ] = None,
    variation: Annotated[
        list[str] | None,
        typer.Option(
            "--variation",
            help="A variation as key=JSON (plain text for a string flag); repeat for more. "
            "A boolean flag has on and off unless told otherwise",
            show_default=False,
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Default: the key")] = None,
    description: Annotated[str, typer.Option("--description", help="What it is for")] = "",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag; repeat for more")] = None,
) -> None:
    """Create a flag, off in every environment."""
    from tenfold.kernel.errors import FieldError

    try:
        items = _variations(flag_type, variations, variation or [])
        if default is not None:
            default_value = _value(default, flag_type, "--default")
        elif flag_type is FlagType.BOOLEAN:
            default_value = False
        elif items and isinstance(items[0], dict) and "value" in items[0]:
            default_value = items[0]["value"]
        else:
            raise CliError(f"--default: a {flag_type.value} flag needs a default value", 2)
    except CliError as exc:
        raise fail(str(exc), exc.code) from None
    body: dict[str, Any] = {
        "flag_key": key,
        "flag_type": flag_type.value,
        "default_value": default_value,
        "description": description,
        "tags": tag or [],
    }
    if items is not None:
        body["variations"] = items
    if name is not None:
        body["name"] = name

    async def job(service: FlagsService) -> FlagDef:
        try:
            _, flag = await service.create_flag(body, actor())
        except FieldError as exc:
            raise CliError(_create_message(exc.field, exc.message), 2) from None
        return flag

    flag = _with_service(job)
    served = ", ".join(v.key for v in flag.variations)
    console.print(
        f"created {flag.key} ({flag.flag_type}: {served}; default {flag.default_variation}), "
        "off in every environment",
        highlight=False,
    )


# --- list ----------------------------------------------------------------------------------


@dataclass
class Listed:
    flag: FlagDef
    enabled: dict[str, bool]
    updated_ms: int


@app.command("list")
def list_flags(
    tag: Annotated[str | None, typer.Option("--tag", help="Only flags with this tag")] = None,
    search: Annotated[
        str | None, typer.Option("--search", help="Only flags whose key or name holds this")
    ] = None,
    environment: Annotated[
        str | None,
        typer.Option(
            "--environment",
            "-e",
            envvar="TENFOLD_FLAGS_LIST_ENVIRONMENT",
            help="Only this environment's column (default: every environment)",
            show_default=False,
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """List flags by key: type, on or off in each environment, last change."""

    async def job(service: FlagsService) -> tuple[list[str], list[Listed]]:
        envs = [_environment(service, environment)] if environment else list(service.rulesets)
        changed = {env: await service.store.targeting_changed(env) for env in envs}
        found: list[Listed] = []
        after: str | None = None
        while True:
            rows = await service.store.list_flags(tag=tag, query=search, after=after, limit=PAGE)
            for flag, row in rows:
                enabled = {}
                for env in envs:
                    doc = service.rulesets[env].docs.get(flag.key)
                    if doc is not None:
                        enabled[env] = doc.targeting.enabled
                updated = max(
                    [int(row.updated_at_ms)]
                    + [changed[env][flag.key] for env in envs if flag.key in changed[env]]
                )
                found.append(Listed(flag, enabled, updated))
            if len(rows) < PAGE:
                return envs, found
            after = rows[-1][0].key

    envs, found = _with_service(job)
    if as_json:
        _print_json(
            [
                {
                    "flag_key": f.flag.key,
                    "name": f.flag.name,
                    "flag_type": f.flag.flag_type,
                    "tags": list(f.flag.tags),
                    "enabled": f.enabled,
                    "updated_at_ms": f.updated_ms,
                }
                for f in found
            ]
        )
        return
    if not found:
        filters = [f"tag {tag!r}" if tag else "", f"matching {search!r}" if search else ""]
        console.print(" ".join(["no flags", *filter(None, filters)]), highlight=False)
        return
    table = Table()
    table.add_column("key", no_wrap=True)
    table.add_column("type")
    for env in envs:
        table.add_column(env, justify="center")
    table.add_column("updated (UTC)", no_wrap=True)
    for f in found:
        cells = []
        for env in envs:
            on = f.enabled.get(env)
            cells.append("" if on is None else "[green]on[/]" if on else "[dim]off[/]")
        table.add_row(f.flag.key, f.flag.flag_type, *cells, _show_ms(f.updated_ms))
    console.print(table)


# --- toggle and rollout --------------------------------------------------------------------


class Switch(StrEnum):
    ON = "on"
    OFF = "off"


@app.command()
def toggle(
    key: Annotated[str, typer.Argument(help="The flag's key")],
    state: Annotated[Switch, typer.Argument(help="on or off")],
    environment: Environment = None,
) -> None:
    """Turn a flag on or off in one environment (the kill switch)."""
    from tenfold.flags.service import Applied

    enabled = state is Switch.ON

    async def job(service: FlagsService) -> str:
        env = _environment(service, environment)
        current, version = await service.targeting(key, env)
        if current.enabled == enabled:
            return f"unchanged: {key} is already {state.value} in {env} (version {version})"
        result = await service.toggle(key, env, enabled, actor())
        done = _outcome(result, f"{key} is {state.value} in {env}")
        if (
            enabled
            and isinstance(result, Applied)
            and not current.rules
            and not current.default_rule
        ):
            flag, _ = await service.get_flag(key)
            done += (
                f"\n  with no rules nor default rule it serves its default, "
                f"{flag.default_variation}; `tenfold flags rollout {key} 100` serves "
                f"{'on' if flag.flag_type == 'boolean' else 'a variation'} to everyone"
            )
        return done

    console.print(_with_service(job), highlight=False)


@app.command()
def rollout(
    key: Annotated[str, typer.Argument(help="The flag's key")],
    percent: Annotated[
        float, typer.Argument(min=0, max=100, help="The share of users served --variation")
    ],
    environment: Environment = None,
    variation: Annotated[
        str | None,
        typer.Option(
            "--variation", help="The variation rolled out (a boolean flag: the one serving true)"
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline", help="What the others get (a boolean flag: the one serving false)"
        ),
    ] = None,
) -> None:
    """Serve a variation to PERCENT% of the users no rule matches, the baseline to the rest,
    and turn the flag on. The same users stay in as the percentage grows."""
    from tenfold.flags.models import thousandths
    from tenfold.flags.service import Pending

    if abs(percent * 1000 - thousandths(percent)) > 1e-6:
        raise fail(f"PERCENT: {percent:g} has more than 3 decimals", 2)

    async def job(service: FlagsService) -> str:
        env = _environment(service, environment)
        flag, _ = await service.get_flag(key)
        names = ", ".join(v.key for v in flag.variations)
        for option, name in (("--variation", variation), ("--baseline", baseline)):
            if name is not None and flag.variation(name) is None:
                raise CliError(f"{option}: {key} has no variation {name!r} (it has {names})", 2)
        if flag.flag_type != "boolean" and (variation is None or baseline is None):
            raise CliError(
                f"a {flag.flag_type} flag needs --variation and --baseline (it has {names})", 2
            )
        result = await service.rollout(
            key, env, percent, actor(), variation=variation, baseline=baseline
        )
        if isinstance(result, Pending):
            return _outcome(result, "")
        targeting, _ = await service.targeting(key, env)
        rule = targeting.default_rule
        if rule is not None and rule.is_split:
            shares = " and ".join(f"{v} to {w:g}%" for v, w in rule.split)
        else:
            shares = f"{rule.variation if rule else flag.default_variation} to all"
        return _outcome(result, f"{key} is on in {env}, serving {shares} of those no rule matches")

    console.print(_with_service(job), highlight=False)


# --- export --------------------------------------------------------------------------------


def export_document(service: FlagsService, environment: str | None = None) -> dict[str, Any]:
    """Every flag with its targeting in each environment (or one), and every segment."""
    envs = [environment] if environment else list(service.rulesets)
    keys = sorted({k for rs in service.rulesets.values() for k in rs.docs})
    flags = []
    for key in keys:
        docs = {env: rs.docs[key] for env, rs in service.rulesets.items() if key in rs.docs}
        out = next(iter(docs.values())).flag.to_dict()
        out["environments"] = {env: docs[env].targeting.to_dict() for env in envs if env in docs}
        flags.append(out)
    segments: dict[str, Segment] = {}
    for rs in service.rulesets.values():
        segments.update(rs.segments)
    return {
        "version": EXPORT_VERSION,
        "flags": flags,
        "segments": [segments[k].to_dict() for k in sorted(segments)],
    }


@app.command()
def export(
    environment: Annotated[
        str | None,
        typer.Option(
            "--environment",
            "-e",
            envvar="TENFOLD_FLAGS_EXPORT_ENVIRONMENT",
            help="Only this environment's targeting (default: every environment)",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            envvar="TENFOLD_FLAGS_EXPORT_OUTPUT",
            help="Write to this file (default: standard output)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Export every flag with its targeting, and every segment, as one JSON document that
    `tenfold flags import` reads back."""
    import orjson

    async def job(service: FlagsService) -> dict[str, Any]:
        env = _environment(service, environment) if environment else None
        return export_document(service, env)

    doc = _with_service(job)
    text = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
    if output is None:
        typer.echo(text.decode(), nl=False)
        return
    partial = output.with_name(output.name + ".partial")
    try:
        partial.write_bytes(text)
        partial.replace(output)
    except OSError as exc:
        raise fail(f"--output {output}: {exc.strerror or exc}", 1) from None
    console.print(
        f"exported {len(doc['flags'])} flag(s) and {len(doc['segments'])} segment(s) to {output}",
        highlight=False,
    )


# --- import --------------------------------------------------------------------------------


@dataclass
class Step:
    """One write of an import."""

    kind: str  # segment, create, define, target, redefine (removing variations: after target)
    key: str  # the flag's or segment's
    environment: str | None = None
    flag: FlagDef | None = None
    targeting: Targeting | None = None
    segment: Segment | None = None
    waiting: str | None = None  # an identical change request already waits for approvals


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    flags: dict[str, str] = field(default_factory=dict)  # key -> created, updated, unchanged
    segments: dict[str, str] = field(default_factory=dict)
    current: dict[str, FlagDef] = field(default_factory=dict)  # definitions before the import


@dataclass
class Tally:
    pending: dict[str, list[str]] = field(default_factory=dict)  # flag key -> request ids
    deferred: set[str] = field(default_factory=set)  # flags with changes left for a re-run
    definitions: set[str] = field(default_factory=set)  # flags whose new definition waits


def _read_document(path: Path) -> Any:
    import orjson

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read it: {exc.strerror or exc}", 2) from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"{path}: not a JSON document: {exc}", 2) from None


def _items(raw: dict[str, Any], name: str) -> list[Any]:
    from tenfold.kernel.errors import FieldError

    value = raw.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise FieldError(name, "must be a list")
    return value


def plan_import(raw: Any, service: FlagsService, pending: list[ChangeRequest]) -> Plan:
    """Check a whole export document against the models and the database; the writes that
    make the database hold it. Raises FieldError naming the JSON path of the first problem."""
    from tenfold.flags.models import (
        RESERVED_FLAG_KEYS,
        Targeting,
        check_references,
        find_cycle,
        parse_flag,
        parse_segment,
        parse_targeting,
    )
    from tenfold.kernel.errors import FieldError

    if not isinstance(raw, dict):
        raise FieldError("", 'the document must be a JSON object: {"version": 1, "flags": [...]}')
    unknown = sorted(set(raw) - {"version", "flags", "segments"})
    if unknown:
        raise FieldError(unknown[0], "is not a known field (version, flags, segments)")
    if raw.get("version") != EXPORT_VERSION or isinstance(raw.get("version"), bool):
        raise FieldError("version", f"must be {EXPORT_VERSION}, the export version this reads")

    file_segments: dict[str, Segment] = {}
    for i, item in enumerate(_items(raw, "segments")):
        segment = parse_segment(item, path=f"segments[{i}]")
        if segment.key in file_segments:
            raise FieldError(f"segments[{i}].segment_key", f"{segment.key!r} is listed twice")
        file_segments[segment.key] = segment

    envs = list(service.rulesets)
    index: dict[str, int] = {}  # flag key -> its place in the file
    file_flags: dict[str, FlagDef] = {}
    file_targeting: dict[str, dict[str, Targeting]] = {}  # flag key -> env -> targeting
    for i, item in enumerate(_items(raw, "flags")):
        at = f"flags[{i}]"
        if not isinstance(item, dict):
            raise FieldError(at, "must be a JSON object")
        body = dict(item)
        by_env = body.pop("environments", None) or {}
        flag = parse_flag(body, path=at)
        if flag.key in RESERVED_FLAG_KEYS:
            raise FieldError(f"{at}.flag_key", f"{flag.key!r} is reserved by the flags API")
        if flag.key in file_flags:
            raise FieldError(f"{at}.flag_key", f"{flag.key!r} is listed twice")
        if not isinstance(by_env, dict):
            raise FieldError(f"{at}.environments", "must map environment keys to targeting")
        per_env: dict[str, Targeting] = {}
        for env, doc in by_env.items():
            if env not in service.rulesets:
                raise FieldError(
                    f"{at}.environments.{env}",
                    f"unknown environment; the database has {', '.join(envs) or 'none'}",
                )
            per_env[env] = parse_targeting(doc, flag, path=f"{at}.environments.{env}")
        index[flag.key] = i
        file_flags[flag.key] = flag
        file_targeting[flag.key] = per_env

    current: dict[str, FlagDef] = {}
    current_segments: dict[str, Segment] = {}
    for rs in service.rulesets.values():
        current.update({k: d.flag for k, d in rs.docs.items()})
        current_segments.update(rs.segments)
    final = {**current, **file_flags}
    final_segments = {**current_segments, **file_segments}
    plan = Plan(current=current)

    removing: set[str] = set()  # existing flags losing variations: redefined after the targeting
    for key, flag in file_flags.items():
        old = current.get(key)
        if old is None:
            continue
        gone = {v.key for v in old.variations} - {v.key for v in flag.variations}
        if not gone:
            continue
        removing.add(key)
        for env, targeting in file_targeting[key].items():
            try:  # written while the old definition still holds
                parse_targeting(targeting.to_dict(), old)
            except FieldError:
                raise FieldError(
                    f"flags[{index[key]}].variations",
                    f"removes {', '.join(sorted(gone))} while its targeting in {env} serves a new "
                    "variation; import in two steps (add the variations, then remove the old)",
                ) from None

    waiting: dict[tuple[str, str, str], list[ChangeRequest]] = {}
    for cr in pending:
        waiting.setdefault((cr.kind, cr.flag_key, cr.environment), []).append(cr)

    def same_request(kind: str, key: str, env: str, wanted: Any) -> str | None:
        for cr in waiting.get((kind, key, env), ()):
            try:
                found: Any = (
                    parse_flag(cr.payload)
                    if kind == "flag"
                    else parse_segment(cr.payload)
                    if kind == "segment"
                    else parse_targeting(cr.payload, final[key])
                )
            except FieldError:
                continue
            if found == wanted:
                return cr.request_id
        return None

    for key, segment in file_segments.items():
        old_segment = current_segments.get(key)
        if old_segment == segment:
            plan.segments[key] = "unchanged"
            continue
        plan.segments[key] = "created" if old_segment is None else "updated"
        waiting_id = same_request("segment", "", "*", segment)
        plan.steps.append(Step("segment", key, segment=segment, waiting=waiting_id))

    for key, flag in file_flags.items():
        old = current.get(key)
        if old is None:
            plan.flags[key] = "created"
            plan.steps.append(Step("create", key, flag=flag))
        elif old != flag:
            plan.flags[key] = "updated"
        else:
            plan.flags[key] = "unchanged"
    for key, flag in file_flags.items():
        if plan.flags[key] == "updated" and key not in removing:
            waiting_id = same_request("flag", key, "*", flag)
            plan.steps.append(Step("define", key, flag=flag, waiting=waiting_id))

    for env in envs:
        docs = service.rulesets[env].docs
        now: dict[str, Targeting] = {}  # every flag's targeting here once the import is done
        for key in final:
            if env in file_targeting.get(key, {}):
                now[key] = file_targeting[key][env]
            elif key in docs:
                now[key] = docs[key].targeting
            else:
                now[key] = Targeting()
        for key, targeting in now.items():
            flag = final[key]
            if env in file_targeting.get(key, {}):
                at = f"flags[{index[key]}].environments.{env}"
                check_references(flag, targeting, final, final_segments, at)
                continue
            if key in file_flags and key in docs and flag != current.get(key):
                try:
                    parse_targeting(targeting.to_dict(), flag)
                except FieldError as exc:
                    raise FieldError(
                        f"flags[{index[key]}]",
                        f"the definition does not fit the targeting in {env}, which the file "
                        f"leaves as it is ({exc}); add that environment's targeting",
                    ) from None
            for p in targeting.prerequisites:
                if p.flag in file_flags and final[p.flag].variation(p.variation) is None:
                    raise FieldError(
                        f"flags[{index[p.flag]}].variations",
                        f"flag {key} requires variation {p.variation!r} of {p.flag} in {env}",
                    )
        graph = {k: [p.flag for p in t.prerequisites] for k, t in now.items()}
        cycle = find_cycle(graph)
        if cycle is not None:
            culprit = next((k for k in cycle if env in file_targeting.get(k, {})), cycle[0])
            raise FieldError(
                f"flags[{index.get(culprit, 0)}].environments.{env}.prerequisites",
                "prerequisites would form a cycle: " + " -> ".join(cycle),
            )
        # Prerequisites first: no partial state on the way can hold a cycle.
        for key in graphlib.TopologicalSorter(graph).static_order():
            if env not in file_targeting.get(key, {}):
                continue
            targeting = file_targeting[key][env]
            before = docs[key].targeting if key in docs else Targeting()
            if targeting == before:
                continue
            if plan.flags[key] == "unchanged":
                plan.flags[key] = "updated"
            plan.steps.append(
                Step(
                    "target",
                    key,
                    environment=env,
                    targeting=targeting,
                    waiting=same_request("targeting", key, env, targeting),
                )
            )

    for key in removing:
        flag = file_flags[key]
        waiting_id = same_request("flag", key, "*", flag)
        plan.steps.append(Step("redefine", key, flag=flag, waiting=waiting_id))
    return plan


def _would_wait(service: FlagsService, plan: Plan, step: Step) -> bool:
    """Whether a step would become a change request (for --dry-run)."""
    from dataclasses import replace

    from tenfold.flags.models import Targeting

    if step.waiting is not None:
        return True
    if step.kind == "segment":  # an existing segment some gated environment's flags use
        return plan.segments.get(step.key) == "updated" and bool(service.segment_gates(step.key))
    if step.kind in ("define", "redefine"):
        assert step.flag is not None
        old = plan.current[step.key]
        serving = any(
            getattr(old, a) != getattr(step.flag, a)
            for a in ("flag_type", "default_value", "variations", "bucket_by", "salt")
        )
        return serving and any(e.approval_required for e in service.environments.values())
    if step.kind == "target":
        assert step.environment is not None and step.targeting is not None
        env = service.environments[step.environment]
        doc = service.rulesets[step.environment].docs.get(step.key)
        current = doc.targeting if doc is not None else Targeting()
        kill = not step.targeting.enabled and replace(current, enabled=False) == step.targeting
        return env.approval_required and not kill
    return False


async def _write(
    service: FlagsService, plan: Plan, step: Step, who: str, note: str, tally: Tally
) -> None:
    from tenfold.flags.models import Conflict, parse_targeting
    from tenfold.flags.service import Pending
    from tenfold.kernel.errors import FieldError

    if step.waiting is not None:
        tally.pending.setdefault(step.key, []).append(step.waiting)
        if step.kind in ("define", "redefine"):
            tally.definitions.add(step.key)
        return
    result: Any = None
    if step.kind == "segment":
        assert step.segment is not None
        result = await service.put_segment(step.segment.to_dict(), who, note)
    elif step.kind == "create":
        assert step.flag is not None
        await service.create_flag(step.flag.to_dict(), who)
    elif step.kind in ("define", "redefine"):
        assert step.flag is not None
        try:
            result = await service.update_flag(step.key, step.flag.to_dict(), who, note)
            if isinstance(result, Pending):
                tally.definitions.add(step.key)
        except Conflict as exc:
            if exc.kind != "variation-in-use" or not tally.pending:
                raise
            tally.deferred.add(step.key)  # still served where a change waits for approvals
    else:
        assert step.environment is not None and step.targeting is not None
        if step.key in tally.definitions:
            try:  # its new definition waits for approvals: does the targeting fit the old?
                parse_targeting(step.targeting.to_dict(), plan.current[step.key])
            except FieldError:
                tally.deferred.add(step.key)
                return
        result = await service.set_targeting(
            step.key, step.environment, step.targeting.to_dict(), who, comment=note
        )
    if isinstance(result, Pending):
        tally.pending.setdefault(step.key, []).append(result.request.request_id)


@app.command("import")
def import_flags(
    file: Annotated[Path, typer.Argument(help="A document written by `tenfold flags export`")],
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            envvar="TENFOLD_FLAGS_IMPORT_DRY_RUN",
            help="Check the file and say what would change; write nothing",
        ),
    ] = False,
) -> None:
    """Import flags, their targeting and segments: create what is missing, replace what
    differs, leave the rest (and what the file does not name) alone. The whole file is checked
    first; a problem is reported with its JSON path and nothing is written. Safe to run again;
    in environments requiring approvals, changes become change requests (run the import again
    once they are approved to finish what depends on them)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tenfold.flags.models import Conflict, Missing
    from tenfold.kernel.errors import FieldError

    try:
        raw = _read_document(file)
    except CliError as exc:
        raise fail(str(exc), exc.code) from None
    who = actor()
    note = f"tenfold flags import {file.name}"

    async def job(service: FlagsService) -> tuple[Plan, Tally]:
        pending = await service.store.change_requests(
            status="pending", flag_key=None, limit=PENDING_LOOKUP
        )
        try:
            plan = plan_import(raw, service, pending)
        except FieldError as exc:
            where = f"{exc.field}: " if exc.field else ""
            raise CliError(f"{file}: {where}{exc.message}; nothing was imported", 2) from None
        tally = Tally()
        if dry_run:
            for step in plan.steps:
                if _would_wait(service, plan, step):
                    tally.pending.setdefault(step.key, []).append(step.waiting or "")
            return plan, tally
        if not plan.steps:
            return plan, tally
        columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("importing", total=len(plan.steps))
            for done, step in enumerate(plan.steps):
                try:
                    await _write(service, plan, step, who, note, tally)
                except (FieldError, Conflict, Missing) as exc:
                    raise CliError(
                        f"{step.key}: {exc}; {done} of {len(plan.steps)} change(s) were written "
                        "(something changed since the check?), run the import again",
                        1,
                    ) from None
                progress.advance(bar)
        return plan, tally

    plan, tally = _with_service(job)
    waiting = set(tally.pending) | tally.deferred
    flag_counts = {
        n: sum(1 for k, s in plan.flags.items() if s == n and k not in waiting)
        for n in ("created", "updated", "unchanged")
    }
    segment_counts = {
        n: sum(1 for s in plan.segments.values() if s == n)
        for n in ("created", "updated", "unchanged")
    }
    head = "dry run, nothing written; would be " if dry_run else ""
    console.print(
        f"{head}flags: {flag_counts['created']} created, {flag_counts['updated']} updated, "
        f"{flag_counts['unchanged']} unchanged, {len(waiting)} pending approval; segments: "
        f"{segment_counts['created']} created, {segment_counts['updated']} updated, "
        f"{segment_counts['unchanged']} unchanged",
        highlight=False,
    )
    for key in sorted(waiting):
        ids = [i for i in tally.pending.get(key, []) if i]
        what = f"change request(s) {', '.join(ids)}" if ids else "needs approval"
        made = " (created)" if plan.flags.get(key) == "created" else ""
        later = "; run the import again once approved" if key in tally.deferred else ""
        console.print(f"  {key}{made}: {what}{later}", highlight=False)
