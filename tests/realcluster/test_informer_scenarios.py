"""The informers' scenarios on both backends: API server restart, history expired (410 then a
re-list, also paged), access revoked and restored, the token file rotated. The same assertions
on the simulator and the real kube-apiserver."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.conftest import wait_for
from tests.realcluster.backends import Backend, write_token
from tests.realcluster.conftest import TIER_INFORMER
from tests.realcluster.test_scenarios import CONVERGE, Discover, service_urls, wait_converged
from vllm_router_svcdisc.discovery import Health, K8sServiceDiscovery


def wait_relisted(d: K8sServiceDiscovery, b: Backend, *, endpoints: bool) -> None:
    """Until the Services informer (and the endpoints one) re-listed after a 410 Expired."""
    def relisted() -> bool:
        statuses = d.informer_status()[:2 if endpoints else 1]
        return all(s.relists_by_cause.get("expired", 0) >= 1 for s in statuses)

    wait_for(relisted, CONVERGE, lambda: f"[{b.name}] no re-list after 410: {d.informer_status()}")


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
    # the endpoints informer alone can make the view converge (vllm-b's pods are gone): the
    # Services informer's reconnection may still be in its backoff
    wait_relisted(d, backend, endpoints=False)
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
    wait_relisted(d, backend, endpoints=True)


def test_rotated_token_file_is_followed_with_no_auth_failure(
        backend: Backend, discover: Discover, tmp_path: Path) -> None:
    """In-cluster config (``load_api_client()``) with the token from a file: the file is
    replaced by a new token, then the old one is revoked (on the real server: the Secret it is
    bound to is deleted). Discovery picks the new token up at its next request, so it never
    sees a 401: health stays true through reconnections, and later changes arrive."""
    token_file = tmp_path / "token"
    old = backend.issue_token()
    write_token(token_file, old)
    backend.add_service("vllm-a")
    d = discover(backend, api_client=backend.in_cluster_client(token_file))
    wait_converged(d, backend, ["vllm-a"])

    write_token(token_file, backend.issue_token())
    backend.revoke_token(old)
    wait_for(lambda: not backend.token_accepted(old), CONVERGE,
             f"[{backend.name}] the revoked token is still accepted")

    unhealthy: list[Health] = []

    def reconnected(since: tuple[int, int]) -> bool:
        health = d.health()
        if not health.healthy:
            unhealthy.append(health)
        return all(s.watches >= n + 2 for s, n in zip(d.informer_status(), since, strict=True))

    since = tuple(s.watches for s in d.informer_status())
    backend.add_service("vllm-b")
    backend.set_ready(backend.pods("vllm-a")[0], False)
    wait_for(lambda: reconnected(since), CONVERGE,  # two new watches each: new requests
             lambda: f"[{backend.name}] watches {[s.watches for s in d.informer_status()]}")
    wait_converged(d, backend, ["vllm-a", "vllm-b"])
    assert not unhealthy, unhealthy[:3]
    assert all(s.auth_error is None for s in d.informer_status())
