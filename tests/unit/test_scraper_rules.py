"""The scraper's timing rules on a fake clock, driven by ``cycle()`` (no threads, no sockets):
when pods are scraped, how long a silent pod's last stats are kept and counted stale, backoff."""

from __future__ import annotations

import types
from typing import Any

import pytest

from tests.unit.driving import drive
from vllm_router_svcdisc.backoff import BackoffPolicy
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.http import EngineCallError
from vllm_router_svcdisc.scraper import EngineStatsScraper, ScrapeConfig
from vllm_router_svcdisc.types import PodEndpoint
from vllm_router_svcdisc.vllm_metrics import PodSample

SERVICE = "http://svc.ns.svc.cluster.local:80"
ALIVE, SILENT = PodEndpoint("a", "10.0.0.1", 8000), PodEndpoint("b", "10.0.0.2", 8000)
CONFIG = ScrapeConfig(interval=1.0, timeout=0.5, expire_after=4.0,
                      backoff=BackoffPolicy(initial=1.0, factor=2.0, jitter=0.0, cap=4.0,
                                            reset_after=float("inf")))


def sample(running: float) -> PodSample:
    return PodSample(running=running, waiting=0.0, kv_usage=0.1, kv_usage_max=0.1,
                     prefix_queries=0.0, prefix_hits=0.0, sleeping=False, max_lora=None,
                     running_lora_adapters=(), waiting_lora_adapters=(), legacy_names=False,
                     model_names=frozenset({"m"}))


class Scripted(EngineStatsScraper):
    """The scraper with its one I/O call scripted: ``answers[url]`` is a running figure, or
    None for a pod that does not answer."""

    def __init__(self, clock: FakeClock, **kwargs: Any) -> None:
        view = types.SimpleNamespace(key="ns/svc", url=SERVICE, pods=(ALIVE, SILENT), ejected={})
        snapshot = types.SimpleNamespace(services={"ns/svc": view})
        discovery = types.SimpleNamespace(get_snapshot=lambda: snapshot, routing="service")
        self.answers: dict[str, float | None] = {ALIVE.url: 1.0, SILENT.url: 7.0}
        self.calls: list[tuple[float, str]] = []
        self.fake = clock
        super().__init__(discovery, config=CONFIG, clock=clock, start=False, **kwargs)

    def _fetch_sample(self, url: str) -> PodSample:
        self.calls.append((self.fake.now, url))
        running = self.answers[url]
        if running is None:
            raise EngineCallError("timed out", cause="timeout", failure="read_timeout")
        return sample(running)


def run(scraper: Scripted, clock: FakeClock, seconds: float) -> None:
    drive(clock, seconds, scraper.cycle, step=0.25)


def test_pods_are_scraped_at_once_then_every_interval() -> None:
    clock = FakeClock()
    scraper = Scripted(clock)
    start = clock.now
    run(scraper, clock, 3.1)
    times = sorted(t - start for t, url in scraper.calls if url == ALIVE.url)
    assert times == [0.0, 1.0, 2.0, 3.0]
    stats = scraper.get_engine_stats()[SERVICE]
    assert (stats.num_running_requests, stats.pods_scraped, stats.pods_failed) == (8.0, 2, 0)
    scraper.close()


def test_a_silent_pod_keeps_its_last_stats_stale_until_the_ttl_then_drops_out() -> None:
    clock = FakeClock()
    scraper = Scripted(clock)
    run(scraper, clock, 1.1)
    last_good = clock.now - 0.1  # its scrape at +1.0 was the last one that answered
    scraper.answers[SILENT.url] = None
    seen: list[tuple[float, int, int, float]] = []  # (age, scraped, stale, running)
    for _ in range(40):
        run(scraper, clock, 0.25)
        stats = scraper.get_engine_stats()[SERVICE]
        seen.append((clock.now - last_good, stats.pods_scraped, stats.pods_stale,
                     stats.num_running_requests))
    kept = [row for row in seen if row[1] == 2]
    dropped = [row for row in seen if row[1] == 1]
    # kept (with its last figure, 7) until expire_after, counted stale past stale_age
    assert kept and all(row[3] == 8.0 for row in kept)
    assert max(row[0] for row in kept) < CONFIG.ttl + 0.25
    assert all(row[2] == 1 for row in kept if row[0] > CONFIG.stale_age + 0.25)
    assert all(row[2] == 0 for row in kept if row[0] <= CONFIG.stale_age)
    assert any(row[2] == 1 for row in kept)
    # then out of the figures, still counted as failing
    assert dropped and min(row[0] for row in dropped) >= CONFIG.ttl
    assert all(row[3] == 1.0 for row in dropped)
    assert scraper.get_engine_stats()[SERVICE].pods_failed == 1
    scraper.close()


def test_a_failing_pod_backs_off_and_returns_to_the_interval_after_a_success() -> None:
    clock = FakeClock()
    scraper = Scripted(clock)
    scraper.answers[SILENT.url] = None
    start = clock.now
    run(scraper, clock, 12.1)
    failing = [t - start for t, url in scraper.calls if url == SILENT.url]
    assert failing == [0.0, 1.0, 3.0, 7.0, 11.0]  # backoff 1, 2, 4, then the 4 s cap
    scraper.answers[SILENT.url] = 2.0
    run(scraper, clock, 6.0)
    recovered = [t - start for t, url in scraper.calls if url == SILENT.url][5:]
    assert recovered == [15.0, 16.0, 17.0, 18.0]
    scraper.close()


def test_old_keyword_arguments_still_configure_the_scraper() -> None:
    clock = FakeClock()
    scraper = EngineStatsScraper(types.SimpleNamespace(get_snapshot=lambda: None), 2.0,
                                 timeout=1.5, stale_after=9.0, workers=3, attempts=1,
                                 clock=clock, start=False)
    assert (scraper.scrape_interval, scraper.timeout, scraper.stale_after) == (2.0, 1.5, 9.0)
    assert scraper.config == ScrapeConfig(interval=2.0, timeout=1.5, expire_after=9.0,
                                          workers=3, attempts=1)
    assert scraper.stale_age == 2 * 2.0 + 1.5
    scraper.close()


def test_expire_after_is_the_ttl_and_stale_after_its_older_name() -> None:
    discovery = types.SimpleNamespace(get_snapshot=lambda: None)
    new = EngineStatsScraper(discovery, 2.0, timeout=1.5, expire_after=9.0, start=False)
    old = EngineStatsScraper(discovery, 2.0, timeout=1.5, stale_after=9.0, start=False)
    assert new.config == old.config and new.config.expire_after == 9.0
    assert (new.expire_after, new.stale_after, new.stale_age) == (9.0, 9.0, 2 * 2.0 + 1.5)
    both = EngineStatsScraper(discovery, expire_after=9.0, stale_after=9.0, start=False)
    assert both.expire_after == 9.0
    with pytest.raises(ValueError, match="stale_after"):
        EngineStatsScraper(discovery, expire_after=9.0, stale_after=5.0, start=False)
    for scraper in (new, old, both):
        scraper.close()
