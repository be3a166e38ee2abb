"""The cache's coordination: store, views and publisher, without any network."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_view import endpoint, eps, service
from vllm_router_svcdisc.cache import DiscoveryCache, ProbeTarget
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.informer import ADDED, DELETED, Change
from vllm_router_svcdisc.types import ModelInfo
from vllm_router_svcdisc.view import ModelProbe


def probe(*models: str) -> ModelProbe:
    return ModelProbe(ok=True, models={m: ModelInfo(id=m) for m in models})


def add(obj: dict[str, Any]) -> Change:
    meta = obj["metadata"]
    return Change(ADDED, f"{meta['namespace']}/{meta['name']}", obj)


def delete(key: str) -> Change:
    return Change(DELETED, key, None)


class Recorder:
    """A probe listener that checks it is told under the cache's lock."""

    def __init__(self) -> None:
        self.cache: DiscoveryCache | None = None
        self.calls: list[tuple[list[ProbeTarget], list[str], int]] = []

    def __call__(self, targets: Any, gone: Any) -> None:
        assert self.cache is not None and self.cache._lock.locked()
        self.calls.append((list(targets), list(gone), self.cache.snapshot.version))


@pytest.fixture
def cache() -> tuple[DiscoveryCache, Recorder]:
    recorder = Recorder()
    c = DiscoveryCache(port=None, cluster_domain="cluster.local.", on_probe_needed=recorder)
    recorder.cache = c
    return c, recorder


P1, P2 = "http://10.1.0.1:8000", "http://10.1.0.2:8000"


def shared_pods_cluster(c: DiscoveryCache) -> None:
    """Two Services (a per-model one and an "all" one) over the same two pods; p1 also
    serves a LoRA adapter m2."""
    c.apply_service_changes([add(service("one")), add(service("all"))])
    pods = [endpoint("p1", "10.1.0.1"), endpoint("p2", "10.1.0.2")]
    c.apply_endpoint_changes([add(eps("one-a", pods, svc="one")),
                              add(eps("all-a", pods, svc="all"))])
    c.set_probes([(P1, probe("m1", "m2")), (P2, probe("m1"))])


def test_a_pod_behind_two_services_is_listed_once(cache: Any) -> None:
    c, _ = cache
    shared_pods_cluster(c)
    snapshot = c.snapshot
    assert sorted(i.url for i in snapshot.endpoint_infos) == [
        "http://all.ns.svc.cluster.local:80", "http://one.ns.svc.cluster.local:80"]
    assert sorted(i.url for i in snapshot.pod_infos) == ["http://10.1.0.1:8000",
                                                         "http://10.1.0.2:8000"]
    assert {i.service_name for i in snapshot.pod_infos} == {"all"}  # the first key wins
    # each pod lists its own models; the Services advertise what both pods serve
    assert {i.url: i.model_names for i in snapshot.pod_infos} == {P1: ["m1", "m2"],
                                                                  P2: ["m1"]}
    assert all(i.model_names == ["m1"] and i.partial_models == ("m2",)
               for i in snapshot.endpoint_infos)
    assert snapshot.known_models == {"m1"}
    # The owner leaves: the pods stay, now under the other Service, with their models.
    c.apply_service_changes([delete("ns/all")])
    assert {i.service_name for i in c.snapshot.pod_infos} == {"one"}
    assert len(c.snapshot.pod_infos) == 2
    assert {i.url: i.model_names for i in c.snapshot.pod_infos} == {P1: ["m1", "m2"],
                                                                    P2: ["m1"]}


def test_unchanged_lists_are_shared_between_snapshots(cache: Any) -> None:
    c, _ = cache
    shared_pods_cluster(c)
    before = c.snapshot
    c.apply_service_changes([add(service("other"))])  # not routable: no endpoints
    after = c.snapshot
    assert after.version == before.version + 1
    assert after.endpoint_infos is before.endpoint_infos
    assert after.pod_infos is before.pod_infos
    assert after.known_models is before.known_models
    assert "ns/other" in after.services
    with pytest.raises(TypeError):
        after.endpoint_infos.append(None)


def test_a_batch_is_one_publish(cache: Any) -> None:
    c, _ = cache
    c.apply_service_changes([add(service(f"s{i}")) for i in range(50)])
    assert c.publish_stats()[0] == 1
    c.apply_endpoint_changes([add(eps(f"s{i}-a", [endpoint("p", f"10.2.0.{i}")], svc=f"s{i}"))
                              for i in range(50)])
    c.set_probes([(f"http://10.2.0.{i}:8000", probe("m")) for i in range(50)])
    assert c.publish_stats()[0] == 3
    assert len(c.snapshot.endpoint_infos) == 50
    # Slices of a Service nobody selected change nothing: no publish.
    c.apply_endpoint_changes([add(eps("x-a", [endpoint("p", "10.3.0.1")], svc="x"))])
    assert c.publish_stats()[0] == 3


def test_probe_requests_are_made_under_the_lock_in_state_order(cache: Any) -> None:
    c, recorder = cache
    c.apply_service_changes([add(service())])
    c.apply_endpoint_changes([add(eps("a", [endpoint("p1", "10.1.0.1")]))])
    c.apply_endpoint_changes([add(eps("a", [endpoint("p1", "10.1.0.1"),
                                            endpoint("p2", "10.1.0.2")]))])
    c.apply_service_changes([delete("ns/svc")])
    assert recorder.calls == [
        # p1 can make the Service routable: first; p2 is second of a Service not routable
        ([ProbeTarget(P1, "p1", ("ns/svc",), first=True)], [], 2),
        ([ProbeTarget(P2, "p2", ("ns/svc",))], [], 3),  # only the pod that became ready
        ([], [P1, P2], 4),
    ]
    assert c.sizes()["services"] == 0 and c.sizes()["probes"] == 0


def test_an_unreachable_engine_keeps_its_models(cache: Any) -> None:
    c, _ = cache
    shared_pods_cluster(c)
    c.set_probe(P1, ModelProbe(ok=False, reason="timed out", unreachable=True))
    view = c.snapshot.services["ns/one"]
    assert view.routable and view.partial_models == ("m2",)  # p1 keeps m1 and m2
    c.set_probes([(P1, ModelProbe(ok=False, reason="bad JSON")),
                  (P2, ModelProbe(ok=False, reason="bad JSON"))])
    view = c.snapshot.services["ns/one"]
    assert not view.routable and view.reason == "model probe failed: bad JSON"
    assert c.has_ever_seen_model("m2") and not c.has_ever_seen_model("m9")


def test_a_slice_moving_service_touches_both(cache: Any) -> None:
    c, _ = cache
    shared_pods_cluster(c)
    c.apply_endpoint_changes([add(eps("one-a", [endpoint("p9", "10.1.0.9")], svc="all"))])
    assert c.snapshot.services["ns/one"].pods == ()
    assert {p.ip for p in c.snapshot.services["ns/all"].pods} == {"10.1.0.1", "10.1.0.2",
                                                                    "10.1.0.9"}
    c.apply_endpoint_changes([delete("ns/one-a"), delete("ns/all-a")])
    assert c.sizes()["slices"] == 0 and c.sizes()["indexed_services"] == 0


def test_old_snapshots_never_change_and_behave_as_mappings(cache: Any) -> None:
    c, _ = cache
    shared_pods_cluster(c)
    old = c.snapshot
    old_pods = sorted(i.url for i in old.pod_infos)
    c.apply_endpoint_changes([add(eps("one-a", [endpoint("p9", "10.1.0.9")], svc="one")),
                              delete("ns/all-a")])
    c.set_probe("http://10.1.0.9:8000", probe("m1"))
    c.apply_service_changes([add(service(f"extra{i}")) for i in range(300)])  # every bucket
    assert sorted(i.url for i in old.pod_infos) == old_pods
    assert sorted(old.services) == ["ns/all", "ns/one"] and len(old.services) == 2
    assert old.services["ns/one"].routable and "ns/extra1" not in old.services
    with pytest.raises(KeyError):
        old.services["ns/extra1"]
    new = c.snapshot
    assert len(new.services) == 302 == len(dict(new.services.items()))
    assert sorted(i.url for i in new.pod_infos) == ["http://10.1.0.9:8000"]
    assert new.pod_infos is new.pod_infos  # built once, then a plain attribute


def test_a_re_probe_that_changes_nothing_costs_no_publish(cache: Any) -> None:
    c, _ = cache
    shared_pods_cluster(c)
    publishes = c.publish_stats()[0]
    again = ModelProbe(ok=True, models={"m1": ModelInfo(id="m1", created=99),  # a new answer
                                        "m2": ModelInfo(id="m2")}, time=5.0)
    c.set_probes([(P1, again), (P2, probe("m1"))])
    assert c.publish_stats()[0] == publishes
    c.set_probes([(P2, probe("m1", "m3"))])  # a change: published
    assert c.publish_stats()[0] == publishes + 1
    assert c.snapshot.services["ns/one"].partial_models == ("m2", "m3")


def test_an_ejection_rebuilds_only_the_services_of_that_pod(cache: Any) -> None:
    c, _ = cache
    shared_pods_cluster(c)
    c.apply_service_changes([add(service("other"))])
    c.apply_endpoint_changes([add(eps("other-a", [endpoint("p9", "10.1.0.9")], svc="other"))])
    before = c.snapshot
    c.set_candidates({P1: "refused: cannot connect"})
    after = c.snapshot
    assert after.version == before.version + 1  # one publish
    assert after.services["ns/other"] is before.services["ns/other"]  # untouched
    for key in ("ns/one", "ns/all"):
        view = after.services[key]
        assert dict(view.ejected) == {P1: "refused: cannot connect"}
        assert {p.url: p.state for p in view.pods} == {P1: "ejected", P2: "ok"}
    assert [i.url for i in after.pod_infos if i.url in (P1, P2)] == [P2]
    assert c.ejections_by_reason == {"refused": 2}  # once per Service it was ejected from
    c.set_candidates({P1: "refused: cannot connect"})  # the same verdict again: no publish
    assert c.snapshot is after
    c.set_candidates({P1: None})
    assert sorted(i.url for i in c.snapshot.pod_infos if i.url in (P1, P2)) == [P1, P2]


def test_a_readiness_blip_keeps_a_pods_models_within_the_window() -> None:
    clock = FakeClock()
    c = DiscoveryCache(port=None, cluster_domain="cluster.local", blip_window=30.0,
                       clock=clock)
    c.apply_service_changes([add(service("one"))])
    ready = [endpoint("p1", "10.1.0.1"), endpoint("p2", "10.1.0.2")]
    blip = [endpoint("p1", "10.1.0.1", ready=False), endpoint("p2", "10.1.0.2")]
    c.apply_endpoint_changes([add(eps("one-a", ready, svc="one"))])
    c.set_probes([(P1, probe("m1")), (P2, probe("m1"))])
    c.apply_endpoint_changes([add(eps("one-a", blip, svc="one"))])
    clock.advance(10)
    c.apply_endpoint_changes([add(eps("one-a", ready, svc="one"))])
    # listed again at once, with its models, before any new probe
    assert sorted(i.url for i in c.snapshot.pod_infos) == [P1, P2]
    c.apply_endpoint_changes([add(eps("one-a", blip, svc="one"))])
    clock.advance(31)
    c.apply_endpoint_changes([add(eps("one-a", ready, svc="one"))])  # too late: probed afresh
    assert [i.url for i in c.snapshot.pod_infos] == [P2]
