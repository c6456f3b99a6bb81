"""Local flag evaluation: pure, no I/O, the same code in the server and in every SDK process.

An environment's ruleset (every flag with its targeting there, and every segment) is compiled
once into closures and prebuilt answers, so that evaluating a flag allocates nothing but the
bucket of a roll-out.

Bucketing, version 1 (docs/flags-bucketing.md has test vectors for other SDKs):
    bucket = int.from_bytes(sha256(utf8(salt + ":" + value)).digest()[:8], "big") % 100_000
where `salt` is the flag's salt (its key unless set) and `value` the bucketing attribute as
text (a string as is, an integer in decimal, `true`/`false`). A user is in a roll-out of p%
when bucket < round(p * 1000); a split gives each variation the next weight * 1000 buckets,
in the order listed.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tenfold.flags.models import (
    BUCKET_SCALE,
    Condition,
    FlagDef,
    Segment,
    Serve,
    Targeting,
    compile_regex,
    epoch_ms,
    is_number,
    parse_flag,
    parse_segment,
    parse_targeting,
    semver_key,
    thousandths,
)

BUCKETING_VERSION = 1

# OpenFeature resolution reasons, and the one tenfold adds for an unmet prerequisite.
STATIC = "STATIC"
DEFAULT = "DEFAULT"
TARGETING_MATCH = "TARGETING_MATCH"
SPLIT = "SPLIT"
DISABLED = "DISABLED"
ERROR = "ERROR"
PREREQUISITE_FAILED = "PREREQUISITE_FAILED"

# OpenFeature error codes.
FLAG_NOT_FOUND = "FLAG_NOT_FOUND"
TYPE_MISMATCH = "TYPE_MISMATCH"
PARSE_ERROR = "PARSE_ERROR"
TARGETING_KEY_MISSING = "TARGETING_KEY_MISSING"
INVALID_CONTEXT = "INVALID_CONTEXT"
GENERAL = "GENERAL"

Context = Mapping[str, Any]
Predicate = Callable[[Context], bool]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One flag's answer for one context. `value` is shared: do not change it in place."""

    flag_key: str
    value: Any
    variation: str | None
    reason: str
    error_code: str | None = None
    rule_id: str | None = None
    error_message: str | None = None
    # to_dict(), made once: answers are built when a ruleset is compiled and served many times.
    # Shared like `value`: serialise it, never change it.
    doc: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc", self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        out = {
            "flag_key": self.flag_key,
            "value": self.value,
            "variation": self.variation,
            "reason": self.reason,
        }
        if self.rule_id is not None:
            out["rule_id"] = self.rule_id
        if self.error_code is not None:
            out["error_code"] = self.error_code
            out["error_message"] = self.error_message
        return out


def bucket_text(value: object) -> str | None:
    """A bucketing attribute as the text that is hashed; None when it cannot be one."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return None


def bucket(salt: str, value: str) -> int:
    """The user's bucket, 0..99,999, for a flag (bucketing version 1)."""
    return bucketer(salt)(value)


def exposure_sampled(flag_key: str, user_id: str, sample_rate: float) -> bool:
    """Whether an experiment sampling `sample_rate` of the users on `flag_key` records this
    user's exposures (the same users in the server and every SDK)."""
    return bucket(f"exposure:{flag_key}", user_id) < sample_rate * BUCKET_SCALE


def bucketer(salt: str) -> Callable[[str], int]:
    """`bucket` for one salt, with the salt's hash state computed once."""
    prefix = hashlib.sha256(f"{salt}:".encode())
    from_bytes = int.from_bytes

    def bucket_of(value: str) -> int:
        h = prefix.copy()
        h.update(value.encode())
        return from_bytes(h.digest()[:8], "big") % BUCKET_SCALE

    return bucket_of


_ALIASED = {"user_id": "targetingKey", "targetingKey": "user_id"}  # each stands in for the other


def attribute_getter(name: str) -> Callable[[Context], Any]:
    """Reads `name` from a context: a top-level key, else a dotted path into nested objects.
    `user_id` and OpenFeature's `targetingKey` stand in for each other."""
    alias = _ALIASED.get(name)
    path = tuple(name.split(".")) if "." in name else ()

    if alias is None and not path:
        return lambda ctx: ctx.get(name)

    def get(ctx: Context) -> Any:
        value = ctx.get(name)
        if value is None and alias is not None:
            value = ctx.get(alias)
        if value is None and path:
            node: Any = ctx
            for part in path:
                if not isinstance(node, Mapping):
                    return None
                node = node.get(part)
            value = node
        return value

    return get


# --- conditions ------------------------------------------------------------------------------


def _scalar_test(cond: Condition) -> Callable[[Any], bool]:
    """A test of one attribute value (not a list) against the condition's values."""
    op, values = cond.operator, cond.values
    if op in ("equals", "in"):
        strings = frozenset(v for v in values if isinstance(v, str))
        numbers = frozenset(v for v in values if is_number(v))
        bools = frozenset(v for v in values if isinstance(v, bool))

        def equals(x: Any) -> bool:
            if isinstance(x, str):
                return x in strings
            if isinstance(x, bool):
                return x in bools
            if is_number(x):
                return x in numbers
            return False

        return equals
    if op == "contains":
        return lambda x: isinstance(x, str) and any(v in x for v in values)
    if op == "starts_with":
        prefixes = tuple(values)
        return lambda x: isinstance(x, str) and x.startswith(prefixes)
    if op == "ends_with":
        suffixes = tuple(values)
        return lambda x: isinstance(x, str) and x.endswith(suffixes)
    if op == "regex":
        patterns = [compile_regex(v, "values") for v in values]
        return lambda x: isinstance(x, str) and any(p.search(x) is not None for p in patterns)
    if op in ("lt", "lte", "gt", "gte"):
        compare = _ORDER[op]
        return lambda x: is_number(x) and any(compare(x, v) for v in values)
    if op.startswith("semver_"):
        compare = _ORDER.get(op[7:], _eq)
        keys = [semver_key(v) for v in values]

        def semver(x: Any) -> bool:
            k = _semver_cached(x) if isinstance(x, str) and len(x) <= 64 else None
            return k is not None and any(compare(k, v) for v in keys)

        return semver
    if op in ("before", "after"):
        times = [epoch_ms(v) for v in values]
        compare = _ORDER["lt" if op == "before" else "gt"]

        def when(x: Any) -> bool:
            t = epoch_ms(x)
            return t is not None and any(compare(t, v) for v in times)

        return when
    raise ValueError(f"unsupported operator {op!r}")


_semver_cached = functools.lru_cache(maxsize=4096)(semver_key)  # app versions repeat


def _eq(a: Any, b: Any) -> bool:
    return bool(a == b)


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "eq": _eq,
}


def compile_condition(cond: Condition, segments: Mapping[str, Predicate]) -> Predicate:
    """A condition as a predicate. A missing attribute never matches, negated or not; a list
    attribute matches when any of its items does."""
    if cond.operator == "in_segment":
        members = [segments[str(v)] for v in cond.values]
        if cond.negate:
            return lambda ctx: not any(m(ctx) for m in members)
        return lambda ctx: any(m(ctx) for m in members)
    get = attribute_getter(cond.attribute)
    test = _scalar_test(cond)
    negate = cond.negate
    name = cond.attribute
    if name in _ALIASED or "." in name:

        def predicate(ctx: Context) -> bool:
            value = get(ctx)
            return value is not None and _holds(test, value, negate)

        return predicate
    # The same for a top-level attribute, read in place; equality on a string is answered
    # inline. Most conditions are these, and an evaluation runs several per flag.
    strings = (
        frozenset(v for v in cond.values if isinstance(v, str))
        if cond.operator in ("equals", "in")
        else None
    )

    def top_level(ctx: Context) -> bool:
        value = ctx.get(name)
        if value is None:
            return False
        if strings is not None and value.__class__ is str:
            return (value in strings) is not negate
        return _holds(test, value, negate)

    return top_level


def _holds(test: Callable[[Any], bool], value: Any, negate: bool) -> bool:
    """A condition's answer for a present value: a list matches when any item does."""
    hit = any(test(item) for item in value) if isinstance(value, list) else test(value)
    return hit is not negate


def compile_segment(segment: Segment) -> Predicate:
    get = attribute_getter(segment.attribute)
    included, excluded = segment.included, segment.excluded
    conditions = [compile_condition(c, {}) for c in segment.conditions]

    def member(ctx: Context) -> bool:
        ident = bucket_text(get(ctx))
        if ident is not None:
            if ident in excluded:
                return False
            if ident in included:
                return True
        return bool(conditions) and all(c(ctx) for c in conditions)

    return member


# --- flags -----------------------------------------------------------------------------------


class _Split:
    """Bucket ranges of a split: (upper bound, answer) in order."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: list[tuple[int, Evaluation]]) -> None:
        self.ranges = ranges

    def pick(self, b: int) -> Evaluation:
        for upper, answer in self.ranges:
            if b < upper:
                return answer
        return self.ranges[-1][1]


class CompiledFlag:
    """One flag in one environment, ready to evaluate."""

    __slots__ = (
        "answer_default",
        "default_split",
        "enabled",
        "flag",
        "get_bucket_value",
        "missing_key",
        "off",
        "prerequisite_failed",
        "prerequisites",
        "rules",
        "salt",
        "salted",
        "targeting",
        "version",
    )

    def __init__(
        self,
        flag: FlagDef,
        targeting: Targeting,
        segments: Mapping[str, Predicate],
        version: int = 0,
    ) -> None:
        self.flag, self.targeting, self.version = flag, targeting, version
        self.enabled = targeting.enabled
        self.salt = flag.salt or flag.key
        self.salted = bucketer(self.salt)
        self.get_bucket_value = attribute_getter(flag.bucket_by)
        key = flag.key
        default_var = flag.default_variation

        def answer(variation: str, reason: str, rule_id: str | None = None) -> Evaluation:
            v = flag.variation(variation)
            value = v.value if v is not None else flag.default_value
            return Evaluation(key, value, variation, reason, rule_id=rule_id)

        if targeting.off_variation is not None:
            self.off = answer(targeting.off_variation, DISABLED)
            self.prerequisite_failed = answer(targeting.off_variation, PREREQUISITE_FAILED)
        else:
            self.off = Evaluation(key, flag.default_value, default_var, DISABLED)
            self.prerequisite_failed = Evaluation(
                key, flag.default_value, default_var, PREREQUISITE_FAILED
            )
        self.missing_key = Evaluation(
            key,
            flag.default_value,
            default_var,
            ERROR,
            TARGETING_KEY_MISSING,
            error_message=f"the context has no {flag.bucket_by!r} to bucket by",
        )
        self.prerequisites = tuple((p.flag, p.variation) for p in targeting.prerequisites)
        # rules: (predicates, kind, payload): kind 0 fixed answer, 1 roll-out, 2 split
        self.rules: list[tuple[tuple[Predicate, ...], int, Any, Any]] = []
        for rule in targeting.rules:
            preds = tuple(compile_condition(c, segments) for c in rule.conditions)
            serve = rule.serve
            if serve.is_split:
                self.rules.append((preds, 2, self._split(serve, rule.id, answer), None))
            elif serve.rollout_percentage < 100:
                threshold = thousandths(serve.rollout_percentage)
                self.rules.append(
                    (preds, 1, threshold, answer(serve.variation or "", SPLIT, rule.id))
                )
            else:
                self.rules.append(
                    (preds, 0, answer(serve.variation or "", TARGETING_MATCH, rule.id), None)
                )
        self.default_split: _Split | None = None
        no_rules_reason = STATIC if not targeting.rules else DEFAULT
        d = targeting.default_rule
        if d is None:
            self.answer_default = Evaluation(key, flag.default_value, default_var, no_rules_reason)
        elif d.is_split:
            self.default_split = self._split(d, None, answer)
            self.answer_default = self.missing_key
        else:
            self.answer_default = answer(d.variation or "", no_rules_reason)

    @staticmethod
    def _split(
        serve: Serve, rule_id: str | None, answer: Callable[[str, str, str | None], Evaluation]
    ) -> _Split:
        ranges, upper = [], 0
        for variation, weight in serve.split:
            upper += thousandths(weight)
            ranges.append((upper, answer(variation, SPLIT, rule_id)))
        return _Split(ranges)

    def bucket_of(self, ctx: Context) -> int | None:
        value = self.get_bucket_value(ctx)
        if value.__class__ is str:  # the usual case, without bucket_text's checks
            return self.salted(value)
        text = bucket_text(value)
        return None if text is None else self.salted(text)

    def evaluate(
        self, ctx: Context, flags: Mapping[str, CompiledFlag], depth: int = 0
    ) -> Evaluation:
        if not self.enabled:
            return self.off
        for other_key, wanted in self.prerequisites:
            other = flags.get(other_key)
            if other is None or depth > 20:
                return self.prerequisite_failed
            got = other.evaluate(ctx, flags, depth + 1)
            if got.variation != wanted or got.reason in _NOT_SERVING:
                return self.prerequisite_failed
        b = -1
        for preds, kind, payload, extra in self.rules:
            for p in preds:
                if not p(ctx):
                    break
            else:
                if kind == 0:
                    return payload  # type: ignore[no-any-return]
                if b < 0:
                    found = self.bucket_of(ctx)
                    if found is None:
                        continue  # no key to bucket by: the roll-out does not apply
                    b = found
                if kind == 1:
                    if b < payload:
                        return extra  # type: ignore[no-any-return]
                    continue
                return payload.pick(b)  # type: ignore[no-any-return]
        if self.default_split is not None:
            if b < 0:
                found = self.bucket_of(ctx)
                if found is None:
                    return self.missing_key
                b = found
            return self.default_split.pick(b)
        return self.answer_default


_NOT_SERVING = frozenset({DISABLED, ERROR, PREREQUISITE_FAILED})


@dataclass(frozen=True, slots=True)
class FlagDoc:
    """A flag and its targeting in one environment, as stored and as streamed to SDKs."""

    flag: FlagDef
    targeting: Targeting
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = self.flag.to_dict()
        out["targeting"] = self.targeting.to_dict()
        out["version"] = self.version
        return out


def parse_flag_doc(raw: Mapping[str, Any]) -> FlagDoc:
    body = dict(raw)
    targeting = body.pop("targeting", None) or {}
    version = int(body.pop("version", 0) or 0)
    flag = parse_flag(body)
    return FlagDoc(flag, parse_targeting(targeting, flag, path="targeting"), version)


class Ruleset:
    """Every flag of one environment, compiled; evaluates with no I/O."""

    def __init__(
        self,
        environment: str,
        revision: int,
        flags: Iterable[FlagDoc],
        segments: Iterable[Segment],
    ) -> None:
        self.environment = environment
        self.revision = revision
        self.segments = {s.key: s for s in segments}
        self.docs = {d.flag.key: d for d in flags}
        predicates = {k: compile_segment(s) for k, s in self.segments.items()}
        self.flags: dict[str, CompiledFlag] = {
            k: CompiledFlag(d.flag, d.targeting, predicates, d.version)
            for k, d in self.docs.items()
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Ruleset:
        """A ruleset from its JSON document (what the stream and the export send)."""
        return cls(
            str(raw.get("environment", "")),
            int(raw.get("revision", 0)),
            (parse_flag_doc(f) for f in raw.get("flags", ())),
            (parse_segment(s) for s in raw.get("segments", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "revision": self.revision,
            "bucketing_version": BUCKETING_VERSION,
            "flags": [d.to_dict() for d in self.docs.values()],
            "segments": [s.to_dict() for s in self.segments.values()],
        }

    def evaluate(self, flag_key: str, ctx: Context) -> Evaluation:
        compiled = self.flags.get(flag_key)
        if compiled is None:
            return Evaluation(
                flag_key,
                None,
                None,
                ERROR,
                FLAG_NOT_FOUND,
                error_message=f"flag {flag_key!r} does not exist in {self.environment!r}",
            )
        return compiled.evaluate(ctx, self.flags)

    def evaluate_all(self, ctx: Context) -> list[Evaluation]:
        flags = self.flags
        return [c.evaluate(ctx, flags) for c in flags.values()]
