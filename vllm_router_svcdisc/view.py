"""Internal: one Service's view, built from its own records only.

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

Models are probed per pod (a pooled connection through a Service VIP is pinned to one pod, so a
probe through the name sees one pod's models by chance).  Each pod's entry carries its own
models; the Service advertises what a request to its URL can rely on, see
:func:`service_models`.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .k8s_objects import IPV4, IPV6, ServicePort, ServiceRecord, SliceRecord
from .outliers import select
from .types import EndpointInfo, ModelInfo, PodEndpoint

PortSpec = int | str | None

NOT_PROBED = "models not probed yet"


@dataclass(frozen=True, slots=True)
class ModelProbe:
    """The outcome of the last ``/v1/models`` probe of one pod."""

    ok: bool
    models: Mapping[str, ModelInfo] = field(default_factory=dict)
    reason: str | None = None
    time: float = 0.0
    unreachable: bool = False  # failed on timeout/connection/DNS/5xx, not on the answer itself
    pod_name: str | None = None  # the pod probed: another pod given the same address later
    #                              is not described by this answer


@dataclass(frozen=True)
class ViewConfig:
    """What the view needs to know of the discovery's configuration."""

    port: PortSpec = None
    cluster_domain: str = "cluster.local"
    ip_family: str | None = None  # "IPv4" / "IPv6"; None = each Service's primary family
    max_ejection_percent: float = 50.0  # the outlier cap (outliers.select)


@dataclass(frozen=True)
class ServiceView:
    """Everything known about one Service, routable or not (``reason`` says why not)."""

    key: str
    namespace: str
    name: str
    url: str | None
    service_port: ServicePort | None
    pods: tuple[PodEndpoint, ...]
    models: Mapping[str, ModelInfo]  # what the Service advertises (see service_models)
    partial_models: tuple[str, ...]  # served by some ready pods only
    pod_probes: Mapping[str, ModelProbe]  # the last probe of each probed ready pod, by URL
    reason: str | None
    endpoint_info: EndpointInfo | None
    pod_infos: tuple[EndpointInfo, ...]
    ip_family: str = IPV4
    note: str | None = None  # a routable Service's caveat (headless pods on several ports)
    ejected: Mapping[str, str] = field(default_factory=dict)  # pod URL -> why (outliers)
    failing_open: Mapping[str, str] = field(default_factory=dict)  # kept in: cap reached

    @property
    def outlier_note(self) -> str | None:
        """Says so when the cap keeps pods the policy would eject (failing open)."""
        if not self.failing_open:
            return None
        ready = len(self.ready_pods)
        return (f"failing open: {len(self.failing_open)} of {ready} ready pods would be ejected "
                f"beyond the {len(self.ejected)} allowed out at once; they stay listed")

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
    ports = {p.port for p in pods}
    if len(ports) == 1:  # the usual case: every pod on one port
        return ports.pop(), None
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
                        wanted: PortSpec, pods: Sequence[PodEndpoint]) -> str | None:
    """Why the Service cannot be routed to, models aside (None when it can)."""
    if service_port is None:
        ports = ", ".join(f"{p.name or '<unnamed>'}:{p.port}" for p in record.ports) or "none"
        want = (f"port {wanted!r}" if wanted not in (None, "")
                else 'a port named "http" or a single port')
        return f"no Service port matches {want} (ports: {ports})"
    if not pods:
        return "no endpoints for the Service port"
    if not any(p.routable for p in pods):
        return f"no ready endpoints ({len(pods)} not ready or terminating)"
    return None


def probe_of(pod: PodEndpoint, probes: Mapping[str, ModelProbe]) -> ModelProbe | None:
    """``pod``'s last probe; None when there is none, or when it was of another pod that had
    the same address (a pod recreated within the readiness-blip window is a new pod)."""
    probe = probes.get(pod.url)
    if (probe is not None and probe.pod_name is not None and pod.name is not None
            and probe.pod_name != pod.name):
        return None
    return probe


def pod_models(pod: PodEndpoint, probes: Mapping[str, ModelProbe]) -> Mapping[str, ModelInfo]:
    """The models a ready pod serves, per its last good probe (empty when none)."""
    probe = probe_of(pod, probes)
    return probe.models if probe is not None and probe.ok else {}


def service_models(ready: Sequence[PodEndpoint], probes: Mapping[str, ModelProbe]
                   ) -> tuple[dict[str, ModelInfo], tuple[str, ...], str | None]:
    """(models the Service advertises, models only some pods serve, why none) from its pods.

    A request to the Service URL reaches any ready pod, so the Service advertises the models
    every probed ready pod serves.  Mid-rollout to a new model name no model is common: the
    Service then advertises the models at least half of its pods serve (the old name while most
    pods have it, both at the turn, the new one after), or failing that the ones most pods
    serve — never a name most pods no longer serve, and never nothing while every pod serves
    something.  A LoRA adapter loaded on some pods only is partial: not advertised, listed in
    ``partial_models`` and in those pods' own entries.
    """
    own = [probe for pod in ready if (probe := probe_of(pod, probes)) is not None]
    probed = [probe.models if probe.ok else {} for probe in own]
    served = [models for models in probed if models]
    if not served:
        failures = [probe.reason for probe in own if not probe.ok]
        if failures:
            return {}, (), f"model probe failed: {failures[0]}"
        return {}, (), NOT_PROBED if not probed else "the ready pods' engines serve no models"
    if all(models is served[0] for models in served):  # one shared list (the usual case)
        return {model: served[0][model] for model in sorted(served[0])}, (), None
    counts = Counter(model for models in served for model in models)
    common = [m for m, n in counts.items() if n == len(served)]
    chosen = (common or [m for m, n in counts.items() if 2 * n >= len(served)]
              or [m for m, n in counts.items() if n == max(counts.values())])
    cards: dict[str, ModelInfo] = {}
    for models in served:
        for model in chosen:
            if model in models and model not in cards:
                cards[model] = models[model]
    advertised = {model: cards[model] for model in sorted(chosen)}
    return advertised, tuple(sorted(set(counts) - set(advertised))), None


def pod_id(pod: PodEndpoint) -> str:
    """A stable ``EndpointInfo.Id`` for a pod, the same under every Service that selects it."""
    return uuid5_url(f"k8s-pod/{pod.key[0]}:{pod.key[1]}")


def uuid5_url(name: str) -> str:
    """``str(uuid.uuid5(uuid.NAMESPACE_URL, name))`` in a fifth of the time (no UUID object):
    at 100 000 pods the UUID class was 2.5 s of start-up.  A unit test cross-checks it."""
    digest = bytearray(hashlib.sha1(_URL_NAMESPACE + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes


@functools.lru_cache(maxsize=1 << 14)
def _uuid_of(name: str) -> str:
    """:func:`uuid5_url`, memoised for Services (their entry is rebuilt on every change)."""
    return uuid5_url(name)


def mark_outliers(pods: tuple[PodEndpoint, ...], candidates: Mapping[str, str],
                  ejected_before: Collection[str], percent: float
                  ) -> tuple[tuple[PodEndpoint, ...], dict[str, str], dict[str, str]]:
    """The pods with their outlier state, and (ejected, failing open) by URL, after the cap."""
    ready = [pod.url for pod in pods if pod.routable]
    ejected, held = select(ready, candidates, ejected_before, percent)
    if not ejected and not held:
        return pods, ejected, held
    marked = tuple(
        replace(pod, state="ejected", reason=ejected[pod.url]) if pod.url in ejected
        else replace(pod, state="fail_open", reason=held[pod.url]) if pod.url in held
        else pod
        for pod in pods)
    return marked, ejected, held


Endpoints = tuple[str, "ServicePort | None", tuple[PodEndpoint, ...]]


def service_endpoints(record: ServiceRecord, slices: Iterable[SliceRecord],
                      config: ViewConfig) -> Endpoints:
    """(address family, Service port, pods) of a Service: what its record and slices say,
    before models and outliers — the part of a view a model probe never changes."""
    slices = tuple(slices)
    family = choose_family(record, slices, config.ip_family)
    service_port = resolve_service_port(record.ports, config.port, headless=record.headless)
    pods = (merge_endpoints(record, slices, service_port, family)
            if service_port is not None else ())
    return family, service_port, pods


def build_view(record: ServiceRecord, slices: Iterable[SliceRecord],
               probes: Mapping[str, ModelProbe], *, config: ViewConfig,
               added: float, name_errors: Mapping[str, str] | None = None,
               candidates: Mapping[str, str] | None = None,
               ejected_before: Collection[str] = (),
               endpoints: Endpoints | None = None,
               previous_pod_infos: Sequence[EndpointInfo] = ()) -> ServiceView:
    """The view of one Service from its record, its slices and its pods' last model probes
    (``probes`` is keyed by pod URL; pods missing from it were not probed yet).

    ``name_errors`` says, by Service URL, why a Service's DNS name did not resolve at its last
    check (routers dial that name in Service routing); a URL absent from it resolved or was
    not checked.

    ``candidates`` are the pods the outlier policy would eject (pod URL -> why); at most
    ``config.max_ejection_percent`` of the ready pods are, preferring ``ejected_before`` (the
    previous view's), and the others stay listed (failing open).  Ejected pods stay in ``pods``
    (state and reason set) and out of ``pod_infos``.

    ``endpoints``: :func:`service_endpoints` of the same record and slices, when the caller
    kept it (a probe result rebuilds a view whose slices did not change); with it, the pod
    entries of ``previous_pod_infos`` (the previous view's) whose pod and models did not
    change are reused, so a probe result costs one pod entry, not one per pod."""
    key = record.key
    family, service_port, pods = endpoints or service_endpoints(record, slices, config)
    ejected: dict[str, str] = {}
    held: dict[str, str] = {}
    if candidates:
        pods, ejected, held = mark_outliers(pods, candidates, ejected_before,
                                            config.max_ejection_percent)
    url = note = None
    if service_port is not None:
        port, note = dial_port(record, service_port, pods)
        url = f"http://{record.name}.{record.namespace}.svc.{config.cluster_domain}:{port}"
    ready = [pod for pod in pods if pod.routable]
    pod_probes = {pod.url: probe for pod in ready if (probe := probe_of(pod, probes)) is not None}
    models, partial, models_reason = service_models(ready, pod_probes)
    name_error = (name_errors or {}).get(url or "")
    reason = (not_routable_reason(record, service_port, config.port, pods)
              or (f"the Service name does not resolve (DNS): {name_error}" if name_error
                  else None)
              or models_reason)
    endpoint_info = None
    pod_infos: tuple[EndpointInfo, ...] = ()
    if reason is None and url is not None:
        endpoint_info = EndpointInfo(
            url=url, model_names=list(models),
            Id=_uuid_of(f"k8s-service/{key}"),
            added_timestamp=added, model_label=record.model_label, service_name=record.name,
            namespace=record.namespace, model_info=models, pods=pods,
            partial_models=partial,
        )
        kept = {info.url: info for info in previous_pod_infos}
        pod_infos = tuple(
            _pod_info(record, pod, own, added, kept.get(pod.url))
            for pod in ready if not pod.ejected and (own := pod_models(pod, pod_probes))
        )
    return ServiceView(key, record.namespace, record.name, url, service_port, pods, models,
                       partial, pod_probes, reason, endpoint_info, pod_infos, family,
                       note if reason is None else None,
                       MappingProxyType(ejected) if ejected else _NONE,
                       MappingProxyType(held) if held else _NONE)


_NONE: Mapping[str, str] = MappingProxyType({})


def _pod_info(record: ServiceRecord, pod: PodEndpoint, own: Mapping[str, ModelInfo],
              added: float, previous: EndpointInfo | None) -> EndpointInfo:
    """A pod's entry: the previous one when it describes the same pod object with the same
    models mapping (everything in it derives from those), else a new one."""
    if (previous is not None and previous.pods[0] is pod and previous.model_info is own
            and previous.added_timestamp == added):
        return previous
    return EndpointInfo(
        url=pod.url, model_names=list(own), Id=pod_id(pod), added_timestamp=added,
        model_label=record.model_label, pod_name=pod.name, service_name=record.name,
        namespace=record.namespace, pods=(pod,),
        # the probe's mapping, shared (read-only, like everything in a snapshot)
        model_info=own if isinstance(own, dict) else dict(own),
    )
