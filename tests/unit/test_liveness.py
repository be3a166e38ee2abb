"""Discovery's liveness loop on a fake clock with scripted exchanges: how soon a dead pod is
out, free signals that skip checks, re-checks of ejected pods, wedged engines."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.driving import drive
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.liveness import Liveness
from vllm_router_svcdisc.outliers import OutlierConfig, Reason, Verdict
from vllm_router_svcdisc.poller import Failure, HealthBook

URL = "http://127.0.0.1:8000"
CONFIG = OutlierConfig()


class Pod:
    """A scripted engine: ``state`` is "ok", "dead" (a node gone: the check's keep-alive read
    times out, then the bare connect times out) or "wedged" (answers, counters frozen)."""

    def __init__(self, book: HealthBook, clock: FakeClock) -> None:
        self.book = book
        self.clock = clock
        self.state = "ok"
        self.tokens = 0.0
        self.calls: list[tuple[float, bool]] = []

    def exchange(self, url: str, progress: bool) -> bool:
        self.calls.append((self.clock.now, progress))
        if self.state == "dead":
            self.clock.advance(CONFIG.read_timeout + CONFIG.connect_timeout)
            self.book.failure(url, Failure.CONNECT_TIMEOUT, "timed out, then connect timed out")
            return False
        if self.state == "ok":
            self.tokens += 10
        running = 2.0
        self.book.success(url, tokens=self.tokens if progress else None,
                          running=running if progress else None)
        return True


class FirstAtOnce(random.Random):
    """A new pod's first check at the start of its first interval (the timing asserted here
    is measured from it)."""

    def random(self) -> float:
        return 0.0


class CostedPods:
    """Pods whose every check answers and costs ``cost`` CPU-seconds of a fake thread clock;
    ``calls`` says when each was checked."""

    def __init__(self, book: HealthBook, clock: FakeClock, cost: float) -> None:
        self.book, self.clock, self.cost = book, clock, cost
        self.calls: list[tuple[float, str]] = []
        self.spent = 0.0

    def exchange(self, url: str, progress: bool) -> bool:
        self.calls.append((self.clock.now, url))
        self.spent += self.cost
        self.book.success(url, tokens=1.0 if progress else None,
                          running=0.0 if progress else None)
        return True

    def cpu_time(self) -> float:
        return self.spent

    def first_checks(self) -> dict[str, float]:
        first: dict[str, float] = {}
        for at, url in self.calls:
            first.setdefault(url, at)
        return first

    def liveness(self, config: OutlierConfig, **kwargs: Any) -> Liveness:
        liveness = Liveness(self.book, config, lambda _changes: None, clock=self.clock,
                            exchange=self.exchange, cpu_time=self.cpu_time, **kwargs)
        liveness.cost_per_check = self.cost
        return liveness

    def answered_long_ago(self, urls: list[str], seconds: float) -> None:
        """Their model probes answered ``seconds`` ago: each is due for a check."""
        for url in urls:
            self.book.ensure(url)
            self.book.success(url)
        self.clock.advance(seconds)


def setup() -> tuple[Liveness, Pod, FakeClock, list[tuple[float, Verdict | None]]]:
    clock = FakeClock()
    verdicts: list[tuple[float, Verdict | None]] = []
    book = HealthBook(clock)
    pod = Pod(book, clock)
    liveness = Liveness(book, CONFIG, lambda changes: verdicts.extend(
        (clock.now, v) for v in changes.values()), clock=clock, exchange=pod.exchange,
        rng=FirstAtOnce())
    book.on_change = liveness.evaluate
    liveness.track([URL], [])
    book.success(URL)  # its model probe answered: the pod is routable, liveness watches it
    return liveness, pod, clock, verdicts


def run(liveness: Liveness, clock: FakeClock, seconds: float,
        until: Callable[[], bool] = lambda: False) -> None:
    drive(clock, seconds, liveness.poller.run_ready, until=until)


def test_a_dead_node_is_out_within_three_seconds_of_its_death() -> None:
    liveness, pod, clock, verdicts = setup()
    run(liveness, clock, 5.3)  # healthy for a while, checks every interval
    assert not verdicts
    died = clock.now
    pod.state = "dead"
    run(liveness, clock, 10.0, until=lambda: bool(verdicts))
    at, found = verdicts[0]
    assert found is not None and found.reason is Reason.CONNECT_TIMEOUT
    assert at - died <= 3.0


def test_checks_run_at_the_interval_and_read_metrics_every_progress_interval() -> None:
    liveness, pod, clock, _verdicts = setup()
    start = clock.now
    run(liveness, clock, 30.0)
    times = [t - start for t, _ in pod.calls]
    # the probe's answer at 0 is the pod's first result: the first check one interval after it
    assert abs(times[0] - 1.0) < 0.13
    assert len(times) == 29 and all(
        abs(b - a - 1.0) < 0.13 for a, b in itertools.pairwise(times))
    progress = [t - start for t, p in pod.calls if p]
    assert len(progress) == 3  # at ~1, ~11 and ~21 s


def test_a_fresher_result_from_elsewhere_skips_the_check() -> None:
    liveness, pod, clock, _verdicts = setup()
    run(liveness, clock, 2.0)
    checks = len(pod.calls)
    for _ in range(40):  # a scraper at 4 Hz: always fresher than the interval
        liveness.book.success(URL, tokens=float(len(pod.calls)), running=0.0)
        run(liveness, clock, 0.25)
    assert len(pod.calls) == checks
    assert liveness.skipped_total >= 9


def test_an_ejected_pod_is_rechecked_and_returns_once_it_answers() -> None:
    liveness, pod, clock, verdicts = setup()
    run(liveness, clock, 1.5)
    pod.state = "dead"
    run(liveness, clock, 5.0, until=lambda: bool(verdicts))
    ejected_at = clock.now
    calls = len(pod.calls)
    run(liveness, clock, 3.2)
    # re-checked every base_ejection_time x times ejected (1 s) plus the check's own 1.5 s
    assert 1 <= len(pod.calls) - calls <= 2
    pod.state = "ok"
    run(liveness, clock, 5.0, until=lambda: verdicts[-1][1] is None)
    assert verdicts[-1][1] is None and clock.now - ejected_at < 6.0
    record = liveness.book.get(URL)
    assert record is not None and record.times_ejected == 1


def test_a_second_ejection_waits_longer_before_its_recheck() -> None:
    liveness, pod, clock, verdicts = setup()
    for _round in range(2):
        pod.state = "dead"
        run(liveness, clock, 5.0, until=lambda: bool(verdicts) and verdicts[-1][1] is not None)
        out = verdicts[-1][0]
        calls = len(pod.calls)
        pod.state = "ok"
        run(liveness, clock, 5.0, until=lambda n=calls: len(pod.calls) > n)
        gap = pod.calls[calls][0] - out
    assert 2.0 <= gap <= 2.125  # base x 2 (and the drive's step)


def test_a_wedged_engine_is_ejected_after_the_window_and_returns_when_it_moves() -> None:
    liveness, pod, clock, verdicts = setup()
    run(liveness, clock, 12.0)
    pod.state = "wedged"  # running 2, counters frozen
    wedged = clock.now
    last_moved = max(t for t, progress in pod.calls if progress)  # the last reading that moved
    run(liveness, clock, 120.0, until=lambda: bool(verdicts))
    at, found = verdicts[0]
    assert found is not None and found.reason is Reason.WEDGED
    # noticed at the first /metrics reading a window after the counters last moved (readings
    # every progress_interval), so between the window and the window plus one reading
    assert CONFIG.wedged_after <= at - last_moved <= CONFIG.wedged_after + CONFIG.progress_interval
    assert at - wedged <= CONFIG.wedged_after + CONFIG.progress_interval
    pod.state = "ok"
    run(liveness, clock, 10.0, until=lambda: verdicts[-1][1] is None)
    assert verdicts[-1][1] is None


def test_nothing_is_checked_when_disabled() -> None:
    clock = FakeClock()
    book = HealthBook(clock)
    pod = Pod(book, clock)
    liveness = Liveness(book, OutlierConfig(enabled=False), lambda _changes: None, clock=clock,
                        exchange=pod.exchange)
    liveness.track([URL], [])
    run(liveness, clock, 5.0)
    assert pod.calls == []


def test_timeouts_on_old_connections_do_not_bring_a_dead_pod_back() -> None:
    liveness, pod, clock, verdicts = setup()
    run(liveness, clock, 1.5)
    pod.state = "dead"
    run(liveness, clock, 5.0, until=lambda: bool(verdicts))
    # requests a router sent before the ejection time out on their old connections
    for _ in range(3):
        liveness.book.failure(URL, Failure.READ_TIMEOUT, "router: timeout")
        clock.advance(0.1)
    assert len(verdicts) == 1 and verdicts[-1][1] is not None


def test_the_interval_stretches_so_checks_stay_within_the_cpu_budget() -> None:
    clock = FakeClock()
    pods = [f"http://127.0.0.{i}:8000" for i in range(1, 11)]
    costed = CostedPods(HealthBook(clock), clock, cost=0.01)  # every check costs 10 ms
    config = OutlierConfig(cpu_budget=0.05)  # 10 pods x 10 ms / 0.05 = 2 s
    liveness = costed.liveness(config)
    liveness.track(pods, [])
    for url in pods:
        costed.book.success(url)  # their model probes answered
    run(liveness, clock, 20.0)
    assert liveness.interval == pytest.approx(2.0)
    gaps = [b - a for a, b in itertools.pairwise(t for t, url in costed.calls if url == pods[0])]
    assert gaps and all(1.99 <= gap <= 2.13 for gap in gaps), gaps
    assert len(costed.calls) / 20.0 * 0.01 <= config.cpu_budget * 1.05  # within the budget


def test_pods_listed_together_are_first_checked_across_one_interval_not_at_once() -> None:
    clock = FakeClock()
    costed = CostedPods(HealthBook(clock), clock, cost=0.001)  # 1000 x 1 ms / 0.25 = 4 s
    liveness = costed.liveness(OutlierConfig(cpu_budget=0.25), rng=random.Random(3))
    pods = [f"http://10.1.{i // 250}.{i % 250}:8000" for i in range(1000)]
    costed.answered_long_ago(pods, 4.0)
    liveness.track(pods, [])
    start = clock.now
    run(liveness, clock, 4.5)
    first = costed.first_checks()
    assert len(first) == 1000  # each pod within the first interval (and a budget slot) ...
    per_second = [sum(1 for t in first.values() if int(t - start) == s) for s in range(5)]
    assert max(per_second) <= 300, per_second  # ... spread over it (250 a second on average)


def test_a_pod_nothing_was_heard_from_is_not_checked_until_its_probe_answers() -> None:
    """Its model probe is on its way and it is not routable before: a check adds nothing."""
    clock = FakeClock()
    book = HealthBook(clock)
    pod = Pod(book, clock)
    liveness = Liveness(book, CONFIG, lambda _changes: None, clock=clock,
                        exchange=pod.exchange, rng=FirstAtOnce())
    liveness.track([URL], [])
    run(liveness, clock, 5.0)
    assert pod.calls == [] and liveness.skipped_total >= 4
    book.success(URL)  # the probe answered
    run(liveness, clock, 3.0)
    assert len(pod.calls) >= 1


def test_pods_listed_in_parts_get_first_checks_at_the_budget_rate_not_per_part() -> None:
    """Each part of a big LIST spreads its first checks after the part before: the parts do
    not each start a round at once (10 parts would check 10 times the budget)."""
    clock = FakeClock()
    costed = CostedPods(HealthBook(clock), clock, cost=0.001)  # 250 checks a second
    liveness = costed.liveness(OutlierConfig(cpu_budget=0.25), rng=random.Random(5))
    pods = [f"http://10.2.{i // 250}.{i % 250}:8000" for i in range(1000)]
    costed.answered_long_ago(pods, 4.0)
    start = clock.now
    for part in range(10):  # 10 parts of 100, handed over at once
        liveness.track(pods[part * 100:(part + 1) * 100], [])
    run(liveness, clock, 5.0)  # 4 s of budget, the last part spread over one interval
    first = costed.first_checks()
    assert len(first) == 1000
    per_second = [sum(1 for t in first.values() if int(t - start) == s) for s in range(5)]
    assert max(per_second) <= 300, per_second


def test_checks_that_come_due_together_run_at_the_budget_rate() -> None:
    """Pods whose last results came in one burst (the probes of a start-up) come due for
    checks together: they are run one budget slot apart, not on every worker at once."""
    clock = FakeClock()
    costed = CostedPods(HealthBook(clock), clock, cost=0.001)  # 250 checks a second
    config = OutlierConfig(cpu_budget=0.25)
    liveness = costed.liveness(config, rng=random.Random(7))
    pods = [f"http://10.3.{i // 250}.{i % 250}:8000" for i in range(1000)]
    liveness.track(pods, [])
    for url in pods:
        costed.book.success(url)  # all probed in the same instant
    start = clock.now
    run(liveness, clock, 9.5)  # due after one 4 s interval, then 4 s at the budget's rate
    checks = [t for t, _url in costed.calls]
    assert len(set(url for _t, url in costed.calls)) == 1000
    per_second = [sum(1 for t in checks if int(t - start) == s) for s in range(10)]
    assert max(per_second) <= 0.25 / 0.001 * 1.1, per_second
