"""Shared helpers: timing loops, result records, the summary table, ports and readiness."""

from __future__ import annotations

import gc
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REQUIRED_KEYS = ("scenario", "ops_per_s", "p50_ms", "p99_ms", "peer", "peer_ops_per_s", "ratio")


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays pure JSON lines."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Timing:
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    allowed_share: float  # share of the throughput loop's calls that were allowed


def percentile_ms(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanosecond samples, in milliseconds."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


def measure(
    call: Callable[[str], bool],
    keys: Sequence[str],
    *,
    calls: int,
    sample: int,
    warmup: int = 2_000,
) -> Timing:
    """Time `call(key)` over `calls` calls cycling through `keys`.

    Throughput comes from one timed loop with no per-call clock reads; latency percentiles come
    from a separate loop of `sample` calls, each timed with `time.perf_counter_ns` (whose own
    cost, tens of nanoseconds, is included).
    """
    nkeys = len(keys)
    for i in range(warmup):
        call(keys[i % nkeys])

    sequence = [keys[i % nkeys] for i in range(calls)]
    gc.collect()
    allowed = 0
    start = time.perf_counter_ns()
    for key in sequence:
        if call(key):
            allowed += 1
    elapsed_ns = time.perf_counter_ns() - start

    samples: list[int] = []
    append = samples.append
    clock = time.perf_counter_ns
    gc.collect()
    for key in sequence[:sample]:
        t0 = clock()
        call(key)
        append(clock() - t0)
    samples.sort()

    return Timing(
        ops_per_s=calls / (elapsed_ns / 1e9),
        p50_ms=percentile_ms(samples, 50),
        p99_ms=percentile_ms(samples, 99),
        calls=calls,
        allowed_share=allowed / calls,
    )


def _num(value: float | None, digits: int) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def result(
    scenario: str,
    ops_per_s: float | None,
    p50_ms: float | None,
    p99_ms: float | None,
    peer: str | None = None,
    peer_ops_per_s: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One scenario record; `ratio` is ops_per_s / peer_ops_per_s, or None without both."""
    ratio = None
    if ops_per_s and peer_ops_per_s:
        ratio = ops_per_s / peer_ops_per_s
    record: dict[str, Any] = {
        "scenario": scenario,
        "ops_per_s": _num(ops_per_s, 1),
        "p50_ms": _num(p50_ms, 4),
        "p99_ms": _num(p99_ms, 4),
        "peer": peer,
        "peer_ops_per_s": _num(peer_ops_per_s, 1),
        "ratio": _num(ratio, 3),
    }
    for key, value in extra.items():
        if key == "error" and not value:
            continue  # present only when something failed
        record[key] = _num(value, 4) if isinstance(value, float) else value
    return record


def timing_result(
    scenario: str,
    ours: Timing | None,
    peer: str,
    theirs: Timing | None,
    **extra: Any,
) -> dict[str, Any]:
    """A record from two in-process timings (either may be missing after an error)."""
    either = ours or theirs
    return result(
        scenario,
        ours.ops_per_s if ours else None,
        ours.p50_ms if ours else None,
        ours.p99_ms if ours else None,
        peer,
        theirs.ops_per_s if theirs else None,
        peer_p50_ms=theirs.p50_ms if theirs else None,
        peer_p99_ms=theirs.p99_ms if theirs else None,
        calls=either.calls if either else None,
        allowed_share=ours.allowed_share if ours else None,
        peer_allowed_share=theirs.allowed_share if theirs else None,
        **extra,
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """A summary table of the records; the extra keys that matter most get their own columns."""
    columns = [
        ("scenario", "scenario"),
        ("ops_per_s", "ops/s"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("peer", "peer"),
        ("peer_ops_per_s", "peer ops/s"),
        ("ratio", "ratio"),
    ]
    optional = [
        ("redis_commands_per_op", "redis cmds/op"),
        ("peer_redis_commands_per_op", "peer redis cmds/op"),
        ("share_of_ceiling", "share of ceiling"),
        ("non_2xx", "non-2xx"),
        ("error", "error"),
    ]
    columns += [c for c in optional if any(r.get(c[0]) is not None for r in results)]
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|"
        + "|".join("---" if key in ("scenario", "peer", "error") else "---:" for key, _ in columns)
        + "|",
    ]
    for record in results:
        lines.append("| " + " | ".join(_cell(record.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_port(
    host: str,
    port: int,
    proc: subprocess.Popen[bytes],
    *,
    timeout: float = 60.0,
    log_path: Path | None = None,
) -> None:
    """Poll until `host:port` accepts a connection; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            detail = tail(log_path) if log_path else ""
            raise RuntimeError(f"server exited with status {code} before listening\n{detail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            detail = tail(log_path) if log_path else ""
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s\n{detail}")
        time.sleep(0.02)


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll `check()` until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def delete_prefix(client: Any, prefix: str) -> int:
    """Delete the keys under our own prefix, and only those."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1_000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


# --- a tenfold server to measure ---------------------------------------------------------------

T = TypeVar("T")


def attempt(service: str, what: str, fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run one measurement; an exception becomes a one-line error (logged, and returned)."""
    try:
        return fn(), None
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        log(f"{service}: {what}: error: {message}")
        return None, message


def server_env(data_dir: Path, services: str, **extra: str) -> dict[str, str]:
    """This process's environment without its TENFOLD_* settings, for an embedded tenfold in
    `data_dir` serving `services` (an empty config file: one in the cwd is not read)."""
    (data_dir / "tenfold.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENFOLD_")}
    env.update(
        TENFOLD_DATA_DIR=str(data_dir),
        TENFOLD_SERVICES=services,
        TENFOLD_LOG_LEVEL="warning",
        TENFOLD_CONFIG=str(data_dir / "tenfold.toml"),
        **extra,
    )
    return env


def tenfold_command(args: list[str], env: dict[str, str]) -> str:
    """Run `tenfold <args>` (the installed command, else `python -m tenfold`); its output."""
    beside = Path(sys.executable).with_name("tenfold")
    command = [str(beside)] if beside.exists() else [sys.executable, "-m", "tenfold"]
    proc = subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`tenfold {' '.join(args)}` failed ({proc.returncode}): "
            + (proc.stderr or proc.stdout).strip()[-500:]
        )
    return proc.stdout


def admin_key(data_dir: Path) -> str:
    """The admin key a first start writes to `data_dir`."""
    path = data_dir / "admin.key"
    try:
        wait_until(path.exists, timeout=15, what=str(path))
    except TimeoutError:
        raise RuntimeError(f"the server wrote no admin key to {path}") from None
    return path.read_text().strip()
