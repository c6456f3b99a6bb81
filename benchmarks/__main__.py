"""`python -m benchmarks <service> [<service> ...] [--quick]`.

Prints one JSON object per scenario on stdout, then a markdown table on stderr. Exits 1 if any
scenario recorded an error (its record carries an "error" key) or a service's run raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from typing import Any

import benchmarks
from benchmarks._runner import REQUIRED_KEYS, log, markdown_table


def services() -> list[str]:
    """Every module `benchmarks/<name>.py` whose name does not start with `_`."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if not m.name.startswith("_") and not m.ispkg
    )


def main(argv: list[str] | None = None) -> int:
    available = services()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run service benchmarks; JSON lines on stdout, a summary table on stderr.",
    )
    parser.add_argument("service", nargs="+", choices=available, help="which benchmark(s) to run")
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier figures")
    args = parser.parse_args(argv)

    results: list[dict[str, Any]] = []
    seen: set[str] = set()
    failed = False
    for name in dict.fromkeys(args.service):
        module = importlib.import_module(f"benchmarks.{name}")
        log(f"{name}: start{' (quick)' if args.quick else ''}")
        started = time.monotonic()
        try:
            records = module.run(args.quick)
        except Exception:
            log(f"{name}: FAILED\n{traceback.format_exc()}")
            failed = True
            continue
        log(f"{name}: done in {time.monotonic() - started:.0f}s")
        for record in records:
            missing = [k for k in REQUIRED_KEYS if k not in record]
            if missing:
                raise KeyError(f"{name}: a record lacks {missing}: {record}")
            # Shared measurements (the HTTP ceiling) may come back from several services.
            if record["scenario"] in seen:
                continue
            seen.add(record["scenario"])
            if record.get("error"):
                failed = True
            print(json.dumps(record), flush=True)
            results.append(record)

    if results:
        print("\n" + markdown_table(results) + "\n", file=sys.stderr, flush=True)
    errors = [r for r in results if r.get("error")]
    for record in errors:
        log(f"{record['scenario']}: ERROR {record['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
