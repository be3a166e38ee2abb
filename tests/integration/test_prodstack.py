"""``vllm-svcdisc-router`` runs a production-stack-shaped router on the simulated cluster.

The router is the stand-in package in ``tests/standin`` (production-stack's module paths,
names and import style as of its commit a6c01db); the entry point is run the way the console
script runs it, with the router's own command line.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY, CollectorRegistry

from tests.conftest import FAST_INFORMER, FAST_PROBE, wait_for
from vllm_router_svcdisc import EngineStatsScraper, K8sServiceDiscovery, prodstack
from vllm_router_svcdisc.outliers import OutlierConfig
from vllm_router_svcdisc.probe import ProbeConfig
from vllm_router_svcdisc.sim.cluster import SimCluster
from vllm_router_svcdisc.sim.engine import EngineMode
from vllm_router_svcdisc.telemetry import DiscoveryCollector, register_metrics

STANDIN = str(Path(__file__).resolve().parents[1] / "standin")
ROUTER_ARGS = ["--service-discovery", "k8s", "--routing-logic", "roundrobin",
               "--k8s-namespace", "default", "--k8s-port", "80",
               "--k8s-label-selector", "app=vllm", "--engine-stats-interval", "1",
               "--host", "127.0.0.1", "--port", "0"]


def _forget_router_modules() -> None:
    """Unload the stand-in and drop the handlers its loggers got (they outlive the modules)."""
    for name in [n for n in sys.modules if n == "vllm_router" or n.startswith("vllm_router.")]:
        del sys.modules[name]
    for name in list(logging.root.manager.loggerDict):
        if name == "vllm_router" or name.startswith("vllm_router."):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The stand-in importable as ``vllm_router``, freshly imported, uninstalled afterwards."""
    monkeypatch.syspath_prepend(STANDIN)
    monkeypatch.setattr(sys, "argv", ["vllm-svcdisc-router"])
    _forget_router_modules()
    # collectors other tests left on the process-wide registry would add their own lines
    foreign = [c for c in list(REGISTRY._collector_to_names) if isinstance(c, DiscoveryCollector)]
    for collector in foreign:
        REGISTRY.unregister(collector)
    yield
    installation = prodstack._installation
    if installation is not None:
        installation.uninstall()
    _forget_router_modules()
    for collector in foreign:
        REGISTRY.register(collector)


class Router:
    """The entry point's ``main()`` on a thread, and HTTP reads of the router it runs."""

    def __init__(self, argv: list[str]) -> None:
        self.result: list[Any] = []
        self.thread = threading.Thread(target=lambda: self.result.append(prodstack.main(argv)),
                                       name="router-main", daemon=True)
        self.thread.start()
        self.app = wait_for(lambda: _app_serving(), 20.0, "router did not start serving")
        self.base = f"http://127.0.0.1:{self.app.server.server_port}"
        self.session = requests.Session()
        self.session.trust_env = False

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base + path, timeout=5)

    def engines(self) -> dict[str, Any]:
        reply: dict[str, Any] = self.get("/engines").json()
        return reply

    def stop(self) -> None:
        self.session.close()
        self.app.stop()
        self.thread.join(10.0)
        assert not self.thread.is_alive(), "main() did not return after the server stopped"
        assert self.result == [0]


def _app_serving() -> Any:
    app = sys.modules.get("vllm_router.app")
    return app.app if app is not None and app.app.serving.is_set() else None


def _install(cluster: SimCluster) -> prodstack.Installation:
    return prodstack.install(discovery_options={"api_client": cluster.api_client(),
                                                "informer_config": FAST_INFORMER,
                                                "probe_config": FAST_PROBE})


def _pod_urls(cluster: SimCluster, *names: str) -> list[str]:
    return sorted(f"http://{p.ip}:{p.engine.port}" for n in names for p in cluster.pods(n))


def _svcdisc_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"vllm_svcdisc_{name} ")]


@pytest.mark.parametrize(("discovery_type", "routing"),
                         [("pod-ip", "pod"), ("service-name", "service"), (None, "pod")])
def test_router_runs_on_the_library_in_both_routing_modes(
        cluster: SimCluster, host: None, discovery_type: str | None, routing: str) -> None:
    cluster.add_service("alpha", replicas=2)
    cluster.add_service("beta", replicas=2, model="Qwen/Qwen3-8B")
    _install(cluster)
    flag = ["--k8s-service-discovery-type", discovery_type] if discovery_type else []
    router = Router([*ROUTER_ARGS, *flag])
    try:
        discovery = sys.modules["vllm_router.service_discovery"].get_service_discovery()
        assert isinstance(discovery, K8sServiceDiscovery)
        assert discovery.routing == routing
        expected = (_pod_urls(cluster, "alpha", "beta") if routing == "pod"
                    else sorted([cluster.url_of("alpha"), cluster.url_of("beta")]))
        wait_for(lambda: sorted(router.engines()["endpoints"]) == expected, 20.0,
                 lambda: f"endpoints {router.engines()} != {expected}")
        wait_for(lambda: router.engines()["stats"] == expected, 20.0,
                 lambda: f"stats keys {router.engines()['stats']} != {expected}")
        wait_for(lambda: router.get("/health").status_code == 200, 10.0, "router unhealthy")
        page = router.get("/metrics").text
        assert _svcdisc_lines(page, "healthy") == ["vllm_svcdisc_healthy 1.0"]
        assert _svcdisc_lines(page, "ready_pods") == ["vllm_svcdisc_ready_pods 4.0"]
    finally:
        router.stop()
    assert not discovery.get_health(), "the router's shutdown closed the discovery"


def test_library_logs_through_the_routers_handlers_as_json(
        cluster: SimCluster, host: None, capsys: pytest.CaptureFixture[str]) -> None:
    root_handlers = list(logging.getLogger().handlers)
    service = cluster.add_service("alpha", replicas=2)
    _install(cluster)
    router = Router([*ROUTER_ARGS, "--k8s-service-discovery-type", "pod-ip",
                     "--log-format", "json"])
    out: list[dict[str, Any]] = []
    err: list[dict[str, Any]] = []

    def ours(stream: list[dict[str, Any]], level: str, text: str) -> bool:
        captured = capsys.readouterr()
        for lines, records in ((captured.out, out), (captured.err, err)):
            records.extend(json.loads(line) for line in lines.splitlines() if line)
        return any(r["logger"].startswith("vllm_router_svcdisc") and r["level"] == level
                   and text in r["message"] for r in stream)

    try:
        wait_for(lambda: ours(out, "INFO", "is routable"), 20.0,
                 lambda: f"no INFO line of ours on stdout: {out}")
        next(iter(service.pods.values())).engine.mode = EngineMode.ERROR500
        wait_for(lambda: ours(err, "WARNING", "scraping"), 20.0,
                 lambda: f"no WARNING of ours on stderr: {err}")
    finally:
        router.stop()
    assert logging.getLogger().handlers == root_handlers, "the root logger was configured"
    assert logging.getLogger("vllm_router_svcdisc").propagate is False


def test_reconfigure_moves_the_scraper_to_the_new_discovery_and_leaves_no_old_thread(
        cluster: SimCluster, host: None) -> None:
    cluster.add_service("alpha", replicas=2)
    cluster.add_service("gamma", replicas=3, labels={"team": "b"})
    installation = _install(cluster)
    collectors = len(REGISTRY._collector_to_names)
    before = set(threading.enumerate())
    router = Router([*ROUTER_ARGS, "--k8s-service-discovery-type", "pod-ip"])
    try:
        modules = sys.modules
        wait_for(lambda: router.engines()["stats"] == _pod_urls(cluster, "alpha"), 20.0,
                 lambda: f"first discovery: {router.engines()}")
        old = modules["vllm_router.service_discovery"].get_service_discovery()
        scraper = modules["vllm_router.stats.engine_stats"].get_engine_stats_scraper()
        old_threads = _discovery_threads(set(threading.enumerate()) - before)
        assert old_threads, "the discovery started no thread?"

        new = importlib.import_module("vllm_router.dynamic_config").reconfigure_k8s(
            router.app, namespace="default", port=80, label_selector="team=b")
        assert new is not old and new.routing == "pod"  # kept: the reconfigure has no type
        expected = _pod_urls(cluster, "gamma")
        wait_for(lambda: router.engines() == {"endpoints": expected, "stats": expected}, 20.0,
                 lambda: f"after reconfigure: {router.engines()}")
        wait_for(lambda: not [t for t in old_threads if t.is_alive()], 10.0,
                 lambda: f"old discovery threads alive: {[t for t in old_threads if t.is_alive()]}")
        assert modules["vllm_router.stats.engine_stats"].get_engine_stats_scraper() is scraper
        assert installation.current_discovery() is new
        # the new discovery's informers mark themselves synced (what health reads) after
        # their LISTs reached the cache: its endpoints can be served first
        wait_for(lambda: _svcdisc_lines(router.get("/metrics").text, "healthy")
                 == ["vllm_svcdisc_healthy 1.0"], 10.0,
                 lambda: f"{_svcdisc_lines(router.get('/metrics').text, 'healthy')}")
        page = router.get("/metrics").text
        assert _svcdisc_lines(page, "healthy") == ["vllm_svcdisc_healthy 1.0"]
        assert _svcdisc_lines(page, "ready_pods") == ["vllm_svcdisc_ready_pods 3.0"]
        assert len(REGISTRY._collector_to_names) == collectors  # nothing registered again
        assert installation.collector in REGISTRY._collector_to_names
    finally:
        router.stop()


def _discovery_threads(threads: set[threading.Thread]) -> list[threading.Thread]:
    """Threads a discovery starts (informers, prober and its pool), not the scraper's."""
    return [t for t in threads
            if t.name.startswith("svcdisc-") and not t.name.startswith("svcdisc-scrape")]


def test_other_discovery_types_stay_production_stacks(host: None) -> None:
    prodstack.install()
    router = Router(["--service-discovery", "static", "--static-backends", "http://127.0.0.1:9",
                     "--host", "127.0.0.1", "--port", "0"])
    try:
        engine_stats = sys.modules["vllm_router.stats.engine_stats"]
        assert type(engine_stats.get_engine_stats_scraper()).__module__ == engine_stats.__name__
        assert router.get("/health").status_code == 200
        assert not _svcdisc_lines(router.get("/metrics").text, "healthy")
    finally:
        router.stop()


def _error_line(capsys: pytest.CaptureFixture[str], run: Callable[[], int]) -> str:
    assert run() == prodstack.EXIT_HOST
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_missing_router_is_one_readable_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _forget_router_modules()
    monkeypatch.setitem(sys.modules, "vllm_router", None)  # not importable
    line = _error_line(capsys, lambda: prodstack.main([]))
    assert line.startswith("vllm-svcdisc-router: production-stack's router is not importable")


@pytest.mark.parametrize(("module", "attribute"), [
    ("vllm_router.service_discovery", "_create_service_discovery"),
    ("vllm_router.service_discovery", "reconfigure_service_discovery"),
    ("vllm_router.stats.engine_stats", "get_engine_stats_scraper"),
    ("vllm_router.log", "init_logger"),
])
def test_an_unexpected_router_shape_is_one_readable_line(
        host: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        module: str, attribute: str) -> None:
    __import__(module)
    monkeypatch.delattr(sys.modules[module], attribute)
    line = _error_line(capsys, lambda: prodstack.main([]))
    assert f"{module} has no {attribute}" in line
    assert prodstack._installation is None


def test_an_app_imported_before_the_entry_point_is_refused(
        host: None, capsys: pytest.CaptureFixture[str]) -> None:
    __import__("vllm_router.app")
    line = _error_line(capsys, lambda: prodstack.main([]))
    assert "imported before" in line


def test_a_router_module_binding_its_own_getter_is_refused(
        host: None, capsys: pytest.CaptureFixture[str]) -> None:
    __import__("vllm_router.routers.main_router")  # binds the original getter by name
    line = _error_line(capsys, lambda: prodstack.main([]))
    assert "vllm_router.routers.main_router.get_engine_stats_scraper" in line
    assert prodstack._installation is None


def test_standalone_the_library_configures_no_logger(
        cluster: SimCluster, make_discovery: Callable[..., K8sServiceDiscovery]) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    cluster.add_service("alpha", replicas=2)
    discovery = make_discovery(cluster)
    scraper = EngineStatsScraper(discovery, scrape_interval=0.2)
    try:
        register_metrics(discovery, scraper, registry=CollectorRegistry())
        wait_for(lambda: cluster.url_of("alpha") in scraper.get_engine_stats(), 20.0,
                 "no stats")
    finally:
        scraper.close()
    assert (root.handlers, root.level) == (handlers, level)
    package = logging.getLogger("vllm_router_svcdisc")
    assert package.handlers == [] and package.propagate and package.level == logging.NOTSET


def test_the_routers_own_request_failures_feed_the_outlier_policy(
        cluster: SimCluster, host: None) -> None:
    aiohttp = pytest.importorskip("aiohttp")  # production-stack's dependency, not ours
    cluster.add_service("alpha", replicas=2)
    pods = cluster.pods("alpha")
    urls = _pod_urls(cluster, "alpha")
    # every check of our own far apart: only the router's request can eject within the test
    slow = {"outliers": OutlierConfig(liveness_interval=60.0),
            "probe_config": ProbeConfig(interval=60.0, timeout=1.0)}
    prodstack.install(discovery_options={"api_client": cluster.api_client(),
                                         "informer_config": FAST_INFORMER, **slow})
    args = [*ROUTER_ARGS, "--k8s-service-discovery-type", "pod-ip"]
    args[args.index("--engine-stats-interval") + 1] = "60"
    router = Router(args)
    try:
        wait_for(lambda: router.engines()["endpoints"] == urls, 20.0,
                 lambda: f"endpoints {router.engines()}")
        wrapper = router.app.state.aiohttp_client_wrapper
        assert isinstance(wrapper, prodstack.OutcomeReportingClientWrapper)
        crashed = f"http://{pods[0].ip}:{pods[0].engine.port}"
        pods[0].engine.mode = EngineMode.DOWN

        async def send() -> list[int | str]:
            wrapper.start()  # what the router's lifespan does
            seen: list[int | str] = []
            try:
                for url in urls:
                    try:
                        async with wrapper().post(url + "/v1/completions",
                                                  json={"model": "m", "prompt": "hi"}) as reply:
                            await reply.read()
                            seen.append(reply.status)
                    except aiohttp.ClientConnectorError:
                        seen.append("refused")
            finally:
                await wrapper.stop()
            return seen

        assert sorted(map(str, asyncio.run(send()))) == ["200", "refused"]
        wait_for(lambda: router.engines()["endpoints"] == [u for u in urls if u != crashed],
                 10.0, lambda: f"endpoints {router.engines()}")
    finally:
        router.stop()
