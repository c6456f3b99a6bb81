"""The shared HTTP ceiling: a bare ASGI app on uvicorn and on granian, loaded by wrk.

Also the helpers service benchmarks use to serve an app (`serve_app`), load it (`wrk_post`,
`load`) and compare it with the ceiling (`ceiling`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks._runner import free_port, log, result, tail, wait_for_port
from benchmarks._wrk import ensure_wrk, run_wrk

Server = Literal["uvicorn", "granian"]
SERVERS: tuple[Server, ...] = ("uvicorn", "granian")
BARE_APP = "benchmarks._bare:create_app"
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent  # so `benchmarks._bare` imports in the server

THROUGHPUT_CONNECTIONS = 50
LATENCY_CONNECTIONS = 10


def duration_s(quick: bool) -> int:
    return 3 if quick else 10


def server_command(server: Server, target: str, port: int) -> list[str]:
    """The command line serving the factory `target` ("module:function") on one process."""
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", target, "--factory",
            "--host", HOST, "--port", str(port),
            "--workers", "1", "--loop", "uvloop", "--http", "httptools",
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    if server == "granian":
        return [
            sys.executable, "-m", "granian", target, "--factory",
            "--interface", "asgi", "--host", HOST, "--port", str(port),
            "--workers", "1", "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    raise ValueError(f"unknown server {server!r}; expected one of {', '.join(SERVERS)}")


def _stop(proc: subprocess.Popen[bytes], server: Server) -> None:
    if proc.poll() is not None:
        return
    # uvicorn shuts down gracefully on SIGINT, granian on SIGTERM (stopping its worker).
    proc.send_signal(signal.SIGINT if server == "uvicorn" else signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        # The group is the one this process started (start_new_session), holding its workers.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextmanager
def serve_app(
    factory_import_string: str,
    env: Mapping[str, str] | None = None,
    server: Server = "uvicorn",
    *,
    startup_timeout: float = 60.0,
) -> Iterator[str]:
    """Serve an app factory on a free 127.0.0.1 port in one process; yield its base URL.

    `env` is added to this process's environment. Readiness is a poll of the port. The server's
    output goes to a temporary log whose tail is shown if it fails to start.
    """
    port = free_port(HOST)
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    with tempfile.TemporaryDirectory(prefix="bench-server-") as logdir:
        log_path = Path(logdir) / f"{server}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                server_command(server, factory_import_string, port),
                cwd=ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                wait_for_port(HOST, port, proc, timeout=startup_timeout, log_path=log_path)
                yield f"http://{HOST}:{port}"
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{server} exited with status {proc.returncode} during the run\n"
                        + tail(log_path)
                    )
            finally:
                _stop(proc, server)


@dataclass(frozen=True, slots=True)
class HttpFigures:
    """Throughput at 50 connections, latency percentiles at 10."""

    ops_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: int


def wrk_post(
    url: str,
    json_body: str,
    headers: Mapping[str, str] | None,
    connections: int,
    duration: int,
) -> dict[str, Any]:
    """POST `json_body` with `headers` to `url` for `duration` seconds on `connections`."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    res = run_wrk(
        url,
        threads=1 if connections <= LATENCY_CONNECTIONS else 2,
        connections=connections,
        duration_s=duration,
        method="POST",
        body=json_body,
        headers=hdrs,
    )
    return {
        "ops_per_s": res.ops_per_s,
        "p50_ms": res.p50_ms,
        "p99_ms": res.p99_ms,
        "non_2xx": res.non_2xx,
        "socket_errors": res.socket_errors,
        "requests": res.requests,
    }


def load(
    url: str,
    quick: bool,
    *,
    method: str = "GET",
    body: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> HttpFigures:
    """The standard load: a 1 s warm-up, then `-t2 -c50` for throughput, `-t1 -c10` for latency."""
    duration = duration_s(quick)
    hdrs = dict(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
    common: dict[str, Any] = {"method": method, "body": body, "headers": hdrs or None}
    run_wrk(url, threads=1, connections=LATENCY_CONNECTIONS, duration_s=1, **common)
    tput = run_wrk(
        url, threads=2, connections=THROUGHPUT_CONNECTIONS, duration_s=duration, **common
    )
    lat = run_wrk(url, threads=1, connections=LATENCY_CONNECTIONS, duration_s=duration, **common)
    return HttpFigures(
        ops_per_s=tput.ops_per_s,
        p50_ms=lat.p50_ms,
        p99_ms=lat.p99_ms,
        non_2xx=tput.non_2xx + lat.non_2xx,
        socket_errors=tput.socket_errors + lat.socket_errors,
    )


_ceilings: dict[bool, dict[Server, HttpFigures]] = {}


def measure_ceilings(quick: bool) -> dict[Server, HttpFigures]:
    """The bare app's figures on each server; measured once per process and mode."""
    if quick not in _ceilings:
        ensure_wrk()
        figures: dict[Server, HttpFigures] = {}
        for server in SERVERS:
            log(f"http: ceiling on {server}")
            with serve_app(BARE_APP, server=server) as base_url:
                figures[server] = load(base_url + "/", quick)
        _ceilings[quick] = figures
    return _ceilings[quick]


def ceiling(quick: bool) -> dict[str, Any]:
    """The faster server's bare-app throughput: {"server", "scenario", "ops_per_s", ...}."""
    figures = measure_ceilings(quick)
    server = max(figures, key=lambda s: figures[s].ops_per_s)
    best = figures[server]
    return {
        "server": server,
        "scenario": f"ceiling-{server}",
        "ops_per_s": best.ops_per_s,
        "p50_ms": best.p50_ms,
        "p99_ms": best.p99_ms,
        "by_server": {s: f.ops_per_s for s, f in figures.items()},
    }


def ceiling_results(quick: bool) -> list[dict[str, Any]]:
    figures = measure_ceilings(quick)
    records = []
    for server, other in ((SERVERS[0], SERVERS[1]), (SERVERS[1], SERVERS[0])):
        f = figures[server]
        records.append(
            result(
                f"ceiling-{server}",
                f.ops_per_s,
                f.p50_ms,
                f.p99_ms,
                f"ceiling-{other}",
                figures[other].ops_per_s,
                non_2xx=f.non_2xx,
                socket_errors=f.socket_errors,
            )
        )
    return records


def run(quick: bool) -> list[dict[str, Any]]:
    return ceiling_results(quick)
