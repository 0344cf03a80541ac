"""The harness really is a Kubernetes API server, Istio's schemas and a Prometheus: each enforces its rules; and its
controller-manager, scheduler and kwok nodes do what a cluster does with Deployments and namespaces."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from birdwatch.workload import deployment_available
from birdwatch_sandbox.envtest.controlplane import (
    PROFILING_ENV,
    SERVICE_CLUSTER_IP_RANGE,
    ControlPlane,
    KubeHTTP,
    Server,
    profiling_wanted,
)
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.envtest.workloads import CRASH, CRASH_AFTER, NEVER_READY, NODE_NAMES, POD_BEHAVIOUR, Workloads
from birdwatch_sandbox.kit import apply_all, deployment, rolled_out

VALID_SPEC: dict[str, Any] = {
    "service": "aleph",
    "metric": "sum(rate(istio_requests_total[30s]))",
    "deviation": 0.5,
    "canary_version": "v04",
}


def birdwatch(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "otomato.link/v1alpha1",
        "kind": "BirdWatch",
        "metadata": {"name": name},
        "spec": {**VALID_SPEC, **spec},
    }


def virtual_service(name: str, http: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"hosts": [name], "http": http},
    }


def route(production: int, canary: int) -> list[dict[str, Any]]:
    return [
        {
            "route": [
                {"destination": {"host": "aleph", "subset": "production"}, "weight": production},
                {"destination": {"host": "aleph", "subset": "canary"}, "weight": canary},
            ]
        }
    ]


async def test_version_is_the_pinned_release(admin_http: KubeHTTP) -> None:
    status, version = admin_http.request("GET", "/version")
    assert status == 200
    assert version["gitVersion"] == "v1.34.4"


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("increment", 11, "spec.increment"),
        ("if_unhealthy", "explode", "spec.if_unhealthy"),
        ("interval", 0, "spec.interval"),
        ("max_weight", 101, "spec.max_weight"),
    ],
)
async def test_birdwatch_schema_is_enforced(
    api_client: k8s.ApiClient, namespace: str, field: str, value: Any, says: str
) -> None:
    api = k8s.CustomObjectsApi(api_client)
    with pytest.raises(ApiException) as rejected:
        await api.create_namespaced_custom_object(
            "otomato.link", "v1alpha1", namespace, "birdwatches", birdwatch("bad", **{field: value})
        )
    assert rejected.value.status == 422
    assert says in rejected.value.body


async def test_birdwatch_defaults_are_filled_in(api_client: k8s.ApiClient, namespace: str) -> None:
    api = k8s.CustomObjectsApi(api_client)
    created = await api.create_namespaced_custom_object(
        "otomato.link", "v1alpha1", namespace, "birdwatches", birdwatch("aleph")
    )
    assert created["spec"]["increment"] == 1
    assert created["spec"]["interval"] == 5
    assert created["spec"]["if_unhealthy"] == "rollback"
    assert created["spec"]["max_weight"] == 100


async def test_virtual_service_weights_merge_patch_and_istio_schema(api_client: k8s.ApiClient, namespace: str) -> None:
    api = k8s.CustomObjectsApi(api_client)
    group = ("networking.istio.io", "v1", namespace, "virtualservices")
    await api.create_namespaced_custom_object(*group, virtual_service("aleph", route(100, 0)))
    await api.patch_namespaced_custom_object(
        *group, "aleph", {"spec": {"http": route(90, 10)}}, _content_type="application/merge-patch+json"
    )
    read = await api.get_namespaced_custom_object(*group, "aleph")
    weights = [d["weight"] for d in read["spec"]["http"][0]["route"]]
    assert weights == [90, 10]

    with pytest.raises(ApiException) as rejected:
        # Istio's schema: a weight is an int32 >= 0 and a destination needs a host.
        await api.create_namespaced_custom_object(
            *group, virtual_service("broken", [{"route": [{"destination": {"subset": "x"}, "weight": "lots"}]}])
        )
    assert rejected.value.status == 422
    assert "weight" in rejected.value.body


def test_exporter_value_is_read_back_through_promql(exporter: Exporter, prometheus: PrometheusServer) -> None:
    exporter.set_gauge("envtest_canary_error_rate", 0.3, service="aleph", version="v04")
    prometheus.wait_for_value('envtest_canary_error_rate{service="aleph",version="v04"}', 0.3)
    exporter.set_rate("envtest_requests_total", 20.0, service="aleph")
    prometheus.wait_for_value('count(envtest_requests_total{service="aleph"})', 1)
    exporter.set_gauge("envtest_canary_error_rate", 0.05, service="aleph", version="v04")
    prometheus.wait_for_value('envtest_canary_error_rate{service="aleph",version="v04"}', 0.05)


# --- the cluster in miniature: controller-manager, scheduler and kwok's nodes (envtest/workloads.py) ---------------

DEPLOYMENTS_PATH = "/apis/apps/v1/namespaces/{ns}/deployments"


def get(api: KubeHTTP, path: str) -> dict[str, Any]:
    status, body = api.request("GET", path)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


async def wait_for(what: str, probe: Any, *, timeout: float = 30.0) -> Any:
    """Poll a synchronous probe without blocking the loop for long; fail with the last value it returned."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


async def test_a_deployment_becomes_available_by_itself(admin_http: KubeHTTP, namespace: str) -> None:
    started = time.monotonic()
    apply_all(admin_http, namespace, [deployment("aleph-v04", "v04")])
    path = DEPLOYMENTS_PATH.format(ns=namespace) + "/aleph-v04"
    ready = await wait_for("aleph-v04 available", lambda: rolled_out(d := get(admin_http, path)) and d)
    print(f"Deployment available {time.monotonic() - started:.2f}s after it was applied")
    assert condition(ready, "Available")["status"] == "True"
    assert condition(ready, "Progressing")["reason"] == "NewReplicaSetAvailable"
    # Through a ReplicaSet and a Pod that the scheduler put on one of kwok's nodes, Running and Ready.
    (replica_set,) = get(admin_http, f"/apis/apps/v1/namespaces/{namespace}/replicasets")["items"]
    assert replica_set["metadata"]["ownerReferences"][0]["name"] == "aleph-v04"
    (pod,) = get(admin_http, f"/api/v1/namespaces/{namespace}/pods")["items"]
    assert pod["metadata"]["ownerReferences"][0]["name"] == replica_set["metadata"]["name"]
    assert pod["spec"]["nodeName"] in NODE_NAMES
    assert pod["status"]["phase"] == "Running"
    assert condition(pod, "Ready")["status"] == "True"


async def test_never_ready_pods_end_in_progress_deadline_exceeded(admin_http: KubeHTTP, namespace: str) -> None:
    apply_all(admin_http, namespace, [deployment("aleph-v04", "v04", pods=NEVER_READY, progress_deadline=1)])
    path = DEPLOYMENTS_PATH.format(ns=namespace) + "/aleph-v04"
    stuck = await wait_for(
        "ProgressDeadlineExceeded",
        lambda: condition(d := get(admin_http, path), "Progressing").get("reason") == "ProgressDeadlineExceeded" and d,
    )
    assert condition(stuck, "Progressing")["status"] == "False"
    assert "has timed out progressing" in condition(stuck, "Progressing")["message"]
    assert condition(stuck, "Available")["status"] == "False"
    assert stuck["status"].get("availableReplicas", 0) == 0
    (pod,) = get(admin_http, f"/api/v1/namespaces/{namespace}/pods")["items"]
    assert pod["status"]["phase"] == "Running"
    ready = condition(pod, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ContainersNotReady")
    assert ready["message"] == "containers with unready status: [aleph]"
    # birdwatch's reading of the same status carries the controller's own words.
    ok, why = deployment_available(stuck)
    assert not ok
    assert "0/1 replicas available, 1/1 updated; ProgressDeadlineExceeded: ReplicaSet" in why


async def test_crashing_pods_are_ready_then_not(admin_http: KubeHTTP, namespace: str) -> None:
    crashing = deployment("aleph-v04", "v04", pods=CRASH)
    crashing["spec"]["template"]["metadata"]["annotations"] = {CRASH_AFTER: "2s"}
    apply_all(admin_http, namespace, [crashing])
    path = DEPLOYMENTS_PATH.format(ns=namespace) + "/aleph-v04"
    await wait_for("aleph-v04 available", lambda: rolled_out(get(admin_http, path)))
    down = await wait_for(
        "aleph-v04 unavailable after the crash",
        lambda: (d := get(admin_http, path))["status"].get("availableReplicas", 0) == 0 and d,
    )
    assert condition(down, "Available")["status"] == "False"
    ok, why = deployment_available(down)
    assert not ok
    assert "0/1 replicas available, 1/1 updated, 1 unavailable" in why
    assert "MinimumReplicasUnavailable" in why
    (pod,) = get(admin_http, f"/api/v1/namespaces/{namespace}/pods")["items"]
    (container,) = pod["status"]["containerStatuses"]
    assert container["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert container["restartCount"] == 1


async def test_a_surge_shows_old_replicas_until_they_are_gone(admin_http: KubeHTTP, namespace: str) -> None:
    # A new template whose pods never get ready: the controller surges one new pod beside the old, available one.
    # availableReplicas stays 1 (the old pod) while the new one is unavailable: not available to birdwatch.
    apply_all(admin_http, namespace, [deployment("aleph-v04", "v04")])
    path = DEPLOYMENTS_PATH.format(ns=namespace) + "/aleph-v04"
    await wait_for("aleph-v04 available", lambda: rolled_out(get(admin_http, path)))
    status, body = admin_http.request(
        "PATCH",
        path,
        {"spec": {"template": {"metadata": {"labels": {POD_BEHAVIOUR: NEVER_READY}}}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    surging = await wait_for(
        "the surge",
        lambda: (
            (d := get(admin_http, path))["status"].get("replicas") == 2
            and d["status"].get("updatedReplicas") == 1
            and d["status"]["observedGeneration"] == d["metadata"]["generation"]
            and d
        ),
    )
    assert surging["status"]["availableReplicas"] == 1
    ok, why = deployment_available(surging)
    assert not ok, why
    assert "1 old replica pending termination" in why
    assert "1 unavailable" in why


async def test_deleting_a_namespace_deletes_what_is_in_it(admin_http: KubeHTTP) -> None:
    name = f"doomed-{uuid.uuid4().hex[:6]}"
    admin_http.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    apply_all(admin_http, name, [deployment("aleph-v04", "v04"), virtual_service("aleph", route(100, 0))])
    await wait_for(
        "aleph-v04 available", lambda: rolled_out(get(admin_http, DEPLOYMENTS_PATH.format(ns=name) + "/aleph-v04"))
    )
    status, _ = admin_http.request("DELETE", f"/api/v1/namespaces/{name}")
    assert status == 200
    await wait_for(
        "the namespace gone", lambda: admin_http.request("GET", f"/api/v1/namespaces/{name}")[0] == 404, timeout=60
    )
    for path in (
        f"/api/v1/namespaces/{name}/pods",
        f"/apis/apps/v1/namespaces/{name}/replicasets",
        f"/apis/networking.istio.io/v1/namespaces/{name}/virtualservices",
    ):
        assert get(admin_http, path)["items"] == [], path


def test_a_component_that_exits_while_starting_is_started_once_more(admin_http: KubeHTTP, tmp_path: Path) -> None:
    """The workloads' start survives one early exit of a component (kube-controller-manager has been seen to exit
    once, saying "Unauthorized"): it is started again, both runs' output in its one log."""
    marker = tmp_path / "ran-once"
    flaky = Server(
        "flaky",
        [
            "sh",
            "-c",
            f"if [ -e {marker} ]; then echo second run; exec sleep 60; fi; touch {marker}; echo first; exit 1",
        ],
        tmp_path / "flaky.log",
    )
    flaky.start()
    deadline = time.monotonic() + 10
    while flaky.alive():
        assert time.monotonic() < deadline, "the first run did not exit"
        time.sleep(0.05)
    workloads = Workloads([flaky])
    try:
        workloads.wait_ready(admin_http, timeout=10)
        assert workloads.restarted == {"flaky"}
        assert flaky.alive()
        deadline = time.monotonic() + 10
        while "second run" not in flaky.log.read_text():
            assert time.monotonic() < deadline, flaky.tail()
            time.sleep(0.05)
        assert flaky.log.read_text().splitlines() == ["first", "second run"]
    finally:
        flaky.stop()


def service(name: str, cluster_ip: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def test_the_service_range_is_wide_enough_for_a_service_per_canary(admin_http: KubeHTTP, namespace: str) -> None:
    """A /16: the 1,000 canaries of the largest bench could each have a Service (a /24 held 254)."""
    network = ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE)
    assert network.num_addresses >= 2**16
    # An address beyond what the old 10.0.0.0/24 held, and one the allocator picks.
    apply_all(admin_http, namespace, [service("aleph", cluster_ip="10.0.200.7"), service("beth")])
    path = f"/api/v1/namespaces/{namespace}/services"
    assert get(admin_http, f"{path}/aleph")["spec"]["clusterIP"] == "10.0.200.7"
    assert ipaddress.ip_address(get(admin_http, f"{path}/beth")["spec"]["clusterIP"]) in network
    # The "kubernetes" Service has the range's first address, which the serving certificate names.
    kubernetes = get(admin_http, "/api/v1/namespaces/default/services/kubernetes")
    assert kubernetes["spec"]["clusterIP"] == str(next(network.hosts()))


def test_the_api_servers_profiling_is_on_only_when_asked(control_plane: ControlPlane, admin_http: KubeHTTP) -> None:
    status, _ = admin_http.fetch("/debug/pprof/")
    assert status == (200 if control_plane.profiling else 404)


@pytest.mark.parametrize(("value", "wanted"), [("1", True), ("true", True), ("", False), ("0", False)])
def test_profiling_is_asked_for_by_environment(monkeypatch: pytest.MonkeyPatch, value: str, wanted: bool) -> None:
    monkeypatch.setenv(PROFILING_ENV, value)
    assert profiling_wanted() is wanted
