"""FakeApiServer exercised through the real, unmodified ``kubernetes`` client (no mocks)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.conftest import wait_for
from vllm_router_svcdisc.sim.apiserver import FakeApiServer, parse_go_bool
from vllm_router_svcdisc.sim.selectors import SelectorError, parse_label_selector

Event = dict[str, Any]
KUBERNETES_MAJOR = int(kubernetes.__version__.split(".")[0])


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.1) as srv:
        yield srv


@pytest.fixture
def core(server: FakeApiServer) -> client.CoreV1Api:
    return client.CoreV1Api(server.api_client())


@pytest.fixture
def discovery(server: FakeApiServer) -> client.DiscoveryV1Api:
    return client.DiscoveryV1Api(server.api_client())


def svc(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"ports": [{"name": "http", "port": 8000}]},
    }


def pod(name: str, namespace: str = "default", ip: str = "10.0.0.1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "vllm"}},
        "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
        "status": {"phase": "Running", "podIP": ip},
    }


def take(
    func: Callable[..., Any],
    *args: Any,
    until: Callable[[list[Event]], bool],
    timeout: int = 5,
    w: watch.Watch | None = None,
    **kwargs: Any,
) -> list[Event]:
    """Stream events until `until(events)` holds or the server-side timeout ends the watch."""
    w = w or watch.Watch()
    events: list[Event] = []
    stream = w.stream(func, *args, timeout_seconds=timeout, _request_timeout=timeout + 5, **kwargs)
    for event in stream:
        events.append(event)
        if until(events):
            w.stop()
            break
    return events


def summary(events: list[Event]) -> list[tuple[str, str]]:
    return [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events if e is not None]


def has(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len([e for e in events if e is not None]) >= n


def raw_request(server: FakeApiServer, path: str, method: str = "GET") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


class Consumer(threading.Thread):
    """Iterates a watch in the background, recording events and the exception that ended it."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.watch = watch.Watch()
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._call = (func, args, kwargs)

    def run(self) -> None:
        func, args, kwargs = self._call
        try:
            for event in self.watch.stream(func, *args, **kwargs):
                self.events.append(event)
        except BaseException as exc:
            self.error = exc


# --- LIST, GET and resource versions -----------------------------------------------------------


def test_list_namespaced_and_all_namespaces(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.put("services", svc("a", "ns1"))
    server.put("services", svc("b", "ns1"))
    server.put("services", svc("c", "ns2"))
    namespaced = core.list_namespaced_service("ns1")
    assert [s.metadata.name for s in namespaced.items] == ["a", "b"]
    assert namespaced.kind == "ServiceList"
    everywhere = core.list_service_for_all_namespaces()
    assert [(s.metadata.namespace, s.metadata.name) for s in everywhere.items] == [
        ("ns1", "a"),
        ("ns1", "b"),
        ("ns2", "c"),
    ]
    assert core.list_namespaced_service("empty").items == []


def test_resource_versions_on_objects_and_lists(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    first = server.put("services", svc("a"))
    second = server.put("endpoints", {"metadata": {"name": "a"}, "subsets": []})
    updated = server.put("services", svc("a", tier="x"))
    assert (first["metadata"]["resourceVersion"], second["metadata"]["resourceVersion"]) == (
        "1",
        "2",
    )
    assert updated["metadata"]["resourceVersion"] == "3"
    assert updated["metadata"]["uid"] == first["metadata"]["uid"]
    assert updated["metadata"]["creationTimestamp"] == first["metadata"]["creationTimestamp"]
    listed = core.list_namespaced_service("default")
    assert listed.metadata.resource_version == "3" == str(server.resource_version)
    assert listed.items[0].metadata.resource_version == "3"
    assert listed.items[0].metadata.labels == {"tier": "x"}
    gone = server.delete("services", "default", "a")
    assert gone is not None and gone["metadata"]["resourceVersion"] == "4"
    assert server.delete("services", "default", "a") is None
    assert server.get("services", "default", "a") is None


def test_get_one_pod(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.put("pods", pod("engine-0", "llm", ip="10.1.2.3"))
    got = core.read_namespaced_pod("engine-0", "llm")
    assert got.status.pod_ip == "10.1.2.3" and got.kind == "Pod"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("nope", "llm")
    assert missing.value.status == 404
    body = json.loads(missing.value.body)
    assert body["reason"] == "NotFound" and body["message"] == 'pods "nope" not found'


def test_endpointslice_empty_endpoints_are_null_on_the_wire(
    server: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    server.put("endpointslices", {"metadata": {"name": "s-1"}, "addressType": "IPv4"})
    server.put(
        "endpointslices",
        {"metadata": {"name": "s-2"}, "addressType": "IPv4", "endpoints": [], "ports": None},
    )
    resp = discovery.list_namespaced_endpoint_slice("default", _preload_content=False)
    raw = json.loads(resp.data)
    assert raw["kind"] == "EndpointSliceList" and raw["apiVersion"] == "discovery.k8s.io/v1"
    assert [item["endpoints"] for item in raw["items"]] == [None, None]
    assert all(item["kind"] == "EndpointSlice" for item in raw["items"])
    assert '"endpoints": null' in resp.data.decode()
    if KUBERNETES_MAJOR >= 36:  # client 35 crashes deserialising endpoints: null (#2214)
        parsed = discovery.list_namespaced_endpoint_slice("default")
        assert [s.endpoints for s in parsed.items] == [None, None]


def test_request_counts(
    server: FakeApiServer, core: client.CoreV1Api, discovery: client.DiscoveryV1Api
) -> None:
    server.put("pods", pod("p"))
    core.list_namespaced_service("default")
    core.list_service_for_all_namespaces()
    core.read_namespaced_pod("p", "default")
    discovery.list_endpoint_slice_for_all_namespaces()
    take(discovery.list_endpoint_slice_for_all_namespaces, until=lambda _: True, timeout=1)
    assert server.request_counts() == {
        ("list", "services"): 2,
        ("get", "pods"): 1,
        ("list", "endpointslices"): 1,
        ("watch", "endpointslices"): 1,
    }


# --- WATCH -------------------------------------------------------------------------------------


def test_watch_from_list_rv_sees_only_newer_events(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("old"))
    rv = core.list_namespaced_service("default").metadata.resource_version
    server.put("services", svc("new"))
    server.put("services", svc("old", changed="yes"))
    server.delete("services", "default", "new")
    w = watch.Watch()
    events = take(core.list_namespaced_service, "default", resource_version=rv, until=has(3), w=w)
    assert summary(events) == [("ADDED", "new"), ("MODIFIED", "old"), ("DELETED", "new")]
    assert events[1]["object"].metadata.labels == {"changed": "yes"}  # deserialised V1Service
    assert w.resource_version == str(server.resource_version)


def test_watch_from_zero_or_empty_gets_synthetic_added_then_live_events(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a"))
    server.put("services", svc("b"))
    for rv in ("0", ""):

        def until(events: list[Event]) -> bool:
            if len(events) == 2:  # both synthetic ADDED are in: now make a live change
                server.put("services", svc("c" + str(server.resource_version)))
            return len(events) == 3

        events = take(core.list_namespaced_service, "default", resource_version=rv, until=until)
        assert summary(events)[:2] == [("ADDED", "a"), ("ADDED", "b")]
        assert events[2]["type"] == "ADDED"


def test_watch_from_future_rv_waits_for_events(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a"))
    future = str(server.resource_version + 1)
    consumer = Consumer(
        core.list_namespaced_service, "default", resource_version=future, timeout_seconds=3
    )
    consumer.start()
    assert server.wait_for_watches(1, "services")
    server.put("services", svc("b"))  # rv = future: not newer than asked, not sent
    server.put("services", svc("c"))
    wait_for(lambda: consumer.events, 5, "no event arrived")
    consumer.watch.stop()
    consumer.join(5)
    assert summary(consumer.events) == [("ADDED", "c")]


def test_watch_filters_by_namespace(server: FakeApiServer, core: client.CoreV1Api) -> None:
    def until(events: list[Event]) -> bool:
        if len(events) == 2:  # synthetic ADDED done; live events from both namespaces
            server.put("services", svc("other-2", "ns2"))
            server.put("services", svc("mine", "ns1", v="2"))
        return len(events) == 3

    server.put("services", svc("other", "ns2"))
    server.put("services", svc("mine", "ns1"))
    server.put("services", svc("last", "ns1"))
    events = take(core.list_namespaced_service, "ns1", resource_version="0", until=until)
    assert summary(events) == [("ADDED", "last"), ("ADDED", "mine"), ("MODIFIED", "mine")]


def test_bookmarks_arrive_and_advance_resource_version(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a"))
    rv = core.list_namespaced_service("default").metadata.resource_version
    server.put("pods", pod("p"))  # another resource moves the global RV
    w = watch.Watch()
    events = take(
        core.list_namespaced_service,
        "default",
        resource_version=rv,
        allow_watch_bookmarks=True,
        until=lambda evs: evs[-1]["type"] == "BOOKMARK",
        w=w,
    )
    bookmark = events[-1]["raw_object"]
    assert bookmark["kind"] == "Service" and bookmark["apiVersion"] == "v1"
    assert bookmark["metadata"]["resourceVersion"] == str(server.resource_version)
    if KUBERNETES_MAJOR >= 36:  # client 35 ignores the RV carried by bookmarks
        assert w.resource_version == str(server.resource_version) != rv


def test_no_bookmarks_unless_requested(server: FakeApiServer, core: client.CoreV1Api) -> None:
    events = take(core.list_namespaced_service, "default", timeout=1, until=lambda _: False)
    assert events == []


def test_timeout_seconds_ends_stream(server: FakeApiServer, core: client.CoreV1Api) -> None:
    started = time.monotonic()
    events = take(core.list_namespaced_service, "default", timeout=1, until=lambda _: False)
    elapsed = time.monotonic() - started
    assert events == [] and 0.9 <= elapsed < 3
    assert server.open_watch_count() == 0


def test_compact_makes_watch_expire_with_410(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.put("services", svc("a"))
    rv = core.list_namespaced_service("default").metadata.resource_version
    server.put("services", svc("b"))
    server.compact()
    # Without timeout_seconds the client re-issues the watch once, then raises.
    with pytest.raises(ApiException) as expired:
        for _ in watch.Watch().stream(
            core.list_namespaced_service, "default", resource_version=rv, _request_timeout=5
        ):
            pass
    assert expired.value.status == 410
    assert "too old resource version" in str(expired.value.reason)
    assert server.request_counts()[("watch", "services")] == 2
    # Watching from the current RV is still fine.
    current = str(server.resource_version)
    events = take(
        core.list_namespaced_service,
        "default",
        resource_version=current,
        timeout=1,
        until=lambda _: False,
    )
    assert events == []


def test_history_limit_expires_old_resource_versions() -> None:
    with FakeApiServer(history_limit=2) as srv:
        api = client.CoreV1Api(srv.api_client())
        for name in "abcd":
            srv.put("services", svc(name))
        with pytest.raises(ApiException) as expired:
            take(api.list_namespaced_service, "default", resource_version="1", until=has(1))
        assert expired.value.status == 410
        events = take(api.list_namespaced_service, "default", resource_version="2", until=has(2))
        assert summary(events) == [("ADDED", "c"), ("ADDED", "d")]


def test_raw_410_error_event_on_the_wire(server: FakeApiServer) -> None:
    server.put("services", svc("a"))
    server.put("services", svc("b"))
    server.compact()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/api/v1/namespaces/default/services?watch=1&resourceVersion=1")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    lines = resp.read().decode().splitlines()
    conn.close()
    assert [json.loads(line) for line in lines] == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 1 (2)",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]


# --- selectors ---------------------------------------------------------------------------------


LABELLED = {
    "a": {"app": "vllm", "tier": "gpu"},
    "b": {"app": "vllm", "tier": "cpu"},
    "c": {"app": "other"},
    "d": {},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=vllm", ["a", "b"]),
        ("app==vllm", ["a", "b"]),
        ("app!=vllm", ["c", "d"]),
        ("tier", ["a", "b"]),
        ("!tier", ["c", "d"]),
        ("app=vllm,tier=gpu", ["a"]),
        (" app = vllm , !tier ", []),
        ("tier in (gpu, cpu)", ["a", "b"]),
        ("app notin (vllm)", ["c", "d"]),
        ("app in (other),tier notin (x)", ["c"]),
        ("", ["a", "b", "c", "d"]),
    ],
)
def test_label_selector_on_list(
    server: FakeApiServer, core: client.CoreV1Api, selector: str, expected: list[str]
) -> None:
    for name, labels in LABELLED.items():
        server.put("services", svc(name, **labels))
    listed = core.list_namespaced_service("default", label_selector=selector)
    assert [s.metadata.name for s in listed.items] == expected


@pytest.mark.parametrize("selector", ["app=", "=x", "app in x", "a b", "!", "app=(x)", "a in ()"])
def test_invalid_label_selector_is_400(core: client.CoreV1Api, selector: str) -> None:
    if selector == "app=":  # an empty value is legal: it selects app == ""
        assert core.list_namespaced_service("default", label_selector=selector).items == []
        return
    with pytest.raises(ApiException) as bad:
        core.list_namespaced_service("default", label_selector=selector)
    assert bad.value.status == 400
    assert json.loads(bad.value.body)["reason"] == "BadRequest"


def test_selector_parser_details() -> None:
    assert parse_label_selector("x>3").requirements[0].matches({"x": "4"})
    assert not parse_label_selector("x<3").matches({"x": "4"})
    assert parse_label_selector("example.com/role in (a,b)").matches({"example.com/role": "b"})
    with pytest.raises(SelectorError):
        parse_label_selector("Bad_Prefix/x=1")


def test_field_selector_on_list(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.put("services", svc("a", "ns1"))
    server.put("services", svc("b", "ns2"))
    by_name = core.list_service_for_all_namespaces(field_selector="metadata.name=b")
    assert [s.metadata.name for s in by_name.items] == ["b"]
    by_ns = core.list_service_for_all_namespaces(field_selector="metadata.namespace!=ns2")
    assert [s.metadata.name for s in by_ns.items] == ["a"]
    with pytest.raises(ApiException) as bad:
        core.list_service_for_all_namespaces(field_selector="spec.clusterIP=None")
    assert bad.value.status == 400


def test_label_selector_on_watch_with_enter_and_leave(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a", app="vllm"))
    server.put("services", svc("b", app="other"))
    rv = core.list_namespaced_service(
        "default", label_selector="app=vllm"
    ).metadata.resource_version
    server.put("services", svc("a", app="vllm", v="2"))  # still matches -> MODIFIED
    server.put("services", svc("a", app="gone"))  # leaves the selector -> DELETED
    server.put("services", svc("b", app="other", v="2"))  # never matched -> nothing
    server.put("services", svc("b", app="vllm"))  # enters the selector -> ADDED
    server.delete("services", "default", "b")  # deleted while matching -> DELETED
    events = take(
        core.list_namespaced_service,
        "default",
        label_selector="app=vllm",
        resource_version=rv,
        until=has(4),
    )
    assert summary(events) == [
        ("MODIFIED", "a"),
        ("DELETED", "a"),
        ("ADDED", "b"),
        ("DELETED", "b"),
    ]
    assert events[1]["object"].metadata.labels == {"app": "gone"}  # DELETED carries the new object


def test_label_selector_on_live_watch(server: FakeApiServer, core: client.CoreV1Api) -> None:
    consumer = Consumer(
        core.list_namespaced_service, "default", label_selector="app in (vllm)", timeout_seconds=3
    )
    consumer.start()
    assert server.wait_for_watches(1, "services")
    server.put("services", svc("x", app="other"))
    server.put("services", svc("y", app="vllm"))
    server.put("services", svc("y", app="moved"))
    wait_for(lambda: len(consumer.events) >= 2, 5, lambda: f"events: {summary(consumer.events)}")
    consumer.watch.stop()
    consumer.join(5)
    assert summary(consumer.events) == [("ADDED", "y"), ("DELETED", "y")]


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "reason"), [(403, "Forbidden"), (500, "InternalError")])
def test_fail_next_list(
    server: FakeApiServer, core: client.CoreV1Api, status: int, reason: str
) -> None:
    server.fail_next(1, status, verb="list", resource="services")
    core.list_namespaced_pod("default")  # another resource is unaffected
    with pytest.raises(ApiException) as failed:
        core.list_namespaced_service("default")
    assert failed.value.status == status
    body = json.loads(failed.value.body)
    assert (body["kind"], body["reason"], body["code"]) == ("Status", reason, status)
    assert core.list_namespaced_service("default").items == []  # only the next one failed
    assert server.request_counts()[("list", "services")] == 2


def test_fail_next_429_carries_retry_after(server: FakeApiServer, core: client.CoreV1Api) -> None:
    # urllib3 inside the client retries a 429 with Retry-After up to 3 times by itself.
    server.fail_next(4, 429, retry_after=0, resource="services")
    with pytest.raises(ApiException) as limited:
        core.list_namespaced_service("default")
    assert limited.value.status == 429
    assert limited.value.headers["Retry-After"] == "0"
    assert json.loads(limited.value.body)["reason"] == "TooManyRequests"
    assert server.request_counts()[("list", "services")] == 4


def test_fail_next_410_on_list_and_on_watch(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.fail_next(1, 410, verb="list")
    with pytest.raises(ApiException) as gone:
        core.list_namespaced_service("default")
    assert gone.value.status == 410 and json.loads(gone.value.body)["reason"] == "Expired"
    server.fail_next(1, 410, verb="watch")
    with pytest.raises(ApiException) as expired:  # in-stream ERROR event, raised by Watch
        take(core.list_namespaced_service, "default", until=has(1))
    assert expired.value.status == 410


def test_fail_for_expires(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.fail_for(0.3, 500, resource="services")
    with pytest.raises(ApiException) as failed:
        core.list_namespaced_service("default")
    assert failed.value.status == 500
    with pytest.raises(ApiException):
        core.list_namespaced_service("default")
    deadline = time.monotonic() + 5
    while True:
        try:
            core.list_namespaced_service("default")
            break
        except ApiException:
            assert time.monotonic() < deadline, "fault did not expire"
            time.sleep(0.05)
    server.fail_for(10, 503, verb="get")
    server.clear_faults()
    core.list_namespaced_service("default")


def test_cut_watches_ends_stream(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.put("services", svc("a"))

    def until(events: list[Event]) -> bool:
        server.cut_watches()
        return False

    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        take(core.list_namespaced_service, "default", resource_version="0", until=until)
    assert time.monotonic() - started < 3
    assert server.open_watch_count() == 0


def test_restart_same_port_keeps_store_and_client_works(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a"))
    port, rv = server.port, server.resource_version
    consumer = Consumer(core.list_namespaced_service, "default", timeout_seconds=30)
    consumer.start()
    assert server.wait_for_watches(1)
    # The server registers a watch before its response headers leave: a restart then would
    # cut a request, which urllib3 resends to the new server, not a stream.  Wait until the
    # client holds the stream (its first event, the ADDED of "a", arrived).
    wait_for(lambda: consumer.events, 5, "the watch stream never reached the client")
    started = time.monotonic()
    server.restart()
    assert time.monotonic() - started < 2
    assert server.port == port and server.resource_version == rv
    listed = core.list_namespaced_service("default")  # same ApiClient, pooled conn is dead
    assert [s.metadata.name for s in listed.items] == ["a"]
    assert listed.metadata.resource_version == str(rv)
    assert server.put("services", svc("b"))["metadata"]["resourceVersion"] == str(rv + 1)
    consumer.join(5)
    assert not consumer.is_alive() and consumer.error is not None  # the old stream was cut


def test_stop_ends_open_watches_promptly() -> None:
    srv = FakeApiServer().start()
    api = client.CoreV1Api(srv.api_client())
    consumers = [Consumer(api.list_namespaced_service, "default") for _ in range(3)]
    for consumer in consumers:
        consumer.start()
    assert srv.wait_for_watches(3)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 1.5
    for consumer in consumers:
        consumer.watch.stop()  # no timeout_seconds: the client would otherwise reconnect
        consumer.join(5)
        assert not consumer.is_alive()
    assert srv.open_watch_count() == 0


def test_inject_malformed_line_yields_none_and_stream_survives(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    def until(events: list[Event]) -> bool:
        if len(events) == 1:
            server.inject_raw_line(b'{"type": "ADDED", "object": {broken', resource="services")
            server.put("services", svc("after"))
        return len(events) == 3

    server.put("services", svc("before"))
    events = take(core.list_namespaced_service, "default", resource_version="0", until=until)
    assert events[1] is None
    assert summary(events) == [("ADDED", "before"), ("ADDED", "after")]


def test_disable_resource_answers_404(
    server: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    server.disable_resource("endpointslices")
    with pytest.raises(ApiException) as missing:
        discovery.list_endpoint_slice_for_all_namespaces()
    assert missing.value.status == 404
    with pytest.raises(ApiException):
        take(discovery.list_namespaced_endpoint_slice, "default", until=has(1))
    server.enable_resource("endpointslices")
    assert discovery.list_endpoint_slice_for_all_namespaces().items == []
    assert server.request_counts()[("list", "endpointslices")] == 2


def test_allowed_verbs_forbid_get() -> None:
    with FakeApiServer(allowed_verbs=frozenset({"list", "watch"})) as srv:
        srv.put("services", svc("x"))
        api = client.CoreV1Api(srv.api_client())
        assert len(api.list_namespaced_service("default").items) == 1
        with pytest.raises(ApiException) as denied:
            api.read_namespaced_service("x", "default")
        assert denied.value.status == 403
        message = json.loads(denied.value.body)["message"]
        assert message.startswith('services "x" is forbidden: User "system:serviceaccount:')
        assert (
            'cannot get resource "services" in API group "" in the namespace "default"' in message
        )
        # a real denial's details: the name, the group unless core, the resource as kind
        assert json.loads(denied.value.body)["details"] == {"name": "x", "kind": "services"}
        srv.allowed_verbs = frozenset()
        with pytest.raises(ApiException) as denied:
            client.DiscoveryV1Api(srv.api_client()).list_namespaced_endpoint_slice("default")
        assert json.loads(denied.value.body)["details"] == {"group": "discovery.k8s.io",
                                                             "kind": "endpointslices"}


# --- raw protocol details ----------------------------------------------------------------------


def test_go_bool_parsing_and_raw_errors(server: FakeApiServer) -> None:
    assert [parse_go_bool(v) for v in ("1", "t", "TRUE", "True", "0", "F", "false")] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    status, body = raw_request(server, "/api/v1/services?watch=yes")
    assert status == 400 and body["reason"] == "BadRequest"
    status, body = raw_request(server, "/api/v1/services?watch=0")
    assert status == 200 and body["kind"] == "ServiceList"
    status, body = raw_request(server, "/api/v1/services?watch=1&allowWatchBookmarks=nah")
    assert status == 400
    status, body = raw_request(server, "/api/v1/endpointslices")
    assert status == 404 and body["reason"] == "NotFound"
    status, body = raw_request(server, "/api/v1/namespaces/default/services", method="POST")
    assert status == 405 and body["kind"] == "Status"


def test_keep_alive_then_chunked_watch_on_one_connection(server: FakeApiServer) -> None:
    server.put("pods", pod("p"))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/api/v1/pods")
        first = conn.getresponse()
        assert first.getheader("Content-Length") is not None
        assert json.loads(first.read())["kind"] == "PodList"
        conn.request("GET", "/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1")
        second = conn.getresponse()
        assert second.getheader("Transfer-Encoding") == "chunked"
        events = [json.loads(line) for line in second.read().splitlines()]
        assert [(e["type"], e["object"]["kind"]) for e in events] == [("ADDED", "Pod")]
    finally:
        conn.close()


# --- how real watches and paged LISTs fail -------------------------------------------------------


def raw_watch(core: client.CoreV1Api, read_timeout: float = 5, **kwargs: Any) -> Any:
    """A watch through the generated client function, body left unread (as the informer does)."""
    return core.list_namespaced_service("default", watch=True, _preload_content=False,
                                        _request_timeout=(2, read_timeout), **kwargs)


def test_default_bookmark_cadence_is_a_real_servers_and_configurable() -> None:
    assert FakeApiServer().bookmark_interval == 60.0
    assert FakeApiServer(bookmark_interval=0.1).bookmark_interval == 0.1


def test_watch_that_ends_cleanly_at_once_with_no_event(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a"))
    server.fail_next(2, how="empty")
    for _ in range(2):
        resp = raw_watch(core, resource_version=str(server.resource_version))
        assert resp.status == 200
        assert resp.read() == b""  # a complete chunked body, empty
    assert server.request_counts()[("watch", "services")] == 2
    # The fault is used up: the next watch works and replays from the RV asked for.
    events = take(core.list_namespaced_service, "default", resource_version="0", until=has(1))
    assert summary(events) == [("ADDED", "a")]


@pytest.mark.parametrize("code", [500, 429, 410, 503])
def test_in_stream_error_event_with_any_status_code(
    server: FakeApiServer, core: client.CoreV1Api, code: int
) -> None:
    server.fail_next(1, code, how="error-event")
    resp = raw_watch(core)
    assert resp.status == 200
    lines = [json.loads(line) for line in resp.read().splitlines()]
    assert len(lines) == 1 and lines[0]["type"] == "ERROR"
    status = lines[0]["object"]
    assert status["kind"] == "Status" and status["code"] == code and status["status"] == "Failure"


def test_silent_watch_sends_headers_then_nothing_until_the_read_timeout(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.fail_next(1, how="silent")
    resp = raw_watch(core, read_timeout=0.5, timeout_seconds=1)  # the server timeout is ignored
    assert resp.status == 200
    started = time.monotonic()
    with pytest.raises((urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError)):
        for _ in resp.stream(None):
            pytest.fail("a silent stream carried bytes")
    assert time.monotonic() - started < 4  # the per-read timeout ended it, nothing else
    resp.release_conn()


def test_silent_watch_ends_when_the_server_stops() -> None:
    srv = FakeApiServer().start()
    api = client.CoreV1Api(srv.api_client())
    srv.fail_next(1, how="silent")
    consumer = Consumer(api.list_namespaced_service, "default", timeout_seconds=30,
                        _request_timeout=(2, 30))
    consumer.start()
    # the held connection must exist before the stop, else the test proves nothing
    wait_for(lambda: srv.request_counts().get(("watch", "services"), 0) >= 1, 5,
             lambda: f"requests: {srv.request_counts()}")
    srv.stop()
    consumer.join(5)
    assert not consumer.is_alive() and consumer.events == []
    assert consumer.error is not None  # the held connection was dropped, not left hanging


def test_open_watch_silenced_midway_carries_no_more_events_or_bookmarks(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a"))
    resp = raw_watch(core, read_timeout=1.0, resource_version="0", allow_watch_bookmarks=True)
    lines: list[dict[str, Any]] = []
    with pytest.raises((urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError)):
        pending = b""
        for chunk in resp.stream(None):
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                lines.append(json.loads(line))
                if len(lines) == 2:  # the ADDED and a first bookmark: now black-hole it
                    server.silence_watches()
                    server.put("services", svc("b"))
    assert [e["type"] for e in lines] == ["ADDED", "BOOKMARK"]
    assert server.open_watch_count() == 0  # a silenced stream no longer counts as open
    resp.release_conn()


def test_resource_version_too_large_is_a_504_with_its_cause(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.fail_next(1, 504, verb="watch", cause="ResourceVersionTooLarge")
    with pytest.raises(ApiException) as refused:
        take(core.list_namespaced_service, "default", resource_version="99", until=has(1))
    assert refused.value.status == 504
    body = json.loads(refused.value.body)
    assert body["reason"] == "Timeout" and body["message"].startswith("Too large resource version")
    assert body["details"]["causes"] == [
        {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]


def test_list_pages_with_limit_and_continue(server: FakeApiServer, core: client.CoreV1Api) -> None:
    for name in "abcde":
        server.put("services", svc(name))
    first = core.list_namespaced_service("default", limit=2)
    assert [s.metadata.name for s in first.items] == ["a", "b"]
    assert first.metadata._continue and first.metadata.remaining_item_count == 3
    rv = first.metadata.resource_version
    server.put("services", svc("aa"))  # after the first page: not in this LIST (one revision)
    names = [s.metadata.name for s in first.items]
    token = first.metadata._continue
    while token:
        page = core.list_namespaced_service("default", limit=2, _continue=token)
        assert page.metadata.resource_version == rv
        names += [s.metadata.name for s in page.items]
        token = page.metadata._continue
    assert names == ["a", "b", "c", "d", "e"]


def test_list_from_the_watch_cache_ignores_limit(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    for name in "abc":
        server.put("services", svc(name))
    cached = core.list_namespaced_service("default", limit=1, resource_version="0")
    assert len(cached.items) == 3 and not cached.metadata._continue
    exact = core.list_namespaced_service("default", limit=1, resource_version="2")
    assert len(exact.items) == 1 and exact.metadata._continue


def test_continue_token_expires_with_compaction_and_exact_rv_too(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    for name in "abc":
        server.put("services", svc(name))
    first = core.list_namespaced_service("default", limit=1)
    server.compact()
    with pytest.raises(ApiException) as expired:
        core.list_namespaced_service("default", limit=1, _continue=first.metadata._continue)
    assert expired.value.status == 410
    assert "continue parameter is too old" in json.loads(expired.value.body)["message"]
    with pytest.raises(ApiException) as gone:  # paged LIST at an exact, compacted RV
        core.list_namespaced_service("default", limit=1, resource_version="1")
    assert gone.value.status == 410
    again = core.list_namespaced_service("default", limit=1)  # a fresh LIST works
    server.expire_continue_tokens()
    with pytest.raises(ApiException) as dropped:
        core.list_namespaced_service("default", limit=1, _continue=again.metadata._continue)
    assert dropped.value.status == 410
    third = core.list_namespaced_service("default", limit=1)
    server.expire_continue_tokens(next_requests=1)  # only the next continue request expires
    with pytest.raises(ApiException) as once:
        core.list_namespaced_service("default", limit=1, _continue=third.metadata._continue)
    assert once.value.status == 410
    rest = core.list_namespaced_service("default", limit=5, _continue=third.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["b", "c"]


def test_continue_with_a_resource_version_is_refused(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.put("services", svc("a"))
    server.put("services", svc("b"))
    first = core.list_namespaced_service("default", limit=1)
    with pytest.raises(ApiException) as refused:
        core.list_namespaced_service("default", limit=1, _continue=first.metadata._continue,
                                     resource_version="1")
    assert refused.value.status == 400
    with pytest.raises(ApiException) as junk:
        core.list_namespaced_service("default", limit=1, _continue="not-a-token")
    assert junk.value.status == 400


def test_watch_faults_are_validated(server: FakeApiServer) -> None:
    with pytest.raises(ValueError):
        server.fail_next(1, how="bogus")
    with pytest.raises(ValueError):
        server.fail_next(1, how="empty", verb="list")


# --- health paths (/readyz, /livez, /healthz, /version) ------------------------------------------


def get_path(api: client.ApiClient, path: str) -> tuple[int, str]:
    """GET a non-resource path through the stock client, as kubectl get --raw does.

    kubernetes 37 splits the call into param_serialize + call_api; 35/36 take the path.
    Non-2xx answers raise ApiException in both.
    """
    if hasattr(api, "param_serialize"):
        method, url, headers, _, _ = api.param_serialize("GET", path,
                                                         auth_settings=["BearerToken"])
        response = api.call_api(method, url, header_params=headers, _request_timeout=(2, 2))
        data = response.read()
        if not 200 <= response.status < 300:
            error = ApiException(status=response.status, reason=response.reason)
            error.body, error.headers = data, response.headers
            raise error
        return response.status, data.decode()
    response = api.call_api(path, "GET", auth_settings=["BearerToken"], _preload_content=False,
                            _return_http_data_only=True, _request_timeout=(2, 2))
    return response.status, response.data.decode()


@pytest.mark.parametrize("path", ["/readyz", "/livez", "/healthz"])
def test_health_paths_answer_ok_to_every_client(path: str) -> None:
    # RBAC that denies every resource verb: the health paths stay readable
    with FakeApiServer(allowed_verbs=frozenset()) as srv:
        assert get_path(srv.api_client(), path) == (200, "ok")
        assert srv.request_counts()[("get", path.strip("/"))] == 1


def test_version_answers_the_version_object(server: FakeApiServer) -> None:
    info = client.VersionApi(server.api_client()).get_code()
    assert (info.major, info.minor) == ("1", "33") and info.git_version.startswith("v1.33")


@pytest.mark.parametrize("status", [500, 403])
def test_readyz_takes_a_fault_for_every_resource_and_recovers(
    server: FakeApiServer, core: client.CoreV1Api, status: int
) -> None:
    api = server.api_client()
    server.fail_for(30, status)
    with pytest.raises(ApiException) as failed:
        get_path(api, "/readyz")
    assert failed.value.status == status
    body = json.loads(failed.value.body)
    assert (body["kind"], body["code"]) == ("Status", status)
    with pytest.raises(ApiException):  # the same switch fails list/watch
        core.list_namespaced_service("default")
    server.clear_faults()
    assert get_path(api, "/readyz") == (200, "ok")


def test_readyz_429_carries_retry_after(server: FakeApiServer) -> None:
    # urllib3 inside the stock client retries a 429 with Retry-After by itself: 0 s here
    server.fail_for(30, 429, retry_after=0)
    with pytest.raises(ApiException) as limited:
        get_path(server.api_client(), "/readyz")
    assert limited.value.status == 429 and limited.value.headers["Retry-After"] == "0"
    assert json.loads(limited.value.body)["reason"] == "TooManyRequests"


def test_readyz_alone_can_be_failed_forbidden_or_absent(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    api = server.api_client()
    server.fail_next(1, 403, resource="readyz")
    with pytest.raises(ApiException) as denied:
        get_path(api, "/readyz")
    assert denied.value.status == 403
    assert 'cannot get path "/readyz"' in json.loads(denied.value.body)["message"]
    assert get_path(api, "/readyz") == (200, "ok")
    server.disable_resource("readyz")
    with pytest.raises(ApiException) as missing:
        get_path(api, "/readyz")
    assert missing.value.status == 404
    assert get_path(api, "/livez") == (200, "ok")
    assert core.list_namespaced_service("default").items == []  # list/watch unaffected
    server.enable_resource("readyz")
    assert get_path(api, "/readyz") == (200, "ok")


def test_counted_faults_without_a_resource_leave_readyz_alone(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.fail_next(1, 500)
    assert get_path(server.api_client(), "/readyz") == (200, "ok")
    with pytest.raises(ApiException):  # the fault is still there for the next API request
        core.list_namespaced_service("default")


def test_readyz_of_a_stopped_server_is_unreachable_then_back_after_start() -> None:
    srv = FakeApiServer().start()
    api = srv.api_client()
    api.configuration.retries = 0
    assert get_path(api, "/readyz") == (200, "ok")
    srv.stop()
    with pytest.raises(urllib3.exceptions.HTTPError):
        get_path(api, "/readyz")
    srv.start()
    try:
        assert get_path(api, "/readyz") == (200, "ok")
    finally:
        srv.stop()
