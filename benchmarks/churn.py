"""Discovery under churn, on the simulated cluster: ``python benchmarks/churn.py [--quick]``.

Churn scenarios (rolling restart, crash, scale up/down, API server trouble), each for Service
DNS routing (mini kube-proxy) and pod-IP routing, with a load generator reading
``get_endpoint_info()`` at each request; micro figures at 10/100/1000 Services x 4 pods
(engines served out of process by ``benchmarks/engine_farm.py``); metrics scraping of 1000 pods
with 5 % black-holed next to a sequential scraper; the RSS of a process running only discovery
and the scraper at the largest size (API server, pods and engines in other processes).
Writes ``benchmarks/results/churn.json`` and ``churn.md`` (also printed).  Targets are
reported, never enforced: the exit code is 0 unless the run itself broke.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from benchmarks._common import (
    INFORMER,
    PROBE,
    ChangeClock,
    LoadGenerator,
    api_delta,
    listed_ips,
    progress,
    routable_ips,
    rss_mb,
    summarize,
    time_per_call,
    wait_reflected,
)
from benchmarks.engine_farm import EngineFarm
from benchmarks.scale import run_scale, scale_markdown, scale_targets
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.scraper import EngineStatsScraper, parse_metrics_body
from vllm_router_svcdisc.sim.cluster import SimCluster, SimPod

REPLICAS = 3
SCENARIOS = ("rolling", "crash", "scale", "api_trouble", "rolling_prestop",
             "api_trouble_prestop")
PRESTOP_SUFFIX = "_prestop"  # the same scenario, engines terminated after a preStop sleep
MODES = ("service", "pod")
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def make_discovery(cluster: SimCluster, routing: str) -> K8sServiceDiscovery:
    return K8sServiceDiscovery(namespace="default", label_selector="app=vllm",
                               api_client=cluster.api_client(), routing=routing,
                               informer_config=INFORMER, probe_config=PROBE)


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# -- churn scenarios ----------------------------------------------------------------------------


class _Events:
    """Reflection latencies by event kind."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[float]] = {}
        self.missed: dict[str, int] = {}

    def add(self, kind: str, latency: float | None) -> None:
        if latency is None:
            self.missed[kind] = self.missed.get(kind, 0) + 1
        else:
            self.by_kind.setdefault(kind, []).append(latency)

    def result(self) -> dict[str, Any]:
        every = [v for values in self.by_kind.values() for v in values]
        return {"reflect_ms": summarize(every, 1000.0),
                "reflect_ms_by_event": {k: summarize(v, 1000.0) for k, v in self.by_kind.items()},
                "not_reflected_within_timeout": dict(self.missed)}


class _Churn:
    """Plays one scenario against a cluster and measures when discovery reflects each change."""

    def __init__(self, cluster: SimCluster, discovery: K8sServiceDiscovery, services: list[str],
                 args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.discovery = discovery
        self.services = services
        self.args = args
        self.events = _Events()
        self.clock = ChangeClock(cluster.api)
        self.pre_stop = 0.0
        self._turn = 0

    def key(self, name: str) -> str:
        return f"default/{name}"

    def next_service(self) -> str:
        name = self.services[self._turn % len(self.services)]
        self._turn += 1
        return name

    def oldest_pod(self, name: str) -> SimPod:
        live = [p for p in self.cluster.pods(name) if not p.terminating]
        return live[0]

    def replace_gracefully(self, name: str, prefix: str = "") -> None:
        """Rolling-restart step: terminate (SIGTERM after the preStop sleep), replacement
        ready, preStop + grace, old pod gone."""
        key, old = self.key(name), self.oldest_pod(name)
        self.cluster.terminate_pod(old, pre_stop=self.pre_stop)
        self.events.add(prefix + "terminating excluded", wait_reflected(
            self.discovery, lambda s: old.ip not in routable_ips(s, key), self.clock))
        new = self.cluster.add_pod(name)
        self.events.add(prefix + "replacement routable", wait_reflected(
            self.discovery, lambda s: new.ip in routable_ips(s, key), self.clock))
        time.sleep(self.pre_stop + self.args.grace)  # in-flight requests on the old pod finish
        self.cluster.finish_termination(old)
        self.events.add(prefix + "terminated pod removed", wait_reflected(
            self.discovery, lambda s: old.ip not in listed_ips(s, key), self.clock))

    def rolling(self, deadline: float) -> None:
        for _ in range(1000):
            if time.monotonic() >= deadline:
                return
            self.replace_gracefully(self.next_service())
            time.sleep(0.2)

    def crash(self, deadline: float) -> None:
        delay = self.args.crash_endpoint_delay
        for _ in range(1000):
            if time.monotonic() + delay >= deadline:
                return
            name = self.next_service()
            key, victim = self.key(name), self.oldest_pod(name)
            self.cluster.kill_pod(victim, endpoint_delay=delay)
            # the endpoint controller removes the address `delay` s after the kill
            self.events.add("crashed pod removed", wait_reflected(
                self.discovery, lambda s, ip=victim.ip, k=key: ip not in listed_ips(s, k),
                self.clock, timeout=delay + 10.0))
            new = self.cluster.add_pod(name)
            self.events.add("replacement routable", wait_reflected(
                self.discovery, lambda s, ip=new.ip, k=key: ip in routable_ips(s, k),
                self.clock))
            time.sleep(0.5)

    def scale(self, deadline: float) -> None:
        for _ in range(1000):
            if time.monotonic() >= deadline:
                return
            name = self.next_service()
            key = self.key(name)
            self.cluster.scale(name, REPLICAS + 2)
            self.events.add("scale-up pods routable", wait_reflected(
                self.discovery, lambda s, k=key: len(routable_ips(s, k)) == REPLICAS + 2,
                self.clock))
            time.sleep(0.5)
            self.cluster.scale(name, REPLICAS)
            self.events.add("scale-down pods removed", wait_reflected(
                self.discovery, lambda s, k=key: len(listed_ips(s, k)) == REPLICAS,
                self.clock))
            time.sleep(0.5)

    def api_trouble(self, deadline: float) -> None:
        api = self.cluster.api
        troubles = ("watch cut", "compaction (410)", "outage (500)")
        for i in range(1000):
            if time.monotonic() >= deadline:
                return
            trouble = troubles[i % len(troubles)]
            if trouble == "compaction (410)":
                api.compact()
            elif trouble == "outage (500)":
                api.fail_for(self.args.outage, 500)
            api.cut_watches()
            self.replace_gracefully(self.next_service(), prefix=f"after {trouble}: ")
            time.sleep(0.5)


def run_churn(scenario: str, routing: str, args: argparse.Namespace) -> dict[str, Any]:
    with SimCluster() as cluster:
        services = [f"vllm-{i}" for i in range(args.churn_services)]
        for name in services:
            cluster.add_service(name, replicas=REPLICAS)
        discovery = make_discovery(cluster, routing)
        load: LoadGenerator | None = None
        try:
            if not discovery.wait_until_synced(10.0) or not wait_for(
                    lambda: len(discovery.get_service_status()) == len(services) and all(
                        v.routable for v in discovery.get_service_status().values()), 15.0):
                raise RuntimeError(f"{scenario}/{routing}: discovery did not become routable")
            load = LoadGenerator(discovery, clients=args.clients, rate=args.rate,
                                 max_seconds=args.duration + 30,
                                 keepalive=not args.no_keepalive).start()
            time.sleep(min(1.0, args.duration / 4))  # warm: keep-alive connections exist
            before = cluster.api.request_counts()
            churn = _Churn(cluster, discovery, services, args)
            play = scenario.removesuffix(PRESTOP_SUFFIX)
            if play != scenario:
                churn.pre_stop = args.pre_stop
            started = time.monotonic()
            getattr(churn, play)(started + args.duration)
            time.sleep(0.5)  # let the last requests land
            load.stop()
            elapsed = time.monotonic() - started
            after = cluster.api.request_counts()
            watches = {r: cluster.api.open_watch_count(r) for r in ("services", "endpointslices")}
            return {"scenario": scenario, "routing": routing, "seconds": round(elapsed, 1),
                    "pre_stop_s": churn.pre_stop,
                    **load.result(), **churn.events.result(),
                    "api_requests": api_delta(before, after), "open_watches_end": watches}
        finally:
            if load is not None:
                load.stop()
            discovery.close()


# -- micro figures ------------------------------------------------------------------------------


def _ready_pods(cluster: SimCluster, name: str) -> list[SimPod]:
    return [p for p in cluster.pods(name) if p.ready and not p.terminating]


def run_micro(size: int, farm: EngineFarm, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"services": size, "pods": size * 4,
                              "service_kind": "headless, engines in the farm process"}
    cluster = SimCluster(engine_port=farm.port, engine_factory=farm.engine_factory())
    discovery: K8sServiceDiscovery | None = None
    scraper: EngineStatsScraper | None = None
    try:
        cluster.start()
        t = time.monotonic()
        names = [f"m{size}-{i:04d}" for i in range(size)]
        for name in names:
            cluster.add_service(name, replicas=4, headless=True, port=farm.port)
        result["cluster_setup_s"] = round(time.monotonic() - t, 2)
        time.sleep(0.2)  # the farm learns the pod IPs
        rss_before = rss_mb()
        t0 = time.monotonic()
        discovery = make_discovery(cluster, "service")
        synced = discovery.wait_until_synced(60.0)
        result["sync_s"] = round(time.monotonic() - t0, 3) if synced else None
        routable = wait_for(lambda: len(discovery.get_endpoint_info()) == size, 120.0)
        result["all_routable_s"] = round(time.monotonic() - t0, 3) if routable else None
        time.sleep(0.5)
        result["rss_before_discovery_mb"] = rss_before
        result["rss_after_sync_mb"] = rss_mb()
        result["rss_discovery_mb"] = round(result["rss_after_sync_mb"] - rss_before, 1)
        progress(f"micro {size}: synced in {result['sync_s']} s, all routable in "
                 f"{result['all_routable_s']} s, RSS {result['rss_after_sync_mb']} MiB")

        # steady state: a quiet window must make no API request, one watch per informer
        before = cluster.api.request_counts()
        time.sleep(args.quiet)
        result["steady"] = {
            "quiet_window_s": args.quiet,
            "api_requests": api_delta(before, cluster.api.request_counts()),
            "open_watches": {r: cluster.api.open_watch_count(r)
                             for r in ("services", "endpointslices")},
        }

        # the read path, next to production-stack's copy-under-lock
        scraper = EngineStatsScraper(discovery, scrape_interval=30.0, timeout=2.0)
        wait_for(lambda: len(scraper.get_engine_stats()) == size, 30.0)
        result["read_ns"] = read_path(discovery, scraper, args)
        scraper.close()
        scraper = None
        progress(f"micro {size}: read path {result['read_ns']}")

        # readiness flips
        before = cluster.api.request_counts()
        result["flip_ms"] = measure_flips(cluster, discovery, names, args.flips)
        result["flip_api_requests"] = api_delta(before, cluster.api.request_counts())
        progress(f"micro {size}: readiness flip reflected {result['flip_ms']}")
        return result
    finally:
        if scraper is not None:
            scraper.close()
        if discovery is not None:
            discovery.close()
        cluster.stop()


def measure_flips(cluster: SimCluster, discovery: K8sServiceDiscovery, names: list[str],
                  count: int) -> dict[str, Any]:
    """Readiness flips spread over the Services: change -> published, in ms."""
    clock = ChangeClock(cluster.api)
    flips: list[float] = []
    missed = 0
    for i in range(count):
        name = names[(i * 7919) % len(names)]
        key = f"default/{name}"
        pods = cluster.pods(name)
        pod = pods[i % len(pods)]
        going_ready = not pod.ready
        cluster.set_ready(pod, going_ready)
        latency = wait_reflected(
            discovery,
            lambda s, ip=pod.ip, k=key, r=going_ready: (ip in routable_ips(s, k)) == r,
            clock)
        if latency is None:
            missed += 1
        else:
            flips.append(latency)
        time.sleep(0.005)
    return {**summarize(flips, 1000.0), "missed": missed}


# -- scale: 1 000 and 10 000 Services x 10 pods: benchmarks/scale.py ---------------------------


def read_path(discovery: K8sServiceDiscovery, scraper: EngineStatsScraper,
              args: argparse.Namespace) -> dict[str, float]:
    """Median ns per call: our reads next to a dict copied under a lock (production-stack)."""
    infos = list(discovery.get_pod_endpoint_info())
    engines = {info.url: info for info in infos}  # one entry per pod, like production-stack
    stats = dict(scraper.get_pod_engine_stats()) or {info.url: None for info in infos}
    lock = threading.Lock()

    def baseline_endpoint_info() -> list[Any]:
        with lock:
            return list(engines.values())

    def baseline_engine_stats() -> dict[str, Any]:
        with lock:
            return stats.copy()

    def noop() -> None:
        return None

    kw = {"batches": args.batches, "per_batch": 1000}
    out = {
        "get_endpoint_info_service": time_per_call(discovery.get_endpoint_info, **kw),
        "get_engine_stats": time_per_call(scraper.get_engine_stats, **kw),
        "baseline_endpoint_info": time_per_call(baseline_endpoint_info, **kw),
        "baseline_engine_stats": time_per_call(baseline_engine_stats, **kw),
        "noop_call": time_per_call(noop, **kw),
    }
    discovery.routing = "pod"  # same cache, pod-IP list
    try:
        out["get_endpoint_info_pod"] = time_per_call(discovery.get_endpoint_info, **kw)
    finally:
        discovery.routing = "service"
    out["baseline_entries"] = len(engines)
    return out


# -- scraping -------------------------------------------------------------------------------


def _max_age_window(urls: list[str], readings: Callable[[], dict[str, float]],
                    since: float, window: float) -> dict[str, Any]:
    """Sample every 100 ms the age of the newest stats of each healthy pod; the max is kept.

    A pod's age counts from the newest sample the scraper ever published for it (so a reading
    that expired from the scraper's TTL cache keeps its true age) or, never scraped, from the
    scraper's start.  Also the most pods without current stats (expired or never scraped).
    """
    worst = 0.0
    missing_worst = 0
    newest: dict[str, float] = {}
    end = time.monotonic() + window
    samples = 0
    while time.monotonic() < end and samples < 10_000:
        now = time.monotonic()
        times = readings()
        for url, at in times.items():
            if at > newest.get(url, 0.0):
                newest[url] = at
        ages = [now - newest.get(u, since) for u in urls]
        missing_worst = max(missing_worst, sum(1 for u in urls if u not in times))
        worst = max(worst, max(ages, default=0.0))
        samples += 1
        time.sleep(0.1)
    return {"max_age_s": round(worst, 3), "max_missing_pods": missing_worst,
            "samples": samples}


def _healthy_scrapes(scraper: EngineStatsScraper) -> float:
    """Scrapes that answered a usable page so far (all minus failed, from the telemetry)."""
    telemetry = scraper.telemetry()
    done = sum(sample.value for metric in telemetry.durations.collect()
               for sample in metric.samples if sample.name.endswith("_count"))
    return done - sum(telemetry.failures_by_cause.values())


class _SequentialScraper:
    """production-stack's loop: every pod in turn, timeout = interval, then sleep interval."""

    def __init__(self, urls: list[str], interval: float) -> None:
        self.urls = urls
        self.interval = interval
        self.times: dict[str, float] = {}
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seq-scraper", daemon=True)

    def start(self) -> _SequentialScraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 3.0)

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        try:
            for _ in range(100_000):
                for url in self.urls:
                    if self._stop.is_set():
                        return
                    try:
                        reply = session.get(f"{url}/metrics", timeout=self.interval)
                        parse_metrics_body(reply.content)
                        self.times[url] = time.monotonic()
                    except Exception:
                        self.failures += 1
                if self._stop.wait(self.interval):
                    return
        finally:
            session.close()


def run_scrape(farm: EngineFarm, args: argparse.Namespace) -> dict[str, Any]:
    pods = args.scrape_pods
    size = max(1, pods // 4)
    interval = 1.0
    result: dict[str, Any] = {"pods": size * 4, "services": size, "interval_s": interval,
                              "window_s": args.scrape_window}
    cluster = SimCluster(engine_port=farm.port, engine_factory=farm.engine_factory())
    discovery: K8sServiceDiscovery | None = None
    scraper: EngineStatsScraper | None = None
    sequential: _SequentialScraper | None = None
    try:
        cluster.start()
        for i in range(size):
            cluster.add_service(f"s-{i:04d}", replicas=4, headless=True, port=farm.port)
        discovery = make_discovery(cluster, "service")
        discovery.wait_until_synced(60.0)
        if not wait_for(lambda: len(discovery.get_endpoint_info()) == size, 120.0):
            raise RuntimeError("scrape: discovery did not become routable")
        # steady state: every pod's first model probe done (a Service is routable after one
        # of its pods' probes), so the window measures scraping, not the first probe round
        if not wait_for(lambda: all(p.url in v.pod_probes
                                    for v in discovery.get_service_status().values()
                                    for p in v.ready_pods), 120.0):
            progress("scrape: not every pod was probed within 120 s; measuring anyway")
        all_urls = sorted(p.url for v in discovery.get_service_status().values()
                          for p in v.pods if p.routable)
        black = all_urls[::20]  # 5 %
        healthy = [u for u in all_urls if u not in set(black)]
        farm.blackhole([u.split("//", 1)[1].rsplit(":", 1)[0] for u in black])
        result["black_holed"] = len(black)
        time.sleep(0.3)

        cpu, t = time.process_time(), time.monotonic()
        time.sleep(min(3.0, args.scrape_window))
        result["idle_cpu_s_per_s"] = round((time.process_time() - cpu) / (time.monotonic() - t),
                                           3)

        progress(f"scrape: concurrent scraper over {len(all_urls)} pods "
                 f"({len(black)} black-holed)")
        started = time.monotonic()
        scraper = EngineStatsScraper(discovery, scrape_interval=interval)
        time.sleep(args.scrape_warmup)
        active = scraper

        def concurrent_times() -> dict[str, float]:
            return {u: s.sample_time for u, s in active.get_pod_engine_stats().items()}

        ok_before = _healthy_scrapes(scraper)
        checks_before = discovery.outlier_stats()["liveness_checks"]
        cpu, t = time.process_time(), time.monotonic()
        window = _max_age_window(healthy, concurrent_times, started, args.scrape_window)
        cpu_s = time.process_time() - cpu
        elapsed = time.monotonic() - t
        window["cpu_s_per_s"] = round(cpu_s / elapsed, 3)
        ok = _healthy_scrapes(scraper) - ok_before
        window["healthy_scrapes_per_s"] = round(ok / elapsed, 1)
        # the whole process: scraper, discovery (informers, prober, liveness checks), sampler
        window["healthy_scrapes_per_cpu_s"] = round(ok / cpu_s, 1) if cpu_s > 0 else None
        window["liveness_checks_per_s"] = round(
            (discovery.outlier_stats()["liveness_checks"] - checks_before) / elapsed, 1)
        window["config"] = (f"EngineStatsScraper(scrape_interval=1, timeout={scraper.timeout}, "
                            "workers=32, keepalive_hosts=1024), discovery with default "
                            "OutlierConfig (liveness checks on)")
        result["concurrent"] = window
        scraper.close()
        scraper = None
        progress(f"scrape: concurrent {window}")

        progress("scrape: sequential baseline (timeout = interval, one pod after another)")
        started = time.monotonic()
        sequential = _SequentialScraper(all_urls, interval).start()
        time.sleep(args.scrape_warmup)
        seq = sequential
        cpu, t = time.process_time(), time.monotonic()
        window = _max_age_window(healthy, lambda: dict(seq.times), started, args.scrape_window)
        window["cpu_s_per_s"] = round((time.process_time() - cpu) / (time.monotonic() - t), 3)
        scraped = len(seq.times)
        elapsed = time.monotonic() - started
        window["pods_scraped_once"] = scraped
        window["estimated_cycle_s"] = (round(elapsed * len(all_urls) / scraped, 1)
                                       if scraped else None)
        window["config"] = "sequential, timeout=1 s (= interval), parse_metrics per page"
        result["sequential"] = window
        progress(f"scrape: sequential {window}")
        return result
    finally:
        if sequential is not None:
            sequential.stop()
        if scraper is not None:
            scraper.close()
        if discovery is not None:
            discovery.close()
        farm.clear()
        cluster.stop()


# -- RSS of discovery + scraper alone ---------------------------------------------------------

_RSS_CHILD = ("import sys; sys.path.insert(0, {root!r}); "
              "from benchmarks._common import isolated_rss_main; sys.exit(isolated_rss_main())")


def _cluster_host(conn: Any, size: int, max_seconds: float, replicas: int = 4) -> None:
    """Helper process of the RSS step: fake API server + pod objects + (via a farm) engines.

    Sends the API server URL, the farm port and every Service's pod IPs over ``conn``; then
    waits (at most ``max_seconds``) for ``"stop"``, answers with the API request counts and
    the open watches, and tears everything down.
    """
    farm = EngineFarm(0, max_seconds=max_seconds + 30).start()
    cluster = SimCluster(engine_port=farm.port, engine_factory=farm.engine_factory())
    try:
        cluster.start()
        t = time.monotonic()
        names = [f"r{size}-{i:04d}" for i in range(size)]
        for name in names:
            cluster.add_service(name, replicas=replicas, headless=True, port=farm.port)
        time.sleep(0.2)  # the farm learns the pod IPs
        conn.send({"api_url": cluster.api.url, "farm_port": farm.port, "namespace": "default",
                   "cluster_domain": cluster.cluster_domain,
                   "services": {n: [p.ip for p in cluster.pods(n)] for n in names},
                   "setup_s": round(time.monotonic() - t, 2), "host_rss_mb": rss_mb()})
        before = cluster.api.request_counts()
        if conn.poll(max_seconds):
            conn.recv()
        conn.send({"api_requests": api_delta(before, cluster.api.request_counts()),
                   "open_watches": {r: cluster.api.open_watch_count(r)
                                    for r in ("services", "endpointslices")}})
    finally:
        cluster.stop()
        farm.stop()
        conn.close()


def run_rss(size: int, args: argparse.Namespace, *, replicas: int = 4,
            scrape: bool = True) -> dict[str, Any]:
    """RSS of a fresh process running only K8sServiceDiscovery (+ EngineStatsScraper)."""
    setup_limit = 120.0 if size * replicas <= 10_000 else 900.0
    limit = 240.0 + setup_limit
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    host = ctx.Process(target=_cluster_host, args=(there, size, limit, replicas),
                       name="rss-cluster-host")
    host.start()
    there.close()
    child: subprocess.Popen[str] | None = None
    try:
        if not here.poll(setup_limit):
            raise RuntimeError(f"rss: the cluster host did not come up within {setup_limit} s")
        info = here.recv()
        progress(f"rss: cluster host pid {host.pid} ready ({size} Services, setup "
                 f"{info['setup_s']} s, host RSS {info['host_rss_mb']} MiB); measuring")
        config = {"api_url": info["api_url"], "namespace": info["namespace"],
                  "cluster_domain": info["cluster_domain"], "services": info["services"],
                  "scrape_interval": args.rss_scrape_interval,
                  "scrape_cycles": args.rss_scrape_cycles, "scrape": scrape,
                  "timeout": 90.0 if scrape else args.scale_timeout}
        child = subprocess.Popen([sys.executable, "-c", _RSS_CHILD.format(root=str(ROOT))],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            out, err = child.communicate(json.dumps(config) + "\n",
                                         timeout=2 * config["timeout"] + 20.0)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate(timeout=10.0)
            raise RuntimeError("rss: the measured process did not finish in time") from None
        if child.returncode != 0 or not out.strip():
            raise RuntimeError(f"rss: measured process exited {child.returncode}: {err[-500:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["cluster_host_rss_mb"] = info["host_rss_mb"]
        result["scrape_interval_s"] = args.rss_scrape_interval
        here.send("stop")
        if here.poll(15.0):
            result.update(here.recv())
        return result
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(10.0)
        with contextlib.suppress(OSError, ValueError):
            here.send("stop")
        host.join(20.0)
        if host.is_alive():
            host.terminate()
            host.join(5.0)
        here.close()


# -- targets and report -----------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    micro = results.get("micro", {})
    if micro:
        sizes = sorted(int(k) for k in micro)
        big, small = micro[str(sizes[-1])], micro[str(sizes[0])]
        p99 = big["flip_ms"]["p99"]
        rows.append({"target": f"readiness flip -> reflected p99 at {sizes[-1]} Services",
                     "goal": "<= 50 ms", "measured": f"{p99} ms",
                     "met": p99 is not None and p99 <= 50 and not big["flip_ms"]["missed"]})
        read_big = big["read_ns"]["get_endpoint_info_service"]
        read_small = small["read_ns"]["get_endpoint_info_service"]
        flat = read_big <= 1.5 * read_small + 50
        rows.append({"target": f"get_endpoint_info() per call at {sizes[-1]} Services, "
                               f"flat from {sizes[0]}",
                     "goal": "<= 1000 ns, flat",
                     "measured": f"{read_big} ns ({read_small} ns at {sizes[0]}; pod mode "
                                 f"{big['read_ns']['get_endpoint_info_pod']} ns; baseline "
                                 f"{big['read_ns']['baseline_endpoint_info']} ns)",
                     "met": read_big <= 1000 and flat})
        stats_big = big["read_ns"]["get_engine_stats"]
        rows.append({"target": f"get_engine_stats() per call at {sizes[-1]} Services",
                     "goal": "<= 1000 ns, flat",
                     "measured": f"{stats_big} ns ({small['read_ns']['get_engine_stats']} ns at "
                                 f"{sizes[0]}; baseline "
                                 f"{big['read_ns']['baseline_engine_stats']} ns)",
                     "met": stats_big <= 1000
                     and stats_big <= 1.5 * small["read_ns"]["get_engine_stats"] + 50})
        quiet_ok = all(
            not any(k.split()[0] in ("list", "get", "watch") for k in m["steady"]["api_requests"])
            and all(n <= 1 for n in m["steady"]["open_watches"].values())
            and not any(k.split()[0] in ("list", "get") for k in m["flip_api_requests"])
            for m in micro.values())
        rows.append({"target": "steady state: open watches per informer; GET/LIST in a quiet "
                               "window and during readiness flips",
                     "goal": "<= 1 watch, 0 GET/LIST",
                     "measured": "; ".join(
                         f"{k}: watches {m['steady']['open_watches']}, quiet "
                         f"{m['steady']['api_requests'] or 'none'}, flips "
                         f"{m['flip_api_requests'] or 'none'}" for k, m in micro.items()),
                     "met": quiet_ok})
    rss = results.get("rss")
    if rss and "error" not in rss:
        mib = rss["rss_after_scrape_mb"]
        in_process = micro.get(str(rss["services"]), {}).get("rss_after_sync_mb")
        rows.append({"target": f"RSS at {rss['services']} Services x 4 pods: discovery + "
                               "scraper alone",
                     "goal": "<= 100 MB",
                     "measured": f"{mib} MiB = {round(mib * 1.048576, 1)} MB after sync and "
                                 f"{rss['scrape_cycles_after_full']} scrape cycles (imports "
                                 f"only {rss['rss_imports_mb']} MiB; after sync "
                                 f"{rss['rss_after_sync_mb']} MiB; peak {rss['rss_peak_mb']} "
                                 "MiB)" + (f"; in-process figure with the cluster sim: "
                                           f"{in_process} MiB" if in_process else ""),
                     "met": mib * 1.048576 <= 100})
    elif micro:
        big = micro[str(max(int(k) for k in micro))]
        rows.append({"target": f"RSS after sync at {big['services']} Services x 4 pods",
                     "goal": "<= 100 MB",
                     "measured": f"{big['rss_after_sync_mb']} MiB whole process (cluster sim "
                                 f"included; not isolated); discovery's share "
                                 f"{big['rss_discovery_mb']} MiB",
                     "met": big["rss_after_sync_mb"] * 1.048576 <= 100})
    churn = results.get("churn", {}).get("rolling", {})
    if "service" in churn:
        svc, pod = churn["service"], churn.get("pod", {})
        rows.append({"target": "rolling restart through Service DNS: failed requests",
                     "goal": "0", "measured": f"{svc['failed']} of {svc['sent']} "
                                              f"(pod-IP mode: {pod.get('failed')} of "
                                              f"{pod.get('sent')})",
                     "met": svc["failed"] == 0})
    for scenario in ("rolling_prestop", "api_trouble_prestop"):
        modes = {m: r for m, r in results.get("churn", {}).get(scenario, {}).items()
                 if "error" not in r}
        if modes:
            rows.append({"target": f"{scenario.removesuffix(PRESTOP_SUFFIX)} with a preStop "
                                   "sleep: failed requests, both routing modes",
                         "goal": "0",
                         "measured": "; ".join(f"{m}: {r['failed']} of {r['sent']}"
                                               for m, r in modes.items()),
                         "met": all(r["failed"] == 0 for r in modes.values())})
    rows += _scale_targets(results)
    scrape = results.get("scrape")
    if scrape:
        age = scrape["concurrent"]["max_age_s"]
        rows.append({"target": f"scraping {scrape['pods']} pods, {scrape['black_holed']} "
                               "black-holed: oldest healthy pod's stats",
                     "goal": "<= 2 s",
                     "measured": f"{age} s (sequential baseline: "
                                 f"{scrape['sequential']['max_age_s']} s)",
                     "met": age <= 2.0})
    return rows


def _scale_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    return scale_targets(results)


def _scale_markdown(results: dict[str, Any]) -> list[str]:
    return scale_markdown(results, _ms)


def _fmt_causes(causes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in causes.items()) or "-"


def _ms(summary: dict[str, Any]) -> str:
    if not summary.get("count"):
        return "-"
    return f"{summary['p50']} / {summary['p99']} / {summary['max']}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# Churn benchmark ({meta['mode']} run, {meta['date']})", "",
           f"Machine: {meta['cpus']} cores, Python {meta['python']}, {meta['platform']}. "
           f"Informer: {meta['informer']}. Probes: {meta['probe']}. Total {meta['total_s']} s.",
           ""]
    out += ["## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    out += [f"| {r['target']} | {r['goal']} | {r['measured']} | {'yes' if r['met'] else 'NO'} |"
            for r in results["targets"]]
    churn = results.get("churn", {})
    if churn:
        out += ["", "## Churn scenarios", "",
                f"{meta['churn']}", "",
                "| scenario | routing | sent | failed | failures by cause | reflected ms "
                "p50 / p99 / max | API requests during churn |", "|---|---|---|---|---|---|---|"]
        for scenario, modes in churn.items():
            for routing, r in modes.items():
                if "error" in r:
                    out.append(f"| {scenario} | {routing} | error: {r['error']} | | | | |")
                    continue
                api = ", ".join(f"{k} {v}" for k, v in r["api_requests"].items()) or "-"
                out.append(f"| {scenario} | {routing} | {r['sent']} | {r['failed']} | "
                           f"{_fmt_causes(r['failed_by_cause'])} | {_ms(r['reflect_ms'])} | "
                           f"{api} |")
        out += ["", "Reflection by event (ms, p50 / p99 / max):", ""]
        for scenario, modes in churn.items():
            for routing, r in modes.items():
                for kind, s in r.get("reflect_ms_by_event", {}).items():
                    out.append(f"- {scenario}/{routing} — {kind}: {_ms(s)} (n={s['count']})")
    micro = results.get("micro", {})
    if micro:
        out += ["", "## Micro figures", "",
                "Headless Services, 4 pods each, engines served by the out-of-process farm. "
                "In-process RSS: the whole benchmark process, which also hosts the fake API "
                "server and the pod objects (see the isolated figure below).", "",
                "| Services | pods | first sync s | all routable s | in-process RSS MiB "
                "(discovery's growth) | "
                "get_endpoint_info ns svc / pod | baseline ns | get_engine_stats ns | "
                "baseline ns | flip -> reflected ms p50 / p99 / max |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for size, m in micro.items():
            rn = m["read_ns"]
            out.append(
                f"| {size} | {m['pods']} | {m['sync_s']} | {m['all_routable_s']} | "
                f"{m['rss_after_sync_mb']} ({m['rss_discovery_mb']}) | "
                f"{rn['get_endpoint_info_service']} / {rn['get_endpoint_info_pod']} | "
                f"{rn['baseline_endpoint_info']} | {rn['get_engine_stats']} | "
                f"{rn['baseline_engine_stats']} | {_ms(m['flip_ms'])} |")
        out += ["", "Baselines copy a dict of one entry per pod under a lock per call "
                "(production-stack); an empty call costs "
                + ", ".join(f"{m['read_ns']['noop_call']} ns" for m in micro.values())
                + " in the same loop."]
    rss = results.get("rss")
    if rss:
        out += ["", "## RSS of discovery + scraper alone", ""]
        if "error" in rss:
            out.append(f"error: {rss['error']}")
        else:
            out += [f"A fresh process (`python -c`, imports: the library and the stdlib-only DNS "
                    f"shim) runs `K8sServiceDiscovery(routing=\"service\")` + "
                    f"`EngineStatsScraper(scrape_interval={rss['scrape_interval_s']:g})` against "
                    f"{rss['services']} headless Services x 4 pods; the fake API server and "
                    "the pod objects live in a spawned helper process (its RSS "
                    f"{rss['cluster_host_rss_mb']} MiB), the engines in that helper's farm. "
                    "The DNS shim in the measured process maps each Service name to its 4 pod "
                    "IPs, as cluster DNS answers for a headless Service.", "",
                    "| stage | VmRSS MiB |", "|---|---|",
                    f"| imports only | {rss['rss_imports_mb']} |",
                    f"| before discovery (DNS shim with {rss['services']} names) | "
                    f"{rss['rss_before_discovery_mb']} |",
                    f"| first sync ({rss['sync_s']} s) | {rss['rss_after_sync_mb']} |",
                    f"| all Services routable, models probed ({rss['all_routable_s']} s) | "
                    f"{rss['rss_all_routable_mb']} |",
                    f"| scraper: all {rss['pods_scraped']} pods scraped ({rss['all_scraped_s']} "
                    f"s) + {rss['scrape_cycles_after_full']} intervals | "
                    f"{rss['rss_after_scrape_mb']} |",
                    f"| peak (VmHWM) | {rss['rss_peak_mb']} |", "",
                    f"Threads {rss['threads']}, open file descriptors {rss['open_fds']}; API "
                    f"requests of the measured process: "
                    + (", ".join(f"{k} {v}" for k, v in rss.get("api_requests", {}).items())
                       or "-")
                    + "."]
    out += _scale_markdown(results)
    scrape = results.get("scrape")
    if scrape:
        c, s = scrape["concurrent"], scrape["sequential"]
        out += ["", "## Scraping", "",
                f"{scrape['pods']} pods ({scrape['black_holed']} black-holed), interval "
                f"{scrape['interval_s']} s, measured over {scrape['window_s']} s after "
                "warm-up; idle process CPU before scraping "
                f"{scrape['idle_cpu_s_per_s']} s/s.", "",
                "| scraper | oldest healthy pod's stats, max s | pods without current stats "
                "(max) | "
                "process CPU s/s |", "|---|---|---|---|",
                f"| {c['config']} | {c['max_age_s']} | {c['max_missing_pods']} | "
                f"{c['cpu_s_per_s']} |",
                f"| {s['config']} | {s['max_age_s']} (cycle ~{s['estimated_cycle_s']} s) | "
                f"{s['max_missing_pods']} | {s['cpu_s_per_s']} |"]
    return "\n".join(out) + "\n"


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Discovery churn benchmark (simulated cluster)")
    parser.add_argument("--quick", action="store_true", help="short run (under 2 minutes)")
    parser.add_argument("--sizes", type=int, nargs="+",
                        help="micro sizes in Services (default 10 100 1000; quick 10 100)")
    parser.add_argument("--duration", type=float,
                        help="seconds of churn per scenario and routing (default 15; quick 4)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--churn-services", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="total requests/s")
    parser.add_argument("--no-keepalive", action="store_true",
                        help="one connection per request (default: keep-alive, like a router)")
    parser.add_argument("--grace", type=float, default=0.3,
                        help="seconds between SIGTERM and the pod exiting (in-flight requests "
                             "finish)")
    parser.add_argument("--pre-stop", type=float, default=2.0,
                        help="preStop sleep of the *_prestop scenarios (seconds)")
    parser.add_argument("--crash-endpoint-delay", type=float, default=1.0)
    parser.add_argument("--outage", type=float, help="API outage seconds (default 2; quick 1)")
    parser.add_argument("--flips", type=int, help="readiness flips per size (200; quick 40; "
                        "scale: whole Services flipped down and back)")
    parser.add_argument("--quiet", type=float, help="quiet window seconds (5; quick 2)")
    parser.add_argument("--batches", type=int, help="read-path batches of 1000 calls (300; 50)")
    parser.add_argument("--scrape-pods", type=int, help="pods to scrape (1000; quick 200)")
    parser.add_argument("--scrape-window", type=float, help="measurement window s (10; quick 3)")
    parser.add_argument("--scrape-warmup", type=float, default=3.0)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-churn", action="store_true")
    parser.add_argument("--skip-scrape", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-size", type=int,
                        help="Services (x 4 pods) of the isolated RSS step (default: largest size)")
    parser.add_argument("--rss-scrape-interval", type=float,
                        help="scrape interval of the RSS step (default 10; quick 1)")
    parser.add_argument("--rss-scrape-cycles", type=int, default=3,
                        help="scrape intervals to wait after every pod was scraped once")
    parser.add_argument("--scale", action="store_true",
                        help="also run the scale step (1 000 and 10 000 Services x 10 pods, "
                             "about 10 minutes)")
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--scale-replicas", type=int, default=10)
    parser.add_argument("--scale-timeout", type=float, default=120.0,
                        help="seconds to wait for sync and for all Services routable")
    parser.add_argument("--only-scale", action="store_true",
                        help="run only the scale step (implies --scale)")
    parser.add_argument("--scale-probed-timeout", type=float,
                        help="scale: seconds to wait for every pod's first model probe before "
                             "the flips (default: --scale-timeout)")
    parser.add_argument("--flip-timeout", type=float, default=30.0,
                        help="scale: seconds a whole-Service flip may take to show (else missed)")
    parser.add_argument("--steady-seconds", type=float, default=300.0,
                        help="scale: steady churn phase with RSS sampled (seconds)")
    parser.add_argument("--steady-flip-every", type=float, default=1.0,
                        help="scale: one Service flipped down this often in the steady phase")
    parser.add_argument("--steady-down-for", type=float, default=2.0,
                        help="scale: seconds a flipped Service stays not ready")
    parser.add_argument("--rss-sample-interval", type=float, default=60.0,
                        help="scale: RSS and engine request counts sampled this often")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="scale: trace allocations of the measured process (leak hunting; "
                             "slows it and adds to its RSS)")
    parser.add_argument("--farm-port", type=int, default=18080)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"sizes": [10, 100] if quick else [10, 100, 1000],
                "duration": 4.0 if quick else 15.0, "outage": 1.0 if quick else 2.0,
                "flips": 40 if quick else 200, "quiet": 2.0 if quick else 5.0,
                "batches": 50 if quick else 300, "scrape_pods": 200 if quick else 1000,
                "scrape_window": 3.0 if quick else 10.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and args.scrape_warmup == 3.0:
        args.scrape_warmup = 2.0
    if args.only_scale:
        args.scale = True
        args.skip_churn = args.skip_micro = args.skip_scrape = args.skip_rss = True
    if args.rss_size is None:
        args.rss_size = max(args.sizes)
    if args.rss_scrape_interval is None:  # 4000 pods take ~7 s of one core per pass here
        args.rss_scrape_interval = 1.0 if quick else 10.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    results: dict[str, Any] = {"meta": {
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "informer": "InformerConfig(backoff_initial=0.05, backoff_cap=1, "
                    "watch_timeout_range=(30, 60))",
        "probe": ("library defaults (no informer_config / probe_config) in the scale step; "
                  "elsewhere " if args.scale else "") + "ProbeConfig(interval=60, timeout=2)",
        "churn": (f"{args.churn_services} ClusterIP Services x {REPLICAS} pods (in-process "
                  f"engines, mini kube-proxy), {args.duration:g} s of churn each, "
                  f"{args.clients} client threads at {args.rate:g} req/s total "
                  f"({'one connection per request' if args.no_keepalive else 'keep-alive'}), "
                  f"grace {args.grace:g} s, preStop {args.pre_stop:g} s in the *_prestop "
                  f"scenarios (none elsewhere), crash endpoint delay "
                  f"{args.crash_endpoint_delay:g} s,"
                  f" API outage {args.outage:g} s."),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }}
    exit_code = 0
    farm: EngineFarm | None = None
    try:
        if not args.skip_churn:
            results["churn"] = {}
            for scenario in args.scenarios:
                for routing in MODES:
                    progress(f"churn {scenario} / {routing}: {args.duration:g} s")
                    try:
                        r = run_churn(scenario, routing, args)
                    except Exception as exc:  # report it, run the rest
                        exit_code = 1
                        r = {"error": f"{exc.__class__.__name__}: {exc}"}
                    results["churn"].setdefault(scenario, {})[routing] = r
                    progress(f"churn {scenario} / {routing}: {r.get('sent')} sent, "
                             f"{r.get('failed')} failed {r.get('failed_by_cause', '')}, "
                             f"reflected {r.get('reflect_ms', r.get('error'))}")
        if not (args.skip_micro and args.skip_scrape):
            lifetime = 300 if args.quick else 1500
            farm = EngineFarm(args.farm_port, max_seconds=lifetime).start()
            progress(f"engine farm pid {farm._proc.pid if farm._proc else '?'} "
                     f"on 0.0.0.0:{farm.port}")
        if not args.skip_micro and farm is not None:
            results["micro"] = {}
            for size in args.sizes:
                progress(f"micro {size} Services x 4 pods")
                results["micro"][str(size)] = run_micro(size, farm, args)
        if not args.skip_scrape and farm is not None:
            progress(f"scrape {args.scrape_pods} pods")
            results["scrape"] = run_scrape(farm, args)
        if farm is not None:
            farm.stop()  # the scale and RSS steps bring their own processes
            farm = None
        if args.scale:
            results["scale"] = {}
            for size in args.scale_sizes:
                progress(f"scale {size} Services x {args.scale_replicas} pods")
                try:
                    results["scale"][str(size)] = run_scale(size, args)
                except Exception as exc:  # report it, run the rest
                    exit_code = 1
                    results["scale"][str(size)] = {"error": f"{exc.__class__.__name__}: {exc}"}
                progress(f"scale {size}: done")
        if not args.skip_rss:
            progress(f"rss: discovery + scraper alone, {args.rss_size} Services x 4 pods")
            try:
                results["rss"] = run_rss(args.rss_size, args)
            except Exception as exc:  # report it, keep the rest
                exit_code = 1
                results["rss"] = {"error": f"{exc.__class__.__name__}: {exc}"}
            progress(f"rss: {results['rss']}")
    except KeyboardInterrupt:
        progress("interrupted: cleaning up")
        return 130
    finally:
        if farm is not None:
            farm.stop()
    results["meta"]["total_s"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "churn.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.output_dir / "churn.md").write_text(text)
    sys.stdout.write(text)
    progress(f"wrote {args.output_dir / 'churn.json'} and churn.md")
    return exit_code


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
