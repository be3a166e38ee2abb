"""``GET /v1/models`` through each Service's DNS name, off the informer threads.

One scheduler thread decides which Service is due (new, changed, periodically, or retrying with
backoff after a failure); a small bounded pool does the HTTP calls, so a slow or dead engine
costs only its own worker and delays no other Service.  Results go back into the cache.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tenacity

from .cache import ModelProbe, ProbeTarget
from .http import EngineCallError, EnginePool, expect_ok, fetch
from .types import ModelInfo
from .workers import WorkerPool

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
    """``{"object": "list", "data": [cards]}`` → models by id; a wrong shape is an error."""
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


@dataclass
class _Due:
    url: str
    next_time: float
    failures: int = 0
    in_flight: bool = False


ProbeResults = Sequence[tuple[str, ModelProbe]]


class ModelProber:
    """Keeps each routable Service's model list fresh without touching informer threads.

    Results are handed to ``record`` in batches by the scheduler thread (never while holding
    the prober's lock): a wave of probes finishing together costs the cache one publish.
    """

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
        self._session = session or EnginePool(self.config.workers)
        self._due: dict[str, _Due] = {}
        self._results: list[tuple[str, ModelProbe]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._pool = WorkerPool(self.config.workers, "svcdisc-probe")
        self._thread = threading.Thread(target=self._run, name="svcdisc-prober", daemon=True)
        self._logged: dict[str, str | None] = {}
        self.probes_total = 0
        self.failures_total = 0

    def __repr__(self) -> str:  # never show the key
        key = "set" if self._api_key else "unset"
        return f"ModelProber(services={len(self._due)}, api_key={key})"

    def start(self) -> ModelProber:
        self._thread.start()
        return self

    def schedule(self, targets: Sequence[ProbeTarget], gone: Sequence[str]) -> None:
        """Called by the cache under its lock: probe these now, forget those.

        Only updates a dict under the prober's own condition: never blocks, never calls back.
        """
        now = time.monotonic()
        with self._cond:
            for key, url, _ready in targets:
                due = self._due.get(key)
                if due is None:
                    self._due[key] = _Due(url=url, next_time=now)
                else:
                    due.url = url
                    due.next_time = now
            for key in gone:
                self._due.pop(key, None)
                self._logged.pop(key, None)
            self._cond.notify()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the scheduler and every worker; probes in flight are aborted, not awaited."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._session.close()
        self._pool.close(deadline)
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                results, self._results = self._results, []
                now = time.monotonic()
                ready = [(k, d) for k, d in self._due.items()
                         if not d.in_flight and d.next_time <= now]
                for _key, due in ready:
                    due.in_flight = True
                if not ready and not results:
                    upcoming = [d.next_time for d in self._due.values() if not d.in_flight]
                    wait = min(upcoming, default=now + 1.0) - now
                    self._cond.wait(max(0.01, min(wait, 1.0)))
                    continue
            if results:
                self._deliver(results)
            for key, due in ready:
                try:
                    self._pool.submit(self._probe, key, due.url)
                except RuntimeError:  # pool shut down while stopping
                    return

    def _probe(self, key: str, url: str) -> None:
        started = time.monotonic()
        try:
            models = fetch_models(self._session, url, self._api_key, self.config)
            result = ModelProbe(ok=True, models=models, time=time.monotonic())
        except EngineCallError as exc:
            result = ModelProbe(ok=False, reason=exc.reason, time=time.monotonic(),
                                unreachable=exc.unreachable)
        except Exception as exc:  # a probe must never kill a worker silently
            log.exception("model probe of %s crashed", key)
            result = ModelProbe(ok=False, reason=f"probe crashed: {exc.__class__.__name__}",
                                time=time.monotonic())
        with self._cond:
            due = self._due.get(key)
            if due is None or self._stop:
                return  # the Service went away while we probed, or we are closing
            due.in_flight = False
            self.probes_total += 1
            self.failures_total += not result.ok
            if result.ok:
                due.failures = 0
                delay = self.config.interval
            else:
                due.failures += 1
                first, cap = self.config.failure_backoff
                delay = min(cap, first * 2 ** (due.failures - 1)) * (0.5 + random.random() / 2)
            if due.next_time <= started:  # not re-scheduled meanwhile by a change
                due.next_time = time.monotonic() + delay
            self._results.append((key, result))
            self._cond.notify()

    def _deliver(self, results: list[tuple[str, ModelProbe]]) -> None:
        for key, result in results:
            self._log_change(key, result)
        try:
            self._record(results)
        except Exception:  # the scheduler must outlive a failing consumer
            log.exception("recording %d model probe results failed", len(results))

    def _log_change(self, key: str, result: ModelProbe) -> None:
        reason = None if result.ok else result.reason
        if self._logged.get(key, "<new>") == reason:
            return
        self._logged[key] = reason
        if reason is None:
            log.info("service %s serves %s", key, ", ".join(sorted(result.models)) or "no models")
        else:
            log.warning("model probe of service %s failed (retrying with backoff): %s", key, reason)
