"""production-stack's real router on the library, against the simulated cluster.

``python benchmarks/prodstack_check.py --router-src /path/to/production-stack/src``

Not part of the test suite: it needs production-stack's source (its ``src/`` directory, never
copied here) and its dependencies (FastAPI, uvicorn, aiohttp, ...) in the running interpreter.
For each ``--k8s-service-discovery-type`` a child process starts a simulated cluster (one
Service, ``--replicas`` pods), runs ``vllm-svcdisc-router`` (the unmodified
``vllm_router.app.main()``) on a loopback port, sends completions through the router from
keep-alive clients, scales the Service up and sends again, and reports how many each pod
served (counted by the engines), the router's ``/health`` and its ``vllm_svcdisc_*`` lines.
Writes ``benchmarks/results/prodstack_check.json`` and ``.md`` (also printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("pod-ip", "service-name")
MARK = "PRODSTACK_CHECK "
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _child(args: argparse.Namespace) -> int:
    import requests

    from vllm_router_svcdisc import prodstack
    from vllm_router_svcdisc.sim.cluster import SimCluster

    sys.path.insert(0, args.router_src)
    cluster = SimCluster().start()
    cluster.add_service("llama", replicas=args.replicas)
    prodstack.install(discovery_options={"api_client": cluster.api_client()})
    base = f"http://127.0.0.1:{args.port}"
    report: dict[str, Any] = {"mode": args.child}

    def svcdisc(session: requests.Session, name: str) -> float | None:
        for line in session.get(base + "/metrics", timeout=5).text.splitlines():
            if line.startswith(f"vllm_svcdisc_{name} "):
                return float(line.split()[1])
        return None

    def wait(predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.1)
        return False

    def served() -> dict[str, int]:
        return {p.ip: p.engine.request_counts().get("/v1/completions", 0)
                for p in cluster.pods("llama")}

    def burst() -> dict[str, Any]:
        before = served()
        codes: list[int] = []

        def client() -> None:
            with requests.Session() as session:
                session.trust_env = False
                for _ in range(args.requests // args.clients):
                    reply = session.post(base + "/v1/completions", timeout=10,
                                         json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
                    codes.append(reply.status_code)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        after = served()
        counts = sorted((after[ip] - before.get(ip, 0) for ip in after), reverse=True)
        return {"per_pod": counts, "non_200": sum(c != 200 for c in codes)}

    def drive() -> None:
        try:
            with requests.Session() as session:
                session.trust_env = False
                report["healthy"] = wait(
                    lambda: session.get(base + "/health", timeout=2).status_code == 200, 60)
                wait(lambda: svcdisc(session, "scraped_pods") == args.replicas, 30)
                time.sleep(args.settle)
                report["steady"] = burst()
                cluster.scale("llama", args.scale_to)
                wait(lambda: svcdisc(session, "ready_pods") == args.scale_to, 30)
                time.sleep(args.settle)
                report["after_scale_up"] = burst()
                report["svcdisc_lines"] = sum(
                    line.startswith("vllm_svcdisc_")
                    for line in session.get(base + "/metrics", timeout=5).text.splitlines())
        finally:
            sys.stdout.write(MARK + json.dumps(report) + "\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGINT)  # uvicorn's graceful shutdown

    threading.Thread(target=drive, daemon=True).start()
    code = prodstack.main(["--service-discovery", "k8s", "--k8s-service-discovery-type",
                           args.child, "--k8s-label-selector", "app=vllm", "--k8s-port", "80",
                           "--routing-logic", "roundrobin", "--engine-stats-interval", "1",
                           "--host", "127.0.0.1", "--port", str(args.port),
                           "--log-format", "json", "--log-level", "warning"])
    cluster.stop()
    return code


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# production-stack's router on vllm_router_svcdisc ({meta['date']})", "",
           meta["setup"], "",
           "| --k8s-service-discovery-type | /health | completions per pod, steady | "
           "after scale-up | non-200 | vllm_svcdisc_* lines on /metrics |",
           "|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        if "error" in r:
            out.append(f"| {mode} | error: {r['error']} | | | | |")
            continue
        out.append(f"| {mode} | {'200' if r.get('healthy') else 'not 200'} | "
                   f"{' / '.join(map(str, r['steady']['per_pod']))} | "
                   f"{' / '.join(map(str, r['after_scale_up']['per_pod']))} | "
                   f"{r['steady']['non_200'] + r['after_scale_up']['non_200']} | "
                   f"{r.get('svcdisc_lines')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router-src", required=True,
                        help="production-stack's src/ directory (holds vllm_router/)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--scale-to", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=120, help="per burst")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "setup": (f"One ClusterIP Service, {args.replicas} pods then {args.scale_to}; "
                  f"{args.clients} keep-alive clients send {args.requests} completions through "
                  "the router per burst (routing logic roundrobin)."),
    }, "modes": {}}
    for mode in MODES:
        child = subprocess.run([sys.executable, __file__, "--child", mode,
                                *(argv if argv is not None else sys.argv[1:])],
                               capture_output=True, text=True, timeout=300)
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith(MARK)]
        results["modes"][mode] = (json.loads(lines[-1][len(MARK):]) if lines else
                                  {"error": f"exit {child.returncode}: {child.stderr[-300:]}"})
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "prodstack_check.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.output_dir / "prodstack_check.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
