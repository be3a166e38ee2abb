"""Internal: the keyed store of Services and endpoint slices, indexed by Service (client-go's
Indexer).

Not thread-safe on its own: the cache's lock guards it.  Each write returns the Services it
touched, so only their views are rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterable

from .k8s_objects import ServiceRecord, SliceRecord


class ServiceStore:
    """Services by key, slices by key, and each Service's slices (the index)."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceRecord] = {}
        self._slices: dict[str, SliceRecord] = {}
        self._by_service: dict[str, dict[str, SliceRecord]] = {}

    def put_service(self, record: ServiceRecord) -> str:
        self.services[record.key] = record
        return record.key

    def delete_service(self, key: str) -> bool:
        """Forget the Service (its slices stay: they are deleted by their own events)."""
        return self.services.pop(key, None) is not None

    def put_slice(self, key: str, record: SliceRecord) -> set[str]:
        """Store a slice; returns the Services touched (two if it changed Service)."""
        touched = self.delete_slice(key)
        self._slices[key] = record
        self._by_service.setdefault(record.service_key, {})[key] = record
        touched.add(record.service_key)
        return touched

    def delete_slice(self, key: str) -> set[str]:
        old = self._slices.pop(key, None)
        if old is None:
            return set()
        siblings = self._by_service.get(old.service_key)
        if siblings is not None:
            siblings.pop(key, None)
            if not siblings:  # no empty sets left behind by deleted Services
                del self._by_service[old.service_key]
        return {old.service_key}

    def slices_of(self, service_key: str) -> Iterable[SliceRecord]:
        return self._by_service.get(service_key, {}).values()

    def counts(self) -> dict[str, int]:
        """Records held: Services, slices, Services with slices (leak checks)."""
        return {"services": len(self.services), "slices": len(self._slices),
                "indexed_services": len(self._by_service)}
