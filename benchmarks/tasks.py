"""Task queue benchmarks: tenfold on PostgreSQL against Celery, RQ and Procrastinate.

Each system runs the same three measurements, one system after the other, in one invocation:

* e2e-noop: submit N no-op tasks (batches where the system has a batch API) to 2 idle-but-running
  worker processes and time from the first submit until every result is stored;
* submit-single / submit-batch: tasks submitted per second with no worker running, one call per
  task, and through the batch API (tenfold `submit_many`, RQ `enqueue_many`, Procrastinate
  `batch_defer`; Celery has none, so its `delay` figure stands in);
* pickup-latency: one task at a time with idle workers, from the moment submit returns until the
  handler starts (the handler records `time.time()`), p50/p99.

Each measurement gives a headline record against the best peer and one record per peer. A side
that fails is recorded with an "error" and null figures; the others still run. Worker processes,
databases (`bench_tasks_*`) and Redis keys (`bench:<token>:*`) are removed at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks import _tasks_celery, _tasks_procrastinate, _tasks_rq, _tasks_tenfold
from benchmarks._runner import log, percentile_ms, result
from benchmarks._tasks_common import BATCH, TOKEN, WORKERS, Figures, delete_redis_prefix, sizes

PEERS: tuple[tuple[str, Callable[..., Figures]], ...] = (
    ("celery", _tasks_celery.measure),
    ("rq", _tasks_rq.measure),
    ("procrastinate", _tasks_procrastinate.measure),
)
E2E_TARGET_RATIO = 1.5  # issue 4: tenfold >= 1.5x the best peer end to end
LATENCY_TARGET_P99_MS = 50.0  # issue 4: pick-up p99 < 50 ms


def _percentiles(samples_ms: list[float]) -> tuple[float | None, float | None]:
    if not samples_ms:
        return None, None
    ns = sorted(round(s * 1e6) for s in samples_ms)
    return percentile_ms(ns, 50), percentile_ms(ns, 99)


def _best(peers: list[Figures], key: Callable[[Figures], float | None]) -> Figures | None:
    scored = [(key(p), p) for p in peers if key(p) is not None]
    return max(scored, key=lambda kv: kv[0] or 0.0)[1] if scored else None


def _e2e(ours: Figures, peers: list[Figures]) -> list[dict[str, Any]]:
    records = []

    def record(scenario: str, peer: Figures | None) -> dict[str, Any]:
        ratio_ok = None
        if ours.e2e_per_s and peer and peer.e2e_per_s:
            ratio_ok = ours.e2e_per_s / peer.e2e_per_s >= E2E_TARGET_RATIO
        return result(
            scenario,
            ours.e2e_per_s,
            None,
            None,
            peer.system if peer else None,
            peer.e2e_per_s if peer else None,
            tasks=ours.e2e_tasks,
            seconds=ours.e2e_seconds,
            peer_seconds=peer.e2e_seconds if peer else None,
            worker_processes=WORKERS,
            config=ours.config,
            peer_config=peer.config if peer else None,
            target_ratio=E2E_TARGET_RATIO,
            meets_target=ratio_ok,
            error=_errors(ours, peer, "setup", "start", "e2e"),
        )

    best = _best(peers, lambda p: p.e2e_per_s)
    records.append(record("e2e-noop", best))
    records += [record(f"e2e-noop-vs-{p.system}", p) for p in peers]
    return records


def _submit(ours: Figures, peers: list[Figures], kind: str) -> list[dict[str, Any]]:
    def rate(f: Figures) -> float | None:
        return f.submit_batch_per_s if kind == "batch" else f.submit_single_per_s

    def record(scenario: str, peer: Figures | None) -> dict[str, Any]:
        return result(
            scenario,
            rate(ours),
            None,
            None,
            peer.system if peer else None,
            rate(peer) if peer else None,
            api=ours.batch_api if kind == "batch" else "submit",
            peer_api=(peer.batch_api if kind == "batch" else _single_api(peer)) if peer else None,
            error=_errors(ours, peer, "setup", "submit"),
        )

    best = _best(peers, rate)
    return [record(f"submit-{kind}", best)] + [
        record(f"submit-{kind}-vs-{p.system}", p) for p in peers
    ]


def _single_api(figures: Figures) -> str:
    return {"celery": "delay", "rq": "enqueue", "procrastinate": "defer"}.get(
        figures.system, "submit"
    )


def _latency(ours: Figures, peers: list[Figures]) -> list[dict[str, Any]]:
    p50, p99 = _percentiles(ours.latency_ms)
    submit_p50, _ = _percentiles(ours.submit_call_ms)

    def record(scenario: str, peer: Figures | None) -> dict[str, Any]:
        peer_p50, peer_p99 = _percentiles(peer.latency_ms) if peer else (None, None)
        peer_submit_p50, _ = _percentiles(peer.submit_call_ms) if peer else (None, None)
        return result(
            scenario,
            None,
            p50,
            p99,
            peer.system if peer else None,
            None,
            peer_p50_ms=peer_p50,
            peer_p99_ms=peer_p99,
            p99_ratio=(peer_p99 / p99) if p99 and peer_p99 else None,
            samples=len(ours.latency_ms),
            peer_samples=len(peer.latency_ms) if peer else None,
            submit_call_p50_ms=submit_p50,
            peer_submit_call_p50_ms=peer_submit_p50,
            target_p99_ms=LATENCY_TARGET_P99_MS,
            meets_target=(p99 < LATENCY_TARGET_P99_MS) if p99 is not None else None,
            error=_errors(ours, peer, "setup", "start", "latency"),
        )

    def minus_p99(figures: Figures) -> float | None:
        worst = _percentiles(figures.latency_ms)[1]
        return -worst if worst is not None else None

    best = _best(peers, minus_p99)  # the best peer here is the one with the lowest p99
    return [record("pickup-latency", best)] + [
        record(f"pickup-latency-vs-{p.system}", p) for p in peers
    ]


def _errors(ours: Figures, peer: Figures | None, *phases: str) -> str | None:
    found = [e for e in (ours.error(*phases),) if e]
    if peer is not None and (theirs := peer.error(*phases)):
        found.append(f"peer {peer.system}: {theirs}")
    return "; ".join(found) if found else None


def run(quick: bool) -> list[dict[str, Any]]:
    chosen = sizes(quick)
    log(
        f"tasks: {chosen.e2e} no-op tasks end to end, {chosen.single}+{chosen.batch} submits "
        f"(batches of {BATCH}), {chosen.latency} latency samples; Redis prefix bench:{TOKEN}:"
    )
    try:
        ours = _tasks_tenfold.measure(chosen)
        peers = [measure(chosen) for _, measure in PEERS]
    finally:
        delete_redis_prefix()  # anything a failed side left under bench:<token>:
    for figures in (ours, *peers):
        p50, p99 = _percentiles(figures.latency_ms)
        log(
            f"tasks: {figures.system}: e2e {figures.e2e_per_s or 0:.0f}/s, submit "
            f"{figures.submit_single_per_s or 0:.0f}/s single, "
            f"{figures.submit_batch_per_s or 0:.0f}/s batch, pick-up p50 {p50} p99 {p99} ms"
        )
    return (
        _e2e(ours, peers)
        + _submit(ours, peers, "batch")
        + _submit(ours, peers, "single")
        + _latency(ours, peers)
    )
