"""Internal: EngineStatsScraper: every ready pod's ``/metrics``, aggregated per Service.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from cachetools import TTLCache
from prometheus_client import Counter, Histogram

from .backoff import BackoffPolicy
from .clock import SYSTEM_CLOCK, Clock
from .http import EngineCallError, EnginePool, expect_ok, fetch
from .metric_names import PREFIX
from .poller import FAILED, GONE, Failure, HealthBook, Poller, Step
from .types import EngineStats, PodEndpoint
from .vllm_metrics import (
    MetricsParseError,
    PodReading,
    PodSample,
    aggregate_service,
    parse_metrics,
    pod_stats,
)

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ScrapeConfig:
    """Timing and bounds of :class:`EngineStatsScraper`.

    ``timeout`` bounds each request (independent of ``interval``); ``expire_after`` is the TTL
    of a pod's last good stats (None: ``max(3 x interval, timeout + interval)``), while stats
    older than :attr:`stale_age` are counted stale; ``workers`` bounds concurrency, and pods
    whose last scrape failed may hold at most a quarter of them; ``attempts`` is the in-call
    retry of a transient failure (within ``timeout``); ``backoff`` paces a failing pod (None:
    ``interval / 2`` doubling, 100 % jitter, at most ``8 x interval``); ``keepalive_hosts`` is
    how many pods keep an idle connection between scrapes (one file descriptor each).
    """

    interval: float = 1.0
    timeout: float = 2.0
    expire_after: float | None = None
    workers: int = 32
    max_bytes: int = MAX_METRICS_BYTES
    attempts: int = 2
    keepalive_hosts: int = 1024
    backoff: BackoffPolicy | None = None

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0 or self.workers < 1 or self.attempts < 1:
            raise ValueError("interval and timeout must be > 0, workers and attempts >= 1")

    @property
    def ttl(self) -> float:
        return self.expire_after or max(3 * self.interval, self.timeout + self.interval)

    @property
    def stale_age(self) -> float:
        """A pod's stats older than this come from an earlier scrape than the last one due."""
        return 2 * self.interval + self.timeout

    @property
    def backoff_policy(self) -> BackoffPolicy:
        # a failing pod comes back after 0.5-1, 1-2, 2-4 ... intervals, at most 8
        return self.backoff or BackoffPolicy(initial=self.interval / 2, factor=2.0, jitter=1.0,
                                             cap=8 * self.interval, reset_after=float("inf"))


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

    Timing and bounds come from ``config`` (a :class:`ScrapeConfig`); ``scrape_interval`` and
    the keyword arguments ``timeout``, ``expire_after`` (or its older name ``stale_after``),
    ``workers``, ``max_bytes``, ``attempts`` and ``keepalive_hosts`` override its fields, so
    production-stack's ``EngineStatsScraper(discovery, scrape_interval=...)`` works unchanged.
    Two ages, two names: stats older than :attr:`stale_age` are counted stale; stats older than
    :attr:`expire_after` (the TTL) are dropped.
    ``clock`` is the time every rule reads (sample times, TTLs, ages, the poller); with
    ``start=False`` no thread runs and :meth:`cycle` drives it (fake-clock tests).  When the
    discovery keeps health records (``health_book``), every scrape result feeds them, and a
    Service's figures leave out its pods ejected as outliers (``EngineStats.pods_ejected``).

    ``discovery_provider`` (instead of ``discovery``) is called at every cycle and returns the
    discovery to follow, or None for none: a host that swaps its discovery singleton (as
    production-stack's ``reconfigure_service_discovery`` does) needs no new scraper, and the
    closed discovery is never read again.
    """

    def __init__(
        self,
        discovery: Any,
        scrape_interval: float | None = None,
        *,
        config: ScrapeConfig | None = None,
        timeout: float | None = None,
        expire_after: float | None = None,
        stale_after: float | None = None,
        workers: int | None = None,
        max_bytes: int | None = None,
        attempts: int | None = None,
        keepalive_hosts: int | None = None,
        session: EnginePool | None = None,
        discovery_provider: Callable[[], Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        start: bool = True,
    ) -> None:
        if expire_after is not None and stale_after is not None and expire_after != stale_after:
            raise ValueError("expire_after and its alias stale_after disagree; pass one")
        expire_after = expire_after if expire_after is not None else stale_after
        overrides: dict[str, Any] = {name: value for name, value in (
            ("interval", scrape_interval), ("timeout", timeout), ("expire_after", expire_after),
            ("workers", workers), ("max_bytes", max_bytes), ("attempts", attempts),
            ("keepalive_hosts", keepalive_hosts)) if value is not None}
        config = replace(config or ScrapeConfig(), **overrides)
        if (discovery is None) == (discovery_provider is None):
            raise ValueError("pass either a discovery or a discovery_provider")
        self.config = config
        self._discovery_of: Callable[[], Any] = discovery_provider or (lambda: discovery)
        self.scrape_interval = float(config.interval)
        self.timeout = float(config.timeout)
        self.expire_after = config.ttl
        self.max_bytes = config.max_bytes
        self.attempts = config.attempts
        self._clock = clock
        self._session = session or EnginePool(2, hosts=config.keepalive_hosts)
        self._poller: Poller[str] = Poller("svcdisc-scrape", self._scrape,
                                           interval=self.scrape_interval,
                                           workers=config.workers,
                                           backoff=config.backoff_policy, clock=clock)
        # one quick retry of a transient failure, within the timeout (tenacity keeps the state
        # of each call on its own thread, so all workers share this one)
        self._retrying = self._poller.retrying(
            attempts=config.attempts, within=self.timeout, wait=0.05,
            retry_if=lambda e: isinstance(e, EngineCallError) and e.transient)
        self._failing_slots = threading.BoundedSemaphore(max(1, config.workers // 4))
        self._lock = threading.Lock()  # guards _pods, _members, _readings, _changed, _ejected
        self._readings: TTLCache[str, PodReading] = TTLCache(
            maxsize=1_000_000, ttl=self.expire_after, timer=clock.monotonic)
        self._pods: dict[str, _Pod] = {}
        self._members: dict[str, set[str]] = {}  # Service URL -> its pods' URLs
        self._ejected: dict[str, frozenset[str]] = {}  # Service URL -> its ejected pods' URLs
        self._departed: dict[str, tuple[_Pod, PodReading | None, float]] = {}  # blip keep
        self._changed: set[str] = set()  # Services to aggregate again at the next publish
        self._service_stats: dict[str, EngineStats] = {}  # the publisher thread's own
        self._stop = self._poller.stopping
        self._snapshot = _EMPTY
        self._last_cycle: float | None = None
        self._telemetry = ScrapeTelemetry()
        self._thread = threading.Thread(target=self._run, name="svcdisc-scraper", daemon=True)
        if start:
            self.start()

    def start(self) -> EngineStatsScraper:
        """Start the threads (the constructor does, unless ``start=False``)."""
        if not self._thread.is_alive():
            self._thread.start()
            self._poller.start()
        return self

    def cycle(self, *, everything: bool = True) -> None:
        """One round in the caller's thread, for a scraper made with ``start=False`` (unit
        tests on a fake clock): follow discovery, run every scrape due now, publish."""
        discovery = self.discovery
        self._follow(discovery.get_snapshot() if discovery is not None else None)
        self._poller.run_ready()
        self._publish(everything=everything)

    @property
    def stale_after(self) -> float:
        """The older name of :attr:`expire_after` (the TTL of a pod's last good stats), kept
        as an alias, as ``stale_after=`` is in the constructor.  Not :attr:`stale_age`."""
        return self.expire_after

    def _health(self) -> HealthBook | None:
        """The discovery's health records, when it keeps them (scrape results feed them)."""
        book = getattr(self.discovery, "health_book", None)
        return book if isinstance(book, HealthBook) else None

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
        return self.config.stale_age

    def stale_pods(self, stats: Mapping[str, EngineStats], now: float | None = None) -> int:
        """How many of these per-pod stats are stale (older than :attr:`stale_age`)."""
        now = self._clock.monotonic() if now is None else now
        return sum(now - s.sample_time > self.stale_age for s in stats.values())

    def now(self) -> float:
        """The scraper's clock (sample times and ages are on it)."""
        return self._clock.monotonic()

    def telemetry(self) -> ScrapeTelemetry:
        """Scrape durations and failures by cause (read by ``telemetry.DiscoveryCollector``)."""
        return self._telemetry

    def get_health(self) -> bool:
        """The scrape thread runs and finished a cycle recently."""
        last = self._last_cycle
        return (self._thread.is_alive() and last is not None
                and self._clock.monotonic() - last < 3 * self.scrape_interval + 1.0)

    def close(self) -> None:
        """Stop every thread; scrapes in flight are aborted, not awaited (about 2 s at most)."""
        deadline = SYSTEM_CLOCK.monotonic() + 2.0  # a real deadline for joining threads
        self._stop.set()
        self._session.close()
        self._poller.close(2.0)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - SYSTEM_CLOCK.monotonic()))

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
        next_tick = self._clock.monotonic()
        seen: object = None  # the discovery snapshot the pod set was last taken from
        while not self._stop.is_set():
            try:
                discovery = self.discovery
                snapshot = discovery.get_snapshot() if discovery is not None else None
                if snapshot is not seen:
                    seen = snapshot
                    self._follow(snapshot)
                now = self._clock.monotonic()
                tick = now >= next_tick
                if tick:
                    next_tick = now + self.scrape_interval
                self._publish(everything=tick)
                if tick:
                    self._last_cycle = self._clock.monotonic()
            except Exception:  # the publisher must survive anything a cycle throws
                log.exception("scrape cycle failed; continuing")
            self._stop.wait(publish_every)

    def _targets(self, snapshot: Any) -> tuple[dict[str, set[str]], dict[str, frozenset[str]]]:
        """Pod URL -> URLs of the Services it is a ready endpoint of; Service URL -> its pods
        ejected as outliers (scraped, left out of the Service's figures)."""
        targets: dict[str, set[str]] = {}
        ejected: dict[str, frozenset[str]] = {}
        for view in snapshot.services.values() if snapshot is not None else ():
            if view.url is None:
                continue
            for pod in view.pods:
                if isinstance(pod, PodEndpoint) and pod.routable:
                    targets.setdefault(pod.url, set()).add(view.url)
            out = getattr(view, "ejected", None)
            if out:
                ejected[view.url] = frozenset(out)
        return targets, ejected

    def _follow(self, snapshot: Any) -> None:
        """Take the pod set from discovery: queue new pods, drop departed ones (a pod back
        within the blip window keeps its last reading and counters)."""
        targets, ejected = self._targets(snapshot)
        new: list[str] = []
        now = self._clock.monotonic()
        keep_for = self._blip_window()
        with self._lock:
            if ejected != self._ejected:
                self._changed.update(set(ejected) ^ set(self._ejected))
                self._changed.update(url for url, pods in ejected.items()
                                     if self._ejected.get(url) != pods)
                self._ejected = ejected
            gone = [url for url in self._pods if url not in targets]
            for url in gone:
                reading = self._readings.pop(url, None)
                pod = self._pods.pop(url)
                self._leave(url, pod.services)
                if keep_for > 0:
                    self._departed[url] = (pod, reading, now)
            for url in [u for u, (_p, _r, at) in self._departed.items() if now - at >= keep_for]:
                del self._departed[url]
            for url, services in targets.items():
                known = self._pods.get(url)
                if known is None:
                    kept = self._departed.pop(url, None)
                    fresh = self._pods[url] = _Pod(url, frozenset(services))
                    if kept is not None:  # a readiness blip: continue where it left
                        fresh.previous = kept[0].previous
                        if kept[1] is not None:
                            self._readings[url] = kept[1]
                    self._join(url, services)
                    new.append(url)
                elif known.services != services:
                    self._leave(url, known.services - services)
                    self._join(url, services - known.services)
                    known.services = frozenset(services)
        for url in new:
            self._poller.add(url)
        if gone:
            self._session.drop_hosts(gone)

    def _blip_window(self) -> float:
        outliers = getattr(self.discovery, "outliers", None)
        return float(getattr(outliers, "blip_window", 0.0) or 0.0)

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
        now = self._clock.monotonic()
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
                                for url in self._members.get(service, ())
                                if url not in self._ejected.get(service, ())]
                      for service in changed}
            left_out = {service: len(self._ejected.get(service, ())) for service in changed}
            by_pod = {url: reading.stats for url, reading in self._readings.items()}
        services = self._service_stats
        for service, pods in groups.items():
            readings = {url: reading for url, reading, _error in pods if reading is not None}
            stats = aggregate_service(
                list(readings.values()),
                stale=self.stale_pods({u: r.stats for u, r in readings.items()}, now),
                failed=sum(error is not None for _url, _reading, error in pods),
                ejected=left_out[service])
            if stats is None:
                services.pop(service, None)
            else:
                per_pod = {url: r.stats for url, r in readings.items()}
                services[service] = replace(stats, per_pod=MappingProxyType(per_pod))
        self._snapshot = _StatsSnapshot(MappingProxyType(dict(services)),
                                        MappingProxyType(by_pod), now)

    # -- the workers -------------------------------------------------------------------------

    def _scrape(self, url: str) -> Step:
        with self._lock:
            pod = self._pods.get(url)
        if pod is None:  # left the endpoints while queued
            return GONE
        failing = pod.last_error is not None
        if failing and not self._failing_slots.acquire(blocking=False):
            # a quarter of the workers already wait on failing pods: try again shortly
            return Step(False, after=min(0.25, self.scrape_interval / 4))
        started = self._clock.monotonic()
        sample: PodSample | None = None
        error = cause = None
        failure: EngineCallError | None = None
        try:
            sample = self._fetch_sample(url)
        except EngineCallError as exc:
            error, cause, failure = exc.reason, exc.cause, exc
        except MetricsParseError as exc:
            error, cause = str(exc), "parse"
        finally:
            if failing:
                self._failing_slots.release()
        now = self._clock.monotonic()
        self._telemetry.observe(now - started, cause)
        with self._lock:
            if self._stop.is_set() or self._pods.get(url) is not pod:
                return GONE  # the pod left the endpoints meanwhile: its late answer is dropped
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
        book = self._health()
        if book is not None:
            if sample is not None:
                book.success(url, tokens=sample.tokens, running=sample.running, at=now,
                             adapters=frozenset(sample.running_lora_adapters)
                             | frozenset(sample.waiting_lora_adapters))
            elif failure is not None:
                book.error(url, failure, at=now)
            else:
                book.failure(url, Failure.BAD_ANSWER, error or "unparseable /metrics", at=now)
        return Step(True) if sample is not None else FAILED

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


def parse_metrics_body(body: bytes) -> PodSample:
    """Decode and parse a ``/metrics`` body (invalid UTF-8 is a parse error, not a crash)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MetricsParseError("metrics body is not UTF-8 text") from None
    return parse_metrics(text)
