"""Internal: ``vllm-svcdisc``: watch a real cluster, or run the demo on the embedded simulated one.

Exit codes: 0 ok, 1 could not sync (the reason is printed), 2 bad arguments (or a metrics
port that cannot be served), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from .cache import ServiceView
from .clock import SYSTEM_CLOCK, wall_time
from .discovery import DiscoveryConfigError, K8sServiceDiscovery, load_api_client
from .scraper import EngineStatsScraper
from .telemetry import register_metrics, serve_metrics
from .types import EngineStats
from .view import NOT_PROBED

EXIT_OK, EXIT_NO_SYNC, EXIT_USAGE = 0, 1, 2
_NEVER = threading.Event()  # waited on for a pause (the CLI runs on the system clock)


# -- rendering -------------------------------------------------------------------------------


def service_rows(discovery: K8sServiceDiscovery,
                 scraper: EngineStatsScraper | None) -> list[dict[str, Any]]:
    """One JSON-ready dict per selected Service: routing facts, models, load, reason."""
    stats = scraper.get_engine_stats() if scraper is not None else {}
    rows = []
    for view in sorted(discovery.get_service_status().values(), key=lambda v: v.key):
        rows.append(_row(view, stats.get(view.url or "")))
    return rows


def _row(view: ServiceView, stats: EngineStats | None) -> dict[str, Any]:
    models = [m + ("*" if info.is_adapter else "") for m, info in view.models.items()]
    row: dict[str, Any] = {
        "service": view.key,
        "url": view.url,
        "ready": len(view.ready_pods),
        "pods": len(view.pods),
        "models": models,
        "partial_models": list(view.partial_models),
        "routable": view.routable,
        "reason": view.reason,
        "ejected": {_pod_name(view, url): reason for url, reason in view.ejected.items()},
        "failing_open": {_pod_name(view, url): reason
                         for url, reason in view.failing_open.items()},
    }
    if stats is not None:
        row.update(
            running=stats.num_running_requests,
            waiting=stats.num_queuing_requests,
            kv_usage=round(stats.gpu_cache_usage_perc, 4),
            prefix_hit_rate=round(stats.gpu_prefix_cache_hit_rate, 4),
            stats_age_s=round(stats.oldest_sample_age, 2),
            pods_scraped=stats.pods_scraped,
            pods_failed=stats.pods_failed,
        )
    return row


def _pod_name(view: ServiceView, url: str) -> str:
    return next((p.name for p in view.pods if p.url == url and p.name), url)


def _status(row: dict[str, Any]) -> str:
    """routable (and which pods are out, and whether it fails open), or why not."""
    if not row["routable"]:
        return str(row["reason"] or "not routable")
    parts = ["routable"]
    parts += [f"{pod} ejected ({reason})" for pod, reason in sorted(row["ejected"].items())]
    if row["failing_open"]:
        parts.append(f"FAILING OPEN: {', '.join(sorted(row['failing_open']))} kept in")
    return "; ".join(parts)


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """A ``kubectl get``-style table; adapters carry a ``*``; OUT counts ejected pods."""
    header = ("SERVICE", "READY", "OUT", "MODELS", "RUN", "WAIT", "KV%", "HIT%", "AGE", "STATUS")
    lines = [header]
    for r in rows:
        has_stats = "running" in r
        lines.append((
            r["service"],
            f"{r['ready']}/{r['pods']}",
            str(len(r["ejected"])) if r["ejected"] else "-",
            ",".join(r["models"]) or "-",
            f"{r['running']:.0f}" if has_stats else "-",
            f"{r['waiting']:.0f}" if has_stats else "-",
            f"{100 * r['kv_usage']:.0f}" if has_stats else "-",
            f"{100 * r['prefix_hit_rate']:.0f}" if has_stats else "-",
            f"{r['stats_age_s']:.1f}s" if has_stats else "-",
            _status(r),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths, strict=True)]
        out.append("  ".join([*cells, str(line[-1])]).rstrip())
    return "\n".join(out)


def _show(discovery: K8sServiceDiscovery, scraper: EngineStatsScraper | None, output: str,
          stream: TextIO, *, clear: bool) -> None:
    rows = service_rows(discovery, scraper)
    if output == "json":
        stream.write(json.dumps({"time": wall_time(), "services": rows}) + "\n")
    else:
        if clear:
            stream.write("\x1b[2J\x1b[H")
        stream.write(render_table(rows) + "\n\n")
    stream.flush()


# -- watch -----------------------------------------------------------------------------------


def _wait_for_sync(discovery: K8sServiceDiscovery, timeout: float, stream: TextIO) -> str | None:
    """Wait with a progress line; None when synced, else the reason."""
    deadline = SYSTEM_CLOCK.monotonic() + timeout
    while SYSTEM_CLOCK.monotonic() < deadline:
        if discovery.wait_until_synced(timeout=0.5):
            return None
        health = discovery.health()
        stream.write("\rwaiting for sync: " + "; ".join(health.reasons)[:150])
        stream.flush()
        auth = [s.auth_error for s in discovery.informer_status() if s.auth_error]
        if auth:
            stream.write("\n")
            return auth[0]
    stream.write("\n")
    reasons = [s.last_error for s in discovery.informer_status() if s.last_error]
    return reasons[0] if reasons else f"not synced within {timeout:.0f}s"


def _settle(discovery: K8sServiceDiscovery, scraper: EngineStatsScraper, timeout: float) -> None:
    """Wait (bounded) until every Service with ready pods was probed and every routable one
    has stats, so the first table is not all dashes."""
    deadline = SYSTEM_CLOCK.monotonic() + timeout
    while SYSTEM_CLOCK.monotonic() < deadline:
        views = discovery.get_service_status().values()
        stats = scraper.get_engine_stats()
        if all(v.reason != NOT_PROBED for v in views) and all(
                v.url in stats for v in views if v.routable):
            return
        SYSTEM_CLOCK.wait(_NEVER, 0.05)


def _parse_port(text: str | None) -> int | str | None:
    if text is None or text == "":
        return None
    return int(text) if text.isdigit() else text


def cmd_watch(args: argparse.Namespace, stream: TextIO) -> int:
    try:
        api_client = load_api_client(args.kubeconfig, args.context)
    except DiscoveryConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_SYNC
    namespace = None if args.all_namespaces else args.namespace
    discovery = K8sServiceDiscovery(namespace=namespace, label_selector=args.selector,
                                    port=_parse_port(args.port),
                                    cluster_domain=args.cluster_domain, api_client=api_client)
    scraper = EngineStatsScraper(discovery, scrape_interval=args.scrape_interval)
    try:
        if args.metrics_port is not None:
            register_metrics(discovery, scraper)
            try:
                serve_metrics(args.metrics_port)
            except OSError as exc:
                print(f"error: cannot serve metrics on port {args.metrics_port}: {exc}",
                      file=sys.stderr)
                return EXIT_USAGE
        reason = _wait_for_sync(discovery, args.sync_timeout, sys.stderr)
        if reason is not None:
            print(f"error: could not sync: {reason}", file=sys.stderr)
            return EXIT_NO_SYNC
        _settle(discovery, scraper, timeout=3.0 + args.scrape_interval)
        _loop(discovery, scraper, args, stream)
        return EXIT_OK
    finally:
        scraper.close()
        discovery.close()


def _loop(discovery: K8sServiceDiscovery, scraper: EngineStatsScraper | None,
          args: argparse.Namespace, stream: TextIO) -> None:
    live = not args.once
    clear = live and args.output == "table" and stream.isatty()
    while True:
        _show(discovery, scraper, args.output, stream, clear=clear)
        if not live:
            return
        try:
            SYSTEM_CLOCK.wait(_NEVER, args.refresh)
        except KeyboardInterrupt:
            return


# -- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, stream: TextIO) -> int:
    from .sim.demo import run_demo

    return run_demo(stream, output=args.output, quick=args.quick,
                    show=lambda d, s: _show(d, s, args.output, stream, clear=False))


# -- argument parsing ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-svcdisc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    watch = sub.add_parser("watch", help="show the routable vLLM Services of a real cluster")
    watch.add_argument("--namespace", "--k8s-namespace", "-n", default="default")
    watch.add_argument("--all-namespaces", "-A", action="store_true")
    watch.add_argument("--selector", "--k8s-label-selector", "-l", default=None)
    watch.add_argument("--port", "--k8s-port", default=None,
                       help="Service port number or name (default: the port named http)")
    watch.add_argument("--cluster-domain", default="cluster.local")
    watch.add_argument("--scrape-interval", type=float, default=1.0)
    watch.add_argument("--kubeconfig", default=None)
    watch.add_argument("--context", default=None)
    watch.add_argument("--sync-timeout", type=float, default=15.0)
    watch.add_argument("--metrics-port", type=int, default=None,
                       help="serve vllm_svcdisc_* Prometheus metrics on this port")
    _output_args(watch)

    demo = sub.add_parser("demo", help="run on the embedded simulated cluster (no cluster needed)")
    demo.add_argument("--quick", action="store_true", help="a shorter churn script")
    demo.add_argument("-o", "--output", choices=("table", "json"), default="table")
    return parser


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--watch", dest="once", action="store_false",
                        help="keep refreshing (the default)")
    parser.add_argument("--refresh", type=float, default=2.0, help="seconds between tables")


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    for name in ("scrape_interval", "refresh", "sync_timeout"):
        if getattr(args, name, 1.0) <= 0:
            print(f"error: --{name.replace('_', '-')} must be > 0", file=sys.stderr)
            return EXIT_USAGE
    port = getattr(args, "port", None)
    bad_number = port is not None and port.isdigit() and not 0 < int(port) < 65536
    if bad_number or (port is not None and not port.strip()):
        print(f"error: --port {port!r} is not a port number or name", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = stream or sys.stdout
    try:
        if args.command == "watch":
            return cmd_watch(args, out)
        return cmd_demo(args, out)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
