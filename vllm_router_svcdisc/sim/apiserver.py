"""A fake Kubernetes API server that the unmodified official ``kubernetes`` client talks to.

Why: discovery code must be tested against the real client's wire behaviour (chunked watch
streams, 410 Expired, bookmarks, RBAC denials, dropped connections, paged LISTs, and the ways
real API servers and the proxies in front of them break watches) without a cluster.
Stdlib only; serves services, endpoints, endpointslices and pods on loopback HTTP, and the
health paths ``/readyz``, ``/livez``, ``/healthz`` and ``/version`` (answered to every client, as
``system:public-info-viewer`` does), subject to the same fault switches as list/watch.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import kubernetes.client

from vllm_router_svcdisc.sim.selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

__all__ = ["HEALTH_PATHS", "RESOURCES", "FakeApiServer", "ResourceType", "parse_go_bool",
           "status_body"]

Obj = dict[str, Any]
_Entries = list[tuple[tuple[str, str], Obj]]  # (namespace, name) -> object, sorted by key

DEFAULT_WATCH_TIMEOUT = 1800.0
#: A real API server's watch cache sends each watcher a bookmark about once a minute.
DEFAULT_BOOKMARK_INTERVAL = 60.0
#: How watch faults can play out after a request is admitted (see ``fail_next``).
WATCH_FAULTS = ("empty", "error-event", "silent")
_SNAPSHOT_LIMIT = 64  # paged LIST snapshots kept for continue tokens; older tokens expire
_TOO_LARGE_CAUSE = "ResourceVersionTooLarge"
_CONTINUE_EXPIRED = (  # kube-apiserver's own words, with the inconsistent-continue token
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted between "
    "the time the first chunk was returned and now may show up in the list."
)
_INCONSISTENT = -1  # the revision of an inconsistent-continue token: the current state
_WAKE_INTERVAL = 0.2  # watch handlers re-check stop/cut/peer-closed at least this often
_JOIN_TIMEOUT = 1.0
_USER = "system:serviceaccount:default:router"
_NOT_SERVED = "the server could not find the requested resource"

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

_DEFAULT_MESSAGES = {
    401: "Unauthorized",
    429: "Too many requests, please try again later.",
    500: "Internal error occurred: injected fault",
    503: "the server is currently unable to handle the request",
    504: "the server was unable to return a response in the time allotted",
}


@dataclass(frozen=True)
class ResourceType:
    """Static facts about one served resource (plural name, kind, group/version, URL prefix)."""

    plural: str
    kind: str
    group: str
    version: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def qualified(self) -> str:
        """Name used in RBAC/NotFound messages: plural, plus the group when there is one."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: dict[str, ResourceType] = {
    "services": ResourceType("services", "Service", "", "v1"),
    "endpoints": ResourceType("endpoints", "Endpoints", "", "v1"),
    "endpointslices": ResourceType("endpointslices", "EndpointSlice", "discovery.k8s.io", "v1"),
    "pods": ResourceType("pods", "Pod", "", "v1"),
}


#: Health paths served beside the resources; in faults and counts their "resource" is the name
#: (``fail_for(5, 500, resource="readyz")``, ``request_counts()[("get", "readyz")]``).
HEALTH_PATHS = ("readyz", "livez", "healthz", "version")
#: What ``/version`` answers (a real server's shape).
VERSION_INFO: dict[str, str] = {
    "major": "1", "minor": "33", "gitVersion": "v1.33.0-sim", "gitCommit": "0" * 40,
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0",
    "compiler": "gc", "platform": "linux/amd64",
}


def parse_go_bool(text: str) -> bool:
    """Parse like Go's strconv.ParseBool, which the API server uses for query booleans."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"invalid boolean {text!r}")


def status_body(code: int, message: str, details: Obj | None = None) -> Obj:
    """A metav1.Status failure object as the real server sends it."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


def _expired_status(asked: int | str, oldest: int) -> Obj:
    return status_body(410, f"too old resource version: {asked} ({oldest})")


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _wire(rtype: ResourceType, obj: Obj) -> Obj:
    """The object as serialised: kind/apiVersion set; empty slice endpoints become null."""
    out = {"kind": rtype.kind, "apiVersion": rtype.api_version, **obj}
    out["kind"] = rtype.kind
    out["apiVersion"] = rtype.api_version
    if rtype.plural == "endpointslices" and not out.get("endpoints"):
        out["endpoints"] = None
    return out


# --- internal records --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    """One store change, kept in the bounded history for watches resuming from an RV."""

    rv: int
    resource: str
    type: str
    obj: Obj
    old: Obj | None  # previous version for MODIFIED, so selector transitions can be computed


@dataclass
class _Fault:
    """An injected error answer for matching requests, by count or until a deadline."""

    status: int
    retry_after: int | None
    verb: str | None
    resource: str | None
    remaining: int | None = None
    until: float | None = None
    how: str = "status"  # "status": an HTTP error answer; else one of WATCH_FAULTS
    cause: str | None = None  # a Status details cause, e.g. ResourceVersionTooLarge

    def active(self, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        return self.remaining is None or self.remaining > 0

    def applies(self, verb: str, resource: str) -> bool:
        return (self.verb is None or self.verb == verb) and (
            self.resource is None or self.resource == resource
        )


@dataclass(frozen=True)
class _Route:
    """A parsed request path."""

    rtype: ResourceType
    namespace: str | None
    name: str | None


@dataclass
class _Watch:
    """An open watch stream; `pending` is filled under the server lock by put/delete."""

    resource: str
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    sock: socket.socket
    cursor: int = 0  # highest RV this watcher has been brought up to (used by bookmarks)
    cut: bool = False
    silent: bool = False  # black-holed: nothing more is written, the connection stays open
    pending: list[tuple[str, Obj] | bytes] = field(default_factory=list)

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        metadata = obj.get("metadata") or {}
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        return self.labels.matches(metadata.get("labels")) and self.fields.matches(obj)

    def translate(self, event: _Event) -> tuple[str, Obj] | None:
        """Map a store event to what this watcher sees, like the watch cache does."""
        if event.resource != self.resource:
            return None
        now_matches = self.matches(event.obj)
        if event.type != "MODIFIED":
            return (event.type, event.obj) if now_matches else None
        was_matching = self.matches(event.old)
        if was_matching and now_matches:
            return ("MODIFIED", event.obj)
        if was_matching:
            return ("DELETED", event.obj)
        if now_matches:
            return ("ADDED", event.obj)
        return None


class _ListRefused(Exception):
    """A LIST answered with an error Status (bad or expired paging parameters)."""

    def __init__(self, code: int, message: str, continue_token: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.continue_token = continue_token


@dataclass
class _Batch:
    """What a watch handler should write next."""

    items: list[tuple[str, Obj] | bytes]
    cut: bool = False


# --- HTTP plumbing -----------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    """Threading server that registers each connection so stop() can shut it down."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeApiServer) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="fake-apiserver-conn",
            daemon=True,
        )
        self.fake._track_connection(request, thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        self.fake._untrack_connection(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connections dropped by either side (cut, stop, client gone) are normal here."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Per-connection request handler; all state lives in the FakeApiServer."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeKubeApiServer/1.0"
    disable_nagle_algorithm = True  # watch events are small writes; no 40 ms delayed-ACK stalls

    @property
    def fake(self) -> FakeApiServer:
        return cast(_HttpServer, self.server).fake

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr logging."""

    def do_GET(self) -> None:
        self.fake._handle_get(self)

    def _reject_method(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        message = f"the server does not allow this method on the requested resource: {self.command}"
        self.send_json(405, status_body(405, message))

    do_POST = do_PUT = do_PATCH = do_DELETE = _reject_method

    def send_json(self, code: int, body: Obj, headers: dict[str, str] | None = None) -> None:
        """A complete (Content-Length) JSON response, so keep-alive keeps working."""
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, code: int, text: str) -> None:
        """A complete plain-text response (what ``/readyz`` and ``/livez`` answer)."""
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_line(self, data: bytes) -> None:
        """One chunk per line; the socket writer is unbuffered so it leaves immediately."""
        if not data.endswith(b"\n"):
            data += b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def write_event(self, event_type: str, obj: Obj) -> None:
        self.write_line(json.dumps({"type": event_type, "object": obj}).encode())

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def peer_closed(self) -> bool:
        """True once the client has closed its end (it never sends on a watch connection)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
            return peeked == b""
        except (OSError, ValueError):
            return True

    def abort(self) -> None:
        """Drop the connection without a final chunk (the client sees a premature end)."""
        self.close_connection = True
        _shutdown_socket(self.connection)


def _parse_route(path: str) -> _Route | None:
    """Map a URL path onto a served resource, or None for anything unknown."""
    parts = [unquote(p) for p in path.split("/") if p]
    for rtype in RESOURCES.values():
        prefix = [p for p in rtype.prefix.split("/") if p]
        if parts[: len(prefix)] != prefix:
            continue
        rest = parts[len(prefix) :]
        if rest == [rtype.plural]:
            return _Route(rtype, None, None)
        if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[2] == rtype.plural:
            return _Route(rtype, rest[1], rest[3] if len(rest) == 4 else None)
    return None


@dataclass(frozen=True)
class _WatchParams:
    """Validated query parameters of a WATCH request."""

    resource_version: int | None  # None: start with synthetic ADDED of the current state
    timeout: float
    bookmarks: bool


def _parse_watch_params(query: dict[str, str]) -> _WatchParams:
    """Validate watch query parameters; ValueError means 400 BadRequest."""
    raw_rv = query.get("resourceVersion", "")
    rv: int | None = None
    if raw_rv not in ("", "0"):
        try:
            rv = int(raw_rv)
        except ValueError:
            raise ValueError(f"invalid resource version: {raw_rv!r}") from None
    timeout = DEFAULT_WATCH_TIMEOUT
    if "timeoutSeconds" in query:
        try:
            timeout = float(int(query["timeoutSeconds"]))
        except ValueError:
            raise ValueError(f"invalid timeoutSeconds: {query['timeoutSeconds']!r}") from None
    bookmarks = parse_go_bool(query.get("allowWatchBookmarks") or "false")
    return _WatchParams(rv, timeout, bookmarks)


# --- the server --------------------------------------------------------------------------------


class FakeApiServer:
    """In-process fake kube-apiserver with an object store, watch history and fault injection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
        history_limit: int = 10_000,
        allowed_verbs: frozenset[str] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self.bookmark_interval = bookmark_interval
        self.history_limit = history_limit
        self.allowed_verbs = allowed_verbs
        #: bearer tokens accepted (``None``: no authentication, every request is let in);
        #: any other or a missing ``Authorization`` gets the real server's 401 ``Status``
        #: before anything else is looked at.  A watch already open is not cut when its token
        #: is dropped from here, as on the real server (tokens are checked at the request).
        self.accepted_tokens: set[str] | None = None
        self._cond = threading.Condition()
        # guarded by _cond:
        self._store: dict[str, dict[tuple[str, str], Obj]] = {r: {} for r in RESOURCES}
        self._history: deque[_Event] = deque()
        self._floor = 0  # watching from an RV below this gets 410 Expired
        self._rv = 0
        self._watches: list[_Watch] = []
        self._serving = False  # new watches opened while stopping are cut at once
        self._faults: list[_Fault] = []
        self._disabled: set[str] = set()
        self._counts: dict[tuple[str, str], int] = {}
        # paged LISTs being read, by (resource, RV): what their continue tokens point into
        self._snapshots: dict[tuple[str, int], _Entries] = {}
        self._continues_to_expire = 0
        # guarded by _conn_lock:
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._httpd: _HttpServer | None = None
        self._serve_thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        """Bind (retrying briefly if the port is still held) and serve on a daemon thread."""
        if self._httpd is not None:
            return self
        deadline = time.monotonic() + 3.0
        while True:
            try:
                httpd = _HttpServer((self._host, self._port), self)
                break
            except OSError:
                if self._port == 0 or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self._httpd = httpd
        self._port = httpd.server_address[1]
        with self._cond:
            self._serving = True
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-apiserver",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close the listener and every open connection, join the threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._cond:
            self._serving = False
            for watch in self._watches:
                watch.cut = True
            self._watches = []
            self._cond.notify_all()
        with self._conn_lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            _shutdown_socket(sock)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        if self._serve_thread is not None:
            self._serve_thread.join(max(0.0, deadline - time.monotonic()))
            self._serve_thread = None
        for _, thread in connections:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def restart(self) -> None:
        """Like an API server restart with etcd intact: store, RV and history survive."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    def api_client(self) -> kubernetes.client.ApiClient:
        """A stock ApiClient pointed at this server."""
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return kubernetes.client.ApiClient(configuration)

    def _track_connection(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._conn_lock:
            self._connections[sock] = thread

    def _untrack_connection(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._connections.pop(sock, None)

    # --- object store --------------------------------------------------------------------------

    def put(self, resource: str, obj: Obj) -> Obj:
        """Create or replace by (namespace, name); emits ADDED or MODIFIED; returns a copy."""
        rtype = _rtype(resource)
        new = copy.deepcopy(obj)
        metadata = new.setdefault("metadata", {})
        name = metadata.get("name")
        if not name:
            raise ValueError("metadata.name is required")
        namespace = metadata.setdefault("namespace", "default")
        new["kind"] = rtype.kind
        new["apiVersion"] = rtype.api_version
        with self._cond:
            old = self._store[resource].get((namespace, name))
            if old is not None:
                metadata["uid"] = old["metadata"]["uid"]
                metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", _now_rfc3339())
            self._rv += 1
            metadata["resourceVersion"] = str(self._rv)
            self._store[resource][(namespace, name)] = new
            self._record(_Event(self._rv, resource, "MODIFIED" if old else "ADDED", new, old))
            return copy.deepcopy(new)

    def delete(self, resource: str, namespace: str, name: str) -> Obj | None:
        """Remove an object; the DELETED event carries it with a new resourceVersion."""
        _rtype(resource)
        with self._cond:
            old = self._store[resource].pop((namespace, name), None)
            if old is None:
                return None
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(_Event(self._rv, resource, "DELETED", gone, old))
            return copy.deepcopy(gone)

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        _rtype(resource)
        with self._cond:
            obj = self._store[resource].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, resource: str, namespace: str | None = None) -> list[Obj]:
        """Stored objects sorted by (namespace, name), optionally for one namespace."""
        _rtype(resource)
        with self._cond:
            return [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._store[resource].items())
                if namespace is None or ns == namespace
            ]

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def compact(self) -> None:
        """Drop the event history: a new watch from any RV older than the current one gets 410.

        Open watches are unaffected (the real watch cache has already dispatched to them).
        Continue tokens of paged LISTs expire too (etcd compacted their revision): 410.
        """
        with self._cond:
            self._history.clear()
            self._floor = self._rv
            self._snapshots.clear()

    def expire_continue_tokens(self, next_requests: int = 0) -> None:
        """Make every outstanding continue token answer 410, as after etcd compaction.

        With ``next_requests=n``, instead the next n requests that carry a continue token
        answer 410, so a test can expire a LIST between two of its pages deterministically.
        """
        with self._cond:
            if next_requests:
                self._continues_to_expire += next_requests
            else:
                self._snapshots.clear()

    def _record(self, event: _Event) -> None:
        """Append to the bounded history and dispatch to open watches. Caller holds _cond."""
        self._history.append(event)
        while len(self._history) > max(self.history_limit, 0):
            self._floor = self._history.popleft().rv
        for watch in self._watches:
            if event.rv <= watch.cursor:
                continue  # watch started from a future RV: only strictly newer events count
            seen = watch.translate(event)
            if seen is not None:
                watch.pending.append(seen)
            watch.cursor = event.rv
        self._cond.notify_all()

    # --- faults and observation ----------------------------------------------------------------

    def fail_next(
        self,
        n: int,
        status: int = 500,
        *,
        retry_after: int | None = None,
        verb: str | None = None,
        resource: str | None = None,
        how: str = "status",
        cause: str | None = None,
    ) -> None:
        """Answer the next n matching requests with `status`, the way `how` says.

        ``how="status"``: an HTTP error answer (a 410 on a watch comes in-stream, as from the
        watch cache; ``cause="ResourceVersionTooLarge"`` with 504 is the "Too large resource
        version" answer of a server whose cache is behind the RV asked for).  Watch-only ways
        (the request is answered 200 first): ``"empty"`` ends the stream cleanly at once with
        no event (a proxy, or a server shutting down); ``"error-event"`` sends one ``ERROR``
        event with a Status of `status` and ends; ``"silent"`` sends nothing more and keeps
        the connection open (a dead peer, a black-holing load balancer) until the client
        closes it or the server stops.
        """
        fault = self._fault(status, retry_after, verb, resource, how, cause)
        fault.remaining = n
        with self._cond:
            self._faults.append(fault)

    def fail_for(
        self,
        seconds: float,
        status: int = 500,
        *,
        retry_after: int | None = None,
        verb: str | None = None,
        resource: str | None = None,
        how: str = "status",
        cause: str | None = None,
    ) -> None:
        """Answer every matching request as :meth:`fail_next` does, for the next `seconds`."""
        fault = self._fault(status, retry_after, verb, resource, how, cause)
        fault.until = time.monotonic() + seconds
        with self._cond:
            self._faults.append(fault)

    @staticmethod
    def _fault(status: int, retry_after: int | None, verb: str | None, resource: str | None,
               how: str, cause: str | None) -> _Fault:
        if how != "status":
            if how not in WATCH_FAULTS:
                raise ValueError(f"how must be 'status' or one of {WATCH_FAULTS}, not {how!r}")
            if verb not in (None, "watch"):
                raise ValueError(f"how={how!r} only applies to watch requests")
            verb = "watch"
        if resource is not None and resource not in HEALTH_PATHS:
            _rtype(resource)
        return _Fault(status, retry_after, verb, resource, how=how, cause=cause)

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def cut_watches(self) -> None:
        """Abruptly end every open watch stream: the connection closes with no final chunk."""
        with self._cond:
            watches, self._watches = self._watches, []
            for watch in watches:
                watch.cut = True
            self._cond.notify_all()
        for watch in watches:
            _shutdown_socket(watch.sock)

    def silence_watches(self, resource: str | None = None) -> None:
        """Black-hole the open watch streams: no more bytes (events, bookmarks, end), no close.

        The connection stays open until the client gives up on it or the server stops, like a
        watch through a load balancer whose backend vanished.
        """
        with self._cond:
            for watch in self._watches:
                if resource is None or watch.resource == resource:
                    watch.silent = True
            self._cond.notify_all()

    def inject_raw_line(self, line: bytes, resource: str | None = None) -> None:
        """Queue a raw line (e.g. malformed JSON) into open watch streams, in event order."""
        with self._cond:
            for watch in self._watches:
                if resource is None or watch.resource == resource:
                    watch.pending.append(line)
            self._cond.notify_all()

    def disable_resource(self, resource: str) -> None:
        """Make the resource (or health path) answer 404, like a cluster that does not serve it."""
        if resource not in HEALTH_PATHS:
            _rtype(resource)
        with self._cond:
            self._disabled.add(resource)

    def enable_resource(self, resource: str) -> None:
        with self._cond:
            self._disabled.discard(resource)

    def request_counts(self) -> dict[tuple[str, str], int]:
        """Requests seen per (verb, resource), including ones answered with injected faults."""
        with self._cond:
            return dict(self._counts)

    def open_watch_count(self, resource: str | None = None) -> int:
        """Open watch streams; a stream ended by timeout, cut or stop is gone before it ends."""
        with self._cond:
            return self._count_watches(resource)

    def wait_for_watches(self, n: int, resource: str | None = None, timeout: float = 5.0) -> bool:
        """Block until at least n watches (of `resource`) are open; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count_watches(resource) >= n, timeout)

    def _count_watches(self, resource: str | None) -> int:
        return sum(1 for w in self._watches if resource is None or w.resource == resource)

    # --- request handling ----------------------------------------------------------------------

    def _handle_get(self, handler: _Handler) -> None:
        """Route, count, apply disablement / faults / RBAC, then serve GET, LIST or WATCH."""
        if not self._authenticated(handler):
            handler.send_json(401, status_body(401, "Unauthorized"))
            return
        url = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        health = url.path.strip("/").split("/")[0]
        if health in HEALTH_PATHS and url.path.rstrip("/") == f"/{health}":
            self._serve_health(handler, health)
            return
        route = _parse_route(url.path)
        if route is None:
            handler.send_json(404, status_body(404, _NOT_SERVED))
            return
        try:
            watching = parse_go_bool(query.get("watch") or "false")
        except ValueError as exc:
            handler.send_json(400, status_body(400, str(exc)))
            return
        verb = "watch" if watching else ("get" if route.name else "list")
        rejection = self._admit(verb, route)
        if rejection is not None:
            self._send_rejection(handler, verb, rejection, query)
        elif verb == "get":
            self._serve_get(handler, route)
        else:
            self._serve_collection(handler, verb, route, query)

    def _serve_health(self, handler: _Handler, path: str) -> None:
        """``/readyz`` etc.: "ok" (``/version``: its JSON), or the active fault's answer.

        Counted as ("get", path).  Faults that apply: ``fail_for`` for every resource
        (``resource=None``: the server is sick for that long), and ``fail_next``/``fail_for``
        naming this path; ``fail_next(n)`` without a resource counts list/watch requests only,
        so a test's "the next n requests" stays deterministic.  ``disable_resource(path)``
        makes it 404.  RBAC (``allowed_verbs``) does not apply: the real server lets every
        client read these through ``system:public-info-viewer``.
        """
        with self._cond:
            key = ("get", path)
            self._counts[key] = self._counts.get(key, 0) + 1
            disabled = path in self._disabled
            fault = None if disabled else self._take_health_fault(path)
        if disabled:
            handler.send_text(404, "404 page not found\n")
            return
        if fault is not None:
            if fault.status == 403:
                message = f'forbidden: User "{_USER}" cannot get path "/{path}"'
            else:
                message = _DEFAULT_MESSAGES.get(fault.status, f"injected fault {fault.status}")
            headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
            handler.send_json(fault.status, status_body(fault.status, message), headers)
            return
        if path == "version":
            handler.send_json(200, dict(VERSION_INFO))
        else:
            handler.send_text(200, "ok")

    def _take_health_fault(self, path: str) -> _Fault | None:
        """The active fault a health path answers with. Caller holds _cond."""
        now = time.monotonic()
        self._faults = [f for f in self._faults if f.active(now)]
        for fault in self._faults:
            if fault.verb not in (None, "get") or fault.how != "status":
                continue
            if fault.resource == path or (fault.resource is None and fault.remaining is None):
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    def _authenticated(self, handler: _Handler) -> bool:
        accepted = self.accepted_tokens
        if accepted is None:
            return True
        scheme, _, token = (handler.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() in accepted

    def _admit(self, verb: str, route: _Route) -> _Fault | None:
        """Count the request and decide whether it is refused, and how."""
        resource = route.rtype.plural
        with self._cond:
            key = (verb, resource)
            self._counts[key] = self._counts.get(key, 0) + 1
            if resource in self._disabled:
                return _Fault(404, None, verb, resource)
            fault = self._take_fault(verb, resource)
        if fault is not None:
            return fault
        if self.allowed_verbs is not None and verb not in self.allowed_verbs:
            return _Fault(403, None, verb, resource)
        return None

    def _take_fault(self, verb: str, resource: str) -> _Fault | None:
        """Consume the first active matching fault. Caller holds _cond."""
        now = time.monotonic()
        self._faults = [f for f in self._faults if f.active(now)]
        for fault in self._faults:
            if fault.applies(verb, resource):
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    def _send_rejection(
        self, handler: _Handler, verb: str, fault: _Fault, query: dict[str, str]
    ) -> None:
        """Error answer; a 410 on a watch comes in-stream as an ERROR event, as the cache does."""
        route = _parse_route(urlsplit(handler.path).path)
        assert route is not None
        status = fault.status
        if fault.cause == _TOO_LARGE_CAUSE:
            body = _too_large_status(query.get("resourceVersion") or "0", self.resource_version)
        else:
            body = status_body(status, _fault_message(status, verb, route),
                               _forbidden_details(route) if status == 403 else None)
        if fault.how == "silent":
            handler.start_chunked()
            self._hold_silently(handler)
            return
        if fault.how != "status" or (verb == "watch" and status == 410):
            handler.start_chunked()
            if fault.how != "empty":
                handler.write_event("ERROR", body)
            handler.end_chunked()
            return
        retry_after = fault.retry_after
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        handler.send_json(status, body, headers)

    def _hold_silently(self, handler: _Handler) -> None:
        """Keep a connection open, writing nothing, until the client or the server ends it."""
        while True:
            with self._cond:
                if not self._serving:
                    break
                self._cond.wait(_WAKE_INTERVAL)
            if handler.peer_closed():
                break
        handler.abort()

    def _serve_get(self, handler: _Handler, route: _Route) -> None:
        assert route.name is not None and route.namespace is not None
        obj = self.get(route.rtype.plural, route.namespace, route.name)
        if obj is None:
            details = {"name": route.name, "kind": route.rtype.plural}
            if route.rtype.group:
                details["group"] = route.rtype.group
            message = f'{route.rtype.qualified} "{route.name}" not found'
            handler.send_json(404, status_body(404, message, details))
            return
        handler.send_json(200, _wire(route.rtype, obj))

    def _serve_collection(
        self, handler: _Handler, verb: str, route: _Route, query: dict[str, str]
    ) -> None:
        """LIST or WATCH after validating selectors and watch parameters (400 if invalid)."""
        try:
            labels = parse_label_selector(query.get("labelSelector"))
            fields = parse_field_selector(query.get("fieldSelector"))
            if route.name is not None:  # watch on a named object = watch with a name selector
                fields = FieldSelector((*fields.terms, ("metadata.name", True, route.name)))
            params = _parse_watch_params(query) if verb == "watch" else None
        except (SelectorError, ValueError) as exc:
            handler.send_json(400, status_body(400, str(exc)))
            return
        watch = _Watch(route.rtype.plural, route.namespace, labels, fields, handler.connection)
        if params is None:
            self._serve_list(handler, route.rtype, watch, query)
        else:
            self._serve_watch(handler, route.rtype, watch, params)

    def _serve_list(
        self, handler: _Handler, rtype: ResourceType, selection: _Watch, query: dict[str, str]
    ) -> None:
        """LIST, paged the way the API server pages (``limit``/``continue``).

        ``resourceVersion=0`` is served from the watch cache, which ignores ``limit``: the whole
        list in one answer.  Otherwise a ``limit`` pages from etcd at one revision: unset is the
        latest, ``N`` means exactly N (410 once N is compacted); continue tokens point into that
        revision and answer 410 once it is compacted.  Without MVCC the pages of revision N hold
        the objects as they were when its first page was served.
        """
        raw_rv = query.get("resourceVersion", "")
        token = query.get("continue") or ""
        try:
            limit = int(query.get("limit") or 0)
            if limit < 0:
                raise ValueError
        except ValueError:
            handler.send_json(400, status_body(400, f"invalid limit: {query.get('limit')!r}"))
            return
        if token and raw_rv:
            message = "specifying resource version is not allowed when using continue"
            handler.send_json(400, status_body(400, message))
            return
        try:
            with self._cond:
                if token:
                    rv, entries = self._continue_page(rtype.plural, token)
                elif limit and raw_rv != "0":
                    rv, entries = self._first_page(rtype.plural, raw_rv)
                else:
                    rv, entries = self._rv, sorted(self._store[rtype.plural].items())
        except _ListRefused as refused:
            body = status_body(refused.code, refused.message)
            if refused.continue_token is not None:
                body["metadata"] = {"continue": refused.continue_token}
            handler.send_json(refused.code, body)
            return
        items: list[Obj] = []
        metadata: Obj = {"resourceVersion": str(rv)}
        for index, (key, obj) in enumerate(entries):
            if not selection.matches(obj):
                continue
            if limit and raw_rv != "0" and len(items) == limit:
                metadata["continue"] = _continue_token(rv, key)
                metadata["remainingItemCount"] = len(entries) - index
                break
            items.append(_wire(rtype, obj))
        body = {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": metadata,
            "items": items,
        }
        handler.send_json(200, body)

    def _first_page(self, resource: str, raw_rv: str) -> tuple[int, _Entries]:
        """Snapshot the store for a paged LIST. Caller holds _cond."""
        if raw_rv:
            try:
                asked = int(raw_rv)
            except ValueError:
                raise _ListRefused(400, f"invalid resource version: {raw_rv!r}") from None
            if asked < self._floor:
                raise _ListRefused(410, f"too old resource version: {asked} ({self._floor})")
        return self._rv, self._snapshot(resource)

    def _snapshot(self, resource: str) -> _Entries:
        """The store's current entries, kept for the continue tokens into them."""
        entries = sorted(self._store[resource].items())
        self._snapshots[(resource, self._rv)] = entries
        while len(self._snapshots) > _SNAPSHOT_LIMIT:
            del self._snapshots[next(iter(self._snapshots))]
        return entries

    def _continue_page(self, resource: str, token: str) -> tuple[int, _Entries]:
        """The rest of a paged LIST after the token's key, or 410 once it expired. The 410
        carries an inconsistent-continue token, as kube-apiserver's does: the rest of the list
        after the same key, from the current state (a client may use it or start again)."""
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
            rv, start = int(decoded["rv"]), (str(decoded["start"][0]), str(decoded["start"][1]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _ListRefused(400, "continue key is not valid") from None
        entries: _Entries | None
        if rv == _INCONSISTENT:
            rv, entries = self._rv, self._snapshot(resource)
        else:
            entries = self._snapshots.get((resource, rv))
            if self._continues_to_expire > 0:
                self._continues_to_expire -= 1
                entries = None
        if entries is None:
            raise _ListRefused(410, _CONTINUE_EXPIRED, _continue_token(_INCONSISTENT, start))
        return rv, [(key, obj) for key, obj in entries if key >= start]

    # --- watch ---------------------------------------------------------------------------------

    def _open_watch(self, watch: _Watch, rv: int | None) -> Obj | None:
        """Register the watch and queue its initial events, atomically w.r.t. the store.

        Returns a 410 Status instead (without registering) when `rv` predates the history.
        """
        with self._cond:
            if rv is not None and rv < self._floor:
                return _expired_status(rv, self._floor)
            if rv is None:
                for _, obj in sorted(self._store[watch.resource].items()):
                    if watch.matches(obj):
                        watch.pending.append(("ADDED", obj))
            else:
                watch.pending.extend(self._replay(watch, rv))
            watch.cursor = max(self._rv, rv or 0)
            watch.cut = not self._serving
            self._watches.append(watch)
            self._cond.notify_all()
            return None

    def _replay(self, watch: _Watch, rv: int) -> Iterator[tuple[str, Obj]]:
        """History events after `rv` as this watcher sees them. Caller holds _cond."""
        newer = []
        for event in reversed(self._history):
            if event.rv <= rv:
                break
            newer.append(event)
        for event in reversed(newer):
            seen = watch.translate(event)
            if seen is not None:
                yield seen

    def _close_watch(self, watch: _Watch) -> None:
        with self._cond:
            if watch in self._watches:
                self._watches.remove(watch)
            self._cond.notify_all()

    def _next_batch(self, watch: _Watch, until: float) -> _Batch:
        """Wait (bounded) until the watch has output, is cut, or `until` passes."""
        with self._cond:
            while True:
                if watch.cut:
                    return _Batch([], cut=True)
                if watch.pending:
                    items, watch.pending = watch.pending, []
                    return _Batch(items)
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return _Batch([])
                self._cond.wait(min(remaining, _WAKE_INTERVAL))

    def _serve_watch(
        self, handler: _Handler, rtype: ResourceType, watch: _Watch, params: _WatchParams
    ) -> None:
        expired = self._open_watch(watch, params.resource_version)
        handler.start_chunked()
        if expired is not None:
            handler.write_event("ERROR", expired)
            handler.end_chunked()
            return
        try:
            self._stream(handler, rtype, watch, params)
        except OSError:
            handler.close_connection = True
        finally:
            self._close_watch(watch)

    def _stream(
        self, handler: _Handler, rtype: ResourceType, watch: _Watch, params: _WatchParams
    ) -> None:
        """The watch loop: events, raw lines and bookmarks until timeout, cut or peer close."""
        start = time.monotonic()
        deadline = start + params.timeout
        interval = max(self.bookmark_interval, 0.01)
        next_bookmark = start + interval if params.bookmarks else float("inf")
        while True:
            wake = min(deadline, next_bookmark, time.monotonic() + _WAKE_INTERVAL)
            batch = self._next_batch(watch, wake)
            if batch.cut:
                self._close_watch(watch)
                handler.abort()
                return
            if watch.silent:
                self._close_watch(watch)
                self._hold_silently(handler)
                return
            for item in batch.items:
                if isinstance(item, bytes):
                    handler.write_line(item)
                else:
                    handler.write_event(item[0], _wire(rtype, item[1]))
            now = time.monotonic()
            if now >= deadline:
                self._close_watch(watch)  # before the client can observe the end
                handler.end_chunked()
                return
            if now >= next_bookmark:
                handler.write_event("BOOKMARK", self._bookmark(rtype, watch))
                next_bookmark = now + interval
            if handler.peer_closed():
                handler.close_connection = True
                return

    def _bookmark(self, rtype: ResourceType, watch: _Watch) -> Obj:
        with self._cond:
            rv = watch.cursor
        return {
            "kind": rtype.kind,
            "apiVersion": rtype.api_version,
            "metadata": {"resourceVersion": str(rv)},
        }


# --- module helpers ----------------------------------------------------------------------------


def _rtype(resource: str) -> ResourceType:
    try:
        return RESOURCES[resource]
    except KeyError:
        raise ValueError(
            f"unknown resource {resource!r}; expected one of {sorted(RESOURCES)}"
        ) from None


def _shutdown_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _forbidden_message(verb: str, route: _Route) -> str:
    """The wording of a real RBAC denial."""
    rtype = route.rtype
    subject = f'{rtype.qualified} "{route.name}"' if route.name else rtype.qualified
    scope = "at the cluster scope"
    if route.namespace is not None:
        scope = f'in the namespace "{route.namespace}"'
    return (
        f'{subject} is forbidden: User "{_USER}" cannot {verb} resource "{rtype.plural}" '
        f'in API group "{rtype.group}" {scope}'
    )


def _forbidden_details(route: _Route) -> Obj:
    """A real RBAC denial's ``details``: the object's name (if one), the group (if not core),
    and the resource as ``kind``."""
    details: Obj = {}
    if route.name:
        details["name"] = route.name
    if route.rtype.group:
        details["group"] = route.rtype.group
    details["kind"] = route.rtype.plural
    return details


def _continue_token(rv: int, next_key: tuple[str, str]) -> str:
    """An opaque continue token: the revision being paged and the first key of the next page."""
    raw = json.dumps({"rv": rv, "start": list(next_key)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _too_large_status(asked: str, current: int) -> Obj:
    """The 504 a server whose watch cache is behind the RV asked for answers (retry in 1 s)."""
    details = {"causes": [{"reason": _TOO_LARGE_CAUSE, "message": "Too large resource version"}],
               "retryAfterSeconds": 1}
    return status_body(504, f"Too large resource version: {asked}, current: {current}", details)


def _fault_message(status: int, verb: str, route: _Route) -> str:
    if status == 403:
        return _forbidden_message(verb, route)
    if status == 404:
        return _NOT_SERVED
    if status == 410:
        return "too old resource version: injected fault"
    return _DEFAULT_MESSAGES.get(status, f"injected fault {status}")
