"""Internal: a whole-request deadline for engine HTTP calls, enforced on every socket read.

Socket timeouts bound each read, not the request: an engine that trickles its status line,
headers or body a byte at a time (slow loris) never trips them.  Connections made by a
:class:`DeadlinePoolManager` wrap their socket so that, inside :func:`deadline_scope`, each
read waits at most until the deadline and then fails with ``TimeoutError``.  No extra
thread; outside a scope the socket behaves as usual.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

from .clock import SYSTEM_CLOCK

_current = threading.local()


class RequestScope:
    """One request's deadline, and the sockets it has read from, so it can be aborted.

    ``abort()`` (from any thread) makes the request's next read fail at once and shuts down the
    sockets it is blocked on: a closing prober or scraper does not wait for black holes.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.aborted = False
        self._sockets: set[socket.socket] = set()

    def watch(self, sock: socket.socket) -> None:
        """Called before every read: remember the socket, refuse to read once aborted."""
        self._sockets.add(sock)  # added before the check: abort() then always sees it
        if self.aborted:
            raise TimeoutError("request aborted: the client is closing")

    def abort(self) -> None:
        self.aborted = True
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def deadline_scope(deadline: float) -> Iterator[RequestScope]:
    """Reads on this thread's deadline-aware connections end by ``deadline`` (monotonic)."""
    previous = getattr(_current, "scope", None)
    scope = _current.scope = RequestScope(deadline)
    try:
        yield scope
    finally:
        _current.scope = previous


class _DeadlineSocket:
    """Delegates to the real socket; reads honour the current thread's deadline."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._timeout: float | None = sock.gettimeout()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def _bound(self) -> None:
        scope: RequestScope | None = getattr(_current, "scope", None)
        if scope is None:
            return
        scope.watch(self._sock)
        remaining = scope.deadline - SYSTEM_CLOCK.monotonic()  # a socket's time is real
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        base = self._timeout
        self._sock.settimeout(remaining if base is None else min(base, remaining))

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._bound()
        return int(self._sock.recv_into(buffer, nbytes, flags))

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._bound()
        return bytes(self._sock.recv(bufsize, flags))

    def makefile(self, mode: str = "r", buffering: int | None = None, **_kwargs: Any) -> Any:
        """A binary reader whose reads come back through :meth:`recv_into`.

        Like ``socket.makefile`` it holds a reference on the socket, so ``close()`` (which
        http.client calls on a ``Connection: close`` response before the body is read) only
        takes effect once the reader is closed too.
        """
        self._sock._io_refs += 1
        raw = socket.SocketIO(self, "rb")  # type: ignore[arg-type]
        return io.BufferedReader(raw, buffering or io.DEFAULT_BUFFER_SIZE)

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()


class _DeadlineHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock)


class _DeadlineHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock)


class DeadlineHTTPClientConnection(http.client.HTTPConnection):
    """A plain ``http.client`` connection (one request, then closed: the prober's) whose
    socket honours :func:`deadline_scope` like the pooled ones."""

    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock)


class _DeadlineHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


class DeadlinePoolManager(PoolManager):
    """A urllib3 PoolManager whose connections honour :func:`deadline_scope`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool_classes_by_scheme = {
            "http": _DeadlineHTTPConnectionPool,
            "https": _DeadlineHTTPSConnectionPool,
        }
