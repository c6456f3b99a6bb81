"""Structured logs, the Prometheus registry and request metrics."""

from __future__ import annotations

import logging
import math
import sys
from bisect import bisect_left
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)
"""Every tenfold metric registers here; `/metrics` exposes it."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


# --- hot-path metrics ----------------------------------------------------------------------
#
# prometheus_client takes a lock and walks several Python frames on every increment: about
# 1.5 us per histogram observation, a tenth of a rate-limit check. The request path records
# into these lock-free families instead; they are read only when /metrics is scraped.
# Increments are plain `+=`, exact when made from one thread: tenfold's request and check
# paths run on the event loop. Metrics updated from worker threads keep prometheus_client's.


class HotCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HotHistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value


class _HotFamily(Collector):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def _child(self, values: tuple[str, ...]) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self) -> Any:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked names: families may be created in any order


class HotCounter(_HotFamily):
    """A labelled counter for the hot path (see above); `.labels(...).inc()`."""

    def labels(self, *values: str) -> HotCounterChild:
        child: HotCounterChild = self._child(values)
        return child

    def inc(self, amount: float = 1) -> None:
        self._child(()).inc(amount)

    def _new_child(self) -> HotCounterChild:
        return HotCounterChild()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class HotHistogram(_HotFamily):
    """A labelled histogram for the hot path (see above); `.labels(...).observe(seconds)`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.buckets = tuple(float(b) for b in buckets if not math.isinf(b))
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> HotHistogramChild:
        child: HotHistogramChild = self._child(values)
        return child

    def observe(self, value: float) -> None:
        self._child(()).observe(value)

    def _new_child(self) -> HotHistogramChild:
        return HotHistogramChild(self.buckets)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [floatToGoString(b) for b in self.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        for values, child in list(self._children.items()):
            running = 0
            cumulative = []
            for edge, count in zip(edges, child.counts, strict=True):
                running += count
                cumulative.append((edge, running))
            family.add_metric(list(values), cumulative, child.sum)
        yield family


HTTP_REQUESTS = HotCounter(
    "tenfold_http_requests_total",
    "HTTP requests by method, route template and status code.",
    ("method", "route", "status"),
    registry=REGISTRY,
)
HTTP_LATENCY = HotHistogram(
    "tenfold_http_request_duration_seconds",
    "HTTP request latency by method and route template.",
    ("method", "route"),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)

_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    key = (method, route, status)
    pair = _children.get(key)
    if pair is None:
        pair = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_LATENCY.labels(method, route),
        )
        _children[key] = pair
    pair[0].inc()
    pair[1].observe(seconds)


def render_metrics() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


SECRET_FIELDS = frozenset(
    {"api_key", "key", "token", "session_token", "refresh_token", "password", "secret"}
)


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for field in SECRET_FIELDS.intersection(event):
        value = str(event[field])
        event[field] = value[:6] + "…" if len(value) > 6 else "…"
    return event


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """JSON lines by default; a readable console format when attached to a terminal."""
    pretty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
