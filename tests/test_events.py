"""Kubernetes Events as ``kubectl describe bw`` shows them, on the real API server: in the order of the moments they
describe (per BirdWatch, while several BirdWatches are posted in parallel), repeats aggregated into one Event's
``count`` and ``lastTimestamp`` (as client-go's EventCorrelator does), and what cannot be posted counted and logged.
"""

from __future__ import annotations

import asyncio
import gc
import re
import shutil
import subprocess
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from birdwatch.events import EventRecorder, ObjectRef
from birdwatch.kube import Kube, Obj
from birdwatch_sandbox.envtest.assets import REPO, Assets
from birdwatch_sandbox.envtest.controlplane import ControlPlane
from birdwatch_sandbox.faultproxy import Scope, api_server_proxy
from birdwatch_sandbox.kit import Cluster, birdwatch

STEPS = [10, 20, 30, 40, 50]
# One row of kubectl describe's Events table: Type, Reason, Age ("3s" or "2s (x4 over 5s)"), From, Message.
ROW = re.compile(r"^\s+(Normal|Warning)\s+(\S+)\s+(\S+(?: \(x\d+ over \S+\))?)\s+birdwatch\s+(.*)$")


@dataclass(frozen=True)
class Row:
    type: str
    reason: str
    age: str
    message: str


@pytest.fixture(scope="module")
def kubectl(assets: Assets) -> Path:
    found = assets.kubectl or shutil.which("kubectl")
    assert found, "no kubectl: hack/install-control-plane.sh builds one unless KUBEBUILDER_ASSETS lacks it"
    return Path(found)


def describe(kubectl: Path, plane: ControlPlane, namespace: str, name: str) -> list[Row]:
    """The Events section of ``kubectl describe bw NAME``, row by row, in the order kubectl prints them."""
    done = subprocess.run(
        [str(kubectl), "--kubeconfig", str(plane.kubeconfig), "-n", namespace, "describe", "bw", name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    _, _, table = done.stdout.partition("\nEvents:")
    rows = [Row(*m.groups()) for line in table.splitlines() if (m := ROW.match(line))]
    assert rows, done.stdout
    return rows


@pytest.fixture
async def recorder(control_plane: ControlPlane) -> AsyncIterator[EventRecorder]:
    kube = await Kube.connect(kubeconfig=str(control_plane.kubeconfig))
    events = EventRecorder(kube, workers=8)
    await events.start()
    try:
        yield events
    finally:
        await events.close(timeout=10)
        await kube.close()


async def bw(cluster: Cluster, name: str) -> ObjectRef:
    created: Obj = await cluster.create_bw(birdwatch(name, metric="vector(0)"))
    return ObjectRef.of(created)


def rollout(events: EventRecorder, ref: ObjectRef) -> None:
    """The moments of one rollout, as the canary records them: all within a fraction of a second."""
    events.record(ref, type="Normal", reason="RolloutStarted", message="baseline 0")
    for weight in STEPS:
        events.record(ref, type="Normal", reason="TrafficShifted", message=f"canary weight {weight}%")
    events.record(ref, type="Normal", reason="Promoted", message="canary v04 promoted")


def rollout_rows() -> list[tuple[str, str]]:
    return [
        ("RolloutStarted", "baseline 0"),
        *(("TrafficShifted", f"canary weight {w}%") for w in STEPS),
        ("Promoted", "canary v04 promoted"),
    ]


async def test_events_come_out_in_the_order_of_their_moments_per_birdwatch(
    recorder: EventRecorder, cluster: Cluster, kubectl: Path, control_plane: ControlPlane
) -> None:
    names = [f"canary-{i}" for i in range(6)]
    refs = [await bw(cluster, name) for name in names]
    # Interleaved, as six canaries stepping at once record them; far more Events than one second holds.
    for ref in refs:
        rollout(recorder, ref)
    assert await recorder.flush(timeout=20)
    assert recorder.dropped == 0
    assert recorder.posted == len(names) * len(rollout_rows())
    for name in names:
        rows = describe(kubectl, control_plane, cluster.namespace, name)
        assert [(r.reason, r.message) for r in rows] == rollout_rows(), (name, rows)
        # The test kit's order (firstTimestamp, then name) agrees with kubectl's.
        assert [(e["reason"], e["message"]) for e in await cluster.events(name)] == rollout_rows()


async def test_a_slow_api_server_delays_each_birdwatch_in_turn_and_all_of_them_at_once(
    cluster: Cluster, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Every Event POST waits 0.5 s at a proxy: one BirdWatch's Events go one after another (their order), while
    eight BirdWatches are posted side by side: three Events each take about 1.5 s in all, not 12 s."""
    names = [f"slow-{i}" for i in range(8)]
    refs = [await bw(cluster, name) for name in names]
    api, kubeconfig = await api_server_proxy(control_plane, tmp_path / "api-proxy")
    kube = await Kube.connect(kubeconfig=str(kubeconfig))
    recorder = EventRecorder(kube, workers=8)
    try:
        await recorder.start()
        api.delay(0.5, scope=Scope("event posts", lambda call: call.method == "POST" and "/events" in call.path))
        loop = asyncio.get_running_loop()
        started = loop.time()
        for step in ("RolloutStarted", "TrafficShifted", "Promoted"):
            for ref in refs:
                recorder.record(ref, type="Normal", reason=step, message=f"{step} of {ref.name}")
        assert await recorder.flush(timeout=30)
        took = loop.time() - started
    finally:
        await recorder.close()
        await kube.close()
        await api.close()
    assert 1.5 <= took < 4.0, f"took {took:.2f} s"
    assert recorder.dropped == 0
    for name in names:
        assert await cluster.reasons(name) == ["RolloutStarted", "TrafficShifted", "Promoted"], name


async def test_the_same_event_again_adds_to_its_count_instead_of_making_another(
    recorder: EventRecorder, cluster: Cluster, kubectl: Path, control_plane: ControlPlane
) -> None:
    ref = await bw(cluster, "aleph")
    error = "cannot write the VirtualService: 503 ServiceUnavailable: etcdserver: leader changed"

    def warn() -> None:
        recorder.record(ref, type="Warning", reason="KubeAPIError", message=error)

    recorder.record(ref, type="Normal", reason="RolloutStarted", message="baseline 0")
    warn()
    assert await recorder.flush()
    # Posted already: the next ones PATCH it.
    await asyncio.sleep(1.1)  # a later lastTimestamp (whole seconds)
    warn()
    assert await recorder.flush()
    # Three in a row while queued are merged before they are sent: one PATCH, count +3.
    warn()
    warn()
    warn()
    assert await recorder.flush()
    recorder.record(ref, type="Normal", reason="TrafficShifted", message="canary weight 10%")
    warn()  # not consecutive, still within the window: the same Event
    recorder.record(ref, type="Warning", reason="KubeAPIError", message="another error")  # another message
    assert await recorder.flush()

    events = await cluster.events("aleph")
    assert [(e["reason"], e["count"]) for e in events] == [
        ("RolloutStarted", 1),
        ("KubeAPIError", 6),
        ("TrafficShifted", 1),
        ("KubeAPIError", 1),
    ], events
    repeated = events[1]
    assert repeated["message"] == error
    assert repeated["lastTimestamp"] > repeated["firstTimestamp"], repeated
    rows = describe(kubectl, control_plane, cluster.namespace, "aleph")
    # kubectl sorts by lastTimestamp: the repeated Warning moves to where it was last seen.
    assert [r.reason for r in rows][-1] == "KubeAPIError"
    [aggregated] = [r for r in rows if r.message == error]
    assert "(x6 over" in aggregated.age, rows
    assert recorder.dropped == 0


async def test_outside_the_window_a_repeat_is_a_new_event(control_plane: ControlPlane, cluster: Cluster) -> None:
    kube = await Kube.connect(kubeconfig=str(control_plane.kubeconfig))
    recorder = EventRecorder(kube, repeat_window=0.0)
    try:
        await recorder.start()
        ref = await bw(cluster, "aleph")
        for _ in range(2):
            recorder.record(ref, type="Warning", reason="KubeAPIError", message="same")
            assert await recorder.flush()
            await asyncio.sleep(0.05)
    finally:
        await recorder.close()
        await kube.close()
    assert [(e["reason"], e["count"]) for e in await cluster.events("aleph")] == [("KubeAPIError", 1)] * 2


async def test_a_refused_event_and_a_full_queue_are_counted_and_logged(
    control_plane: ControlPlane, cluster: Cluster
) -> None:
    kube = await Kube.connect(kubeconfig=str(control_plane.kubeconfig))
    drops: list[int] = []
    recorder = EventRecorder(kube, queue_size=2, on_drop=lambda: drops.append(1))
    ref = await bw(cluster, "aleph")
    elsewhere = ObjectRef(
        api_version=ref.api_version, kind=ref.kind, namespace="no-such-namespace", name="aleph", uid="u-elsewhere"
    )
    try:
        with structlog.testing.capture_logs() as logs:
            # Not started yet: the queue fills, and the third distinct Event does not fit.
            recorder.record(ref, type="Normal", reason="RolloutStarted", message="one")
            recorder.record(elsewhere, type="Normal", reason="RolloutStarted", message="two")
            recorder.record(ref, type="Normal", reason="TrafficShifted", message="three")
            assert (recorder.dropped, recorder.queued) == (1, 2)
            await recorder.start()
            assert await recorder.flush(timeout=10)
    finally:
        await recorder.close()
        await kube.close()
    # The namespace does not exist: 404, not worth retrying, dropped.
    assert recorder.dropped == 2
    assert len(drops) == 2
    dropped = [e for e in logs if e["event"] == "event dropped"]
    assert [(e["reason"], e["namespace"], e["status"]) for e in dropped] == [
        ("TrafficShifted", cluster.namespace, None),
        ("RolloutStarted", "no-such-namespace", 404),
    ], dropped
    assert "queue full" in dropped[0]["detail"]
    assert [e["reason"] for e in await cluster.events("aleph")] == ["RolloutStarted"]


async def test_record_never_waits_even_when_nothing_is_posted(control_plane: ControlPlane, cluster: Cluster) -> None:
    """A canary step calls record() and goes on: thousands of Events cost no awaiting, whatever the API server."""
    kube = await Kube.connect(kubeconfig=str(control_plane.kubeconfig))
    recorder = EventRecorder(kube, queue_size=100)
    ref = await bw(cluster, "aleph")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(5000):
        recorder.record(ref, type="Normal", reason="TrafficShifted", message=f"step {i}")
    assert loop.time() - started < 0.5
    assert (recorder.queued, recorder.dropped) == (100, 4900)
    await recorder.close(timeout=0)
    await kube.close()
    assert recorder.dropped == 5000


async def test_a_thousand_objects_waiting_behind_a_slow_api_server_cost_little_memory(
    cluster: Cluster, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """With every Event POST held at a proxy, 1,000 BirdWatches each with an Event waiting (as at a benchmark's
    start) cost about 0.4 kB each: the Event in a list, no task or deque per object (2.5 kB each, that was)."""
    ref = await bw(cluster, "many")
    refs = [
        ObjectRef(api_version=ref.api_version, kind=ref.kind, namespace=ref.namespace, name=f"many-{i}", uid=f"u{i}")
        for i in range(1000)
    ]
    api, kubeconfig = await api_server_proxy(control_plane, tmp_path / "api-proxy")
    kube = await Kube.connect(kubeconfig=str(kubeconfig))
    recorder = EventRecorder(kube, workers=8)
    try:
        await recorder.start()
        for r in refs[:16]:  # the connections the workers will use, opened before counting
            recorder.record(r, type="Normal", reason="Warm", message="connections")
        assert await recorder.flush(timeout=20)
        api.delay(30, scope=Scope("event posts", lambda call: call.method == "POST" and "/events" in call.path))
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for r in refs:
                recorder.record(r, type="Normal", reason="RolloutStarted", message="baseline 0")
            await asyncio.sleep(0.2)  # the workers took their first objects and wait at the proxy
            waiting = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert recorder.queued >= 990
    finally:
        await recorder.close(timeout=0)
        await kube.close()
        await api.close()
    assert waiting / len(refs) < 1000, f"{waiting / len(refs):.0f} B per object waiting"
