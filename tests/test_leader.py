"""Leader election against a real kube-apiserver: of several replicas exactly one works, a stopping or sick leader
hands over at once, and a dead holder's Lease is taken only after a lease duration of unchanged record by the
taker's own clock (whatever the dead holder's wall clock said).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog

from birdwatch.config import LeaderSettings
from birdwatch.kube import LEASES, Kube, KubeError, Obj
from birdwatch.leader import LeaderElector, micro_time
from birdwatch.metrics import Metrics
from birdwatch_sandbox.envtest.controlplane import ControlPlane

DURATION = 2.0  # lease_duration
DEADLINE = 1.5  # renew_deadline
RETRY = 0.2  # retry_period
LEASE = "birdwatch"

LogEntries = list[MutableMapping[str, Any]]


class FlakyKube(Kube):
    """The real client, except that while ``down`` every request fails the way an unreachable API server does."""

    down = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        decode: bool = True,
    ) -> Obj:
        if self.down:
            raise KubeError(0, "Unreachable", f"{method} {path}: ClientConnectorError: connection refused")
        return await super().request(method, path, body=body, params=params, content_type=content_type, decode=decode)


@dataclass
class Replica:
    """One elector with its own client, stop event and a work function that records what happens to it."""

    identity: str
    kube: Kube
    metrics: Metrics = field(default_factory=Metrics)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    changes: list[bool] = field(default_factory=list)
    healthy: bool = True
    failures_left: int = 0  # how many runs of work raise at once
    runs: int = 0
    cancelled: int = 0
    working: bool = False
    started_at: list[float] = field(default_factory=list)
    ended_at: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def work(self) -> None:
        self.runs += 1
        self.started_at.append(time.monotonic())
        self.working = True
        try:
            if self.failures_left > 0:
                self.failures_left -= 1
                raise RuntimeError("boom: the watch loop fell over")
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.working = False
            self.ended_at.append(time.monotonic())

    @property
    def leading(self) -> bool:
        return bool(self.changes) and self.changes[-1]

    @property
    def gauge(self) -> float | None:
        return self.metrics.registry.get_sample_value("birdwatch_leader")


class Cluster:
    """Replicas electing on one Lease in the test's namespace, plus a client of our own to look at the Lease."""

    def __init__(self, kubeconfig: str, namespace: str, reader: Kube) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.reader = reader
        self.replicas: list[Replica] = []

    async def start(
        self, identity: str, *, kube_class: type[Kube] = Kube, failures: int = 0, **timing: float
    ) -> Replica:
        kube = await kube_class.connect(kubeconfig=self.kubeconfig)
        replica = Replica(identity, kube, failures_left=failures)
        settings = LeaderSettings(
            enabled=True,
            namespace=self.namespace,
            name=LEASE,
            identity=identity,
            lease_duration=timing.get("lease_duration", DURATION),
            renew_deadline=timing.get("renew_deadline", DEADLINE),
            retry_period=timing.get("retry_period", RETRY),
        )
        elector = LeaderElector(
            kube, settings, identity=identity, metrics=replica.metrics, healthy=lambda: replica.healthy
        )
        replica.task = asyncio.create_task(
            elector.run(replica.work, stop=replica.stop, on_change=replica.changes.append), name=identity
        )
        self.replicas.append(replica)
        return replica

    async def lease(self) -> Obj:
        return await self.reader.get(LEASES, self.namespace, LEASE)

    async def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = (await self.lease())["spec"]
        return spec

    async def write_lease(self, **spec: Any) -> None:
        """Create the Lease, or overwrite its spec, as some other elector would."""
        body: Obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": LEASE}}
        try:
            body = await self.lease()
        except KubeError as exc:
            if exc.status != 404:
                raise
            await self.reader.create(LEASES, self.namespace, {**body, "spec": spec})
            return
        await self.reader.replace(LEASES, self.namespace, LEASE, {**body, "spec": spec})

    async def close(self) -> None:
        for replica in self.replicas:
            replica.stop.set()
        try:
            for replica in self.replicas:
                assert replica.task is not None
                await asyncio.wait_for(replica.task, 10)  # run() must return, not raise
        finally:
            for replica in self.replicas:
                if replica.task is not None:
                    replica.task.cancel()
                await replica.kube.close()
            await self.reader.close()


@pytest.fixture
async def cluster(control_plane: ControlPlane, namespace: str) -> AsyncIterator[Cluster]:
    kubeconfig = str(control_plane.kubeconfig)
    c = Cluster(kubeconfig, namespace, await Kube.connect(kubeconfig=kubeconfig))
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def logs() -> Iterator[LogEntries]:
    with structlog.testing.capture_logs() as entries:
        yield entries


async def until(condition: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def said(logs: LogEntries, event: str, replica: Replica, **fields: Any) -> LogEntries:
    return [
        e
        for e in logs
        if e["event"] == event
        and e.get("identity") == replica.identity
        and all(e.get(k) == v for k, v in fields.items())
    ]


async def test_of_two_replicas_exactly_one_works_and_the_lease_names_it(cluster: Cluster, logs: LogEntries) -> None:
    a, b = await cluster.start("replica-a"), await cluster.start("replica-b")

    await until(lambda: a.working or b.working, timeout=5, what="a leader running work")
    leader, standby = (a, b) if a.working else (b, a)
    # Watch for longer than a lease duration: a live leader's Lease must never be taken over, and it renews.
    renewals: set[str] = set()
    start = time.monotonic()
    while time.monotonic() - start < 1.5 * DURATION:
        spec = await cluster.spec()
        assert spec["holderIdentity"] == leader.identity
        renewals.add(spec["renewTime"])
        assert leader.working
        assert leader.runs == 1
        assert not standby.working
        assert standby.runs == 0
        await asyncio.sleep(0.05)

    assert len(renewals) >= 5, "the leader renews every retry_period"
    assert spec["leaseDurationSeconds"] == 2
    assert spec["leaseTransitions"] == 0
    assert spec["acquireTime"].endswith("Z")
    assert len(spec["renewTime"]) == len("2026-11-26T14:00:00.000000Z")
    assert leader.changes == [True]
    assert leader.gauge == 1
    assert standby.changes == []
    assert standby.gauge == 0
    assert len(said(logs, "became leader", leader)) == 1
    assert not said(logs, "became leader", standby)
    assert len(said(logs, "waiting for leadership", standby, holder=leader.identity)) == 1


async def test_a_stopped_leader_releases_the_lease_and_the_standby_takes_over_at_once(
    cluster: Cluster, logs: LogEntries
) -> None:
    a = await cluster.start("replica-a")
    await until(lambda: a.working, timeout=5, what="a leading")
    b = await cluster.start("replica-b")
    await until(lambda: bool(said(logs, "waiting for leadership", b)), timeout=5, what="b seeing a hold the Lease")

    stopped = time.monotonic()
    a.stop.set()
    took = await until(lambda: b.working, timeout=DURATION + 3, what="b taking over")

    assert took < DURATION / 2, f"the standby took {took:.2f} s: it waited for expiry, not for the release"
    assert a.task is not None
    await asyncio.wait_for(a.task, 5)
    assert a.cancelled == 1
    assert not a.working
    assert a.ended_at[0] - stopped < took, "a stopped working before b started"
    assert a.changes == [True, False]
    assert a.gauge == 0
    assert b.changes == [True]
    assert b.gauge == 1
    assert said(logs, "released lease", a)
    assert said(logs, "lost leadership", a, detail="stopping")
    spec = await cluster.spec()
    assert spec["holderIdentity"] == b.identity
    assert spec["leaseTransitions"] == 1
    assert spec["leaseDurationSeconds"] == 2


async def test_an_unhealthy_leader_steps_down_and_the_standby_takes_over(cluster: Cluster, logs: LogEntries) -> None:
    a = await cluster.start("replica-a")
    await until(lambda: a.working, timeout=5, what="a leading")
    b = await cluster.start("replica-b")
    await until(lambda: bool(said(logs, "waiting for leadership", b)), timeout=5, what="b seeing a hold the Lease")

    a.healthy = False
    took = await until(lambda: b.working, timeout=DURATION + 3, what="b taking over")

    assert took < DURATION / 2, f"the standby took {took:.2f} s: the sick leader did not hand over at once"
    assert a.cancelled == 1
    assert not a.working
    assert a.changes == [True, False]
    assert a.gauge == 0
    assert said(logs, "lost leadership", a, detail="unhealthy: not renewing")
    assert said(logs, "released lease", a)
    # The sick replica stays in the race as a standby and does not win the Lease back.
    await until(
        lambda: bool(said(logs, "waiting for leadership", a, holder=b.identity)),
        timeout=5,
        what="a waiting behind b",
    )
    assert a.runs == 1
    assert a.task is not None
    assert not a.task.done()
    assert (await cluster.spec())["holderIdentity"] == b.identity


async def test_work_that_fails_steps_down_and_the_only_replica_runs_it_again(
    cluster: Cluster, logs: LogEntries
) -> None:
    a = await cluster.start("replica-a", failures=1)

    await until(lambda: a.runs == 2 and a.working, timeout=5, what="work running a second time")

    assert a.changes == [True, False, True]
    assert a.gauge == 1
    assert a.cancelled == 0  # the first run ended on its own: nothing to cancel
    [failed] = said(logs, "leader work failed", a)
    assert isinstance(failed["exc_info"], RuntimeError)
    [lost] = said(logs, "lost leadership", a)
    assert lost["detail"] == "work failed: RuntimeError: boom: the watch loop fell over"
    assert said(logs, "released lease", a)
    assert len(said(logs, "became leader", a)) == 2
    spec = await cluster.spec()
    assert spec["holderIdentity"] == a.identity
    assert spec["leaseTransitions"] == 1  # created, released, taken again


@pytest.mark.parametrize(
    "renew_time",
    ["2020-01-01T00:00:00.000000Z", "2099-01-01T00:00:00.000000Z"],
    ids=["holder-clock-behind", "holder-clock-ahead"],
)
async def test_a_dead_holders_lease_is_taken_only_after_a_lease_duration_without_change(
    cluster: Cluster, logs: LogEntries, renew_time: str
) -> None:
    await cluster.write_lease(
        holderIdentity="ghost",
        leaseDurationSeconds=int(DURATION),
        acquireTime=renew_time,
        renewTime=renew_time,
        leaseTransitions=3,
    )
    start = time.monotonic()
    a = await cluster.start("replica-a")

    took = await until(lambda: a.working, timeout=DURATION + 3, what="a taking over the dead holder's Lease")

    assert DURATION <= took < DURATION + 1, f"took over after {took:.2f} s, not after the lease duration"
    assert time.monotonic() - start >= DURATION
    assert len(said(logs, "waiting for leadership", a, holder="ghost")) == 1
    spec = await cluster.spec()
    assert spec["holderIdentity"] == a.identity
    assert spec["leaseTransitions"] == 4
    assert spec["renewTime"] != renew_time


async def test_a_foreign_holder_that_keeps_renewing_is_never_taken_over(cluster: Cluster, logs: LogEntries) -> None:
    async def renew() -> None:
        await cluster.write_lease(
            holderIdentity="elsewhere", leaseDurationSeconds=int(DURATION), renewTime=micro_time(), leaseTransitions=0
        )

    await renew()
    a = await cluster.start("replica-a")
    await until(lambda: bool(said(logs, "waiting for leadership", a)), timeout=5, what="a seeing the Lease held")

    # The holder renews well within its lease duration for longer than one: a must keep waiting.
    start = time.monotonic()
    while time.monotonic() - start < 1.5 * DURATION:
        await renew()
        await asyncio.sleep(DURATION / 4)
        assert not a.changes
        assert a.runs == 0
    await renew()
    last_renewal = time.monotonic()

    await until(lambda: a.working, timeout=DURATION + 3, what="a taking over after the renewals stopped")

    assert time.monotonic() - last_renewal >= DURATION
    assert len(said(logs, "waiting for leadership", a, holder="elsewhere")) == 1
    assert (await cluster.spec())["holderIdentity"] == a.identity


async def test_a_leader_that_cannot_renew_steps_down_after_the_renew_deadline(
    cluster: Cluster, logs: LogEntries
) -> None:
    a = await cluster.start("replica-a", kube_class=FlakyKube)
    await until(lambda: a.working, timeout=5, what="a leading")
    b = await cluster.start("replica-b")
    await until(lambda: bool(said(logs, "waiting for leadership", b)), timeout=5, what="b seeing a hold the Lease")

    assert isinstance(a.kube, FlakyKube)
    a.kube.down = True
    cut = time.monotonic()
    await until(lambda: not a.working, timeout=DEADLINE + 3, what="a stepping down")
    stepped_down = time.monotonic() - cut

    # The deadline runs from the last renewal that got through, at most one retry period before the cut.
    assert DEADLINE - RETRY - 0.05 <= stepped_down < DEADLINE + 0.5
    assert a.cancelled == 1
    assert a.changes == [True, False]
    assert a.gauge == 0
    assert said(logs, "lost leadership", a, detail="renew deadline exceeded")
    assert said(logs, "lease request failed; retrying", a, status=0)
    assert said(logs, "could not release lease; it expires by itself", a)
    assert not said(logs, "released lease", a)

    # b cannot know: it takes over only when the Lease has not changed for a lease duration, after a stopped.
    await until(lambda: b.working, timeout=DURATION + 3, what="b taking over the expired Lease")
    assert b.started_at[0] > a.ended_at[0], "two replicas worked at the same time"
    assert time.monotonic() - cut >= DURATION - RETRY

    a.kube.down = False  # a survived the outage as a standby
    await until(
        lambda: bool(said(logs, "waiting for leadership", a, holder=b.identity)), timeout=5, what="a waiting behind b"
    )
    assert a.runs == 1
    assert a.task is not None
    assert not a.task.done()


async def test_a_leader_whose_lease_was_taken_steps_down_without_releasing_it(
    cluster: Cluster, logs: LogEntries
) -> None:
    a = await cluster.start("replica-a")
    await until(lambda: a.working, timeout=5, what="a leading")

    spec = await cluster.spec()
    await cluster.write_lease(
        **{**spec, "holderIdentity": "intruder", "renewTime": micro_time(), "leaseTransitions": 1}
    )
    took = await until(lambda: not a.working, timeout=DEADLINE, what="a noticing it lost the Lease")

    assert took < 2 * RETRY + 0.2, "noticed at the next renewal"
    assert a.changes == [True, False]
    assert a.gauge == 0
    assert said(logs, "lost leadership", a, detail="lease taken over by intruder")
    assert not said(logs, "released lease", a)
    await until(lambda: bool(said(logs, "waiting for leadership", a, holder="intruder")), timeout=5, what="a waiting")
    assert (await cluster.spec())["holderIdentity"] == "intruder"


async def test_settings_that_cannot_work_are_refused(cluster: Cluster) -> None:
    kube = cluster.reader
    with pytest.raises(ValueError, match="renew_deadline < lease_duration"):
        LeaderElector(kube, LeaderSettings(lease_duration=2, renew_deadline=2), identity="x")
    with pytest.raises(ValueError, match="retry_period"):
        LeaderElector(kube, LeaderSettings(retry_period=0), identity="x")
    with pytest.raises(ValueError, match="identity"):
        LeaderElector(kube, LeaderSettings(), identity="")
