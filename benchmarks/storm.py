"""API failure modes and a fault storm, on the simulated cluster: ``python benchmarks/storm.py``.

For each way a real API server or proxy fails (watches ending at once, in-stream ERROR events,
HTTP 500, 429 with Retry-After, an unreachable server, 410 on every watch, silent streams) it
measures, with one K8sServiceDiscovery on the client-go default backoff: API requests per
second per informer while the fault lasts, when health turned false, and the seconds from the
fault's end until discovery is converged (the routable Services, the ready pods and the selected
Services equal the simulator's truth, and health is true).  Then the storm: watch cuts every
300 ms, three API server restarts with compaction, bursts of 500s and of 429s with Retry-After
and a malformed line, while Services and pods churn; reported: seconds from the last fault to
converged.  Then outages of each kind (unreachable, every request 500, every request 429, a
restart with its watch history compacted) for each length (``--outage-seconds``, default 10,
30 and 120 s), with Services created, deleted and scaled while the API is out: seconds from the
server being back to converged (no ghost, nothing missing, every routable Service's models
right, health true), and the API request rate during the outage, list/watch and ``/readyz``
separately.  Writes ``benchmarks/results/storm.json`` and ``storm.md`` (also printed).  Targets
are reported, never enforced: the exit code is 0 unless the run itself broke.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client as k8s_client

from benchmarks._common import PROBE, progress
from vllm_router_svcdisc.discovery import K8sServiceDiscovery, keepalive_socket_options
from vllm_router_svcdisc.informer import InformerConfig
from vllm_router_svcdisc.sim.cluster import SimCluster

RESULTS = Path(__file__).resolve().parent / "results"
RATE_TARGET = 5.0  # API requests per second per informer, in any failure mode
CONVERGE_TARGET = 3.0  # seconds from the end of a fault (or storm) to converged
POLL = 0.02

#: mode name -> how to start the fault (for `seconds`), and whether health should turn false
Fault = Callable[[SimCluster, float], None]


def _empty(c: SimCluster, s: float) -> None:
    c.api.fail_for(s, how="empty")
    c.api.cut_watches()


def _error_event(c: SimCluster, s: float) -> None:
    c.api.fail_for(s, 500, how="error-event")
    c.api.cut_watches()


def _http_500(c: SimCluster, s: float) -> None:
    c.api.fail_for(s, 500)
    c.api.cut_watches()


def _http_429(c: SimCluster, s: float) -> None:
    c.api.fail_for(s, 429, retry_after=2)
    c.api.cut_watches()


def _expired(c: SimCluster, s: float) -> None:
    c.api.fail_for(s, 410, verb="watch")
    c.api.cut_watches()


def _silent(c: SimCluster, s: float) -> None:
    c.api.fail_for(s, how="silent")
    c.api.silence_watches()


MODES: dict[str, tuple[str, Fault, bool]] = {
    "empty": ("every watch ends at once, no event (200, clean end)", _empty, True),
    "error_event": ("every watch answers 200, then an ERROR event (500)", _error_event, True),
    "http_500": ("every request answers HTTP 500", _http_500, True),
    "http_429": ("every request answers 429, Retry-After: 2", _http_429, True),
    "unreachable": ("API server stopped (connection refused)", lambda c, s: None, True),
    "expired": ("every watch answers 410 Expired (re-LIST works)", _expired, False),
    "silent": ("watches go silent: headers, then no byte, connection open", _silent, True),
}


ANSWERED = ("empty", "error_event", "expired", "silent")
REFUSED = ("http_500", "http_429", "unreachable")


def truth(cluster: SimCluster) -> tuple[list[str], list[str], set[str]]:
    """(routable Service URLs, ready pod URLs, selected Service keys) as the cluster has them."""
    services = [s for s in cluster.services() if s.labels.get("app") == "vllm"]
    return (sorted(cluster.url_of(s.name) for s in services if s.ready_pods()),
            sorted(f"http://{p.ip}:{cluster.engine_port}" for s in services
                   for p in s.ready_pods()),
            {s.key for s in services})


def model_truth(cluster: SimCluster) -> dict[str, list[str]]:
    """The model each routable Service's pods serve, by Service URL."""
    return {cluster.url_of(s.name): [s.model] for s in cluster.services()
            if s.labels.get("app") == "vllm" and s.ready_pods()}


def converged(discovery: K8sServiceDiscovery, cluster: SimCluster) -> bool:
    """No ghost, nothing missing, every routable Service's models right, health true."""
    snapshot = discovery.get_snapshot()
    seen = (sorted(e.url for e in snapshot.endpoint_infos),
            sorted(e.url for e in snapshot.pod_infos), set(snapshot.services))
    if seen != truth(cluster) or not discovery.get_health():
        return False
    models = {e.url: sorted(e.model_names) for e in snapshot.endpoint_infos}
    return models == model_truth(cluster)


def wait_converged(discovery: K8sServiceDiscovery, cluster: SimCluster,
                   timeout: float) -> float | None:
    """Seconds until converged (polled every 20 ms), None if not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if converged(discovery, cluster):
            return round(time.monotonic() - started, 2)
        time.sleep(POLL)
    return None


def requests_per_informer(discovery: K8sServiceDiscovery) -> list[int]:
    return [s.requests for s in discovery.informer_status()]


def run_mode(name: str, discovery: K8sServiceDiscovery, cluster: SimCluster,
             seconds: float, unhealthy_after: float, liveness: float) -> dict[str, Any]:
    """One failure mode for ``seconds``: request rate, health, then time to converge."""
    what, start_fault, expect_unhealthy = MODES[name]
    if name == "silent":  # each silent watch costs a liveness window: see at least two
        seconds = max(seconds, 2 * liveness + 1)
    if wait_converged(discovery, cluster, 30) is None:
        raise RuntimeError(f"not converged before {name}")
    before = requests_per_informer(discovery)
    silent_before = [s.silent_watches for s in discovery.informer_status()]
    started = time.monotonic()
    if name == "unreachable":
        cluster.api.stop()
    else:
        start_fault(cluster, seconds)
    unhealthy_at: float | None = None
    noticed: list[float | None] = [None, None]
    changed = False
    while time.monotonic() - started < seconds:
        elapsed = time.monotonic() - started
        if not changed and elapsed >= 0.5 and name != "unreachable":
            cluster.add_service(f"made-during-{name}", replicas=1)  # must arrive after
            changed = True
        if unhealthy_at is None and not discovery.get_health():
            unhealthy_at = round(elapsed, 2)
        for i, status in enumerate(discovery.informer_status()):
            if noticed[i] is None and status.silent_watches > silent_before[i]:
                noticed[i] = round(elapsed, 2)
        time.sleep(POLL)
    if name == "unreachable":
        cluster.api.start()
        cluster.add_service(f"made-during-{name}", replicas=1)
    cluster.api.clear_faults()
    ended = time.monotonic()
    during = [a - b for a, b in zip(requests_per_informer(discovery), before, strict=True)]
    recovered = wait_converged(discovery, cluster, 60)
    result: dict[str, Any] = {
        "fault": what, "seconds": seconds,
        "requests_per_informer": during,
        "rate_per_informer": round(max(during) / (ended - started), 2),
        "health_false_after_s": unhealthy_at, "expect_unhealthy": expect_unhealthy,
        "unhealthy_after_s": unhealthy_after,
        "converged_after_end_s": recovered,
    }
    if name == "silent":
        result["silent_noticed_s"] = noticed
    return result


#: outage kind -> what it is (the fault is applied by ``run_outage``)
OUTAGES: dict[str, str] = {
    "unreachable": "API server stopped (connection refused), then started again",
    "http_500": "every request (list, watch, /readyz) answers 500",
    "http_429": "every request answers 429, Retry-After: 2",
    "restart": "API server down, then restarted with its watch history compacted "
               "(watches from old RVs get 410: re-LIST)",
}


def api_counts(discovery: K8sServiceDiscovery) -> tuple[int, int, int]:
    """(list/watch requests of both informers, /readyz checks, recovery wake-ups)."""
    statuses = discovery.informer_status()
    return (sum(s.requests for s in statuses), max(s.recovery_checks for s in statuses),
            sum(s.recovery_wakeups for s in statuses))


def run_outage(kind: str, discovery: K8sServiceDiscovery, cluster: SimCluster,
               seconds: float, index: int) -> dict[str, Any]:
    """One outage of ``kind`` for ``seconds`` while the cluster changes; then time to converge.

    During the outage a Service with a new model is created, one made for the purpose is
    deleted (a ghost unless a re-LIST or the replayed watch removes it) and a pod of another
    goes away: all three must be right afterwards.
    """
    doomed = f"doomed-{index}"
    cluster.add_service(doomed, replicas=1)
    if wait_converged(discovery, cluster, 30) is None:
        raise RuntimeError(f"not converged before the {kind} outage")
    before = api_counts(discovery)
    readyz_before = cluster.api.request_counts().get(("get", "readyz"), 0)
    started = time.monotonic()
    if kind in ("unreachable", "restart"):
        cluster.api.stop()
    elif kind == "http_500":
        cluster.api.fail_for(seconds, 500)
        cluster.api.cut_watches()
    elif kind == "http_429":
        cluster.api.fail_for(seconds, 429, retry_after=2)
        cluster.api.cut_watches()
    else:
        raise ValueError(f"unknown outage kind {kind!r}")
    cluster.add_service(f"made-in-{index}", replicas=1, model=f"model-{index}")
    cluster.delete_service(doomed)
    live = [p for p in cluster.pods("vllm-c") if not p.terminating]
    cluster.scale("vllm-c", 1 if len(live) > 1 else 2)
    unhealthy_at: float | None = None
    for _ in range(int(seconds / POLL) + 2):
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            break
        if unhealthy_at is None and not discovery.get_health():
            unhealthy_at = round(elapsed, 2)
        time.sleep(min(POLL, max(0.0, seconds - elapsed)))
    if kind == "restart":
        cluster.api.compact()
    if kind in ("unreachable", "restart"):
        cluster.api.start()
    else:
        cluster.api.clear_faults()
    ended = time.monotonic()
    after = api_counts(discovery)
    lasted = ended - started
    list_watch, checks, _ = (a - b for a, b in zip(after, before, strict=True))
    readyz_served = cluster.api.request_counts().get(("get", "readyz"), 0) - readyz_before
    recovered = wait_converged(discovery, cluster, 90)
    wakeups = api_counts(discovery)[2] - before[2]
    return {"kind": kind, "fault": OUTAGES[kind], "seconds": seconds,
            "lasted_s": round(lasted, 2),
            "list_watch_requests": list_watch,
            "list_watch_per_s": round(list_watch / lasted, 2),
            "readyz_requests": checks, "readyz_per_s": round(checks / lasted, 2),
            "readyz_answered_by_server": readyz_served,
            "wakeups": wakeups, "health_false_after_s": unhealthy_at,
            "converged_after_end_s": recovered}


class Churn:
    """Services and pods change while the storm rages (seeded, bounded)."""

    def __init__(self, cluster: SimCluster, seed: int = 7) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.steps = 0

    def step(self) -> None:
        c = self.cluster
        kind = self.steps % 4
        self.steps += 1
        if kind == 0:
            pod = self.rng.choice(c.pods("vllm-a"))
            c.set_ready(pod, not pod.ready)
        elif kind == 1:
            name = f"vllm-x{self.steps % 3}"
            if any(s.name == name for s in c.services()):
                c.delete_service(name)
            else:
                c.add_service(name, replicas=1)
        elif kind == 2:
            c.reschedule(self.rng.choice(c.pods("vllm-b")))
        else:
            live = [p for p in c.pods("vllm-c") if not p.terminating]
            c.scale("vllm-c", 1 + len(live) % 3)


def run_storm(discovery: K8sServiceDiscovery, cluster: SimCluster,
              seconds: float) -> dict[str, Any]:
    """Watch cuts every 300 ms, 3 restarts + compaction, 500 and 429 bursts, a malformed line.

    The last fault is the last cut (bursts end before it); churn stops with the storm.
    """
    if wait_converged(discovery, cluster, 30) is None:
        raise RuntimeError("not converged before the storm")
    churn = Churn(cluster)
    before = requests_per_informer(discovery)
    restarts = {round(seconds * f, 1) for f in (0.2, 0.5, 0.8)}
    errors = {round(seconds * f, 1) for f in (0.3, 0.65)}
    throttles = {round(seconds * f, 1) for f in (0.4, 0.75)}
    junk_at = round(seconds * 0.55, 1)
    started = time.monotonic()
    last_fault = started
    done: set[float] = set()
    counts = {"cuts": 0, "restarts": 0, "500 bursts": 0, "429 bursts": 0, "malformed": 0,
              "churn": 0}
    for _ in range(int(seconds / 0.3) + 1):
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            break
        due = [t for t in (restarts | errors | throttles | {junk_at})
               if t <= elapsed and t not in done]
        for t in sorted(due):
            done.add(t)
            if t in restarts:
                cluster.api.restart()
                cluster.api.compact()
                counts["restarts"] += 1
            if t in errors:  # every request answers 500 for a second
                cluster.api.fail_for(1.0, 500)
                counts["500 bursts"] += 1
            if t in throttles:  # and 429 with Retry-After for a second
                cluster.api.fail_for(1.0, 429, retry_after=1)
                counts["429 bursts"] += 1
            if t == junk_at:
                cluster.api.inject_raw_line(b'{"type": "MODIFIED", "object": {broken')
                counts["malformed"] += 1
        churn.step()
        counts["churn"] += 1
        cluster.api.cut_watches()
        counts["cuts"] += 1
        last_fault = time.monotonic()
        time.sleep(0.3)
    during = [a - b for a, b in zip(requests_per_informer(discovery), before, strict=True)]
    storm_s = last_fault - started
    waiting_from = time.monotonic()
    recovered = wait_converged(discovery, cluster, 60)
    since_last = None if recovered is None else round(waiting_from + recovered - last_fault, 2)
    return {"seconds": round(storm_s, 1), "faults": counts,
            "requests_per_informer": during,
            "rate_per_informer": round(max(during) / max(storm_s, 0.1), 2),
            "converged_after_last_fault_s": since_last}


def outage_targets(outages: list[dict[str, Any]], interval: float) -> list[dict[str, Any]]:
    """Converged <= 3 s after every outage; /readyz at most one check per interval."""
    if not outages:
        return []
    late = [o for o in outages
            if o["converged_after_end_s"] is None or o["converged_after_end_s"] > CONVERGE_TARGET]
    worst = max(outages, key=lambda o: o["converged_after_end_s"]
                if o["converged_after_end_s"] is not None else float("inf"))
    readyz = max(o["readyz_per_s"] for o in outages)
    limit = 1.0 / interval if interval > 0 else 0.0
    return [
        {"target": "every outage kind and length: server back -> converged (no ghost, none "
                   "missing, models right, healthy)",
         "goal": f"<= {CONVERGE_TARGET:g} s",
         "measured": f"worst {worst['converged_after_end_s']} s ({worst['kind']}, "
                     f"{worst['seconds']:g} s)" + (
                         "; over: " + ", ".join(f"{o['kind']} {o['seconds']:g} s "
                                                f"{o['converged_after_end_s']} s" for o in late)
                         if late else ""),
         "met": not late},
        {"target": "/readyz checks per second per API client during an outage",
         "goal": f"<= {limit:g}" if interval > 0 else "0 (recovery checks off)",
         "measured": f"max {readyz}",
         "met": readyz <= limit + 0.05},
    ]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = outage_targets(results.get("outages", []),
                                                results["meta"]["recovery_check_interval_s"])
    modes = results["modes"]
    storm = results["storm"]
    if modes:
        worst = max(modes.items(), key=lambda kv: kv[1]["rate_per_informer"])
        rows.append({"target": "API requests/s per informer, every failure mode and the storm",
                     "goal": f"<= {RATE_TARGET:g}",
                     "measured": f"max {worst[1]['rate_per_informer']} ({worst[0]}); storm "
                                 f"{storm['rate_per_informer']}",
                     "met": worst[1]["rate_per_informer"] <= RATE_TARGET
                     and storm["rate_per_informer"] <= RATE_TARGET})
    after = storm["converged_after_last_fault_s"]
    rows.append({"target": "storm: last fault -> converged (no ghost, none missing, healthy)",
                 "goal": f"<= {CONVERGE_TARGET:g} s", "measured": f"{after} s",
                 "met": after is not None and after <= CONVERGE_TARGET})
    for label, names in (("server answered, stream broke", ANSWERED),
                         ("unreachable or HTTP errors (exponential backoff)", REFUSED)):
        late = {k: m["converged_after_end_s"] for k, m in modes.items() if k in names}
        if late:
            rows.append({"target": f"{label}: fault ends -> converged",
                         "goal": f"<= {CONVERGE_TARGET:g} s",
                         "measured": ", ".join(f"{k} {v} s" for k, v in late.items()),
                         "met": all(v is not None and v <= CONVERGE_TARGET
                                    for v in late.values())})
    unhealthy_after = results["meta"]["unhealthy_after_s"]
    flagged = {k: m["health_false_after_s"] for k, m in modes.items() if m["expect_unhealthy"]}
    liveness = results["meta"]["liveness_s"]
    if not modes:
        return rows
    rows.append({"target": f"health false while failing (unhealthy_after {unhealthy_after:g} s;"
                           f" silent: once noticed, liveness {liveness:g} s)",
                 "goal": "<= unhealthy_after + 1 s (silent: max(liveness, unhealthy_after) "
                         "+ 1 s)",
                 "measured": ", ".join(f"{k} {v} s" for k, v in flagged.items()),
                 "met": all(v is not None and v <= (
                     max(liveness, unhealthy_after) if k == "silent" else unhealthy_after) + 1
                     for k, v in flagged.items())})
    routine = {k: m["health_false_after_s"] for k, m in modes.items() if not m["expect_unhealthy"]}
    rows.append({"target": "health stays true through routine expiry (410 -> re-LIST)",
                 "goal": "never false", "measured": ", ".join(
                     f"{k}: {'never false' if v is None else f'false after {v} s'}"
                     for k, v in routine.items()),
                 "met": all(v is None for v in routine.values())})
    silent = modes.get("silent")
    if silent:
        noticed = silent["silent_noticed_s"]
        window = results["meta"]["liveness_s"]
        rows.append({"target": f"silent stream noticed (liveness window {window:g} s here; "
                               "default 120 s)",
                     "goal": "<= window + 1 s",
                     "measured": f"{noticed} s (services, endpointslices); converged "
                                 f"{silent['converged_after_end_s']} s after the fault ended",
                     "met": all(n is not None and n <= window + 1 for n in noticed)})
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# API failure modes and storm recovery ({meta['mode']} run, {meta['date']})", "",
           f"Machine: {meta['cpus']} cores, Python {meta['python']}, {meta['platform']}. "
           f"Informer: {meta['informer']}; recovery checks every "
           f"{meta['recovery_check_interval_s']:g} s (0 = off); "
           f"unhealthy_after {meta['unhealthy_after_s']:g} s; "
           f"bookmarks every {meta['bookmark_interval_s']:g} s. Total {meta['total_s']} s.", "",
           "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    out += [f"| {r['target']} | {r['goal']} | {r['measured']} | {'yes' if r['met'] else 'NO'} |"
            for r in results["targets"]]
    if results["modes"]:
        out += ["", "## Failure modes", "",
                "| mode | fault | s | API req/s per informer (max) | requests (svc, eps) | "
                "health false after s | converged after end s |", "|---|---|---|---|---|---|---|"]
    for name, m in results["modes"].items():
        out.append(f"| {name} | {m['fault']} | {m['seconds']:g} | {m['rate_per_informer']} | "
                   f"{m['requests_per_informer']} | {m['health_false_after_s']} | "
                   f"{m['converged_after_end_s']} |")
    outages = results.get("outages", [])
    if outages:
        out += ["", "## Outages", "",
                "| kind | outage s | list/watch req/s (both informers) | /readyz req/s | "
                "wake-ups | health false after s | converged after the server is back s |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {o['kind']} | {o['seconds']:g} | {o['list_watch_per_s']} | "
                f"{o['readyz_per_s']} | {o['wakeups']} | {o['health_false_after_s']} | "
                f"{o['converged_after_end_s']} |" for o in outages]
    storm = results["storm"]
    out += ["", "## Storm", "",
            f"{storm['seconds']} s: {storm['faults']}. API requests per informer "
            f"{storm['requests_per_informer']} ({storm['rate_per_informer']}/s); converged "
            f"{storm['converged_after_last_fault_s']} s after the last fault.", ""]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="API failure modes and storm recovery")
    parser.add_argument("--quick", action="store_true", help="short run (about 40 s)")
    parser.add_argument("--mode-seconds", type=float, help="seconds per fault (10; quick 3)")
    parser.add_argument("--storm-seconds", type=float, help="storm length (30; quick 6)")
    parser.add_argument("--unhealthy-after", type=float, help="health threshold (5; quick 1)")
    parser.add_argument("--liveness", type=float, default=3.0,
                        help="watch liveness window for the run (default 3 s; shipped 120 s)")
    parser.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    parser.add_argument("--outage-seconds", type=float, nargs="*",
                        help="outage lengths (10 30 120; quick 3); none: no outage runs")
    parser.add_argument("--outage-kinds", nargs="*", choices=list(OUTAGES),
                        default=list(OUTAGES))
    parser.add_argument("--recovery-check-interval", type=float, default=1.0,
                        help="InformerConfig.recovery_check_interval (default 1 s; 0 = off, "
                             "the plain backoff)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.outage_seconds is None:
        args.outage_seconds = [3.0] if args.quick else [10.0, 30.0, 120.0]
    for name, full, quick in (("mode_seconds", 10.0, 3.0), ("storm_seconds", 30.0, 6.0),
                              ("unhealthy_after", 5.0, 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def api_client(cluster: SimCluster) -> Any:
    """An ApiClient configured as ``load_api_client()`` configures one (no urllib3 retries)."""
    configuration = k8s_client.Configuration()
    configuration.host = cluster.api.url
    configuration.retries = 0
    configuration.socket_options = keepalive_socket_options()
    return k8s_client.ApiClient(configuration)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # client-go's backoff and watch timeouts; only the liveness window is shortened.
    informer = InformerConfig(watch_liveness_timeout=args.liveness,
                              recovery_check_interval=args.recovery_check_interval)
    bookmark_interval = 1.0
    results: dict[str, Any] = {"meta": {
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "informer": f"InformerConfig(watch_liveness_timeout={args.liveness:g}), otherwise "
                    "the defaults (backoff 0.8 s x2 to 30 s, watch timeout 300-600 s)",
        "unhealthy_after_s": args.unhealthy_after, "liveness_s": args.liveness,
        "recovery_check_interval_s": args.recovery_check_interval,
        "bookmark_interval_s": bookmark_interval,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }, "modes": {}, "outages": []}
    exit_code = 0
    try:
        with SimCluster(bookmark_interval=bookmark_interval) as cluster:
            for name, replicas in (("vllm-a", 2), ("vllm-b", 2), ("vllm-c", 1)):
                cluster.add_service(name, replicas=replicas)
            discovery = K8sServiceDiscovery(
                namespace="default", label_selector="app=vllm",
                api_client=api_client(cluster), informer_config=informer, probe_config=PROBE,
                unhealthy_after=args.unhealthy_after)
            try:
                if not discovery.wait_until_synced(10):
                    raise RuntimeError("discovery never synced")
                for name in args.modes:
                    progress(f"{name}: {MODES[name][0]} for {args.mode_seconds:g} s")
                    result = run_mode(name, discovery, cluster, args.mode_seconds,
                                      args.unhealthy_after, args.liveness)
                    results["modes"][name] = result
                    progress(f"{name}: {result}")
                progress(f"storm: {args.storm_seconds:g} s")
                results["storm"] = run_storm(discovery, cluster, args.storm_seconds)
                progress(f"storm: {results['storm']}")
                index = 0
                for seconds in args.outage_seconds:
                    for kind in args.outage_kinds:
                        index += 1
                        progress(f"outage {kind} for {seconds:g} s")
                        outage = run_outage(kind, discovery, cluster, seconds, index)
                        results["outages"].append(outage)
                        progress(f"outage: {outage}")
            finally:
                discovery.close()
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except Exception as exc:  # report what ran
        exit_code = 1
        results["error"] = f"{exc.__class__.__name__}: {exc}"
        progress(results["error"])
    results["meta"]["total_s"] = round(time.monotonic() - started, 1)
    if "storm" in results:
        results["targets"] = targets(results)
    else:
        results["targets"] = []
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "storm.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results) if results["targets"] else json.dumps(results, indent=2)
    (args.output_dir / "storm.md").write_text(text)
    sys.stdout.write(text + "\n")
    return exit_code


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
