"""Session-wide real servers (etcd, kube-apiserver, controller-manager, scheduler, kwok's fake nodes, Prometheus)
and per-test namespaces and clients.

The servers' logs are kept under .test-logs/ and their tails are attached to the report of any failed test.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from birdwatch.kube import Kube
from birdwatch_sandbox.envtest.assets import REPO, Assets, ensure_assets
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import Cluster, Env
from providerkit import backend_binaries, graphite, influx, victoria  # noqa: F401 - metric backends, once a session

_servers: list[tuple[str, Path]] = []


@pytest.fixture(scope="session")
def log_dir() -> Path:
    base = Path(os.environ.get("BIRDWATCH_TEST_LOGS", REPO / ".test-logs"))
    folder = base / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def assets() -> Assets:
    return ensure_assets()


@pytest.fixture(scope="session")
def control_plane(assets: Assets, log_dir: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(log_dir / "controlplane", assets)
    try:
        plane.start()
        _servers.extend((s.name, s.log) for s in plane.servers)
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def exporter() -> Iterator[Exporter]:
    server = Exporter().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prometheus(assets: Assets, log_dir: Path, exporter: Exporter) -> Iterator[PrometheusServer]:
    server = PrometheusServer(log_dir / "prometheus", assets.prometheus, static_targets=[exporter.address])
    try:
        server.start()
        assert server.server is not None
        _servers.append(("prometheus", server.server.log))
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin_http(control_plane: ControlPlane) -> KubeHTTP:
    return control_plane.http()


@pytest.fixture
def namespace(request: pytest.FixtureRequest, admin_http: KubeHTTP) -> str:
    """A fresh namespace per test, kept afterwards for a look at what a failed test left (the namespace
    controller would delete it, but etcd is thrown away with the session anyway)."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    admin_http.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@pytest.fixture
async def api_client(control_plane: ControlPlane) -> AsyncIterator[k8s.ApiClient]:
    configuration = k8s.Configuration()
    await k8s_config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=configuration)
    async with k8s.ApiClient(configuration) as api:
        yield api


@pytest.fixture
async def cluster(control_plane: ControlPlane, namespace: str) -> AsyncIterator[Cluster]:
    """birdwatch's own client on the test's namespace, to read back what a user would see."""
    kube = await Kube.connect(kubeconfig=str(control_plane.kubeconfig))
    try:
        yield Cluster(kube, namespace)
    finally:
        await kube.close()


@pytest.fixture
def env(
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> Env:
    """The session's servers and this test's namespace, with the test's metric under its control."""
    return Env(cluster, admin_http, control_plane, prometheus, exporter)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if getattr(report, "failed", False) and _servers:
        for name, log in _servers:
            try:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            except OSError:
                continue
            report.sections.append((f"{name} log ({log})", tail))
    return report
