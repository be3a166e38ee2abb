"""http.fetch against hostile engines: trickled bodies, redirects, oversize bodies."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import wait_for
from vllm_router_svcdisc.http import EngineCallError, EnginePool, fetch

Respond = Callable[[socket.socket], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], str]]:
    """``serve(respond)`` → a URL whose one connection is answered by ``respond(sock)``."""
    listeners: list[socket.socket] = []
    stop = threading.Event()

    def start(respond: Respond) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                with contextlib.suppress(OSError):
                    respond(conn)
                stop.wait(5)

        threading.Thread(target=run, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    stop.set()
    for listener in listeners:
        listener.close()


def _trickle(head: bytes, body: bytes, pause: float) -> Respond:
    def respond(conn: socket.socket) -> None:
        conn.sendall(head)
        for byte in body:
            conn.sendall(bytes([byte]))
            time.sleep(pause)  # the hostile engine's pacing, not a test wait

    return respond


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_trickled_body_is_cut_off_at_the_timeout(serve, framing: str) -> None:
    body = b"x" * 40
    if framing == "content-length":
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n"
        respond = _trickle(head, body, 0.1)
    else:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunked = b"".join(b"1\r\n" + bytes([b]) + b"\r\n" for b in body) + b"0\r\n\r\n"
        respond = _trickle(head, chunked, 0.02)
    url = serve(respond)
    session = EnginePool(1)
    started = time.monotonic()
    with pytest.raises(EngineCallError) as error:
        fetch(session, url, timeout=0.5, max_bytes=1024)
    assert error.value.cause == "timeout"
    assert time.monotonic() - started < 2.0  # the body deadline, not 40 x 0.1 s


def test_redirects_are_refused_not_followed(serve) -> None:
    url = serve(lambda c: c.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\n"
                                    b"Content-Length: 0\r\n\r\n"))
    with pytest.raises(EngineCallError) as error:
        fetch(EnginePool(1), url, timeout=2, max_bytes=1024)
    assert error.value.cause == "redirect"


def test_a_declared_oversize_body_is_refused_unread(serve) -> None:
    url = serve(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n"))
    with pytest.raises(EngineCallError) as error:
        fetch(EnginePool(1), url, timeout=2, max_bytes=1024)
    assert error.value.cause == "oversize"


def test_an_undeclared_oversize_body_is_cut_at_the_cap(serve) -> None:
    body = b"y" * 5000
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    url = serve(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + chunked))
    with pytest.raises(EngineCallError) as error:
        fetch(EnginePool(1), url, timeout=2, max_bytes=1024)
    assert error.value.cause == "oversize"


def test_a_normal_body_is_returned_whole(serve) -> None:
    url = serve(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    assert fetch(EnginePool(1), url, timeout=2, max_bytes=1024) == (200, b"hello")


def test_connection_refused_is_transient_and_named() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(EngineCallError) as error:
        fetch(EnginePool(1), f"http://127.0.0.1:{port}", timeout=2, max_bytes=1024)
    assert error.value.transient and error.value.cause == "connection"


def test_trickled_status_line_and_headers_are_cut_off_at_the_timeout(serve) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Padding: " + b"p" * 60 + b"\r\n\r\n"
    url = serve(_trickle(b"", head + b"hello", 0.05))
    started = time.monotonic()
    with pytest.raises(EngineCallError) as error:
        fetch(EnginePool(1), url, timeout=0.5, max_bytes=1024)
    assert error.value.cause == "timeout"
    assert time.monotonic() - started < 2.0  # the deadline, not ~4 s of trickled headers


def test_keep_alive_connections_are_reused_across_deadlines(serve) -> None:
    def two_answers(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")

    url = serve(two_answers)  # one connection only: the second GET must reuse it
    session = EnginePool(1)
    assert fetch(session, url, timeout=2, max_bytes=64) == (200, b"one")
    assert fetch(session, url, timeout=2, max_bytes=64) == (200, b"two")


def test_dropping_a_host_closes_its_idle_keep_alive_connection(serve) -> None:
    closed = threading.Event()

    def answer_then_watch(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.settimeout(5)
        if conn.recv(1) == b"":  # the client closed the kept-alive connection
            closed.set()

    url = serve(answer_then_watch)
    pool = EnginePool(1)
    assert fetch(pool, url, timeout=2, max_bytes=64) == (200, b"ok")
    pool.drop_hosts([url, "not a url at all://"])
    assert closed.wait(5)


def test_closing_the_pool_aborts_a_request_blocked_on_a_silent_engine(serve) -> None:
    url = serve(lambda _conn: None)  # reads the request, never answers
    pool = EnginePool(1)
    outcome: list[BaseException] = []

    def blocked() -> None:
        try:
            fetch(pool, url, timeout=30, max_bytes=64)
        except EngineCallError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=blocked)
    worker.start()
    # the abort is what is tested: wait (with a deadline) until the request is in flight;
    # a close() before it would only test the refusal of a closed pool
    wait_for(lambda: pool._in_flight, 5, "the request never got in flight")
    pool.close()
    worker.join(5)
    assert not worker.is_alive() and len(outcome) == 1
    with pytest.raises(EngineCallError, match="closed"):
        fetch(pool, url, timeout=1, max_bytes=64)
