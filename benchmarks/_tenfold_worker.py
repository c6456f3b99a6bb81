"""One tenfold task worker process for `python -m benchmarks tasks`.

    python -m benchmarks._tenfold_worker URL [--concurrency N] [--poll SECONDS]

Registers `noop` (returns None) and `stamp` (returns `time.time()` taken as the handler starts),
both plain synchronous functions like the peers' handlers, and runs a `Worker` woken by
PostgreSQL LISTEN/NOTIFY until SIGTERM or SIGINT, then stops gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from tenfold.kernel.sql import create_engine
from tenfold.tasks import TaskRegistry
from tenfold.tasks.stores.notify import PgNotifier
from tenfold.tasks.stores.sql import SqlTaskStore
from tenfold.tasks.worker import Worker

registry = TaskRegistry()


@registry.task("noop")
def noop() -> None:
    return None


@registry.task("stamp")
def stamp() -> float:
    return time.time()


async def main(url: str, concurrency: int, poll: float) -> None:
    engine = create_engine(url)
    notifier = PgNotifier(url)
    await notifier.start()
    worker = Worker(
        SqlTaskStore(engine),
        registry,
        concurrency=concurrency,
        notifier=notifier,
        poll_seconds=poll,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await notifier.close()
        await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks._tenfold_worker")
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--poll", type=float, default=1.0, help="poll interval without NOTIFY")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.concurrency, args.poll))
