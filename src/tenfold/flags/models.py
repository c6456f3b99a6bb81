"""Flag definitions, targeting and segments: parsed from JSON documents and validated.

A flag is the same in every environment (key, type, variations, default value, bucketing);
its targeting is per environment (enabled, ordered rules, default rule, off variation,
prerequisites, guard). Every error names the JSON path of the offending input, such as
`rules[0].conditions[1].operator`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tenfold.kernel.errors import FieldError

FLAG_TYPES = ("boolean", "string", "number", "json")
OPERATORS = (
    "equals",
    "in",
    "contains",
    "starts_with",
    "ends_with",
    "regex",
    "lt",
    "lte",
    "gt",
    "gte",
    "semver_eq",
    "semver_lt",
    "semver_lte",
    "semver_gt",
    "semver_gte",
    "before",
    "after",
    "in_segment",
)
NUMERIC_OPERATORS = ("lt", "lte", "gt", "gte")
SEMVER_OPERATORS = ("semver_eq", "semver_lt", "semver_lte", "semver_gt", "semver_gte")
STRING_OPERATORS = ("contains", "starts_with", "ends_with")
DATE_OPERATORS = ("before", "after")

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")
ATTRIBUTE_PATTERN = re.compile(r"[A-Za-z_$][A-Za-z0-9_.\-$]{0,99}")
BUCKET_SCALE = 100_000  # buckets 0..99,999: steps of 0.001%
MAX_VARIATIONS = 100
MAX_RULES = 200
MAX_CONDITIONS = 50
MAX_VALUES = 10_000  # values of one condition (a list of user ids, say)
MAX_SEGMENT_USERS = 100_000
MAX_PREREQUISITES = 20
MAX_REGEX = 1_000  # characters of one pattern
MAX_TEXT = 2_000
MAX_TAGS = 50
MAX_JSON_VALUE_BYTES = 64 * 1024

SEMVER = re.compile(
    r"v?(0|[1-9]\d*)\.(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)


# --- values ----------------------------------------------------------------------------------


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def type_of(value: object) -> str | None:
    """The flag type a JSON value fits, most specific first; None if it fits none."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if is_number(value):
        return "number"
    if isinstance(value, dict | list):
        return "json"
    return None


def fits(flag_type: str, value: object) -> bool:
    if flag_type == "json":
        return isinstance(value, dict | list)
    return type_of(value) == flag_type


SemverKey = tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]


def semver_key(text: object) -> SemverKey | None:
    """The precedence key of a semantic version (SemVer 2.0; `1.2` reads as `1.2.0`)."""
    if not isinstance(text, str):
        return None
    m = SEMVER.fullmatch(text)
    if m is None:
        return None
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3] or 0), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    ids = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (major, minor, patch, 0, ids)


def epoch_ms(value: object) -> float | None:
    """A time as milliseconds since the epoch: a number is already that, a string is ISO 8601
    (no zone means UTC)."""
    if is_number(value):
        return float(value)  # type: ignore[arg-type]
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() * 1000.0


def thousandths(percent: float) -> int:
    """A percentage as buckets out of 100,000 (0.001% steps)."""
    return round(percent * 1000)


# --- the parts of a flag ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variation:
    key: str
    value: Any
    name: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "value": self.value}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class Condition:
    attribute: str
    operator: str
    values: tuple[Any, ...]
    negate: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attribute": self.attribute,
            "operator": self.operator,
            "values": list(self.values),
        }
        if self.negate:
            out["negate"] = True
        return out


@dataclass(frozen=True, slots=True)
class Serve:
    """What a rule (or the default rule) serves: one variation, to a share of users, or a split.

    `rollout_percentage` < 100 serves `variation` to that share of the users the rule matches;
    the others go on to the next rule. `split` shares every matching user out by weight.
    """

    variation: str | None = None
    rollout_percentage: float = 100.0
    split: tuple[tuple[str, float], ...] = ()

    @property
    def is_split(self) -> bool:
        return bool(self.split)

    @property
    def is_rollout(self) -> bool:
        return bool(self.split) or self.rollout_percentage < 100.0

    def variations(self) -> list[str]:
        return [v for v, _ in self.split] if self.split else [self.variation or ""]

    def to_dict(self) -> dict[str, Any]:
        if self.split:
            return {"split": [{"variation": v, "weight": w} for v, w in self.split]}
        out: dict[str, Any] = {"variation": self.variation}
        if self.rollout_percentage < 100.0:
            out["rollout_percentage"] = self.rollout_percentage
        return out


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    conditions: tuple[Condition, ...]
    serve: Serve
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "conditions": [c.to_dict() for c in self.conditions]}
        out.update(self.serve.to_dict())
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class Prerequisite:
    flag: str
    variation: str

    def to_dict(self) -> dict[str, Any]:
        return {"flag": self.flag, "variation": self.variation}


@dataclass(frozen=True, slots=True)
class Guard:
    """A guard metric watched during a roll-out: when the share of failed requests among
    those served the flag's non-default variations exceeds `threshold` (with at least
    `min_requests` seen in `window_seconds`), the flag is turned off."""

    threshold: float
    min_requests: int = 100
    window_seconds: int = 300
    metric: str = "error_rate"

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "threshold": self.threshold,
            "min_requests": self.min_requests,
            "window_seconds": self.window_seconds,
        }


@dataclass(frozen=True, slots=True)
class Targeting:
    """A flag's behaviour in one environment."""

    enabled: bool = False
    rules: tuple[Rule, ...] = ()
    default_rule: Serve | None = None  # None: the flag's default value
    off_variation: str | None = None  # None: the flag's default value
    prerequisites: tuple[Prerequisite, ...] = ()
    guard: Guard | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "rules": [r.to_dict() for r in self.rules],
            "default_rule": self.default_rule.to_dict() if self.default_rule else None,
            "off_variation": self.off_variation,
            "prerequisites": [p.to_dict() for p in self.prerequisites],
            "guard": self.guard.to_dict() if self.guard else None,
        }

    def segments(self) -> set[str]:
        return {
            str(v)
            for r in self.rules
            for c in r.conditions
            if c.operator == "in_segment"
            for v in c.values
        }


@dataclass(frozen=True, slots=True)
class FlagDef:
    """What a flag is in every environment."""

    key: str
    name: str
    flag_type: str
    default_value: Any
    variations: tuple[Variation, ...]
    description: str = ""
    bucket_by: str = "user_id"
    salt: str = ""
    tags: tuple[str, ...] = ()

    @property
    def default_variation(self) -> str:
        """The key of the variation holding the default value ("default" if none does)."""
        for v in self.variations:
            if v.value == self.default_value and type(v.value) is type(self.default_value):
                return v.key
        return "default"

    def variation(self, key: str) -> Variation | None:
        for v in self.variations:
            if v.key == key:
                return v
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "flag_key": self.key,
            "name": self.name,
            "description": self.description,
            "flag_type": self.flag_type,
            "default_value": self.default_value,
            "variations": [v.to_dict() for v in self.variations],
            "bucket_by": self.bucket_by,
            "salt": self.salt,
            "tags": list(self.tags),
        }


@dataclass(frozen=True, slots=True)
class Segment:
    """A reusable group of users: listed ids first (excluded wins), then every condition."""

    key: str
    name: str = ""
    description: str = ""
    attribute: str = "user_id"  # what `included`/`excluded` list
    included: frozenset[str] = field(default_factory=frozenset)
    excluded: frozenset[str] = field(default_factory=frozenset)
    conditions: tuple[Condition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "segment_key": self.key,
            "name": self.name,
            "description": self.description,
            "attribute": self.attribute,
            "included": sorted(self.included),
            "excluded": sorted(self.excluded),
            "conditions": [c.to_dict() for c in self.conditions],
        }


# --- parsing ---------------------------------------------------------------------------------


class _Doc:
    """Reads one JSON object, naming paths in errors and refusing unknown fields."""

    def __init__(self, raw: object, path: str, known: Sequence[str]) -> None:
        if not isinstance(raw, Mapping):
            raise FieldError(path or "body", "must be a JSON object")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise FieldError(self._at(path, str(unknown[0])), "is not a known field")
        self.raw = raw
        self.path = path

    @staticmethod
    def _at(path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    def at(self, name: str) -> str:
        return self._at(self.path, name)

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def text(
        self, name: str, *, default: str | None = None, limit: int = MAX_TEXT, pattern: Any = None
    ) -> str:
        value = self.raw.get(name)
        if value is None:
            if default is None:
                raise FieldError(self.at(name), "is required")
            return default
        if not isinstance(value, str):
            raise FieldError(self.at(name), "must be a string")
        if len(value) > limit:
            raise FieldError(self.at(name), f"must be at most {limit} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise FieldError(self.at(name), f"must match {pattern.pattern}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise FieldError(self.at(name), "must be true or false")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(name)
        if value is None:
            return default
        if not is_number(value) or not low <= value <= high:
            raise FieldError(self.at(name), f"must be a number from {low:g} to {high:g}")
        return float(value)

    def items(self, name: str, limit: int) -> list[Any]:
        value = self.raw.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise FieldError(self.at(name), "must be a list")
        if len(value) > limit:
            raise FieldError(self.at(name), f"must hold at most {limit} items")
        return value


def parse_key(value: object, path: str, what: str = "key") -> str:
    if not isinstance(value, str) or not KEY_PATTERN.fullmatch(value):
        raise FieldError(
            path,
            f"a {what} is 1-200 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


def _json_size(value: object) -> int:
    import orjson

    return len(orjson.dumps(value))


def parse_flag(raw: object, *, path: str = "") -> FlagDef:
    doc = _Doc(
        raw,
        path,
        (
            "flag_key",
            "name",
            "description",
            "flag_type",
            "default_value",
            "variations",
            "bucket_by",
            "salt",
            "tags",
        ),
    )
    key = parse_key(doc.raw.get("flag_key"), doc.at("flag_key"), "flag key")
    flag_type = doc.text("flag_type", default="boolean")
    if flag_type not in FLAG_TYPES:
        raise FieldError(doc.at("flag_type"), f"must be one of {', '.join(FLAG_TYPES)}")
    if "default_value" not in doc.raw:
        raise FieldError(doc.at("default_value"), "is required")
    default_value = doc.raw["default_value"]
    if not fits(flag_type, default_value):
        raise FieldError(doc.at("default_value"), f"must be a {flag_type} value")
    if flag_type == "json" and _json_size(default_value) > MAX_JSON_VALUE_BYTES:
        raise FieldError(doc.at("default_value"), f"must be at most {MAX_JSON_VALUE_BYTES} bytes")
    variations = _variations(doc, flag_type, default_value)
    tags = []
    for i, tag in enumerate(doc.items("tags", MAX_TAGS)):
        if not isinstance(tag, str) or not 1 <= len(tag) <= 100:
            raise FieldError(doc.at(f"tags[{i}]"), "must be a string of 1-100 characters")
        tags.append(tag)
    return FlagDef(
        key=key,
        name=doc.text("name", default=key, limit=255),
        description=doc.text("description", default=""),
        flag_type=flag_type,
        default_value=default_value,
        variations=variations,
        bucket_by=doc.text("bucket_by", default="user_id", pattern=ATTRIBUTE_PATTERN),
        salt=doc.text("salt", default=key, limit=200),
        tags=tuple(dict.fromkeys(tags)),
    )


def _variations(doc: _Doc, flag_type: str, default_value: Any) -> tuple[Variation, ...]:
    items = doc.items("variations", MAX_VARIATIONS)
    if not items:
        if flag_type == "boolean":
            return (Variation("on", True), Variation("off", False))
        return (Variation("default", default_value),)
    out: list[Variation] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        v = _Doc(item, doc.at(f"variations[{i}]"), ("key", "value", "name", "description"))
        key = parse_key(v.raw.get("key"), v.at("key"), "variation key")
        if key in seen:
            raise FieldError(v.at("key"), f"variation {key!r} is listed twice")
        seen.add(key)
        if "value" not in v.raw:
            raise FieldError(v.at("value"), "is required")
        value = v.raw["value"]
        if not fits(flag_type, value):
            raise FieldError(v.at("value"), f"must be a {flag_type} value")
        if flag_type == "json" and _json_size(value) > MAX_JSON_VALUE_BYTES:
            raise FieldError(v.at("value"), f"must be at most {MAX_JSON_VALUE_BYTES} bytes")
        out.append(
            Variation(
                key, value, v.text("name", default="", limit=255), v.text("description", default="")
            )
        )
    return tuple(out)


def _condition(raw: object, path: str, *, allow_segments: bool) -> Condition:
    doc = _Doc(raw, path, ("attribute", "operator", "values", "value", "negate"))
    operator = doc.text("operator")
    if operator not in OPERATORS:
        raise FieldError(doc.at("operator"), f"unsupported operator; one of {', '.join(OPERATORS)}")
    if doc.has("values") and doc.has("value"):
        raise FieldError(doc.at("value"), "give `values` or `value`, not both")
    if doc.has("value"):
        values = [doc.raw["value"]]
        values_path = doc.at("value")
    else:
        values = doc.items("values", MAX_VALUES)
        values_path = doc.at("values")
    if not values:
        raise FieldError(values_path, "must hold at least one value")
    if operator == "in_segment":
        if not allow_segments:
            raise FieldError(doc.at("operator"), "a segment's conditions cannot name segments")
        attribute = doc.text("attribute", default="", limit=100)
        for i, value in enumerate(values):
            parse_key(value, f"{values_path}[{i}]", "segment key")
    else:
        attribute = doc.text("attribute", pattern=ATTRIBUTE_PATTERN)
    for i, value in enumerate(values):
        _check_value(operator, value, f"{values_path}[{i}]")
    return Condition(attribute, operator, tuple(values), doc.boolean("negate", False))


def _check_value(operator: str, value: object, path: str) -> None:
    if operator in NUMERIC_OPERATORS:
        if not is_number(value):
            raise FieldError(path, f"{operator} compares numbers")
    elif operator in SEMVER_OPERATORS:
        if semver_key(value) is None:
            raise FieldError(path, "is not a semantic version (such as 1.4.0 or 2.0.0-beta.1)")
    elif operator in DATE_OPERATORS:
        if epoch_ms(value) is None:
            raise FieldError(path, "must be an ISO 8601 time or milliseconds since the epoch")
    elif operator in STRING_OPERATORS:
        if not isinstance(value, str):
            raise FieldError(path, f"{operator} compares strings")
    elif operator == "regex":
        if not isinstance(value, str) or len(value) > MAX_REGEX:
            raise FieldError(path, f"must be a pattern of at most {MAX_REGEX} characters")
        compile_regex(value, path)
    elif operator in ("equals", "in"):
        if not (isinstance(value, str | bool) or is_number(value)):
            raise FieldError(path, f"{operator} compares strings, numbers or booleans")


def compile_regex(pattern: str, path: str) -> Any:
    """A linear-time (RE2) pattern; constructs RE2 cannot run in linear time are refused."""
    import re2

    options = re2.Options()
    options.log_errors = False
    options.max_mem = 8 << 20
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        message = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise FieldError(path, f"invalid or unsupported regular expression ({message})") from None


def _serve(doc: _Doc, variations: set[str]) -> Serve:
    if doc.has("split"):
        if doc.has("variation"):
            raise FieldError(doc.at("variation"), "give `variation` or `split`, not both")
        if doc.has("rollout_percentage"):
            raise FieldError(doc.at("rollout_percentage"), "a split already shares users out")
        parts: list[tuple[str, float]] = []
        seen: set[str] = set()
        total = 0
        items = doc.items("split", MAX_VARIATIONS)
        if not items:
            raise FieldError(doc.at("split"), "must name at least one variation")
        for i, item in enumerate(items):
            part = _Doc(item, doc.at(f"split[{i}]"), ("variation", "weight"))
            name = part.text("variation", limit=200)
            if name not in variations:
                raise FieldError(part.at("variation"), f"is not a variation of this flag: {name!r}")
            if name in seen:
                raise FieldError(part.at("variation"), f"variation {name!r} is listed twice")
            seen.add(name)
            weight = part.number("weight", -1, 0, 100)
            if weight < 0:
                raise FieldError(part.at("weight"), "is required")
            if abs(weight * 1000 - thousandths(weight)) > 1e-6:
                raise FieldError(part.at("weight"), "is a percentage with at most 3 decimals")
            total += thousandths(weight)
            parts.append((name, weight))
        if total != BUCKET_SCALE:
            raise FieldError(
                doc.at("split"), f"weights must sum to 100 (they sum to {total / 1000:g})"
            )
        return Serve(split=tuple(parts))
    name = doc.text("variation", limit=200)
    if name not in variations:
        raise FieldError(doc.at("variation"), f"is not a variation of this flag: {name!r}")
    pct = doc.number("rollout_percentage", 100.0, 0, 100)
    if abs(pct * 1000 - thousandths(pct)) > 1e-6:
        raise FieldError(doc.at("rollout_percentage"), "is a percentage with at most 3 decimals")
    return Serve(variation=name, rollout_percentage=pct)


def parse_targeting(raw: object, flag: FlagDef, *, path: str = "") -> Targeting:
    """One environment's targeting of `flag`; references to other flags and segments are
    checked by the caller, who knows them (`check_references`)."""
    doc = _Doc(
        raw,
        path,
        ("enabled", "rules", "default_rule", "off_variation", "prerequisites", "guard"),
    )
    variations = {v.key for v in flag.variations}
    rules: list[Rule] = []
    ids: set[str] = set()
    for i, item in enumerate(doc.items("rules", MAX_RULES)):
        r = _Doc(
            item,
            doc.at(f"rules[{i}]"),
            ("id", "description", "conditions", "variation", "rollout_percentage", "split"),
        )
        rule_id = r.text("id", default=f"rule-{i + 1}", limit=100)
        if rule_id in ids:
            raise FieldError(r.at("id"), f"rule id {rule_id!r} is used twice")
        ids.add(rule_id)
        conditions = tuple(
            _condition(c, r.at(f"conditions[{j}]"), allow_segments=True)
            for j, c in enumerate(r.items("conditions", MAX_CONDITIONS))
        )
        rules.append(
            Rule(rule_id, conditions, _serve(r, variations), r.text("description", default=""))
        )
    default_rule = None
    if doc.has("default_rule"):
        d = _Doc(
            doc.raw["default_rule"],
            doc.at("default_rule"),
            ("variation", "rollout_percentage", "split"),
        )
        default_rule = _serve(d, variations)
        if not default_rule.is_split and default_rule.rollout_percentage < 100:
            raise FieldError(
                d.at("rollout_percentage"),
                "the default rule serves everyone left; use a split to share them out",
            )
    off = None
    if doc.has("off_variation"):
        off = doc.text("off_variation", limit=200)
        if off not in variations:
            raise FieldError(doc.at("off_variation"), f"is not a variation of this flag: {off!r}")
    prerequisites: list[Prerequisite] = []
    for i, item in enumerate(doc.items("prerequisites", MAX_PREREQUISITES)):
        p = _Doc(item, doc.at(f"prerequisites[{i}]"), ("flag", "variation"))
        other = parse_key(p.raw.get("flag"), p.at("flag"), "flag key")
        if other == flag.key:
            raise FieldError(p.at("flag"), "a flag cannot be its own prerequisite")
        prerequisites.append(Prerequisite(other, p.text("variation", limit=200)))
    guard = None
    if doc.has("guard"):
        g = _Doc(
            doc.raw["guard"],
            doc.at("guard"),
            ("metric", "threshold", "min_requests", "window_seconds"),
        )
        metric = g.text("metric", default="error_rate", limit=100)
        if metric != "error_rate":
            raise FieldError(g.at("metric"), "the guard metric is error_rate")
        threshold = g.number("threshold", -1, 0, 1)
        if threshold < 0:
            raise FieldError(g.at("threshold"), "is required (a share of failed requests, 0..1)")
        guard = Guard(
            threshold=threshold,
            min_requests=int(g.number("min_requests", 100, 1, 1e9)),
            window_seconds=int(g.number("window_seconds", 300, 10, 86_400)),
            metric=metric,
        )
    return Targeting(
        enabled=doc.boolean("enabled", False),
        rules=tuple(rules),
        default_rule=default_rule,
        off_variation=off,
        prerequisites=tuple(prerequisites),
        guard=guard,
    )


def parse_segment(raw: object, *, path: str = "") -> Segment:
    doc = _Doc(
        raw,
        path,
        ("segment_key", "name", "description", "attribute", "included", "excluded", "conditions"),
    )
    key = parse_key(doc.raw.get("segment_key"), doc.at("segment_key"), "segment key")

    def ids(name: str) -> frozenset[str]:
        out = []
        for i, value in enumerate(doc.items(name, MAX_SEGMENT_USERS)):
            if not isinstance(value, str) or not 1 <= len(value) <= 200:
                raise FieldError(doc.at(f"{name}[{i}]"), "must be a string of 1-200 characters")
            out.append(value)
        return frozenset(out)

    return Segment(
        key=key,
        name=doc.text("name", default=key, limit=255),
        description=doc.text("description", default=""),
        attribute=doc.text("attribute", default="user_id", pattern=ATTRIBUTE_PATTERN),
        included=ids("included"),
        excluded=ids("excluded"),
        conditions=tuple(
            _condition(c, doc.at(f"conditions[{j}]"), allow_segments=False)
            for j, c in enumerate(doc.items("conditions", MAX_CONDITIONS))
        ),
    )


def check_references(
    flag: FlagDef,
    targeting: Targeting,
    flags: Mapping[str, FlagDef],
    segments: Mapping[str, Segment],
    path: str = "",
) -> None:
    """Every segment and prerequisite `targeting` names exists (and the variation it asks for)."""
    prefix = f"{path}." if path else ""
    for i, rule in enumerate(targeting.rules):
        for j, cond in enumerate(rule.conditions):
            if cond.operator != "in_segment":
                continue
            for k, value in enumerate(cond.values):
                if value not in segments:
                    raise FieldError(
                        f"{prefix}rules[{i}].conditions[{j}].values[{k}]",
                        f"segment {value!r} does not exist",
                    )
    for i, pre in enumerate(targeting.prerequisites):
        other = flags.get(pre.flag)
        if other is None:
            raise FieldError(
                f"{prefix}prerequisites[{i}].flag", f"flag {pre.flag!r} does not exist"
            )
        if other.variation(pre.variation) is None:
            raise FieldError(
                f"{prefix}prerequisites[{i}].variation",
                f"flag {pre.flag!r} has no variation {pre.variation!r}",
            )


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A prerequisite cycle (`a -> b -> a`) in a flag -> prerequisites graph, or None."""
    white, grey, black = 0, 1, 2
    color: dict[str, int] = {}
    for start in edges:
        if color.get(start, white) != white:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        trail: list[str] = [start]
        color[start] = grey
        while stack:
            node, i = stack[-1]
            nexts = edges.get(node, ())
            if i < len(nexts):
                stack[-1] = (node, i + 1)
                nxt = nexts[i]
                state = color.get(nxt, white)
                if state == grey:
                    return [*trail[trail.index(nxt) :], nxt]
                if state == white:
                    color[nxt] = grey
                    stack.append((nxt, 0))
                    trail.append(nxt)
            else:
                color[node] = black
                stack.pop()
                trail.pop()
    return None


# --- environments, change requests, experiments ----------------------------------------------

RESERVED_FLAG_KEYS = frozenset(
    {
        "environments",
        "segments",
        "stream",
        "ruleset",
        "usage",
        "events",
        "stale",
        "change-requests",
        "experiments",
        "export",
        "import",
    }
)  # words the flags API uses as paths under /api/v1/flags/


@dataclass(frozen=True, slots=True)
class Environment:
    key: str
    name: str
    is_production: bool = False
    approval_required: bool = False
    required_approvals: int = 1
    revision: int = 0
    environment_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment_key": self.key,
            "name": self.name,
            "is_production": self.is_production,
            "approval_required": self.approval_required,
            "required_approvals": self.required_approvals,
            "revision": self.revision,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    approver: str
    decision: str  # approve or reject
    comment: str
    decided_at_ms: int


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    """An edit waiting for approvals: `kind` "targeting" (one environment), "flag" (the
    definition, shared by every environment) or "segment" (`flag_key` empty; the segment in
    `payload`)."""

    request_id: str
    flag_key: str
    environment: str
    kind: str
    payload: dict[str, Any]
    base_version: int
    author: str
    comment: str
    status: str
    required_approvals: int
    created_at_ms: int
    decided_at_ms: int | None = None
    decisions: tuple[Decision, ...] = ()

    @property
    def approvals(self) -> int:
        return sum(1 for d in self.decisions if d.decision == "approve")


@dataclass(frozen=True, slots=True)
class Experiment:
    key: str
    flag_key: str
    environment: str
    control: str
    metric: str
    sample_rate: float
    status: str
    started_at_ms: int
    stopped_at_ms: int | None = None
    created_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment_key": self.key,
            "flag_key": self.flag_key,
            "environment": self.environment,
            "control": self.control,
            "metric": self.metric,
            "sample_rate": self.sample_rate,
            "status": self.status,
            "started_at_ms": self.started_at_ms,
            "stopped_at_ms": self.stopped_at_ms,
            "created_by": self.created_by,
        }


ENVIRONMENT_FIELDS = ("name", "is_production", "approval_required", "required_approvals")


def parse_environment_changes(raw: object, *, path: str = "") -> dict[str, Any]:
    """The environment fields `raw` sets, checked: for a new environment and for a change."""
    doc = _Doc(raw, path, ("environment_key", *ENVIRONMENT_FIELDS))
    out: dict[str, Any] = {}
    if "name" in doc.raw:
        name = doc.raw["name"]
        if not isinstance(name, str) or not 1 <= len(name) <= 255:
            raise FieldError(doc.at("name"), "must be a string of 1-255 characters")
        out["name"] = name
    for flag in ("is_production", "approval_required"):
        if flag in doc.raw:
            out[flag] = doc.boolean(flag, False)
    if "required_approvals" in doc.raw:
        required = doc.raw["required_approvals"]
        if not isinstance(required, int) or isinstance(required, bool) or not 1 <= required <= 10:
            raise FieldError(doc.at("required_approvals"), "must be a whole number from 1 to 10")
        out["required_approvals"] = required
    return out


def parse_environment(raw: Mapping[str, Any]) -> Environment:
    changes = parse_environment_changes(raw)
    key = parse_key(raw.get("environment_key"), "environment_key", "environment key")
    if len(key) > 100:
        raise FieldError("environment_key", "must be at most 100 characters")
    return Environment(
        key,
        changes.get("name", key),
        changes.get("is_production", False),
        changes.get("approval_required", False),
        changes.get("required_approvals", 1),
    )


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    """What a request to start an experiment asks for, checked but for the flag it names."""

    key: str
    flag_key: str
    environment: str | None
    control: str | None
    metric: str
    sample_rate: float


def parse_experiment(raw: object) -> ExperimentSpec:
    doc = _Doc(
        raw,
        "",
        ("experiment_key", "flag_key", "environment", "control", "metric", "sample_rate"),
    )
    metric = doc.raw.get("metric")
    if not isinstance(metric, str) or not 1 <= len(metric) <= 200:
        raise FieldError("metric", "name the conversion event (1-200 characters)")
    rate = doc.raw.get("sample_rate", 1.0)
    if not is_number(rate) or not 0 < rate <= 1:
        raise FieldError("sample_rate", "must be a number in (0, 1]")
    environment, control = doc.raw.get("environment"), doc.raw.get("control")
    return ExperimentSpec(
        key=parse_key(doc.raw.get("experiment_key"), "experiment_key", "experiment key"),
        flag_key=parse_key(doc.raw.get("flag_key"), "flag_key", "flag key"),
        environment=str(environment) if environment else None,
        control=str(control) if control else None,
        metric=metric,
        sample_rate=float(rate),
    )


class Conflict(Exception):
    """The change cannot be made in the current state (409)."""

    def __init__(self, message: str, kind: str = "conflict") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class Missing(Exception):
    """A flag, segment, environment, experiment or change request does not exist (404)."""

    def __init__(self, what: str, key: str) -> None:
        super().__init__(f"{what} {key} does not exist")
        self.what = what
        self.key = key
