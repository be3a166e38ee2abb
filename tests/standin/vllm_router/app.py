"""The router's app module: initialisers and getters imported by name, ``main()`` serves.

Serving is a stdlib HTTP server instead of FastAPI + uvicorn; ``app.stop()`` ends ``main()``
the way SIGTERM ends uvicorn (then the lifespan closes the scraper and the discovery).
"""

import json
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vllm_router.aiohttp_client import AiohttpClientWrapper
from vllm_router.log import init_logger, set_log_format, set_log_level
from vllm_router.parsers.parser import parse_args
from vllm_router.routers.main_router import engines, health
from vllm_router.routers.metrics_router import metrics
from vllm_router.service_discovery import (
    ServiceDiscoveryType,
    get_service_discovery,
    initialize_service_discovery,
)
from vllm_router.stats.engine_stats import (
    get_engine_stats_scraper,
    initialize_engine_stats_scraper,
)

logger = init_logger(__name__)


class App:
    def __init__(self) -> None:
        self.state = types.SimpleNamespace()
        self.serving = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


app = App()
app.state.aiohttp_client_wrapper = AiohttpClientWrapper()


def initialize_all(app: App, args: Any) -> None:
    if args.service_discovery == "static":
        initialize_service_discovery(ServiceDiscoveryType.STATIC, app=app,
                                     urls=(args.static_backends or "").split(","))
    elif args.service_discovery == "k8s":
        initialize_service_discovery(
            ServiceDiscoveryType.K8S,
            k8s_service_discovery_type=args.k8s_service_discovery_type,
            app=app,
            namespace=args.k8s_namespace,
            port=args.k8s_port,
            label_selector=args.k8s_label_selector,
            prefill_model_labels=args.prefill_model_labels,
            decode_model_labels=args.decode_model_labels,
            watcher_timeout_seconds=args.k8s_watcher_timeout_seconds,
            health_check_timeout_seconds=args.backend_health_check_timeout_seconds,
        )
    else:
        raise ValueError(f"Invalid service discovery type: {args.service_discovery}")
    initialize_engine_stats_scraper(args.engine_stats_interval)
    app.state.engine_stats_scraper = get_engine_stats_scraper()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        if self.path == "/metrics":
            status, body, kind = 200, metrics(), "text/plain; version=0.0.4"
        elif self.path == "/health":
            code, obj = health()
            status, body, kind = code, json.dumps(obj).encode(), "application/json"
        elif self.path == "/engines":
            status, body, kind = 200, json.dumps(engines()).encode(), "application/json"
        else:
            status, body, kind = 404, b"{}", "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    args = parse_args()
    set_log_level(args.log_level)
    set_log_format(args.log_format)
    initialize_all(app, args)
    app.server = ThreadingHTTPServer((args.host, args.port), _Handler)
    app.server.daemon_threads = True
    logger.info("router serving on %s:%d", args.host, app.server.server_port)
    app.serving.set()
    try:
        app.server.serve_forever(poll_interval=0.05)
    finally:
        app.server.server_close()
        logger.info("Closing engine stats scraper")
        get_engine_stats_scraper().close()
        logger.info("Closing service discovery module")
        get_service_discovery().close()
