"""K8sServiceDiscovery end to end: simulated API server, DNS, kube-proxy and vLLM engines.

Every test compares the exact endpoint set discovery reports (Service URLs and/or pod URLs)
with what the simulator knows to be true.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping

import pytest

from tests.conftest import FAST_INFORMER, wait_for
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.sim.cluster import DEFAULT_MODEL, SimCluster
from vllm_router_svcdisc.sim.engine import EngineMode

APP_VLLM = {"app": "vllm"}
LONG_WATCHES = dataclasses.replace(FAST_INFORMER, watch_timeout_range=(300, 301))

# --- truth from the simulator and what discovery reports -------------------------------------


def expected_service_urls(
    cluster: SimCluster,
    namespace: str | None = "default",
    selector: Mapping[str, str] = APP_VLLM,
) -> list[str]:
    """Services selected by namespace and labels that have at least one ready pod."""
    return sorted(
        cluster.url_of(s.name, s.namespace)
        for s in cluster.services()
        if (namespace is None or s.namespace == namespace)
        and all(s.labels.get(k) == v for k, v in selector.items())
        and s.ready_pods()
    )


def expected_pod_urls(
    cluster: SimCluster,
    namespace: str | None = "default",
    selector: Mapping[str, str] = APP_VLLM,
) -> list[str]:
    return sorted(
        f"http://{p.ip}:{cluster.engine_port}"
        for s in cluster.services()
        if (namespace is None or s.namespace == namespace)
        and all(s.labels.get(k) == v for k, v in selector.items())
        for p in s.ready_pods()
    )


def service_urls(discovery: K8sServiceDiscovery) -> list[str]:
    """Service-mode entries (what ``get_endpoint_info()`` returns with routing="service")."""
    return sorted(e.url for e in discovery.get_snapshot().endpoint_infos)


def pod_urls(discovery: K8sServiceDiscovery) -> list[str]:
    return sorted(e.url for e in discovery.get_pod_endpoint_info())


def ready_ips(cluster: SimCluster, name: str, namespace: str = "default") -> list[str]:
    return sorted(p.ip for p in cluster.service(name, namespace).ready_pods())


def state(discovery: K8sServiceDiscovery) -> str:
    views = {k: (v.reason, len(v.ready_pods)) for k, v in discovery.get_service_status().items()}
    return (f"services={service_urls(discovery)} pods={pod_urls(discovery)} views={views} "
            f"health={discovery.health()}")


def wait_converged(
    discovery: K8sServiceDiscovery,
    cluster: SimCluster,
    timeout: float = 10.0,
    namespace: str | None = "default",
    selector: Mapping[str, str] = APP_VLLM,
) -> None:
    """Wait until both the Service and the pod endpoint sets equal the simulator's truth."""

    def converged() -> bool:
        return (service_urls(discovery) == expected_service_urls(cluster, namespace, selector)
                and pod_urls(discovery) == expected_pod_urls(cluster, namespace, selector))

    wait_for(converged, timeout, lambda: (
        f"expected services={expected_service_urls(cluster, namespace, selector)} "
        f"pods={expected_pod_urls(cluster, namespace, selector)}; got {state(discovery)}"))
    for info in discovery.get_snapshot().endpoint_infos:
        assert sorted(p.ip for p in info.pods if p.routable) == ready_ips(
            cluster, info.service_name, info.namespace), info


def wait_reason(discovery: K8sServiceDiscovery, key: str, predicate: Callable[[str], bool],
                timeout: float = 10.0) -> str:
    """Wait until the Service ``key`` is not routable for a reason matching ``predicate``."""

    def reason() -> str | None:
        view = discovery.get_service_status().get(key)
        if view is None or view.reason is None:
            return None
        return view.reason if predicate(view.reason) else None

    return wait_for(reason, timeout, lambda: f"no matching reason for {key}: {state(discovery)}")


def svcdisc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("svcdisc") and t.is_alive()]


# --- basics ------------------------------------------------------------------------------------


def test_matching_services_are_routable_with_models_and_ready_pods(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=2)
    cluster.add_service("vllm-b", replicas=3)
    discovery = make_discovery(cluster)
    assert discovery.wait_until_synced(5)

    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [
        "http://vllm-a.default.svc.cluster.local:80",
        "http://vllm-b.default.svc.cluster.local:80",
    ]
    for info in discovery.get_endpoint_info():
        assert info.model_names == [DEFAULT_MODEL]
        assert info.namespace == "default"
        assert info.healthy and not info.sleep
    assert discovery.get_known_models() == {DEFAULT_MODEL}
    assert discovery.has_ever_seen_model(DEFAULT_MODEL)
    assert not discovery.has_ever_seen_model("no-such-model")
    assert discovery.get_health()


def test_pod_routing_lists_one_entry_per_ready_pod(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=3)
    discovery = make_discovery(cluster, routing="pod")
    wait_converged(discovery, cluster)
    infos = discovery.get_endpoint_info()
    assert sorted(e.url for e in infos) == expected_pod_urls(cluster)
    assert {e.pod_name for e in infos} == {p.name for p in cluster.pods("vllm-a")}


def test_service_without_the_selected_label_is_ignored(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("other", labels={"app": "something-else"})
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]
    assert "default/other" not in discovery.get_service_status()


def test_selector_matching_nothing_is_empty_healthy_and_logged_once(cluster, make_discovery,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="vllm_router_svcdisc")
    cluster.add_service("other", labels={"app": "something-else"})
    discovery = make_discovery(cluster)
    assert discovery.wait_until_synced(5)
    assert discovery.get_endpoint_info() == [] and discovery.get_health()
    cluster.add_service("still-other", labels={"app": "nope"})  # events that match nothing
    cluster.api.cut_watches()
    wait_for(lambda: cluster.api.open_watch_count("services") == 1, 5, "no re-watch")
    lines = [r for r in caplog.records if "no Service matches" in r.getMessage()]
    assert len(lines) == 1 and "app=vllm" in lines[0].getMessage()


def test_service_in_another_namespace_is_ignored(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b", namespace="team-b")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]
    assert set(discovery.get_service_status()) == {"default/vllm-a"}


@pytest.mark.parametrize("namespace", [None, "*"])
def test_all_namespaces(cluster, make_discovery, namespace):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b", namespace="team-b")
    cluster.add_service("other", namespace="team-b", labels={"app": "other"})
    discovery = make_discovery(cluster, namespace=namespace)
    wait_converged(discovery, cluster, namespace=None)
    assert service_urls(discovery) == [
        "http://vllm-a.default.svc.cluster.local:80",
        "http://vllm-b.team-b.svc.cluster.local:80",
    ]
    assert "'*'" in repr(discovery)


# --- endpoints: readiness, termination, slices ------------------------------------------------


def test_readiness_flip_in_endpointslice_with_service_untouched(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=2)
    cluster.add_service("vllm-b", replicas=1)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    service_rv = cluster.api.get("services", "default", "vllm-a")["metadata"]["resourceVersion"]
    first, second = cluster.pods("vllm-a")

    cluster.set_ready(first, False)
    wait_converged(discovery, cluster)
    assert pod_urls(discovery) == sorted(
        [f"http://{second.ip}:8000", f"http://{cluster.pods('vllm-b')[0].ip}:8000"])

    cluster.set_ready(second, False)  # 0 ready: the Service leaves the set
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-b")]
    view = discovery.get_service_status()["default/vllm-a"]
    assert view.reason.startswith("no ready endpoints")
    assert len(view.pods) == 2 and view.ready_pods == ()

    cluster.set_ready(first, True)  # back with one pod
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a"), cluster.url_of("vllm-b")]
    now_rv = cluster.api.get("services", "default", "vllm-a")["metadata"]["resourceVersion"]
    assert now_rv == service_rv, "the test must not touch the Service object"


def test_terminating_endpoints_are_excluded(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=3)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    leaving = cluster.pods("vllm-a")[0]

    cluster.terminate_pod(leaving)
    wait_converged(discovery, cluster)
    assert f"http://{leaving.ip}:8000" not in pod_urls(discovery)
    view = discovery.get_service_status()["default/vllm-a"]
    still_listed = {p.ip: p for p in view.pods}
    assert still_listed[leaving.ip].terminating and not still_listed[leaving.ip].routable

    cluster.finish_termination(leaving)
    wait_for(lambda: {p.ip for p in discovery.get_service_status()["default/vllm-a"].pods}
             == {p.ip for p in cluster.pods("vllm-a")}, 5, lambda: state(discovery))
    wait_converged(discovery, cluster)


def test_terminating_endpoint_still_marked_ready_is_excluded(cluster, make_discovery):
    # With publishNotReadyAddresses a terminating endpoint keeps ready=true: only the
    # terminating condition tells.
    cluster.add_service("vllm-a", replicas=2)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    cluster.api.put("endpointslices", {
        "metadata": {"name": "vllm-a-terminating", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "vllm-a"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.99.0.1"],
                       "conditions": {"ready": True, "serving": True, "terminating": True}}],
        "ports": [{"name": "http", "port": 8000}],
    })
    wait_for(lambda: "127.99.0.1" in {p.ip for p in
                                      discovery.get_service_status()["default/vllm-a"].pods},
             5, lambda: state(discovery))
    wait_converged(discovery, cluster)
    assert "http://127.99.0.1:8000" not in pod_urls(discovery)


def test_service_with_more_than_one_hundred_pods_merges_its_slices(cluster, make_discovery):
    cluster.add_service("big", replicas=120)
    assert len(cluster.api.list("endpointslices")) == 2  # 100 + 20
    discovery = make_discovery(cluster, routing="pod")
    wait_converged(discovery, cluster, timeout=15)
    assert len(pod_urls(discovery)) == 120
    view = discovery.get_service_status()["default/big"]
    assert len(view.pods) == 120 and len(view.ready_pods) == 120

    # A pod of the second slice goes unready; then the Service shrinks to one slice.
    cluster.set_ready(cluster.pods("big")[110], False)
    wait_converged(discovery, cluster)
    assert len(pod_urls(discovery)) == 119
    cluster.scale("big", 90)
    assert len(cluster.api.list("endpointslices")) == 1
    wait_converged(discovery, cluster)
    assert len(pod_urls(discovery)) == 90


def test_address_in_two_slices_is_listed_once(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=2)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    duplicated = cluster.pods("vllm-a")[0]
    assert discovery.informer_status()[1].events_by_type.get("ADDED", 0) == 0  # all from LIST
    # An extra slice (as during a controller hand-over) repeats one pod, not ready there.
    cluster.api.put("endpointslices", {
        "metadata": {"name": "vllm-a-extra", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "vllm-a"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [duplicated.ip], "conditions": {"ready": False},
                       "targetRef": {"kind": "Pod", "name": duplicated.name,
                                     "namespace": "default"}}],
        "ports": [{"name": "http", "port": 8000}],
    })
    wait_for(lambda: discovery.informer_status()[1].events_by_type.get("ADDED", 0) >= 1, 5,
             "the extra slice was not delivered")
    # The event is counted before it is applied: wait until the cache holds the extra slice
    # (its view is published under the same lock), so the view below includes it.
    wait_for(lambda: discovery._cache.sizes()["slices"] == 2, 5,
             lambda: f"cache sizes {discovery._cache.sizes()}")
    wait_converged(discovery, cluster)
    view = discovery.get_service_status()["default/vllm-a"]
    assert sorted(p.ip for p in view.pods) == sorted(p.ip for p in cluster.pods("vllm-a"))


def test_slice_with_null_endpoints_and_ports_is_tolerated(cluster, make_discovery):
    # The API server sends null for an empty slice (kubernetes-client #2214/#2423).
    cluster.add_service("vllm-a", replicas=1)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    cluster.api.put("endpointslices", {
        "metadata": {"name": "vllm-a-empty", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "vllm-a"}},
        "addressType": "IPv4", "endpoints": None, "ports": None,
    })
    wait_for(lambda: discovery.informer_status()[1].events_by_type.get("ADDED", 0) >= 1, 5,
             "the empty slice was not delivered")
    cluster.add_pod("vllm-a")  # later changes still flow
    wait_converged(discovery, cluster)
    assert len(pod_urls(discovery)) == 2
    assert discovery.informer_status()[1].malformed_events == 0


# --- the API server misbehaving -------------------------------------------------------------


def test_service_deleted_while_disconnected_and_compacted_disappears(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)

    cluster.api.fail_for(60, 503, verb="watch")  # keep the watches from reconnecting
    cluster.api.cut_watches()
    wait_for(lambda: cluster.api.open_watch_count() == 0, 5, "watches still open")
    cluster.delete_service("vllm-b")
    cluster.api.compact()
    cluster.api.clear_faults()

    wait_for(lambda: set(discovery.get_service_status()) == {"default/vllm-a"}, 10,
             lambda: state(discovery))
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]
    # The Service's removal is the Services informer's re-LIST; the endpoints informer
    # re-lists on its own thread, maybe later: wait for each count that is asserted.
    wait_for(lambda: all(s.relists_by_cause.get("expired", 0) >= 1
                         for s in discovery.informer_status()), 10,
             lambda: f"relists {[s.relists_by_cause for s in discovery.informer_status()]}")
    services, endpoints = discovery.informer_status()
    assert services.relists_by_cause.get("expired", 0) >= 1
    assert endpoints.relists_by_cause.get("expired", 0) >= 1


def test_storm_of_expired_watches_ends_with_the_exact_set(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=2)
    cluster.add_service("vllm-b", replicas=2)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)

    changes = [
        lambda: cluster.add_service("vllm-c", replicas=1),
        lambda: cluster.set_ready(cluster.pods("vllm-a")[0], False),
        lambda: cluster.delete_service("vllm-b"),
        lambda: cluster.scale("vllm-c", 3),
        lambda: cluster.reschedule(cluster.pods("vllm-c")[0]),
        lambda: cluster.set_service_labels("vllm-c", {"app": "vllm", "tier": "gold"}),
    ]
    for change in changes:
        # Each change happens while the watches are down and its history is compacted away,
        # so every reconnect that follows gets 410 and must re-LIST.
        cluster.api.fail_for(60, 503, verb="watch")
        cluster.api.cut_watches()
        wait_for(lambda: cluster.api.open_watch_count() == 0, 5, "watches still open")
        change()
        cluster.api.compact()
        cluster.api.clear_faults()
    wait_converged(discovery, cluster, timeout=15)
    assert service_urls(discovery) == [cluster.url_of("vllm-a"), cluster.url_of("vllm-c")]
    wait_for(lambda: set(discovery.get_service_status()) == {"default/vllm-a", "default/vllm-c"},
             5, lambda: state(discovery))
    for status in discovery.informer_status():
        assert status.relists_by_cause.get("expired", 0) >= 1, status
    wait_for(discovery.get_health, 5, lambda: str(discovery.health()))


def test_api_server_restart(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)

    cluster.api.restart()
    cluster.delete_service("vllm-b")
    cluster.add_service("vllm-c")
    cluster.set_ready(cluster.pods("vllm-a")[0], False)

    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a"), cluster.url_of("vllm-c")]
    wait_for(discovery.get_health, 5, lambda: str(discovery.health()))


def test_forbidden_makes_health_false_naming_rbac_then_recovers(cluster, make_discovery):
    cluster.add_service("vllm-a")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    # an informer marks itself synced after its LIST reached the cache: the converged view
    # can come first, so wait for the health that is asserted
    wait_for(discovery.get_health, 5, lambda: str(discovery.health()))
    assert discovery.get_health()

    cluster.api.fail_for(60, 403)
    cluster.api.cut_watches()
    wait_for(lambda: not discovery.get_health(), 5, "health stayed green under 403")
    reasons = " ".join(discovery.health().reasons)
    assert "forbidden (403)" in reasons and "RBAC" in reasons, reasons
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]  # the cache is kept

    cluster.add_service("vllm-b")  # made while forbidden: must arrive after recovery
    cluster.api.clear_faults()
    wait_for(discovery.get_health, 5, lambda: str(discovery.health()))
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a"), cluster.url_of("vllm-b")]


def test_too_many_requests_on_watch_is_retried(cluster, make_discovery):
    cluster.add_service("vllm-a")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)

    cluster.api.fail_next(2, 429, retry_after=1, verb="watch")
    cluster.api.cut_watches()
    cluster.add_service("vllm-b")
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a"), cluster.url_of("vllm-b")]
    assert discovery.get_health()  # a brief throttle is not unhealthiness


def test_malformed_watch_event_is_skipped(cluster, make_discovery):
    cluster.add_service("vllm-a")
    # A raw line goes only to the watches open when it is injected: with the usual 5-6 s
    # watches, one could end (server timeout) between the wait below and the injection.
    discovery = make_discovery(cluster, informer_config=LONG_WATCHES)
    wait_converged(discovery, cluster)
    assert cluster.api.wait_for_watches(2, timeout=5)

    cluster.api.inject_raw_line(b'{"type": "MODIFIED", "object": {broken')
    cluster.add_service("vllm-b")
    wait_converged(discovery, cluster)
    services, endpoints = discovery.informer_status()
    assert services.malformed_events == 1 and endpoints.malformed_events == 1
    assert services.alive and endpoints.alive
    assert discovery.get_health()


def test_service_label_change_leaves_and_rejoins_the_set(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)

    cluster.set_service_labels("vllm-b", {"app": "retired"})
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]
    assert "default/vllm-b" not in discovery.get_service_status()

    cluster.set_service_labels("vllm-b", {"app": "vllm"})
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a"), cluster.url_of("vllm-b")]


# --- ports -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port_name", "service_port", "wanted"),
    [
        ("metrics-name", 8080, "metrics-name"),
        ("http", 8080, 8080),
        ("http", 80, "80"),
        ("", 9000, None),
        ("http", 80, None),
    ],
    ids=["by-name", "by-number", "numeric-string", "single-unnamed", "default-http"],
)
def test_port_selection(cluster, make_discovery, port_name, service_port, wanted):
    cluster.add_service("vllm-a", port=service_port, port_name=port_name)
    discovery = make_discovery(cluster, port=wanted)
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [f"http://vllm-a.default.svc.cluster.local:{service_port}"]
    assert cluster.url_of("vllm-a").endswith(f":{service_port}")


def test_service_without_the_wanted_port_is_not_routable(cluster, make_discovery):
    cluster.add_service("vllm-a", port=80, port_name="http")
    cluster.add_service("vllm-grpc", port=9000, port_name="grpc")
    discovery = make_discovery(cluster, port="http")
    wait_for(lambda: service_urls(discovery) == [cluster.url_of("vllm-a")], 10,
             lambda: state(discovery))
    reason = wait_reason(discovery, "default/vllm-grpc", lambda r: "port" in r)
    assert "'http'" in reason and "grpc:9000" in reason
    assert discovery.get_service_status()["default/vllm-grpc"].url is None


def test_service_with_two_unnamed_choices_needs_a_port(cluster, make_discovery):
    cluster.add_service("vllm-a", port=8080, port_name="api")
    cluster.set_service_ports("vllm-a", [("api", 8080), ("admin", 9090)])
    discovery = make_discovery(cluster)
    reason = wait_reason(discovery, "default/vllm-a", lambda r: "port" in r)
    assert "api:8080" in reason and "admin:9090" in reason
    assert service_urls(discovery) == []


# --- v1 Endpoints fallback ----------------------------------------------------------------------


def test_endpoints_fallback_when_endpointslices_are_not_served(cluster, make_discovery):
    cluster.api.disable_resource("endpointslices")
    cluster.add_service("vllm-a", replicas=2)
    cluster.add_service("vllm-b", replicas=1)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    # The endpoints WATCH is sent after the LIST was applied, maybe after the probes made
    # the pods routable: wait for the request that is asserted.
    wait_for(lambda: cluster.api.request_counts().get(("watch", "endpoints"), 0) >= 1, 5,
             lambda: f"requests {cluster.api.request_counts()}")
    counts = cluster.api.request_counts()
    assert counts.get(("list", "endpoints"), 0) >= 1
    assert counts.get(("watch", "endpoints"), 0) >= 1

    first = cluster.pods("vllm-a")[0]
    cluster.set_ready(first, False)
    wait_converged(discovery, cluster)
    assert f"http://{first.ip}:8000" not in pod_urls(discovery)
    cluster.set_ready(cluster.pods("vllm-b")[0], False)
    wait_converged(discovery, cluster)
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]
    cluster.set_ready(first, True)
    cluster.set_ready(cluster.pods("vllm-b")[0], True)
    wait_converged(discovery, cluster)
    assert len(pod_urls(discovery)) == 3


# --- model probes ------------------------------------------------------------------------------


def test_unreachable_engine_keeps_its_last_models_but_a_bad_answer_drops_them(
        cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=1)
    (pod,) = cluster.pods("vllm-a")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    url = cluster.url_of("vllm-a")

    def probe_reason() -> str:
        probe = discovery.get_service_status()["default/vllm-a"].pod_probes.get(
            f"http://{pod.ip}:{pod.engine.port}")
        return (probe.reason or "") if probe is not None else ""

    pod.engine.mode = EngineMode.BLACKHOLE  # re-probes time out; the pod stays ready
    wait_for(lambda: "keeping the models" in probe_reason(), 15, probe_reason)
    assert service_urls(discovery) == [url]
    pod.engine.mode = EngineMode.GARBAGE  # an answer that says the engine is broken
    wait_reason(discovery, "default/vllm-a", lambda r: "invalid JSON" in r, timeout=15)
    assert service_urls(discovery) == []
    pod.engine.mode = EngineMode.OK
    wait_converged(discovery, cluster, timeout=15)


def test_garbage_models_answer_makes_service_unroutable_until_fixed(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)

    for pod in cluster.pods("vllm-b"):
        pod.engine.mode = EngineMode.GARBAGE
    reason = wait_reason(discovery, "default/vllm-b", lambda r: "probe failed" in r)
    assert "invalid JSON" in reason
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]

    for pod in cluster.pods("vllm-b"):
        pod.engine.mode = EngineMode.OK
    wait_converged(discovery, cluster)
    assert discovery.get_service_status()["default/vllm-b"].reason is None


def test_service_name_that_does_not_resolve_is_unroutable_naming_dns(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b")
    cluster.dns.unregister("default", "vllm-b")
    discovery = make_discovery(cluster)
    wait_for(lambda: service_urls(discovery) == [cluster.url_of("vllm-a")], 10,
             lambda: state(discovery))
    reason = wait_reason(discovery, "default/vllm-b", lambda r: "does not resolve" in r)
    assert "DNS" in reason and "vllm-b.default.svc.cluster.local" in reason, reason


def test_api_key_missing_then_given(cluster, make_discovery, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    cluster.add_service("vllm-a", api_key="s3cret")

    without_key = make_discovery(cluster)
    reason = wait_reason(without_key, "default/vllm-a", lambda r: "probe failed" in r)
    assert "VLLM_API_KEY" in reason and "401" in reason
    assert service_urls(without_key) == []

    with_key = make_discovery(cluster, api_key="s3cret")
    wait_converged(with_key, cluster)
    assert service_urls(with_key) == [cluster.url_of("vllm-a")]

    cluster.api.fail_for(60, 403)  # also produce API error reasons and log lines
    cluster.api.cut_watches()
    wait_for(lambda: not with_key.get_health(), 5, "health stayed green")
    cluster.api.clear_faults()
    texts = [caplog.text, repr(with_key), repr(without_key), str(with_key.health()),
             repr(with_key.get_endpoint_info()), repr(with_key.get_service_status())]
    for text in texts:
        assert "s3cret" not in text


def test_api_key_from_environment(cluster, make_discovery, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "s3cret")
    cluster.add_service("vllm-a", api_key="s3cret")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)


def test_lora_adapters_are_reported(cluster, make_discovery):
    cluster.add_service("vllm-a", lora_adapters=["sql-lora", "chat-lora"])
    cluster.add_service("vllm-b")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    infos = {e.service_name: e for e in discovery.get_endpoint_info()}
    assert sorted(infos["vllm-a"].get_adapters()) == ["chat-lora", "sql-lora"]
    assert infos["vllm-a"].get_base_models() == [DEFAULT_MODEL]
    assert sorted(infos["vllm-a"].get_adapters_for_model(DEFAULT_MODEL)) == [
        "chat-lora", "sql-lora"]
    assert infos["vllm-a"].has_model("sql-lora")
    assert infos["vllm-b"].get_adapters() == []
    assert discovery.get_known_models() == {DEFAULT_MODEL, "sql-lora", "chat-lora"}


# --- identity, lifecycle, concurrency ----------------------------------------------------------


def test_id_and_added_timestamp_are_stable_across_updates(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=2)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    (before,) = discovery.get_endpoint_info()
    pods_before = {e.url: e.Id for e in discovery.get_pod_endpoint_info()}
    version = discovery.get_snapshot().version

    cluster.scale("vllm-a", 3)
    wait_converged(discovery, cluster)
    wait_for(lambda: discovery.get_snapshot().version > version, 5, "no new snapshot")
    (after,) = discovery.get_endpoint_info()
    assert after is not before  # rebuilt ...
    assert len(after.pods) == 3
    assert after.Id == before.Id  # ... with the same identity
    assert after.added_timestamp == before.added_timestamp
    pods_after = {e.url: e.Id for e in discovery.get_pod_endpoint_info()}
    assert {u: pods_after[u] for u in pods_before} == pods_before

    other = make_discovery(cluster)  # the Id is derived from the Service, not random
    wait_converged(other, cluster)
    assert other.get_endpoint_info()[0].Id == before.Id


def test_close_is_fast_and_leaves_no_threads(cluster, make_discovery):
    cluster.add_service("vllm-a")
    cluster.add_service("vllm-b")
    hanging = cluster.add_service("vllm-slow")
    for pod in hanging.pods.values():
        pod.engine.mode = EngineMode.BLACKHOLE  # a probe is stuck in a read while closing
    discovery = make_discovery(cluster)
    wait_for(lambda: len(service_urls(discovery)) == 2, 10, lambda: state(discovery))
    assert svcdisc_threads()

    started = time.monotonic()
    discovery.close()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"close() took {elapsed:.2f}s"
    wait_for(lambda: not svcdisc_threads(), 3,
             lambda: f"threads still alive: {svcdisc_threads()}")
    assert not discovery.get_health()
    assert discovery.health().reasons == ("closed",)
    discovery.close()  # idempotent


def test_concurrent_readers_never_see_a_torn_snapshot(cluster, make_discovery):
    cluster.add_service("vllm-a", replicas=2)
    cluster.add_service("vllm-b", replicas=2)
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def check_once() -> None:
        snapshot = discovery.get_snapshot()
        infos = discovery.get_endpoint_info()
        pods = discovery.get_pod_endpoint_info()
        for name, entries in (("service", infos), ("pod", pods)):
            urls = [e.url for e in entries]
            if len(urls) != len(set(urls)):
                problems.append(f"duplicate {name} urls: {urls}")
            for e in entries:
                if not e.model_names:
                    problems.append(f"{e.url} without models")
                if not any(p.routable for p in e.pods):
                    problems.append(f"{e.url} without a ready pod")
        for e in pods:
            if len(e.pods) != 1 or e.pods[0].url != e.url:
                problems.append(f"pod entry {e.url} does not describe one pod")
        routable = {k for k, v in snapshot.services.items() if v.endpoint_info is not None}
        listed = {f"{e.namespace}/{e.service_name}" for e in snapshot.endpoint_infos}
        if routable != listed:
            problems.append(f"snapshot views {routable} != endpoint list {listed}")
        by_service = {f"{e.namespace}/{e.service_name}": e for e in snapshot.endpoint_infos}
        for e in snapshot.pod_infos:
            owner = by_service.get(f"{e.namespace}/{e.service_name}")
            if owner is None or e.pods[0] not in owner.pods:
                problems.append(f"pod {e.url} not behind a listed Service")

    def reader() -> None:
        while not stop.is_set():
            try:
                check_once()
            except Exception as exc:  # any exception is a failure
                problems.append(f"reader raised {exc!r}")
                return
            reads[0] += 1

    readers = [threading.Thread(target=reader, name=f"reader-{i}") for i in range(4)]
    for thread in readers:
        thread.start()
    try:
        for i in range(8):
            cluster.scale("vllm-a", 3 + i % 3)
            cluster.set_ready(cluster.pods("vllm-b")[0], i % 2 == 1)
            cluster.add_service(f"vllm-c{i}", replicas=1)
            if i:
                cluster.delete_service(f"vllm-c{i - 1}")
            cluster.reschedule(cluster.pods("vllm-a")[0])
        wait_converged(discovery, cluster, timeout=15)
        # the readers' count grows on their own threads: wait for it, not for convergence
        wait_for(lambda: reads[0] > 100 or problems, 10, lambda: f"{reads[0]} reads")
    finally:
        stop.set()
        for thread in readers:
            thread.join(5)
    assert not problems, problems[:5]
    assert reads[0] > 100


def test_endpoint_list_refuses_mutation(cluster, make_discovery):
    cluster.add_service("vllm-a")
    discovery = make_discovery(cluster)
    wait_converged(discovery, cluster)
    infos = discovery.get_endpoint_info()
    with pytest.raises(TypeError):
        infos.append(infos[0])
    with pytest.raises(TypeError):
        infos[0] = infos[0]
    with pytest.raises(TypeError):
        del infos[0]
    with pytest.raises(TypeError):
        infos.clear()
    with pytest.raises(TypeError):
        infos += infos
    with pytest.raises(TypeError):
        discovery.get_pod_endpoint_info().pop()
    assert service_urls(discovery) == [cluster.url_of("vllm-a")]
    copied = list(infos)
    copied.append(infos[0])  # a copy is the caller's own
    assert len(copied) == 2


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"routing": "random"}, ValueError),
        ({"port": 3.5}, TypeError),
        ({"port": True}, TypeError),
        ({"port": ["http"]}, TypeError),
        ({"port": 0}, ValueError),
        ({"port": 70000}, ValueError),
        ({"watcher_timeout_seconds": -1}, ValueError),
    ],
)
def test_constructor_rejects_bad_arguments(cluster, make_discovery, kwargs, error):
    with pytest.raises(error):
        make_discovery(cluster, **kwargs)
    assert not svcdisc_threads() or wait_for(lambda: not svcdisc_threads(), 3,
                                              lambda: f"threads: {svcdisc_threads()}")
