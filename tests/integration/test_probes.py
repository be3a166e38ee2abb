"""Model probes per pod, through the real client: rollouts, partial LoRA, shared pods, logs.

Probes go to each ready pod, not through the Service name: a pooled connection through the
Service VIP is pinned to one pod by kube-proxy, so a probe through the name would keep seeing
that pod's models (stale after a rollout, adapters on some pods seen by chance).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.integration.test_discovery import state
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.outliers import OutlierConfig
from vllm_router_svcdisc.probe import ProbeConfig
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster
from vllm_router_svcdisc.sim.engine import EngineMode

OLD, NEW = "org/model-v1", "org/model-v2"


def advertised(discovery: K8sServiceDiscovery, name: str) -> tuple[list[str], tuple[str, ...]]:
    """(model_names, partial_models) of the Service's entry; ([], ()) when not routable."""
    view = discovery.get_service_status().get(f"default/{name}")
    info = view.endpoint_info if view is not None else None
    return (list(info.model_names), info.partial_models) if info is not None else ([], ())


def wait_advertised(discovery: K8sServiceDiscovery, name: str, models: list[str],
                    partial: tuple[str, ...] = ()) -> None:
    wait_for(lambda: advertised(discovery, name) == (models, partial), 15.0,
             lambda: f"{advertised(discovery, name)}: {state(discovery)}")


def pod_models(discovery: K8sServiceDiscovery) -> dict[str, list[str]]:
    return {e.url: sorted(e.model_names) for e in discovery.get_pod_endpoint_info()}


def test_a_rollout_to_a_new_model_name_is_followed_pod_by_pod(
        cluster: SimCluster, make_discovery: Any) -> None:
    service = cluster.add_service("roll", replicas=3, model=OLD)
    discovery = make_discovery(cluster)
    wait_advertised(discovery, "roll", [OLD])
    service.model = NEW  # the Deployment's new template serves another name
    steps = [([OLD], (NEW,)),   # 1 of 3 new pods: most still serve the old name
             ([NEW], (OLD,)),   # 2 of 3: most serve the new one
             ([NEW], ())]       # done
    for expected, partial in steps:
        old_pod = next(p for p in cluster.pods("roll") if p.engine.model == OLD)
        cluster.reschedule(old_pod)
        wait_advertised(discovery, "roll", expected, partial)
        # each pod's own entry says what it serves, whatever the Service advertises
        wait_for(lambda: pod_models(discovery) == {
            f"http://{p.ip}:{p.port}": [p.engine.model] for p in cluster.pods("roll")}, 15.0,
            lambda: f"{pod_models(discovery)}")
    info = discovery.get_endpoint_info()[0]
    assert info.has_model(NEW) and not info.has_model(OLD)


def test_a_lora_adapter_loaded_on_some_pods_is_partial_until_every_pod_has_it(
        cluster: SimCluster, make_discovery: Any) -> None:
    cluster.add_service("lora", replicas=2, model=OLD)
    discovery = make_discovery(cluster)
    wait_advertised(discovery, "lora", [OLD])
    first, second = cluster.pods("lora")
    first.engine.lora_adapters = ["sql-lora"]  # vLLM's /v1/load_lora_adapter on one pod
    wait_advertised(discovery, "lora", [OLD], ("sql-lora",))
    first_url = f"http://{first.ip}:{first.port}"
    assert pod_models(discovery)[first_url] == [OLD, "sql-lora"]
    entry = next(e for e in discovery.get_pod_endpoint_info() if e.url == first_url)
    assert entry.get_adapters_for_model(OLD) == ["sql-lora"]
    second.engine.lora_adapters = ["sql-lora"]
    wait_advertised(discovery, "lora", [OLD, "sql-lora"])


@pytest.mark.parametrize("reader", ["scraper", "liveness"])
def test_an_adapter_loaded_at_runtime_appears_once_metrics_show_a_request_for_it(
        cluster: SimCluster, make_discovery: Any, reader: str) -> None:
    """vLLM's ``vllm:lora_requests_info`` names the adapters of running and waiting requests:
    a pod whose page names one its last probe did not list is probed again at once, long
    before the background re-probe (an hour here)."""
    cluster.add_service("lora-rt", replicas=2, model=OLD)
    outliers = OutlierConfig(progress_interval=0.3, liveness_interval=0.2)
    discovery = make_discovery(cluster, probe_config=ProbeConfig(interval=3600.0),
                               outliers=outliers if reader == "liveness"
                               else OutlierConfig(enabled=False))
    scraper = (EngineStatsScraper(discovery, scrape_interval=0.2) if reader == "scraper"
               else None)
    try:
        wait_advertised(discovery, "lora-rt", [OLD])
        first, _second = cluster.pods("lora-rt")
        first.engine.lora_adapters = ["sql-lora"]  # /v1/load_lora_adapter, then a request
        first.engine.running_lora_adapters = ["sql-lora"]
        wait_advertised(discovery, "lora-rt", [OLD], ("sql-lora",))
        assert discovery._prober.adapter_reprobes_total == 1
    finally:
        if scraper is not None:
            scraper.close()


def test_a_new_pod_on_a_recycled_address_is_not_listed_with_the_old_pods_models(
        cluster: SimCluster, make_discovery: Any) -> None:
    """Within the readiness-blip window an address that comes back keeps its models — unless
    another pod now has it: that one is new, and listed only with what its own probe says."""
    service = cluster.add_service("recycle", replicas=1, model=OLD)
    discovery = make_discovery(cluster)
    wait_advertised(discovery, "recycle", [OLD])
    (old_pod,) = cluster.pods("recycle")
    service.model = NEW
    service.engine_options["mode"] = EngineMode.SLOW_METRICS  # its /v1/models hangs for now
    service.engine_options["slow_paths"] = ("/v1/models",)
    service.engine_options["slow_delay"] = 30.0
    new_pod = cluster.reschedule(old_pod, keep_ip=True)
    assert new_pod.ip == old_pod.ip and new_pod.name != old_pod.name
    url = f"http://{new_pod.ip}:{new_pod.port}"

    def listed_as() -> list[str] | None:
        view = discovery.get_service_status().get("default/recycle")
        pods = [p.name for p in view.pods] if view is not None else []
        return pod_models(discovery).get(url) if new_pod.name in pods else None

    wait_for(lambda: new_pod.name in [p.name for p in discovery.get_service_status()[
        "default/recycle"].pods], 10.0, lambda: state(discovery))
    assert listed_as() is None  # known, not routable: its probe has not answered
    new_pod.engine.mode = EngineMode.OK
    wait_for(lambda: listed_as() == [NEW], 15.0, lambda: f"{listed_as()}: {state(discovery)}")


def test_a_pod_behind_two_services_is_probed_and_scraped_once_and_counts_in_both(
        cluster: SimCluster, make_discovery: Any) -> None:
    owner = cluster.add_service("llama", replicas=2)
    cluster.add_service("llama-peers", replicas=0, headless=True, selector=owner.selector)
    # no liveness checks: they read /metrics too
    discovery = make_discovery(cluster, outliers=OutlierConfig(enabled=False))
    wait_for(lambda: len(discovery.get_endpoint_info()) == 2, 15.0, lambda: state(discovery))
    # intervals far longer than the test: every request counted below is the first one
    scraper = EngineStatsScraper(discovery, scrape_interval=120.0, stale_after=600.0)
    try:
        urls = [e.url for e in discovery.get_endpoint_info()]
        wait_for(lambda: all(getattr(scraper.get_engine_stats().get(u), "pods_scraped", 0) == 2
                             for u in urls), 15.0, lambda: f"{dict(scraper.get_engine_stats())}")
        for pod in cluster.pods("llama"):
            counts = pod.engine.request_counts()
            assert counts.get("/metrics") == 1, counts  # once, for both Services
    finally:
        scraper.close()


def probe_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and "model probe" in r.getMessage()]


def test_a_wrong_answer_is_a_warning_naming_service_and_pod_once(
        cluster: SimCluster, make_discovery: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vllm_router_svcdisc")
    cluster.add_service("bad", replicas=1)
    cluster.add_service("hole", replicas=1)
    (bad,) = cluster.pods("bad")
    (hole,) = cluster.pods("hole")
    bad.engine.mode = EngineMode.GARBAGE
    hole.engine.mode = EngineMode.BLACKHOLE
    discovery = make_discovery(cluster)
    wait_for(lambda: bad.engine.request_counts().get("/v1/models", 0) >= 3, 15.0,
             "the bad pod was not re-probed")
    wait_for(lambda: hole.engine.request_counts().get("/v1/models", 0) >= 2, 15.0,
             "the silent pod was not re-probed")
    warnings = probe_warnings(caplog)
    assert len(warnings) == 1, warnings  # one per change of state, not one per probe
    assert "default/bad" in warnings[0] and bad.name in warnings[0]
    assert "invalid JSON" in warnings[0]
    quiet = [r for r in caplog.records if "default/hole" in r.getMessage()
             and "model probe" in r.getMessage()]
    assert quiet and all(r.levelno == logging.INFO for r in quiet)  # no answer: quieter
    assert discovery.get_endpoint_info() == []


def test_models_without_a_valid_model_card_is_a_warning_naming_service_and_pod_once(
        cluster: SimCluster, make_discovery: Any, caplog: pytest.LogCaptureFixture) -> None:
    """``data`` a list of model names instead of cards: as wrong as invalid JSON, not INFO."""
    caplog.set_level(logging.INFO, logger="vllm_router_svcdisc")
    cluster.add_service("names", replicas=1)
    (pod,) = cluster.pods("names")
    pod.engine.mode = EngineMode.BAD_MODELS
    discovery = make_discovery(cluster)
    wait_for(lambda: pod.engine.request_counts().get("/v1/models", 0) >= 3, 15.0,
             "the pod was not re-probed")
    warnings = probe_warnings(caplog)
    assert len(warnings) == 1, warnings  # one per change of state, not one per probe
    assert "default/names" in warnings[0] and pod.name in warnings[0]
    assert "no valid model card" in warnings[0]
    assert discovery.get_endpoint_info() == []
    view = discovery.get_service_status()["default/names"]
    assert "no valid model card" in str(view.pod_probes[pod.engine.url].reason)
    pod.engine.mode = EngineMode.OK  # fixed: routable again, said at INFO
    wait_for(lambda: [e.url for e in discovery.get_endpoint_info()] == [cluster.url_of("names")],
             15.0, lambda: state(discovery))
    assert len(probe_warnings(caplog)) == 1
