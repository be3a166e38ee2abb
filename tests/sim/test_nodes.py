"""Nodes of the simulated cluster: placement, a node's death and return, a pod's crash.

The EndpointSlices and Pods are read through the real ``kubernetes`` client, the engines through
real sockets."""

from __future__ import annotations

import socket
import sys
import threading

import pytest
import requests
from kubernetes import client

from tests.conftest import wait_for
from vllm_router_svcdisc.sim.cluster import NODE_MONITOR_GRACE_PERIOD, SimCluster, SimPod

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the dropped-SYN behaviour is Linux's")


def _conditions(cluster: SimCluster, service: str) -> dict[str, dict[str, bool | None]]:
    """EndpointSlice conditions by pod name, as the official client reads them."""
    api = client.DiscoveryV1Api(cluster.api_client())
    found: dict[str, dict[str, bool | None]] = {}
    slices = api.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={service}")
    for item in slices.items:
        for endpoint in item.endpoints or []:
            c = endpoint.conditions
            found[endpoint.target_ref.name] = {"ready": c.ready, "serving": c.serving,
                                               "terminating": c.terminating,
                                               "node": endpoint.node_name}
    return found


def _pod_ready(cluster: SimCluster, pod: SimPod) -> str:
    obj = client.CoreV1Api(cluster.api_client()).read_namespaced_pod(pod.name, "default")
    return next(c.status for c in obj.status.conditions if c.type == "Ready")


def _answers(pod: SimPod) -> bool:
    return requests.get(pod.engine.url + "/health", timeout=5).status_code == 200


def _timer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name == "sim-timer-_mark_pods_not_ready" and t.is_alive()]


def test_pods_spread_over_the_nodes_and_slices_name_them(cluster: SimCluster) -> None:
    assert cluster.nodes() == ["sim-node-1", "sim-node-2", "sim-node-3"]
    assert cluster.node_grace == NODE_MONITOR_GRACE_PERIOD == 50.0
    cluster.add_service("alpha", replicas=3)
    cluster.add_service("beta", replicas=4)
    assert sorted(p.node for p in cluster.pods("alpha")) == cluster.nodes()
    assert len({p.node for p in cluster.pods("beta")}) == 3
    assert {name: c["node"] for name, c in _conditions(cluster, "beta").items()} == {
        p.name: p.node_name for p in cluster.pods("beta")}
    assert sum(len(cluster.pods_on(n)) for n in cluster.nodes()) == 7


def test_explicit_nodes_and_no_new_pod_on_a_dead_node(cluster: SimCluster) -> None:
    cluster.add_service("alpha", replicas=4, nodes=["gpu-a", "gpu-b"])
    assert [p.node for p in cluster.pods("alpha")] == ["gpu-a", "gpu-b"] * 2
    assert {"gpu-a", "gpu-b"} <= set(cluster.nodes())
    cluster.kill_node("gpu-a", grace=60)
    assert not cluster.node_alive("gpu-a")
    assert cluster.add_pod("alpha").node == "gpu-b"
    assert cluster.add_pod("alpha", node="gpu-c").node == "gpu-c"


@linux_only
def test_dead_node_times_out_connections_while_its_endpoints_stay_ready(
        cluster: SimCluster) -> None:
    cluster.add_service("alpha", replicas=3)
    dead = cluster.pods_on("sim-node-1")
    assert len(dead) == 1
    (victim,), others = dead, [p for p in cluster.pods("alpha") if p.node != "sim-node-1"]
    session = requests.Session()
    session.trust_env = False
    try:
        assert session.get(victim.engine.url + "/health", timeout=5).status_code == 200
        assert cluster.kill_node("sim-node-1") == [victim]  # default grace: 50 s
        with pytest.raises(TimeoutError):  # no SYN-ACK, no RST: not "connection refused"
            socket.create_connection(victim.engine.address, timeout=0.5).close()
        with pytest.raises(requests.exceptions.ReadTimeout):  # the pooled connection hangs
            session.get(victim.engine.url + "/health", timeout=0.5)
        assert all(_answers(p) for p in others)
        conditions = _conditions(cluster, "alpha")
        assert conditions[victim.name] == {"ready": True, "serving": True,
                                           "terminating": False, "node": "sim-node-1"}
        assert _pod_ready(cluster, victim) == "True"
        assert len(_timer_threads()) == 1
        cluster.revive_node("sim-node-1")  # before the grace period: nothing was written
        wait_for(lambda: not _timer_threads(), 5, "the grace timer outlived revive_node")
        assert _answers(victim)
        assert _conditions(cluster, "alpha")[victim.name]["ready"] is True
    finally:
        session.close()


def test_after_the_grace_period_the_pods_are_not_ready_until_the_node_returns(
        cluster: SimCluster) -> None:
    cluster.add_service("alpha", replicas=3)
    cluster.add_service("beta", replicas=3)
    dead = cluster.kill_node("sim-node-2", grace=0.3)
    assert {p.service for p in dead} == {"alpha", "beta"}
    for pod in dead:
        wait_for(lambda pod=pod: _conditions(cluster, pod.service)[pod.name]["ready"] is False,
                 10, f"{pod.name} still ready after the grace period")
        assert _conditions(cluster, pod.service)[pod.name] == {
            "ready": False, "serving": False, "terminating": False, "node": "sim-node-2"}
        assert _pod_ready(cluster, pod) == "False"
    alive = [p for p in cluster.pods("alpha") + cluster.pods("beta") if p not in dead]
    assert all(_conditions(cluster, p.service)[p.name]["ready"] for p in alive)
    cluster.revive_node("sim-node-2")
    for pod in dead:
        assert _answers(pod)
        assert _conditions(cluster, pod.service)[pod.name]["ready"] is True
        assert _pod_ready(cluster, pod) == "True"


def test_stop_cancels_and_joins_the_grace_timers() -> None:
    with SimCluster(bookmark_interval=0.25, node_grace=600.0) as sim:
        sim.add_service("alpha", replicas=2)
        sim.kill_node("sim-node-1")
        assert len(_timer_threads()) == 1
    assert not _timer_threads()


def test_crash_refuses_connections_before_the_endpoint_goes(cluster: SimCluster) -> None:
    cluster.add_service("alpha", replicas=3)
    first, second, _ = cluster.pods("alpha")
    cluster.kill_pod(first, endpoint_delay=60.0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(first.engine.address, timeout=2).close()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(first.engine.url + "/health", timeout=2)
    assert _conditions(cluster, "alpha")[first.name]["ready"] is True  # not flipped yet
    cluster.kill_pod(second, endpoint_delay=0.2)
    wait_for(lambda: second.name not in _conditions(cluster, "alpha"), 10,
             "the crashed pod's endpoint was never removed")
    assert first.name in _conditions(cluster, "alpha")
