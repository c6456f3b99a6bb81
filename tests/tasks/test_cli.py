"""`tenfold tasks ...` against an embedded database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tenfold.kernel.sql import create_engine
from tenfold.tasks.stores.sql import SqlTaskStore
from tests.backends import SqliteTemplate


@pytest.fixture
def db(tmp_path: Path, sqlite_template: SqliteTemplate, monkeypatch: pytest.MonkeyPatch) -> str:
    url = sqlite_template.clone(tmp_path / "db.sqlite")
    monkeypatch.setenv("TENFOLD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TENFOLD_DATABASE_URL", url)
    monkeypatch.delenv("TENFOLD_REDIS_URL", raising=False)
    return url


def run(*args: str) -> tuple[int, str]:
    from tenfold.cli import app

    result = CliRunner().invoke(app, ["tasks", *args])
    return result.exit_code, result.output


def kill(url: str) -> str:
    """Claim the most urgent task and fail it for good, as a worker would; its id."""

    async def go() -> str:
        engine = create_engine(url)
        store = SqlTaskStore(engine)
        try:
            now = 2_000_000_000_000
            (claim,) = await store.claim(
                "w", queues=["default"], task_types=None, resources=[], limit=1,
                lease_ms=60_000, now_ms=now,
            )  # fmt: skip
            await store.fail(
                claim.task_id, claim.lease_token, error="boom: it broke", traceback=None,
                retry_at_ms=None, now_ms=now,
            )  # fmt: skip
            return claim.task_id
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_submit_show_cancel_retry(db: str) -> None:
    code, out = run(
        "submit", "emails.send", "--payload", '{"to": "a@example.com"}', "--priority", "2"
    )
    assert code == 0, out
    task_id = out.strip()
    assert len(task_id) == 36
    code, out = run("show", task_id)
    assert code == 0, out
    assert "emails.send" in out and "pending" in out and '"to": "a@example.com"' in out
    assert "priority" in out and "2" in out

    code, out = run("cancel", task_id)
    assert code == 0 and f"cancelled {task_id}" in out
    code, out = run("cancel", task_id)
    assert (
        code == 1 and out.strip() == f"error: task {task_id} is cancelled; it cannot be cancelled"
    )
    code, out = run("retry", task_id)
    assert code == 0 and f"re-driven {task_id}: pending" in out
    code, out = run("retry", task_id)
    assert code == 1 and "only dead or cancelled tasks" in out and out.count("\n") == 1

    code, out = run("submit", "later", "--delay", "3600")
    assert code == 0
    code, out = run("show", out.strip())
    assert "scheduled" in out


def test_idempotent_submit_and_dependencies(db: str) -> None:
    code, first = run("submit", "a", "--idempotency-key", "k1")
    assert code == 0
    code, again = run("submit", "a", "--idempotency-key", "k1")
    assert code == 0 and again.splitlines()[0] == first.strip()
    assert "matched an existing task" in again
    code, out = run("submit", "b", "--depends-on", first.strip())
    assert code == 0
    code, out = run("show", out.strip())
    assert "waiting" in out and first.strip() in out


def test_bad_input_is_one_line_and_non_zero(db: str) -> None:
    for args, expected, want in [
        (
            ("submit", "x", "--priority", "11"),
            "error: priority: must be an integer from 1 to 10",
            2,
        ),
        (("submit", "x", "--timeout", "0"), "error: timeout_seconds: must be an integer", 2),
        (("submit", "x", "--payload", "{nope"), "error: payload: must be JSON", 2),
        (("submit", "x", "--delay", "-1"), "error: delay: must not be negative", 2),
        (
            ("submit", "x", "--depends-on", "missing"),
            "error: dependencies: unknown task missing",
            2,
        ),
        (("show", "missing"), "error: task missing does not exist", 1),
        (("cancel", "missing"), "error: task missing does not exist", 1),
        (("retry", "missing"), "error: task missing does not exist", 1),
        (("dlq", "redrive"), "error: give task ids or --all (not both)", 2),
        (("dlq", "redrive", "x", "--queue", "q"), "error: --queue only applies with --all", 2),
    ]:
        code, out = run(*args)
        assert code == want, (args, out)
        assert out.startswith(expected) and out.count("\n") == 1, (args, out)


def test_stats_and_dead_letters(db: str) -> None:
    ids = [run("submit", "t.report", "--priority", p)[1].strip() for p in ("1", "1", "7")]
    code, out = run("stats")
    assert code == 0, out
    assert "default" in out and "dead letters: 0" in out
    rows = [line for line in out.splitlines() if "default" in line]
    assert [r.split("│")[2].strip() for r in rows] == ["1", "7"]  # priority column
    assert [r.split("│")[3].strip() for r in rows] == ["2", "1"]  # pending column

    assert kill(db) == ids[0]
    code, out = run("dlq", "list")
    assert code == 0 and ids[0] in out and "boom:" in out  # the error, maybe wrapped
    code, out = run("stats")
    assert "dead letters: 1" in out
    code, out = run("dlq", "redrive", ids[0], ids[1])
    assert code == 0 and "re-driven 1 task(s)" in out
    assert f"skipped {ids[1]}: task {ids[1]} is pending" in out
    code, out = run("dlq", "list")
    assert "no dead tasks" in out
    kill(db)
    code, out = run("dlq", "redrive", "--all")
    assert code == 0 and "re-driven 1 task(s)" in out
    code, out = run("dlq", "redrive", "--all", "--queue", "other")
    assert code == 0 and "re-driven 0 task(s)" in out


def test_unreachable_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TENFOLD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TENFOLD_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nothing")
    monkeypatch.delenv("TENFOLD_REDIS_URL", raising=False)
    code, out = run("stats")
    assert code == 1 and out.startswith("error: database: ") and "tenfold doctor" in out
    assert out.count("\n") == 1
