"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

Built from Go modules by ``tests/realcluster/build.sh`` (binaries cached outside the
repository). Everything listens on 127.0.0.1 inside the private network namespace the tier
runs in (``tox -e real``); nothing here ever contacts another address.

- etcd: plain HTTP on 127.0.0.1:2379 (its JSON gateway also serves compaction).
- kube-apiserver: HTTPS on 127.0.0.1:6443 with a generated CA and serving certificate, a
  ServiceAccount signing key, static-token authentication for the test's admin, RBAC.
- kube-controller-manager: only the ``endpointslice``, ``endpoint`` and
  ``endpointslicemirroring`` controllers, as the admin.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes.client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "realcluster" / "build.sh"

HOST = "127.0.0.1"
ETCD_PORT = 2379
ETCD_PEER_PORT = 2380
APISERVER_PORT = 6443
KCM_PORT = 10257
#: Room for the 1 000-Service scenario's ClusterIPs (a /24 holds 254).
SERVICE_CIDR = "10.0.0.0/16"
#: kube-controller-manager's client rate limit (its defaults, 20 QPS and a burst of 30, pace
#: the EndpointSlice and endpoints controllers to ~20 writes a second: 1 000 Services' slices
#: and Endpoints would take well over a minute). A real control plane sets its own; this one
#: only ever serves tests.
KCM_API_QPS = 400
KCM_API_BURST = 800
#: Pod addresses: made local on the namespace's ``lo`` (``ip route add local ... dev lo``).
POD_CIDR = "10.244.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(RuntimeError):
    pass


def locate_binaries() -> tuple[Path, Path]:
    """(kube dir, etcd dir) from build.sh, which reuses its cache (or builds, with network)."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                          timeout=3600, check=False)
    if proc.returncode != 0:
        raise ControlPlaneError(f"tests/realcluster/build.sh failed:\n{proc.stderr}")
    dirs = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Path(dirs["KUBE_BIN_DIR"]), Path(dirs["ETCD_BIN_DIR"])


def in_private_network_namespace() -> bool:
    """True when this network namespace has no interface but ``lo``: nothing can leave it."""
    return [name for _index, name in socket.if_nameindex()] == ["lo"]


# --- certificates and keys ----------------------------------------------------------------------


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer_name: x509.Name,
          issuer_key: rsa.RSAPrivateKey, *, ca: bool,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(directory: Path) -> dict[str, Path]:
    """CA, apiserver serving certificate, ServiceAccount key pair; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "realcluster-ca")])
    ca = _cert("realcluster-ca", ca_key, ca_name, ca_key, ca=True)
    srv_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = ("localhost", "kubernetes", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in (HOST, "10.0.0.1")]
    srv = _cert("kube-apiserver", srv_key, ca.subject, ca_key, ca=False, sans=sans)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths = {name: directory / name for name in
             ("ca.crt", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub")}
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["apiserver.crt"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["apiserver.key"], srv_key)
    _write_key(paths["sa.key"], sa_key)
    paths["sa.pub"].write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return paths


# --- processes ----------------------------------------------------------------------------------


class _Process:
    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_http(url: str, context: ssl.SSLContext | None, timeout: float, process: _Process,
               headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.running():
            raise ControlPlaneError(f"{process.name} exited:\n{process.tail()}")
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise ControlPlaneError(f"{process.name} not ready at {url} within {timeout:.0f}s ({last}):\n"
                            f"{process.tail()}")


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager in ``workdir``."""

    def __init__(self, workdir: Path, kube_bin: Path, etcd_bin: Path) -> None:
        self.workdir = workdir
        self.url = f"https://{HOST}:{APISERVER_PORT}"
        self.etcd_url = f"http://{HOST}:{ETCD_PORT}"
        self.pki = write_pki(workdir / "pki")
        self.admin_token = secrets.token_hex(16)
        (workdir / "tokens.csv").write_text(
            f'{self.admin_token},realcluster-admin,realcluster-admin,"system:masters"\n')
        self._write_kubeconfig(workdir / "admin.kubeconfig")
        self.etcd = _Process("etcd", [
            str(etcd_bin / "etcd"), f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-url={self.etcd_url}",
            f"--listen-peer-url=http://{HOST}:{ETCD_PEER_PORT}",
        ], workdir / "etcd.log")
        self.apiserver = _Process("kube-apiserver", [
            str(kube_bin / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={workdir / 'apiserver-certs'}",
            f"--tls-cert-file={self.pki['apiserver.crt']}",
            f"--tls-private-key-file={self.pki['apiserver.key']}",
            f"--secure-port={APISERVER_PORT}", f"--bind-address={HOST}",
            f"--advertise-address={HOST}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={self.pki['sa.pub']}",
            f"--service-account-signing-key-file={self.pki['sa.key']}",
            f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
        ], workdir / "kube-apiserver.log")
        self.controller_manager = _Process("kube-controller-manager", [
            str(kube_bin / "kube-controller-manager"),
            f"--kubeconfig={workdir / 'admin.kubeconfig'}",
            "--controllers=endpointslice,endpoint,endpointslicemirroring",
            "--use-service-account-credentials=false", "--leader-elect=false",
            f"--kube-api-qps={KCM_API_QPS}", f"--kube-api-burst={KCM_API_BURST}",
            f"--secure-port={KCM_PORT}", f"--bind-address={HOST}",
            f"--cert-dir={workdir / 'kcm-certs'}",
        ], workdir / "kube-controller-manager.log")
        self._ssl = ssl.create_default_context(cafile=str(self.pki["ca.crt"]))

    def _write_kubeconfig(self, path: Path) -> None:
        ca = base64.b64encode(self.pki["ca.crt"].read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "realcluster",
            "clusters": [{"name": "realcluster",
                          "cluster": {"server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "realcluster",
                          "context": {"cluster": "realcluster", "user": "admin"}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        self.etcd.start()
        _wait_http(f"{self.etcd_url}/health", None, 60, self.etcd)
        self.start_apiserver()
        self.start_controller_manager()
        return self

    def start_controller_manager(self) -> None:
        self.controller_manager.start()
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # its self-signed serving cert; loopback only
        _wait_http(f"https://{HOST}:{KCM_PORT}/healthz", insecure, 90, self.controller_manager)

    def start_apiserver(self) -> None:
        self.apiserver.start()
        _wait_http(f"{self.url}/readyz", self._ssl, 120, self.apiserver,
                   {"Authorization": f"Bearer {self.admin_token}"})

    def restart_apiserver(self) -> None:
        """Restart kube-apiserver (SIGTERM, its graceful shutdown), then the controller-manager,
        as a control-plane node's restart does. Left alone, the controller-manager resumes only
        after its reflectors' backoff, which grows with each restart (up to a minute here)."""
        # it stops listening at once but lingers after its shutdown (in-flight watches):
        # 5 s, then SIGKILL
        self.apiserver.stop(timeout=5)
        self.start_apiserver()
        self.controller_manager.stop()
        self.start_controller_manager()

    def stop(self) -> None:
        for process in (self.controller_manager, self.apiserver, self.etcd):
            process.stop()

    # -- clients ---------------------------------------------------------------------------------

    def client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """An ApiClient over HTTPS with the cluster CA and a bearer token (default: admin)."""
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.pki["ca.crt"])
        # the generated client reads "BearerToken" (older releases "authorization")
        key = token or self.admin_token
        configuration.api_key = {"BearerToken": key, "authorization": key}
        configuration.api_key_prefix = {"BearerToken": "Bearer", "authorization": "Bearer"}
        return kubernetes.client.ApiClient(configuration)

    # -- etcd ------------------------------------------------------------------------------------

    def _etcd(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.etcd_url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def etcd_revision(self) -> int:
        key = base64.b64encode(b"/registry/").decode()
        reply = self._etcd("/v3/kv/range", {"key": key, "limit": 1, "keys_only": True})
        return int(reply["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision (physically); returns that revision."""
        revision = self.etcd_revision()
        self._etcd("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision
