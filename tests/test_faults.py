"""Rollouts under injected faults: whatever breaks between birdwatch and the API server, Prometheus or Slack, every
rollout ends in the phase a fault-free run reaches, its canary weight only ever rises by ``increment`` (or drops to
0 when rolled back, or after production is repointed on promotion), never past ``max_weight``, and its baseline is
the one taken at the start.

birdwatch runs in-process and talks to the API server and to Prometheus through ``faultproxy.FaultProxy``; the test
reads what a user would see straight from the API server. The faults injected are printed per test and summed up
at the end of the module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import math
import re
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from birdwatch.events import EventRecorder, ObjectRef
from birdwatch.kube import BIRDWATCHES, VIRTUALSERVICES, Conflict, Gone, Kube, KubeError, Obj, Resource
from birdwatch.runner import App
from birdwatch_sandbox.envtest.assets import Assets
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP, free_port, stop_pid, wait_until
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.envtest.workloads import NEVER_READY
from birdwatch_sandbox.faultproxy import WATCHES, WRITES, FaultProxy, Scope, api_server_proxy
from birdwatch_sandbox.kit import (
    Cluster,
    birdwatch,
    canary_steps,
    deployment,
    destination_rule,
    eventually,
    follow_objects,
    route_weights,
    virtual_service,
    wait_available,
)
from birdwatch_sandbox.kit import settings as kit_settings
from slackfake import FakeSlack

LogEntries = list[MutableMapping[str, Any]]
QUERIES = Scope.path("/api/v1/query")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
BASELINE = 0.1
TOTALS: Counter[str] = Counter()  # faults injected over the module, by proxy and kind


# --- the summary --------------------------------------------------------------------------------------------------


def tally(test: str, counts: dict[str, Counter[str]], requests: dict[str, int]) -> None:
    parts = []
    for label, faults in counts.items():
        for kind, n in faults.items():
            TOTALS[f"{label} {kind}"] += n
        if faults:
            by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(faults.items()))
            parts.append(f"{label}: {by_kind} (of {requests.get(label, 0)} requests)")
    print(f"faults injected in {test}: {'; '.join(parts) or 'none'}")


@pytest.fixture(scope="module", autouse=True)
def fault_summary(pytestconfig: pytest.Config) -> Iterator[None]:
    yield
    if not TOTALS:
        return
    line = "faults injected in test_faults: " + ", ".join(f"{k} {n}" for k, n in sorted(TOTALS.items()))
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_line(line)


# --- the world ----------------------------------------------------------------------------------------------------


def metric(namespace: str) -> str:
    return f'max(bwtest_errors{{ns="{namespace}"}})'


def rises_by(steps: Sequence[int], increment: int) -> bool:
    return all(b - a == increment for a, b in itertools.pairwise(steps))


def assert_steps(steps: list[int], *, phase: str, max_weight: int, increment: int = 10) -> None:
    """From 0 up by ``increment`` at a time, never past ``max_weight``; then 0: production repointed at the canary
    (named subsets) on promotion, all traffic back to production on rollback."""
    if phase == "Promoted":
        assert steps == [*range(0, max_weight + 1, increment), 0], steps
        return
    assert phase == "RolledBack", phase
    assert len(steps) >= 3, steps
    assert steps[0] == 0, steps
    assert steps[-1] == 0, steps
    assert rises_by(steps[:-1], increment), steps
    assert max(steps) <= max_weight, steps


def service(admin: KubeHTTP, namespace: str, app: str, *, ready: bool = True) -> None:
    """A service as a user has it before a canary: production ``v1``, canary ``<app>-v2`` (each app its own canary
    version, so one app's canary that is not ready keeps no other waiting), named subsets, all traffic on
    production."""
    versions = {"production": "v1", "canary": f"{app}-v2"}
    objs = [
        deployment(f"{app}-production", versions["production"], app=app),
        deployment(f"{app}-canary", versions["canary"], app=app, pods=None if ready else NEVER_READY),
        destination_rule(app, versions),
        virtual_service(app, {"production": 100, "canary": 0}),
    ]
    for obj in objs:
        admin.apply({**obj, "metadata": {**obj["metadata"], "namespace": namespace}})
    wait_available(admin, namespace, f"{app}-production", *([f"{app}-canary"] if ready else []))


def bw(namespace: str, app: str, **spec: Any) -> Obj:
    return birdwatch(app, service=app, canary_version=f"{app}-v2", metric=metric(namespace), **spec)


def set_metric(prometheus: PrometheusServer, exporter: Exporter, namespace: str, value: float) -> None:
    exporter.set_gauge("bwtest_errors", value, ns=namespace)
    prometheus.wait_for_value(metric(namespace), value)


@contextlib.asynccontextmanager
async def running(
    plane: ControlPlane,
    kubeconfig: Path,
    *,
    prometheus_url: str,
    namespaces: Sequence[str],
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> AsyncIterator[App]:
    """birdwatch in this event loop, as ``kit.controller`` runs it, but with its own kubeconfig (the proxy's)."""
    base = kit_settings(plane, prometheus_url=prometheus_url, namespaces=namespaces, extra=extra, env=env)
    app = App(dataclasses.replace(base, kubeconfig=str(kubeconfig)))
    task = asyncio.create_task(app.run())

    async def established() -> bool:
        if task.done():
            task.result()  # raise what made it stop
        return bool(app.watchers) and all(w.established.is_set() for w in app.watchers)

    try:
        await eventually(established, timeout=30, what="the controller's watch")
        yield app
    finally:
        app.stop()
        await asyncio.wait_for(task, 20)


class Weights:
    """Every split each VirtualService's primary route went through, in the API server's order of writes
    (resourceVersion), from a watch that lists again after 410 Gone and, optionally, from polling too."""

    def __init__(self, names: Sequence[str]) -> None:
        self._seen: dict[str, dict[int, dict[str, int]]] = {name: {} for name in names}

    def note(self, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        if meta.get("name") in self._seen and meta.get("resourceVersion"):
            self._seen[meta["name"]][int(meta["resourceVersion"])] = route_weights(obj)

    def history(self, name: str) -> list[dict[str, int]]:
        return [split for _, split in sorted(self._seen[name].items())]

    def steps(self, name: str) -> list[int]:
        return canary_steps(self.history(name), "canary")


@contextlib.asynccontextmanager
async def recording(
    kube: Kube, namespace: str, names: Sequence[str], *, poll: float | None = None
) -> AsyncIterator[Weights]:
    """Record ``Weights`` of several VirtualServices at once. ``poll``: also LIST that often, so a change made while
    the API server's watch cache is starting over is not missed."""
    weights = Weights(names)
    listed = asyncio.Event()

    async def look(every: float) -> None:
        while True:
            with contextlib.suppress(KubeError):
                for item in (await kube.list(VIRTUALSERVICES, namespace))[0]:
                    weights.note(item)
            await asyncio.sleep(every)

    tasks = [asyncio.create_task(follow_objects(kube, VIRTUALSERVICES, namespace, weights.note, listed=listed))]
    if poll is not None:
        tasks.append(asyncio.create_task(look(poll)))
    try:
        await asyncio.wait_for(listed.wait(), 15)  # what there is before anything changes
        yield weights
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Faults:
    """The shared servers, this test's namespace, and proxies in front of the API server and Prometheus."""

    def __init__(
        self,
        cluster: Cluster,
        admin: KubeHTTP,
        plane: ControlPlane,
        prometheus: PrometheusServer,
        exporter: Exporter,
        api: FaultProxy,
        kubeconfig: Path,
        prom: FaultProxy,
    ) -> None:
        self.cluster, self.admin, self.plane, self.prometheus, self.exporter = (
            cluster,
            admin,
            plane,
            prometheus,
            exporter,
        )
        self.api, self.kubeconfig, self.prom = api, kubeconfig, prom
        self.ns = cluster.namespace

    def set_metric(self, value: float) -> None:
        set_metric(self.prometheus, self.exporter, self.ns, value)

    def bw(self, app: str, **spec: Any) -> Obj:
        return bw(self.ns, app, **spec)

    def birdwatch(
        self, *, extra: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> contextlib.AbstractAsyncContextManager[App]:
        return running(
            self.plane, self.kubeconfig, prometheus_url=self.prom.url, namespaces=[self.ns], extra=extra, env=env
        )

    def recording(self, names: Sequence[str]) -> contextlib.AbstractAsyncContextManager[Weights]:
        return recording(self.cluster.kube, self.ns, names)

    async def weight_at_least(self, name: str, weight: int) -> bool:
        return int((await self.cluster.status(name)).get("canaryWeight", 0)) >= weight


@pytest.fixture
async def fx(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
    tmp_path: Path,
) -> AsyncIterator[Faults]:
    api, kubeconfig = await api_server_proxy(control_plane, tmp_path / "api-proxy", seed=20240611)
    prom = await FaultProxy(prometheus.url, name="prometheus proxy", seed=7).start()
    try:
        yield Faults(cluster, admin_http, control_plane, prometheus, exporter, api, kubeconfig, prom)
    finally:
        await api.close()
        await prom.close()
        tally(
            request.node.name,
            {"api": api.faults(), "prometheus": prom.faults()},
            {"api": api.requests, "prometheus": prom.requests},
        )


@pytest.fixture
def logs() -> Iterator[LogEntries]:
    with structlog.testing.capture_logs() as entries:
        yield entries


def said(logs: LogEntries, event: str) -> LogEntries:
    return [e for e in logs if e.get("event") == event]


async def reasons_once_posted(cluster: Cluster, name: str, reason: str) -> list[str]:
    """The BirdWatch's Event reasons, once ``reason`` is among them (Events are posted in the background)."""

    async def probe() -> list[str] | None:
        reasons = await cluster.reasons(name)
        return reasons if reason in reasons else None

    found: list[str] = await eventually(probe, timeout=15, what=f"a {reason} Event on {name}")
    return found


# --- the proxy itself ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def upstream_server() -> AsyncIterator[tuple[str, Counter[str]]]:
    """A small HTTP server to put the proxy in front of: ``/plain``, ``/write`` (POST) and a ``?watch=true`` stream
    of one JSON line every 50 ms. Counts what reached it, by path."""
    hits: Counter[str] = Counter()

    async def plain(request: web.Request) -> web.StreamResponse:
        hits[request.path] += 1
        if request.query.get("watch") != "true":
            return web.json_response({"ok": True}, status=201 if request.method == "POST" else 200)
        response = web.StreamResponse()
        await response.prepare(request)
        for n in range(200):
            await response.write(b'{"n": %d}\n' % n)
            await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", plain)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", hits
    finally:
        await runner.cleanup()


async def test_the_proxy_injects_each_fault_it_is_told() -> None:
    short = aiohttp.ClientTimeout(total=2, sock_read=0.4)
    async with (
        upstream_server() as (upstream, hits),
        FaultProxy(upstream, name="self-test") as proxy,
        aiohttp.ClientSession(timeout=short) as client,
    ):
        url = proxy.url

        async def status(path: str = "/plain", method: str = "GET") -> int | str:
            try:
                async with client.request(method, url + path) as resp:
                    await resp.read()
                    return resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                return type(exc).__name__

        assert await status() == 200
        for kind in ("500", "503", "429"):
            proxy.error_rate(1.0, kinds=[kind])
            async with client.get(url + "/plain") as resp:
                assert resp.status == int(kind)
                assert (resp.headers.get("Retry-After") == "1") is (kind == "429")
        assert hits["/plain"] == 1  # none of those reached the server
        proxy.error_rate(1.0, kinds=["hang"])
        assert await status() == "SocketTimeoutError"  # held until the client gave up
        proxy.error_rate(1.0, kinds=["lost"], scope=WRITES)
        assert await status() == 200  # a read is not in scope
        assert await status("/write", "POST") == "ServerDisconnectedError"
        assert hits["/write"] == 1  # the server did it; the client never heard
        proxy.error_rate(0.0)

        proxy.down()
        assert await status() == "ServerDisconnectedError"
        proxy.up()
        assert await status() == 200
        proxy.down(scope=Scope.path("/plain"), seconds=0.3, on_next=True)
        assert await status("/other") == 200  # not in scope: the outage is still to come
        assert await status() == "ServerDisconnectedError"
        await asyncio.sleep(0.35)
        assert await status() == 200

        proxy.delay(0.3)
        started = time.monotonic()
        assert await status() == 200
        assert time.monotonic() - started >= 0.3
        proxy.delay(math.inf)
        held = asyncio.create_task(status())
        await asyncio.sleep(0.2)
        assert not held.done()
        await asyncio.to_thread(proxy.delay, 0)  # switched from another thread, the held request goes on
        assert await held == 200

        async def watch() -> tuple[int, str]:
            lines = 0
            try:
                async with client.get(url + "/stream?watch=true", timeout=aiohttp.ClientTimeout(sock_read=0.4)) as r:
                    async for _ in r.content:
                        lines += 1
                        if lines == 3:
                            await asyncio.to_thread(proxy.cut_watches)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return lines, type(exc).__name__
            return lines, "ended"

        lines, how = await watch()
        assert lines >= 3
        assert how == "ClientPayloadError"  # cut short, as a dropped connection looks
        proxy.cut_watches_every(0.3)
        started = time.monotonic()
        lines, how = await watch()
        assert how == "ClientPayloadError"
        assert time.monotonic() - started < 0.6
        proxy.cut_watches_every(None)

        async with client.get(url + "/stream?watch=true", timeout=aiohttp.ClientTimeout(sock_read=0.4)) as resp:
            await resp.content.readline()
            proxy.silence_watches()

            async def drain() -> None:
                while await resp.content.readline():
                    pass

            with pytest.raises(TimeoutError):
                await drain()  # the upstream goes on writing; nothing comes through
            assert proxy.open_watches == 1  # silent, not closed
        await asyncio.sleep(0.1)
        assert proxy.open_watches == 0
        assert proxy.silenced_for[0] >= 0.4
        faults = proxy.faults()
    # aiohttp's client sends an idempotent request again, once, when a kept-alive connection drops: refused twice.
    assert faults["refused"] >= 2
    expected = {"500": 1, "503": 1, "429": 1, "hang": 1, "lost": 1, "delayed": 2, "cut": 2, "silenced": 1}
    assert {kind: n for kind, n in faults.items() if kind != "refused"} == expected
    TOTALS.update({f"self-test {kind}": n for kind, n in faults.items()})


# --- the API server's side ----------------------------------------------------------------------------------------


async def test_watch_cut_every_two_seconds_during_three_rollouts(fx: Faults, logs: LogEntries) -> None:
    apps = ("aleph", "beth", "gimel")
    for app in apps:
        service(fx.admin, fx.ns, app)
    fx.set_metric(BASELINE)
    async with fx.birdwatch(), fx.recording(apps) as weights:
        fx.api.cut_watches_every(2.0)
        for app in apps:
            # Each arrives on a different watch connection, some while the controller is reconnecting.
            await fx.cluster.create_bw(fx.bw(app, interval=1, max_weight=50))
            await asyncio.sleep(1.3)
        statuses = {app: await fx.cluster.wait_phase("Promoted", app, timeout=60) for app in apps}
        fx.api.cut_watches_every(None)  # what follows is shutdown: cuts then prove nothing
        cuts = fx.api.faults()["cut"]
        await asyncio.sleep(0.2)  # the last cut's reconnect is logged
        reconnects = len(said(logs, "watch failed; reconnecting"))
    assert cuts >= 3
    assert reconnects >= cuts
    for app in apps:
        assert statuses[app]["baseline"] == pytest.approx(BASELINE)
        assert_steps(weights.steps(app), phase="Promoted", max_weight=50)
        reasons = await reasons_once_posted(fx.cluster, app, "Promoted")
        assert reasons.count("RolloutStarted") == 1, reasons
        assert await fx.cluster.weights(app) == {"production": 100, "canary": 0}


async def test_silent_watch_is_noticed_and_opened_again(fx: Faults, logs: LogEntries) -> None:
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)

    async def watching() -> bool:
        return fx.api.open_watches >= 1

    async with fx.birdwatch(extra=["--watch-read-timeout", "2"]), fx.recording(["aleph"]) as weights:
        await eventually(watching, what="an open watch")
        fx.api.silence_watches()  # the connection stays open; the BirdWatch's ADDED event dies in it
        await fx.cluster.create_bw(fx.bw("aleph", interval=1, max_weight=30))
        status = await fx.cluster.wait_phase("Promoted", timeout=40)
    assert fx.api.faults()["silenced"] >= 1
    # birdwatch, not the proxy, ended the silent stream: within its read timeout of the last byte it received.
    assert fx.api.silenced_for, "the silenced stream never ended"
    assert fx.api.silenced_for[0] <= 2 + 1.5, list(fx.api.silenced_for)
    timeouts = [e for e in said(logs, "watch failed; reconnecting") if "Timeout" in str(e.get("detail"))]
    assert timeouts, said(logs, "watch failed; reconnecting")
    assert status["baseline"] == pytest.approx(BASELINE)
    assert_steps(weights.steps("aleph"), phase="Promoted", max_weight=30)


@pytest.fixture
async def own_plane(assets: Assets, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane of this test's own: its etcd is compacted and restarted, which the shared one must not be."""
    plane = ControlPlane(tmp_path / "plane", assets)
    try:
        await asyncio.to_thread(plane.start)
        yield plane
    finally:
        await asyncio.to_thread(plane.stop)


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URL of the test's etcd
        return bool(resp.status == 200)


def restart_etcd(plane: ControlPlane) -> None:
    """etcd dies and comes back on the same data: the API server's etcd client reconnects and resumes its watches
    from the revisions each had reached."""
    etcd = next(s for s in plane.servers if s.name == "etcd")
    stop_pid(etcd.pid, grace=0.5)
    etcd.start()
    wait_until("etcd /health after a restart", lambda: _healthy(f"{plane.etcd_url}/health"), timeout=30, server=etcd)


async def compact_etcd(plane: ControlPlane) -> int:
    """Compact etcd's history up to its current revision (etcd's JSON gateway); returns that revision."""
    async with aiohttp.ClientSession() as session:
        key = base64.b64encode(b"\0").decode()
        async with session.post(f"{plane.etcd_url}/v3/kv/range", json={"key": key, "limit": 1}) as resp:
            resp.raise_for_status()
            revision = int((await resp.json())["header"]["revision"])
        body = {"revision": str(revision), "physical": True}
        async with session.post(f"{plane.etcd_url}/v3/kv/compaction", json=body) as resp:
            resp.raise_for_status()
    return revision


async def watch_expired(kube: Kube, namespace: str, resource_version: str) -> bool:
    try:
        async for _ in kube.watch(
            BIRDWATCHES, namespace, resource_version=resource_version, timeout_seconds=1, read_timeout=5
        ):
            pass
    except Gone:
        return True
    except KubeError:
        return False
    return False


async def expire_resource_versions(plane: ControlPlane, kube: Kube, namespace: str, stale: str) -> int:
    """Make ``stale`` and every resourceVersion before now too old for the API server, the way it happens in a
    cluster: etcd compacts past the revision the API server's own watch on etcd has reached, and that watch is
    resumed (here because etcd restarts). The resume fails (compacted), the API server's watch cache lists again
    and starts over, and from then on a watch from an older resourceVersion is answered 410 Gone.

    Compaction alone would not do it: the watch cache keeps at least 75 s of events and serves them whatever etcd
    has compacted. Returns the revision compacted at."""
    for attempt in range(3):
        # Writes elsewhere move etcd past the last BirdWatch event the API server's watch cache has seen.
        for i in range(5):
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"churn-{attempt}-{i}"}}
            await kube.create(CONFIGMAPS, namespace, body)
        revision = await compact_etcd(plane)
        await asyncio.to_thread(restart_etcd, plane)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if await watch_expired(kube, namespace, stale):
                return revision
            await asyncio.sleep(0.2)
    raise AssertionError(f"a watch from resourceVersion {stale} was never answered 410 Gone")


async def test_watch_expired_by_compaction_lists_again_and_misses_nothing(
    own_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
    tmp_path: Path,
    logs: LogEntries,
) -> None:
    plane, ns = own_plane, "gone"
    print(f"this test's etcd and kube-apiserver log to {plane.workdir}")
    admin = plane.http()
    admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    first, early, dropped = "aleph", "beth", "zayin"
    during = ("gimel", "daleth", "he")
    for name in (first, early, *during):
        service(admin, ns, name)
    service(admin, ns, dropped, ready=False)
    set_metric(prometheus, exporter, ns, BASELINE)
    kube = await Kube.connect(kubeconfig=str(plane.kubeconfig))
    cluster = Cluster(kube, ns)
    api, kubeconfig = await api_server_proxy(plane, tmp_path / "api-proxy")
    try:
        async with (
            running(plane, kubeconfig, prometheus_url=prometheus.url, namespaces=[ns]) as app,
            recording(kube, ns, (first, early, *during, dropped), poll=0.1) as weights,
        ):
            await cluster.create_bw(bw(ns, first, interval=1, max_weight=20))
            await cluster.create_bw(bw(ns, dropped, interval=1))  # its canary never gets ready: it waits
            await cluster.wait_phase("Promoted", first)
            await cluster.wait_phase("Waiting", dropped)
            await cluster.create_bw(bw(ns, early, interval=2, max_weight=50))
            await eventually(lambda: _weight_at_least(cluster, early, 10), what=f"{early} stepping")

            # The gap: the controller's watch is cut and its next one held at the proxy, while BirdWatches come
            # and go and the resourceVersion it holds becomes too old.
            _, stale = await kube.list(BIRDWATCHES, ns)
            api.delay(math.inf, scope=WATCHES)
            api.cut_watches()
            for name in during:
                await cluster.create_bw(bw(ns, name, interval=1, max_weight=20))
            await kube.delete(BIRDWATCHES, ns, dropped)
            compacted = await expire_resource_versions(plane, kube, ns, stale)
            api.delay(0)

            statuses = {name: await cluster.wait_phase("Promoted", name, timeout=60) for name in (early, *during)}

            async def forgotten() -> bool:
                return app.registry is not None and app.registry.owner(ns, dropped) is None

            await eventually(forgotten, timeout=10, what=f"{dropped} forgotten")
            relists = app.watchers[0].relists
        print(f"etcd compacted at revision {compacted}; the controller's watch was from before {stale}")
        assert api.faults()["cut"] >= 1
        assert api.faults()["delayed"] >= 1
        assert relists >= 2
        assert said(logs, "watch expired (410 Gone); listing again")
        assert said(logs, "birdwatch deleted; stopping its canary task (traffic stays as it is)")
        assert route_weights(await cluster.vs(dropped)) == {"production": 100, "canary": 0}
        for name in (first, early, *during):
            top = 50 if name == early else 20
            assert_steps(weights.steps(name), phase="Promoted", max_weight=top)
            reasons = await reasons_once_posted(cluster, name, "RolloutStarted")
            assert reasons.count("RolloutStarted") == 1, (name, reasons)
        for name, status in statuses.items():
            assert status["baseline"] == pytest.approx(BASELINE), name
    finally:
        await api.close()
        tally(
            "test_watch_expired_by_compaction_lists_again_and_misses_nothing",
            {"api": api.faults()},
            {"api": api.requests},
        )
        await kube.close()


async def _weight_at_least(cluster: Cluster, name: str, weight: int) -> bool:
    return int((await cluster.status(name)).get("canaryWeight", 0)) >= weight


async def test_api_errors_during_three_rollouts(fx: Faults) -> None:
    apps = ("aleph", "beth", "gimel")
    for app in apps:
        service(fx.admin, fx.ns, app)
    fx.set_metric(BASELINE)
    kinds = ("500", "503", "429", "hang", "lost")
    # A hung watch is noticed after the read timeout; quiet watches between events are re-opened as often.
    async with fx.birdwatch(extra=["--watch-read-timeout", "5"]), fx.recording(apps) as weights:
        fx.api.error_rate(0.15, kinds=kinds)
        for app in apps:
            await fx.cluster.create_bw(fx.bw(app, interval=1, max_weight=30))
        statuses = {app: await fx.cluster.wait_phase("Promoted", app, timeout=150) for app in apps}
        faults, requests = fx.api.faults(), fx.api.requests
        fx.api.reset()
    injected = sum(faults[k] for k in kinds)
    # About 75 requests at 15 %: 11 faults on average; 3 % and 35 % are three standard deviations away.
    assert 0.03 <= injected / requests <= 0.35, (faults, requests)
    for app in apps:
        assert statuses[app]["baseline"] == pytest.approx(BASELINE)
        assert_steps(weights.steps(app), phase="Promoted", max_weight=30)
        assert await fx.cluster.weights(app) == {"production": 100, "canary": 0}
        dr = await fx.cluster.dr(app)
        assert {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]} == {
            "production": f"{app}-v2",
            "canary": f"{app}-v2",
        }
        # Events are best effort (one answered 500 is dropped), but none may say the rollout started twice.
        reasons = await fx.cluster.reasons(app)
        assert reasons.count("RolloutStarted") <= 1, (app, reasons)


async def test_an_event_whose_answer_is_lost_is_not_posted_twice(fx: Faults) -> None:
    """The API server creates the Event, and the connection breaks before its answer arrives. Only the caller knows
    whether a POST may be sent again (RFC 9110, 9.2.2); birdwatch's HTTP client must not resend it on its own, or
    the API server makes the Event twice: the rollout "started twice" (seen in the 15 % errors scenario, where one
    "canary weight 20%" Event came out twice)."""
    kube = await Kube.connect(kubeconfig=str(fx.kubeconfig))
    recorder = EventRecorder(kube)
    try:
        await kube.list(CONFIGMAPS, fx.ns)  # leaves a kept-alive connection, which the Event's POST goes on
        fx.api.error_rate(1.0, kinds=["lost"], scope=Scope("creates", lambda call: call.method == "POST"))
        await recorder.start()
        ref = ObjectRef(api_version=BIRDWATCHES.api_version, kind="BirdWatch", namespace=fx.ns, name="aleph", uid="u1")
        recorder.record(ref, type="Normal", reason="RolloutStarted", message="baseline 0.1")
        await recorder.close(timeout=15)
        fx.api.reset()
    finally:
        await kube.close()
    assert fx.api.faults()["lost"] >= 1
    assert await fx.cluster.reasons("aleph") == ["RolloutStarted"]


async def test_another_writer_on_the_same_virtualservice(fx: Faults) -> None:
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)
    kube = fx.cluster.kube
    stop = asyncio.Event()
    written: list[int] = []
    conflicts = 0

    async def writer() -> None:
        """Someone else's tool: sets the primary route's timeout and a label every 0.3 s, retrying conflicts."""
        nonlocal conflicts
        for n in itertools.count(1):
            if stop.is_set():
                return
            for _ in range(20):
                vs = await kube.get(VIRTUALSERVICES, fx.ns, "aleph")
                vs["spec"]["http"][0]["timeout"] = f"{n}s"
                vs["metadata"].setdefault("labels", {})["edited-by"] = f"writer-{n}"
                try:
                    await kube.replace(VIRTUALSERVICES, fx.ns, "aleph", vs)
                except Conflict:
                    conflicts += 1
                    continue
                written.append(n)
                break
            await asyncio.sleep(0.3)

    async with fx.birdwatch(), fx.recording(["aleph"]) as weights:
        task = asyncio.create_task(writer())
        try:
            await fx.cluster.create_bw(fx.bw("aleph", interval=1, max_weight=30))
            status = await fx.cluster.wait_phase("Promoted", timeout=40)
        finally:
            stop.set()
            await task
    last = written[-1]
    print(
        f"the other writer wrote {len(written)} times and met {conflicts} conflicts; birdwatch met "
        f"{fx.api.statuses()[409]} conflicts"
    )
    assert len(written) >= 5
    assert fx.api.statuses()[409] >= 1  # birdwatch's writes met the other writer's, and were done again
    vs = await fx.cluster.vs()
    assert vs["spec"]["http"][0]["timeout"] == f"{last}s"
    assert vs["metadata"]["labels"] == {"team": "aleph", "edited-by": f"writer-{last}"}
    assert vs["spec"]["http"][0]["retries"] == {"attempts": 3, "perTryTimeout": "2s"}
    assert route_weights(vs) == {"production": 100, "canary": 0}
    assert_steps(weights.steps("aleph"), phase="Promoted", max_weight=30)
    assert status["baseline"] == pytest.approx(BASELINE)


# --- Prometheus ---------------------------------------------------------------------------------------------------


async def test_prometheus_down_within_the_retry_budget(fx: Faults) -> None:
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)
    async with fx.birdwatch(), fx.recording(["aleph"]) as weights:
        await fx.cluster.create_bw(fx.bw("aleph", interval=3, max_weight=20))
        await eventually(lambda: fx.weight_at_least("aleph", 10), what="canary at 10%")
        fx.prom.down(QUERIES, seconds=1.0, on_next=True)  # the next check meets a 1 s outage
        status = await fx.cluster.wait_phase("Promoted", timeout=40)
    assert fx.prom.faults()["refused"] >= 1
    assert status["failedChecks"] == 0
    assert status["baseline"] == pytest.approx(BASELINE)
    assert "CheckFailed" not in await fx.cluster.reasons()
    assert_steps(weights.steps("aleph"), phase="Promoted", max_weight=20)


async def test_prometheus_down_for_longer_rolls_back(fx: Faults) -> None:
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)
    async with fx.birdwatch(), fx.recording(["aleph"]) as weights:
        await fx.cluster.create_bw(fx.bw("aleph", interval=2, failure_threshold=2, max_weight=50))
        await eventually(lambda: fx.weight_at_least("aleph", 10), what="canary at 10%")
        fx.prom.down(QUERIES)
        went_down = time.monotonic()
        status = await fx.cluster.wait_phase("RolledBack", timeout=40)
        outage = time.monotonic() - went_down
        fx.prom.up()
    # Two failed checks, the second an interval after the first, each after most of its 2 s retry budget: about 6 s
    # at the least (a check's last attempt may end a few milliseconds before its budget does).
    assert outage >= 5.5, outage
    assert fx.prom.faults()["refused"] >= 2
    assert status["failedChecks"] == 2
    assert status["message"].startswith("rolled back: the metric could not be read: cannot reach Prometheus at")
    assert status["baseline"] == pytest.approx(BASELINE)
    assert (await fx.cluster.reasons()).count("CheckFailed") == 1
    assert await fx.cluster.weights() == {"production": 100, "canary": 0}
    assert_steps(weights.steps("aleph"), phase="RolledBack", max_weight=50)


async def test_prometheus_slow_every_query_is_bounded(fx: Faults) -> None:
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)
    async with fx.birdwatch(extra=["--prometheus-timeout", "1"]), fx.recording(["aleph"]) as weights:
        await fx.cluster.create_bw(fx.bw("aleph", interval=2, failure_threshold=2, max_weight=50))
        await eventually(lambda: fx.weight_at_least("aleph", 10), what="canary at 10%")
        fx.prom.delay(5.0, scope=QUERIES)
        slowed = time.monotonic()
        status = await fx.cluster.wait_phase("RolledBack", timeout=40)
        took = time.monotonic() - slowed
        fx.prom.delay(0)
    waits = list(fx.prom.abandoned)
    assert fx.prom.faults()["delayed"] >= 2
    # Every attempt was given up by birdwatch after its 1 s timeout, none waited for the 5 s answer.
    assert waits, "no query was given up"
    assert max(waits) < 1.6, waits
    assert took < 2 * (2 + 2) + 6, took  # two checks, each an interval plus its retry budget
    # The last attempt of a check gets what is left of its budget, so it may say less than 1 s; never more.
    bound = re.search(r"did not answer within ([0-9.]+) s", status["message"])
    assert bound is not None, status["message"]
    assert float(bound.group(1)) <= 1.0, status["message"]
    assert status["failedChecks"] == 2
    assert status["baseline"] == pytest.approx(BASELINE)
    assert_steps(weights.steps("aleph"), phase="RolledBack", max_weight=50)


async def test_a_slow_traffic_write_does_not_shorten_the_interval_judged(fx: Faults) -> None:
    """A step's write held 3 s by a busy API server (as 1,000 rollouts starting at once do): the canary still gets
    its whole interval at the new weight before the check that moves it on, counted from when the traffic moved,
    not from when the step was decided."""
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)
    moved: list[tuple[float, int]] = []  # (when this test saw it, the canary's weight)

    def see(obj: Obj) -> None:
        if obj["metadata"]["name"] == "aleph":
            weight = route_weights(obj).get("canary", 0)
            if not moved or moved[-1][1] != weight:
                moved.append((time.monotonic(), weight))

    traffic_writes = Scope("traffic writes", lambda call: call.method == "PATCH" and "/virtualservices/" in call.path)
    follower = asyncio.create_task(follow_objects(fx.cluster.kube, VIRTUALSERVICES, fx.ns, see))
    try:
        async with fx.birdwatch():
            fx.api.delay(3.0, scope=traffic_writes)
            await fx.cluster.create_bw(fx.bw("aleph", interval=4, max_weight=20))
            await eventually(lambda: _at(moved, 10), what="the first step seen")
            fx.api.delay(0)
            await fx.cluster.wait_phase("Promoted", timeout=60)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    assert fx.api.faults()["delayed"] >= 1
    times = {weight: when for when, weight in moved}
    # Counted from the decision, the second step would have come about 1 s after the first was seen.
    assert times[20] - times[10] >= 3.5, moved


async def _at(moved: list[tuple[float, int]], weight: int) -> bool:
    return any(w == weight for _, w in moved)


# --- Slack --------------------------------------------------------------------------------------------------------

# interval 1 s up to 30 %: three steps, then promotion, about 3 s after the baseline. A rollout that waited on Slack
# (three retries with backoff per message, several messages) would take several times that.
ON_TIME = 3 + 3.0


async def test_slack_unreachable_does_not_hold_rollouts(fx: Faults, logs: LogEntries) -> None:
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)
    env = {"SLACK_API_TOKEN": "xoxb-test", "SLACK_API_URL": f"http://127.0.0.1:{free_port()}/api/"}
    async with fx.birdwatch(env=env), fx.recording(["aleph"]) as weights:
        created = time.monotonic()
        await fx.cluster.create_bw(fx.bw("aleph", interval=1, max_weight=30))
        status = await fx.cluster.wait_phase("Promoted", timeout=30)
        took = time.monotonic() - created
    failed = said(logs, "slack notification failed")
    unsent = said(logs, "slack notifications not sent before shutdown")
    TOTALS["slack unreachable"] += len(failed) + sum(int(e.get("unsent", 0)) for e in unsent)
    print(f"slack unreachable: {len(failed)} notices failed, {unsent} unsent at shutdown; promoted in {took:.1f}s")
    assert failed or unsent, "Slack was never tried"
    assert took < ON_TIME, took
    assert status["baseline"] == pytest.approx(BASELINE)
    assert_steps(weights.steps("aleph"), phase="Promoted", max_weight=30)


async def test_slack_rate_limiting_does_not_hold_rollouts(fx: Faults) -> None:
    service(fx.admin, fx.ns, "aleph")
    fx.set_metric(BASELINE)
    async with FakeSlack(token="xoxb-test") as slack:
        slack.rate_limit_next(1000, retry_after=1)
        env = {"SLACK_API_TOKEN": "xoxb-test", "SLACK_API_URL": slack.base_url}
        async with fx.birdwatch(env=env), fx.recording(["aleph"]) as weights:
            created = time.monotonic()
            await fx.cluster.create_bw(fx.bw("aleph", interval=1, max_weight=30))
            status = await fx.cluster.wait_phase("Promoted", timeout=30)
            took = time.monotonic() - created
        limited = [r for r in slack.requests if r.status == 429]
    TOTALS["slack 429"] += len(limited)
    print(f"slack answered 429 {len(limited)} times; promoted in {took:.1f}s")
    assert limited, "Slack was never asked"
    assert not slack.messages
    assert took < ON_TIME, took
    assert status["baseline"] == pytest.approx(BASELINE)
    assert_steps(weights.steps("aleph"), phase="Promoted", max_weight=30)
