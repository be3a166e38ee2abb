"""The Backoff value and the fake clock, on fake time (no sleeping)."""

from __future__ import annotations

import random
import threading

import pytest

from vllm_router_svcdisc.backoff import Backoff, BackoffPolicy
from vllm_router_svcdisc.clock import SYSTEM_CLOCK, FakeClock

NO_JITTER = BackoffPolicy(jitter=0.0)


def test_defaults_are_client_gos_reflector_backoff() -> None:
    policy = BackoffPolicy()
    assert (policy.initial, policy.factor, policy.jitter, policy.cap, policy.reset_after) == (
        0.8, 2.0, 1.0, 30.0, 120.0)


def test_doubles_from_initial_up_to_the_cap() -> None:
    backoff = Backoff(NO_JITTER, clock=FakeClock())
    assert [backoff.next() for _ in range(8)] == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    assert backoff.failures == 8


def test_jitter_raises_each_wait_by_up_to_itself_but_never_past_the_cap() -> None:
    backoff = Backoff(clock=FakeClock(), rng=random.Random(3))
    for expected in (0.8, 1.6, 3.2, 6.4, 12.8):
        delay = backoff.next()
        assert expected <= delay <= min(30.0, 2 * expected)
    for _ in range(50):
        assert 25.6 <= backoff.next() <= 30.0


def test_reset_starts_over_and_so_does_a_long_quiet_spell() -> None:
    clock = FakeClock()
    backoff = Backoff(NO_JITTER, clock=clock)
    for _ in range(4):
        backoff.next()
    backoff.reset()
    assert backoff.next() == 0.8
    backoff.next()
    clock.advance(119.0)
    assert backoff.next() == 3.2  # the streak goes on: its last failure was 119 s ago
    clock.advance(120.0)
    assert backoff.next() == 0.8  # two minutes without a failure: a new streak


def test_retry_after_is_a_floor() -> None:
    backoff = Backoff(NO_JITTER, clock=FakeClock())
    assert backoff.next(retry_after=5.0) == 5.0
    assert backoff.next(retry_after=0.1) == 1.6
    assert backoff.next(retry_after=90.0) == 90.0  # the server's word beats the cap


def test_one_value_per_key_keeps_streaks_apart() -> None:
    clock = FakeClock()
    per_key = {key: Backoff(NO_JITTER, clock=clock) for key in ("a", "b")}
    for _ in range(3):
        per_key["a"].next()
    assert per_key["b"].next() == 0.8
    assert per_key["a"].next() == 6.4


def test_a_huge_streak_stays_finite() -> None:
    backoff = Backoff(NO_JITTER, clock=FakeClock())
    for _ in range(2000):
        delay = backoff.next()
    assert delay == 30.0


@pytest.mark.parametrize("bad", [dict(initial=-1), dict(factor=0.5), dict(jitter=-0.1),
                                 dict(cap=-2)])
def test_invalid_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**bad)


def test_fake_clock_waits_by_advancing_and_stops_at_once() -> None:
    clock = FakeClock(start=10.0)
    stop = threading.Event()
    assert clock.wait(stop, 2.5) is False
    assert clock.monotonic() == 12.5
    clock.advance(1.0)
    stop.set()
    assert clock.wait(stop, 100.0) is True
    assert clock.monotonic() == 13.5 and clock.waits == [2.5, 100.0]


def test_system_clock_wait_returns_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    assert SYSTEM_CLOCK.wait(stop, 60.0) is True
    assert SYSTEM_CLOCK.monotonic() > 0


def test_fake_clock_timers_fire_during_a_wait_and_setting_the_event_ends_it() -> None:
    clock = FakeClock(start=0.0)
    woken = threading.Event()
    fired: list[float] = []
    clock.call_at(3.0, lambda: fired.append(clock.monotonic()))
    clock.call_at(5.0, woken.set)
    clock.call_at(50.0, lambda: fired.append(clock.monotonic()))
    assert clock.wait(woken, 30.0) is True  # ended by the timer at 5, as a set() would
    assert clock.monotonic() == 5.0 and fired == [3.0]
    woken.clear()
    clock.advance(100.0)  # advance runs due timers too
    assert fired == [3.0, 50.0] and clock.monotonic() == 105.0
