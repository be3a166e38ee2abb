"""A reflector in the manner of client-go ``tools/cache``: LIST, replace, WATCH, repeat.

One ``Informer`` keeps one resource type in step with the API server on one background thread.
It knows nothing about vLLM: it hands batches of :class:`Change` to a callback.

Why not ``kubernetes.watch.Watch.stream``: its behaviour differs between client releases 35, 36
and 37 (REFERENCE.md §3: ``stop()`` not interrupting a read, a crash deserialising
``endpoints: null``, pydantic models, silent 410 retries).  We call the official generated API
functions with ``_preload_content=False`` and read the JSON ourselves, which behaves the same
on every release and skips model deserialisation entirely.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import tenacity
from tenacity import RetryCallState

from .errors import ApiError, describe_api_error

log = logging.getLogger(__name__)

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

#: A watch line longer than this is treated as a broken stream (no object we read is near it).
MAX_EVENT_BYTES = 16 * 1024 * 1024
#: A LIST body larger than this is refused: it would mean a selector matching far too much.
MAX_LIST_BYTES = 256 * 1024 * 1024
#: A watch that breaks sooner than this without an event is a failure (backoff), not an end.
MIN_HEALTHY_WATCH_SECONDS = 1.0
#: After a 410 the informer re-lists at once, but never more often than this.
MIN_RELIST_INTERVAL = 1.0


@dataclass(frozen=True)
class Change:
    """One object added, modified or deleted; ``key`` is ``namespace/name``."""

    type: str
    key: str
    obj: dict[str, Any]


ChangeHandler = Callable[[Sequence[Change]], None]


class _Expired(Exception):
    """The resourceVersion we asked for is gone (410): only a re-LIST can recover."""


class _StreamBroken(Exception):
    """The watch stream ended abnormally (reset, malformed framing, read timeout)."""


@dataclass
class InformerStatus:
    """What health checks and telemetry read about one informer; a copy, safe to keep."""

    resource: str
    synced: bool = False
    alive: bool = False
    last_error: str | None = None
    error_since: float | None = None
    auth_error: str | None = None
    last_sync_rv: str = ""
    last_event_time: float | None = None
    last_bookmark_time: float | None = None
    lists: int = 0
    relists_by_cause: dict[str, int] = field(default_factory=dict)
    watches: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    malformed_events: int = 0


@dataclass(frozen=True)
class InformerConfig:
    """Timing knobs; the defaults are client-go's, tests scale them down."""

    watch_timeout_range: tuple[int, int] = (300, 600)
    read_timeout_slack: float = 30.0
    connect_timeout: float = 10.0
    list_read_timeout: float = 60.0
    backoff_initial: float = 0.8
    backoff_cap: float = 30.0
    backoff_reset_after: float = 120.0


class _ReflectorBackoff(tenacity.wait.wait_base):
    """client-go's backoff: 0.8 s doubling to 30 s, full jitter on top, honouring Retry-After.

    The exponent counts failures since the informer last stayed healthy for
    ``reset_after`` seconds, not tenacity's attempt number, so a long healthy run starts over.
    """

    def __init__(self, informer: Informer) -> None:
        self._informer = informer
        cfg = informer.config
        self._exp = tenacity.wait_exponential(multiplier=cfg.backoff_initial,
                                              max=cfg.backoff_cap)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, _Expired):
            # An expired RV is routine (compaction): re-list at once, but at most once per
            # MIN_RELIST_INTERVAL so a server that expires every watch cannot spin us.
            since = time.monotonic() - self._informer.last_list_time
            return max(0.0, MIN_RELIST_INTERVAL - since) + random.uniform(0.0, 0.1)
        state = copy.copy(retry_state)
        state.attempt_number = max(1, self._informer.failure_streak)
        delay = float(self._exp(state))
        delay = min(self._informer.config.backoff_cap, delay * (1.0 + random.random()))
        if isinstance(error, ApiError) and error.retry_after is not None:
            delay = max(delay, float(error.retry_after))
        return delay


class Informer:
    """Keeps one resource in step: LIST → replace → WATCH from the list RV → repeat.

    ``list_func`` is an official client function already bound to its namespace (e.g.
    ``functools.partial(CoreV1Api.list_namespaced_service, namespace="default")``); it is
    called with ``watch``/``resource_version``/``_preload_content=False`` like any caller would.
    """

    def __init__(
        self,
        resource: str,
        list_func: Callable[..., Any],
        handler: ChangeHandler,
        *,
        label_selector: str | None = None,
        config: InformerConfig | None = None,
    ) -> None:
        self.resource = resource
        self.config = config or InformerConfig()
        self._list_func = list_func
        self._handler = handler
        self._label_selector = label_selector or None
        self._known: dict[str, str] = {}  # key -> resourceVersion of what the handler has seen
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._lock = threading.Lock()  # guards _status and _response
        self._status = InformerStatus(resource=resource)
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self._last_rv = ""
        self._list_rv_unavailable = False
        self._need_list = True
        self._healthy_since: float | None = None
        self.failure_streak = 0
        self.last_list_time = 0.0
        self._logged_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Informer:
        """Start the background thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"informer for {self.resource} already started")
        self._thread = threading.Thread(
            target=self._run, name=f"svcdisc-informer-{self.resource}", daemon=True
        )
        self._thread.start()
        return self

    def signal_stop(self) -> None:
        """Ask the thread to end and unblock its read, without waiting for it."""
        self._stop.set()
        self._abort_response()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop and join; unblocks a blocked read by shutting the socket down.

        Returns True when the thread has ended within ``timeout``.
        """
        self.signal_stop()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def has_synced(self) -> bool:
        """True once the first LIST has been handed to the handler."""
        return self._synced.is_set()

    def wait_until_synced(self, timeout: float) -> bool:
        """Block until synced, stopped, or ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        while not self._synced.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return self._synced.is_set()
            self._synced.wait(min(remaining, 0.1))
        return True

    def status(self) -> InformerStatus:
        """A copy of the current status."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            return InformerStatus(
                **{
                    **self._status.__dict__,
                    "alive": alive,
                    "relists_by_cause": dict(self._status.relists_by_cause),
                    "events_by_type": dict(self._status.events_by_type),
                }
            )

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(self._retryable),
            wait=_ReflectorBackoff(self),
            stop=self._stop_requested,
            sleep=self._pause,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            retrying(self._list_and_watch)  # returns only once stopped
        except Exception:
            if not self._stop.is_set():  # stopping mid-retry re-raises the last error: fine
                self._crash()
        except BaseException:
            self._crash()
        finally:
            self._abort_response()

    def _crash(self) -> None:
        """The thread must never die silently: log it and make health say so."""
        exc = sys.exc_info()[1]
        log.exception("informer %s stopped by an unexpected error", self.resource)
        self._record_error(f"informer thread crashed: {exc!r}")

    def _stop_requested(self, _state: RetryCallState) -> bool:
        return self._stop.is_set()

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _retryable(self, error: BaseException) -> bool:
        return not self._stop.is_set() and isinstance(error, Exception)

    def _before_sleep(self, state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if error is None:
            return
        if isinstance(error, _Expired):
            self._count_relist("expired")
            log.info("%s: resourceVersion expired (410), re-listing", self.resource)
            return
        self._record_error(describe_api_error(error), error)

    def _list_and_watch(self) -> None:
        """One reflector cycle; raises on any failure so tenacity backs off and retries."""
        listing = self._need_list
        try:
            if listing:
                self._list()
                listing = False
            while not self._stop.is_set():
                self._watch()
        except _Expired:
            self._need_list = True  # not a failure: re-list soon, see _ReflectorBackoff
            raise
        except Exception as exc:
            if self._stop.is_set():
                return
            if isinstance(exc, ApiError) and exc.status == 410:
                # An HTTP 410 (a LIST at a compacted RV, or a watch refused outright) is the
                # same routine expiry as the ERROR event: re-list, from "" if LIST said so.
                self._need_list = True
                self._list_rv_unavailable = listing
                raise _Expired(exc.message) from exc
            self._note_failure()
            raise

    def _note_failure(self) -> None:
        """Count a failure; a long healthy run before it resets the backoff exponent."""
        healthy_since = self._healthy_since
        if (
            healthy_since is not None
            and time.monotonic() - healthy_since >= self.config.backoff_reset_after
        ):
            self.failure_streak = 0
        self.failure_streak += 1
        self._healthy_since = None

    def _note_healthy(self) -> None:
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
        with self._lock:
            had_error = self._status.last_error is not None
            self._status.last_error = None
            self._status.error_since = None
            self._status.auth_error = None
        if had_error:
            log.info("%s: list/watch healthy again", self.resource)
        self._logged_error = None

    # -- LIST --------------------------------------------------------------------------------

    def _list_resource_version(self) -> str:
        """client-go's relist RV: "0" at first, the last synced RV later, "" after a 410."""
        if self._list_rv_unavailable:
            return ""
        return self._last_rv or "0"

    def _list(self) -> None:
        kwargs: dict[str, Any] = {
            "resource_version": self._list_resource_version(),
            "_preload_content": False,
            "_request_timeout": (self.config.connect_timeout, self.config.list_read_timeout),
        }
        if self._label_selector:
            kwargs["label_selector"] = self._label_selector
        response = self._call(**kwargs)
        try:
            body = _read_capped(response, MAX_LIST_BYTES)
        finally:
            _release(response)
            self._set_response(None)
        try:
            data = json.loads(body)
            items = data.get("items") or []
            list_rv = str(data["metadata"]["resourceVersion"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _StreamBroken(f"malformed {self.resource} list: {exc}") from exc
        self._replace(items)
        self._last_rv = list_rv
        self._list_rv_unavailable = False
        self._need_list = False
        with self._lock:
            self._status.lists += 1
            self._status.last_sync_rv = list_rv
        self.last_list_time = time.monotonic()
        self._synced.set()
        with self._lock:
            self._status.synced = True
        self._note_healthy()

    def _replace(self, items: list[Any]) -> None:
        """Hand the listed state over: changed objects as MODIFIED/ADDED, vanished as DELETED.

        This comparison is what finds deletes missed while the watch was down.
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
        for key in self._known.keys() - seen.keys():
            namespace, _, name = key.partition("/")
            tombstone = {"metadata": {"namespace": namespace, "name": name}}
            changes.append(Change(DELETED, key, tombstone))
        self._known = seen
        self._deliver(changes, always=True)

    # -- WATCH -------------------------------------------------------------------------------

    def _watch(self) -> None:
        low, high = self.config.watch_timeout_range
        timeout_seconds = random.randint(low, max(low, high - 1))
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": self._last_rv,
            "timeout_seconds": timeout_seconds,
            "_preload_content": False,
            "_request_timeout": (
                self.config.connect_timeout,
                timeout_seconds + self.config.read_timeout_slack,
            ),
        }
        if self._label_selector:
            kwargs["label_selector"] = self._label_selector
        response = self._call(**kwargs)
        with self._lock:
            self._status.watches += 1
        self._note_healthy()
        opened = time.monotonic()
        lines = 0
        try:
            for line in _iter_lines(response, MAX_EVENT_BYTES):
                if self._stop.is_set():
                    return
                lines += 1
                self._handle_line(line)
        except _StreamBroken:
            # Like client-go: a stream that worked and then broke (connection reset, proxy or
            # API server restart) is re-opened at once from the last RV; only a stream that
            # breaks straight away counts as a failure and backs off.
            if lines == 0 and time.monotonic() - opened < MIN_HEALTHY_WATCH_SECONDS:
                raise
            log.debug("%s: watch stream broke after %d events; re-watching", self.resource,
                      lines)
        finally:
            _release(response)
            self._set_response(None)

    def _handle_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            event_type = event["type"]
            obj = event["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            self._count_malformed(f"undecodable watch event ({exc.__class__.__name__})")
            return
        now = time.monotonic()
        with self._lock:
            counts = self._status.events_by_type
            counts[event_type] = counts.get(event_type, 0) + 1
            self._status.last_event_time = now
        if event_type == "ERROR":
            self._handle_error_event(obj)
            return
        rv = obj.get("metadata", {}).get("resourceVersion") if isinstance(
            obj.get("metadata"), dict) else None
        if event_type == "BOOKMARK":
            if rv:
                self._last_rv = str(rv)
            with self._lock:
                self._status.last_bookmark_time = now
            return
        if event_type not in (ADDED, MODIFIED, DELETED):
            self._count_malformed(f"unknown watch event type {event_type!r}")
            return
        key = _object_key(obj)
        if key is None or not rv:
            self._count_malformed(f"{event_type} event without name or resourceVersion")
            return
        if event_type == DELETED:
            if self._known.pop(key, None) is not None:
                self._deliver([Change(DELETED, key, obj)])
        else:
            kind = ADDED if key not in self._known else MODIFIED
            self._known[key] = str(rv)
            self._deliver([Change(kind, key, obj)])
        self._last_rv = str(rv)

    def _handle_error_event(self, status: dict[str, Any]) -> None:
        code = status.get("code")
        message = str(status.get("message") or status.get("reason") or "watch error")
        if code == 410 or status.get("reason") in ("Expired", "Gone"):
            raise _Expired(message)
        raise ApiError(int(code) if isinstance(code, int) else 500, message)

    # -- plumbing ----------------------------------------------------------------------------

    def _call(self, **kwargs: Any) -> Any:
        """Call the client function, translating its exceptions into :class:`ApiError`."""
        try:
            response = self._list_func(**kwargs)
        except Exception as exc:
            raise ApiError.from_exception(exc) from exc
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

    def _record_error(self, reason: str, error: BaseException | None = None) -> None:
        """Remember the failure for health; log it once per distinct reason, not per retry."""
        now = time.monotonic()
        auth = isinstance(error, ApiError) and error.status in (401, 403)
        with self._lock:
            self._status.last_error = reason
            if self._status.error_since is None:
                self._status.error_since = now
            self._status.auth_error = reason if auth else None
        if isinstance(error, ApiError) and error.status == 410:
            self._count_relist("expired")
        elif error is not None:
            self._count_relist("error")
        if reason != self._logged_error:
            self._logged_error = reason
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


def _read_capped(response: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.stream(65536, decode_content=True):
            size += len(chunk)
            if size > limit:
                raise _StreamBroken(f"response larger than {limit} bytes")
            chunks.append(chunk)
    except _StreamBroken:
        raise
    except Exception as exc:
        raise _StreamBroken(f"reading the response failed: {exc.__class__.__name__}") from exc
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
        raise _StreamBroken(f"watch stream broke: {exc.__class__.__name__}") from exc
    if pending.strip():
        yield pending
