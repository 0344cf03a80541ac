"""First contact with a real cluster: objects that arrive in any order, API errors the user must see, a canary that
already has traffic, and weights that someone else moves. On the real API server, as a user would see it."""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from birdwatch.kube import VIRTUALSERVICES
from birdwatch.router import RECORD_ANNOTATION, Record
from birdwatch_sandbox.envtest.assets import REPO, Assets
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import (
    Cluster,
    account_kubeconfig,
    apply_all,
    birdwatch,
    canary_steps,
    controller,
    deployment,
    destination_rule,
    eventually,
    mesh,
    virtual_service,
    wait_available,
)

Obj = dict[str, Any]
EXAMPLE = REPO / "deploy" / "examples" / "aleph"


def metric(namespace: str) -> str:
    return f'max(bwtest_errors{{ns="{namespace}"}})'


def steps_ok(steps: list[int], increment: int) -> bool:
    """Before the ending (the promotion's or rollback's write, the last), every change rises by at most one
    increment (less only where ``max_weight`` caps it)."""
    return all(0 < b - a <= increment for a, b in itertools.pairwise(steps[:-1]))


@pytest.fixture
def plane(control_plane: ControlPlane) -> ControlPlane:
    return control_plane


def run(plane: ControlPlane, prometheus: PrometheusServer, namespaces: list[str], **kw: Any):  # type: ignore[no-untyped-def]
    return controller(plane, prometheus_url=prometheus.url, namespaces=namespaces, **kw)


# --- objects in any order --------------------------------------------------------------------------------------


async def test_a_birdwatch_applied_before_its_objects_goes_on_once_they_exist(
    cluster: Cluster, admin_http: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer, exporter: Exporter
) -> None:
    ns = cluster.namespace
    exporter.set_gauge("bwtest_errors", 0.0, ns=ns)
    prometheus.wait_for_value(metric(ns), 0.0)
    async with run(plane, prometheus, [ns]):
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), max_weight=20))
        pending = await cluster.wait_phase("Pending")
        await eventually(
            lambda: _message_says(cluster, "waiting for VirtualService aleph in namespace"), what="waiting message"
        )
        await asyncio.sleep(2)  # a GitOps tool's next object arrives a few seconds later
        assert (await cluster.status())["phase"] == "Pending"
        mesh(admin_http, ns)
        status = await cluster.wait_phase("Promoted", timeout=60)
    assert pending["observedGeneration"] == 1
    assert status["canaryWeight"] == 100
    assert "RouteMissing" not in await cluster.reasons()  # waiting is not a warning


async def test_missing_objects_wait_then_fail_after_ready_timeout(
    cluster: Cluster, admin_http: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer
) -> None:
    ns = cluster.namespace
    apply_all(admin_http, ns, [virtual_service("aleph", {"production": 100, "canary": 0})])
    async with run(plane, prometheus, [ns]):
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), ready_timeout=3))
        await eventually(
            lambda: _message_says(cluster, "waiting for DestinationRule aleph in namespace"), what="waiting message"
        )
        status = await cluster.wait_phase("Failed", timeout=30)
    assert "DestinationRule aleph in namespace" in status["message"]
    assert "ready_timeout 3s" in status["message"]
    assert status["reason"] == "RouteMissing"
    assert "RouteMissing" in await cluster.reasons()


def kubectl_apply(assets: Assets, plane: ControlPlane, namespace: str, folder: Path) -> None:
    subprocess.run(
        [str(assets.kubectl), "--kubeconfig", str(plane.kubeconfig), "apply", "-n", namespace, "-f", str(folder)],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def test_the_readmes_example_folder_applied_with_kubectl_goes_on(
    assets: Assets, cluster: Cluster, admin_http: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer
) -> None:
    """``kubectl apply -f deploy/examples/aleph/`` applies birdwatch.yaml first (name order): the BirdWatch meets
    no VirtualService, DestinationRule or Deployment, and must wait for them instead of failing."""
    namespaces = [cluster.namespace, f"{cluster.namespace}-b", f"{cluster.namespace}-c"]
    for ns in namespaces[1:]:
        admin_http.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    async with run(plane, prometheus, namespaces):
        for ns in namespaces:
            kubectl_apply(assets, plane, ns, EXAMPLE)
        for ns in namespaces:
            view = Cluster(cluster.kube, ns)
            # The example steps every 10 s: its first step shows that it went on, and that it did not fail.
            await eventually(lambda v=view: _weight_at_least(v, 10), timeout=60, what=f"{ns}: canary at 10%")
            status = await view.status()
            assert status["phase"] == "Progressing", status
            assert "RolloutStarted" in await view.reasons()


async def test_bad_promql_fails_at_once_while_the_canary_is_not_ready(
    cluster: Cluster, admin_http: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer
) -> None:
    """The query is checked as soon as the spec is seen, not after ready_timeout's wait for the canary."""
    ns = cluster.namespace
    mesh(admin_http, ns, ready=False)
    vs_before = await cluster.vs()
    async with run(plane, prometheus, [ns]):
        await cluster.create_bw(birdwatch("aleph", metric="sum(rate(http_requests_total[5m]"))
        status = await cluster.wait_phase("Failed", timeout=15)
    assert status["reason"] == "BadQuery"
    assert "parse error" in status["message"]
    vs = await cluster.vs()
    assert vs["metadata"]["resourceVersion"] == vs_before["metadata"]["resourceVersion"]  # nothing was written


def _birdwatch_gets(admin: KubeHTTP) -> float:
    """GETs of single BirdWatches the API server has answered (birdwatch otherwise only lists and watches them)."""
    status, text = admin.fetch("/metrics")
    assert status == 200
    found = re.findall(r"^apiserver_request_total\{(.*)\} ([0-9.e+]+)$", text.decode(), re.MULTILINE)
    return sum(float(n) for labels, n in found if 'resource="birdwatches"' in labels and 'verb="GET"' in labels)


async def test_a_stale_record_is_asked_about_once_however_long_the_canary_waits(
    cluster: Cluster, admin_http: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer, exporter: Exporter
) -> None:
    """The VirtualService carries the unfinished record of a BirdWatch since deleted. A fresh rollout writes nothing
    until its first step, so while its canary is not ready the record stays there round after round: birdwatch asks
    the API server about that owner once, not at every look."""
    ns = cluster.namespace
    exporter.set_gauge("bwtest_errors", 0.0, ns=ns)
    prometheus.wait_for_value(metric(ns), 0.0)
    mesh(admin_http, ns, ready=False)
    stale = Record(birdwatch="gone", uid="uid-of-gone", generation=1, canary="v04", weight=0)
    await cluster.kube.merge_patch(
        VIRTUALSERVICES, ns, "aleph", {"metadata": {"annotations": {RECORD_ANNOTATION: stale.to_json()}}}
    )
    async with run(plane, prometheus, [ns]):
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns)))
        await cluster.wait_phase("Waiting", timeout=15)  # by now the owner was asked about (the test's GETs too)
        before = _birdwatch_gets(admin_http)
        await asyncio.sleep(5)  # five more looks at 1 s
        asked_again = _birdwatch_gets(admin_http) - before
        status = await cluster.status()
    assert status["reason"] == "CanaryNotReady", status
    assert asked_again == 0, asked_again
    assert Record.parse(await cluster.vs()) == stale  # nothing written before the first step


# --- API errors reach the user ---------------------------------------------------------------------------------


def _role(namespace: str, *, vs_verbs: list[str]) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "birdwatch", "namespace": namespace},
        "rules": [
            {"apiGroups": ["otomato.link"], "resources": ["birdwatches"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["otomato.link"], "resources": ["birdwatches/status"], "verbs": ["get", "patch"]},
            {"apiGroups": ["networking.istio.io"], "resources": ["virtualservices"], "verbs": vs_verbs},
            {"apiGroups": ["networking.istio.io"], "resources": ["destinationrules"], "verbs": ["get", "patch"]},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    }


async def test_forbidden_patch_shows_in_status_and_an_event_then_goes_on_when_granted(
    cluster: Cluster,
    admin_http: KubeHTTP,
    plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
    tmp_path: Path,
) -> None:
    ns = cluster.namespace
    exporter.set_gauge("bwtest_errors", 0.0, ns=ns)
    prometheus.wait_for_value(metric(ns), 0.0)
    mesh(admin_http, ns)
    admin_http.apply(_role(ns, vs_verbs=["get", "list", "watch"]))  # RBAC missing a verb: patch
    kubeconfig = account_kubeconfig(
        admin_http, plane, namespace=ns, name="bw", folder=tmp_path, role=("Role", "birdwatch")
    )
    async with run(plane, prometheus, [ns], extra=["--kubeconfig", str(kubeconfig)]):
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), max_weight=20))
        status = await eventually(lambda: _reason_is(cluster, "Forbidden"), timeout=10, what="Forbidden in status")
        assert "patch" in status["message"]
        assert "virtualservices" in status["message"]
        assert "aleph" in status["message"]
        assert status["phase"] == "Pending"
        await eventually(lambda: _has_event(cluster, "Forbidden"), timeout=10, what="a Forbidden Event")
        await asyncio.sleep(3)  # retries go on, but the Event is not repeated for the same message
        assert (await cluster.reasons()).count("Forbidden") == 1
        assert await cluster.weights() == {"production": 100, "canary": 0}
        admin_http.apply(_role(ns, vs_verbs=["get", "list", "watch", "patch"]))
        final = await cluster.wait_phase("Promoted", timeout=60)
    assert final["reason"] == "Promoted"


# --- a canary that already has traffic -------------------------------------------------------------------------


def _headers(version: str) -> Obj:
    return {"request": {"set": {"x-version": version}}, "response": {"add": {"x-served-by": version}}}


def _version_named_with_headers(canary: int) -> list[Obj]:
    vs = virtual_service("aleph", {"v03": 100 - canary, "v04": canary})
    for dest in vs["spec"]["http"][-1]["route"]:
        dest["headers"] = _headers(dest["destination"]["subset"])
    return [
        deployment("aleph-v03", "v03"),
        deployment("aleph-v04", "v04"),
        destination_rule("aleph", {"v03": "v03", "v04": "v04"}),
        vs,
    ]


def _named_at(canary: int) -> list[Obj]:
    return [
        deployment("aleph-v03", "v03"),
        deployment("aleph-v04", "v04"),
        destination_rule("aleph", {"production": "v03", "canary": "v04"}),
        virtual_service("aleph", {"production": 100 - canary, "canary": canary}),
    ]


@pytest.mark.parametrize(
    ("objs", "canary", "named"), [(_named_at(20), "canary", True), (_version_named_with_headers(25), "v04", False)]
)
async def test_a_canary_with_traffic_goes_on_from_its_weight(
    objs: list[Obj],
    canary: str,
    named: bool,
    cluster: Cluster,
    admin_http: KubeHTTP,
    plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    ns = cluster.namespace
    exporter.set_gauge("bwtest_errors", 0.0, ns=ns)
    prometheus.wait_for_value(metric(ns), 0.0)
    apply_all(admin_http, ns, objs)
    wait_available(admin_http, ns, "aleph-v03", "aleph-v04")
    start = 20 if named else 25
    async with run(plane, prometheus, [ns]), cluster.recording() as history:
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), max_weight=50))
        status = await cluster.wait_phase("Promoted", timeout=60)
    steps = canary_steps(history, canary)
    assert steps[0] == start, steps
    assert steps_ok(steps, 10), steps  # never more than one increment in a write
    assert (steps[-1] == 0) if named else (steps[-1] == 100), steps
    assert steps[-2] == 50  # max_weight, where a passing check promotes
    if not named:
        for dest in (await cluster.vs())["spec"]["http"][-1]["route"]:
            assert dest["headers"] == _headers(dest["destination"]["subset"])
    assert status["baseline"] == 0
    started = next(e for e in await cluster.events() if e["reason"] == "RolloutStarted")
    assert f"at {start}%" in started["message"]


# --- someone else moves the weights ----------------------------------------------------------------------------


async def test_weights_moved_by_someone_else_freeze_the_rollout(
    cluster: Cluster, admin_http: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer, exporter: Exporter
) -> None:
    ns = cluster.namespace
    exporter.set_gauge("bwtest_errors", 0.0, ns=ns)
    prometheus.wait_for_value(metric(ns), 0.0)
    mesh(admin_http, ns)
    async with run(plane, prometheus, [ns]):
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), interval=2))
        await eventually(lambda: _weight_at_least(cluster, 20), what="canary at 20%")
        # A GitOps tool syncs the VirtualService back to git: all traffic to production.
        vs = await cluster.vs()
        for route in vs["spec"]["http"]:
            for dest in route["route"]:
                dest["weight"] = 100 if dest["destination"]["subset"] == "production" else 0
        await cluster.kube.replace(*_vs_path(ns), vs)
        status = await cluster.wait_phase("Frozen", timeout=20)
        await asyncio.sleep(2.5)  # more than an interval: birdwatch does not write again
        assert await cluster.weights() == {"production": 100, "canary": 0}
    assert status["reason"] == "TrafficOverridden"
    assert "traffic overridden" in status["message"]
    assert status["canaryWeight"] == 0
    assert "TrafficOverridden" in await cluster.reasons()


def _vs_path(ns: str) -> tuple[Any, str, str]:
    from birdwatch.kube import VIRTUALSERVICES

    return VIRTUALSERVICES, ns, "aleph"


async def _weight_at_least(cluster: Cluster, weight: int) -> bool:
    return int((await cluster.status()).get("canaryWeight") or 0) >= weight


async def _message_says(cluster: Cluster, text: str) -> bool:
    return text in str((await cluster.status()).get("message", ""))


async def _reason_is(cluster: Cluster, reason: str) -> Obj | None:
    status = await cluster.status()
    return status if status.get("reason") == reason else None


async def _has_event(cluster: Cluster, reason: str) -> bool:
    return reason in await cluster.reasons()
