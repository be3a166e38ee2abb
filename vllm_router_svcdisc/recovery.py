"""Internal: recovery detection: one cheap ``/readyz`` poller per API client ends informers'
backoff waits.

An informer that cannot reach the API server, or gets errors from it, backs off exponentially
(client-go's 0.8 s doubling to 30 s).  Without help it learns that the server is back only when
its current wait ends: up to 30 s of a stale cache after an outage.  While
at least one informer is waiting out a backoff longer than one check period, the
:class:`RecoveryChecker` of its API client GETs ``/readyz`` about once a second (through the same
``ApiClient``: same host, TLS and credentials; exempt from API Priority and Fairness, readable by
every client through ``system:public-info-viewer``).  The first success after a failed check
wakes every waiting informer at once, so they LIST/WATCH immediately.

The rules (unit-tested on the fake clock):

- it probes only while some informer is waiting, at most once per ``interval`` (and never
  sooner than a 429's ``Retry-After``), so a sick API server sees at most about one cheap
  request a second per API client, however many informers share it;
- it wakes a waiter only on a failure -> success transition seen during its wait: a check that
  failed, then one that succeeded.  A waiter whose own request got no answer at all, or that
  starts waiting while the last check failed (the outage is still on), counts as having seen
  the failure: the server may come back before the next check.
  When ``/readyz`` answers 200 while list/watch fails (RBAC, a broken resource), the failure
  is not availability: the waiter is left to its backoff and not checked for again during that
  wait, so such a failure never turns into a retry a second;
- ``/readyz`` answering 401, 403 or 404 (forbidden, or not served: a proxy, an old server)
  turns the checker off for good: plain backoff, said once in the log;
- ``stop()`` (the last informer using it stopped) ends and joins its thread promptly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from .clock import SYSTEM_CLOCK, Clock
from .errors import ApiError

log = logging.getLogger(__name__)

#: The path checked; ``/livez`` and ``/version`` would do too (all are public-info-viewer).
READYZ_PATH = "/readyz"
#: A ``/readyz`` answering one of these is forbidden or absent here: plain backoff instead.
DISABLING_STATUSES = frozenset({401, 403, 404})
#: With no waiter, the thread re-checks for work at least this often (a bound, not a poll).
_IDLE_WAIT = 60.0
_JOIN_TIMEOUT = 2.0
# What a waiter's wait has seen: nothing yet; the server down (a failed check, or its own
# request unanswered); the server up (woken, or up without having been seen down).
_FRESH, _DOWN, _SETTLED = 0, 1, 2


@dataclass(frozen=True)
class CheckResult:
    """One check: ``status`` 0 = unreachable; ``retry_after`` from a 429/503 answer."""

    status: int
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


Probe = Callable[[], CheckResult]


class RecoveryChecker:
    """Polls a cheap endpoint while informers wait in backoff; the first success wakes them all.

    ``probe`` does one check (a bounded request); the thread that runs it is started by the
    first waiter (:meth:`waiting`) and ended by :meth:`stop`.  :meth:`run` is the loop, callable
    on any thread (unit tests run it on theirs with a fake clock).
    """

    def __init__(self, probe: Probe, *, interval: float = 1.0, clock: Clock = SYSTEM_CLOCK,
                 path: str = READYZ_PATH, name: str = "svcdisc-recovery") -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self.path = path
        self._probe = probe
        self._clock = clock
        self._name = name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._demand = threading.Event()  # set when a waiter arrives, or on stop
        # guarded by _lock: waiter event -> what its wait has seen (_FRESH, _DOWN, _SETTLED)
        self._waiters: dict[threading.Event, int] = {}
        self._last_ok: bool | None = None  # guarded by _lock: how the last check went
        self._enabled = True
        self._thread: threading.Thread | None = None
        self._last_check: float | None = None
        self.checks = 0
        self.failed_checks = 0
        self.wakeups = 0

    # -- what informers use ----------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False once the path answered 401/403/404 (or after stop): plain backoff."""
        return self._enabled and not self._stop.is_set()

    @contextlib.contextmanager
    def waiting(self, wake: threading.Event, *, unreachable: bool = False) -> Iterator[bool]:
        """Register ``wake`` for the duration of a backoff wait; yields whether it may be set.

        The event is set when the server is seen back: a failed check, then a good one; with
        ``unreachable`` (the waiter's own request got no answer at all), the first good check.
        """
        if not self.enabled:
            yield False
            return
        with self._lock:
            down = unreachable or self._last_ok is False
            self._waiters[wake] = _DOWN if down else _FRESH
        self._ensure_thread()
        self._demand.set()
        try:
            yield True
        finally:
            with self._lock:
                self._waiters.pop(wake, None)

    def stop(self, timeout: float = _JOIN_TIMEOUT) -> bool:
        """End the thread (a check in flight ends by its own timeout); True if it has ended."""
        self._stop.set()
        self._demand.set()
        with self._lock:
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- the loop ----------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self.run, name=self._name, daemon=True)
            self._thread.start()

    def _wanted(self) -> bool:
        """Someone is waiting whom a check could still help."""
        with self._lock:
            wanted = any(seen != _SETTLED for seen in self._waiters.values())
            if not wanted:
                self._demand.clear()
            return wanted

    def run(self) -> None:
        """Check while wanted, at most once per ``interval``, until stopped or disabled."""
        try:
            while not self._stop.is_set() and self._enabled:
                if not self._wanted():
                    self._clock.wait(self._demand, _IDLE_WAIT)
                    continue
                now = self._clock.monotonic()
                if self._last_check is not None and now - self._last_check < self.interval:
                    self._clock.wait(self._stop, self.interval - (now - self._last_check))
                    continue
                pause = self.check_once()
                if pause > 0:
                    self._clock.wait(self._stop, pause)
        except BaseException:  # the thread must never die silently; waiters keep their backoff
            log.exception("API recovery checker stopped by an unexpected error")
            self._enabled = False

    def check_once(self) -> float:
        """One check now, acted on; returns how long before the next one may run."""
        self._last_check = self._clock.monotonic()
        return self._apply(self._check())

    def _check(self) -> CheckResult:
        self.checks += 1
        try:
            return self._probe()
        except ApiError as exc:
            return CheckResult(exc.status, exc.retry_after)
        except Exception as exc:  # a probe that raises is a failed check, never a dead thread
            return CheckResult(ApiError.from_exception(exc).status)

    def _apply(self, result: CheckResult) -> float:
        """Act on one check; returns how long to wait before the next one may run."""
        if result.status in DISABLING_STATUSES:
            self._enabled = False
            log.warning("API server %s answers %d (%s): no recovery detection for this API "
                        "client; informers wait out their plain backoff", self.path,
                        result.status, "not served" if result.status == 404 else "forbidden")
            return 0.0
        if not result.ok:
            self.failed_checks += 1
            with self._lock:
                self._last_ok = False
                for wake, seen in self._waiters.items():
                    if seen == _FRESH:
                        self._waiters[wake] = _DOWN
            return max(self.interval, result.retry_after or 0.0)
        with self._lock:
            self._last_ok = True
            woken = [wake for wake, seen in self._waiters.items() if seen == _DOWN]
            for wake in self._waiters:
                self._waiters[wake] = _SETTLED  # up now: nothing more to learn in this wait
        if woken:
            self.wakeups += 1
            log.info("API server %s answers again: %d waiting informer(s) retry now",
                     self.path, len(woken))
        for wake in woken:
            wake.set()
        return self.interval


# -- one checker per API client ------------------------------------------------------------


def readyz_probe(api_client: Any, path: str = READYZ_PATH,
                 timeout: float = 1.0) -> Probe:
    """A check that GETs ``path`` through ``api_client`` (its host, TLS, credentials).

    Works on kubernetes 35/36 (``call_api(path, "GET", ...)``) and 37 (``param_serialize`` +
    ``call_api(method, url, ...)``).  Non-2xx answers raise :class:`ApiError`.
    """

    def probe() -> CheckResult:
        try:
            if hasattr(api_client, "param_serialize"):  # kubernetes >= 37
                method, url, headers, _body, _post = api_client.param_serialize(
                    "GET", path, auth_settings=["BearerToken"])
                response = api_client.call_api(method, url, header_params=headers,
                                               _request_timeout=(timeout, timeout))
                try:
                    response.read()
                finally:
                    _close(getattr(response, "response", None))
                status = int(response.status)
                if not 200 <= status < 300:  # 37's call_api returns errors: raise like 36
                    error = ApiException(status=status, reason=getattr(response, "reason", ""))
                    error.headers = getattr(response, "headers", None)
                    raise error
                return CheckResult(status)
            response = api_client.call_api(
                path, "GET", auth_settings=["BearerToken"], _preload_content=False,
                _return_http_data_only=True, _request_timeout=(timeout, timeout))
            status = int(getattr(response, "status", 200))
            _close(response)
            return CheckResult(status)
        except Exception as exc:
            raise ApiError.from_exception(exc) from exc

    return probe


def _close(response: Any) -> None:
    for method in ("drain_conn", "release_conn"):
        with contextlib.suppress(Exception):
            getattr(response, method)()


class _Shared:
    def __init__(self, checker: RecoveryChecker) -> None:
        self.checker = checker
        self.users = 0


_registry_lock = threading.Lock()
_registry: weakref.WeakKeyDictionary[Any, _Shared] = weakref.WeakKeyDictionary()


def acquire(api_client: Any, *, interval: float, timeout: float, clock: Clock = SYSTEM_CLOCK,
            path: str = READYZ_PATH) -> RecoveryChecker:
    """The checker shared by every informer on ``api_client`` (made by the first caller, with
    its settings).  Each ``acquire`` is paired with one :func:`release`; the last one stops it.
    """
    with _registry_lock:
        shared = _registry.get(api_client)
        if shared is None:
            checker = RecoveryChecker(readyz_probe(api_client, path, timeout),
                                      interval=interval, clock=clock, path=path)
            shared = _registry[api_client] = _Shared(checker)
        shared.users += 1
        return shared.checker


def release(api_client: Any, checker: RecoveryChecker, timeout: float = _JOIN_TIMEOUT) -> None:
    """One user fewer; the last one stops the checker and joins its thread (up to ``timeout``;
    a check in flight ends by its own timeout)."""
    with _registry_lock:
        shared = _registry.get(api_client)
        if shared is not None and shared.checker is checker:
            shared.users -= 1
            if shared.users > 0:
                return
            del _registry[api_client]
    checker.stop(timeout)
