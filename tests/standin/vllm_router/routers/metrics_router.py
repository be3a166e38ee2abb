"""``/metrics``: ``generate_latest()`` of prometheus_client's default registry."""

from prometheus_client import generate_latest

from vllm_router.service_discovery import get_service_discovery
from vllm_router.stats.engine_stats import get_engine_stats_scraper


def metrics() -> bytes:
    get_service_discovery().get_endpoint_info()  # production-stack fills its gauges from these
    get_engine_stats_scraper().get_engine_stats()
    return generate_latest()
