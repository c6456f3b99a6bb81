"""tenfold: ten backend building blocks in one package."""

from __future__ import annotations

__version__ = "0.1.0"

SERVICES: tuple[str, ...] = ("ratelimit", "tasks", "sessions", "shortener", "flags")
"""Services this release ships; `TENFOLD_SERVICES` picks among them."""
