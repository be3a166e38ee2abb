"""CPU per model probe: the keep-alive pool (urllib3) against the one-shot connection
(http.client) the prober uses, side by side in one run.

The prober asks each pod once and engines close idle connections long before the next probe,
so every probe opens a connection to a host the pool has not seen: the pool manager's work
(a pool per host, the eviction of another) buys nothing.  Eight threads (the prober's workers)
probe every pod of the engine farm (a separate process) once per path and round, the paths
alternating so that drift hits both alike; each probe is the prober's whole ``GET
/v1/models`` with its parse.  CPU is this process's (``time.process_time``).  Writes
``results/probe_cpu.json`` and ``results/probe_cpu.md``.

    python benchmarks/probe_cpu.py [--pods 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import run_meta, write_results  # noqa: E402
from benchmarks.engine_farm import EngineFarm  # noqa: E402
from vllm_router_svcdisc.http import EnginePool  # noqa: E402
from vllm_router_svcdisc.probe import ProbeConfig, fetch_models  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORKERS = 8  # ProbeConfig().workers
PATHS = {"keep-alive pool (urllib3)": True, "one-shot connection (http.client)": False}


def probe_all(urls: list[str], keep_alive: bool) -> tuple[float, float, int]:
    """Every URL probed once by ``WORKERS`` threads: (CPU s, wall s, failures)."""
    pool = EnginePool(1, hosts=WORKERS, keep_alive=keep_alive)
    config = ProbeConfig()
    todo = iter(urls)
    lock = threading.Lock()
    failures = [0]

    def work() -> None:
        while True:
            with lock:
                url = next(todo, None)
            if url is None:
                return
            try:
                fetch_models(pool, url, None, config)
            except Exception:
                with lock:
                    failures[0] += 1

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    cpu, wall = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    pool.close()
    return cpu, wall, failures[0]


def measure(urls: list[str], rounds: int) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in PATHS}
    for turn in range(rounds):
        order = list(PATHS.items()) if turn % 2 == 0 else list(reversed(PATHS.items()))
        for name, keep_alive in order:
            runs[name].append(probe_all(urls, keep_alive))
    result: dict[str, Any] = {}
    for name, samples in runs.items():
        cpu, wall, _failed = min(samples)  # the least disturbed round
        result[name] = {"cpu_us_per_probe": round(cpu / len(urls) * 1e6),
                        "probes_per_s": round(len(urls) / wall),
                        "failures": sum(s[2] for s in samples)}
    pool_us, once_us = (result[name]["cpu_us_per_probe"] for name in PATHS)
    result["cpu_ratio"] = round(pool_us / once_us, 2) if once_us else None
    return result


def markdown(results: dict[str, Any]) -> str:
    meta, result = results["meta"], results["result"]
    lines = [f"# Probe CPU ({meta['date']})", "",
             f"`{results['command']}` — {meta['cpus']} cores, Python {meta['python']}; "
             f"{results['pods']} pods on the engine farm, {WORKERS} threads, best of "
             f"{results['rounds']} rounds per path.", "",
             "| path | CPU µs per probe | probes per second | failures |", "|---|---|---|---|"]
    for name in PATHS:
        r = result[name]
        lines.append(f"| {name} | {r['cpu_us_per_probe']} | {r['probes_per_s']} | "
                     f"{r['failures']} |")
    lines += ["", f"The pool costs {result['cpu_ratio']}x the CPU of the one-shot connection."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--farm-port", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with EngineFarm(port=args.farm_port, max_seconds=600.0) as farm:
        ips = [f"127.98.{i // 250}.{i % 250 + 1}" for i in range(args.pods)]
        for ip in ips:
            farm.up(ip, "meta-llama/Llama-3.1-8B-Instruct")
        urls = [f"http://{ip}:{farm.port}" for ip in ips]
        fetch_models(EnginePool(1), urls[-1], None, ProbeConfig())  # every "up" applied
        result = measure(urls, args.rounds)
    command = "python benchmarks/probe_cpu.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    results = {"meta": run_meta(args, "engine farm, one process of probes"),
               "command": command.strip(), "pods": args.pods, "rounds": args.rounds,
               "result": result}
    write_results(args.output_dir, "probe_cpu", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
