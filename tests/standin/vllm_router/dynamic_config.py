"""The K8S branch of production-stack's dynamic reconfiguration (no file watching here)."""

from typing import Any

from vllm_router.service_discovery import ServiceDiscoveryType, reconfigure_service_discovery


def reconfigure_k8s(app: Any, namespace: str | None, port: int | None,
                    label_selector: str | None) -> Any:
    """Called as production-stack's config watcher calls it: no discovery type keyword."""
    return reconfigure_service_discovery(ServiceDiscoveryType.K8S, app=app, namespace=namespace,
                                         port=port, label_selector=label_selector,
                                         prefill_model_labels=None, decode_model_labels=None)
