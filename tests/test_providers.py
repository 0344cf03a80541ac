"""Whole rollouts on the real control plane with the metric from each provider type: the baseline comes from that
backend, steady values promote, values past ``deviation`` roll back, a query the backend rejects ends Failed with
the backend's own words, and a backend that stops answering leads to failed checks and ``if_unhealthy``.

VictoriaMetrics (for the ``prometheus`` type), InfluxDB and Graphite are the real servers
(birdwatch_sandbox.envtest.backends); ``web`` asks a real local HTTP server; Loki, Datadog and New Relic are
wire-protocol servers (see providerkit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from birdwatch.kube import Invalid
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import Cluster, birdwatch, controller, eventually, mesh
from providerkit import TYPES, Backend, backend_of, providers_file

pytestmark = pytest.mark.slow


class Run:
    """A test's backend, behind the provider ``metrics`` in a providers file, and a controller using that file."""

    def __init__(
        self, backend: Backend, cluster: Cluster, admin: KubeHTTP, plane: ControlPlane, prometheus: str, folder: Path
    ) -> None:
        self.backend, self.cluster, self.admin, self.plane = backend, cluster, admin, plane
        self.prometheus = prometheus
        self.ns = cluster.namespace
        secrets = folder / "secrets"
        secrets.mkdir()
        self.file = providers_file(folder, {"metrics": backend.entry(secrets)})

    @asynccontextmanager
    async def controller(self) -> AsyncIterator[None]:
        async with controller(
            self.plane, prometheus_url=self.prometheus, namespaces=[self.ns], extra=["--providers-file", str(self.file)]
        ):
            yield

    def bw(self, **spec: object) -> dict[str, object]:
        return birdwatch("aleph", provider="metrics", metric=self.backend.metric(self.ns), **spec)


@pytest.fixture(params=TYPES)
async def run(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    tmp_path: Path,
) -> AsyncIterator[Run]:
    async with backend_of(request.param, request) as backend:
        mesh(admin_http, cluster.namespace)
        yield Run(backend, cluster, admin_http, control_plane, prometheus.url, tmp_path)


async def canary_at_least(cluster: Cluster, weight: int) -> bool:
    return (await cluster.weights()).get("canary", 0) >= weight


async def test_promoted_with_the_baseline_from_the_backend(run: Run) -> None:
    await run.backend.set(run.ns, 0.1)
    async with run.controller():
        await run.cluster.create_bw(run.bw(max_weight=20, deviation=0.05))
        status = await run.cluster.wait_phase("Promoted")
    assert status["baseline"] == pytest.approx(0.1)
    assert status["lastValue"] == pytest.approx(0.1)
    assert await run.cluster.weights() == {"production": 100, "canary": 0}


async def test_rolled_back_when_the_backend_value_moves_past_deviation(run: Run) -> None:
    await run.backend.set(run.ns, 0.0)
    async with run.controller():
        await run.cluster.create_bw(run.bw(interval=2, deviation=0.2))
        await eventually(lambda: canary_at_least(run.cluster, 10), what="canary at 10%")
        await run.backend.set(run.ns, 0.9)
        status = await run.cluster.wait_phase("RolledBack")
    assert status["baseline"] == pytest.approx(0.0)
    assert status["lastValue"] == pytest.approx(0.9)
    assert "more than the allowed 0.2" in status["message"]
    assert await run.cluster.weights() == {"production": 100, "canary": 0}


async def test_a_query_the_backend_rejects_ends_failed_with_its_words(run: Run) -> None:
    await run.backend.set(run.ns, 0.0)
    async with run.controller():
        await run.cluster.create_bw(birdwatch("aleph", provider="metrics", metric=run.backend.rejected))
        status = await run.cluster.wait_phase("Failed")
    assert status["reason"] == "BadQuery", status
    assert run.backend.says in status["message"], status["message"]
    assert await run.cluster.weights() == {"production": 100, "canary": 0}


async def test_a_backend_that_stops_answering_leads_to_failed_checks_and_rollback(run: Run) -> None:
    await run.backend.set(run.ns, 0.0)
    async with run.controller():
        await run.cluster.create_bw(run.bw(interval=1, failure_threshold=2))
        await eventually(lambda: canary_at_least(run.cluster, 10), what="canary at 10%")
        await run.backend.stop()
        try:
            status = await run.cluster.wait_phase("RolledBack", timeout=60)
        finally:
            await run.backend.start()
    assert status["failedChecks"] == 2, status
    assert "CheckFailed" in await run.cluster.reasons()
    assert await run.cluster.weights() == {"production": 100, "canary": 0}


async def test_an_unknown_provider_ends_failed_with_the_known_names(
    cluster: Cluster, admin_http: KubeHTTP, control_plane: ControlPlane, prometheus: PrometheusServer, tmp_path: Path
) -> None:
    mesh(admin_http, cluster.namespace)
    file = providers_file(tmp_path, {"influx": {"type": "influxdb", "address": "http://127.0.0.1:1", "database": "x"}})
    async with controller(
        control_plane,
        prometheus_url=prometheus.url,
        namespaces=[cluster.namespace],
        extra=["--providers-file", str(file)],
    ):
        await cluster.create_bw(birdwatch("aleph", provider="nope", metric="vector(0)"))
        status = await cluster.wait_phase("Failed")
    assert "unknown provider 'nope'; known: influx, prometheus" in status["message"], status
    assert await cluster.weights() == {"production": 100, "canary": 0}


@pytest.mark.parametrize("name", ["Influx", "in_flux", "-x", "a" * 64])
async def test_the_api_server_refuses_a_provider_that_is_not_a_dns_label(cluster: Cluster, name: str) -> None:
    with pytest.raises(Invalid) as refused:
        await cluster.create_bw(birdwatch("aleph", provider=name, metric="vector(0)"))
    assert "spec.provider" in str(refused.value), refused.value
