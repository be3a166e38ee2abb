"""production-stack's scraper singleton; imports ``get_service_discovery`` by name."""

from typing import Any

from vllm_router.log import init_logger
from vllm_router.service_discovery import get_service_discovery

logger = init_logger(__name__)

_scraper: Any = None


class EngineStatsScraper:
    def __init__(self, scrape_interval: float) -> None:
        self.scrape_interval = scrape_interval

    def get_engine_stats(self) -> dict[str, Any]:
        return {info.url: None for info in get_service_discovery().get_endpoint_info()}

    def get_health(self) -> bool:
        return True

    def close(self) -> None:
        pass


def initialize_engine_stats_scraper(scrape_interval: float) -> EngineStatsScraper:
    global _scraper
    _scraper = EngineStatsScraper(scrape_interval)
    return _scraper


def get_engine_stats_scraper() -> EngineStatsScraper:
    return _scraper
