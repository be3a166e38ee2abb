"""The outlier policy as pure functions of hand-made records: one table row per rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vllm_router_svcdisc.outliers import (
    OutlierConfig,
    Reason,
    decayed_times,
    liveness_interval,
    max_ejections,
    recheck_delay,
    select,
    verdict,
)
from vllm_router_svcdisc.poller import Failure, PodHealth

NOW = 1000.0
CONFIG = OutlierConfig()
URL = "http://127.0.0.1:8000"


def record(**fields: object) -> PodHealth:
    return replace(PodHealth(URL, last_success=NOW - 5, last_result=NOW - 1), **fields)


@pytest.mark.parametrize(("name", "health", "expected"), [
    ("healthy", record(), None),
    ("refused once", record(failures={Failure.REFUSED: 1}, last_failure=Failure.REFUSED,
                            connect_failure=Failure.REFUSED, last_connect_failure=NOW - 1,
                            failing_since=NOW - 1), Reason.REFUSED),
    ("connect timeout once", record(failures={Failure.CONNECT_TIMEOUT: 1},
                                    last_failure=Failure.CONNECT_TIMEOUT,
                                    connect_failure=Failure.CONNECT_TIMEOUT,
                                    last_connect_failure=NOW - 1, failing_since=NOW - 1),
     Reason.CONNECT_TIMEOUT),
    ("connect timeout, then a read timeout on a connection opened before (proves nothing)",
     record(failures={Failure.CONNECT_TIMEOUT: 1, Failure.READ_TIMEOUT: 1},
            last_failure=Failure.READ_TIMEOUT, connect_failure=Failure.CONNECT_TIMEOUT,
            last_connect_failure=NOW - 2, reachable_at=NOW - 5, failing_since=NOW - 2),
     Reason.CONNECT_TIMEOUT),
    ("connect failure, then a connection accepted (slow, but reachable again)",
     record(failures={Failure.REFUSED: 1, Failure.READ_TIMEOUT: 1},
            last_failure=Failure.READ_TIMEOUT, connect_failure=Failure.REFUSED,
            last_connect_failure=NOW - 2, reachable_at=NOW - 1, failing_since=NOW - 2), None),
    ("connect failure, then a 5xx answer", record(
        failures={Failure.REFUSED: 1, Failure.HTTP_5XX: 1}, last_failure=Failure.HTTP_5XX,
        connect_failure=Failure.REFUSED, last_connect_failure=NOW - 2, reachable_at=NOW - 1,
        failing_since=NOW - 2), None),
    ("slow for a minute", record(failures={Failure.READ_TIMEOUT: 60},
                                 last_failure=Failure.READ_TIMEOUT, failing_since=NOW - 60),
     None),
    ("slow, no answer at all for dead_after",
     record(failures={Failure.READ_TIMEOUT: 120}, last_failure=Failure.READ_TIMEOUT,
            failing_since=NOW - CONFIG.dead_after), Reason.NO_ANSWER),
    ("4 x 5xx", record(failures={Failure.HTTP_5XX: 4}, last_failure=Failure.HTTP_5XX,
                       failing_since=NOW - 4), None),
    ("5 x 5xx", record(failures={Failure.HTTP_5XX: 5}, last_failure=Failure.HTTP_5XX,
                       failing_since=NOW - 5), Reason.HTTP_5XX),
    ("bad answers", record(failures={Failure.BAD_ANSWER: 50}, last_failure=Failure.BAD_ANSWER,
                           failing_since=NOW - 100), None),
    ("running, counters frozen 59 s", record(running=3.0, tokens=10.0, stuck_since=NOW - 59),
     None),
    ("running, counters frozen 60 s", record(running=3.0, tokens=10.0, stuck_since=NOW - 60),
     Reason.WEDGED),
])
def test_verdicts(name: str, health: PodHealth, expected: Reason | None) -> None:
    found = verdict(health, CONFIG, NOW)
    assert (found.reason if found is not None else None) == expected, name


def test_disabled_policy_never_ejects() -> None:
    dead = record(failures={Failure.REFUSED: 9}, last_failure=Failure.REFUSED,
                  connect_failure=Failure.REFUSED, last_connect_failure=NOW)
    assert verdict(dead, OutlierConfig(enabled=False), NOW) is None


def test_wedged_window_and_thresholds_are_configurable() -> None:
    config = OutlierConfig(wedged_after=10.0, connect_failures=2, consecutive_5xx=1)
    assert verdict(record(running=1.0, tokens=1.0, stuck_since=NOW - 10), config, NOW)
    assert verdict(record(failures={Failure.REFUSED: 1}, last_failure=Failure.REFUSED),
                   config, NOW) is None
    assert verdict(record(failures={Failure.HTTP_5XX: 1}, last_failure=Failure.HTTP_5XX),
                   config, NOW)


@pytest.mark.parametrize(("ready", "percent", "allowed"), [
    (0, 50, 0), (1, 50, 0), (1, 100, 0),  # never the last pod: fail open
    (2, 50, 1), (3, 50, 1), (4, 50, 2), (10, 50, 5),
    (2, 10, 1), (10, 10, 1), (30, 10, 3),  # Envoy: 10 % but at least one
    (3, 100, 2), (5, 0, 1),
])
def test_max_ejections(ready: int, percent: float, allowed: int) -> None:
    assert max_ejections(ready, percent) == allowed


def test_select_keeps_pods_already_out_first_and_holds_the_rest_in() -> None:
    ready = ["a", "b", "c", "d"]
    candidates = {"b": "refused", "c": "wedged", "d": "refused"}
    ejected, held = select(ready, candidates, ejected_before={"d"}, percent=25)
    assert ejected == {"d": "refused"} and held == {"b": "refused", "c": "wedged"}
    ejected, held = select(ready, candidates, ejected_before=(), percent=50)
    assert ejected == {"b": "refused", "c": "wedged"} and held == {"d": "refused"}
    assert select(ready, {}, (), 50) == ({}, {})
    assert select(["a"], {"a": "refused"}, (), 50) == ({}, {"a": "refused"})


@pytest.mark.parametrize(("times", "delay"), [(0, 1.0), (1, 1.0), (2, 2.0), (5, 5.0),
                                              (30, 30.0), (100, 30.0)])
def test_recheck_delay_grows_with_times_ejected_and_is_capped(times: int, delay: float) -> None:
    assert recheck_delay(times, CONFIG) == delay


def test_times_ejected_decay_after_serving_max_ejection_time() -> None:
    back = record(times_ejected=3, admitted_at=NOW - CONFIG.max_ejection_time + 1)
    assert decayed_times(back, CONFIG, NOW) == 3
    assert decayed_times(back, CONFIG, NOW + 1) == 0
    out = record(times_ejected=3, ejected_reason="refused", admitted_at=NOW - 1000)
    assert decayed_times(out, CONFIG, NOW) == 3


@pytest.mark.parametrize(("pods", "cost", "interval"), [
    (10, 0.0003, 1.0),          # well inside the budget: the configured interval
    (1000, 0.0003, 1.2),        # 0.3 CPU-s per round / 0.25 budget
    (10_000, 0.0003, 12.0),     # 10 000 pods stay at a quarter of a core
])
def test_liveness_interval_stretches_past_the_cpu_budget(pods: int, cost: float,
                                                         interval: float) -> None:
    assert liveness_interval(pods, cost, CONFIG) == pytest.approx(interval)


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError):
        OutlierConfig(liveness_interval=0)
    with pytest.raises(ValueError):
        OutlierConfig(max_ejection_percent=150)
    with pytest.raises(ValueError):
        OutlierConfig(connect_failures=0)
