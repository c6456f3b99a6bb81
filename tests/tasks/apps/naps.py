"""Tasks for worker-process tests: sleepers, a timeout overrunner, a logger."""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from tenfold.tasks import TaskRegistry
from tenfold.tasks.worker import TaskContext

registry = TaskRegistry()
log = structlog.get_logger("tests.apps")


@registry.task("nap")
def nap(ctx: TaskContext, ms: int = 100, mark_dir: str | None = None) -> int:
    """Sleep `ms` milliseconds; with `mark_dir`, leave a file named after the task as it starts."""
    if mark_dir is not None:
        Path(mark_dir, ctx.task_id).write_text(str(os.getpid()))
    time.sleep(ms / 1000)
    return os.getpid()


@registry.task("overrun", timeout=1, max_retries=0)
def overrun(seconds: float = 30.0) -> None:
    """A synchronous task that ignores its 1 s timeout: its worker process must be replaced."""
    time.sleep(seconds)


@registry.task("shout")
async def shout(word: str = "hello") -> str:
    """Logs one line (which must carry the task id) and returns `word` upper-cased."""
    log.info("apps.shout", word=word)
    return word.upper()
