"""close() ends every thread the library started, even with requests stuck on black holes.

The engines here accept the connection, read the request and never answer; the probe and the
scrape timeouts are long (30 s), so a close() that only waited for them could not pass.
"""

from __future__ import annotations

import dataclasses
import threading

from tests.conftest import FAST_PROBE, wait_for
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster
from vllm_router_svcdisc.sim.engine import EngineMode

SLOW_PROBE = dataclasses.replace(FAST_PROBE, timeout=30.0, attempts=1)


def _library_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Library threads started since ``before`` was taken: this test's, not a leftover of an
    earlier test still winding down on its own schedule."""
    return [t for t in threading.enumerate()
            if t.name.startswith("svcdisc-") and t.is_alive() and t not in before]


def _requests(cluster: SimCluster, path: str) -> int:
    return sum(p.engine.request_counts().get(path, 0) for p in cluster.pods("hole"))


def test_discovery_close_ends_a_probe_blocked_on_a_black_hole(cluster, make_discovery) -> None:
    before = set(threading.enumerate())
    cluster.add_service("hole", replicas=1)
    for pod in cluster.pods("hole"):
        pod.engine.mode = EngineMode.BLACKHOLE
    discovery = make_discovery(cluster, probe_config=SLOW_PROBE)
    wait_for(lambda: _requests(cluster, "/v1/models") >= 1, 10.0, "no probe reached the engine")
    assert any(t.name.startswith("svcdisc-probe") for t in _library_threads(before))
    discovery.close()
    assert _library_threads(before) == []


def test_scraper_close_ends_a_scrape_blocked_on_a_black_hole(cluster, make_discovery) -> None:
    before = set(threading.enumerate())
    cluster.add_service("hole", replicas=1)
    discovery = make_discovery(cluster)
    wait_for(lambda: discovery.get_endpoint_info(), 10.0, "the Service never became routable")
    for pod in cluster.pods("hole"):
        pod.engine.mode = EngineMode.BLACKHOLE
    scraper = EngineStatsScraper(discovery, scrape_interval=0.2, timeout=30.0)
    wait_for(lambda: _requests(cluster, "/metrics") >= 1, 10.0, "no scrape reached the engine")
    scraper.close()
    discovery.close()
    assert _library_threads(before) == []


def test_discovery_close_ends_the_recovery_checker_during_an_outage(
        cluster, make_discovery) -> None:
    from tests.integration.test_recovery import RECOVERY, client

    before = set(threading.enumerate())
    cluster.add_service("ok", replicas=1)
    discovery = make_discovery(cluster, api_client=client(cluster), informer_config=RECOVERY)
    assert discovery.wait_until_synced(5)
    cluster.api.fail_for(60, 500)  # list, watch and /readyz: the informers wait in backoff
    cluster.api.cut_watches()
    wait_for(lambda: any(t.name == "svcdisc-recovery" for t in _library_threads(before)), 10.0,
             "no recovery checker thread")
    discovery.close()
    assert _library_threads(before) == []
