"""Fault storms on the API server side, each ending with an exact check against the simulator.

Every test runs discovery and the scraper through a :class:`Harness`: a reader calls every
``get_*()`` throughout, and ``finish()`` checks that nothing escaped, no thread died or logged a
crash, every loop thread is alive, and ``close()`` returns within 2 s.  The end state is compared
with the simulator's truth: the routable Service URLs, the ready pod URLs, the set of selected
Services (no ghost, none missing) and per-pod / per-Service stats.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for
from tests.reliability import Harness, harnessed, pace
from vllm_router_svcdisc.sim.cluster import SimCluster

STORM_SECONDS = 10.0


@pytest.fixture
def harness(cluster: SimCluster, caplog: pytest.LogCaptureFixture) -> Iterator[Harness]:
    cluster.add_service("vllm-a", replicas=2)
    cluster.add_service("vllm-b", replicas=2)
    cluster.add_service("vllm-c", replicas=1)
    with harnessed(cluster, caplog) as h:
        h.wait_exact()
        yield h


class Churn:
    """Pod and Service churn, one step at a time (deterministic order, seeded choices)."""

    def __init__(self, cluster: SimCluster, seed: int = 7) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.steps = 0

    def step(self) -> str:
        c = self.cluster
        kind = self.steps % 6
        self.steps += 1
        if kind == 0:
            pod = self.rng.choice(c.pods("vllm-a"))
            c.set_ready(pod, not pod.ready)
            return "readiness flip"
        if kind == 1:
            c.reschedule(self.rng.choice(c.pods("vllm-b")))
            return "reschedule"
        if kind == 2:
            live = [p for p in c.pods("vllm-c") if not p.terminating]
            c.scale("vllm-c", 1 + (len(live) % 3))
            return "scale"
        if kind == 3:
            if any(s.name == "vllm-x" for s in c.services()):
                c.delete_service("vllm-x")
                return "delete service"
            c.add_service("vllm-x", replicas=1)
            return "add service"
        if kind == 4:
            old = c.pods("vllm-b")[0]
            c.terminate_pod(old)
            c.add_pod("vllm-b")
            c.finish_termination(old)
            return "graceful replace"
        for pod in c.pods("vllm-a"):  # everything ready again, so vllm-a keeps a ready pod
            if not pod.ready:
                c.set_ready(pod, True)
        return "all ready"


def both_watching(cluster: SimCluster, timeout: float = 10.0) -> None:
    for resource in ("services", "endpointslices"):
        assert cluster.api.wait_for_watches(1, resource, timeout), f"no {resource} watch"


def test_watch_streams_cut_every_few_hundred_ms_while_pods_churn(harness, cluster):
    churn = Churn(cluster)
    rng = random.Random(11)
    cuts = 0
    deadline = time.monotonic() + STORM_SECONDS
    for _ in range(100):
        if time.monotonic() >= deadline:
            break
        churn.step()
        cluster.api.cut_watches()
        cuts += 1
        pace(rng.uniform(0.2, 0.4))
    assert cuts >= 20
    harness.wait_exact()
    services, endpoints = harness.discovery.informer_status()
    assert services.watches >= 5 and endpoints.watches >= 5, (services, endpoints)
    harness.finish()


def test_api_server_restarted_several_times_on_the_same_port(harness, cluster):
    churn = Churn(cluster)
    port = cluster.api.port
    for _ in range(4):
        cluster.api.restart()
        assert cluster.api.port == port
        churn.step()
        churn.step()
        both_watching(cluster)
        harness.wait_endpoints_exact()
    harness.wait_exact()
    harness.finish()


def test_history_compacted_repeatedly_so_every_reconnect_gets_410(harness, cluster):
    churn = Churn(cluster)
    before = [s.relists_by_cause.get("expired", 0) for s in harness.discovery.informer_status()]
    # Every watch request answers 410 Expired for a while (as after a long partition), and the
    # history is compacted under the informers again and again while objects change.
    cluster.api.fail_for(4.0, 410, verb="watch")
    deadline = time.monotonic() + 4.0
    for _ in range(40):
        if time.monotonic() >= deadline:
            break
        churn.step()
        cluster.api.compact()
        cluster.api.cut_watches()
        pace(0.25)
    for _ in range(3):  # and with the fault over: compacted right under each live watch
        both_watching(cluster)
        churn.step()
        cluster.api.compact()
        cluster.api.cut_watches()
    harness.wait_exact()
    after = [s.relists_by_cause.get("expired", 0) for s in harness.discovery.informer_status()]
    assert all(a - b >= 3 for a, b in zip(after, before, strict=True)), (before, after)
    harness.finish()


def test_500s_and_429s_with_retry_after_mixed_into_the_storm(harness, cluster):
    churn = Churn(cluster)
    for i in range(8):
        if i % 2:
            cluster.api.fail_next(2, 429, retry_after=1)
        else:
            cluster.api.fail_next(3, 500)
        cluster.api.cut_watches()
        churn.step()
        pace(0.3)
    cluster.api.fail_for(1.0, 500, verb="list")
    cluster.api.compact()  # the next watch gets 410, and the LIST that follows a 500
    cluster.api.cut_watches()
    churn.step()
    harness.wait_exact()
    counts = cluster.api.request_counts()
    assert counts.get(("watch", "services"), 0) >= 8
    harness.finish()


def test_forbidden_403_starts_and_stops_by_itself_health_follows_logs_once(harness, cluster):
    discovery = harness.discovery
    assert discovery.get_health()
    watches_before = sum(n for (verb, _), n in cluster.api.request_counts().items()
                         if verb == "watch")
    cluster.api.fail_for(3.0, 403)
    cluster.api.cut_watches()
    wait_for(lambda: not discovery.get_health(), 5, "health stayed green under 403")
    reasons = " ".join(discovery.health().reasons)
    assert "forbidden (403)" in reasons and "RBAC" in reasons, reasons
    routable = harness.discovery.get_snapshot().endpoint_infos
    assert len(routable) == 3  # the cache is kept while forbidden
    cluster.add_service("vllm-d", replicas=1)  # made while forbidden: arrives after
    # Several retry cycles while forbidden ...
    wait_for(lambda: sum(n for (verb, _), n in cluster.api.request_counts().items()
                         if verb == "watch") >= watches_before + 6, 5, "no retries")
    # ... and recovery without anyone clearing the fault.
    wait_for(discovery.get_health, 10, lambda: str(discovery.health()))
    harness.wait_exact()
    # each informer logs "healthy again" after it cleared the error health reads
    wait_for(lambda: all(harness.records(f"{r}: list/watch healthy again")
                         for r in ("services", "endpointslices")), 5,
             lambda: str([r.getMessage() for r in harness.records("list/watch")]))
    for resource in ("services", "endpointslices"):
        failing = harness.records(f"{resource}: list/watch failing", logging.ERROR)
        assert len(failing) == 1, [r.getMessage() for r in failing]
        healed = harness.records(f"{resource}: list/watch healthy again")
        assert len(healed) == 1, [r.getMessage() for r in healed]
    harness.finish()


def test_malformed_json_lines_in_the_watch_stream_are_skipped_and_logged_once(harness, cluster):
    both_watching(cluster)
    lines = [b'{"type": "MODIFIED", "object": {broken', b"not json at all", b"\xff\xfe\x00",
             b"[]", b'{"type": "ADDED"}', b'{"type": "ADDED", "object": "a string"}',
             b'{"object": {"metadata": {"name": "x"}}}', b'"just a string"', b"{}"]
    for line in lines:
        cluster.api.inject_raw_line(line)
    cluster.add_service("vllm-d", replicas=1)  # the stream keeps flowing after them
    harness.wait_exact()
    services, endpoints = harness.discovery.informer_status()
    assert services.malformed_events == len(lines), services
    assert endpoints.malformed_events == len(lines), endpoints
    assert len(harness.records("skipped a malformed", logging.WARNING)) == 2  # one per informer
    harness.finish()


def test_unknown_event_types_in_the_watch_stream_are_skipped(harness, cluster):
    both_watching(cluster)
    rv = cluster.api.resource_version + 1000  # must not advance the resourceVersion either
    ghost = {"metadata": {"name": "vllm-ghost", "namespace": "default",
                          "resourceVersion": str(rv), "labels": {"app": "vllm"}},
             "spec": {"ports": [{"name": "http", "port": 80}]}}
    import json

    for event_type in ("SYNC", "added", "Modified", "", "PATCHED"):
        cluster.api.inject_raw_line(json.dumps({"type": event_type, "object": ghost}).encode())
    cluster.api.inject_raw_line(json.dumps({"type": None, "object": ghost}).encode())
    cluster.add_service("vllm-d", replicas=1)
    harness.wait_exact()
    assert "default/vllm-ghost" not in harness.discovery.get_service_status()
    services, _ = harness.discovery.informer_status()
    assert services.malformed_events == 6, services
    assert int(services.last_sync_rv or 0) < rv
    harness.finish()


def _slice(name: str, service: str, endpoints: object, ports: object) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}


def test_endpointslice_without_ports_adds_no_endpoint(harness, cluster):
    address = {"addresses": ["127.1.2.3"], "conditions": {"ready": True}}
    cluster.api.put("endpointslices", _slice("vllm-a-noports", "vllm-a", [address], None))
    cluster.api.put("endpointslices", _slice("vllm-b-noports", "vllm-b", [address], []))
    cluster.api.put("endpointslices", _slice("vllm-c-badport", "vllm-c", [address],
                                             [{"name": "http"}, {"name": "http", "port": "x"}]))
    cluster.add_pod("vllm-c")  # a later change flows past them
    harness.wait_exact()
    assert harness.discovery.informer_status()[1].malformed_events == 0
    harness.finish()


def test_endpointslice_endpoints_without_addresses_add_no_endpoint(harness, cluster):
    ports = [{"name": "http", "port": cluster.engine_port}]
    endpoints = [{"conditions": {"ready": True}}, {"addresses": None}, {"addresses": []},
                 {"addresses": [None, 7, ""]}, None, "junk"]
    cluster.api.put("endpointslices", _slice("vllm-a-noaddr", "vllm-a", endpoints, ports))
    cluster.add_pod("vllm-a")
    harness.wait_exact()
    harness.finish()


def test_endpointslice_replaced_by_one_with_null_endpoints_then_restored(harness, cluster):
    discovery = harness.discovery
    cluster.api.put("endpointslices", _slice("vllm-a-a", "vllm-a", None, None))
    wait_for(lambda: (discovery.get_service_status()["default/vllm-a"].reason or "").startswith(
        "no endpoints"), 5, lambda: str(discovery.get_service_status()["default/vllm-a"]))
    assert cluster.url_of("vllm-a") not in {e.url for e in discovery.get_endpoint_info()}
    wait_for(lambda: cluster.url_of("vllm-a") not in harness.scraper.get_engine_stats(), 5,
             "stats of a Service without endpoints kept")
    pod = cluster.pods("vllm-a")[0]
    cluster.set_ready(pod, pod.ready)  # the endpointslice controller re-publishes its slice
    harness.wait_exact()
    harness.finish()


def test_endpoints_without_target_ref_or_conditions_still_route(harness, cluster):
    real = cluster.api.get("endpointslices", "default", "vllm-b-a")
    assert real is not None
    for endpoint in real["endpoints"]:
        del endpoint["targetRef"]
        del endpoint["conditions"]  # nil ready means ready
        del endpoint["nodeName"]
    cluster.api.put("endpointslices", real)

    def names() -> dict[str, str | None]:
        return {e.url: e.pod_name for e in harness.discovery.get_pod_endpoint_info()
                if e.service_name == "vllm-b"}

    wait_for(lambda: set(names().values()) == {None}, 5, lambda: str(names()))
    harness.wait_exact()
    assert len(names()) == 2 and set(names().values()) == {None}, names()
    pod = cluster.pods("vllm-b")[0]
    cluster.set_ready(pod, pod.ready)  # the controller restores its own slice
    wait_for(lambda: all(e.pod_name for e in harness.discovery.get_pod_endpoint_info()), 5,
             "pod names not restored")
    harness.wait_exact()
    harness.finish()


def test_services_without_spec_or_port_numbers_are_listed_not_routable(harness, cluster):
    labels = {"app": "vllm"}
    cluster.api.put("services", {"metadata": {"name": "bare", "namespace": "default",
                                              "labels": labels}})
    cluster.api.put("services", {"metadata": {"name": "nullports", "namespace": "default",
                                              "labels": labels}, "spec": {"ports": None}})
    cluster.api.put("services", {"metadata": {"name": "noportnumber", "namespace": "default",
                                              "labels": labels},
                                 "spec": {"ports": [{"name": "http"}, "junk", None]}})
    extra = {"default/bare", "default/nullports", "default/noportnumber"}
    harness.wait_exact(extra_keys=extra)
    for key in extra:
        reason = harness.discovery.get_service_status()[key].reason
        assert reason is not None and reason.startswith("no Service port"), (key, reason)
    harness.finish()


def test_service_relabelled_out_of_the_selector_while_disconnected_and_back(harness, cluster):
    discovery = harness.discovery
    # Leaves while the watches are down and the history compacted: only the re-LIST's
    # replace semantics can remove it.
    cluster.api.fail_for(30, 503, verb="watch")
    cluster.api.cut_watches()
    wait_for(lambda: cluster.api.open_watch_count() == 0, 5, "watches still open")
    cluster.set_service_labels("vllm-b", {"app": "retired"})
    cluster.api.compact()
    cluster.api.clear_faults()
    harness.wait_exact()
    assert "default/vllm-b" not in discovery.get_service_status()
    assert cluster.url_of("vllm-b") not in harness.scraper.get_engine_stats()
    # Comes back on a live watch (the watch cache sends it as ADDED), and leaves again.
    cluster.set_service_labels("vllm-b", {"app": "vllm", "tier": "gold"})
    harness.wait_exact()
    cluster.set_service_labels("vllm-b", {"app": "other"})
    harness.wait_exact()
    cluster.set_service_labels("vllm-b", {"app": "vllm"})
    harness.wait_exact()
    harness.finish()


def test_cuts_restarts_with_compaction_500s_429s_and_junk_all_at_once(harness, cluster):
    """The storm of every API failure at once; it ends exact, with health true."""
    churn = Churn(cluster)
    deadline = time.monotonic() + STORM_SECONDS
    for step in range(100):
        if time.monotonic() >= deadline:
            break
        churn.step()
        if step % 10 == 3:
            cluster.api.restart()
            cluster.api.compact()
        if step % 10 == 5:
            cluster.api.fail_for(0.5, 500)
        if step % 10 == 7:
            cluster.api.fail_for(0.5, 429, retry_after=1)
        if step == 12:
            cluster.api.inject_raw_line(b'{"type": "MODIFIED", "object": {broken')
        if step % 10 == 9:
            cluster.api.fail_next(1, how="empty")
            cluster.api.fail_next(1, 500, how="error-event")
        cluster.api.cut_watches()
        pace(0.3)
    harness.wait_exact()
    wait_for(harness.discovery.get_health, 10, lambda: str(harness.discovery.health()))
    harness.finish()
