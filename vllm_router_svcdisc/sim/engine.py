"""Fake vLLM engines for tests and benchmarks.

Each :class:`FakeEngine` is a small stdlib HTTP/1.1 server listening on its own loopback IP
(standing in for a pod IP). It serves the endpoints that a router's discovery and scraping code
read from a vLLM 0.33 OpenAI server (``/metrics``, ``/v1/models``, ``/health``,
``POST /v1/completions``) and can be switched at any time into failure modes (black hole, slow,
garbage, HTTP 500, oversize, down, wedged, slow ``/metrics``), and cut off the network as a dead
node is (:meth:`FakeEngine.cut_network`).
"""

from __future__ import annotations

import contextlib
import enum
import json
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

__all__ = ["EngineMode", "FakeEngine", "accept_queue", "split_evenly", "wait_until"]

SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")

# Buckets of vLLM's request latency histograms (seconds).
_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

_GARBAGE_METRICS = b"<html><body>502 {{{ this is not prometheus text \x00\xff\xfe }}}\n"
_GARBAGE_JSON = b'{"object": "list", "data": [{"id": "truncated'
_MAX_LORA_HISTORY = 16
_POLL = 0.05  # seconds; bound of every internal wait loop
KEEPALIVE_TIMEOUT = 5.0  # uvicorn's default timeout_keep_alive: idle connections close after it
_TRICKLE_LIMIT = 120.0  # a trickled response gives up after this long
_HOLD_LIMIT = 600.0  # a black-holed, wedged or cut-off connection is held at most this long
_CUT_BACKLOG = 1  # listen backlog of a cut-off listener: its accept queue holds 2 connections
_FILLERS_MAX = 8  # connections made to fill a cut-off listener's accept queue, at most
_FILL_WAIT = 0.5  # seconds one filler connection may take


class EngineMode(enum.StrEnum):
    """Behaviour of a :class:`FakeEngine`."""

    OK = "ok"
    BLACKHOLE = "blackhole"  # accept, read the request, never answer (until stop)
    SLOW = "slow"  # answer normally after ``slow_delay`` seconds
    GARBAGE = "garbage"  # 200 with unparsable /metrics and invalid JSON on /v1/*
    ERROR500 = "error500"  # 500 everywhere (/health: 503)
    OVERSIZE = "oversize"  # /metrics body of ``oversize_bytes`` bytes
    DOWN = "down"  # listening socket closed: connections refused
    TRICKLE = "trickle"  # slow loris: headers at once, then the body one byte per
    #                      ``trickle_interval`` seconds (on /metrics and /v1/*)
    WEDGED = "wedged"  # stuck EngineCore: /health, /v1/models, /metrics answer 200, completions
    #                    are accepted and held unanswered, running > 0, token counters frozen
    SLOW_METRICS = "slow_metrics"  # a long prefill blocks the event loop: GETs of
    #                    ``slow_paths`` (/metrics) answer after ``slow_delay`` s or when the
    #                    mode ends, whichever is first; completions are served as usual
    BAD_MODELS = "bad-models"  # /v1/models: 200, valid JSON, but ``data`` is a list of model
    #                            names (strings), not model cards; everything else as OK


def split_evenly(total: int, parts: int) -> list[int]:
    """Split ``total`` over ``parts`` so that the parts sum to it (5 over 2 -> [3, 2])."""
    parts = max(1, parts)
    base, rest = divmod(int(total), parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that tracks its connections (busy or idle between requests), so
    that it can drop them promptly or, at SIGTERM, close only the idle ones."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, engine: FakeEngine, address: tuple[str, int]) -> None:
        self.engine = engine
        self.release = threading.Event()  # set when this server is torn down
        self.listening = True  # False once its listening socket is closed (SIGTERM)
        self._conns: dict[socket.socket, bool] = {}  # connection -> a request is in flight
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            released = self.release.is_set()
            if not released:
                self._conns[request] = False
        if released:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def set_busy(self, conn: socket.socket, busy: bool) -> None:
        with self._conns_lock:
            if conn in self._conns:
                self._conns[conn] = busy

    def stop_listening(self) -> None:
        """Close the listening socket: new connections are refused from now on."""
        self.listening = False
        self.shutdown()
        self.server_close()

    def close_idle_connections(self) -> None:
        """Close connections with no request in flight (one whose next request has already
        arrived counts as busy: it is answered, with ``Connection: close``)."""
        with self._conns_lock:
            idle = [conn for conn, busy in self._conns.items() if not busy]
        for conn in idle:
            with contextlib.suppress(OSError, ValueError):
                if not select.select([conn], [], [], 0)[0]:
                    conn.shutdown(socket.SHUT_RDWR)

    def drop_connections(self) -> None:
        self.release.set()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def accept_queue(listener: socket.socket) -> tuple[int, int] | None:
    """``(queued, backlog)`` of a listening socket on Linux (``TCP_INFO`` reports the accept
    queue's length as ``tcpi_unacked`` and its limit as ``tcpi_sacked``); None elsewhere.
    The queue is full, and new SYNs are dropped, once ``queued > backlog``."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        raw = listener.getsockopt(socket.IPPROTO_TCP, option, 104)
    except OSError:
        return None
    if len(raw) < 32:
        return None
    queued, backlog = struct.unpack_from("II", raw, 24)
    return int(queued), int(backlog)


class _Cut:
    """A listening socket nobody accepts on, its accept queue filled by our own connections:
    the kernel drops every further SYN (no SYN-ACK, no RST), so a client's connect times out
    as it does towards a dead node.  ``sock`` is the engine's own listener (``owned`` False)
    or one bound for the purpose (the engine was not listening when its node died)."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], owned: bool) -> None:
        self.sock = sock
        self.owned = owned
        self.fillers: list[socket.socket] = []
        sock.listen(_CUT_BACKLOG)
        for _ in range(_FILLERS_MAX):
            queue = accept_queue(sock)
            if queue is not None and queue[0] > queue[1]:
                break  # full: SYNs are dropped from now on
            if queue is None and len(self.fillers) > _CUT_BACKLOG:
                break  # not Linux: backlog + 1 queued connections is the usual limit
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(_FILL_WAIT)
            try:
                filler.connect(address)
            except OSError:
                filler.close()  # not let in: the queue is full already
                break
            self.fillers.append(filler)
            if queue is not None:  # the handshake's last ACK may still be on its way
                before = queue[0]

                def queued(before: int = before) -> bool:
                    now = accept_queue(sock)
                    return now is None or now[0] > before

                wait_until(queued, timeout=_FILL_WAIT, interval=0.001)

    @classmethod
    def bind(cls, address: tuple[str, int]) -> _Cut:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            return cls(sock, address, owned=True)
        except BaseException:
            sock.close()
            raise

    def release_fillers(self) -> None:
        """Close our queued connections (accepted later, they read EOF and close)."""
        fillers, self.fillers = self.fillers, []
        for filler in fillers:
            with contextlib.suppress(OSError):
                filler.close()

    def close(self) -> None:
        self.release_fillers()
        if self.owned:
            with contextlib.suppress(OSError):
                self.sock.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeVLLM/0.33"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        # reads time out after the keep-alive timeout: an idle connection closes then
        self.connection.settimeout(self.server.engine.keepalive_timeout)

    def parse_request(self) -> bool:
        self.server.set_busy(self.connection, True)
        return super().parse_request()

    def handle_one_request(self) -> None:
        if not self._await_network():  # cut off: read nothing until the node is back
            self.close_connection = True
            return
        super().handle_one_request()
        self.server.set_busy(self.connection, False)
        if self.close_connection:
            self._await_network()  # a dead node closes nothing either (no FIN)

    def log_message(self, format: str, *args: Any) -> None:
        return

    # -- plumbing -----------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        if self.server.engine.draining:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)

    def _hold(self, seconds: float | None, spell: EngineMode | None = None) -> bool:
        """Wait ``seconds`` (None: up to ``_HOLD_LIMIT``), ending early once the engine's mode is
        no longer ``spell``.  True when the wait is over (the time is up or the spell ended);
        False when the server is torn down or an unbounded hold reached its limit."""
        engine = self.server.engine
        deadline = time.monotonic() + (_HOLD_LIMIT if seconds is None else seconds)
        while not self.server.release.is_set():
            if spell is not None and engine.mode is not spell:
                return True
            left = min(_POLL, deadline - time.monotonic())
            if left <= 0:
                return seconds is not None
            self.server.release.wait(left)
        return False

    def _await_network(self) -> bool:
        """While the engine's node is cut off, hold the connection as it is: read nothing,
        write nothing, close nothing.  False if the server is torn down meanwhile (or after
        ``_HOLD_LIMIT``)."""
        engine = self.server.engine
        deadline = time.monotonic() + _HOLD_LIMIT
        while engine.partitioned:
            if self.server.release.wait(_POLL) or time.monotonic() > deadline:
                return False
        return not self.server.release.is_set()

    # -- dispatch -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._discard_body()
        self._dispatch()

    def _dispatch(self) -> None:
        engine = self.server.engine
        path = self.path.split("?", 1)[0]
        if not self._await_network():
            self.close_connection = True
            return
        engine._count(path)
        mode = engine.mode
        if mode is EngineMode.BLACKHOLE:
            self._hold(None, EngineMode.BLACKHOLE)  # lifted: dropped unanswered all the same
            self.close_connection = True
            return
        if mode is EngineMode.SLOW and not self._hold(engine.slow_delay):
            self.close_connection = True
            return
        if (mode is EngineMode.SLOW_METRICS and self.command in ("GET", "HEAD")
                and path in engine.slow_paths
                and not self._hold(engine.slow_delay, EngineMode.SLOW_METRICS)):
            self.close_connection = True
            return
        if self.server.release.is_set() or not self._await_network():
            self.close_connection = True
            return
        try:
            self._route(engine, mode, path)
        except OSError:
            self.close_connection = True

    def _route(self, engine: FakeEngine, mode: EngineMode, path: str) -> None:
        if mode is EngineMode.ERROR500:
            if path == "/health":
                self._send(503, b"")
            else:
                self._send_json(500, {"error": "Internal Server Error"})
            return
        if mode is EngineMode.TRICKLE and self.command == "GET" and (
                path == "/metrics" or path == "/v1/models"):
            if path == "/metrics":
                self._send_trickled(engine, engine.metrics_text(),
                                    "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send_trickled(engine, json.dumps(engine.models_payload()).encode(),
                                    "application/json")
            return
        if path == "/metrics" and self.command in ("GET", "HEAD"):
            if mode is EngineMode.GARBAGE:
                self._send(200, _GARBAGE_METRICS, "text/plain; version=0.0.4; charset=utf-8")
            elif mode is EngineMode.OVERSIZE:
                self._send_oversize(engine)
            else:
                self._send(200, engine.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
            return
        if path == "/health" and self.command in ("GET", "HEAD"):
            self._send(200, b"", "text/plain")
            return
        if path.startswith("/v1/"):
            if not self._authorized(engine):
                self._send_json(401, {"error": "Unauthorized"})
                return
            if mode is EngineMode.GARBAGE:
                self._send(200, _GARBAGE_JSON)
                return
            if path == "/v1/models" and self.command in ("GET", "HEAD"):
                payload = engine.models_payload()
                if mode is EngineMode.BAD_MODELS:
                    payload["data"] = [card["id"] for card in payload["data"]]
                self._send_json(200, payload)
                return
            if path in ("/v1/completions", "/v1/chat/completions") and self.command == "POST":
                started = time.monotonic()
                if mode is EngineMode.WEDGED and not self._wedged(engine):
                    self.close_connection = True
                    return
                body = engine.completion_payload(chat=path.endswith("chat/completions"))
                engine._served(body["usage"])
                self._send_json(200, body)
                engine._observe_latency(time.monotonic() - started)
                return
        self._send_json(404, {"detail": "Not Found"})

    def _wedged(self, engine: FakeEngine) -> bool:
        """Hold an accepted completion while the engine is wedged (it counts as running).
        True once the engine recovers (then it is answered); False on teardown or after
        ``_HOLD_LIMIT`` (dropped unanswered)."""
        engine._hold_request(+1)
        try:
            recovered = self._hold(None, EngineMode.WEDGED)
        finally:
            engine._hold_request(-1)
        return recovered and self._await_network()

    def _authorized(self, engine: FakeEngine) -> bool:
        key = engine.api_key
        if not key:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {key}"

    def _send_trickled(self, engine: FakeEngine, body: bytes, content_type: str) -> None:
        """Declare the whole body, then send it a byte at a time: each read gets data well
        within any read timeout, only a whole-body deadline stops it.  Ends when the client
        goes away, the mode changes, the engine stops, or after ``_TRICKLE_LIMIT`` seconds."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        limit = time.monotonic() + _TRICKLE_LIMIT
        for index in range(len(body)):
            if (self.server.release.is_set() or engine.mode is not EngineMode.TRICKLE
                    or time.monotonic() > limit or not self._await_network()):
                self.close_connection = True
                return
            self.wfile.write(body[index:index + 1])  # OSError once the client has gone
            self.server.release.wait(max(0.001, engine.trickle_interval))

    def _send_oversize(self, engine: FakeEngine) -> None:
        total = max(0, int(engine.oversize_bytes))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(total))
        self.end_headers()
        if self.command == "HEAD":
            return
        line = f'vllm:num_requests_running{{engine="0",model_name="{engine.model}"}} 0.0\n'
        block = line.encode() * max(1, 65536 // len(line))
        sent = 0
        while sent < total:
            if self.server.release.is_set() or not self._await_network():
                self.close_connection = True
                return
            chunk = block[: total - sent]
            self.wfile.write(chunk)
            sent += len(chunk)


class FakeEngine:
    """A fake vLLM OpenAI-compatible server on ``ip:port``.

    Load attributes (``running``, ``waiting``, ``kv_cache_usage``, ``prefix_queries``,
    ``prefix_hits``, ``sleep_state``, ``running_lora_adapters``, ``waiting_lora_adapters``,
    ``lora_adapters``) may be assigned at any time from any thread; counts are per-engine totals,
    split over the data-parallel ranks on the metrics page. ``mode`` may also be set at any time.

    Progress: ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total`` grow by each
    served completion's usage, and ``vllm:generation_tokens_total`` also by ``decode_rate``
    tokens per second per running request (``running`` plus the completions held by a wedged
    engine), read on ``clock``; a wedged engine's counters stop.
    """

    def __init__(
        self,
        ip: str,
        port: int = 8000,
        *,
        model: str = "meta-llama/Llama-3.1-8B-Instruct",
        lora_adapters: Sequence[str] = (),
        api_key: str | None = None,
        dp_ranks: int = 1,
        legacy_names: bool = False,
        max_lora: int = 4,
        max_model_len: int = 8192,
        clock: Callable[[], float] = time.monotonic,
        mode: EngineMode = EngineMode.OK,
        slow_paths: Sequence[str] = ("/metrics",),
        slow_delay: float = 2.0,
    ) -> None:
        """``mode``, ``slow_paths`` and ``slow_delay``: the state it starts in (a pod replaced
        while its Service's engines misbehave starts misbehaving, before anybody calls it)."""
        if dp_ranks < 1:
            raise ValueError("dp_ranks must be >= 1")
        self.ip = ip
        self.port = port
        self.model = model
        self.lora_adapters: list[str] = list(lora_adapters)
        self.api_key = api_key
        self.dp_ranks = dp_ranks
        self.legacy_names = legacy_names
        self.max_lora = max_lora
        self.max_model_len = max_model_len

        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.sleep_state = "awake"
        self.running_lora_adapters: list[str] = []
        self.waiting_lora_adapters: list[str] = []
        self.slow_delay = slow_delay
        self.slow_paths: frozenset[str] = frozenset(slow_paths)  # delayed in SLOW_METRICS
        self.decode_rate = 20.0  # generated tokens per second per running request
        self.oversize_bytes = 50 * 1024 * 1024
        self.trickle_interval = 0.2
        self.keepalive_timeout = KEEPALIVE_TIMEOUT
        self.draining = False

        self._lock = threading.RLock()
        self._mode = EngineMode(mode)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._counts: dict[str, int] = {}
        self._created = time.time()
        self._rank_created = [self._created + i * 1e-4 for i in range(dp_ranks)]
        self._lora_history: dict[tuple[str, str, str], float] = {}
        self._latency_buckets = [[0] * len(_LATENCY_BUCKETS) for _ in range(dp_ranks)]
        self._latency_sum = [0.0] * dp_ranks
        self._latency_count = [0] * dp_ranks
        self._completions = 0
        self._clock = clock
        self._progress_at = clock()
        self._prompt_tokens = 0.0
        self._generation_tokens = 0.0
        self._held = 0  # completions held by a wedged engine
        self._partitioned = False
        self._cut: _Cut | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_EngineCollector(self))

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def start(self) -> FakeEngine:
        with self._lock:
            if self._started:
                return self
            self._started = True
            self.draining = False
            try:
                if self._partitioned:
                    self._cut = _Cut.bind(self.address)
                elif self._mode is not EngineMode.DOWN:
                    self._bind()
            except BaseException:
                self._started = False
                raise
        return self

    def drain(self) -> None:
        """SIGTERM, as uvicorn handles it: the listening socket closes at once (new connections
        are refused), idle keep-alive connections are closed, requests in flight finish and
        their connections close after the response.  ``stop()`` is the process exiting."""
        with self._lock:
            self.draining = True
            if self._partitioned:
                return  # on a dead node the kubelet sends no SIGTERM: it comes with the node
            server = self._server
        if server is not None:
            server.stop_listening()
            server.close_idle_connections()

    def stop(self) -> None:
        with self._lock:
            self._started = False
            cut, self._cut = self._cut, None
            if cut is not None:
                cut.close()
            self._unbind()

    # -- the node's network ----------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        """True while the engine is cut off the network (:meth:`cut_network`)."""
        return self._partitioned

    def cut_network(self) -> None:
        """The engine's node is gone (power, kernel, partition), the process untouched.

        New connections time out: the listener stops accepting and its accept queue is filled,
        so the kernel drops SYNs (no SYN-ACK, no RST).  Open connections get nothing back: their
        handlers stop reading, writing and closing (requests in flight and later ones hang, no
        FIN).  Mode changes and SIGTERM (:meth:`drain`) meanwhile take effect at
        :meth:`restore_network`.  :meth:`stop` still tears everything down.
        """
        with self._lock:
            if self._partitioned:
                return
            self._partitioned = True
            if not self._started:
                return
            server, thread = self._server, self._thread
            if server is not None and server.listening:
                server.shutdown()  # the accept loop ends; the listening socket stays open
                if thread is not None:
                    thread.join(timeout=2.0)
                self._thread = None
                self._cut = _Cut(server.socket, self.address, owned=False)
            else:
                self._cut = _Cut.bind(self.address)

    def restore_network(self) -> None:
        """The node is back: held connections carry on (late answers, or their deferred close),
        connections queued meanwhile are accepted, and what happened to the process meanwhile
        (mode, SIGTERM) shows now."""
        with self._lock:
            if not self._partitioned:
                return
            self._partitioned = False
            cut, self._cut = self._cut, None
            if cut is None:
                return
            cut.release_fillers()
            server = self._server
            if cut.owned or server is None:
                cut.close()
                if self._mode is not EngineMode.DOWN and server is None and not self.draining:
                    self._bind()
            elif self._mode is EngineMode.DOWN:
                self._unbind()  # the process died meanwhile
            elif not self.draining:
                server.socket.listen(server.request_queue_size)
                self._serve(server)
            server = self._server
        if server is not None and self.draining and server.listening:
            server.stop_listening()
            server.close_idle_connections()

    def __enter__(self) -> FakeEngine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def is_listening(self) -> bool:
        with self._lock:
            return self._server is not None and not self.draining

    def _bind(self) -> None:
        server = _Server(self, (self.ip, self.port))
        self.port = server.server_port  # resolves port 0 once; rebinding reuses it
        self._server = server
        self._serve(server)

    def _serve(self, server: _Server) -> None:
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL},
            name=f"fake-vllm-{self.ip}:{self.port}",
            daemon=True,
        )
        self._thread = thread
        thread.start()

    def _unbind(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.release.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if thread is not None:
            thread.join(timeout=2.0)

    # -- mode -----------------------------------------------------------------------------------

    @property
    def mode(self) -> EngineMode:
        return self._mode

    @mode.setter
    def mode(self, value: EngineMode | str) -> None:
        new = EngineMode(value)
        with self._lock:
            self._advance()  # progress up to now counts under the old mode
            old = self._mode
            self._mode = new
            if not self._started or old is new or self._partitioned:
                return  # cut off: the listener follows the mode at restore_network()
            if new is EngineMode.DOWN:
                self._unbind()
            elif self._server is None:
                self._bind()

    # -- stats ----------------------------------------------------------------------------------

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _count(self, path: str) -> None:
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1

    def _advance(self) -> None:
        """Move the generation counter by the decoding done since the last call (lock held)."""
        now = self._clock()
        elapsed, self._progress_at = max(0.0, now - self._progress_at), now
        if self._mode is not EngineMode.WEDGED:
            busy = max(0, int(self.running)) + self._held
            self._generation_tokens += busy * max(0.0, float(self.decode_rate)) * elapsed

    def _hold_request(self, delta: int) -> None:
        with self._lock:
            self._advance()
            self._held += delta

    def _served(self, usage: dict[str, int]) -> None:
        with self._lock:
            self._advance()
            self._prompt_tokens += usage.get("prompt_tokens", 0)
            self._generation_tokens += usage.get("completion_tokens", 0)

    def _observe_latency(self, seconds: float) -> None:
        with self._lock:
            rank = self._completions % self.dp_ranks
            self._completions += 1
            for i, bound in enumerate(_LATENCY_BUCKETS):
                if seconds <= bound:
                    self._latency_buckets[rank][i] += 1
            self._latency_sum[rank] += seconds
            self._latency_count[rank] += 1

    # -- payloads -------------------------------------------------------------------------------

    def metrics_text(self) -> bytes:
        """The Prometheus text page as served in OK mode."""
        return generate_latest(self._registry)

    def models_payload(self) -> dict[str, Any]:
        created = int(time.time())
        with self._lock:
            adapters = list(self.lora_adapters)

        def card(
            model_id: str, root: str, parent: str | None, max_len: int | None
        ) -> dict[str, Any]:
            return {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": max_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }

        data = [card(self.model, self.model, None, self.max_model_len)]
        data += [card(name, f"/adapters/{name}", self.model, None) for name in adapters]
        return {"object": "list", "data": data}

    def completion_payload(self, chat: bool = False) -> dict[str, Any]:
        created = int(time.time())
        usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
        if chat:
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
                "served_by": self.ip,
            }
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": created,
            "model": self.model,
            "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "stop"}],
            "usage": usage,
            "served_by": self.ip,
        }

    def _snapshot(self) -> dict[str, Any]:
        with self._lock:
            running = ",".join(self.running_lora_adapters)
            waiting = ",".join(self.waiting_lora_adapters)
            key = (str(self.max_lora), running, waiting)
            now = time.time()
            newest = max(self._lora_history.values(), default=0.0)
            self._lora_history.pop(key, None)
            self._lora_history[key] = max(now, newest + 1e-3)
            while len(self._lora_history) > _MAX_LORA_HISTORY:
                self._lora_history.pop(next(iter(self._lora_history)))
            self._advance()
            return {
                "running": int(self.running) + self._held,
                "prompt_tokens": int(self._prompt_tokens),
                "generation_tokens": int(self._generation_tokens),
                "waiting": int(self.waiting),
                "kv": float(self.kv_cache_usage),
                "queries": int(self.prefix_queries),
                "hits": int(self.prefix_hits),
                "sleep_state": str(self.sleep_state),
                "lora": dict(self._lora_history),
                "buckets": [list(b) for b in self._latency_buckets],
                "lat_sum": list(self._latency_sum),
                "lat_count": list(self._latency_count),
            }


class _EngineCollector:
    """Renders one engine's state as vLLM 0.33 metric families."""

    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        s = e._snapshot()
        ranks = [str(i) for i in range(e.dp_ranks)]
        labels = ["model_name", "engine"]

        def gauge(name: str, doc: str, values: Sequence[float]) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for rank, value in zip(ranks, values, strict=True):
                fam.add_metric([e.model, rank], value)
            return fam

        def counter(name: str, doc: str, values: Sequence[float]) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=labels)
            for i, (rank, value) in enumerate(zip(ranks, values, strict=True)):
                fam.add_metric([e.model, rank], value, created=e._rank_created[i])
            return fam

        n = e.dp_ranks
        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            split_evenly(s["running"], n),
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            split_evenly(s["waiting"], n),
        )
        prefix = "gpu_" if e.legacy_names else ""
        yield gauge(
            f"vllm:{prefix}cache_usage_perc" if e.legacy_names else "vllm:kv_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage."
            if e.legacy_names
            else "KV-cache usage. 1 means 100 percent usage.",
            [s["kv"]] * n,
        )
        for name, doc, key in (
            (f"vllm:{prefix}prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.", "queries"),
            (f"vllm:{prefix}prefix_cache_hits",
             "Prefix cache hits, in terms of number of cached tokens.", "hits"),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens"),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             "generation_tokens"),
        ):
            yield counter(name, doc, split_evenly(s[key], n))
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            [0] * n,
        )

        sleep = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
            "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.",
            labels=["model_name", "engine", "sleep_state"],
        )
        states = list(SLEEP_STATES)
        if s["sleep_state"] not in states:
            states.append(s["sleep_state"])
        for rank in ranks:
            for state in states:
                sleep.add_metric([e.model, rank, state], 1.0 if state == s["sleep_state"] else 0.0)
        yield sleep

        hist = HistogramMetricFamily(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels=labels,
        )
        for i, rank in enumerate(ranks):
            buckets: list[tuple[str, float]] = [
                (_fmt_le(bound), float(s["buckets"][i][j]))
                for j, bound in enumerate(_LATENCY_BUCKETS)
            ]
            buckets.append(("+Inf", float(s["lat_count"][i])))
            hist.add_metric([e.model, rank], buckets, s["lat_sum"][i])
        yield hist

        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        for (max_lora, running, waiting), stamp in s["lora"].items():
            lora.add_metric([max_lora, running, waiting], stamp)
        yield lora

        cache = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "engine",
                "gpu_memory_utilization",
                "num_gpu_blocks",
            ],
        )
        for rank in ranks:
            cache.add_metric(["16", "auto", "True", rank, "0.92", "27000"], 1.0)
        yield cache


def _fmt_le(bound: float) -> str:
    return repr(float(bound))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` elapses; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
