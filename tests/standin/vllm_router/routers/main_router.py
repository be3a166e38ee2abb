"""Request-path reads, with the getters bound by name at import as production-stack does."""

from typing import Any

from vllm_router.service_discovery import get_service_discovery
from vllm_router.stats.engine_stats import get_engine_stats_scraper


def health() -> tuple[int, dict[str, Any]]:
    if not get_service_discovery().get_health():
        return 503, {"status": "service discovery module is down"}
    if not get_engine_stats_scraper().get_health():
        return 503, {"status": "engine stats scraper is down"}
    return 200, {"status": "healthy"}


def engines() -> dict[str, Any]:
    """What a routing logic reads per request: the endpoints and the stats keyed by url."""
    stats = get_engine_stats_scraper().get_engine_stats()
    return {"endpoints": [info.url for info in get_service_discovery().get_endpoint_info()],
            "stats": sorted(stats)}
