"""When the model prober probes, on a fake clock with scripted answers: new pods first, a pod
back from a blip soon, everything else in the background at a bounded rate, and a pod whose
``/metrics`` shows an adapter it did not list at once."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from tests.unit.driving import drive
from vllm_router_svcdisc.cache import ProbeTarget
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.poller import HealthBook
from vllm_router_svcdisc.probe import (
    STARTUP_HOLD_LIMIT,
    ModelProber,
    ProbeConfig,
    parse_model_list,
)
from vllm_router_svcdisc.types import ModelInfo

BASE = ModelInfo(id="base", object="model", created=0, owned_by="vllm", root="base")


class Engines:
    """Scripted ``/v1/models`` answers: every pod serves ``base`` plus its own ``adapters``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, str]] = []
        self.adapters: dict[str, list[str]] = {}

    def fetch(self, url: str) -> dict[str, ModelInfo]:
        self.calls.append((self.clock.now, url))
        models = {"base": BASE}
        for name in self.adapters.get(url, []):
            models[name] = ModelInfo(id=name, object="model", created=0, owned_by="vllm",
                                     root=name, parent="base")
        return models

    def urls(self) -> list[str]:
        return [url for _t, url in self.calls]


def url(i: int) -> str:
    return f"http://10.0.{i // 250}.{i % 250}:8000"


def target(i: int, *, fresh: bool = True, first: bool = False) -> ProbeTarget:
    return ProbeTarget(url(i), f"pod-{i}", ("default/svc",), fresh=fresh, first=first)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, *, hold: bool = False,
         **config: float) -> tuple[ModelProber, Engines]:
    engines = Engines(clock)
    prober = ModelProber(lambda results: None, clock=clock, fetch=engines.fetch,
                         config=ProbeConfig(**config),  # type: ignore[arg-type]
                         hold_until_released=hold)
    return prober, engines


def run(prober: ModelProber) -> list[str]:
    return prober._poller.run_ready()


def test_a_new_pod_is_probed_before_every_background_re_probe_that_came_due(clock) -> None:
    prober, _engines = make(clock, interval=10.0)
    prober.schedule([target(i) for i in range(50)], [])
    assert run(prober) == [url(i) for i in range(50)]
    clock.advance(20.0)  # every background re-probe is due now
    prober.schedule([target(99)], [])
    assert run(prober)[0] == url(99)


def test_first_pods_of_services_go_before_other_new_pods_told_earlier(clock) -> None:
    """A LIST handed over in parts: every part's first pods before any part's other pods."""
    prober, _engines = make(clock)
    prober.schedule([target(0, first=True), target(1), target(2)], [])
    prober.schedule([target(3, first=True), target(4), target(5)], [])
    assert run(prober) == [url(0), url(3), url(1), url(2), url(4), url(5)]


def test_a_pod_back_from_a_blip_is_re_probed_soon_behind_new_pods_and_a_moved_one_not(
        clock) -> None:
    prober, engines = make(clock, interval=10.0)
    prober.schedule([target(1), target(2)], [])
    run(prober)
    prober.schedule([], [url(1)])  # not ready any more
    run(prober)
    engines.calls.clear()
    # back with its models kept (not fresh), a new pod, and pod 2 with one Service more
    prober.schedule([target(1, fresh=False), target(3),
                     ProbeTarget(url(2), "pod-2", ("default/a", "default/svc"), fresh=False)],
                    [])
    assert run(prober) == [url(3), url(1)]


def test_background_re_probes_keep_to_the_rate_and_every_pod_gets_its_turn(clock) -> None:
    prober, engines = make(clock, interval=1.0, max_background_rate=20.0)
    pods = 1000
    prober.schedule([target(i) for i in range(pods)], [])
    run(prober)  # the first probes: on arrival, whatever the rate
    engines.calls.clear()
    drive(clock, 200.0, lambda: run(prober), step=0.25)
    per_second = Counter(int(t) for t, _url in engines.calls)
    assert max(per_second.values()) <= 20 + 2  # slots are 1/rate apart (+ the cap's overlap)
    per_pod = Counter(engines.urls())
    # one round of 1000 pods at 20/s takes 50 s: 200 s is about four rounds for each pod
    assert len(per_pod) == pods and min(per_pod.values()) >= 3 and max(per_pod.values()) <= 5


def test_few_pods_are_re_probed_every_interval_jittered(clock) -> None:
    prober, engines = make(clock, interval=10.0, max_background_rate=50.0)
    prober.schedule([target(0)], [])
    drive(clock, 100.5, lambda: run(prober), step=0.25)
    times = [t for t, _url in engines.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 10 or len(times) == 11
    assert all(8.9 <= gap <= 11.25 for gap in gaps), gaps


def test_when_pods_leave_the_others_are_not_pushed_behind_their_slots(clock) -> None:
    prober, engines = make(clock, interval=1.0, max_background_rate=10.0)
    prober.schedule([target(i) for i in range(1000)], [])
    run(prober)  # 1000 slots taken: the last one 100 s ahead
    prober.schedule([], [url(i) for i in range(1, 1000)])
    engines.calls.clear()
    drive(clock, 120.0, lambda: run(prober), step=0.25)
    # pod 0 keeps one round's pace: its next re-probe at most 1.1 x 100 s away, then every
    # interval (its own slots only)
    assert len(engines.calls) >= 10


def test_an_adapter_running_that_the_last_probe_did_not_list_asks_for_one_re_probe(
        clock) -> None:
    prober, engines = make(clock, interval=1000.0)
    prober.schedule([target(0), target(1)], [])
    run(prober)
    engines.calls.clear()
    engines.adapters[url(0)] = ["sql-lora"]
    prober.adapters_seen(url(0), frozenset({"sql-lora"}))
    prober.adapters_seen(url(0), frozenset({"sql-lora"}))  # the same news: no second probe
    prober.adapters_seen(url(1), frozenset({"base"}))  # listed already: nothing to do
    prober.adapters_seen(url(5), frozenset({"x"}))  # no pod of ours
    assert run(prober) == [url(0)]
    assert prober.adapter_reprobes_total == 1
    # now listed: seeing it again asks nothing; another adapter asks once more
    prober.adapters_seen(url(0), frozenset({"sql-lora"}))
    assert run(prober) == []
    prober.adapters_seen(url(0), frozenset({"sql-lora", "tweet-lora"}))
    assert run(prober) == [url(0)]


def test_an_adapter_that_models_never_lists_costs_one_probe_not_one_per_reading(clock) -> None:
    prober, engines = make(clock, interval=1000.0)
    prober.schedule([target(0)], [])
    run(prober)
    engines.calls.clear()
    for _ in range(5):
        prober.adapters_seen(url(0), frozenset({"ghost"}))
        run(prober)
    assert engines.urls() == [url(0)]


def test_the_health_book_reports_changed_adapter_sets_only(clock) -> None:
    seen: list[tuple[str, frozenset[str]]] = []
    book = HealthBook(clock, on_adapters=lambda u, a: seen.append((u, a)))
    book.ensure(url(0))
    for adapters in ({"a"}, {"a"}, set(), {"a", "b"}):
        book.success(url(0), tokens=1.0, running=1.0, adapters=frozenset(adapters))
    book.success(url(0))  # a /health answer says nothing of adapters
    book.success(url(9), adapters=frozenset({"a"}))  # unknown pod: ignored
    assert seen == [(url(0), frozenset({"a"})), (url(0), frozenset({"a", "b"}))]


def test_probe_config_refuses_rates_and_intervals_that_cannot_work() -> None:
    with pytest.raises(ValueError):
        ProbeConfig(max_background_rate=0)
    with pytest.raises(ValueError):
        ProbeConfig(interval=0)
    with pytest.raises(ValueError):
        ProbeConfig(workers=0)


def test_pods_answering_the_same_list_share_one_mapping_whatever_vllm_stamps_per_answer(
        ) -> None:
    def answer(created: int, max_len: int = 4096) -> dict[str, object]:
        card = {"id": "m", "object": "model", "created": created, "owned_by": "vllm",
                "root": "m", "parent": None, "max_model_len": max_len,
                "permission": [{"id": f"modelperm-{created}", "created": created}]}
        return {"object": "list", "data": [card]}

    first, second = parse_model_list(answer(1)), parse_model_list(answer(2))
    assert first is second and first["m"].extra_fields["max_model_len"] == 4096
    other = parse_model_list(answer(3, max_len=8192))
    assert other is not first and other["m"].extra_fields["max_model_len"] == 8192


def test_until_released_only_the_first_pod_of_each_service_is_probed(clock) -> None:
    """Start-up: the CPU the first LIST shares goes to making every Service routable."""
    prober, engines = make(clock, hold=True)
    prober.schedule([target(0, first=True), target(1), target(2)], [])
    prober.schedule([target(3, first=True), target(4)], ["gone"])
    prober.schedule([], [url(2)])  # left before the LIST was in: never probed
    prober.schedule([ProbeTarget("http://svc-a.default.svc.cluster.local:80", None,
                                 ("default/svc-a",), kind="name")], [])
    assert run(prober) == [url(0), url(3)]
    clock.advance(1.0)
    assert run(prober) == []
    prober.release()
    assert run(prober) == [url(1), url(4), "http://svc-a.default.svc.cluster.local:80"]
    prober.schedule([target(5)], [])  # released: a new pod is probed at once
    assert run(prober) == [url(5)]
    assert engines.urls().count(url(1)) == 1


def test_held_lanes_run_after_the_hold_limit_without_a_release(clock) -> None:
    """A first LIST that keeps failing part-way does not stop the probes of listed pods."""
    prober, _engines = make(clock, hold=True)
    prober.schedule([target(0, first=True), target(1)], [])
    assert run(prober) == [url(0)]
    clock.advance(STARTUP_HOLD_LIMIT - 1.0)
    prober._end_hold_if_due()
    assert url(1) not in run(prober)
    clock.advance(1.0)
    prober._end_hold_if_due()
    assert url(1) in run(prober)
