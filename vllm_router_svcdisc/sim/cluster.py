"""The simulated cluster: keeps Services, Pods, EndpointSlices and Endpoints consistent.

It plays the Kubernetes controllers (endpointslice, endpoints, kubelet readiness) against the
fake API server, starts a fake vLLM engine per pod on its own loopback IP, and a mini
kube-proxy plus a DNS entry per Service, so ``http://<svc>.<ns>.svc.<domain>:<port>`` really
reaches a ready pod.  Services select pods by labels, as in Kubernetes: a pod created for one
Service (its *owner*, which scales and deletes it) is also behind every other Service whose
selector its labels match.  Every method is synchronous: when it returns, the API server
already holds the new state (watchers see it as fast as their streams deliver).

Pods run on nodes (spread over the cluster's nodes, or over a Service's own ``nodes``); a node
can die (:meth:`SimCluster.kill_node`: its engines stop answering at the network level while the
node lifecycle controller keeps their endpoints ready for the node grace period) and come back
(:meth:`SimCluster.revive_node`).

Topologies beyond the plain one (each as the real controllers write it): headless Services,
``publishNotReadyAddresses``, dual-stack slice pairs, endpoints with several addresses,
hostNetwork pods sharing the node's IP on different ports, a named ``targetPort`` resolving
to a different container port per pod (one slice per distinct port mapping, one v1 Endpoints
subset per distinct port set), several Services over the same pods, and headless Services
without ports (a slice port entry with neither name nor number: "all ports").
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
from .dns import Backend, ServiceDNS, ServiceProxy
from .engine import FakeEngine

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ENGINE_PORT = 8000
SLICE_CAPACITY = 100
DEFAULT_NODES = ("sim-node-1", "sim-node-2", "sim-node-3")
#: kube-controller-manager's ``--node-monitor-grace-period`` since Kubernetes 1.32 (40 s before)
NODE_MONITOR_GRACE_PERIOD = 50.0

# Pod IPs come from 127.64.0.0/10 and ClusterIPs from 127.32.0.0/11, one process-wide counter
# each, so several clusters in one process never collide; each process starts in its own
# 65536-address block (by PID), so concurrent test processes rarely do either.
_POD_NET = ipaddress.ip_network("127.64.0.0/10")
_SERVICE_NET = ipaddress.ip_network("127.32.0.0/11")
# Second addresses nobody can reach: IPv6 from the unique-local fd00::/8 (loopback has only
# ::1), extra IPv4 addresses of multi-address endpoints from TEST-NET-2 (RFC 5737).
_POD_NET6 = ipaddress.ip_network("fd00:5e::/64")
_EXTRA_NET = ipaddress.ip_network("198.51.100.0/24")
_BLOCK = 65536
_pod_counter = itertools.count(1 + (os.getpid() % 63) * _BLOCK)
_service_counter = itertools.count(1 + (os.getpid() % 31) * _BLOCK)
_pod6_counter = itertools.count(1)
_extra_counter = itertools.count(1)
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
    """A pod: its engine, its IP(s), its labels and its readiness as the kubelet reports it.

    ``service`` names the Service that created it (its owner); ``port`` is its container port
    (what a named ``targetPort`` resolves to); ``node_name`` is the node it runs on.
    """

    name: str
    namespace: str
    service: str
    ip: str
    engine: FakeEngine
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    ready: bool = True
    terminating: bool = False
    node_name: str = "sim-node-1"
    labels: dict[str, str] = field(default_factory=dict)
    port: int = ENGINE_PORT
    ipv6: str | None = None
    extra_addresses: tuple[str, ...] = ()
    host_network: bool = False

    @property
    def node(self) -> str:
        return self.node_name


@dataclass
class _Node:
    """A node as the node lifecycle controller tracks it."""

    name: str
    alive: bool = True
    timer: threading.Timer | None = None  # MarkPodsNotReady after the grace period
    marked: dict[tuple[str, str], bool] = field(default_factory=dict)  # pod -> its readiness


@dataclass
class SimService:
    """A Service and the pods its selector matches (``pods``, kept up to date by the cluster).

    ``target_port`` is the Service port's ``targetPort``: a number, or a name that resolves to
    each pod's own container port.
    """

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
    selector: dict[str, str] = field(default_factory=dict)
    target_port: int | str = ENGINE_PORT
    publish_not_ready: bool = False
    dual_stack: bool = False
    portless: bool = False
    pod_ports: tuple[int, ...] = ()
    host_network: bool = False
    extra_addresses: int = 0
    node_ip: str | None = None  # hostNetwork pods: the one node IP they all share
    nodes: tuple[str, ...] = ()  # where its pods may run (empty: every node of the cluster)
    ordinal: int = 0  # creation order: where the round-robin over the nodes starts

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def ready_pods(self) -> list[SimPod]:
        return [p for p in self.pods.values() if p.ready and not p.terminating]

    def selects(self, pod: SimPod) -> bool:
        return (pod.namespace == self.namespace and bool(self.selector)
                and all(pod.labels.get(k) == v for k, v in self.selector.items()))

    def pod_port(self, pod: SimPod) -> int:
        """The Service's ``targetPort`` for ``pod`` (a name resolves to its container port)."""
        return self.target_port if isinstance(self.target_port, int) else pod.port

    def endpoint_conditions(self, pod: SimPod) -> dict[str, bool]:
        """What the endpointslice controller writes: with ``publishNotReadyAddresses`` every
        pod is ``ready``; ``serving`` is always the pod's readiness."""
        ready = self.publish_not_ready or (pod.ready and not pod.terminating)
        return {"ready": ready, "serving": pod.ready, "terminating": pod.terminating}


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
        nodes: Sequence[str] = DEFAULT_NODES,
        node_grace: float = NODE_MONITOR_GRACE_PERIOD,
    ) -> None:
        self.cluster_domain = cluster_domain
        self._engine_factory: EngineFactory = engine_factory or FakeEngine
        self.engine_port = engine_port
        self.slice_capacity = slice_capacity
        self.api = api or FakeApiServer(bookmark_interval=bookmark_interval)
        self.dns = ServiceDNS(cluster_domain)
        self._services: dict[str, SimService] = {}
        self._pods: dict[tuple[str, str], SimPod] = {}
        # label indexes, so selection costs the matching objects, not the whole cluster:
        # pods by each (namespace, key, value); Services by the first item of their selector
        self._pods_by_label: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
        self._services_by_label: dict[tuple[str, str, str], set[str]] = {}
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self._started = False
        self._nodes: dict[str, _Node] = {name: _Node(name) for name in nodes or DEFAULT_NODES}
        self.node_grace = node_grace
        self._service_ordinal = itertools.count()

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
            pods = list(self._pods.values())
        for timer in timers:
            timer.cancel()
        for timer in timers:
            if timer is not threading.current_thread():
                timer.join(timeout=2.0)
        for pod in pods:
            pod.engine.stop()
        for service in services:
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
        selector: Mapping[str, str] | None = None,
        publish_not_ready: bool = False,
        dual_stack: bool = False,
        pod_ports: Sequence[int] = (),
        host_network: bool = False,
        extra_addresses: int = 0,
        portless: bool = False,
        nodes: Sequence[str] = (),
        **engine_options: Any,
    ) -> SimService:
        """Create a Service with ``replicas`` pods (engines started, endpoints published).

        ``selector`` (default ``{"app": name, "model": <model>}``, the labels its own pods get)
        may match pods of other Services: they are behind this one too.
        ``publish_not_ready`` sets ``publishNotReadyAddresses``; ``dual_stack`` gives the
        Service ``ipFamilies: [IPv4, IPv6]`` and each pod an (unreachable) IPv6 address, so
        the controller writes an IPv4 and an IPv6 slice; ``pod_ports`` makes ``targetPort``
        the port name and gives the new pods these container ports in turn (one slice per
        distinct port); ``host_network`` puts every new pod on one shared node IP (needs
        distinct ``pod_ports``); ``extra_addresses`` lists that many more (unreachable)
        addresses per endpoint; ``portless`` is a headless Service without ports.
        ``nodes`` are where its pods run (round-robin; default every node of the cluster, the
        round-robin starting one node further for each Service); unknown names become nodes.
        ``engine_options`` go to every :class:`FakeEngine` (``api_key``, ``lora_adapters``,
        ``dp_ranks``, ``legacy_names``...).
        """
        if host_network and len(set(pod_ports)) < max(1, replicas):
            raise ValueError("hostNetwork pods share one IP: give each a port (pod_ports)")
        if portless and not headless:
            raise ValueError("only a headless Service may have no ports")
        with self._lock:
            if f"{namespace}/{name}" in self._services:
                raise ValueError(f"service {namespace}/{name} exists")
            service = SimService(
                name=name, namespace=namespace, labels=dict(labels or {"app": "vllm"}),
                port=port, port_name=port_name, headless=headless, cluster_ip=None,
                model=model, engine_options=dict(engine_options),
                selector=dict(selector or {"app": name, "model": _label_value(model)}),
                target_port=port_name if pod_ports else self.engine_port,
                publish_not_ready=publish_not_ready, dual_stack=dual_stack, portless=portless,
                pod_ports=tuple(pod_ports), host_network=host_network,
                extra_addresses=extra_addresses, nodes=tuple(nodes),
                ordinal=next(self._service_ordinal),
            )
            for node in nodes:
                self._nodes.setdefault(node, _Node(node))
            if not headless:
                backends = self._backends_of(service)
                service.proxy = _on_free_ip(_SERVICE_NET, _service_counter,
                                            lambda ip: ServiceProxy(ip, port, backends).start())
                service.cluster_ip = cluster_ip = service.proxy.ip
                self.dns.register(namespace, name, lambda: [cluster_ip])
            else:
                self.dns.register(namespace, name, self._headless_addresses(service))
            self._services[service.key] = service
            self._services_by_label.setdefault(self._service_index_key(service),
                                               set()).add(service.key)
            service.pods = {p.name: p for p in self._candidates(service) if service.selects(p)}
            self.api.put("services", self._service_object(service))
            for _ in range(replicas):
                self._new_pod(service, ready=ready)
            self._sync_endpoints(service)
            return service

    def delete_service(self, name: str, namespace: str = "default") -> None:
        """Delete the Service, its endpoints and the pods it created (as garbage collection
        of their owner would); other Services selecting those pods lose them."""
        with self._lock:
            service = self._services.pop(f"{namespace}/{name}")
            self._services_by_label.get(self._service_index_key(service),
                                        set()).discard(service.key)
            self.api.delete("services", namespace, name)
            for slice_name in service.slice_names:
                self.api.delete("endpointslices", namespace, slice_name)
            self.api.delete("endpoints", namespace, name)
            owned = [p for p in service.pods.values() if p.service == name]
            for pod in owned:
                self._remove_pod(pod)
            self.dns.unregister(namespace, name)
            for other in self._services_of(*owned):
                self._sync_endpoints(other)
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

    def set_service_selector(self, name: str, selector: Mapping[str, str],
                             namespace: str = "default") -> None:
        """Replace the Service's selector: the pods behind it are those it matches now (the
        pods it created live on; it still owns them)."""
        with self._lock:
            service = self.service(name, namespace)
            self._services_by_label.get(self._service_index_key(service),
                                        set()).discard(service.key)
            service.selector = dict(selector)
            self._services_by_label.setdefault(self._service_index_key(service),
                                               set()).add(service.key)
            service.pods = {p.name: p for p in self._candidates(service) if service.selects(p)}
            self.api.put("services", self._service_object(service))
            self._sync_endpoints(service)

    def service(self, name: str, namespace: str = "default") -> SimService:
        with self._lock:
            return self._services[f"{namespace}/{name}"]

    def services(self) -> list[SimService]:
        with self._lock:
            return list(self._services.values())

    def url_of(self, name: str, namespace: str = "default") -> str:
        """The Service DNS URL discovery should report: the Service port, or for a headless
        Service (no port translation) the pods' target port."""
        service = self.service(name, namespace)
        port = service.port
        if service.headless:
            port = (service.target_port if isinstance(service.target_port, int)
                    else service.pod_ports[0])
        return f"http://{name}.{namespace}.svc.{self.cluster_domain}:{port}"

    # -- pods --------------------------------------------------------------------------------

    def pods(self, name: str, namespace: str = "default") -> list[SimPod]:
        """The pods the Service selects (its own and any other whose labels match)."""
        with self._lock:
            return list(self.service(name, namespace).pods.values())

    def scale(self, name: str, replicas: int, namespace: str = "default") -> None:
        """Add pods or remove the newest of the pods this Service created (at once)."""
        with self._lock:
            service = self.service(name, namespace)
            live = [p for p in service.pods.values() if not p.terminating and p.service == name]
            for _ in range(replicas - len(live)):
                self._new_pod(service, ready=True)
            removed = live[replicas:] if replicas < len(live) else []
            others = self._services_of(*removed)
            for pod in removed:
                self._remove_pod(pod)
            for affected in {service.key: service, **{s.key: s for s in others}}.values():
                self._sync_endpoints(affected)

    def add_pod(self, name: str, namespace: str = "default", *, ready: bool = True,
                node: str | None = None) -> SimPod:
        """One more pod for the Service, on ``node`` (default: the next live node in turn)."""
        with self._lock:
            service = self.service(name, namespace)
            pod = self._new_pod(service, ready=ready, node=node)
            self._sync_pod(pod)
            return pod

    def set_ready(self, pod: SimPod, ready: bool) -> None:
        """The kubelet's readiness probe result changed; the Service object is untouched."""
        with self._lock:
            pod.ready = ready
            self.api.put("pods", self._pod_object(pod))
            self._sync_pod(pod)

    def terminate_pod(self, pod: SimPod, *, pre_stop: float = 0.0) -> None:
        """Graceful deletion begins: the endpoint shows terminating at once; the engine gets
        SIGTERM (uvicorn's shutdown, :meth:`FakeEngine.drain`) after the pod's ``preStop``
        sleep of ``pre_stop`` seconds, serving normally until then."""
        with self._lock:
            pod.terminating = True
            self.api.put("pods", self._pod_object(pod))
            self._sync_pod(pod)
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
            services = self._services_of(pod)
            self._remove_pod(pod)
            for service in services:
                self._sync_endpoints(service)

    def kill_pod(self, pod: SimPod, *, endpoint_delay: float = 0.0) -> None:
        """The pod dies without warning; its endpoint is removed ``endpoint_delay`` s later."""
        pod.engine.stop()
        if endpoint_delay <= 0:
            self._finish_if_present(pod)
            return
        self._after(endpoint_delay, self._finish_if_present, pod)

    def _after(self, seconds: float, action: Callable[..., None], *args: Any) -> threading.Timer:
        """Run ``action(*args)`` in ``seconds`` on a timer that :meth:`stop` cancels."""
        timer = threading.Timer(seconds, action, args=args)
        timer.name = f"sim-timer-{getattr(action, '__name__', 'action')}"
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()]  # forget fired ones
            self._timers.append(timer)
        timer.start()
        return timer

    # -- nodes -------------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        with self._lock:
            return list(self._nodes)

    def node_alive(self, name: str) -> bool:
        with self._lock:
            return self._nodes[name].alive

    def pods_on(self, node: str) -> list[SimPod]:
        """The pods running on ``node``."""
        with self._lock:
            return [p for p in self._pods.values() if p.node_name == node]

    def kill_node(self, name: str, grace: float | None = None) -> list[SimPod]:
        """The node dies (power, kernel, network partition); returns its pods.

        At once every engine on it stops answering at the network level
        (:meth:`FakeEngine.cut_network`: new connections time out, open ones get nothing back),
        while the EndpointSlices keep the pods as they were.  After ``grace`` seconds (default
        ``node_grace``, 50 s: ``--node-monitor-grace-period``) the node lifecycle controller
        marks the pods not ready (``Ready=False``: ``ready`` and ``serving`` false), as
        ``MarkPodsNotReady`` does.  New pods are not placed on a dead node.
        """
        with self._lock:
            node = self._nodes[name]
            if not node.alive:
                return self.pods_on(name)
            node.alive = False
            pods = self.pods_on(name)
        for pod in pods:
            cut = getattr(pod.engine, "cut_network", None)
            if cut is None:
                raise TypeError(f"{type(pod.engine).__name__} cannot be cut off the network")
            cut()
        delay = self.node_grace if grace is None else grace
        with self._lock:
            if node.alive:  # revived meanwhile
                return pods
            node.timer = self._after(max(0.0, delay), self._mark_pods_not_ready, name)
        return pods

    def revive_node(self, name: str) -> list[SimPod]:
        """The node is back: its engines answer again (connections held meanwhile carry on) and
        pods the controller had marked not ready get their readiness back (the kubelet reports
        it again); a pending grace-period timer is cancelled.  Returns the node's pods."""
        with self._lock:
            node = self._nodes[name]
            if node.alive:
                return self.pods_on(name)
            node.alive = True
            timer, node.timer = node.timer, None
            marked, node.marked = node.marked, {}
            pods = self.pods_on(name)
        if timer is not None:
            timer.cancel()
        for pod in pods:
            restore = getattr(pod.engine, "restore_network", None)
            if restore is not None:
                restore()
        with self._lock:
            for pod in pods:
                key = (pod.namespace, pod.name)
                if key in marked and self._pods.get(key) is pod:
                    pod.ready = marked[key]
                    self.api.put("pods", self._pod_object(pod))
                    self._sync_pod(pod)
        return pods

    def _mark_pods_not_ready(self, name: str) -> None:
        """The node lifecycle controller gives up on the node: its pods become not ready."""
        with self._lock:
            node = self._nodes[name]
            if node.alive:
                return
            node.timer = None
            for pod in self.pods_on(name):
                key = (pod.namespace, pod.name)
                node.marked.setdefault(key, pod.ready)
                if pod.ready:
                    pod.ready = False
                    self.api.put("pods", self._pod_object(pod))
                    self._sync_pod(pod)

    def _place(self, owner: SimService, index: int) -> str:
        """The node for the owner's ``index``-th pod: round-robin over its nodes (or the
        cluster's, starting one further per Service), skipping dead ones."""
        candidates = list(owner.nodes) or list(self._nodes)
        start = 0 if owner.nodes else owner.ordinal
        if owner.host_network:  # they share the node's IP: one node
            return candidates[start % len(candidates)]
        live = [n for n in candidates if self._nodes[n].alive] or candidates
        return live[(start + index) % len(live)]

    def reschedule(self, pod: SimPod, *, keep_ip: bool = False) -> SimPod:
        """Delete the pod and start a replacement (ready at once) with a new IP, or with
        ``keep_ip`` the freed one: IPAM plugins hand freed addresses out again (host-local
        after it wraps around its range, others sooner), so a new pod may answer on the
        address of one that was a ready endpoint seconds ago."""
        with self._lock:
            owner = self.service(pod.service, pod.namespace)
            services = self._services_of(pod)
            self._remove_pod(pod)
            replacement = self._new_pod(owner, ready=True, ip=pod.ip if keep_ip else None)
            for service in {s.key: s for s in [*services, *self._services_of(replacement)]
                            }.values():
                self._sync_endpoints(service)
            return replacement

    # -- controllers -------------------------------------------------------------------------

    def _finish_if_present(self, pod: SimPod) -> None:
        with self._lock:
            if self._pods.get((pod.namespace, pod.name)) is not pod:
                return
            self.finish_termination(pod)

    def _service_index_key(self, service: SimService) -> tuple[str, str, str]:
        first = min(service.selector.items(), default=("", ""))
        return (service.namespace, *first)

    def _candidates(self, service: SimService) -> list[SimPod]:
        key = self._service_index_key(service)
        return [self._pods[k] for k in self._pods_by_label.get(key, ())]

    def _services_of(self, *pods: SimPod) -> list[SimService]:
        """The Services whose selector matches any of ``pods`` (through the label index)."""
        found: dict[str, SimService] = {}
        for pod in pods:
            for label in pod.labels.items():
                for key in self._services_by_label.get((pod.namespace, *label), ()):
                    service = self._services[key]
                    if service.selects(pod):
                        found[key] = service
        return list(found.values())

    def _sync_pod(self, pod: SimPod) -> None:
        for service in self._services_of(pod):
            self._sync_endpoints(service)

    def _new_pod(self, owner: SimService, *, ready: bool, node: str | None = None,
                 ip: str | None = None) -> SimPod:
        index = owner.next_pod
        name = f"{owner.name}-{index}-{uuid.uuid4().hex[:5]}"
        owner.next_pod += 1
        port = owner.pod_ports[index % len(owner.pod_ports)] if owner.pod_ports \
            else self.engine_port

        def start(ip: str) -> FakeEngine:
            return self._engine_factory(ip, port, model=owner.model,
                                        **owner.engine_options).start()

        if owner.host_network and owner.node_ip is not None:
            engine = start(owner.node_ip)
        elif ip is not None:
            engine = start(ip)
        else:
            engine = _on_free_ip(_POD_NET, _pod_counter, start)
            if owner.host_network:
                owner.node_ip = engine.ip
        node_name = node or self._place(owner, index)
        self._nodes.setdefault(node_name, _Node(node_name))
        cut = getattr(engine, "cut_network", None)
        if not self._nodes[node_name].alive and cut is not None:
            cut()
        pod = SimPod(name=name, namespace=owner.namespace, service=owner.name, ip=engine.ip,
                     engine=engine, ready=ready, labels=dict(owner.selector), port=port,
                     host_network=owner.host_network, node_name=node_name)
        if owner.dual_stack:
            pod.ipv6 = _next_ip(_POD_NET6, _pod6_counter)
        pod.extra_addresses = tuple(_next_ip(_EXTRA_NET, _extra_counter)
                                    for _ in range(owner.extra_addresses))
        self._pods[(pod.namespace, name)] = pod
        for label in pod.labels.items():
            self._pods_by_label.setdefault((pod.namespace, *label), set()).add(
                (pod.namespace, name))
        for service in self._services_of(pod):
            service.pods[name] = pod
        self.api.put("pods", self._pod_object(pod))
        return pod

    def _remove_pod(self, pod: SimPod) -> None:
        for service in self._services_of(pod):
            service.pods.pop(pod.name, None)
        self._pods.pop((pod.namespace, pod.name), None)
        for label in pod.labels.items():
            self._pods_by_label.get((pod.namespace, *label), set()).discard(
                (pod.namespace, pod.name))
        pod.engine.stop()
        self.api.delete("pods", pod.namespace, pod.name)

    def _backends_of(self, service: SimService) -> Any:
        """What kube-proxy reads from the slices: each endpoint's address, port, conditions."""

        def backends() -> list[Backend]:
            with self._lock:
                return [Backend(p.ip, service.pod_port(p), **service.endpoint_conditions(p))
                        for p in service.pods.values()]

        return backends

    def _headless_addresses(self, service: SimService) -> Callable[[], list[str]]:
        """Cluster DNS for a headless Service: the IPv4 address of every endpoint the slices
        mark ready (with ``publishNotReadyAddresses``, every pod)."""

        def addresses() -> list[str]:
            with self._lock:
                return list(dict.fromkeys(
                    p.ip for p in service.pods.values()
                    if service.endpoint_conditions(p)["ready"]))

        return addresses

    def _sync_endpoints(self, service: SimService) -> None:
        """The endpointslice and endpoints controllers: publish what changed, nothing else.

        Slices hold one address family and one port mapping each, at most ``slice_capacity``
        endpoints; the default group keeps the plain names ``<svc>-a``, ``<svc>-b``...
        """
        pods = sorted(service.pods.values(), key=lambda p: (p.service, _pod_index(p.name)))
        groups: dict[tuple[str, int], list[SimPod]] = {}
        for family in ("IPv4", "IPv6") if service.dual_stack else ("IPv4",):
            for pod in pods:
                if family == "IPv4" or pod.ipv6 is not None:
                    groups.setdefault((family, service.pod_port(pod)), []).append(pod)
        groups = groups or {("IPv4", self.engine_port): []}
        names: list[str] = []
        for (family, port), members in sorted(groups.items(),
                                               key=lambda g: (g[0][0], g[0][1] != self.engine_port,
                                                              g[0][1])):
            prefix = service.name + ("-v6" if family == "IPv6" else "") + (
                "" if port == self.engine_port else f"-p{port}")
            chunks = [members[i:i + self.slice_capacity]
                      for i in range(0, len(members), self.slice_capacity)] or [[]]
            for i, chunk in enumerate(chunks):
                slice_name = f"{prefix}-{chr(ord('a') + i) if i < 26 else i}"
                names.append(slice_name)
                wanted = self._slice_object(service, slice_name, chunk, family, port)
                current = self.api.get("endpointslices", service.namespace, slice_name)
                if current is None or _content(current) != _content(wanted):
                    self.api.put("endpointslices", wanted)
        for stale in set(service.slice_names) - set(names):
            self.api.delete("endpointslices", service.namespace, stale)
        service.slice_names = names
        endpoints = self._endpoints_object(service, pods)
        current = self.api.get("endpoints", service.namespace, service.name)
        if current is None or _content(current) != _content(endpoints):
            self.api.put("endpoints", endpoints)

    # -- object builders ---------------------------------------------------------------------

    def _service_object(self, service: SimService) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "selector": dict(service.selector),
            "ports": [] if service.portless else [
                {"name": service.port_name, "port": service.port,
                 "targetPort": service.target_port, "protocol": "TCP"}],
            "clusterIP": service.cluster_ip or "None",
            "type": "ClusterIP",
            "ipFamilies": ["IPv4", "IPv6"] if service.dual_stack else ["IPv4"],
            "ipFamilyPolicy": "RequireDualStack" if service.dual_stack else "SingleStack",
        }
        if service.publish_not_ready:
            spec["publishNotReadyAddresses"] = True
        return {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service.name, "namespace": service.namespace,
                         "labels": dict(service.labels)},
            "spec": spec,
        }

    def _pod_object(self, pod: SimPod) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace,
                                    "uid": pod.uid, "labels": dict(pod.labels)}
        if pod.terminating:
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        ips = [pod.ip, *([pod.ipv6] if pod.ipv6 else [])]
        return {
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"nodeName": pod.node_name, "hostNetwork": pod.host_network,
                     "containers": [{"name": "vllm", "ports": [
                         {"name": "http", "containerPort": pod.port}]}]},
            "status": {
                "phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": ip} for ip in ips],
                "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
            },
        }

    def _slice_object(self, service: SimService, name: str, pods: Sequence[SimPod],
                      family: str, port: int) -> dict[str, Any]:
        def addresses(p: SimPod) -> list[str]:
            if family == "IPv6":
                return [p.ipv6] if p.ipv6 else []
            return [p.ip, *p.extra_addresses]

        return {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": name, "namespace": service.namespace,
                "labels": {"kubernetes.io/service-name": service.name,
                           "endpointslice.kubernetes.io/managed-by": "sim"},
            },
            "addressType": family,
            "endpoints": [
                {
                    "addresses": addresses(p),
                    "conditions": service.endpoint_conditions(p),
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace,
                                  "uid": p.uid},
                    "nodeName": p.node_name,
                }
                for p in pods
            ],
            "ports": ([{"name": None, "port": None, "protocol": "TCP"}] if service.portless
                      else [{"name": service.port_name, "port": port, "protocol": "TCP"}]),
        }

    def _endpoints_object(self, service: SimService, pods: Sequence[SimPod]) -> dict[str, Any]:
        """The endpoints controller: one subset per distinct port; with
        ``publishNotReadyAddresses`` every pod is in ``addresses``, without it terminating
        pods are left out."""

        def address(p: SimPod) -> dict[str, Any]:
            return {"ip": p.ip, "nodeName": p.node_name,
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace}}

        by_port: dict[int, list[SimPod]] = {}
        for pod in pods:
            if pod.terminating and not service.publish_not_ready:
                continue  # the endpoints controller drops terminating pods (not its slices)
            by_port.setdefault(service.pod_port(pod), []).append(pod)
        subsets = []
        for port, members in sorted(by_port.items()):
            ready = [address(p) for p in members if service.endpoint_conditions(p)["ready"]]
            not_ready = [address(p) for p in members
                         if not service.endpoint_conditions(p)["ready"]]
            subset: dict[str, Any] = {
                "ports": [] if service.portless else [
                    {"name": service.port_name, "port": port, "protocol": "TCP"}],
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
