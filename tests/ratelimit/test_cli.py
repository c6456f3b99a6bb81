"""`tenfold ratelimit ...` against an embedded database."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tenfold.cli import app
from tests.backends import REDIS_URL


@pytest.fixture
def env(tmp_path: Path, sqlite_template: object, monkeypatch: pytest.MonkeyPatch) -> None:
    url = sqlite_template.clone(tmp_path / "db.sqlite")  # type: ignore[attr-defined]
    monkeypatch.setenv("TENFOLD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TENFOLD_DATABASE_URL", url)
    monkeypatch.delenv("TENFOLD_REDIS_URL", raising=False)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_create_assign_list_and_check(
    env: None, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # counters shared between CLI runs live in Redis (in memory they last one command)
    monkeypatch.setenv("TENFOLD_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("TENFOLD_REDIS_PREFIX", redis_prefix)
    code, out = run(
        "ratelimit",
        "policies",
        "create",
        "--name",
        "free",
        "--algorithm",
        "token_bucket",
        "--rate",
        "2",
        "--window",
        "60",
    )
    assert code == 0 and "created policy 1" in out
    code, out = run("ratelimit", "policies", "assign", "1", "client-a", "client-b")
    assert code == 0 and "2 client(s)" in out
    code, out = run("ratelimit", "policies", "list")
    assert code == 0 and "free" in out and "token_bucket" in out
    assert [run("ratelimit", "check", "client-a")[0] for _ in range(3)] == [0, 0, 1]
    code, out = run("ratelimit", "check", "client-c")
    assert code == 0 and "no policy applies" in out


def test_bad_input_is_one_line_and_non_zero(env: None) -> None:
    code, out = run(
        "ratelimit",
        "policies",
        "create",
        "--name",
        "x",
        "--algorithm",
        "leaky",
        "--rate",
        "2",
        "--window",
        "60",
    )
    assert code == 2 and "algorithm: unknown algorithm 'leaky'" in out
    code, out = run(
        "ratelimit",
        "policies",
        "create",
        "--name",
        "x",
        "--algorithm",
        "fixed_window",
        "--rate",
        "2",
        "--window",
        "0",
    )
    assert code == 2 and "time_window" in out
    code, out = run("ratelimit", "policies", "assign", "42", "client-a")
    assert code == 2 and "policy 42 does not exist" in out
    code, out = run("ratelimit", "policies", "list")
    assert "x" not in out.split()  # nothing was written
