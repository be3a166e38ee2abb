"""Discovery through the real client on every cluster topology the simulator models."""

from __future__ import annotations

from typing import Any

import requests

from tests.conftest import wait_for
from tests.integration.test_discovery import state
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster


def view(discovery: K8sServiceDiscovery, name: str) -> Any:
    return discovery.get_service_status().get(f"default/{name}")


def wait_routable(discovery: K8sServiceDiscovery, name: str, ready: int,
                  timeout: float = 15.0) -> Any:
    """Wait until the Service is routable with ``ready`` routable pods; returns its view."""
    def routable() -> Any:
        v = view(discovery, name)
        return v if (v is not None and v.routable and len(v.ready_pods) == ready
                     and len(v.pod_probes) == ready) else None  # every ready pod probed

    return wait_for(routable, timeout, lambda: state(discovery))


def pod_entries(discovery: K8sServiceDiscovery) -> list[tuple[str, str | None]]:
    return sorted((e.url, e.pod_name) for e in discovery.get_pod_endpoint_info())


def test_headless_service_dials_the_target_port(cluster: SimCluster, make_discovery: Any) -> None:
    cluster.add_service("hl", replicas=2, headless=True, port=80)
    discovery = make_discovery(cluster)
    v = wait_routable(discovery, "hl", 2)
    assert v.url == "http://hl.default.svc.cluster.local:8000" == cluster.url_of("hl")
    assert [e.url for e in discovery.get_endpoint_info()] == [v.url]
    assert discovery.get_endpoint_info()[0].model_names  # probed through the headless name


def test_headless_pods_on_different_ports(cluster: SimCluster, make_discovery: Any) -> None:
    cluster.add_service("mixed", replicas=3, headless=True, pod_ports=(8001, 8001, 8002))
    discovery = make_discovery(cluster)
    v = wait_routable(discovery, "mixed", 3)
    assert v.url.endswith(":8001") and "8002 (1 pods)" in (v.note or "")
    assert sorted(p.port for p in v.pods) == [8001, 8001, 8002]


def test_publish_not_ready_addresses_follow_serving(cluster: SimCluster,
                                                    make_discovery: Any) -> None:
    cluster.add_service("lws", replicas=3, headless=True, publish_not_ready=True)
    discovery = make_discovery(cluster, routing="pod")
    wait_routable(discovery, "lws", 3)
    unready = cluster.pods("lws")[0]
    cluster.set_ready(unready, False)
    v = wait_routable(discovery, "lws", 2)
    assert unready.ip not in {p.ip for p in v.ready_pods}
    assert unready.name not in {name for _url, name in pod_entries(discovery)}
    assert len(discovery.get_endpoint_info()) == 2


def test_a_pod_behind_several_services_is_listed_once(cluster: SimCluster,
                                                      make_discovery: Any) -> None:
    owner = cluster.add_service("llama", replicas=2)
    cluster.add_service("llama-peers", replicas=0, headless=True, selector=owner.selector)
    cluster.add_service("all-models", replicas=0, selector={"app": "llama"})
    discovery = make_discovery(cluster, routing="pod")
    for name in ("llama", "llama-peers", "all-models"):
        wait_routable(discovery, name, 2)
    expected = sorted((f"http://{p.ip}:8000", p.name) for p in cluster.pods("llama"))
    assert pod_entries(discovery) == expected
    assert len(discovery.get_snapshot().endpoint_infos) == 3
    cluster.delete_service("all-models")
    wait_for(lambda: view(discovery, "all-models") is None, 10, lambda: state(discovery))
    assert pod_entries(discovery) == expected


def test_dual_stack_pods_are_counted_once_in_the_primary_family(
        cluster: SimCluster, make_discovery: Any) -> None:
    cluster.add_service("ds", replicas=2, dual_stack=True)
    discovery = make_discovery(cluster, routing="pod")
    v = wait_routable(discovery, "ds", 2)
    assert v.ip_family == "IPv4"
    assert sorted(p.ip for p in v.pods) == sorted(p.ip for p in cluster.pods("ds"))
    assert len(discovery.get_endpoint_info()) == 2
    ipv6 = make_discovery(cluster, ip_family="IPv6")
    # the preference: the IPv6 addresses, still once each (loopback has no IPv6 pod addresses,
    # so these pods cannot be probed here: the view, not routability, is what is checked)
    v6 = wait_for(lambda: (v := view(ipv6, "ds")) is not None and len(v.pods) == 2 and v,
                  15.0, lambda: state(ipv6))
    assert v6.ip_family == "IPv6"
    assert sorted(p.ip for p in v6.pods) == sorted(str(p.ipv6) for p in cluster.pods("ds"))


def test_multi_address_endpoint_is_one_pod(cluster: SimCluster, make_discovery: Any) -> None:
    cluster.add_service("multi", replicas=2, extra_addresses=2)
    discovery = make_discovery(cluster, routing="pod")
    v = wait_routable(discovery, "multi", 2)
    assert sorted(p.ip for p in v.pods) == sorted(p.ip for p in cluster.pods("multi"))
    assert len(discovery.get_endpoint_info()) == 2


def test_host_network_pods_sharing_an_ip_are_two_pods(cluster: SimCluster,
                                                      make_discovery: Any) -> None:
    cluster.add_service("hn", replicas=2, host_network=True, pod_ports=(8000, 8001))
    discovery = make_discovery(cluster, routing="pod")
    wait_routable(discovery, "hn", 2)
    assert pod_entries(discovery) == sorted((f"http://{p.ip}:{p.port}", p.name)
                                            for p in cluster.pods("hn"))
    assert len({url.rsplit(":", 1)[0] for url, _ in pod_entries(discovery)}) == 1


def test_named_target_port_resolving_per_pod(cluster: SimCluster, make_discovery: Any) -> None:
    cluster.add_service("named", replicas=3, pod_ports=(8000, 8001))
    discovery = make_discovery(cluster, routing="pod")
    v = wait_routable(discovery, "named", 3)
    assert v.url == cluster.url_of("named")  # a ClusterIP Service: kube-proxy translates
    assert pod_entries(discovery) == sorted((f"http://{p.ip}:{p.port}", p.name)
                                            for p in cluster.pods("named"))


def test_v1_endpoints_subsets_keep_their_ports(cluster: SimCluster,
                                               make_discovery: Any) -> None:
    cluster.api.disable_resource("endpointslices")
    cluster.add_service("named", replicas=3, pod_ports=(8000, 8001))
    discovery = make_discovery(cluster, routing="pod")
    wait_routable(discovery, "named", 3)
    assert pod_entries(discovery) == sorted((f"http://{p.ip}:{p.port}", p.name)
                                            for p in cluster.pods("named"))


def test_portless_headless_service_uses_the_wanted_port(cluster: SimCluster,
                                                        make_discovery: Any) -> None:
    cluster.add_service("any", replicas=2, headless=True, portless=True)
    discovery = make_discovery(cluster, port=8000)
    v = wait_routable(discovery, "any", 2)
    assert v.url == cluster.url_of("any") == "http://any.default.svc.cluster.local:8000"
    assert {p.port for p in v.pods} == {8000}


def test_all_pods_terminating_is_not_routable_though_kube_proxy_still_serves(
        cluster: SimCluster, make_discovery: Any) -> None:
    """kube-proxy falls back to serving-but-terminating endpoints; discovery does not route
    new work to pods that are going away (their Service is not routable meanwhile)."""
    cluster.add_service("drain", replicas=2)
    discovery = make_discovery(cluster)
    wait_routable(discovery, "drain", 2)
    for pod in cluster.pods("drain"):
        cluster.terminate_pod(pod, pre_stop=30.0)  # still serving during its preStop sleep
    wait_for(lambda: not view(discovery, "drain").routable, 10, lambda: state(discovery))
    assert "no ready endpoints" in view(discovery, "drain").reason
    with requests.Session() as session:
        session.trust_env = False
        reply = session.get(cluster.url_of("drain") + "/health", timeout=5,
                            headers={"Connection": "close"})
    assert reply.status_code == 200


def test_shared_pods_count_in_each_services_stats(cluster: SimCluster,
                                                  make_discovery: Any) -> None:
    owner = cluster.add_service("llama", replicas=2)
    cluster.add_service("llama-peers", replicas=0, headless=True, selector=owner.selector)
    discovery = make_discovery(cluster)
    wait_routable(discovery, "llama", 2)
    wait_routable(discovery, "llama-peers", 2)
    scraper = EngineStatsScraper(discovery, scrape_interval=0.2, timeout=1.0)
    try:
        urls = {cluster.url_of("llama"), cluster.url_of("llama-peers")}

        def both_complete() -> bool:
            stats = scraper.get_engine_stats()
            return set(stats) == urls and all(s.pods_scraped == 2 for s in stats.values())

        wait_for(both_complete, 15, lambda: f"stats: {dict(scraper.get_engine_stats())}")
        assert len(scraper.get_pod_engine_stats()) == 2  # each pod scraped once
    finally:
        scraper.close()
