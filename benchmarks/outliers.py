"""Dead node, wedged, slow and crashed engines in pod routing: ``python benchmarks/outliers.py``.

On the simulated cluster, 3 Services x 4 pods (3 nodes, 4 pods each) take ``--rate`` requests/s
in pod routing (``K8sServiceDiscovery(routing="pod")``): a dispatcher picks the next URL of
``get_pod_endpoint_info()`` round-robin for every request, and a pool of worker threads sends
``POST /v1/completions`` through one shared keep-alive connection pool (urllib3, like a router's
client) with a client deadline (``--deadline``, 5 s, for the connect and for the answer).
The load is open-loop: a hung request does not hold the next ones back.  Each case runs in a
fresh cluster, once without the outlier policy (what Kubernetes alone gives) and once with it:

- *node*: ``kill_node`` of one node of three (its 4 pods stop answering at the network level;
  their endpoints stay ready for the node grace period, ``--grace``, 50 s by default like
  ``--node-monitor-grace-period``), revived ``--after-grace`` s after the grace period;
- *wedged*: one engine in ``wedged`` mode for ``--wedge-seconds`` (probes and /metrics 200,
  completions never finish, token counters frozen), then back to ``ok``;
- *slow*: one engine's ``/metrics`` answers only after ``--slow-seconds`` (20 s; completions
  still served), then back to ``ok``: it must not be ejected;
- *crash*: ``kill_pod(endpoint_delay=1.0)`` (connection refused until the endpoint goes), then a
  replacement pod.

Per case: requests failed or hung after the fault (by cause), how many went to the bad pods,
seconds until the last one did, seconds until the bad pods were out of the pod view, seconds to
re-admission after recovery, times the slow pod left the pod view (false ejections), the largest
share of a Service's ready pods missing from the pod view.  The policy is switched with one
argument (``outliers=OutlierConfig(enabled=...)``); a build without it runs the "without"
column only and reports "with" as n/a.  Writes ``benchmarks/results/outliers.json`` and
``outliers.md`` (also printed).  Figures are reported, never enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import itertools
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import urllib3

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import progress, run_meta, wait_or_raise, write_results
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.cluster import SimCluster, SimPod
from vllm_router_svcdisc.sim.engine import EngineMode

RESULTS = Path(__file__).resolve().parent / "results"
SERVICES = (("llama-a", "meta-llama/Llama-3.1-8B-Instruct"),
            ("qwen-b", "Qwen/Qwen2.5-7B-Instruct"),
            ("mistral-c", "mistralai/Mistral-7B-Instruct-v0.3"))
REPLICAS = 4
CASES = ("node", "wedged", "slow", "crash")
POLICIES = ("without", "with")
DEAD_NODE = "sim-node-1"
_SAMPLE = 0.02  # seconds between two samples of the pod view
_MAX_CHANGES = 200  # pod view changes of the bad pods kept in the results
_EJECTED_AFTER = 0.5  # a ready pod missing from the pod view this long counts as ejected
_BODY = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()


def outlier_config_class() -> Any:
    """The library's ``OutlierConfig`` if this build has the outlier policy, else None."""
    try:
        import vllm_router_svcdisc as library
    except ImportError:  # pragma: no cover - the library is always importable here
        return None
    found = getattr(library, "OutlierConfig", None)
    if found is None:
        with contextlib.suppress(ImportError):
            found = getattr(importlib.import_module("vllm_router_svcdisc.outliers"),
                            "OutlierConfig", None)
    return found


def policy_settings(config_class: Any) -> dict[str, Any]:
    """The policy's defaults, as its config object spells them (for the report)."""
    if config_class is None:
        return {}
    try:
        config = config_class()
    except Exception as exc:  # report it, never fail the benchmark on it
        return {"error": f"{exc.__class__.__name__}: {exc}"}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {k: _plain(v) for k, v in vars(config).items() if not k.startswith("_")}


def _plain(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool | type(None)) else repr(value)


def make_discovery(cluster: SimCluster, policy: str, config_class: Any) -> K8sServiceDiscovery:
    """Pod routing with library defaults; ``policy`` "with"/"without" is the one switch."""
    kwargs: dict[str, Any] = {"namespace": "default", "label_selector": "app=vllm",
                              "api_client": cluster.api_client(), "routing": "pod"}
    if config_class is not None:
        kwargs["outliers"] = config_class(enabled=policy == "with")
    return K8sServiceDiscovery(**kwargs)


def classify(exc: BaseException) -> str:
    """A failed request's cause: connect_timeout, read_timeout (hung to the deadline),
    refused, reset, or the exception's name.  (An answer that came after ``--late`` seconds
    is counted as ``late``: hung, then answered when the fault ended.)"""
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError too
        return "refused" if "refused" in str(exc).lower() else "connect_error"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "connect_timeout"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "read_timeout"
    if isinstance(exc, urllib3.exceptions.ProtocolError | ConnectionError):
        return "reset"
    return exc.__class__.__name__


def router_outcome(outcome: str) -> str | int | None:
    """What a router tells ``report_result`` about one of our outcomes (None: nothing)."""
    if outcome in ("ok", "late"):
        return "ok"  # answered (a late answer is slow, and slow alone is no failure)
    if outcome.startswith("http_"):
        return int(outcome[5:])
    return {"connect_timeout": "connect_timeout", "read_timeout": "timeout",
            "refused": "connect_error", "connect_error": "connect_error",
            "reset": "connect_error"}.get(outcome)


@dataclasses.dataclass
class Sent:
    """One request: when it was sent, to which pod URL, how it ended, how long it took."""

    at: float
    url: str
    outcome: str = "pending"
    seconds: float = 0.0


class PodLoad:
    """Open-loop load over the pod view: ``rate`` requests/s round-robin over
    ``get_pod_endpoint_info()``, sent by ``workers`` threads through one keep-alive pool.
    A request that finds every worker busy is recorded as ``client_saturated``.  When the
    discovery has ``report_result`` and ``report`` is set, each outcome is fed to it."""

    def __init__(self, discovery: K8sServiceDiscovery, *, rate: float, deadline: float,
                 workers: int, max_seconds: float, report: bool, late: float) -> None:
        self.discovery = discovery
        self.interval = 1.0 / rate
        self.deadline = deadline
        self.late = late
        self.max_seconds = max_seconds
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=16, block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=deadline, read=deadline))
        self.reporter: Callable[[str, str], None] | None = (
            getattr(discovery, "report_result", None) if report else None)
        self.records: list[Sent] = []
        self._queue: queue.Queue[Sent | None] = queue.Queue()
        self._busy = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._turn = itertools.count()
        self._workers = [threading.Thread(target=self._work, name=f"bench-worker-{i}",
                                          daemon=True) for i in range(workers)]
        self._dispatcher = threading.Thread(target=self._dispatch, name="bench-dispatch",
                                            daemon=True)

    def start(self) -> PodLoad:
        for thread in self._workers:
            thread.start()
        self._dispatcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._dispatcher.join(5.0)
        for _ in self._workers:
            self._queue.put(None)
        for thread in self._workers:
            thread.join(self.deadline * 2 + 5.0)
        self.pool.clear()

    def snapshot(self) -> list[Sent]:
        with self._lock:
            return list(self.records)

    def _record(self, sent: Sent) -> None:
        with self._lock:
            self.records.append(sent)

    def _dispatch(self) -> None:
        start = time.monotonic()
        next_send = start
        for _ in range(int(self.max_seconds / self.interval) + 1):
            delay = next_send - time.monotonic()
            if (delay > 0 and self._stop.wait(delay)) or self._stop.is_set():
                return
            next_send += self.interval
            now = time.monotonic()
            infos = self.discovery.get_pod_endpoint_info()
            if not infos:
                self._record(Sent(now, "", "no_endpoint"))
                continue
            sent = Sent(now, infos[next(self._turn) % len(infos)].url)
            with self._lock:
                if self._busy >= len(self._workers):
                    sent.outcome = "client_saturated"
                    self.records.append(sent)
                    continue
                self._busy += 1
                self.records.append(sent)
            self._queue.put(sent)

    def _work(self) -> None:
        for _ in range(10_000_000):
            sent = self._queue.get()
            if sent is None:
                return
            try:
                self._send(sent)
            finally:
                with self._lock:
                    self._busy -= 1

    def _send(self, sent: Sent) -> None:
        started = time.monotonic()
        try:
            reply = self.pool.request("POST", sent.url + "/v1/completions", body=_BODY,
                                      headers={"Content-Type": "application/json"})
            outcome = "ok" if reply.status == 200 else f"http_{reply.status}"
        except Exception as exc:
            outcome = classify(exc)
        sent.seconds = time.monotonic() - started
        if outcome == "ok" and sent.seconds > self.late:
            outcome = "late"
        sent.outcome = outcome
        if self.reporter is not None:
            report = router_outcome(outcome)
            if report is not None:
                with contextlib.suppress(Exception):
                    self.reporter(sent.url, report)


class ViewMonitor:
    """Samples the pod view every ``_SAMPLE`` s: when each watched URL left and came back, and
    the largest share of a Service's ready pods (Kubernetes' word: serving, not terminating)
    that are ejected: in state ``ejected`` where the Service's pods carry the policy's state,
    else missing from the pod view for ``_EJECTED_AFTER`` s or more (shorter gaps are a
    returning pod's first model probe, or two reads a publish apart)."""

    def __init__(self, discovery: K8sServiceDiscovery, max_seconds: float) -> None:
        self.discovery = discovery
        self.max_seconds = max_seconds
        self.watched: set[str] = set()
        self.changes: list[tuple[float, str, bool]] = []  # (time, url, now in the pod view)
        self.max_share = 0.0
        self.max_share_detail: dict[str, Any] = {}
        self._present: dict[str, bool] = {}
        self._missing_since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def start(self) -> ViewMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def watch(self, urls: Sequence[str]) -> None:
        with self._lock:
            self.watched.update(urls)

    def reset_share(self) -> None:
        with self._lock:
            self.max_share, self.max_share_detail = 0.0, {}

    def first_all(self, urls: Sequence[str], since: float, until: float,
                  present: bool) -> float | None:
        """The first time in [since, until] at which every URL was in (``present``) or out of
        the pod view; None if that never happened."""
        wanted = set(urls)
        with self._lock:
            changes = sorted((t, u, now) for t, u, now in self.changes if u in wanted)
        state: dict[str, bool] = {}

        def holds() -> bool:
            return len(state) == len(wanted) and all(v is present for v in state.values())

        later = 0
        for t, url, now in changes:  # the state at ``since``
            if t > since:
                break
            state[url] = now
            later += 1
        if holds():
            return since
        for t, url, now in changes[later:]:
            if t > until:
                break
            state[url] = now
            if holds():
                return t
        return None

    def changes_of(self, urls: Sequence[str], since: float,
                   until: float) -> list[tuple[float, str, bool]]:
        """(time, url, now in the pod view) changes of ``urls`` within [since, until]."""
        wanted = set(urls)
        with self._lock:
            return [c for c in self.changes if c[1] in wanted and since <= c[0] <= until]

    def exits(self, url: str, since: float, until: float) -> list[tuple[float, float]]:
        """(left, came back or ``until``) spans of ``url`` outside the pod view."""
        with self._lock:
            flips = [(t, now) for t, u, now in self.changes if u == url and since <= t <= until]
        spans: list[tuple[float, float]] = []
        left: float | None = None
        for t, now in flips:
            if not now and left is None:
                left = t
            elif now and left is not None:
                spans.append((left, t))
                left = None
        if left is not None:
            spans.append((left, until))
        return spans

    def _run(self) -> None:
        for _ in range(int(self.max_seconds / _SAMPLE) + 1):
            if self._stop.wait(_SAMPLE):
                return
            self.sample()

    def sample(self) -> None:
        now = time.monotonic()
        infos = self.discovery.get_pod_endpoint_info()
        listed = {info.url for info in infos}
        status = self.discovery.get_service_status()
        with self._lock:
            for url in self.watched:
                present = url in listed
                if self._present.get(url) is not present:
                    self._present[url] = present
                    self.changes.append((now, url, present))
            missing_now: set[str] = set()
            for key, view in status.items():
                ready = {p.url for p in view.pods if p.serving and not p.terminating}
                if not ready:
                    continue
                missing = ready - listed
                missing_now |= missing
                if any(hasattr(p, "state") for p in view.pods):  # the policy says which
                    ejected = [p.url for p in view.pods
                               if p.url in ready and getattr(p, "state", "") == "ejected"]
                else:
                    ejected = [u for u in missing
                               if now - self._missing_since.setdefault(u, now) >= _EJECTED_AFTER]
                share = len(ejected) / len(ready)
                if share > self.max_share:
                    self.max_share = share
                    self.max_share_detail = {"service": key, "ready": len(ready),
                                             "missing_from_pod_view": len(ejected)}
            for url in set(self._missing_since) - missing_now:
                del self._missing_since[url]


class Case:
    """One case in one column: a fresh cluster, discovery, load and monitor."""

    def __init__(self, name: str, policy: str, args: argparse.Namespace,
                 config_class: Any) -> None:
        self.name, self.policy, self.args = name, policy, args
        self.cluster = SimCluster(node_grace=args.grace)
        self.config_class = config_class
        self.discovery: K8sServiceDiscovery | None = None
        self.scraper: EngineStatsScraper | None = None
        self.load: PodLoad | None = None
        self.monitor: ViewMonitor | None = None

    def run(self) -> dict[str, Any]:
        args = self.args
        budget = (args.grace + args.after_grace + args.wedge_seconds + args.slow_seconds
                  + args.readmit_timeout + 300)
        with self.cluster:
            for service, model in SERVICES:
                self.cluster.add_service(service, replicas=REPLICAS, model=model)
            discovery = self.discovery = make_discovery(self.cluster, self.policy,
                                                        self.config_class)
            try:
                wait_or_raise(
                    lambda: len(discovery.get_pod_endpoint_info()) == len(SERVICES) * REPLICAS,
                    30.0, "every pod in the pod view")
                if args.scrape_interval > 0:
                    self.scraper = EngineStatsScraper(discovery,
                                                      scrape_interval=args.scrape_interval)
                self.monitor = ViewMonitor(discovery, budget).start()
                self.load = PodLoad(discovery, rate=args.rate, deadline=args.deadline,
                                    workers=args.workers, max_seconds=budget,
                                    report=args.report_results, late=args.late).start()
                time.sleep(args.warmup)
                self.monitor.reset_share()
                step: Callable[[], dict[str, Any]] = getattr(self, f"_{self.name}")
                return step()
            finally:
                if self.load is not None:
                    self.load.stop()
                if self.monitor is not None:
                    self.monitor.stop()
                if self.scraper is not None:
                    self.scraper.close()
                discovery.close()

    # -- the cases -------------------------------------------------------------------------------

    def _node(self) -> dict[str, Any]:
        args, cluster = self.args, self.cluster
        bad = cluster.pods_on(DEAD_NODE)
        urls = [p.engine.url for p in bad]
        self._watch(urls)
        t0 = time.monotonic()
        cluster.kill_node(DEAD_NODE)
        progress(f"{self.policy}: node {DEAD_NODE} down ({len(bad)} pods); "
                 f"grace {args.grace:g} s + {args.after_grace:g} s")
        self._sleep_until(t0 + args.grace + args.after_grace)
        revived = time.monotonic()
        cluster.revive_node(DEAD_NODE)
        readmit = self._wait_present(urls, revived)
        end = time.monotonic()
        result = self._figures(t0, revived, end, urls)
        result.update({"bad_pods": len(bad), "bad_pods_by_service": _by_service(bad),
                       "fault_seconds": round(revived - t0, 3),
                       "readmitted_after_recovery_s": readmit})
        return result

    def _wedged(self) -> dict[str, Any]:
        pod = self.cluster.pods(SERVICES[0][0])[1]
        return self._engine_spell(pod, EngineMode.WEDGED, self.args.wedge_seconds)

    def _slow(self) -> dict[str, Any]:
        args = self.args
        pod = self.cluster.pods(SERVICES[1][0])[1]
        pod.engine.slow_delay = args.slow_seconds + 30.0  # answers when the spell ends
        result = self._engine_spell(pod, EngineMode.SLOW_METRICS, args.slow_seconds)
        assert self.monitor is not None
        spans = self.monitor.exits(pod.engine.url, result["t0"], result["t_end"])
        result["false_ejections"] = len(spans)
        result["seconds_out_of_view"] = round(sum(b - a for a, b in spans), 3)
        return result

    def _crash(self) -> dict[str, Any]:
        args, cluster = self.args, self.cluster
        service = SERVICES[2][0]
        pod = cluster.pods(service)[1]
        urls = [pod.engine.url]
        self._watch(urls)
        t0 = time.monotonic()
        cluster.kill_pod(pod, endpoint_delay=args.crash_endpoint_delay)
        self._sleep_until(t0 + args.crash_endpoint_delay)
        cluster.add_pod(service)
        self._sleep_until(t0 + args.crash_endpoint_delay + args.crash_observe)
        end = time.monotonic()
        result = self._figures(t0, end, end, urls)
        result["endpoint_delay_s"] = args.crash_endpoint_delay
        return result

    def _engine_spell(self, pod: SimPod, mode: EngineMode, seconds: float) -> dict[str, Any]:
        urls = [pod.engine.url]
        self._watch(urls)
        t0 = time.monotonic()
        pod.engine.mode = mode
        progress(f"{self.policy}: {pod.name} {mode.value} for {seconds:g} s")
        self._sleep_until(t0 + seconds)
        recovered = time.monotonic()
        pod.engine.mode = EngineMode.OK
        readmit = self._wait_present(urls, recovered)
        self._sleep_until(recovered + self.args.after_recovery)
        end = time.monotonic()
        result = self._figures(t0, recovered, end, urls)
        result.update({"fault_seconds": round(recovered - t0, 3),
                       "readmitted_after_recovery_s": readmit, "t0": t0, "t_end": end})
        return result

    # -- figures -------------------------------------------------------------------------------

    def _watch(self, urls: Sequence[str]) -> None:
        assert self.monitor is not None
        self.monitor.watch(urls)
        self.monitor.sample()

    def _sleep_until(self, when: float) -> None:
        time.sleep(max(0.0, when - time.monotonic()))

    def _wait_present(self, urls: Sequence[str], since: float) -> float | str | None:
        """Seconds from ``since`` until every URL is back in the pod view ("never out" if none
        was out of it at ``since``; None: not within ``--readmit-timeout``)."""
        assert self.monitor is not None
        monitor = self.monitor
        monitor.sample()
        if monitor.first_all(urls, since, since, present=True) is not None:
            return "never out"
        deadline = since + self.args.readmit_timeout
        while time.monotonic() < deadline:
            back = monitor.first_all(urls, since, time.monotonic(), present=True)
            if back is not None:
                return round(back - since, 3)
            time.sleep(_SAMPLE)
        return None

    def _figures(self, t0: float, fault_end: float, end: float,
                 urls: Sequence[str]) -> dict[str, Any]:
        """Requests after ``t0``, what went to ``urls`` while the fault lasted, when the
        pod view lost them."""
        load, monitor = self.load, self.monitor
        assert load is not None and monitor is not None
        wait_or_raise(lambda: all(r.outcome != "pending" for r in load.snapshot() if r.at < end),
              self.args.deadline * 2 + 5.0, "the requests in flight to end")
        records = [r for r in load.snapshot() if t0 <= r.at < end]
        bad = set(urls)
        failed: dict[str, int] = {}
        for r in records:
            if r.outcome != "ok":
                failed[r.outcome] = failed.get(r.outcome, 0) + 1
        to_bad = [r for r in records if r.url in bad and r.at < fault_end]
        last_bad = max((r.at for r in to_bad), default=None)
        quiet = fault_end - (last_bad if last_bad is not None else t0)
        # still receiving: the last one came within 3 round-robin turns of the fault's end
        turns = 3.0 * len(SERVICES) * REPLICAS / (self.args.rate * max(1, len(bad)))
        out_at = monitor.first_all(urls, t0, fault_end, present=False)
        changes = monitor.changes_of(urls, t0, end)
        returns = sum(1 for t, _, present in changes if present and t < fault_end)
        return {
            "requests": len(records),
            "ok": sum(1 for r in records if r.outcome == "ok"),
            "failed_or_hung": sum(failed.values()),
            "failed_by_cause": dict(sorted(failed.items())),
            "to_bad_pods": len(to_bad),
            "to_bad_pods_failed": sum(1 for r in to_bad if r.outcome != "ok"),
            "last_request_to_bad_pods_s": (None if last_bad is None
                                           else round(last_bad - t0, 3)),
            "bad_pods_still_receiving_at_fault_end": (last_bad is not None
                                                      and quiet < max(0.5, turns)),
            "bad_pods_out_of_pod_view_s": None if out_at is None else round(out_at - t0, 3),
            "bad_pods_back_in_view_during_fault": returns,
            "bad_pods_view_changes": [(round(t - t0, 3), url, present)
                                      for t, url, present in changes[:_MAX_CHANGES]],
            "max_ejected_share": round(monitor.max_share, 3),
            "max_ejected_detail": monitor.max_share_detail,
            "observed_s": round(end - t0, 3),
        }


def _by_service(pods: Sequence[SimPod]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in pods:
        counts[pod.service] = counts.get(pod.service, 0) + 1
    return counts


# -- report ------------------------------------------------------------------------------------

def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}{unit}"
    return f"{value}{unit}"


def _returns(result: dict[str, Any]) -> str:
    back = result.get("bad_pods_back_in_view_during_fault", 0)
    return f" (back in the view {back} times before the fault ended)" if back else ""


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# Outliers: dead node, wedged, slow, crashed engines in pod routing ({meta['date']})",
           "", f"Machine: {meta['cpus']} cores, Python {meta['python']}. {meta['setup']}", "",
           f"Policy: {meta['policy']}", "",
           "| case | policy | requests after the fault | failed or hung (by cause) | "
           "to the bad pods (failed) | last request to a bad pod, s | bad pods out of the "
           "pod view, s | re-admitted after recovery, s | slow pod ejected (s out) | "
           "max share of a Service ejected |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        for policy in POLICIES:
            r = results["cases"][case].get(policy)
            if r is None:
                continue
            if "error" in r or "n/a" in r:
                out.append(f"| {case} | {policy} | {r.get('error') or r.get('n/a')} "
                           "| | | | | | | |")
                continue
            causes = ", ".join(f"{k} {v}" for k, v in r["failed_by_cause"].items()) or "-"
            last = _fmt(r["last_request_to_bad_pods_s"])
            if r["bad_pods_still_receiving_at_fault_end"]:
                last = f"still at {_fmt(r.get('fault_seconds', r['observed_s']))} (fault end)"
            slow = (f"{r['false_ejections']} ({_fmt(r['seconds_out_of_view'])})"
                    if "false_ejections" in r else "")
            out.append(
                f"| {case} | {policy} | {r['requests']} | {r['failed_or_hung']} ({causes}) | "
                f"{r['to_bad_pods']} ({r['to_bad_pods_failed']}) | {last} | "
                f"{_fmt(r['bad_pods_out_of_pod_view_s'])}{_returns(r)} | "
                f"{_fmt(r.get('readmitted_after_recovery_s'))} | {slow} | "
                f"{_fmt(r['max_ejected_share'])} |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Dead node, wedged, slow, crashed engines")
    parser.add_argument("--quick", action="store_true",
                        help="seconds, not minutes: grace 2 s, spells of 3 s, rate 40")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--rate", type=float, default=100.0, help="total requests/s")
    parser.add_argument("--deadline", type=float, default=5.0, help="client deadline, s")
    parser.add_argument("--late", type=float, default=1.0,
                        help="an answer after this many seconds counts as hung ('late')")
    parser.add_argument("--workers", type=int, default=256,
                        help="client threads (open loop: enough for rate x deadline hung)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--grace", type=float, default=50.0,
                        help="node grace period (--node-monitor-grace-period), s")
    parser.add_argument("--after-grace", type=float, default=3.0,
                        help="the node returns this long after the grace period, s")
    parser.add_argument("--wedge-seconds", type=float, default=None,
                        help="default: the policy's wedged_after + 2 progress intervals + 5 s "
                             "(85 s with its defaults), 30 s without a policy")
    parser.add_argument("--slow-seconds", type=float, default=20.0)
    parser.add_argument("--crash-endpoint-delay", type=float, default=1.0)
    parser.add_argument("--crash-observe", type=float, default=4.0)
    parser.add_argument("--after-recovery", type=float, default=2.0)
    parser.add_argument("--readmit-timeout", type=float, default=60.0)
    parser.add_argument("--scrape-interval", type=float, default=0.0,
                        help="also run an EngineStatsScraper at this interval (0: none)")
    parser.add_argument("--no-report-results", dest="report_results", action="store_false",
                        help="do not feed request outcomes to discovery.report_result")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.wedge_seconds is None:
        defaults = policy_settings(outlier_config_class())
        window = defaults.get("wedged_after")
        step = defaults.get("progress_interval") or 0.0
        args.wedge_seconds = (float(window) + 2 * float(step) + 5.0
                              if isinstance(window, int | float) else 30.0)
        if args.quick:
            args.wedge_seconds = 3.0
    if args.quick:
        for name, value in (("grace", 2.0), ("after_grace", 1.0), ("slow_seconds", 3.0),
                            ("crash_observe", 2.0), ("warmup", 1.0), ("after_recovery", 0.5),
                            ("readmit_timeout", 10.0), ("rate", 40.0), ("workers", 64)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config_class = outlier_config_class()
    settings = policy_settings(config_class)
    meta = run_meta(args, (
        f"{len(SERVICES)} Services x {REPLICAS} pods on 3 nodes (in-process engines), "
        f"pod routing, {args.rate:g} req/s open loop round-robin over "
        f"get_pod_endpoint_info(), {args.deadline:g} s client deadline, keep-alive "
        f"pool; node grace {args.grace:g} s, revived {args.after_grace:g} s after it; "
        f"wedged {args.wedge_seconds:g} s; slow /metrics {args.slow_seconds:g} s; "
        f"crash with the endpoint removed {args.crash_endpoint_delay:g} s later; "
        f"scraper: {args.scrape_interval:g} s (0: none); outcomes fed to "
        f"report_result: {args.report_results and config_class is not None}."))
    meta["policy"] = ("not in this build: the 'with' column is n/a" if config_class is None
                      else f"OutlierConfig defaults {settings}")
    meta["policy_defaults"] = settings
    results: dict[str, Any] = {"meta": meta, "cases": {}}
    exit_code = 0
    for case in args.cases:
        results["cases"][case] = {}
        for policy in args.policies:
            if policy == "with" and config_class is None:
                results["cases"][case][policy] = {"n/a": "n/a (no outlier policy in this build)"}
                continue
            progress(f"case {case}, {policy} the policy")
            try:
                result = Case(case, policy, args, config_class).run()
            except Exception as exc:  # report it, run the others
                exit_code = 1
                result = {"error": f"{exc.__class__.__name__}: {exc}"}
            result.pop("t0", None)
            result.pop("t_end", None)
            results["cases"][case][policy] = result
            progress(f"case {case}, {policy}: {json.dumps(result)}")
    write_results(args.output_dir, "outliers", results, markdown(results))
    return exit_code


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
