"""Feature flags (spec Problem 5): the public surface other code may import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenfold.flags.evaluation import Evaluation, Ruleset

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Mount, Runtime

__all__ = ["Evaluation", "Ruleset", "mount"]


def mount(runtime: Runtime) -> Mount:
    from tenfold.flags.api import mount as _mount

    return _mount(runtime)
