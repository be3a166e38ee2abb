"""The router's command line (the flags the entry point maps, and a few it passes through)."""

import argparse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the router.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--service-discovery", choices=["static", "k8s", "external-only"])
    parser.add_argument("--k8s-service-discovery-type", choices=["pod-ip", "service-name"])
    parser.add_argument("--static-backends", default=None)
    parser.add_argument("--k8s-port", type=int, default=8000)
    parser.add_argument("--k8s-namespace", default="default")
    parser.add_argument("--k8s-label-selector", default="")
    parser.add_argument("--k8s-watcher-timeout-seconds", type=int, default=0)
    parser.add_argument("--backend-health-check-timeout-seconds", type=int, default=10)
    parser.add_argument("--prefill-model-labels", default=None)
    parser.add_argument("--decode-model-labels", default=None)
    parser.add_argument("--routing-logic", default="roundrobin")
    parser.add_argument("--engine-stats-interval", type=int, default=30)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    return parser.parse_args()
