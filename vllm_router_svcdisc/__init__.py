"""Kubernetes Service discovery and per-pod load for vLLM routers.

The public API is exactly the names in ``__all__`` below: import them from the package root
(``from vllm_router_svcdisc import K8sServiceDiscovery, ProbeConfig``).  Also public, as
documented: ``vllm_router_svcdisc.sim`` (the simulated cluster, for tests and demos),
``vllm_router_svcdisc.compat`` and ``vllm_router_svcdisc.prodstack`` (production-stack entry
points), and the ``vllm-svcdisc`` command.  Every other module is internal (its docstring says
"Internal:"): its names may change or move without notice, even where a root name is defined
in it.  Root names stay importable from the module that defines them today.
"""

from .backoff import BackoffPolicy
from .clock import SYSTEM_CLOCK, Clock, FakeClock
from .discovery import DiscoveryConfigError, Health, K8sServiceDiscovery, load_api_client
from .errors import ApiError, SvcDiscError
from .http import EngineCallError, EnginePool
from .informer import InformerConfig
from .k8s_objects import ObjectError
from .outliers import OutlierConfig
from .probe import ProbeConfig
from .scraper import EngineStatsScraper, ScrapeConfig
from .telemetry import DiscoveryCollector, register_metrics, serve_metrics
from .types import EndpointInfo, EngineStats, ModelInfo, PodEndpoint
from .vllm_metrics import MetricsParseError

__all__ = [
    "SYSTEM_CLOCK",
    "ApiError",
    "BackoffPolicy",
    "Clock",
    "DiscoveryCollector",
    "DiscoveryConfigError",
    "EndpointInfo",
    "EngineCallError",
    "EnginePool",
    "EngineStats",
    "EngineStatsScraper",
    "FakeClock",
    "Health",
    "InformerConfig",
    "K8sServiceDiscovery",
    "MetricsParseError",
    "ModelInfo",
    "ObjectError",
    "OutlierConfig",
    "PodEndpoint",
    "ProbeConfig",
    "ScrapeConfig",
    "SvcDiscError",
    "load_api_client",
    "register_metrics",
    "serve_metrics",
]
__version__ = "0.1.0"
