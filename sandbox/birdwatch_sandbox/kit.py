"""Helpers for tests that run birdwatch against the real control plane: the objects a user would apply, an
in-process controller, and ways to read what a user would see (weights, status, Events)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from birdwatch.cli import build_parser
from birdwatch.config import settings_from
from birdwatch.kube import (
    BIRDWATCHES,
    DEPLOYMENTS,
    DESTINATIONRULES,
    VIRTUALSERVICES,
    Gone,
    Kube,
    KubeError,
    Resource,
)
from birdwatch.runner import App

from .envtest.controlplane import ControlPlane, KubeHTTP
from .envtest.exporter import Exporter
from .envtest.promserver import PrometheusServer
from .envtest.workloads import NEVER_READY, POD_BEHAVIOUR

Obj = dict[str, Any]
TERMINAL = {"Promoted", "RolledBack", "Frozen", "Failed"}


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Await ``probe`` until it returns something truthy; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def deployment(
    name: str, version: str, *, app: str = "aleph", pods: str | None = None, progress_deadline: int | None = None
) -> Obj:
    """A Deployment of one replica labelled ``app`` and ``version``. ``pods`` makes its pods fail on purpose
    (``envtest.workloads.NEVER_READY`` or ``CRASH``: kwok's stages react to the label on the pod template only, so
    ``fix_pods`` can drop it without touching the immutable selector); ``progress_deadline`` sets
    ``progressDeadlineSeconds``, after which the Deployment controller reports ``ProgressDeadlineExceeded``."""
    labels = {"app": app, "version": version}
    pod_labels = {**labels, POD_BEHAVIOUR: pods} if pods else labels
    spec: Obj = {
        "replicas": 1,
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": {"containers": [{"name": app, "image": f"example.invalid/{app}:{version}"}]},
        },
    }
    if progress_deadline is not None:
        spec["progressDeadlineSeconds"] = progress_deadline
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels}, "spec": spec}


def rolled_out(obj: Obj) -> bool:
    """What ``kubectl rollout status`` waits for, judged apart from birdwatch's own reading of the same status."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    return (
        int(status.get("observedGeneration", 0)) >= int(obj["metadata"].get("generation", 0))
        and int(status.get("updatedReplicas", 0)) == wanted
        and int(status.get("replicas", 0)) == wanted
        and int(status.get("availableReplicas", 0)) == wanted
    )


def wait_available(api: KubeHTTP, namespace: str, *names: str, timeout: float = 30.0) -> None:
    """Block until the Deployment controller reports each Deployment rolled out and available (the harness's
    kube-controller-manager, scheduler and kwok do the work). Synchronous: for setting up before a controller runs
    in the test's event loop; ``eventually(lambda: deployment_ready(...))`` is the way inside one."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    last: Obj = {}
    while pending:
        status, last = api.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{pending[0]}")
        if status == 200 and rolled_out(last):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise AssertionError(f"Deployment {pending[0]} not available after {timeout}s: {last.get('status')}")
        time.sleep(0.05)


async def deployment_ready(kube: Kube, namespace: str, name: str) -> bool:
    return rolled_out(await kube.get(DEPLOYMENTS, namespace, name))


def fix_pods(api: KubeHTTP, namespace: str, name: str) -> None:
    """The canary's fault is fixed: its pod template loses the failure label, and the Deployment controller rolls
    that out as a new ReplicaSet whose pods become Ready (the old ones are scaled down)."""
    status, body = api.request(
        "PATCH",
        f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
        {"spec": {"template": {"metadata": {"labels": {POD_BEHAVIOUR: None}}}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body


def destination_rule(name: str, subsets: dict[str, str]) -> Obj:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name},
        "spec": {
            "host": name,
            "trafficPolicy": {"connectionPool": {"http": {"http1MaxPendingRequests": 100}}},
            "subsets": [{"name": subset, "labels": {"version": v}} for subset, v in subsets.items()],
        },
    }


def virtual_service(name: str, split: dict[str, int], *, extra_routes: Sequence[Obj] = ()) -> Obj:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "labels": {"team": "aleph"}, "annotations": {"owner": "aleph-team"}},
        "spec": {
            "hosts": [name],
            "http": [
                *extra_routes,
                {
                    "name": "primary",
                    "route": [
                        {"destination": {"host": name, "subset": subset}, "weight": weight}
                        for subset, weight in split.items()
                    ],
                    "retries": {"attempts": 3, "perTryTimeout": "2s"},
                    "timeout": "10s",
                },
            ],
        },
    }


def birdwatch(name: str, **spec: Any) -> Obj:
    return {
        "apiVersion": "otomato.link/v1alpha1",
        "kind": "BirdWatch",
        "metadata": {"name": name},
        "spec": {"service": "aleph", "canary_version": "v04", "deviation": 0.5, "increment": 10, "interval": 1, **spec},
    }


def apply_all(api: KubeHTTP, namespace: str, objs: Sequence[Obj]) -> None:
    for obj in objs:
        api.apply({**obj, "metadata": {**obj["metadata"], "namespace": namespace}})


def mesh(
    api: KubeHTTP,
    namespace: str,
    *,
    named: bool = True,
    ready: bool = True,
    versions: Sequence[str] = ("v03", "v04"),
    extra_routes: Sequence[Obj] = (),
    progress_deadline: int | None = None,
) -> None:
    """The aleph service as a user has it before a canary: Deployments, DestinationRule, VirtualService; returns
    once the Deployments are available. With ``ready=False`` the canaries' pods (every version but the first)
    never become ready."""
    failing = None if ready else NEVER_READY
    objs = [
        deployment(f"aleph-{v}", v, pods=None if i == 0 else failing, progress_deadline=progress_deadline)
        for i, v in enumerate(versions)
    ]
    if named:
        objs += [
            destination_rule("aleph", {"production": versions[0], "canary": versions[1]}),
            virtual_service("aleph", {"production": 100, "canary": 0}, extra_routes=extra_routes),
        ]
    else:
        objs += [
            destination_rule("aleph", {v: v for v in versions}),
            virtual_service("aleph", {versions[0]: 100}, extra_routes=extra_routes),
        ]
    apply_all(api, namespace, objs)
    wait_available(api, namespace, *(f"aleph-{v}" for v in (versions if ready else versions[:1])))


@dataclass
class Cluster:
    """What a user can read back: objects, weights, status, Events."""

    kube: Kube
    namespace: str
    history: list[dict[str, int]] = field(default_factory=list)

    async def vs(self, name: str = "aleph") -> Obj:
        return await self.kube.get(VIRTUALSERVICES, self.namespace, name)

    async def dr(self, name: str = "aleph") -> Obj:
        return await self.kube.get(DESTINATIONRULES, self.namespace, name)

    async def bw(self, name: str = "aleph") -> Obj:
        return await self.kube.get(BIRDWATCHES, self.namespace, name)

    async def status(self, name: str = "aleph") -> Obj:
        return dict((await self.bw(name)).get("status") or {})

    async def weights(self, name: str = "aleph", route: str = "primary") -> dict[str, int]:
        return route_weights(await self.vs(name), route)

    async def create_bw(self, obj: Obj) -> Obj:
        return await self.kube.create(BIRDWATCHES, self.namespace, {**obj, "metadata": {**obj["metadata"]}})

    async def patch_bw_spec(self, name: str, spec: Obj) -> Obj:
        return await self.kube.merge_patch(BIRDWATCHES, self.namespace, name, {"spec": spec})

    async def wait_phase(self, phase: str, name: str = "aleph", *, timeout: float = 40.0) -> Obj:
        async def probe() -> Obj | None:
            status = await self.status(name)
            if status.get("phase") == phase:
                return status
            if (
                status.get("phase") in TERMINAL
                and status.get("observedGeneration") == (await self.bw(name))["metadata"]["generation"]
            ):
                raise AssertionError(f"{name} ended {status['phase']}, not {phase}: {status.get('message')}")
            return None

        result: Obj = await eventually(probe, timeout=timeout, what=f"{name} phase {phase}")
        return result

    async def events(self, name: str = "aleph") -> list[Obj]:
        body = await self.kube.request(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/events",
            params={"fieldSelector": f"involvedObject.name={name}"},
        )
        return sorted(body.get("items") or [], key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))

    async def reasons(self, name: str = "aleph") -> list[str]:
        return [e["reason"] for e in await self.events(name)]

    @contextlib.asynccontextmanager
    async def recording(self, name: str = "aleph", route: str = "primary") -> AsyncIterator[list[dict[str, int]]]:
        """Record every distinct weight split the VirtualService goes through, from its own watch; it yields once
        the first LIST is in, so the split before anything the test does next is the first one recorded."""
        history: list[dict[str, int]] = []
        listed = asyncio.Event()

        def see(obj: Obj) -> None:
            if obj["metadata"].get("name") != name:
                return
            split = route_weights(obj, route)
            if not history or history[-1] != split:
                history.append(split)

        task = asyncio.create_task(follow_objects(self.kube, VIRTUALSERVICES, self.namespace, see, listed=listed))
        try:
            await listed.wait()
            yield history
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def follow_objects(
    kube: Kube, resource: Resource, namespace: str, see: Callable[[Obj], None], *, listed: asyncio.Event | None = None
) -> None:
    """Hand every object of ``resource`` in ``namespace`` to ``see``: first the LIST, then each ADDED or MODIFIED
    from the WATCH; on 410 Gone, LIST again (a test's recorder must not go blind after a compaction)."""
    rv: str | None = None
    while True:
        try:
            if rv is None:
                items, rv = await kube.list(resource, namespace)
                for item in items:
                    see(item)
                if listed is not None:
                    listed.set()
            async for event in kube.watch(resource, namespace, resource_version=rv):
                rv = event.object.get("metadata", {}).get("resourceVersion") or rv
                if event.type in ("ADDED", "MODIFIED"):
                    see(event.object)
        except Gone:
            rv = None
        except KubeError:
            await asyncio.sleep(0.1)


def route_weights(vs: Obj, route: str = "primary") -> dict[str, int]:
    for r in vs["spec"].get("http") or []:
        if r.get("name") == route:
            return {d["destination"]["subset"]: int(d.get("weight", 0)) for d in r.get("route") or []}
    raise AssertionError(f"no route {route} in {vs['spec']}")


def canary_steps(history: list[dict[str, int]], canary: str) -> list[int]:
    """The canary's weights as they changed (a split that only added a 0 % canary destination is no change)."""
    steps: list[int] = []
    for split in history:
        weight = split.get(canary, 0)
        if not steps or steps[-1] != weight:
            steps.append(weight)
    return steps


def account_kubeconfig(
    admin: KubeHTTP, plane: ControlPlane, *, namespace: str, name: str, folder: Path, role: tuple[str, str]
) -> Path:
    """A ServiceAccount ``name`` in ``namespace`` bound there to ``role`` (kind, name: a Role or ClusterRole), and a
    kubeconfig with a token of it minted through the TokenRequest API: birdwatch or a person with just that RBAC."""
    admin.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
    admin.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role[0], "name": role[1]},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        }
    )
    status, body = admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )
    assert status == 201, body
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": plane.url, "certificate-authority": str(plane.ca)}}],
        "users": [{"name": name, "user": {"token": body["status"]["token"]}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": name, "namespace": namespace}}],
        "current-context": "envtest",
    }
    path = folder / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def settings(
    control_plane: ControlPlane,
    *,
    prometheus_url: str,
    namespaces: Sequence[str] = (),
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Any:
    argv = [
        "run",
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--prometheus-url",
        prometheus_url,
        "--health-address",
        "127.0.0.1:0",
        "--log-format",
        "console",
        "--log-level",
        "debug",
        "--shutdown-grace",
        "3",
    ]
    for ns in namespaces:
        argv += ["--namespace", ns]
    parser = build_parser(env or {})
    return settings_from(parser.parse_args([*argv, *extra]), env or {})


@contextlib.asynccontextmanager
async def controller(
    control_plane: ControlPlane,
    *,
    prometheus_url: str,
    namespaces: Sequence[str],
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> AsyncIterator[App]:
    """birdwatch running in this event loop, stopped (gracefully) when the block ends."""
    app = App(settings(control_plane, prometheus_url=prometheus_url, namespaces=namespaces, extra=extra, env=env))
    task = asyncio.create_task(app.run())
    try:
        await eventually(lambda: _established(app, task), timeout=20, what="the controller's watch")
        yield app
    finally:
        app.stop()
        await asyncio.wait_for(task, 15)


async def _established(app: App, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # raise what made it stop
    return bool(app.watchers) and all(w.established.is_set() for w in app.watchers)


def gauge_query(namespace: str, name: str = "errors") -> str:
    """The PromQL of a test's metric: the exporter's gauge ``bwtest_<name>`` for that namespace."""
    return f'max(bwtest_{name}{{ns="{namespace}"}})'


@dataclass
class Env:
    """The session's servers and one test's namespace, with the metric's value under the test's control."""

    cluster: Cluster
    admin: KubeHTTP
    plane: ControlPlane
    prometheus: PrometheusServer
    exporter: Exporter

    @property
    def ns(self) -> str:
        return self.cluster.namespace

    def set_metric(self, value: float, name: str = "errors", *, wait: bool = True) -> None:
        """Set the gauge, and (by default) wait until Prometheus answers the query with it, so the next check
        birdwatch makes reads the new value."""
        self.exporter.set_gauge(f"bwtest_{name}", value, ns=self.ns)
        if wait:
            self.prometheus.wait_for_value(gauge_query(self.ns, name), value)

    def controller(
        self, *, extra: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> contextlib.AbstractAsyncContextManager[App]:
        """birdwatch in this event loop, on this test's namespace and the session's Prometheus."""
        return controller(self.plane, prometheus_url=self.prometheus.url, namespaces=[self.ns], extra=extra, env=env)
