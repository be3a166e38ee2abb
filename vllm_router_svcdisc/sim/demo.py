"""The demo: discovery and scraping on the simulated cluster while it churns.

It starts three Services, routes a trickle of completions through their Service DNS names the
way a router would (URL from ``get_endpoint_info()`` at each request), plays a rolling
restart, a crash and a scale-up, and prints the table after each step and a summary at the end.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TextIO

import requests

from ..discovery import K8sServiceDiscovery
from ..informer import InformerConfig
from ..probe import ProbeConfig
from ..scraper import EngineStatsScraper
from .cluster import SimCluster, SimPod

Show = Callable[[K8sServiceDiscovery, EngineStatsScraper], None]


class _Traffic:
    """Completions through Service DNS names, bounded in time by ``stop()``."""

    def __init__(self, discovery: K8sServiceDiscovery) -> None:
        self._discovery = discovery
        self._stop = threading.Event()
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> _Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        turn = 0
        while not self._stop.wait(0.02):
            endpoints = self._discovery.get_endpoint_info()
            if not endpoints:
                continue
            endpoint = endpoints[turn % len(endpoints)]
            turn += 1
            self.sent += 1
            try:
                reply = session.post(f"{endpoint.url}/v1/completions", timeout=2.0,
                                     json={"model": endpoint.model_names[0], "prompt": "hi"})
                self.failed += reply.status_code != 200
            except requests.RequestException:
                self.failed += 1
        session.close()


def _jiggle_load(cluster: SimCluster, stop: threading.Event) -> None:
    """Give the engines changing, plausible load so the table moves."""
    rng = random.Random(7)
    while not stop.wait(0.3):
        for service in cluster.services():
            for pod in list(service.pods.values()):
                engine = pod.engine
                engine.running = rng.randint(0, 12)
                engine.waiting = rng.randint(0, 4)
                engine.kv_cache_usage = round(rng.uniform(0.05, 0.9), 3)
                engine.prefix_queries += rng.randint(100, 400)
                engine.prefix_hits += rng.randint(20, 100)


def _wait(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``predicate`` held (or ``timeout``), polled every 10 ms."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and not predicate():
        time.sleep(0.01)
    return time.monotonic() - start


def _pod_gone(discovery: K8sServiceDiscovery, ip: str) -> Callable[[], bool]:
    def check() -> bool:
        return all(pod.ip != ip for e in discovery.get_endpoint_info() for pod in e.pods
                   if pod.routable)
    return check


def run_demo(stream: TextIO, *, output: str, quick: bool, show: Show) -> int:
    """Run the scripted churn; returns an exit code (0 unless discovery never synced)."""
    pause = 1.0 if quick else 3.0
    fast = InformerConfig(watch_timeout_range=(30, 60), backoff_initial=0.1, backoff_cap=2.0)
    with SimCluster() as cluster:
        cluster.add_service("llama", replicas=3, model="meta-llama/Llama-3.1-8B-Instruct",
                            dp_ranks=2)
        cluster.add_service("qwen", replicas=2, model="Qwen/Qwen3-8B",
                            lora_adapters=["sql-lora"])
        cluster.add_service("mistral", replicas=2, model="mistralai/Mistral-7B-Instruct-v0.3")
        stop_load = threading.Event()
        loader = threading.Thread(target=_jiggle_load, args=(cluster, stop_load), daemon=True)
        loader.start()
        discovery = K8sServiceDiscovery(namespace="default", label_selector="app=vllm",
                                        api_client=cluster.api_client(), informer_config=fast,
                                        probe_config=ProbeConfig(interval=5.0, timeout=2.0))
        scraper = EngineStatsScraper(discovery, scrape_interval=0.5)
        traffic = _Traffic(discovery)
        reflected: dict[str, float] = {}

        def say(text: str) -> None:
            if output == "table":
                stream.write(f"== {text}\n")
                stream.flush()

        def pods_ready(name: str, count: int) -> Callable[[], bool]:
            def check() -> bool:
                view = discovery.get_service_status().get(f"default/{name}")
                return view is not None and len(view.ready_pods) == count
            return check

        try:
            if not discovery.wait_until_synced(10.0):
                stream.write("demo: discovery did not sync\n")
                return 1
            _wait(lambda: len(discovery.get_endpoint_info()) == 3
                  and len(scraper.get_engine_stats()) == 3, 10.0)
            traffic.start()
            say("three Services discovered; traffic flows through their DNS names")
            show(discovery, scraper)
            time.sleep(pause)

            say("rolling restart of llama: one pod at a time terminates, a new one replaces it")
            for old in list(cluster.pods("llama")):
                cluster.terminate_pod(old)
                gone = _wait(_pod_gone(discovery, old.ip), 5.0)
                reflected.setdefault("terminating pod excluded", gone)
                cluster.add_pod("llama")
                cluster.finish_termination(old)
                _wait(pods_ready("llama", 3), 5.0)
            show(discovery, scraper)
            time.sleep(pause)

            say("crash: a qwen pod dies; its endpoint disappears 1 s later (node controller)")
            victim: SimPod = cluster.pods("qwen")[0]
            cluster.kill_pod(victim, endpoint_delay=1.0)
            reflected["crashed pod removed"] = _wait(pods_ready("qwen", 1), 5.0)
            show(discovery, scraper)
            time.sleep(pause)

            say("scale-up: mistral goes from 2 to 4 pods")
            cluster.scale("mistral", 4)
            reflected["scale-up seen"] = _wait(pods_ready("mistral", 4), 5.0)
            _wait(lambda: (s := scraper.get_engine_stats().get(cluster.url_of("mistral")))
                  is not None and s.pods_scraped == 4, 5.0)
            show(discovery, scraper)
        finally:
            traffic.stop()
            stop_load.set()
            scraper.close()
            discovery.close()
        if output == "table":
            stream.write(f"== summary: {traffic.sent} requests via Service DNS during churn, "
                         f"{traffic.failed} failed\n")
            for what, seconds in reflected.items():
                stream.write(f"   {what}: reflected in {1000 * seconds:.0f} ms\n")
    return 0
