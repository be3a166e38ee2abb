"""Discovery scenarios, each run on the simulator and on the real control plane.

One scenario, two backends: every test takes ``backend`` (parametrized ``sim`` / ``real``) and
asserts the same outcome — discovery's Service and pod endpoint sets equal the backend's own
record of which pods are ready and not terminating.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kubernetes.client
import pytest

from tests.conftest import wait_for
from tests.realcluster.backends import Backend, RealBackend
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import ENGINE_PORT

#: Deadline for discovery to reflect a change: a few seconds on an idle machine (see the
#: durations in docs/testing.md); generous so a loaded 2-core machine does not fail the test.
CONVERGE = 60.0

Discover = Callable[..., K8sServiceDiscovery]


def service_urls(d: K8sServiceDiscovery) -> list[str]:
    return sorted(e.url for e in d.get_snapshot().endpoint_infos)


def pod_urls(d: K8sServiceDiscovery) -> list[str]:
    return sorted(e.url for e in d.get_pod_endpoint_info())


def routable_ips(d: K8sServiceDiscovery, url: str) -> list[str]:
    for info in d.get_snapshot().endpoint_infos:
        if info.url == url:
            return sorted(p.ip for p in info.pods if p.routable)
    return []


def wait_converged(d: K8sServiceDiscovery, b: Backend, services: Sequence[str],
                   timeout: float = CONVERGE) -> None:
    """Wait until discovery's view equals the backend's truth for ``services``."""

    def expected() -> tuple[list[str], list[str], dict[str, list[str]]]:
        ready = {s: b.ready_ips(s) for s in services}
        urls = sorted(b.url_of(s) for s in services if ready[s])
        pods = sorted({f"http://{ip}:{ENGINE_PORT}" for ips in ready.values() for ip in ips})
        return urls, pods, {b.url_of(s): ips for s, ips in ready.items() if ips}

    def seen() -> tuple[list[str], list[str], dict[str, list[str]]]:
        urls = service_urls(d)
        return urls, pod_urls(d), {u: routable_ips(d, u) for u in urls}

    def why() -> str:
        views = {k: (v.reason, len(v.ready_pods)) for k, v in d.get_service_status().items()}
        return (f"[{b.name}] expected {expected()}, discovery has {seen()}; views={views} "
                f"health={d.health()}")

    wait_for(lambda: seen() == expected(), timeout, why)


# --- scenarios --------------------------------------------------------------------------------


def test_readiness_flip(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a", replicas=3)
    d = discover(backend)
    assert d.wait_until_synced(CONVERGE)
    wait_converged(d, backend, ["vllm-a"])
    first = backend.pods("vllm-a")[0]
    backend.set_ready(first, False)
    wait_converged(d, backend, ["vllm-a"])
    assert backend.pod_ip(first) not in routable_ips(d, backend.url_of("vllm-a"))
    backend.set_ready(first, True)
    wait_converged(d, backend, ["vllm-a"])
    assert len(routable_ips(d, backend.url_of("vllm-a"))) == 3
    assert d.get_health()


def test_scale_up_and_down(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a", replicas=2)
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a"])
    backend.scale("vllm-a", 5)
    wait_converged(d, backend, ["vllm-a"])
    assert len(routable_ips(d, backend.url_of("vllm-a"))) == 5
    backend.scale("vllm-a", 1)
    wait_converged(d, backend, ["vllm-a"])
    assert len(routable_ips(d, backend.url_of("vllm-a"))) == 1


def test_every_pod_unready_makes_the_service_unroutable(backend: Backend,
                                                         discover: Discover) -> None:
    backend.add_service("vllm-a", replicas=2)
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a"])
    for pod in backend.pods("vllm-a"):
        backend.set_ready(pod, False)
    wait_converged(d, backend, ["vllm-a"])
    assert service_urls(d) == [] and pod_urls(d) == []


def converged_pair(backend: Backend, discover: Discover, other: str,
                   replicas: int) -> tuple[K8sServiceDiscovery, set[str]]:
    """Services ``vllm-a`` (2 pods) and ``other``, discovery converged on them; returns it and
    vllm-a's pod addresses."""
    backend.add_service("vllm-a", replicas=2)
    backend.add_service(other, replicas=replicas)
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a", other])
    return d, {backend.pod_ip(p) for p in backend.pods("vllm-a")}


def test_delete_and_recreate(backend: Backend, discover: Discover) -> None:
    d, old = converged_pair(backend, discover, "vllm-b", 1)
    backend.delete_service("vllm-a")
    wait_for(lambda: service_urls(d) == [backend.url_of("vllm-b")], CONVERGE,
             lambda: f"[{backend.name}] vllm-a still listed: {service_urls(d)}")
    backend.add_service("vllm-a", replicas=2)
    wait_converged(d, backend, ["vllm-a", "vllm-b"])
    assert not old & set(routable_ips(d, backend.url_of("vllm-a")))


def test_rolling_update_with_terminating_pods(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a", replicas=3)
    d = discover(backend, routing="pod")
    wait_converged(d, backend, ["vllm-a"])
    for old in backend.pods("vllm-a"):
        new = backend.add_pod("vllm-a")
        wait_converged(d, backend, ["vllm-a"])
        backend.terminate(old)  # graceful: the endpoint turns terminating, the pod stays
        wait_converged(d, backend, ["vllm-a"])
        assert f"http://{backend.pod_ip(old)}:{ENGINE_PORT}" not in pod_urls(d)
        assert f"http://{backend.pod_ip(new)}:{ENGINE_PORT}" in pod_urls(d)
        backend.finish(old)
    wait_converged(d, backend, ["vllm-a"])
    assert len(pod_urls(d)) == 3


def test_headless_service(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-h", replicas=2, headless=True)
    d = discover(backend)
    wait_converged(d, backend, ["vllm-h"])
    assert service_urls(d) == [f"http://vllm-h.{backend.namespace}.svc.cluster.local:8000"]
    backend.set_ready(backend.pods("vllm-h")[0], False)
    wait_converged(d, backend, ["vllm-h"])


def test_publish_not_ready_addresses_follow_serving(backend: Backend,
                                                    discover: Discover) -> None:
    backend.add_service("lws", replicas=3, headless=True, publish_not_ready=True)
    d = discover(backend, routing="pod")
    wait_converged(d, backend, ["lws"])
    unready = backend.pods("lws")[0]
    backend.set_ready(unready, False)
    wait_converged(d, backend, ["lws"])
    assert f"http://{backend.pod_ip(unready)}:{ENGINE_PORT}" not in pod_urls(d)
    assert len(pod_urls(d)) == 2


def test_two_services_over_one_pod_set(backend: Backend, discover: Discover) -> None:
    backend.add_service("llama", replicas=2)
    backend.add_service("llama-peers", replicas=0, headless=True,
                        selector=backend.selector_of("llama"))
    d = discover(backend, routing="pod")
    wait_converged(d, backend, ["llama", "llama-peers"])
    assert len(pod_urls(d)) == 2  # each pod once, though behind two Services
    assert len(d.get_snapshot().endpoint_infos) == 2
    backend.set_ready(backend.pods("llama")[0], False)
    wait_converged(d, backend, ["llama", "llama-peers"])
    backend.delete_service("llama-peers")
    wait_converged(d, backend, ["llama"])


def test_service_past_one_hundred_endpoints(backend: Backend, discover: Discover) -> None:
    backend.add_service("big", replicas=105)
    d = discover(backend, routing="pod")
    wait_converged(d, backend, ["big"], timeout=90)
    assert len(pod_urls(d)) == 105
    backend.scale("big", 98)
    wait_converged(d, backend, ["big"], timeout=90)
    assert len(pod_urls(d)) == 98


def test_service_port_change(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a", replicas=2)
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a"])
    backend.set_service_ports("vllm-a", [("http", 8080)])
    wait_for(lambda: service_urls(d) == [backend.url_of("vllm-a")], CONVERGE,
             lambda: f"[{backend.name}] {service_urls(d)} != [{backend.url_of('vllm-a')}]")
    assert backend.url_of("vllm-a").endswith(":8080")
    wait_converged(d, backend, ["vllm-a"])


@pytest.mark.parametrize("backend", ["real"], indirect=True)
def test_real_backend_is_the_real_control_plane(backend: Backend) -> None:
    """Guard: the ``real`` parameter really is the kube-apiserver (not a simulator)."""
    assert isinstance(backend, RealBackend)
    version = kubernetes.client.VersionApi(backend.admin).get_code()
    assert version.git_version == "v1.37.2", version


def test_service_selector_change(backend: Backend, discover: Discover) -> None:
    d, old = converged_pair(backend, discover, "pool-b", 3)
    backend.set_selector("vllm-a", backend.selector_of("pool-b"))
    wait_converged(d, backend, ["vllm-a", "pool-b"])
    moved = routable_ips(d, backend.url_of("vllm-a"))
    assert moved == routable_ips(d, backend.url_of("pool-b")) and len(moved) == 3
    assert not old & set(moved) and len(pod_urls(d)) == 3


def test_scraper_follows_the_ready_pods(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a", replicas=3)
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a"])
    scraper = EngineStatsScraper(d, scrape_interval=0.25, timeout=2.0)
    try:
        def pods_scraped() -> list[str]:
            return sorted(scraper.get_pod_engine_stats())

        def ready_pod_urls() -> list[str]:
            return sorted(f"http://{ip}:{ENGINE_PORT}" for ip in backend.ready_ips("vllm-a"))

        wait_for(lambda: pods_scraped() == ready_pod_urls(), CONVERGE,
                 lambda: f"[{backend.name}] scraped {pods_scraped()} != {ready_pod_urls()}")
        assert backend.url_of("vllm-a") in scraper.get_engine_stats()
        backend.set_ready(backend.pods("vllm-a")[0], False)
        wait_for(lambda: pods_scraped() == ready_pod_urls(), CONVERGE,
                 lambda: f"[{backend.name}] scraped {pods_scraped()} != {ready_pod_urls()}")
        assert len(pods_scraped()) == 2
    finally:
        scraper.close()


def test_dead_node_pods_leave_the_pod_view_while_kubernetes_keeps_them_ready(
        backend: Backend, discover: Discover) -> None:
    """A node dies at the network level (its engines' connections time out). Kubernetes keeps
    the pods Ready (on the real control plane no node lifecycle controller runs; in the
    simulator its grace period does not end within the scenario), so the endpoints stay ready;
    the outlier policy drops them from the pod view, and they return when the node does."""
    backend.add_service("vllm-a", replicas=3)
    d = discover(backend, routing="pod")
    wait_converged(d, backend, ["vllm-a"])
    victim = backend.pods("vllm-a")[0]
    node = backend.node_of(victim)
    assert backend.kill_node(node) == [victim]  # one pod per node
    dead = f"http://{backend.pod_ip(victim)}:{ENGINE_PORT}"
    live = sorted(set(pod_urls(d)) - {dead})
    assert len(live) == 2

    wait_for(lambda: pod_urls(d) == live, CONVERGE,
             lambda: f"[{backend.name}] pod view {pod_urls(d)}, expected {live}")
    view = d.get_service_status()[f"{backend.namespace}/vllm-a"]
    assert backend.pod_ip(victim) in backend.ready_ips("vllm-a")  # Kubernetes: still ready
    assert len(view.ready_pods) == 3
    state = {p.url: (p.state, p.reason or "") for p in view.pods}[dead]
    assert state[0] == "ejected" and state[1].startswith("connect_timeout"), state

    assert backend.revive_node(node) == [victim]
    wait_converged(d, backend, ["vllm-a"])
    assert len(pod_urls(d)) == 3
