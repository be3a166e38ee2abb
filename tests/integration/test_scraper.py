"""EngineStatsScraper against the simulator: real HTTP to fake vLLM engines, real kubernetes client.

Timing rules: no blind sleeps (every wait polls a condition with a deadline) and freshness is
asserted on sample ages (``oldest_sample_age``), not on how long a test took.  The only
wall-clock assertions are the ones the contract states in seconds (``close()`` < 2 s, a removed
pod dropped well before the next scrape tick).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from tests.conftest import wait_for
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.outliers import OutlierConfig
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster, SimPod
from vllm_router_svcdisc.sim.engine import EngineMode
from vllm_router_svcdisc.types import EngineStats

INTERVAL = 0.25
TIMEOUT = 0.5

MakeScraper = Callable[..., EngineStatsScraper]


@pytest.fixture
def make_scraper() -> Iterator[MakeScraper]:
    """``make_scraper(discovery, **kw)`` with small interval/timeout; all closed at teardown."""
    made: list[EngineStatsScraper] = []

    def factory(discovery: Any, **kwargs: Any) -> EngineStatsScraper:
        kwargs.setdefault("scrape_interval", INTERVAL)
        kwargs.setdefault("timeout", TIMEOUT)
        scraper = EngineStatsScraper(discovery, **kwargs)
        made.append(scraper)
        return scraper

    yield factory
    for scraper in made:
        scraper.close()


def _discovery(make_discovery: Callable[..., K8sServiceDiscovery], cluster: SimCluster,
               **kwargs: Any) -> K8sServiceDiscovery:
    discovery = make_discovery(cluster, **kwargs)
    assert discovery.wait_until_synced(10)
    return discovery


def _urls(pods: list[SimPod]) -> set[str]:
    return {pod.engine.url for pod in pods}


def _service(scraper: EngineStatsScraper, url: str) -> EngineStats | None:
    return scraper.get_engine_stats().get(url)


def _wait_service(scraper: EngineStatsScraper, url: str,
                  predicate: Callable[[EngineStats], bool] = lambda s: True,
                  timeout: float = 10.0) -> EngineStats:
    def check() -> EngineStats | None:
        stats = _service(scraper, url)
        return stats if stats is not None and predicate(stats) else None

    return wait_for(check, timeout,
                    lambda: f"stats of {url}: {scraper.get_engine_stats().get(url)!r}")


def _wait_pods(scraper: EngineStatsScraper, urls: set[str], timeout: float = 10.0) -> None:
    """Until the per-pod keys are exactly ``urls``."""
    wait_for(lambda: set(scraper.get_pod_engine_stats()) == urls, timeout,
             lambda: f"pod keys {sorted(scraper.get_pod_engine_stats())} != {sorted(urls)}")


def _fresh_cycles(scraper: EngineStatsScraper, url: str, cycles: int) -> None:
    """Wait until the newest sample of ``url``'s Service is ``cycles`` intervals newer."""
    start = _wait_service(scraper, url).sample_time
    _wait_service(scraper, url, lambda s: s.sample_time >= start + cycles * INTERVAL)


# -- aggregation --------------------------------------------------------------------------------


def test_dp2_ranks_sum_per_pod_and_per_service(cluster: SimCluster, make_discovery: Any,
                                               make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-dp", replicas=2, dp_ranks=2)
    first, second = cluster.pods("vllm-dp")
    assert b'engine="1"' in first.engine.metrics_text()  # really two ranks on one page
    first.engine.running, first.engine.waiting, first.engine.kv_cache_usage = 3, 5, 0.25
    second.engine.running, second.engine.waiting, second.engine.kv_cache_usage = 4, 1, 0.75
    first.engine.prefix_queries, first.engine.prefix_hits = 101, 51
    second.engine.prefix_queries, second.engine.prefix_hits = 10, 3
    scraper = make_scraper(_discovery(make_discovery, cluster))
    url = cluster.url_of("vllm-dp")

    stats = _wait_service(scraper, url, lambda s: s.pods_scraped == 2)
    pods = stats.per_pod
    assert set(pods) == _urls([first, second])
    assert (pods[first.engine.url].num_running_requests,
            pods[first.engine.url].num_queuing_requests) == (3, 5)
    assert (pods[second.engine.url].num_running_requests,
            pods[second.engine.url].num_queuing_requests) == (4, 1)
    assert pods[first.engine.url].gpu_prefix_cache_queries_total == 101  # 51 + 50 over ranks
    assert pods[first.engine.url].gpu_prefix_cache_hits_total == 51
    assert pods[first.engine.url].gpu_cache_usage_perc == pytest.approx(0.25)
    assert stats.num_running_requests == 7
    assert stats.num_queuing_requests == 6
    assert stats.gpu_prefix_cache_queries_total == 111
    assert stats.gpu_prefix_cache_hits_total == 54
    assert stats.gpu_cache_usage_perc == pytest.approx(0.5)  # mean over pods
    assert stats.gpu_cache_usage_perc_max == pytest.approx(0.75)
    assert (stats.pods_failed, stats.pods_stale) == (0, 0)
    # the per-pod map is another published snapshot (its TTL runs on its own): wait on it
    pod = wait_for(lambda: scraper.get_pod_engine_stats().get(first.engine.url), 10,
                   lambda: f"pod keys {sorted(scraper.get_pod_engine_stats())}")
    assert pod.num_running_requests == 3


def test_legacy_and_current_names_give_the_same_stats(cluster: SimCluster, make_discovery: Any,
                                                      make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-new", replicas=2, dp_ranks=2)
    cluster.add_service("vllm-old", replicas=2, dp_ranks=2, legacy_names=True)
    assert b"vllm:gpu_cache_usage_perc" in cluster.pods("vllm-old")[0].engine.metrics_text()
    for name in ("vllm-new", "vllm-old"):
        for i, pod in enumerate(cluster.pods(name)):
            pod.engine.running, pod.engine.waiting = 2 + i, 1 + i
            pod.engine.kv_cache_usage = 0.2 + 0.4 * i
            pod.engine.prefix_queries, pod.engine.prefix_hits = 200 * (i + 1), 50 * (i + 1)
    scraper = make_scraper(_discovery(make_discovery, cluster))

    def figures(stats: EngineStats) -> tuple[Any, ...]:
        return (stats.num_running_requests, stats.num_queuing_requests,
                round(stats.gpu_cache_usage_perc, 6), round(stats.gpu_cache_usage_perc_max, 6),
                stats.gpu_prefix_cache_queries_total, stats.gpu_prefix_cache_hits_total,
                stats.pods_scraped)

    new = _wait_service(scraper, cluster.url_of("vllm-new"), lambda s: s.pods_scraped == 2)
    old = _wait_service(scraper, cluster.url_of("vllm-old"), lambda s: s.pods_scraped == 2)
    assert figures(new) == figures(old) == (5, 3, 0.4, 0.6, 600, 150, 2)


def test_lora_info_and_sleep_state_reach_engine_stats(cluster: SimCluster, make_discovery: Any,
                                                      make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-lora", replicas=2, lora_adapters=["sql-lora", "chat-lora"],
                        max_lora=3)
    first, second = cluster.pods("vllm-lora")
    first.engine.running_lora_adapters = ["sql-lora"]
    first.engine.waiting_lora_adapters = ["chat-lora"]
    second.engine.running_lora_adapters = ["chat-lora"]
    for pod in (first, second):
        pod.engine.sleep_state = "weights_offloaded"
    scraper = make_scraper(_discovery(make_discovery, cluster))
    url = cluster.url_of("vllm-lora")

    stats = _wait_service(scraper, url, lambda s: s.pods_scraped == 2)
    assert stats.max_lora == 3
    assert stats.running_lora_adapters == ("chat-lora", "sql-lora")
    assert stats.waiting_lora_adapters == ("chat-lora",)
    assert stats.per_pod[first.engine.url].running_lora_adapters == ("sql-lora",)
    assert stats.per_pod[first.engine.url].waiting_lora_adapters == ("chat-lora",)
    assert stats.per_pod[second.engine.url].waiting_lora_adapters == ()
    assert stats.sleep and stats.per_pod[first.engine.url].sleep

    # One pod wakes up: the Service can serve again, the other pod still sleeps.
    first.engine.sleep_state = "awake"
    first.engine.running_lora_adapters = []
    stats = _wait_service(scraper, url, lambda s: not s.sleep)
    assert not stats.per_pod[first.engine.url].sleep
    assert stats.per_pod[second.engine.url].sleep
    stats = _wait_service(scraper, url, lambda s: s.running_lora_adapters == ("chat-lora",))
    assert stats.per_pod[first.engine.url].running_lora_adapters == ()


def test_hit_rate_is_over_the_last_interval(cluster: SimCluster, make_discovery: Any,
                                            make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-hits", replicas=2, dp_ranks=2)
    first, second = cluster.pods("vllm-hits")
    for pod in (first, second):  # a long history with a lifetime hit rate of 0.9
        pod.engine.prefix_queries, pod.engine.prefix_hits = 10_000, 9_000
    scraper = make_scraper(_discovery(make_discovery, cluster))
    url = cluster.url_of("vllm-hits")
    _wait_service(scraper, url, lambda s: s.gpu_prefix_cache_queries_total == 20_000
                  and s.pods_scraped == 2)
    # Counters unchanged over an interval: nothing queried, rate 0 (not the lifetime 0.9).
    _wait_service(scraper, url, lambda s: s.gpu_prefix_cache_hit_rate == 0.0
                  and all(p.sample_time > 0 for p in s.per_pod.values()))

    def bump(pod: SimPod, queries: int, hits: int) -> None:
        engine = pod.engine
        with engine._lock:  # both counters move in one step, as one engine step would
            engine.prefix_queries += queries
            engine.prefix_hits += hits

    def interval_rates_seen() -> bool:
        stats = _service(scraper, url)
        if stats is None or len(stats.per_pod) != 2:
            return False
        a, b = stats.per_pod[first.engine.url], stats.per_pod[second.engine.url]
        return (a.gpu_prefix_cache_hit_rate == pytest.approx(0.3)
                and b.gpu_prefix_cache_hit_rate == pytest.approx(0.5)
                and stats.gpu_prefix_cache_hit_rate == pytest.approx(0.4))  # 80 / 200

    # A scrape tick may fall between the two bumps (then the deltas land in different
    # intervals); bump again until both pods' deltas are in the same published snapshot.
    for _ in range(5):
        bump(first, 100, 30)
        bump(second, 100, 50)
        deadline = time.monotonic() + 6 * INTERVAL
        while time.monotonic() < deadline and not interval_rates_seen():
            time.sleep(0.01)
        if interval_rates_seen():
            break
    else:
        pytest.fail(f"interval hit rates never seen: {_service(scraper, url)!r}")
    # And the next interval, with no new queries, reads 0 again.
    _wait_service(scraper, url, lambda s: s.gpu_prefix_cache_hit_rate == 0.0)


# -- failures -----------------------------------------------------------------------------------


def test_bad_pods_do_not_stall_healthy_ones(cluster: SimCluster, make_discovery: Any,
                                            make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-mixed", replicas=7)
    pods = cluster.pods("vllm-mixed")
    healthy, bad = pods[:2], pods[2:]
    for pod, mode in zip(bad, (EngineMode.BLACKHOLE, EngineMode.SLOW, EngineMode.GARBAGE,
                               EngineMode.ERROR500, EngineMode.DOWN), strict=True):
        pod.engine.slow_delay = 10 * TIMEOUT  # always past the scrape timeout
        pod.engine.mode = mode
    for i, pod in enumerate(healthy):
        pod.engine.running = i + 1
    scraper = make_scraper(_discovery(make_discovery, cluster))
    url = cluster.url_of("vllm-mixed")

    # the refused and the 5xx pods are ejected as outliers: left out of the figures, counted
    stats = _wait_service(scraper, url, lambda s: (s.pods_failed, s.pods_ejected) == (3, 2))
    assert stats.pods_scraped == 2
    assert stats.num_running_requests == 3
    assert set(stats.per_pod) == _urls(healthy)

    # Over several cycles the Service stays present with exactly its healthy pods, and each of
    # them keeps being scraped (the bad pods hold no worker it needs).  How fresh the stats
    # stay under load is a benchmark figure (docs/benchmarks.md), not a pass/fail timing here.
    seen: dict[str, set[float]] = {pod_url: set() for pod_url in _urls(healthy)}

    def refreshed_eight_times() -> bool:
        current = scraper.get_engine_stats().get(url)
        assert current is not None, "a Service with healthy pods vanished"
        assert set(current.per_pod) == _urls(healthy)
        assert (current.pods_failed, current.pods_ejected) == (3, 2)
        for pod_url, pod in current.per_pod.items():
            seen[pod_url].add(pod.sample_time)
        return all(len(times) >= 8 for times in seen.values())

    wait_for(refreshed_eight_times, 20.0,
             lambda: f"samples seen per healthy pod: { {u: len(t) for u, t in seen.items()} }")
    assert scraper.get_health()
    # each engine counts a request when its handler thread reads it, not when the scrape fails
    wait_for(lambda: all(p.engine.request_counts().get("/metrics", 0) >= 1 for p in bad[:4]),
             5, lambda: f"{[p.engine.request_counts() for p in bad[:4]]}")
    assert all(p.engine.request_counts().get("/metrics", 0) >= 1 for p in bad[:4])


def test_service_whose_pods_all_fail_is_absent(cluster: SimCluster, make_discovery: Any,
                                               make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-ok", replicas=1)
    cluster.add_service("vllm-broken", replicas=2)
    broken = cluster.pods("vllm-broken")
    broken[0].engine.mode = EngineMode.ERROR500
    broken[1].engine.mode = EngineMode.GARBAGE
    scraper = make_scraper(_discovery(make_discovery, cluster))
    ok_url, broken_url = cluster.url_of("vllm-ok"), cluster.url_of("vllm-broken")

    def scraped_broken_twice() -> bool:
        assert broken_url not in scraper.get_engine_stats(), "failing Service reported"
        return all(p.engine.request_counts().get("/metrics", 0) >= 2 for p in broken)

    wait_for(scraped_broken_twice, 10, "the broken pods were not scraped")
    _fresh_cycles(scraper, ok_url, 2)
    assert broken_url not in scraper.get_engine_stats()
    assert not _urls(broken) & set(scraper.get_pod_engine_stats())
    assert set(scraper.get_engine_stats()) == {ok_url}


def test_silent_pod_keeps_last_stats_until_ttl(cluster: SimCluster, make_discovery: Any,
                                               make_scraper: MakeScraper) -> None:
    """Through real sockets: a pod that stops answering keeps its last figure, then drops out
    of the figures and counts as failed (the timing of it: tests/unit/test_scraper_rules.py)."""
    cluster.add_service("vllm-ttl", replicas=2)
    alive, silent = cluster.pods("vllm-ttl")
    alive.engine.running, silent.engine.running = 1, 7
    # the TTL rule alone: with outlier detection the refused pod would leave the figures at once
    scraper = make_scraper(_discovery(make_discovery, cluster,
                                      outliers=OutlierConfig(enabled=False)),
                           stale_after=1.6)
    url = cluster.url_of("vllm-ttl")
    _wait_service(scraper, url, lambda s: s.pods_scraped == 2 and s.num_running_requests == 8)

    silent.engine.mode = EngineMode.DOWN
    silent.engine.running = 99  # never seen: the engine no longer answers
    stats = _wait_service(scraper, url, lambda s: s.pods_failed == 1)
    if silent.engine.url in stats.per_pod:  # still within the TTL: the last good reading
        assert stats.per_pod[silent.engine.url].num_running_requests == 7
        assert stats.num_running_requests == 8
    stats = _wait_service(scraper, url, lambda s: silent.engine.url not in s.per_pod)
    assert set(stats.per_pod) == {alive.engine.url}
    assert (stats.pods_scraped, stats.pods_failed, stats.num_running_requests) == (1, 1, 1)

def test_oversize_body_is_rejected(cluster: SimCluster, make_discovery: Any,
                                   make_scraper: MakeScraper,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_router_svcdisc.scraper")
    cluster.add_service("vllm-big", replicas=2)
    normal, big = cluster.pods("vllm-big")
    big.engine.mode = EngineMode.OVERSIZE
    big.engine.oversize_bytes = 300_000
    scraper = make_scraper(_discovery(make_discovery, cluster), max_bytes=200_000)
    url = cluster.url_of("vllm-big")

    stats = _wait_service(scraper, url, lambda s: s.pods_failed == 1)
    assert set(stats.per_pod) == {normal.engine.url}
    wait_for(lambda: any(big.engine.url in r.getMessage() and "byte cap" in r.getMessage()
                         for r in caplog.records), 5, "no size-cap failure logged")
    assert big.engine.url not in scraper.get_pod_engine_stats()


# -- membership ---------------------------------------------------------------------------------


def _routable_in(discovery: Any, service_key: str, pod: SimPod) -> bool:
    view = discovery.get_snapshot().services.get(service_key)
    return view is not None and any(p.url == pod.engine.url for p in view.ready_pods)


def test_removed_pod_is_dropped_at_once_not_at_the_next_tick(
        cluster: SimCluster, make_discovery: Any, make_scraper: MakeScraper) -> None:
    # With a 30 s interval, "at once" cannot mean "at the next tick": the wait below
    # (10 s at most) only ends if the removal is applied between ticks.
    cluster.add_service("vllm-rm", replicas=3)
    keep, gone, other = cluster.pods("vllm-rm")
    discovery = _discovery(make_discovery, cluster)
    scraper = make_scraper(discovery, scrape_interval=30.0, timeout=1.0)
    url = cluster.url_of("vllm-rm")
    _wait_pods(scraper, _urls([keep, gone, other]))
    cluster.finish_termination(gone)
    wait_for(lambda: not _routable_in(discovery, "default/vllm-rm", gone), 5,
             "discovery never dropped the pod")
    _wait_pods(scraper, _urls([keep, other]), timeout=10)
    stats = _wait_service(scraper, url)
    assert stats.pods_scraped == 2 and gone.engine.url not in stats.per_pod


def test_pod_removed_mid_scrape_is_dropped_and_its_late_answer_discarded(
        cluster: SimCluster, make_discovery: Any, make_scraper: MakeScraper) -> None:
    interval, slow_delay = 1.0, 4.0
    cluster.add_service("vllm-rm", replicas=2)
    keep, slow = cluster.pods("vllm-rm")
    discovery = _discovery(make_discovery, cluster)
    scraper = make_scraper(discovery, scrape_interval=interval, timeout=2 * slow_delay)
    url = cluster.url_of("vllm-rm")
    _wait_pods(scraper, _urls([keep, slow]))
    slow.engine.slow_delay = slow_delay
    slow.engine.mode = EngineMode.SLOW
    before = slow.engine.request_counts().get("/metrics", 0)
    wait_for(lambda: slow.engine.request_counts().get("/metrics", 0) > before, 2 * interval + 2,
             "no scrape of the slow pod started")
    started = time.monotonic()
    cluster.set_ready(slow, False)  # out of the endpoints; the engine still answers later
    wait_for(lambda: not _routable_in(discovery, "default/vllm-rm", slow), 5,
             "discovery never dropped the slow pod")
    _wait_pods(scraper, {keep.engine.url}, timeout=slow_delay)
    assert time.monotonic() - started < slow_delay, "dropped only after the scrape ended"
    # Wait (on sample times) until a later scrape cycle has completed well after the slow
    # answer came back: the removed pod must not have been re-added by it.
    _wait_service(scraper, url,
                  lambda s: s.sample_time > started + slow_delay + 0.2, timeout=slow_delay + 5)
    assert set(scraper.get_pod_engine_stats()) == {keep.engine.url}
    assert set(_wait_service(scraper, url).per_pod) == {keep.engine.url}


def test_scale_1_8_1_per_pod_keys_follow(cluster: SimCluster, make_discovery: Any,
                                         make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-scale", replicas=1)
    scraper = make_scraper(_discovery(make_discovery, cluster))
    url = cluster.url_of("vllm-scale")
    first = cluster.pods("vllm-scale")
    _wait_pods(scraper, _urls(first))

    cluster.scale("vllm-scale", 8)
    eight = cluster.pods("vllm-scale")
    assert len(eight) == 8
    _wait_pods(scraper, _urls(eight))
    assert set(_wait_service(scraper, url, lambda s: s.pods_scraped == 8).per_pod) == _urls(eight)

    cluster.scale("vllm-scale", 1)
    one = cluster.pods("vllm-scale")
    assert len(one) == 1
    _wait_pods(scraper, _urls(one))
    stats = _wait_service(scraper, url, lambda s: s.pods_scraped == 1)
    assert set(stats.per_pod) == _urls(one)
    assert stats.pods_failed == 0  # removed pods are gone, not counted as failures
    _fresh_cycles(scraper, url, 2)
    assert set(scraper.get_pod_engine_stats()) == _urls(one)


def test_pod_routing_keys_are_pod_urls(cluster: SimCluster, make_discovery: Any,
                                       make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-a", replicas=2)
    cluster.add_service("vllm-b", replicas=1)
    discovery = _discovery(make_discovery, cluster, routing="pod")
    scraper = make_scraper(discovery)
    pods = cluster.pods("vllm-a") + cluster.pods("vllm-b")
    wait_for(lambda: set(scraper.get_engine_stats()) == _urls(pods), 10,
             lambda: f"keys {sorted(scraper.get_engine_stats())}")
    wait_for(lambda: {e.url for e in discovery.get_endpoint_info()} == _urls(pods), 10,
             "discovery pod urls")
    stats = scraper.get_engine_stats()
    assert all(s.pods_scraped == 1 for s in stats.values())
    assert cluster.url_of("vllm-a") not in stats


# -- lifecycle ----------------------------------------------------------------------------------


def test_health_true_while_running_false_after_close(cluster: SimCluster, make_discovery: Any,
                                                     make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-h", replicas=1)
    scraper = make_scraper(_discovery(make_discovery, cluster))
    wait_for(scraper.get_health, 5, "scraper never healthy")
    _fresh_cycles(scraper, cluster.url_of("vllm-h"), 2)
    assert scraper.get_health()
    scraper.close()
    assert not scraper.get_health()
    scraper.close()  # idempotent
    assert not scraper.get_health()


def test_close_is_prompt_with_scrapes_in_flight(cluster: SimCluster, make_discovery: Any,
                                                make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-hole", replicas=4)
    pods = cluster.pods("vllm-hole")
    for pod in pods[1:]:
        pod.engine.mode = EngineMode.BLACKHOLE
    scraper = make_scraper(_discovery(make_discovery, cluster), timeout=10.0)
    _wait_service(scraper, cluster.url_of("vllm-hole"))
    wait_for(lambda: all(p.engine.request_counts().get("/metrics", 0) >= 1 for p in pods[1:]),
             5, "black-holed pods not being scraped")
    thread = scraper._thread
    started = time.monotonic()
    scraper.close()
    assert time.monotonic() - started < 2.0
    assert not thread.is_alive()
    assert not scraper.get_health()


def test_concurrent_readers_never_raise(cluster: SimCluster, make_discovery: Any,
                                        make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-r", replicas=2)
    scraper = make_scraper(_discovery(make_discovery, cluster))
    url = cluster.url_of("vllm-r")
    _wait_service(scraper, url)
    errors: list[BaseException] = []
    reads = [0]
    stop = threading.Event()

    def read_all(stats: Mapping[str, EngineStats]) -> None:
        for key, value in stats.items():
            assert isinstance(key, str)
            _ = (value.num_running_requests, value.gpu_cache_usage_perc,
                 value.oldest_sample_age, dict(value.per_pod))

    def reader() -> None:
        try:
            while not stop.is_set():
                read_all(scraper.get_engine_stats())
                read_all(scraper.get_pod_engine_stats())
                scraper.get_health()
                reads[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        cluster.scale("vllm-r", 5)
        _wait_pods(scraper, _urls(cluster.pods("vllm-r")))
        cluster.pods("vllm-r")[-1].engine.mode = EngineMode.ERROR500
        cluster.scale("vllm-r", 1)
        _wait_pods(scraper, _urls(cluster.pods("vllm-r")))
        _fresh_cycles(scraper, url, 2)
        # the read count grows on the reader threads: wait for it, not for the scrapes
        wait_for(lambda: reads[0] > 100 or errors, 10, lambda: f"{reads[0]} reads")
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert not errors, errors
    assert reads[0] > 100


def test_a_discovery_provider_is_followed_when_the_host_swaps_its_discovery(
        cluster: SimCluster, make_discovery: Callable[..., K8sServiceDiscovery],
        make_scraper: MakeScraper) -> None:
    cluster.add_service("alpha", replicas=2)
    cluster.add_service("beta", replicas=1, labels={"team": "b"})
    first = _discovery(make_discovery, cluster, routing="pod")
    second = _discovery(make_discovery, cluster, routing="pod", label_selector="team=b")
    current: list[K8sServiceDiscovery | None] = [first]
    scraper = make_scraper(None, discovery_provider=lambda: current[0])
    wait_for(lambda: set(scraper.get_engine_stats()) == _urls(cluster.pods("alpha")),
             message=lambda: f"first: {set(scraper.get_engine_stats())}")
    current[0] = second  # what production-stack's reconfigure does to its singleton
    first.close()
    wait_for(lambda: set(scraper.get_engine_stats()) == _urls(cluster.pods("beta")),
             message=lambda: f"second: {set(scraper.get_engine_stats())}")
    current[0] = None  # no discovery of ours (e.g. reconfigured to static): nothing scraped
    wait_for(lambda: not scraper.get_pod_engine_stats(), message="stats kept without discovery")
    with pytest.raises(ValueError, match="either"):
        EngineStatsScraper(first, discovery_provider=lambda: first)


def test_a_new_pod_is_scraped_at_once_not_at_the_next_interval(
        cluster: SimCluster, make_discovery: Any, make_scraper: MakeScraper) -> None:
    cluster.add_service("vllm-new", replicas=1)
    # the interval is far longer than the test waits: only an immediate scrape can pass (no
    # liveness checks: they would read /metrics too)
    scraper = make_scraper(_discovery(make_discovery, cluster,
                                      outliers=OutlierConfig(enabled=False)),
                           scrape_interval=120.0,
                           stale_after=600.0)
    _wait_pods(scraper, _urls(cluster.pods("vllm-new")))
    added = cluster.add_pod("vllm-new")
    _wait_pods(scraper, _urls(cluster.pods("vllm-new")), timeout=10.0)
    assert added.engine.request_counts().get("/metrics") == 1
    url = cluster.url_of("vllm-new")
    assert _wait_service(scraper, url, lambda s: s.pods_scraped == 2).pods_failed == 0


def test_an_unparseable_metrics_page_is_a_warning_naming_service_and_pod_once(
        cluster: SimCluster, make_discovery: Any, make_scraper: MakeScraper,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vllm_router_svcdisc.scraper")
    cluster.add_service("vllm-junk", replicas=1)
    (pod,) = cluster.pods("vllm-junk")
    pod.engine.mode = EngineMode.GARBAGE
    make_scraper(_discovery(make_discovery, cluster))
    wait_for(lambda: pod.engine.request_counts().get("/metrics", 0) >= 3, 10,
             "the pod was not scraped again")

    def scrape_lines(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == level and "scraping" in r.getMessage()]

    warned = scrape_lines(logging.WARNING)
    assert len(warned) == 1, warned  # once per change, not once per scrape
    assert "default/vllm-junk" in warned[0] and pod.name in warned[0]
    assert pod.engine.url in warned[0]
    pod.engine.mode = EngineMode.OK
    wait_for(lambda: scrape_lines(logging.INFO), 10, "recovery not logged")
    assert "default/vllm-junk" in scrape_lines(logging.INFO)[0]
    assert len(scrape_lines(logging.WARNING)) == 1
