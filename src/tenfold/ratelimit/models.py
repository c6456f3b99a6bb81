"""Policies, assignments and checks: domain types and their rules (no I/O)."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from tenfold.ratelimit.algorithms import Algorithm, Limit, LimitError

DIMENSIONS = ("client_id", "api_key", "ip", "region", "resource")
MAX_PATTERN = 200


class FailureMode(StrEnum):
    FAIL_OPEN = "fail_open"  # Redis down: allow
    FAIL_CLOSED = "fail_closed"  # Redis down: deny
    LOCAL = "local"  # Redis down: count in-process, the rate divided among replicas


class PolicyError(LimitError):
    """A policy or assignment is invalid; `field` names the offending input."""


@dataclass(frozen=True, slots=True)
class Policy:
    policy_id: int
    name: str
    algorithm: Algorithm
    rate_limit: int
    time_window: int
    burst_capacity: int
    key_by: tuple[str, ...] = ("client_id",)
    match_resource: str | None = None
    match_region: str | None = None
    tier: str | None = None
    applies_to_all: bool = False
    shadow: bool = False
    failure_mode: FailureMode = FailureMode.LOCAL
    is_active: bool = True
    version: int = 1
    created_at: datetime | None = None
    updated_at: datetime | None = None
    _resource_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def limit(self, override: int | None = None) -> Limit:
        if override is None:
            return Limit.of(self.algorithm, self.rate_limit, self.time_window, self.burst_capacity)
        burst = (
            override
            if self.burst_capacity == self.rate_limit
            else max(self.burst_capacity, override)
        )
        return Limit.of(self.algorithm, override, self.time_window, burst)

    def matches(self, resource: str, region: str | None) -> bool:
        if self.match_region is not None and region != self.match_region:
            return False
        if self._resource_re is not None:
            return self._resource_re.fullmatch(resource) is not None
        return True


def validate_policy_fields(
    *,
    name: str,
    algorithm: str,
    rate_limit: int,
    time_window: int,
    burst_capacity: int | None,
    key_by: list[str] | tuple[str, ...],
    match_resource: str | None,
) -> tuple[Algorithm, int, re.Pattern[str] | None]:
    """Check every rule; return the algorithm, the burst and the compiled resource pattern."""
    if not name or len(name) > 255:
        raise PolicyError("name", "must be 1 to 255 characters")
    limit = Limit.of(algorithm, rate_limit, time_window, burst_capacity)
    if not key_by:
        key_by = ()
    unknown = [d for d in key_by if d not in DIMENSIONS]
    if unknown:
        raise PolicyError("key_by", f"unknown dimension {unknown[0]!r}; one of {DIMENSIONS}")
    if len(set(key_by)) != len(key_by):
        raise PolicyError("key_by", "lists a dimension twice")
    return limit.algorithm, limit.burst, compile_resource(match_resource)


def compile_resource(pattern: str | None) -> re.Pattern[str] | None:
    """A glob (`*` any run, `?` one character); bounded so matching stays linear enough."""
    if pattern is None:
        return None
    if not pattern or len(pattern) > MAX_PATTERN:
        raise PolicyError("match_resource", f"must be 1 to {MAX_PATTERN} characters")
    if pattern.count("*") > 8:
        raise PolicyError("match_resource", "at most 8 wildcards")
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True, slots=True)
class Assignment:
    client_id: str
    policy_id: int
    override_rate_limit: int | None = None
    priority: int = 1
    effective_from: datetime | None = None
    effective_to: datetime | None = None

    def effective(self, at: datetime) -> bool:
        if self.effective_from is not None and at < self.effective_from:
            return False
        return self.effective_to is None or at < self.effective_to


def overlaps(a: Assignment, b: Assignment) -> bool:
    far_past, far_future = datetime.min, datetime.max
    a_from = (a.effective_from or far_past).replace(tzinfo=None)
    a_to = (a.effective_to or far_future).replace(tzinfo=None)
    b_from = (b.effective_from or far_past).replace(tzinfo=None)
    b_to = (b.effective_to or far_future).replace(tzinfo=None)
    return a_from < b_to and b_from < a_to


@dataclass(frozen=True, slots=True)
class CheckContext:
    client_id: str
    api_key: str = ""
    resource: str = ""
    ip: str = ""
    region: str = ""

    def subject(self, key_by: tuple[str, ...]) -> str | None:
        """The counter's identity under `key_by`, or None when a dimension is missing."""
        parts = []
        for dim in key_by:
            value = getattr(self, dim)
            if not value:
                return None
            if dim == "api_key":  # never put a secret into a Redis key
                value = hashlib.blake2b(value.encode(), digest_size=12).hexdigest()
            parts.append(f"{dim}={value}")
        return "|".join(parts) or "global"
