"""Raw API objects (JSON dicts) reduced to the few fields discovery needs.

Parsing is defensive: the API server may send ``null`` for empty lists and a hostile or broken
object may lack anything.  A field that is missing gets Kubernetes' documented default; an
object we cannot use at all raises :class:`ObjectError` and is skipped by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class ObjectError(ValueError):
    """An object too broken to use (no name, no namespace)."""


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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class EndpointAddress:
    """One endpoint of a slice (or of a v1 Endpoints subset)."""

    ip: str
    pod_name: str | None
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None


@dataclass(frozen=True)
class SliceRecord:
    """An EndpointSlice, or a v1 Endpoints object translated into the same shape."""

    namespace: str
    name: str
    service_name: str
    ports: Mapping[str, int]  # port name ("" when unnamed) -> pod port
    addresses: tuple[EndpointAddress, ...]

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
    return ServiceRecord(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        ports=tuple(ports),
        headless=spec.get("clusterIP") == "None",
        model_label=str(model) if model else None,
    )


def parse_endpoint_slice(obj: Any) -> SliceRecord:
    namespace, name, meta = _metadata(obj)
    service_name = _dict(meta.get("labels")).get(SERVICE_NAME_LABEL)
    if not isinstance(service_name, str) or not service_name:
        raise ObjectError(f"EndpointSlice {namespace}/{name} without {SERVICE_NAME_LABEL}")
    ports: dict[str, int] = {}
    for raw in _list(obj.get("ports")):
        port = _port_number(_dict(raw).get("port"))
        if port is not None:
            ports[str(_dict(raw).get("name") or "")] = port
    addresses = []
    for raw in _list(obj.get("endpoints")):
        endpoint = _dict(raw)
        conditions = _dict(endpoint.get("conditions"))
        target = _dict(endpoint.get("targetRef"))
        ready = _flag(conditions.get("ready"), True)
        pod = target.get("name") if target.get("kind", "Pod") == "Pod" else None
        for ip in _list(endpoint.get("addresses")):
            if isinstance(ip, str) and ip:
                addresses.append(EndpointAddress(
                    ip=ip,
                    pod_name=pod if isinstance(pod, str) else None,
                    ready=ready,
                    serving=_flag(conditions.get("serving"), ready),
                    terminating=_flag(conditions.get("terminating"), False),
                    node_name=endpoint.get("nodeName") if isinstance(
                        endpoint.get("nodeName"), str) else None,
                ))
    return SliceRecord(namespace, name, service_name, ports, tuple(addresses))


def parse_endpoints(obj: Any) -> SliceRecord:
    """A v1 Endpoints object (the fallback for clusters without EndpointSlices)."""
    namespace, name, _meta = _metadata(obj)
    ports: dict[str, int] = {}
    addresses = []
    for subset in _list(obj.get("subsets")):
        subset = _dict(subset)
        for raw in _list(subset.get("ports")):
            port = _port_number(_dict(raw).get("port"))
            if port is not None:
                ports[str(_dict(raw).get("name") or "")] = port
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for raw in _list(subset.get(key)):
                address = _dict(raw)
                ip = address.get("ip")
                target = _dict(address.get("targetRef"))
                if isinstance(ip, str) and ip:
                    pod = target.get("name")
                    addresses.append(EndpointAddress(
                        ip=ip,
                        pod_name=pod if isinstance(pod, str) else None,
                        ready=ready,
                        serving=ready,
                        terminating=False,
                        node_name=address.get("nodeName") if isinstance(
                            address.get("nodeName"), str) else None,
                    ))
    return SliceRecord(namespace, name, name, ports, tuple(addresses))
