"""The informers' scenarios on both backends: API server restart, history expired (410 then a
re-list, also paged), access revoked and restored. The same assertions on the simulator and the real
kube-apiserver."""

from __future__ import annotations

import dataclasses

from tests.conftest import wait_for
from tests.realcluster.backends import Backend
from tests.realcluster.conftest import TIER_INFORMER
from tests.realcluster.test_scenarios import CONVERGE, Discover, service_urls, wait_converged


def test_api_server_restart(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a")
    backend.add_service("vllm-b")
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a", "vllm-b"])

    backend.restart_api()
    backend.delete_service("vllm-b")
    backend.add_service("vllm-c")
    backend.set_ready(backend.pods("vllm-a")[0], False)

    wait_converged(d, backend, ["vllm-a", "vllm-c"])
    assert service_urls(d) == [backend.url_of("vllm-a"), backend.url_of("vllm-c")]
    wait_for(d.get_health, CONVERGE, lambda: str(d.health()))


def test_expired_history_relists_and_misses_nothing(backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a")
    backend.add_service("vllm-b")
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a", "vllm-b"])

    backend.expire_history()
    backend.delete_service("vllm-b")

    wait_converged(d, backend, ["vllm-a"])
    assert service_urls(d) == [backend.url_of("vllm-a")]
    services, _endpoints = d.informer_status()
    assert services.relists_by_cause.get("expired", 0) >= 1, services
    wait_for(d.get_health, CONVERGE, lambda: str(d.health()))


def test_revoked_access_makes_health_false_naming_rbac_then_recovers(
        backend: Backend, discover: Discover) -> None:
    backend.add_service("vllm-a")
    d = discover(backend)
    wait_converged(d, backend, ["vllm-a"])
    assert d.get_health()

    backend.revoke_access()
    wait_for(lambda: not d.get_health(), CONVERGE,
             f"[{backend.name}] health stayed green with the RoleBinding gone")
    reasons = " ".join(d.health().reasons)
    assert "forbidden (403)" in reasons and "RBAC" in reasons, reasons
    assert service_urls(d) == [backend.url_of("vllm-a")]  # the cache is kept

    backend.add_service("vllm-b")  # made while forbidden: must arrive after recovery
    backend.restore_access()
    wait_for(d.get_health, CONVERGE, lambda: f"[{backend.name}] {d.health()}")
    wait_converged(d, backend, ["vllm-a", "vllm-b"])


def test_paged_relist_after_expiry_misses_nothing(backend: Backend, discover: Discover) -> None:
    """Pages of 2: after the 410 the re-list (resourceVersion unset) comes in pages with
    continue tokens (on the real server, its own tokens), and the result is the whole set."""
    names = [f"vllm-{i}" for i in range(5)]
    for name in names:
        backend.add_service(name, replicas=1)
    d = discover(backend, informer_config=dataclasses.replace(TIER_INFORMER, list_page_size=2))
    wait_converged(d, backend, names)

    backend.expire_history()
    backend.delete_service(names.pop(1))

    wait_converged(d, backend, names)
    assert service_urls(d) == sorted(backend.url_of(n) for n in names)
    services, endpoints = d.informer_status()
    assert services.relists_by_cause.get("expired", 0) >= 1, services
    assert endpoints.relists_by_cause.get("expired", 0) >= 1, endpoints
