"""Recovery detection through the real client: a /readyz check ends a grown backoff at once.

An outage long enough to grow the informer's backoff, then the API server comes back: the
informer must be back in step within a couple of check periods, not when its backoff wait
ends.  The fault is timed so the wait in progress when the server returns has seconds left
(each test says how many); the convergence deadline is narrower than that, and the informer's
``recovery_wakeups`` counter says the wait was cut short.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration, CoreV1Api

from tests.conftest import FAST_INFORMER, FAST_PROBE, wait_for
from tests.integration.test_informer import Recorder, converged, mismatch, service
from vllm_router_svcdisc.informer import Informer, InformerConfig
from vllm_router_svcdisc.sim.cluster import SimCluster

#: Backoff 1, 2, 4, 8 s (+ up to 100 % jitter); checks every 0.25 s.
RECOVERY = dataclasses.replace(FAST_INFORMER, backoff_initial=1.0, backoff_cap=30.0,
                               recovery_check_interval=0.25, recovery_check_timeout=1.0)
#: After three failures the informer waits at least 4 s: back in step within 3 s is the checker.
FAILURES_BEFORE_BACK = 3
WITHIN = 3.0


def client(cluster: SimCluster) -> ApiClient:
    """As ``load_api_client()`` configures one: no urllib3 retries."""
    configuration = Configuration()
    configuration.host = cluster.api.url
    configuration.retries = 0
    return ApiClient(configuration)


def start(cluster: SimCluster, api: ApiClient, config: InformerConfig = RECOVERY
          ) -> tuple[Informer, Recorder]:
    recorder = Recorder()
    informer = Informer("services",
                        functools.partial(CoreV1Api(api).list_namespaced_service, "default"),
                        recorder, config=config, api_client=api)
    informer.start()
    assert informer.wait_until_synced(5), informer.status()
    assert cluster.api.wait_for_watches(1, "services", timeout=5)
    return informer, recorder


def failures(informer: Informer) -> int:
    return informer.status().relists_by_cause.get("error", 0)


def test_after_a_long_outage_the_cache_is_back_within_a_check_period_not_a_backoff(cluster):
    cluster.api.put("services", service("stays"))
    cluster.api.put("services", service("deleted-during-outage"))
    api = client(cluster)
    informer, recorder = start(cluster, api)
    try:
        cluster.api.stop()  # unreachable: connection refused
        cluster.api.delete("services", "default", "deleted-during-outage")
        cluster.api.put("services", service("created-during-outage"))
        cluster.api.compact()  # and the restart loses the watch history: a re-LIST is due
        wait_for(lambda: failures(informer) >= FAILURES_BEFORE_BACK, 30,
                 lambda: f"the informer did not fail {FAILURES_BEFORE_BACK} times: "
                         f"{informer.status()}")
        cluster.api.start()  # the informer has just begun a wait of 4-8 s
        wait_for(converged(recorder, cluster), WITHIN, mismatch(recorder, cluster))
        assert informer.status().recovery_wakeups >= 1
        assert recorder.keys() == {"default/stays", "default/created-during-outage"}
    finally:
        assert informer.stop(2.0)


def test_with_recovery_checks_off_the_informer_waits_out_its_backoff(cluster):
    """The control: the same outage with ``recovery_check_interval=0`` is not back as soon."""
    cluster.api.put("services", service("a"))
    api = client(cluster)
    informer, recorder = start(cluster, api,
                               dataclasses.replace(RECOVERY, recovery_check_interval=0))
    try:
        cluster.api.stop()
        cluster.api.put("services", service("b"))
        wait_for(lambda: failures(informer) >= FAILURES_BEFORE_BACK, 30, "no failures")
        cluster.api.start()
        counted = dict(cluster.api.request_counts())
        wait_for(converged(recorder, cluster), 30, mismatch(recorder, cluster))
        assert informer.status().recovery_wakeups == 0
        assert cluster.api.request_counts().get(("get", "readyz"), 0) == 0
        assert counted.get(("get", "readyz"), 0) == 0
    finally:
        assert informer.stop(2.0)


def readyz(cluster: SimCluster) -> int:
    return cluster.api.request_counts().get(("get", "readyz"), 0)


def test_one_checker_per_api_client_bounds_the_load_of_a_sick_server(cluster, make_discovery):
    """Two informers of one discovery, 500 on every request: about one /readyz a period."""
    cluster.add_service("vllm-a", replicas=1)
    discovery = make_discovery(cluster, api_client=client(cluster), informer_config=RECOVERY,
                               probe_config=FAST_PROBE)
    assert discovery.wait_until_synced(5)
    wait_for(lambda: [e.url for e in discovery.get_endpoint_info()], 10, "never routable")
    before = readyz(cluster)
    outage = 6.0
    cluster.api.fail_for(outage, 500)
    cluster.api.cut_watches()
    cluster.add_service("vllm-b", replicas=1)  # made during the outage: must show up after
    wanted = {cluster.url_of("vllm-a"), cluster.url_of("vllm-b")}
    wait_for(lambda: {e.url for e in discovery.get_endpoint_info()} == wanted, outage + WITHIN,
             lambda: f"not back in step: {discovery.get_endpoint_info()}")
    checks = readyz(cluster) - before
    # one checker for both informers, at most one check per 0.25 s period while they wait
    assert 1 <= checks <= outage / RECOVERY.recovery_check_interval + 2, checks
    statuses = discovery.informer_status()
    assert statuses[0].recovery_checks == statuses[1].recovery_checks  # the same checker
    assert sum(s.recovery_wakeups for s in statuses) >= 1


@pytest.mark.parametrize("status", [403, 404])
def test_a_forbidden_or_absent_readyz_is_said_once_and_plain_backoff_recovers(
    cluster: SimCluster, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.api.put("services", service("a"))
    if status == 404:
        cluster.api.disable_resource("readyz")
    else:
        cluster.api.fail_for(60, 403, resource="readyz")
    config = dataclasses.replace(RECOVERY, backoff_initial=0.5, backoff_cap=2.0)
    api = client(cluster)
    informer, recorder = start(cluster, api, config)
    try:
        with caplog.at_level(logging.INFO, logger="vllm_router_svcdisc.recovery"):
            cluster.api.fail_for(4.0, 500, resource="services")
            cluster.api.cut_watches()
            wait_for(lambda: readyz(cluster) >= 1, 10, "readyz never checked")
            cluster.api.put("services", service("b"))
            wait_for(converged(recorder, cluster), 15, mismatch(recorder, cluster))
        lines = [r for r in caplog.records if r.name == "vllm_router_svcdisc.recovery"]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].levelno == logging.WARNING
        assert "/readyz" in lines[0].getMessage() and str(status) in lines[0].getMessage()
        assert readyz(cluster) == 1  # never asked again
        assert informer.status().recovery_wakeups == 0
    finally:
        assert informer.stop(2.0)


def test_the_checker_thread_ends_with_the_last_informer(cluster: SimCluster) -> None:
    import threading

    api: Any = client(cluster)
    cluster.api.put("services", service("a"))
    first, _ = start(cluster, api)
    second, _ = start(cluster, api)
    cluster.api.fail_for(30, 500)
    cluster.api.cut_watches()
    wait_for(lambda: readyz(cluster) >= 1, 10, "readyz never checked")
    assert [t for t in threading.enumerate() if t.name == "svcdisc-recovery"]
    assert first.stop(2.0)
    assert [t for t in threading.enumerate() if t.name == "svcdisc-recovery"]
    assert second.stop(2.0)
    assert not [t for t in threading.enumerate()
                if t.name == "svcdisc-recovery" and t.is_alive()]
