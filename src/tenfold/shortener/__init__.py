"""URL shortener (spec Problem 3): the public surface other code may import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenfold.shortener.models import Link, Plan
from tenfold.shortener.service import CreateItem, ShortenerService

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Mount, Runtime

__all__ = ["CreateItem", "Link", "Plan", "ShortenerService", "mount"]


def mount(runtime: Runtime) -> Mount:
    from tenfold.shortener.api import mount as _mount

    return _mount(runtime)
