"""The /readyz recovery checker's rules on a fake clock (no sleeping), and the informer using it.

The checker's loop runs on the test thread (``run()``), driven by ``FakeClock``: informers are
played by events registered through ``waiting()`` and released by clock timers; the test stops
the loop with a timer too.  Only ``stop()`` promptness runs a real thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.unit.test_informer_rules import Response, api_error, listing
from tests.unit.test_informer_rules import _Body as Body
from vllm_router_svcdisc import recovery
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.errors import ApiError
from vllm_router_svcdisc.informer import Informer, InformerConfig
from vllm_router_svcdisc.recovery import CheckResult, RecoveryChecker

T0 = 1000.0


class ManualChecker(RecoveryChecker):
    """A checker whose loop the test runs itself (no thread of its own)."""

    def _ensure_thread(self) -> None:
        pass


class Server:
    """Answers checks by fake time: ``status_at(t)``; records when it was asked."""

    def __init__(self, clock: FakeClock, status_at: Callable[[float], int],
                 retry_after: float | None = None) -> None:
        self.clock, self.status_at, self.retry_after = clock, status_at, retry_after
        self.times: list[float] = []

    def __call__(self) -> CheckResult:
        now = self.clock.monotonic()
        self.times.append(now)
        status = self.status_at(now)
        if status == 0:
            raise ApiError(0, "API server unreachable: connection refused")
        return CheckResult(status, self.retry_after if status == 429 else None)


class FakeApiClient:
    """Stands for a kubernetes ApiClient as a registry key."""


def make(status_at: Callable[[float], int], retry_after: float | None = None
         ) -> tuple[FakeClock, Server, ManualChecker, contextlib.ExitStack]:
    clock = FakeClock(start=T0)
    server = Server(clock, status_at, retry_after)
    checker = ManualChecker(server, interval=1.0, clock=clock)
    return clock, server, checker, contextlib.ExitStack()


def waiter(clock: FakeClock, checker: RecoveryChecker, start: float, end: float
           ) -> threading.Event:
    """An informer waiting in backoff from ``start`` to ``end`` (fake time)."""
    event = threading.Event()
    stack = contextlib.ExitStack()
    clock.call_at(start, lambda: stack.enter_context(checker.waiting(event)))
    clock.call_at(end, stack.close)
    return event


def run_until(clock: FakeClock, checker: RecoveryChecker, end: float) -> None:
    clock.call_at(end, checker.stop)
    checker.run()


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


def test_it_checks_only_while_someone_waits_and_at_most_once_a_second() -> None:
    clock, server, checker, _ = make(lambda _t: 0)  # the server is down throughout
    waiter(clock, checker, T0 + 10, T0 + 15.5)
    waiter(clock, checker, T0 + 12, T0 + 14)  # a second informer: no extra checks
    waiter(clock, checker, T0 + 40, T0 + 43)
    run_until(clock, checker, T0 + 100)
    assert server.times, "no check while informers waited"
    assert all(T0 + 10 <= t <= T0 + 15.5 or T0 + 40 <= t <= T0 + 43 for t in server.times)
    assert min(gaps(server.times)) >= 1.0
    assert len(server.times) == 6 + 3  # 10..15 and 40..42, one a second
    assert checker.failed_checks == len(server.times) and checker.wakeups == 0


def test_a_429_spaces_checks_by_its_retry_after() -> None:
    clock, server, checker, _ = make(lambda _t: 429, retry_after=3)
    waiter(clock, checker, T0, T0 + 10)
    run_until(clock, checker, T0 + 20)
    assert gaps(server.times) == [3.0, 3.0, 3.0]


def test_the_first_success_after_a_failure_wakes_every_waiter_at_once() -> None:
    back = T0 + 7.5
    clock, server, checker, _ = make(lambda t: 200 if t >= back else 500)
    first = waiter(clock, checker, T0, T0 + 30)
    second = waiter(clock, checker, T0 + 2, T0 + 25)
    woken: dict[str, float] = {}

    def note() -> None:
        for name, event in (("first", first), ("second", second)):
            if event.is_set():
                woken.setdefault(name, clock.monotonic())

    for step in range(300):  # look every 0.1 s of fake time
        clock.call_at(T0 + step * 0.1 + 0.05, note)
    run_until(clock, checker, T0 + 40)
    assert first.is_set() and second.is_set()
    assert woken == {"first": T0 + 8.05, "second": T0 + 8.05}  # the check at 8: the first >= 7.5
    assert checker.wakeups == 1
    assert server.times[-1] == T0 + 8.0, "checks went on after the server was seen back"


def test_a_server_that_answers_readyz_while_list_fails_leaves_the_backoff_alone() -> None:
    # RBAC denies list, or one resource is broken: /readyz is fine from the start
    clock, server, checker, _ = make(lambda _t: 200)
    event = waiter(clock, checker, T0, T0 + 25)
    later = waiter(clock, checker, T0 + 50, T0 + 60)  # the informer's next backoff wait
    run_until(clock, checker, T0 + 70)
    assert not event.is_set() and not later.is_set()
    assert server.times == [T0, T0 + 50], "one check per wait, then nothing more to learn"


def test_a_waiter_whose_request_got_no_answer_is_woken_by_the_first_good_check() -> None:
    # the server came back between the informer's refused connection and the first check
    clock, server, checker, _ = make(lambda _t: 200)
    refused = threading.Event()
    answered = threading.Event()  # its request got an error answer: RBAC, say
    stack = contextlib.ExitStack()

    def both_wait() -> None:  # two informers start waiting at the same moment
        stack.enter_context(checker.waiting(refused, unreachable=True))
        stack.enter_context(checker.waiting(answered))

    clock.call_at(T0, both_wait)
    clock.call_at(T0 + 20, stack.close)
    run_until(clock, checker, T0 + 30)
    assert refused.is_set() and not answered.is_set()
    assert server.times == [T0] and checker.wakeups == 1


def test_a_waiter_arriving_while_the_last_check_failed_is_woken_by_the_next_good_one() -> None:
    # its request failed (500) just before the server came back, between two checks
    back = T0 + 5.5
    clock, server, checker, _ = make(lambda t: 200 if t >= back else 500)
    early = waiter(clock, checker, T0, T0 + 5.2)  # an informer whose wait ends before
    late = waiter(clock, checker, T0 + 5.3, T0 + 30)  # it failed again, waits long now
    run_until(clock, checker, T0 + 40)
    assert late.is_set() and not early.is_set()
    assert server.times[-1] == T0 + 6.0 and checker.wakeups == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_forbidden_or_absent_readyz_falls_back_to_plain_backoff_saying_so_once(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    clock, server, checker, _ = make(lambda _t: status)
    event = waiter(clock, checker, T0, T0 + 20)
    with caplog.at_level(logging.INFO, logger="vllm_router_svcdisc.recovery"):
        run_until(clock, checker, T0 + 30)
        assert not checker.enabled and not event.is_set()
        assert server.times == [T0]
        with checker.waiting(threading.Event()) as armed:
            assert armed is False  # later waits are plain backoff, no check
    lines = [r for r in caplog.records if r.name == "vllm_router_svcdisc.recovery"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "/readyz" in lines[0].getMessage() and str(status) in lines[0].getMessage()


def test_stop_is_prompt_while_the_thread_waits_between_checks() -> None:
    checks: list[int] = []

    def probe() -> CheckResult:
        checks.append(1)
        return CheckResult(500)

    checker = RecoveryChecker(probe, interval=60.0)  # a long wait between checks
    event = threading.Event()
    with checker.waiting(event):
        wait_for(lambda: checks, 5, "the checker never checked")
        assert checker.stop(timeout=2.0), "the checker thread did not end"
    assert len(checks) == 1


def test_informers_on_one_api_client_share_one_checker_stopped_by_the_last() -> None:
    client, other = FakeApiClient(), FakeApiClient()  # never called: no waiter ever waits
    a = recovery.acquire(client, interval=1.0, timeout=1.0)
    b = recovery.acquire(client, interval=1.0, timeout=1.0)
    c = recovery.acquire(other, interval=1.0, timeout=1.0)
    assert a is b and a is not c
    recovery.release(client, a)
    assert a.enabled  # one user left
    recovery.release(client, b)
    recovery.release(other, c)
    assert not a.enabled and not c.enabled
    assert recovery.acquire(client, interval=1.0, timeout=1.0) is not a  # a fresh one
    recovery.release(client, recovery.acquire(client, interval=1.0, timeout=1.0))


# --- the informer waiting through the checker ------------------------------------------------


class FlakyApi:
    """A list function failing with ``failure`` until ``up_at`` (fake time), then serving."""

    def __init__(self, clock: FakeClock, up_at: float, failure: BaseException) -> None:
        self.clock, self.up_at, self.failure = clock, up_at, failure
        self.calls: list[float] = []
        self.informer: Informer | None = None

    def __call__(self, **kwargs: Any) -> Any:
        assert self.informer is not None
        now = self.clock.monotonic()
        self.calls.append(now)
        if len(self.calls) >= 40:
            self.informer.signal_stop()
        if now < self.up_at:
            raise self.failure
        if kwargs.get("watch"):
            self.informer.signal_stop()  # listed and watching: the outage is over
            return Response(clock=self.clock)
        return Body(listing(), self.clock)


def run_outage(up_at: float, failure: BaseException, *, config: InformerConfig | None = None,
               checker: bool = True) -> tuple[FlakyApi, Informer, FakeClock]:
    """Run an informer through an outage ending at ``up_at``, a check a second beside it."""
    clock = FakeClock(start=T0)
    api = FlakyApi(clock, up_at, failure)
    probe = Server(clock, lambda t: 200 if t >= up_at else 503)
    manual = ManualChecker(probe, interval=1.0, clock=clock) if checker else None
    if manual is not None:  # the checker's thread, played by the clock: a check a second
        for second in range(200):
            clock.call_at(T0 + second, manual.check_once)
    informer = Informer("services", api, lambda changes: None, config=config or InformerConfig(),
                        clock=clock, recovery=manual)
    api.informer = informer
    informer.run()
    return api, informer, clock


def first_call_after(calls: list[float], t: float) -> tuple[float, float]:
    """(the last call before ``t``, the first call at or after it)."""
    before = [c for c in calls if c < t]
    after = [c for c in calls if c >= t]
    return before[-1], after[0]


def test_an_informer_in_a_long_backoff_retries_at_the_first_good_check() -> None:
    up_at = T0 + 20.0
    api, informer, clock = run_outage(up_at, ConnectionRefusedError("refused"))
    last_failed, retried = first_call_after(api.calls, up_at)
    interrupted = clock.waits[api.calls.index(last_failed)]  # the wait chosen after it
    assert retried == up_at  # the check at up_at succeeded: the informer retried then
    assert retried - last_failed < interrupted, "the informer waited its whole backoff"
    assert informer.status().recovery_wakeups == 1
    assert informer.status().synced


def test_without_a_checker_the_backoff_runs_to_its_end() -> None:
    up_at = T0 + 20.0
    api, informer, clock = run_outage(up_at, ConnectionRefusedError("refused"), checker=False)
    last_failed, retried = first_call_after(api.calls, up_at)
    assert retried - last_failed == pytest.approx(clock.waits[api.calls.index(last_failed)])
    assert informer.status().recovery_wakeups == 0


def test_woken_early_the_informer_still_honours_retry_after() -> None:
    up_at = T0 + 20.5
    api, informer, _clock = run_outage(up_at, api_error(429, retry_after="25"))
    last_failed, retried = first_call_after(api.calls, up_at)
    assert informer.status().recovery_wakeups >= 1
    assert retried - last_failed >= 25.0  # woken at 21, but the server asked for 25 s


def test_waits_no_longer_than_a_check_period_are_not_cut_short() -> None:
    config = InformerConfig(backoff_initial=0.2, backoff_cap=0.5)  # every wait <= 0.5 s
    _api, informer, _clock = run_outage(T0 + 5.0, ConnectionRefusedError("refused"),
                                       config=config)
    assert informer.status().recovery_wakeups == 0 and informer.status().synced


def test_short_watches_are_paced_as_before_not_cut_short() -> None:
    clock = FakeClock(start=T0)
    checker = ManualChecker(Server(clock, lambda _t: 200), interval=0.1, clock=clock)
    config = InformerConfig(recovery_check_interval=0.1)
    calls: list[float] = []

    def api(**kwargs: Any) -> Any:
        calls.append(clock.monotonic())
        if len(calls) >= 12:
            informer.signal_stop()
        return Response(clock=clock) if kwargs.get("watch") else Body(listing(), clock)

    informer = Informer("services", api, lambda changes: None, config=config, clock=clock,
                        recovery=checker)
    informer.run()
    assert informer.status().short_watches >= 5 and informer.status().recovery_wakeups == 0
    assert checker.checks == 0
