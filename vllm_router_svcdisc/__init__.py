"""Kubernetes Service discovery and per-pod load for vLLM routers."""

from .discovery import K8sServiceDiscovery
from .errors import SvcDiscError
from .scraper import EngineStatsScraper
from .types import EndpointInfo, EngineStats, ModelInfo

__all__ = ["EndpointInfo", "EngineStats", "EngineStatsScraper", "K8sServiceDiscovery",
           "ModelInfo", "SvcDiscError"]
__version__ = "0.1.0"
