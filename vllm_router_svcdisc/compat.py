"""production-stack's module-level call shape: initialize once, get anywhere.

production-stack wires its discovery and scraper as process singletons
(``initialize_service_discovery(...)`` / ``get_service_discovery()``,
``initialize_engine_stats_scraper(interval)`` / ``get_engine_stats_scraper()``).  These
functions offer the same shape over our classes, so the router's wiring changes by an import.
"""

from __future__ import annotations

import threading
from typing import Any

from .discovery import K8sServiceDiscovery
from .scraper import EngineStatsScraper

_lock = threading.Lock()
_discovery: K8sServiceDiscovery | None = None
_scraper: EngineStatsScraper | None = None


def initialize_service_discovery(service_discovery_type: Any = "k8s",
                                 **kwargs: Any) -> K8sServiceDiscovery:
    """Create the process-wide discovery; keyword arguments are ``K8sServiceDiscovery``'s.

    Called the way production-stack calls its own: the first argument is its
    ``ServiceDiscoveryType`` (only ``K8S`` is ours to serve) and its extra
    ``k8s_service_discovery_type`` keyword is accepted and ignored.
    """
    global _discovery
    kind = str(getattr(service_discovery_type, "value", service_discovery_type)).lower()
    if kind != "k8s":
        raise ValueError(f"vllm_router_svcdisc serves Kubernetes discovery, not {kind!r}")
    kwargs.pop("k8s_service_discovery_type", None)
    with _lock:
        if _discovery is not None:
            raise ValueError("service discovery already initialized")
        _discovery = K8sServiceDiscovery(**kwargs)
        return _discovery


def get_service_discovery() -> K8sServiceDiscovery:
    if _discovery is None:
        raise ValueError("service discovery not initialized")
    return _discovery


def initialize_engine_stats_scraper(scrape_interval: float, scrape_timeout: float | None = None,
                                    *, discovery: Any = None,
                                    **kwargs: Any) -> EngineStatsScraper:
    """Create the process-wide scraper, called like production-stack's.

    ``scrape_timeout`` is the per-request timeout (default 2 s, independent of the interval);
    ``discovery`` defaults to the one initialized here.
    """
    global _scraper
    if scrape_timeout is not None:
        kwargs["timeout"] = scrape_timeout
    with _lock:
        if _scraper is not None:
            raise ValueError("engine stats scraper already initialized")
        _scraper = EngineStatsScraper(discovery or get_service_discovery(), scrape_interval,
                                      **kwargs)
        return _scraper


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
