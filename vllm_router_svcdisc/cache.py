"""The shared store of Services, their endpoints and their models, published as snapshots.

Writers (the two informer threads and the model prober) change the store under one lock and
then publish a new :class:`Snapshot`; readers take ``cache.snapshot`` — one attribute read, no
lock — so a router calling on every request pays O(1) and never waits on a writer.  Only the
Services a change touches are rebuilt.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NoReturn

from .informer import DELETED, Change
from .k8s_objects import (
    ObjectError,
    ServicePort,
    ServiceRecord,
    SliceRecord,
    parse_endpoint_slice,
    parse_endpoints,
    parse_service,
)
from .types import EndpointInfo, ModelInfo, PodEndpoint

log = logging.getLogger(__name__)

PortSpec = int | str | None


class ReadOnlyList(list[Any]):
    """A list shared by every reader of a snapshot: mutating it raises instead of corrupting."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise TypeError("snapshot lists are shared and read-only; copy with list(...) first")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


@dataclass(frozen=True)
class ModelProbe:
    """The outcome of the last ``/v1/models`` probe of a Service."""

    ok: bool
    models: Mapping[str, ModelInfo] = field(default_factory=dict)
    reason: str | None = None
    time: float = 0.0
    unreachable: bool = False  # failed on timeout/connection/DNS/5xx, not on the answer itself


@dataclass(frozen=True)
class ServiceView:
    """Everything known about one Service, routable or not (``reason`` says why not)."""

    key: str
    namespace: str
    name: str
    url: str | None
    service_port: ServicePort | None
    pods: tuple[PodEndpoint, ...]
    probe: ModelProbe | None
    reason: str | None
    endpoint_info: EndpointInfo | None
    pod_infos: tuple[EndpointInfo, ...]

    @property
    def routable(self) -> bool:
        return self.endpoint_info is not None

    @property
    def ready_pods(self) -> tuple[PodEndpoint, ...]:
        return tuple(p for p in self.pods if p.routable)


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the cache at one moment; ``version`` grows with every publish."""

    version: int
    services: Mapping[str, ServiceView]
    endpoint_infos: list[EndpointInfo]
    pod_infos: list[EndpointInfo]
    known_models: frozenset[str]
    published_at: float


EMPTY_SNAPSHOT = Snapshot(0, MappingProxyType({}), ReadOnlyList(), ReadOnlyList(), frozenset(), 0.0)

ProbeTarget = tuple[str, str, tuple[str, ...]]  # (service key, url, ready pod IPs)


class DiscoveryCache:
    """Services + endpoint slices + model probes → per-Service views → one snapshot.

    ``on_probe_needed`` is told (after the lock is released) which Services need a model probe
    because they appeared, changed port or ready set, and which vanished; it must not block.
    """

    def __init__(
        self,
        *,
        port: PortSpec,
        cluster_domain: str,
        on_probe_needed: Callable[[Sequence[ProbeTarget], Sequence[str]], None] | None = None,
    ) -> None:
        self._port = port
        self._domain = cluster_domain.strip(".")
        self._on_probe_needed = on_probe_needed
        self._lock = threading.Lock()
        self._services: dict[str, ServiceRecord] = {}
        self._slices: dict[str, SliceRecord] = {}  # slice key -> record
        self._slices_by_service: dict[str, set[str]] = {}
        self._probes: dict[str, ModelProbe] = {}
        self._added: dict[str, float] = {}
        self._views: dict[str, ServiceView] = {}
        self._ever_seen_models: set[str] = set()
        self._logged_reason: dict[str, str | None] = {}
        self.snapshot: Snapshot = EMPTY_SNAPSHOT

    # -- writers -----------------------------------------------------------------------------

    def apply_service_changes(self, changes: Sequence[Change]) -> None:
        """Apply Service changes (a LIST batch or one watch event)."""
        touched: set[str] = set()
        with self._lock:
            for change in changes:
                if change.type == DELETED:
                    if self._services.pop(change.key, None) is not None:
                        touched.add(change.key)
                    continue
                try:
                    record = parse_service(change.obj)
                except ObjectError as exc:
                    log.warning("skipping a Service object: %s", exc)
                    continue
                self._services[record.key] = record
                touched.add(record.key)
            targets, gone = self._rebuild(touched)
        self._notify(targets, gone)

    def apply_endpoint_changes(self, changes: Sequence[Change], *, legacy: bool = False) -> None:
        """Apply EndpointSlice changes, or v1 Endpoints changes when ``legacy``."""
        parse = parse_endpoints if legacy else parse_endpoint_slice
        touched: set[str] = set()
        with self._lock:
            for change in changes:
                old = self._slices.pop(change.key, None)
                if old is not None:
                    siblings = self._slices_by_service.get(old.service_key, set())
                    siblings.discard(change.key)
                    if not siblings:  # no empty sets left behind by deleted Services
                        self._slices_by_service.pop(old.service_key, None)
                    touched.add(old.service_key)
                if change.type == DELETED:
                    continue
                try:
                    record = parse(change.obj)
                except ObjectError as exc:
                    log.warning("skipping an endpoints object: %s", exc)
                    continue
                self._slices[change.key] = record
                self._slices_by_service.setdefault(record.service_key, set()).add(change.key)
                touched.add(record.service_key)
            targets, gone = self._rebuild(touched)
        self._notify(targets, gone)

    def set_probe(self, key: str, probe: ModelProbe) -> None:
        """Record a model probe's outcome (from the prober's threads)."""
        with self._lock:
            if key not in self._services:
                return
            previous = self._probes.get(key)
            if not probe.ok and probe.unreachable and previous is not None and previous.ok:
                # The pods are still ready (readiness says so); an engine we could not reach
                # this once keeps the models it served until a probe says otherwise.
                probe = replace(previous, reason=f"last probe failed ({probe.reason}); "
                                                 "keeping the models of the previous probe")
            self._probes[key] = probe
            if probe.ok:
                self._ever_seen_models.update(probe.models)
            self._rebuild({key}, probe_changed=True)

    # -- reads (cheap helpers over the current snapshot) --------------------------------------

    def has_ever_seen_model(self, model: str) -> bool:
        return model in self._ever_seen_models

    # -- internals ---------------------------------------------------------------------------

    def _notify(self, targets: list[ProbeTarget], gone: list[str]) -> None:
        if self._on_probe_needed is not None and (targets or gone):
            try:
                self._on_probe_needed(targets, gone)
            except Exception:
                log.exception("model prober notification failed")

    def _rebuild(
        self, keys: Iterable[str], *, probe_changed: bool = False
    ) -> tuple[list[ProbeTarget], list[str]]:
        """Rebuild the views of ``keys`` and publish; returns probes to schedule and keys gone."""
        targets: list[ProbeTarget] = []
        gone: list[str] = []
        changed = False
        now = time.time()
        for key in keys:
            old = self._views.get(key)
            record = self._services.get(key)
            if record is None:  # deleted, or slices of a Service the selector does not match
                if old is not None:
                    del self._views[key]
                    gone.append(key)
                    changed = True
                self._probes.pop(key, None)
                self._added.pop(key, None)
                self._logged_reason.pop(key, None)
                continue
            changed = True
            view = self._build_view(record, now)
            self._views[key] = view
            self._log_reason_change(view)
            if not probe_changed and view.url is not None and view.ready_pods:
                before = (old.url, _ready_ips(old)) if old is not None else None
                if before != (view.url, _ready_ips(view)):
                    targets.append((key, view.url, _ready_ips(view)))
        if changed:
            self._publish()
        return targets, gone

    def _build_view(self, record: ServiceRecord, now: float) -> ServiceView:
        key = record.key
        service_port = resolve_service_port(record.ports, self._port)
        pods = self._pods_of(key, service_port) if service_port is not None else ()
        probe = self._probes.get(key)
        url = (
            f"http://{record.name}.{record.namespace}.svc.{self._domain}:{service_port.port}"
            if service_port is not None else None
        )
        reason = _not_routable_reason(record, service_port, self._port, pods, probe)
        endpoint_info = None
        pod_infos: tuple[EndpointInfo, ...] = ()
        if reason is None and url is not None and probe is not None:
            added = self._added.setdefault(key, now)
            models = dict(probe.models)
            endpoint_info = EndpointInfo(
                url=url,
                model_names=list(models),
                Id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"k8s-service/{key}")),
                added_timestamp=added,
                model_label=record.model_label,
                service_name=record.name,
                namespace=record.namespace,
                model_info=models,
                pods=pods,
            )
            pod_infos = tuple(
                EndpointInfo(
                    url=pod.url,
                    model_names=list(models),
                    Id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"k8s-pod/{key}/{pod.ip}:{pod.port}")),
                    added_timestamp=added,
                    model_label=record.model_label,
                    pod_name=pod.name,
                    service_name=record.name,
                    namespace=record.namespace,
                    model_info=models,
                    pods=(pod,),
                )
                for pod in pods if pod.routable
            )
        return ServiceView(key, record.namespace, record.name, url, service_port, pods, probe,
                           reason, endpoint_info, pod_infos)

    def _pods_of(self, key: str, service_port: ServicePort) -> tuple[PodEndpoint, ...]:
        """Merge every slice of the Service; one entry per address, the routable one wins."""
        merged: dict[str, PodEndpoint] = {}
        for slice_key in sorted(self._slices_by_service.get(key, ())):
            record = self._slices[slice_key]
            pod_port = record.ports.get(service_port.name)
            if pod_port is None:
                continue
            for address in record.addresses:
                pod = PodEndpoint(
                    name=address.pod_name,
                    ip=address.ip,
                    port=pod_port,
                    ready=address.ready,
                    serving=address.serving,
                    terminating=address.terminating,
                    node_name=address.node_name,
                )
                existing = merged.get(address.ip)
                if existing is None or (pod.routable and not existing.routable):
                    merged[address.ip] = pod
        return tuple(merged[ip] for ip in sorted(merged))

    def _publish(self) -> None:
        views = self._views
        endpoint_infos = ReadOnlyList(v.endpoint_info for v in views.values() if v.endpoint_info)
        pod_infos = ReadOnlyList(info for v in views.values() for info in v.pod_infos)
        known = frozenset(m for info in endpoint_infos for m in info.model_names)
        self.snapshot = Snapshot(
            version=self.snapshot.version + 1,
            services=MappingProxyType(dict(views)),
            endpoint_infos=endpoint_infos,
            pod_infos=pod_infos,
            known_models=known,
            published_at=time.monotonic(),
        )

    def _log_reason_change(self, view: ServiceView) -> None:
        """One log line per state change of a Service, not one per event."""
        previous = self._logged_reason.get(view.key, "<new>")
        if previous == view.reason:
            return
        self._logged_reason[view.key] = view.reason
        if view.reason is None:
            log.info("service %s is routable at %s (%d ready pods)",
                     view.key, view.url, len(view.ready_pods))
        elif previous != "<new>" or view.service_port is None:
            log.info("service %s is not routable: %s", view.key, view.reason)


def resolve_service_port(ports: Sequence[ServicePort], wanted: PortSpec) -> ServicePort | None:
    """The Service port to use: a number, a name, else the port named "http" or the only one."""
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        return next((p for p in ports if p.port == wanted), None)
    if isinstance(wanted, str) and wanted:
        if wanted.isdigit():
            return resolve_service_port(ports, int(wanted))
        return next((p for p in ports if p.name == wanted), None)
    named_http = next((p for p in ports if p.name == "http"), None)
    if named_http is not None:
        return named_http
    return ports[0] if len(ports) == 1 else None


def _ready_ips(view: ServiceView) -> tuple[str, ...]:
    return tuple(p.ip for p in view.pods if p.routable)


def _not_routable_reason(
    record: ServiceRecord,
    service_port: ServicePort | None,
    wanted: PortSpec,
    pods: tuple[PodEndpoint, ...],
    probe: ModelProbe | None,
) -> str | None:
    if service_port is None:
        ports = ", ".join(f"{p.name or '<unnamed>'}:{p.port}" for p in record.ports) or "none"
        want = (f"port {wanted!r}" if wanted not in (None, "")
                else 'a port named "http" or a single port')
        return f"no Service port matches {want} (ports: {ports})"
    if not pods:
        return "no endpoints for the Service port"
    if not any(p.routable for p in pods):
        return f"no ready endpoints ({len(pods)} not ready or terminating)"
    if probe is None:
        return "models not probed yet"
    if not probe.ok:
        return f"model probe failed: {probe.reason}"
    if not probe.models:
        return "the engine serves no models"
    return None
