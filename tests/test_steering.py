"""People in the loop: pause, resume, promote, abort and retry, through the ``kubectl birdwatch`` plugin (the real
executable, with a kubeconfig, as a user runs it) and through plain annotations, also across a SIGKILL of
birdwatch between the request and the act. On the real API server; outputs and exit codes checked."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from birdwatch.kube import BIRDWATCHES
from birdwatch.updates import REQUEST_ANNOTATION
from birdwatch_sandbox import kit
from birdwatch_sandbox.envtest.assets import REPO
from birdwatch_sandbox.kit import (
    Cluster,
    account_kubeconfig,
    birdwatch,
    canary_steps,
    eventually,
    gauge_query,
    mesh,
)
from process import Fleet, clean_env

pytest_plugins = ("process",)

Obj = dict[str, Any]
PLUGIN = Path(sys.executable).with_name("kubectl-birdwatch")


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


async def plugin(*args: str, kubeconfig: Path, timeout: float = 60.0) -> Ran:
    """The real ``kubectl-birdwatch`` executable. Asynchronous, so the birdwatch in this event loop keeps working
    while it waits for birdwatch's answer."""
    proc = await asyncio.create_subprocess_exec(
        str(PLUGIN),
        *args,
        env=clean_env({"KUBECONFIG": str(kubeconfig)}),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


class Env(kit.Env):
    """The test's servers and namespace, and ``kubectl birdwatch`` run as a user runs it."""

    async def run(self, *args: str, kubeconfig: Path | None = None, timeout: float = 60.0) -> Ran:
        return await plugin(*args, "-n", self.ns, kubeconfig=kubeconfig or self.plane.kubeconfig, timeout=timeout)


@pytest.fixture
def env(env: kit.Env) -> Env:
    """conftest's, with the aleph mesh applied and a healthy metric."""
    steering = Env(**vars(env))
    mesh(steering.admin, steering.ns)
    steering.set_metric(0.0)
    return steering


async def _weight(cluster: Cluster) -> int:
    return int((await cluster.status()).get("canaryWeight") or 0)


async def _at_least(cluster: Cluster, weight: int) -> bool:
    return await _weight(cluster) >= weight


# --- the actions, through the plugin -------------------------------------------------------------------------------


async def test_pause_holds_the_weight_and_resume_goes_on(env: Env) -> None:
    async with env.controller(), env.cluster.recording() as history:
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=1, max_weight=50))
        await eventually(lambda: _at_least(env.cluster, 20), what="canary at 20%")
        paused = await env.run("pause", "aleph")
        assert paused.code == 0, paused
        assert "paused at" in paused.out
        status = await env.cluster.status()
        assert status["phase"] == "Paused"
        held = status["canaryWeight"]
        await asyncio.sleep(3)  # three intervals: no step, no check
        assert await _weight(env.cluster) == held
        assert (await env.cluster.weights())["canary"] == held
        got = await env.run("get")
        assert got.code == 0, got
        assert "Paused" in got.out, got.out
        assert f"{held}%" in got.out, got.out
        resumed = await env.run("resume", "aleph")
        assert resumed.code == 0, resumed
        final = await env.cluster.wait_phase("Promoted", timeout=60)
    steps = canary_steps(history, "canary")
    assert all(0 < b - a <= 10 for a, b in itertools.pairwise(steps[:-1])), steps  # the last: the promotion
    assert final["baseline"] == 0
    reasons = await env.cluster.reasons()
    assert reasons.count("RolloutStarted") == 1  # the same rollout, not a new one
    assert "Paused" in reasons


async def test_promote_finishes_now(env: Env) -> None:
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=30))
        await eventually(lambda: _at_least(env.cluster, 10), what="canary at 10%")
        ran = await env.run("promote", "aleph")
        status = await env.cluster.status()
    assert ran.code == 0, ran
    assert "done: promoted at 10%" in ran.out
    assert status["phase"] == "Promoted"
    assert status["request"]["result"] == "Done"
    assert await env.cluster.weights() == {"production": 100, "canary": 0}
    dr = await env.cluster.dr()
    assert {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]}["production"] == "v04"
    assert "PromoteRequested" in await env.cluster.reasons()


async def test_abort_rolls_back_now_and_retry_starts_over(env: Env) -> None:
    async with env.controller(), env.cluster.recording() as history:
        await env.cluster.create_bw(
            birdwatch("aleph", metric=gauge_query(env.ns), interval=2, max_weight=30, if_unhealthy="freeze")
        )
        await eventually(lambda: _at_least(env.cluster, 20), what="canary at 20%")
        aborted = await env.run("abort", "aleph")
        assert aborted.code == 0, aborted
        status = await env.cluster.status()
        assert status["phase"] == "RolledBack"
        assert status["reason"] == "Aborted"
        assert await env.cluster.weights() == {"production": 100, "canary": 0}
        again = await env.run("abort", "aleph")  # makes no sense now: refused, nothing changes
        assert again.code == 1, again
        assert "cannot abort a rollout that is RolledBack" in again.err
        env.set_metric(0.01)  # the retry takes a baseline of its own
        retried = await env.run("retry", "aleph")
        assert retried.code == 0, retried
        final = await env.cluster.wait_phase("Promoted", timeout=60)
    assert final["baseline"] == pytest.approx(0.01)
    steps = canary_steps(history, "canary")
    assert steps[:3] == [0, 10, 20], steps
    assert 0 in steps[3:], steps
    reasons = await env.cluster.reasons()
    assert reasons.count("AbortRequested") == 1
    assert reasons.count("RetryRequested") == 1
    assert reasons.count("RequestRefused") == 1


async def test_resume_from_frozen_keeps_the_baseline(env: Env) -> None:
    async with env.controller():
        await env.cluster.create_bw(
            birdwatch("aleph", metric=gauge_query(env.ns), interval=1, max_weight=40, if_unhealthy="freeze")
        )
        await eventually(lambda: _at_least(env.cluster, 20), what="canary at 20%")
        env.set_metric(1.0)
        frozen = await env.cluster.wait_phase("Frozen", timeout=30)
        env.set_metric(0.0)  # a person looked, fixed it
        ran = await env.run("resume", "aleph")
        assert ran.code == 0, ran
        final = await env.cluster.wait_phase("Promoted", timeout=60)
    assert final["baseline"] == frozen["baseline"] == 0
    assert "ResumeRequested" in await env.cluster.reasons()


async def test_status_watch_follows_a_rollout_to_its_end(env: Env) -> None:
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=1, max_weight=30))
        await env.cluster.wait_phase("Progressing")
        ran = await env.run("status", "aleph", "-w", timeout=60)
        shown = await env.run("status", "aleph")
    assert ran.code == 0, ran
    lines = ran.out.splitlines()
    assert any("[######" in line and "Progressing" in line for line in lines), ran.out  # 30 % drawn
    assert "Promoted" in lines[-2]
    assert "promoted to production" in lines[-1]
    assert shown.code == 0, shown
    assert "phase     Promoted" in shown.out, shown.out


async def test_plugin_errors_have_clear_exit_codes(env: Env, tmp_path: Path) -> None:
    missing = await env.run("promote", "nobody")
    assert missing.code == 3, missing
    assert f"BirdWatch nobody not found in namespace {env.ns}" in missing.err
    await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns)))
    unanswered = await env.run("promote", "aleph", "--timeout", "1")  # no birdwatch is running
    assert unanswered.code == 5, unanswered
    assert "no answer from birdwatch" in unanswered.err
    usage = await env.run("promote")
    assert usage.code == 2, usage
    viewer = account_kubeconfig(
        env.admin, env.plane, namespace=env.ns, name="viewer", folder=tmp_path, role=("ClusterRole", "view")
    )
    forbidden = await env.run("pause", "aleph", kubeconfig=viewer)
    assert forbidden.code == 4, forbidden
    assert "forbidden" in forbidden.err
    empty = await plugin("get", "-n", f"{env.ns}-none", kubeconfig=env.plane.kubeconfig)
    assert empty.code == 0, empty
    assert "No BirdWatches" in empty.out


async def test_the_operator_role_is_enough_to_steer(env: Env, tmp_path: Path) -> None:
    role = yaml.safe_load((REPO / "deploy" / "rbac-operator.yaml").read_text())
    env.admin.apply(role)
    operator = account_kubeconfig(
        env.admin,
        env.plane,
        namespace=env.ns,
        name="operator",
        folder=tmp_path,
        role=("ClusterRole", "birdwatch-operator"),
    )
    async with env.controller():
        await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(env.ns), interval=30))
        await eventually(lambda: _at_least(env.cluster, 10), what="canary at 10%")
        listed = await env.run("get", kubeconfig=operator)
        assert listed.code == 0, listed
        assert "aleph" in listed.out, listed.out
        paused = await env.run("pause", "aleph", kubeconfig=operator)
        assert paused.code == 0, paused
        promoted = await env.run("promote", "aleph", kubeconfig=operator)
        assert promoted.code == 0, promoted
    assert (await env.cluster.status())["phase"] == "Promoted"


# --- plain kubectl, and a SIGKILL between the request and the act ------------------------------------------------


async def _annotate(cluster: Cluster, value: str) -> None:
    await cluster.kube.merge_patch(
        BIRDWATCHES, cluster.namespace, "aleph", {"metadata": {"annotations": {REQUEST_ANNOTATION: value}}}
    )


async def test_a_request_made_while_birdwatch_is_down_is_acted_on_once(env: Env, fleet: Fleet) -> None:
    ns = env.ns
    first = fleet.start("first", namespace=ns)
    await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(ns), interval=2))
    await eventually(lambda: _at_least(env.cluster, 20), timeout=40, what="canary at 20%")
    first.kill()
    await first.wait(10)
    await _annotate(env.cluster, "abort")  # as `kubectl annotate bw aleph birdwatch.otomato.link/request=abort`
    second = fleet.start("second", namespace=ns)
    status = await env.cluster.wait_phase("RolledBack", timeout=40)
    assert status["reason"] == "Aborted"
    assert status["request"] == {
        "id": "abort",
        "action": "abort",
        "result": "Done",
        "message": status["request"]["message"],
    }
    vs = await env.cluster.vs()
    second.kill()
    await second.wait(10)
    third = fleet.start("third", namespace=ns)  # the annotation is still there: it must not be acted on again
    await third.wait_for("listed birdwatches")
    await asyncio.sleep(3)
    assert (await env.cluster.vs())["metadata"]["resourceVersion"] == vs["metadata"]["resourceVersion"]
    assert (await env.cluster.reasons()).count("AbortRequested") == 1
    # A retry asked for while birdwatch is killed again, and a new start takes it from there.
    third.kill()
    await third.wait(10)
    await _annotate(env.cluster, "retry")
    fleet.start("fourth", namespace=ns)
    await eventually(lambda: _acknowledged(env.cluster, "retry"), timeout=30, what="the retry acknowledged")
    await env.cluster.wait_phase("Promoted", timeout=60)
    assert (await env.cluster.reasons()).count("RetryRequested") == 1


async def test_sigkill_between_the_act_and_its_acknowledgement_does_not_act_twice(env: Env, fleet: Fleet) -> None:
    """The act's traffic write carries the request's id on its record: a birdwatch killed right after it finds the
    request done there and only acknowledges it."""
    ns = env.ns
    proc = fleet.start("bw", namespace=ns)
    await env.cluster.create_bw(birdwatch("aleph", metric=gauge_query(ns), interval=30))
    await eventually(lambda: _at_least(env.cluster, 10), timeout=40, what="canary at 10%")
    await _annotate(env.cluster, "promote/1")

    async def promoted_on_the_record() -> bool:
        note = (await env.cluster.vs())["metadata"].get("annotations", {}).get("birdwatch.otomato.link/rollout", "")
        return '"request":"promote/1"' in note

    await eventually(promoted_on_the_record, timeout=20, interval=0.01, what="the promotion on the record")
    proc.kill()  # as soon as the promotion is written, perhaps before its status
    await proc.wait(10)
    fleet.start("after", namespace=ns)
    status = await env.cluster.wait_phase("Promoted", timeout=30)
    await eventually(lambda: _acknowledged(env.cluster, "promote/1"), timeout=20, what="the request acknowledged")
    assert status["canaryWeight"] == 100
    assert (await env.cluster.reasons()).count("RequestRefused") == 0


async def _acknowledged(cluster: Cluster, value: str) -> bool:
    return ((await cluster.status()).get("request") or {}).get("id") == value


def test_the_plugin_is_on_path_for_kubectl() -> None:
    """kubectl finds plugins as executables named kubectl-<name> on PATH: the wheel installs one."""
    assert PLUGIN.exists()
    assert os.access(PLUGIN, os.X_OK)
