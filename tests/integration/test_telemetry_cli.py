"""Self-metrics (prometheus) and the CLI, on the simulated cluster."""

from __future__ import annotations

import io
import json
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from vllm_router_svcdisc import cli
from vllm_router_svcdisc.scraper import EngineStatsScraper
from vllm_router_svcdisc.sim.engine import EngineMode
from vllm_router_svcdisc.telemetry import register_metrics, serve_metrics


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_self_metrics_report_informers_cache_and_scrapes(cluster, make_discovery) -> None:
    cluster.add_service("alpha", replicas=2)
    cluster.add_service("beta", replicas=1)
    cluster.pods("beta")[0].engine.mode = EngineMode.GARBAGE  # /v1/models and /metrics fail
    discovery = make_discovery(cluster)
    scraper = EngineStatsScraper(discovery, scrape_interval=0.2, timeout=0.5)
    try:
        registry = CollectorRegistry()
        register_metrics(discovery, scraper, registry=registry)
        wait_for(lambda: len(scraper.get_pod_engine_stats()) == 2, message="alpha scraped")

        def parse_failure_counted() -> bool:
            return _samples(registry).get(
                ("vllm_svcdisc_scrape_failures_total", (("cause", "parse"),)), 0) > 0

        wait_for(parse_failure_counted, message="garbage /metrics counted as a parse failure")

        def settled() -> bool:
            # produced by other threads than the scrapes waited on above: alpha's probe makes
            # it routable, beta's failed probe is counted by the prober, each informer's WATCH
            # request follows its LIST, and a pod's stats expire if a scrape comes late
            got = _samples(registry)
            return (got.get(("vllm_svcdisc_routable_services", ())) == 1
                    and got.get(("vllm_svcdisc_model_probe_failures_total", ()), 0) >= 1
                    and got.get(("vllm_svcdisc_scraped_pods", ())) == 2
                    and all(got.get(("vllm_svcdisc_informer_api_requests_total",
                                     (("resource", r),)), 0) >= 2
                            for r in ("services", "endpointslices")))

        wait_for(settled, message=lambda: f"samples: {_samples(registry)}")
        samples = _samples(registry)
        for resource in ("services", "endpointslices"):
            assert samples[("vllm_svcdisc_informer_synced", (("resource", resource),))] == 1
            assert samples[("vllm_svcdisc_informer_lists_total", (("resource", resource),))] == 1
            assert samples[("vllm_svcdisc_informer_auth_error", (("resource", resource),))] == 0
            assert samples[("vllm_svcdisc_informer_api_requests_total",
                            (("resource", resource),))] >= 2  # the LIST and a WATCH
            assert samples[("vllm_svcdisc_informer_failed_watches_total",
                            (("kind", "short"), ("resource", resource)))] == 0
        assert samples[("vllm_svcdisc_services", ())] == 2
        assert samples[("vllm_svcdisc_routable_services", ())] == 1
        assert samples[("vllm_svcdisc_ready_pods", ())] == 3
        assert samples[("vllm_svcdisc_model_probe_failures_total", ())] >= 1
        assert samples[("vllm_svcdisc_scraped_pods", ())] == 2
        assert samples[("vllm_svcdisc_healthy", ())] == 1
        assert samples[("vllm_svcdisc_scrape_duration_seconds_count", ())] >= 3
    finally:
        scraper.close()


def test_serve_metrics_exposes_the_registry_over_http(cluster, make_discovery) -> None:
    discovery = make_discovery(cluster)
    registry = CollectorRegistry()
    register_metrics(discovery, registry=registry)
    server, thread = serve_metrics(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert "vllm_svcdisc_informer_synced" in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_cli_rejects_bad_arguments_with_exit_code_2() -> None:
    assert cli.main(["watch", "--scrape-interval", "0"]) == cli.EXIT_USAGE
    assert cli.main(["no-such-command"]) == cli.EXIT_USAGE


def test_cli_watch_without_any_kube_config_exits_1(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "no-such-kubeconfig"
    assert cli.main(["watch", "--kubeconfig", str(missing), "--once"]) == cli.EXIT_NO_SYNC
    assert "no Kubernetes configuration" in capsys.readouterr().err


def test_cli_table_and_json_rows_describe_each_service(cluster, make_discovery) -> None:
    cluster.add_service("alpha", replicas=2, lora_adapters=["sql-lora"])
    cluster.add_service("gamma", replicas=1, ready=False)
    discovery = make_discovery(cluster)
    wait_for(lambda: len(discovery.get_endpoint_info()) == 1, message="alpha routable")
    rows = cli.service_rows(discovery, None)
    assert [r["service"] for r in rows] == ["default/alpha", "default/gamma"]
    alpha, gamma = rows
    assert alpha["routable"] and alpha["ready"] == 2 and "sql-lora*" in alpha["models"]
    assert not gamma["routable"] and "no ready endpoints" in gamma["reason"]
    table = cli.render_table(rows)
    assert table.splitlines()[0].split()[:4] == ["SERVICE", "READY", "OUT", "MODELS"]
    assert "no ready endpoints" in table
    json.dumps(rows)  # JSON-ready


def test_cli_demo_runs_its_churn_script_and_summarizes() -> None:
    out = io.StringIO()
    assert cli.main(["demo", "--quick"], stream=out) == cli.EXIT_OK
    text = out.getvalue()
    assert "rolling restart" in text and "== summary:" in text
    assert text.count("SERVICE") >= 4


def _kubeconfig(tmp_path, server_url: str):
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: sim\n"
        f"clusters:\n- name: sim\n  cluster:\n    server: {server_url}\n"
        "contexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\n"
        "users:\n- name: sim\n  user:\n    token: not-a-real-token\n")
    return path


def test_load_api_client_reads_a_kubeconfig_and_turns_urllib3_retries_off(cluster,
                                                                          tmp_path) -> None:
    from kubernetes.client import CoreV1Api

    from vllm_router_svcdisc.discovery import load_api_client

    client = load_api_client(kubeconfig=str(_kubeconfig(tmp_path, cluster.api.url)))
    assert client.configuration.host == cluster.api.url
    assert client.configuration.retries == 0
    assert CoreV1Api(client).list_namespaced_service("default").items == []


def test_load_api_client_turns_tcp_keepalive_on(cluster, tmp_path) -> None:
    import socket

    from kubernetes.client import CoreV1Api

    from vllm_router_svcdisc.discovery import load_api_client

    client = load_api_client(kubeconfig=str(_kubeconfig(tmp_path, cluster.api.url)))
    CoreV1Api(client).list_namespaced_service("default")
    pool = client.rest_client.pool_manager.connection_from_url(cluster.api.url)
    connection = pool._get_conn()  # the LIST's connection, back in the pool
    try:
        assert connection.sock is not None
        assert connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        pool._put_conn(connection)
        client.close()


def test_cli_watch_once_prints_the_snapshot_as_json(cluster, tmp_path) -> None:
    cluster.add_service("alpha", replicas=2)
    out = io.StringIO()
    code = cli.main(["watch", "--kubeconfig", str(_kubeconfig(tmp_path, cluster.api.url)),
                     "--selector", "app=vllm", "--once", "-o", "json",
                     "--scrape-interval", "0.2"], stream=out)
    assert code == cli.EXIT_OK
    snapshot = json.loads(out.getvalue().splitlines()[-1])
    (row,) = snapshot["services"]
    assert row["service"] == "default/alpha" and row["ready"] == 2
    assert "not-a-real-token" not in out.getvalue()


def test_cli_watch_exits_1_naming_rbac_when_forbidden(cluster, tmp_path, capsys) -> None:
    cluster.api.fail_for(30, 403)
    code = cli.main(["watch", "--kubeconfig", str(_kubeconfig(tmp_path, cluster.api.url)),
                     "--once", "--sync-timeout", "5"])
    assert code == cli.EXIT_NO_SYNC
    assert "403" in capsys.readouterr().err


def test_cli_watch_with_a_taken_metrics_port_exits_2(cluster, tmp_path, capsys) -> None:
    import socket

    taken = socket.create_server(("0.0.0.0", 0))
    try:
        code = cli.main(["watch", "--kubeconfig", str(_kubeconfig(tmp_path, cluster.api.url)),
                         "--once", "--metrics-port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    assert code == cli.EXIT_USAGE
    assert "cannot serve metrics" in capsys.readouterr().err


def test_python_dash_m_entry_points_run_the_cli() -> None:
    import subprocess
    import sys

    for module in ("vllm_router_svcdisc", "vllm_router_svcdisc.sim"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout
