"""Internal: discovery's own per-pod liveness loop, and the glue between health records and
the policy.

Every ready pod is a key of one :class:`~vllm_router_svcdisc.poller.Poller`.  A check is one
keep-alive ``GET /health`` (``/metrics`` every ``progress_interval``, which also says whether
the engine makes progress) with a short connect timeout.  It is skipped when the pod gave a
result (scrape, model probe, router outcome) more recently than one interval: those are free.
A check that connected and then timed out asks the kernel once more with a bare TCP connect —
a node that is gone answers no SYN (connect timeout), a live but busy engine still accepts —
so a dead node is told from a slow engine in one check.

After every result the pod's record goes through :func:`~vllm_router_svcdisc.outliers.verdict`;
a change of verdict is handed to the cache, which applies the per-Service cap and republishes
only the Services of that pod.  An ejected pod is re-checked after
:func:`~vllm_router_svcdisc.outliers.recheck_delay`.

The interval stretches with the number of pods so checks stay within ``cpu_budget``: the CPU
time of each check is measured on its worker thread (an exponential average), and the interval
is ``max(liveness_interval, pods x cost / cpu_budget)``.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence

import urllib3

from .backoff import BackoffPolicy
from .clock import SYSTEM_CLOCK, Clock
from .http import EngineCallError, EnginePool, expect_ok, fetch
from .outliers import OutlierConfig, Verdict, decayed_times, liveness_interval, recheck_delay
from .outliers import verdict as judge
from .poller import FAILED, GONE, Failure, HealthBook, Poller, Step
from .vllm_metrics import MetricsParseError, parse_progress

log = logging.getLogger(__name__)

HEALTH_MAX_BYTES = 64 * 1024
METRICS_MAX_BYTES = 8 * 1024 * 1024

Verdicts = Callable[[dict[str, Verdict | None]], None]
#: One exchange with a pod (URL, whether to read /metrics) that records its result in the
#: book and says whether the pod answered: the real one does HTTP, unit tests script it.
Exchange = Callable[[str, bool], bool]


class Liveness:
    """Checks every ready pod, keeps :class:`HealthBook` records, reports verdict changes."""

    def __init__(self, book: HealthBook, config: OutlierConfig, on_verdicts: Verdicts, *,
                 clock: Clock = SYSTEM_CLOCK, session: EnginePool | None = None,
                 exchange: Exchange | None = None,
                 cpu_time: Callable[[], float] = time.thread_time,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self._cpu_time = cpu_time  # CPU seconds of the calling thread (what a check costs)
        self._exchange: Exchange = exchange or self._probe
        self.book = book
        self._on_verdicts = on_verdicts
        self.clock = clock
        self._session = session or EnginePool(1, hosts=4096)
        self.poller: Poller[str] = Poller(
            "svcdisc-liveness", self._check, interval=config.liveness_interval,
            workers=config.workers, clock=clock,
            backoff=BackoffPolicy(initial=config.liveness_interval / 4, factor=2.0, jitter=0.5,
                                  cap=config.liveness_interval, reset_after=float("inf")))
        self._lock = threading.Lock()  # guards _tracked, the counters and the cost estimate
        self._tracked: set[str] = set()
        self._departed: list[str] = []  # their idle connections are closed by the next check
        self._judging = threading.Lock()  # one judgement at a time: verdicts reach the cache
        #                                   in the order they were made
        self._pruned_at = clock.monotonic()
        self._random = rng or random.Random()  # where in its first interval a pod is checked
        self.cost_per_check = 0.0003  # CPU-seconds; replaced by the measured average
        self._first_checks_until = 0.0  # when the first checks of pods tracked so far end
        self._next_slot = 0.0  # the budget's next free check slot
        self._slots: dict[str, float] = {}  # pod URL -> the slot its deferred check holds
        self.checks_total = 0
        self.skipped_total = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Liveness:
        if self.config.enabled:
            self.poller.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        self._session.close()
        self.poller.close(timeout)

    def track(self, ready: Sequence[str], gone: Sequence[str]) -> None:
        """Pods that became ready endpoints and ones that stopped being one (their records
        are kept for a readiness blip).  Never blocks.

        A pod's first check comes at a random point of one interval: the model probe that a
        new or returning pod gets at once is its first result anyway.  Pods arriving in bulk
        (100 000 listed at start-up, in parts) have their first checks spread at the rate the
        CPU budget allows, each part after the one before: stretching the interval alone would
        let every part start its own round at once."""
        now = self.clock.monotonic()
        with self._lock:
            self._tracked.update(ready)
            self._tracked.difference_update(gone)
            if self.config.enabled:  # else no check runs and nothing was connected
                self._departed.extend(gone)
            for url in gone:
                self._slots.pop(url, None)
            # the budget's share of these first checks, after the share of earlier ones
            start = max(now, self._first_checks_until)
            share = len(ready) * self.cost_per_check / self.config.cpu_budget
            self._first_checks_until = start + share
        for url in gone:
            self.book.depart(url)
            self.poller.forget(url)
        self._prune()
        window = max(share, self.config.liveness_interval)
        for url in ready:
            self.book.ensure(url)
            if self.config.enabled:
                self.poller.add_after(url, start - now + window * self._random.random())

    def _prune(self) -> None:
        """Forget records departed longer than the blip window ago (one sweep a second)."""
        now = self.clock.monotonic()
        if now - self._pruned_at >= 1.0:
            self._pruned_at = now
            self.book.prune(self.config.blip_window)

    @property
    def interval(self) -> float:
        """The current liveness interval (stretched past the CPU budget)."""
        return liveness_interval(len(self._tracked), self.cost_per_check, self.config)

    # -- the policy ----------------------------------------------------------------------------

    def evaluate(self, url: str) -> Verdict | None:
        """Judge ``url``'s record now; a changed verdict goes to the cache."""
        with self._judging:
            record = self.book.get(url)
            if record is None or record.departed_at is not None:
                return None
            now = self.clock.monotonic()
            times = decayed_times(record, self.config, now)
            if times != record.times_ejected:
                self.book.set_times_ejected(url, times)
            found = judge(record, self.config, now)
            reason = str(found) if found is not None else None
            changed, _times = self.book.set_policy_state(url, ejected_reason=reason)
            if changed:
                self._on_verdicts({url: found})
            return found

    # -- one check ---------------------------------------------------------------------------

    def _check(self, url: str) -> Step:
        self._prune()
        with self._lock:
            departed, self._departed = self._departed, []
            tracked = url in self._tracked
        if departed:  # not under the cache's lock (track runs there): here, on a worker
            self._session.drop_hosts(departed)
        if not tracked:
            return GONE
        interval = self.interval
        now = self.clock.monotonic()
        peek = self.book.peek(url)
        if peek is None:
            return GONE
        fresh = peek.last_result
        if fresh is None and peek.last_failure is None:
            # nothing heard from the pod yet: its model probe is on its way and it is not
            # routable before that answers (100 000 pods listed at start-up cost no check)
            with self._lock:
                self.skipped_total += 1
            return Step(True, after=interval)
        if (peek.ejected_reason is None and peek.last_failure is None
                and fresh is not None and now - fresh < interval):
            # a fresher result came from elsewhere (a scrape, a probe, the router): skip, and
            # judge only when a time-based rule (wedged, no answer) may have come due
            with self._lock:
                self.skipped_total += 1
            if peek.stuck_since is not None:
                self.evaluate(url)
            return Step(True, after=fresh + interval - now)
        record = self.book.get(url)
        if record is None:
            return GONE
        later = self._take_slot(url, now)
        if later is not None:
            return Step(True, after=later)
        started_cpu = self._cpu_time()
        wants_progress = (record.progress_read_at is None
                          or now - record.progress_read_at >= self.config.progress_interval
                          or record.stuck_since is not None)
        ok = self._exchange(url, wants_progress)
        cost = self._cpu_time() - started_cpu
        with self._lock:
            self.checks_total += 1
            self.cost_per_check += 0.05 * (cost - self.cost_per_check)
        found = self.evaluate(url)
        if found is not None:
            times = (self.book.get(url) or record).times_ejected
            return Step(ok, after=recheck_delay(times, self.config))
        if ok:  # next check one (possibly stretched) interval after this one started
            return Step(True, after=now + interval - self.clock.monotonic())
        return FAILED

    def _take_slot(self, url: str, now: float) -> float | None:
        """None: check now; else the seconds until ``url``'s slot.

        Checks run at most at the budget's rate (one per ``cost / cpu_budget`` seconds).  The
        interval alone keeps the average there, but checks come due in bursts — the skip rule
        lines them up behind the probes of a start-up — and a burst on every worker at once
        costs more CPU per check, which stretches the interval far past what is needed.
        """
        with self._lock:
            slot = self._slots.get(url)
            if slot is not None:
                if slot > now:
                    return slot - now  # woken before the slot it holds
                del self._slots[url]
                return None
            spacing = self.cost_per_check / self.config.cpu_budget
            start = max(now, self._next_slot)
            self._next_slot = start + spacing
            if start - now <= spacing:
                return None
            self._slots[url] = start
            return start - now

    def _probe(self, url: str, progress: bool) -> bool:
        """One exchange with ``url``, recorded in the book; True when it answered."""
        path = "/metrics" if progress else "/health"
        try:
            status, body = self._get(url + path, progress)
            expect_ok(status, path)
            if progress:
                reading = parse_progress(body)
                self.book.success(url, tokens=reading.tokens, running=reading.running,
                                  adapters=reading.adapters)
            else:
                self.book.success(url)
            return True
        except MetricsParseError as exc:
            self.book.failure(url, Failure.BAD_ANSWER, str(exc))
        except EngineCallError as exc:
            if self.poller.stopping.is_set():
                return False
            if exc.failure == "read_timeout":
                refused = self._cannot_connect(url)
                if refused is not None:
                    self.book.failure(url, refused[0], f"{exc.reason}, then {refused[1]}")
                    return False
                # the kernel accepted a fresh connection: alive, only slow
                self.book.failure(url, Failure.READ_TIMEOUT, exc.reason, reachable=True)
                return False
            self.book.error(url, exc)
        return False

    def _get(self, url: str, progress: bool) -> tuple[int, bytes]:
        """The GET, once more on a fresh connection when a kept one was reset or closed under
        it (the keep-alive race with an engine closing idle connections is no failure); a
        refused connection is not retried: that is the crash it looks like."""
        timeout = (self.config.connect_timeout, self.config.read_timeout)
        limit = METRICS_MAX_BYTES if progress else HEALTH_MAX_BYTES
        try:
            return fetch(self._session, url, timeout=timeout, max_bytes=limit)
        except EngineCallError as exc:
            if exc.failure != "refused" or exc.reason == "connection refused":
                raise
        return fetch(self._session, url, timeout=timeout, max_bytes=limit)

    def _cannot_connect(self, url: str) -> tuple[Failure, str] | None:
        """A bare TCP connect to ``url``'s host: None when it is accepted (the engine is alive
        but slow), else the connect failure (the node or the process is gone)."""
        parsed = urllib3.util.parse_url(url)
        try:
            with socket.create_connection((parsed.host or "", parsed.port or 80),
                                          timeout=self.config.connect_timeout):
                return None
        except ConnectionRefusedError:
            return Failure.REFUSED, "connection refused"
        except TimeoutError:
            return Failure.CONNECT_TIMEOUT, "connect timed out"
        except OSError as exc:
            return Failure.REFUSED, f"connect failed ({exc.strerror or exc})"
