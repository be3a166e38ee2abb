"""The scale step of ``benchmarks/churn.py``: discovery alone against a cluster in another process.

The cluster host (fake API server, pod objects, an engine farm answering as every pod) runs in
a spawned process and takes commands over a pipe: flip every pod of a Service not ready or
ready (one EndpointSlice write, as the endpointslice controller batches), ``stats``, ``stop``.
The measured process (the benchmark's main process) runs only ``K8sServiceDiscovery`` with the
library's defaults (model probes, liveness checks) and reads it through its public API.
``CLOCK_MONOTONIC`` is system-wide on Linux, so the host's change times and the measured
process's observation times are on one clock.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import ChangeClock, api_delta, progress, rss_mb, summarize, time_per_call
from benchmarks.engine_farm import EngineFarm

NAMESPACE = "default"


# -- the cluster host (spawned process) ---------------------------------------------------------


def _flip(cluster: Any, clock: ChangeClock, name: str, ready: bool) -> float:
    """Every pod of Service ``name`` ready / not ready in one slice write (the endpointslice
    controller batches); the ``time.monotonic()`` of the last EndpointSlice write."""
    with cluster._lock:
        service = cluster.service(name, NAMESPACE)
        for pod in list(service.pods.values()):
            pod.ready = ready
            cluster.api.put("pods", cluster._pod_object(pod))
        cluster._sync_endpoints(service)
    return clock.slices()


def scale_host(conn: Any, size: int, replicas: int, farm_port: int, max_seconds: float) -> None:
    """Cluster host: ``size`` headless Services x ``replicas`` pods, engines in a farm.

    Sends the API URL and every Service's pod IPs; then answers commands until ``"stop"``,
    pipe EOF or ``max_seconds``: ``("down"|"up", name)`` -> change time, ``("stats",)`` ->
    farm requests by path, API request counts, open watches.
    """
    from vllm_router_svcdisc.sim.cluster import SimCluster

    farm = EngineFarm(farm_port, max_seconds=max_seconds + 30).start()
    cluster = SimCluster(engine_port=farm.port, engine_factory=farm.engine_factory())
    try:
        cluster.start()
        clock = ChangeClock(cluster.api)
        t = time.monotonic()
        names = [f"x{size}-{i:05d}" for i in range(size)]
        for name in names:
            cluster.add_service(name, replicas=replicas, headless=True, port=farm.port)
        time.sleep(0.5)  # the farm learns the pod IPs
        conn.send({"api_url": cluster.api.url, "farm_port": farm.port,
                   "cluster_domain": cluster.cluster_domain,
                   "services": {n: [p.ip for p in cluster.pods(n)] for n in names},
                   "setup_s": round(time.monotonic() - t, 1), "host_rss_mb": rss_mb()})
        deadline = time.monotonic() + max_seconds
        for _ in range(10_000_000):
            left = deadline - time.monotonic()
            if left <= 0 or not conn.poll(left):
                break
            try:
                command = conn.recv()
            except EOFError:
                break
            verb = command[0]
            if verb in ("down", "up"):
                conn.send(_flip(cluster, clock, command[1], verb == "up"))
            elif verb == "stats":
                conn.send({"farm": farm.stats(),
                           "api": cluster.api.request_counts(),
                           "open_watches": {r: cluster.api.open_watch_count(r)
                                            for r in ("services", "endpointslices")},
                           "host_rss_mb": rss_mb()})
            else:
                break
    finally:
        cluster.stop()
        farm.stop()
        with contextlib.suppress(OSError):
            conn.close()


class Host:
    """The measured process's handle on the cluster host; one request at a time."""

    def __init__(self, size: int, replicas: int, farm_port: int, max_seconds: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, there = ctx.Pipe()
        self.proc = ctx.Process(target=scale_host, name="scale-cluster-host",
                                args=(there, size, replicas, farm_port, max_seconds))
        self.proc.start()
        there.close()
        self._lock = threading.Lock()

    def info(self, timeout: float) -> dict[str, Any]:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"scale: the cluster host did not come up within {timeout} s")
        info: dict[str, Any] = self.conn.recv()
        return info

    def call(self, *command: Any, timeout: float = 60.0) -> Any:
        with self._lock:
            self.conn.send(command)
            if not self.conn.poll(timeout):
                raise RuntimeError(f"scale: the cluster host did not answer {command[0]!r}")
            return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, BrokenPipeError):
            self.conn.send(("stop",))
        self.proc.join(60.0)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10.0)
        self.conn.close()


# -- the measured process -----------------------------------------------------------------------


def _listed(discovery: Any) -> set[str]:
    return {e.service_name for e in discovery.get_endpoint_info()}


def wait_listed(discovery: Any, name: str, listed: bool, since: float,
                timeout: float) -> float | None:
    """Seconds from ``since`` until ``name`` is (or is no longer) in ``get_endpoint_info()``.

    Checks each new snapshot (identity change, polled every 0.5 ms); None after ``timeout``.
    """
    last: Any = None
    deadline = since + timeout
    while time.monotonic() < deadline:
        snapshot = discovery.get_snapshot()
        if snapshot is not last:
            last = snapshot
            now = time.monotonic()
            if any(e.service_name == name for e in discovery.get_endpoint_info()) == listed:
                return max(0.0, now - since)
        time.sleep(0.0005)
    return None


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _farm_counts(stats: dict[str, Any]) -> dict[str, int]:
    farm = stats.get("farm") or {}
    counts: dict[str, int] = farm.get("by_path", {})
    return counts


def _tm_lines(stats: list[Any]) -> list[dict[str, Any]]:
    return [{"size_diff_kib": round(s.size_diff / 1024, 1), "count_diff": s.count_diff,
             "size_kib": round(s.size / 1024, 1), "count": s.count,
             "where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}"} for s in stats]


def _tm_alive(snapshot: Any) -> list[dict[str, Any]]:
    """The 25 biggest live allocation sites whose traceback passes through the library (a
    substring test: ``Snapshot.filter_traces`` runs fnmatch on every frame, far too slow at
    millions of traces)."""
    out: list[dict[str, Any]] = []
    for stat in snapshot.statistics("traceback"):
        frames = [f"{f.filename}:{f.lineno}" for f in stat.traceback]
        if any("vllm_router_svcdisc" in f for f in frames):
            out.append({"size_kib": round(stat.size / 1024, 1), "count": stat.count,
                        "traceback": frames[-8:]})
            if len(out) == 25:
                break
    return out


def run_scale(size: int, args: Any) -> dict[str, Any]:
    """Start-up, whole-Service flips down and back, steady churn with RSS sampled each minute."""
    from kubernetes import client as k8s_client

    from vllm_router_svcdisc.discovery import K8sServiceDiscovery
    from vllm_router_svcdisc.sim.dns import ServiceDNS

    replicas = args.scale_replicas
    pods = size * replicas
    result: dict[str, Any] = {"services": size, "pods": pods,
                              "setup": "cluster host (API server + pods + engine farm) in a "
                                       "spawned process; discovery with library defaults"}
    setup_limit = 120.0 + pods * 0.01
    lifetime = setup_limit + 3 * args.scale_timeout + args.steady_seconds + 4 * args.flips + 600
    host = Host(size, replicas, args.farm_port, lifetime)
    discovery: Any = None
    dns: Any = None
    try:
        info = host.info(setup_limit)
        services: dict[str, list[str]] = info["services"]
        names = list(services)
        result["cluster_setup_s"] = info["setup_s"]
        result["cluster_host_rss_mb"] = info["host_rss_mb"]
        progress(f"scale {size}: cluster host pid {host.proc.pid}, {pods} pods set up in "
                 f"{info['setup_s']} s (host RSS {info['host_rss_mb']} MiB)")
        # cluster DNS for headless Services: each name resolves to its pod IPs (static here)
        dns = ServiceDNS(info["cluster_domain"])
        for name, ips in services.items():
            dns.register(NAMESPACE, name, lambda ips=tuple(ips): ips)
        dns.install()
        # the client imports its API classes lazily (CoreV1Api alone is a 30 000-line module):
        # import them now, so "before discovery" holds what a router has imported anyway and
        # tracemalloc does not trace (and crawl through) the import
        for api_class in ("CoreV1Api", "DiscoveryV1Api", "ApiException"):
            getattr(k8s_client, api_class)
        configuration = k8s_client.Configuration()
        configuration.host = info["api_url"]
        api_client = k8s_client.ApiClient(configuration)
        stats0 = host.call("stats")
        tracing = bool(getattr(args, "tracemalloc", False))
        if tracing:
            import tracemalloc

            tracemalloc.start(25)
        gc.collect()
        rss_before = rss_mb()
        t0 = time.monotonic()
        discovery = K8sServiceDiscovery(namespace=NAMESPACE, label_selector="app=vllm",
                                        api_client=api_client, routing="service")
        synced = discovery.wait_until_synced(args.scale_timeout)
        result["sync_s"] = round(time.monotonic() - t0, 3) if synced else None
        result["rss_after_sync_mb"] = rss_mb()
        progress(f"scale {size}: synced {result['sync_s']} s")
        marks: list[tuple[float, int]] = []

        def routable_count() -> bool:
            n = len(discovery.get_endpoint_info())
            if not marks or n != marks[-1][1]:
                marks.append((round(time.monotonic() - t0, 2), n))
            return n == size

        routable = _wait(routable_count, args.scale_timeout)
        t_routable = time.monotonic()
        result["all_routable_s"] = round(t_routable - t0, 3) if routable else None
        result["routable_at_end_of_wait"] = len(discovery.get_endpoint_info())
        # how routable grew: (seconds, Services) at each 10 % step
        result["routable_curve"] = [m for i, m in enumerate(marks)
                                    if i == len(marks) - 1
                                    or m[1] * 10 // size != marks[i + 1][1] * 10 // size]
        result["rss_before_discovery_mb"] = rss_before
        result["rss_all_routable_mb"] = rss_all = rss_mb()
        result["bytes_per_pod_endpoint"] = round((rss_all - rss_before) * 1048576 / pods)
        stats1 = host.call("stats")
        result["engine_requests_until_routable"] = _farm_counts(stats1)
        result["library_probe_counts_at_routable"] = list(discovery.probe_counts())
        progress(f"scale {size}: all routable {result['all_routable_s']} s "
                 f"({result['routable_at_end_of_wait']}), RSS {rss_before} -> {rss_all} MiB "
                 f"({result['bytes_per_pod_endpoint']} B per pod endpoint)")
        # a Service is routable after one pod's probe; waiting for every pod's first probe
        # lets the flips measure a change and not start-up's tail (bounded: at 100 000 pods
        # the first round can outlast any budget, and the flips then run under that load)
        probed = _wait(lambda: len(discovery.get_pod_endpoint_info()) == pods,
                       getattr(args, "scale_probed_timeout", None) or args.scale_timeout)
        result["pods_probed_at_flips"] = len(discovery.get_pod_endpoint_info())
        if probed:  # what a pod endpoint costs once every pod's model list is held
            result["rss_all_probed_mb"] = rss_mb()
            result["bytes_per_pod_endpoint_all_probed"] = round(
                (result["rss_all_probed_mb"] - rss_before) * 1048576 / pods)
        result["all_pods_probed_s"] = round(time.monotonic() - t0, 3) if probed else None
        progress(f"scale {size}: every pod probed at {result['all_pods_probed_s']} s")

        # whole-Service flips: down, then back
        down: list[float] = []
        up: list[float] = []
        missed = {"down": 0, "up": 0}
        count = min(args.flips, size)
        for i in range(count):
            name = names[(i * 7919) % size]
            for command, listed, latencies in (("down", False, down), ("up", True, up)):
                at = host.call(command, name)
                latency = wait_listed(discovery, name, listed, at, args.flip_timeout)
                if latency is None:
                    missed[command] += 1
                else:
                    latencies.append(latency)
        result["flip_down_ms"] = {**summarize(down, 1000.0), "missed": missed["down"]}
        result["flip_up_ms"] = {**summarize(up, 1000.0), "missed": missed["up"]}
        result["flip_ms"] = result["flip_down_ms"]  # the name older reports used
        progress(f"scale {size}: flips down {result['flip_down_ms']}, back "
                 f"{result['flip_up_ms']}")
        result["get_endpoint_info_ns"] = time_per_call(discovery.get_endpoint_info,
                                                       batches=args.batches, per_batch=1000)

        result["steady"] = steady = run_steady(discovery, host, names, args, tracing)
        result["rss_end_mb"] = steady["rss_samples_mb"][-1]["rss_mb"]
        result["rss_growth_routable_to_end_mb"] = round(result["rss_end_mb"] - rss_all, 1)
        t_end = time.monotonic()  # the last Services were just flipped back: give them time
        result["all_routable_at_end"] = _wait(lambda: len(discovery.get_endpoint_info()) == size,
                                              args.flip_timeout)
        result["all_routable_at_end_after_s"] = round(time.monotonic() - t_end, 3)
        stats2 = host.call("stats")
        result["api_requests"] = api_delta(stats0["api"], stats2["api"])
        result["open_watches_end"] = stats2["open_watches"]
        result["engine_requests_total"] = _farm_counts(stats2)
        result["library_probe_counts_end"] = list(discovery.probe_counts())
        with contextlib.suppress(Exception):
            result["outlier_stats_end"] = {k: v for k, v in discovery.outlier_stats().items()
                                           if isinstance(v, int | float | str)}
        result["threads"] = threading.active_count()
        result["rss_peak_mb"] = rss_mb("VmHWM")
        return result
    finally:
        if discovery is not None:
            discovery.close()
        if dns is not None:
            dns.uninstall()
        host.close()
        if getattr(args, "tracemalloc", False):
            import tracemalloc

            tracemalloc.stop()


def run_steady(discovery: Any, host: Host, names: list[str], args: Any,
               tracing: bool) -> dict[str, Any]:
    """Steady churn: one Service down every ``--steady-flip-every`` s, back ``--steady-down-for``
    s later; RSS and the engines' request counts sampled every ``--rss-sample-interval`` s."""
    seconds = args.steady_seconds
    every = args.steady_flip_every
    hold = args.steady_down_for
    sample_every = args.rss_sample_interval
    out: dict[str, Any] = {"seconds": seconds, "flip_every_s": every, "down_for_s": hold}
    samples: list[dict[str, Any]] = []
    first_snapshot: Any = None
    pending: list[tuple[float, str]] = []  # (when to bring back, name)
    start = time.monotonic()
    stats = host.call("stats")
    base = _farm_counts(stats)
    previous = (start, base)
    next_flip, next_sample = start, start + sample_every
    turn = 0
    flips = 0
    pods = sum(1 for _ in names) * args.scale_replicas
    for _ in range(10_000_000):
        now = time.monotonic()
        if now - start >= seconds:
            break
        while pending and pending[0][0] <= now:
            host.call("up", pending.pop(0)[1])
        if now >= next_flip:
            name = names[(turn * 104729 + 17) % len(names)]
            turn += 1
            if all(name != n for _, n in pending):
                host.call("down", name)
                pending.append((now + hold, name))
                flips += 1
            next_flip += every
        if now >= next_sample:
            counts = _farm_counts(host.call("stats"))
            elapsed = now - previous[0]
            models = counts.get("/v1/models", 0) - previous[1].get("/v1/models", 0)
            samples.append({"t_s": round(now - start, 1), "rss_mb": rss_mb(),
                            "v1_models_per_s": round(models / elapsed, 1),
                            "requests_per_s_by_path": {
                                k: round((v - previous[1].get(k, 0)) / elapsed, 1)
                                for k, v in counts.items()}})
            progress(f"steady: {samples[-1]}")
            previous = (now, counts)
            next_sample += sample_every
            if tracing and first_snapshot is None:
                import tracemalloc

                first_snapshot = tracemalloc.take_snapshot()
        time.sleep(max(0.0, min(next_flip, next_sample, *(p[0] for p in pending)) -
                       time.monotonic()))
    for _, name in pending:
        host.call("up", name)
    end = time.monotonic()
    counts = _farm_counts(host.call("stats"))
    last = end - previous[0]
    samples.append({"t_s": round(end - start, 1), "rss_mb": rss_mb(), "final": True,
                    "requests_per_s_by_path": {
                        k: round((v - previous[1].get(k, 0)) / last, 1) if last > 0 else None
                        for k, v in counts.items()}})
    elapsed = end - start
    models = counts.get("/v1/models", 0) - base.get("/v1/models", 0)
    out["flips"] = flips
    out["rss_samples_mb"] = samples
    out["v1_models_per_s_total"] = round(models / elapsed, 1)
    out["v1_models_per_s_per_engine"] = round(models / elapsed / pods, 4) if pods else None
    out["requests_per_s_by_path"] = {k: round((v - base.get(k, 0)) / elapsed, 1)
                                     for k, v in counts.items()}
    out["requests_per_s_per_engine_by_path"] = {
        k: round((v - base.get(k, 0)) / elapsed / pods, 4) for k, v in counts.items()}
    timed = [s for s in samples if not s.get("final")]
    if timed:
        out["rss_growth_minute1_to_end_mb"] = round(samples[-1]["rss_mb"] - timed[0]["rss_mb"],
                                                    1)
    if tracing:
        import tracemalloc

        gc.collect()
        last = tracemalloc.take_snapshot()
        if first_snapshot is not None:
            out["tracemalloc_growth_minute1_to_end"] = _tm_lines(
                last.compare_to(first_snapshot, "lineno")[:25])
        out["tracemalloc_alive_end_library"] = _tm_alive(last)
        # (current, peak) traced, and tracemalloc's own memory: with the minute-1 snapshot
        # held, it is what makes RSS grow in a traced run, not the library
        out["tracemalloc_traced_mb"] = [round(v / 1048576, 1)
                                        for v in tracemalloc.get_traced_memory()]
        out["tracemalloc_own_mb"] = round(tracemalloc.get_tracemalloc_memory() / 1048576, 1)
    return out


# -- targets and report -------------------------------------------------------------------------


def scale_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals next to the largest size's figures."""
    scale = {int(k): v for k, v in results.get("scale", {}).items() if "error" not in v}
    rows: list[dict[str, Any]] = []
    if not scale:
        return rows
    big = max(scale)
    m = scale[big]
    routable = m.get("all_routable_s")
    rows.append({"target": f"scale: all {big} Services routable (informer sync included)",
                 "goal": "<= 10 s",
                 "measured": f"{routable} s (sync {m.get('sync_s')} s)" if routable is not None
                 else f"not within {results['meta']['args']['scale_timeout']} s "
                      f"({m.get('routable_at_end_of_wait')} routable)",
                 "met": routable is not None and routable <= 10})
    for key, label, goal in (("flip_down_ms", "pods not ready -> gone from "
                                              "get_endpoint_info()", 20),
                             ("flip_up_ms", "pods ready again -> listed again", 100)):
        s = m[key]
        rows.append({"target": f"scale: whole Service {label}, p99 at {big} Services",
                     "goal": f"<= {goal} ms",
                     "measured": f"p50 {s['p50']} / p99 {s['p99']} ms, missed {s['missed']}",
                     "met": s["p99"] is not None and s["p99"] <= goal and not s["missed"]})
    growth = m.get("rss_growth_routable_to_end_mb")
    rows.append({"target": f"scale: RSS growth, all routable -> end of run ({m['pods']} pods)",
                 "goal": "<= 300 MiB",
                 "measured": f"{growth} MiB (discovery's RSS at routable "
                             f"{round(m['rss_all_routable_mb'] - m['rss_before_discovery_mb'], 1)}"
                             f" MiB; {m['bytes_per_pod_endpoint']} B per pod endpoint"
                             + (f", {m['bytes_per_pod_endpoint_all_probed']} B once every pod "
                                "was probed" if "bytes_per_pod_endpoint_all_probed" in m else "")
                             + ")",
                 "met": growth is not None and growth <= 300})
    steady = m.get("steady", {})
    flat = steady.get("rss_growth_minute1_to_end_mb")
    if flat is not None:
        rows.append({"target": f"scale: RSS flat under steady churn (first sample -> end, "
                               f"{steady['seconds']:g} s)",
                     "goal": "no growth (<= 5 MiB)", "measured": f"{flat} MiB",
                     "met": flat <= 5})
    rate = steady.get("v1_models_per_s_total")
    if rate is not None:
        rows.append({"target": "scale: /v1/models requests to engines in steady churn",
                     "goal": "proportional to change (stated)",
                     "measured": f"{rate} /s total, {steady['v1_models_per_s_per_engine']} /s "
                                 f"per engine ({steady['flips']} Services flipped in "
                                 f"{steady['seconds']:g} s)",
                     "met": True})
    return rows


def scale_markdown(results: dict[str, Any], ms: Callable[[dict[str, Any]], str]) -> list[str]:
    scale = results.get("scale")
    if not scale:
        return []
    out = ["", "## Scale", "",
           "Headless Services x pods (slices split at 100). The API server, the pod objects "
           "and the engine farm run in a spawned host process; the measured process runs only "
           "`K8sServiceDiscovery(routing=\"service\")` with the library's defaults (model "
           "probes and liveness checks on), reading its public API. Flips: every pod of a "
           "Service not ready in one slice write, then ready again.", "",
           "| Services | pods | cluster setup s | informer sync s | all routable s | "
           "every pod probed s | down -> gone ms p50 / p99 / max (missed) | "
           "up -> listed ms p50 / p99 / max (missed) | get_endpoint_info ns | "
           "RSS before / routable / end MiB | B per pod endpoint | steady /v1/models per s "
           "(per engine) | all requests per s by path |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, m in scale.items():
        if "error" in m:
            out.append(f"| {size} | error: {m['error']} |" + " |" * 11)
            continue
        routable = (m["all_routable_s"] if m["all_routable_s"] is not None
                    else f"- ({m['routable_at_end_of_wait']} at timeout)")
        s = m["steady"]
        out.append(
            f"| {size} | {m['pods']} | {m['cluster_setup_s']} | {m['sync_s']} | {routable} | "
            f"{m.get('all_pods_probed_s')} | {ms(m['flip_down_ms'])} "
            f"({m['flip_down_ms']['missed']}) | {ms(m['flip_up_ms'])} "
            f"({m['flip_up_ms']['missed']}) | {m['get_endpoint_info_ns']} | "
            f"{m['rss_before_discovery_mb']} / {m['rss_all_routable_mb']} / {m['rss_end_mb']} | "
            f"{m['bytes_per_pod_endpoint']} | {s['v1_models_per_s_total']} "
            f"({s['v1_models_per_s_per_engine']}) | "
            + ", ".join(f"{k} {v}" for k, v in s["requests_per_s_by_path"].items()) + " |")
    for size, m in scale.items():
        if "error" in m:
            continue
        s = m["steady"]
        out += ["", f"{size} Services: routable over time (s, Services): "
                f"{m['routable_curve']}; RSS samples in steady churn (s: MiB): "
                + ", ".join(f"{x['t_s']}: {x['rss_mb']}" for x in s["rss_samples_mb"])
                + f"; API requests {m['api_requests'] or '-'}; open watches at the end "
                f"{m['open_watches_end']}; threads {m['threads']}; peak RSS {m['rss_peak_mb']} "
                "MiB." + (" tracemalloc on (RSS figures include its overhead)."
                          if "tracemalloc_alive_end_library" in s else "")]
        growth = s.get("tracemalloc_growth_minute1_to_end")
        if growth:
            out += ["", "tracemalloc growth, first sample -> end (top 10):", ""]
            out += [f"- {g['size_diff_kib']} KiB, {g['count_diff']:+d} blocks: {g['where']}"
                    for g in growth[:10]]
    return out
