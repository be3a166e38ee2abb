"""``vllm-svcdisc-router``: production-stack's router, unmodified, running on this library.

The one job of this module is installing the library into production-stack's router
(``vllm_router``, shapes as of its commit a6c01db) and handing over to ``vllm_router.app.main()``
with the router's own command line:

- ``service_discovery._create_service_discovery`` is replaced: ``initialize_service_discovery``
  and ``reconfigure_service_discovery`` look it up at call time, so both build a
  :class:`K8sServiceDiscovery` for ``ServiceDiscoveryType.K8S`` (``--k8s-service-discovery-type
  pod-ip`` -> ``routing="pod"``, ``service-name`` -> ``routing="service"``); other types stay
  production-stack's.
- ``stats.engine_stats.initialize_engine_stats_scraper`` / ``get_engine_stats_scraper`` are
  replaced *before* ``vllm_router.app`` and the routers are imported, because they bind these
  names at import.  The scraper follows production-stack's current discovery singleton, so a
  reconfigure needs no new scraper and the closed discovery is never read again.
- The package logger gets production-stack's handlers and format (``log.init_logger``, which
  also makes ``--log-level`` / ``--log-format json`` apply to it).
- ``vllm_svcdisc_*`` metrics are registered once on prometheus_client's default registry,
  which the router's ``/metrics`` serves; the collector follows the current discovery.

Exit code 3 with one line on stderr when production-stack is not importable or its shape is
not the one described above.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import REGISTRY

from .compat import create_service_discovery, routing_for
from .discovery import K8sServiceDiscovery
from .errors import SvcDiscError
from .scraper import EngineStatsScraper
from .telemetry import DiscoveryCollector

EXIT_HOST = 3
PACKAGE_LOGGER = __name__.rsplit(".", 1)[0]

#: What the entry point reads or replaces in production-stack, module by module.
HOST_SHAPE: Mapping[str, tuple[str, ...]] = {
    "vllm_router.log": ("init_logger",),
    "vllm_router.service_discovery": (
        "ServiceDiscoveryType", "_create_service_discovery", "initialize_service_discovery",
        "reconfigure_service_discovery", "get_service_discovery"),
    "vllm_router.stats.engine_stats": (
        "initialize_engine_stats_scraper", "get_engine_stats_scraper"),
}
REPLACED_GETTERS = ("initialize_engine_stats_scraper", "get_engine_stats_scraper")
APP_MODULE = "vllm_router.app"


class HostShapeError(SvcDiscError, RuntimeError):
    """production-stack is missing, or not shaped the way this entry point expects."""


class Installation:
    """The library installed into one production-stack process (see the module docstring)."""

    def __init__(self, modules: Mapping[str, Any], discovery_options: Mapping[str, Any],
                 scraper_options: Mapping[str, Any]) -> None:
        self._discovery_module = modules["vllm_router.service_discovery"]
        self._stats_module = modules["vllm_router.stats.engine_stats"]
        self._log_module = modules["vllm_router.log"]
        self._discovery_options = dict(discovery_options)
        self._scraper_options = dict(scraper_options)
        self._lock = threading.Lock()
        self._routing: str | None = None
        self._scraper: EngineStatsScraper | None = None
        self._originals = {
            "create": self._discovery_module._create_service_discovery,
            **{name: getattr(self._stats_module, name) for name in REPLACED_GETTERS},
        }
        self._discovery_module._create_service_discovery = self.create_service_discovery
        self._stats_module.initialize_engine_stats_scraper = self.initialize_engine_stats_scraper
        self._stats_module.get_engine_stats_scraper = self.get_engine_stats_scraper
        self.logger = self._log_module.init_logger(PACKAGE_LOGGER)
        self.collector = DiscoveryCollector(sources=lambda: (self.current_discovery(),
                                                             self._scraper))
        REGISTRY.register(self.collector)

    # -- what production-stack calls --------------------------------------------------------

    def create_service_discovery(self, service_discovery_type: Any, *args: Any,
                                 **kwargs: Any) -> Any:
        """production-stack's factory, with ``K8S`` served by :class:`K8sServiceDiscovery`.

        A reconfigure passes no ``k8s_service_discovery_type`` (production-stack's dynamic
        config has no such field): the routing chosen at start is kept.
        """
        if getattr(service_discovery_type, "value", service_discovery_type) != "k8s":
            return self._originals["create"](service_discovery_type, *args, **kwargs)
        if args:
            raise TypeError("K8S discovery takes keyword arguments only")
        discovery_type = kwargs.pop("k8s_service_discovery_type", None)
        with self._lock:
            if discovery_type is not None or self._routing is None:
                self._routing = routing_for(discovery_type)
            routing = self._routing
        discovery = create_service_discovery(**{**kwargs, **self._discovery_options,
                                                "routing": routing})
        self.logger.info("vllm_router_svcdisc discovery: %r", discovery)
        return discovery

    def initialize_engine_stats_scraper(self, scrape_interval: float, *args: Any,
                                        **kwargs: Any) -> Any:
        """Our scraper over our discovery; production-stack's for its other discoveries."""
        if self.current_discovery() is None:
            return self._originals["initialize_engine_stats_scraper"](scrape_interval, *args,
                                                                      **kwargs)
        with self._lock:
            if self._scraper is None:
                self._scraper = EngineStatsScraper(
                    None, scrape_interval, discovery_provider=self.current_discovery,
                    **self._scraper_options)
            return self._scraper

    def get_engine_stats_scraper(self) -> Any:
        return self._scraper or self._originals["get_engine_stats_scraper"]()

    # -- providers ---------------------------------------------------------------------------

    def current_discovery(self) -> K8sServiceDiscovery | None:
        """production-stack's current discovery singleton when it is ours, else None."""
        try:
            discovery = self._discovery_module.get_service_discovery()
        except ValueError:  # not initialized (yet)
            return None
        return discovery if isinstance(discovery, K8sServiceDiscovery) else None

    def uninstall(self) -> None:
        """Give back production-stack's functions, logger and registry (tests, embedders)."""
        global _installation
        self._discovery_module._create_service_discovery = self._originals["create"]
        for name in REPLACED_GETTERS:
            setattr(self._stats_module, name, self._originals[name])
        REGISTRY.unregister(self.collector)
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
        registered = getattr(self._log_module, "_loggers", [])
        if self.logger in registered:
            registered.remove(self.logger)
        self.logger.propagate = True
        self.logger.setLevel(logging.NOTSET)
        with _install_lock:
            if _installation is self:
                _installation = None


_install_lock = threading.Lock()
_installation: Installation | None = None


def _import_host() -> dict[str, Any]:
    modules = {}
    for name, attributes in HOST_SHAPE.items():
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as exc:
            raise HostShapeError(f"production-stack's router is not importable ({name}: {exc}); "
                                 "install it (its src/ directory) in this environment") from None
        missing = [a for a in attributes if not hasattr(modules[name], a)]
        if missing:
            raise HostShapeError(f"{name} has no {', '.join(missing)}: this production-stack "
                                 "version is not one the entry point supports")
    return modules


def _check_bindings(installation: Installation) -> None:
    """Every production-stack module that bound a replaced getter by name must hold ours."""
    ours = {"initialize_engine_stats_scraper": installation.initialize_engine_stats_scraper,
            "get_engine_stats_scraper": installation.get_engine_stats_scraper}
    for name, module in list(sys.modules.items()):
        if not name.startswith("vllm_router.") or module is None:
            continue
        for attribute, replacement in ours.items():
            bound = getattr(module, attribute, replacement)
            if bound != replacement:
                raise HostShapeError(f"{name}.{attribute} is production-stack's own: it was "
                                     "imported before the entry point replaced it")


def install(discovery_options: Mapping[str, Any] | None = None,
            scraper_options: Mapping[str, Any] | None = None) -> Installation:
    """Install the library into production-stack (once per process) and import its app.

    ``discovery_options`` / ``scraper_options`` are extra keyword arguments of
    :class:`K8sServiceDiscovery` / :class:`EngineStatsScraper` (e.g. ``api_client``).
    """
    global _installation
    with _install_lock:
        if _installation is not None:
            return _installation
        if APP_MODULE in sys.modules:
            raise HostShapeError(f"{APP_MODULE} was imported before the entry point could "
                                 "replace the names it imports")
        installation = Installation(_import_host(), discovery_options or {},
                                    scraper_options or {})
        _installation = installation
    try:
        app = importlib.import_module(APP_MODULE)
        if not callable(getattr(app, "main", None)):
            raise HostShapeError(f"{APP_MODULE} has no main()")
        _check_bindings(installation)
    except ImportError as exc:
        installation.uninstall()
        raise HostShapeError(f"{APP_MODULE} is not importable: {exc}") from None
    except HostShapeError:
        installation.uninstall()
        raise
    return installation


def main(argv: Sequence[str] | None = None) -> int:
    """Install, then run production-stack's ``main()`` on ``argv`` (default: sys.argv)."""
    try:
        install()
    except HostShapeError as exc:
        print(f"vllm-svcdisc-router: {exc}", file=sys.stderr)
        return EXIT_HOST
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    importlib.import_module(APP_MODULE).main()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
