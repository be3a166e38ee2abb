"""production-stack's discovery singleton: created through ``_create_service_discovery``,
which ``initialize_service_discovery`` and ``reconfigure_service_discovery`` look up at call
time."""

import enum
from typing import Any

from vllm_router.log import init_logger

logger = init_logger(__name__)

_global_service_discovery: Any = None


class ServiceDiscoveryType(enum.Enum):
    STATIC = "static"
    K8S = "k8s"
    EXTERNAL_ONLY = "external-only"


class StaticServiceDiscovery:
    def __init__(self, app: Any = None, urls: list[str] | None = None, **_: Any) -> None:
        self.urls = list(urls or [])

    def get_endpoint_info(self) -> list[Any]:
        return []

    def get_health(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _create_service_discovery(service_discovery_type: ServiceDiscoveryType, *args: Any,
                              **kwargs: Any) -> Any:
    if service_discovery_type == ServiceDiscoveryType.STATIC:
        return StaticServiceDiscovery(*args, **kwargs)
    if service_discovery_type == ServiceDiscoveryType.K8S:
        raise RuntimeError("the stand-in has no Kubernetes discovery of its own")
    raise ValueError("Invalid service discovery type")


def initialize_service_discovery(service_discovery_type: ServiceDiscoveryType, *args: Any,
                                 **kwargs: Any) -> Any:
    global _global_service_discovery
    if _global_service_discovery is not None:
        raise ValueError("Service discovery module already initialized")
    _global_service_discovery = _create_service_discovery(service_discovery_type, *args,
                                                          **kwargs)
    return _global_service_discovery


def reconfigure_service_discovery(service_discovery_type: ServiceDiscoveryType, *args: Any,
                                  **kwargs: Any) -> Any:
    global _global_service_discovery
    if _global_service_discovery is None:
        raise ValueError("Service discovery module not initialized")
    new = _create_service_discovery(service_discovery_type, *args, **kwargs)
    _global_service_discovery.close()
    _global_service_discovery = new
    return new


def get_service_discovery() -> Any:
    if _global_service_discovery is None:
        raise ValueError("Service discovery module not initialized")
    return _global_service_discovery
