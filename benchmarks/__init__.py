"""Benchmarks for tenfold's services, each against a peer, run as `python -m benchmarks <service>`.

Each module `benchmarks/<service>.py` (names not starting with `_`) is a service benchmark and
exposes `run(quick: bool) -> list[dict]`. Every dict is one scenario result; see
`benchmarks._runner.result` for its keys. The runner prints each as one JSON line on stdout and a
markdown summary table on stderr.
"""

from __future__ import annotations
