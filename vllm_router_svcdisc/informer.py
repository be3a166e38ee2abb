"""Internal: a reflector in the manner of client-go ``tools/cache``: LIST, replace, WATCH, repeat.

One ``Informer`` keeps one resource type in step with the API server on one background thread.
It knows nothing about vLLM: it hands batches of :class:`Change` to a callback.

The loop is one line of policy: ``result = list_and_watch(); wait(delay_after(result))``.  Each
cycle ends in an :class:`Outcome` that says what happened; the wait before the next cycle follows
from it alone.  Two failure classes keep separate :class:`~.backoff.Backoff` values, because they
mean different things: a server that does not answer, or answers errors, backs off
exponentially (client-go's 0.8 s doubling to 30 s) until it answers 200 again; a server that
answered but whose stream did not last (a proxy ending watches at once, in-stream errors) is
retried about once a second, never faster, and never after an exponent grown during a storm.
Real progress (a LIST, an event, a bookmark) resets both and stops the health error clock.
A backoff wait longer than a second is cut short the moment the API server is seen back: the
informers of one API client share a :class:`~.recovery.RecoveryChecker` that polls ``/readyz``
about once a second while any of them waits.

Why not ``kubernetes.watch.Watch.stream``: its behaviour differs between client releases 35, 36
and 37 (``stop()`` not interrupting a read on 35, a crash deserialising ``endpoints: null``,
pydantic models on 37, silent 410 retries).  We call the official generated API functions with
``_preload_content=False`` and read the JSON ourselves, which behaves the same on every release
and skips model deserialisation entirely.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import random
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import urllib3

from . import recovery
from .backoff import Backoff, BackoffPolicy
from .clock import SYSTEM_CLOCK, Clock
from .errors import ApiError, describe_api_error
from .list_body import ListBody
from .recovery import RecoveryChecker

log = logging.getLogger(__name__)

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

#: A watch line longer than this is treated as a broken stream (no object we read is near it).
MAX_EVENT_BYTES = 16 * 1024 * 1024
#: A LIST (all its pages together) larger than this is refused: a selector matching far too much.
MAX_LIST_BYTES = 256 * 1024 * 1024
#: A LIST is read in at most this many pages (with the default page size: 5 million objects).
MAX_LIST_PAGES = 10_000
#: A LIST's changes are handed to the handler in parts of at most this many objects.
LIST_CHUNK = 1000
#: A watch that ends sooner than this having delivered nothing is a failure, however it ended.
MIN_HEALTHY_WATCH_SECONDS = 1.0
#: After a 410 the informer re-lists at once, but never more often than this.
MIN_RELIST_INTERVAL = 1.0
#: The Status cause of a 504 from a server whose cache is behind the resourceVersion asked for.
RV_TOO_LARGE_CAUSE = "ResourceVersionTooLarge"
_MAX_LOGGED_REASONS = 32  # distinct failure reasons logged per outage


@dataclass(frozen=True)
class Change:
    """One object added, modified or deleted; ``key`` is ``namespace/name``."""

    type: str
    key: str
    obj: dict[str, Any]


ChangeHandler = Callable[[Sequence[Change]], None]


class Outcome(enum.Enum):
    """How one list-and-watch cycle ended; the wait before the next cycle follows from it."""

    #: ``stop()`` was called.
    STOPPED = "stopped"
    #: A watch that delivered, or lasted, ended (server timeout, clean close, reset): re-watch
    #: at once from the last resourceVersion.
    WATCH_ENDED = "watch ended"
    #: 410 Expired: the resourceVersion was compacted away; re-list (at most once a second).
    EXPIRED = "expired"
    #: 504 ResourceVersionTooLarge: this server is behind the RV asked for; re-list from "".
    RV_TOO_LARGE = "resource version too large"
    #: The server answered, but the watch ended within MIN_HEALTHY_WATCH_SECONDS having
    #: delivered nothing (clean end, reset, in-stream ERROR): retry in about a second.
    SHORT_WATCH = "short watch"
    #: An open watch carried nothing (no event, no bookmark) for the liveness window: it was
    #: abandoned and is re-opened at once from the last resourceVersion.
    SILENT_WATCH = "silent watch"
    #: The server answered an error (5xx, 429, 401/403, ...) or a body we cannot use.
    SERVER_ERROR = "server error"
    #: No answer at all: connection refused, reset or timed out before a response.
    UNREACHABLE = "unreachable"


#: Outcomes that count as failures for health (the error clock runs until real progress).
FAILURES = frozenset({Outcome.SHORT_WATCH, Outcome.SILENT_WATCH, Outcome.SERVER_ERROR,
                      Outcome.UNREACHABLE})


@dataclass(frozen=True)
class CycleResult:
    """An :class:`Outcome` with what health and logs need to say about it."""

    outcome: Outcome
    reason: str = ""
    error: ApiError | None = None


def classify(error: ApiError) -> Outcome:
    """The outcome of a request the server refused, or that never reached it."""
    if error.status == 0:
        return Outcome.UNREACHABLE
    if error.status == 410:
        return Outcome.EXPIRED
    if error.status == 504 and error.cause == RV_TOO_LARGE_CAUSE:
        return Outcome.RV_TOO_LARGE
    return Outcome.SERVER_ERROR


class _StreamBroken(Exception):
    """A response body ended abnormally (reset, malformed framing, read timeout)."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


@dataclass
class InformerStatus:
    """What health checks and telemetry read about one informer; a copy, safe to keep.

    ``error_since`` is when the current failure streak began (None when not failing): only
    real progress ends a streak - a LIST applied, an event or a bookmark, or a watch that has
    stayed open for ``MIN_HEALTHY_WATCH_SECONDS`` - never a response's headers alone.
    """

    resource: str
    synced: bool = False
    alive: bool = False
    last_error: str | None = None
    error_since: float | None = None
    auth_error: str | None = None
    last_sync_rv: str = ""
    last_event_time: float | None = None
    last_bookmark_time: float | None = None
    last_progress_time: float | None = None
    requests: int = 0
    lists: int = 0
    relists_by_cause: dict[str, int] = field(default_factory=dict)
    watches: int = 0
    short_watches: int = 0
    silent_watches: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    malformed_events: int = 0
    #: backoff waits cut short because the API server answered its ``/readyz`` again
    recovery_wakeups: int = 0
    #: ``/readyz`` checks made by the recovery checker this informer shares (per API client)
    recovery_checks: int = 0


@dataclass(frozen=True)
class InformerConfig:
    """Timing knobs; the defaults are client-go's (or a real API server's), tests scale them.

    ``watch_liveness_timeout``: a watch that carries nothing for this long is abandoned and
    re-opened from the last resourceVersion.  It is the socket read timeout of the watch, so it
    must exceed the server's bookmark period (about a minute) by a margin.
    ``short_watch_retry``: the longest wait after a watch that ended at once with nothing.
    ``list_page_size``: LIST pages of this many objects, as client-go's pager.
    ``recovery_check_interval``: while a backoff wait longer than this runs, ``/readyz`` is
    checked this often (one checker per API client, shared by its informers) and the first
    success after a failure ends the wait; 0 turns recovery detection off (plain backoff).
    ``recovery_check_timeout``: connect and read timeout of one check.
    ``backoff``: the retry rule after a failed LIST or WATCH, as a :class:`BackoffPolicy` value
    (the same type ``ProbeConfig.backoff`` and ``ScrapeConfig.backoff`` take).  None (the
    default): the older fields spell it, ``BackoffPolicy(initial=backoff_initial,
    cap=backoff_cap, reset_after=backoff_reset_after)``, client-go's 0.8 s doubling to 30 s with
    up to 100 % jitter; given, it wins over them.  :attr:`backoff_policy` is the rule in force.
    """

    watch_timeout_range: tuple[int, int] = (300, 600)
    read_timeout_slack: float = 30.0
    connect_timeout: float = 10.0
    list_read_timeout: float = 60.0
    backoff_initial: float = 0.8
    backoff_cap: float = 30.0
    backoff_reset_after: float = 120.0
    watch_liveness_timeout: float = 120.0
    short_watch_retry: float = 1.0
    list_page_size: int = 500
    recovery_check_interval: float = 1.0
    recovery_check_timeout: float = 1.0
    backoff: BackoffPolicy | None = None

    @property
    def backoff_policy(self) -> BackoffPolicy:
        """The error backoff in force: ``backoff``, or the one the older fields spell."""
        return self.backoff or BackoffPolicy(initial=self.backoff_initial, cap=self.backoff_cap,
                                             reset_after=self.backoff_reset_after)


class Informer:
    """Keeps one resource in step: LIST → replace → WATCH from the list RV → repeat.

    ``list_func`` is an official client function already bound to its namespace (e.g.
    ``functools.partial(CoreV1Api.list_namespaced_service, namespace="default")``); it is
    called with ``watch``/``resource_version``/``_preload_content=False`` like any caller would.

    ``api_client`` (the one ``list_func`` uses) enables recovery detection: the informers of
    one API client share a ``/readyz`` checker (``InformerConfig.recovery_check_interval``).
    ``recovery`` gives a checker explicitly instead (tests).
    """

    def __init__(
        self,
        resource: str,
        list_func: Callable[..., Any],
        handler: ChangeHandler,
        *,
        label_selector: str | None = None,
        config: InformerConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        api_client: Any = None,
        recovery: RecoveryChecker | None = None,
        on_synced: Callable[[], None] | None = None,
    ) -> None:
        """``on_synced`` is called once, on the informer's thread, after its first LIST is
        handed over (what ``wait_until_synced`` waits for; a callback needs no thread)."""
        self.resource = resource
        self._on_synced = on_synced
        self.config = cfg = config or InformerConfig()
        self._list_func = list_func
        self._handler = handler
        self._label_selector = label_selector or None
        self._clock = clock
        self._rng = random.Random()
        self._error_backoff = Backoff(cfg.backoff_policy, clock=clock)
        self._short_watch_backoff = Backoff(
            BackoffPolicy(initial=cfg.short_watch_retry / 2, cap=cfg.short_watch_retry,
                          reset_after=cfg.backoff_policy.reset_after), clock=clock)
        self._known: dict[str, str] = {}  # key -> resourceVersion of what the handler has seen
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop, or by the recovery checker
        self._recovery = recovery
        self._recovery_client = None if recovery is not None else api_client
        self._synced = threading.Event()
        self._lock = threading.Lock()  # guards _status, _response and _watch_opened
        self._status = InformerStatus(resource=resource)
        self._response: Any = None
        self._watch_opened: float | None = None  # when the open watch's headers arrived
        self._thread: threading.Thread | None = None
        self._last_rv = ""
        self._list_rv_unavailable = False
        self._need_list = True
        self._paginated = False  # the first LIST came back paged: the server has no watch cache
        self._last_list_attempt: float | None = None
        self._progress_marks = 0
        self._doubt_open_watch = False  # a watch went silent: open is no proof of progress
        self._logged_reasons: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Informer:
        """Start the background thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"informer for {self.resource} already started")
        cfg = self.config
        if self._recovery_client is not None and cfg.recovery_check_interval > 0:
            self._recovery = recovery.acquire(
                self._recovery_client, interval=cfg.recovery_check_interval,
                timeout=cfg.recovery_check_timeout, clock=self._clock)
        self._thread = threading.Thread(
            target=self.run, name=f"svcdisc-informer-{self.resource}", daemon=True
        )
        self._thread.start()
        return self

    def signal_stop(self) -> None:
        """Ask the thread to end and unblock its read, without waiting for it."""
        self._stop.set()
        self._wake.set()
        self._abort_response()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop and join; unblocks a blocked read by shutting the socket down.

        Returns True when the thread has ended within ``timeout``.  The budget is read on the
        informer's clock; the join itself is a real wait (a thread cannot end in fake time).
        """
        deadline = self._clock.monotonic() + timeout
        self.signal_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        checker, client = self._recovery, self._recovery_client
        if checker is not None and client is not None:
            self._recovery_client = None  # released once; the last user joins its thread
            recovery.release(client, checker, timeout=max(0.1, deadline - self._clock.monotonic()))
        return thread is None or thread is threading.current_thread() or not thread.is_alive()

    def has_synced(self) -> bool:
        """True once the first LIST has been handed to the handler."""
        return self._synced.is_set()

    def wait_until_synced(self, timeout: float) -> bool:
        """Block until synced, stopped, or ``timeout`` seconds of the informer's clock passed."""
        deadline = self._clock.monotonic() + timeout
        while not self._synced.is_set():
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return self._synced.is_set()
            self._clock.wait(self._synced, min(remaining, 0.1))
        return True

    def status(self) -> InformerStatus:
        """A copy of the current status.

        A watch that has stayed open for ``MIN_HEALTHY_WATCH_SECONDS`` ends a failure streak
        even before it carries anything: on a quiet cluster the first bookmark may be a minute
        away, and the informer is current as soon as such a watch is established.  Not after a
        silent watch, though: until something arrives, an open stream may be silent again.
        """
        now = self._clock.monotonic()
        with self._lock:
            status = InformerStatus(
                **{
                    **self._status.__dict__,
                    "alive": self._thread is not None and self._thread.is_alive(),
                    "relists_by_cause": dict(self._status.relists_by_cause),
                    "events_by_type": dict(self._status.events_by_type),
                }
            )
            opened = self._watch_opened
            doubt = self._doubt_open_watch
        if opened is not None and not doubt and now - opened >= MIN_HEALTHY_WATCH_SECONDS:
            status.last_error = status.error_since = status.auth_error = None
        if self._recovery is not None:
            status.recovery_checks = self._recovery.checks
        return status

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """The informer's loop, on the calling thread, until :meth:`stop` (``start`` threads it).

        It never raises: an unexpected error is logged and shown in health, not lost.
        """
        try:
            while not self._stop.is_set():
                result = self._list_and_watch()
                if result.outcome is Outcome.STOPPED or self._stop.is_set():
                    break
                self._account(result)
                self._pause(result)
        except BaseException as exc:  # the thread must never die silently
            log.exception("informer %s stopped by an unexpected error", self.resource)
            self._record_error(f"informer thread crashed: {exc!r}")
        finally:
            self._abort_response()

    def _list_and_watch(self) -> CycleResult:
        """One cycle: LIST if the cache needs it, then one WATCH from the last RV."""
        if self._need_list:
            failed = self._list()
            if failed is not None:
                return failed
        return self._watch()

    def _delay_after(self, result: CycleResult) -> float:
        """How long to wait before the next cycle, from what this one's outcome says."""
        outcome = result.outcome
        if outcome in (Outcome.WATCH_ENDED, Outcome.SILENT_WATCH):
            return 0.0  # the stream worked (or its silence already cost the liveness window)
        if outcome in (Outcome.EXPIRED, Outcome.RV_TOO_LARGE):
            last = self._last_list_attempt
            since = MIN_RELIST_INTERVAL if last is None else self._clock.monotonic() - last
            return max(0.0, MIN_RELIST_INTERVAL - since) + self._rng.uniform(0.0, 0.1)
        if outcome is Outcome.SHORT_WATCH:
            return self._short_watch_backoff.next()
        retry_after = result.error.retry_after if result.error is not None else None
        return self._error_backoff.next(retry_after)

    def _pause(self, result: CycleResult) -> None:
        """Wait before the next cycle; a long backoff ends early when the server is back.

        Only the error backoff (the server unreachable or answering errors) is cut short, and
        only when it is longer than one check period.  Retry-After is still honoured: woken
        early, the informer waits out what is left of it.
        """
        delay = self._delay_after(result)
        checker = self._recovery
        if (checker is None or result.outcome not in (Outcome.SERVER_ERROR, Outcome.UNREACHABLE)
                or delay <= checker.interval):
            self._clock.wait(self._stop, delay)
            return
        started = self._clock.monotonic()
        self._wake.clear()
        if self._stop.is_set():
            return
        with checker.waiting(self._wake, unreachable=result.outcome is Outcome.UNREACHABLE):
            woken = self._clock.wait(self._wake, delay)
        if not woken or self._stop.is_set():
            return
        with self._lock:
            self._status.recovery_wakeups += 1
        log.info("%s: API server answers again; retrying now instead of in %.1fs",
                 self.resource, max(0.0, delay - (self._clock.monotonic() - started)))
        retry_after = result.error.retry_after if result.error is not None else None
        if retry_after:
            self._clock.wait(self._stop, retry_after - (self._clock.monotonic() - started))

    def _account(self, result: CycleResult) -> None:
        """Counters, the health clock and logs for a finished cycle."""
        outcome = result.outcome
        if outcome in (Outcome.EXPIRED, Outcome.RV_TOO_LARGE):
            self._need_list = True
            if outcome is Outcome.RV_TOO_LARGE:
                self._list_rv_unavailable = True  # as client-go: the next LIST is from ""
            cause = "expired" if outcome is Outcome.EXPIRED else "rv_too_large"
            self._count_relist(cause)
            log.info("%s: %s, re-listing", self.resource, result.reason or outcome.value)
            return
        if outcome not in FAILURES:
            return
        since = None
        with self._lock:
            if outcome is Outcome.SHORT_WATCH:
                self._status.short_watches += 1
            elif outcome is Outcome.SILENT_WATCH:
                self._status.silent_watches += 1
                self._doubt_open_watch = True
                # Nothing has arrived for the whole liveness window: the streak began then.
                since = self._status.last_progress_time
        if outcome in (Outcome.SERVER_ERROR, Outcome.UNREACHABLE):
            self._count_relist("error")
        self._record_error(result.reason or outcome.value, result.error, since=since)

    def _note_progress(self) -> None:
        """Real progress (a LIST applied, an event, a bookmark): the server is answering."""
        now = self._clock.monotonic()
        self._progress_marks += 1
        self._error_backoff.reset()
        self._short_watch_backoff.reset()
        with self._lock:
            self._status.last_progress_time = now
            self._doubt_open_watch = False
            had_error = self._status.last_error is not None
            if had_error:
                self._status.last_error = None
                self._status.error_since = None
                self._status.auth_error = None
        if had_error:
            log.info("%s: list/watch healthy again", self.resource)
            self._logged_reasons.clear()

    # -- LIST --------------------------------------------------------------------------------

    def _list_resource_version(self) -> str:
        """client-go's relist RV: "0" at first, the last synced RV later, "" after a 410."""
        if self._list_rv_unavailable:
            return ""
        return self._last_rv or "0"

    def _list(self) -> CycleResult | None:
        """LIST every page, then hand the listed state over; None on success."""
        self._last_list_attempt = self._clock.monotonic()
        rv = self._list_resource_version()
        try:
            try:
                items, list_rv = self._list_pages(rv)
            except ApiError as exc:
                if classify(exc) not in (Outcome.EXPIRED, Outcome.RV_TOO_LARGE):
                    raise
                # As client-go: the RV (or a continue token) is gone, or this server is behind
                # it; re-list at once from "" (a quorum read), not after a backoff.
                self._count_relist("expired" if exc.status == 410 else "rv_too_large")
                log.info("%s: LIST at resourceVersion %r refused (%s); re-listing from scratch",
                         self.resource, rv, describe_api_error(exc))
                self._list_rv_unavailable = True
                items, list_rv = self._list_pages("")
        except ApiError as exc:
            outcome = classify(exc)
            if outcome is not Outcome.SERVER_ERROR and outcome is not Outcome.UNREACHABLE:
                self._list_rv_unavailable = True  # refused again: the next LIST is from ""
            return CycleResult(outcome, describe_api_error(exc), exc)
        except _StreamBroken as exc:
            return CycleResult(Outcome.SERVER_ERROR, f"{self.resource} LIST unusable: {exc}")
        try:
            self._replace(items)
        except ValueError as exc:
            return CycleResult(Outcome.SERVER_ERROR, f"{self.resource} LIST unusable: "
                                                      f"malformed item: {exc}")
        self._last_rv = list_rv
        self._list_rv_unavailable = False
        self._need_list = False
        with self._lock:
            self._status.lists += 1
            self._status.last_sync_rv = list_rv
            self._status.synced = True
        first = not self._synced.is_set()
        self._synced.set()
        if first and self._on_synced is not None:
            try:
                self._on_synced()
            except Exception:  # the informer must outlive a failing consumer
                log.exception("%s: the synced callback failed", self.resource)
        self._note_progress()
        return None

    def _list_pages(self, rv: str) -> tuple[Iterator[Any], str]:
        """All pages of one LIST, as client-go's pager: ``limit`` when the server pages.

        A LIST at "0" or "" asks for pages (a server with a watch cache ignores ``limit`` at
        "0"); a re-LIST at a newer RV asks for none, so the watch cache serves it, unless the
        first LIST showed that this server pages anyway.
        """
        paged = rv in ("0", "") or self._paginated
        pages: list[ListBody] = []  # items are decoded as the handler is fed (list_body.py)
        budget = MAX_LIST_BYTES
        token = ""
        for _page in range(MAX_LIST_PAGES):
            kwargs: dict[str, Any] = {
                "_preload_content": False,
                "_request_timeout": (self.config.connect_timeout, self.config.list_read_timeout),
            }
            if token:
                kwargs["_continue"] = token
            else:
                kwargs["resource_version"] = rv
            if paged:
                kwargs["limit"] = self.config.list_page_size
            if self._label_selector:
                kwargs["label_selector"] = self._label_selector
            response = self._call(**kwargs)
            try:
                body = _read_capped(response, budget)
            finally:
                _release(response)
                self._set_response(None)
            budget -= len(body)
            try:
                page = ListBody(body.decode("utf-8"))
                del body
                metadata = page.header["metadata"]
                list_rv = str(metadata["resourceVersion"])
                token = str(metadata.get("continue") or "")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise _StreamBroken(f"malformed {self.resource} list: {exc}") from exc
            pages.append(page)
            if token and rv == "0":
                self._paginated = True
            if not token:
                return itertools.chain.from_iterable(p.items() for p in pages), list_rv
        raise _StreamBroken(f"more than {MAX_LIST_PAGES} pages")

    def _replace(self, items: Iterable[Any]) -> None:
        """Hand the listed state over: changed objects as MODIFIED/ADDED, vanished as DELETED.

        This comparison is what finds deletes missed while the watch was down.  More than
        :data:`LIST_CHUNK` changes go in parts of that size, deletions with the last part
        (each part is applied whole).  ``items`` may decode lazily and raise ValueError at a
        malformed item: the parts handed over by then are real states of their objects, and
        the next LIST reconciles the rest.
        """
        changes: list[Change] = []
        seen: dict[str, str] = {}
        for item in items:
            key = _object_key(item)
            if key is None:
                self._count_malformed("list item without metadata.name")
                continue
            rv = str(item.get("metadata", {}).get("resourceVersion", ""))
            seen[key] = rv
            old_rv = self._known.get(key)
            if old_rv is None:
                changes.append(Change(ADDED, key, item))
            elif old_rv != rv or not rv:
                changes.append(Change(MODIFIED, key, item))
            if len(changes) >= LIST_CHUNK:
                # A large LIST is handed over in parts: the first pods are probed while the
                # rest is applied, and the raw objects are freed part by part.
                self._deliver(changes)
                changes = []
        for key in self._known.keys() - seen.keys():
            namespace, _, name = key.partition("/")
            tombstone = {"metadata": {"namespace": namespace, "name": name}}
            changes.append(Change(DELETED, key, tombstone))
        self._known = seen
        self._deliver(changes, always=True)

    # -- WATCH -------------------------------------------------------------------------------

    def _watch(self) -> CycleResult:
        """One WATCH from the last RV, read until it ends; says how it ended."""
        cfg = self.config
        low, high = cfg.watch_timeout_range
        timeout_seconds = self._rng.randint(low, max(low, high - 1))
        # urllib3's read timeout applies to each socket read: with bookmarks requested, a
        # stream that carries nothing for the liveness window is dead (or black-holed).
        read_timeout = min(timeout_seconds + cfg.read_timeout_slack, cfg.watch_liveness_timeout)
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": self._last_rv,
            "timeout_seconds": timeout_seconds,
            "_preload_content": False,
            "_request_timeout": (cfg.connect_timeout, read_timeout),
        }
        if self._label_selector:
            kwargs["label_selector"] = self._label_selector
        try:
            response = self._call(**kwargs)
        except ApiError as exc:
            if self._stop.is_set():
                return CycleResult(Outcome.STOPPED)
            return CycleResult(classify(exc), describe_api_error(exc), exc)
        opened = self._clock.monotonic()
        marks = self._progress_marks
        with self._lock:
            self._status.watches += 1
            self._watch_opened = opened
        error: ApiError | None = None
        ending = "the server ended the stream"
        try:
            for line in _iter_lines(response, MAX_EVENT_BYTES):
                if self._stop.is_set():
                    return CycleResult(Outcome.STOPPED)
                error = self._handle_line(line)
                if error is not None:
                    break
        except _StreamBroken as broken:
            if self._stop.is_set():
                return CycleResult(Outcome.STOPPED)
            if broken.timed_out:
                return CycleResult(Outcome.SILENT_WATCH,
                                   f"watch carried nothing for {read_timeout:g}s (no event, "
                                   "no bookmark): abandoned, re-opened from the last "
                                   "resourceVersion")
            ending = str(broken)
        finally:
            _release(response)
            with self._lock:
                self._response = None
                self._watch_opened = None
        if self._stop.is_set():
            return CycleResult(Outcome.STOPPED)
        delivered = self._progress_marks > marks
        if error is not None:
            outcome = classify(error)
            if outcome in (Outcome.EXPIRED, Outcome.RV_TOO_LARGE):
                return CycleResult(outcome, f"watch: {describe_api_error(error)}", error)
            if not delivered:
                return CycleResult(Outcome.SHORT_WATCH, "watch answered, then failed in-stream: "
                                   f"{describe_api_error(error)}", error)
            return CycleResult(Outcome.WATCH_ENDED)
        lasted = self._clock.monotonic() - opened
        if not delivered and lasted < MIN_HEALTHY_WATCH_SECONDS:
            # client-go's rule: a watch ending this soon with nothing is an error, however it
            # ended; without it a proxy that closes every watch at once is a hot loop.
            return CycleResult(Outcome.SHORT_WATCH,
                               f"watch ended at once with no event ({ending})")
        if not delivered:
            self._note_progress()  # it stayed open: the server is serving this watch
        return CycleResult(Outcome.WATCH_ENDED)

    def _handle_line(self, line: bytes) -> ApiError | None:
        """Apply one watch line; an ``ERROR`` event is returned, ending the watch."""
        try:
            event = json.loads(line)
            event_type = event["type"]
            obj = event["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            self._count_malformed(f"undecodable watch event ({exc.__class__.__name__})")
            return None
        now = self._clock.monotonic()
        with self._lock:
            counts = self._status.events_by_type
            counts[event_type] = counts.get(event_type, 0) + 1
            self._status.last_event_time = now
        if event_type == "ERROR":
            return ApiError.from_status(obj)
        metadata = obj.get("metadata")
        rv = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if event_type == "BOOKMARK":
            if rv:
                self._last_rv = str(rv)
            with self._lock:
                self._status.last_bookmark_time = now
            self._note_progress()
            return None
        if event_type not in (ADDED, MODIFIED, DELETED):
            self._count_malformed(f"unknown watch event type {event_type!r}")
            return None
        key = _object_key(obj)
        if key is None or not rv:
            self._count_malformed(f"{event_type} event without name or resourceVersion")
            return None
        if event_type == DELETED:
            if self._known.pop(key, None) is not None:
                self._deliver([Change(DELETED, key, obj)])
        else:
            kind = ADDED if key not in self._known else MODIFIED
            self._known[key] = str(rv)
            self._deliver([Change(kind, key, obj)])
        self._last_rv = str(rv)
        self._note_progress()
        return None

    # -- plumbing ----------------------------------------------------------------------------

    def _call(self, **kwargs: Any) -> Any:
        """Call the client function, translating its exceptions into :class:`ApiError`."""
        with self._lock:
            self._status.requests += 1
        try:
            response = self._list_func(**kwargs)
        except Exception as exc:
            raise ApiError.from_exception(exc) from exc
        # The server answered 200: a streak of "unreachable / answers errors" is over, whatever
        # the body or stream does next (that is the short-watch class, and health's business).
        self._error_backoff.reset()
        self._set_response(response)
        if self._stop.is_set():
            self._abort_response()
        return response

    def _deliver(self, changes: list[Change], *, always: bool = False) -> None:
        if not changes and not always:
            return
        try:
            self._handler(changes)
        except Exception:
            log.exception("%s: change handler failed; continuing", self.resource)

    def _set_response(self, response: Any) -> None:
        with self._lock:
            self._response = response

    def _abort_response(self) -> None:
        """Shut the socket of the in-flight response down so a blocked read returns at once."""
        with self._lock:
            response = self._response
        if response is None:
            return
        sock = _response_socket(response)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _count_malformed(self, what: str) -> None:
        with self._lock:
            self._status.malformed_events += 1
            count = self._status.malformed_events
        if count == 1 or count % 100 == 0:
            log.warning("%s: skipped a malformed object or event: %s (%d so far)",
                        self.resource, what, count)

    def _count_relist(self, cause: str) -> None:
        with self._lock:
            causes = self._status.relists_by_cause
            causes[cause] = causes.get(cause, 0) + 1

    def _record_error(self, reason: str, error: BaseException | None = None, *,
                      since: float | None = None) -> None:
        """Remember the failure for health; log each distinct reason once per outage."""
        now = self._clock.monotonic()
        auth = isinstance(error, ApiError) and error.status in (401, 403)
        with self._lock:
            self._status.last_error = reason
            if self._status.error_since is None:
                self._status.error_since = now if since is None else min(since, now)
            self._status.auth_error = reason if auth else None
        if reason not in self._logged_reasons and len(self._logged_reasons) < _MAX_LOGGED_REASONS:
            self._logged_reasons.add(reason)
            level = logging.ERROR if auth else logging.WARNING
            log.log(level, "%s: list/watch failing, retrying with backoff: %s",
                    self.resource, reason)


# -- helpers -------------------------------------------------------------------------------


def _object_key(obj: Any) -> str | None:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(metadata, dict):
        return None
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        return None
    namespace = metadata.get("namespace") or ""
    return f"{namespace}/{name}"


def _response_socket(response: Any) -> socket.socket | None:
    connection = getattr(response, "connection", None) or getattr(response, "_connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _release(response: Any) -> None:
    for method in ("close", "release_conn"):
        with contextlib.suppress(Exception):
            getattr(response, method)()


def _broken(exc: BaseException, what: str) -> _StreamBroken:
    """A read failure, telling a read timeout (nothing arrived) from a reset or bad framing."""
    causes = (exc, exc.__context__, exc.__cause__)
    timed_out = any(isinstance(c, urllib3.exceptions.TimeoutError | TimeoutError) for c in causes)
    return _StreamBroken(f"{what}: {exc.__class__.__name__}", timed_out=timed_out)


def _read_capped(response: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.stream(65536, decode_content=True):
            size += len(chunk)
            if size > limit:
                raise _StreamBroken(f"response larger than {MAX_LIST_BYTES} bytes")
            chunks.append(chunk)
    except _StreamBroken:
        raise
    except Exception as exc:
        raise _broken(exc, "reading the response failed") from exc
    return b"".join(chunks)


def _iter_lines(response: Any, max_line: int) -> Iterator[bytes]:
    """Split a chunked watch body into event lines; a reset or timeout ends it abnormally."""
    pending = b""
    try:
        for chunk in response.stream(None, decode_content=True):
            pending += chunk
            while True:
                newline = pending.find(b"\n")
                if newline < 0:
                    break
                line, pending = pending[:newline], pending[newline + 1:]
                if line.strip():
                    yield line
            if len(pending) > max_line:
                raise _StreamBroken(f"watch event larger than {max_line} bytes")
    except _StreamBroken:
        raise
    except Exception as exc:
        raise _broken(exc, "connection reset") from exc
    if pending.strip():
        yield pending
