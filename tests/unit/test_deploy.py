"""The shipped manifests parse and grant exactly list/watch on what discovery reads."""

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
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
