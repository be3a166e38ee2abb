"""Per-pod request share through the Service VIP vs pod routing: ``python benchmarks/balance.py``.

On the simulated cluster, one ClusterIP Service with ``--replicas`` pods takes load from
keep-alive clients (``benchmarks._common.LoadGenerator``: each thread one pooled connection per
host, the next ``get_endpoint_info()`` entry per request, as a router does) in two arms run
one after the other with the same script: ``routing="service"`` (one entry, the Service URL:
kube-proxy, here the simulator's mini kube-proxy, picks a pod per *connection*) and
``routing="pod"`` (one entry per ready pod, from the same cache).  After a warm-up, a rolling
restart replaces every pod (terminated with a preStop sleep), and a measurement window counts
each ready pod's completions (counted by the engines themselves); then the Service scales up
and a second window counts again.  Writes ``benchmarks/results/balance.json`` and
``balance.md`` (also printed).  Figures are reported, never enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    INFORMER,
    PROBE,
    LoadGenerator,
    progress,
    routable_ips,
    run_meta,
    wait_or_raise,
    write_results,
)
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.sim.cluster import SimCluster, SimPod

SERVICE = "llama"
KEY = f"default/{SERVICE}"
MODES = ("service", "pod")
RESULTS = Path(__file__).resolve().parent / "results"


def _completions(pod: SimPod) -> int:
    return pod.engine.request_counts().get("/v1/completions", 0)


def _ready(cluster: SimCluster) -> list[SimPod]:
    return [p for p in cluster.pods(SERVICE) if p.ready and not p.terminating]


def measure_window(cluster: SimCluster, seconds: float) -> dict[str, Any]:
    """Completions each ready pod served during ``seconds``, and how even that is."""
    pods = _ready(cluster)
    before = {p.name: _completions(p) for p in pods}
    time.sleep(seconds)
    counts = sorted((_completions(p) - before[p.name] for p in pods), reverse=True)
    total = sum(counts)
    fair = total / len(counts) if counts else 0.0
    return {"ready_pods": len(counts), "requests": total,
            "share_pct": [round(100 * c / total, 1) if total else 0.0 for c in counts],
            "idle_pods": sum(1 for c in counts if c == 0),
            "max_over_fair": round(counts[0] / fair, 2) if fair else None}


def rollout(cluster: SimCluster, discovery: K8sServiceDiscovery, args: argparse.Namespace) -> None:
    """Replace every pod in turn: terminate (preStop, then SIGTERM), replacement routable,
    old pod gone after preStop + grace."""
    for old in list(_ready(cluster)):
        cluster.terminate_pod(old, pre_stop=args.pre_stop)
        new = cluster.add_pod(SERVICE)
        wait_or_raise(lambda new=new: new.ip in routable_ips(discovery.get_snapshot(), KEY),
                      15.0, "the replacement to be routable")
        time.sleep(args.pre_stop + args.grace)
        cluster.finish_termination(old)


def run_arm(routing: str, args: argparse.Namespace) -> dict[str, Any]:
    with SimCluster() as cluster:
        cluster.add_service(SERVICE, replicas=args.replicas)
        discovery = K8sServiceDiscovery(namespace="default", label_selector="app=vllm",
                                        api_client=cluster.api_client(), routing=routing,
                                        informer_config=INFORMER, probe_config=PROBE)
        load: LoadGenerator | None = None
        try:
            wait_or_raise(
                lambda: len(routable_ips(discovery.get_snapshot(), KEY)) == args.replicas,
                20.0, "the Service to be routable")
            load = LoadGenerator(discovery, clients=args.clients, rate=args.rate,
                                 max_seconds=10 * args.window + 120).start()
            time.sleep(args.warmup)
            result: dict[str, Any] = {"routing": routing,
                                      "before": measure_window(cluster, args.window)}
            progress(f"{routing}: before {result['before']}")
            rollout(cluster, discovery, args)
            result["after_rollout"] = measure_window(cluster, args.window)
            progress(f"{routing}: after rollout {result['after_rollout']}")
            cluster.scale(SERVICE, args.scale_to)
            wait_or_raise(
                lambda: len(routable_ips(discovery.get_snapshot(), KEY)) == args.scale_to,
                15.0, "the scaled-up pods to be routable")
            result["after_scale_up"] = measure_window(cluster, args.window)
            progress(f"{routing}: after scale-up {result['after_scale_up']}")
            load.stop()
            result["load"] = load.result()
            return result
        finally:
            if load is not None:
                load.stop()
            discovery.close()


PHASES = (("before", "steady"), ("after_rollout", "after a rolling restart"),
          ("after_scale_up", "after a scale-up"))


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# Load balance: Service VIP vs pod routing ({meta['date']})", "",
           f"Machine: {meta['cpus']} cores, Python {meta['python']}. {meta['setup']}", "",
           "| phase | routing | ready pods | requests | per-pod share % (highest first) | "
           "idle ready pods | busiest ÷ fair share |", "|---|---|---|---|---|---|---|"]
    for key, label in PHASES:
        for routing in MODES:
            arm = results["arms"].get(routing, {})
            if "error" in arm:
                out.append(f"| {label} | {routing} | error: {arm['error']} | | | | |")
                continue
            w = arm[key]
            out.append(f"| {label} | {routing} | {w['ready_pods']} | {w['requests']} | "
                       f"{' / '.join(f'{s:g}' for s in w['share_pct'])} | {w['idle_pods']} | "
                       f"{w['max_over_fair']} |")
    out += ["", "| routing | sent | failed | failures by cause |", "|---|---|---|---|"]
    for routing in MODES:
        arm = results["arms"].get(routing, {})
        if "load" in arm:
            load = arm["load"]
            causes = ", ".join(f"{k} {v}" for k, v in load["failed_by_cause"].items()) or "-"
            out.append(f"| {routing} | {load['sent']} | {load['failed']} | {causes} |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-pod request share, Service VIP vs pods")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--scale-to", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4, help="keep-alive client threads")
    parser.add_argument("--rate", type=float, default=100.0, help="total requests/s")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--pre-stop", type=float, default=1.0,
                        help="preStop sleep of the rolled pods (seconds)")
    parser.add_argument("--grace", type=float, default=0.3,
                        help="seconds between SIGTERM and the pod exiting")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"meta": run_meta(args, (
        f"One ClusterIP Service, {args.replicas} pods (in-process engines, mini "
        f"kube-proxy balancing connections round-robin), {args.clients} keep-alive "
        f"client threads at {args.rate:g} req/s total; rolling restart with a "
        f"{args.pre_stop:g} s preStop; scale-up to {args.scale_to}; "
        f"{args.window:g} s per measurement window.")), "arms": {}}
    exit_code = 0
    for routing in MODES:
        progress(f"arm {routing}")
        try:
            results["arms"][routing] = run_arm(routing, args)
        except Exception as exc:  # report it, run the other arm
            exit_code = 1
            results["arms"][routing] = {"error": f"{exc.__class__.__name__}: {exc}"}
    write_results(args.output_dir, "balance", results, markdown(results))
    return exit_code


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
