"""Internal: raw API objects (JSON dicts) reduced to the few fields discovery needs.

Parsing is defensive: the API server may send ``null`` for empty lists and a hostile or broken
object may lack anything.  A field that is missing gets Kubernetes' documented default; an
object we cannot use at all raises :class:`ObjectError` and is skipped by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SvcDiscError

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class ObjectError(SvcDiscError, ValueError):
    """An object too broken to use (no name, no namespace)."""


IPV4, IPV6, FQDN = "IPv4", "IPv6", "FQDN"


@dataclass(frozen=True)
class ServicePort:
    name: str  # "" for an unnamed port, as EndpointSlices spell it
    port: int


@dataclass(frozen=True)
class ServiceRecord:
    """What we keep of a Service."""

    namespace: str
    name: str
    uid: str
    ports: tuple[ServicePort, ...]
    headless: bool
    model_label: str | None
    ip_families: tuple[str, ...] = ()  # spec.ipFamilies: the first is the Service's primary
    publish_not_ready: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class EndpointAddress:
    """One endpoint of a slice (or of a v1 Endpoints subset): one pod, maybe several addresses.

    ``ready`` is the slice's condition as written (with ``publishNotReadyAddresses`` it is
    true for every pod); ``serving`` is the pod's readiness (nil in the API means ``ready``).
    """

    addresses: tuple[str, ...]
    pod_name: str | None
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    pod_uid: str | None = None

    @property
    def ip(self) -> str:
        """The address consumers use: the first (the API allows several, all equivalent)."""
        return self.addresses[0]


@dataclass(frozen=True, slots=True)
class EndpointSubset:
    """Endpoints that share one port mapping (a slice, or one subset of a v1 Endpoints).

    ``all_ports`` is a port entry with neither name nor number: the endpoints accept any port,
    so the Service port itself is dialled.
    """

    ports: Mapping[str, int]  # port name ("" when unnamed) -> pod port
    endpoints: tuple[EndpointAddress, ...]
    all_ports: bool = False

    def pod_port(self, port: ServicePort) -> int | None:
        """The pod port behind ``port`` for these endpoints, or None if they do not expose it."""
        found = self.ports.get(port.name)
        if found is None and self.all_ports:
            return port.port
        return found


@dataclass(frozen=True)
class SliceRecord:
    """An EndpointSlice, or a v1 Endpoints object translated into the same shape."""

    namespace: str
    name: str
    service_name: str
    address_type: str  # IPv4, IPv6 or FQDN (for v1 Endpoints: the family of its addresses)
    subsets: tuple[EndpointSubset, ...]

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service_name}"


def _metadata(obj: Any) -> tuple[str, str, Mapping[str, Any]]:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        raise ObjectError("object without metadata")
    name = meta.get("name")
    namespace = meta.get("namespace")
    if not isinstance(name, str) or not name:
        raise ObjectError("object without metadata.name")
    if not isinstance(namespace, str) or not namespace:
        raise ObjectError(f"object {name!r} without metadata.namespace")
    return namespace, name, meta


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _flag(value: Any, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def _port_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_service(obj: Any) -> ServiceRecord:
    namespace, name, meta = _metadata(obj)
    spec = _dict(obj.get("spec"))
    ports = []
    for raw in _list(spec.get("ports")):
        port = _port_number(_dict(raw).get("port"))
        if port is not None:
            ports.append(ServicePort(name=str(_dict(raw).get("name") or ""), port=port))
    selector = _dict(spec.get("selector"))
    labels = _dict(meta.get("labels"))
    model = selector.get("model") or labels.get("model")
    families = tuple(f for f in _list(spec.get("ipFamilies")) if f in (IPV4, IPV6))
    return ServiceRecord(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        ports=tuple(ports),
        headless=spec.get("clusterIP") == "None",
        model_label=str(model) if model else None,
        ip_families=families,
        publish_not_ready=spec.get("publishNotReadyAddresses") is True,
    )


def _slice_ports(raw_ports: Any) -> tuple[dict[str, int], bool]:
    """Port name -> pod port, and whether an entry with neither name nor port ("all ports")
    is present."""
    ports: dict[str, int] = {}
    all_ports = False
    for raw in _list(raw_ports):
        entry = _dict(raw)
        port = _port_number(entry.get("port"))
        if port is not None:
            ports[str(entry.get("name") or "")] = port
        elif entry.get("port") is None and not entry.get("name"):
            all_ports = True
    return ports, all_ports


def _family_of(ip: str) -> str:
    return IPV6 if ":" in ip else IPV4


def parse_endpoint_slice(obj: Any) -> SliceRecord:
    namespace, name, meta = _metadata(obj)
    service_name = _dict(meta.get("labels")).get(SERVICE_NAME_LABEL)
    if not isinstance(service_name, str) or not service_name:
        raise ObjectError(f"EndpointSlice {namespace}/{name} without {SERVICE_NAME_LABEL}")
    ports, all_ports = _slice_ports(obj.get("ports"))
    endpoints = []
    for raw in _list(obj.get("endpoints")):
        endpoint = _dict(raw)
        addresses = tuple(ip for ip in _list(endpoint.get("addresses"))
                          if isinstance(ip, str) and ip)
        if not addresses:
            continue
        conditions = _dict(endpoint.get("conditions"))
        target = _dict(endpoint.get("targetRef"))
        is_pod = target.get("kind", "Pod") == "Pod"
        ready = _flag(conditions.get("ready"), True)
        endpoints.append(EndpointAddress(
            addresses=addresses,
            pod_name=_str(target.get("name")) if is_pod else None,
            ready=ready,
            serving=_flag(conditions.get("serving"), ready),
            terminating=_flag(conditions.get("terminating"), False),
            node_name=_str(endpoint.get("nodeName")),
            pod_uid=_str(target.get("uid")) if is_pod else None,
        ))
    address_type = obj.get("addressType")
    if address_type not in (IPV4, IPV6, FQDN):
        address_type = _family_of(endpoints[0].ip) if endpoints else IPV4
    subset = EndpointSubset(ports, tuple(endpoints), all_ports)
    return SliceRecord(namespace, name, service_name, address_type, (subset,))


def parse_endpoints(obj: Any) -> SliceRecord:
    """A v1 Endpoints object (the fallback for clusters without EndpointSlices).

    Each subset keeps its own ports: the endpoints controller writes one subset per distinct
    set of pod ports.  v1 Endpoints has no ``serving`` condition: an address in ``addresses``
    counts as serving, one in ``notReadyAddresses`` as not.
    """
    namespace, name, _meta = _metadata(obj)
    subsets = []
    first_ip = None
    for raw_subset in _list(obj.get("subsets")):
        subset = _dict(raw_subset)
        ports, all_ports = _slice_ports(subset.get("ports"))
        endpoints = []
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for raw in _list(subset.get(key)):
                address = _dict(raw)
                ip = _str(address.get("ip"))
                if ip is None:
                    continue
                first_ip = first_ip or ip
                target = _dict(address.get("targetRef"))
                endpoints.append(EndpointAddress(
                    addresses=(ip,),
                    pod_name=_str(target.get("name")),
                    ready=ready,
                    serving=ready,
                    terminating=False,
                    node_name=_str(address.get("nodeName")),
                    pod_uid=_str(target.get("uid")),
                ))
        subsets.append(EndpointSubset(ports, tuple(endpoints), all_ports))
    family = _family_of(first_ip) if first_ip else IPV4
    return SliceRecord(namespace, name, name, family, tuple(subsets))
