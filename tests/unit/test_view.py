"""The pure view builder, one table row per topology Kubernetes produces."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from vllm_router_svcdisc.k8s_objects import (
    parse_endpoint_slice,
    parse_endpoints,
    parse_service,
)
from vllm_router_svcdisc.types import ModelInfo, PodEndpoint
from vllm_router_svcdisc.view import ModelProbe, ViewConfig, build_view, service_models

PROBED = ModelProbe(ok=True, models={"m": ModelInfo(id="m")})


class EveryPod(Mapping[str, ModelProbe]):
    """Probes of pods not known in advance: every pod answered ``probe``."""

    def __init__(self, probe: ModelProbe = PROBED) -> None:
        self.probe = probe

    def __getitem__(self, url: str) -> ModelProbe:
        return self.probe

    def __contains__(self, url: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def service(name: str = "svc", *, ports: Any = (("http", 80),), headless: bool = False,
            families: Any = None, pnra: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ports": [{"name": n, "port": p} for n, p in ports],
        "clusterIP": "None" if headless else "10.0.0.1",
    }
    if families is not None:
        spec["ipFamilies"] = list(families)
    if pnra:
        spec["publishNotReadyAddresses"] = True
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec}


def endpoint(pod: str | None, *addresses: str, ready: bool | None = True,
             serving: bool | None = None, terminating: bool | None = None) -> dict[str, Any]:
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving),
                                     ("terminating", terminating)) if v is not None}
    out: dict[str, Any] = {"addresses": list(addresses), "conditions": conditions}
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "ns"}
    return out


def eps(name: str, endpoints: list[dict[str, Any]], *, ports: Any = (("http", 8000),),
        family: str = "IPv4", svc: str = "svc") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family, "endpoints": endpoints,
            "ports": [{"name": n, "port": p} for n, p in ports]}


@dataclass
class Case:
    id: str
    service: dict[str, Any]
    slices: list[dict[str, Any]]
    pods: list[tuple[str, int, bool]]  # (ip, port, routable)
    url: str | None = "http://svc.ns.svc.cluster.local:80"
    reason: str | None = None
    config: ViewConfig = field(default_factory=ViewConfig)
    legacy: bool = False
    note: bool = False


CASES = [
    Case("clusterip: service port in the URL, pod port per pod", service(),
         [eps("a", [endpoint("p1", "10.1.0.1"), endpoint("p2", "10.1.0.2", ready=False)])],
         [("10.1.0.1", 8000, True), ("10.1.0.2", 8000, False)]),
    Case("headless: the URL dials the target port", service(headless=True),
         [eps("a", [endpoint("p1", "10.1.0.1")])], [("10.1.0.1", 8000, True)],
         url="http://svc.ns.svc.cluster.local:8000"),
    Case("headless pods on several target ports: the most common, a note",
         service(headless=True),
         [eps("a", [endpoint("p1", "10.1.0.1"), endpoint("p2", "10.1.0.2")]),
          eps("b", [endpoint("p3", "10.1.0.3")], ports=(("http", 9000),))],
         [("10.1.0.1", 8000, True), ("10.1.0.2", 8000, True), ("10.1.0.3", 9000, True)],
         url="http://svc.ns.svc.cluster.local:8000", note=True),
    Case("publishNotReadyAddresses: ready=true everywhere, serving is the readiness",
         service(headless=True, pnra=True),
         [eps("a", [endpoint("p1", "10.1.0.1", ready=True, serving=True),
                    endpoint("p2", "10.1.0.2", ready=True, serving=False)])],
         [("10.1.0.1", 8000, True), ("10.1.0.2", 8000, False)],
         url="http://svc.ns.svc.cluster.local:8000"),
    Case("serving nil falls back to ready", service(),
         [eps("a", [endpoint("p1", "10.1.0.1", ready=False)])],
         [("10.1.0.1", 8000, False)], reason="no ready endpoints (1 not ready or terminating)"),
    Case("serving but terminating is not routable", service(),
         [eps("a", [endpoint("p1", "10.1.0.1", ready=False, serving=True, terminating=True),
                    endpoint("p2", "10.1.0.2")])],
         [("10.1.0.1", 8000, False), ("10.1.0.2", 8000, True)]),
    Case("dual-stack: one family (the Service's first), each pod once",
         service(families=("IPv4", "IPv6")),
         [eps("v4", [endpoint("p1", "10.1.0.1"), endpoint("p2", "10.1.0.2")]),
          eps("v6", [endpoint("p1", "fd00::1"), endpoint("p2", "fd00::2")], family="IPv6")],
         [("10.1.0.1", 8000, True), ("10.1.0.2", 8000, True)]),
    Case("dual-stack, IPv6 primary", service(families=("IPv6", "IPv4")),
         [eps("v4", [endpoint("p1", "10.1.0.1")]),
          eps("v6", [endpoint("p1", "fd00::1")], family="IPv6")],
         [("fd00::1", 8000, True)]),
    Case("dual-stack, preference IPv6", service(families=("IPv4", "IPv6")),
         [eps("v4", [endpoint("p1", "10.1.0.1")]),
          eps("v6", [endpoint("p1", "fd00::1")], family="IPv6")],
         [("fd00::1", 8000, True)], config=ViewConfig(ip_family="IPv6")),
    Case("preference absent from a single-stack Service: its own family",
         service(families=("IPv4",)), [eps("v4", [endpoint("p1", "10.1.0.1")])],
         [("10.1.0.1", 8000, True)], config=ViewConfig(ip_family="IPv6")),
    Case("no ipFamilies (old API server): IPv4 slices first", service(),
         [eps("v4", [endpoint("p1", "10.1.0.1")]),
          eps("v6", [endpoint("p1", "fd00::1")], family="IPv6")],
         [("10.1.0.1", 8000, True)]),
    Case("FQDN slices are not dialled", service(),
         [eps("f", [endpoint("p1", "engine.example")], family="FQDN"),
          eps("v4", [endpoint("p1", "10.1.0.1")])],
         [("10.1.0.1", 8000, True)]),
    Case("multi-address endpoint: one pod, the first address", service(),
         [eps("a", [endpoint("p1", "10.1.0.1", "10.1.0.9")])], [("10.1.0.1", 8000, True)]),
    Case("hostNetwork pods share an IP with different ports: two pods", service(),
         [eps("a", [endpoint("p1", "10.9.0.1")]),
          eps("b", [endpoint("p2", "10.9.0.1")], ports=(("http", 8001),))],
         [("10.9.0.1", 8000, True), ("10.9.0.1", 8001, True)]),
    Case("named targetPort resolved per pod: one slice per mapping", service(),
         [eps("a", [endpoint("p1", "10.1.0.1")]),
          eps("b", [endpoint("p2", "10.1.0.2")], ports=(("http", 9000),))],
         [("10.1.0.1", 8000, True), ("10.1.0.2", 9000, True)]),
    Case("a pod in two slices (hand-over): once, the routable copy", service(),
         [eps("a", [endpoint("p1", "10.1.0.1", ready=False)]),
          eps("b", [endpoint("p1", "10.1.0.1")])],
         [("10.1.0.1", 8000, True)]),
    Case("no targetRef: identity is address and port", service(),
         [eps("a", [endpoint(None, "10.1.0.1"), endpoint(None, "10.1.0.1", ready=False)])],
         [("10.1.0.1", 8000, True)]),
    Case("a slice port entry without name and port means all ports",
         service(headless=True),
         [{**eps("a", [endpoint("p1", "10.1.0.1")]), "ports": [{"name": None, "port": None}]}],
         [("10.1.0.1", 80, True)]),
    Case("headless Service without ports: the wanted port is dialled",
         service(headless=True, ports=()),
         [{**eps("a", [endpoint("p1", "10.1.0.1")]), "ports": [{"name": None, "port": None}]}],
         [("10.1.0.1", 8000, True)], url="http://svc.ns.svc.cluster.local:8000",
         config=ViewConfig(port=8000)),
    Case("slice without the Service's port name", service(),
         [eps("a", [endpoint("p1", "10.1.0.1")], ports=(("metrics", 9090),))], [],
         reason="no endpoints for the Service port"),
    Case("v1 Endpoints: each subset keeps its ports", service(),
         [{"metadata": {"name": "svc", "namespace": "ns"}, "subsets": [
             {"addresses": [{"ip": "10.1.0.1", "targetRef": {"kind": "Pod", "name": "p1"}}],
              "ports": [{"name": "http", "port": 8000}]},
             {"addresses": [{"ip": "10.1.0.2", "targetRef": {"kind": "Pod", "name": "p2"}}],
              "notReadyAddresses": [{"ip": "10.1.0.3",
                                     "targetRef": {"kind": "Pod", "name": "p3"}}],
              "ports": [{"name": "http", "port": 9000}]}]}],
         [("10.1.0.1", 8000, True), ("10.1.0.2", 9000, True), ("10.1.0.3", 9000, False)],
         legacy=True),
    Case("no matching Service port", service(ports=(("grpc", 50051), ("web", 81))), [], [],
         url=None,
         reason='no Service port matches a port named "http" or a single port '
                "(ports: grpc:50051, web:81)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_build_view(case: Case) -> None:
    parse = parse_endpoints if case.legacy else parse_endpoint_slice
    view = build_view(parse_service(case.service), [parse(s) for s in case.slices], EveryPod(),
                      config=case.config, added=1.0)
    assert [(p.ip, p.port, p.routable) for p in view.pods] == case.pods
    assert view.url == case.url
    assert view.reason == case.reason
    assert (view.note is not None) == case.note
    routable = [(p.ip, p.port) for p in view.pods if p.routable]
    if case.reason is None:
        assert view.endpoint_info is not None and view.endpoint_info.url == case.url
        assert [i.url.removeprefix("http://") for i in view.pod_infos] == [
            f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in routable]
    else:
        assert view.endpoint_info is None and view.pod_infos == ()


def test_pod_ids_are_the_same_under_every_service() -> None:
    slices = [parse_endpoint_slice(eps("a", [endpoint("p1", "10.1.0.1")], svc=name))
              for name in ("one", "two")]
    views = [build_view(parse_service(service(name)), [s], EveryPod(), config=ViewConfig(),
                        added=1.0) for name, s in zip(("one", "two"), slices, strict=True)]
    assert views[0].pod_infos[0].Id == views[1].pod_infos[0].Id
    assert views[0].endpoint_info is not None and views[1].endpoint_info is not None
    assert views[0].endpoint_info.Id != views[1].endpoint_info.Id


def test_not_probed_and_failed_probes_give_reasons() -> None:
    record = parse_service(service())
    slices = [parse_endpoint_slice(eps("a", [endpoint("p1", "10.1.0.1")]))]
    assert build_view(record, slices, {}, config=ViewConfig(),
                      added=0).reason == "models not probed yet"
    failed = ModelProbe(ok=False, reason="boom")
    assert build_view(record, slices, EveryPod(failed), config=ViewConfig(),
                      added=0).reason == "model probe failed: boom"
    empty = ModelProbe(ok=True, models={})
    assert build_view(record, slices, EveryPod(empty), config=ViewConfig(),
                      added=0).reason == "the ready pods' engines serve no models"


def _pods(n: int) -> list[PodEndpoint]:
    return [PodEndpoint(name=f"p{i}", ip=f"10.9.0.{i}", port=8000) for i in range(n)]


def _serving(*per_pod: tuple[str, ...] | None) -> dict[str, ModelProbe]:
    """Probes of pods p0, p1, ...: the models each serves (None: not probed; () failed)."""
    probes = {}
    for pod, models in zip(_pods(len(per_pod)), per_pod, strict=True):
        if models is None:
            continue
        probes[pod.url] = (ModelProbe(ok=True, models={m: ModelInfo(id=m) for m in models})
                           if models else ModelProbe(ok=False, reason="401"))
    return probes


@pytest.mark.parametrize(("per_pod", "advertised", "partial"), [
    ((("a",), ("a",), ("a",)), ["a"], ()),                          # steady state
    ((("a", "lora"), ("a",), ("a",)), ["a"], ("lora",)),            # adapter on one pod
    ((("a",), ("a",), ("b",)), ["a"], ("b",)),                      # rollout begins: old name
    ((("a",), ("b",)), ["a", "b"], ()),                             # the turn: both
    ((("a",), ("b",), ("b",)), ["b"], ("a",)),                      # most pods moved: new name
    ((("a",), ("b",), ("c",)), ["a", "b", "c"], ()),                # no majority: never empty
    ((("a",), None, ("a",)), ["a"], ()),                            # a pod not probed yet
    ((("a",), (), ("b",), ("b",)), ["b"], ("a",)),                  # a pod answering wrongly
], ids=["steady", "partial-lora", "rollout-start", "rollout-turn", "rollout-end", "three-way",
        "unprobed", "failed"])
def test_what_a_service_advertises(per_pod: Any, advertised: list[str],
                                   partial: tuple[str, ...]) -> None:
    models, partial_models, reason = service_models(_pods(len(per_pod)), _serving(*per_pod))
    assert reason is None
    assert list(models) == advertised and partial_models == partial


def test_each_pod_entry_carries_its_own_models() -> None:
    record = parse_service(service())
    slices = [parse_endpoint_slice(eps("a", [endpoint("p1", "10.1.0.1"),
                                             endpoint("p2", "10.1.0.2"),
                                             endpoint("p3", "10.1.0.3")]))]
    probes = {"http://10.1.0.1:8000": ModelProbe(ok=True, models={
                  "a": ModelInfo(id="a"), "lora": ModelInfo(id="lora", parent="a",
                                                            is_adapter=True)}),
              "http://10.1.0.2:8000": ModelProbe(ok=True, models={"a": ModelInfo(id="a")})}
    view = build_view(record, slices, probes, config=ViewConfig(), added=0)
    assert view.endpoint_info is not None and view.endpoint_info.model_names == ["a"]
    assert view.endpoint_info.partial_models == ("lora",)
    # p3 is not probed yet: no entry of its own until its models are known
    assert {i.url: i.model_names for i in view.pod_infos} == {
        "http://10.1.0.1:8000": ["a", "lora"], "http://10.1.0.2:8000": ["a"]}
    assert view.pod_infos[0].get_adapters_for_model("a") == ["lora"]


def test_the_fast_uuid5_is_uuid5() -> None:
    import uuid

    from vllm_router_svcdisc.view import uuid5_url

    for name in ("k8s-pod/default/a:8000", "k8s-service/ns/svc", "", "ü/ünïcode:1"):
        assert uuid5_url(name) == str(uuid.uuid5(uuid.NAMESPACE_URL, name))
