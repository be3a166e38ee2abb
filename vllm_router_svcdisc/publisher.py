"""Internal: the snapshot readers take: immutable, swapped in by one reference write.

:class:`SnapshotPublisher` keeps what a snapshot hands out (the Service views, the routable
Services, the pods, the known models) in step with the per-Service views at the cost of the
Services that changed.  The three collections live in copy-on-write buckets: a publish copies
only the few buckets that changed since the last one (plus a 256-entry tuple), so publishing
costs the same at 1 000 and at 10 000 Services; the flat lists are built from the frozen
buckets on their first read, once per snapshot (docs/benchmarks.md, "Scale").
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

from .clock import SYSTEM_CLOCK, Clock
from .types import EndpointInfo
from .view import ServiceView

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
PodKey = tuple[str, int]
OwnedPod = tuple[str, PodKey]  # (the Service the pod is listed under, the pod)
_BUCKETS = 256


def _by_hash(key: Hashable) -> int:
    return hash(key) % _BUCKETS


def _by_owner(key: OwnedPod) -> int:
    """A Service's pods share a bucket, so the pod list keeps them together, in view order."""
    return hash(key[0]) % _BUCKETS


class ReadOnlyList(list[Any]):
    """A list shared by every reader of a snapshot: mutating it raises instead of corrupting."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise TypeError("snapshot lists are shared and read-only; copy with list(...) first")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


class Buckets(Mapping[K, V]):
    """A read-only mapping over frozen buckets (what a snapshot holds)."""

    __slots__ = ("_buckets", "_flat", "_index", "_len")

    def __init__(self, buckets: tuple[Mapping[K, V], ...] = (), length: int = 0,
                 index: Callable[[K], int] = _by_hash) -> None:
        self._buckets = buckets
        self._len = length
        self._index = index
        self._flat: list[V] | None = None

    def __getitem__(self, key: K) -> V:
        if not self._buckets:
            raise KeyError(key)
        return self._buckets[self._index(key)][key]

    def __iter__(self) -> Iterator[K]:
        return itertools.chain.from_iterable(self._buckets)

    def __len__(self) -> int:
        return self._len

    def flat_values(self) -> list[V]:
        """The values as one read-only list, built once (snapshots sharing these buckets
        share the list; two first readers racing both build it, harmlessly)."""
        flat = self._flat
        if flat is None:
            flat = self._flat = ReadOnlyList(
                itertools.chain.from_iterable(b.values() for b in self._buckets))
        return flat


class _CopyOnWriteBuckets(Generic[K, V]):
    """A map split into buckets; a bucket handed to a snapshot is copied before it changes."""

    def __init__(self, index: Callable[[K], int] = _by_hash) -> None:
        self._buckets: list[dict[K, V]] = [{} for _ in range(_BUCKETS)]
        self._owned: set[int] = set()  # buckets copied since the last freeze
        self._len = 0
        self._index = index
        self._frozen: Buckets[K, V] = Buckets(tuple(self._buckets), 0, index)

    def get(self, key: K) -> V | None:
        return self._buckets[self._index(key)].get(key)

    def _writable(self, key: K) -> dict[K, V]:
        index = self._index(key)
        if index not in self._owned:
            self._buckets[index] = dict(self._buckets[index])
            self._owned.add(index)
        return self._buckets[index]

    def set(self, key: K, value: V) -> None:
        bucket = self._writable(key)
        self._len += key not in bucket
        bucket[key] = value

    def discard(self, key: K) -> None:
        if key in self._buckets[self._index(key)]:
            del self._writable(key)[key]
            self._len -= 1

    def freeze(self) -> Buckets[K, V]:
        """The current content, never mutated again (unchanged: the previous object)."""
        if self._owned:
            self._owned.clear()
            self._frozen = Buckets(tuple(self._buckets), self._len, self._index)
        return self._frozen


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the cache at one moment; ``version`` grows with every publish.

    ``services`` is a read-only mapping; ``endpoint_infos`` and ``pod_infos`` are lists built
    on their first read and then plain attributes (one attribute access).
    """

    version: int
    services: Mapping[str, ServiceView]
    service_infos: Buckets[str, EndpointInfo]
    pod_buckets: Buckets[OwnedPod, EndpointInfo]
    known_models: frozenset[str]
    published_at: float

    @functools.cached_property
    def endpoint_infos(self) -> list[EndpointInfo]:
        """One entry per routable Service."""
        return self.service_infos.flat_values()

    @functools.cached_property
    def pod_infos(self) -> list[EndpointInfo]:
        """One entry per pod, however many Services select it."""
        return self.pod_buckets.flat_values()


EMPTY_SNAPSHOT = Snapshot(0, Buckets(), Buckets(), Buckets(), frozenset(), 0.0)


class SnapshotPublisher:
    """Per-Service views in, snapshots out; each :meth:`set_view` costs O(that Service).

    A pod selected by several Services is listed once in ``pod_infos``: under the Service
    whose key sorts first among those that route to it.  Not thread-safe: the cache's lock
    guards it.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._views: _CopyOnWriteBuckets[str, ServiceView] = _CopyOnWriteBuckets()
        self._service_infos: _CopyOnWriteBuckets[str, EndpointInfo] = _CopyOnWriteBuckets()
        self._pod_owners: dict[PodKey, dict[str, EndpointInfo]] = {}
        self._pod_infos: _CopyOnWriteBuckets[OwnedPod, EndpointInfo] = _CopyOnWriteBuckets(
            _by_owner)
        self._model_counts: dict[str, int] = {}
        self._dirty = self._models_dirty = False
        self._last = EMPTY_SNAPSHOT
        self.publishes = 0

    def get(self, key: str) -> ServiceView | None:
        return self._views.get(key)

    def set_view(self, key: str, view: ServiceView | None) -> None:
        """Replace (``None``: remove) one Service's view and the entries derived from it."""
        old = self._views.get(key)
        if view is None:
            self._views.discard(key)
        else:
            self._views.set(key, view)
        self._dirty = True
        old_info = old.endpoint_info if old is not None else None
        new_info = view.endpoint_info if view is not None else None
        if old_info is not new_info:
            if new_info is None:
                self._service_infos.discard(key)
            else:
                self._service_infos.set(key, new_info)
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
            services=self._views.freeze(),
            service_infos=self._service_infos.freeze(),
            pod_buckets=self._pod_infos.freeze(),
            known_models=frozenset(self._model_counts) if self._models_dirty
            else last.known_models,
            published_at=self._clock.monotonic(),
        )
        self._dirty = self._models_dirty = False
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
        if old and new:  # only the entries that changed (a probe result changes one)
            kept = {id(info) for info in old}.intersection(id(info) for info in new)
            if kept:
                old = tuple(info for info in old if id(info) not in kept)
                new = tuple(info for info in new if id(info) not in kept)
        listed_under: dict[PodKey, str | None] = {}  # the owner before this change
        for info in (*old, *new):
            pod_key = info.pods[0].key
            if pod_key not in listed_under:
                owners = self._pod_owners.get(pod_key)
                listed_under[pod_key] = min(owners) if owners else None
        for info in old:
            owners = self._pod_owners.get(info.pods[0].key)
            if owners is not None:
                owners.pop(service_key, None)
        for info in new:
            self._pod_owners.setdefault(info.pods[0].key, {})[service_key] = info
        for pod_key, before in listed_under.items():
            owners = self._pod_owners.get(pod_key) or {}
            now = min(owners) if owners else None
            if before is not None and before != now:
                self._pod_infos.discard((before, pod_key))
            if now is None:
                self._pod_owners.pop(pod_key, None)
            else:
                self._pod_infos.set((now, pod_key), owners[now])
