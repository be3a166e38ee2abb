"""Internal: an exponential backoff value in the manner of client-go's ``BackoffManager``.

One :class:`Backoff` remembers one failure streak: ``next()`` after each failure says how long
to wait, ``reset()`` after a success starts over, and a streak whose last failure is older than
``reset_after`` starts over by itself.  It knows nothing about what failed, so a work queue can
keep one per key and a reflector one per failure class.

Not tenacity: its wait strategies are functions of a retry call's attempt number, while this
needs state that outlives one call (a streak reset by success or by time) on an injected clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True)
class BackoffPolicy:
    """client-go's reflector defaults: 0.8 s doubling to 30 s, up to 100 % jitter, 2 min reset."""

    initial: float = 0.8
    factor: float = 2.0
    jitter: float = 1.0
    cap: float = 30.0
    reset_after: float = 120.0

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < 0 or self.factor < 1 or self.jitter < 0:
            raise ValueError(f"invalid backoff policy {self}")


class Backoff:
    """The delay before the next attempt of one failing thing; not thread-safe (one owner)."""

    def __init__(self, policy: BackoffPolicy | None = None, *, clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._clock = clock
        self._rng = rng or random.Random()
        self.failures = 0
        self._last_failure: float | None = None

    def next(self, retry_after: float | None = None) -> float:
        """Record a failure and return the wait before retrying; never less than Retry-After.

        The wait is ``initial * factor**(failures-1)``, raised by up to ``jitter`` times itself,
        then capped, so waits never exceed ``cap`` and concurrent clients spread out.
        """
        policy = self.policy
        now = self._clock.monotonic()
        if self._last_failure is not None and now - self._last_failure >= policy.reset_after:
            self.failures = 0
        self._last_failure = now
        exponent = min(self.failures, 64)  # bounded: factor**exponent stays a finite float
        self.failures += 1
        base = min(policy.cap, policy.initial * policy.factor ** exponent)
        delay = min(policy.cap, base * (1.0 + policy.jitter * self._rng.random()))
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def reset(self) -> None:
        """The thing succeeded: the next failure waits ``initial`` again."""
        self.failures = 0
        self._last_failure = None
