"""Outlier ejection end to end: the simulated cluster, the real client, real sockets.

Kubernetes keeps every pod here ready; only discovery's own checks (and a router's reported
outcomes) take pods out of the pod view, and bring them back.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import wait_for
from vllm_router_svcdisc import cli
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.outliers import OutlierConfig
from vllm_router_svcdisc.poller import Failure
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster, SimPod
from vllm_router_svcdisc.sim.engine import EngineMode
from vllm_router_svcdisc.telemetry import register_metrics


def pod_view(discovery: K8sServiceDiscovery) -> set[str]:
    return {entry.url for entry in discovery.get_pod_endpoint_info()}


def states(discovery: K8sServiceDiscovery, key: str) -> dict[str, tuple[str, str | None]]:
    view = discovery.get_service_status()[key]
    return {pod.url: (pod.state, pod.reason) for pod in view.pods}


def urls(pods: list[SimPod]) -> set[str]:
    return {pod.engine.url for pod in pods}


def start(cluster: SimCluster, make_discovery: Any, replicas: int, **kwargs: Any
          ) -> tuple[K8sServiceDiscovery, list[SimPod]]:
    cluster.add_service("vllm-a", replicas=replicas)
    pods = cluster.pods("vllm-a")
    discovery = make_discovery(cluster, routing="pod", **kwargs)
    wait_for(lambda: pod_view(discovery) == urls(pods), 15.0,
             lambda: f"pod view {pod_view(discovery)}")
    return discovery, pods


def test_a_crashed_engine_leaves_the_pod_view_and_returns_when_it_answers(
        cluster: SimCluster, make_discovery: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vllm_router_svcdisc")
    discovery, pods = start(cluster, make_discovery, 3)
    crashed = pods[0]
    crashed.engine.mode = EngineMode.DOWN  # connections refused; Kubernetes still says ready

    wait_for(lambda: pod_view(discovery) == urls(pods[1:]), 5.0,
             lambda: f"pod view {pod_view(discovery)}")
    state, reason = states(discovery, "default/vllm-a")[crashed.engine.url]
    assert state == "ejected" and reason is not None and reason.startswith("refused")
    # the Service entry keeps every pod, with its state
    info = discovery.get_snapshot().endpoint_infos[0]
    assert {pod.url for pod in info.pods} == urls(pods)
    assert discovery.outlier_stats()["ejected"] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "ejected" in r.getMessage() and crashed.engine.url in r.getMessage()]
    assert len(warnings) == 1 and "default/vllm-a" in warnings[0].getMessage()

    crashed.engine.mode = EngineMode.OK
    wait_for(lambda: pod_view(discovery) == urls(pods), 10.0,
             lambda: f"pod view {pod_view(discovery)}")
    assert states(discovery, "default/vllm-a")[crashed.engine.url] == ("ok", None)
    assert any(r.levelno == logging.INFO and "returned" in r.getMessage()
               and crashed.engine.url in r.getMessage() for r in caplog.records)


def test_past_the_cap_pods_stay_listed_and_discovery_says_it_fails_open(
        cluster: SimCluster, make_discovery: Any) -> None:
    discovery, pods = start(cluster, make_discovery, 3)  # 50 % of 3: one pod may be out
    for pod in pods[:2]:
        pod.engine.mode = EngineMode.DOWN

    def failing_open() -> bool:
        view = discovery.get_service_status()["default/vllm-a"]
        return len(view.ejected) == 1 and len(view.failing_open) == 1

    wait_for(failing_open, 5.0, lambda: f"{states(discovery, 'default/vllm-a')}")
    assert len(pod_view(discovery)) == 2  # one out, one kept in, the healthy one
    health = discovery.health()
    assert health.healthy and any("failing open" in r for r in health.reasons)
    assert discovery.outlier_stats()["failing_open_services"] == 1
    assert {state for state, _ in states(discovery, "default/vllm-a").values()} == {
        "ok", "ejected", "fail_open"}


def test_a_single_pod_is_never_ejected(cluster: SimCluster, make_discovery: Any) -> None:
    discovery, pods = start(cluster, make_discovery, 1)
    pods[0].engine.mode = EngineMode.DOWN
    wait_for(lambda: discovery.get_service_status()["default/vllm-a"].failing_open, 5.0,
             lambda: f"{states(discovery, 'default/vllm-a')}")
    assert pod_view(discovery) == urls(pods)


def test_a_router_reported_connect_error_ejects_a_pod_and_a_service_url_is_ignored(
        cluster: SimCluster, make_discovery: Any) -> None:
    # liveness checks far apart: only the reported outcome can eject within the test
    discovery, pods = start(cluster, make_discovery, 2,
                            outliers=OutlierConfig(liveness_interval=60.0))
    service_url = cluster.url_of("vllm-a")
    assert discovery.report_result(service_url, "connect_error") is False
    assert discovery.report_result(pods[0].engine.url, 404) is False  # 4xx: not the engine
    assert pod_view(discovery) == urls(pods)
    assert discovery.report_result(pods[0].engine.url, "connect_error") is True
    wait_for(lambda: pod_view(discovery) == urls(pods[1:]), 5.0,
             lambda: f"pod view {pod_view(discovery)}")
    # re-checked after base_ejection_time, the pod answers and returns
    wait_for(lambda: pod_view(discovery) == urls(pods), 10.0,
             lambda: f"pod view {pod_view(discovery)}")


def test_ejected_pods_are_left_out_of_service_stats(
        cluster: SimCluster, make_discovery: Any) -> None:
    cluster.add_service("vllm-a", replicas=3)
    pods = cluster.pods("vllm-a")
    for pod in pods:
        pod.engine.running = 2
    discovery = make_discovery(cluster)
    scraper = EngineStatsScraper(discovery, scrape_interval=0.25)
    try:
        url = cluster.url_of("vllm-a")
        wait_for(lambda: getattr(scraper.get_engine_stats().get(url), "pods_scraped", 0) == 3,
                 15.0, "stats of three pods")
        pods[0].engine.mode = EngineMode.DOWN
        wait_for(lambda: getattr(scraper.get_engine_stats().get(url), "pods_ejected", 0) == 1,
                 10.0, lambda: f"{scraper.get_engine_stats().get(url)}")
        stats = scraper.get_engine_stats()[url]
        assert stats.num_running_requests == 4 and pods[0].engine.url not in stats.per_pod
    finally:
        scraper.close()


def test_a_readiness_blip_keeps_the_ejection_history(
        cluster: SimCluster, make_discovery: Any) -> None:
    discovery, pods = start(cluster, make_discovery, 2,
                            outliers=OutlierConfig(liveness_interval=60.0))
    blip = pods[0]
    assert discovery.report_result(blip.engine.url, "connect_error")
    wait_for(lambda: pod_view(discovery) == urls(pods[1:]), 5.0, "not ejected")
    record = discovery.health_book.get(blip.engine.url)
    assert record is not None and record.times_ejected == 1

    cluster.set_ready(blip, False)
    wait_for(lambda: len(discovery.get_service_status()["default/vllm-a"].ready_pods) == 1,
             5.0, "the blip never showed")
    cluster.set_ready(blip, True)
    # back with its record: its ejection history is kept, not started afresh (models kept
    # over a blip: tests/unit/test_cache.py)
    wait_for(lambda: len(discovery.get_service_status()["default/vllm-a"].ready_pods) == 2,
             5.0, "the pod never came back")
    after = discovery.health_book.get(blip.engine.url)
    assert after is not None and after.times_ejected == 1
    assert after.departed_at is None


# -- the simulator's failure modes: node death, wedged engine, slow /metrics ----------------


def test_a_dead_nodes_pods_leave_the_pod_view_long_before_kubernetes_notices(
        cluster: SimCluster, make_discovery: Any) -> None:
    discovery, pods = start(cluster, make_discovery, 3)  # one pod per node
    node = pods[0].node_name
    dead = cluster.kill_node(node)  # Kubernetes keeps them ready for its 50 s grace
    assert [p.engine.url for p in dead] == [pods[0].engine.url]
    wait_for(lambda: pod_view(discovery) == urls(pods[1:]), 10.0,
             lambda: f"pod view {pod_view(discovery)}")
    state, reason = states(discovery, "default/vllm-a")[pods[0].engine.url]
    assert state == "ejected" and reason is not None and reason.startswith("connect_timeout")
    assert len(discovery.get_service_status()["default/vllm-a"].ready_pods) == 3  # still ready

    cluster.revive_node(node)
    wait_for(lambda: pod_view(discovery) == urls(pods), 15.0,
             lambda: f"pod view {pod_view(discovery)}")
    assert states(discovery, "default/vllm-a")[pods[0].engine.url] == ("ok", None)


def test_a_wedged_engine_is_ejected_as_wedged_and_a_busy_one_is_not(
        cluster: SimCluster, make_discovery: Any) -> None:
    config = OutlierConfig(wedged_after=2.0, progress_interval=0.25)
    discovery, pods = start(cluster, make_discovery, 3, outliers=config)
    wedged, busy = pods[0], pods[1]
    wedged.engine.running = busy.engine.running = 2  # both have requests running
    wedged.engine.mode = EngineMode.WEDGED  # its token counters stop; everything answers 200
    wait_for(lambda: pod_view(discovery) == urls(pods[1:]), 15.0,
             lambda: f"{states(discovery, 'default/vllm-a')}")
    state, reason = states(discovery, "default/vllm-a")[wedged.engine.url]
    assert state == "ejected" and reason is not None and reason.startswith("wedged")
    assert states(discovery, "default/vllm-a")[busy.engine.url] == ("ok", None)
    assert discovery.outlier_stats()["ejections_by_reason"] == {"wedged": 1}

    wedged.engine.mode = EngineMode.OK  # the engine recovers: its counters move again
    wait_for(lambda: pod_view(discovery) == urls(pods), 15.0,
             lambda: f"{states(discovery, 'default/vllm-a')}")


@pytest.mark.parametrize("mode", [EngineMode.SLOW, EngineMode.SLOW_METRICS])
def test_a_slow_engine_is_not_ejected_its_stats_go_stale(
        cluster: SimCluster, make_discovery: Any, mode: EngineMode) -> None:
    discovery, pods = start(cluster, make_discovery, 2)
    slow = pods[0]
    scraper = EngineStatsScraper(discovery, scrape_interval=0.25, timeout=0.5, stale_after=30.0)
    try:
        wait_for(lambda: slow.engine.url in scraper.get_engine_stats(), 10.0, "no stats")
        slow.engine.slow_delay = 60.0
        # SLOW: everything answers late; SLOW_METRICS: /metrics late, completions served
        slow.engine.mode = mode
        timeouts = scraper.telemetry().failures.labels("timeout")
        start_count = timeouts._value.get()
        wait_for(lambda: timeouts._value.get() >= start_count + 4, 20.0,
                 "the slow /metrics never timed out four times")
        stats = scraper.get_engine_stats()[slow.engine.url]
        assert stats.age_at(scraper.now()) > scraper.stale_age  # marked stale, with its age
        record = discovery.health_book.get(slow.engine.url)
        assert record is not None and set(record.failures) <= {Failure.READ_TIMEOUT}, record
        assert pod_view(discovery) == urls(pods)
        assert discovery.outlier_stats()["ejections_by_reason"] == {}
    finally:
        scraper.close()


def test_ejections_show_in_self_metrics_and_the_cli_table(
        cluster: SimCluster, make_discovery: Any) -> None:
    discovery, pods = start(cluster, make_discovery, 3)
    registry = CollectorRegistry()
    register_metrics(discovery, registry=registry)
    for pod in pods[:2]:
        pod.engine.mode = EngineMode.DOWN
    wait_for(lambda: discovery.outlier_stats()["failing_open_services"] == 1, 10.0,
             lambda: f"{discovery.outlier_stats()}")

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"vllm_svcdisc_{name}", labels)

    assert sample("outlier_ejections_total", reason="refused") == 1.0
    assert sample("outlier_ejected_pods") == 1.0
    assert sample("outlier_fail_open_services") == 1.0
    assert sample("outlier_fail_open_pods") == 1.0
    (row,) = cli.service_rows(discovery, None)
    assert len(row["ejected"]) == 1 and len(row["failing_open"]) == 1
    (line,) = cli.render_table([row]).splitlines()[1:]
    assert "ejected (refused" in line and "FAILING OPEN" in line
