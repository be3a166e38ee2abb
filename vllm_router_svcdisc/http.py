"""Internal: one bounded HTTP GET for engine endpoints: timeouts, a size cap, no redirects.

Shared by the model prober and the metrics scraper so both treat engines the same way: an
engine's answer is never trusted to be small, fast or to point elsewhere.

It runs on urllib3 directly (what ``requests`` is built on): a ``requests.Session.get`` spends
more CPU preparing, merging settings and running hooks than urllib3 spends on the whole
exchange, and the scraper makes a thousand of these calls a second (docs/benchmarks.md).
A pool made with ``keep_alive=False`` (the model prober: each pod is asked once, and engines
close idle connections long before the next probe) sends plain-HTTP requests on one
``http.client`` connection each instead: when every request goes to a new host, urllib3's
pool manager buys nothing and makes the workers take turns on its lock to create one pool and
evict another (docs/benchmarks.md, "Probe CPU": 1.12x the CPU, 0.83x the probes a second).
Both paths give the same answers and the same errors (tests/unit/test_http.py runs every case
on both).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from .clock import SYSTEM_CLOCK
from .deadline import (
    DeadlineHTTPClientConnection,
    DeadlinePoolManager,
    RequestScope,
    deadline_scope,
)
from .errors import SvcDiscError


class EngineCallError(SvcDiscError):
    """An engine call failed: the one exception of the prober's and the scraper's requests.

    ``reason`` is for people (never a credential or a body); ``cause`` a short fixed word for
    metrics: dns, connection, timeout, redirect, oversize, http (an unwanted status), answer (a
    200 whose content is wrong) or other; ``transient`` whether an immediate retry may help;
    ``failure`` the health record's class where the cause alone does not tell it (``refused``,
    ``connect_timeout``, ``read_timeout``: see ``poller.Failure``).
    """

    def __init__(self, reason: str, *, cause: str, transient: bool = False,
                 status: int | None = None, failure: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        self.transient = transient
        self.status = status
        self.failure = failure

    @property
    def unreachable(self) -> bool:
        """No usable answer came (no connection, no reply, a 5xx), as opposed to a wrong one."""
        return self.cause in ("dns", "connection", "timeout") or (
            self.status is not None and self.status >= 500)


def expect_ok(status: int, what: str) -> None:
    """Anything but 200 fails the call; a 5xx is worth an immediate retry."""
    if status != 200:
        raise EngineCallError(f"{what} answered HTTP {status}", cause="http",
                              transient=status >= 500, status=status)


class EnginePool:
    """Keep-alive connections to engines: ``pool_size`` per host, for up to ``hosts`` hosts
    (``keep_alive=False``: one connection per plain-HTTP request, closed after it).

    No proxy is ever used (neither urllib3 nor http.client reads the environment), nothing is
    retried or redirected, and every connection honours the whole-request deadline of
    :func:`fetch`.
    """

    def __init__(self, pool_size: int, hosts: int | None = None, *,
                 keep_alive: bool = True) -> None:
        self.keep_alive = keep_alive
        self._manager = DeadlinePoolManager(num_pools=hosts or pool_size, maxsize=pool_size,
                                            block=False, retries=False)
        self._lock = threading.Lock()
        self._in_flight: set[RequestScope] = set()
        self.closed = False

    @property
    def pooled_hosts(self) -> int:
        """How many hosts have a connection pool now (leak checks: one per tracked pod at most)."""
        return len(self._manager.pools)

    def drop_hosts(self, urls: Iterable[str]) -> None:
        """Close the idle connections to these URLs' hosts (pods that left the endpoints).

        Otherwise each keeps a socket open until ``hosts`` newer pods push it out, and churn
        leaks descriptors.
        """
        hosts = set()
        for url in urls:
            with contextlib.suppress(LocationParseError):
                parsed = urllib3.util.parse_url(url)
                hosts.add((parsed.scheme, (parsed.host or "").lower(), parsed.port))
        pools = self._manager.pools
        keys = pools.keys()  # a locked copy: the container refuses plain iteration
        for key in keys:
            if (key.key_scheme, key.key_host, key.key_port) in hosts:
                with contextlib.suppress(KeyError):
                    del pools[key]  # disposing a pool closes its idle connections

    def close(self) -> None:
        """Refuse new requests and abort the ones in flight, so no worker waits on an engine.

        A request blocked reading (a black-holed engine) fails at once; one still connecting
        ends within its connect timeout.
        """
        with self._lock:
            self.closed = True
            in_flight = list(self._in_flight)
        for scope in in_flight:
            scope.abort()
        self._manager.clear()

    @contextlib.contextmanager
    def _request(self, deadline: float) -> Iterator[RequestScope]:
        with deadline_scope(deadline) as scope:
            with self._lock:
                if self.closed:
                    raise EngineCallError("the connection pool is closed", cause="other")
                self._in_flight.add(scope)
            try:
                yield scope
            finally:
                with self._lock:
                    self._in_flight.discard(scope)

    def _get(self, url: str, headers: Mapping[str, str],
             timeout: float | tuple[float, float]) -> urllib3.BaseHTTPResponse:
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        return self._manager.request(
            "GET", url, headers=dict(headers), timeout=urllib3.Timeout(connect=connect, read=read),
            redirect=False, retries=False, preload_content=False, decode_content=False)


def fetch(
    pool: EnginePool,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float | tuple[float, float],
    max_bytes: int,
) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body).  Bodies over ``max_bytes`` are refused unread.

    ``timeout`` also bounds the whole exchange — status line, headers and body — so an engine
    trickling bytes (slow loris) cannot hold a worker longer than a silent one.
    """
    budget = timeout if isinstance(timeout, int | float) else sum(timeout)
    deadline = SYSTEM_CLOCK.monotonic() + budget  # sockets time out in real time
    # identity: the byte cap then bounds what we hold, and no gzip bomb can expand
    request_headers = {"Accept-Encoding": "identity", **(headers or {})}
    with pool._request(deadline):
        if not pool.keep_alive and url.startswith("http://"):
            return _fetch_once(url, request_headers, timeout, max_bytes, deadline)
        try:
            response = pool._get(url, request_headers, timeout)
        # urllib3 derives its connection errors from ConnectTimeoutError: subclasses first
        except NameResolutionError:
            raise EngineCallError("DNS name does not resolve", cause="dns") from None
        except (NewConnectionError, ProtocolError) as exc:
            raise EngineCallError(_connection_reason(exc), cause="connection",
                                  transient=True, failure="refused") from None
        except ConnectTimeoutError:
            raise EngineCallError("connect timed out", cause="timeout",
                                  failure="connect_timeout") from None
        except (ReadTimeoutError, TimeoutError):
            raise EngineCallError("timed out", cause="timeout",
                                  failure="read_timeout") from None
        except (HTTPError, LocationParseError, ValueError) as exc:
            raise EngineCallError(f"request failed: {exc.__class__.__name__}",
                                  cause="other") from None
        try:
            return response.status, _read_body(response, max_bytes, deadline)
        finally:
            response.release_conn()


def _fetch_once(url: str, headers: Mapping[str, str], timeout: float | tuple[float, float],
                max_bytes: int, deadline: float) -> tuple[int, bytes]:
    """:func:`fetch` on a connection of its own (``keep_alive=False``), the same outcomes."""
    try:
        parsed = urllib3.util.parse_url(url)
    except LocationParseError as exc:
        raise EngineCallError(f"request failed: {exc.__class__.__name__}",
                              cause="other") from None
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    host = (parsed.host or "").strip("[]")  # an IPv6 literal without its brackets
    connection = DeadlineHTTPClientConnection(host, parsed.port or 80, timeout=connect)
    try:
        try:
            connection.connect()
        except socket.gaierror:
            raise EngineCallError("DNS name does not resolve", cause="dns") from None
        except TimeoutError:
            raise EngineCallError("connect timed out", cause="timeout",
                                  failure="connect_timeout") from None
        except OSError as exc:
            raise EngineCallError(_socket_reason(exc), cause="connection", transient=True,
                                  failure="refused") from None
        connection.sock.settimeout(read)
        try:
            connection.request("GET", parsed.request_uri,
                               headers={**headers, "Connection": "close"})
            response = connection.getresponse()
        except TimeoutError:
            raise EngineCallError("timed out", cause="timeout", failure="read_timeout") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            # urllib3 reports both as "Connection aborted." (a ProtocolError)
            raise EngineCallError(_socket_reason(exc), cause="connection", transient=True,
                                  failure="refused") from None
        except (OSError, ValueError) as exc:
            raise EngineCallError(f"request failed: {exc.__class__.__name__}",
                                  cause="other") from None
        declared = response.getheader("Content-Length")
        return response.status, _read_capped(response.status, declared, response.read1,
                                             response.close, max_bytes, deadline)
    finally:
        connection.close()


def _read_body(response: urllib3.BaseHTTPResponse, max_bytes: int, deadline: float) -> bytes:
    if 300 <= response.status < 400:
        response.drain_conn()
    # identity was asked for, so a body compressed anyway is not inflated (no bombs)
    return _read_capped(response.status, response.headers.get("Content-Length"),
                        lambda size: response.read1(size, decode_content=False),
                        response.close, max_bytes, deadline)


def _read_capped(status: int, declared: str | None, read1: Callable[[int], bytes],
                 close: Callable[[], None], max_bytes: int, deadline: float) -> bytes:
    """The body, refused when a redirect, cut at ``max_bytes``, and read by ``deadline``."""
    if 300 <= status < 400:
        raise EngineCallError(f"HTTP {status} redirect refused "
                              "(redirects are never followed)", cause="redirect")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        close()  # never read: the connection is not reused
        raise EngineCallError(f"body of {declared} bytes exceeds the {max_bytes} byte cap",
                              cause="oversize")
    chunks: list[bytes] = []
    size = 0
    try:
        # read1 returns whatever one socket read brings, so the deadline is checked between
        # trickled bytes too
        while chunk := read1(65536):
            size += len(chunk)
            if size > max_bytes:
                close()
                raise EngineCallError(f"body exceeds the {max_bytes} byte cap",
                                      cause="oversize")
            chunks.append(chunk)
            if SYSTEM_CLOCK.monotonic() > deadline:
                close()
                raise EngineCallError("timed out reading the body", cause="timeout",
                                      failure="read_timeout")
    except EngineCallError:
        raise
    except (TimeoutError, ReadTimeoutError):
        close()
        raise EngineCallError("timed out reading the body", cause="timeout",
                              failure="read_timeout") from None
    except Exception as exc:  # urllib3, http.client and socket errors of a broken body
        close()
        raise EngineCallError(f"reading the body failed: {exc.__class__.__name__}",
                              cause="connection") from None
    if declared is not None and declared.isdigit() and size < int(declared):
        # the engine closed before the length it declared (urllib3 raises; http.client's
        # read1 only stops)
        raise EngineCallError("reading the body failed: IncompleteRead", cause="connection")
    return b"".join(chunks)


def _connection_reason(exc: Exception) -> str:
    """Refused or reset, from the socket error urllib3 raised this from."""
    cause = exc.__cause__ or exc.__context__
    reason = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else cause
    return _socket_reason(reason)


def _socket_reason(error: object) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    return "connection failed"
