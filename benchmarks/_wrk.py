"""Launching `wrk` and parsing its report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._runner import log

LUA_SCRIPT = Path(__file__).with_name("wrk_request.lua")

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = re.compile(r"^\s*([\d.]+)(us|ms|s|m|h)\s*$")
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+(\S+)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+\w+),", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)


@dataclass(frozen=True, slots=True)
class WrkResult:
    ops_per_s: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: int
    output: str


def duration_ms(text: str) -> float:
    """wrk's formatted duration ('812.00us', '1.20ms', '2.00s') in milliseconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"unrecognised wrk duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse(output: str) -> WrkResult:
    rps = _RPS.search(output)
    if rps is None:
        raise RuntimeError(f"wrk printed no Requests/sec line:\n{output}")
    total = _TOTAL.search(output)
    percentiles = {int(m.group(1)): duration_ms(m.group(2)) for m in _PERCENTILE.finditer(output)}
    non_2xx = _NON_2XX.search(output)
    sockets = _SOCKET.search(output)
    return WrkResult(
        ops_per_s=float(rps.group(1)),
        requests=int(total.group(1)) if total else 0,
        p50_ms=percentiles.get(50),
        p99_ms=percentiles.get(99),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sockets.groups()) if sockets else 0,
        output=output,
    )


def ensure_wrk(timeout: float = 600.0) -> str:
    """The path of `wrk`, installing Debian's package if missing.

    An `apt-get update` may be running in the background; while it (or dpkg) holds the lock,
    retry until `timeout`.
    """
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk not found; installing Debian's package")
    deadline = time.monotonic() + timeout
    updated = False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    while True:
        proc = subprocess.run(
            ["apt-get", "install", "-y", "wrk"], capture_output=True, text=True, env=env
        )
        found = shutil.which("wrk")
        if proc.returncode == 0 and found:
            return found
        err = proc.stderr + proc.stdout
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not install wrk:\n{err[-2000:]}")
        if "lock" in err.lower():
            log("apt/dpkg lock held; retrying in 3s")
            time.sleep(3)
        elif not updated and ("unable to locate" in err.lower() or "has no installation" in err):
            log("package lists missing wrk; running apt-get update")
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
            updated = True
        else:
            raise RuntimeError(f"could not install wrk:\n{err[-2000:]}")


def run_wrk(
    url: str,
    *,
    threads: int,
    connections: int,
    duration_s: int,
    method: str = "GET",
    body: str | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: int = 5,
) -> WrkResult:
    """One wrk run with `--latency`; a POST body or headers go through `wrk_request.lua`."""
    wrk = ensure_wrk()
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "--latency",
    ]
    env = dict(os.environ)
    if method != "GET" or body is not None or headers:
        cmd += ["-s", str(LUA_SCRIPT)]
        env["WRK_METHOD"] = method
        env["WRK_BODY"] = body or ""
        env["WRK_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())
    cmd.append(url)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=duration_s + timeout_s + 30
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
    return parse(proc.stdout)
