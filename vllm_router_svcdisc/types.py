"""Internal: the records discovery and scraping hand to a router (public from the root).

Field names follow production-stack's ``EndpointInfo``, ``ModelInfo`` and ``EngineStats`` so
its routers work unchanged; everything we add has a default.  Instances inside a published
snapshot are shared between readers: treat them as read-only.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .clock import SYSTEM_CLOCK

_MODEL_CARD_KEYS = ("id", "object", "created", "owned_by", "root", "parent")


@dataclass
class ModelInfo:
    """One card of an engine's ``/v1/models``; LoRA adapters carry ``parent``."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    is_adapter: bool = False
    extra_fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        """Build from a model card; unknown keys are kept in ``extra_fields``."""
        model_id = data.get("id")
        if not isinstance(model_id, str) or not model_id:
            raise ValueError("model card without a string 'id'")
        parent = data.get("parent")
        created = data.get("created")
        return cls(
            id=model_id,
            object=str(data.get("object") or "model"),
            created=created if isinstance(created, int) else 0,
            owned_by=str(data.get("owned_by") or "vllm"),
            root=data.get("root") if isinstance(data.get("root"), str) else None,
            parent=parent if isinstance(parent, str) else None,
            is_adapter=isinstance(parent, str) and bool(parent),
            extra_fields={k: v for k, v in data.items() if k not in _MODEL_CARD_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The card back as a dict (``extra_fields`` merged in)."""
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "owned_by": self.owned_by,
            "root": self.root,
            "parent": self.parent,
            "is_adapter": self.is_adapter,
            **self.extra_fields,
        }


@dataclass(frozen=True, slots=True)
class PodEndpoint:
    """One endpoint behind a Service: one pod (or, without a ``targetRef``, one address:port).

    ``ip`` is the endpoint's first address of the family chosen for its Service; ``ready``,
    ``serving`` and ``terminating`` are the EndpointSlice conditions as written.
    """

    name: str | None
    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    namespace: str | None = None
    state: str = "ok"  # outlier state: "ok", "ejected", or "fail_open" (would be, cap reached)
    reason: str | None = None  # why ejected / failing open

    @property
    def ejected(self) -> bool:
        """Left out of the pod view by the outlier policy (Kubernetes may still call it ready)."""
        return self.state == "ejected"

    @property
    def routable(self) -> bool:
        """Serving and not terminating: the only endpoints we send traffic to.

        ``serving`` is the pod's readiness even when ``publishNotReadyAddresses`` makes the
        controller write ``ready: true`` for every pod.
        """
        return self.serving and not self.terminating

    # Derived once (views are rebuilt often, and one string per pod is shared by every map
    # keyed by it): identity — the pod (``namespace/name`` of its targetRef), else the
    # address; + port — and ``http://<pod ip>:<pod port>`` (IPv6 addresses bracketed).
    key: tuple[str, int] = field(init=False, repr=False, compare=False)
    url: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = (f"{self.namespace or ''}/{self.name}" if self.name else self.ip, self.port)
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "url", sys.intern(f"http://{host}:{self.port}"))


@dataclass
class EndpointInfo:
    """A routable engine URL with its models, as production-stack's routers expect it.

    In Service mode ``url`` is the Service DNS name and ``pods`` lists the endpoints behind
    it; in pod-IP mode ``url`` is one pod and ``pod_name`` is set.
    """

    url: str
    model_names: list[str]
    Id: str
    added_timestamp: float
    model_label: str | None = None
    sleep: bool = False
    healthy: bool = True
    pod_name: str | None = None
    service_name: str | None = None
    namespace: str | None = None
    model_info: dict[str, ModelInfo] | None = None
    pods: tuple[PodEndpoint, ...] = ()
    partial_models: tuple[str, ...] = ()  # served by some of the Service's pods only

    def get_base_models(self) -> list[str]:
        """Model ids that are not LoRA adapters."""
        if not self.model_info:
            return list(self.model_names)
        return [m for m, info in self.model_info.items() if not info.is_adapter]

    def get_adapters(self) -> list[str]:
        """Model ids that are LoRA adapters."""
        if not self.model_info:
            return []
        return [m for m, info in self.model_info.items() if info.is_adapter]

    def get_adapters_for_model(self, base_model: str) -> list[str]:
        """LoRA adapters whose parent is ``base_model``."""
        if not self.model_info:
            return []
        return [m for m, info in self.model_info.items()
                if info.is_adapter and info.parent == base_model]

    def has_model(self, model_id: str) -> bool:
        """True when the engine serves ``model_id`` (base model or adapter)."""
        return model_id in self.model_names

    def get_model_info(self, model_id: str) -> ModelInfo | None:
        """The card of ``model_id``, if known."""
        if not self.model_info:
            return None
        return self.model_info.get(model_id)


@dataclass(frozen=True)
class EngineStats:
    """Load of one engine (per pod) or of a Service (aggregated over its ready pods).

    The first six fields are production-stack's.  For a Service, ``gpu_cache_usage_perc`` is the
    mean over pods and ``gpu_cache_usage_perc_max`` the max; counts and counters are sums.
    Sample times are monotonic-clock values (the scraper's clock); ``oldest_sample_age`` turns
    them into an age on the system clock, ``age_at(now)`` on any.
    """

    num_running_requests: float = 0
    num_queuing_requests: float = 0
    gpu_prefix_cache_hit_rate: float = 0.0
    gpu_prefix_cache_hits_total: float = 0
    gpu_prefix_cache_queries_total: float = 0
    gpu_cache_usage_perc: float = 0.0
    gpu_cache_usage_perc_max: float = 0.0
    sleep: bool = False
    max_lora: int | None = None
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    pods_scraped: int = 1
    pods_stale: int = 0
    pods_failed: int = 0
    pods_ejected: int = 0  # ready pods left out of the figures (ejected as outliers)
    sample_time: float = 0.0
    oldest_sample_time: float = 0.0
    per_pod: Mapping[str, EngineStats] = field(default_factory=dict)

    @property
    def oldest_sample_age(self) -> float:
        """Seconds since the oldest sample behind these figures was taken."""
        return self.age_at(SYSTEM_CLOCK.monotonic())

    def age_at(self, now: float) -> float:
        """Seconds between the oldest sample behind these figures and ``now``."""
        return max(0.0, now - self.oldest_sample_time)
