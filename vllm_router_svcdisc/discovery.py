"""Internal: K8sServiceDiscovery: Services + EndpointSlices informers, the model prober, one cache.

Threads: one informer for Services, one for EndpointSlices (v1 Endpoints on clusters without
them), the prober's scheduler and its small worker pool.  Every ``get_*`` method reads the
cache's current snapshot and does no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config import incluster_config
from urllib3.connection import HTTPConnection

from .cache import DiscoveryCache, ModelProbe, PortSpec, ProbeTarget, ServiceView, Snapshot
from .clock import SYSTEM_CLOCK, Clock
from .errors import SvcDiscError
from .informer import Change, Informer, InformerConfig, InformerStatus
from .k8s_objects import IPV4, IPV6
from .liveness import Liveness
from .outliers import OutlierConfig, Verdict
from .poller import Failure, HealthBook
from .probe import ModelProber, ProbeConfig
from .types import EndpointInfo

log = logging.getLogger(__name__)

ALL_NAMESPACES = "*"


class DiscoveryConfigError(SvcDiscError, RuntimeError):
    """No usable Kubernetes configuration (neither in-cluster nor a kubeconfig)."""


@dataclass(frozen=True)
class Health:
    """``healthy`` and, when not, the reasons in words an operator can act on."""

    healthy: bool
    reasons: tuple[str, ...] = ()


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """In-cluster config first (unless a kubeconfig is named), then the kubeconfig.

    urllib3's own retries are off: it would sleep through a 429's Retry-After inside a call
    that ``close()`` cannot interrupt; the informer's backoff honours Retry-After instead.
    TCP keepalive is on (see :func:`keepalive_socket_options`).  In-cluster, the mounted
    ServiceAccount token is re-read as soon as the file changes (:class:`TokenFile`), not only
    once a minute as the client's own loader does.
    """
    configuration = k8s_client.Configuration()
    configuration.retries = 0
    configuration.socket_options = keepalive_socket_options()
    errors = []
    if kubeconfig is None and context is None:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
            TokenFile(incluster_config.SERVICE_TOKEN_FILENAME).install(configuration)
            return _with_keepalive(k8s_client.ApiClient(configuration))
        except k8s_config.ConfigException as exc:
            errors.append(f"in-cluster: {exc}")
    try:
        k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=configuration)
        return _with_keepalive(k8s_client.ApiClient(configuration))
    except (k8s_config.ConfigException, OSError, TypeError) as exc:
        errors.append(f"kubeconfig: {exc}")
    raise DiscoveryConfigError("no Kubernetes configuration found (" + "; ".join(errors) + ")")


class TokenFile:
    """The ServiceAccount token file, re-read when it changes: the ``refresh_api_key_hook`` of
    an in-cluster client configuration (the client calls it before every request).

    The kubernetes client's in-cluster loader re-reads the file at most once a minute, so after
    a rotation whose old token stops working at once (its bound Secret or Pod deleted, the
    ServiceAccount recreated) every request fails with 401 for up to a minute.  This hook
    ``stat``s the file at each request (the kubelet swaps a projected token's ``..data``
    symlink: a new inode; a rewrite changes the size or mtime) and reads it when it changed,
    and at least every ``refresh`` seconds.  An unreadable or empty file keeps the last token.
    It replaces the loader's hook, which also re-set the host and CA path each time (they do
    not change).
    """

    def __init__(self, path: str, refresh: float = 60.0) -> None:
        self.path = path
        self.refresh = refresh
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._read_at = float("-inf")
        self._token: str | None = None
        self.reads = 0

    def install(self, configuration: Any) -> None:
        """Read the file now and re-read it from the configuration's key hook."""
        self(configuration)
        configuration.refresh_api_key_hook = self

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def __call__(self, configuration: Any) -> None:
        stamp = self._stat()
        now = SYSTEM_CLOCK.monotonic()
        with self._lock:
            if stamp is not None and (stamp != self._stamp or now - self._read_at >= self.refresh):
                try:
                    with open(self.path, encoding="utf-8") as f:
                        text = f.read().strip()
                except (OSError, UnicodeDecodeError):
                    text = ""
                if text:
                    self._token = f"bearer {text}"  # as the client's loader writes it
                    self._stamp, self._read_at = stamp, now
                    self.reads += 1
            token = self._token
        if token is not None:
            configuration.api_key["BearerToken"] = token


def keepalive_socket_options() -> list[tuple[int, int, int]]:
    """urllib3's defaults plus TCP keepalive: probe an idle API connection after 30 s, every
    10 s, give up after 3 misses.

    The kernel then notices a dead peer on an idle watch within about a minute even where no
    bookmark would arrive; the watch's liveness read timeout is the bound that always holds.
    The client's ``Configuration.socket_options`` hands these to urllib3's pool; an option the
    platform lacks is left out.
    """
    options = list(HTTPConnection.default_socket_options)
    options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def _with_keepalive(client: Any) -> Any:
    """Clients before 36 ignore ``Configuration.socket_options``: give the options to their
    urllib3 pool manager directly (its pools are made at the first request)."""
    pool_kw = getattr(getattr(getattr(client, "rest_client", None), "pool_manager", None),
                      "connection_pool_kw", None)
    if isinstance(pool_kw, dict):
        pool_kw.setdefault("socket_options", keepalive_socket_options())
    return client


class _EndpointSource:
    """Lists/watches EndpointSlices; switches for good to v1 Endpoints when the API is absent."""

    def __init__(self, api_client: Any, namespace: str | None) -> None:
        discovery = k8s_client.DiscoveryV1Api(api_client)
        core = k8s_client.CoreV1Api(api_client)
        if namespace is None:
            self._slices: Callable[..., Any] = discovery.list_endpoint_slice_for_all_namespaces
            self._endpoints: Callable[..., Any] = core.list_endpoints_for_all_namespaces
        else:
            self._slices = functools.partial(discovery.list_namespaced_endpoint_slice, namespace)
            self._endpoints = functools.partial(core.list_namespaced_endpoints, namespace)
        self.legacy = False

    def __call__(self, **kwargs: Any) -> Any:
        if not self.legacy:
            try:
                return self._slices(**kwargs)
            except k8s_client.ApiException as exc:
                if exc.status != 404 or kwargs.get("watch"):
                    raise
                self.legacy = True
                log.warning("discovery.k8s.io/v1 EndpointSlices are not served (404); "
                            "falling back to v1 Endpoints")
        return self._endpoints(**kwargs)


class K8sServiceDiscovery:
    """Routable vLLM Services, by Service DNS name, from informer caches.

    Keyword arguments of production-stack's discovery classes are accepted so its router can
    construct this class unchanged: ``app`` and ``prefill_model_labels`` /
    ``decode_model_labels`` are accepted and ignored (``model_label`` is filled from the
    Service's ``model`` selector or label), ``watcher_timeout_seconds`` sets the watch's
    server-side timeout (0 = a random 300-600 s, as client-go does) and
    ``health_check_timeout_seconds`` the model probe's timeout.
    """

    def __init__(
        self,
        namespace: str | None = "default",
        label_selector: str | None = None,
        port: PortSpec = None,
        cluster_domain: str = "cluster.local",
        api_client: Any = None,
        *,
        routing: str = "service",
        app: Any = None,
        prefill_model_labels: Sequence[str] | None = None,
        decode_model_labels: Sequence[str] | None = None,
        watcher_timeout_seconds: int = 0,
        health_check_timeout_seconds: float | None = None,
        informer_config: InformerConfig | None = None,
        probe_config: ProbeConfig | None = None,
        api_key: str | None = None,
        unhealthy_after: float = 30.0,
        ip_family: str | None = None,
        outliers: OutlierConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        del app, prefill_model_labels, decode_model_labels  # accepted for drop-in use
        if routing not in ("service", "pod"):
            raise ValueError(f"routing must be 'service' or 'pod', not {routing!r}")
        if isinstance(port, bool) or (port is not None and not isinstance(port, int | str)):
            raise TypeError(f"port must be an int, a port name or None, not {port!r}")
        if isinstance(port, int) and not 0 < port < 65536:
            raise ValueError(f"port {port} is not a valid port number")
        if ip_family not in (None, IPV4, IPV6):
            raise ValueError(f"ip_family must be {IPV4!r}, {IPV6!r} or None, not {ip_family!r}")
        if watcher_timeout_seconds < 0:
            raise ValueError("watcher_timeout_seconds must be >= 0")
        self.namespace = None if namespace in (None, "", ALL_NAMESPACES) else namespace
        self.label_selector = label_selector or None
        self.routing = routing
        self.unhealthy_after = unhealthy_after
        informer_config = informer_config or InformerConfig()
        if watcher_timeout_seconds:
            informer_config = dataclasses.replace(
                informer_config,
                watch_timeout_range=(watcher_timeout_seconds, watcher_timeout_seconds + 1))
        probe_config = probe_config or ProbeConfig()
        if health_check_timeout_seconds:
            probe_config = dataclasses.replace(probe_config,
                                               timeout=float(health_check_timeout_seconds))
        self._clock = clock
        self.outliers = outliers = outliers or OutlierConfig()
        self._api_client = api_client if api_client is not None else load_api_client()
        #: every pod's health record: liveness checks, probes, scrapes and report_result write it
        self.health_book = HealthBook(clock, on_change=self._judge)
        self._liveness = Liveness(self.health_book, outliers, self._apply_verdicts, clock=clock)
        # until both informers have synced, only each Service's first pod is probed
        self._prober = ModelProber(self._record_probes, config=probe_config, api_key=api_key,
                                   clock=clock, health=self.health_book,
                                   hold_until_released=True)
        # /metrics readings (liveness checks, scrapes) name the adapters requests run on
        self.health_book.on_adapters = self._prober.adapters_seen
        self._cache = DiscoveryCache(port=port, cluster_domain=cluster_domain,
                                     ip_family=ip_family, check_names=routing == "service",
                                     on_probe_needed=self._pods_changed,
                                     max_ejection_percent=(outliers.max_ejection_percent
                                                           if outliers.enabled else 0.0),
                                     blip_window=outliers.blip_window, clock=clock)
        core = k8s_client.CoreV1Api(self._api_client)
        if self.namespace is None:
            list_services: Callable[..., Any] = core.list_service_for_all_namespaces
        else:
            list_services = functools.partial(core.list_namespaced_service, self.namespace)
        self._endpoint_source = _EndpointSource(self._api_client, self.namespace)
        # Both informers pass the API client: they share one /readyz recovery checker.
        self._services = Informer("services", list_services, self._apply_service_changes,
                                  label_selector=self.label_selector, config=informer_config,
                                  clock=clock, api_client=self._api_client,
                                  on_synced=self._informer_synced)
        self._endpoints = Informer("endpointslices", self._endpoint_source,
                                   self._apply_endpoint_changes, config=informer_config,
                                   clock=clock, api_client=self._api_client,
                                   on_synced=self._informer_synced)
        self._closed = False
        self._selector_matched: bool | None = None
        self._liveness.start()
        self._prober.start()
        self._services.start()
        self._endpoints.start()

    def _informer_synced(self) -> None:
        """Both first LISTs are in: the prober may go past each Service's first pod."""
        if self._services.has_synced() and self._endpoints.has_synced():
            self._prober.release()

    # -- the public, production-stack-shaped API ----------------------------------------------

    def get_endpoint_info(self) -> list[EndpointInfo]:
        """Routable endpoints: one per Service (``routing="service"``) or per ready pod.

        The list is shared by all callers until the next change: read it, do not mutate it.
        """
        snapshot = self._cache.snapshot
        return snapshot.pod_infos if self.routing == "pod" else snapshot.endpoint_infos

    def get_pod_endpoint_info(self) -> list[EndpointInfo]:
        """One entry per ready pod (``url = http://<pod ip>:<pod port>``) from the same cache."""
        return self._cache.snapshot.pod_infos

    def get_service_status(self) -> Mapping[str, ServiceView]:
        """Every selected Service, routable or not, with the reason when not."""
        return self._cache.snapshot.services

    def get_snapshot(self) -> Snapshot:
        """The whole current snapshot (for tools such as the CLI and the scraper)."""
        return self._cache.snapshot

    def has_ever_seen_model(self, model: str) -> bool:
        """True if any probe ever found ``model`` (production-stack uses it for 503 vs 404)."""
        return self._cache.has_ever_seen_model(model)

    def get_known_models(self) -> set[str]:
        """Models currently served by at least one routable Service."""
        return set(self._cache.snapshot.known_models)

    def wait_until_synced(self, timeout: float = 10.0) -> bool:
        """Wait until both informers applied their first LIST; False once ``timeout`` seconds of
        the discovery's clock passed."""
        deadline = self._clock.monotonic() + timeout
        for informer in (self._services, self._endpoints):
            if not informer.wait_until_synced(max(0.0, deadline - self._clock.monotonic())):
                return False
        return True

    def probe_counts(self) -> tuple[int, int]:
        """(model probes done, of which failed) since start."""
        return self._prober.probes_total, self._prober.failures_total

    def informer_status(self) -> tuple[InformerStatus, InformerStatus]:
        """Status of the Services and the endpoints informer."""
        return self._services.status(), self._endpoints.status()

    def health(self) -> Health:
        """Synced, watches not failing for longer than ``unhealthy_after``, no auth error.

        "Failing" is the informer's error clock: it starts at the first failed attempt of any
        shape (refused, errors, a watch that ends at once or fails in-stream, a silent stream)
        and stops only at real progress (a LIST applied, an event or bookmark, a watch that
        stayed open), never at a response's headers alone.
        """
        if self._closed:
            return Health(False, ("closed",))
        reasons = []
        now = self._clock.monotonic()
        for status in self.informer_status():
            if not status.alive:
                reasons.append(f"{status.resource} informer thread is not running")
            if status.auth_error:
                reasons.append(f"{status.resource}: {status.auth_error}")
            elif status.error_since is not None and now - status.error_since > self.unhealthy_after:
                reasons.append(f"{status.resource}: failing for "
                               f"{now - status.error_since:.0f}s: {status.last_error}")
            if not status.synced:
                detail = f" ({status.last_error})" if status.last_error else ""
                reasons.append(f"{status.resource} not synced yet{detail}")
        healthy = not reasons
        # failing open degrades routing, not discovery: said here, health stays true
        for view in self._cache.snapshot.services.values():
            if view.failing_open:
                reasons.append(f"service {view.key}: {view.outlier_note}")
        return Health(healthy, tuple(reasons))

    def report_result(self, url: str, outcome: str | int) -> bool:
        """A router's request outcome for ``url``, fed into the outlier policy.

        ``url`` must be a pod URL (``http://<pod ip>:<port>``, what pod routing hands out): a
        Service URL cannot blame a pod (kube-proxy chose one) and is ignored, as is any URL
        that is no ready pod.  ``outcome``: ``"connect_error"`` (refused or reset before a
        response), ``"connect_timeout"``, ``"timeout"`` (connected, no response in time: slow
        alone never ejects), ``"ok"``, or an HTTP status — 5xx counts, 4xx is the client's
        problem and is ignored (never an engine failure), 2xx/3xx is a success.  Returns True
        when the outcome was recorded.  Cheap, never blocks on I/O.
        """
        key = url.rstrip("/")
        if key not in self.health_book:
            return False
        book = self.health_book
        if isinstance(outcome, int) and not isinstance(outcome, bool):
            if outcome >= 500:
                book.failure(key, Failure.HTTP_5XX, f"router saw HTTP {outcome}")
                return True
            if 400 <= outcome < 500:
                return False
            book.success(key)
            return True
        if not isinstance(outcome, str):
            raise TypeError(f"outcome must be a string or an HTTP status, not {outcome!r}")
        failure = _OUTCOMES.get(outcome)
        if outcome in ("ok", "success"):
            book.success(key)
        elif failure is None:
            raise ValueError(f"unknown outcome {outcome!r}: one of ok, "
                             f"{', '.join(_OUTCOMES)} or an HTTP status")
        else:
            book.failure(key, failure, f"router: {outcome.replace('_', ' ')}")
        return True

    def now(self) -> float:
        """The discovery's clock (informer, health and outlier timestamps are on it)."""
        return self._clock.monotonic()

    def outlier_stats(self) -> dict[str, Any]:
        """Ejections so far by reason, pods ejected now, Services failing open now."""
        views = self._cache.snapshot.services.values()
        return {
            "ejections_by_reason": dict(self._cache.ejections_by_reason),
            "ejected": sum(len(v.ejected) for v in views),
            "failing_open_services": sum(bool(v.failing_open) for v in views),
            "failing_open_pods": sum(len(v.failing_open) for v in views),
            "liveness_checks": self._liveness.checks_total,
            "liveness_skipped": self._liveness.skipped_total,
            "liveness_interval": self._liveness.interval,
            "liveness_cost_per_check": self._liveness.cost_per_check,
        }

    def get_health(self) -> bool:
        """production-stack's health check: see :meth:`health` for the reasons."""
        return self.health().healthy

    def add_sleep_label(self, pod_name: str) -> None:
        """Accepted for production-stack's ``/sleep`` endpoint; nothing to do here.

        Sleep is read from each engine's ``vllm:engine_sleep_state`` by the scraper
        (``EngineStats.sleep``), so no pod label is written: discovery needs no patch rights.
        """
        log.debug("add_sleep_label(%s): sleep state comes from engine metrics", pod_name)

    def remove_sleep_label(self, pod_name: str) -> None:
        """See :meth:`add_sleep_label`."""
        log.debug("remove_sleep_label(%s): sleep state comes from engine metrics", pod_name)

    def close(self) -> None:
        """Stop every thread this object started; returns within about 2 s."""
        if self._closed:
            return
        self._closed = True
        deadline = SYSTEM_CLOCK.monotonic() + 2.0  # a real deadline for joining threads
        self._services.signal_stop()
        self._endpoints.signal_stop()
        self._liveness.poller.stopping.set()
        for informer in (self._services, self._endpoints):
            informer.stop(timeout=max(0.1, deadline - SYSTEM_CLOCK.monotonic()))
        self._prober.stop(timeout=max(0.1, deadline - SYSTEM_CLOCK.monotonic()))
        self._liveness.close(timeout=max(0.1, deadline - SYSTEM_CLOCK.monotonic()))

    def __enter__(self) -> K8sServiceDiscovery:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"K8sServiceDiscovery(namespace={self.namespace or ALL_NAMESPACES!r}, "
                f"label_selector={self.label_selector!r}, routing={self.routing!r})")

    # -- wiring ------------------------------------------------------------------------------

    def _apply_service_changes(self, changes: Sequence[Change]) -> None:
        self._cache.apply_service_changes(changes)
        matched = bool(self._cache.snapshot.services)
        if matched != self._selector_matched:  # one line per change of state, not per event
            self._selector_matched = matched
            if not matched:
                log.info("no Service matches label selector %r in %s", self.label_selector,
                         self.namespace or "all namespaces")

    def _apply_endpoint_changes(self, changes: Sequence[Change]) -> None:
        self._cache.apply_endpoint_changes(changes, legacy=self._endpoint_source.legacy)

    def _record_probes(self, results: Sequence[tuple[str, ModelProbe]]) -> None:
        self._cache.set_probes(results)

    def _pods_changed(self, targets: Sequence[ProbeTarget], gone: Sequence[str]) -> None:
        """The cache, under its lock: pods became ready endpoints or stopped being one."""
        self._prober.schedule(targets, gone)
        self._liveness.track([t.url for t in targets if t.kind == "pod"],
                             [url for url in gone if url in self.health_book])

    def _judge(self, url: str) -> None:
        """A pod's health record changed (any source): the policy judges it again."""
        if not self._closed:
            self._liveness.evaluate(url)

    def _apply_verdicts(self, verdicts: dict[str, Verdict | None]) -> None:
        self._cache.set_candidates(verdicts)


_OUTCOMES = {
    "connect_error": Failure.REFUSED,
    "connect_timeout": Failure.CONNECT_TIMEOUT,
    "timeout": Failure.READ_TIMEOUT,
}
