"""Judging the canary against production as it is now (``baseline: production``, ``analysis: mann-whitney``), end
to end: the mesh simulator serves production and canary by the VirtualService's live weights and exports Istio's
metrics to the real Prometheus; the real birdwatch judges them.

Production's error rate drifts up mid-rollout while the canary is exactly as healthy as production: judged against
its first value the canary looks sick and is rolled back; judged against production it is promoted. A canary worse
than production is rolled back whichever way it is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import Cluster, birdwatch, controller, eventually, mesh
from birdwatch_sandbox.meshsim import MeshSim

RPS = 120.0  # the canary's share at 10 % is 120 requests per 10 s window: a ratio's noise stays well under 0.25

MODES: dict[str, dict[str, Any]] = {
    "first": {},
    "production": {"baseline": "production"},
    "mann-whitney": {"baseline": "production", "analysis": "mann-whitney", "samples": 8},
}


def error_ratio(namespace: str) -> str:
    """The example's metric, with {{version}} where the version goes (birdwatch fills in canary and production)."""
    selector = (
        f'reporter="destination",destination_service_name="aleph",destination_service_namespace="{namespace}",'
        'destination_version="{{version}}"'
    )
    return (
        f'sum(rate(istio_requests_total{{{selector},response_code=~"5.."}}[10s])) '
        f"/ sum(rate(istio_requests_total{{{selector}}}[10s]))"
    )


def new_namespace(admin: KubeHTTP, base: str, mode: str) -> str:
    name = f"{base}-{mode.replace('-', '')}"[:63]
    admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@contextlib.asynccontextmanager
async def services(
    admin: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer, base: str
) -> AsyncIterator[dict[str, tuple[str, MeshSim]]]:
    """One namespace per mode, each with aleph v03 (production) and v04 (canary) served by a simulator."""
    out: dict[str, tuple[str, MeshSim]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for mode in MODES:
            ns = new_namespace(admin, base, mode)
            mesh(admin, ns)
            sim = MeshSim(
                kubeconfig=plane.kubeconfig,
                namespace=ns,
                service="aleph",
                versions=["v03", "v04"],
                rps=RPS,
                targets_dir=prometheus.targets_dir,
                senders=8,
            )
            await stack.enter_async_context(sim)
            out[mode] = (ns, sim)
        yield out


async def _weight(view: Cluster) -> int:
    return int((await view.status()).get("canaryWeight") or 0)


async def _at_least(view: Cluster, weight: int) -> bool:
    return await _weight(view) >= weight


async def test_production_drifts_up_first_rolls_back_production_promotes(
    cluster: Cluster, admin_http: KubeHTTP, control_plane: ControlPlane, prometheus: PrometheusServer
) -> None:
    async with services(admin_http, control_plane, prometheus, cluster.namespace) as sims:
        namespaces = [ns for ns, _ in sims.values()]
        views = {mode: Cluster(cluster.kube, ns) for mode, (ns, _) in sims.items()}
        async with controller(control_plane, prometheus_url=prometheus.url, namespaces=namespaces):
            for mode, view in views.items():
                spec = {"metric": error_ratio(view.namespace), "deviation": 0.25, "increment": 10, "interval": 5}
                await view.create_bw(birdwatch("aleph", max_weight=40, **spec, **MODES[mode]))
            await asyncio.gather(*(eventually(lambda v=v: _at_least(v, 10), timeout=60) for v in views.values()))
            # Production's error rate drifts up (a bad afternoon downstream); the canary is exactly as healthy.
            for _, sim in sims.values():
                sim.set_error_rate("v03", 0.4)
                sim.set_error_rate("v04", 0.4)
            first, production, mann_whitney = await asyncio.gather(
                views["first"].wait_phase("RolledBack", timeout=60),
                views["production"].wait_phase("Promoted", timeout=90),
                views["mann-whitney"].wait_phase("Promoted", timeout=90),
            )
    assert "from baseline 0" in first["message"], first
    assert production["productionValue"] is not None
    assert abs(production["lastValue"] - production["productionValue"]) <= 0.25
    assert mann_whitney["pValue"] is not None
    assert mann_whitney["effect"] is not None


async def test_a_canary_worse_than_production_is_rolled_back_in_every_mode(
    cluster: Cluster, admin_http: KubeHTTP, control_plane: ControlPlane, prometheus: PrometheusServer
) -> None:
    async with services(admin_http, control_plane, prometheus, cluster.namespace) as sims:
        for _, sim in sims.values():
            sim.set_error_rate("v03", 0.02)
            sim.set_error_rate("v04", 0.6)
        namespaces = [ns for ns, _ in sims.values()]
        views = {mode: Cluster(cluster.kube, ns) for mode, (ns, _) in sims.items()}
        async with controller(control_plane, prometheus_url=prometheus.url, namespaces=namespaces):
            for mode, view in views.items():
                spec = {"metric": error_ratio(view.namespace), "deviation": 0.25, "increment": 10, "interval": 5}
                await view.create_bw(birdwatch("aleph", max_weight=40, **spec, **MODES[mode]))
            statuses = await asyncio.gather(*(v.wait_phase("RolledBack", timeout=60) for v in views.values()))
    for mode, status in zip(MODES, statuses, strict=True):
        assert status["canaryWeight"] == 0, (mode, status)
        assert await views[mode].weights() == {"production": 100, "canary": 0}
    by_mode = dict(zip(MODES, statuses, strict=True))
    assert "from production" in by_mode["production"]["message"]
    assert "worse with confidence 0.95" in by_mode["mann-whitney"]["message"]
    assert by_mode["mann-whitney"]["pValue"] < 0.05
    assert by_mode["mann-whitney"]["effect"] > 0.25
