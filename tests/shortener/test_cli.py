"""`tenfold shortener ...` on the local database, and against a running server (--url)."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner, Result

from tenfold.cli import app
from tenfold.kernel.auth import KeyStore
from tenfold.kernel.crypto import master_key
from tenfold.kernel.runtime import Runtime
from tenfold.kernel.sql import create_engine
from tenfold.settings import load_settings
from tenfold.shortener.api import recorder_for, service_for
from tests.backends import SqliteTemplate, free_port
from tests.conftest import TEST_SECRET_KEY

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)


def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str) -> None:
    for name in list(os.environ):
        if name.startswith("TENFOLD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TENFOLD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TENFOLD_DATABASE_URL", db_url)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at 80 columns otherwise


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's environment: a migrated database of each SQL backend, no Redis, no server."""
    clean_env(monkeypatch, tmp_path, db_url)
    if not db_url.startswith("sqlite"):
        monkeypatch.setenv("TENFOLD_SECRET_KEY", TEST_SECRET_KEY)  # scale-out needs one
    master_key(load_settings())  # as `tenfold serve` would have: no log line in the output
    return tmp_path


def tenfold(*args: str) -> Result:
    return CliRunner().invoke(app, ["shortener", *args])


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def listed(*args: str) -> list[dict[str, Any]]:
    done = tenfold("list", "--all", "--json", *args)
    assert done.exit_code == 0, done.output
    return list(orjson.loads(done.stdout))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def click(code: str, n: int, referrer: str = "") -> None:
    """`n` redirects of a link, counted and recorded as a server would; then close the store."""

    async def main() -> None:
        runtime = Runtime.from_settings(load_settings())
        try:
            service = service_for(runtime)
            service.recorder = recorder = recorder_for(runtime, in_process=True)
            target = await service.resolve("", code)
            assert target is not None and recorder is not None
            for i in range(n):
                service.visit("", code, target, f"198.51.100.{i}", CHROME, referrer)
            await service.flush()  # the links' click counts, and the analytics store
            await recorder.close()
        finally:
            await runtime.close()

    asyncio.run(main())


# --- create and list -----------------------------------------------------------------------


def test_create_and_list(env: Path) -> None:
    done = tenfold(
        "create", "https://Example.com/launch", "--alias", "launch", "--description", "spring"
    )
    assert done.exit_code == 0, done.output
    assert one_line(done.stdout).endswith("/r/launch")
    expiring = tenfold("create", "https://example.com/sale", "--expires", "2099-01-31", "--json")
    assert expiring.exit_code == 0, expiring.output
    sale = orjson.loads(expiring.stdout)
    assert sale["expires_at"] == "2099-01-31T00:00:00Z" and len(sale["short_code"]) == 7

    table = tenfold("list")
    assert table.exit_code == 0, table.output
    for text in ("launch", "https://example.com/launch", "spring", sale["short_code"]):
        assert text in table.stdout
    assert table.stdout.index(sale["short_code"]) < table.stdout.index("launch")  # newest first
    assert [link["short_code"] for link in listed("--search", "spring")] == ["launch"]
    first = tenfold("list", "--limit", "1")
    assert "--all lists every link" in first.stdout and "launch" not in first.stdout
    assert len(listed()) == 2
    click("launch", 2)
    assert listed("--sort", "clicks")[0]["short_code"] == "launch"
    nothing = tenfold("list", "--search", "nowhere")
    assert nothing.exit_code == 0 and "no links matching 'nowhere'" in nothing.stdout


def test_create_errors_are_one_line(env: Path) -> None:
    assert tenfold("create", "https://example.com/a", "--alias", "mine").exit_code == 0
    bad_url = tenfold("create", "ftp://example.com")
    assert bad_url.exit_code == 2
    assert "url: only http and https URLs" in one_line(bad_url.stderr)
    taken = tenfold("create", "https://example.com/b", "--alias", "mine")
    assert taken.exit_code == 1 and "the alias 'mine' is taken" in one_line(taken.stderr)
    when = tenfold("create", "https://example.com/c", "--expires", "next week")
    assert when.exit_code == 2 and "--expires: 'next week'" in one_line(when.stderr)
    past = tenfold("create", "https://example.com/c", "--expires", "2001-01-01")
    assert past.exit_code == 2 and "expires_at" in one_line(past.stderr)


# --- stats ---------------------------------------------------------------------------------


def test_stats(env: Path) -> None:
    assert tenfold("create", "https://example.com/s", "--alias", "stats1").exit_code == 0
    click("stats1", 3, referrer="https://news.example/item")
    done = tenfold("stats", "stats1")
    assert done.exit_code == 0, done.output
    assert "3 clicks, 3 unique, 0 from bots" in done.stdout
    for text in ("top countries", "top devices", "top browsers", "top referrers"):
        assert text in done.stdout
    assert "Chrome" in done.stdout and "news.example" in done.stdout
    assert "clicks per day" in done.stdout and "█" in done.stdout
    report = orjson.loads(tenfold("stats", "stats1", "--granularity", "hour", "--json").stdout)
    assert report["total_clicks"] == 3 and report["click_timeline"][0]["period"].endswith("Z")
    empty = tenfold("stats", "stats1", "--start", "2001-01-01", "--end", "2001-01-02")
    assert empty.exit_code == 0 and "0 clicks" in empty.stdout

    unknown = tenfold("stats", "nope123")
    assert unknown.exit_code == 1 and "link nope123 does not exist" in one_line(unknown.stderr)
    backwards = tenfold("stats", "stats1", "--start", "2026-02-02", "--end", "2026-02-01")
    assert backwards.exit_code == 2 and "end_date" in one_line(backwards.stderr)
    bad_day = tenfold("stats", "stats1", "--start", "yesterday")
    assert bad_day.exit_code == 2 and "--start: 'yesterday'" in one_line(bad_day.stderr)


# --- import --------------------------------------------------------------------------------


def test_import_reports_and_a_rerun_does_not_double_create(env: Path) -> None:
    assert tenfold("create", "https://elsewhere.example", "--alias", "not-mine").exit_code == 0
    source = write_csv(
        env / "links.csv",
        ["url", "custom_alias", "expires_at", "description", "team"],
        [
            ["https://example.com/a", "alias-a", "", "first", "blue"],
            ["https://Example.com:443/b", "alias-b", "2099-01-01T00:00:00Z", "", "red"],
            ["not a url", "", "", "", "blue"],
            ["https://example.com/c", "", "tomorrow", "", "red"],
            ["https://example.com/d", "", "", "no alias", "blue"],
            ["https://example.com/e", "not-mine", "", "", "red"],
        ],
    )
    errors = env / "failed.csv"
    first = tenfold("import", str(source), "--errors", str(errors))
    assert first.exit_code == 1, first.output
    assert "importing" in first.stdout
    assert "6 row(s): 3 created, 0 already existed, 3 failed" in first.stdout
    with errors.open(newline="") as fh:
        failed = list(csv.DictReader(fh))
    assert [(r["line"], r["reason"], r["team"]) for r in failed] == [
        ("4", "scheme-not-allowed", "blue"),
        ("5", "invalid-time", "red"),
        ("7", "alias-taken", "red"),
    ]
    assert failed[1]["expires_at"] == "tomorrow" and "ISO 8601" in failed[1]["detail"]
    by_code = {link["short_code"]: link for link in listed()}
    assert by_code["alias-b"]["long_url"] == "https://example.com/b"
    assert by_code["alias-b"]["expires_at"] == "2099-01-01T00:00:00Z"
    assert by_code["alias-a"]["description"] == "first"

    again = tenfold("import", str(source))
    assert again.exit_code == 1
    # the aliased rows exist already; the row without an alias cannot be told apart: new link
    assert "6 row(s): 1 created, 2 already existed, 3 failed" in again.stdout
    assert "first failure, line 4" in again.stdout
    assert len(listed()) == 1 + 3 + 1


def test_import_of_many_rows_goes_in_bulk_calls(env: Path) -> None:
    rows = [[f"https://example.com/many/{i}", f"many-{i}"] for i in range(1_001)]
    source = write_csv(env / "many.csv", ["url", "custom_alias"], rows)
    done = tenfold("import", str(source))
    assert done.exit_code == 0, done.output
    assert "1001 row(s): 1001 created, 0 already existed, 0 failed" in done.stdout
    assert "1001/1001" in done.stdout  # the progress bar, finished
    assert len(listed("--search", "many-")) == 1_001


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"link,custom_alias\nhttps://example.com,x\n", "no `url` column in the header row"),
        (b"", "empty file"),
        (b"url\n\xff\xfe\x00bad\n", "cannot read it as a UTF-8 CSV file"),
    ],
)
def test_a_bad_csv_is_a_one_line_error(env: Path, content: bytes, message: str) -> None:
    source = env / "bad.csv"
    source.write_bytes(content)
    done = tenfold("import", str(source))
    assert done.exit_code == 2
    assert message in one_line(done.stderr)
    assert listed() == []


def test_a_missing_csv_is_a_one_line_error(env: Path) -> None:
    done = tenfold("import", str(env / "nowhere.csv"))
    assert done.exit_code == 2 and "nowhere.csv: cannot read it" in one_line(done.stderr)


# --- set-up errors -------------------------------------------------------------------------


def test_an_unmigrated_database_says_so(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENFOLD_DATABASE_URL", f"sqlite:///{env / 'empty.sqlite'}")
    done = tenfold("list")
    assert done.exit_code == 1
    assert "run `tenfold migrate`" in one_line(done.stderr)


def test_url_without_an_api_key_says_how(env: Path) -> None:
    done = tenfold("list", "--url", "http://127.0.0.1:1")
    assert done.exit_code == 2 and "TENFOLD_API_KEY" in one_line(done.stderr)
    nowhere = tenfold("list", "--url", "http://127.0.0.1:1", "--api-key", "tf_x")
    assert nowhere.exit_code == 1 and "cannot reach the server" in one_line(nowhere.stderr)


# --- against a running server --------------------------------------------------------------


@pytest.fixture
def server(
    tmp_path: Path, sqlite_template: SqliteTemplate, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str]]:
    """An embedded `tenfold serve`-like process (it holds the DuckDB file): (url, API key)."""
    db_url = sqlite_template.clone(tmp_path / "db" / "tenfold.db")
    clean_env(monkeypatch, tmp_path, db_url)

    async def make_key() -> str:
        engine = create_engine(db_url)
        try:
            _, plaintext = await KeyStore(engine).create("cli test", ["shortener:write"])
            return plaintext
        finally:
            await engine.dispose()

    key = asyncio.run(make_key())
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "tenfold.app:build_app", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = os.environ | {"TENFOLD_SERVICES": "shortener", "TENFOLD_LOG_LEVEL": "warning"}
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)  # polls the child's readiness
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_every_command_against_a_server(
    server: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, key = server
    made = tenfold("create", "https://example.com/served", "--alias", "served", "--url", url)
    assert made.exit_code == 2 and "TENFOLD_API_KEY" in made.stderr  # no key yet
    monkeypatch.setenv("TENFOLD_API_KEY", key)
    made = tenfold("create", "https://example.com/served", "--alias", "served", "--url", url)
    assert made.exit_code == 0, made.output
    assert one_line(made.stdout) == f"{url}/r/served"
    monkeypatch.setenv("TENFOLD_URL", url)  # the environment names the server too
    source = write_csv(
        tmp_path / "links.csv",
        ["url", "custom_alias"],
        [["https://example.com/served", "served"], ["https://example.com/new", "new-one"]],
    )
    done = tenfold("import", str(source))
    assert done.exit_code == 0, done.output
    assert "2 row(s): 1 created, 1 already existed, 0 failed" in done.stdout
    assert {link["short_code"] for link in listed()} == {"served", "new-one"}
    assert httpx.get(f"{url}/r/served", headers={"user-agent": CHROME}).status_code == 302

    # the server holds the analytics file: locally, stats says to ask the server
    monkeypatch.delenv("TENFOLD_URL")
    local = tenfold("stats", "served")
    assert local.exit_code == 1
    line = one_line(local.stderr)
    assert "only one process may open it" in line and "--url" in line
    monkeypatch.setenv("TENFOLD_URL", url)
    deadline = time.monotonic() + 10
    while True:  # the server writes clicks once a second
        report = tenfold("stats", "served", "--json")
        assert report.exit_code == 0, report.output
        if orjson.loads(report.stdout)["total_clicks"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    shown = tenfold("stats", "served")
    assert "1 clicks, 1 unique" in shown.stdout and "Chrome" in shown.stdout

    refused = tenfold("list", "--api-key", "tf_wrong")
    assert refused.exit_code == 1 and "API key was refused" in one_line(refused.stderr)
