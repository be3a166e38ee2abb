"""Internal: the coordinator of discovery's state: store → per-Service views → published snapshot.

Writers (the two informer threads and the model prober) change the :class:`ServiceStore` under
one lock, rebuild the views of the Services they touched with the pure :func:`build_view`, and
publish one snapshot per batch (a LIST, a watch event, a batch of probe results); readers take
``cache.snapshot`` — one attribute read, no lock — so a router calling on every request pays
O(1) and never waits on a writer.  Model probes are per pod: the cache tells the prober which
pods became ready endpoints (of any selected Service) and which stopped being one, under the same
lock, so it sees them in the order of the states they describe; a probe result rebuilds the
views of every Service the pod belongs to.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from .clock import SYSTEM_CLOCK, Clock, wall_time
from .informer import DELETED, Change
from .k8s_objects import ObjectError, parse_endpoint_slice, parse_endpoints, parse_service
from .publisher import EMPTY_SNAPSHOT, ReadOnlyList, Snapshot, SnapshotPublisher
from .store import ServiceStore
from .view import (
    Endpoints,
    ModelProbe,
    PortSpec,
    ServiceView,
    ViewConfig,
    build_view,
    resolve_service_port,
    service_endpoints,
)

__all__ = ["DiscoveryCache", "ModelProbe", "PortSpec", "ProbeTarget", "ReadOnlyList",
           "ServiceView", "Snapshot", "resolve_service_port"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """What the prober checks: a ready pod's ``/v1/models`` (its URL, its name and the Services
    it is an endpoint of), or, ``kind="name"``, that a Service's URL resolves in DNS.

    ``fresh``: nothing usable is known of the pod's models (a new pod, a new address, or only
    a failed probe), so it is not routable until probed: the prober puts it first — ``first``
    (its probe makes a Service routable) before the others.  A pod back from a readiness blip,
    or one whose Services changed, keeps its models and is not fresh.
    """

    url: str
    pod_name: str | None
    services: tuple[str, ...]
    kind: str = "pod"
    fresh: bool = True
    first: bool = False  # the first ready pod of a Service that is not routable yet


class DiscoveryCache:
    """Services + endpoint slices + per-pod model probes → per-Service views → one snapshot.

    ``on_probe_needed`` is told, while the lock is held, which pods became ready endpoints (or
    changed Services) and need a probe, and which pod URLs are no endpoint any more; it must
    not block and must not call back into the cache.
    """

    def __init__(
        self,
        *,
        port: PortSpec,
        cluster_domain: str,
        ip_family: str | None = None,
        check_names: bool = False,
        on_probe_needed: Callable[[Sequence[ProbeTarget], Sequence[str]], None] | None = None,
        max_ejection_percent: float = 50.0,
        blip_window: float = 0.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = ViewConfig(port=port, cluster_domain=cluster_domain.strip("."),
                                  ip_family=ip_family, max_ejection_percent=max_ejection_percent)
        self._clock = clock
        self._blip_window = blip_window
        self._departed: dict[str, float] = {}  # pod URL -> when it stopped being an endpoint
        self._candidates: dict[str, str] = {}  # pod URL -> why the outlier policy would eject
        self.ejections_by_reason: dict[str, int] = {}
        self._on_probe_needed = on_probe_needed
        self._lock = threading.Lock()
        self._store = ServiceStore()
        self._probes: dict[str, ModelProbe] = {}  # pod URL -> its last probe
        # ready pod URL -> its Services' keys, sorted (a tuple: 100 000 of them, most of one)
        self._services_of: dict[str, tuple[str, ...]] = {}
        self._check_names = check_names  # Service routing: routers dial the Service's name
        self._name_owner: dict[str, str] = {}  # Service URL -> its Service's key
        self._name_errors: dict[str, str] = {}  # Service URL -> why it did not resolve
        self._added: dict[str, float] = {}
        # Service key -> (its record, its slices, their endpoints): reused while the record
        # and the slices are the same objects (a probe or a verdict changed, not Kubernetes)
        self._endpoints: dict[str, tuple[object, tuple[object, ...], Endpoints]] = {}
        self._publisher = SnapshotPublisher(clock)
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
        """Record pods' model probe outcomes (a batch from the prober): one publish for all."""
        touched: set[str] = set()
        with self._lock:
            for url, probe in results:
                owner = self._name_owner.get(url)
                if owner is not None:  # a Service name's DNS check
                    error = None if probe.ok else (probe.reason or "does not resolve")
                    if self._name_errors.get(url) != error:
                        if error is None:
                            del self._name_errors[url]
                        else:
                            self._name_errors[url] = error
                        touched.add(owner)
                    continue
                services = self._services_of.get(url)
                if not services:
                    continue  # the pod stopped being an endpoint while it was probed
                previous = self._probes.get(url)
                if (not probe.ok and probe.unreachable and previous is not None and previous.ok
                        and previous.pod_name == probe.pod_name):
                    # The pods are still ready (readiness says so); an engine we could not
                    # reach this once keeps the models it served until a probe says otherwise.
                    probe = replace(previous, reason=f"last probe failed ({probe.reason}); "
                                                     "keeping the models of the previous probe")
                if previous is not None and _same_outcome(previous, probe):
                    continue  # a periodic re-probe that changes nothing costs no rebuild
                self._probes[url] = probe
                if probe.ok:
                    self._ever_seen_models.update(probe.models)
                touched.update(services)
            self._refresh(touched)

    def set_candidates(self, verdicts: Mapping[str, object | None]) -> None:
        """The outlier policy's changed verdicts (pod URL -> why, None: fine again): only the
        Services of those pods are rebuilt and published."""
        touched: set[str] = set()
        with self._lock:
            for url, found in verdicts.items():
                if found is None:
                    if self._candidates.pop(url, None) is None:
                        continue
                else:
                    reason = str(found)
                    if self._candidates.get(url) == reason:
                        continue
                    self._candidates[url] = reason
                touched.update(self._services_of.get(url, ()))
            if touched:
                self._refresh(touched)

    def set_probe(self, url: str, probe: ModelProbe) -> None:
        """Record one pod's model probe outcome."""
        self.set_probes([(url, probe)])

    # -- reads (cheap helpers over the current state) ------------------------------------------

    def has_ever_seen_model(self, model: str) -> bool:
        return model in self._ever_seen_models

    def sizes(self) -> dict[str, int]:
        """How many records each part holds (soak and leak checks)."""
        with self._lock:
            return {**self._store.counts(), "probes": len(self._probes), "added": len(self._added),
                    "logged_reasons": len(self._logged_reason),
                    "departed": len(self._departed), "candidates": len(self._candidates)}

    def publish_stats(self) -> tuple[int, float]:
        """(publishes, seconds spent rebuilding views and publishing) since start."""
        return self._publisher.publishes, self._refresh_seconds

    # -- internals (called with the lock held) -------------------------------------------------

    def _refresh(self, keys: Iterable[str]) -> None:
        """Rebuild the views of ``keys``, publish once, and tell the prober what changed."""
        started = time.perf_counter()
        moved: set[str] = set()  # pod URLs whose set of Services changed
        names: dict[str, str | None] = {}  # pod URL -> pod name, for the prober's logs
        ranks: dict[str, int] = {}  # pod URL -> its lowest place among a Service's ready pods
        renamed: list[tuple[str, str | None, str | None]] = []  # (Service, old URL, new URL)
        now = wall_time()
        self._forget_departed()
        for key in sorted(keys):  # a deterministic order for lists and logs
            old = self._publisher.get(key)
            record = self._store.services.get(key)
            if record is None:  # deleted, or slices of a Service the selector does not match
                if old is not None:
                    self._publisher.set_view(key, None)
                    renamed.append((key, old.url, None))
                self._added.pop(key, None)
                self._logged_reason.pop(key, None)
                self._endpoints.pop(key, None)
                moved |= self._index(key, _ready_urls(old), set())
                continue
            slices = tuple(self._store.slices_of(key))
            kept = self._endpoints.get(key)
            same = (kept is not None and old is not None and kept[0] is record
                    and len(kept[1]) == len(slices)
                    and all(a is b for a, b in zip(kept[1], slices, strict=True)))
            if same and kept is not None:  # the old view was built from these endpoints
                endpoints = kept[2]
            else:
                endpoints = service_endpoints(record, slices, self._config)
                self._endpoints[key] = (record, slices, endpoints)
            view = build_view(record, slices, self._probes,
                              config=self._config, added=self._added.get(key, now),
                              name_errors=self._name_errors, candidates=self._candidates,
                              ejected_before=old.ejected if old is not None else (),
                              endpoints=endpoints,
                              previous_pod_infos=old.pod_infos if old is not None else ())
            if self._check_names and (old.url if old is not None else None) != view.url:
                renamed.append((key, old.url if old is not None else None, view.url))
            if not same:  # else the same ready pods: nobody moved (a probe, a verdict)
                moved |= self._index(key, _ready_urls(old), _ready_urls(view))
                moved |= _readdressed(old, view)
                # a pod that can make its Service routable (the first of one that is not)
                # ranks 0; every other pod ranks after the first pods of all Services
                offset = 0 if not view.routable else 1
                for rank, pod in enumerate(view.ready_pods, start=offset):
                    names[pod.url] = pod.name
                    ranks[pod.url] = min(rank, ranks.get(pod.url, rank))
            if view.routable:
                self._added.setdefault(key, now)
            self._publisher.set_view(key, view)
            self._log_reason_change(view)
            self._log_outliers(old, view)
        snapshot = self._publisher.publish()
        if snapshot is not None:
            self.snapshot = snapshot
        self._refresh_seconds += time.perf_counter() - started
        if moved or renamed:
            # every Service's first pod before any Service's second: after a LIST of many
            # Services each becomes routable after one probe, not after all of its pods'
            order = sorted(moved, key=lambda url: (ranks.get(url, 0), url))
            self._tell_prober(order, names, ranks, renamed)

    def _index(self, key: str, before: set[str], after: set[str]) -> set[str]:
        """Update which Services each ready pod belongs to; returns the pods that moved."""
        of = self._services_of
        for url in before - after:
            services = of.get(url)
            if services is not None:
                rest = tuple(s for s in services if s != key)
                if rest:
                    of[url] = rest
                else:
                    del of[url]
        for url in after - before:
            services = of.get(url, ())
            if key not in services:
                of[url] = tuple(sorted((*services, key)))
        return before ^ after

    def _tell_prober(self, urls: Sequence[str], names: dict[str, str | None],
                     ranks: Mapping[str, int],
                     renamed: Sequence[tuple[str, str | None, str | None]] = ()) -> None:
        targets: list[ProbeTarget] = []
        gone: list[str] = []
        for url in urls:
            services = self._services_of.get(url)
            if services:
                name = names.get(url)
                probe = self._probes.get(url)
                known = (probe is not None and probe.ok
                         and (probe.pod_name is None or name is None or probe.pod_name == name))
                targets.append(ProbeTarget(url, name, services, fresh=not known,
                                           first=ranks.get(url, 1) == 0))
                self._departed.pop(url, None)  # back within the blip window: state kept
            else:
                gone.append(url)
                # a readiness blip keeps the pod's models until the blip window ends
                self._departed[url] = self._clock.monotonic()
                if self._blip_window <= 0:
                    self._forget_departed()
        for key, old_url, new_url in renamed:  # after the pods: a name check never gates routing
            if old_url is not None and self._name_owner.get(old_url) == key:
                del self._name_owner[old_url]
                self._name_errors.pop(old_url, None)
                gone.append(old_url)
            if new_url is not None:
                self._name_owner[new_url] = key
                targets.append(ProbeTarget(new_url, None, (key,), kind="name"))
        if self._on_probe_needed is not None:
            try:
                self._on_probe_needed(targets, gone)
            except Exception:
                log.exception("model prober notification failed")

    def _forget_departed(self) -> None:
        """Drop the state of pods that left longer than the blip window ago (oldest first)."""
        departed = self._departed
        if not departed:
            return
        limit = self._clock.monotonic() - self._blip_window
        while departed:
            url, since = next(iter(departed.items()))
            if since > limit and self._blip_window > 0:
                break
            del departed[url]
            if url not in self._services_of:
                self._probes.pop(url, None)
                self._candidates.pop(url, None)

    def _log_outliers(self, old: ServiceView | None, view: ServiceView) -> None:
        """One line per ejection (WARNING) and per return (INFO), per Service; counts them."""
        before = old.ejected if old is not None else {}
        if not before and not view.ejected and not view.failing_open and (
                old is None or not old.failing_open):
            return  # nothing ejected before or now (almost every rebuild)
        names = {pod.url: pod.name or pod.url for pod in view.pods}
        ready = {pod.url for pod in view.ready_pods}
        for url, reason in view.ejected.items():
            if url not in before:
                code = reason.split(":", 1)[0]
                self.ejections_by_reason[code] = self.ejections_by_reason.get(code, 0) + 1
                log.warning("service %s: pod %s (%s) ejected: %s", view.key,
                            names.get(url, url), url, reason)
        for url in before:
            if url not in view.ejected:
                if url not in ready:
                    log.info("service %s: pod %s (%s) is no ready endpoint any more (was "
                             "ejected)", view.key, names.get(url, url), url)
                else:
                    log.info("service %s: pod %s (%s) returned%s", view.key,
                             names.get(url, url), url,
                             " (failing open)" if url in view.failing_open else "")
        was_open = bool(old.failing_open) if old is not None else False
        if bool(view.failing_open) != was_open:
            if view.failing_open:
                log.warning("service %s: %s", view.key, view.outlier_note)
            else:
                log.info("service %s: no longer failing open", view.key)

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


def _same_outcome(before: ModelProbe, after: ModelProbe) -> bool:
    """Whether a view would show the same: the same failure, or the same models (``created``
    is the time of the answer in vLLM's cards, so it is not compared)."""
    if (before.ok != after.ok or before.reason != after.reason
            or before.pod_name != after.pod_name):
        return False
    return _signature(before) == _signature(after)


def _signature(probe: ModelProbe) -> list[tuple[str, str | None, str | None, bool]]:
    return sorted((m.id, m.parent, m.root, m.is_adapter) for m in probe.models.values())


def _readdressed(old: ServiceView | None, view: ServiceView) -> set[str]:
    """Ready pod URLs that now belong to another pod (a new pod given a freed address)."""
    if old is None:
        return set()
    before = {p.url: p.name for p in old.pods if p.routable}
    return {p.url for p in view.pods
            if p.routable and p.url in before and before[p.url] != p.name}


def _ready_urls(view: ServiceView | None) -> set[str]:
    return {p.url for p in view.pods if p.routable} if view is not None else set()
