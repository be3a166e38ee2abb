"""Fixtures of the real-cluster tier: the control plane (once per session) and the backends.

The tier runs inside a private network namespace (``tox -e real`` starts pytest under
``unshare -n`` with ``lo`` up and ``10.244.0.0/16`` local on it), so the control plane's
fixed loopback ports and the pod addresses exist only there. Outside such a namespace the
session fails at once with the reason: it never skips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.engine_farm import EngineFarm
from tests.conftest import FAST_INFORMER, FAST_PROBE
from tests.realcluster.backends import Backend, RealBackend, SimBackend, wait_controller_working
from tests.realcluster.controlplane import (
    ControlPlane,
    in_private_network_namespace,
    locate_binaries,
)
from vllm_router_svcdisc.discovery import K8sServiceDiscovery
from vllm_router_svcdisc.sim.cluster import SimCluster
from vllm_router_svcdisc.sim.dns import ServiceDNS

BACKENDS = ("sim", "real")

#: The shared fast configs with room for a loaded 2-core machine: a real kube-apiserver's
#: LIST and a probe through the GIL-shared engines can take seconds there.
TIER_INFORMER = dataclasses.replace(FAST_INFORMER, connect_timeout=5, list_read_timeout=20)
TIER_PROBE = dataclasses.replace(FAST_PROBE, timeout=5, attempts=3)
_namespaces = itertools.count(1)


def _check_namespace() -> None:
    if not in_private_network_namespace():
        pytest.fail("the real-cluster tier must run in a private network namespace: "
                    "run it as `tox -e real` (see docs/testing.md)", pytrace=False)
    probe = socket.socket()
    try:
        probe.bind(("10.244.255.254", 0))
    except OSError as exc:
        pytest.fail(f"10.244.0.0/16 is not local on lo in this namespace ({exc}): run the tier "
                    "as `tox -e real` (see docs/testing.md)", pytrace=False)
    finally:
        probe.close()


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager, started once for the session."""
    _check_namespace()
    kube_bin, etcd_bin = locate_binaries()
    keep = os.environ.get("REALCLUSTER_KEEP_LOGS")  # a folder to keep the logs in
    if keep:
        os.makedirs(keep, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="realcluster-", dir=keep or None))
    plane = ControlPlane(workdir, kube_bin, etcd_bin)
    try:
        plane.start()
        wait_controller_working(plane)
        yield plane
    finally:
        plane.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def new_namespace() -> str:
    """A namespace name not used before on this control plane (namespaces are never deleted:
    no namespace controller runs)."""
    return f"t{next(_namespaces)}-{secrets.token_hex(2)}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The same scenario on the simulator and on the real control plane."""
    namespace = new_namespace()
    if request.param == "sim":
        with SimCluster(bookmark_interval=0.25) as sim:
            yield SimBackend(sim, namespace)
        return
    with real_backend_in(request.getfixturevalue("control_plane"), namespace) as real:
        yield real


@pytest.fixture(params=BACKENDS)
def farm_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """``backend`` whose pods' engines are served by one engine-farm process
    (``benchmarks/engine_farm.py``, bound on ``0.0.0.0``: it answers for every pod address on
    ``lo``), for scenarios with hundreds of pods; farm engines cannot be cut off the network."""
    namespace = new_namespace()
    with EngineFarm(0, max_seconds=900) as farm:
        if request.param == "sim":
            with SimCluster(bookmark_interval=0.25, engine_port=farm.port,
                            engine_factory=farm.engine_factory()) as sim:
                yield SimBackend(sim, namespace)
            return
        with real_backend_in(request.getfixturevalue("control_plane"), namespace,
                             engine_factory=farm.engine_factory(),
                             engine_port=farm.port) as real:
            yield real


@contextlib.contextmanager
def real_backend_in(plane: ControlPlane, namespace: str,
                    **options: Any) -> Iterator[RealBackend]:
    """A RealBackend on a fresh namespace, with Service DNS installed in-process."""
    dns = ServiceDNS().install()
    real = RealBackend(plane, namespace, dns, **options)
    try:
        yield real
    finally:
        real.close()
        dns.uninstall()


@pytest.fixture
def discover() -> Iterator[Callable[..., K8sServiceDiscovery]]:
    """``discover(backend, **kw)``: discovery as a router runs it, closed at teardown."""
    made: list[K8sServiceDiscovery] = []

    def factory(b: Backend, **kwargs: Any) -> K8sServiceDiscovery:
        kwargs.setdefault("namespace", b.namespace)
        kwargs.setdefault("label_selector", "app=vllm")
        kwargs.setdefault("api_client", b.router_client())
        kwargs.setdefault("informer_config", TIER_INFORMER)
        kwargs.setdefault("probe_config", TIER_PROBE)
        d = K8sServiceDiscovery(**kwargs)
        made.append(d)
        return d

    yield factory
    for d in made:
        d.close()
