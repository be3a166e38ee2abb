"""Shared helpers of the reliability suite: a harness that runs discovery + scraper under
faults with the invariants every fault test must end with, the simulator's truth, and a raw
socket HTTP server for engines that misbehave in ways the fake engine cannot.

Invariants a :class:`Harness` checks in :meth:`Harness.finish`:
- no exception ever escaped a ``get_*()`` call (a reader thread calls them all the time);
- no library thread died (``threading.excepthook``) or logged a crash (``log.exception``);
- every informer, the prober and the scraper thread are still alive;
- ``close()`` of the discovery and of the scraper each return within 2 s, and their threads end.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest

from tests.conftest import FAST_INFORMER, FAST_PROBE, wait_for
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster, SimPod, SimService

LIBRARY_LOGGER = "vllm_router_svcdisc"
SCRAPE_INTERVAL = 0.25
SCRAPE_TIMEOUT = 0.5
CLOSE_BOUND = 2.0


# -- the simulator's truth -------------------------------------------------------------------


def selected(cluster: SimCluster, selector: Mapping[str, str] | None = None) -> list[SimService]:
    """Services in "default" matching ``app=vllm`` (or ``selector``)."""
    wanted = selector or {"app": "vllm"}
    return [s for s in cluster.services() if s.namespace == "default"
            and all(s.labels.get(k) == v for k, v in wanted.items())]


def pod_url(cluster: SimCluster, pod: SimPod) -> str:
    return f"http://{pod.ip}:{cluster.engine_port}"


def truth(cluster: SimCluster) -> tuple[list[str], list[str], set[str]]:
    """(routable Service URLs, ready pod URLs, keys of every selected Service)."""
    services = selected(cluster)
    return (sorted(cluster.url_of(s.name) for s in services if s.ready_pods()),
            sorted(pod_url(cluster, p) for s in services for p in s.ready_pods()),
            {s.key for s in services})


def seen(discovery: K8sServiceDiscovery) -> tuple[list[str], list[str], set[str]]:
    """The same three figures as discovery reports them."""
    snapshot = discovery.get_snapshot()
    return (sorted(e.url for e in snapshot.endpoint_infos),
            sorted(e.url for e in snapshot.pod_infos),
            set(snapshot.services))


def describe(discovery: K8sServiceDiscovery) -> str:
    views = {k: (v.reason, len(v.ready_pods)) for k, v in discovery.get_service_status().items()}
    return f"seen={seen(discovery)} views={views} health={discovery.health()}"


# -- the harness -----------------------------------------------------------------------------


class Harness:
    """Discovery + scraper on a simulated cluster, with a reader hammering every ``get_*``."""

    def __init__(self, cluster: SimCluster, caplog: pytest.LogCaptureFixture, *,
                 scraper: bool = True, discovery_kwargs: Mapping[str, Any] | None = None,
                 scraper_kwargs: Mapping[str, Any] | None = None) -> None:
        self.cluster = cluster
        self.caplog = caplog
        caplog.set_level(logging.INFO, logger=LIBRARY_LOGGER)
        self.thread_errors: list[str] = []
        self.read_errors: list[str] = []
        self.reads = 0
        self._previous_hook = threading.excepthook
        threading.excepthook = self._excepthook
        kwargs: dict[str, Any] = {
            "namespace": "default", "label_selector": "app=vllm",
            "api_client": cluster.api_client(), "informer_config": FAST_INFORMER,
            "probe_config": FAST_PROBE, **(discovery_kwargs or {}),
        }
        self.discovery = K8sServiceDiscovery(**kwargs)
        self.scraper: EngineStatsScraper | None = None
        if scraper:
            self.scraper = EngineStatsScraper(
                self.discovery, **{"scrape_interval": SCRAPE_INTERVAL,
                                   "timeout": SCRAPE_TIMEOUT, **(scraper_kwargs or {})})
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="test-reader", daemon=True)
        self._reader.start()
        self.closed = False

    # -- background reader -------------------------------------------------------------------

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        self.thread_errors.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")
        self._previous_hook(args)

    def _read_loop(self) -> None:
        deadline = time.monotonic() + 300.0  # bounded even if a test forgets to finish
        for _ in range(1_000_000):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.read_once()
                self.reads += 1
            except Exception as exc:  # the property under test: nothing escapes get_*()
                self.read_errors.append(f"{exc.__class__.__name__}: {exc}")
            self._stop.wait(0.005)

    def read_once(self) -> None:
        d = self.discovery
        for info in d.get_endpoint_info():
            info.get_base_models()
        d.get_pod_endpoint_info()
        d.get_service_status()
        d.get_known_models()
        d.has_ever_seen_model("x")
        d.get_health()
        d.health()
        d.get_snapshot()
        d.informer_status()
        if self.scraper is not None:
            for stats in self.scraper.get_engine_stats().values():
                stats.oldest_sample_age  # noqa: B018 - a property read is the point
            self.scraper.get_pod_engine_stats()
            self.scraper.get_health()

    # -- truth checks ------------------------------------------------------------------------

    def wait_endpoints_exact(self, timeout: float = 15.0,
                             extra_keys: Iterable[str] = (),
                             ejected: Iterable[SimPod] = ()) -> None:
        """Service URLs, pod URLs and Service keys equal the simulator's truth: no ghost,
        none missing; each routable Service lists exactly its ready pods (in its ``pods``),
        and the pod view leaves out the ``ejected`` ones (outliers)."""
        extra = set(extra_keys)
        out = {pod_url(self.cluster, p) for p in ejected}

        def expected() -> tuple[list[str], list[str], set[str]]:
            services, pods, keys = truth(self.cluster)
            return services, [p for p in pods if p not in out], keys | extra

        wait_for(lambda: seen(self.discovery) == expected(), timeout,
                 lambda: f"expected {expected()}; got {describe(self.discovery)}")
        for info in self.discovery.get_snapshot().endpoint_infos:
            service = self.cluster.service(info.service_name, info.namespace)
            assert sorted(p.ip for p in info.pods if p.routable) == sorted(
                p.ip for p in service.ready_pods()), info

    def wait_stats_exact(self, failing: Iterable[SimPod] = (), timeout: float = 15.0) -> None:
        """Per-pod and per-Service stats equal what the engines serve.

        Every ready pod's engine gets a distinct ``running`` figure; answering pods must
        report exactly it, ``failing`` pods must be absent (and counted as failed, or as
        ejected when the outlier policy took them out), and each Service's figure must be the
        sum over its answering pods.
        """
        assert self.scraper is not None
        scraper = self.scraper
        failing_urls = {pod_url(self.cluster, p) for p in failing}
        expected_pod: dict[str, int] = {}
        expected_service: dict[str, tuple[int, int, int]] = {}  # url -> (running, ok, failed)
        for service in selected(self.cluster):
            total = ok = failed = 0
            for pod in sorted(service.ready_pods(), key=lambda p: p.ip):
                url = pod_url(self.cluster, pod)
                if url in failing_urls:
                    failed += 1
                    continue
                pod.engine.running = len(expected_pod) + 1
                expected_pod[url] = pod.engine.running
                total += pod.engine.running
                ok += 1
            if ok:
                expected_service[self.cluster.url_of(service.name)] = (total, ok, failed)

        def actual() -> tuple[dict[str, int], dict[str, tuple[int, int, int]]]:
            pods = {u: int(s.num_running_requests)
                    for u, s in scraper.get_pod_engine_stats().items()}
            services = {u: (int(s.num_running_requests), s.pods_scraped,
                            s.pods_failed + s.pods_ejected)
                        for u, s in scraper.get_engine_stats().items()}
            return pods, services

        wait_for(lambda: actual() == (expected_pod, expected_service), timeout,
                 lambda: f"expected {(expected_pod, expected_service)}; got {actual()}")

    def wait_exact(self, failing: Iterable[SimPod] = (), timeout: float = 15.0,
                   extra_keys: Iterable[str] = ()) -> None:
        self.wait_endpoints_exact(timeout, extra_keys)
        if self.scraper is not None:
            self.wait_stats_exact(failing, timeout)
        wait_for(self.discovery.get_health, timeout, lambda: str(self.discovery.health()))

    # -- logs ----------------------------------------------------------------------------------

    def records(self, needle: str, level: int = logging.INFO) -> list[logging.LogRecord]:
        """Library log records at ``level`` or above whose message mentions ``needle``."""
        return [r for r in self.caplog.records
                if r.name.startswith(LIBRARY_LOGGER) and r.levelno >= level
                and needle in r.getMessage()]

    # -- the end -------------------------------------------------------------------------------

    def library_threads(self) -> list[threading.Thread]:
        d = self.discovery
        threads: list[threading.Thread] = [
            t for t in (d._services._thread, d._endpoints._thread, d._prober._thread)
            if t is not None]
        threads += d._prober._poller.threads + d._liveness.poller.threads
        if self.scraper is not None:
            threads.append(self.scraper._thread)
            threads += self.scraper._poller.threads
        return threads

    def assert_alive(self) -> None:
        services, endpoints = self.discovery.informer_status()
        assert services.alive and endpoints.alive, (services, endpoints)
        assert self.discovery._prober._thread.is_alive(), "the prober thread died"
        if self.scraper is not None:
            assert self.scraper._thread.is_alive(), "the scraper thread died"

    def finish(self) -> None:
        """Check every invariant, then close within the bound and see the threads end."""
        assert self.reads > 0, "the reader never ran"
        self.assert_alive()
        self.closed = True
        self._stop.set()
        self._reader.join(2.0)
        threads = self.library_threads()
        started = time.monotonic()
        self.discovery.close()
        discovery_close = time.monotonic() - started
        scraper_close = 0.0
        if self.scraper is not None:
            started = time.monotonic()
            self.scraper.close()
            scraper_close = time.monotonic() - started
        threading.excepthook = self._previous_hook
        assert discovery_close < CLOSE_BOUND, f"discovery.close() took {discovery_close:.2f}s"
        assert scraper_close < CLOSE_BOUND, f"scraper.close() took {scraper_close:.2f}s"
        wait_for(lambda: not any(t.is_alive() for t in threads), 5,
                 lambda: f"threads alive after close: {[t.name for t in threads if t.is_alive()]}")
        assert not self.read_errors, self.read_errors[:5]
        assert not self.thread_errors, self.thread_errors
        crashes = [r.getMessage() for r in self.caplog.records
                   if r.name.startswith(LIBRARY_LOGGER) and r.exc_info]
        assert not crashes, crashes

    def abandon(self) -> None:
        """Teardown after a failed test: close without assertions."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        threading.excepthook = self._previous_hook
        self.discovery.close()
        if self.scraper is not None:
            self.scraper.close()


@contextlib.contextmanager
def harnessed(cluster: SimCluster, caplog: pytest.LogCaptureFixture,
              **kwargs: Any) -> Iterator[Harness]:
    harness = Harness(cluster, caplog, **kwargs)
    try:
        yield harness
    finally:
        harness.abandon()


def pace(seconds: float) -> None:
    """The rhythm of a fault schedule (faults every few hundred ms): not a synchronisation
    wait — every check after a fault waits on a condition with a deadline."""
    threading.Event().wait(seconds)


# -- a raw HTTP server for engines the fake engine cannot play --------------------------------

Reply = bytes | Iterable[bytes] | None
Respond = Callable[[str, str, dict[str, str]], Reply]


def http_response(status: str, body: bytes, content_type: str = "application/json",
                  headers: Mapping[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode() + body


class RawServer:
    """A listening socket on ``ip:port`` answering each request with ``respond(method, path,
    headers)``: bytes (sent whole), an iterable of bytes (sent piece by piece, ``gap`` seconds
    apart: a slow loris), or None (hold the connection until stopped: a black hole).

    Records every request's (method, path, headers).  Bounded: at most ``max_connections``
    handler threads ever, each ending when the client leaves or the server stops.
    """

    def __init__(self, ip: str, port: int, respond: Respond, *, gap: float = 0.0,
                 max_connections: int = 200) -> None:
        self.respond = respond
        self.gap = gap
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        self._max = max_connections
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server((ip, port))
        self._listener.settimeout(0.05)
        self.ip, self.port = self._listener.getsockname()[:2]
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name=f"raw-{ip}:{port}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set() and self.connections < self._max:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="raw-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, path = [*lines[0].split(" "), "", ""][:2]
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            with self._lock:
                self.requests.append((method, path, headers))
            reply = self.respond(method, path.split("?", 1)[0], headers)
            if reply is None:
                self._stop.wait(60.0)
            elif isinstance(reply, bytes):
                conn.sendall(reply)
            else:
                for piece in reply:
                    if self._stop.is_set():
                        return
                    conn.sendall(piece)
                    if self.gap:
                        self._stop.wait(self.gap)
            conn.shutdown(socket.SHUT_WR)
            self._stop.wait(0.5)  # let the client read before the close
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def paths(self) -> list[str]:
        with self._lock:
            return [p for _, p, _ in self.requests]

    def count(self, path: str) -> int:
        return sum(1 for p in self.paths() if p.split("?", 1)[0] == path)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(2.0)

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def replace_engine(pod: SimPod, respond: Respond, **kwargs: Any) -> RawServer:
    """Stop the pod's fake engine and serve its ``ip:port`` with a :class:`RawServer`.

    The pod stays ready in Kubernetes' eyes, so both its ``/metrics`` (by pod IP) and the
    Service's ``/v1/models`` (through the Service DNS name and the mini kube-proxy) reach it.
    """
    from vllm_router_svcdisc.sim.engine import EngineMode

    pod.engine.mode = EngineMode.DOWN
    return RawServer(pod.ip, pod.engine.port, respond, **kwargs)


def engine_like(pod: SimPod, *, metrics: Callable[[], Reply] | None = None,
                models: Callable[[], Reply] | None = None) -> Respond:
    """A responder that answers like ``pod``'s engine except where ``metrics``/``models``
    (called once per request) say."""
    import json

    engine = pod.engine

    def respond(_method: str, path: str, _headers: dict[str, str]) -> Reply:
        if path == "/metrics":
            if metrics is not None:
                return metrics()
            return http_response("200 OK", engine.metrics_text(), "text/plain; version=0.0.4")
        if path == "/v1/models":
            if models is not None:
                return models()
            return http_response("200 OK", json.dumps(engine.models_payload()).encode())
        return http_response("404 Not Found", b'{"detail": "Not Found"}')

    return respond
