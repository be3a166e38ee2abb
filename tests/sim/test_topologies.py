"""The simulator writes each cluster topology as the real controllers do, read back through the
official client (``kubernetes.client``), and serves it through its DNS shim and kube-proxy.

Objects are read with ``_preload_content=False`` (as discovery reads them): the JSON the server
sent, the same on client 35, 36 and 37 (35 cannot deserialise ``endpoints: null``).
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import requests
from kubernetes import client as k8s_client

from vllm_router_svcdisc.sim.cluster import SimCluster


def _json(response: Any) -> Any:
    return json.loads(response.data)


def slices(cluster: SimCluster, service: str) -> list[dict[str, Any]]:
    """The Service's EndpointSlices, listed through the official client."""
    api = k8s_client.DiscoveryV1Api(cluster.api_client())
    found = _json(api.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={service}",
        _preload_content=False))["items"]
    return sorted(found, key=lambda s: s["metadata"]["name"])


def endpoints(cluster: SimCluster, service: str) -> dict[str, Any]:
    return _json(k8s_client.CoreV1Api(cluster.api_client()).read_namespaced_endpoints(
        service, "default", _preload_content=False))


def read_service(cluster: SimCluster, name: str) -> dict[str, Any]:
    return _json(k8s_client.CoreV1Api(cluster.api_client()).read_namespaced_service(
        name, "default", _preload_content=False))


def endpoints_of(slice_obj: dict[str, Any]) -> list[dict[str, Any]]:
    return slice_obj.get("endpoints") or []


def pod_of(endpoint: dict[str, Any]) -> str:
    return str(endpoint["targetRef"]["name"])


def get(url: str) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False
        return s.get(url, headers={"Connection": "close"}, timeout=5)


def test_headless_dns_resolves_to_pods_without_port_translation(cluster: SimCluster) -> None:
    cluster.add_service("hl", replicas=2, headless=True, port=80)
    pods = cluster.pods("hl")
    cluster.set_ready(pods[1], False)
    host = "hl.default.svc.cluster.local"
    assert {a[4][0] for a in socket.getaddrinfo(host, 80)} == {pods[0].ip}
    assert get(f"http://{host}:8000/health").status_code == 200  # the target port answers
    with pytest.raises(requests.exceptions.ConnectionError):
        get(f"http://{host}:80/health")  # nothing translates the Service port


def test_publish_not_ready_addresses(cluster: SimCluster) -> None:
    cluster.add_service("lws", replicas=2, headless=True, publish_not_ready=True)
    pods = cluster.pods("lws")
    cluster.set_ready(pods[1], False)
    (only,) = slices(cluster, "lws")
    conditions = {pod_of(e): e["conditions"] for e in endpoints_of(only)}
    assert conditions[pods[1].name]["ready"] is True  # forced by publishNotReadyAddresses
    assert conditions[pods[1].name]["serving"] is False  # the pod's readiness
    assert conditions[pods[0].name]["serving"] is True
    assert not endpoints(cluster, "lws")["subsets"][0].get("notReadyAddresses")
    assert {a[4][0] for a in socket.getaddrinfo("lws.default.svc.cluster.local", 8000)} == {
        p.ip for p in pods}  # DNS publishes the not-ready pod too


def test_dual_stack_writes_a_slice_per_family_for_the_same_pods(cluster: SimCluster) -> None:
    service = cluster.add_service("ds", replicas=2, dual_stack=True)
    v4, v6 = slices(cluster, "ds")
    assert (v4["addressType"], v6["addressType"]) == ("IPv4", "IPv6")
    assert [pod_of(e) for e in endpoints_of(v4)] == [pod_of(e) for e in endpoints_of(v6)]
    assert all(":" in e["addresses"][0] for e in endpoints_of(v6))
    assert read_service(cluster, "ds")["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    subset = endpoints(cluster, "ds")["subsets"][0]
    assert len(subset["addresses"]) == len(service.pods)  # the primary family only


def test_multi_address_endpoints(cluster: SimCluster) -> None:
    cluster.add_service("multi", replicas=2, extra_addresses=1)
    (only,) = slices(cluster, "multi")
    pods = {p.name: p for p in cluster.pods("multi")}
    for endpoint in endpoints_of(only):
        pod = pods[pod_of(endpoint)]
        assert endpoint["addresses"] == [pod.ip, *pod.extra_addresses]


def test_host_network_pods_share_an_ip_on_their_own_ports(cluster: SimCluster) -> None:
    cluster.add_service("hn", replicas=2, host_network=True, pod_ports=(8000, 8001))
    first, second = cluster.pods("hn")
    assert first.ip == second.ip and {first.port, second.port} == {8000, 8001}
    found = slices(cluster, "hn")
    assert [(s["metadata"]["name"], s["ports"][0]["port"]) for s in found] == [
        ("hn-a", 8000), ("hn-p8001-a", 8001)]
    for pod in (first, second):
        assert get(f"http://{pod.ip}:{pod.port}/health").status_code == 200


def test_named_target_port_resolves_per_pod(cluster: SimCluster) -> None:
    cluster.add_service("named", replicas=3, pod_ports=(8000, 8001))
    assert read_service(cluster, "named")["spec"]["ports"][0]["targetPort"] == "http"
    found = slices(cluster, "named")
    assert sorted((s["ports"][0]["port"], len(endpoints_of(s))) for s in found) == [
        (8000, 2), (8001, 1)]
    subsets = endpoints(cluster, "named")["subsets"]
    assert sorted((s["ports"][0]["port"], len(s["addresses"])) for s in subsets) == [
        (8000, 2), (8001, 1)]
    # kube-proxy dials each pod on its own port
    url = cluster.url_of("named")
    assert all(get(url + "/health").status_code == 200 for _ in range(6))
    assert {port for _ip, port in cluster.service("named").proxy.connections_by_backend()} == {
        8000, 8001}


def test_several_services_select_the_same_pods(cluster: SimCluster) -> None:
    owner = cluster.add_service("llama", replicas=2)
    cluster.add_service("peers", replicas=0, headless=True, selector=owner.selector)
    cluster.add_service("all", replicas=0, selector={"app": "llama"})
    names = sorted(p.name for p in cluster.pods("llama"))
    for service in ("peers", "all"):
        assert sorted(pod_of(e) for e in endpoints_of(slices(cluster, service)[0])) == names
    pod = cluster.pods("llama")[0]
    cluster.set_ready(pod, False)
    for service in ("llama", "peers", "all"):
        (only,) = slices(cluster, service)
        assert {pod_of(e): e["conditions"]["ready"] for e in endpoints_of(only)}[pod.name] is False
    added = cluster.add_pod("llama")
    assert added.name in {p.name for p in cluster.pods("peers")}
    cluster.delete_service("llama")
    for service in ("peers", "all"):
        assert not endpoints_of(slices(cluster, service)[0])  # its pods went with their owner


def test_portless_headless_service_writes_an_all_ports_entry(cluster: SimCluster) -> None:
    cluster.add_service("any", replicas=1, headless=True, portless=True)
    assert not read_service(cluster, "any")["spec"]["ports"]
    (only,) = slices(cluster, "any")
    assert [(p["name"], p["port"]) for p in only["ports"]] == [(None, None)]


def test_kube_proxy_falls_back_to_serving_terminating_endpoints(cluster: SimCluster) -> None:
    cluster.add_service("drain", replicas=2)
    url = cluster.url_of("drain")
    for pod in cluster.pods("drain"):
        cluster.terminate_pod(pod, pre_stop=30.0)  # preStop sleep: serving, not ready
    assert get(url + "/health").status_code == 200
    cluster.set_ready(cluster.pods("drain")[0], False)  # not serving any more
    cluster.set_ready(cluster.pods("drain")[1], False)
    with pytest.raises(requests.exceptions.ConnectionError):
        get(url + "/health")
