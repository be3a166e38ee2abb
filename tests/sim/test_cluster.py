"""The cluster model keeps Services, Pods, EndpointSlices and Endpoints consistent."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.conftest import wait_for
from vllm_router_svcdisc.sim.cluster import SimCluster


def _slice_endpoints(cluster: SimCluster, name: str) -> dict[str, dict]:
    found = {}
    for item in cluster.api.list("endpointslices", "default"):
        if item["metadata"]["labels"]["kubernetes.io/service-name"] == name:
            for endpoint in item.get("endpoints") or []:
                found[endpoint["addresses"][0]] = endpoint["conditions"]
    return found


def test_terminating_pod_shows_terminating_not_ready_then_goes(cluster: SimCluster) -> None:
    cluster.add_service("alpha", replicas=2)
    pod = cluster.pods("alpha")[0]
    cluster.terminate_pod(pod)
    assert _slice_endpoints(cluster, "alpha")[pod.ip] == {
        "ready": False, "serving": True, "terminating": True}
    # v1 Endpoints drop a terminating pod at once (the real endpoints controller does)
    endpoints = cluster.api.get("endpoints", "default", "alpha")
    listed = [a["ip"] for subset in endpoints["subsets"]
              for key in ("addresses", "notReadyAddresses") for a in subset.get(key, [])]
    assert pod.ip not in listed and len(listed) == 1
    cluster.finish_termination(pod)
    assert pod.ip not in _slice_endpoints(cluster, "alpha")
    assert cluster.api.get("pods", "default", pod.name) is None


def test_endpoints_beyond_slice_capacity_spread_over_several_slices(cluster: SimCluster) -> None:
    cluster.add_service("wide", replicas=0)
    cluster.slice_capacity = 40  # the real controller's is 100; 40 keeps the test small
    cluster.scale("wide", 90)
    slices = [s for s in cluster.api.list("endpointslices", "default")
              if s["metadata"]["labels"]["kubernetes.io/service-name"] == "wide"]
    assert sorted(len(s["endpoints"]) for s in slices) == [10, 40, 40]
    assert len(_slice_endpoints(cluster, "wide")) == 90


def test_deleting_a_service_removes_its_slices_endpoints_and_pods(cluster: SimCluster) -> None:
    cluster.add_service("gone", replicas=2)
    cluster.delete_service("gone")
    assert cluster.api.list("services", "default") == []
    assert cluster.api.list("endpointslices", "default") == []
    assert cluster.api.list("endpoints", "default") == []
    assert cluster.api.list("pods", "default") == []


def test_rolling_restart_through_the_service_name_fails_only_racing_an_idle_close(
        cluster: SimCluster) -> None:
    """At SIGTERM the engine closes its listener and idle connections and answers the request
    in flight with ``Connection: close`` (uvicorn), so a keep-alive client reconnects through
    the proxy, which already excludes the terminating pod, to a ready one.  The one request a
    termination can cost is the one sent just as its idle connection closes (the keep-alive
    race every HTTP/1.1 client has): never a refused connection, at most one per SIGTERM."""
    cluster.add_service("alpha", replicas=2)
    url = cluster.url_of("alpha") + "/v1/completions"
    stop = threading.Event()
    results: dict[str, int] = {"sent": 0}
    errors: list[str] = []

    def client() -> None:
        session = requests.Session()
        session.trust_env = False
        for _ in range(100_000):
            if stop.is_set():
                break
            results["sent"] += 1
            try:
                session.post(url, json={"prompt": "hi"}, timeout=5).raise_for_status()
            except requests.RequestException as exc:
                errors.append(str(exc))
        session.close()

    worker = threading.Thread(target=client)
    worker.start()
    terminations = 4
    try:
        for _ in range(terminations):
            old = next(p for p in cluster.pods("alpha") if not p.terminating)
            cluster.terminate_pod(old)
            cluster.add_pod("alpha")
            before = results["sent"]
            wait_for(lambda before=before: results["sent"] > before + 20, 10, "no traffic")
            cluster.finish_termination(old)
    finally:
        stop.set()
        worker.join(10)
    assert results["sent"] > 80 and len(errors) <= terminations, (results, errors)
    assert not [e for e in errors if "refused" in e], errors


def test_prestop_keeps_the_engine_serving_while_its_endpoint_is_terminating(
        cluster: SimCluster) -> None:
    cluster.add_service("alpha", replicas=2)
    pod = cluster.pods("alpha")[0]
    session = requests.Session()
    session.trust_env = False
    try:
        assert session.get(pod.engine.url + "/health", timeout=5).status_code == 200
        cluster.terminate_pod(pod, pre_stop=1.0)
        assert _slice_endpoints(cluster, "alpha")[pod.ip]["terminating"] is True
        # during preStop: pooled and new connections are served as before (no close)
        reply = session.get(pod.engine.url + "/health", timeout=5)
        assert reply.status_code == 200 and reply.headers.get("Connection") != "close"
        assert requests.get(pod.engine.url + "/health", timeout=5).status_code == 200
        wait_for(lambda: not pod.engine.is_listening, 10, "no SIGTERM after the preStop sleep")
        with pytest.raises(requests.ConnectionError):
            requests.get(pod.engine.url + "/health", timeout=5)
    finally:
        session.close()


def test_without_prestop_sigterm_comes_with_the_endpoint_update(cluster: SimCluster) -> None:
    cluster.add_service("alpha", replicas=2)
    pod = cluster.pods("alpha")[0]
    cluster.terminate_pod(pod)
    assert _slice_endpoints(cluster, "alpha")[pod.ip]["terminating"] is True
    assert not pod.engine.is_listening


def test_a_selector_change_moves_the_service_to_the_pods_it_now_matches(
        cluster: SimCluster) -> None:
    own = cluster.add_service("alpha", replicas=2)
    other = cluster.add_service("beta", replicas=3)
    cluster.set_service_selector("alpha", other.selector)
    assert sorted(p.name for p in cluster.pods("alpha")) == sorted(
        p.name for p in cluster.pods("beta"))
    assert set(_slice_endpoints(cluster, "alpha")) == {p.ip for p in cluster.pods("beta")}
    assert cluster.api.get("services", "default", "alpha")["spec"]["selector"] == other.selector
    cluster.add_pod("beta")  # a new matching pod joins both
    assert len(_slice_endpoints(cluster, "alpha")) == 4
    assert own.selector == other.selector
