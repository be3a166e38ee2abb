"""Accelerated soak: continuous churn and API/engine faults on the simulated cluster.

``python benchmarks/soak.py [--duration 600] [--services 100]``

100 headless Services x 2 pods (engines served out of process by ``benchmarks/engine_farm.py``),
discovery + scraper with informer/probe timings scaled down, a churn thread (readiness flips,
reschedules, scaling, Service delete/re-create, relabel out of the selector and back) and a fault
thread (watch cuts, compaction -> 410, 500 bursts, 429 + Retry-After, API server restarts, a
short 403, malformed watch lines, black-holed engines).  Every ``--sample-every`` seconds it
records thread count, open file descriptors, RSS and cache sizes.  At the end faults stop and
the endpoint set must converge to the simulator's truth.

Bounds (enforced; the exit code is 1 when one is broken), after a warm-up of
``--warmup`` seconds (default 30 % of the run, 20 s to 120 s):

- RSS: the median of the last three samples is < 5 % above the median of the first three
  samples after warm-up;
- the library's own threads (``svcdisc-*``): identical in every sample after warm-up;
- all threads of the process: max - min <= ``THREAD_TOLERANCE`` after warm-up;
- open file descriptors beyond one per pooled engine host: max - min <= ``FD_TOLERANCE`` after
  warm-up (a pooled keep-alive connection comes and goes with the checks that use it), and the
  pooled hosts never outnumber the pods the pollers track (a pool left behind by a departed pod
  is a leak);
- the final endpoint set equals the simulator's truth (no ghost, none missing).

Writes ``benchmarks/results/soak.json`` and ``soak.md`` (also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import progress, rss_mb
from benchmarks.engine_farm import EngineFarm
from vllm_router_svcdisc.backoff import BackoffPolicy
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.informer import InformerConfig
from vllm_router_svcdisc.probe import ProbeConfig
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster

RESULTS = Path(__file__).resolve().parent / "results"
INFORMER = InformerConfig(watch_timeout_range=(10, 20), read_timeout_slack=5, connect_timeout=2,
                          list_read_timeout=10, backoff_initial=0.05, backoff_cap=1.0,
                          backoff_reset_after=10.0)
PROBE = ProbeConfig(interval=5.0, timeout=2.0, backoff=BackoffPolicy(
    initial=0.1, factor=2.0, jitter=1.0, cap=2.0, reset_after=float("inf")))
SCRAPE_INTERVAL = 1.0
SCRAPE_TIMEOUT = 1.0
REPLICAS = 2
RSS_GROWTH_BOUND = 0.05
#: Threads of this process outside the library vary with the fake API server's connections: one
#: handler thread per open connection (two watches, the LIST connections the client keeps alive,
#: and during a restart both the dying and the new ones).
THREAD_TOLERANCE = 8
#: File descriptors beyond the pooled keep-alive connections to pods vary with the same API
#: connections (two per connection: both ends live in this process) and with the scrapes in
#: flight at the sampling instant (one socket each, up to the 32 workers).  The pooled ones are
#: bounded separately: the liveness checker keeps one only for the pods it checked itself (it
#: skips a pod a fresher scrape answered for), so their number swings by up to one per pod.
FD_TOLERANCE = 64
#: Pooled hosts above the pods a poller tracks, for the churn between reading the two.
POOL_SLACK = 10


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _LogCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.by_level: dict[str, int] = {}
        self.last: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.by_level[record.levelname] = self.by_level.get(record.levelname, 0) + 1
        if record.levelno >= logging.ERROR and record.exc_info:
            self.last.append(record.getMessage())

    @property
    def total(self) -> int:
        return sum(self.by_level.values())


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.stop = threading.Event()
        self.churn_counts: dict[str, int] = {}
        self.parked: dict[str, float] = {}
        self.unready: dict[tuple[str, str], float] = {}
        self.fault_counts: dict[str, int] = {}
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.read_errors = 0
        self.reads = 0

    # -- churn and faults --------------------------------------------------------------------

    def _count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def churn_step(self, cluster: SimCluster, names: list[str]) -> None:
        now = time.monotonic()
        for parked, since in list(self.parked.items()):  # relabelled back a little later
            if now - since >= 2.0:
                del self.parked[parked]
                with contextlib.suppress(KeyError):
                    cluster.set_service_labels(parked, {"app": "vllm"})
                    self._count(self.churn_counts, "relabel back")
        for (service_name, pod_name), since in list(self.unready.items()):  # readiness returns
            if now - since >= 2.0:
                del self.unready[(service_name, pod_name)]
                with contextlib.suppress(KeyError):
                    pod = next((p for p in cluster.pods(service_name) if p.name == pod_name),
                               None)
                    if pod is not None and not pod.ready:
                        cluster.set_ready(pod, True)
        name = self.rng.choice(names)
        kind = self.rng.choice(("flip", "flip", "reschedule", "scale", "recreate", "relabel"))
        pods = cluster.pods(name)
        if kind == "flip" and pods:  # not ready for 2 s
            pod = self.rng.choice(pods)
            if pod.ready:
                cluster.set_ready(pod, False)
                self.unready[(name, pod.name)] = now
        elif kind == "reschedule" and pods:
            cluster.reschedule(self.rng.choice(pods))
        elif kind == "scale":
            cluster.scale(name, self.rng.randint(1, REPLICAS + 1))
        elif kind == "recreate":  # deleted and created again under the same name
            cluster.delete_service(name)
            cluster.add_service(name, replicas=REPLICAS, headless=True, port=cluster.engine_port)
        elif kind == "relabel" and name not in self.parked:  # out of the selector for 2 s
            cluster.set_service_labels(name, {"app": "parked"})
            self.parked[name] = now
        self._count(self.churn_counts, kind)

    def fault(self, cluster: SimCluster, farm: EngineFarm, index: int) -> None:
        api = cluster.api
        kind = ("cut", "compact", "500", "429", "restart", "403", "malformed",
                "blackhole")[index % 8]
        if kind == "cut":
            api.cut_watches()
        elif kind == "compact":
            api.compact()
            api.cut_watches()
        elif kind == "500":
            api.fail_next(3, 500)
            api.cut_watches()
        elif kind == "429":
            api.fail_next(2, 429, retry_after=1)
            api.cut_watches()
        elif kind == "restart":
            api.restart()
        elif kind == "403":
            api.fail_for(1.0, 403)
            api.cut_watches()
        elif kind == "malformed":
            api.inject_raw_line(b'{"type": "MODIFIED", "object": {broken')
            api.inject_raw_line(b'{"type": "SURPRISE", "object": {"metadata": {}}}')
        elif kind == "blackhole":
            ips = [p.ip for s in cluster.services() for p in s.pods.values()]
            farm.clear()
            farm.blackhole(self.rng.sample(ips, min(len(ips), 5)))
        self._count(self.fault_counts, kind)

    def _loop(self, name: str, interval: float, step: Any) -> None:
        deadline = time.monotonic() + self.args.duration + 60
        for i in range(10_000_000):
            if self.stop.wait(interval) or time.monotonic() > deadline:
                return
            try:
                step(i)
            except Exception as exc:  # the soak's own driver must not die either
                self.errors.append(f"{name}: {exc.__class__.__name__}: {exc}")

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        farm = EngineFarm(args.farm_port, max_seconds=args.duration + 300).start()
        cluster = SimCluster(engine_port=farm.port, engine_factory=farm.engine_factory())
        counter = _LogCounter()
        library_log = logging.getLogger("vllm_router_svcdisc")
        library_log.addHandler(counter)
        library_log.setLevel(logging.INFO)
        library_log.propagate = False
        discovery: K8sServiceDiscovery | None = None
        scraper: EngineStatsScraper | None = None
        threads: list[threading.Thread] = []
        try:
            cluster.start()
            names = [f"soak-{i:03d}" for i in range(args.services)]
            for name in names:
                cluster.add_service(name, replicas=REPLICAS, headless=True, port=farm.port)
            discovery = K8sServiceDiscovery(
                namespace="default", label_selector="app=vllm",
                api_client=cluster.api_client(), informer_config=INFORMER, probe_config=PROBE,
                unhealthy_after=10.0)
            scraper = EngineStatsScraper(discovery, scrape_interval=SCRAPE_INTERVAL,
                                         timeout=SCRAPE_TIMEOUT)
            d, s = discovery, scraper
            if not discovery.wait_until_synced(30):
                raise RuntimeError("discovery did not sync")
            started = time.monotonic()
            progress(f"soak: {args.services} Services x {REPLICAS} pods, {args.duration:g} s")

            def read(_i: int) -> None:
                try:
                    for info in d.get_endpoint_info():
                        info.get_base_models()
                    d.get_pod_endpoint_info()
                    d.get_service_status()
                    d.get_health()
                    s.get_engine_stats()
                    s.get_pod_engine_stats()
                    self.reads += 1
                except Exception:
                    self.read_errors += 1

            threads = [
                threading.Thread(target=self._loop, name="soak-churn", daemon=True,
                                 args=("churn", args.churn_interval,
                                       lambda _i: self.churn_step(cluster, names))),
                threading.Thread(target=self._loop, name="soak-faults", daemon=True,
                                 args=("faults", args.fault_interval,
                                       lambda i: self.fault(cluster, farm, i))),
                threading.Thread(target=self._loop, name="soak-reader", daemon=True,
                                 args=("reader", 0.01, read)),
            ]
            for thread in threads:
                thread.start()
            end = started + args.duration
            for _ in range(100_000):
                now = time.monotonic()
                self.samples.append(self._sample(now - started, cluster, d, s, counter))
                if now >= end:
                    break
                self.stop.wait(min(args.sample_every, max(0.0, end - now)))
            self.stop.set()
            for thread in threads:
                thread.join(5.0)
            cluster.api.clear_faults()
            farm.clear()
            for service in cluster.services():  # everything parked comes back, all ready
                if service.labels.get("app") != "vllm":
                    cluster.set_service_labels(service.name, {"app": "vllm"})
            converged, mismatch, seconds = self._converge(cluster, d)
            services_alive = all(st.alive for st in d.informer_status())
            health = d.health()
            t = time.monotonic()
            d.close()
            s.close()
            close_s = round(time.monotonic() - t, 3)
            discovery = scraper = None
            return {"converged": converged, "converge_s": seconds, "mismatch": mismatch,
                    "informers_alive_at_end": services_alive, "health_at_end": health.healthy,
                    "health_reasons": list(health.reasons), "close_s": close_s,
                    "log_records": dict(counter.by_level), "crash_logs": counter.last[:5]}
        finally:
            self.stop.set()
            if scraper is not None:
                scraper.close()
            if discovery is not None:
                discovery.close()
            cluster.stop()
            farm.stop()
            library_log.removeHandler(counter)
            library_log.propagate = True

    def _sample(self, t: float, cluster: SimCluster, d: K8sServiceDiscovery,
                s: EngineStatsScraper, counter: _LogCounter) -> dict[str, Any]:
        snapshot = d.get_snapshot()
        cache = d._cache
        return {
            "t": round(t, 1),
            "threads": threading.active_count(),
            "svcdisc_threads": sum(1 for th in threading.enumerate()
                                   if th.name.startswith("svcdisc")),
            "fds": fds(),
            "rss_mb": rss_mb(),
            "services": len(snapshot.services),
            "routable": len(snapshot.endpoint_infos),
            "pod_infos": len(snapshot.pod_infos),
            "cache_slices": cache.sizes()["slices"],
            "cache_probes": cache.sizes()["probes"],
            "informer_known": len(d._services._known) + len(d._endpoints._known),
            "prober_targets": len(d._prober._targets),
            "health_records": len(d.health_book),  # ready pods + those departed < blip window
            "scraper_pods": len(s._pods),
            "scraper_readings": len(s._readings),
            "api_history": len(cluster.api._history),
            "log_records": counter.total,
            # hosts with a keep-alive pool, and how many pods each poller may keep one for:
            # liveness and scraper, the ready pods plus those departed within the blip window;
            # the prober, one per worker
            "pooled_hosts": (d._liveness._session.pooled_hosts + s._session.pooled_hosts
                             + d._prober._session.pooled_hosts),
            "pool_excess": max(d._liveness._session.pooled_hosts - len(d.health_book),
                               s._session.pooled_hosts - len(s._pods) - len(s._departed),
                               d._prober._session.pooled_hosts - d._prober.config.workers),
        }

    def _converge(self, cluster: SimCluster,
                  d: K8sServiceDiscovery) -> tuple[bool, str, float | None]:
        def truth() -> tuple[list[str], list[str], list[str]]:
            services = [s for s in cluster.services() if s.labels.get("app") == "vllm"]
            return (sorted(cluster.url_of(s.name) for s in services if s.ready_pods()),
                    sorted(f"http://{p.ip}:{cluster.engine_port}" for s in services
                           for p in s.ready_pods()),
                    sorted(s.key for s in services))

        def seen() -> tuple[list[str], list[str], list[str]]:
            snap = d.get_snapshot()
            return (sorted(e.url for e in snap.endpoint_infos),
                    sorted(e.url for e in snap.pod_infos), sorted(snap.services))

        started = time.monotonic()
        deadline = started + 30.0
        while time.monotonic() < deadline:
            if seen() == truth():
                return True, "", round(time.monotonic() - started, 2)
            time.sleep(0.05)
        want, got = truth(), seen()
        diff = [f"{label}: missing {sorted(set(w) - set(g))[:5]} ghost "
                f"{sorted(set(g) - set(w))[:5]}"
                for label, w, g in zip(("services", "pods", "keys"), want, got, strict=True)
                if w != g]
        return False, "; ".join(diff), None


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def evaluate(samples: list[dict[str, Any]], warmup: float, end: dict[str, Any],
             read_errors: int, driver_errors: list[str]) -> list[dict[str, Any]]:
    after = [x for x in samples if x["t"] >= warmup]
    rows: list[dict[str, Any]] = []
    if len(after) < 3:
        return [{"bound": "samples after warm-up", "limit": ">= 3",
                 "measured": str(len(after)), "met": False}]
    base = _median([x["rss_mb"] for x in after[:3]])
    last = _median([x["rss_mb"] for x in after[-3:]])
    growth = (last - base) / base if base else 0.0
    rows.append({"bound": "RSS growth after warm-up (median of last 3 vs first 3 samples)",
                 "limit": f"< {RSS_GROWTH_BOUND:.0%}",
                 "measured": f"{growth:+.2%} ({base:.1f} -> {last:.1f} MiB; max "
                             f"{max(x['rss_mb'] for x in after):.1f})",
                 "met": growth < RSS_GROWTH_BOUND})
    lib = {x["svcdisc_threads"] for x in after}
    rows.append({"bound": "library threads (svcdisc-*) after warm-up", "limit": "identical",
                 "measured": ", ".join(map(str, sorted(lib))), "met": len(lib) == 1})
    for what, values, tolerance in (
            ("all threads", [x["threads"] for x in after], THREAD_TOLERANCE),
            ("open fds beyond one per pooled engine host",
             [x["fds"] - x["pooled_hosts"] for x in after], FD_TOLERANCE)):
        spread = max(values) - min(values)
        rows.append({"bound": f"{what} after warm-up, max - min", "limit": f"<= {tolerance}",
                     "measured": f"{spread} ({min(values)}..{max(values)}; first "
                                 f"{values[0]}, last {values[-1]})",
                     "met": spread <= tolerance})
    excess = max(x["pool_excess"] for x in after)
    rows.append({"bound": "pooled engine hosts above the pods a poller tracks (ready + departed "
                          "within the blip window; the prober: its workers), after warm-up",
                 "limit": f"<= {POOL_SLACK}",
                 "measured": f"{excess} (pooled {min(x['pooled_hosts'] for x in after)}.."
                             f"{max(x['pooled_hosts'] for x in after)})",
                 "met": excess <= POOL_SLACK})
    rows.append({"bound": "endpoint set converges to the simulator's truth after the faults",
                 "limit": "exact within 30 s",
                 "measured": (f"yes, in {end['converge_s']} s" if end["converged"]
                              else f"no: {end['mismatch']}"), "met": end["converged"]})
    rows.append({"bound": "nothing escaped get_*(), no crash logged, informers alive",
                 "limit": "0 / 0 / yes",
                 "measured": f"{read_errors} / {len(end['crash_logs'])} / "
                             f"{'yes' if end['informers_alive_at_end'] else 'no'}",
                 "met": not read_errors and not end["crash_logs"]
                 and end["informers_alive_at_end"] and not driver_errors})
    rows.append({"bound": "close() of discovery + scraper", "limit": "< 4 s (2 s each)",
                 "measured": f"{end['close_s']} s", "met": end["close_s"] < 4.0})
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# Soak benchmark ({meta['date']})", "",
           f"Machine: {meta['cpus']} cores, Python {meta['python']}, {meta['platform']}. "
           f"{meta['services']} headless Services x {REPLICAS} pods (engines in the farm "
           f"process), {meta['duration_s']:g} s of churn every {meta['churn_interval_s']:g} s "
           f"and a fault every {meta['fault_interval_s']:g} s; warm-up {meta['warmup_s']:g} s. "
           f"Informer: {meta['informer']}. Probes: {meta['probe']}. Scraper: interval "
           f"{SCRAPE_INTERVAL:g} s, timeout {SCRAPE_TIMEOUT:g} s.", "",
           "## Bounds", "", "| bound | limit | measured | met |", "|---|---|---|---|"]
    out += [f"| {r['bound']} | {r['limit']} | {r['measured']} | {'yes' if r['met'] else 'NO'} |"
            for r in results["bounds"]]
    out += ["", f"Churn steps: {results['churn']}. Faults: {results['faults']}. "
            f"Library log records: {results['end']['log_records']}. "
            f"get_*() reads during the run: {results['reads']}.", "",
            "## Over time", "",
            "| t s | threads (svcdisc) | fds (pooled hosts) | RSS MiB | Services / routable | "
            "pod infos | cache slices / probes | informer keys | prober targets | "
            "scraper pods / readings | API history | log records |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    samples = results["samples"]
    step = max(1, len(samples) // 20)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    for x in shown:
        out.append(f"| {x['t']} | {x['threads']} ({x['svcdisc_threads']}) | {x['fds']} "
                   f"({x['pooled_hosts']}) | "
                   f"{x['rss_mb']} | {x['services']} / {x['routable']} | {x['pod_infos']} | "
                   f"{x['cache_slices']} / {x['cache_probes']} | {x['informer_known']} | "
                   f"{x['prober_targets']} | {x['scraper_pods']} / {x['scraper_readings']} | "
                   f"{x['api_history']} | {x['log_records']} |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Discovery soak (simulated cluster)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--warmup", type=float, help="seconds (default 30 %%, 20 to 120)")
    parser.add_argument("--sample-every", type=float, help="seconds (default duration / 60)")
    parser.add_argument("--churn-interval", type=float, default=0.1)
    parser.add_argument("--fault-interval", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--farm-port", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(120.0, max(20.0, 0.3 * args.duration))
    if args.sample_every is None:
        args.sample_every = max(1.0, args.duration / 60)
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the soak, write the results, return them (``results["ok"]``: all bounds met)."""
    args = parse_args(argv)
    soak = Soak(args)
    end = soak.run()
    bounds = evaluate(soak.samples, args.warmup, end, soak.read_errors, soak.errors)
    results: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                 "cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(terse=True), "services": args.services,
                 "duration_s": args.duration, "warmup_s": args.warmup,
                 "churn_interval_s": args.churn_interval,
                 "fault_interval_s": args.fault_interval, "informer": repr(INFORMER),
                 "probe": repr(PROBE), "thread_tolerance": THREAD_TOLERANCE,
                 "fd_tolerance": FD_TOLERANCE, "pool_slack": POOL_SLACK,
                 "rss_growth_bound": RSS_GROWTH_BOUND},
        "bounds": bounds, "ok": all(r["met"] for r in bounds), "end": end,
        "churn": soak.churn_counts, "faults": soak.fault_counts, "reads": soak.reads,
        "read_errors": soak.read_errors, "driver_errors": soak.errors[:20],
        "samples": soak.samples,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output_dir / "soak.md").write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    results = run(argv)
    sys.stdout.write(markdown(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
