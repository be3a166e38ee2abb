"""The simulated cluster: keeps Services, Pods, EndpointSlices and Endpoints consistent.

It plays the Kubernetes controllers (endpointslice, endpoints, kubelet readiness) against the
fake API server, starts a fake vLLM engine per pod on its own loopback IP, and a mini
kube-proxy plus a DNS entry per Service, so ``http://<svc>.<ns>.svc.<domain>:<port>`` really
reaches a ready pod.  Every method is synchronous: when it returns, the API server already
holds the new state (watchers see it as fast as their streams deliver).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from .apiserver import FakeApiServer
from .dns import ServiceDNS, ServiceProxy
from .engine import FakeEngine

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ENGINE_PORT = 8000
SLICE_CAPACITY = 100

# Pod IPs come from 127.64.0.0/10 and ClusterIPs from 127.32.0.0/11, one process-wide counter
# each, so several clusters in one process never collide; each process starts in its own
# 65536-address block (by PID), so concurrent test processes rarely do either.
_POD_NET = ipaddress.ip_network("127.64.0.0/10")
_SERVICE_NET = ipaddress.ip_network("127.32.0.0/11")
_BLOCK = 65536
_pod_counter = itertools.count(1 + (os.getpid() % 63) * _BLOCK)
_service_counter = itertools.count(1 + (os.getpid() % 31) * _BLOCK)
_counter_lock = threading.Lock()

#: ``factory(ip, port, model=..., **engine_options)`` -> an unstarted engine; the cluster calls
#: ``start()`` (which returns the engine) and ``stop()`` and reads ``ip``/``port``.
EngineFactory = Callable[..., FakeEngine]


_T = TypeVar("_T")


def _on_free_ip(net: ipaddress.IPv4Network | ipaddress.IPv6Network, counter: Any,
                start: Callable[[str], _T]) -> _T:
    """``start(ip)`` on the next address; one taken by another process is skipped."""
    for _ in range(64):
        ip = _next_ip(net, counter)
        try:
            return start(ip)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no free address found in {net}")


def _next_ip(net: ipaddress.IPv4Network | ipaddress.IPv6Network, counter: Any) -> str:
    with _counter_lock:
        n = next(counter)
    # skip .0 and .255 host parts so every address looks like an ordinary host
    while n % 256 in (0, 255):
        with _counter_lock:
            n = next(counter)
    return str(net.network_address + n)


@dataclass
class SimPod:
    """A pod: its engine, its IP and its readiness as the kubelet reports it."""

    name: str
    namespace: str
    service: str
    ip: str
    engine: FakeEngine
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    ready: bool = True
    terminating: bool = False
    node_name: str = "sim-node-1"


@dataclass
class SimService:
    """A Service and the pods its selector matches."""

    name: str
    namespace: str
    labels: dict[str, str]
    port: int
    port_name: str
    headless: bool
    cluster_ip: str | None
    model: str
    engine_options: dict[str, Any]
    pods: dict[str, SimPod] = field(default_factory=dict)
    proxy: ServiceProxy | None = None
    next_pod: int = 0
    slice_names: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def ready_pods(self) -> list[SimPod]:
        return [p for p in self.pods.values() if p.ready and not p.terminating]


class SimCluster:
    """A small Kubernetes for tests, benchmarks and the demo."""

    def __init__(
        self,
        *,
        cluster_domain: str = "cluster.local",
        engine_port: int = ENGINE_PORT,
        slice_capacity: int = SLICE_CAPACITY,
        api: FakeApiServer | None = None,
        bookmark_interval: float = 1.0,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.cluster_domain = cluster_domain
        self._engine_factory: EngineFactory = engine_factory or FakeEngine
        self.engine_port = engine_port
        self.slice_capacity = slice_capacity
        self.api = api or FakeApiServer(bookmark_interval=bookmark_interval)
        self.dns = ServiceDNS(cluster_domain)
        self._services: dict[str, SimService] = {}
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SimCluster:
        self.api.start()
        self.dns.install()
        self._started = True
        return self

    def stop(self) -> None:
        """Stop every engine, proxy and timer, uninstall DNS, stop the API server."""
        with self._lock:
            timers, self._timers = self._timers, []
            services = list(self._services.values())
        for timer in timers:
            timer.cancel()
        for service in services:
            for pod in service.pods.values():
                pod.engine.stop()
            if service.proxy is not None:
                service.proxy.stop()
        if self._started:
            self.dns.uninstall()
            self._started = False
        self.api.stop()

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` pointed at the fake API server."""
        return self.api.api_client()

    # -- services ----------------------------------------------------------------------------

    def add_service(
        self,
        name: str,
        namespace: str = "default",
        *,
        replicas: int = 2,
        labels: Mapping[str, str] | None = None,
        model: str = DEFAULT_MODEL,
        port: int = 80,
        port_name: str = "http",
        headless: bool = False,
        ready: bool = True,
        **engine_options: Any,
    ) -> SimService:
        """Create a Service with ``replicas`` pods (engines started, endpoints published).

        ``engine_options`` go to every :class:`FakeEngine` (``api_key``, ``lora_adapters``,
        ``dp_ranks``, ``legacy_names``...).
        """
        with self._lock:
            if f"{namespace}/{name}" in self._services:
                raise ValueError(f"service {namespace}/{name} exists")
            service = SimService(
                name=name, namespace=namespace, labels=dict(labels or {"app": "vllm"}),
                port=port, port_name=port_name, headless=headless, cluster_ip=None,
                model=model, engine_options=dict(engine_options),
            )
            if not headless:
                backends = self._backends_of(service)
                service.proxy = _on_free_ip(_SERVICE_NET, _service_counter,
                                            lambda ip: ServiceProxy(ip, port, backends).start())
                service.cluster_ip = cluster_ip = service.proxy.ip
                self.dns.register(namespace, name, lambda: [cluster_ip])
            else:
                self.dns.register(namespace, name,
                                  lambda: [p.ip for p in service.ready_pods()])
            self._services[service.key] = service
            self.api.put("services", self._service_object(service))
            for _ in range(replicas):
                self._new_pod(service, ready=ready)
            self._sync_endpoints(service)
            return service

    def delete_service(self, name: str, namespace: str = "default") -> None:
        """Delete the Service, its pods and its endpoints (as garbage collection would)."""
        with self._lock:
            service = self._services.pop(f"{namespace}/{name}")
            self.api.delete("services", namespace, name)
            for slice_name in service.slice_names:
                self.api.delete("endpointslices", namespace, slice_name)
            self.api.delete("endpoints", namespace, name)
            for pod in list(service.pods.values()):
                self.api.delete("pods", namespace, pod.name)
                pod.engine.stop()
            self.dns.unregister(namespace, name)
        if service.proxy is not None:
            service.proxy.stop()

    def set_service_labels(self, name: str, labels: Mapping[str, str],
                           namespace: str = "default") -> None:
        """Relabel the Service (e.g. so it leaves or rejoins a label selector)."""
        with self._lock:
            service = self.service(name, namespace)
            service.labels = dict(labels)
            self.api.put("services", self._service_object(service))

    def set_service_ports(self, name: str, ports: Sequence[tuple[str, int]],
                          namespace: str = "default") -> None:
        """Replace the Service's ports (name, port); the pod port stays the engine port."""
        with self._lock:
            service = self.service(name, namespace)
            obj = self._service_object(service)
            obj["spec"]["ports"] = [
                {"name": n, "port": p, "targetPort": self.engine_port, "protocol": "TCP"}
                for n, p in ports
            ]
            self.api.put("services", obj)

    def service(self, name: str, namespace: str = "default") -> SimService:
        with self._lock:
            return self._services[f"{namespace}/{name}"]

    def services(self) -> list[SimService]:
        with self._lock:
            return list(self._services.values())

    def url_of(self, name: str, namespace: str = "default") -> str:
        """The Service DNS URL discovery should report."""
        service = self.service(name, namespace)
        return f"http://{name}.{namespace}.svc.{self.cluster_domain}:{service.port}"

    # -- pods --------------------------------------------------------------------------------

    def pods(self, name: str, namespace: str = "default") -> list[SimPod]:
        with self._lock:
            return list(self.service(name, namespace).pods.values())

    def scale(self, name: str, replicas: int, namespace: str = "default") -> None:
        """Add pods or remove the newest ones (removed pods go away at once)."""
        with self._lock:
            service = self.service(name, namespace)
            live = [p for p in service.pods.values() if not p.terminating]
            for _ in range(replicas - len(live)):
                self._new_pod(service, ready=True)
            for pod in live[replicas:] if replicas < len(live) else []:
                self._remove_pod(service, pod)
            self._sync_endpoints(service)

    def add_pod(self, name: str, namespace: str = "default", *, ready: bool = True) -> SimPod:
        with self._lock:
            service = self.service(name, namespace)
            pod = self._new_pod(service, ready=ready)
            self._sync_endpoints(service)
            return pod

    def set_ready(self, pod: SimPod, ready: bool) -> None:
        """The kubelet's readiness probe result changed; the Service object is untouched."""
        with self._lock:
            pod.ready = ready
            service = self.service(pod.service, pod.namespace)
            self.api.put("pods", self._pod_object(pod))
            self._sync_endpoints(service)

    def terminate_pod(self, pod: SimPod, *, pre_stop: float = 0.0) -> None:
        """Graceful deletion begins: the endpoint shows terminating at once; the engine gets
        SIGTERM (uvicorn's shutdown, :meth:`FakeEngine.drain`) after the pod's ``preStop``
        sleep of ``pre_stop`` seconds, serving normally until then."""
        with self._lock:
            pod.terminating = True
            service = self.service(pod.service, pod.namespace)
            self.api.put("pods", self._pod_object(pod))
            self._sync_endpoints(service)
        if pre_stop > 0:
            self._after(pre_stop, self._sigterm, pod)
        else:
            self._sigterm(pod)

    def _sigterm(self, pod: SimPod) -> None:
        drain = getattr(pod.engine, "drain", None)
        if drain is not None:
            drain()

    def finish_termination(self, pod: SimPod) -> None:
        """The pod exited: its engine stops, the pod and its endpoint go away."""
        with self._lock:
            service = self.service(pod.service, pod.namespace)
            self._remove_pod(service, pod)
            self._sync_endpoints(service)

    def kill_pod(self, pod: SimPod, *, endpoint_delay: float = 0.0) -> None:
        """The pod dies without warning; its endpoint is removed ``endpoint_delay`` s later."""
        pod.engine.stop()
        if endpoint_delay <= 0:
            if pod.name in self.service(pod.service, pod.namespace).pods:
                self.finish_termination(pod)
            return
        self._after(endpoint_delay, self._finish_if_present, pod)

    def _after(self, seconds: float, action: Callable[[SimPod], None], pod: SimPod) -> None:
        """Run ``action(pod)`` in ``seconds`` on a timer that :meth:`stop` cancels."""
        timer = threading.Timer(seconds, action, args=(pod,))
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()]  # forget fired ones
            self._timers.append(timer)
        timer.start()

    def reschedule(self, pod: SimPod) -> SimPod:
        """Delete the pod and start a replacement with a new IP (ready at once)."""
        with self._lock:
            service = self.service(pod.service, pod.namespace)
            self._remove_pod(service, pod)
            replacement = self._new_pod(service, ready=True)
            self._sync_endpoints(service)
            return replacement

    # -- controllers -------------------------------------------------------------------------

    def _finish_if_present(self, pod: SimPod) -> None:
        with self._lock:
            service = self._services.get(f"{pod.namespace}/{pod.service}")
            if service is None or pod.name not in service.pods:
                return
            self._remove_pod(service, pod)
            self._sync_endpoints(service)

    def _new_pod(self, service: SimService, *, ready: bool) -> SimPod:
        name = f"{service.name}-{service.next_pod}-{uuid.uuid4().hex[:5]}"
        service.next_pod += 1
        engine = _on_free_ip(_POD_NET, _pod_counter, lambda ip: self._engine_factory(
            ip, self.engine_port, model=service.model, **service.engine_options).start())
        pod = SimPod(name=name, namespace=service.namespace, service=service.name, ip=engine.ip,
                     engine=engine, ready=ready)
        service.pods[name] = pod
        self.api.put("pods", self._pod_object(pod))
        return pod

    def _remove_pod(self, service: SimService, pod: SimPod) -> None:
        service.pods.pop(pod.name, None)
        pod.engine.stop()
        self.api.delete("pods", pod.namespace, pod.name)

    def _backends_of(self, service: SimService) -> Any:
        port = self.engine_port

        def backends() -> list[tuple[str, int]]:
            with self._lock:
                return [(p.ip, port) for p in service.ready_pods()]

        return backends

    def _sync_endpoints(self, service: SimService) -> None:
        """The endpointslice and endpoints controllers: publish what changed, nothing else."""
        pods = sorted(service.pods.values(), key=lambda p: _pod_index(p.name))
        chunks = [pods[i:i + self.slice_capacity]
                  for i in range(0, len(pods), self.slice_capacity)] or [[]]
        names = [f"{service.name}-{chr(ord('a') + i) if i < 26 else i}"
                 for i in range(len(chunks))]
        for slice_name, chunk in zip(names, chunks, strict=True):
            wanted = self._slice_object(service, slice_name, chunk)
            current = self.api.get("endpointslices", service.namespace, slice_name)
            if current is None or _content(current) != _content(wanted):
                self.api.put("endpointslices", wanted)
        for stale in service.slice_names[len(names):]:
            self.api.delete("endpointslices", service.namespace, stale)
        service.slice_names = names
        endpoints = self._endpoints_object(service, pods)
        current = self.api.get("endpoints", service.namespace, service.name)
        if current is None or _content(current) != _content(endpoints):
            self.api.put("endpoints", endpoints)

    # -- object builders ---------------------------------------------------------------------

    def _service_object(self, service: SimService) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service.name, "namespace": service.namespace,
                         "labels": dict(service.labels)},
            "spec": {
                "selector": {"app": service.name, "model": _label_value(service.model)},
                "ports": [{"name": service.port_name, "port": service.port,
                           "targetPort": self.engine_port, "protocol": "TCP"}],
                "clusterIP": service.cluster_ip or "None",
                "type": "ClusterIP",
            },
        }

    def _pod_object(self, pod: SimPod) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace,
                                    "uid": pod.uid, "labels": {"app": pod.service}}
        if pod.terminating:
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"nodeName": pod.node_name},
            "status": {
                "phase": "Running", "podIP": pod.ip,
                "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
            },
        }

    def _slice_object(self, service: SimService, name: str,
                      pods: Sequence[SimPod]) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": name, "namespace": service.namespace,
                "labels": {"kubernetes.io/service-name": service.name,
                           "endpointslice.kubernetes.io/managed-by": "sim"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": [p.ip],
                    "conditions": {"ready": p.ready and not p.terminating,
                                   "serving": p.ready, "terminating": p.terminating},
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace,
                                  "uid": p.uid},
                    "nodeName": p.node_name,
                }
                for p in pods
            ],
            "ports": [{"name": service.port_name, "port": self.engine_port, "protocol": "TCP"}],
        }

    def _endpoints_object(self, service: SimService, pods: Sequence[SimPod]) -> dict[str, Any]:
        def address(p: SimPod) -> dict[str, Any]:
            return {"ip": p.ip, "nodeName": p.node_name,
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace}}

        ready = [address(p) for p in pods if p.ready and not p.terminating]
        not_ready = [address(p) for p in pods if not (p.ready and not p.terminating)]
        subsets = []
        if ready or not_ready:
            subset: dict[str, Any] = {
                "ports": [{"name": service.port_name, "port": self.engine_port,
                           "protocol": "TCP"}],
            }
            if ready:
                subset["addresses"] = ready
            if not_ready:
                subset["notReadyAddresses"] = not_ready
            subsets.append(subset)
        return {
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": service.name, "namespace": service.namespace,
                         "labels": dict(service.labels)},
            "subsets": subsets,
        }


def _content(obj: Mapping[str, Any]) -> Any:
    """An object without server-set metadata, to tell real changes from no-ops."""
    meta = {k: v for k, v in obj.get("metadata", {}).items()
            if k not in ("resourceVersion", "uid", "creationTimestamp", "generation")}
    rest = {k: v for k, v in obj.items() if k != "metadata"}
    if rest.get("endpoints") is None and "endpoints" in rest:
        rest["endpoints"] = []
    return meta, rest


def _pod_index(name: str) -> int:
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def _label_value(text: str) -> str:
    """Kubernetes label values: alphanumerics, '-', '_', '.'; at most 63 characters."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return cleaned.strip("-_.")[:63]
