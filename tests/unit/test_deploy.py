"""The shipped manifests parse and grant exactly list/watch on what discovery reads."""

import argparse
import configparser
import importlib
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
STANDIN = ROOT / "tests" / "standin"
EXPECTED = {("", "services"), ("", "endpoints"), ("discovery.k8s.io", "endpointslices")}


def _documents(name: str) -> list[dict]:
    with open(DEPLOY / name, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


@pytest.mark.parametrize("kind", ["Role", "ClusterRole"])
def test_rbac_grants_only_list_and_watch_on_what_discovery_reads(kind: str) -> None:
    roles = [d for d in _documents("rbac.yaml") if d["kind"] == kind]
    assert len(roles) == 1
    granted = set()
    for rule in roles[0]["rules"]:
        assert sorted(rule["verbs"]) == ["list", "watch"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.add((group, resource))
    assert granted == EXPECTED


def test_rbac_bindings_point_at_the_roles_and_service_account() -> None:
    docs = _documents("rbac.yaml")
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    for binding_kind, role_kind in (("RoleBinding", "Role"),
                                    ("ClusterRoleBinding", "ClusterRole")):
        binding = next(d for d in docs if d["kind"] == binding_kind)
        role = next(d for d in docs if d["kind"] == role_kind)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": role_kind, "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount",
                                        "name": account["metadata"]["name"],
                                        "namespace": account["metadata"]["namespace"]}]


def test_example_service_has_the_label_and_named_port_discovery_expects() -> None:
    service = next(d for d in _documents("example-engine-service.yaml") if d["kind"] == "Service")
    assert service["metadata"]["labels"]["app"] == "vllm"
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


def _router_container() -> dict:
    deployment = next(d for d in _documents("router.yaml") if d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _router_args(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> argparse.Namespace:
    """The args as production-stack's parser (its stand-in) reads them."""
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setattr(sys, "argv", ["vllm-svcdisc-router", *args])
    for name in [n for n in sys.modules if n.startswith("vllm_router")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        parsed: argparse.Namespace = importlib.import_module(
            "vllm_router.parsers.parser").parse_args()
    finally:
        for name in [n for n in sys.modules if n.startswith("vllm_router")]:
            del sys.modules[name]  # the stand-in leaves with its path
    return parsed


def test_engine_has_a_prestop_sleep_within_its_grace_period() -> None:
    deployment = next(d for d in _documents("example-engine-service.yaml")
                      if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and 0 < int(command[1]) < pod["terminationGracePeriodSeconds"]


def test_router_runs_the_entry_point_with_production_stack_flags_that_find_the_engines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    container = _router_container()
    scripts = configparser.ConfigParser()
    scripts.read(ROOT / "setup.cfg")
    assert container["command"][0] + " = vllm_router_svcdisc.prodstack:main" in scripts[
        "options.entry_points"]["console_scripts"]
    args = _router_args(monkeypatch, container["args"])
    assert args.service_discovery == "k8s"
    assert args.k8s_service_discovery_type in ("pod-ip", "service-name")
    engine = next(d for d in _documents("example-engine-service.yaml") if d["kind"] == "Service")
    assert args.k8s_namespace == engine["metadata"]["namespace"]
    assert args.k8s_port in [p["port"] for p in engine["spec"]["ports"]]
    key, value = args.k8s_label_selector.split("=")
    assert engine["metadata"]["labels"][key] == value
    router_service = next(d for d in _documents("router.yaml") if d["kind"] == "Service")
    assert router_service["metadata"]["labels"].get(key) != value  # never discovers itself
    assert container["readinessProbe"]["httpGet"]["port"] == args.port


def test_router_and_helm_values_use_the_least_privilege_service_account() -> None:
    account = next(d for d in _documents("rbac.yaml") if d["kind"] == "ServiceAccount")
    deployment = next(d for d in _documents("router.yaml") if d["kind"] == "Deployment")
    assert deployment["metadata"]["namespace"] == account["metadata"]["namespace"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account[
        "metadata"]["name"]
    values = _documents("helm-values.yaml")[0]["routerSpec"]
    assert values["serviceAccountName"] == account["metadata"]["name"]
    assert values["k8sServiceDiscoveryType"] in ("pod-ip", "service-name")


def test_router_image_enters_through_the_entry_point() -> None:
    dockerfile = (DEPLOY / "router.Dockerfile").read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["vllm-svcdisc-router"]' in dockerfile
