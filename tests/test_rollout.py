"""A whole rollout on the real API server and Prometheus, seen as a user sees it: weights, status, Events."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from birdwatch.kube import Kube
from envtest.controlplane import ControlPlane, KubeHTTP
from envtest.exporter import Exporter
from envtest.promserver import PrometheusServer
from kit import Cluster, birdwatch, canary_steps, controller, mesh


@pytest.fixture
async def cluster(control_plane: ControlPlane, namespace: str) -> AsyncIterator[Cluster]:
    kube = await Kube.connect(kubeconfig=str(control_plane.kubeconfig))
    try:
        yield Cluster(kube, namespace)
    finally:
        await kube.close()


def errors_metric(namespace: str) -> str:
    return f'max(bwtest_errors{{ns="{namespace}"}})'


async def test_named_subsets_promote(
    cluster: Cluster, admin_http: KubeHTTP, control_plane: ControlPlane, prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    ns = cluster.namespace
    mesh(admin_http, ns, named=True)
    exporter.set_gauge("bwtest_errors", 0.1, ns=ns)
    prometheus.wait_for_value(errors_metric(ns), 0.1)
    async with controller(control_plane, prometheus_url=prometheus.url, namespaces=[ns]), cluster.recording() as history:
        await cluster.create_bw(birdwatch("aleph", metric=errors_metric(ns), max_weight=30))
        status = await cluster.wait_phase("Promoted")
    assert status["baseline"] == pytest.approx(0.1)
    assert canary_steps(history, "canary") == [0, 10, 20, 30, 0]
    assert await cluster.weights() == {"production": 100, "canary": 0}
    dr = await cluster.dr()
    assert {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]} == {"production": "v04", "canary": "v04"}
    assert status["canaryWeight"] == 100
    assert status["observedGeneration"] == 1
    reasons = await cluster.reasons()
    assert reasons.count("TrafficShifted") == 3
    assert "RolloutStarted" in reasons
    assert "Promoted" in reasons
    vs = await cluster.vs()
    assert vs["metadata"]["labels"] == {"team": "aleph"}
    assert vs["metadata"]["annotations"]["owner"] == "aleph-team"
    primary = vs["spec"]["http"][0]
    assert primary["retries"] == {"attempts": 3, "perTryTimeout": "2s"}
    assert primary["timeout"] == "10s"
