"""URL shortener benchmarks: the issue's performance targets, each beside a peer, in one run.

* nginx-302: nginx (one worker) answering every request with a fixed 302, the peer of the
  redirect; ceiling-uvicorn / ceiling-granian: the bare-ASGI ceiling (benchmarks/http.py);
* redirect-<server>: `GET /r/{code}` of a cached link on one granian and one uvicorn process
  (embedded: SQLite, memory, analytics on), >= 25 % of nginx's requests/s and p99 < 5 ms;
* analytics-cost-<server>: the same redirect with click recording on vs off
  (`TENFOLD_SHORTENER_ANALYTICS=false`), from a few distinct clients: < 10 % apart;
* create-bulk-pg-http: links created per second by one uvicorn process on PostgreSQL + Redis
  (scale-out) through `POST /api/v1/urls/bulk`, 1,000 links a call, a few concurrent clients:
  >= 2,000/s; beside `POST /api/v1/urls` (one link a request) under wrk;
* analytics-report-duckdb / analytics-report-postgres: `report()` for one link with 1M clicks
  (benchmarks/_analytics_query.py; 100k with --quick): < 100 ms.

A scenario that fails is recorded with an "error" key and null figures; the others still run.
The nginx process, the servers, temporary directories, the throwaway databases and the Redis keys
under `bench:<token>:` are removed at the end, also after errors.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from benchmarks import http as bench_http
from benchmarks._runner import (
    admin_key,
    delete_prefix,
    free_port,
    log,
    percentile_ms,
    result,
    server_env,
    tail,
    tenfold_command,
    wait_for_port,
)
from benchmarks._runner import attempt as _attempt
from benchmarks._wrk import WrkResult, ensure_wrk, parse, run_wrk
from benchmarks.sessions import new_loop, throwaway_database

T = TypeVar("T")
attempt = partial(_attempt, "shortener")  # a measurement whose failure is logged

REDIRECT_TARGET_RATIO = 0.25  # of nginx's fixed 302, requests/s at 50 connections
REDIRECT_TARGET_P99_MS = 5.0  # at 10 connections
ANALYTICS_TARGET_CHANGE = 0.10  # throughput with click recording on vs off
CREATE_TARGET_PER_S = 2_000  # links per second, one process, PostgreSQL
REPORT_TARGET_MS = 100.0  # report() of one link with 1M clicks

BULK_SIZE = 1_000  # links per POST /api/v1/urls/bulk (the API's maximum)
BULK_CLIENTS = 4  # concurrent bulk callers
# Alternating on/off throughput runs per side (--quick: 1 of the quick duration): many short
# rounds rather than a few long ones, so a burst of the host's stolen time hits both sides.
ANALYTICS_ROUNDS = 4
ANALYTICS_SECONDS = 5

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = secrets.token_hex(4)
REDIS_PREFIX = f"bench:{TOKEN}:"  # every Redis key this benchmark writes lies under it
NGINX_LOCATION = "https://example.com/target"
TARGET_URL = "https://example.com/landing?utm_source=bench"
CREATE_PATH = "/api/v1/urls"
BULK_PATH = "/api/v1/urls/bulk"
USER_AGENTS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36",
)
CLIENT_IPS = 16  # distinct X-Forwarded-For addresses (the server trusts 127.0.0.1)
NEW_VISITORS = "a new visitor every request (random X-Forwarded-For in 10/8)"

# wrk: rotate through pre-built requests from a few distinct clients (user agent, address,
# referrer); building them once in init() keeps wrk's per-request cost to a table lookup.
CLIENTS_LUA = """
local requests = {}
local n = 0
local agents = {}
for line in string.gmatch(os.getenv("WRK_AGENTS") or "", "[^\\n]+") do
  agents[#agents + 1] = line
end
local ips = tonumber(os.getenv("WRK_IPS") or "1")
local referrers = {"https://t.co/", "https://www.reddit.com/", ""}
function init(args)
  for i = 0, ips - 1 do
    local headers = {["User-Agent"] = agents[i % #agents + 1],
      ["X-Forwarded-For"] = "203.0.113." .. (i + 1)}
    local referrer = referrers[i % #referrers + 1]
    if referrer ~= "" then headers["Referer"] = referrer end
    requests[#requests + 1] = wrk.format("GET", nil, headers)
  end
end
local fresh = os.getenv("WRK_FRESH") == "1"
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000003)
function request()
  n = n % #requests + 1
  if fresh then  -- every click from a new visitor: a random address in 10.0.0.0/8
    local headers = {["User-Agent"] = agents[n % #agents + 1],
      ["X-Forwarded-For"] = "10." .. math.random(0, 255) .. "." .. math.random(0, 255) .. "."
        .. math.random(0, 255)}
    return wrk.format("GET", nil, headers)
  end
  return requests[n]
end
"""


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# --- nginx, the redirect's peer ------------------------------------------------------------


def ensure_nginx(timeout: float = 600.0) -> str:
    """The path of `nginx`, installing Debian's package if missing (as `ensure_wrk` does)."""

    def found() -> str | None:
        return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")

    path = found()
    if path:
        return path
    log("nginx not found; installing Debian's package")
    deadline = time.monotonic() + timeout
    updated = False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    while True:
        proc = subprocess.run(
            ["apt-get", "install", "-y", "nginx"], capture_output=True, text=True, env=env
        )
        path = found()
        if proc.returncode == 0 and path:
            return path
        err = proc.stderr + proc.stdout
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not install nginx:\n{err[-2000:]}")
        if "lock" in err.lower():
            log("apt/dpkg lock held; retrying in 3s")
            time.sleep(3)
        elif not updated and ("unable to locate" in err.lower() or "has no installation" in err):
            log("package lists missing nginx; running apt-get update")
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
            updated = True
        else:
            raise RuntimeError(f"could not install nginx:\n{err[-2000:]}")


NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 302 {location}; }}
  }}
}}
"""


@contextmanager
def serve_nginx() -> Iterator[str]:
    """nginx with one worker and our own config in a temporary directory; yields its base URL."""
    nginx = ensure_nginx()
    port = free_port(bench_http.HOST)
    with tempfile.TemporaryDirectory(prefix="tenfold-bench-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, port=port, location=NGINX_LOCATION))
        log_path = Path(tmp) / "error.log"
        with (Path(tmp) / "stdout.log").open("wb") as out:
            proc = subprocess.Popen(
                [nginx, "-p", f"{tmp}/", "-e", str(log_path), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                wait_for_port(bench_http.HOST, port, proc, timeout=30, log_path=log_path)
                yield f"http://{bench_http.HOST}:{port}"
                if proc.poll() is not None:
                    raise RuntimeError(f"nginx exited ({proc.returncode})\n{tail(log_path)}")
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its worker
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)  # our own session: master + worker
                        proc.wait(timeout=5)


# --- talking to a server -------------------------------------------------------------------


def request(
    base_url: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request; redirects are not followed. (status, headers, JSON body or None)."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or bench_http.HOST, parts.port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw[:300].decode(errors="replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
    finally:
        conn.close()


def _create_link(base_url: str, key: str) -> str:
    status, _, body = request(
        base_url, "POST", CREATE_PATH, {"url": TARGET_URL}, {"Authorization": f"Bearer {key}"}
    )
    if status != 201 or not isinstance(body, dict):
        raise RuntimeError(f"POST {CREATE_PATH} answered {status}: {body}")
    return str(body["short_code"])


def _warm_redirect(base_url: str, path: str, times: int = 20) -> None:
    """A few requests, so the link is in the process's cache; each must be a 302 to the URL."""
    for _ in range(times):
        status, headers, body = request(base_url, "GET", path)
        if status != 302 or headers.get("location") != TARGET_URL:
            raise RuntimeError(f"GET {path} answered {status} {headers.get('location')}: {body}")


def _total_clicks(base_url: str, code: str, key: str) -> int | None:
    status, _, body = request(
        base_url, "GET", f"/api/v1/analytics/{code}", headers={"Authorization": f"Bearer {key}"}
    )
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"GET /api/v1/analytics/{code} answered {status}: {body}")
    return int(body["total_clicks"])


def wrk_script(
    url: str, script: Path, *, threads: int, connections: int, seconds: int, env: dict[str, str]
) -> WrkResult:
    command = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
    command += ["--timeout=5s", "--latency", "-s", str(script), url]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=seconds + 40,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
    return parse(proc.stdout)


# --- 1. the redirect -----------------------------------------------------------------------


@dataclass
class Side:
    """One tenfold server serving one link."""

    base_url: str
    key: str
    code: str

    @property
    def url(self) -> str:
        return f"{self.base_url}/r/{self.code}"


@contextmanager
def redirect_server(server: bench_http.Server, analytics: bool) -> Iterator[Side]:
    """A fresh embedded tenfold (SQLite, memory) serving one warm link on `server`."""
    data_dir = Path(tempfile.mkdtemp(prefix="tenfold-bench-shortener-"))
    try:
        env = server_env(
            data_dir,
            "shortener",
            TENFOLD_SHORTENER_ANALYTICS="true" if analytics else "false",
            TENFOLD_RATELIMIT_TRUSTED_PROXIES="127.0.0.1",  # X-Forwarded-For names the client
        )
        tenfold_command(["migrate"], env)
        with bench_http.serve_app("tenfold.app:build_app", env, server) as base_url:
            key = admin_key(data_dir)
            code = _create_link(base_url, key)
            side = Side(base_url, key, code)
            _warm_redirect(base_url, urlsplit(side.url).path)
            yield side
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def clients_load(url: str, script: Path, seconds: int, fresh: bool = False) -> WrkResult:
    """Throughput at 50 connections from the rotating clients of CLIENTS_LUA (`fresh`: every
    request from a new address, so every click is a new visitor)."""
    return wrk_script(
        url,
        script,
        threads=2,
        connections=bench_http.THROUGHPUT_CONNECTIONS,
        seconds=seconds,
        env={
            "WRK_AGENTS": "\n".join(USER_AGENTS),
            "WRK_IPS": str(CLIENT_IPS),
            "WRK_FRESH": "1" if fresh else "0",
        },
    )


@dataclass
class AnalyticsPair:
    on_per_s: float
    off_per_s: float
    on_requests: int
    off_requests: int
    clicks_sent: int  # redirects served by the analytics-on server here, warm-ups included
    clicks_recorded: int | None  # what its analytics API counts afterwards (bots excluded)
    non_2xx: int
    socket_errors: int
    rounds: int
    child_cpu_s: float | None = None  # the click analytics process, over the timed "on" runs
    on_seconds: float = 0.0
    round_ratios: tuple[float, ...] = ()  # on / off requests/s, round by round


@dataclass
class _Alternation:
    """Two sides' timed runs, alternated round by round."""

    requests: dict[str, int]
    seconds: dict[str, float]
    round_ratios: list[float]  # the first side's requests/s over the second's, each round

    def per_s(self, name: str) -> float:
        return self.requests[name] / self.seconds[name]


def _alternate(
    first: str, second: str, rounds: int, run: Callable[[str], WrkResult]
) -> _Alternation:
    """`run(side)` (a timed load, its warm-up its own business) for both sides each round, the
    one going first alternating, so drift in the machine's load hits both alike."""
    got = _Alternation({first: 0, second: 0}, {first: 0.0, second: 0.0}, [])
    for r in range(rounds):
        this_round: dict[str, float] = {}
        for name in (first, second) if r % 2 == 0 else (second, first):
            timed = run(name)
            this_round[name] = timed.ops_per_s
            got.requests[name] += timed.requests
            got.seconds[name] += timed.requests / timed.ops_per_s if timed.ops_per_s else 0.0
        if this_round[second]:
            got.round_ratios.append(this_round[first] / this_round[second])
    return got


def analytics_pair(
    on: Side, off: Side, quick: bool, script: Path, fresh: bool = False
) -> AnalyticsPair:
    """Alternating throughput runs on the analytics-on and -off servers (both up all along);
    requests/s summed over the rounds."""
    seconds = bench_http.duration_s(True) if quick else ANALYTICS_SECONDS
    clicks_before = _total_clicks(on.base_url, on.code, on.key) or 0
    non_2xx = socket_errors = sent = 0
    child = _click_process_pid()
    child_cpu: float | None = 0.0 if child else None

    def run(name: str) -> WrkResult:
        nonlocal non_2xx, socket_errors, sent, child_cpu
        side = on if name == "on" else off
        warm = clients_load(side.url, script, 1, fresh)  # warm-up, the rotation included
        before = _cpu_seconds(child) if child and name == "on" else None
        got = clients_load(side.url, script, seconds, fresh)
        if child and before is not None and child_cpu is not None:
            after = _cpu_seconds(child)
            child_cpu = child_cpu + after - before if after is not None else None
        if name == "on":
            sent += warm.requests + got.requests
        non_2xx += got.non_2xx
        socket_errors += got.socket_errors
        return got

    rounds = 1 if quick else ANALYTICS_ROUNDS
    sides = _alternate("on", "off", rounds, run)
    time.sleep(2.5)  # the recorder flushes every second
    clicks = _total_clicks(on.base_url, on.code, on.key)
    return AnalyticsPair(
        on_per_s=sides.per_s("on"),
        off_per_s=sides.per_s("off"),
        on_requests=sides.requests["on"],
        off_requests=sides.requests["off"],
        clicks_sent=sent,
        clicks_recorded=None if clicks is None else clicks - clicks_before,
        non_2xx=non_2xx,
        socket_errors=socket_errors,
        rounds=rounds,
        child_cpu_s=child_cpu,
        on_seconds=sides.seconds["on"],
        round_ratios=tuple(sides.round_ratios),
    )


def _click_process_pid() -> int | None:
    """The click analytics process of the analytics-on server (the only one running)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"tenfold.shortener.click_process" in cmdline:
                return int(entry.name)
    return None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BURNER = """
import os, sys, time
os.nice(10)  # as the click analytics process
share, period = float(sys.argv[1]), 0.02
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < share * period:
        d = {}
        for i in range(500):
            d[(i, str(i))] = i
    time.sleep((1 - share) * period)
"""


@dataclass
class BackgroundPair:
    alone_per_s: float
    beside_per_s: float
    burner_share: float  # of one core, measured
    rounds: int
    round_ratios: tuple[float, ...] = ()  # beside / alone requests/s, round by round


def background_pair(side: Side, share: float, quick: bool, script: Path) -> BackgroundPair:
    """The analytics-off server at new-visitor load, alone and beside a process burning
    `share` of one core at the click process's niceness: what that much CPU spent on
    anything else costs this machine."""
    seconds = bench_http.duration_s(True) if quick else ANALYTICS_SECONDS
    burned = elapsed = 0.0

    def run(name: str) -> WrkResult:
        nonlocal burned, elapsed
        clients_load(side.url, script, 1, True)
        if name == "alone":
            return clients_load(side.url, script, seconds, True)
        burner = subprocess.Popen([sys.executable, "-c", BURNER, f"{share:.4f}"])
        try:
            before = _cpu_seconds(burner.pid)
            started = time.monotonic()
            got = clients_load(side.url, script, seconds, True)
            if before is not None:
                burned += (_cpu_seconds(burner.pid) or before) - before
                elapsed += time.monotonic() - started
        finally:
            burner.kill()
            burner.wait()
        return got

    rounds = 1 if quick else ANALYTICS_ROUNDS
    sides = _alternate("beside", "alone", rounds, run)
    return BackgroundPair(
        alone_per_s=sides.per_s("alone"),
        beside_per_s=sides.per_s("beside"),
        burner_share=burned / elapsed if elapsed else 0.0,
        rounds=rounds,
        round_ratios=tuple(sides.round_ratios),
    )


def redirect_results(quick: bool) -> list[dict[str, Any]]:
    ceiling = bench_http.ceiling(quick)
    ceilings = bench_http.measure_ceilings(quick)
    records: list[dict[str, Any]] = []

    log("shortener: nginx (one worker) returning a fixed 302")

    def nginx_load() -> bench_http.HttpFigures:
        with serve_nginx() as base_url:
            status, headers, _ = request(base_url, "GET", "/abc1234")
            if status != 302 or headers.get("location") != NGINX_LOCATION:
                raise RuntimeError(f"nginx answered {status} {headers.get('location')}")
            return bench_http.load(base_url + "/abc1234", quick)

    nginx, nginx_err = attempt("nginx-302", nginx_load)
    records.append(
        result(
            "nginx-302",
            nginx.ops_per_s if nginx else None,
            nginx.p50_ms if nginx else None,
            nginx.p99_ms if nginx else None,
            ceiling["scenario"],
            ceiling["ops_per_s"],
            config="nginx, worker_processes 1, access_log off, `return 302`",
            non_2xx=nginx.non_2xx if nginx else None,
            socket_errors=nginx.socket_errors if nginx else None,
            error=nginx_err,
        )
    )

    tmp = Path(tempfile.mkdtemp(prefix="tenfold-bench-shortener-wrk-"))
    script = tmp / "clients.lua"
    script.write_text(CLIENTS_LUA)
    try:
        for server in ("granian", "uvicorn"):
            log(f"shortener: redirect on {server} (analytics on, and a second server with it off)")
            figures: bench_http.HttpFigures | None = None
            off_latency: WrkResult | None = None
            pair: AnalyticsPair | None = None
            pair_err: str | None = None
            fresh_pair: AnalyticsPair | None = None
            fresh_err: str | None = None
            background: BackgroundPair | None = None
            background_err: str | None = None

            def run(server: bench_http.Server = server) -> None:
                nonlocal figures, off_latency, pair, pair_err, fresh_pair, fresh_err
                nonlocal background, background_err
                with ExitStack() as stack:
                    on = stack.enter_context(redirect_server(server, analytics=True))
                    off = stack.enter_context(redirect_server(server, analytics=False))
                    figures = bench_http.load(on.url, quick)
                    # The same latency run with analytics off: what click recording adds to p99.
                    off_latency = run_wrk(
                        off.url,
                        threads=1,
                        connections=bench_http.LATENCY_CONNECTIONS,
                        duration_s=bench_http.duration_s(quick),
                    )
                    pair, pair_err = attempt(
                        f"analytics-cost-{server}", lambda: analytics_pair(on, off, quick, script)
                    )
                    fresh_pair, fresh_err = attempt(
                        f"analytics-cost-new-visitors-{server}",
                        lambda: analytics_pair(on, off, quick, script, fresh=True),
                    )
                    share = _child_share(fresh_pair)
                    if share:
                        background, background_err = attempt(
                            f"background-cpu-cost-{server}",
                            lambda: background_pair(off, share, quick, script),
                        )

            _, err = attempt(f"redirect-{server}", run)
            pair_err = pair_err or err
            records.append(
                redirect_record(server, figures, off_latency, nginx, ceiling, ceilings, err)
            )
            records.append(analytics_record(server, pair, pair_err))
            records.append(analytics_record(server, fresh_pair, fresh_err or err, fresh=True))
            records.append(background_record(server, background, fresh_pair, background_err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records


def redirect_record(
    server: bench_http.Server,
    got: bench_http.HttpFigures | None,
    off_latency: WrkResult | None,
    nginx: bench_http.HttpFigures | None,
    ceiling: dict[str, Any],
    ceilings: dict[bench_http.Server, bench_http.HttpFigures],
    err: str | None,
) -> dict[str, Any]:
    ratio = got.ops_per_s / nginx.ops_per_s if got and nginx else None
    same = ceilings[server].ops_per_s
    met_ratio = ratio >= REDIRECT_TARGET_RATIO if ratio is not None else None
    met_p99 = got.p99_ms < REDIRECT_TARGET_P99_MS if got and got.p99_ms is not None else None
    return result(
        f"redirect-{server}",
        got.ops_per_s if got else None,
        got.p50_ms if got else None,
        got.p99_ms if got else None,
        "nginx-302",
        nginx.ops_per_s if nginx else None,
        target_ratio=REDIRECT_TARGET_RATIO,
        met_ratio=met_ratio,
        target_p99_ms=REDIRECT_TARGET_P99_MS,
        met_p99=met_p99,
        analytics_off_p50_ms=off_latency.p50_ms if off_latency else None,
        analytics_off_p99_ms=off_latency.p99_ms if off_latency else None,
        met=(met_ratio and met_p99) if met_ratio is not None and met_p99 is not None else None,
        share_of_ceiling=got.ops_per_s / ceiling["ops_per_s"] if got else None,
        **{f"share_of_{server}_ceiling": got.ops_per_s / same if got else None},
        server=server,
        config="GET /r/{code}, cached link, embedded (SQLite, memory), analytics on, one process",
        non_2xx=got.non_2xx if got else None,
        socket_errors=got.socket_errors if got else None,
        error=err or (None if nginx else "no nginx figure to compare with"),
    )


def analytics_record(
    server: bench_http.Server, pair: AnalyticsPair | None, err: str | None, fresh: bool = False
) -> dict[str, Any]:
    ratio = pair.on_per_s / pair.off_per_s if pair else None
    change = abs(1.0 - ratio) if ratio is not None else None
    clients = (
        NEW_VISITORS
        if fresh
        else f"{CLIENT_IPS} addresses (X-Forwarded-For), {len(USER_AGENTS)} user agents"
    )
    return result(
        f"analytics-cost-new-visitors-{server}" if fresh else f"analytics-cost-{server}",
        pair.on_per_s if pair else None,
        None,
        None,
        f"redirect-{server}-analytics-off",
        pair.off_per_s if pair else None,
        change=_round(change, 4),
        target_max_change=ANALYTICS_TARGET_CHANGE,
        met=change < ANALYTICS_TARGET_CHANGE if change is not None else None,
        server=server,
        requests=pair.on_requests if pair else None,
        peer_requests=pair.off_requests if pair else None,
        clicks_sent=pair.clicks_sent if pair else None,
        clicks_recorded=pair.clicks_recorded if pair else None,
        rounds=pair.rounds if pair else None,
        **_round_changes(pair.round_ratios if pair else ()),
        click_process_cpu_share=_child_share(pair),
        click_process_cpu_us_per_click=(
            pair.child_cpu_s / pair.on_requests * 1e6
            if pair and pair.child_cpu_s is not None and pair.on_requests
            else None
        ),
        clients=clients,
        config="GET /r/{code} at 50 connections; TENFOLD_SHORTENER_ANALYTICS=true vs false "
        "(defaults otherwise: raw clicks kept)",
        non_2xx=pair.non_2xx if pair else None,
        socket_errors=pair.socket_errors if pair else None,
        error=err,
    )


def _round_changes(ratios: Sequence[float]) -> dict[str, Any]:
    """Each round's change (|1 - ratio|) and their median: a burst of the host's stolen time
    moves one round, where it would move the summed totals."""
    if not ratios:
        return {"round_changes": None, "median_round_change": None}
    changes = [abs(1.0 - r) for r in ratios]
    return {
        "round_changes": [round(c, 4) for c in changes],
        "median_round_change": round(statistics.median(changes), 4),
    }


def _child_share(pair: AnalyticsPair | None) -> float | None:
    """The click process's CPU over the timed analytics-on runs, as a share of one core."""
    if pair is None or pair.child_cpu_s is None or not pair.on_seconds:
        return None
    return pair.child_cpu_s / pair.on_seconds


def background_record(
    server: bench_http.Server,
    got: BackgroundPair | None,
    fresh: AnalyticsPair | None,
    err: str | None,
) -> dict[str, Any]:
    change = abs(1.0 - got.beside_per_s / got.alone_per_s) if got else None
    return result(
        f"background-cpu-cost-{server}",
        got.beside_per_s if got else None,
        None,
        None,
        f"redirect-{server}-analytics-off-alone",
        got.alone_per_s if got else None,
        change=_round(change, 4),
        burner_cpu_share=got.burner_share if got else None,
        **_round_changes(got.round_ratios if got else ()),
        click_process_cpu_share=_child_share(fresh),
        rounds=got.rounds if got else None,
        server=server,
        clients=NEW_VISITORS,
        config="the analytics-off server beside a niced process burning about the CPU the "
        "click analytics process used at new-visitor load: what that much CPU spent on "
        "anything else costs this machine (the peer of analytics-cost-new-visitors)",
        error=err or (None if fresh and _child_share(fresh) else "no click process CPU figure"),
    )


# --- 2. creation on PostgreSQL -------------------------------------------------------------


@dataclass
class Bulk:
    links_per_s: float
    p50_ms: float
    p99_ms: float
    links: int
    calls: int
    failed: int


def bulk_create(base_url: str, key: str, seconds: float) -> Bulk:
    """BULK_CLIENTS callers posting BULK_SIZE distinct URLs a call for `seconds`."""
    import httpx
    import orjson

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    run_id = secrets.token_hex(3)

    def body(client: int, call: int) -> bytes:
        prefix = f"https://example.com/{run_id}/{client}/{call}/"
        return orjson.dumps({"urls": [{"url": f"{prefix}{i}"} for i in range(BULK_SIZE)]})

    async def main() -> Bulk:
        samples: list[int] = []
        counts = {"links": 0, "failed": 0}
        deadline = 0.0

        async def caller(http: httpx.AsyncClient, client: int, timed: bool) -> None:
            call = 0
            while time.perf_counter() < deadline:
                payload = body(client, call if timed else -call - 1)
                t0 = time.perf_counter_ns()
                response = await http.post(BULK_PATH, content=payload, headers=headers)
                elapsed = time.perf_counter_ns() - t0
                if response.status_code != 200:
                    raise RuntimeError(
                        f"POST {BULK_PATH} answered {response.status_code}: {response.text[:300]}"
                    )
                answer = orjson.loads(response.content)
                if timed:
                    samples.append(elapsed)
                    counts["links"] += answer["created"]
                    counts["failed"] += answer["failed"]
                call += 1

        limits = httpx.Limits(max_connections=BULK_CLIENTS)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
            deadline = time.perf_counter() + 1.0  # warm-up: connections, code blocks, caches
            await asyncio.gather(*(caller(http, c, False) for c in range(BULK_CLIENTS)))
            start = time.perf_counter()
            deadline = start + seconds
            await asyncio.gather(*(caller(http, c, True) for c in range(BULK_CLIENTS)))
            elapsed_s = time.perf_counter() - start
        samples.sort()
        return Bulk(
            links_per_s=counts["links"] / elapsed_s,
            p50_ms=percentile_ms(samples, 50),
            p99_ms=percentile_ms(samples, 99),
            links=counts["links"],
            calls=len(samples),
            failed=counts["failed"],
        )

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main())


def creation_results(quick: bool) -> list[dict[str, Any]]:
    common: dict[str, Any] = {
        "store": "postgresql + redis (scale-out)",
        "server": "uvicorn",
        "target_ops_per_s": CREATE_TARGET_PER_S,
    }
    bulk: Bulk | None = None
    single: bench_http.HttpFigures | None = None
    bulk_err = single_err = None
    try:
        with throwaway_database() as url:
            data_dir = Path(tempfile.mkdtemp(prefix="tenfold-bench-shortener-pg-"))
            secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
            env = server_env(
                data_dir,
                "shortener",
                TENFOLD_DATABASE_URL=url,
                TENFOLD_REDIS_URL=REDIS_URL,
                TENFOLD_REDIS_PREFIX=f"{REDIS_PREFIX}shortener",
                TENFOLD_SECRET_KEY=secret,
            )
            try:
                with bench_http.serve_app("tenfold.app:build_app", env, "uvicorn") as base_url:
                    admin = admin_key(data_dir)
                    # A business account (no monthly quota): creation as a customer does it.
                    status, _, account = request(
                        base_url,
                        "POST",
                        "/api/v1/accounts",
                        {"email": f"bench-{TOKEN}@example.com", "plan": "business"},
                        {"Authorization": f"Bearer {admin}"},
                    )
                    if status != 201 or not isinstance(account, dict):
                        raise RuntimeError(f"POST /api/v1/accounts answered {status}: {account}")
                    key = str(account["api_key"])
                    _create_link(base_url, key)

                    log(f"shortener: bulk creation, {BULK_CLIENTS} clients x {BULK_SIZE} links")
                    bulk, bulk_err = attempt(
                        "create-bulk-pg-http",
                        lambda: bulk_create(base_url, key, bench_http.duration_s(quick)),
                    )
                    log("shortener: single creation, POST /api/v1/urls under wrk")
                    single, single_err = attempt(
                        "create-single-pg-http",
                        lambda: bench_http.load(
                            base_url + CREATE_PATH,
                            quick,
                            method="POST",
                            body=json.dumps({"url": TARGET_URL}),
                            headers={"Authorization": f"Bearer {key}"},
                        ),
                    )
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        log(f"shortener: creation: {message}")
        bulk_err = bulk_err or message
        single_err = single_err or message
    finally:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_timeout=10)
            delete_prefix(client, REDIS_PREFIX)
            client.close()
        except Exception as exc:
            log(f"shortener: could not delete Redis keys under {REDIS_PREFIX}: {exc}")

    return [
        result(
            "create-bulk-pg-http",
            bulk.links_per_s if bulk else None,
            bulk.p50_ms if bulk else None,
            bulk.p99_ms if bulk else None,
            "create-single-pg-http",
            single.ops_per_s if single else None,
            met=bulk.links_per_s >= CREATE_TARGET_PER_S if bulk else None,
            unit="links/s; p50/p99 per bulk call",
            bulk_size=BULK_SIZE,
            clients=BULK_CLIENTS,
            calls=bulk.calls if bulk else None,
            links_created=bulk.links if bulk else None,
            links_failed=bulk.failed if bulk else None,
            error=bulk_err,
            **common,
        ),
        result(
            "create-single-pg-http",
            single.ops_per_s if single else None,
            single.p50_ms if single else None,
            single.p99_ms if single else None,
            unit="links/s (one a request, wrk at 50 connections)",
            non_2xx=single.non_2xx if single else None,
            socket_errors=single.socket_errors if single else None,
            error=single_err,
            **{k: v for k, v in common.items() if k != "target_ops_per_s"},
        ),
    ]


# --- 3. the analytics query ----------------------------------------------------------------


def analytics_query_results(quick: bool) -> list[dict[str, Any]]:
    """benchmarks/_analytics_query.py's measurement on both backends: for each, the slowest
    granularity's median report() time is the figure."""
    from benchmarks import _analytics_query as aq
    from tenfold.kernel.analytics import DuckDBStore, PostgresAnalyticsStore

    clicks = 100_000 if quick else 1_000_000

    async def duck() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tenfold-bench-analytics-") as tmp:
            store = DuckDBStore(Path(tmp) / "analytics.duckdb")
            try:
                return await aq.measure("duckdb", store, clicks)
            finally:
                await store.close()

    async def postgres() -> dict[str, Any]:
        name = f"tfbench_{secrets.token_hex(5)}"
        await aq.pg_exec(f'CREATE DATABASE "{name}"')
        store = PostgresAnalyticsStore(aq.POSTGRES_URL.rsplit("/", 1)[0] + "/" + name)
        try:
            return await aq.measure("postgres", store, clicks)
        finally:
            await store.close()
            await aq.pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    found: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
    backends: dict[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = {
        "duckdb": duck,
        "postgres": postgres,
    }
    for backend, fn in backends.items():
        log(f"shortener: analytics report() on {backend}, {clicks:,} clicks")

        def measure(fn: Callable[[], Coroutine[Any, Any, dict[str, Any]]] = fn) -> dict[str, Any]:
            return asyncio.run(fn())

        found[backend] = attempt(f"analytics-report-{backend}", measure)

    def slowest(figures: dict[str, Any] | None) -> tuple[str | None, float | None, float | None]:
        if not figures:
            return None, None, None
        worst = max(("hour", "day", "week"), key=lambda g: figures[f"{g}_ms_p50"])
        return worst, figures[f"{worst}_ms_p50"], figures[f"{worst}_ms_p95"]

    records = []
    for backend, other in (("duckdb", "postgres"), ("postgres", "duckdb")):
        figures, err = found[backend]
        peer_figures, _ = found[other]
        granularity, p50, p95 = slowest(figures)
        _, peer_p50, _ = slowest(peer_figures)
        records.append(
            result(
                f"analytics-report-{backend}",
                1_000 / p50 if p50 else None,
                p50,
                None,
                f"analytics-report-{other}",
                1_000 / peer_p50 if peer_p50 else None,
                unit="reports/s, one at a time (1000 / p50_ms)",
                p95_ms=p95,
                peer_p50_ms=peer_p50,
                slowest_granularity=granularity,
                target_ms=REPORT_TARGET_MS,
                met=p50 < REPORT_TARGET_MS if p50 is not None else None,
                met_p95=p95 < REPORT_TARGET_MS if p95 is not None else None,
                clicks=clicks,
                figures=figures,
                error=err,
            )
        )
    return records


# --- 4. listing an owner's links at 10M ---------------------------------------------------

LIST_LINKS = 10_000_000
LIST_LINKS_QUICK = 200_000
LIST_TARGET_MS = 100.0
LIST_SAMPLES = 15
_FILL = """
INSERT INTO shortener_links (domain, short_code, long_url, owner, description, created_at_ms,
  updated_at_ms, expires_at_ms, is_active, is_custom, redirect_status, max_visits, click_count,
  password_hash, blocked_reason)
SELECT '', 'c' || g, 'https://example.com/item/' || g,
  CASE WHEN g % 10 = 0 THEN 'account:other' ELSE 'account:big' END,
  CASE WHEN g % 1000 = 0 THEN 'spring campaign' WHEN g % 10 = 3 THEN 'summer' ELSE '' END,
  1700000000000 + g, 1700000000000 + g, NULL, true, false, 302, NULL, (g::bigint * 7919) % 100000,
  NULL, NULL
FROM generate_series({first}, {last}) AS g
"""
_OFFSET_PAGE = (
    "SELECT * FROM shortener_links WHERE owner = 'account:big' "
    "ORDER BY created_at_ms DESC, link_id DESC OFFSET {offset} LIMIT 50"
)


def listing_results(quick: bool) -> list[dict[str, Any]]:
    """One owner's links at 10M rows: keyset pages (first, deep, by clicks, searched) against
    the same deep page found by OFFSET, the way admin pages that time out do it."""
    import sqlalchemy as sa

    from tenfold.kernel import sql
    from tenfold.shortener.stores.sql import SqlLinkStore

    n = LIST_LINKS_QUICK if quick else LIST_LINKS
    log(f"shortener: listing one owner's links among {n:,} (PostgreSQL)")

    async def measure(url: str) -> dict[str, Any]:
        engine = sql.create_engine(url)
        try:
            began = time.perf_counter()
            for first in range(1, n + 1, 500_000):  # statements well inside the driver's timeout
                async with engine.begin() as conn:
                    last = min(n, first + 499_999)
                    await conn.execute(sa.text(_FILL.format(first=first, last=last)))
            async with engine.connect() as conn:
                await conn.execute(sa.text("COMMIT"))
                await conn.execute(sa.text("ANALYZE shortener_links"))
            load_s = time.perf_counter() - began
            store = SqlLinkStore(engine)
            middle = n // 2 if (n // 2) % 10 else n // 2 + 1  # an 'account:big' row
            deep = (1_700_000_000_000 + middle, middle)

            async def timed(fn: Callable[[], Coroutine[Any, Any, Any]]) -> float | None:
                samples = []
                for _ in range(LIST_SAMPLES):
                    t = time.perf_counter()
                    try:
                        await fn()
                    except Exception as exc:  # e.g. past the driver's statement timeout
                        log(f"shortener: listing query failed: {type(exc).__name__}: {exc}")
                        return None
                    samples.append((time.perf_counter() - t) * 1000)
                return sorted(samples)[len(samples) // 2]

            async def offset_page() -> None:
                async with engine.connect() as conn:
                    rows = await conn.execute(sa.text(_OFFSET_PAGE.format(offset=int(n * 0.45))))
                    rows.all()

            owner = "account:big"
            figures = {
                "first_page_ms": await timed(lambda: store.page(owner, limit=50)),
                "deep_page_ms": await timed(lambda: store.page(owner, limit=50, after=deep)),
                "by_clicks_ms": await timed(lambda: store.page(owner, limit=50, sort="clicks")),
                # A term in 1 link of 10, spread over the table; one in 1,000.
                "search_common_ms": await timed(
                    lambda: store.page(owner, limit=50, search="summer")
                ),
                "search_rare_ms": await timed(
                    lambda: store.page(owner, limit=50, search="spring campaign")
                ),
                # The worst case, reported apart: a term in 1 link of 9, all of them old
                # ('item/12...'), so the newest links hold none and the trigram index hands
                # over a ninth of the table to sort.
                "worst_search_clustered_ms": await timed(
                    lambda: store.page(owner, limit=50, search="item/12")
                ),
                "offset_deep_page_ms": await timed(offset_page),
            }
            return {"links": n, "load_s": round(load_s, 1), **figures}
        finally:
            await engine.dispose()

    def go() -> dict[str, Any]:
        with throwaway_database() as url:
            return asyncio.run(measure(url))

    figures, err = attempt("list-links-pg", go)
    pages = [
        v
        for k, v in (figures or {}).items()
        if k.endswith("_ms") and not k.startswith(("offset", "worst"))
    ]
    keyset = None if not pages or None in pages else max(pages)
    if figures and keyset is None:
        err = err or "a keyset query failed (see the log)"
    offset = figures["offset_deep_page_ms"] if figures else None
    return [
        result(
            "list-links-pg",
            1_000 / keyset if keyset else None,
            keyset,
            None,
            "list-links-offset-pg",
            1_000 / offset if offset else None,
            unit="pages/s (1000 / the slowest keyset page's p50 ms)",
            target_ms=LIST_TARGET_MS,
            met=keyset < LIST_TARGET_MS if keyset is not None else None,
            figures={k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}
            if figures
            else None,
            error=err,
        )
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    ensure_wrk()
    records = bench_http.ceiling_results(quick)
    records += redirect_results(quick)
    records += creation_results(quick)
    records += analytics_query_results(quick)
    records += listing_results(quick)
    return records
