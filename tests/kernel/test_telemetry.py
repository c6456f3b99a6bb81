"""The lock-free hot-path metric families expose what prometheus_client's would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tenfold.kernel.telemetry import HotCounter, HotHistogram

BUCKETS = (0.001, 0.01, 0.1, 1)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_hot_histogram_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    hot = HotHistogram("lat_seconds", "latency", ("route",), buckets=BUCKETS, registry=ours)
    ref = Histogram("lat_seconds", "latency", ("route",), buckets=BUCKETS, registry=theirs)
    values = [0.0005, 0.001, 0.002, 0.01, 0.05, 0.5, 1.0, 3.0, 0.1]  # edges land in their bucket
    for route in ("/a", "/b"):
        for v in values[: 5 if route == "/a" else None]:
            hot.labels(route).observe(v)
            ref.labels(route).observe(v)
    assert samples(ours) == samples(theirs)


def test_hot_counter_counts_per_label_set() -> None:
    registry = CollectorRegistry()
    counter = HotCounter("decisions_total", "decisions", ("outcome",), registry=registry)
    counter.labels("allowed").inc()
    counter.labels("allowed").inc(2)
    counter.labels("denied").inc()
    assert registry.get_sample_value("decisions_total", {"outcome": "allowed"}) == 3
    assert registry.get_sample_value("decisions_total", {"outcome": "denied"}) == 1


def test_wrong_label_count_is_refused() -> None:
    counter = HotCounter("x_total", "x", ("a", "b"), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("only-one")
