"""http.fetch against hostile engines: trickled bodies, redirects, oversize bodies — on both
paths, the keep-alive pool (urllib3) and the one-shot connection (http.client, the prober's),
which must give the same answers and the same errors."""

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


@pytest.fixture(params=["keep-alive", "one-shot"])
def make_pool(request: pytest.FixtureRequest) -> Callable[[], EnginePool]:
    """Each test of an exchange runs on both paths of ``fetch``."""
    return lambda: EnginePool(1, keep_alive=request.param == "keep-alive")


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
def test_a_trickled_body_is_cut_off_at_the_timeout(serve, make_pool, framing: str) -> None:
    body = b"x" * 40
    if framing == "content-length":
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n"
        respond = _trickle(head, body, 0.1)
    else:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunked = b"".join(b"1\r\n" + bytes([b]) + b"\r\n" for b in body) + b"0\r\n\r\n"
        respond = _trickle(head, chunked, 0.02)
    url = serve(respond)
    session = make_pool()
    started = time.monotonic()
    with pytest.raises(EngineCallError) as error:
        fetch(session, url, timeout=0.5, max_bytes=1024)
    assert error.value.cause == "timeout"
    assert time.monotonic() - started < 2.0  # the body deadline, not 40 x 0.1 s


def test_redirects_are_refused_not_followed(serve, make_pool) -> None:
    url = serve(lambda c: c.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\n"
                                    b"Content-Length: 0\r\n\r\n"))
    with pytest.raises(EngineCallError) as error:
        fetch(make_pool(), url, timeout=2, max_bytes=1024)
    assert error.value.cause == "redirect"


def test_a_declared_oversize_body_is_refused_unread(serve, make_pool) -> None:
    url = serve(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n"))
    with pytest.raises(EngineCallError) as error:
        fetch(make_pool(), url, timeout=2, max_bytes=1024)
    assert error.value.cause == "oversize"


def test_an_undeclared_oversize_body_is_cut_at_the_cap(serve, make_pool) -> None:
    body = b"y" * 5000
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    url = serve(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + chunked))
    with pytest.raises(EngineCallError) as error:
        fetch(make_pool(), url, timeout=2, max_bytes=1024)
    assert error.value.cause == "oversize"


def test_a_normal_body_is_returned_whole(serve, make_pool) -> None:
    url = serve(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    assert fetch(make_pool(), url, timeout=2, max_bytes=1024) == (200, b"hello")


def test_connection_refused_is_transient_and_named(make_pool) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(EngineCallError) as error:
        fetch(make_pool(), f"http://127.0.0.1:{port}", timeout=2, max_bytes=1024)
    assert error.value.transient and error.value.cause == "connection"


def test_trickled_status_line_and_headers_are_cut_off_at_the_timeout(serve, make_pool) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Padding: " + b"p" * 60 + b"\r\n\r\n"
    url = serve(_trickle(b"", head + b"hello", 0.05))
    started = time.monotonic()
    with pytest.raises(EngineCallError) as error:
        fetch(make_pool(), url, timeout=0.5, max_bytes=1024)
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


def test_closing_the_pool_aborts_a_request_blocked_on_a_silent_engine(serve, make_pool) -> None:
    url = serve(lambda _conn: None)  # reads the request, never answers
    pool = make_pool()
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


CANNED = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"data\": []}",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"dat\r\n6\r\na\": []\r\n0\r\n\r\n",
    "until-close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody to the end",
    "http-1.0": b"HTTP/1.0 200 OK\r\n\r\nold server",
    "401": b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope",
    "503": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    "gzip anyway": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n"
                   b"\x1f\x8b\x08\x00",
    "redirect": b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
    "oversize": b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n",
    "garbage": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "closed at once": b"",
    "truncated body": b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
    "truncated chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"20\r\nshort",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n",
}


def _outcome(pool: EnginePool, url: str) -> object:
    try:
        return fetch(pool, url, timeout=2, max_bytes=1024)
    except EngineCallError as exc:
        return (exc.cause, exc.failure, exc.transient, exc.status)


@pytest.mark.parametrize("answer", sorted(CANNED))
def test_both_paths_give_the_same_outcome(serve, answer: str) -> None:
    """The one-shot path (http.client) cross-checked against the urllib3 pool it replaces for
    the prober: the same (status, body), or the same error class, cause and transience."""
    outcomes = [_outcome(EnginePool(1, keep_alive=keep), serve(
        lambda c, raw=CANNED[answer]: (c.sendall(raw), c.close()))) for keep in (True, False)]
    assert outcomes[0] == outcomes[1], outcomes


def test_a_one_shot_connection_is_closed_after_its_answer(serve) -> None:
    """The prober's path keeps no descriptor: the engine sees the close at once."""
    closed = threading.Event()

    def answer_then_watch(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.settimeout(5)
        if conn.recv(1) == b"":
            closed.set()

    assert fetch(EnginePool(1, keep_alive=False), serve(answer_then_watch), timeout=2,
                 max_bytes=64) == (200, b"ok")
    assert closed.wait(5)
