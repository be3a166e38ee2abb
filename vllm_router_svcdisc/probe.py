"""``GET /v1/models`` of every ready pod, off the informer threads.

Why per pod and not through the Service's DNS name: a pooled keep-alive connection through a
Service VIP is pinned by kube-proxy to one pod, so a probe through the name keeps seeing that
pod's models — after a rollout to a new model name the Service would advertise the old one
for a whole interval, and a LoRA adapter loaded on some pods is seen or not by chance.

Pods are keys of one :class:`~vllm_router_svcdisc.workqueue.WorkQueue`: a pod that becomes a
ready endpoint is probed at once, then every ``interval``, or after its own backoff when its
probe failed; a small set of workers does the HTTP calls, so a slow or dead engine costs only
its own worker.  Results go back to the cache in batches (one publish for a wave of results).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tenacity
import urllib3

from .backoff import BackoffPolicy
from .cache import ModelProbe, ProbeTarget
from .http import EngineCallError, EnginePool, expect_ok, fetch
from .types import ModelInfo
from .workqueue import WorkQueue, worker_threads

log = logging.getLogger(__name__)

API_KEY_ENV = "VLLM_API_KEY"
MAX_MODELS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ProbeConfig:
    """Timing of model probes."""

    interval: float = 30.0          # re-probe a healthy Service this often (adapters come and go)
    timeout: float = 5.0            # per HTTP request
    attempts: int = 3               # tenacity attempts for transient failures
    retry_wait: float = 0.2
    failure_backoff: tuple[float, float] = (1.0, 30.0)  # first and max delay after a failed probe
    workers: int = 8


def parse_model_list(data: Any) -> dict[str, ModelInfo]:
    """``{"object": "list", "data": [cards]}`` → models by id; a wrong shape is an error.

    So is a list with no valid model card (``data`` of strings, cards without an ``id``, or
    none at all): a vLLM engine always serves its model, so that answer is as wrong as invalid
    JSON, and it is reported the same way (a WARNING naming the pod and its Services).
    """
    cards = data.get("data") if isinstance(data, dict) else None
    if not isinstance(cards, list):
        raise EngineCallError("/v1/models answered an unexpected shape (no 'data' list)",
                              cause="answer")
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
    return models


def fetch_models(session: EnginePool, url: str, api_key: str | None,
                 config: ProbeConfig) -> dict[str, ModelInfo]:
    """Fetch and parse ``<url>/v1/models`` with bounded tenacity retries on transient errors."""
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

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(
            lambda e: isinstance(e, EngineCallError) and e.transient and not session.closed),
        stop=tenacity.stop_after_attempt(config.attempts),
        wait=tenacity.wait_exponential(multiplier=config.retry_wait, max=2.0),
        reraise=True,
    )
    return retrying(attempt)


ProbeResults = Sequence[tuple[str, ModelProbe]]


def resolve_name(url: str) -> ModelProbe:
    """Whether ``url``'s host resolves (a Service's DNS name, which routers dial): ``ok``, or
    ``reason`` naming the DNS failure.  ``models`` stays empty: a name serves nothing."""
    parsed = urllib3.util.parse_url(url)
    try:
        socket.getaddrinfo(parsed.host or "", parsed.port or 80, type=socket.SOCK_STREAM)
    except OSError as exc:
        return ModelProbe(ok=False, time=time.monotonic(),
                          reason=f"{parsed.host}: {exc.strerror or exc}")
    return ModelProbe(ok=True, time=time.monotonic())


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
    ) -> None:
        self.config = config or ProbeConfig()
        self._record = record
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        # one probe per pod at a time; engines close idle connections long before the next
        self._session = session or EnginePool(1, hosts=self.config.workers)
        first, cap = self.config.failure_backoff
        self._queue: WorkQueue[str] = WorkQueue(backoff=BackoffPolicy(
            initial=first / 2, factor=2.0, jitter=1.0, cap=cap, reset_after=float("inf")))
        self._cond = threading.Condition()  # guards _targets, _results, _logged, counters
        self._targets: dict[str, ProbeTarget] = {}
        self._results: list[tuple[str, ModelProbe]] = []
        self._logged: dict[str, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._deliver_batches, name="svcdisc-prober",
                                        daemon=True)
        self._workers = worker_threads(self._queue, self._probe, count=self.config.workers,
                                       name="svcdisc-probe")
        self.probes_total = 0
        self.failures_total = 0

    def __repr__(self) -> str:  # never show the key
        key = "set" if self._api_key else "unset"
        return f"ModelProber(pods={len(self._targets)}, api_key={key})"

    def start(self) -> ModelProber:
        self._thread.start()
        for worker in self._workers:
            worker.start()
        return self

    def schedule(self, targets: Sequence[ProbeTarget], gone: Sequence[str]) -> None:
        """Called by the cache under its lock: probe these pods now, forget those.

        Only updates the prober's own state: never blocks, never calls back.
        """
        with self._cond:
            for target in targets:
                self._targets[target.url] = target
            for url in gone:
                self._targets.pop(url, None)
                self._logged.pop(url, None)
        for target in targets:
            self._queue.add(target.url)
        for url in gone:
            self._queue.forget(url)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every thread; probes in flight are aborted, not awaited."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._queue.shut_down()
        self._session.close()
        with self._cond:
            self._cond.notify_all()
        for thread in (self._thread, *self._workers):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # -- workers -------------------------------------------------------------------------------

    def _probe(self, url: str) -> None:
        with self._cond:
            target = self._targets.get(url)
        if target is None:  # no ready endpoint any more
            self._queue.forget(url)
            return
        started = time.monotonic()
        failure: EngineCallError | None = None
        if target.kind == "name":
            result = resolve_name(url)
        else:
            try:
                models = fetch_models(self._session, url, self._api_key, self.config)
                result = ModelProbe(ok=True, models=models, time=time.monotonic())
            except EngineCallError as exc:
                failure = exc
                result = ModelProbe(ok=False, reason=exc.reason, time=time.monotonic(),
                                    unreachable=exc.unreachable)
        if self._stop.is_set():
            return
        with self._cond:
            if url not in self._targets:
                return  # went away while we probed
            if target.kind == "pod":
                self.probes_total += 1
                self.failures_total += not result.ok
            self._results.append((url, result))
            self._cond.notify()
            changed = self._logged.get(url, "<new>") != result.reason
            self._logged[url] = result.reason
        if changed:
            self._log(target, result, failure)
        if result.ok:
            self._queue.forget(url)
            self._queue.add_after(url, started + self.config.interval - time.monotonic())
        else:
            self._queue.add_rate_limited(url)

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
            with self._cond:
                while not self._results and not self._stop.is_set():
                    self._cond.wait(1.0)
                results, self._results = self._results, []
            if results and not self._stop.is_set():
                try:
                    self._record(results)
                except Exception:  # the deliverer must outlive a failing consumer
                    log.exception("recording %d model probe results failed", len(results))
            self._stop.wait(BATCH_SECONDS)  # let the next wave gather
