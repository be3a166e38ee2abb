"""EngineStatsScraper: every ready pod's ``/metrics``, aggregated per Service.

One scheduler thread hands due pods to a bounded worker pool each interval and publishes a
snapshot of the results; a worker blocked on a black-holed engine costs only its own timeout,
and a failing pod is retried with backoff so it cannot starve the healthy ones.  Results live
in a TTL cache: a pod that stops answering keeps its last stats until the TTL expires, a pod
that leaves the endpoints is dropped at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import tenacity
from cachetools import TTLCache

from .http import EngineCallError, EnginePool, expect_ok, fetch
from .types import EngineStats, PodEndpoint
from .vllm_metrics import (
    MetricsParseError,
    PodReading,
    PodSample,
    aggregate_service,
    parse_metrics,
    pod_stats,
)
from .workers import WorkerPool

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ScrapeTarget:
    """One pod to scrape and the Service it belongs to."""

    pod_url: str
    service_url: str


@dataclass
class _PodState:
    target: ScrapeTarget
    next_due: float = 0.0
    in_flight: bool = False
    failures: int = 0
    last_error: str | None = None
    previous: PodSample | None = None


@dataclass(frozen=True)
class _StatsSnapshot:
    by_service: Mapping[str, EngineStats]
    by_pod: Mapping[str, EngineStats]
    published_at: float


_EMPTY = _StatsSnapshot(MappingProxyType({}), MappingProxyType({}), 0.0)


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ScrapeTelemetry:
    """Counters the Prometheus collector reads: scrape durations and failures by cause."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.failures_by_cause: dict[str, int] = {}

    def observe(self, seconds: float, failure_cause: str | None) -> None:
        index = next((i for i, bound in enumerate(DURATION_BUCKETS) if seconds <= bound),
                     len(DURATION_BUCKETS))
        with self._lock:
            self._counts[index] += 1
            self.duration_sum += seconds
            if failure_cause is not None:
                causes = self.failures_by_cause
                causes[failure_cause] = causes.get(failure_cause, 0) + 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative histogram buckets, ``+Inf`` last, as prometheus_client wants them."""
        with self._lock:
            counts = list(self._counts)
        result, running = [], 0
        for bound, count in zip([*map(str, DURATION_BUCKETS), "+Inf"], counts, strict=True):
            running += count
            result.append((bound, float(running)))
        return result


class EngineStatsScraper:
    """Scrapes ``http://<pod ip>:<pod port>/metrics`` of every ready pod discovery knows.

    ``timeout`` bounds each request (independent of ``scrape_interval``); ``stale_after`` is
    the TTL of a pod's last good stats (default three intervals, at least ``timeout`` plus one
    interval); ``workers`` bounds concurrency, and pods whose last scrape failed may hold at
    most a quarter of the workers, so black-holed engines cannot starve healthy ones;
    ``keepalive_hosts`` is how many pods keep an idle connection between scrapes (one file
    descriptor each).
    """

    def __init__(
        self,
        discovery: Any,
        scrape_interval: float = 1.0,
        *,
        timeout: float = 2.0,
        stale_after: float | None = None,
        workers: int = 32,
        max_bytes: int = MAX_METRICS_BYTES,
        attempts: int = 2,
        keepalive_hosts: int = 1024,
        session: EnginePool | None = None,
    ) -> None:
        if scrape_interval <= 0 or timeout <= 0 or workers < 1 or attempts < 1:
            raise ValueError("scrape_interval and timeout must be > 0, workers and attempts >= 1")
        self.discovery = discovery
        self.scrape_interval = float(scrape_interval)
        self.timeout = float(timeout)
        self.stale_after = stale_after or max(3 * self.scrape_interval,
                                              self.timeout + self.scrape_interval)
        self.max_bytes = max_bytes
        self.attempts = attempts
        self._session = session or EnginePool(2, hosts=keepalive_hosts)
        self._failing_slots = max(1, workers // 4)
        self._pool = WorkerPool(workers, "svcdisc-scrape")
        self._lock = threading.Lock()
        self._readings: TTLCache[str, PodReading] = TTLCache(
            maxsize=1_000_000, ttl=self.stale_after, timer=time.monotonic)
        self._pods: dict[str, _PodState] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._snapshot = _EMPTY
        self._last_cycle: float | None = None
        self._telemetry = ScrapeTelemetry()
        self._thread = threading.Thread(target=self._run, name="svcdisc-scraper", daemon=True)
        self._thread.start()

    # -- reads -------------------------------------------------------------------------------

    def get_engine_stats(self) -> Mapping[str, EngineStats]:
        """Stats keyed like ``discovery.get_endpoint_info()`` urls (per Service, or per pod)."""
        snapshot = self._snapshot
        if getattr(self.discovery, "routing", "service") == "pod":
            return snapshot.by_pod
        return snapshot.by_service

    def get_pod_engine_stats(self) -> Mapping[str, EngineStats]:
        """Per-pod stats keyed by ``http://<pod ip>:<pod port>``."""
        return self._snapshot.by_pod

    @property
    def stale_age(self) -> float:
        """A pod's stats older than this come from an earlier scrape than the last one due."""
        return 2 * self.scrape_interval + self.timeout

    def telemetry(self) -> ScrapeTelemetry:
        """Scrape durations and failures by cause (read by ``telemetry.DiscoveryCollector``)."""
        return self._telemetry

    def get_health(self) -> bool:
        """The scrape thread runs and finished a cycle recently."""
        last = self._last_cycle
        return (self._thread.is_alive() and last is not None
                and time.monotonic() - last < 3 * self.scrape_interval + 1.0)

    def close(self) -> None:
        """Stop the scheduler and every worker; scrapes in flight are aborted, not awaited."""
        deadline = time.monotonic() + 2.0
        self._stop.set()
        self._dirty.set()
        self._session.close()
        self._pool.close(deadline)
        if self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> EngineStatsScraper:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the scheduler thread -------------------------------------------------------------

    def _run(self) -> None:
        publish_every = min(0.1, self.scrape_interval / 4)
        next_tick = time.monotonic()
        last_publish = -publish_every
        seen: object = None  # the discovery snapshot the pod set was last taken from
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                snapshot = self.discovery.get_snapshot()
                tick = now >= next_tick
                removed = False
                if tick or snapshot is not seen:
                    # Between ticks a discovery change drops gone pods and starts new ones
                    # at once; a tick also re-scrapes every due pod.
                    seen = snapshot
                    if tick:
                        next_tick = now + self.scrape_interval
                    removed = self._schedule(now, snapshot, tick=tick)
                if tick or removed or (self._dirty.is_set()
                                       and now - last_publish >= publish_every):
                    self._dirty.clear()
                    self._publish()
                    last_publish = now
                    if tick:
                        self._last_cycle = time.monotonic()
            except Exception:  # the scheduler must survive anything a cycle throws
                log.exception("scrape cycle failed; continuing")
            now = time.monotonic()
            if self._dirty.is_set():  # results wait for the next publish slot (coalesced)
                self._stop.wait(max(0.0, min(next_tick, last_publish + publish_every) - now))
            else:
                self._dirty.wait(min(publish_every, max(0.0, next_tick - now)))

    def _targets(self, snapshot: Any) -> dict[str, ScrapeTarget]:
        targets: dict[str, ScrapeTarget] = {}
        for view in snapshot.services.values():
            if view.url is None:
                continue
            for pod in view.pods:
                if isinstance(pod, PodEndpoint) and pod.routable:
                    targets[pod.url] = ScrapeTarget(pod.url, view.url)
        return targets

    def _schedule(self, now: float, snapshot: Any, *, tick: bool = True) -> bool:
        """Sync the pod set with discovery and submit due pods (only new ones off-tick).

        Returns True when a pod left, so the caller publishes without it at once.
        """
        targets = self._targets(snapshot)
        with self._lock:
            gone = list(self._pods.keys() - targets.keys())
            for url in gone:
                del self._pods[url]
                self._readings.pop(url, None)
            due = []
            failing_slots = self._failing_slots - sum(
                1 for s in self._pods.values() if s.in_flight and s.failures)
            for url, target in targets.items():
                state = self._pods.get(url)
                is_new = state is None
                if state is None:
                    state = self._pods[url] = _PodState(target)
                state.target = target
                if not ((tick or is_new) and not state.in_flight and state.next_due <= now):
                    continue
                if state.failures:
                    if failing_slots <= 0:
                        continue  # stays due: retried when a failing slot is free
                    failing_slots -= 1
                state.in_flight = True
                due.append(state)
        due.sort(key=lambda s: s.failures > 0)  # healthy pods first in the queue
        for state in due:
            try:
                self._pool.submit(self._scrape, state)
            except RuntimeError:  # pool shut down: closing
                break
        if gone:
            self._session.drop_hosts(gone)
        return bool(gone)

    # -- a worker ----------------------------------------------------------------------------

    def _scrape(self, state: _PodState) -> None:
        url = state.target.pod_url
        started = time.monotonic()
        sample: PodSample | None = None
        error = cause = None
        try:
            sample = self._fetch_sample(url)
        except EngineCallError as exc:
            error, cause = exc.reason, exc.cause
        except MetricsParseError as exc:
            error, cause = str(exc), "parse"
        except Exception as exc:  # a worker must never die with the pod marked in flight
            log.exception("scraping %s crashed", url)
            error, cause = f"crashed: {exc.__class__.__name__}", "other"
        now = time.monotonic()
        self._telemetry.observe(now - started, cause)
        with self._lock:
            state.in_flight = False
            if self._stop.is_set() or self._pods.get(url) is not state:
                return  # the pod left the endpoints meanwhile
            if sample is not None:
                reading = pod_stats(sample, state.previous, now)
                state.previous = sample
                self._readings[url] = reading
                if state.failures:
                    log.info("scraping %s works again", url)
                state.failures, state.last_error = 0, None
                state.next_due = 0.0  # due again at the next tick
            else:
                state.failures += 1
                if error != state.last_error:
                    log.warning("scraping %s failed (%s); backing off", url, error)
                state.last_error = error
                backoff = min(8 * self.scrape_interval,
                              self.scrape_interval * 2 ** (state.failures - 1))
                state.next_due = now + backoff * (0.5 + random.random() / 2)
        self._dirty.set()

    def _fetch_sample(self, url: str) -> PodSample:
        def attempt() -> PodSample:
            status, body = fetch(self._session, f"{url}/metrics", timeout=self.timeout,
                                 max_bytes=self.max_bytes)
            expect_ok(status, "/metrics")
            return parse_metrics_body(body)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, EngineCallError) and e.transient),
            stop=(tenacity.stop_after_attempt(self.attempts)
                  | tenacity.stop_after_delay(self.timeout)),
            wait=tenacity.wait_fixed(0.05),
            sleep=self._pause,
            reraise=True,
        )
        return retrying(attempt)

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- publishing ------------------------------------------------------------------------

    def _publish(self) -> None:
        """Aggregate the cached readings per Service and swap the snapshot in."""
        now = time.monotonic()
        by_service: dict[str, dict[str, PodReading]] = {}
        counts: dict[str, tuple[int, int]] = {}  # service -> (stale, failed)
        by_pod: dict[str, EngineStats] = {}
        with self._lock:
            self._readings.expire()
            for url, state in self._pods.items():
                service = state.target.service_url
                stale, failed = counts.get(service, (0, 0))
                reading = self._readings.get(url)
                failed += state.failures > 0
                if reading is not None:
                    by_service.setdefault(service, {})[url] = reading
                    by_pod[url] = reading.stats
                    stale += now - reading.stats.sample_time > self.stale_age
                counts[service] = (stale, failed)
        services: dict[str, EngineStats] = {}
        for service, readings in by_service.items():
            stale, failed = counts.get(service, (0, 0))
            stats = aggregate_service(list(readings.values()), stale=stale, failed=failed)
            if stats is not None:
                per_pod = {url: r.stats for url, r in readings.items()}
                services[service] = replace(stats, per_pod=MappingProxyType(per_pod))
        self._snapshot = _StatsSnapshot(MappingProxyType(services), MappingProxyType(by_pod),
                                        now)


def parse_metrics_body(body: bytes) -> PodSample:
    """Decode and parse a ``/metrics`` body (invalid UTF-8 is a parse error, not a crash)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MetricsParseError("metrics body is not UTF-8 text") from None
    return parse_metrics(text)
