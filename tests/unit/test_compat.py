"""production-stack's call shapes work against our singletons."""

from __future__ import annotations

import enum
from collections.abc import Iterator

import pytest

from tests.conftest import FAST_INFORMER, wait_for
from vllm_router_svcdisc import compat
from vllm_router_svcdisc.sim.cluster import SimCluster


class ServiceDiscoveryType(enum.Enum):  # production-stack's enum, as its app.py passes it
    STATIC = "static"
    K8S = "k8s"


@pytest.fixture
def reset_singletons() -> Iterator[None]:
    compat.reset()
    yield
    compat.reset()


def test_production_stack_wiring_calls_work_unchanged(cluster: SimCluster,
                                                      reset_singletons: None) -> None:
    cluster.add_service("alpha", replicas=2)
    discovery = compat.initialize_service_discovery(
        ServiceDiscoveryType.K8S,
        k8s_service_discovery_type="pod-ip",
        app=object(),
        namespace="default",
        port="80",
        label_selector="app=vllm",
        prefill_model_labels=None,
        decode_model_labels=None,
        watcher_timeout_seconds=0,
        health_check_timeout_seconds=5,
        api_client=cluster.api_client(),
        informer_config=FAST_INFORMER,
    )
    scraper = compat.initialize_engine_stats_scraper(0.2, 1.0)
    assert discovery.routing == "pod"  # production-stack's pod-ip keeps its meaning
    assert compat.get_service_discovery() is discovery
    assert compat.get_engine_stats_scraper() is scraper
    assert scraper.timeout == 1.0
    urls = sorted(f"http://{p.ip}:{p.engine.port}" for p in cluster.pods("alpha"))
    # A pod is listed once its model probe answered, which may come after its first scrape:
    # wait on each condition that is asserted, not on a neighbouring one.
    wait_for(lambda: sorted(e.url for e in discovery.get_endpoint_info()) == urls,
             message=lambda: f"pod view {[e.url for e in discovery.get_endpoint_info()]}")
    wait_for(lambda: sorted(scraper.get_engine_stats()) == urls, message="stats keyed by pod URL")
    discovery.add_sleep_label("alpha-0")  # production-stack's /sleep calls these
    discovery.remove_sleep_label("alpha-0")


def test_second_initialization_and_other_discovery_types_are_refused(
        reset_singletons: None) -> None:
    with pytest.raises(ValueError, match="not initialized"):
        compat.get_service_discovery()
    with pytest.raises(ValueError, match="not initialized"):
        compat.get_engine_stats_scraper()
    with pytest.raises(ValueError, match="static"):
        compat.initialize_service_discovery(ServiceDiscoveryType.STATIC, urls=[])


@pytest.mark.parametrize(("flag", "routing"), [("pod-ip", "pod"), ("service-name", "service"),
                                               (None, "pod"), ("", "pod"), (" Service-Name ",
                                                                            "service")])
def test_the_discovery_type_flag_maps_to_routing(flag: str | None, routing: str) -> None:
    assert compat.routing_for(flag) == routing


def test_an_unknown_discovery_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown k8s_service_discovery_type 'dns'"):
        compat.routing_for("dns")
