"""Shards: several birdwatch instances share the BirdWatches by label (``--label-selector``), as Flux's controllers
shard, each electing its leader on a Lease of its own. On the real API server: each BirdWatch is carried out by
exactly one shard (the ``reportingInstance`` of every Event on it, the series on each shard's /metrics), the other
never moves its weights; a BirdWatch relabelled to another shard mid-rollout is let go by the first without a
touch to traffic and resumed by the second from the record on its VirtualService; two shards' BirdWatches cannot
take one VirtualService from each other; a selector the API server cannot parse stops birdwatch at start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import structlog

from birdwatch.kube import BIRDWATCHES, LEASES, KubeError
from birdwatch.leader import SELECTOR_ANNOTATION
from birdwatch.runner import App
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import (
    Cluster,
    apply_all,
    birdwatch,
    controller,
    deployment,
    destination_rule,
    eventually,
    settings,
    virtual_service,
    wait_available,
)
from process import TrafficLog, http_get, parse_metrics, run_cli

SHARD = "birdwatch.otomato.link/shard"
ONLY_A = f"{SHARD}=a"
ONLY_B = f"{SHARD}=b"
MAIN = f"!{SHARD}"  # the main instance: every BirdWatch that names no shard
INCREMENT = 10
Obj = dict[str, Any]


def service(name: str) -> list[Obj]:
    """A service as a user has it before a canary: v03 and v04 Deployments, DestinationRule, VirtualService."""
    return [
        deployment(f"{name}-v03", "v03", app=name),
        deployment(f"{name}-v04", "v04", app=name),
        destination_rule(name, {"production": "v03", "canary": "v04"}),
        virtual_service(name, {"production": 100, "canary": 0}),
    ]


def services(admin: KubeHTTP, namespace: str, names: Sequence[str]) -> None:
    apply_all(admin, namespace, [obj for name in names for obj in service(name)])
    wait_available(admin, namespace, *(f"{n}-{v}" for n in names for v in ("v03", "v04")))


def labelled(name: str, shard: str | None, **spec: Any) -> Obj:
    obj = birdwatch(name, service=name, metric="vector(0)", increment=INCREMENT, **spec)
    if shard is not None:
        obj["metadata"]["labels"] = {SHARD: shard}
    return obj


def a_ladder(steps: list[int]) -> bool:
    """0, 10, 20, ... 100 by one increment a step, none doubled, none undone, none skipped; then 0 again, the
    promotion of named subsets (production points at the canary's version and has all the traffic)."""
    return steps == [*range(0, 101, INCREMENT), 0]


async def instances(cluster: Cluster, name: str) -> dict[str, str]:
    """Each Event's reason and the instance that reported it (``kubectl get events -o
    custom-columns=REASON:.reason,INSTANCE:.reportingInstance``); every reason here is posted once per rollout."""
    return {e["reason"]: e.get("reportingInstance", "") for e in await cluster.events(name)}


async def series(app: App) -> set[str]:
    """The BirdWatches a shard's /metrics has a weight for."""
    assert app.health is not None
    status, text = await http_get(f"http://127.0.0.1:{app.health.port}/metrics")
    assert status == 200
    return {s.labels["birdwatch"] for s in parse_metrics(text) if s.name == "birdwatch_canary_weight"}


class Shards:
    """This test's namespace, and birdwatch instances running in this event loop with a selector each."""

    def __init__(self, cluster: Cluster, admin: KubeHTTP, plane: ControlPlane, prometheus: PrometheusServer) -> None:
        self.cluster, self.admin, self.plane, self.prometheus = cluster, admin, plane, prometheus
        self.ns = cluster.namespace

    def run(
        self, identity: str, selector: str, *, lease: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[App]:
        return controller(
            self.plane,
            prometheus_url=self.prometheus.url,
            namespaces=[self.ns],
            extra=self.args(identity, selector, lease),
        )

    def args(self, identity: str, selector: str, lease: str | None) -> list[str]:
        extra = ["--label-selector", selector, "--leader-elect-identity", identity]
        if lease is not None:
            extra += [
                "--leader-elect",
                "--leader-elect-name",
                lease,
                "--leader-elect-namespace",
                self.ns,
                "--lease-duration",
                "4",
                "--renew-deadline",
                "3",
                "--retry-period",
                "0.5",
            ]
        return extra

    @contextlib.asynccontextmanager
    async def two(
        self, a: tuple[str, str, str | None], b: tuple[str, str, str | None]
    ) -> AsyncIterator[tuple[App, App]]:
        async with self.run(a[0], a[1], lease=a[2]) as first, self.run(b[0], b[1], lease=b[2]) as second:
            yield first, second


@pytest.fixture
def shards(cluster: Cluster, admin_http: KubeHTTP, control_plane: ControlPlane, prometheus: PrometheusServer) -> Shards:
    return Shards(cluster, admin_http, control_plane, prometheus)


async def test_a_watch_with_a_label_selector_sees_a_relabelled_birdwatch_leave_and_come_back(
    shards: Shards, cluster: Cluster
) -> None:
    """What the shards rely on, asked of the API server itself: an object that stops matching the selector comes
    to that watch as DELETED, one that starts to match as ADDED. The DELETED carries the object as it was before
    (still labelled for this shard): a shard cannot tell a relabel from a deletion, and need not."""
    kube = cluster.kube

    async def listed() -> str | None:
        try:
            return (await kube.list(BIRDWATCHES, shards.ns, label_selector=ONLY_A))[1]
        except KubeError as exc:  # 429 "storage is (re)initializing" while a fresh API server warms its cache
            if exc.status != 429:
                raise
            return None

    rv: str = await eventually(listed, what="a LIST")
    seen: list[tuple[str, str | None]] = []

    async def follow() -> None:
        resource_version = rv
        while True:
            try:
                async for event in kube.watch(
                    BIRDWATCHES, shards.ns, resource_version=resource_version, label_selector=ONLY_A
                ):
                    resource_version = event.object["metadata"].get("resourceVersion") or resource_version
                    if event.type != "BOOKMARK":
                        seen.append((event.type, (event.object["metadata"].get("labels") or {}).get(SHARD)))
            except KubeError as exc:  # 429, as above
                if exc.status != 429:
                    raise
                await asyncio.sleep(0.1)

    task = asyncio.create_task(follow())
    try:
        await cluster.create_bw(labelled("moving", "a"))
        await cluster.create_bw(labelled("elsewhere", "b"))
        await eventually(lambda: asyncio.sleep(0, seen == [("ADDED", "a")]), what="ADDED")
        await kube.merge_patch(BIRDWATCHES, shards.ns, "moving", {"metadata": {"labels": {SHARD: "b"}}})
        await eventually(lambda: asyncio.sleep(0, len(seen) == 2), what="the relabel")
        await kube.merge_patch(BIRDWATCHES, shards.ns, "moving", {"metadata": {"labels": {SHARD: "a"}}})
        await eventually(lambda: asyncio.sleep(0, len(seen) == 3), what="the way back")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert seen == [("ADDED", "a"), ("DELETED", "a"), ("ADDED", "a")], seen


async def test_two_shards_each_carry_out_exactly_their_own_birdwatches(shards: Shards, cluster: Cluster) -> None:
    ours, mains = ["a1", "a2", "a3"], ["m1", "m2", "m3"]
    services(shards.admin, shards.ns, ours + mains)
    async with (
        TrafficLog(cluster.kube, shards.ns).running() as traffic,
        shards.two(("shard-a", ONLY_A, "bw-shard-a"), ("main", MAIN, "bw-main")) as (shard_a, main),
    ):
        for name in ours:
            await cluster.create_bw(labelled(name, "a"))
        for name in mains:
            await cluster.create_bw(labelled(name, None))
        for name in ours + mains:
            await cluster.wait_phase("Promoted", name)

        for name in ours + mains:
            writer = "shard-a" if name in ours else "main"
            reported = await instances(cluster, name)
            assert reported.keys() >= {"RolloutStarted", "Promoted"}, (name, reported)
            assert set(reported.values()) == {writer}, (name, reported)
            assert a_ladder(traffic.weights(name)), (name, traffic.weights(name))
        assert await series(shard_a) == set(ours)
        assert await series(main) == set(mains)
        # Each shard elected its leader on a Lease of its own, which says which shard it serves.
        held = {
            x["metadata"]["name"]: (x["spec"].get("holderIdentity"), x["metadata"]["annotations"][SELECTOR_ANNOTATION])
            for x in (await cluster.kube.list(LEASES, shards.ns))[0]
        }
        assert held == {"bw-shard-a": ("shard-a", ONLY_A), "bw-main": ("main", MAIN)}


async def test_a_birdwatch_relabelled_mid_rollout_is_handed_over_and_resumed_from_its_record(
    shards: Shards, cluster: Cluster
) -> None:
    services(shards.admin, shards.ns, ["aleph"])
    async with (
        TrafficLog(cluster.kube, shards.ns).running() as traffic,
        shards.two(("shard-a", ONLY_A, None), ("shard-b", ONLY_B, None)) as (shard_a, shard_b),
    ):
        await cluster.create_bw(labelled("aleph", "a", interval=2))
        await traffic.wait_weight("aleph", 30)
        before = await cluster.status("aleph")
        assert await series(shard_a) == {"aleph"}
        await cluster.kube.merge_patch(BIRDWATCHES, shards.ns, "aleph", {"metadata": {"labels": {SHARD: "b"}}})

        # Shard a let it go (its series are gone with it); shard b carries it on to the end.
        await eventually(lambda: _without(shard_a, "aleph"), timeout=10, what="shard a to forget aleph")
        status = await cluster.wait_phase("Promoted", "aleph")
        assert await series(shard_b) == {"aleph"}

    # The same rollout, never restarted: one ladder of single increments, the baseline taken once.
    assert a_ladder(traffic.weights("aleph")), traffic.weights("aleph")
    assert status["baseline"] == before["baseline"]
    events = await cluster.events("aleph")
    by_reason = {e["reason"]: e.get("reportingInstance") for e in events}
    assert [e["reason"] for e in events].count("RolloutStarted") == 1, [e["reason"] for e in events]
    assert by_reason["RolloutStarted"] == "shard-a"
    assert by_reason["Promoted"] == "shard-b"
    assert {e.get("reportingInstance") for e in events} == {"shard-a", "shard-b"}


async def _without(app: App, name: str) -> bool:
    return name not in await series(app)


async def test_a_virtualservice_held_by_another_shards_rollout_is_not_taken(shards: Shards, cluster: Cluster) -> None:
    """The main instance does not know shard a's BirdWatches, yet it must not read their claim as stale."""
    services(shards.admin, shards.ns, ["aleph"])
    async with (
        TrafficLog(cluster.kube, shards.ns).running() as traffic,
        shards.two(("shard-a", ONLY_A, None), ("main", MAIN, None)),
    ):
        await cluster.create_bw(labelled("aleph", "a", interval=2))
        await traffic.wait_weight("aleph", 20)
        intruder = labelled("intruder", None)
        intruder["spec"]["service"] = "aleph"
        await cluster.create_bw(intruder)
        failed = await cluster.wait_phase("Failed", "intruder")
        assert "VirtualService aleph is already managed by BirdWatch aleph" in failed["message"], failed
        await cluster.wait_phase("Promoted", "aleph")
    assert a_ladder(traffic.weights("aleph")), traffic.weights("aleph")
    assert {e.get("reportingInstance") for e in await cluster.events("intruder")} == {"main"}


async def test_two_shards_given_one_lease_say_so(shards: Shards) -> None:
    """A mistake in the manifests: shard b was given shard a's Lease. It cannot work while a leads, and says why."""
    with structlog.testing.capture_logs() as logs:
        async with shards.run("shard-a", ONLY_A, lease="shared"):
            b = App(
                settings(
                    shards.plane,
                    prometheus_url=shards.prometheus.url,
                    namespaces=[shards.ns],
                    extra=shards.args("shard-b", ONLY_B, "shared"),
                )
            )
            task = asyncio.create_task(b.run())
            try:

                async def warned() -> list[Any]:
                    assert not task.done(), task
                    return [e for e in logs if e["event"].startswith("lease held by another shard")]

                (warning,) = await eventually(warned, timeout=10, what="shard b's warning")
            finally:
                b.stop()
                await asyncio.wait_for(task, 15)
    assert warning["log_level"] == "error"
    assert warning["event"] == "lease held by another shard; give each shard its own --leader-elect-name"
    assert (warning["holder"], warning["holder_label_selector"], warning["label_selector"]) == (
        "shard-a",
        ONLY_A,
        ONLY_B,
    )
    assert not b.watchers, "shard b never led"


def test_a_label_selector_the_api_server_cannot_parse_stops_birdwatch_at_start(
    control_plane: ControlPlane, prometheus: PrometheusServer
) -> None:
    done = run_cli(
        [
            "run",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--prometheus-url",
            prometheus.url,
            "--health-address",
            "off",
            "--log-format",
            "console",
            "--label-selector",
            "shard in (a",
        ]
    )
    assert done.code == 2, done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("birdwatch: error: --label-selector 'shard in (a': the API server refused it: "), line
    assert "unable to parse requirement" in line, line


def test_a_shard_under_leader_election_names_its_lease(control_plane: ControlPlane) -> None:
    base = ["run", "--kubeconfig", str(control_plane.kubeconfig), "--health-address", "off", "--log-format", "console"]
    done = run_cli([*base, "--leader-elect", "--label-selector", ONLY_A])
    assert done.code == 2, done
    assert "needs --leader-elect-name" in done.stderr, done
    assert "a Lease of its own" in done.stderr, done
    # The environment says the same as the flags.
    done = run_cli([*base, "--leader-elect"], env={"BIRDWATCH_LABEL_SELECTOR": ONLY_A})
    assert done.code == 2, done
    assert "--leader-elect-name" in done.stderr, done


def test_shard_settings_from_flags_and_environment() -> None:
    from birdwatch.cli import build_parser
    from birdwatch.config import settings_from

    def settings(argv: list[str], env: dict[str, str]) -> Any:
        return settings_from(build_parser(env).parse_args(["run", *argv]), env)

    plain = settings([], {})
    assert (plain.label_selector, plain.leader.name, plain.leader.label_selector) == (None, "birdwatch", "")
    env = {"BIRDWATCH_LABEL_SELECTOR": ONLY_A, "BIRDWATCH_LEADER_ELECT_NAME": "birdwatch-shard-a"}
    sharded = settings(["--leader-elect"], env)
    assert (sharded.label_selector, sharded.leader.name, sharded.leader.label_selector) == (
        ONLY_A,
        "birdwatch-shard-a",
        ONLY_A,
    )
    flags = settings(["--label-selector", MAIN, "--leader-elect", "--leader-elect-name", "birdwatch"], {})
    assert (flags.label_selector, flags.leader.name) == (MAIN, "birdwatch")
