"""EngineStatsScraper: every ready pod's ``/metrics``, aggregated per Service.

Pods are keys of one :class:`~vllm_router_svcdisc.workqueue.WorkQueue`, served by a bounded
set of worker threads: a pod is never scraped twice at once, a healthy pod comes back one
interval after its last scrape started, a failing one after its own exponential backoff, and a
pod new to discovery is queued at once.  A worker blocked on a black-holed engine costs only
itself, and failing pods may hold at most a quarter of the workers, so they cannot starve the
healthy ones.  One more thread follows discovery's snapshot and publishes: only the Services
whose pods changed are aggregated again.  A pod selected by several Services is scraped once
and counts in each.  Readings live in a TTL cache: a pod that stops answering keeps its last
stats until the TTL expires, a pod that leaves the endpoints is dropped at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import tenacity
from cachetools import TTLCache
from prometheus_client import Counter, Histogram

from .backoff import BackoffPolicy
from .http import EngineCallError, EnginePool, expect_ok, fetch
from .telemetry import PREFIX
from .types import EngineStats, PodEndpoint
from .vllm_metrics import (
    MetricsParseError,
    PodReading,
    PodSample,
    aggregate_service,
    parse_metrics,
    pod_stats,
)
from .workqueue import WorkQueue, worker_threads

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 8 * 1024 * 1024


@dataclass
class _Pod:
    """A pod being scraped: the Services it belongs to and what its last scrape said."""

    url: str
    services: frozenset[str]
    previous: PodSample | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class _StatsSnapshot:
    by_service: Mapping[str, EngineStats]
    by_pod: Mapping[str, EngineStats]
    published_at: float


_EMPTY = _StatsSnapshot(MappingProxyType({}), MappingProxyType({}), 0.0)


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ScrapeTelemetry:
    """Scrape durations and failures by cause, as prometheus_client metrics on no registry.

    ``telemetry.DiscoveryCollector`` exposes them with the rest of the ``vllm_svcdisc_*``
    metrics on whatever registry it is registered on.
    """

    def __init__(self) -> None:
        self.durations = Histogram(f"{PREFIX}_scrape_duration_seconds",
                                   "Duration of one pod's /metrics scrape.",
                                   buckets=DURATION_BUCKETS, registry=None)
        self.failures = Counter(f"{PREFIX}_scrape_failures",
                                "Pod scrapes that failed, by cause.", ["cause"], registry=None)

    def observe(self, seconds: float, failure_cause: str | None) -> None:
        self.durations.observe(seconds)
        if failure_cause is not None:
            self.failures.labels(failure_cause).inc()

    @property
    def failures_by_cause(self) -> dict[str, float]:
        return {sample.labels["cause"]: sample.value
                for metric in self.failures.collect() for sample in metric.samples
                if sample.name.endswith("_total")}


class EngineStatsScraper:
    """Scrapes ``http://<pod ip>:<pod port>/metrics`` of every ready pod discovery knows.

    ``timeout`` bounds each request (independent of ``scrape_interval``); ``stale_after`` is
    the TTL of a pod's last good stats (default three intervals, at least ``timeout`` plus one
    interval); ``workers`` bounds concurrency, and pods whose last scrape failed may hold at
    most a quarter of the workers, so black-holed engines cannot starve healthy ones;
    ``keepalive_hosts`` is how many pods keep an idle connection between scrapes (one file
    descriptor each).

    ``discovery_provider`` (instead of ``discovery``) is called at every cycle and returns the
    discovery to follow, or None for none: a host that swaps its discovery singleton (as
    production-stack's ``reconfigure_service_discovery`` does) needs no new scraper, and the
    closed discovery is never read again.
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
        discovery_provider: Callable[[], Any] | None = None,
    ) -> None:
        if scrape_interval <= 0 or timeout <= 0 or workers < 1 or attempts < 1:
            raise ValueError("scrape_interval and timeout must be > 0, workers and attempts >= 1")
        if (discovery is None) == (discovery_provider is None):
            raise ValueError("pass either a discovery or a discovery_provider")
        self._discovery_of: Callable[[], Any] = discovery_provider or (lambda: discovery)
        self.scrape_interval = float(scrape_interval)
        self.timeout = float(timeout)
        self.stale_after = stale_after or max(3 * self.scrape_interval,
                                              self.timeout + self.scrape_interval)
        self.max_bytes = max_bytes
        self.attempts = attempts
        self._session = session or EnginePool(2, hosts=keepalive_hosts)
        # one quick retry of a transient failure, within the timeout (tenacity keeps the state
        # of each call on its own thread, so all workers share this one)
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, EngineCallError) and e.transient),
            stop=(tenacity.stop_after_attempt(attempts)
                  | tenacity.stop_after_delay(self.timeout)),
            wait=tenacity.wait_fixed(0.05),
            sleep=self._pause,
            reraise=True,
        )
        # a failing pod comes back after 0.5-1, 1-2, 2-4 ... intervals, at most 8
        self._queue: WorkQueue[str] = WorkQueue(backoff=BackoffPolicy(
            initial=self.scrape_interval / 2, factor=2.0, jitter=1.0,
            cap=8 * self.scrape_interval, reset_after=float("inf")))
        self._failing_slots = threading.BoundedSemaphore(max(1, workers // 4))
        self._lock = threading.Lock()  # guards _pods, _members, _readings, _changed
        self._readings: TTLCache[str, PodReading] = TTLCache(
            maxsize=1_000_000, ttl=self.stale_after, timer=time.monotonic)
        self._pods: dict[str, _Pod] = {}
        self._members: dict[str, set[str]] = {}  # Service URL -> its pods' URLs
        self._changed: set[str] = set()  # Services to aggregate again at the next publish
        self._service_stats: dict[str, EngineStats] = {}  # the publisher thread's own
        self._stop = threading.Event()
        self._snapshot = _EMPTY
        self._last_cycle: float | None = None
        self._telemetry = ScrapeTelemetry()
        self._thread = threading.Thread(target=self._run, name="svcdisc-scraper", daemon=True)
        self._workers = worker_threads(self._queue, self._scrape, count=workers,
                                       name="svcdisc-scrape")
        self._thread.start()
        for worker in self._workers:
            worker.start()

    @property
    def discovery(self) -> Any:
        """The discovery scraped now (the provider's current answer)."""
        return self._discovery_of()

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

    def stale_pods(self, stats: Mapping[str, EngineStats], now: float | None = None) -> int:
        """How many of these per-pod stats are stale (older than :attr:`stale_age`)."""
        now = time.monotonic() if now is None else now
        return sum(now - s.sample_time > self.stale_age for s in stats.values())

    def telemetry(self) -> ScrapeTelemetry:
        """Scrape durations and failures by cause (read by ``telemetry.DiscoveryCollector``)."""
        return self._telemetry

    def get_health(self) -> bool:
        """The scrape thread runs and finished a cycle recently."""
        last = self._last_cycle
        return (self._thread.is_alive() and last is not None
                and time.monotonic() - last < 3 * self.scrape_interval + 1.0)

    def close(self) -> None:
        """Stop every thread; scrapes in flight are aborted, not awaited (about 2 s at most)."""
        deadline = time.monotonic() + 2.0
        self._stop.set()
        self._queue.shut_down()
        self._session.close()
        for thread in (self._thread, *self._workers):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> EngineStatsScraper:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- following discovery, publishing ------------------------------------------------------

    def _run(self) -> None:
        """Follow discovery's snapshot (new pods are queued at once) and publish what changed.

        Every interval all Services are aggregated again, since staleness grows with time.
        """
        publish_every = min(0.1, self.scrape_interval / 4)
        next_tick = time.monotonic()
        seen: object = None  # the discovery snapshot the pod set was last taken from
        while not self._stop.is_set():
            try:
                discovery = self.discovery
                snapshot = discovery.get_snapshot() if discovery is not None else None
                if snapshot is not seen:
                    seen = snapshot
                    self._follow(snapshot)
                now = time.monotonic()
                tick = now >= next_tick
                if tick:
                    next_tick = now + self.scrape_interval
                self._publish(everything=tick)
                if tick:
                    self._last_cycle = time.monotonic()
            except Exception:  # the publisher must survive anything a cycle throws
                log.exception("scrape cycle failed; continuing")
            self._stop.wait(publish_every)

    def _targets(self, snapshot: Any) -> dict[str, set[str]]:
        """Pod URL -> URLs of the Services it is a ready endpoint of."""
        targets: dict[str, set[str]] = {}
        for view in snapshot.services.values() if snapshot is not None else ():
            if view.url is None:
                continue
            for pod in view.pods:
                if isinstance(pod, PodEndpoint) and pod.routable:
                    targets.setdefault(pod.url, set()).add(view.url)
        return targets

    def _follow(self, snapshot: Any) -> None:
        """Take the pod set from discovery: queue new pods, drop departed ones at once."""
        targets = self._targets(snapshot)
        new: list[str] = []
        with self._lock:
            gone = [url for url in self._pods if url not in targets]
            for url in gone:
                self._readings.pop(url, None)
                self._leave(url, self._pods.pop(url).services)
            for url, services in targets.items():
                pod = self._pods.get(url)
                if pod is None:
                    self._pods[url] = _Pod(url, frozenset(services))
                    self._join(url, services)
                    new.append(url)
                elif pod.services != services:
                    self._leave(url, pod.services - services)
                    self._join(url, services - pod.services)
                    pod.services = frozenset(services)
        for url in new:
            self._queue.add(url)
        if gone:
            self._session.drop_hosts(gone)

    def _join(self, url: str, services: set[str] | frozenset[str]) -> None:
        for service in services:
            self._members.setdefault(service, set()).add(url)
        self._changed.update(services)

    def _leave(self, url: str, services: set[str] | frozenset[str]) -> None:
        for service in services:
            members = self._members.get(service)
            if members is not None:
                members.discard(url)
                if not members:
                    del self._members[service]
        self._changed.update(services)

    def _publish(self, *, everything: bool) -> None:
        """Aggregate the Services that changed (all of them when ``everything``); swap in."""
        now = time.monotonic()
        with self._lock:
            for url, _reading in self._readings.expire():
                pod = self._pods.get(url)
                if pod is not None:
                    self._changed.update(pod.services)
            if not self._changed and not everything:
                return
            changed = self._changed | set(self._members) if everything else self._changed
            self._changed = set()
            groups = {service: [(url, self._readings.get(url), self._pods[url].last_error)
                                for url in self._members.get(service, ())]
                      for service in changed}
            by_pod = {url: reading.stats for url, reading in self._readings.items()}
        services = self._service_stats
        for service, pods in groups.items():
            readings = {url: reading for url, reading, _error in pods if reading is not None}
            stats = aggregate_service(
                list(readings.values()),
                stale=self.stale_pods({u: r.stats for u, r in readings.items()}, now),
                failed=sum(error is not None for _url, _reading, error in pods))
            if stats is None:
                services.pop(service, None)
            else:
                per_pod = {url: r.stats for url, r in readings.items()}
                services[service] = replace(stats, per_pod=MappingProxyType(per_pod))
        self._snapshot = _StatsSnapshot(MappingProxyType(dict(services)),
                                        MappingProxyType(by_pod), now)

    # -- the workers -------------------------------------------------------------------------

    def _scrape(self, url: str) -> None:
        with self._lock:
            pod = self._pods.get(url)
        if pod is None:  # left the endpoints while queued
            self._queue.forget(url)
            return
        failing = pod.last_error is not None
        if failing and not self._failing_slots.acquire(blocking=False):
            # a quarter of the workers already wait on failing pods: try again shortly
            self._queue.add_after(url, min(0.25, self.scrape_interval / 4))
            return
        started = time.monotonic()
        sample: PodSample | None = None
        error = cause = None
        try:
            sample = self._fetch_sample(url)
        except EngineCallError as exc:
            error, cause = exc.reason, exc.cause
        except MetricsParseError as exc:
            error, cause = str(exc), "parse"
        finally:
            if failing:
                self._failing_slots.release()
        now = time.monotonic()
        self._telemetry.observe(now - started, cause)
        with self._lock:
            if self._stop.is_set() or self._pods.get(url) is not pod:
                return  # the pod left the endpoints meanwhile: its late answer is dropped
            recovered = sample is not None and pod.last_error is not None
            if sample is not None:
                self._readings[url] = pod_stats(sample, pod.previous, now)
                pod.previous = sample
            changed = sample is None and error != pod.last_error
            pod.last_error = error
            self._changed.update(pod.services)
        if recovered:  # one line per change of the pod's state, naming the pod and Services
            log.info("scraping %s works again", self._describe(url))
        elif changed:
            log.warning("scraping %s failed (%s); backing off", self._describe(url), error)
        if sample is not None:
            self._queue.forget(url)
            self._queue.add_after(url, started + self.scrape_interval - now)
        else:
            self._queue.add_rate_limited(url)

    def _describe(self, url: str) -> str:
        """``pod <name> (<url>) of <ns>/<svc>, ...`` from discovery's snapshot, for a log line."""
        discovery = self.discovery
        snapshot = discovery.get_snapshot() if discovery is not None else None
        name, services = None, []
        for view in snapshot.services.values() if snapshot is not None else ():
            for endpoint in view.pods:
                if isinstance(endpoint, PodEndpoint) and endpoint.url == url:
                    name = name or endpoint.name
                    services.append(view.key)
                    break
        return f"pod {name or url} ({url}) of {', '.join(sorted(services)) or 'no Service'}"

    def _fetch_sample(self, url: str) -> PodSample:
        def attempt() -> PodSample:
            status, body = fetch(self._session, f"{url}/metrics", timeout=self.timeout,
                                 max_bytes=self.max_bytes)
            expect_ok(status, "/metrics")
            return parse_metrics_body(body)

        return self._retrying(attempt)

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)


def parse_metrics_body(body: bytes) -> PodSample:
    """Decode and parse a ``/metrics`` body (invalid UTF-8 is a parse error, not a crash)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MetricsParseError("metrics body is not UTF-8 text") from None
    return parse_metrics(text)
