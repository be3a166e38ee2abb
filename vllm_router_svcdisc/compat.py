"""production-stack's module-level call shape: initialize once, get anywhere.

production-stack wires its discovery and scraper as process singletons
(``initialize_service_discovery(...)`` / ``get_service_discovery()``,
``initialize_engine_stats_scraper(interval)`` / ``get_engine_stats_scraper()``).  These
functions offer the same shape over our classes, so the router's wiring changes by an import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .discovery import K8sServiceDiscovery
from .scraper import EngineStatsScraper

_lock = threading.Lock()
_discovery: K8sServiceDiscovery | None = None
_scraper: EngineStatsScraper | None = None

#: production-stack's ``--k8s-service-discovery-type`` -> our ``routing``; unset means its
#: default, ``pod-ip``.
ROUTING_BY_DISCOVERY_TYPE = {"pod-ip": "pod", "service-name": "service"}


def routing_for(k8s_service_discovery_type: str | None) -> str:
    """The ``routing`` that keeps the meaning of production-stack's discovery type flag."""
    name = (k8s_service_discovery_type or "").strip().lower() or "pod-ip"
    if name not in ROUTING_BY_DISCOVERY_TYPE:
        raise ValueError(f"unknown k8s_service_discovery_type {k8s_service_discovery_type!r} "
                         f"(expected one of {', '.join(ROUTING_BY_DISCOVERY_TYPE)})")
    return ROUTING_BY_DISCOVERY_TYPE[name]


def create_service_discovery(**kwargs: Any) -> K8sServiceDiscovery:
    """``K8sServiceDiscovery`` from production-stack's K8S keyword arguments.

    ``k8s_service_discovery_type`` becomes ``routing`` (``pod-ip``, production-stack's
    default -> ``"pod"``; ``service-name`` -> ``"service"``) unless ``routing`` is given.
    """
    discovery_type = kwargs.pop("k8s_service_discovery_type", None)
    kwargs.setdefault("routing", routing_for(discovery_type))
    return K8sServiceDiscovery(**kwargs)


def initialize_service_discovery(service_discovery_type: Any = "k8s",
                                 **kwargs: Any) -> K8sServiceDiscovery:
    """Create the process-wide discovery (see :func:`create_service_discovery`).

    Called the way production-stack calls its own: the first argument is its
    ``ServiceDiscoveryType`` (only ``K8S`` is ours to serve).
    """
    global _discovery
    kind = str(getattr(service_discovery_type, "value", service_discovery_type)).lower()
    if kind != "k8s":
        raise ValueError(f"vllm_router_svcdisc serves Kubernetes discovery, not {kind!r}")
    with _lock:
        if _discovery is not None:
            raise ValueError("service discovery already initialized")
        _discovery = create_service_discovery(**kwargs)
        return _discovery


def get_service_discovery() -> K8sServiceDiscovery:
    if _discovery is None:
        raise ValueError("service discovery not initialized")
    return _discovery


def initialize_engine_stats_scraper(scrape_interval: float, scrape_timeout: float | None = None,
                                    *, discovery_provider: Callable[[], Any] | None = None,
                                    **kwargs: Any) -> EngineStatsScraper:
    """Create the process-wide scraper, called like production-stack's.

    ``scrape_timeout`` is the per-request timeout (default 2 s, independent of the interval).
    The scraper follows ``discovery_provider()`` (default: :func:`current_discovery`), so it
    keeps up when a host swaps its discovery singleton.
    """
    global _scraper
    if scrape_timeout is not None:
        kwargs["timeout"] = scrape_timeout
    with _lock:
        if _scraper is not None:
            raise ValueError("engine stats scraper already initialized")
        _scraper = EngineStatsScraper(None, scrape_interval,
                                      discovery_provider=discovery_provider or current_discovery,
                                      **kwargs)
        return _scraper


def current_discovery() -> K8sServiceDiscovery | None:
    """The discovery initialized here, or None (a provider for scrapers and collectors)."""
    return _discovery


def get_engine_stats_scraper() -> EngineStatsScraper:
    if _scraper is None:
        raise ValueError("engine stats scraper not initialized")
    return _scraper


def reset() -> None:
    """Close and forget both singletons (for tests and reconfiguration)."""
    global _discovery, _scraper
    with _lock:
        scraper, discovery = _scraper, _discovery
        _scraper = _discovery = None
    if scraper is not None:
        scraper.close()
    if discovery is not None:
        discovery.close()
