"""Time as a dependency, so timing rules (backoff, liveness, health) are testable without sleeping.

Loops wait on a :class:`threading.Event` through the clock: the real clock blocks on the event
(so ``stop()`` interrupts the wait at once), the fake one advances its own time instead.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """What a loop needs from time: a monotonic reading and a wait that stopping cuts short."""

    def monotonic(self) -> float: ...

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait up to ``seconds`` or until ``stop`` is set; True when it was set."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``Event.wait``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(max(0.0, seconds))


SYSTEM_CLOCK = SystemClock()


def wall_time() -> float:
    """Seconds since the epoch: for timestamps shown to people and routers
    (``EndpointInfo.added_timestamp``), never for a timing rule."""
    return time.time()


class FakeClock:
    """A clock that only moves when told to (or when someone waits on it): for unit tests.

    ``wait`` returns at once, having advanced the time by the full wait unless ``stop`` was
    already set, so a loop driven by it runs its schedule instantly; ``waits`` records every
    requested wait, which is what timing tests assert on.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        if stop.is_set():
            return True
        self.now += max(0.0, seconds)
        return stop.is_set()
