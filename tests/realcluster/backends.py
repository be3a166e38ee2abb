"""One scenario, two backends: the simulator and the real control plane behind one interface.

A scenario drives a backend through a few kubelet- and user-level operations (create a Service
with pods, flip readiness, terminate, scale, delete) and compares what discovery reports with
the backend's own record of the truth (``ready_ips``). ``SimBackend`` wraps
:class:`~vllm_router_svcdisc.sim.cluster.SimCluster`; ``RealBackend`` writes the same objects to
a real kube-apiserver and plays the kubelet (pod status through the ``status`` subresource,
graceful and forced deletion) while the real EndpointSlice controller writes the slices.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from unittest import mock

import kubernetes.client
import yaml
from kubernetes.client import CoreV1Api, DiscoveryV1Api, RbacAuthorizationV1Api
from kubernetes.config import incluster_config

from tests.realcluster.controlplane import APISERVER_PORT, HOST, POD_CIDR, REPO, ControlPlane
from vllm_router_svcdisc.discovery import load_api_client
from vllm_router_svcdisc.sim.cluster import (
    DEFAULT_MODEL,
    ENGINE_PORT,
    EngineFactory,
    SimCluster,
    SimPod,
)
from vllm_router_svcdisc.sim.dns import ServiceDNS
from vllm_router_svcdisc.sim.engine import FakeEngine

CLUSTER_DOMAIN = "cluster.local"
RBAC_YAML = REPO / "deploy" / "rbac.yaml"
#: Nodes the pods are spread over, round-robin per Service (only objects: no kubelet runs, and
#: no node lifecycle controller, so a "dead" node's pods stay Ready).
NODES = ("realcluster-node-1", "realcluster-node-2", "realcluster-node-3")
NODE = NODES[0]


class Backend(Protocol):
    """What every scenario may do to a cluster, and the truth it compares discovery with."""

    name: str
    namespace: str

    def router_client(self) -> Any: ...

    def add_service(self, name: str, *, replicas: int = 2, headless: bool = False,
                    publish_not_ready: bool = False,
                    selector: Mapping[str, str] | None = None) -> None: ...

    def delete_service(self, name: str) -> None: ...

    def set_service_ports(self, name: str, ports: Sequence[tuple[str, int]]) -> None: ...

    def set_selector(self, name: str, selector: Mapping[str, str]) -> None: ...

    def pods(self, service: str) -> list[str]: ...

    def pod_ip(self, pod: str) -> str: ...

    def selector_of(self, service: str) -> dict[str, str]: ...

    def add_pod(self, service: str, *, ready: bool = True) -> str: ...

    def set_ready(self, pod: str, ready: bool) -> None: ...

    def terminate(self, pod: str) -> None: ...

    def finish(self, pod: str) -> None: ...

    def scale(self, service: str, replicas: int) -> None: ...

    def ready_ips(self, service: str) -> list[str]: ...

    def url_of(self, service: str) -> str: ...

    def restart_api(self) -> None: ...

    def revoke_access(self) -> None: ...

    def restore_access(self) -> None: ...

    def expire_history(self) -> None: ...

    def in_cluster_client(self, token_file: Path) -> Any: ...

    def issue_token(self) -> str: ...

    def revoke_token(self, token: str) -> None: ...

    def token_accepted(self, token: str) -> bool: ...

    def node_of(self, pod: str) -> str: ...

    def kill_node(self, node: str) -> list[str]: ...

    def revive_node(self, node: str) -> list[str]: ...


_in_cluster_lock = threading.Lock()


def in_cluster_client(host: str, port: int, token_file: Path, ca_file: Path) -> Any:
    """``load_api_client()`` as a router's pod runs it (in-cluster config: the environment's
    ``KUBERNETES_SERVICE_HOST``/``PORT``, the mounted token and CA), with the mount's files at
    ``token_file`` and ``ca_file``: the client's in-cluster loader reads its module constants
    at call time."""
    with _in_cluster_lock, \
            mock.patch.multiple(incluster_config, SERVICE_TOKEN_FILENAME=str(token_file),
                                SERVICE_CERT_FILENAME=str(ca_file)), \
            mock.patch.dict(os.environ, {"KUBERNETES_SERVICE_HOST": host,
                                         "KUBERNETES_SERVICE_PORT": str(port)}):
        return load_api_client()


def write_token(path: Path, token: str) -> None:
    """Replace the token file as the kubelet does: a new file renamed over the old."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(token)
    os.replace(tmp, path)


def token_accepted(url: str, token: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether the API server at ``url`` authenticates ``token`` (any answer but 401)."""
    request = urllib.request.Request(f"{url}/version",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 401


# --- the simulator --------------------------------------------------------------------------------


class SimBackend:
    name = "sim"

    def __init__(self, cluster: SimCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self._pods: dict[str, SimPod] = {}

    def router_client(self) -> Any:
        return self.cluster.api_client()

    def add_service(self, name: str, *, replicas: int = 2, headless: bool = False,
                    publish_not_ready: bool = False,
                    selector: Mapping[str, str] | None = None) -> None:
        self.cluster.add_service(name, self.namespace, replicas=replicas, headless=headless,
                                 publish_not_ready=publish_not_ready, selector=selector)

    def delete_service(self, name: str) -> None:
        self.cluster.delete_service(name, self.namespace)

    def set_service_ports(self, name: str, ports: Sequence[tuple[str, int]]) -> None:
        self.cluster.set_service_ports(name, ports, self.namespace)
        # SimCluster leaves its own record of the port alone; url_of reads it
        self.cluster.service(name, self.namespace).port = ports[0][1]

    def set_selector(self, name: str, selector: Mapping[str, str]) -> None:
        self.cluster.set_service_selector(name, selector, self.namespace)

    def pods(self, service: str) -> list[str]:
        found = sorted(self.cluster.pods(service, self.namespace), key=lambda p: p.name)
        self._pods.update((p.name, p) for p in found)
        return [p.name for p in found]

    def pod_ip(self, pod: str) -> str:
        return self._pods[pod].ip

    def selector_of(self, service: str) -> dict[str, str]:
        return dict(self.cluster.service(service, self.namespace).selector)

    def add_pod(self, service: str, *, ready: bool = True) -> str:
        pod = self.cluster.add_pod(service, self.namespace, ready=ready)
        self._pods[pod.name] = pod
        return pod.name

    def set_ready(self, pod: str, ready: bool) -> None:
        self.cluster.set_ready(self._pods[pod], ready)

    def terminate(self, pod: str) -> None:
        self.cluster.terminate_pod(self._pods[pod])

    def finish(self, pod: str) -> None:
        self.cluster.finish_termination(self._pods.pop(pod))

    def scale(self, service: str, replicas: int) -> None:
        self.cluster.scale(service, replicas, self.namespace)

    def ready_ips(self, service: str) -> list[str]:
        return sorted(p.ip for p in self.cluster.service(service, self.namespace).ready_pods())

    def url_of(self, service: str) -> str:
        return self.cluster.url_of(service, self.namespace)

    def restart_api(self) -> None:
        self.cluster.api.restart()

    def revoke_access(self) -> None:
        """The router's RoleBinding is gone: every list and watch is forbidden."""
        self.cluster.api.allowed_verbs = frozenset()

    def restore_access(self) -> None:
        self.cluster.api.allowed_verbs = None

    def expire_history(self) -> None:
        """Something discovery does not watch changes, history is compacted, the server restarts:
        reconnecting watches ask for a resourceVersion older than the server still has."""
        self.cluster.api.put("pods", {"metadata": {"name": "unwatched",
                                                   "namespace": self.namespace}})
        self.cluster.api.compact()
        self.cluster.api.restart()

    def in_cluster_client(self, token_file: Path) -> Any:
        """The in-cluster client; the simulator serves plain HTTP, so the CA file is a
        placeholder and the client's ``https://`` host is turned into the simulator's URL."""
        ca_file = token_file.with_name("ca.crt")
        ca_file.write_text("the simulator serves plain HTTP\n")
        client = in_cluster_client("127.0.0.1", self.cluster.api.port, token_file, ca_file)
        client.configuration.host = self.cluster.api.url
        return client

    def issue_token(self) -> str:
        """A new token the simulator accepts (from now on it checks bearer tokens)."""
        token = secrets.token_urlsafe(24)
        if self.cluster.api.accepted_tokens is None:
            self.cluster.api.accepted_tokens = set()
        self.cluster.api.accepted_tokens.add(token)
        return token

    def revoke_token(self, token: str) -> None:
        assert self.cluster.api.accepted_tokens is not None
        self.cluster.api.accepted_tokens.discard(token)

    def token_accepted(self, token: str) -> bool:
        return token_accepted(self.cluster.api.url, token)

    def node_of(self, pod: str) -> str:
        return self._pods[pod].node_name

    def kill_node(self, node: str) -> list[str]:
        """The node dies at the network level; no grace period ends within a scenario (as on the
        real control plane here, where no node lifecycle controller runs): its pods stay Ready."""
        return sorted(p.name for p in self.cluster.kill_node(node, grace=3600.0))

    def revive_node(self, node: str) -> list[str]:
        return sorted(p.name for p in self.cluster.revive_node(node))


# --- the real control plane -----------------------------------------------------------------------


_pod_ips = itertools.islice(ipaddress.ip_network(POD_CIDR).hosts(), 1, None)
_pod_ips_lock = threading.Lock()


def next_pod_ip() -> str:
    """The next pod address (process-wide; local on ``lo`` in the tier's network namespace)."""
    with _pod_ips_lock:
        return str(next(_pod_ips))


@dataclass
class RealPod:
    name: str
    ip: str
    labels: dict[str, str]
    owner: str
    engine: FakeEngine
    node: str = NODE
    ready: bool = True
    terminating: bool = False


@dataclass
class RealService:
    name: str
    selector: dict[str, str]
    port: int
    headless: bool
    owned: list[str] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_node(core: CoreV1Api, name: str = NODE) -> None:
    """A Node object for the pods (the EndpointSlice controller looks their node up)."""
    try:
        core.read_node(name)
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise
        core.create_node({"metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "topology.kubernetes.io/zone": "zone-a"}}})


_canaries = itertools.count(1)
CANARY_NAMESPACE = "realcluster-canary"


def wait_controller_working(plane: ControlPlane, timeout: float = 120.0) -> float:
    """Until the EndpointSlice controller publishes a new ready pod of a new Service (after a
    start or an API server restart its watches reconnect with backoff); returns the seconds
    it took. The canary's address is never dialled."""
    started = time.monotonic()
    admin = plane.client()
    core = CoreV1Api(admin)
    try:
        ensure_node(core)
        try:
            core.create_namespace({"metadata": {"name": CANARY_NAMESPACE}})
            core.create_namespaced_service_account(CANARY_NAMESPACE,
                                                   {"metadata": {"name": "default"}})
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
        name = f"canary-{next(_canaries)}"
        ip = next_pod_ip()
        core.create_namespaced_service(CANARY_NAMESPACE, {
            "metadata": {"name": name},
            "spec": {"selector": {"canary": name}, "ports": [{"port": 80}]}})
        core.create_namespaced_pod(CANARY_NAMESPACE, {
            "metadata": {"name": name, "labels": {"canary": name}},
            "spec": {"nodeName": NODE, "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "canary"}]}})
        core.patch_namespaced_pod_status(name, CANARY_NAMESPACE, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}})
        slices = DiscoveryV1Api(admin)
        deadline = started + timeout
        while True:
            listed = slices.list_namespaced_endpoint_slice(
                CANARY_NAMESPACE, label_selector=f"kubernetes.io/service-name={name}")
            if any(ip in (ep.addresses or []) and ep.conditions.ready
                   for item in listed.items for ep in item.endpoints or []):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the EndpointSlice controller published no slice for "
                                   f"{CANARY_NAMESPACE}/{name} within {timeout:.0f}s")
            time.sleep(0.1)
        core.delete_namespaced_service(name, CANARY_NAMESPACE)
        core.delete_namespaced_pod(name, CANARY_NAMESPACE, grace_period_seconds=0)
    finally:
        admin.close()
    return time.monotonic() - started


def apply_rbac(admin: Any, namespace: str, *, name: str = "vllm-router",
               kinds: Sequence[str] = ("ServiceAccount", "Role", "RoleBinding")) -> None:
    """deploy/rbac.yaml's namespaced part (ServiceAccount, Role, RoleBinding) in ``namespace``."""
    core = CoreV1Api(admin)
    rbac = RbacAuthorizationV1Api(admin)
    for doc in yaml.safe_load_all(RBAC_YAML.read_text()):
        if not doc or doc["kind"] not in kinds:
            continue
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "ServiceAccount":
            doc["metadata"]["name"] = name
            core.create_namespaced_service_account(namespace, doc)
        elif doc["kind"] == "Role":
            rbac.create_namespaced_role(namespace, doc)
        else:
            for subject in doc["subjects"]:
                subject["namespace"] = namespace
                subject["name"] = name
            rbac.create_namespaced_role_binding(namespace, doc)


def service_account_token(admin: Any, namespace: str, name: str = "vllm-router",
                          seconds: int = 3600) -> str:
    """A bound ServiceAccount token (TokenRequest), as a projected token volume holds."""
    reply = CoreV1Api(admin).create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": seconds}})
    return str(reply.status.token)


class RealBackend:
    """Services and pods on the real control plane; this object plays the kubelet."""

    name = "real"

    def __init__(self, plane: ControlPlane, namespace: str, dns: ServiceDNS, *,
                 engine_factory: EngineFactory = FakeEngine,
                 engine_port: int = ENGINE_PORT) -> None:
        self.plane = plane
        self.namespace = namespace
        self.dns = dns
        #: how pods' engines are made (``SimCluster``'s ``engine_factory``: e.g. an engine farm)
        self.engine_factory = engine_factory
        self.engine_port = engine_port
        self.admin = plane.client()
        self.core = CoreV1Api(self.admin)
        self._services: dict[str, RealService] = {}
        self._pods: dict[str, RealPod] = {}
        self._next: dict[str, int] = {}
        self._lock = threading.RLock()
        self._clients: list[Any] = [self.admin]
        self._token_names = itertools.count(1)
        self._token_secrets: dict[str, str] = {}
        for node in NODES:
            ensure_node(self.core, node)
        self.core.create_namespace({"metadata": {"name": namespace}})
        # without the serviceaccount controller no "default" ServiceAccount appears by itself
        self.core.create_namespaced_service_account(namespace, {"metadata": {"name": "default"}})
        apply_rbac(self.admin, namespace)

    def router_client(self) -> Any:
        """HTTPS, the cluster CA, a ServiceAccount token bound by deploy/rbac.yaml."""
        client = self.plane.client(service_account_token(self.admin, self.namespace))
        self._clients.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            pods = list(self._pods.values())
            services = list(self._services)
            self._pods.clear()
            self._services.clear()
        for pod in pods:
            pod.engine.stop()
        for name in services:
            self.dns.unregister(self.namespace, name)
        for client in self._clients:
            client.close()

    # -- services --------------------------------------------------------------------------------

    def add_service(self, name: str, *, replicas: int = 2, headless: bool = False,
                    publish_not_ready: bool = False,
                    selector: Mapping[str, str] | None = None) -> None:
        chosen = dict(selector or {"app": name, "model": DEFAULT_MODEL.replace("/", "-")[:63]})
        spec: dict[str, Any] = {
            "selector": chosen,
            "ports": [{"name": "http", "port": 80, "targetPort": self.engine_port,
                       "protocol": "TCP"}],
            "publishNotReadyAddresses": publish_not_ready,
        }
        if headless:
            spec["clusterIP"] = "None"
        created = self.core.create_namespaced_service(self.namespace, {
            "metadata": {"name": name, "labels": {"app": "vllm"}}, "spec": spec})
        cluster_ip = created.spec.cluster_ip
        with self._lock:
            self._services[name] = RealService(name, chosen, 80, headless)
        if headless:
            self.dns.register(self.namespace, name, lambda: self.ready_ips(name))
        else:
            self.dns.register(self.namespace, name, lambda: [cluster_ip])
        for _ in range(replicas):
            self.add_pod(name)

    def delete_service(self, name: str) -> None:
        """Delete the Service and the pods it created (its owner's garbage collection)."""
        with self._lock:
            service = self._services.pop(name)
        self.core.delete_namespaced_service(name, self.namespace)
        for pod in list(service.owned):
            if pod in self._pods:
                self.finish(pod)
        self.dns.unregister(self.namespace, name)

    def set_service_ports(self, name: str, ports: Sequence[tuple[str, int]]) -> None:
        # a JSON patch replaces the list (a strategic merge would merge ports by number)
        self.core.patch_namespaced_service(name, self.namespace, [{
            "op": "replace", "path": "/spec/ports", "value": [
                {"name": n, "port": p, "targetPort": self.engine_port, "protocol": "TCP"}
                for n, p in ports]}])
        with self._lock:
            self._services[name].port = ports[0][1]

    def selector_of(self, service: str) -> dict[str, str]:
        return dict(self._services[service].selector)

    def set_selector(self, name: str, selector: Mapping[str, str]) -> None:
        self.core.patch_namespaced_service(name, self.namespace, [
            {"op": "replace", "path": "/spec/selector", "value": dict(selector)}])
        with self._lock:
            self._services[name].selector = dict(selector)

    def url_of(self, service: str) -> str:
        s = self._services[service]
        port = self.engine_port if s.headless else s.port
        return f"http://{service}.{self.namespace}.svc.{CLUSTER_DOMAIN}:{port}"

    # -- pods --------------------------------------------------------------------------------------

    def _selects(self, service: RealService, pod: RealPod) -> bool:
        return all(pod.labels.get(k) == v for k, v in service.selector.items())

    def pods(self, service: str) -> list[str]:
        with self._lock:
            s = self._services[service]
            return sorted(p.name for p in self._pods.values() if self._selects(s, p))

    def pod_ip(self, pod: str) -> str:
        return self._pods[pod].ip

    def add_pod(self, service: str, *, ready: bool = True) -> str:
        with self._lock:
            s = self._services[service]
            index = self._next.get(service, 0)
            self._next[service] = index + 1
        name = f"{service}-{index}"
        ip = next_pod_ip()
        engine = self.engine_factory(ip, self.engine_port, model=DEFAULT_MODEL).start()
        pod = RealPod(name, ip, dict(s.selector), service, engine,
                      node=NODES[index % len(NODES)], ready=ready)
        self.core.create_namespaced_pod(self.namespace, {
            "metadata": {"name": name, "labels": pod.labels},
            "spec": {
                "nodeName": pod.node,
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 30,
                "containers": [{"name": "vllm", "image": "vllm/vllm-openai:fake",
                                "ports": [{"name": "http",
                                           "containerPort": self.engine_port}]}],
            },
        })
        with self._lock:
            self._pods[name] = pod
            s.owned.append(name)
        self._write_status(pod)
        return name

    def _write_status(self, pod: RealPod) -> None:
        """What the kubelet reports: Running, the pod IP, Ready and the container's state."""
        ready = "True" if pod.ready else "False"
        now = _now()
        self.core.patch_namespaced_pod_status(pod.name, self.namespace, {"status": {
            "phase": "Running",
            "hostIP": "192.0.2.10",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now},
            ],
            "containerStatuses": [{
                "name": "vllm", "image": "vllm/vllm-openai:fake", "imageID": "",
                "ready": pod.ready, "restartCount": 0, "started": True,
                "state": {"running": {"startedAt": now}},
            }],
        }})

    def set_ready(self, pod: str, ready: bool) -> None:
        p = self._pods[pod]
        p.ready = ready
        self._write_status(p)

    def terminate(self, pod: str) -> None:
        """Graceful deletion: the pod gets a deletionTimestamp and stays (no kubelet to finish)."""
        p = self._pods[pod]
        p.terminating = True
        self.core.delete_namespaced_pod(pod, self.namespace, grace_period_seconds=30)
        p.engine.drain()

    def finish(self, pod: str) -> None:
        """The process exited: force-delete the pod (grace 0) and stop its engine."""
        with self._lock:
            p = self._pods.pop(pod)
            owner = self._services.get(p.owner)
            if owner is not None and pod in owner.owned:
                owner.owned.remove(pod)
        try:
            self.core.delete_namespaced_pod(pod, self.namespace, grace_period_seconds=0)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        p.engine.stop()

    def scale(self, service: str, replicas: int) -> None:
        """Add pods or remove the newest of the pods this Service created (at once)."""
        with self._lock:
            live = [n for n in self._services[service].owned if not self._pods[n].terminating]
        for _ in range(replicas - len(live)):
            self.add_pod(service)
        for name in live[replicas:] if replicas < len(live) else []:
            self.finish(name)

    def restart_api(self) -> None:
        """Restart kube-apiserver; returns once the EndpointSlice controller works again."""
        self.plane.restart_apiserver()
        wait_controller_working(self.plane)

    def revoke_access(self) -> None:
        """Delete the router's RoleBinding: every list and watch is forbidden."""
        RbacAuthorizationV1Api(self.admin).delete_namespaced_role_binding(
            "vllm-router-discovery", self.namespace)

    def restore_access(self) -> None:
        apply_rbac(self.admin, self.namespace, kinds=("RoleBinding",))

    def expire_history(self) -> None:
        """A write discovery does not watch (a ConfigMap), etcd compacted at its head, then a
        kube-apiserver restart: its new watch cache starts past every resourceVersion discovery
        holds, and etcd no longer has them either."""
        self.core.create_namespaced_config_map(self.namespace, {
            "metadata": {"generateName": "unwatched-"}, "data": {"at": _now()}})
        self.plane.compact_etcd()
        self.restart_api()

    def in_cluster_client(self, token_file: Path) -> Any:
        client = in_cluster_client(HOST, APISERVER_PORT, token_file, self.plane.pki["ca.crt"])
        self._clients.append(client)
        return client

    def issue_token(self) -> str:
        """A bound token of the router's ServiceAccount, bound to a Secret of its own: deleting
        that Secret revokes the token (as deleting the pod revokes a projected token)."""
        name = f"router-token-{next(self._token_names)}"
        bound = self.core.create_namespaced_secret(self.namespace, {"metadata": {"name": name}})
        reply = self.core.create_namespaced_service_account_token("vllm-router", self.namespace, {
            "spec": {"expirationSeconds": 3600, "boundObjectRef": {
                "kind": "Secret", "apiVersion": "v1", "name": name, "uid": bound.metadata.uid}}})
        token = str(reply.status.token)
        self._token_secrets[token] = name
        return token

    def revoke_token(self, token: str) -> None:
        self.core.delete_namespaced_secret(self._token_secrets.pop(token), self.namespace)

    def token_accepted(self, token: str) -> bool:
        context = ssl.create_default_context(cafile=str(self.plane.pki["ca.crt"]))
        return token_accepted(self.plane.url, token, context)

    def node_of(self, pod: str) -> str:
        return self._pods[pod].node

    def _on(self, node: str) -> list[RealPod]:
        with self._lock:
            return sorted((p for p in self._pods.values() if p.node == node),
                          key=lambda p: p.name)

    def kill_node(self, node: str) -> list[str]:
        """The node dies at the network level: its engines are cut off
        (:meth:`FakeEngine.cut_network`, as ``SimCluster.kill_node`` does). Nothing changes in
        the API: no kubelet stops reporting, no node lifecycle controller runs, so the pods stay
        Ready and their endpoints ready."""
        pods = self._on(node)
        for pod in pods:
            pod.engine.cut_network()
        return [p.name for p in pods]

    def revive_node(self, node: str) -> list[str]:
        pods = self._on(node)
        for pod in pods:
            pod.engine.restore_network()
        return [p.name for p in pods]

    def ready_ips(self, service: str) -> list[str]:
        with self._lock:
            s = self._services[service]
            return sorted(p.ip for p in self._pods.values()
                          if self._selects(s, p) and p.ready and not p.terminating)
