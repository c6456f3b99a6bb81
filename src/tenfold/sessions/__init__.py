"""Session management (spec Problem 7): the public surface other code may import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenfold.sessions.models import DeviceInfo, Reason, SessionType, Validation

if TYPE_CHECKING:
    from tenfold.kernel.runtime import Mount, Runtime

__all__ = ["DeviceInfo", "Reason", "SessionType", "Validation", "mount"]


def mount(runtime: Runtime) -> Mount:
    from tenfold.sessions.api import mount as _mount

    return _mount(runtime)
