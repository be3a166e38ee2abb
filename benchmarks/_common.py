"""Helpers of the churn benchmark: load generator, reflection timing, statistics, RSS."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests

from vllm_router_svcdisc.informer import InformerConfig
from vllm_router_svcdisc.probe import ProbeConfig

#: timing used by every step of the benchmark (also by the isolated RSS child)
INFORMER = InformerConfig(backoff_initial=0.05, backoff_cap=1.0, watch_timeout_range=(30, 60))
PROBE = ProbeConfig(interval=60.0, timeout=2.0)

_START = time.monotonic()


def progress(message: str) -> None:
    """One line per step on stderr."""
    sys.stderr.write(f"[{time.monotonic() - _START:7.1f}s] {message}\n")
    sys.stderr.flush()


def wait_or_raise(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 10 ms; RuntimeError "timed out waiting for <what>" at the end."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run_meta(args: Any, setup: str) -> dict[str, Any]:
    """The ``meta`` block of a results file: when, where, what, with which arguments."""
    import datetime
    import platform
    from pathlib import Path

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(terse=True), "setup": setup,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def write_results(output_dir: Any, name: str, results: dict[str, Any], text: str) -> None:
    """``<name>.json`` and ``<name>.md`` in ``output_dir``; the Markdown also on stdout."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / f"{name}.md").write_text(text)
    sys.stdout.write(text)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    """count / p50 / p99 / max of ``values`` (multiplied by ``scale``), None when empty."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(v * scale for v in values)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return round(ordered[index], 3)

    return {"count": len(ordered), "p50": pick(0.5), "p99": pick(0.99),
            "max": round(ordered[-1], 3)}


def rss_mb(field: str = "VmRSS") -> float:
    """Current resident set size (``VmRSS``; ``VmHWM``: its peak) of this process in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def api_delta(before: dict[tuple[str, str], int],
              after: dict[tuple[str, str], int]) -> dict[str, int]:
    """``request_counts()`` difference as ``{"verb resource": n}`` (non-zero entries)."""
    keys = sorted(set(before) | set(after))
    delta = {f"{v} {r}": after.get((v, r), 0) - before.get((v, r), 0) for v, r in keys}
    return {k: n for k, n in delta.items() if n}


class ChangeClock:
    """When the fake API server last stored a change, per resource (``time.monotonic()``).

    Wraps ``put``/``delete`` of one :class:`FakeApiServer` instance (nothing in the library
    changes), so a reflection latency starts when the EndpointSlice changed, not when the
    simulated cluster began its own bookkeeping (stopping an engine can take 50-100 ms).
    """

    def __init__(self, api: Any) -> None:
        self.last: dict[str, float] = {}
        put, delete = api.put, api.delete

        def timed_put(resource: str, obj: Any) -> Any:
            self.last[resource] = time.monotonic()
            return put(resource, obj)

        def timed_delete(resource: str, namespace: str, name: str) -> Any:
            self.last[resource] = time.monotonic()
            return delete(resource, namespace, name)

        api.put, api.delete = timed_put, timed_delete

    def slices(self) -> float:
        return self.last.get("endpointslices", 0.0)


def wait_reflected(discovery: Any, predicate: Callable[[Any], bool], clock: ChangeClock,
                   timeout: float = 10.0) -> float | None:
    """Seconds from the last EndpointSlice change to the publish of the first snapshot showing it.

    Polls ``discovery.get_snapshot()`` every millisecond; the figure is the snapshot's own
    ``published_at`` (``time.monotonic()``) minus the change time, so polling adds no error.
    None when not seen within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = discovery.get_snapshot()
        if predicate(snapshot):
            return max(0.0, snapshot.published_at - clock.slices())
        time.sleep(0.001)
    return None


def routable_ips(snapshot: Any, key: str) -> set[str]:
    """IPs of the pods the Service's published view routes to (empty when not routable)."""
    view = snapshot.services.get(key)
    if view is None or view.endpoint_info is None:
        return set()
    return {p.ip for p in view.pods if p.routable}


def listed_ips(snapshot: Any, key: str) -> set[str]:
    """IPs of every endpoint (ready or not) the Service's view holds."""
    view = snapshot.services.get(key)
    return set() if view is None else {p.ip for p in view.pods}


def classify(exc: BaseException) -> str:
    """The failure cause of a client request, in the words of the report."""
    if isinstance(exc, requests.exceptions.Timeout):
        return "timeout"
    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectionError):
        if "refused" in text:
            return "conn_refused"
        if ("reset" in text or "aborted" in text or "RemoteDisconnected" in text
                or "Broken pipe" in text):
            return "conn_reset"
        if "resolve" in text or "Name or service" in text:
            return "dns"
        return "conn_other"
    return f"error_{exc.__class__.__name__}"


class LoadGenerator:
    """``clients`` threads sending ``POST /v1/completions`` to ``get_endpoint_info()`` URLs.

    Each request reads the endpoint list afresh and takes the next entry round-robin, as a
    router would; keep-alive sessions (one per thread, like a router's client pool).  The total
    rate is bounded by ``rate`` requests/s; the run by ``stop()`` and by ``max_seconds``.
    """

    def __init__(self, discovery: Any, *, clients: int = 4, rate: float = 100.0,
                 timeout: float = 2.0, max_seconds: float = 600.0,
                 keepalive: bool = True) -> None:
        self.discovery = discovery
        self.headers = {} if keepalive else {"Connection": "close"}
        self.clients = clients
        self.interval = clients / rate
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.sent = 0
        self.ok = 0
        self.failed: dict[str, int] = {}
        self.latencies: list[float] = []
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"bench-client-{i}",
                                          daemon=True) for i in range(clients)]

    def start(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 2.0)

    def result(self) -> dict[str, Any]:
        with self._lock:
            failed = dict(sorted(self.failed.items()))
            latencies = list(self.latencies)
            return {"sent": self.sent, "ok": self.ok, "failed": sum(failed.values()),
                    "failed_by_cause": failed,
                    "latency_ms": summarize(latencies, 1000.0)}

    def _record(self, cause: str | None, latency: float | None = None) -> None:
        with self._lock:
            self.sent += 1
            if cause is None:
                self.ok += 1
                if latency is not None:
                    self.latencies.append(latency)
            else:
                self.failed[cause] = self.failed.get(cause, 0) + 1

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        deadline = time.monotonic() + self.max_seconds
        next_send = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                delay = next_send - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                next_send = max(next_send + self.interval, time.monotonic() - self.interval)
                endpoints = self.discovery.get_endpoint_info()
                if not endpoints:
                    self._record("no_endpoint")
                    continue
                endpoint = endpoints[next(self._turn) % len(endpoints)]
                started = time.monotonic()
                try:
                    body = {"model": endpoint.model_names[0], "prompt": "hi", "max_tokens": 2}
                    reply = session.post(f"{endpoint.url}/v1/completions", timeout=self.timeout,
                                         headers=self.headers, json=body)
                    reply.content  # noqa: B018 - read the body
                except requests.RequestException as exc:
                    self._record(classify(exc))
                    continue
                if reply.status_code == 200:
                    self._record(None, time.monotonic() - started)
                else:
                    self._record(f"http_{reply.status_code}")
        finally:
            session.close()


def time_per_call(func: Callable[[], Any], *, batches: int, per_batch: int) -> float:
    """Median nanoseconds per call of ``func`` over ``batches`` batches of ``per_batch`` calls."""
    samples = []
    calls = range(per_batch)
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in calls:
            func()
        samples.append((time.perf_counter_ns() - start) / per_batch)
    return round(statistics.median(samples), 1)


def isolated_rss_main() -> int:
    """The measured process of the isolated RSS step: discovery + scraper and nothing else.

    Started by ``benchmarks/churn.py`` with ``python -c`` (so that it imports only what a router
    would: the library, plus the stdlib-only DNS shim); reads one JSON line on stdin (the fake
    API server's URL, the Services' names and pod IPs, limits), writes one JSON line on stdout.
    The API server, the pod objects and the engines live in other processes.
    """
    import gc

    from kubernetes import client as k8s_client

    from vllm_router_svcdisc.discovery import K8sServiceDiscovery
    from vllm_router_svcdisc.scraper import EngineStatsScraper
    from vllm_router_svcdisc.sim.dns import ServiceDNS

    gc.collect()
    out: dict[str, Any] = {"rss_imports_mb": rss_mb()}
    config = json.loads(sys.stdin.readline())
    namespace = config["namespace"]
    services: dict[str, list[str]] = config["services"]
    pods = sum(len(ips) for ips in services.values())
    # Headless Services: the name resolves to the ready pod IPs, as cluster DNS would answer.
    dns = ServiceDNS(config["cluster_domain"])
    for name, ips in services.items():
        dns.register(namespace, name, lambda ips=tuple(ips): ips)
    dns.install()
    discovery: Any = None
    scraper: Any = None

    def wait(predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    try:
        gc.collect()
        out["rss_before_discovery_mb"] = rss_mb()
        configuration = k8s_client.Configuration()
        configuration.host = config["api_url"]
        t0 = time.monotonic()
        discovery = K8sServiceDiscovery(namespace=namespace, label_selector="app=vllm",
                                        api_client=k8s_client.ApiClient(configuration),
                                        routing="service", informer_config=INFORMER,
                                        probe_config=PROBE)
        synced = discovery.wait_until_synced(config["timeout"])
        out["sync_s"] = round(time.monotonic() - t0, 3) if synced else None
        out["rss_after_sync_mb"] = rss_mb()
        routable = wait(lambda: len(discovery.get_endpoint_info()) == len(services),
                        config["timeout"])
        out["all_routable_s"] = round(time.monotonic() - t0, 3) if routable else None
        out["rss_all_routable_mb"] = rss_mb()
        out["pods"] = pods
        out["services"] = len(services)
        if not config.get("scrape", True):
            out["rss_peak_mb"] = rss_mb("VmHWM")
            out["threads"] = threading.active_count()
            return 0
        interval = config["scrape_interval"]
        t1 = time.monotonic()
        scraper = EngineStatsScraper(discovery, scrape_interval=interval)
        full = wait(lambda: len(scraper.get_pod_engine_stats()) == pods, config["timeout"])
        out["all_scraped_s"] = round(time.monotonic() - t1, 3) if full else None
        out["pods_scraped"] = len(scraper.get_pod_engine_stats())
        cycles = config["scrape_cycles"]
        time.sleep(cycles * interval)
        out["scrape_cycles_after_full"] = cycles
        out["rss_after_scrape_mb"] = rss_mb()
        out["rss_peak_mb"] = rss_mb("VmHWM")
        out["threads"] = threading.active_count()
        try:
            out["open_fds"] = len(os.listdir("/proc/self/fd"))
        except OSError:
            out["open_fds"] = None
    finally:
        if scraper is not None:
            scraper.close()
        if discovery is not None:
            discovery.close()
        dns.uninstall()
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return 0
