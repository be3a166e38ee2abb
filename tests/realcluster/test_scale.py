"""1 000 Services on both backends: created in bulk, every one routable, readiness followed.

One scenario, two backends (``farm_backend``: the pods' engines are one engine-farm process, so
a thousand of them cost one process, not a thousand server threads). On the real control plane
the EndpointSlice and endpoints controllers write a slice and an Endpoints object per Service;
their client rate limit is raised for this (``KCM_API_QPS`` in controlplane.py, docs/testing.md).
Timings are printed (``-s``) and recorded in docs/testing.md, never asserted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from tests.conftest import wait_for
from tests.realcluster.backends import Backend
from tests.realcluster.conftest import TIER_INFORMER, TIER_PROBE
from tests.realcluster.test_scenarios import Discover
from vllm_router_svcdisc.discovery import K8sServiceDiscovery

SERVICES = 1000
FLIPPED = 25
#: a few writers: enough to keep kube-apiserver busy, few enough for a 2-core machine
WORKERS = 4
#: creating, publishing and probing 1 000 Services on a loaded 2-core machine
SCALE_CONVERGE = 240.0
#: one probe per pod while the test runs (every 2 s would be 500 probes a second)
SCALE_PROBE = dataclasses.replace(TIER_PROBE, interval=600.0)
SCALE_INFORMER = dataclasses.replace(TIER_INFORMER, list_read_timeout=60)

View = dict[str, list[str]]


def in_bulk(action: Callable[[str], object], items: Sequence[str]) -> None:
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="bulk") as pool:
        for _ in pool.map(action, items):
            pass  # re-raises the first failure


def truth(b: Backend, services: Sequence[str]) -> View:
    """Service URL -> its ready pod addresses, for the Services with any."""
    ready = {s: b.ready_ips(s) for s in services}
    return {b.url_of(s): ips for s, ips in ready.items() if ips}


def seen(d: K8sServiceDiscovery) -> View:
    return {info.url: sorted(p.ip for p in info.pods if p.routable)
            for info in d.get_snapshot().endpoint_infos}


def wait_view(d: K8sServiceDiscovery, b: Backend, expected: View, what: str) -> float:
    """Until discovery's routable Services and their pods equal ``expected``; the seconds."""
    started = time.monotonic()

    def why() -> str:
        now = seen(d)
        missing = sorted(set(expected) - set(now))
        extra = sorted(set(now) - set(expected))
        wrong = sorted(u for u in set(now) & set(expected) if now[u] != expected[u])
        return (f"[{b.name}] {what}: {len(now)}/{len(expected)} routable; missing "
                f"{missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)}), differing "
                f"{wrong[:5]} ({len(wrong)}); probes {d.probe_counts()}; health {d.health()}")

    wait_for(lambda: seen(d) == expected, SCALE_CONVERGE, why, interval=0.25)
    return time.monotonic() - started


def test_one_thousand_services(farm_backend: Backend, discover: Discover) -> None:
    b = farm_backend
    names = [f"vllm-{i:04d}" for i in range(SERVICES)]
    started = time.monotonic()
    in_bulk(lambda name: b.add_service(name, replicas=1), names)
    created = time.monotonic() - started

    d = discover(b, probe_config=SCALE_PROBE, informer_config=SCALE_INFORMER)
    everything = truth(b, names)
    assert len(everything) == SERVICES
    routable = wait_view(d, b, everything, "all created")
    assert len(d.get_pod_endpoint_info()) == SERVICES

    flipped = names[::SERVICES // FLIPPED]
    pods = [b.pods(name)[0] for name in flipped]
    in_bulk(lambda pod: b.set_ready(pod, False), pods)
    expected = truth(b, names)
    assert len(expected) == SERVICES - FLIPPED
    unready = wait_view(d, b, expected, "some unready")
    assert not {b.url_of(n) for n in flipped} & set(seen(d))
    gone = {b.pod_ip(p) for p in pods}
    assert not gone & {urlsplit(info.url).hostname for info in d.get_pod_endpoint_info()}

    in_bulk(lambda pod: b.set_ready(pod, True), pods)
    back = wait_view(d, b, truth(b, names), "ready again")
    assert len(seen(d)) == SERVICES and d.get_health()
    print(f"\n[{b.name}] {SERVICES} Services: created in {created:.1f}s ({WORKERS} writers), "
          f"all routable {routable:.1f}s later; {FLIPPED} unready reflected in {unready:.1f}s, "
          f"ready again in {back:.1f}s")
