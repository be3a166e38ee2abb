"""Internal: time as a dependency, so timing rules (backoff, liveness, health) are testable
without sleeping.

Loops wait on a :class:`threading.Event` through the clock: the real clock blocks on the event
(so ``stop()`` interrupts the wait at once, and so does anything else that sets it, such as the
recovery checker waking an informer out of its backoff), the fake one advances its own time
instead, running the timers a test scheduled (``FakeClock.call_at``) as their times come: a
timer that sets the event ends the wait there, as a real ``set()`` would.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
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

    ``call_at(when, fn)`` schedules ``fn`` at fake time ``when``: a wait (or ``advance``) that
    reaches ``when`` stops the time there and calls it; if that sets the event being waited on,
    the wait ends at that moment and returns True, as a wait the event interrupts does on the
    real clock.  That is how a test plays "something else happens while the loop waits"
    (another thread's ``set()``) deterministically, without threads.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.waits: list[float] = []
        self._timers: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Callable[[], object]) -> None:
        """Call ``fn`` (on the waiting thread) when the fake time reaches ``when``."""
        heapq.heappush(self._timers, (when, next(self._order), fn))

    def advance(self, seconds: float) -> None:
        self._run_until(self.now + max(0.0, seconds), None)

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        if stop.is_set():
            return True
        return self._run_until(self.now + max(0.0, seconds), stop)

    def _run_until(self, end: float, stop: threading.Event | None) -> bool:
        """Move to ``end``, firing due timers in order; stop early once ``stop`` is set."""
        while self._timers and self._timers[0][0] <= end:
            when, _, fn = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            fn()
            if stop is not None and stop.is_set():
                return True
        self.now = max(self.now, end)
        return stop is not None and stop.is_set()
