"""Driving a loop on a fake clock from the test thread: run what is due, move time on."""

from __future__ import annotations

from collections.abc import Callable

from vllm_router_svcdisc.clock import FakeClock


def drive(clock: FakeClock, seconds: float, tick: Callable[[], object], *,
          step: float = 0.125, until: Callable[[], bool] = lambda: False) -> None:
    """Call ``tick`` every ``step`` fake seconds for ``seconds`` (or until ``until()``)."""
    end = clock.now + seconds
    while clock.now < end and not until():
        tick()
        clock.advance(step)
