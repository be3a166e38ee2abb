"""Kubernetes Service networking inside one process: a DNS shim and a mini kube-proxy.

:class:`ServiceDNS` patches :func:`socket.getaddrinfo` (and :func:`socket.gethostbyname`,
:func:`socket.gethostbyname_ex`) so that ``<svc>.<ns>.svc.<cluster-domain>`` names resolve to
loopback addresses: the ClusterIP of a :class:`ServiceProxy` for a normal Service, or the ready pod
IPs for a headless one. :class:`ServiceProxy` is a TCP forwarder listening on the ClusterIP and the
Service port that, like kube-proxy, picks one of the *current* ready endpoints for every new
connection (round-robin), falls back to serving-but-terminating ones when none is ready (as
kube-proxy does since Kubernetes 1.28), and rejects connections when there is neither.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NamedTuple

__all__ = ["Backend", "ServiceDNS", "ServiceProxy"]

_POLL = 0.05  # seconds; bound of every blocking wait
_BUF = 65536


def _reset_close(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (what a client sees from an iptables REJECT)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class Backend(NamedTuple):
    """One endpoint as kube-proxy reads it from the EndpointSlices."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False


def usable_backends(endpoints: Sequence[Backend]) -> list[Backend]:
    """kube-proxy's choice: the ready endpoints; when there is none, the serving-but-
    terminating ones (traffic keeps flowing while every pod of a Service drains)."""
    ready = [e for e in endpoints if e.ready]
    return ready or [e for e in endpoints if e.serving and e.terminating]


class ServiceProxy:
    """A kube-proxy-like TCP forwarder for one ClusterIP Service port.

    ``backends`` is called at every new accepted connection and returns the current endpoints,
    as ``(ip, port)`` pairs (ready) or :class:`Backend` tuples with their conditions; one of
    :func:`usable_backends` is picked round-robin. With none the client connection is reset
    at once. Established connections stay on their backend (like conntrack)
    until either side closes or :meth:`stop` is called.
    """

    def __init__(
        self,
        ip: str,
        port: int,
        backends: Callable[[], Sequence[tuple[str, int]]],
        *,
        max_connections: int = 512,
        connect_timeout: float = 2.0,
    ) -> None:
        self.ip = ip
        self.port = port
        self._backends = backends
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[int, tuple[socket.socket, socket.socket | None, threading.Thread]] = {}
        self._next_id = 0
        self._rr = 0
        self._by_backend: dict[tuple[str, int], int] = {}
        self._rejected = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def start(self) -> ServiceProxy:
        with self._lock:
            if self._listener is not None:
                return self
            self._stop.clear()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.ip, self.port))
                listener.listen(128)
                listener.settimeout(_POLL)
            except BaseException:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._accept_thread = threading.Thread(
                target=self._accept_loop,
                args=(listener,),
                name=f"svc-proxy-{self.ip}:{self.port}",
                daemon=True,
            )
            self._accept_thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            listener, thread = self._listener, self._accept_thread
            self._listener, self._accept_thread = None, None
            self._stop.set()
            conns = list(self._conns.values())
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        for client, backend, _ in conns:
            for sock in (client, backend):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        for _, _, worker in conns:
            if worker is not threading.current_thread():
                worker.join(timeout=2.0)

    def __enter__(self) -> ServiceProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- stats ----------------------------------------------------------------------------------

    def connections_by_backend(self) -> dict[tuple[str, int], int]:
        """How many connections were forwarded to each backend since start."""
        with self._lock:
            return dict(self._by_backend)

    @property
    def rejected(self) -> int:
        """Connections reset because no backend was available (or reachable)."""
        with self._lock:
            return self._rejected

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- internals ------------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            try:
                self._handle_new(client)
            except Exception:
                _reset_close(client)

    def _pick(self) -> tuple[str, int] | None:
        try:
            current = [(e.ip, e.port) for e in usable_backends(
                [Backend(str(item[0]), int(item[1]), *item[2:]) for item in self._backends()])]
        except Exception:
            current = []
        if not current:
            return None
        with self._lock:
            choice = current[self._rr % len(current)]
            self._rr += 1
            self._by_backend[choice] = self._by_backend.get(choice, 0) + 1
        return choice

    def _reject(self, client: socket.socket) -> None:
        with self._lock:
            self._rejected += 1
        _reset_close(client)

    def _handle_new(self, client: socket.socket) -> None:
        with self._lock:
            full = len(self._conns) >= self._max_connections
        if full or self._stop.is_set():
            self._reject(client)
            return
        target = self._pick()
        if target is None:
            self._reject(client)
            return
        client.settimeout(None)
        with self._lock:
            conn_id = self._next_id
            self._next_id += 1
            worker = threading.Thread(
                target=self._forward,
                args=(conn_id, client, target),
                name=f"svc-proxy-conn-{conn_id}",
                daemon=True,
            )
            self._conns[conn_id] = (client, None, worker)
        worker.start()

    def _connect(self, target: tuple[str, int]) -> socket.socket | None:
        deadline = time.monotonic() + self._connect_timeout
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(target)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise OSError(err, "connect failed")
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_WRITE)
                while not sel.select(_POLL):
                    if self._stop.is_set() or time.monotonic() > deadline:
                        raise TimeoutError("connect timed out")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, "connect failed")
        except OSError:
            sock.close()
            return None
        sock.setblocking(True)
        return sock

    def _forward(self, conn_id: int, client: socket.socket, target: tuple[str, int]) -> None:
        backend: socket.socket | None = None
        try:
            backend = self._connect(target)
            if backend is None:
                self._reject(client)
                return
            with self._lock:
                if conn_id in self._conns:
                    self._conns[conn_id] = (client, backend, self._conns[conn_id][2])
            if self._stop.is_set():
                return
            self._pump(client, backend)
        except Exception:
            pass
        finally:
            with self._lock:
                self._conns.pop(conn_id, None)
            for sock in (client, backend):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _pump(self, client: socket.socket, backend: socket.socket) -> None:
        for sock in (client, backend):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = {client: backend, backend: client}
        open_dirs = {client, backend}  # sources still sending
        client.settimeout(5.0)
        backend.settimeout(5.0)
        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ)
            sel.register(backend, selectors.EVENT_READ)
            while open_dirs and not self._stop.is_set():
                for key, _ in sel.select(_POLL):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(_BUF)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        return  # reset: drop both sides
                    if data:
                        try:
                            peer[src].sendall(data)
                        except OSError:
                            return
                        continue
                    # EOF from src: half-close towards its peer.
                    sel.unregister(src)
                    open_dirs.discard(src)
                    with contextlib.suppress(OSError):
                        peer[src].shutdown(socket.SHUT_WR)


def _normalize(host: Any) -> str | None:
    if host is None:
        return None
    if isinstance(host, bytes | bytearray):
        try:
            host = bytes(host).decode("idna")
        except UnicodeError:
            return None
    if not isinstance(host, str):
        return None
    return host.lower().rstrip(".")


_original_lock = threading.Lock()


class ServiceDNS:
    """In-process cluster DNS for Services registered with :meth:`register`.

    Between :meth:`install` and :meth:`uninstall` (or inside ``with``), ``socket.getaddrinfo``
    resolves ``<name>.<namespace>.svc.<cluster_domain>`` (and the short forms
    ``<name>.<namespace>.svc`` and ``<name>.<namespace>``) of registered Services to the addresses
    their callable returns at that moment; other names under the cluster domain fail like
    NXDOMAIN; every other name goes to the resolver that was installed before.
    """

    def __init__(self, cluster_domain: str = "cluster.local") -> None:
        self.cluster_domain = cluster_domain.lower().strip(".")
        self._services: dict[tuple[str, str], Callable[[], Sequence[str]]] = {}
        self._lock = threading.RLock()
        self._depth = 0
        self._active = False
        self._prev_getaddrinfo: Callable[..., Any] | None = None
        self._prev_gethostbyname: Callable[[str], str] | None = None
        self._prev_gethostbyname_ex: Callable[[str], Any] | None = None
        self._installed: dict[str, Callable[..., Any]] = {}

    # -- registry -------------------------------------------------------------------------------

    def register(self, namespace: str, name: str, addresses: Callable[[], Sequence[str]]) -> None:
        with self._lock:
            self._services[(namespace.lower(), name.lower())] = addresses

    def unregister(self, namespace: str, name: str) -> None:
        with self._lock:
            self._services.pop((namespace.lower(), name.lower()), None)

    def fqdn(self, namespace: str, name: str) -> str:
        return f"{name}.{namespace}.svc.{self.cluster_domain}"

    def lookup(self, host: str) -> list[str] | None:
        """Addresses of ``host`` if it is ours: a list (maybe empty), or None if not ours.

        An empty list means "ours but does not resolve" (unknown cluster name, or no ready pods).
        """
        name = _normalize(host)
        if not name:
            return None
        labels = name.split(".")
        domain = self.cluster_domain.split(".")
        under_domain = labels[-len(domain) :] == domain and len(labels) > len(domain)
        key: tuple[str, str] | None = None
        if len(labels) == 3 + len(domain) and labels[2:] == ["svc", *domain]:
            key = (labels[1], labels[0])  # <svc>.<ns>.svc.<domain>
        elif (len(labels) == 3 and labels[2] == "svc") or len(labels) == 2:
            key = (labels[1], labels[0])  # search-path short forms
        with self._lock:
            func = self._services.get(key) if key is not None else None
        if func is None:
            return [] if under_domain else None
        try:
            return [str(a) for a in func()]
        except Exception:
            return []

    # -- install --------------------------------------------------------------------------------

    def install(self) -> ServiceDNS:
        """Patch the resolver functions of the :mod:`socket` module (re-entrant)."""
        with _original_lock, self._lock:
            self._depth += 1
            if self._depth > 1:
                return self
            self._prev_getaddrinfo = socket.getaddrinfo
            self._prev_gethostbyname = socket.gethostbyname
            self._prev_gethostbyname_ex = socket.gethostbyname_ex
            self._active = True
            self._installed = {
                "getaddrinfo": self._getaddrinfo,
                "gethostbyname": self._gethostbyname,
                "gethostbyname_ex": self._gethostbyname_ex,
            }
            for attr, func in self._installed.items():
                setattr(socket, attr, func)
        return self

    def uninstall(self) -> None:
        """Undo :meth:`install`; the last matching call restores the previous functions.

        If another patch was stacked on top of ours meanwhile, ours is left in place but becomes
        a pass-through, so that the other patch keeps working.
        """
        with _original_lock, self._lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth > 0:
                return
            self._active = False
            previous = {
                "getaddrinfo": self._prev_getaddrinfo,
                "gethostbyname": self._prev_gethostbyname,
                "gethostbyname_ex": self._prev_gethostbyname_ex,
            }
            for attr, func in self._installed.items():
                if getattr(socket, attr) is func and previous[attr] is not None:
                    setattr(socket, attr, previous[attr])
            self._installed = {}

    @property
    def installed(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> ServiceDNS:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    # -- patched functions ----------------------------------------------------------------------

    def _nxdomain(self, host: Any) -> socket.gaierror:
        return socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def _getaddrinfo(
        self,
        host: Any,
        port: Any,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, Any, int, str, Any]]:
        prev = self._prev_getaddrinfo
        assert prev is not None
        addrs = self.lookup(host) if self._active else None
        if addrs is None or flags & socket.AI_NUMERICHOST:
            return prev(host, port, family, type, proto, flags)  # type: ignore[no-any-return]
        if not addrs:
            raise self._nxdomain(host)
        if family not in (socket.AF_UNSPEC, socket.AF_INET):
            raise socket.gaierror(
                getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME),
                "Address family for hostname not supported",
            )
        result: list[tuple[Any, Any, int, str, Any]] = []
        for addr in addrs:
            # The real function shapes the tuples (port/service names, type/proto expansion).
            result.extend(
                prev(addr, port, socket.AF_INET, type, proto, flags | socket.AI_NUMERICHOST)
            )
        if result and flags & socket.AI_CANONNAME:
            fam, typ, pro, _, sockaddr = result[0]
            result[0] = (fam, typ, pro, _normalize(host) or "", sockaddr)
        return result

    def _gethostbyname(self, hostname: str) -> str:
        prev = self._prev_gethostbyname
        assert prev is not None
        addrs = self.lookup(hostname) if self._active else None
        if addrs is None:
            return prev(hostname)
        if not addrs:
            raise self._nxdomain(hostname)
        return addrs[0]

    def _gethostbyname_ex(self, hostname: str) -> tuple[str, list[str], list[str]]:
        prev = self._prev_gethostbyname_ex
        assert prev is not None
        addrs = self.lookup(hostname) if self._active else None
        if addrs is None:
            return prev(hostname)  # type: ignore[no-any-return]
        if not addrs:
            raise self._nxdomain(hostname)
        return (_normalize(hostname) or hostname, [], list(addrs))
