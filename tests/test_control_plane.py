"""The harness really is a Kubernetes API server, Istio's schemas and a Prometheus: each enforces its rules."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from envtest.controlplane import KubeHTTP
from envtest.exporter import Exporter
from envtest.promserver import PrometheusServer

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
