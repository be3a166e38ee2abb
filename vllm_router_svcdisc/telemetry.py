"""Internal: Prometheus metrics about discovery itself (not the engines' own metrics).

A custom collector reads discovery's own counters (informers, cache, model prober, liveness
checks, outlier policy) and the scraper's stats when Prometheus scrapes, so none of those is
instrumented on a hot path and nothing can drift out of step.  The one exception is the
scraper's scrape duration histogram and failure counter: the scraper observes them after each
pod scrape (``scraper.ScrapeTelemetry``, on no registry) and the collector exposes them with
the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .metric_names import PREFIX

if TYPE_CHECKING:  # one direction only: neither module imports this one
    from .discovery import K8sServiceDiscovery
    from .scraper import EngineStatsScraper

__all__ = ["PREFIX", "DiscoveryCollector", "Sources", "register_metrics", "serve_metrics"]


Sources = Callable[[], "tuple[K8sServiceDiscovery | None, EngineStatsScraper | None]"]


class DiscoveryCollector(Collector):
    """Exposes ``vllm_svcdisc_*`` metrics for one discovery (and optionally its scraper).

    ``sources`` (instead of the two objects) is called at each scrape and returns the current
    discovery and scraper (either may be None): registered once, the collector stays right
    when its host replaces them.
    """

    def __init__(self, discovery: K8sServiceDiscovery | None = None,
                 scraper: EngineStatsScraper | None = None, *,
                 sources: Sources | None = None) -> None:
        self._sources: Sources = sources or (lambda: (discovery, scraper))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily; describing would require a full collect

    def collect(self) -> Iterator[Metric]:
        discovery, scraper = self._sources()
        if discovery is not None:
            yield from self._informer_metrics(discovery)
            yield from self._cache_metrics(discovery)
        if scraper is not None:
            yield from self._scrape_metrics(scraper)

    def _informer_metrics(self, discovery: K8sServiceDiscovery) -> Iterator[Metric]:
        now = discovery.now()  # informer timestamps are on the discovery's clock
        synced = GaugeMetricFamily(f"{PREFIX}_informer_synced",
                                   "1 once the informer applied its first LIST.",
                                   labels=["resource"])
        auth = GaugeMetricFamily(f"{PREFIX}_informer_auth_error",
                                 "1 while list/watch is refused with 401/403.", labels=["resource"])
        events = CounterMetricFamily(f"{PREFIX}_informer_events",
                                     "Watch events received, by type.",
                                     labels=["resource", "type"])
        lists = CounterMetricFamily(f"{PREFIX}_informer_lists", "LIST calls that succeeded.",
                                    labels=["resource"])
        relists = CounterMetricFamily(f"{PREFIX}_informer_relists",
                                      "Failed list/watch cycles that led to a retry, by cause.",
                                      labels=["resource", "cause"])
        watches = CounterMetricFamily(f"{PREFIX}_informer_watches",
                                      "WATCH requests opened (restarts included).",
                                      labels=["resource"])
        requests = CounterMetricFamily(f"{PREFIX}_informer_api_requests",
                                       "LIST and WATCH requests sent (pages and retries included).",
                                       labels=["resource"])
        failed_watches = CounterMetricFamily(
            f"{PREFIX}_informer_failed_watches",
            "Watches that failed after a 200: ended at once with nothing (short) or carried "
            "nothing for the liveness window (silent).", labels=["resource", "kind"])
        malformed = CounterMetricFamily(f"{PREFIX}_informer_malformed_events",
                                        "Events or objects skipped as malformed.",
                                        labels=["resource"])
        since_event = GaugeMetricFamily(f"{PREFIX}_informer_seconds_since_last_event",
                                        "Seconds since the last watch event (any type).",
                                        labels=["resource"])
        since_bookmark = GaugeMetricFamily(f"{PREFIX}_informer_seconds_since_last_bookmark",
                                           "Seconds since the last BOOKMARK event.",
                                           labels=["resource"])
        for status in discovery.informer_status():
            resource = status.resource
            synced.add_metric([resource], float(status.synced))
            auth.add_metric([resource], float(status.auth_error is not None))
            for event_type, count in sorted(status.events_by_type.items()):
                events.add_metric([resource, event_type], count)
            lists.add_metric([resource], status.lists)
            for cause, count in sorted(status.relists_by_cause.items()):
                relists.add_metric([resource, cause], count)
            watches.add_metric([resource], status.watches)
            requests.add_metric([resource], status.requests)
            failed_watches.add_metric([resource, "short"], status.short_watches)
            failed_watches.add_metric([resource, "silent"], status.silent_watches)
            malformed.add_metric([resource], status.malformed_events)
            if status.last_event_time is not None:
                since_event.add_metric([resource], now - status.last_event_time)
            if status.last_bookmark_time is not None:
                since_bookmark.add_metric([resource], now - status.last_bookmark_time)
        yield from (synced, auth, events, lists, relists, watches, requests, failed_watches,
                    malformed, since_event, since_bookmark)

    def _cache_metrics(self, discovery: K8sServiceDiscovery) -> Iterator[Metric]:
        snapshot = discovery.get_snapshot()
        views = snapshot.services.values()
        yield _gauge("services", "Services matching the selector.", len(snapshot.services))
        yield _gauge("routable_services", "Services with ready pods and known models.",
                     len(snapshot.endpoint_infos))
        yield _gauge("ready_pods", "Ready, non-terminating endpoints behind selected Services.",
                     sum(len(v.ready_pods) for v in views))
        probes, failures = discovery.probe_counts()
        yield CounterMetricFamily(f"{PREFIX}_model_probes", "Model probes (/v1/models) done.",
                                  value=probes)
        yield CounterMetricFamily(f"{PREFIX}_model_probe_failures", "Model probes that failed.",
                                  value=failures)
        health = GaugeMetricFamily(f"{PREFIX}_healthy", "1 when get_health() is true.")
        health.add_metric([], float(discovery.get_health()))
        yield health
        yield from self._outlier_metrics(discovery)

    def _outlier_metrics(self, discovery: K8sServiceDiscovery) -> Iterator[Metric]:
        stats = discovery.outlier_stats()
        ejections = CounterMetricFamily(
            f"{PREFIX}_outlier_ejections",
            "Pods ejected from a Service's routable pod set by the outlier policy, by reason.",
            labels=["reason"])
        for reason, count in sorted(stats["ejections_by_reason"].items()):
            ejections.add_metric([reason], count)
        yield ejections
        yield _gauge("outlier_ejected_pods",
                     "Pods ejected now (per Service they are ejected from).", stats["ejected"])
        yield _gauge("outlier_fail_open_services",
                     "Services failing open now: more pods would be ejected than the cap "
                     "allows, so they stay listed.", stats["failing_open_services"])
        yield _gauge("outlier_fail_open_pods",
                     "Pods the policy would eject but keeps listed (cap reached).",
                     stats["failing_open_pods"])
        yield CounterMetricFamily(f"{PREFIX}_liveness_checks",
                                  "Liveness checks of pods done by discovery itself.",
                                  value=stats["liveness_checks"])
        yield CounterMetricFamily(f"{PREFIX}_liveness_checks_skipped",
                                  "Liveness checks skipped: a fresher result was at hand "
                                  "(scrape, model probe, router outcome).",
                                  value=stats["liveness_skipped"])
        yield _gauge("liveness_interval_seconds",
                     "The liveness interval now (stretched past the CPU budget).",
                     stats["liveness_interval"])

    def _scrape_metrics(self, scraper: EngineStatsScraper) -> Iterator[Metric]:
        telemetry = scraper.telemetry()
        yield from telemetry.durations.collect()
        yield from telemetry.failures.collect()
        stats = scraper.get_pod_engine_stats()
        yield _gauge("scraped_pods", "Pods with current stats.", len(stats))
        yield _gauge("stale_pods", "Pods whose stats are kept from an earlier scrape.",
                     scraper.stale_pods(stats))
        now = scraper.now()
        yield _gauge("oldest_sample_age_seconds", "Age of the oldest pod stats in use.",
                     max((s.age_at(now) for s in stats.values()), default=0.0))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def register_metrics(discovery: K8sServiceDiscovery, scraper: EngineStatsScraper | None = None,
                     registry: CollectorRegistry = REGISTRY) -> DiscoveryCollector:
    """Register the collector on ``registry`` (default: prometheus_client's global one)."""
    collector = DiscoveryCollector(discovery, scraper)
    registry.register(collector)
    return collector


def serve_metrics(port: int, addr: str = "0.0.0.0",
                  registry: CollectorRegistry = REGISTRY) -> Any:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread."""
    return start_http_server(port, addr=addr, registry=registry)
