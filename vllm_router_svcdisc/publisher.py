"""The snapshot readers take: immutable, swapped in by one reference write.

:class:`SnapshotPublisher` keeps the flat lists a snapshot hands out (routable Services, pods,
known models) in step with the per-Service views at the cost of the Services that changed;
publishing then copies references only, and reuses every list that did not change.  Copying
references is C-speed: 10 000 take about 6-25 us, 100 000 about 60-250 us on the benchmark
machine, so a publish stays well under a millisecond at 10 000 Services (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn

from .types import EndpointInfo
from .view import ServiceView


class ReadOnlyList(list[Any]):
    """A list shared by every reader of a snapshot: mutating it raises instead of corrupting."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise TypeError("snapshot lists are shared and read-only; copy with list(...) first")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the cache at one moment; ``version`` grows with every publish."""

    version: int
    services: Mapping[str, ServiceView]
    endpoint_infos: list[EndpointInfo]
    pod_infos: list[EndpointInfo]  # one entry per pod, however many Services select it
    known_models: frozenset[str]
    published_at: float


EMPTY_SNAPSHOT = Snapshot(0, MappingProxyType({}), ReadOnlyList(), ReadOnlyList(), frozenset(), 0.0)

PodKey = tuple[str, int]


class SnapshotPublisher:
    """Per-Service views in, snapshots out; each :meth:`set_view` costs O(that Service).

    A pod selected by several Services is listed once in ``pod_infos``: under the Service
    whose key sorts first among those that route to it.  Not thread-safe: the cache's lock
    guards it.
    """

    def __init__(self) -> None:
        self._views: dict[str, ServiceView] = {}
        self._service_infos: dict[str, EndpointInfo] = {}
        self._pod_owners: dict[PodKey, dict[str, EndpointInfo]] = {}
        self._pod_infos: dict[PodKey, EndpointInfo] = {}
        self._model_counts: dict[str, int] = {}
        self._dirty = self._services_dirty = self._pods_dirty = self._models_dirty = False
        self._last = EMPTY_SNAPSHOT
        self.publishes = 0

    def get(self, key: str) -> ServiceView | None:
        return self._views.get(key)

    def set_view(self, key: str, view: ServiceView | None) -> None:
        """Replace (``None``: remove) one Service's view and the entries derived from it."""
        old = self._views.pop(key, None) if view is None else self._views.get(key)
        if view is not None:
            self._views[key] = view
        self._dirty = True
        old_info = old.endpoint_info if old is not None else None
        new_info = view.endpoint_info if view is not None else None
        if old_info is not new_info:
            self._services_dirty = True
            if new_info is None:
                self._service_infos.pop(key, None)
            else:
                self._service_infos[key] = new_info
            self._count_models(old_info, -1)
            self._count_models(new_info, +1)
        old_pods = old.pod_infos if old is not None else ()
        new_pods = view.pod_infos if view is not None else ()
        if old_pods != new_pods:
            self._update_pods(key, old_pods, new_pods)

    def publish(self) -> Snapshot | None:
        """A new snapshot if anything changed since the last one, else None."""
        if not self._dirty:
            return None
        last = self._last
        snapshot = Snapshot(
            version=last.version + 1,
            services=MappingProxyType(dict(self._views)),
            endpoint_infos=(ReadOnlyList(self._service_infos.values())
                            if self._services_dirty else last.endpoint_infos),
            pod_infos=ReadOnlyList(self._pod_infos.values()) if self._pods_dirty
            else last.pod_infos,
            known_models=frozenset(self._model_counts) if self._models_dirty
            else last.known_models,
            published_at=time.monotonic(),
        )
        self._dirty = self._services_dirty = self._pods_dirty = self._models_dirty = False
        self._last = snapshot
        self.publishes += 1
        return snapshot

    def _count_models(self, info: EndpointInfo | None, delta: int) -> None:
        if info is None:
            return
        counts = self._model_counts
        for model in info.model_names:
            count = counts.get(model, 0) + delta
            if count <= 0:
                counts.pop(model, None)
                self._models_dirty = True
            else:
                self._models_dirty |= model not in counts
                counts[model] = count

    def _update_pods(self, service_key: str, old: tuple[EndpointInfo, ...],
                     new: tuple[EndpointInfo, ...]) -> None:
        self._pods_dirty = True
        touched: set[PodKey] = set()
        for info in old:
            pod_key = info.pods[0].key
            owners = self._pod_owners.get(pod_key)
            if owners is not None:
                owners.pop(service_key, None)
                touched.add(pod_key)
        for info in new:
            pod_key = info.pods[0].key
            self._pod_owners.setdefault(pod_key, {})[service_key] = info
            touched.add(pod_key)
        for pod_key in touched:
            owners = self._pod_owners.get(pod_key)
            if not owners:
                self._pod_owners.pop(pod_key, None)
                self._pod_infos.pop(pod_key, None)
            else:
                self._pod_infos[pod_key] = owners[min(owners)]
