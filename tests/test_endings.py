"""After the ending: re-applying the folder a release came from (a CI habit, a GitOps sync) puts production back on
the old version while the BirdWatch still says Promoted. birdwatch says so (a Warning Event, a status condition)
and says when it holds again; it never writes traffic itself. On the real API server."""

from __future__ import annotations

import pytest

from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import (
    Cluster,
    apply_all,
    birdwatch,
    controller,
    destination_rule,
    eventually,
    mesh,
    virtual_service,
)


def metric(namespace: str) -> str:
    return f'max(bwtest_errors{{ns="{namespace}"}})'


async def _condition(cluster: Cluster, state: str) -> dict[str, str] | None:
    for condition in (await cluster.status()).get("conditions") or []:
        if condition.get("type") == "EndingHolds" and condition.get("status") == state:
            return dict(condition)
    return None


@pytest.mark.parametrize("named", [True, False], ids=["named-subsets", "version-subsets"])
async def test_an_ending_undone_by_a_reapply_is_said_and_its_return_too(
    named: bool,
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    ns = cluster.namespace
    exporter.set_gauge("bwtest_errors", 0.0, ns=ns)
    prometheus.wait_for_value(metric(ns), 0.0)
    mesh(admin_http, ns, named=named)
    if named:
        as_in_git = [destination_rule("aleph", {"production": "v03", "canary": "v04"})]
        as_promoted = [destination_rule("aleph", {"production": "v04", "canary": "v04"})]
    else:
        as_in_git = [virtual_service("aleph", {"v03": 100, "v04": 0})]
        as_promoted = [virtual_service("aleph", {"v03": 0, "v04": 100})]
    async with controller(control_plane, prometheus_url=prometheus.url, namespaces=[ns]):
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), max_weight=20))
        await cluster.wait_phase("Promoted")
        vs_after = await cluster.vs()
        apply_all(admin_http, ns, as_in_git)  # the folder the release came from, applied again
        undone = await eventually(lambda: _condition(cluster, "False"), timeout=20, what="EndingHolds False")
        assert (await cluster.status())["phase"] == "Promoted"  # the record stays; a person decides
        apply_all(admin_http, ns, as_promoted)  # the promotion recorded where the objects come from
        restored = await eventually(lambda: _condition(cluster, "True"), timeout=20, what="EndingHolds True")
    assert undone["reason"] == "EndingUndone"
    if named:
        assert "production subset no longer selects version v04" in undone["message"]
        assert (await cluster.vs())["spec"] == vs_after["spec"]  # birdwatch wrote no traffic
    else:
        assert "version v04 has 0% of the traffic" in undone["message"]
    assert restored["reason"] == "EndingRestored"
    reasons = await cluster.reasons()
    assert reasons.count("EndingUndone") == 1
    assert "EndingRestored" in reasons
    # The phase's own conditions are still there beside it.
    types = {c["type"] for c in (await cluster.status())["conditions"]}
    assert types == {"Ready", "Progressing", "EndingHolds"}
