"""Engines that misbehave: each fault on one pod (scraping) or one Service (model probes).

The end state is compared exactly with the simulator: the faulty pod stays in its Service's
endpoints (Kubernetes says it is ready) but not in the stats, where it counts as failed; an
engine that refuses connections or answers 5xx also leaves the pod view (the outlier policy
ejects it; it counts as ejected in the stats); every other pod's stats are exact.  Failures
are logged once per state change, not once per retry: the tests count a pod's (or Service's)
log records over several retry cycles.  Every test ends
with the harness invariants (nothing escaped ``get_*()``, no thread died, ``close()`` < 2 s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import wait_for
from tests.reliability import (
    LIBRARY_LOGGER,
    SCRAPE_TIMEOUT,
    Harness,
    RawServer,
    engine_like,
    harnessed,
    http_response,
    pod_url,
    replace_engine,
)
from vllm_router_svcdisc.sim.cluster import SimCluster, SimPod
from vllm_router_svcdisc.sim.engine import EngineMode

MIN_RETRIES = 3  # retry cycles a failing pod goes through before its log lines are counted


@pytest.fixture
def harness(cluster: SimCluster, caplog: pytest.LogCaptureFixture) -> Iterator[Harness]:
    cluster.add_service("vllm-a", replicas=3)
    cluster.add_service("vllm-b", replicas=1)
    with harnessed(cluster, caplog) as h:
        h.wait_exact()
        yield h


def metrics_requests(pod: SimPod) -> Callable[[], int]:
    return lambda: pod.engine.request_counts().get("/metrics", 0)


def scrape_lines(harness: Harness, pod: SimPod, what: str,
                 level: int = logging.INFO) -> list[logging.LogRecord]:
    """The scraper's log lines about ``pod`` (named with its URL and Services) saying ``what``."""
    url = pod_url(harness.cluster, pod)
    return [r for r in harness.records(f"scraping pod {pod.name} ({url}) of default/", level)
            if what in r.getMessage()]


def assert_pod_fault_contained(harness: Harness, bad: SimPod,
                               attempts: Callable[[], int], *, ejected: bool = False) -> None:
    """Only ``bad``'s stats go; its failure is logged once over several retry cycles.

    Kubernetes still says ready: the Service keeps it; the pod view keeps it too unless the
    fault is one the outlier policy ejects for (``ejected``: then logged once as well)."""
    url = pod_url(harness.cluster, bad)
    out = [bad] if ejected else []
    harness.wait_stats_exact(failing=[bad])
    harness.wait_endpoints_exact(ejected=out)
    first = attempts()
    wait_for(lambda: attempts() >= first + MIN_RETRIES, 15,
             lambda: f"{url} retried only {attempts() - first} times")
    harness.wait_stats_exact(failing=[bad])
    failures = scrape_lines(harness, bad, "failed", logging.WARNING)
    assert len(failures) == 1, [r.getMessage() for r in failures]
    ejections = harness.records(f"({url}) ejected", logging.WARNING)
    assert len(ejections) == int(ejected), [r.getMessage() for r in ejections]


def assert_pod_recovers(harness: Harness, bad: SimPod) -> None:
    harness.wait_exact()
    assert len(scrape_lines(harness, bad, "works again")) == 1


def test_black_holed_engine_loses_only_its_own_stats(harness, cluster):
    bad = cluster.pods("vllm-a")[0]
    bad.engine.mode = EngineMode.BLACKHOLE
    assert_pod_fault_contained(harness, bad, metrics_requests(bad))
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


def test_slow_loris_engine_trickling_bytes_is_cut_off_by_the_body_deadline(harness, cluster):
    bad = cluster.pods("vllm-a")[0]
    bad.engine.trickle_interval = SCRAPE_TIMEOUT / 3  # every read gets a byte in time
    bad.engine.mode = EngineMode.TRICKLE
    assert_pod_fault_contained(harness, bad, metrics_requests(bad))
    assert harness.scraper is not None
    assert harness.scraper.telemetry().failures_by_cause.get("timeout", 0) >= MIN_RETRIES
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


def test_engine_answering_500_loses_only_its_own_stats(harness, cluster):
    bad = cluster.pods("vllm-a")[1]
    bad.engine.mode = EngineMode.ERROR500
    assert_pod_fault_contained(harness, bad, metrics_requests(bad), ejected=True)
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


def test_engine_answering_garbage_text_loses_only_its_own_stats(harness, cluster):
    bad = cluster.pods("vllm-a")[2]
    bad.engine.mode = EngineMode.GARBAGE
    assert_pod_fault_contained(harness, bad, metrics_requests(bad))
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


def test_metrics_body_of_50_mb_with_its_length_declared_is_refused_unread(harness, cluster):
    bad = cluster.pods("vllm-a")[0]
    assert bad.engine.oversize_bytes == 50 * 1024 * 1024
    bad.engine.mode = EngineMode.OVERSIZE
    assert_pod_fault_contained(harness, bad, metrics_requests(bad))
    (record,) = scrape_lines(harness, bad, "failed", logging.WARNING)
    assert "byte cap" in record.getMessage()
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


def test_metrics_body_of_50_mb_streamed_without_a_length_is_cut_at_the_cap(harness, cluster):
    bad = cluster.pods("vllm-a")[0]
    line = b'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
    block = line * (65536 // len(line))
    chunks = 50 * 1024 * 1024 // len(block)

    def streamed() -> Iterator[bytes]:
        yield (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for _ in range(chunks):
            yield b"%x\r\n%s\r\n" % (len(block), block)
        yield b"0\r\n\r\n"

    with replace_engine(bad, engine_like(bad, metrics=streamed)) as raw:
        assert_pod_fault_contained(harness, bad, lambda: raw.count("/metrics"))
        (record,) = scrape_lines(harness, bad, "failed", logging.WARNING)
        assert "byte cap" in record.getMessage()
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


def test_metrics_redirect_to_another_host_is_not_followed(harness, cluster):
    bad = cluster.pods("vllm-a")[1]
    redirect = http_response("302 Found", b"", headers={"Location": "http://127.0.0.2:1/"})
    with RawServer("127.0.0.2", 0, lambda *_: http_response("200 OK", b"")) as elsewhere:
        moved = redirect.replace(b"127.0.0.2:1", f"127.0.0.2:{elsewhere.port}".encode())
        with replace_engine(bad, engine_like(bad, metrics=lambda: moved)) as raw:
            assert_pod_fault_contained(harness, bad, lambda: raw.count("/metrics"))
            (record,) = scrape_lines(harness, bad, "failed", logging.WARNING)
            assert "redirect" in record.getMessage()
        assert elsewhere.connections == 0, "a redirect was followed"
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


def test_engine_refusing_connections_loses_only_its_own_stats(harness, cluster):
    bad = cluster.pods("vllm-a")[2]
    scraper = harness.scraper
    assert scraper is not None
    bad.engine.mode = EngineMode.DOWN
    assert_pod_fault_contained(
        harness, bad, lambda: scraper.telemetry().failures_by_cause.get("connection", 0),
        ejected=True)
    bad.engine.mode = EngineMode.OK
    assert_pod_recovers(harness, bad)
    harness.finish()


# -- model probe faults (the whole Service) -----------------------------------------------------


def assert_service_fault_contained(harness: Harness, key: str, reason_part: str, *,
                                   probes: int = 3, failing: bool = True) -> None:
    """The Service is listed, not routable, with a reason; one WARNING over several probes."""
    discovery = harness.discovery

    def reason() -> str:
        view = discovery.get_service_status().get(key)
        return (view.reason or "") if view is not None else ""

    wait_for(lambda: reason_part in reason(), 10, lambda: f"{key}: {reason()!r}")
    name = key.split("/", 1)[1]
    assert harness.cluster.url_of(name) not in {e.url for e in discovery.get_endpoint_info()}

    def every_probe_logged() -> bool:
        """Each probe target of the Service (its ready pods, its name) reported and logged.

        The reason waited on above comes from one target; the others are probed by other
        workers and may report later (a new Service's pod after its name check), and a worker
        logs a change after queuing the result the view shows: a line can follow the reason.
        """
        view = discovery.get_service_status().get(key)
        if view is None:
            return False
        caplog = harness.caplog  # lines of the fixture's phase too: a target's first report
        lines = [r.getMessage() for r in (*caplog.get_records("setup"), *caplog.records)
                 if r.name == f"{LIBRARY_LOGGER}.probe" and key in r.getMessage()]
        pods = all(p.url in view.pod_probes and any(p.url in line for line in lines)
                   for p in view.ready_pods)
        named = any(line.startswith((f"the name of service {key} ", f"service {key}: "))
                    for line in lines)
        return pods and named and (not failing or bool(harness.records(key, logging.WARNING)))

    wait_for(every_probe_logged, 10,
             lambda: f"probes not all logged: {[r.getMessage() for r in harness.records(key)]}")
    logged = len(harness.records(key))
    done = discovery.probe_counts()[0]
    wait_for(lambda: discovery.probe_counts()[0] >= done + probes, 10, "no probe retries")
    assert reason_part in reason()
    assert len(harness.records(key)) == logged, [r.getMessage() for r in harness.records(key)]
    warned = harness.records(key, logging.WARNING)  # names the Service (and the pod)
    assert len(warned) == int(failing), [r.getMessage() for r in warned]


def test_models_answering_invalid_json_makes_only_that_service_unroutable(harness, cluster):
    (bad,) = cluster.pods("vllm-b")
    invalid = http_response("200 OK", b'{"object": "list", "data": [{"id": "trunc')
    with replace_engine(bad, engine_like(bad, models=lambda: invalid)):
        assert_service_fault_contained(harness, "default/vllm-b", "invalid JSON")
        harness.wait_stats_exact()  # its /metrics still answer
    bad.engine.mode = EngineMode.OK
    harness.wait_exact()
    harness.finish()


@pytest.mark.parametrize("body", [b"[]", b'{"object": "list"}', b'{"data": {"id": "m"}}',
                                  b'"list"', b"null"],
                         ids=["array", "no-data", "data-not-a-list", "string", "null"])
def test_models_answering_the_wrong_shape_makes_only_that_service_unroutable(
        harness, cluster, body):
    (bad,) = cluster.pods("vllm-b")
    wrong = http_response("200 OK", body)
    with replace_engine(bad, engine_like(bad, models=lambda: wrong)):
        assert_service_fault_contained(harness, "default/vllm-b", "unexpected shape")
    bad.engine.mode = EngineMode.OK
    harness.wait_exact()
    harness.finish()


def test_models_listing_no_valid_card_is_a_wrong_answer(harness, cluster):
    (bad,) = cluster.pods("vllm-b")
    cards = http_response("200 OK", b'{"object": "list", "data": [{"id": 7}, {}, "x", null]}')
    with replace_engine(bad, engine_like(bad, models=lambda: cards)):
        assert_service_fault_contained(harness, "default/vllm-b", "no valid model card")
    bad.engine.mode = EngineMode.OK
    harness.wait_exact()
    harness.finish()


def test_nxdomain_for_a_service_name_makes_only_that_service_unroutable(
        harness, cluster, monkeypatch):
    register = cluster.dns.register
    monkeypatch.setattr(cluster.dns, "register", lambda namespace, name, addresses: (
        None if name == "vllm-n" else register(namespace, name, addresses)))
    service = cluster.add_service("vllm-n", replicas=1)  # its name never resolves
    assert_service_fault_contained(harness, "default/vllm-n", "DNS")
    harness.wait_stats_exact()  # its pod is scraped by IP all the same
    cluster_ip = service.cluster_ip
    register("default", "vllm-n", lambda: [cluster_ip])  # resolves: recovers by itself
    harness.wait_exact()
    harness.finish()
