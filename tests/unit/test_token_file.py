"""In-cluster config follows the mounted ServiceAccount token file as soon as it changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kubernetes.config import incluster_config

from vllm_router_svcdisc.discovery import TokenFile, load_api_client


def replace(path: Path, text: str) -> None:
    """As the kubelet does: a new file renamed over the old one."""
    tmp = path.with_name(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def mounted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pod's environment: service host and port set, token and CA files at tmp paths."""
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("first-token\n")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return token


def bearer(client: object) -> str | None:
    return client.configuration.get_api_key_with_prefix("BearerToken")  # type: ignore[attr-defined]


def test_in_cluster_client_uses_a_replaced_token_at_the_next_request(mounted: Path) -> None:
    client = load_api_client()
    try:
        assert client.configuration.host == "https://10.0.0.1:443"
        assert bearer(client) == "bearer first-token"
        replace(mounted, "second-token")
        assert bearer(client) == "bearer second-token"  # not a minute later
        mounted.write_text("third-token-rewritten-in-place")
        assert bearer(client) == "bearer third-token-rewritten-in-place"
    finally:
        client.close()


def test_a_missing_or_empty_token_file_keeps_the_last_token(mounted: Path) -> None:
    client = load_api_client()
    try:
        replace(mounted, "")
        assert bearer(client) == "bearer first-token"
        mounted.unlink()
        assert bearer(client) == "bearer first-token"
        mounted.write_text("back")
        assert bearer(client) == "bearer back"
    finally:
        client.close()


def test_an_unchanged_file_is_read_again_only_after_refresh(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("t1")

    class Config:
        def __init__(self) -> None:
            self.api_key: dict[str, str] = {}
            self.refresh_api_key_hook: object = None

    config = Config()
    follower = TokenFile(str(path), refresh=3600.0)
    follower.install(config)
    assert config.refresh_api_key_hook is follower and config.api_key["BearerToken"] == "bearer t1"
    for _ in range(5):
        follower(config)
    assert follower.reads == 1  # a stat per request, a read only on change
    follower.refresh = 0.0
    follower(config)
    assert follower.reads == 2
