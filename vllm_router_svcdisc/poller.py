"""Internal: one per-pod loop, and each pod's health record: what the prober, the scraper and
discovery's liveness checks are built on.

:class:`Poller` composes a :class:`~vllm_router_svcdisc.workqueue.WorkQueue` (keys are pod
URLs) with a bounded set of workers, in the manner of a client-go controller: a worker takes a
key, calls the owner's handler, and applies one requeue rule to the :class:`Step` it returns —
*ok*: forget the key's backoff and run it again one interval after this run started; *failed*:
run it again after its own rate-limited backoff (one :class:`~vllm_router_svcdisc.backoff.
BackoffPolicy` value); *gone*: forget it.  A handler may also name the delay itself (a liveness
check skipped because a fresher result exists, an ejected pod's re-check).  ``close`` stops the
workers within a deadline, and every rule reads the injected clock, so the unit tests drive a
poller on a :class:`~vllm_router_svcdisc.clock.FakeClock` with :meth:`Poller.run_ready`,
without threads or sleeping.

:class:`HealthBook` holds one :class:`PodHealth` per pod: when it last answered, consecutive
failures by class, and whether its engine makes progress.  Scrapes, model probes, liveness
checks and router-fed outcomes all write to the same record; the ejection policy
(``outliers.py``) reads it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import tenacity

from .backoff import BackoffPolicy
from .clock import SYSTEM_CLOCK, Clock
from .http import EngineCallError
from .workqueue import ORDINARY, WorkQueue, worker_threads

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

log = logging.getLogger(__name__)


# -- the loop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What one run of a key says about its next run.

    ``ok`` True: forget its backoff, next run ``interval`` after this one started; False: next
    run after its backoff; None: the key is gone, forget it.  ``after`` (seconds from now)
    overrides the delay either way.
    """

    ok: bool | None
    after: float | None = None


OK = Step(True)
FAILED = Step(False)
GONE = Step(None)


class Poller(Generic[K]):
    """A work queue of keys, ``workers`` threads, the requeue rule and a bounded close."""

    def __init__(self, name: str, handle: Callable[[K], Step], *, interval: float,
                 workers: int, backoff: BackoffPolicy, clock: Clock = SYSTEM_CLOCK) -> None:
        if interval <= 0 or workers < 1:
            raise ValueError("a poller needs interval > 0 and workers >= 1")
        self.name = name
        self.interval = interval
        self.clock = clock
        self._handle = handle
        self.queue: WorkQueue[K] = WorkQueue(backoff=backoff, clock=clock)
        self._stop = threading.Event()
        self.threads = worker_threads(self.queue, self._run_in_worker, count=workers, name=name)
        self._started = False

    @property
    def stopping(self) -> threading.Event:
        """Set once :meth:`close` began: handlers and their retries stop waiting on it."""
        return self._stop

    def start(self) -> Poller[K]:
        if not self._started:
            self._started = True
            for thread in self.threads:
                thread.start()
        return self

    def add(self, key: K, *, lane: int = ORDINARY) -> None:
        """Run ``key`` now (coalesced if already queued); a lower ``lane`` runs first."""
        self.queue.add(key, lane=lane)

    def add_after(self, key: K, delay: float) -> None:
        self.queue.add_after(key, delay)

    def forget(self, key: K) -> None:
        """``key`` left: its backoff ends; a queued run finds it gone and returns GONE."""
        self.queue.forget(key)

    def pause(self, seconds: float) -> None:
        """Wait (interrupted by close) on the poller's clock: a handler's in-call retry pause."""
        self.clock.wait(self._stop, seconds)

    def retrying(self, *, attempts: int, within: float | None, wait: float,
                 retry_if: Callable[[BaseException], bool]) -> tenacity.Retrying:
        """The one spelling of an in-call retry: ``attempts`` tries (bounded by ``within``
        seconds), ``wait`` apart, paused on this poller's clock so close interrupts it."""
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(attempts)
        if within is not None:
            stop = stop | tenacity.stop_after_delay(within)
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: retry_if(e) and not self._stop.is_set()),
            stop=stop, wait=tenacity.wait_fixed(wait), sleep=self.pause, reraise=True)

    def run(self, key: K) -> Step:
        """Run ``key``'s handler once and apply the requeue rule (what a worker does)."""
        started = self.clock.monotonic()
        try:
            step = self._handle(key)
        except Exception:  # a worker must never die; a crashing handler counts as a failure
            log.exception("%s: processing %r failed", self.name, key)
            step = FAILED
        if self._stop.is_set():
            return step
        if step.ok is None:
            self.queue.forget(key)
        elif step.ok:
            self.queue.forget(key)
            delay = step.after if step.after is not None else (
                started + self.interval - self.clock.monotonic())
            self.queue.add_after(key, delay)
        elif step.after is not None:
            self.queue.add_after(key, step.after)
        else:
            self.queue.add_rate_limited(key)
        return step

    def run_ready(self, limit: int = 10_000) -> list[K]:
        """Run every key due now in the calling thread (fake-clock tests); returns them."""
        ran: list[K] = []
        while len(ran) < limit and (key := self.queue.get(timeout=0)) is not None:
            try:
                self.run(key)
            finally:
                self.queue.done(key)
            ran.append(key)
        return ran

    def close(self, timeout: float = 2.0) -> None:
        """Stop the workers: queued runs are dropped, runs in flight are not awaited past
        ``timeout`` (the owner aborts their I/O first)."""
        deadline = SYSTEM_CLOCK.monotonic() + timeout
        self._stop.set()
        self.queue.shut_down()
        for thread in self.threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - SYSTEM_CLOCK.monotonic()))

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def _run_in_worker(self, key: K) -> None:
        self.run(key)


# -- the health record ----------------------------------------------------------------------


class Failure(enum.StrEnum):
    """Classes of a failed exchange with a pod, by what they say about it."""

    REFUSED = "refused"                  # connection refused or reset: nothing listens
    CONNECT_TIMEOUT = "connect_timeout"  # no SYN-ACK: the node or its network is gone
    READ_TIMEOUT = "read_timeout"        # connected, no answer in time: slow (or hung)
    HTTP_5XX = "http_5xx"                # the engine answered that it is failing
    BAD_ANSWER = "bad_answer"            # 200 (or another status) with unusable content


CONNECT_FAILURES = frozenset({Failure.REFUSED, Failure.CONNECT_TIMEOUT})
ANSWERS = frozenset({Failure.HTTP_5XX, Failure.BAD_ANSWER})  # failures that still answered


def classify(error: EngineCallError) -> Failure:
    """The failure class of an engine call error (``http.EngineCallError.failure`` when set)."""
    failure = getattr(error, "failure", None)
    if failure is not None:
        return Failure(failure)
    if error.status is not None and error.status >= 500:
        return Failure.HTTP_5XX
    if error.cause == "connection":
        return Failure.REFUSED
    if error.cause == "timeout":
        return Failure.READ_TIMEOUT
    return Failure.BAD_ANSWER


@dataclass(slots=True)
class PodHealth:
    """Everything learnt about one pod's engine; written under the book's lock, read as a copy.

    ``failures`` counts consecutive failures by class since the last success (a success clears
    it); ``failing_since`` is the first of them.  Progress: ``tokens`` is the last seen
    ``vllm:prompt_tokens_total + vllm:generation_tokens_total`` (None: the page has neither),
    ``running`` the last ``vllm:num_requests_running``, ``stuck_since`` when requests started
    running without the counters moving (None while they move or nothing runs).
    ``reachable_at`` is the last proof that the pod can be reached — any answer (a success, a
    5xx, a wrong answer) or a connection accepted — as opposed to a read timeout alone, which
    may come from a connection opened before the node died.
    """

    url: str
    last_success: float | None = None
    last_result: float | None = None
    reachable_at: float | None = None  # last proof it is reachable: an answer, a connect
    last_connect_failure: float | None = None
    connect_failure: Failure | None = None  # the class of that last connect failure
    connect_reason: str | None = None
    failing_since: float | None = None
    failures: dict[Failure, int] = field(default_factory=dict)
    last_failure: Failure | None = None
    last_reason: str | None = None
    tokens: float | None = None
    running: float = 0.0
    progress_read_at: float | None = None
    stuck_since: float | None = None
    adapters: frozenset[str] = frozenset()  # LoRA adapters of running or waiting requests
    # the policy's state (written back by discovery's liveness loop)
    ejected_reason: str | None = None
    ejected_at: float | None = None
    times_ejected: int = 0
    admitted_at: float | None = None
    departed_at: float | None = None  # not a ready endpoint since then (kept for a blip)

    def copy(self) -> PodHealth:
        clone = PodHealth(**{name: getattr(self, name) for name in self.__dataclass_fields__})
        clone.failures = dict(self.failures)
        return clone

    def consecutive(self, classes: frozenset[Failure] | None = None) -> int:
        """Consecutive failures (of these classes) since the last success."""
        return sum(n for failure, n in self.failures.items()
                   if classes is None or failure in classes)


class HealthBook:
    """One :class:`PodHealth` per pod URL, shared by every source of results; thread-safe.

    ``on_change`` is called (outside the lock) with a URL whose record changed in a way the
    policy may care about: discovery re-evaluates that pod.  ``on_adapters`` is called (outside
    the lock) with a URL and the LoRA adapters its ``/metrics`` names when that set changed:
    the model prober re-probes a pod that runs an adapter its last probe did not list.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK,
                 on_change: Callable[[str], None] | None = None,
                 on_adapters: Callable[[str, frozenset[str]], None] | None = None) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._pods: dict[str, PodHealth] = {}
        self.on_change = on_change
        self.on_adapters = on_adapters

    def __len__(self) -> int:
        return len(self._pods)

    def __contains__(self, url: object) -> bool:
        return url in self._pods

    def get(self, url: str) -> PodHealth | None:
        """A copy of ``url``'s record (None when unknown)."""
        with self._lock:
            record = self._pods.get(url)
            return record.copy() if record is not None else None

    def urls(self) -> list[str]:
        with self._lock:
            return list(self._pods)

    def peek(self, url: str) -> PodHealth | None:
        """``url``'s live record, for a quick look without the lock or a copy (each field
        read is atomic; a decision that needs a consistent record takes :meth:`get`)."""
        return self._pods.get(url)

    def ensure(self, url: str) -> None:
        """Start (or resume, after a readiness blip) ``url``'s record."""
        with self._lock:
            record = self._pods.get(url)
            if record is None:
                self._pods[url] = PodHealth(url)
            else:
                record.departed_at = None

    def depart(self, url: str) -> None:
        """``url`` is no ready endpoint any more: kept for a blip until :meth:`prune`."""
        with self._lock:
            record = self._pods.get(url)
            if record is not None and record.departed_at is None:
                record.departed_at = self.clock.monotonic()

    def prune(self, keep_for: float) -> list[str]:
        """Drop records departed longer than ``keep_for`` ago; returns their URLs."""
        now = self.clock.monotonic()
        with self._lock:
            gone = [url for url, r in self._pods.items()
                    if r.departed_at is not None and now - r.departed_at >= keep_for]
            for url in gone:
                del self._pods[url]
        return gone

    # -- results -------------------------------------------------------------------------------

    def success(self, url: str, *, tokens: float | None = None, running: float | None = None,
                adapters: frozenset[str] | None = None, at: float | None = None) -> None:
        """An exchange with ``url`` succeeded; ``tokens``/``running``/``adapters`` when it read
        /metrics."""
        if adapters is not None:
            self._note_adapters(url, adapters)

        def apply(record: PodHealth, now: float) -> bool:
            changed = bool(record.failures)
            record.last_success = record.last_result = record.reachable_at = now
            record.failing_since = None
            record.failures.clear()
            record.last_failure = None
            record.last_reason = None
            if running is not None:
                changed |= _progress(record, tokens, running, now)
            return changed

        self._update(url, at, apply)

    def failure(self, url: str, failure: Failure, reason: str, *,
                at: float | None = None, reachable: bool | None = None) -> None:
        """An exchange with ``url`` failed with ``failure``; ``reachable``: whether it proved
        the pod reachable (default: an answer did, a timeout or a connect failure did not)."""
        proof = failure in ANSWERS if reachable is None else reachable

        def apply(record: PodHealth, now: float) -> bool:
            record.last_result = now
            if proof:
                record.reachable_at = now
            if failure in CONNECT_FAILURES:
                record.last_connect_failure = now
                record.connect_failure = failure
                record.connect_reason = reason
            if record.failing_since is None:
                record.failing_since = now
            record.failures[failure] = record.failures.get(failure, 0) + 1
            record.last_failure = failure
            record.last_reason = reason
            return True

        self._update(url, at, apply)

    def _note_adapters(self, url: str, adapters: frozenset[str]) -> None:
        with self._lock:
            record = self._pods.get(url)
            if record is None or record.adapters == adapters:
                return
            record.adapters = adapters
        if self.on_adapters is not None and adapters:
            self.on_adapters(url, adapters)

    def _update(self, url: str, at: float | None,
                apply: Callable[[PodHealth, float], bool]) -> None:
        """Apply a result to ``url``'s record (unknown URLs are ignored); tell ``on_change``."""
        now = self.clock.monotonic() if at is None else at
        with self._lock:
            record = self._pods.get(url)
            if record is None:
                return
            changed = apply(record, now)
        if changed and self.on_change is not None:
            self.on_change(url)

    def error(self, url: str, error: EngineCallError, *, at: float | None = None) -> None:
        self.failure(url, classify(error), error.reason, at=at)

    def set_policy_state(self, url: str, *, ejected_reason: str | None) -> tuple[bool, int]:
        """Record the policy's decision; returns (changed, times ejected)."""
        now = self.clock.monotonic()
        with self._lock:
            record = self._pods.get(url)
            if record is None or record.ejected_reason == ejected_reason:
                return False, record.times_ejected if record is not None else 0
            if ejected_reason is not None:
                if record.ejected_reason is None:
                    record.times_ejected += 1
                    record.ejected_at = now
            else:
                record.ejected_at = None
                record.admitted_at = now
            record.ejected_reason = ejected_reason
            return True, record.times_ejected

    def set_times_ejected(self, url: str, times: int) -> None:
        with self._lock:
            record = self._pods.get(url)
            if record is not None:
                record.times_ejected = times

    def records(self) -> Iterator[PodHealth]:
        """Copies of every record (telemetry, tests)."""
        with self._lock:
            copies = [record.copy() for record in self._pods.values()]
        return iter(copies)


def _progress(record: PodHealth, tokens: float | None, running: float, now: float) -> bool:
    """Fold one /metrics reading into the progress state; True when ``stuck_since`` changed."""
    before = record.stuck_since
    previous = record.tokens
    if tokens is None or running <= 0:
        record.stuck_since = None  # nothing runs (or no counters): nothing can be stuck
    elif previous is None or tokens != previous:
        record.stuck_since = None  # the counters moved (a reset counts as movement)
    elif record.stuck_since is None:
        # running and the counters did not move since the previous reading: stuck since then
        # (since the previous reading if requests ran then too; else since now)
        earlier = record.progress_read_at is not None and record.running > 0
        record.stuck_since = record.progress_read_at if earlier else now
    record.tokens = tokens
    record.running = running
    record.progress_read_at = now
    return before != record.stuck_since
