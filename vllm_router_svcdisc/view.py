"""One Service's view, built from its own records only.

:func:`build_view` is a pure function (no lock, no I/O, no clock): the cache calls it for each
Service a change touches, and the unit tests call it directly with hand-written records for
every topology Kubernetes produces.  The rules it follows are Kubernetes' own:

- an endpoint is one pod (its ``targetRef``; without one, its address and port), however many
  addresses it lists (the first is used) and however many slices it appears in;
- it is routable when ``serving`` and not ``terminating`` (``serving`` nil means ``ready``);
  ``ready`` alone is not the pod's readiness under ``publishNotReadyAddresses``;
- one IP family per Service: the preferred one if the Service has it, else the Service's
  primary family (``spec.ipFamilies[0]``), so a dual-stack Service's pods are counted once;
- a ClusterIP Service is dialled on its Service port (kube-proxy translates); a headless one
  on the endpoints' pod port, because its DNS name resolves to the pods themselves.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .k8s_objects import IPV4, IPV6, ServicePort, ServiceRecord, SliceRecord
from .types import EndpointInfo, ModelInfo, PodEndpoint

PortSpec = int | str | None


@dataclass(frozen=True)
class ModelProbe:
    """The outcome of the last ``/v1/models`` probe of a Service."""

    ok: bool
    models: Mapping[str, ModelInfo] = field(default_factory=dict)
    reason: str | None = None
    time: float = 0.0
    unreachable: bool = False  # failed on timeout/connection/DNS/5xx, not on the answer itself


@dataclass(frozen=True)
class ViewConfig:
    """What the view needs to know of the discovery's configuration."""

    port: PortSpec = None
    cluster_domain: str = "cluster.local"
    ip_family: str | None = None  # "IPv4" / "IPv6"; None = each Service's primary family


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
    ip_family: str = IPV4
    note: str | None = None  # a routable Service's caveat (headless pods on several ports)

    @property
    def routable(self) -> bool:
        return self.endpoint_info is not None

    @property
    def ready_pods(self) -> tuple[PodEndpoint, ...]:
        return tuple(p for p in self.pods if p.routable)


def resolve_service_port(ports: Sequence[ServicePort], wanted: PortSpec,
                         *, headless: bool = False) -> ServicePort | None:
    """The Service port to use: a number, a name, else the port named "http" or the only one.

    A headless Service without ports accepts any port: a wanted number is used as is.
    """
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        if not ports and headless:
            return ServicePort("", wanted)
        return next((p for p in ports if p.port == wanted), None)
    if isinstance(wanted, str) and wanted:
        if wanted.isdigit():
            return resolve_service_port(ports, int(wanted), headless=headless)
        return next((p for p in ports if p.name == wanted), None)
    named_http = next((p for p in ports if p.name == "http"), None)
    if named_http is not None:
        return named_http
    return ports[0] if len(ports) == 1 else None


def choose_family(record: ServiceRecord, slices: Iterable[SliceRecord],
                  preferred: str | None) -> str:
    """The preferred family if the Service has it, else its primary (``spec.ipFamilies[0]``);
    a Service that states no families (older API servers) uses IPv4 slices if it has any."""
    families = record.ip_families
    if families:
        return preferred if preferred in families else families[0]
    present = {s.address_type for s in slices}
    if preferred in present:
        return preferred
    return IPV4 if IPV4 in present or IPV6 not in present else IPV6


def merge_endpoints(record: ServiceRecord, slices: Iterable[SliceRecord],
                    service_port: ServicePort, family: str) -> tuple[PodEndpoint, ...]:
    """Every endpoint of ``family`` that exposes ``service_port``, one per pod; a routable
    copy wins over a stale one when a pod is listed twice (moving between slices)."""
    merged: dict[tuple[str, int], PodEndpoint] = {}
    for record_slice in sorted(slices, key=lambda s: s.name):
        if record_slice.address_type != family:
            continue
        for subset in record_slice.subsets:
            pod_port = subset.pod_port(service_port)
            if pod_port is None:
                continue
            for endpoint in subset.endpoints:
                pod = PodEndpoint(
                    name=endpoint.pod_name,
                    ip=endpoint.ip,
                    port=pod_port,
                    ready=endpoint.ready,
                    serving=endpoint.serving,
                    terminating=endpoint.terminating,
                    node_name=endpoint.node_name,
                    namespace=record.namespace,
                )
                existing = merged.get(pod.key)
                if existing is None or (pod.routable and not existing.routable):
                    merged[pod.key] = pod
    return tuple(sorted(merged.values(), key=lambda p: (p.ip, p.port)))


def dial_port(record: ServiceRecord, service_port: ServicePort,
              pods: Sequence[PodEndpoint]) -> tuple[int, str | None]:
    """The port the Service URL dials, and a caveat when a headless Service's pods disagree.

    A headless name resolves to pod IPs with no port translation, so the pod port is dialled:
    the one most routable pods listen on (the lowest on a tie).  Pods on other ports still
    appear in DNS; a client of the name reaching them on that port is refused.
    """
    if not record.headless:
        return service_port.port, None
    counted = Counter(p.port for p in pods if p.routable) or Counter(p.port for p in pods)
    if not counted:
        return service_port.port, None
    best = max(sorted(counted), key=lambda port: counted[port])
    if len(counted) == 1:
        return best, None
    spread = ", ".join(f"{port} ({n} pods)" for port, n in sorted(counted.items()))
    return best, (f"headless Service pods listen on different ports: {spread}; the URL dials "
                  f"{best}, pods on other ports refuse connections made through the name")


def not_routable_reason(record: ServiceRecord, service_port: ServicePort | None,
                        wanted: PortSpec, pods: Sequence[PodEndpoint],
                        probe: ModelProbe | None) -> str | None:
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


def pod_id(pod: PodEndpoint) -> str:
    """A stable ``EndpointInfo.Id`` for a pod, the same under every Service that selects it."""
    return _uuid_of(f"k8s-pod/{pod.key[0]}:{pod.key[1]}")


@functools.lru_cache(maxsize=1 << 17)
def _uuid_of(name: str) -> str:
    """uuid5 of a name, memoised: views are rebuilt on every change of their Service."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def build_view(record: ServiceRecord, slices: Iterable[SliceRecord], probe: ModelProbe | None,
               *, config: ViewConfig, added: float) -> ServiceView:
    """The view of one Service from its record, its slices and its last model probe."""
    slices = tuple(slices)
    key = record.key
    family = choose_family(record, slices, config.ip_family)
    service_port = resolve_service_port(record.ports, config.port, headless=record.headless)
    pods = (merge_endpoints(record, slices, service_port, family)
            if service_port is not None else ())
    url = note = None
    if service_port is not None:
        port, note = dial_port(record, service_port, pods)
        url = f"http://{record.name}.{record.namespace}.svc.{config.cluster_domain}:{port}"
    reason = not_routable_reason(record, service_port, config.port, pods, probe)
    endpoint_info = None
    pod_infos: tuple[EndpointInfo, ...] = ()
    if reason is None and url is not None and probe is not None:
        models = dict(probe.models)
        names = list(models)  # shared by the Service's entries: snapshot records are read-only
        endpoint_info = EndpointInfo(
            url=url, model_names=names,
            Id=_uuid_of(f"k8s-service/{key}"),
            added_timestamp=added, model_label=record.model_label, service_name=record.name,
            namespace=record.namespace, model_info=models, pods=pods,
        )
        pod_infos = tuple(
            EndpointInfo(
                url=pod.url, model_names=names, Id=pod_id(pod), added_timestamp=added,
                model_label=record.model_label, pod_name=pod.name, service_name=record.name,
                namespace=record.namespace, model_info=models, pods=(pod,),
            )
            for pod in pods if pod.routable
        )
    return ServiceView(key, record.namespace, record.name, url, service_port, pods, probe,
                       reason, endpoint_info, pod_infos, family, note if reason is None else None)
