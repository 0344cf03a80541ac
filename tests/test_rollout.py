"""Whole rollouts on the real API server and Prometheus, seen as a user sees them: the VirtualService's weights
(recorded from its own watch), the DestinationRule, the BirdWatch's status, its Events and Slack messages."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from birdwatch.kube import DEPLOYMENTS
from birdwatch_sandbox.envtest.assets import REPO, Assets
from birdwatch_sandbox.kit import (
    Cluster,
    Env,
    birdwatch,
    canary_steps,
    deployment,
    destination_rule,
    eventually,
    fix_pods,
    gauge_query,
    mesh,
    rolled_out,
    virtual_service,
    wait_available,
)
from process import TrafficLog
from slackfake import FakeSlack


def rises_by(steps: list[int], increment: int) -> bool:
    return all(b - a == increment for a, b in itertools.pairwise(steps))


async def test_named_subsets_promote(env: Env) -> None:
    mesh(env.admin, env.ns, named=True)
    env.set_metric(0.1)
    async with env.controller(), env.cluster.recording() as history:
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), max_weight=30))
        status = await env.cluster.wait_phase("Promoted")
    assert status["baseline"] == pytest.approx(0.1)
    assert canary_steps(history, "canary") == [0, 10, 20, 30, 0]
    assert await env.cluster.weights() == {"production": 100, "canary": 0}
    dr = await env.cluster.dr()
    assert {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]} == {"production": "v04", "canary": "v04"}
    assert dr["spec"]["trafficPolicy"] == {"connectionPool": {"http": {"http1MaxPendingRequests": 100}}}
    assert status["canaryWeight"] == 100
    assert status["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "Progressing": "False"}
    reasons = await env.cluster.reasons()
    assert {"RolloutStarted", "Promoted"} <= set(reasons)
    # Per-step progress is in status, the log and notifications; Events are for the moments that change the story.
    assert "TrafficShifted" not in reasons
    vs = await env.cluster.vs()
    assert vs["metadata"]["labels"] == {"team": "aleph"}
    assert vs["metadata"]["annotations"]["owner"] == "aleph-team"
    primary = vs["spec"]["http"][0]
    assert primary["retries"] == {"attempts": 3, "perTryTimeout": "2s"}
    assert primary["timeout"] == "10s"


async def test_version_named_subsets_promote_and_other_routes_stay(env: Env) -> None:
    other = {
        "name": "admin",
        "match": [{"uri": {"prefix": "/admin"}}],
        "route": [{"destination": {"host": "admin", "subset": "v1"}}],
    }
    mesh(env.admin, env.ns, named=False, extra_routes=[other])
    async with env.controller(), env.cluster.recording() as history:
        # The canary's subset is missing from the DestinationRule: birdwatch adds it, copied from production's.
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), max_weight=20))
        await env.cluster.wait_phase("Promoted")
    assert canary_steps(history, "v04") == [0, 10, 20, 100]
    assert canary_steps(history, "v03") == [100, 90, 80, 0]
    vs = await env.cluster.vs()
    assert vs["spec"]["http"][0] == other
    assert await env.cluster.weights() == {"v03": 0, "v04": 100}


async def test_rollback_when_the_metric_turns_bad(env: Env) -> None:
    mesh(env.admin, env.ns)
    env.set_metric(0.0)
    async with FakeSlack(token="xoxb-test") as slack:
        async with (
            env.controller(env={"SLACK_API_TOKEN": "xoxb-test", "SLACK_API_URL": slack.base_url}),
            env.cluster.recording() as history,
        ):
            await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=2, deviation=0.2))
            await eventually(lambda: _weight_at_least(env.cluster, 20), what="canary at 20%")
            env.set_metric(0.9)
            status = await env.cluster.wait_phase("RolledBack")
        messages = await slack.wait_for_messages(3)
    steps = canary_steps(history, "canary")
    assert steps[-1] == 0
    assert rises_by(steps[:-1], 10)
    assert 20 <= max(steps) < 100
    assert await env.cluster.weights() == {"production": 100, "canary": 0}
    assert status["canaryWeight"] == 0
    assert status["lastValue"] == pytest.approx(0.9)
    assert "more than the allowed 0.2" in status["message"]
    reasons = await env.cluster.reasons()
    assert {"CanaryUnhealthy", "RolledBack"} <= set(reasons)
    texts = [m.text or "" for m in messages]
    assert all(m.channel == "deployment" for m in messages)
    assert any("v04" in t and "rolled back" in t.lower() for t in texts), texts


async def test_freeze_keeps_the_split(env: Env) -> None:
    mesh(env.admin, env.ns)
    env.set_metric(0.0)
    async with env.controller(), env.cluster.recording() as history:
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=2, if_unhealthy="freeze"))
        await eventually(lambda: _weight_at_least(env.cluster, 20), what="canary at 20%")
        env.set_metric(5.0)
        status = await env.cluster.wait_phase("Frozen")
    steps = canary_steps(history, "canary")
    assert rises_by(steps, 10)
    frozen = steps[-1]
    assert frozen >= 20
    assert await env.cluster.weights() == {"production": 100 - frozen, "canary": frozen}
    assert status["canaryWeight"] == frozen
    assert "Frozen" in await env.cluster.reasons()


async def test_failure_threshold_tolerates_a_flap(env: Env) -> None:
    mesh(env.admin, env.ns)
    env.set_metric(0.0)
    async with env.controller(), env.cluster.recording() as history:
        await env.cluster.create_bw(
            birdwatch("aleph", metric=gauge_query(env.ns), interval=2, failure_threshold=3, max_weight=30)
        )
        await eventually(lambda: _weight_at_least(env.cluster, 10), what="canary at 10%")
        env.set_metric(1.0)
        await eventually(lambda: _failed_checks(env.cluster, 1), what="a failed check")
        env.set_metric(0.0)
        status = await env.cluster.wait_phase("Promoted", timeout=60)
    steps = canary_steps(history, "canary")
    assert steps == [0, 10, 20, 30, 0] or rises_by(steps[:-1], 10)
    assert status["failedChecks"] == 0
    assert "CheckFailed" in await env.cluster.reasons()


async def test_failure_threshold_then_rollback(env: Env) -> None:
    mesh(env.admin, env.ns)
    env.set_metric(0.0)
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=1, failure_threshold=2))
        await eventually(lambda: _weight_at_least(env.cluster, 10), what="canary at 10%")
        env.set_metric(1.0)
        status = await env.cluster.wait_phase("RolledBack")
    assert status["failedChecks"] == 2
    assert (await env.cluster.reasons()).count("CheckFailed") == 1


@pytest.mark.parametrize(
    ("direction", "baseline", "later", "phase"),
    [
        ("increase", 1.0, 2.0, "RolledBack"),
        ("increase", 1.0, 0.0, "Promoted"),
        ("decrease", 1.0, 0.0, "RolledBack"),
        ("decrease", 1.0, 2.0, "Promoted"),
        ("either", 1.0, 0.0, "RolledBack"),
        ("either", 1.0, 2.0, "RolledBack"),
    ],
)
async def test_deviation_direction(env: Env, direction: str, baseline: float, later: float, phase: str) -> None:
    mesh(env.admin, env.ns)
    env.set_metric(baseline)
    async with env.controller():
        await env.cluster.create_bw(
            birdwatch(
                "aleph",
                metric=gauge_query(env.ns),
                interval=2,
                deviation=0.5,
                deviation_direction=direction,
                max_weight=30,
            )
        )
        await eventually(lambda: _baseline_taken(env.cluster), what="baseline")
        env.set_metric(later)
        status = await env.cluster.wait_phase(phase)
    assert status["baseline"] == pytest.approx(baseline)


@pytest.mark.parametrize(("no_data", "phase", "weight"), [("zero", "Promoted", 100), ("fail", "Failed", 0)])
async def test_no_data_zero_and_fail(env: Env, no_data: str, phase: str, weight: int) -> None:
    mesh(env.admin, env.ns)
    async with env.controller():
        await env.cluster.create_bw(
            birdwatch("aleph", metric=gauge_query(env.ns, "absent"), no_data=no_data, max_weight=20)
        )
        status = await env.cluster.wait_phase(phase)
    assert status["canaryWeight"] == weight
    if no_data == "fail":
        assert "no data" in status["message"]
        assert await env.cluster.weights() == {"production": 100, "canary": 0}
    else:
        assert status["baseline"] == 0


async def test_no_data_skip_holds_then_acts(env: Env) -> None:
    mesh(env.admin, env.ns)
    env.set_metric(0.0, "flaky")
    async with env.controller(), env.cluster.recording() as history:
        await env.cluster.create_bw(
            birdwatch("aleph", metric=gauge_query(env.ns, "flaky"), no_data="skip", interval=1, failure_threshold=2)
        )
        await eventually(lambda: _weight_at_least(env.cluster, 10), what="canary at 10%")
        env.exporter.remove("bwtest_flaky", ns=env.ns)
        status = await env.cluster.wait_phase("RolledBack", timeout=60)
    steps = canary_steps(history, "canary")
    assert steps[-1] == 0
    assert rises_by(steps[:-1], 10)
    assert "no data for 3 checks in a row" in status["message"]


async def test_bad_promql_fails_and_leaves_traffic(env: Env) -> None:
    mesh(env.admin, env.ns)
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric="sum(rate(http_requests_total[5m]"))
        status = await env.cluster.wait_phase("Failed")
    assert "Prometheus rejected the metric query" in status["message"]
    assert "parse error" in status["message"]
    assert await env.cluster.weights() == {"production": 100, "canary": 0}
    assert "BadQuery" in await env.cluster.reasons()


async def test_canary_never_ready_times_out(env: Env) -> None:
    # The canary's pods run but never pass readiness; after its short progressDeadlineSeconds the Deployment
    # controller itself gives up on the rollout, and birdwatch's messages carry its words.
    mesh(env.admin, env.ns, ready=False, progress_deadline=1)

    async def deadline_exceeded() -> bool:
        status = (await env.cluster.kube.get(DEPLOYMENTS, env.ns, "aleph-v04")).get("status") or {}
        return any(c.get("reason") == "ProgressDeadlineExceeded" for c in status.get("conditions") or [])

    await eventually(deadline_exceeded, what="the Deployment controller's ProgressDeadlineExceeded")
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), ready_timeout=2))
        waiting = await env.cluster.wait_phase("Waiting")
        status = await env.cluster.wait_phase("RolledBack")
    assert "aleph-v04: 0/1 replicas available, 1/1 updated" in waiting["message"]
    assert "not available after ready_timeout 2s" in status["message"]
    assert "ProgressDeadlineExceeded" in status["message"]
    assert 'ReplicaSet "aleph-v04-' in status["message"]
    assert "has timed out progressing" in status["message"]
    assert await env.cluster.weights() == {"production": 100, "canary": 0}


async def test_waits_for_the_canary_then_goes(env: Env) -> None:
    # Waiting -> Progressing is driven by the Deployment controller: the fixed pod template is rolled out as a new
    # ReplicaSet, and only once its pod is Ready and the old one gone is the canary available.
    mesh(env.admin, env.ns, ready=False)
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), max_weight=10))
        waiting = await env.cluster.wait_phase("Waiting")
        assert await env.cluster.weights() == {"production": 100, "canary": 0}
        fix_pods(env.admin, env.ns, "aleph-v04")
        await env.cluster.wait_phase("Promoted")
    assert "MinimumReplicasUnavailable: Deployment does not have minimum availability." in waiting["message"]


async def test_two_canaries_at_once_with_their_own_intervals(env: Env) -> None:
    mesh(env.admin, env.ns)
    env.admin.apply(
        {
            **deployment("beth-v2", "v2", app="beth"),
            "metadata": {"name": "beth-v2", "namespace": env.ns, "labels": {"app": "beth", "version": "v2"}},
        }
    )
    wait_available(env.admin, env.ns, "beth-v2")
    for obj in (
        destination_rule("beth", {"production": "v1", "canary": "v2"}),
        virtual_service("beth", {"production": 100, "canary": 0}),
    ):
        env.admin.apply({**obj, "metadata": {**obj["metadata"], "namespace": env.ns}})
    async with TrafficLog(env.cluster.kube, env.ns).running() as traffic, env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=1, max_weight=40))
        await env.cluster.create_bw(
            birdwatch(
                "beth", service="beth", canary_version="v2", metric=gauge_query(env.ns), interval=3, max_weight=20
            )
        )
        await env.cluster.wait_phase("Promoted", "aleph")
        await env.cluster.wait_phase("Promoted", "beth")
    fast = _step_times(traffic, "aleph")
    slow = _step_times(traffic, "beth")
    assert len(fast) == 4
    assert len(slow) == 2
    # Each keeps its own interval (the step times its record carries); neither waited for the other.
    assert all(1 <= b - a <= 2 for a, b in itertools.pairwise(fast))
    assert all(3 <= b - a <= 4 for a, b in itertools.pairwise(slow))
    assert slow[0] <= fast[1]


async def test_spec_change_mid_rollout(env: Env) -> None:
    mesh(env.admin, env.ns, versions=("v03", "v04", "v05"))
    async with env.controller(), env.cluster.recording() as history:
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=2))
        await eventually(lambda: _weight_at_least(env.cluster, 20), what="canary at 20%")
        await env.cluster.patch_bw_spec("aleph", {"canary_version": "v05", "max_weight": 20})
        status = await env.cluster.wait_phase("Promoted")
    steps = canary_steps(history, "canary")
    back = steps.index(0, 1)
    assert rises_by(steps[:back], 10)
    assert steps[back:] == [0, 10, 20, 0]
    assert status["observedGeneration"] == 2
    dr = await env.cluster.dr()
    assert {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]} == {"production": "v05", "canary": "v05"}
    assert "TrafficReset" in await env.cluster.reasons()


async def test_second_birdwatch_on_the_same_service_fails(env: Env) -> None:
    mesh(env.admin, env.ns)
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=3))
        await eventually(lambda: _weight_at_least(env.cluster, 10), what="first canary stepping")
        await env.cluster.create_bw(birdwatch("aleph-again", metric=gauge_query(env.ns), interval=3))
        status = await env.cluster.wait_phase("Failed", "aleph-again")
        first = await env.cluster.status("aleph")
    assert status["message"] == "VirtualService aleph is already managed by BirdWatch aleph"
    assert first["phase"] == "Progressing"


async def test_resume_after_restart_continues_the_same_rollout(env: Env) -> None:
    mesh(env.admin, env.ns)
    env.set_metric(0.25)
    async with env.cluster.recording() as history:
        async with env.controller():
            await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=2, max_weight=50))
            await eventually(lambda: _weight_at_least(env.cluster, 20), what="canary at 20%")
        stopped_at = (await env.cluster.status())["canaryWeight"]
        env.set_metric(0.5)  # a new baseline would now read 0.5; the resumed rollout must keep 0.25
        await asyncio.sleep(1)
        async with env.controller():
            status = await env.cluster.wait_phase("Promoted")
    steps = canary_steps(history, "canary")
    assert steps == [0, 10, 20, 30, 40, 50, 0]
    assert stopped_at >= 20
    assert status["baseline"] == pytest.approx(0.25)
    assert (await env.cluster.reasons()).count("RolloutStarted") == 1  # the same rollout, resumed


# --- small probes -----------------------------------------------------------------------------------------------


def _vs(ns: str) -> tuple[object, str, str]:
    from birdwatch.kube import VIRTUALSERVICES

    return VIRTUALSERVICES, ns, "aleph"


def _dr(ns: str) -> tuple[object, str, str]:
    from birdwatch.kube import DESTINATIONRULES

    return DESTINATIONRULES, ns, "aleph"


async def _weight_at_least(cluster: Cluster, weight: int) -> bool:
    return int((await cluster.status()).get("canaryWeight", 0)) >= weight


async def _failed_checks(cluster: Cluster, n: int) -> bool:
    return int((await cluster.status()).get("failedChecks", 0)) >= n


def _step_times(traffic: TrafficLog, name: str) -> list[float]:
    """When each step up was written, from the record written with it."""
    from birdwatch.status import parse_time

    return [
        parse_time(step.record.step_time) or 0.0
        for step in traffic.steps.get(name, [])
        if step.weight > 0 and step.record is not None and step.record.step_time and not step.record.done
    ]


async def _baseline_taken(cluster: Cluster) -> bool:
    return (await cluster.status()).get("baseline") is not None


async def test_the_example_applied_with_kubectl_waits_for_its_deployments_then_goes(
    env: Env, assets: Assets, tmp_path: Path
) -> None:
    # Everything but the Deployments first: the BirdWatch waits for a canary that does not exist yet. Then the
    # Deployments, as `kubectl apply` sends them, become available with no help (controller-manager, scheduler and
    # kwok's nodes), and that is what moves the rollout on.
    assert assets.kubectl is not None
    example = REPO / "deploy" / "examples" / "aleph"
    kubectl = [str(assets.kubectl), "--kubeconfig", str(env.plane.kubeconfig), "-n", env.ns]
    deployments = sorted(example.glob("deployment-*.yaml"))
    rest = sorted(set(example.glob("*.yaml")) - set(deployments))
    async with env.controller():
        await _kubectl(*kubectl, "apply", *(a for path in rest for a in ("-f", str(path))))
        waiting = await env.cluster.wait_phase("Waiting")
        assert "no Deployment labelled version=v04" in waiting["message"]
        await _kubectl(*kubectl, "apply", *(a for path in deployments for a in ("-f", str(path))))
        await env.cluster.wait_phase("Progressing", timeout=30)
    for name in ("aleph-v03", "aleph-v04"):
        assert rolled_out(await env.cluster.kube.get(DEPLOYMENTS, env.ns, name))


async def _kubectl(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()
