"""The `tenfold` command: help, migrate, keys, doctor, and refusing bad set-ups."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from tenfold import SERVICES
from tenfold.cli import app
from tenfold.kernel import sql
from tests.backends import PostgresTemplate, pg_exec, pg_url

KEY = re.compile(r"\btf_([0-9a-f]+)_([A-Za-z0-9_-]{20,})\b")
CLOSED_PORT = 1
_SCRIPT = Path(sys.executable).with_name("tenfold")  # the installed console script
ENTRY_POINT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tenfold"]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty embedded set-up: only TENFOLD_DATA_DIR, in a directory without tenfold.toml."""
    for name in list(os.environ):
        if name.startswith("TENFOLD_"):
            monkeypatch.delenv(name)
    # `tenfold serve` exports these for its workers; let monkeypatch undo that.
    for name in ("TENFOLD_HOST", "TENFOLD_PORT", "TENFOLD_SERVICES"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TENFOLD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at 80 columns otherwise
    return tmp_path / "data"


def tenfold(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_help_lists_every_command_and_service(data_dir: Path) -> None:
    done = subprocess.run(
        [*ENTRY_POINT, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"COLUMNS": "200"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("serve", "migrate", "doctor", "keys", *SERVICES):
        assert re.search(rf"^\W*{command}\b", done.stdout, re.M), command
    nested = tenfold("ratelimit", "--help")
    assert nested.exit_code == 0
    for command in ("policies", "check"):
        assert re.search(rf"^\W*{command}\b", nested.stdout, re.M), command
    keys = tenfold("keys", "--help")
    for command in ("create", "list", "revoke"):
        assert re.search(rf"^\W*{command}\b", keys.stdout, re.M), command


def test_migrate_then_keys_create_list_revoke(data_dir: Path) -> None:
    migrated = tenfold("migrate")
    assert migrated.exit_code == 0, migrated.output
    assert f"database at revision {sql.head_revision()}" in migrated.stdout

    created = tenfold("keys", "create", "--name", "ci bot", "--scope", "ratelimit:read")
    assert created.exit_code == 0, created.output
    printed = KEY.findall(created.stdout)
    assert len(printed) == 1  # the key, shown once
    key_id, secret = printed[0]

    listed = tenfold("keys", "list")
    assert listed.exit_code == 0, listed.output
    assert key_id in listed.stdout
    assert "ci bot" in listed.stdout
    assert "ratelimit:read" in listed.stdout
    assert secret not in listed.stdout
    assert not KEY.search(listed.stdout)

    revoked = tenfold("keys", "revoke", key_id)
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked {key_id}" in revoked.stdout
    assert key_id not in tenfold("keys", "list").stdout
    assert key_id in tenfold("keys", "list", "--all").stdout

    again = tenfold("keys", "revoke", key_id)
    assert again.exit_code == 1
    assert f"no active key '{key_id}'" in again.stderr


def test_keys_create_refuses_a_bad_scope(data_dir: Path) -> None:
    assert tenfold("migrate").exit_code == 0
    refused = tenfold("keys", "create", "--name", "x", "--scope", "ratelimit:everything")
    assert refused.exit_code == 2
    assert "invalid scope 'ratelimit:everything'" in one_line(refused.stderr)
    assert "tf_" not in tenfold("keys", "list").stdout


def test_doctor_is_happy_with_a_migrated_embedded_setup(data_dir: Path) -> None:
    before = tenfold("doctor")
    assert before.exit_code == 1  # not migrated yet
    assert "run `tenfold migrate`" in before.stdout
    assert tenfold("migrate").exit_code == 0
    doctor = tenfold("doctor")
    assert doctor.exit_code == 0, doctor.output
    assert "FAIL" not in doctor.stdout
    assert f"code needs {sql.head_revision()}" in doctor.stdout


def test_doctor_names_an_unreachable_redis_and_the_fix(data_dir: Path) -> None:
    assert tenfold("migrate").exit_code == 0
    doctor = tenfold("doctor", env={"TENFOLD_REDIS_URL": f"redis://127.0.0.1:{CLOSED_PORT}/0"})
    assert doctor.exit_code == 1
    kv_row = next(line for line in doctor.stdout.splitlines() if " kv " in line)
    assert "FAIL" in kv_row
    assert "TENFOLD_REDIS_URL" in kv_row
    database_row = next(line for line in doctor.stdout.splitlines() if " database " in line)
    assert "FAIL" not in database_row


def test_invalid_settings_are_one_line_on_stderr_and_exit_2(data_dir: Path) -> None:
    done = subprocess.run(
        [*ENTRY_POINT, "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"TENFOLD_SERVICES": "nope"},
        check=False,
    )
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("error: TENFOLD_SERVICES: unknown service 'nope'")
    assert done.stdout == ""
    assert not data_dir.exists()  # nothing was touched


@pytest.mark.parametrize("command", [["migrate"], ["serve"], ["keys", "list"]])
def test_every_command_refuses_invalid_settings(data_dir: Path, command: list[str]) -> None:
    result = tenfold(*command, env={"TENFOLD_PORT": "99999"})
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("error: TENFOLD_PORT: ")


def test_serve_refuses_to_start_without_its_database(data_dir: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{CLOSED_PORT}/x"
    result = tenfold("serve", "--port", "8765", env={"TENFOLD_DATABASE_URL": url})
    assert result.exit_code == 1
    assert "backend unreachable at start-up" in result.stderr
    assert "database:" in result.stderr
    assert "TENFOLD_DATABASE_URL" in result.stderr
    assert not (data_dir / "admin.key").exists()


def test_serve_refuses_an_unmigrated_scale_database(
    data_dir: Path, pg_template: PostgresTemplate
) -> None:
    pg_template.ensure()  # skips (or fails in CI) without PostgreSQL
    name = f"tft_{uuid.uuid4().hex[:12]}"
    pg_exec(f'CREATE DATABASE "{name}"')
    try:
        result = tenfold("serve", env={"TENFOLD_DATABASE_URL": pg_url(name)})
        assert sql.current_revision(pg_url(name)) is None  # scale mode never migrates on serve
    finally:
        pg_template.drop(name)
    assert result.exit_code == 1
    assert "run `tenfold migrate` first" in result.stderr


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_serve_answers_on_either_server_and_stops_on_sigterm(data_dir: Path, server: str) -> None:
    import signal
    import time
    import urllib.request

    from tests.backends import free_port

    port = free_port()
    env = os.environ | {"TENFOLD_SERVICES": "ratelimit", "TENFOLD_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [*ENTRY_POINT, "serve", "--port", str(port), "--server", server],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens (or died)
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{server} did not start"
                time.sleep(0.1)  # polling a starting child process; nothing to wait on
        key = (data_dir / "admin.key").read_text().strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/ratelimit/check",
            data=b'{"client_id": "c1", "api_key": "k1", "resource": "/x"}',
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:  # a lean route, through the guard
            assert r.status == 200 and r.headers["x-request-id"]
        proc.send_signal(signal.SIGTERM)
        # A stop: uvicorn re-raises the signal once it has shut down, granian exits 0.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "Traceback" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_serve_refuses_an_unknown_server(data_dir: Path) -> None:
    result = tenfold("serve", "--server", "gunicorn")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("error: TENFOLD_SERVER: ")
