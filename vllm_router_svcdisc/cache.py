"""The coordinator of discovery's state: store → per-Service views → published snapshot.

Writers (the two informer threads and the model prober) change the :class:`ServiceStore` under
one lock, rebuild the views of the Services they touched with the pure :func:`build_view`, and
publish one snapshot per batch (a LIST, a watch event, a batch of probe results); readers take
``cache.snapshot`` — one attribute read, no lock — so a router calling on every request pays
O(1) and never waits on a writer.  Probe requests are handed to the prober under the same lock,
so it sees them in the order of the states they describe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from .informer import DELETED, Change
from .k8s_objects import ObjectError, parse_endpoint_slice, parse_endpoints, parse_service
from .publisher import EMPTY_SNAPSHOT, ReadOnlyList, Snapshot, SnapshotPublisher
from .store import ServiceStore
from .view import (
    ModelProbe,
    PortSpec,
    ServiceView,
    ViewConfig,
    build_view,
    resolve_service_port,
)

__all__ = ["DiscoveryCache", "ModelProbe", "PortSpec", "ProbeTarget", "ReadOnlyList",
           "ServiceView", "Snapshot", "resolve_service_port"]

log = logging.getLogger(__name__)

ProbeTarget = tuple[str, str, tuple[str, ...]]  # (service key, url, ready pod IPs)


class DiscoveryCache:
    """Services + endpoint slices + model probes → per-Service views → one snapshot.

    ``on_probe_needed`` is told, while the lock is held, which Services need a model probe
    because they appeared or changed URL or ready set, and which vanished; it must not block
    and must not call back into the cache.
    """

    def __init__(
        self,
        *,
        port: PortSpec,
        cluster_domain: str,
        ip_family: str | None = None,
        on_probe_needed: Callable[[Sequence[ProbeTarget], Sequence[str]], None] | None = None,
    ) -> None:
        self._config = ViewConfig(port=port, cluster_domain=cluster_domain.strip("."),
                                  ip_family=ip_family)
        self._on_probe_needed = on_probe_needed
        self._lock = threading.Lock()
        self._store = ServiceStore()
        self._probes: dict[str, ModelProbe] = {}
        self._added: dict[str, float] = {}
        self._publisher = SnapshotPublisher()
        self._ever_seen_models: set[str] = set()
        self._logged_reason: dict[str, str | None] = {}
        self._refresh_seconds = 0.0
        self.snapshot: Snapshot = EMPTY_SNAPSHOT

    # -- writers -----------------------------------------------------------------------------

    def apply_service_changes(self, changes: Sequence[Change]) -> None:
        """Apply Service changes (a LIST batch or one watch event)."""
        touched: set[str] = set()
        with self._lock:
            for change in changes:
                if change.type == DELETED:
                    if self._store.delete_service(change.key):
                        touched.add(change.key)
                    continue
                try:
                    record = parse_service(change.obj)
                except ObjectError as exc:
                    log.warning("skipping a Service object: %s", exc)
                    continue
                touched.add(self._store.put_service(record))
            self._refresh(touched)

    def apply_endpoint_changes(self, changes: Sequence[Change], *, legacy: bool = False) -> None:
        """Apply EndpointSlice changes, or v1 Endpoints changes when ``legacy``."""
        parse = parse_endpoints if legacy else parse_endpoint_slice
        touched: set[str] = set()
        with self._lock:
            for change in changes:
                if change.type == DELETED:
                    touched |= self._store.delete_slice(change.key)
                    continue
                try:
                    record = parse(change.obj)
                except ObjectError as exc:
                    log.warning("skipping an endpoints object: %s", exc)
                    touched |= self._store.delete_slice(change.key)
                    continue
                touched |= self._store.put_slice(change.key, record)
            self._refresh(touched)

    def set_probes(self, results: Sequence[tuple[str, ModelProbe]]) -> None:
        """Record model probe outcomes (a batch from the prober): one publish for all."""
        touched: set[str] = set()
        with self._lock:
            for key, probe in results:
                if key not in self._store.services:
                    continue
                previous = self._probes.get(key)
                if not probe.ok and probe.unreachable and previous is not None and previous.ok:
                    # The pods are still ready (readiness says so); an engine we could not
                    # reach this once keeps the models it served until a probe says otherwise.
                    probe = replace(previous, reason=f"last probe failed ({probe.reason}); "
                                                     "keeping the models of the previous probe")
                self._probes[key] = probe
                if probe.ok:
                    self._ever_seen_models.update(probe.models)
                touched.add(key)
            self._refresh(touched, probe_changed=True)

    def set_probe(self, key: str, probe: ModelProbe) -> None:
        """Record one model probe's outcome."""
        self.set_probes([(key, probe)])

    # -- reads (cheap helpers over the current state) ------------------------------------------

    def has_ever_seen_model(self, model: str) -> bool:
        return model in self._ever_seen_models

    def sizes(self) -> dict[str, int]:
        """How many records each part holds (soak and leak checks)."""
        with self._lock:
            return {**self._store.counts(), "probes": len(self._probes), "added": len(self._added),
                    "logged_reasons": len(self._logged_reason)}

    def publish_stats(self) -> tuple[int, float]:
        """(publishes, seconds spent rebuilding views and publishing) since start."""
        return self._publisher.publishes, self._refresh_seconds

    # -- internals (called with the lock held) -------------------------------------------------

    def _refresh(self, keys: Iterable[str], *, probe_changed: bool = False) -> None:
        """Rebuild the views of ``keys``, publish once, and tell the prober what changed."""
        started = time.perf_counter()
        targets: list[ProbeTarget] = []
        gone: list[str] = []
        now = time.time()
        for key in sorted(keys):  # a deterministic order for lists and logs
            old = self._publisher.get(key)
            record = self._store.services.get(key)
            if record is None:  # deleted, or slices of a Service the selector does not match
                if old is not None:
                    self._publisher.set_view(key, None)
                    gone.append(key)
                self._probes.pop(key, None)
                self._added.pop(key, None)
                self._logged_reason.pop(key, None)
                continue
            view = build_view(record, self._store.slices_of(key), self._probes.get(key),
                              config=self._config, added=self._added.get(key, now))
            if view.routable:
                self._added.setdefault(key, now)
            self._publisher.set_view(key, view)
            self._log_reason_change(view)
            if not probe_changed and view.url is not None and view.ready_pods:
                before = (old.url, _ready_ips(old)) if old is not None else None
                if before != (view.url, _ready_ips(view)):
                    targets.append((key, view.url, _ready_ips(view)))
        snapshot = self._publisher.publish()
        if snapshot is not None:
            self.snapshot = snapshot
        self._refresh_seconds += time.perf_counter() - started
        if self._on_probe_needed is not None and (targets or gone):
            try:
                self._on_probe_needed(targets, gone)
            except Exception:
                log.exception("model prober notification failed")

    def _log_reason_change(self, view: ServiceView) -> None:
        """One log line per state change of a Service, not one per event."""
        previous = self._logged_reason.get(view.key, "<new>")
        if previous == view.reason:
            return
        self._logged_reason[view.key] = view.reason
        if view.reason is None:
            log.info("service %s is routable at %s (%d ready pods)%s",
                     view.key, view.url, len(view.ready_pods),
                     f"; {view.note}" if view.note else "")
        elif previous != "<new>" or view.service_port is None:
            log.info("service %s is not routable: %s", view.key, view.reason)


def _ready_ips(view: ServiceView) -> tuple[str, ...]:
    return tuple(p.ip for p in view.pods if p.routable)
