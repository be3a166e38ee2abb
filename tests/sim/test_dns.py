"""Tests of the in-process Service DNS shim and the mini kube-proxy (real sockets, 127.78.x.y)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from vllm_router_svcdisc.sim.dns import Backend, ServiceDNS, ServiceProxy
from vllm_router_svcdisc.sim.engine import EngineMode, FakeEngine, wait_until

ENGINE_PORT = 18000
SVC_PORT = 80
_lock = threading.Lock()
_next = [0]


def next_subnet() -> int:
    with _lock:
        _next[0] += 1
        return _next[0]


@dataclass
class Cluster:
    engines: list[FakeEngine]
    proxy: ServiceProxy
    dns: ServiceDNS
    ready: list[tuple[str, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://vllm-a.default.svc.cluster.local:{SVC_PORT}"


def get(url: str, timeout: float = 5.0) -> requests.Response:
    """One request on a fresh connection, so the proxy picks a backend for it."""
    with requests.Session() as s:
        return s.get(url, headers={"Connection": "close"}, timeout=timeout)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    n = next_subnet()
    engines = [FakeEngine(f"127.78.{n}.{i}", ENGINE_PORT).start() for i in (1, 2)]
    ready = [e.address for e in engines]
    box = Cluster(engines, None, None, ready)  # type: ignore[arg-type]
    cluster_ip = f"127.78.{n}.100"
    proxy = ServiceProxy(cluster_ip, SVC_PORT, lambda: list(box.ready)).start()
    dns = ServiceDNS()
    dns.register("default", "vllm-a", lambda: [cluster_ip])
    dns.register("default", "vllm-h", lambda: [ip for ip, _ in box.ready])
    box.proxy, box.dns = proxy, dns
    dns.install()
    try:
        yield box
    finally:
        dns.uninstall()
        proxy.stop()
        for e in engines:
            e.stop()


def test_round_robin_over_ready_backends(cluster: Cluster) -> None:
    assert get(cluster.url + "/v1/completions").status_code == 404  # GET: reached an engine
    hits = []
    for _ in range(4):
        with requests.Session() as s:
            r = s.post(
                cluster.url + "/v1/completions",
                json={"prompt": "x"},
                headers={"Connection": "close"},
                timeout=5,
            )
        assert r.status_code == 200
        hits.append(r.json()["served_by"])
    a, b = (e.ip for e in cluster.engines)
    assert sorted(hits) == sorted([a, a, b, b])
    assert hits[0] != hits[1] and hits[1] != hits[2]
    assert sum(cluster.proxy.connections_by_backend().values()) == 5


def test_new_connections_follow_ready_set(cluster: Cluster) -> None:
    first, second = cluster.engines
    cluster.ready = [first.address]
    before = second.request_counts().get("/v1/models", 0)
    for _ in range(3):
        r = get(cluster.url + "/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == first.model
    assert first.request_counts()["/v1/models"] == 3
    assert second.request_counts().get("/v1/models", 0) == before
    cluster.ready = [second.address]
    get(cluster.url + "/v1/models")
    assert second.request_counts()["/v1/models"] == 1
    by_backend = cluster.proxy.connections_by_backend()
    assert by_backend == {first.address: 3, second.address: 1}


def test_no_ready_backend_rejects(cluster: Cluster) -> None:
    cluster.ready = []
    with pytest.raises(requests.exceptions.ConnectionError):
        get(cluster.url + "/health", timeout=2)
    assert cluster.proxy.rejected >= 1
    cluster.ready = [cluster.engines[0].address]
    assert get(cluster.url + "/health").status_code == 200


def test_terminating_serving_backends_are_the_fallback(cluster: Cluster) -> None:
    """kube-proxy (>= 1.28): with no ready endpoint, serving-but-terminating ones get traffic;
    as soon as one is ready again only the ready ones do."""
    first, second = (e.address for e in cluster.engines)
    cluster.ready = [Backend(*first, ready=False, serving=True, terminating=True),
                     Backend(*second, ready=False, serving=False, terminating=True)]
    for _ in range(3):
        assert get(cluster.url + "/health").status_code == 200
    assert cluster.proxy.connections_by_backend() == {first: 3}
    cluster.ready = [Backend(*first, ready=False, serving=True, terminating=True),
                     Backend(*second)]
    assert get(cluster.url + "/health").status_code == 200
    assert cluster.proxy.connections_by_backend() == {first: 3, second: 1}


def test_backend_down_resets_client(cluster: Cluster) -> None:
    cluster.engines[0].mode = EngineMode.DOWN
    cluster.ready = [cluster.engines[0].address]
    with pytest.raises(requests.exceptions.ConnectionError):
        get(cluster.url + "/health", timeout=2)


def test_large_body_through_proxy(cluster: Cluster) -> None:
    eng = cluster.engines[0]
    cluster.ready = [eng.address]
    eng.mode = EngineMode.OVERSIZE
    eng.oversize_bytes = 2 * 1024 * 1024
    r = get(cluster.url + "/metrics", timeout=10)
    assert len(r.content) == 2 * 1024 * 1024


def test_keep_alive_stays_on_backend(cluster: Cluster) -> None:
    with requests.Session() as s:
        ips = {
            s.post(cluster.url + "/v1/completions", json={}, timeout=5).json()["served_by"]
            for _ in range(4)
        }
    assert len(ips) == 1
    assert sum(cluster.proxy.connections_by_backend().values()) == 1


def test_stop_closes_forwarded_connections(cluster: Cluster) -> None:
    sock = socket.create_connection((cluster.proxy.ip, SVC_PORT), timeout=5)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert cluster.proxy.active_connections == 1
        started = time.monotonic()
        cluster.proxy.stop()
        assert time.monotonic() - started < 1.0
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
        assert cluster.proxy.active_connections == 0
    finally:
        sock.close()
    with pytest.raises(requests.exceptions.ConnectionError):
        get(cluster.url + "/health", timeout=2)


def test_getaddrinfo_shape(cluster: Cluster) -> None:
    original = cluster.dns._prev_getaddrinfo
    assert original is not None
    ip = cluster.proxy.ip
    name = "vllm-a.default.svc.cluster.local"
    for args in [
        (80,),
        ("80",),
        (None,),
        (80, socket.AF_INET, socket.SOCK_STREAM),
        (80, 0, 0, socket.IPPROTO_TCP),
        ("http", socket.AF_UNSPEC, socket.SOCK_STREAM),
        (80, 0, socket.SOCK_DGRAM),
    ]:
        assert socket.getaddrinfo(name, *args) == original(ip, *args)  # type: ignore[arg-type]
    got = socket.getaddrinfo(host=name + ".", port=80, type=socket.SOCK_STREAM)
    assert got == original(ip, 80, type=socket.SOCK_STREAM)
    family, type_, _proto, _, sockaddr = got[0]
    assert family is socket.AF_INET and type_ is socket.SOCK_STREAM
    assert sockaddr == (ip, 80)
    canon = socket.getaddrinfo(name, 80, 0, socket.SOCK_STREAM, 0, socket.AI_CANONNAME)
    assert canon[0][3] == name
    assert socket.getaddrinfo(name.encode(), 80, type=socket.SOCK_STREAM)[0][4] == (ip, 80)
    assert socket.gethostbyname(name) == ip
    assert socket.gethostbyname_ex(name) == (name, [], [ip])
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(name, 80, socket.AF_INET6)


def test_unknown_name_is_nxdomain(cluster: Cluster) -> None:
    for host in (
        "nope.default.svc.cluster.local",
        "vllm-a.other.svc.cluster.local",
        "10-0-0-1.default.pod.cluster.local",
    ):
        with pytest.raises(socket.gaierror) as info:
            socket.getaddrinfo(host, 80)
        assert info.value.errno == socket.EAI_NONAME
        with pytest.raises(socket.gaierror):
            socket.gethostbyname(host)
    with pytest.raises(requests.exceptions.ConnectionError):
        get("http://nope.default.svc.cluster.local/health", timeout=2)


def test_other_names_pass_through(cluster: Cluster) -> None:
    assert socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)[0][4] == ("127.0.0.1", 80)
    assert socket.gethostbyname("127.0.0.1") == "127.0.0.1"
    assert socket.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("vllm-a.default.svc.cluster.local", 80, 0, 0, 0, socket.AI_NUMERICHOST)


def test_short_forms(cluster: Cluster) -> None:
    ip = cluster.proxy.ip
    assert socket.gethostbyname("vllm-a.default.svc") == ip
    assert socket.gethostbyname("VLLM-A.default") == ip
    assert get(f"http://vllm-a.default:{SVC_PORT}/health").status_code == 200


def test_headless_resolves_to_ready_pods(cluster: Cluster) -> None:
    name = "vllm-h.default.svc.cluster.local"
    infos = socket.getaddrinfo(name, ENGINE_PORT, type=socket.SOCK_STREAM)
    assert [i[4] for i in infos] == cluster.ready
    r = get(f"http://{name}:{ENGINE_PORT}/health")
    assert r.status_code == 200
    cluster.ready = [cluster.engines[1].address]
    assert socket.gethostbyname(name) == cluster.engines[1].ip
    cluster.ready = []
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(name, ENGINE_PORT)
    with pytest.raises(requests.exceptions.ConnectionError):
        get(f"http://{name}:{ENGINE_PORT}/health", timeout=2)


def test_unregister(cluster: Cluster) -> None:
    cluster.dns.unregister("default", "vllm-a")
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("vllm-a.default.svc.cluster.local", 80)


def test_uninstall_restores_and_nesting_is_safe() -> None:
    original = (socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex)
    one, two = ServiceDNS(), ServiceDNS("example.internal")
    one.register("ns", "a", lambda: ["127.78.250.1"])
    two.register("ns", "b", lambda: ["127.78.250.2"])
    with one:
        with one:  # re-entrant
            assert socket.gethostbyname("a.ns.svc.cluster.local") == "127.78.250.1"
        assert one.installed
        assert socket.gethostbyname("a.ns.svc.cluster.local") == "127.78.250.1"
        two.install()
        assert socket.gethostbyname("a.ns.svc.cluster.local") == "127.78.250.1"
        assert socket.gethostbyname("b.ns.svc.example.internal") == "127.78.250.2"
        with pytest.raises(socket.gaierror):
            socket.gethostbyname("a.ns.svc.example.internal")
        two.uninstall()
        assert socket.gethostbyname("a.ns.svc.cluster.local") == "127.78.250.1"
    assert (socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex) == original
    assert not one.installed
    one.uninstall()  # extra uninstall is harmless
    assert socket.getaddrinfo is original[0]

    # Non-LIFO order: the outer shim is left as a pass-through until the inner one goes.
    one.install()
    two.install()
    one.uninstall()
    assert socket.gethostbyname("b.ns.svc.example.internal") == "127.78.250.2"
    assert socket.gethostbyname("127.0.0.1") == "127.0.0.1"
    two.uninstall()
    assert socket.getaddrinfo("127.0.0.1", 1)[0][4] == ("127.0.0.1", 1)
    assert wait_until(lambda: True)


def test_concurrent_requests_through_service(cluster: Cluster) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                assert get(cluster.url + "/health").status_code == 200
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    counts = cluster.proxy.connections_by_backend()
    assert sum(counts.values()) == 40
    assert set(counts.values()) == {20}
    assert wait_until(lambda: cluster.proxy.active_connections == 0, 5)
