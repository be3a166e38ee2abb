"""Internal: a keyed, rate-limited work queue in the shape of client-go's ``util/workqueue``.

Why a queue of keys rather than a schedule of tasks: a key (a pod's URL) is the unit of work, so
it is never processed by two workers at once, a key added again while it waits is coalesced
into one entry, and a key added while it is being processed is processed once more afterwards
(nothing is lost, nothing runs twice).  ``add_after`` holds a key back (the next periodic run),
``add_rate_limited`` holds it back by its own exponential backoff (a failing pod), ``forget``
ends that backoff.  Time comes from an injected clock, so every rule here is unit-tested on a
fake clock without sleeping.

Idle getters follow a leader/followers pattern: one of them (the timer) waits until the earliest
held-back key is due, the others wait until a key is ready for them, so a key coming due wakes
one thread, not every idle one (with 32 workers and a thousand pods a second that was most of the
queue's CPU: docs/benchmarks.md).

Lanes: ``add(key, lane=n)`` puts a key ahead of every key of a higher-numbered lane (and moves
it up if it already waits in one); keys coming due and plain adds go to the last lane,
:data:`ORDINARY`.  The prober puts the first pod of each new Service in lane 0 and other new
pods in lane 1, so a new pod is never queued behind thousands of re-probes coming due, and
every Service's first pod is probed before any Service's second.

Semantics follow client-go with one deliberate difference: ``shut_down`` drops what is still
queued, because the prober and the scraper shut their queue down to close, and closing must not
wait for pending work.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from .backoff import Backoff, BackoffPolicy
from .clock import SYSTEM_CLOCK, Clock

K = TypeVar("K", bound=Hashable)

log = logging.getLogger(__name__)

#: A blocking ``get`` re-checks the clock at least this often (bounds every wait).
_MAX_WAIT = 1.0
#: Lanes of ready keys: 0 is served first; the last one, ORDINARY, takes plain adds and keys
#: coming due.
LANES = 3
ORDINARY = LANES - 1


class WorkQueue(Generic[K]):
    """Keys to process: FIFO when ready, held back until due when added with a delay."""

    def __init__(self, *, backoff: BackoffPolicy | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._policy = backoff or BackoffPolicy()
        self._clock = clock
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        # One idle getter (the timer) waits for the earliest held-back key; the others wait
        # to be handed a ready key, so a key coming due wakes one thread, not every idle one.
        self._timer = threading.Condition(lock)
        self._timing = False
        self.wakeups = 0  # waits that ended (notified or timed out): what idle threads cost
        # Ready keys by lane, lane 0 first.  A deque entry is only a hint: ``_dirty`` and
        # ``_lane`` are the truth, and an entry whose key moved up or was handed out already
        # is skipped.
        self._lanes: tuple[deque[K], ...] = tuple(deque() for _ in range(LANES))
        self._dirty: set[K] = set()  # queued, or to be queued again once processed
        self._lane: dict[K, int] = {}  # the lane of each dirty key not in the last lane
        self._processing: set[K] = set()
        self._due: dict[K, float] = {}  # held back until then (the earliest wins)
        self._heap: list[tuple[float, int, K]] = []  # (due, order, key); superseded ones skipped
        self._order = itertools.count()
        self._backoffs: dict[K, Backoff] = {}
        self._shut_down = False

    # -- adding ------------------------------------------------------------------------------

    def add(self, key: K, *, lane: int = ORDINARY) -> None:
        """Queue ``key`` now; no-op while it is already queued; after it if in process.

        ``lane``: ahead of every key of a higher lane (a key already queued in one moves up).
        """
        if not 0 <= lane <= ORDINARY:
            raise ValueError(f"lane must be within 0..{ORDINARY}")
        with self._cond:
            self._add(key, lane)

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` once ``delay`` seconds have passed (at once when ``delay`` <= 0)."""
        with self._cond:
            if delay <= 0:
                self._add(key)
                return
            if self._shut_down:
                return
            due = self._clock.monotonic() + delay
            if due < self._due.get(key, float("inf")):
                self._due[key] = due
                earliest = not self._heap or due < self._heap[0][0]
                heapq.heappush(self._heap, (due, next(self._order), key))
                if earliest:  # only then does the timer need to wake sooner
                    if self._timing:
                        self._timer.notify()
                    else:
                        self._cond.notify()  # an idle getter becomes the timer

    def add_rate_limited(self, key: K, retry_after: float | None = None) -> float:
        """Queue ``key`` after its backoff (one more failure of it); returns the delay."""
        with self._cond:
            backoff = self._backoffs.get(key)
            if backoff is None:
                backoff = self._backoffs[key] = Backoff(self._policy, clock=self._clock)
        delay = backoff.next(retry_after)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """``key`` succeeded (or is gone): its next failure starts the backoff over."""
        with self._cond:
            self._backoffs.pop(key, None)

    def failures(self, key: K) -> int:
        """Consecutive failures of ``key`` since it was last forgotten (client-go NumRequeues)."""
        with self._cond:
            backoff = self._backoffs.get(key)
            return backoff.failures if backoff is not None else 0

    # -- processing --------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> K | None:
        """The next ready key, now marked in process; None on shut-down or after ``timeout``.

        The caller must call :meth:`done` with it when finished.
        """
        with self._cond:
            deadline = None if timeout is None else self._clock.monotonic() + timeout
            while True:
                if self._shut_down:
                    return None
                now = self._clock.monotonic()
                self._promote(now)
                key = self._pop_ready()
                if key is not None:
                    return key
                wait = _MAX_WAIT
                timer = bool(self._heap) and not self._timing
                if timer:
                    wait = min(wait, self._heap[0][0] - now)
                if deadline is not None:
                    if now >= deadline:
                        return None
                    wait = min(wait, deadline - now)
                if timer:
                    self._timing = True
                    try:
                        self._timer.wait(max(wait, 0.001))
                    finally:
                        self._timing = False
                        self._cond.notify()  # another idle getter takes the timer over
                else:
                    self._cond.wait(max(wait, 0.001))
                self.wakeups += 1

    def done(self, key: K) -> None:
        """``key`` is processed; if it was added meanwhile it is queued again now."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shut_down:
                self._lanes[self._lane.get(key, ORDINARY)].append(key)
                self._cond.notify()

    def shut_down(self) -> None:
        """Wake every waiting ``get`` (it returns None); later adds are ignored."""
        with self._cond:
            self._shut_down = True
            for lane in self._lanes:
                lane.clear()
            self._dirty.clear()
            self._lane.clear()
            self._due.clear()
            self._heap.clear()
            self._cond.notify_all()
            self._timer.notify_all()

    def __len__(self) -> int:
        """Keys ready to be processed (not the ones held back nor the ones in process)."""
        with self._cond:
            return len(self._dirty) - len(self._dirty & self._processing)

    def waiting(self) -> int:
        """Keys held back until a later time."""
        with self._cond:
            return len(self._due)

    # -- internals (the caller holds the condition) --------------------------------------------

    def _add(self, key: K, lane: int = ORDINARY) -> None:
        if self._shut_down:
            return
        if key in self._dirty:
            if lane < self._lane.get(key, ORDINARY):  # move up; its old entry is skipped
                self._lane[key] = lane
                if key not in self._processing:
                    self._lanes[lane].append(key)
                    self._cond.notify()
            return
        self._dirty.add(key)
        if lane < ORDINARY:
            self._lane[key] = lane
        if key not in self._processing:
            self._lanes[lane].append(key)
            self._cond.notify()

    def _pop_ready(self) -> K | None:
        """The next ready key (lane 0 first), marked in process; None when none is."""
        for number, lane in enumerate(self._lanes):
            while lane:
                key = lane.popleft()
                if (key in self._dirty and key not in self._processing
                        and self._lane.get(key, ORDINARY) == number):
                    self._dirty.discard(key)
                    self._lane.pop(key, None)
                    self._processing.add(key)
                    return key
        return None

    def _promote(self, now: float) -> None:
        """Move keys whose time has come from the held-back set to the ready queue."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _order, key = heapq.heappop(heap)
            if self._due.get(key) == due:  # else superseded by an earlier due
                del self._due[key]
                self._add(key)


def worker_threads(queue: WorkQueue[K], handle: Callable[[K], None], *, count: int,
                   name: str) -> list[threading.Thread]:
    """``count`` daemon threads (not started) that hand each key to ``handle`` until ``queue``
    shuts down; a key is always marked done, and a failing ``handle`` is logged, never fatal."""

    def work() -> None:
        while (key := queue.get()) is not None:
            try:
                handle(key)
            except Exception:  # a worker must never die
                log.exception("%s: processing %r failed", name, key)
            finally:
                queue.done(key)

    return [threading.Thread(target=work, name=f"{name}-{i}", daemon=True) for i in range(count)]
