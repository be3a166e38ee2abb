"""The simulator calibrated against the real thing: the same operations on both backends, then
what a client reads compared — EndpointSlice conditions and layout, v1 Endpoints, watch event
types, error ``Status`` bodies. The real control plane converges asynchronously, so each
comparison waits (with a deadline) for the real view to equal the simulator's, and fails
showing both."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes.client import ApiException, CoreV1Api, DiscoveryV1Api

from tests.conftest import wait_for
from tests.realcluster.backends import Backend, RealBackend, SimBackend
from tests.realcluster.conftest import new_namespace, real_backend_in
from tests.realcluster.controlplane import ControlPlane
from vllm_router_svcdisc.sim.cluster import SimCluster

DEADLINE = 30.0


@pytest.fixture
def both(control_plane: ControlPlane) -> Iterator[tuple[SimBackend, RealBackend]]:
    """A simulator and the real control plane, each on a fresh namespace of the same name."""
    namespace = new_namespace()
    with SimCluster(bookmark_interval=0.25) as sim, real_backend_in(control_plane,
                                                                   namespace) as real:
        yield SimBackend(sim, namespace), real


def _raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


class Roles:
    """Pod identities across backends: the n-th pod created for a Service is role ``svc/n``."""

    def __init__(self) -> None:
        self.by_ip: dict[tuple[str, str], str] = {}

    def record(self, b: Backend, service: str) -> list[str]:
        pods = b.pods(service)
        for i, pod in enumerate(pods):
            self.by_ip[(b.name, b.pod_ip(pod))] = f"{service}/{i}"
        return pods


def slice_view(b: Backend, roles: Roles, service: str) -> dict[str, Any]:
    """What a client reads from a Service's EndpointSlices, without names, UIDs or addresses."""
    body = _raw(DiscoveryV1Api(b.router_client()).list_namespaced_endpoint_slice, b.namespace,
                label_selector=f"kubernetes.io/service-name={service}")
    endpoints = []
    sizes = []
    for item in body["items"]:
        sizes.append(len(item.get("endpoints") or []))
        for ep in item.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            endpoints.append((
                roles.by_ip.get((b.name, ep["addresses"][0]), ep["addresses"][0]),
                conditions.get("ready"), conditions.get("serving"), conditions.get("terminating"),
                (ep.get("targetRef") or {}).get("kind"), bool(ep.get("nodeName")),
            ))
    return {
        "endpoints": sorted(endpoints, key=str),
        "slice sizes": sorted(sizes, reverse=True),
        "address types": sorted({item["addressType"] for item in body["items"]}),
        "ports": sorted({json.dumps(item.get("ports"), sort_keys=True) for item in body["items"]}),
    }


def endpoints_view(b: Backend, roles: Roles, service: str) -> dict[str, Any]:
    """The v1 Endpoints object (the library's fallback for clusters without slices)."""
    body = _raw(CoreV1Api(b.admin).read_namespaced_endpoints, service, b.namespace) \
        if isinstance(b, RealBackend) else b.cluster.api.get("endpoints", b.namespace, service)
    view: dict[str, list[str]] = {"addresses": [], "notReadyAddresses": []}
    for subset in body.get("subsets") or []:
        for key in view:
            view[key] += [roles.by_ip.get((b.name, a["ip"]), a["ip"])
                          for a in subset.get(key) or []]
    return {k: sorted(v) for k, v in view.items()}


def same_on_both(sim: SimBackend, real: RealBackend, view: Callable[[Backend], Any]) -> Any:
    """Wait for the real view to equal the simulator's; returns it."""
    expected = view(sim)
    wait_for(lambda: view(real) == expected, DEADLINE,
             lambda: f"simulator: {expected}\nreal:      {view(real)}")
    return expected


def pods_in_every_state(b: Backend, roles: Roles) -> None:
    """Service ``cond``: ready, unready, terminating, unready-and-terminating pods; headless
    ``pnr`` with publishNotReadyAddresses: ready, unready, terminating."""
    b.add_service("cond", replicas=4)
    b.add_service("pnr", replicas=3, headless=True, publish_not_ready=True)
    cond, pnr = roles.record(b, "cond"), roles.record(b, "pnr")
    b.set_ready(cond[1], False)
    b.terminate(cond[2])
    b.set_ready(cond[3], False)
    b.terminate(cond[3])
    b.set_ready(pnr[1], False)
    b.terminate(pnr[2])


def test_endpointslice_conditions_match(both: tuple[SimBackend, RealBackend]) -> None:
    """ready / serving / terminating for ready, unready, terminating and unready-terminating
    pods, with and without publishNotReadyAddresses."""
    sim, real = both
    roles = Roles()
    for b in (sim, real):
        pods_in_every_state(b, roles)
    view = same_on_both(sim, real, lambda b: slice_view(b, roles, "cond"))
    assert view["endpoints"] == [
        ("cond/0", True, True, False, "Pod", True),
        ("cond/1", False, False, False, "Pod", True),
        ("cond/2", False, True, True, "Pod", True),
        ("cond/3", False, False, True, "Pod", True),
    ]
    view = same_on_both(sim, real, lambda b: slice_view(b, roles, "pnr"))
    assert view["endpoints"] == [
        ("pnr/0", True, True, False, "Pod", True),
        ("pnr/1", True, False, False, "Pod", True),
        ("pnr/2", True, True, True, "Pod", True),
    ]


def test_v1_endpoints_match(both: tuple[SimBackend, RealBackend]) -> None:
    """The endpoints controller's ready / notReady split: terminating pods are left out,
    except with publishNotReadyAddresses, where every pod is an address."""
    sim, real = both
    roles = Roles()
    for b in (sim, real):
        pods_in_every_state(b, roles)
    view = same_on_both(sim, real, lambda b: endpoints_view(b, roles, "cond"))
    assert view == {"addresses": ["cond/0"], "notReadyAddresses": ["cond/1"]}
    view = same_on_both(sim, real, lambda b: endpoints_view(b, roles, "pnr"))
    assert view == {"addresses": ["pnr/0", "pnr/1", "pnr/2"], "notReadyAddresses": []}


def test_slice_layout_past_one_hundred_endpoints(both: tuple[SimBackend, RealBackend]) -> None:
    """105 endpoints: two slices of at most 100 on both. How they split differs: the
    simulator packs in order (100 + 5); the real controller's split depends on the order pods
    became ready and how its syncs batched them (99 + 6 has been seen)."""
    sim, real = both
    roles = Roles()
    for b in (sim, real):
        b.add_service("big", replicas=105)

    def layout(b: Backend) -> tuple[int, int, bool]:
        sizes = slice_view(b, roles, "big")["slice sizes"]
        return sum(sizes), len(sizes), max(sizes, default=0) <= 100

    assert same_on_both(sim, real, layout) == (105, 2, True)


def _forbidden(b: Backend, list_call: str) -> dict[str, Any]:
    api: Any = (DiscoveryV1Api if "endpoint_slice" in list_call else CoreV1Api)(b.router_client())
    with pytest.raises(ApiException) as caught:
        getattr(api, list_call)(b.namespace)
    body: dict[str, Any] = json.loads(caught.value.body)
    # the user's name is the only part that differs by construction
    body["message"] = body["message"].replace(
        f"system:serviceaccount:{b.namespace}:vllm-router", "<router>").replace(
        "system:serviceaccount:default:router", "<router>")
    return body


@pytest.mark.parametrize("list_call", ["list_namespaced_service",
                                       "list_namespaced_endpoint_slice"])
def test_forbidden_status_bodies_match(both: tuple[SimBackend, RealBackend],
                                       list_call: str) -> None:
    sim, real = both
    for b in (sim, real):
        b.revoke_access()
    expected = _forbidden(sim, list_call)
    wait_for(lambda: _forbidden(real, list_call) == expected, DEADLINE,
             lambda: f"simulator: {expected}\nreal:      {_forbidden(real, list_call)}")


def _watch_types(b: Backend, service: str, action: Callable[[], None],
                 settle: Callable[[list[str]], bool]) -> list[str]:
    """Event types on a Service's slices while ``action`` runs, until ``settle`` says done."""
    api = DiscoveryV1Api(b.router_client())
    listed = _raw(api.list_namespaced_endpoint_slice, b.namespace,
                  label_selector=f"kubernetes.io/service-name={service}")
    stream = api.list_namespaced_endpoint_slice(
        b.namespace, label_selector=f"kubernetes.io/service-name={service}", watch=True,
        resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=int(DEADLINE),
        _preload_content=False)
    types: list[str] = []
    try:
        action()
        for line in stream.stream(amt=None):
            for text in line.splitlines():
                if text.strip():
                    event = json.loads(text)
                    if event["type"] != "BOOKMARK":
                        types.append(event["type"])
            if settle(types):
                break
    finally:
        stream.release_conn()
    return types


def test_watch_event_types_match_for_a_readiness_flip(
        both: tuple[SimBackend, RealBackend]) -> None:
    sim, real = both
    seen = {}
    for b in (sim, real):
        b.add_service("flip", replicas=2)
        wait_for(lambda b=b: len(slice_view(b, Roles(), "flip")["endpoints"]) == 2, DEADLINE,
                 "slices never listed both pods")
        pod = b.pods("flip")[0]
        seen[b.name] = _watch_types(b, "flip", lambda b=b, pod=pod: b.set_ready(pod, False),
                                    lambda types: bool(types))
    assert seen["sim"] == seen["real"] == ["MODIFIED"], seen


def _watch_from(b: Backend, resource_version: str) -> tuple[str, Any, Any] | None:
    """The first thing a watch from ``resource_version`` gets: an HTTP error or an event
    (numbers in messages replaced by N); None while the server is still coming up."""
    api = DiscoveryV1Api(b.router_client())
    try:
        stream = api.list_namespaced_endpoint_slice(
            b.namespace, watch=True, resource_version=resource_version, timeout_seconds=5,
            _preload_content=False)
    except ApiException as exc:
        if exc.status in (0, 429, 503):
            return None
        body = json.loads(exc.body)
        body["message"] = re.sub(r"\d+", "N", body.get("message", ""))
        return ("http", exc.status, body)
    except urllib3.exceptions.HTTPError:
        return None
    try:
        for chunk in stream.stream(amt=None):
            for text in chunk.splitlines():
                if text.strip():
                    event = json.loads(text)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        obj["message"] = re.sub(r"\d+", "N", obj.get("message", ""))
                    return ("event", event["type"], obj)
    finally:
        stream.release_conn()
    return ("end", None, None)


def test_watch_from_an_expired_resource_version_gets_the_same_410(
        both: tuple[SimBackend, RealBackend]) -> None:
    """History compacted and the server restarted: a watch from an old resourceVersion gets
    410 Expired in-stream, the same Status body on both."""
    sim, real = both
    seen = {}
    for b in (sim, real):
        b.add_service("old", replicas=1)
        rv = _raw(DiscoveryV1Api(b.router_client()).list_namespaced_endpoint_slice,
                  b.namespace)["metadata"]["resourceVersion"]
        b.expire_history()
        seen[b.name] = wait_for(lambda b=b, rv=rv: _watch_from(b, rv), DEADLINE,
                                f"[{b.name}] no answer to the watch")
    assert seen["sim"] == seen["real"], seen
    kind, event_type, status = seen["real"]
    assert (kind, event_type, status["code"], status["reason"]) == ("event", "ERROR", 410,
                                                                    "Expired"), seen


def _expired_continue(b: Backend) -> tuple[int, dict[str, Any], list[str]]:
    """A paged LIST of Services (pages of 1) whose continue token expired between pages
    (history compacted and the server restarted: the real watch cache no longer holds the
    list's snapshot, and etcd was compacted past it). Returns the status, the Status body with
    its continue token masked, and the names the 410's own continue token then lists."""
    for name in ("page-a", "page-b", "page-c"):
        b.add_service(name, replicas=0)
    api = CoreV1Api(b.router_client())
    first = _raw(api.list_namespaced_service, b.namespace, limit=1)
    b.expire_history()
    try:
        api.list_namespaced_service(b.namespace, limit=1, _continue=first["metadata"]["continue"])
    except ApiException as exc:
        body = json.loads(exc.body)
        rest: list[str] = []
        token = body.get("metadata", {}).get("continue")
        for _ in range(10):  # the inconsistent-continue token pages on
            if not token:
                break
            page = _raw(api.list_namespaced_service, b.namespace, limit=1, _continue=token)
            rest += [item["metadata"]["name"] for item in page["items"]]
            token = page["metadata"].get("continue")
        if "continue" in body.get("metadata", {}):
            body["metadata"]["continue"] = "<token>"
        return exc.status, body, rest
    return 200, {}, []


def test_expired_continue_token_gets_the_same_410(both: tuple[SimBackend, RealBackend]) -> None:
    """The 410 of a continue token whose list expired: the same Status on both (kube-apiserver
    words it as an offer: its own inconsistent-continue token lists the rest from now)."""
    sim, real = both
    seen = {b.name: _expired_continue(b) for b in (sim, real)}
    assert seen["sim"] == seen["real"], seen
    code, body, rest = seen["real"]
    assert (code, body["reason"], body["metadata"]) == (410, "Expired", {"continue": "<token>"})
    assert rest == ["page-b", "page-c"]


class SliceWatch:
    """A watch on a Service's EndpointSlices in a thread; ``states(ip)`` is what a client saw
    for one endpoint, event by event: (ready, serving, terminating), or None when absent."""

    def __init__(self, b: Backend, service: str) -> None:
        api = DiscoveryV1Api(b.router_client())
        selector = f"kubernetes.io/service-name={service}"
        listed = _raw(api.list_namespaced_endpoint_slice, b.namespace, label_selector=selector)
        self._stream = api.list_namespaced_endpoint_slice(
            b.namespace, label_selector=selector, watch=True, timeout_seconds=int(DEADLINE) * 2,
            resource_version=listed["metadata"]["resourceVersion"], _preload_content=False)
        self._slices: dict[str, list[dict[str, Any]]] = {
            item["metadata"]["name"]: item.get("endpoints") or [] for item in listed["items"]}
        self._seen: list[dict[str, tuple[bool, bool, bool]]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for chunk in self._stream.stream(amt=None):
                for text in chunk.splitlines():
                    if text.strip():
                        self._apply(json.loads(text))
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError):
            pass  # closed by stop()

    def _apply(self, event: dict[str, Any]) -> None:
        if event["type"] not in ("ADDED", "MODIFIED", "DELETED"):
            return
        name = event["object"]["metadata"]["name"]
        with self._lock:
            if event["type"] == "DELETED":
                self._slices.pop(name, None)
            else:
                self._slices[name] = event["object"].get("endpoints") or []
            view = {}
            for endpoints in self._slices.values():
                for ep in endpoints:
                    c = ep.get("conditions") or {}
                    view[ep["addresses"][0]] = (c.get("ready"), c.get("serving"),
                                                c.get("terminating"))
            self._seen.append(view)

    def states(self, ip: str) -> list[tuple[bool, bool, bool] | None]:
        """The endpoint's successive states (consecutive repeats dropped)."""
        with self._lock:
            out: list[tuple[bool, bool, bool] | None] = []
            for view in self._seen:
                if not out or out[-1] != view.get(ip):
                    out.append(view.get(ip))
            return out

    def stop(self) -> None:
        """Shut the connection's socket, so the blocked read ends now, not at the timeout."""
        sock = getattr(getattr(self._stream, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        assert not self._thread.is_alive(), "the watch reader did not stop"
        self._stream.release_conn()


def test_watch_sees_the_same_states_through_a_graceful_then_forced_deletion(
        both: tuple[SimBackend, RealBackend]) -> None:
    """Graceful deletion (terminating, still serving), then the pod gone: the states a client
    watching the slices sees for that endpoint."""
    sim, real = both
    seen = {}
    for b in (sim, real):
        b.add_service("roll", replicas=2)
        wait_for(lambda b=b: [e[1:4] for e in slice_view(b, Roles(), "roll")["endpoints"]]
                 == [(True, True, False)] * 2, DEADLINE, f"[{b.name}] pods never ready")
        pod = b.pods("roll")[0]
        ip = b.pod_ip(pod)
        watch = SliceWatch(b, "roll")
        try:
            b.terminate(pod)
            wait_for(lambda w=watch, ip=ip: (False, True, True) in w.states(ip), DEADLINE,
                     lambda w=watch, ip=ip, b=b: f"[{b.name}] {w.states(ip)}")
            b.finish(pod)
            wait_for(lambda w=watch, ip=ip: w.states(ip)[-1:] == [None], DEADLINE,
                     lambda w=watch, ip=ip, b=b: f"[{b.name}] {w.states(ip)}")
            seen[b.name] = watch.states(ip)
        finally:
            watch.stop()
    assert seen["sim"] == seen["real"] == [(False, True, True), None], seen
