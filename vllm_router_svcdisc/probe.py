"""Internal: ``GET /v1/models`` of every ready pod, off the informer threads.

Why per pod and not through the Service's DNS name: a pooled keep-alive connection through a
Service VIP is pinned by kube-proxy to one pod, so a probe through the name keeps seeing that
pod's models — after a rollout to a new model name the Service would advertise the old one
for a whole interval, and a LoRA adapter loaded on some pods is seen or not by chance.

Probes follow change, not a timer alone.  Pods are keys of one
:class:`~vllm_router_svcdisc.poller.Poller`:

- a pod nobody has probed (a new pod, a new address) goes to an early lane of the work queue,
  so it is never queued behind re-probes — it is not routable until probed — and the first pod
  of each Service that is not routable yet goes before every other;
- a pod back from a readiness blip keeps its models (it is routable at once) and is re-probed
  soon, in the ordinary lane;
- a pod whose ``/metrics`` shows requests for a LoRA adapter its last probe did not list
  (``vllm:lora_requests_info``, read by scrapes and liveness checks) is re-probed at once;
- everything else is re-probed in the background: at most ``max_background_rate`` probes a
  second in all, each pod at most every ``interval`` (jittered), so at 100 000 pods a round
  takes ``100 000 / max_background_rate`` seconds and costs the same per second as at 2 500;
- a failed probe is retried after the pod's own backoff;
- at start-up (``hold_until_released``), until discovery's first LIST of Services and
  EndpointSlices is in, only the first pod of each Service is probed: the CPU that the LIST and
  those probes share goes to making every Service routable, not to pods that add nothing to
  that (the rest follow at once after, or ``STARTUP_HOLD_LIMIT`` seconds at the latest).

A small set of workers does the HTTP calls, so a slow or dead engine costs only its own worker.
Results go back to the cache in batches (one publish for a wave of results).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tenacity
import urllib3

from .backoff import BackoffPolicy
from .cache import ModelProbe, ProbeTarget
from .clock import SYSTEM_CLOCK, Clock
from .http import EngineCallError, EnginePool, expect_ok, fetch
from .poller import FAILED, GONE, HealthBook, Poller, Step
from .types import ModelInfo
from .workqueue import ORDINARY

#: Work-queue lanes: the first pod of a Service that is not routable yet, other pods whose
#: models are unknown (and adapter re-probes), then everything else.
FIRST, NEW = 0, 1
#: The longest the other lanes wait for :meth:`ModelProber.release` (a first LIST that keeps
#: failing part-way must not stop the probes of pods already listed).
STARTUP_HOLD_LIMIT = 30.0

log = logging.getLogger(__name__)

API_KEY_ENV = "VLLM_API_KEY"
MAX_MODELS_BYTES = 4 * 1024 * 1024


#: After a failed probe of a pod: 0.5-1 s, doubling, at most 30 s (per pod).
PROBE_BACKOFF = BackoffPolicy(initial=0.5, factor=2.0, jitter=1.0, cap=30.0,
                              reset_after=float("inf"))


@dataclass(frozen=True)
class ProbeConfig:
    """Timing of model probes.

    A pod is probed when it appears (first, before any re-probe), when it comes back from a
    readiness blip, and when its ``/metrics`` names an adapter it did not list; in the
    background each pod is re-probed every ``max(interval, pods / max_background_rate)``
    seconds (jittered by ±10 %), which is how an adapter loaded or unloaded without a request
    for it is seen.  ``backoff`` paces a failing pod's next probes.  ``failure_backoff``
    (first, max) is the older spelling, accepted with a DeprecationWarning: it means
    ``BackoffPolicy(initial=first / 2, factor=2, jitter=1, cap=max)``.
    """

    interval: float = 30.0          # background re-probe of a pod at most this often
    timeout: float = 5.0            # per HTTP request
    attempts: int = 3               # tenacity attempts for transient failures
    retry_wait: float = 0.2
    failure_backoff: tuple[float, float] | None = None  # deprecated: use backoff
    workers: int = 8
    backoff: BackoffPolicy = PROBE_BACKOFF
    max_background_rate: float = 50.0  # background re-probes per second, all pods together

    def __post_init__(self) -> None:
        if not self.interval > 0 or not self.max_background_rate > 0:
            raise ValueError("ProbeConfig needs interval > 0 and max_background_rate > 0")
        if self.workers < 1 or self.attempts < 1 or not self.timeout > 0:
            raise ValueError("ProbeConfig needs workers >= 1, attempts >= 1 and timeout > 0")
        if self.failure_backoff is not None:
            warnings.warn("ProbeConfig(failure_backoff=...) is deprecated: pass "
                          "backoff=BackoffPolicy(...)", DeprecationWarning, stacklevel=3)
            first, cap = self.failure_backoff
            object.__setattr__(self, "backoff", BackoffPolicy(
                initial=first / 2, factor=2.0, jitter=1.0, cap=cap, reset_after=float("inf")))


#: Card fields vLLM stamps anew on every answer: two answers differing only there are equal.
_VOLATILE_CARD_KEYS = frozenset({"created", "permission"})
_SHARED_LISTS_MAX = 1024


class _SharedModelLists:
    """One models mapping per distinct model list, shared by every pod that serves it.

    Parsed cards were the largest live library allocation in a traced run at 1 000 Services
    (each keeps its permission objects), and every pod of a Deployment answers the same list.
    An answer is compared without the fields vLLM stamps per answer (``created``,
    ``permission``), so the shared cards carry those of the first answer seen.  Bounded:
    cleared past 1 024 distinct lists.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lists: dict[tuple[Any, ...], dict[str, ModelInfo]] = {}

    def get(self, cards: list[Any]) -> dict[str, ModelInfo] | None:
        return self._lists.get(_signature(cards))

    def put(self, cards: list[Any], models: dict[str, ModelInfo]) -> dict[str, ModelInfo]:
        key = _signature(cards)
        with self._lock:
            if len(self._lists) >= _SHARED_LISTS_MAX:
                self._lists.clear()
            return self._lists.setdefault(key, models)


def _signature(cards: list[Any]) -> tuple[Any, ...]:
    return tuple(tuple(sorted((k, repr(v)) for k, v in card.items()
                              if k not in _VOLATILE_CARD_KEYS)) if isinstance(card, dict)
                 else repr(card) for card in cards)


SHARED_MODEL_LISTS = _SharedModelLists()


def parse_model_list(data: Any) -> dict[str, ModelInfo]:
    """``{"object": "list", "data": [cards]}`` → models by id; a wrong shape is an error.

    So is a list with no valid model card (``data`` of strings, cards without an ``id``, or
    none at all): a vLLM engine always serves its model, so that answer is as wrong as invalid
    JSON, and it is reported the same way (a WARNING naming the pod and its Services).

    The mapping returned is shared by every pod answering the same list (see
    :class:`_SharedModelLists`): read it, never mutate it.
    """
    cards = data.get("data") if isinstance(data, dict) else None
    if not isinstance(cards, list):
        raise EngineCallError("/v1/models answered an unexpected shape (no 'data' list)",
                              cause="answer")
    shared = SHARED_MODEL_LISTS.get(cards)
    if shared is not None:
        return shared
    models: dict[str, ModelInfo] = {}
    for card in cards:
        if not isinstance(card, dict):
            continue
        try:
            info = ModelInfo.from_dict(card)
        except ValueError:
            continue
        models[info.id] = info
    if not models:
        first = f", the first a {type(cards[0]).__name__}" if cards else ""
        raise EngineCallError(f"/v1/models listed no valid model card ({len(cards)} entries"
                              f"{first})", cause="answer")
    return SHARED_MODEL_LISTS.put(cards, models)


def fetch_models(session: EnginePool, url: str, api_key: str | None,
                 config: ProbeConfig, retrying: tenacity.Retrying | None = None
                 ) -> dict[str, ModelInfo]:
    """Fetch and parse ``<url>/v1/models`` with bounded tenacity retries on transient errors
    (``retrying``: a poller's, whose pauses close interrupts)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def attempt() -> dict[str, ModelInfo]:
        status, body = fetch(session, f"{url}/v1/models", headers=headers,
                             timeout=config.timeout, max_bytes=MAX_MODELS_BYTES)
        if status == 401:
            hint = ("the key in VLLM_API_KEY was refused" if api_key
                    else f"set {API_KEY_ENV} to the engines' API key")
            raise EngineCallError(f"401 Unauthorized from /v1/models: {hint}", cause="http",
                                  status=401)
        expect_ok(status, "/v1/models")
        try:
            data = json.loads(body)
        except ValueError:
            raise EngineCallError("/v1/models answered invalid JSON", cause="answer") from None
        return parse_model_list(data)

    if retrying is None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, EngineCallError) and e.transient and not session.closed),
            stop=tenacity.stop_after_attempt(config.attempts),
            wait=tenacity.wait_exponential(multiplier=config.retry_wait, max=2.0),
            reraise=True,
        )
    return retrying(attempt)


ProbeResults = Sequence[tuple[str, ModelProbe]]


def resolve_name(url: str, clock: Clock = SYSTEM_CLOCK) -> ModelProbe:
    """Whether ``url``'s host resolves (a Service's DNS name, which routers dial): ``ok``, or
    ``reason`` naming the DNS failure.  ``models`` stays empty: a name serves nothing."""
    parsed = urllib3.util.parse_url(url)
    try:
        socket.getaddrinfo(parsed.host or "", parsed.port or 80, type=socket.SOCK_STREAM)
    except OSError as exc:
        return ModelProbe(ok=False, time=clock.monotonic(),
                          reason=f"{parsed.host}: {exc.strerror or exc}")
    return ModelProbe(ok=True, time=clock.monotonic())


#: Results wait at most this long to be delivered with others (one publish per batch).
BATCH_SECONDS = 0.05


class ModelProber:
    """Keeps every ready pod's model list fresh without touching informer threads."""

    def __init__(
        self,
        record: Callable[[ProbeResults], None],
        *,
        config: ProbeConfig | None = None,
        api_key: str | None = None,
        session: EnginePool | None = None,
        clock: Clock = SYSTEM_CLOCK,
        health: HealthBook | None = None,
        fetch: Callable[[str], dict[str, ModelInfo]] | None = None,
        hold_until_released: bool = False,
    ) -> None:
        """``fetch``: a pod URL's models (raising EngineCallError); the real one does HTTP,
        unit tests script it.  ``hold_until_released``: only the first lane runs until
        :meth:`release` (discovery calls it when its informers have synced)."""
        self.config = config = config or ProbeConfig()
        self._fetch = fetch or self._fetch_models
        self._record = record
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        # one probe per pod at a time; engines close idle connections long before the next,
        # so each probe has a connection of its own
        self._session = session or EnginePool(1, hosts=config.workers, keep_alive=False)
        self._clock = clock
        self._health = health
        self._poller: Poller[str] = Poller("svcdisc-probe", self._probe, interval=config.interval,
                                           workers=config.workers, backoff=config.backoff,
                                           clock=clock)
        self._retrying = self._poller.retrying(
            attempts=config.attempts, within=None, wait=config.retry_wait,
            retry_if=lambda e: (isinstance(e, EngineCallError) and e.transient
                                and not self._session.closed))
        self._cond = threading.Condition()  # guards everything below, and the counters
        self._targets: dict[str, ProbeTarget] = {}
        self._results: list[tuple[str, ModelProbe]] = []
        self._logged: dict[str, str | None] = {}
        self._models_of: dict[str, frozenset[str]] = {}  # pod URL -> ids its last probe listed
        self._interned: dict[frozenset[str], frozenset[str]] = {}  # one set per distinct list
        self._asked: dict[str, frozenset[str]] = {}  # pod URL -> adapters it was re-probed for
        self._next_slot = 0.0  # the earliest time the next background re-probe may run
        # URL -> lane of pods waiting for release(); None once released (or never held)
        self._held: dict[str, int] | None = {} if hold_until_released else None
        self._hold_ends = clock.monotonic() + STARTUP_HOLD_LIMIT
        self._random = random.Random()
        self._stop = self._poller.stopping
        self._thread = threading.Thread(target=self._deliver_batches, name="svcdisc-prober",
                                        daemon=True)
        self.probes_total = 0
        self.failures_total = 0
        self.adapter_reprobes_total = 0  # re-probes asked for by an unlisted adapter

    def __repr__(self) -> str:  # never show the key
        key = "set" if self._api_key else "unset"
        return f"ModelProber(pods={len(self._targets)}, api_key={key})"

    def start(self) -> ModelProber:
        self._thread.start()
        self._poller.start()
        return self

    def schedule(self, targets: Sequence[ProbeTarget], gone: Sequence[str]) -> None:
        """Called by the cache under its lock: these pods became (or stay, with other Services)
        ready endpoints, those are no endpoint any more.

        A fresh pod is probed first; a pod back from a blip soon after (it keeps its models
        meanwhile); a pod that only changed Services keeps its schedule.  Only updates the
        prober's own state: never blocks, never calls back.
        """
        lanes: list[tuple[str, int]] = []  # (URL, lane)
        with self._cond:
            for target in targets:
                tracked = target.url in self._targets
                self._targets[target.url] = target
                if target.kind == "pod" and target.fresh:
                    lanes.append((target.url, FIRST if target.first else NEW))
                elif not tracked:
                    lanes.append((target.url, ORDINARY))
            for url in gone:
                self._targets.pop(url, None)
                self._logged.pop(url, None)
                self._models_of.pop(url, None)
                self._asked.pop(url, None)
            held = self._held
            if held is not None:
                for url in gone:
                    held.pop(url, None)
                held.update((url, lane) for url, lane in lanes if lane != FIRST)
                lanes = [(url, lane) for url, lane in lanes if lane == FIRST]
        for url, lane in lanes:
            self._poller.add(url, lane=lane)
        for url in gone:
            self._poller.forget(url)

    def release(self) -> None:
        """Let every lane run: the pods held since start-up are queued (each in its lane)."""
        with self._cond:
            held, self._held = self._held, None
            if not held:
                return
            queued = [(url, lane) for url, lane in held.items() if url in self._targets]
        for url, lane in queued:
            self._poller.add(url, lane=lane)

    def _end_hold_if_due(self) -> None:
        """Release the held lanes ``STARTUP_HOLD_LIMIT`` seconds after start at the latest."""
        if self._held is not None and self._clock.monotonic() >= self._hold_ends:
            if self._held:
                log.warning("the first LIST of Services and EndpointSlices is not in after "
                            "%g s: probing every listed pod anyway", STARTUP_HOLD_LIMIT)
            self.release()

    def adapters_seen(self, url: str, adapters: frozenset[str]) -> None:
        """``url``'s ``/metrics`` names requests for these LoRA adapters: a pod running one its
        last probe did not list is re-probed at once (once per new set of such adapters, so an
        adapter ``/v1/models`` never lists costs one probe, not one per reading)."""
        with self._cond:
            listed = self._models_of.get(url)
            if listed is None:
                return  # not probed yet, or no pod of ours: its first probe is on its way
            unlisted = adapters - listed
            if not unlisted or unlisted <= self._asked.get(url, frozenset()):
                return
            self._asked[url] = unlisted | self._asked.get(url, frozenset())
            self.adapter_reprobes_total += 1
        log.info("pod %s runs LoRA adapter(s) %s it did not list: probing its models again",
                 url, ", ".join(sorted(unlisted)))
        self._poller.add(url, lane=NEW)

    def _background_delay(self) -> float:
        """Seconds until a pod's next background re-probe: ``interval`` (±10 %), later when
        the slots of ``max_background_rate`` are taken — but never later than one round of
        every tracked pod at that rate, so slots of pods that left are not waited out."""
        config = self.config
        now = self._clock.monotonic()
        spread = 0.9 + 0.2 * self._random.random()
        with self._cond:
            pods = len(self._targets)
            latest = now + max(config.interval, pods / config.max_background_rate) * 1.1
            due = min(max(now + config.interval * spread, self._next_slot), latest)
            self._next_slot = due + 1.0 / config.max_background_rate
        return due - now

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every thread; probes in flight are aborted, not awaited."""
        deadline = SYSTEM_CLOCK.monotonic() + timeout  # a real deadline for joining threads
        self._stop.set()
        self._session.close()
        with self._cond:
            self._cond.notify_all()
        self._poller.close(timeout)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - SYSTEM_CLOCK.monotonic()))

    # -- workers -------------------------------------------------------------------------------

    def _probe(self, url: str) -> Step:
        with self._cond:
            target = self._targets.get(url)
        if target is None:  # no ready endpoint any more
            return GONE
        failure: EngineCallError | None = None
        if target.kind == "name":
            result = resolve_name(url, self._clock)
        else:
            try:
                models = self._fetch(url)
                result = ModelProbe(ok=True, models=models, time=self._clock.monotonic(),
                                    pod_name=target.pod_name)
            except EngineCallError as exc:
                failure = exc
                result = ModelProbe(ok=False, reason=exc.reason, time=self._clock.monotonic(),
                                    unreachable=exc.unreachable, pod_name=target.pod_name)
        if self._stop.is_set():
            return GONE
        with self._cond:
            if url not in self._targets:
                return GONE  # went away while we probed
            if target.kind == "pod":
                self.probes_total += 1
                self.failures_total += not result.ok
                if result.ok:
                    ids = frozenset(result.models)
                    self._models_of[url] = self._interned.setdefault(ids, ids)
                    if len(self._interned) > 4096:  # a bound, whatever adapters come and go
                        self._interned.clear()
            self._results.append((url, result))
            self._cond.notify()
            changed = self._logged.get(url, "<new>") != result.reason
            self._logged[url] = result.reason
        if changed:
            self._log(target, result, failure)
        if self._health is not None and target.kind == "pod":
            if failure is not None:
                self._health.error(url, failure)
            elif result.ok:
                self._health.success(url)
        return Step(True, after=self._background_delay()) if result.ok else FAILED

    def _fetch_models(self, url: str) -> dict[str, ModelInfo]:
        return fetch_models(self._session, url, self._api_key, self.config, self._retrying)

    def _log(self, target: ProbeTarget, result: ModelProbe,
             failure: EngineCallError | None) -> None:
        """One line per change of a pod's state: a wrong answer is a WARNING, no answer INFO."""
        if target.kind == "name":
            if result.ok:
                log.info("the name of service %s resolves", target.services[0])
            else:
                log.warning("service %s: %s", target.services[0], result.reason)
            return
        pod = f"pod {target.pod_name or target.url} ({target.url}) of {', '.join(target.services)}"
        if result.ok:
            log.info("%s serves %s", pod, ", ".join(sorted(result.models)) or "no models")
        elif failure is not None and failure.unreachable:
            log.info("model probe of %s got no answer (retrying with backoff): %s", pod,
                     result.reason)
        else:
            log.warning("model probe of %s failed (retrying with backoff): %s", pod,
                        result.reason)

    # -- delivery ------------------------------------------------------------------------------

    def _deliver_batches(self) -> None:
        """Hand results to the cache in batches, never while holding the prober's lock."""
        while not self._stop.is_set():
            self._end_hold_if_due()
            with self._cond:
                while not self._results and not self._stop.is_set():
                    self._cond.wait(1.0)
                    if self._held is not None and self._clock.monotonic() >= self._hold_ends:
                        break
                results, self._results = self._results, []
            if results and not self._stop.is_set():
                try:
                    self._record(results)
                except Exception:  # the deliverer must outlive a failing consumer
                    log.exception("recording %d model probe results failed", len(results))
            self._stop.wait(BATCH_SECONDS)  # let the next wave gather
