"""The flags use cases: definitions, targeting, approvals, propagation, usage, experiments.

Every process holds each environment's compiled ruleset in memory and evaluates locally. A
change is written to SQL (bumping the environment's revision), the writer reloads what it
changed and publishes the environments' names on the KV channel; every other process reloads
them on that message. A periodic revision check catches a message lost to a KV outage.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import chain
from typing import Any

import orjson
import structlog

from tenfold.flags import stats
from tenfold.flags.evaluation import Evaluation, Ruleset, exposure_sampled
from tenfold.flags.models import (
    RESERVED_FLAG_KEYS,
    ChangeRequest,
    Conflict,
    Environment,
    Experiment,
    FlagDef,
    Missing,
    Segment,
    Serve,
    Targeting,
    check_references,
    find_cycle,
    parse_environment,
    parse_environment_changes,
    parse_experiment,
    parse_flag,
    parse_segment,
    parse_targeting,
)
from tenfold.kernel.clock import SYSTEM_CLOCK, Clock
from tenfold.kernel.errors import FieldError

log = structlog.get_logger(__name__)

CHANNEL = "flags:changes"
MAX_QUEUED_EVENTS = 100_000
FOLD_EVERY = 2_000  # requests whose evaluations wait to be counted (see count_all)
STREAM_QUEUE = 256  # changes a slow stream may fall behind before it is closed and reconnects


@dataclass(frozen=True, slots=True)
class Applied:
    """A change that took effect."""

    version: int
    environment: str | None = None


@dataclass(slots=True)
class Pending:
    """A change waiting for approvals."""

    request: ChangeRequest


Listener = Callable[[str, int, str, bytes], None]  # (environment, revision, event, data)


@dataclass
class FlagsService:
    store: Any
    clock: Clock = SYSTEM_CLOCK
    publish: Callable[[bytes], Awaitable[None]] | None = None
    default_environment: str = "production"
    process_id: str = field(default_factory=lambda: secrets.token_hex(6))
    rulesets: dict[str, Ruleset] = field(default_factory=dict)
    environments: dict[str, Environment] = field(default_factory=dict)
    experiments: dict[str, list[Experiment]] = field(default_factory=dict)
    key_environments: dict[str, str] = field(default_factory=dict)
    listeners: set[Listener] = field(default_factory=set)
    on_guard_breach: list[Callable[[str, str, float], Awaitable[None]]] = field(
        default_factory=list
    )
    _usage: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _evaluated: list[tuple[str, Sequence[Evaluation]]] = field(default_factory=list)
    _exposures: list[tuple[str, str, str, int]] = field(default_factory=list)
    _conversions: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    _guards: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    dropped_events: int = 0
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- loading and propagation -------------------------------------------------------------

    async def load(self) -> None:
        for env in await self.store.environments():
            await self._reload(env.key)
        self.key_environments = await self.store.key_environments()

    async def _reload(self, env_key: str) -> None:
        async with self._reload_lock:
            env, docs, segs = await self.store.load_environment(env_key)
            exps = [e for e in await self.store.experiments(env_key) if e.status == "running"]
            old = self.rulesets.get(env_key)
            if old is not None and old.revision == env.revision and env_key in self.environments:
                self.environments[env_key] = env
                return
            new = Ruleset(env_key, env.revision, docs, segs)
            self.environments[env_key] = env
            self.experiments[env_key] = exps
            self.rulesets[env_key] = new
        if old is not None:
            self._announce(env_key, "patch", _patch(old, new, exps))

    def _announce(self, env_key: str, event: str, body: dict[str, Any]) -> None:
        data = orjson.dumps(body)
        revision = int(body["revision"])
        for listener in list(self.listeners):
            try:
                listener(env_key, revision, event, data)
            except Exception:
                log.exception("flags.listener_failed")

    async def changed(self, env_keys: Sequence[str] | None) -> None:
        """After a write: reload here, tell every other process."""
        keys = list(env_keys) if env_keys is not None else list(await self._known_environments())
        for key in keys:
            await self._reload(key)
        if self.publish is not None:
            message = orjson.dumps({"origin": self.process_id, "environments": keys})
            try:
                await self.publish(message)
            except Exception as exc:  # the revision check catches up; say so
                log.warning("flags.publish_failed", error=f"{type(exc).__name__}: {exc}")

    async def _known_environments(self) -> list[str]:
        envs = await self.store.environments()
        return [e.key for e in envs]

    async def on_message(self, message: bytes) -> None:
        try:
            body = orjson.loads(message)
        except orjson.JSONDecodeError:
            return
        if body.get("origin") == self.process_id:
            return
        if body.get("keys_changed"):
            self.key_environments = await self.store.key_environments()
        for key in body.get("environments", ()):
            await self._reload(str(key))

    async def sync(self) -> None:
        """Reload every environment whose revision moved without this process hearing of it."""
        for key, revision in (await self.store.revisions()).items():
            current = self.rulesets.get(key)
            if current is None or current.revision != revision:
                await self._reload(key)

    # --- environments ------------------------------------------------------------------------

    def environment_for(self, requested: str | None, key_id: str | None) -> str:
        """The environment a call evaluates in: the key's, else the one asked for, else the
        default. A key bound to an environment cannot read another."""
        bound = self.key_environments.get(key_id or "")
        if bound is not None:
            if requested and requested != bound:
                raise Conflict(
                    f"this API key is bound to environment {bound!r}", "environment-mismatch"
                )
            return bound
        env = requested or self.default_environment
        if env not in self.rulesets:
            raise FieldError("environment", f"unknown environment {env!r}")
        return env

    def ruleset(self, env_key: str) -> Ruleset:
        ruleset = self.rulesets.get(env_key)
        if ruleset is None:
            raise FieldError("environment", f"unknown environment {env_key!r}")
        return ruleset

    def ruleset_document(self, env_key: str) -> dict[str, Any]:
        ruleset = self.ruleset(env_key)
        doc = ruleset.to_dict()
        doc["experiments"] = _experiment_list(self.experiments.get(env_key, []))
        return doc

    async def create_environment(self, raw: Mapping[str, Any], actor: str) -> Environment:
        env = parse_environment(raw)
        created = await self.store.create_environment(env, actor, self.clock.now_ms())
        await self.changed([created.key])
        return created  # type: ignore[no-any-return]

    async def update_environment(self, key: str, raw: Mapping[str, Any], actor: str) -> Environment:
        if "environment_key" in raw:
            raise FieldError("environment_key", "is not a known field")
        changes = parse_environment_changes(raw)
        env = await self.store.update_environment(key, changes, actor, self.clock.now_ms())
        if env is None:
            raise Missing("environment", key)
        await self.changed([key])
        return env  # type: ignore[no-any-return]

    # --- flags -------------------------------------------------------------------------------

    async def create_flag(self, raw: Mapping[str, Any], actor: str) -> tuple[int, FlagDef]:
        flag = parse_flag(raw)
        if flag.key in RESERVED_FLAG_KEYS:
            raise FieldError("flag_key", f"{flag.key!r} is reserved by the flags API")
        flag_id = await self.store.create_flag(flag, actor, self.clock.now_ms())
        await self.changed(None)
        return flag_id, flag

    async def get_flag(self, key: str) -> tuple[FlagDef, Any]:
        found = await self.store.flag(key)
        if found is None:
            raise Missing("flag", key)
        return found[1], found[3]

    async def update_flag(
        self, key: str, raw: Mapping[str, Any], actor: str, comment: str = ""
    ) -> Applied | Pending:
        """Change a flag's definition. Changes to what it serves (type, default value,
        variations, bucketing) follow the approvals of every environment requiring them."""
        found = await self.store.flag(key)
        if found is None:
            raise Missing("flag", key)
        _, current, version, _ = found
        merged = current.to_dict()
        for name, value in raw.items():
            if name == "flag_key":
                if value != key:
                    raise FieldError("flag_key", "a flag's key cannot change")
                continue
            merged[name] = value
        flag = parse_flag(merged)
        self._check_variations_in_use(current, flag)
        serving = any(
            getattr(current, a) != getattr(flag, a)
            for a in ("flag_type", "default_value", "variations", "bucket_by", "salt")
        )
        gated = [e for e in self.environments.values() if e.approval_required]
        if serving and gated:
            required = max(e.required_approvals for e in gated)
            request = await self._request(
                key, "*", "flag", flag.to_dict(), version, actor, comment, required
            )
            return Pending(request)
        new_version = await self.store.update_flag(
            flag, version, actor, self.clock.now_ms(), "flag_updated"
        )
        await self.changed(None)
        return Applied(new_version)

    def _check_variations_in_use(self, current: FlagDef, flag: FlagDef) -> None:
        removed = {v.key for v in current.variations} - {v.key for v in flag.variations}
        if not removed:
            return
        for env_key, ruleset in self.rulesets.items():
            doc = ruleset.docs.get(current.key)
            if doc is not None:
                used = _variations_used(doc.targeting)
                gone = removed & used
                if gone:
                    raise Conflict(
                        f"variation {sorted(gone)[0]!r} is served in {env_key}; change the "
                        "targeting there first",
                        "variation-in-use",
                    )
            for other in ruleset.docs.values():
                for p in other.targeting.prerequisites:
                    if p.flag == current.key and p.variation in removed:
                        raise Conflict(
                            f"flag {other.flag.key} in {env_key} requires variation "
                            f"{p.variation!r}",
                            "variation-in-use",
                        )

    async def delete_flag(self, key: str, actor: str) -> None:
        found = await self.store.flag(key)
        if found is None:
            raise Missing("flag", key)
        dependants = await self.store.dependants(key)
        if dependants:
            other, env = dependants[0]
            raise Conflict(f"flag {other} requires {key} in {env}", "flag-in-use")
        for env in self.environments.values():
            doc = self.rulesets[env.key].docs.get(key)
            if env.approval_required and doc is not None and doc.targeting.enabled:
                raise Conflict(
                    f"flag {key} is on in {env.key}, which requires approvals; turn it off first",
                    "flag-enabled",
                )
        await self.store.delete_flag(key, actor, self.clock.now_ms())
        await self.changed(None)

    async def targeting(self, key: str, env_key: str) -> tuple[Targeting, int]:
        self.ruleset(env_key)
        found = await self.store.targeting(key, env_key)
        if found is None:
            raise Missing("flag", key)
        return found[1], found[2]

    async def set_targeting(
        self,
        key: str,
        env_key: str,
        raw: Mapping[str, Any],
        actor: str,
        *,
        comment: str = "",
        expected_version: int | None = None,
        action: str = "targeting_updated",
    ) -> Applied | Pending:
        """Replace a flag's targeting in an environment: at once, or as a change request where
        approvals are required (turning a flag off always applies at once)."""
        env = self.environments.get(env_key)
        if env is None:
            raise FieldError("environment", f"unknown environment {env_key!r}")
        found = await self.store.targeting(key, env_key)
        if found is None:
            raise Missing("flag", key)
        flag, current, version = found
        targeting = parse_targeting(raw, flag)
        await self._check_targeting(flag, targeting, env_key)
        if expected_version is not None and expected_version != version:
            raise Conflict(
                f"the targeting changed since version {expected_version} (now {version})",
                "stale-change",
            )
        kill = not targeting.enabled and replace(current, enabled=False) == targeting
        if env.approval_required and not kill and targeting != current:
            request = await self._request(
                key,
                env_key,
                "targeting",
                targeting.to_dict(),
                version,
                actor,
                comment,
                env.required_approvals,
            )
            return Pending(request)
        new_version = await self.store.put_targeting(
            key,
            env_key,
            targeting,
            version,
            actor,
            self.clock.now_ms(),
            "kill" if kill and env.approval_required else action,
        )
        await self.changed([env_key])
        return Applied(new_version, env_key)

    async def _check_targeting(self, flag: FlagDef, targeting: Targeting, env_key: str) -> None:
        ruleset = self.rulesets[env_key]
        defs = {k: d.flag for k, d in ruleset.docs.items()}
        segs = dict(ruleset.segments)
        for name in targeting.segments() - set(segs):
            seg = await self.store.segment(name)
            if seg is not None:
                segs[name] = seg
        for p in targeting.prerequisites:
            if p.flag not in defs:
                found = await self.store.flag(p.flag)
                if found is not None:
                    defs[p.flag] = found[1]
        check_references(flag, targeting, defs, segs)
        if targeting.prerequisites:
            graph = await self.store.prerequisite_graph(env_key)
            graph[flag.key] = [p.flag for p in targeting.prerequisites]
            cycle = find_cycle(graph)
            if cycle is not None:
                raise Conflict(
                    "prerequisites would form a cycle: " + " -> ".join(cycle), "prerequisite-cycle"
                )

    async def toggle(self, key: str, env_key: str, enabled: bool, actor: str) -> Applied | Pending:
        current, _ = await self.targeting(key, env_key)
        return await self.set_targeting(
            key,
            env_key,
            replace(current, enabled=enabled).to_dict(),
            actor,
            action="toggled_on" if enabled else "toggled_off",
        )

    async def rollout(
        self,
        key: str,
        env_key: str,
        percentage: float,
        actor: str,
        *,
        variation: str | None = None,
        baseline: str | None = None,
    ) -> Applied | Pending:
        """Serve `variation` to `percentage`% of those no rule matches, `baseline` to the rest
        (for a boolean flag: on and off), and turn the flag on."""
        current, _ = await self.targeting(key, env_key)
        flag, _ = await self.get_flag(key)
        if flag.flag_type == "boolean":
            variation = variation or _variation_with(flag, True)
            baseline = baseline or _variation_with(flag, False)
        if variation is None or baseline is None:
            raise FieldError("variation", "name the variation rolled out and the baseline")
        if not 0 <= percentage <= 100:
            raise FieldError("percentage", "must be from 0 to 100")
        split = [{"variation": variation, "weight": round(percentage, 3)}]
        if percentage < 100:
            split.append({"variation": baseline, "weight": round(100 - percentage, 3)})
        doc = current.to_dict()
        doc["enabled"] = True
        doc["default_rule"] = (
            {"split": split}
            if percentage not in (0, 100)
            else {"variation": variation if percentage == 100 else baseline}
        )
        return await self.set_targeting(key, env_key, doc, actor, action="rollout")

    # --- change requests ---------------------------------------------------------------------

    async def _request(
        self,
        key: str,
        env_key: str,
        kind: str,
        payload: dict[str, Any],
        base_version: int,
        author: str,
        comment: str,
        required: int,
    ) -> ChangeRequest:
        request = ChangeRequest(
            request_id=secrets.token_hex(8),
            flag_key=key,
            environment=env_key,
            kind=kind,
            payload=payload,
            base_version=base_version,
            author=author,
            comment=comment[:2000],
            status="pending",
            required_approvals=required,
            created_at_ms=self.clock.now_ms(),
        )
        await self.store.add_change_request(request)
        return request

    async def change_request(self, request_id: str) -> ChangeRequest:
        request = await self.store.change_request(request_id)
        if request is None:
            raise Missing("change request", request_id)
        return request  # type: ignore[no-any-return]

    async def decide(
        self, request_id: str, actor: str, approve: bool, comment: str = ""
    ) -> ChangeRequest:
        request = await self.change_request(request_id)
        if request.status != "pending":
            raise Conflict(f"change request {request_id} is {request.status}", "not-pending")
        if actor == request.author:
            raise Conflict("a change request cannot be approved by its own author", "self-approval")
        now = self.clock.now_ms()
        if not await self.store.decide(
            request_id, actor, "approve" if approve else "reject", comment[:2000], now
        ):
            raise Conflict(
                f"{actor} already decided on change request {request_id}", "already-decided"
            )
        if not approve:
            await self.store.set_status(request_id, "rejected", now, only_from="pending")
            return await self.change_request(request_id)
        request = await self.change_request(request_id)
        if request.approvals >= request.required_approvals:
            await self._apply(request)
        return await self.change_request(request_id)

    async def _apply(self, request: ChangeRequest) -> None:
        now = self.clock.now_ms()
        approvers = [d.approver for d in request.decisions if d.decision == "approve"]
        actor = f"{request.author} (approved by {', '.join(approvers)})"
        try:
            if request.kind == "flag":
                flag = parse_flag(request.payload)
                await self.store.update_flag(flag, request.base_version, actor, now, "flag_updated")
                envs: list[str] | None = None
            elif request.kind == "segment":
                segment = parse_segment(request.payload)
                if await self.store.segment_version(segment.key) != request.base_version:
                    raise Conflict(f"segment {segment.key} changed since", "stale-change")
                await self.store.put_segment(segment, actor, now)
                envs = None
            else:
                found = await self.store.targeting(request.flag_key, request.environment)
                if found is None:
                    raise Missing("flag", request.flag_key)
                targeting = parse_targeting(request.payload, found[0])
                await self._check_targeting(found[0], targeting, request.environment)
                await self.store.put_targeting(
                    request.flag_key,
                    request.environment,
                    targeting,
                    request.base_version,
                    actor,
                    now,
                    "change_request_applied",
                )
                envs = [request.environment]
        except (Conflict, FieldError, Missing) as exc:
            await self.store.set_status(request.request_id, "conflict", now, only_from="pending")
            raise Conflict(
                f"change request {request.request_id} no longer applies ({exc}); submit it again",
                "stale-change",
            ) from None
        await self.store.set_status(request.request_id, "applied", now, only_from="pending")
        await self.changed(envs)

    async def cancel(self, request_id: str, actor: str) -> ChangeRequest:
        request = await self.change_request(request_id)
        if request.author != actor:
            raise Conflict("only the author can cancel a change request", "not-author")
        if not await self.store.set_status(
            request_id, "cancelled", self.clock.now_ms(), only_from="pending"
        ):
            raise Conflict(f"change request {request_id} is {request.status}", "not-pending")
        return await self.change_request(request_id)

    # --- segments ----------------------------------------------------------------------------

    async def put_segment(
        self, raw: Mapping[str, Any], actor: str, comment: str = ""
    ) -> tuple[Segment, bool] | Pending:
        """Create or replace a segment. A change to one that flags use where approvals are
        required waits for the most approvals any of those environments asks."""
        segment = parse_segment(raw)
        version = await self.store.segment_version(segment.key)
        gated = self.segment_gates(segment.key)
        if version is not None and gated:
            current = await self.store.segment(segment.key)
            if current != segment:
                required = max(e.required_approvals for e in gated)
                request = await self._request(
                    "", "*", "segment", segment.to_dict(), version, actor, comment, required
                )
                return Pending(request)
        created = await self.store.put_segment(segment, actor, self.clock.now_ms())
        await self.changed(None)
        return segment, created

    def segment_gates(self, key: str) -> list[Environment]:
        """The environments requiring approvals where some flag uses segment `key`."""
        return [
            self.environments[env_key]
            for env_key, ruleset in self.rulesets.items()
            if env_key in self.environments
            and self.environments[env_key].approval_required
            and any(key in d.targeting.segments() for d in ruleset.docs.values())
        ]

    async def delete_segment(self, key: str, actor: str) -> None:
        for env_key, ruleset in self.rulesets.items():
            for doc in ruleset.docs.values():
                if key in doc.targeting.segments():
                    raise Conflict(
                        f"flag {doc.flag.key} uses segment {key} in {env_key}", "segment-in-use"
                    )
        if not await self.store.delete_segment(key, actor, self.clock.now_ms()):
            raise Missing("segment", key)
        await self.changed(None)

    # --- SDK keys ----------------------------------------------------------------------------

    async def bind_key(self, key_id: str, env_key: str) -> None:
        await self.store.bind_key(key_id, env_key)
        self.key_environments[key_id] = env_key
        if self.publish is not None:
            await self.publish(orjson.dumps({"origin": self.process_id, "keys_changed": True}))

    # --- usage, hygiene ----------------------------------------------------------------------

    def count(self, env_key: str, flag_key: str, variation: str | None, n: int = 1) -> None:
        k = (flag_key, env_key, variation or "")
        self._usage[k] = self._usage.get(k, 0) + n

    def count_all(self, env_key: str, results: Sequence[Evaluation]) -> None:
        """Count one request's evaluations (not the failed ones). The request only queues
        them; they are added up at the next flush, or once FOLD_EVERY requests wait."""
        self._evaluated.append((env_key, results))
        if len(self._evaluated) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        pending, self._evaluated = self._evaluated, []
        by_env: dict[str, list[Sequence[Evaluation]]] = {}
        for env_key, results in pending:
            lists = by_env.get(env_key)
            if lists is None:
                lists = by_env[env_key] = []
            lists.append(results)
        usage = self._usage
        for env_key, lists in by_env.items():
            # Answers are shared objects, built with the ruleset: count them by identity (all
            # alive until here), in C, then add up per flag and variation.
            flat = list(chain.from_iterable(lists))
            answers = dict(zip(map(id, flat), flat, strict=True))
            for ident, n in Counter(map(id, flat)).items():
                r = answers[ident]
                if r.error_code is None:
                    k = (r.flag_key, env_key, r.variation or "")
                    usage[k] = usage.get(k, 0) + n

    async def flush(self) -> None:
        self._fold()
        usage, self._usage = self._usage, {}
        exposures, self._exposures = self._exposures, []
        conversions, self._conversions = self._conversions, {}
        now = self.clock.now_ms()
        day = datetime.fromtimestamp(now / 1000, UTC).strftime("%Y-%m-%d")
        try:
            await self.store.add_usage([(f, e, day, v, n, now) for (f, e, v), n in usage.items()])
            await self.store.add_exposures(exposures)
            await self.store.add_conversions(
                [(e, m, u, int(c[0]), int(c[1]), c[2]) for (e, m, u), c in conversions.items()]
            )
        except Exception:
            for k, n in usage.items():  # kept for the next flush; the events are dropped
                self._usage[k] = self._usage.get(k, 0) + n
            self.dropped_events += len(exposures) + len(conversions)
            raise

    async def stale(self, env_key: str, days: int) -> list[dict[str, Any]]:
        """Flags not evaluated in `days` days, or serving one variation to everyone that long."""
        ruleset = self.ruleset(env_key)
        now = self.clock.now_ms()
        horizon = now - days * 86_400_000
        first_day = datetime.fromtimestamp(horizon / 1000, UTC).strftime("%Y-%m-%d")
        last = await self.store.last_evaluated(env_key)
        created = await self.store.flag_ages()
        changed = await self.store.targeting_changed(env_key)
        served: dict[str, set[str]] = {}
        for flag_key, _day, variation, _n, _t in await self.store.usage_since(env_key, first_day):
            served.setdefault(flag_key, set()).add(variation)
        out = []
        for key in sorted(ruleset.docs):
            seen = last.get(key)
            if created.get(key, now) > horizon:
                continue  # too young to judge
            if seen is None or seen < horizon:
                out.append({"flag_key": key, "reason": "not_evaluated", "last_evaluated_ms": seen})
                continue
            single = served.get(key, set())
            if len(single) == 1 and changed.get(key, now) <= horizon:
                out.append(
                    {
                        "flag_key": key,
                        "reason": "single_variation",
                        "variation": next(iter(single)),
                        "last_evaluated_ms": seen,
                    }
                )
        return out

    # --- experiments -------------------------------------------------------------------------

    async def create_experiment(self, raw: Mapping[str, Any], actor: str) -> Experiment:
        spec = parse_experiment(raw)
        env_key = spec.environment or self.default_environment
        self.ruleset(env_key)
        flag, _ = await self.get_flag(spec.flag_key)
        control = spec.control or flag.default_variation
        if flag.variation(control) is None:
            raise FieldError("control", f"flag {spec.flag_key} has no variation {control!r}")
        key, flag_key, metric, rate = spec.key, spec.flag_key, spec.metric, spec.sample_rate
        exp = Experiment(
            key,
            flag_key,
            env_key,
            control,
            metric,
            rate,
            "running",
            self.clock.now_ms(),
            None,
            actor,
        )
        await self.store.add_experiment(exp)
        await self.store.audit(
            flag_key, "experiment_started", None, exp.to_dict(), actor, exp.started_at_ms, env_key
        )
        await self.changed([env_key])
        return exp

    async def experiment(self, key: str) -> Experiment:
        exp = await self.store.experiment(key)
        if exp is None:
            raise Missing("experiment", key)
        return exp  # type: ignore[no-any-return]

    async def stop_experiment(self, key: str, actor: str) -> Experiment:
        exp = await self.experiment(key)
        if not await self.store.stop_experiment(key, self.clock.now_ms()):
            raise Conflict(f"experiment {key} is {exp.status}", "not-running")
        await self.store.audit(
            exp.flag_key,
            "experiment_stopped",
            None,
            {"experiment_key": key},
            actor,
            self.clock.now_ms(),
            exp.environment,
        )
        await self.changed([exp.environment])
        return await self.experiment(key)

    async def results(self, key: str, confidence: float = 0.95) -> dict[str, Any]:
        exp = await self.experiment(key)
        await self.flush()
        counts = await self.store.experiment_counts(exp)
        doc = self.rulesets.get(exp.environment, None)
        weights = None
        flag_doc = doc.docs.get(exp.flag_key) if doc else None
        if (
            flag_doc is not None
            and flag_doc.targeting.default_rule is not None
            and flag_doc.targeting.default_rule.is_split
            and not flag_doc.targeting.rules
        ):
            weights = {v: w for v, w in flag_doc.targeting.default_rule.split}
        names = set(counts) | {exp.control}
        if weights:
            names |= set(weights)
        rows = [stats.VariationCounts(v, *counts.get(v, (0, 0))) for v in sorted(names)]
        if weights and set(counts) - set(weights):
            weights = None  # exposures to a variation the split does not name: no SRM check
        result = stats.results(exp.control, rows, weights, confidence=confidence)
        out = result.to_dict()
        out["experiment"] = exp.to_dict()
        return out

    def expose(self, env_key: str, flag_key: str, variation: str, user_id: str, at_ms: int) -> bool:
        """Queue an exposure if a running experiment watches the flag and samples the user."""
        for exp in self.experiments.get(env_key, ()):
            if exp.flag_key != flag_key:
                continue
            if not exposure_sampled(flag_key, user_id, exp.sample_rate):
                return False
            if len(self._exposures) >= MAX_QUEUED_EVENTS:
                self.dropped_events += 1
                return False
            self._exposures.append((exp.key, user_id, variation, at_ms))
            return True
        return False

    def convert(
        self, env_key: str, metric: str, user_id: str, value: float | None, at_ms: int
    ) -> None:
        k = (env_key, metric, user_id)
        seen = self._conversions.get(k)
        if seen is None:
            if len(self._conversions) >= MAX_QUEUED_EVENTS:
                self.dropped_events += 1
                return
            self._conversions[k] = [float(at_ms), 1.0, float(value or 0.0)]
        else:
            seen[0] = min(seen[0], at_ms)
            seen[1] += 1
            seen[2] += float(value or 0.0)

    # --- guarded roll-outs -------------------------------------------------------------------

    async def guard_report(self, key: str, env_key: str, requests: int, errors: int) -> bool:
        """Add one report of a guarded flag's requests and errors; True if the guard breached
        (the flag was turned off)."""
        ruleset = self.ruleset(env_key)
        doc = ruleset.docs.get(key)
        if doc is None:
            raise Missing("flag", key)
        guard = doc.targeting.guard
        if guard is None or not doc.targeting.enabled:
            return False
        now = self.clock.now()
        window = self._guards.setdefault((key, env_key), [])
        window.append(now)
        window.append(float(requests))
        window.append(float(errors))
        cutoff = now - guard.window_seconds
        while window and window[0] < cutoff:
            del window[:3]
        total = sum(window[1::3])
        failed = sum(window[2::3])
        if total < guard.min_requests or failed / total <= guard.threshold:
            return False
        rate = failed / total
        self._guards.pop((key, env_key), None)
        current, _ = await self.targeting(key, env_key)
        if not current.enabled:
            return False
        await self.store.put_targeting(
            key,
            env_key,
            replace(current, enabled=False),
            None,
            "guard",
            self.clock.now_ms(),
            "guard_reverted",
        )
        log.warning(
            "flags.guard_breached", flag=key, environment=env_key, error_rate=round(rate, 4)
        )
        await self.changed([env_key])
        for hook in self.on_guard_breach:
            await hook(key, env_key, rate)
        return True


# --- helpers ---------------------------------------------------------------------------------


def _variation_with(flag: FlagDef, value: Any) -> str | None:
    for v in flag.variations:
        if v.value is value:
            return v.key
    return None


def _variations_used(targeting: Targeting) -> set[str]:
    used: set[str] = set()
    serves: list[Serve] = [r.serve for r in targeting.rules]
    if targeting.default_rule is not None:
        serves.append(targeting.default_rule)
    for s in serves:
        used.update(s.variations())
    if targeting.off_variation:
        used.add(targeting.off_variation)
    return used


def _experiment_list(exps: Sequence[Experiment]) -> list[dict[str, Any]]:
    return [{"flag_key": e.flag_key, "sample_rate": e.sample_rate} for e in exps]


def _patch(old: Ruleset, new: Ruleset, exps: Sequence[Experiment]) -> dict[str, Any]:
    changed = [
        d.to_dict()
        for k, d in new.docs.items()
        if k not in old.docs or old.docs[k].version != d.version
    ]
    segs = [s.to_dict() for k, s in new.segments.items() if old.segments.get(k) != s]
    return {
        "revision": new.revision,
        "flags": changed,
        "deleted_flags": sorted(set(old.docs) - set(new.docs)),
        "segments": segs,
        "deleted_segments": sorted(set(old.segments) - set(new.segments)),
        "experiments": _experiment_list(exps),
    }
