"""Security properties under failure: secrets never leak, engine answers are capped and never
redirect us, and discovery needs nothing beyond ``list`` and ``watch``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s_client

from tests.conftest import FAST_PROBE, wait_for
from tests.reliability import (
    Harness,
    RawServer,
    engine_like,
    harnessed,
    http_response,
    replace_engine,
)
from vllm_router_svcdisc.cli import service_rows
from vllm_router_svcdisc.http import EngineCallError
from vllm_router_svcdisc.probe import MAX_MODELS_BYTES, fetch_models
from vllm_router_svcdisc.sim.apiserver import FakeApiServer
from vllm_router_svcdisc.sim.cluster import SimCluster
from vllm_router_svcdisc.sim.engine import EngineMode

API_KEY = "sk-reliability-0d9f3c5e7a1b"  # VLLM_API_KEY, known so it can be searched for
KUBE_TOKEN = "kube-sa-token-52be1f0c9d77"  # the service account's bearer token


def kube_client_with_token(cluster: SimCluster) -> k8s_client.ApiClient:
    """A client that sends ``Authorization: Bearer <KUBE_TOKEN>`` on every API request."""
    configuration = k8s_client.Configuration()
    configuration.host = cluster.api.url
    configuration.api_key = {"authorization": KUBE_TOKEN}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return k8s_client.ApiClient(configuration)


def leaks(texts: list[str]) -> list[str]:
    return [t[:200] for t in texts if API_KEY in t or KUBE_TOKEN in t]


@pytest.fixture
def secret_cluster(cluster: SimCluster, monkeypatch: pytest.MonkeyPatch) -> SimCluster:
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    cluster.add_service("vllm-good", replicas=2, api_key=API_KEY)
    cluster.add_service("vllm-wrongkey", replicas=1, api_key="another-key")  # 401s
    hole = cluster.add_service("vllm-hole", replicas=1, api_key=API_KEY)  # timeouts
    garbage = cluster.add_service("vllm-garbage", replicas=1, api_key=API_KEY)
    for pod in hole.pods.values():
        pod.engine.mode = EngineMode.BLACKHOLE
    for pod in garbage.pods.values():
        pod.engine.mode = EngineMode.GARBAGE
    return cluster


@pytest.fixture
def secret_harness(secret_cluster: SimCluster,
                   caplog: pytest.LogCaptureFixture) -> Iterator[Harness]:
    caplog.set_level(logging.DEBUG)  # every logger, urllib3 and the kubernetes client too
    with harnessed(secret_cluster, caplog,
                   discovery_kwargs={"api_client": kube_client_with_token(secret_cluster)}) as h:
        caplog.set_level(logging.DEBUG)
        yield h


def provoke_failures(harness: Harness, cluster: SimCluster) -> None:
    """401s, timeouts and garbage from engines (already set up); 403, 500, a restart and a
    malformed line from the API server."""
    discovery = harness.discovery
    wait_for(lambda: {e.service_name for e in discovery.get_endpoint_info()} == {"vllm-good"},
             10, lambda: str(discovery.get_service_status()))
    for name, part in (("vllm-wrongkey", "401"), ("vllm-hole", "timed out"),
                       ("vllm-garbage", "invalid JSON")):
        wait_for(lambda n=name, p=part: p in (
            discovery.get_service_status()[f"default/{n}"].reason or ""), 10,
            lambda: str(discovery.get_service_status()))
    cluster.api.fail_for(1.0, 403)
    cluster.api.cut_watches()
    wait_for(lambda: not discovery.get_health(), 5, "403 not seen")
    wait_for(discovery.get_health, 10, lambda: str(discovery.health()))
    cluster.api.fail_next(2, 500)
    cluster.api.restart()
    cluster.api.inject_raw_line(b'{"type": "ADDED", "object": {nope')
    cluster.add_service("vllm-late", replicas=1, api_key=API_KEY)
    wait_for(lambda: "vllm-late" in {e.service_name for e in discovery.get_endpoint_info()},
             10, lambda: str(discovery.get_service_status()))


def test_api_key_and_authorization_never_in_logs_exceptions_or_reprs(
        secret_harness, secret_cluster, caplog):
    harness, cluster = secret_harness, secret_cluster
    provoke_failures(harness, cluster)
    good = cluster.pods("vllm-good")[0].engine
    assert good.request_counts().get("/v1/models", 0) >= 1  # the key was really in use

    texts = [caplog.text]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            texts.append(repr(record.exc_info[1]))
    discovery, scraper = harness.discovery, harness.scraper
    texts += [repr(discovery), repr(discovery._prober), repr(scraper), str(discovery.health()),
              repr(discovery.get_endpoint_info()), repr(discovery.get_pod_endpoint_info()),
              repr(discovery.get_service_status()), repr(discovery.get_snapshot()),
              repr(discovery.informer_status()), repr(scraper.get_engine_stats() if scraper
                                                      else None)]
    # Exceptions as a caller of the probe function sees them: 401, timeout, garbage.
    session_urls = [cluster.url_of(n) for n in ("vllm-wrongkey", "vllm-hole", "vllm-garbage")]
    for url in session_urls:
        with pytest.raises(EngineCallError) as error:
            fetch_models(discovery._prober._session, url, API_KEY, FAST_PROBE)
        texts += [str(error.value), repr(error.value), repr(error.value.args),
                  repr(error.value.__cause__), repr(error.value.__context__)]
    assert not leaks(texts), leaks(texts)
    harness.finish()


def test_cli_json_rows_never_contain_the_api_key(secret_harness, secret_cluster):
    harness, cluster = secret_harness, secret_cluster
    provoke_failures(harness, cluster)
    assert harness.scraper is not None
    wait_for(lambda: cluster.url_of("vllm-good") in harness.scraper.get_engine_stats(), 10,
             "no stats for vllm-good")
    rows = service_rows(harness.discovery, harness.scraper)
    text = json.dumps(rows)
    assert {r["service"] for r in rows} >= {"default/vllm-good", "default/vllm-wrongkey"}
    assert "VLLM_API_KEY" in text  # the 401 reason names the variable ...
    assert not leaks([text]), text  # ... never its value
    harness.finish()


def test_api_key_is_sent_on_models_only_never_on_metrics(cluster, caplog, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    cluster.add_service("vllm-a", replicas=1)
    (pod,) = cluster.pods("vllm-a")
    with harnessed(cluster, caplog) as harness, \
            replace_engine(pod, engine_like(pod)) as raw:
        harness.wait_exact()
        wait_for(lambda: raw.count("/metrics") >= 2 and raw.count("/v1/models") >= 1, 10,
                 lambda: str(raw.paths()))
        for _method, path, headers in list(raw.requests):
            sent = headers.get("authorization")
            if path == "/v1/models":
                assert sent == f"Bearer {API_KEY}"
            else:
                assert sent is None, (path, "the key was sent with /metrics")
        harness.finish()


def _models_page(size: int) -> bytes:
    card = {"id": "m", "object": "model", "owned_by": "vllm", "padding": "x" * 1000}
    cards = [card] * (size // 1050 + 1)
    return json.dumps({"object": "list", "data": cards}).encode()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_models_body_over_the_4_mib_cap_is_refused(cluster, caplog, framing):
    cluster.add_service("vllm-a", replicas=1)
    cluster.add_service("vllm-big", replicas=1)
    (pod,) = cluster.pods("vllm-big")
    body = _models_page(MAX_MODELS_BYTES + 100_000)

    def models() -> bytes | list[bytes]:
        if framing == "content-length":
            return http_response("200 OK", body)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        step = 65536
        return [head] + [b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                         for i in range(0, len(body), step)] + [b"0\r\n\r\n"]

    with harnessed(cluster, caplog) as harness, \
            replace_engine(pod, engine_like(pod, models=models)):
        discovery = harness.discovery
        wait_for(lambda: "byte cap" in (
            discovery.get_service_status().get("default/vllm-big").reason or "")
            if "default/vllm-big" in discovery.get_service_status() else False, 10,
            lambda: str(discovery.get_service_status()))
        # vllm-a is routable once its own probe answered, which may come after vllm-big's
        wait_for(lambda: [e.service_name for e in discovery.get_endpoint_info()] == ["vllm-a"],
                 10, lambda: str(discovery.get_service_status()))
        assert [e.service_name for e in discovery.get_endpoint_info()] == ["vllm-a"]
        harness.finish()


def test_models_redirect_is_refused_and_the_key_goes_nowhere_else(cluster, caplog,
                                                                  monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    cluster.add_service("vllm-a", replicas=1)
    cluster.add_service("vllm-moved", replicas=1)
    (pod,) = cluster.pods("vllm-moved")
    with RawServer("127.0.0.2", 0, lambda *_: http_response("200 OK", b"{}")) as elsewhere:
        location = f"http://127.0.0.2:{elsewhere.port}/v1/models"
        moved = http_response("302 Found", b"", headers={"Location": location})
        with harnessed(cluster, caplog) as harness, \
                replace_engine(pod, engine_like(pod, models=lambda: moved)) as raw:
            discovery = harness.discovery
            wait_for(lambda: raw.count("/v1/models") >= 3 and "redirect" in (
                discovery.get_service_status()["default/vllm-moved"].reason or ""), 10,
                lambda: str(discovery.get_service_status()))
            # vllm-a is routable once its own probe answered (another worker, another pod)
            wait_for(lambda: [e.service_name for e in discovery.get_endpoint_info()]
                     == ["vllm-a"], 10, lambda: str(discovery.get_service_status()))
            assert [e.service_name for e in discovery.get_endpoint_info()] == ["vllm-a"]
            harness.finish()
        assert elsewhere.connections == 0, "the redirect was followed"


def test_rbac_list_and_watch_only_is_enough_and_anything_else_is_forbidden(caplog):
    api = FakeApiServer(allowed_verbs=frozenset({"list", "watch"}), bookmark_interval=0.25)
    with SimCluster(api=api) as cluster:
        cluster.add_service("vllm-a", replicas=2)
        cluster.add_service("vllm-b", replicas=1)
        with harnessed(cluster, caplog) as harness:
            harness.wait_exact()
            # churn, a cut and a 410 re-LIST: still only list and watch
            cluster.set_ready(cluster.pods("vllm-a")[0], False)
            cluster.add_service("vllm-c", replicas=1)
            cluster.api.compact()
            cluster.api.cut_watches()
            cluster.delete_service("vllm-b")
            harness.wait_exact()
            assert harness.discovery.get_health(), harness.discovery.health()
            verbs = {verb for verb, _ in cluster.api.request_counts()}
            assert verbs == {"list", "watch"}, cluster.api.request_counts()
            core = k8s_client.CoreV1Api(cluster.api_client())
            with pytest.raises(k8s_client.ApiException) as denied:
                core.read_namespaced_service("vllm-a", "default")
            assert denied.value.status == 403
            harness.finish()


def test_engine_sessions_ignore_proxy_settings_from_the_environment(cluster, caplog,
                                                                   monkeypatch):
    # The Kubernetes client reads proxy variables into its own configuration (its traffic is
    # governed by that configuration, see docs/security.md): build it before they are set.
    api_client = cluster.api_client()
    with RawServer("127.0.0.3", 0, lambda *_: http_response("502 Bad Gateway", b"")) as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        cluster.add_service("vllm-a", replicas=2)
        with harnessed(cluster, caplog, discovery_kwargs={"api_client": api_client}) as harness:
            harness.wait_exact()
            # a few more scrape cycles that could go through the proxy: wait for them to
            # happen (each engine answers two more scrapes), not for a fixed time
            pods = cluster.pods("vllm-a")
            before = [p.engine.request_counts().get("/metrics", 0) for p in pods]
            wait_for(lambda: all(p.engine.request_counts().get("/metrics", 0) >= n + 2
                                 for p, n in zip(pods, before, strict=True)), 10,
                     lambda: f"scrapes {[p.engine.request_counts() for p in pods]}, "
                             f"before {before}")
            harness.wait_exact()
            harness.finish()
        assert proxy.connections == 0, proxy.paths()
