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
- The router's own request outcomes feed the outlier policy: ``app.state.
  aiohttp_client_wrapper`` (the object whose aiohttp session ``process_request`` sends every
  engine request through) is replaced, before ``main()`` starts it, by
  :class:`OutcomeReportingClientWrapper`, whose session carries an aiohttp ``TraceConfig``:
  a connect error, a connect timeout or a 5xx from a pod URL goes to
  ``K8sServiceDiscovery.report_result`` (pod routing only: a Service URL blames no pod).
  Where production-stack has no such object, this part is left out and said once.

Exit code 3 with one line on stderr when production-stack is not importable or its shape is
not the one described above.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
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
CLIENT_WRAPPER = "aiohttp_client_wrapper"  # app.state attribute (vllm_router/app.py)


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

    def report_outcome(self, url: str, outcome: str | int) -> None:
        """A request the router sent to ``url`` ended so: tell the current discovery (pod
        routing; never raises into the router's request path)."""
        discovery = self.current_discovery()
        if discovery is None or discovery.routing != "pod":
            return
        try:
            discovery.report_result(url, outcome)
        except Exception:  # the router's request must never fail because of this
            self.logger.exception("reporting a request outcome for %s failed", url)

    def wire_request_outcomes(self, app_module: Any) -> bool:
        """Give the router an aiohttp session that reports outcomes (see the module doc)."""
        state = getattr(getattr(app_module, "app", None), "state", None)
        current = getattr(state, CLIENT_WRAPPER, None)
        if current is None or not callable(getattr(current, "start", None)):
            self.logger.info("this production-stack has no app.state.%s: the router's request "
                             "failures are not fed to the outlier policy", CLIENT_WRAPPER)
            return False
        setattr(state, CLIENT_WRAPPER, OutcomeReportingClientWrapper(self.report_outcome))
        return True

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


class OutcomeReportingClientWrapper:
    """production-stack's ``AiohttpClientWrapper`` face (``start()``, ``await stop()``, call
    for the session) over a session that reports each engine request's outcome.

    Like production-stack's, the session has no connection limit (``TCPConnector(limit=0)``).
    Reported: a connect error (refused, reset before a response) and a connect timeout as
    such, a 5xx status, 2xx/3xx as a success, a read timeout as slow (which never ejects
    alone); 4xx and cancellations are not reported (a 4xx is the client's problem).
    """

    def __init__(self, report: Callable[[str, str | int], None]) -> None:
        self._report = report
        self.async_client: Any = None

    def start(self) -> None:
        aiohttp = importlib.import_module("aiohttp")  # production-stack's dependency
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._on_end)
        trace.on_request_exception.append(self._on_exception)
        self.async_client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), connector_owner=True,
            trace_configs=[trace])

    async def stop(self) -> None:
        if self.async_client is not None:
            await self.async_client.close()
        self.async_client = None

    def __call__(self) -> Any:
        if self.async_client is None:
            raise RuntimeError("the aiohttp client is not started")
        return self.async_client

    async def _on_end(self, _session: Any, _context: Any, params: Any) -> None:
        status = int(params.response.status)
        if status >= 500 or status < 400:
            self._report(_origin(params.url), status)

    async def _on_exception(self, _session: Any, _context: Any, params: Any) -> None:
        outcome = outcome_of(params.exception)
        if outcome is not None:
            self._report(_origin(params.url), outcome)


def outcome_of(error: BaseException) -> str | None:
    """The ``report_result`` outcome of an aiohttp request exception (None: not reported)."""
    aiohttp = importlib.import_module("aiohttp")
    connect_timeout = getattr(aiohttp, "ConnectionTimeoutError", ())  # aiohttp >= 3.10
    if connect_timeout and isinstance(error, connect_timeout):
        return "connect_timeout"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(error, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return "timeout"
    return None


def _origin(url: Any) -> str:
    """``http://<host>:<port>`` of a yarl URL, the shape of a pod URL (the port always
    written, an IPv6 host bracketed)."""
    host = str(url.host or "")
    host = f"[{host}]" if ":" in host else host
    return f"{url.scheme}://{host}:{url.port}"


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
        installation.wire_request_outcomes(app)
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
