"""Tests of the fake vLLM engine (real sockets on 127.77.x.y)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from vllm_router_svcdisc.sim.engine import (
    EngineMode,
    FakeEngine,
    accept_queue,
    split_evenly,
    wait_until,
)

PORT = 18000
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_ip_lock = threading.Lock()
# a block of 1000 addresses per process (by PID), as the simulator's own pod IPs: concurrent
# test processes started from the same address and collided (EADDRINUSE) in stress runs
_ip_next = [(os.getpid() % 60) * 1000]


def next_ip() -> str:
    with _ip_lock:
        _ip_next[0] += 1
        n = _ip_next[0]
    return f"127.77.{n // 250}.{n % 250 + 1}"


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(next_ip(), PORT, dp_ranks=2, lora_adapters=["sql-lora"]) as eng:
        yield eng


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def per_rank(series: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    return {labels["engine"]: value for labels, value in series}


def test_split_evenly() -> None:
    assert split_evenly(5, 2) == [3, 2]
    assert split_evenly(0, 3) == [0, 0, 0]
    assert split_evenly(7, 1) == [7]
    assert sum(split_evenly(1001, 4)) == 1001


def test_metrics_parse_and_ranks_sum(engine: FakeEngine) -> None:
    engine.running = 5
    engine.waiting = 3
    engine.kv_cache_usage = 0.42
    engine.prefix_queries = 1001
    engine.prefix_hits = 500
    engine.sleep_state = "weights_offloaded"
    engine.running_lora_adapters = ["sql-lora", "tweet-lora"]
    r = requests.get(engine.url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    s = samples(r.text)
    model = engine.model
    running = per_rank(s["vllm:num_requests_running"])
    assert running == {"0": 3.0, "1": 2.0}
    assert sum(per_rank(s["vllm:num_requests_waiting"]).values()) == 3
    assert per_rank(s["vllm:kv_cache_usage_perc"]) == {"0": 0.42, "1": 0.42}
    assert sum(per_rank(s["vllm:prefix_cache_queries_total"]).values()) == 1001
    assert sum(per_rank(s["vllm:prefix_cache_hits_total"]).values()) == 500
    assert all(lbl["model_name"] == model for lbl, _ in s["vllm:num_requests_running"])
    sleep = {(lbl["engine"], lbl["sleep_state"]): v for lbl, v in s["vllm:engine_sleep_state"]}
    assert sleep[("0", "weights_offloaded")] == 1.0
    assert sleep[("1", "weights_offloaded")] == 1.0
    assert sleep[("0", "awake")] == 0.0 and sleep[("1", "discard_all")] == 0.0
    (lora_labels, lora_value), *_ = s["vllm:lora_requests_info"]
    assert lora_labels == {
        "max_lora": "4",
        "running_lora_adapters": "sql-lora,tweet-lora",
        "waiting_lora_adapters": "",
    }
    assert lora_value > 1.0e9  # a timestamp
    assert {lbl["engine"] for lbl, _ in s["vllm:cache_config_info"]} == {"0", "1"}
    assert "vllm:e2e_request_latency_seconds_bucket" in s
    assert "vllm:legacy" not in r.text and "gpu_cache_usage_perc" not in r.text


def test_metrics_follow_runtime_changes_and_lora_history(engine: FakeEngine) -> None:
    engine.running = 1
    engine.running_lora_adapters = ["a"]
    first = samples(requests.get(engine.url + "/metrics", timeout=5).text)
    assert sum(per_rank(first["vllm:num_requests_running"]).values()) == 1
    engine.running = 9
    engine.running_lora_adapters = ["b"]
    engine.sleep_state = "discard_all"
    second = samples(requests.get(engine.url + "/metrics", timeout=5).text)
    assert per_rank(second["vllm:num_requests_running"]) == {"0": 5.0, "1": 4.0}
    # Stale LoRA label sets remain (as in vLLM); the newest has the highest timestamp.
    lora = second["vllm:lora_requests_info"]
    newest = max(lora, key=lambda item: item[1])[0]
    assert newest["running_lora_adapters"] == "b"
    assert {lbl["running_lora_adapters"] for lbl, _ in lora} == {"a", "b"}
    sleep = {(lbl["engine"], lbl["sleep_state"]): v for lbl, v in second["vllm:engine_sleep_state"]}
    assert sleep[("0", "discard_all")] == 1.0 and sleep[("0", "awake")] == 0.0


def test_metrics_shape_matches_fixture_families(engine: FakeEngine) -> None:
    fixture = (FIXTURES / "vllm-0.33-metrics-dp2.txt").read_text()
    want = {f.name for f in text_string_to_metric_families(fixture)}
    got = {f.name for f in text_string_to_metric_families(engine.metrics_text().decode())}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    ):
        assert name in want and name in got, name
    assert "vllm:engine_sleep_state" in got
    assert "vllm:e2e_request_latency_seconds" in got


def test_legacy_names() -> None:
    with FakeEngine(next_ip(), PORT, dp_ranks=3, legacy_names=True) as eng:
        eng.kv_cache_usage = 0.5
        eng.prefix_queries = 10
        eng.prefix_hits = 4
        eng.running = 4
        s = samples(requests.get(eng.url + "/metrics", timeout=5).text)
    assert per_rank(s["vllm:gpu_cache_usage_perc"]) == {"0": 0.5, "1": 0.5, "2": 0.5}
    assert sum(per_rank(s["vllm:gpu_prefix_cache_queries_total"]).values()) == 10
    assert sum(per_rank(s["vllm:gpu_prefix_cache_hits_total"]).values()) == 4
    assert per_rank(s["vllm:num_requests_running"]) == {"0": 2.0, "1": 1.0, "2": 1.0}
    for name in (
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        assert name not in s


def test_models_with_lora_cards(engine: FakeEngine) -> None:
    r = requests.get(engine.url + "/v1/models", timeout=5)
    assert r.status_code == 200
    body = r.json()
    fixture = json.loads((FIXTURES / "vllm-models-with-lora.json").read_text())
    assert body["object"] == "list"
    base, lora = body["data"]
    assert set(base) == set(fixture["data"][0])
    assert set(lora) == set(fixture["data"][1])
    assert set(base["permission"][0]) == set(fixture["data"][0]["permission"][0])
    assert base["id"] == engine.model and base["parent"] is None
    assert isinstance(base["max_model_len"], int)
    assert lora["id"] == "sql-lora" and lora["parent"] == engine.model
    assert lora["root"] == "/adapters/sql-lora" and lora["max_model_len"] is None
    # Adapters can be loaded at runtime.
    engine.lora_adapters = ["sql-lora", "tweet-lora"]
    ids = [c["id"] for c in requests.get(engine.url + "/v1/models", timeout=5).json()["data"]]
    assert ids == [engine.model, "sql-lora", "tweet-lora"]


def test_api_key() -> None:
    with FakeEngine(next_ip(), PORT, api_key="s3cret") as eng:
        r = requests.get(eng.url + "/v1/models", timeout=5)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        r = requests.get(
            eng.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=5
        )
        assert r.status_code == 401
        r = requests.get(
            eng.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=5
        )
        assert r.status_code == 200 and r.json()["data"][0]["id"] == eng.model
        assert requests.get(eng.url + "/metrics", timeout=5).status_code == 200
        assert requests.get(eng.url + "/health", timeout=5).status_code == 200
        r = requests.post(eng.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert r.status_code == 401


def test_health_completions_and_counts(engine: FakeEngine) -> None:
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200
    with requests.Session() as s:
        for _ in range(3):
            r = s.post(engine.url + "/v1/completions", json={"prompt": "hi" * 1000}, timeout=5)
            assert r.status_code == 200
            assert r.json()["object"] == "text_completion"
    counts = engine.request_counts()
    assert counts["/v1/completions"] == 3 and counts["/health"] == 1

    def latency_count() -> float:  # observed once the response is out: may trail the client
        page = samples(engine.metrics_text().decode())
        return sum(v for _, v in page["vllm:e2e_request_latency_seconds_count"])

    assert wait_until(lambda: latency_count() == 3, timeout=5.0), latency_count()
    assert requests.get(engine.url + "/nope", timeout=5).status_code == 404


def test_keep_alive(engine: FakeEngine) -> None:
    conn = http.client.HTTPConnection(engine.ip, engine.port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        sock = conn.sock
        assert resp.status == 200 and resp.getheader("Content-Length") == "0"
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and len(resp.read()) == int(
            resp.getheader("Content-Length") or -1
        )
        assert conn.sock is sock  # same TCP connection reused
    finally:
        conn.close()


def test_blackhole_times_out_and_stop_is_prompt() -> None:
    eng = FakeEngine(next_ip(), PORT).start()
    try:
        eng.mode = EngineMode.BLACKHOLE
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(eng.url + "/metrics", timeout=0.3)
        # A held connection is released when stop() is called.
        sock = socket.create_connection((eng.ip, eng.port), timeout=5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_until(lambda: eng.request_counts().get("/health") == 1, 5)
    finally:
        started = time.monotonic()
        eng.stop()
        assert time.monotonic() - started < 1.0
    try:
        sock.settimeout(2)
        assert sock.recv(100) == b""  # closed without an answer
    except ConnectionResetError:
        pass
    finally:
        sock.close()


def test_blackhole_lifted(engine: FakeEngine) -> None:
    engine.mode = "blackhole"
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(engine.url + "/health", timeout=0.2)
    engine.mode = EngineMode.OK
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200


def test_slow(engine: FakeEngine) -> None:
    engine.mode = EngineMode.SLOW
    engine.slow_delay = 0.3
    started = time.monotonic()
    r = requests.get(engine.url + "/v1/models", timeout=5)
    assert r.status_code == 200
    assert time.monotonic() - started >= 0.3
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(engine.url + "/metrics", timeout=0.1)


def test_slow_interrupted_by_stop() -> None:
    eng = FakeEngine(next_ip(), PORT).start()
    eng.mode = EngineMode.SLOW
    eng.slow_delay = 30.0
    result: dict[str, Any] = {}

    def client() -> None:
        try:
            result["resp"] = requests.get(eng.url + "/metrics", timeout=10)
        except requests.RequestException as exc:
            result["exc"] = exc

    t = threading.Thread(target=client, daemon=True)
    t.start()
    assert wait_until(lambda: eng.request_counts().get("/metrics") == 1, 5)
    started = time.monotonic()
    eng.stop()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - started < 1.0
    assert "exc" in result


def test_garbage(engine: FakeEngine) -> None:
    engine.mode = EngineMode.GARBAGE
    r = requests.get(engine.url + "/metrics", timeout=5)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        list(text_string_to_metric_families(r.text))
    r = requests.get(engine.url + "/v1/models", timeout=5)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.content)


def test_bad_models_lists_model_names_instead_of_cards(engine: FakeEngine) -> None:
    engine.mode = EngineMode.BAD_MODELS
    r = requests.get(engine.url + "/v1/models", timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["data"][0] == engine.model
    assert all(isinstance(entry, str) for entry in body["data"])  # names, not cards
    assert requests.get(engine.url + "/metrics", timeout=5).status_code == 200
    engine.mode = EngineMode.OK
    assert requests.get(engine.url + "/v1/models", timeout=5).json()["data"][0]["id"] == (
        engine.model)


def test_error500(engine: FakeEngine) -> None:
    engine.mode = EngineMode.ERROR500
    assert requests.get(engine.url + "/metrics", timeout=5).status_code == 500
    assert requests.get(engine.url + "/v1/models", timeout=5).status_code == 500
    assert requests.get(engine.url + "/health", timeout=5).status_code == 503
    engine.mode = EngineMode.OK
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200


def test_oversize(engine: FakeEngine) -> None:
    engine.mode = EngineMode.OVERSIZE
    engine.oversize_bytes = 3 * 1024 * 1024 + 7
    r = requests.get(engine.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == engine.oversize_bytes
    assert len(r.content) == engine.oversize_bytes
    assert r.content.startswith(b"vllm:num_requests_running{")
    # A client that gives up after 64 KiB does not wedge the engine.
    with requests.get(engine.url + "/metrics", timeout=10, stream=True) as resp:
        assert len(resp.raw.read(65536)) == 65536
    engine.mode = EngineMode.OK
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200


def test_oversize_default_is_50mib(engine: FakeEngine) -> None:
    engine.mode = EngineMode.OVERSIZE
    r = requests.head(engine.url + "/metrics", timeout=5)
    assert int(r.headers["Content-Length"]) == 50 * 1024 * 1024


def test_down_and_back(engine: FakeEngine) -> None:
    session = requests.Session()
    assert session.get(engine.url + "/health", timeout=5).status_code == 200
    for _ in range(2):
        engine.mode = EngineMode.DOWN
        assert not engine.is_listening
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(engine.url + "/health", timeout=2)
        with pytest.raises(requests.exceptions.ConnectionError):
            session.get(engine.url + "/health", timeout=2)
        engine.mode = EngineMode.OK
        assert requests.get(engine.url + "/health", timeout=5).status_code == 200
        assert session.get(engine.url + "/v1/models", timeout=5).status_code == 200
    session.close()


def test_start_in_down_mode_and_port_zero() -> None:
    eng = FakeEngine(next_ip(), 0)
    eng.mode = EngineMode.DOWN
    with eng:
        assert not eng.is_listening
        eng.mode = EngineMode.OK
        port = eng.port
        assert port != 0
        assert requests.get(eng.url + "/health", timeout=5).status_code == 200
        eng.mode = EngineMode.DOWN
        eng.mode = EngineMode.OK
        assert eng.port == port
        assert requests.get(eng.url + "/health", timeout=5).status_code == 200
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(eng.url + "/health", timeout=2)


def test_restart_after_stop() -> None:
    eng = FakeEngine(next_ip(), PORT)
    for _ in range(2):
        with eng:
            assert requests.get(eng.url + "/health", timeout=5).status_code == 200
    assert eng.request_counts()["/health"] == 2


def test_mode_flapping_under_load() -> None:
    eng = FakeEngine(next_ip(), PORT).start()
    done = threading.Event()
    ok = [0]

    def client() -> None:
        while not done.is_set():
            try:
                with requests.Session() as s:
                    if s.get(eng.url + "/health", timeout=1).status_code == 200:
                        ok[0] += 1
            except requests.RequestException:
                pass

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for mode in [EngineMode.DOWN, EngineMode.OK, EngineMode.BLACKHOLE, EngineMode.OK] * 5:
            eng.mode = mode
            time.sleep(0.01)  # let some requests land in each mode
        assert wait_until(lambda: ok[0] > 0, 5)
        assert requests.get(eng.url + "/health", timeout=5).status_code == 200
    finally:
        done.set()
        started = time.monotonic()
        eng.stop()
        assert time.monotonic() - started < 1.0
        for t in threads:
            t.join(5)
            assert not t.is_alive()


def _closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer closed ``sock`` (EOF or reset), polled up to ``timeout``."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_sigterm_refuses_new_connections_at_once(engine: FakeEngine) -> None:
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200
    engine.drain()
    assert not engine.is_listening
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(engine.address, timeout=2).close()


def test_sigterm_closes_idle_keepalive_connections(engine: FakeEngine) -> None:
    conn = http.client.HTTPConnection(engine.ip, engine.port, timeout=5)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        assert response.getheader("Connection") is None  # kept alive
        engine.drain()
        assert conn.sock is not None and _closed_by_server(conn.sock)
    finally:
        conn.close()


def test_sigterm_lets_the_request_in_flight_finish_then_closes_its_connection(
        engine: FakeEngine) -> None:
    engine.mode = EngineMode.SLOW
    engine.slow_delay = 1.0
    conn = http.client.HTTPConnection(engine.ip, engine.port, timeout=10)
    replies: list[tuple[int, str | None, bytes]] = []

    def request() -> None:
        conn.request("POST", "/v1/completions", body=b"{}",
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        replies.append((response.status, response.getheader("Connection"), response.read()))

    worker = threading.Thread(target=request)
    worker.start()
    try:
        assert wait_until(lambda: engine.request_counts().get("/v1/completions") == 1, 10.0)
        engine.drain()
        worker.join(10.0)
        assert replies and replies[0][0] == 200 and replies[0][1] == "close"
        assert json.loads(replies[0][2])["served_by"] == engine.ip
    finally:
        conn.close()


def test_idle_keepalive_connections_close_after_the_keepalive_timeout() -> None:
    assert FakeEngine(next_ip(), PORT).keepalive_timeout == 5.0  # uvicorn's default
    with FakeEngine(next_ip(), PORT) as eng:
        eng.keepalive_timeout = 0.2  # applies to connections accepted from now on
        conn = http.client.HTTPConnection(eng.ip, eng.port, timeout=5)
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            assert conn.sock is not None and _closed_by_server(conn.sock)
        finally:
            conn.close()


# -- a dead node: cut_network / restore_network ---------------------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the dropped-SYN behaviour is Linux's")


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (headers, then Content-Length bytes) from ``sock``."""
    data = b""
    for _ in range(10_000):
        if b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


_GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@linux_only
def test_cut_network_new_connections_time_out_not_refused(engine: FakeEngine) -> None:
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200
    engine.cut_network()
    assert engine.partitioned and engine.is_listening  # the process is fine: its node is not
    with pytest.raises(TimeoutError):  # no SYN-ACK and no RST: not ConnectionRefusedError
        socket.create_connection(engine.address, timeout=0.5).close()
    with pytest.raises(requests.exceptions.ConnectTimeout):
        requests.get(engine.url + "/health", timeout=0.5)
    with urllib3.PoolManager(retries=False) as pool, \
            pytest.raises(urllib3.exceptions.ConnectTimeoutError):
        pool.request("GET", engine.url + "/health", timeout=urllib3.Timeout(connect=0.5))
    assert engine.request_counts() == {"/health": 1}
    engine.restore_network()
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200


@linux_only
def test_cut_network_fills_the_listeners_accept_queue() -> None:
    with FakeEngine(next_ip(), PORT) as eng:
        eng.cut_network()
        assert eng._cut is not None
        queued, backlog = accept_queue(eng._cut.sock) or (0, 0)
        assert queued > backlog  # the kernel drops SYNs to a full accept queue


def test_cut_network_open_keepalive_connection_gets_nothing_back_until_restored(
        engine: FakeEngine) -> None:
    sock = socket.create_connection(engine.address, timeout=5)
    try:
        sock.sendall(_GET_HEALTH)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        engine.cut_network()
        sock.sendall(_GET_HEALTH)  # the send succeeds: nothing tells the client
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no answer, no FIN, no reset
            sock.recv(1)
        assert engine.request_counts()["/health"] == 1
        engine.restore_network()  # the held request is answered on the same connection
        sock.settimeout(5)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()


def test_cut_network_request_in_flight_hangs(engine: FakeEngine) -> None:
    engine.mode = EngineMode.SLOW
    engine.slow_delay = 0.2
    conn = http.client.HTTPConnection(engine.ip, engine.port, timeout=5)
    try:
        conn.request("POST", "/v1/completions", body=b"{}",
                     headers={"Content-Type": "application/json"})
        assert wait_until(lambda: engine.request_counts().get("/v1/completions") == 1, 5)
        engine.cut_network()
        assert conn.sock is not None
        conn.sock.settimeout(1.0)  # five times the answer's delay
        with pytest.raises(TimeoutError):
            conn.getresponse()
    finally:
        conn.close()


def test_cut_network_idle_connection_outlives_the_keepalive_timeout() -> None:
    with FakeEngine(next_ip(), PORT) as eng:
        eng.keepalive_timeout = 0.1
        sock = socket.create_connection(eng.address, timeout=5)
        try:
            sock.sendall(_GET_HEALTH)
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            eng.cut_network()
            sock.settimeout(1.0)  # ten keep-alive timeouts: a live engine would have closed
            with pytest.raises(TimeoutError):
                sock.recv(1)
            eng.restore_network()  # the deferred close arrives now
            assert _closed_by_server(sock)
        finally:
            sock.close()


@linux_only
def test_process_changes_while_cut_off_show_when_restored(engine: FakeEngine) -> None:
    engine.cut_network()
    engine.mode = EngineMode.DOWN  # the process crashed while its node was away
    with pytest.raises(TimeoutError):
        socket.create_connection(engine.address, timeout=0.5).close()
    engine.restore_network()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(engine.address, timeout=2).close()
    engine.cut_network()  # a listener that was closed: still a time-out, never a refusal
    with pytest.raises(TimeoutError):
        socket.create_connection(engine.address, timeout=0.5).close()
    engine.mode = EngineMode.OK
    engine.restore_network()
    assert requests.get(engine.url + "/health", timeout=5).status_code == 200


@linux_only
def test_sigterm_while_cut_off_takes_effect_when_restored(engine: FakeEngine) -> None:
    engine.cut_network()
    engine.drain()
    with pytest.raises(TimeoutError):
        socket.create_connection(engine.address, timeout=0.5).close()
    engine.restore_network()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(engine.address, timeout=2).close()


def test_stop_while_cut_off_is_prompt_and_frees_the_port() -> None:
    eng = FakeEngine(next_ip(), PORT).start()
    sock = socket.create_connection(eng.address, timeout=5)
    try:
        sock.sendall(_GET_HEALTH)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
        eng.cut_network()
        sock.sendall(_GET_HEALTH)
        started = time.monotonic()
        eng.stop()
        assert time.monotonic() - started < 2.0
        assert _closed_by_server(sock)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(eng.address, timeout=2).close()
    finally:
        sock.close()


# -- wedged engine, token counters --------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tokens(eng: FakeEngine) -> tuple[float, float, float]:
    """(running, prompt tokens, generation tokens) as a scrape through HTTP sees them."""
    page = samples(requests.get(eng.url + "/metrics", timeout=5).text)
    return (sum(per_rank(page["vllm:num_requests_running"]).values()),
            sum(per_rank(page["vllm:prompt_tokens_total"]).values()),
            sum(per_rank(page["vllm:generation_tokens_total"]).values()))


def test_token_counters_move_with_served_and_running_requests() -> None:
    clock = FakeClock()
    with FakeEngine(next_ip(), PORT, dp_ranks=2, clock=clock) as eng:
        page = samples(requests.get(eng.url + "/metrics", timeout=5).text)
        for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
            assert {lbl["engine"] for lbl, _ in page[name]} == {"0", "1"}
            assert {lbl["model_name"] for lbl, _ in page[name]} == {eng.model}
        assert _tokens(eng) == (0, 0, 0)
        reply = requests.post(eng.url + "/v1/completions", json={"prompt": "hi"}, timeout=5)
        usage = reply.json()["usage"]
        assert _tokens(eng) == (0, usage["prompt_tokens"], usage["completion_tokens"])
        eng.running = 2
        clock.now += 10.0  # two requests decoding for 10 s
        running, prompt, generated = _tokens(eng)
        assert running == 2 and prompt == usage["prompt_tokens"]
        assert generated == usage["completion_tokens"] + 2 * eng.decode_rate * 10.0


def test_wedged_engine_answers_probes_holds_completions_and_stops_its_counters() -> None:
    clock = FakeClock()
    with FakeEngine(next_ip(), PORT, clock=clock) as eng:
        requests.post(eng.url + "/v1/completions", json={"prompt": "hi"}, timeout=5)
        eng.running = 1
        eng.mode = EngineMode.WEDGED
        assert requests.get(eng.url + "/health", timeout=5).status_code == 200
        assert requests.get(eng.url + "/v1/models", timeout=5).status_code == 200
        with pytest.raises(requests.exceptions.ReadTimeout):  # accepted, never finished
            requests.post(eng.url + "/v1/completions", json={"prompt": "hi"}, timeout=0.3)
        assert eng.request_counts()["/v1/completions"] == 2
        assert wait_until(lambda: _tokens(eng)[0] == 2, 5)  # 1 + the held one
        before = _tokens(eng)
        clock.now += 60.0
        assert _tokens(eng) == before  # running > 0, nothing moves


def test_wedged_completion_is_answered_when_the_engine_recovers() -> None:
    clock = FakeClock()
    with FakeEngine(next_ip(), PORT, clock=clock) as eng:
        eng.mode = EngineMode.WEDGED
        replies: list[int] = []
        worker = threading.Thread(target=lambda: replies.append(requests.post(
            eng.url + "/v1/completions", json={"prompt": "hi"}, timeout=30).status_code))
        worker.start()
        assert wait_until(lambda: _tokens(eng)[0] == 1, 5)
        assert _tokens(eng)[1:] == (0, 0)
        eng.mode = EngineMode.OK
        worker.join(10)
        assert replies == [200]
        assert wait_until(lambda: _tokens(eng) == (0, 4, 2), 5)


def test_stop_releases_wedged_completions() -> None:
    eng = FakeEngine(next_ip(), PORT).start()
    eng.mode = EngineMode.WEDGED
    errors: list[Exception] = []

    def post() -> None:
        try:
            requests.post(eng.url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
        except requests.RequestException as exc:
            errors.append(exc)

    worker = threading.Thread(target=post)
    worker.start()
    assert wait_until(lambda: eng.request_counts().get("/v1/completions") == 1, 5)
    eng.stop()
    worker.join(10)
    assert not worker.is_alive() and len(errors) == 1


# -- slow /metrics -----------------------------------------------------------------------------

def test_slow_metrics_delays_scrapes_while_completions_are_served(engine: FakeEngine) -> None:
    engine.mode = EngineMode.SLOW_METRICS
    engine.slow_delay = 30.0
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(engine.url + "/metrics", timeout=0.3)
    with requests.Session() as session:
        for _ in range(3):
            reply = session.post(engine.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
            assert reply.status_code == 200
        assert session.get(engine.url + "/health", timeout=5).status_code == 200
        assert session.get(engine.url + "/v1/models", timeout=5).status_code == 200


def test_slow_metrics_answer_when_the_spell_ends(engine: FakeEngine) -> None:
    engine.mode = EngineMode.SLOW_METRICS
    engine.slow_delay = 60.0
    replies: list[int] = []
    worker = threading.Thread(target=lambda: replies.append(
        requests.get(engine.url + "/metrics", timeout=30).status_code))
    worker.start()
    assert wait_until(lambda: engine.request_counts().get("/metrics") == 1, 5)
    engine.mode = EngineMode.OK  # the long prefill is over
    worker.join(10)
    assert replies == [200]


def test_slow_paths_can_include_health_and_models(engine: FakeEngine) -> None:
    engine.mode = EngineMode.SLOW_METRICS
    engine.slow_delay = 30.0
    engine.slow_paths = frozenset({"/metrics", "/health", "/v1/models"})
    for path in ("/health", "/v1/models"):
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(engine.url + path, timeout=0.3)
    assert requests.post(engine.url + "/v1/completions", json={}, timeout=5).status_code == 200
