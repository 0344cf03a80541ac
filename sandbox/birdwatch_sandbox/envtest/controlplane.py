"""etcd and kube-apiserver as child processes on free loopback ports, set up the way envtest does it.

TLS with a throw-away CA, an admin client certificate in ``system:masters``, service-account signing keys and RBAC
authorization; a kubeconfig for clients; birdwatch's CRD from ``deploy/`` and Istio's VirtualService and
DestinationRule CRDs installed and Established before ``start()`` returns. With ``workloads`` (the default),
kube-controller-manager, kube-scheduler and kwok's fake nodes too (``workloads.py``): Deployments become Available
by themselves.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .assets import REPO, Assets
from .pki import CertificateAuthority, Pair, service_account_keys
from .tokenauth import TokenServer
from .workloads import start_workloads

ISTIO_CRDS = ("virtualservices.networking.istio.io", "destinationrules.networking.istio.io")
BIRDWATCH_CRD = REPO / "deploy" / "crd" / "crd.yaml"
# A /16: 65,534 ClusterIPs, room for a Service per canary in the largest runs (a /24 held 254). Its first address,
# 10.0.0.1, is the "kubernetes" Service's and is in the serving certificate (pki.py).
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/16"
# BIRDWATCH_SANDBOX_PROFILING=1 when the control plane starts turns on the API server's pprof endpoints
# (/debug/pprof/..., on the secure port, for an authorised client such as the admin certificate): what its CPU goes
# to. Off by default, as in envtest.
PROFILING_ENV = "BIRDWATCH_SANDBOX_PROFILING"


def profiling_wanted() -> bool:
    return os.environ.get(PROFILING_ENV, "").strip().lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); look at its state so a dead server is not taken as running.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def stop_pid(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@dataclass
class Server:
    """One child process whose output goes to a log file that survives it."""

    name: str
    argv: Sequence[str]
    log: Path
    pid: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, *, detach: bool = False) -> None:
        with self.log.open("ab") as out:
            # A new session keeps Ctrl-C in the terminal from reaching the servers before we stop them in order.
            self._proc = subprocess.Popen(
                list(self.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        self.pid = self._proc.pid
        if detach:
            self._proc = None

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid > 0 and pid_alive(self.pid)

    def stop(self) -> None:
        if self.pid:
            stop_pid(self.pid)
        self._proc = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class StartupError(RuntimeError):
    pass


def wait_until(what: str, probe: Any, *, timeout: float, server: Server | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server is not None and not server.alive():
            raise StartupError(f"{server.name} exited while starting; its log ends:\n{server.tail()}")
        try:
            if probe():
                return
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        time.sleep(0.1)
    tail = f"\n{server.name} log ends:\n{server.tail()}" if server else ""
    raise StartupError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last}){tail}")


class KubeHTTP:
    """The few synchronous API calls the harness itself needs (installing CRDs, namespaces, RBAC)."""

    def __init__(self, host: str, port: int, *, ca: Path, client: Pair) -> None:
        self.host, self.port = host, port
        self._ctx = ssl.create_default_context(cafile=str(ca))
        self._ctx.load_cert_chain(str(client.cert), str(client.key))

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ctx, timeout=30)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def fetch(self, path: str, *, timeout: float = 30) -> tuple[int, bytes]:
        """GET ``path`` as bytes (a pprof profile, say: ``/debug/pprof/profile?seconds=30`` takes that long)."""
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ctx, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj``, or replace it when it exists (server-side apply would need a field manager)."""
        path = resource_path(obj)
        status, body = self.request("POST", path, obj)
        if status == 409:
            name = obj["metadata"]["name"]
            status, current = self.request("GET", f"{path}/{name}")
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
            status, body = self.request("PUT", f"{path}/{name}", obj)
        if status >= 300:
            raise RuntimeError(f"applying {obj['kind']} {obj['metadata']['name']}: {status} {body}")
        assert isinstance(body, dict)
        return body

    def wait_crds_established(self, names: Iterable[str], *, timeout: float = 60) -> None:
        def established(name: str) -> bool:
            status, crd = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            if status != 200:
                return False
            conditions = (crd.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        for name in names:
            wait_until(f"CRD {name} to be Established", lambda n=name: established(n), timeout=timeout)


# Plural names for the kinds the harness creates; everything else goes through the controller's own client.
_PLURALS = {
    "Namespace": "namespaces",
    "CustomResourceDefinition": "customresourcedefinitions",
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Deployment": "deployments",
    "Service": "services",
    "VirtualService": "virtualservices",
    "DestinationRule": "destinationrules",
    "BirdWatch": "birdwatches",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
}
_CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def resource_path(obj: dict[str, Any]) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    plural = _PLURALS[kind]
    if kind in _CLUSTER_SCOPED:
        return f"{base}/{plural}"
    namespace = obj["metadata"].get("namespace", "default")
    return f"{base}/namespaces/{namespace}/{plural}"


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def write_kubeconfig(path: Path, *, server: str, ca: Path, client: Pair, user: str = "admin") -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": user}}],
        "current-context": "envtest",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    """etcd + kube-apiserver in ``workdir``; ``start()`` returns when the API is ready and the CRDs Established."""

    workdir: Path
    assets: Assets
    etcd_port: int = 0
    etcd_peer_port: int = 0
    api_port: int = 0
    workloads: bool = True
    profiling: bool = field(default_factory=profiling_wanted)  # the API server's /debug/pprof endpoints
    servers: list[Server] = field(default_factory=list)
    ca: Path = field(init=False)
    admin: Pair = field(init=False)
    kubeconfig: Path = field(init=False)
    tokens: TokenServer | None = field(default=None, init=False)  # bearer tokens the tests decide on

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def http(self) -> KubeHTTP:
        return KubeHTTP("127.0.0.1", self.api_port, ca=self.ca, client=self.admin)

    def start(self, *, detach: bool = False, extra_crds: Sequence[Path] = ()) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki = self.workdir / "pki"
        authority = CertificateAuthority(pki)
        self.ca = authority.cert
        serving = authority.issue("apiserver", common_name="kube-apiserver", server=True)
        self.admin = authority.issue("admin", common_name="admin", organizations=("system:masters",))
        sa = service_account_keys(pki)
        # In this process only: a detached (sandbox) control plane outlives it, and the thread with it.
        self.tokens = None if detach else TokenServer(self.workdir / "tokenauth", authority).start()
        self.etcd_port = self.etcd_port or free_port()
        self.etcd_peer_port = self.etcd_peer_port or free_port()
        self.api_port = self.api_port or free_port()

        etcd = Server(
            "etcd",
            [
                str(self.assets.etcd),
                "--name=envtest",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-cluster=envtest=http://127.0.0.1:{self.etcd_peer_port}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
                # etcd's own default is far below what hundreds of canaries write during a benchmark.
                "--quota-backend-bytes=4294967296",
            ],
            self.workdir / "etcd.log",
        )
        self.servers.append(etcd)
        etcd.start(detach=detach)
        wait_until("etcd /health", lambda: _http_ok(f"{self.etcd_url}/health"), timeout=30, server=etcd)

        apiserver = Server(
            "kube-apiserver",
            [
                str(self.assets.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.ca}",
                f"--secure-port={self.api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                # The "kubernetes" Service's endpoints cannot be a loopback address; nothing here needs them.
                "--endpoint-reconciler-type=none",
                f"--profiling={'true' if self.profiling else 'false'}",
                "--v=0",
                *(self.tokens.apiserver_flags() if self.tokens else ()),
            ],
            self.workdir / "kube-apiserver.log",
        )
        self.servers.append(apiserver)
        apiserver.start(detach=detach)
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", server=self.url, ca=self.ca, client=self.admin)
        api = self.http()
        wait_until(
            "kube-apiserver /readyz", lambda: api.request("GET", "/readyz")[0] == 200, timeout=90, server=apiserver
        )
        # The controllers start while the CRDs install: the two waits overlap.
        workloads = start_workloads(self, authority, detach=detach) if self.workloads else None
        self.install_crds(api, extra_crds)
        if workloads is not None:
            workloads.wait_ready(api)

    def install_crds(self, api: KubeHTTP, extra: Sequence[Path] = ()) -> None:
        names = []
        for doc in load_yaml_documents(self.assets.istio_crds):
            if doc.get("kind") == "CustomResourceDefinition" and doc["metadata"]["name"] in ISTIO_CRDS:
                api.apply(doc)
                names.append(doc["metadata"]["name"])
        missing = set(ISTIO_CRDS) - set(names)
        if missing:
            raise StartupError(f"{self.assets.istio_crds} lacks {sorted(missing)}")
        for path in (BIRDWATCH_CRD, *extra):
            for doc in load_yaml_documents(path):
                api.apply(doc)
                names.append(doc["metadata"]["name"])
        api.wait_crds_established(names)

    def stop(self) -> None:
        # The API server first: it would otherwise log a storm of etcd connection errors while shutting down.
        for server in reversed(self.servers):
            server.stop()
        if self.tokens is not None:
            self.tokens.stop()

    def logs(self) -> dict[str, Server]:
        return {s.name: s for s in self.servers}


def _http_ok(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1].split("/")[0])
    path = "/" + url.split("/", 3)[3]
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    finally:
        conn.close()
