"""The mesh simulator (birdwatch_sandbox.meshsim) against the session's real API server and Prometheus, on aleph.

Each test applies deploy/examples/aleph/ to a fresh namespace (so the example's manifests are also checked by the real
API server), runs a ``MeshSim`` on it and changes the VirtualService or DestinationRule the way birdwatch does: with
merge-patches. The simulator picks versions by smooth weighted round-robin, so splits are exact over each cycle; the
bounds below are still loose, to allow for requests in flight when a route changes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from birdwatch_sandbox.envtest.assets import REPO
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.meshsim import MeshSim, Route, WeightedPicker, resolve

EXAMPLE = REPO / "deploy" / "examples" / "aleph"
RPS = 80.0
ISTIO = "/apis/networking.istio.io/v1/namespaces"


def example_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(EXAMPLE.glob("*.yaml")):
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def example(kind: str) -> dict[str, Any]:
    (obj,) = [o for o in example_objects() if o["kind"] == kind]
    return obj


@pytest.fixture
def aleph(admin_http: KubeHTTP, namespace: str) -> str:
    """The example applied, as ``kubectl apply -n NS -f deploy/examples/aleph/`` would; returns the namespace."""
    for obj in example_objects():
        assert "namespace" not in obj["metadata"], f"{obj['kind']} must leave the namespace to kubectl -n"
        admin_http.apply({**obj, "metadata": {**obj["metadata"], "namespace": namespace}})
    return namespace


async def merge_patch(admin_http: KubeHTTP, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, result = await asyncio.to_thread(
        admin_http.request, "PATCH", path, body, content_type="application/merge-patch+json"
    )
    assert status == 200, result
    assert isinstance(result, dict)
    return result


async def set_weights(admin_http: KubeHTTP, namespace: str, production: int, canary: int) -> None:
    """Rewrite the primary route's two weights, keeping the rest of the route (a merge-patch replaces lists)."""
    http = example("VirtualService")["spec"]["http"]
    http[0]["route"][0]["weight"], http[0]["route"][1]["weight"] = production, canary
    result = await merge_patch(admin_http, f"{ISTIO}/{namespace}/virtualservices/aleph", {"spec": {"http": http}})
    assert result["spec"]["http"][0]["retries"]["attempts"] == 2


def sim_for(control_plane: ControlPlane, namespace: str, **kwargs: Any) -> MeshSim:
    return MeshSim(
        kubeconfig=control_plane.kubeconfig,
        namespace=namespace,
        service="aleph",
        versions=["v03", "v04"],
        rps=kwargs.pop("rps", RPS),
        **kwargs,
    )


def totals(sim: MeshSim) -> dict[str, int]:
    return {version: ok + errors for version, (ok, errors) in sim.served().items()}


async def served_during(sim: MeshSim, seconds: float) -> dict[str, int]:
    before = totals(sim)
    await asyncio.sleep(seconds)
    return {version: count - before[version] for version, count in totals(sim).items()}


async def eventually(what: str, probe: Callable[[], Awaitable[bool]], *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.5)


async def query(prometheus: PrometheusServer, promql: str) -> float | None:
    result = await asyncio.to_thread(prometheus.query, promql)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


async def test_traffic_follows_the_virtualservice_weights(
    control_plane: ControlPlane, admin_http: KubeHTTP, aleph: str
) -> None:
    async with sim_for(control_plane, aleph) as sim:
        await sim.wait_for_weights({"v03": 100})
        assert sim.weights() == {"v03": 100, "v04": 0}
        first = await served_during(sim, 1.5)
        assert first["v03"] >= 0.5 * RPS * 1.5
        assert sim.served()["v04"] == (0, 0), "weight 0 must get no request at all"

        await set_weights(admin_http, aleph, 50, 50)
        await sim.wait_for_weights({"v03": 50, "v04": 50})
        split = await served_during(sim, 2.0)
        total = split["v03"] + split["v04"]
        assert total >= 0.5 * RPS * 2.0
        assert 0.4 <= split["v04"] / total <= 0.6, split

        await set_weights(admin_http, aleph, 100, 0)
        await sim.wait_for_weights({"v03": 100})
        await asyncio.sleep(0.2)  # requests routed before the change have landed
        assert (await served_during(sim, 1.0))["v04"] == 0
        assert (sim.unrouted, sim.dropped, sim.failed) == (0, 0, 0)


async def test_error_ratio_reaches_prometheus_as_the_example_metric_sees_it(
    control_plane: ControlPlane, admin_http: KubeHTTP, prometheus: PrometheusServer, aleph: str
) -> None:
    metric = example("BirdWatch")["spec"]["metric"]
    assert metric.count('destination_service_name="aleph"') == 2
    # The session's Prometheus scrapes every test's simulator: keep to this test's namespace.
    scoped = metric.replace(
        'destination_service_name="aleph"', f'destination_service_name="aleph",destination_service_namespace="{aleph}"'
    )
    selector = f'reporter="destination",destination_service_namespace="{aleph}"'
    await set_weights(admin_http, aleph, 50, 50)
    async with sim_for(control_plane, aleph, error_rates={"v04": 0.2}, targets_dir=prometheus.targets_dir) as sim:
        assert sim.targets_file is not None
        assert sim.targets_file.parent == prometheus.targets_dir
        groups = json.loads(sim.targets_file.read_text())
        assert sorted(t for g in groups for t in g["targets"]) == sorted(sim.addresses().values())

        async def enough_scraped() -> bool:
            # rate() sees only what grew between scrapes: wait until 150 of v04's requests did (a few seconds),
            # so the ratio rests on enough requests for loose bounds.
            seen = await query(
                prometheus, f'sum(increase(istio_requests_total{{{selector},destination_version="v04"}}[30s]))'
            )
            return seen is not None and seen >= 150

        await eventually("150 v04 requests between scrapes", enough_scraped)
        ratio = await query(prometheus, scoped)
        assert ratio is not None
        assert 0.1 <= ratio <= 0.3
        ok, errors = sim.served()["v04"]
        assert 0.1 <= errors / (ok + errors) <= 0.3
        # Production never failed, so (as with Istio) it has no 5xx series at all: the query is empty.
        assert await query(prometheus, scoped.replace('"v04"', '"v03"')) is None
        assert sim.served()["v03"][1] == 0
        latency = await query(
            prometheus,
            "histogram_quantile(0.5, sum by (le) "
            f"(rate(istio_request_duration_milliseconds_bucket{{{selector},destination_version='v03'}}[30s])))",
        )
        assert latency is not None
        assert latency < 100
        targets_file = sim.targets_file
    assert not targets_file.exists(), "close() removes the target list"


async def test_repointing_the_production_subset_moves_production_traffic(
    control_plane: ControlPlane, admin_http: KubeHTTP, aleph: str
) -> None:
    async with sim_for(control_plane, aleph) as sim:
        await sim.wait_for_weights({"v03": 100})
        subsets = example("DestinationRule")["spec"]["subsets"]
        assert [s["name"] for s in subsets] == ["production", "canary"]
        subsets[0]["labels"]["version"] = "v04"  # what promotion does, weights back at 100/0
        await merge_patch(admin_http, f"{ISTIO}/{aleph}/destinationrules/aleph", {"spec": {"subsets": subsets}})
        await sim.wait_for_weights({"v04": 100})
        assert sim.weights() == {"v04": 100}  # both subsets now select v04 (100 + 0)
        await asyncio.sleep(0.2)
        moved = await served_during(sim, 1.5)
        assert moved["v03"] == 0
        assert moved["v04"] >= 0.5 * RPS * 1.5

        # A subset the DestinationRule lacks cannot be served: Envoy would answer 503 itself.
        await merge_patch(admin_http, f"{ISTIO}/{aleph}/destinationrules/aleph", {"spec": {"subsets": subsets[1:]}})

        async def unroutable() -> bool:
            return sim.route.unroutable == 100 and sim.weights() == {"v04": 0}

        await eventually("production unroutable", unroutable, timeout=10)
        await asyncio.sleep(0.2)
        before = sim.unrouted
        assert (await served_during(sim, 1.0)) == {"v03": 0, "v04": 0}
        assert sim.unrouted > before


async def test_command_line_runs_until_sigterm_and_cleans_up(
    control_plane: ControlPlane, aleph: str, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "birdwatch_sandbox.meshsim",
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--namespace",
        aleph,
        "--service",
        "aleph",
        "--versions",
        "v03,v04",
        "--rps",
        "20",
        "--error-rate",
        "v04=0.5",
        "--targets-dir",
        str(tmp_path),
        "--report-every",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        assert line.startswith("meshsim: aleph in "), line
        control = line.split("control ")[1].split(";")[0]
        targets = tmp_path / f"meshsim-{aleph}-aleph.json"
        assert targets.exists()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{control}/control/state") as resp:
                state = await resp.json()
            assert state["weights"] == {"v03": 100, "v04": 0}
            assert state["error_rates"] == {"v03": 0.0, "v04": 0.5}
            async with http.post(f"{control}/control/error-rate", params={"version": "v03", "rate": "1"}) as resp:
                assert resp.status == 200
            async with http.post(f"{control}/control/error-rate", params={"version": "v9", "rate": "1"}) as resp:
                assert resp.status == 400
            await asyncio.sleep(1.0)
            async with http.get(f"http://{state['addresses']['v03']}/metrics") as resp:
                metrics = await resp.text()
            assert "istio_requests_total{" in metrics
            assert 'destination_version="v03"' in metrics
            assert 'response_code="500"' in metrics
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
        assert not targets.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- routing, without a cluster ----------------------------------------------------------------------------------------


def _vs(*destinations: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"hosts": ["aleph"], "http": [{"name": "primary", "route": list(destinations)}]}}


def test_resolve_maps_subsets_to_versions_and_reports_what_cannot_be_served() -> None:
    dr = example("DestinationRule")
    versions = ["v03", "v04"]
    assert resolve(example("VirtualService"), dr, service="aleph", namespace="ns", versions=versions) == Route(
        weights={"v03": 100, "v04": 0}
    )
    lone = _vs({"destination": {"host": "aleph.ns.svc.cluster.local", "subset": "canary"}})
    assert resolve(lone, dr, service="aleph", namespace="ns", versions=versions).weights == {"v04": 100}
    no_subset = _vs({"destination": {"host": "aleph"}})
    assert resolve(no_subset, dr, service="aleph", namespace="ns", versions=versions).weights == {"v03": 50, "v04": 50}
    missing = _vs(
        {"destination": {"host": "aleph", "subset": "production"}, "weight": 70},
        {"destination": {"host": "aleph", "subset": "v05"}, "weight": 30},
    )
    route = resolve(missing, dr, service="aleph", namespace="ns", versions=versions)
    assert (route.weights, route.unroutable) == ({"v03": 70}, 30)
    assert "v05" in route.describe()
    assert resolve(None, dr, service="aleph", namespace="ns", versions=versions).unroutable == 100


def test_weighted_picker_is_exact_over_a_cycle() -> None:
    picker = WeightedPicker([("v03", 90), ("v04", 10), (None, 0)])
    picks = [picker.pick() for _ in range(1000)]
    assert (picks.count("v03"), picks.count("v04")) == (900, 100)
    # Smooth: the canary's requests are spread out, not bunched at the start of each cycle.
    assert max(len(run) for run in "".join("c" if p == "v04" else "." for p in picks).split(".")) == 1
    assert WeightedPicker([("v03", 0)]).pick() is None
