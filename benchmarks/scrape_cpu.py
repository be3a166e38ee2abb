"""CPU per healthy scrape: the previous path (requests + prometheus_client) against ours.

One process, one thread, engines in a separate process (``engine_farm.py``), so the CPU
measured is the scraper side's alone.  Both paths scrape the same pods round-robin over kept-
alive connections in the same run, alternating in rounds so that drift hits both alike:

* ``previous``: ``requests.Session.get`` (no retries, streamed, whole body read) and
  ``parse_metrics`` with prometheus_client's parser for every page;
* ``current``: ``http.fetch`` on urllib3 (deadline, size cap, no redirects) and
  ``parse_metrics`` with the fast path.

Then a cProfile of the current path says where its time goes, and the CPU of one liveness
check of discovery's (``GET /health``; ``GET /metrics`` read for progress only, as every
``progress_interval``).  Writes ``results/scrape_cpu.json`` and ``results/scrape_cpu.md``.

    python benchmarks/scrape_cpu.py [--pods 50] [--rounds 5] [--per-round 1000]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from benchmarks.engine_farm import EngineFarm  # noqa: E402
from vllm_router_svcdisc import vllm_metrics  # noqa: E402
from vllm_router_svcdisc.http import EnginePool, fetch  # noqa: E402
from vllm_router_svcdisc.scraper import MAX_METRICS_BYTES, parse_metrics_body  # noqa: E402
from vllm_router_svcdisc.vllm_metrics import parse_progress  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

Fetch = Callable[[str], bytes]


def previous_fetch() -> Fetch:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(max_retries=0))
    session.trust_env = False

    def get(url: str) -> bytes:
        with session.get(url, headers={"Accept-Encoding": "identity"}, timeout=2.0,
                         allow_redirects=False, stream=True) as response:
            return bytes(response.raw.read(MAX_METRICS_BYTES + 1, decode_content=False))

    return get


def current_fetch() -> Fetch:
    pool = EnginePool(2, hosts=1024)
    return lambda url: fetch(pool, url, timeout=2.0, max_bytes=MAX_METRICS_BYTES)[1]


def reference_parse(body: bytes) -> Any:
    """parse_metrics with the fast path switched off: prometheus_client reads every page."""
    fast = vllm_metrics._collect_fast
    vllm_metrics._collect_fast = lambda _text: None  # type: ignore[assignment]
    try:
        return parse_metrics_body(body)
    finally:
        vllm_metrics._collect_fast = fast  # type: ignore[assignment]


def cpu_us(work: Callable[[], None], count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        work()
    return (time.process_time() - started) / count * 1e6


def measure(urls: list[str], rounds: int, per_round: int) -> dict[str, Any]:
    paths = {"previous": (previous_fetch(), reference_parse),
             "current": (current_fetch(), parse_metrics_body)}
    bodies = {name: fetch_page(urls[0]) for name, (fetch_page, _parse) in paths.items()}
    assert bodies["previous"] == bodies["current"], "both paths must read the same page"
    body = bodies["current"]
    totals: dict[str, dict[str, list[float]]] = {n: {"fetch": [], "parse": []} for n in paths}
    for _ in range(rounds):
        for name, (fetch_page, parse) in paths.items():
            cursor = iter(range(10**9))

            def one_fetch(fetch_page: Fetch = fetch_page, cursor: Any = cursor) -> None:
                fetch_page(urls[next(cursor) % len(urls)])

            totals[name]["fetch"].append(cpu_us(one_fetch, per_round))
            totals[name]["parse"].append(cpu_us(lambda parse=parse: parse(body), per_round))
    result: dict[str, Any] = {"pods": len(urls), "page_bytes": len(body), "rounds": rounds,
                              "scrapes_per_round": per_round}
    for name, parts in totals.items():
        fetch_us = min(parts["fetch"])  # the least disturbed round of each
        parse_us = min(parts["parse"])
        result[name] = {"fetch_us": round(fetch_us, 1), "parse_us": round(parse_us, 1),
                        "total_us": round(fetch_us + parse_us, 1),
                        "scrapes_per_cpu_s": round(1e6 / (fetch_us + parse_us))}
    result["speedup"] = round(result["previous"]["total_us"] / result["current"]["total_us"], 2)
    return result


def liveness(urls: list[str], rounds: int, per_round: int) -> dict[str, Any]:
    """CPU per liveness check as ``liveness.py`` does it (one pool, short timeouts)."""
    pool = EnginePool(1, hosts=4096)
    bases = [url.rsplit("/", 1)[0] for url in urls]
    cursor = iter(range(10**9))

    def health() -> None:
        fetch(pool, bases[next(cursor) % len(bases)] + "/health", timeout=(0.5, 0.5),
              max_bytes=64 * 1024)

    def progress() -> None:
        _status, body = fetch(pool, bases[next(cursor) % len(bases)] + "/metrics",
                              timeout=(0.5, 0.5), max_bytes=MAX_METRICS_BYTES)
        parse_progress(body)

    health_us = min(cpu_us(health, per_round) for _ in range(rounds))
    progress_us = min(cpu_us(progress, per_round) for _ in range(rounds))
    return {"health_us": round(health_us, 1), "progress_us": round(progress_us, 1)}


_AREAS = (("vllm_metrics.py", "parsing (vllm_metrics.py)"),
          ("vllm_router_svcdisc/deadline.py", "deadline sockets (deadline.py)"),
          ("vllm_router_svcdisc/", "other library code (http.py, scraper.py)"),
          ("urllib3/", "urllib3"),
          ("http/client.py", "http.client + email (status line, headers)"),
          ("email/", "http.client + email (status line, headers)"),
          ("_socket.socket", "socket system calls"),
          ("select.", "socket system calls"))


def _area(filename: str, function: str) -> str:
    where = f"{filename}:{function}"
    return next((name for marker, name in _AREAS if marker in where),
                "builtins (regex and str methods, mostly the parser's)")


def profile(urls: list[str], count: int) -> dict[str, Any]:
    """Where the current path's CPU goes: by area and by function (own time)."""
    fetch_page = current_fetch()
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(count):
        parse_metrics_body(fetch_page(urls[i % len(urls)]))
    profiler.disable()
    entries = pstats.Stats(profiler, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values())
    areas: dict[str, float] = {}
    for (filename, _line, function), entry in entries.items():
        area = _area(filename, function)
        areas[area] = areas.get(area, 0.0) + entry[2]
    top = sorted(entries.items(), key=lambda item: -item[1][2])[:8]
    return {
        "areas": [{"area": name, "share": round(own / total, 3)}
                  for name, own in sorted(areas.items(), key=lambda item: -item[1])],
        "functions": [{"function": f"{filename.split('site-packages/')[-1]}:{line}({function})"
                       .split("/vllm_router_svcdisc/")[-1], "share": round(entry[2] / total, 3)}
                      for (filename, line, function), entry in top],
    }


def markdown(result: dict[str, Any], where: dict[str, Any], command: str) -> str:
    lines = [f"`{command}` — {result['pods']} pods on the engine farm, "
             f"{result['page_bytes']} byte page, best of {result['rounds']} rounds of "
             f"{result['scrapes_per_round']} scrapes per path.", "",
             "| path | fetch µs | parse µs | CPU µs per scrape | scrapes per CPU-second |",
             "|---|---|---|---|---|"]
    for name in ("previous", "current"):
        r = result[name]
        lines.append(f"| {name} | {r['fetch_us']} | {r['parse_us']} | {r['total_us']} | "
                     f"{r['scrapes_per_cpu_s']} |")
    lines += ["", f"Speed-up: {result['speedup']}x.", "",
              "Where the current path's CPU goes (cProfile own time, shares):", "",
              "| area | share |", "|---|---|"]
    lines += [f"| {r['area']} | {r['share']:.0%} |" for r in where["areas"]]
    lines += ["", "| top functions | share |", "|---|---|"]
    lines += [f"| `{r['function']}` | {r['share']:.1%} |" for r in where["functions"]]
    live = result.get("liveness")
    if live:
        lines += ["", "Discovery's liveness checks (CPU of the checking side):", "",
                  "| check | CPU µs |", "|---|---|",
                  f"| `GET /health` | {live['health_us']} |",
                  f"| `GET /metrics`, progress only (`parse_progress`) | "
                  f"{live['progress_us']} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--profile-scrapes", type=int, default=2000)
    parser.add_argument("--farm-port", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with EngineFarm(port=args.farm_port, max_seconds=600.0) as farm:
        ips = [f"127.99.{i // 200}.{i % 200 + 1}" for i in range(args.pods)]
        for ip in ips:
            farm.up(ip, "meta-llama/Llama-3.1-8B-Instruct")
        urls = [f"http://{ip}:{farm.port}/metrics" for ip in ips]
        current_fetch()(urls[-1])  # the farm has applied every "up" once this answers
        result = measure(urls, args.rounds, args.per_round)
        where = profile(urls, args.profile_scrapes)
        result["liveness"] = liveness(urls, args.rounds, args.per_round)
    command = "python benchmarks/scrape_cpu.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "scrape_cpu.json").write_text(
        json.dumps({"command": command.strip(), "result": result, "profile": where},
                   indent=2) + "\n")
    table = markdown(result, where, command.strip())
    (args.output_dir / "scrape_cpu.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
