"""Shared fixtures: a simulated cluster, fast timing configs, a discovery factory, wait_for."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from vllm_router_svcdisc.backoff import BackoffPolicy
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.informer import InformerConfig
from vllm_router_svcdisc.probe import ProbeConfig
from vllm_router_svcdisc.sim.cluster import SimCluster

T = TypeVar("T")

#: client-go's timings scaled down so reconnects and backoffs take milliseconds.
FAST_INFORMER = InformerConfig(
    watch_timeout_range=(5, 6),
    read_timeout_slack=5,
    connect_timeout=2,
    list_read_timeout=5,
    backoff_initial=0.05,
    backoff_cap=0.5,
)

#: Probes often enough that a changed engine is noticed within a couple of seconds.
FAST_PROBE = ProbeConfig(
    interval=2,
    timeout=1,
    attempts=2,
    retry_wait=0.01,
    backoff=BackoffPolicy(initial=0.025, factor=2.0, jitter=1.0, cap=0.5,
                          reset_after=float("inf")),
)


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    message: str | Callable[[], str] = "condition not met",
    interval: float = 0.01,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline.

    ``message`` may be a callable so the failure can show the state at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:.1f}s: {text}")
        time.sleep(interval)


@pytest.fixture
def fast_informer() -> InformerConfig:
    return FAST_INFORMER


@pytest.fixture
def fast_probe() -> ProbeConfig:
    return FAST_PROBE


@pytest.fixture
def cluster() -> Iterator[SimCluster]:
    """A started simulated cluster (API server, DNS, engines), stopped after the test."""
    with SimCluster(bookmark_interval=0.25) as sim:
        yield sim


MakeDiscovery = Callable[..., K8sServiceDiscovery]


@pytest.fixture
def make_discovery() -> Iterator[Callable[..., K8sServiceDiscovery]]:
    """``make_discovery(cluster, **kw)``: a K8sServiceDiscovery on the simulated cluster.

    Defaults: namespace "default", selector ``app=vllm``, fast informer and probe configs.
    Everything made is closed at teardown, even when the test fails.
    """
    made: list[K8sServiceDiscovery] = []

    def factory(sim: SimCluster, **kwargs: Any) -> K8sServiceDiscovery:
        kwargs.setdefault("namespace", "default")
        kwargs.setdefault("label_selector", "app=vllm")
        kwargs.setdefault("api_client", sim.api_client())
        kwargs.setdefault("informer_config", FAST_INFORMER)
        kwargs.setdefault("probe_config", FAST_PROBE)
        discovery = K8sServiceDiscovery(**kwargs)
        made.append(discovery)
        return discovery

    yield factory
    for discovery in made:
        discovery.close()
