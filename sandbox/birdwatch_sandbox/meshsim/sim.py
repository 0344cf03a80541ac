"""``MeshSim``: the simulated mesh for one service: its versions' servers, Envoy's routing, the callers' load.

What it runs, all on loopback:

- one ``Workload`` (HTTP server + Istio metrics) per version;
- a file-SD target list in ``targets_dir`` naming every version's ``/metrics``, written atomically (temporary file,
  then rename) so Prometheus never reads half of it, and removed on ``close()``;
- a ``RouteWatcher`` following the VirtualService and DestinationRule, from which each request's version is chosen
  (``routing.resolve`` + ``WeightedPicker``), so weights take effect as soon as the API server has them;
- a load generator: a ticker issuing ``rps`` requests per second into a bounded queue, and a fixed pool of senders.
  When the senders fall behind, extra requests are dropped (counted in ``dropped``), never piled up;
- optionally a control server: ``POST /control/error-rate?version=v05&rate=0.2``,
  ``POST /control/latency?version=v05&ms=150``, ``POST /control/rps?rps=80``, ``GET /control/state`` (JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from .routing import Route, WeightedPicker, resolve
from .watch import RouteWatcher
from .workload import LOOPBACK, Workload, check_rate

log = logging.getLogger("meshsim")

NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
TICK = 0.02


class MeshSim:
    """One service's mesh. Use ``async with MeshSim(...) as sim`` or ``await start()`` / ``await close()``."""

    def __init__(
        self,
        *,
        kubeconfig: str | os.PathLike[str],
        namespace: str,
        service: str,
        versions: Iterable[str],
        rps: float = 40.0,
        error_rates: Mapping[str, float] | None = None,
        latencies_ms: Mapping[str, float] | None = None,
        targets_dir: str | os.PathLike[str] | None = None,
        control_port: int | None = None,
        senders: int = 32,
        seed: int = 0,
    ) -> None:
        self.versions = list(dict.fromkeys(versions))
        if not self.versions:
            raise ValueError("at least one version is needed")
        for name in (namespace, service, *self.versions):
            if not NAME.match(name):
                raise ValueError(f"not a valid name or version: {name!r}")
        for what, mapping in (("error rate", error_rates or {}), ("latency", latencies_ms or {})):
            unknown = set(mapping) - set(self.versions)
            if unknown:
                raise ValueError(f"{what} given for unknown versions {sorted(unknown)}")
        self.kubeconfig, self.namespace, self.service = str(kubeconfig), namespace, service
        self.targets_dir = None if targets_dir is None else Path(targets_dir)
        self._control_port = control_port
        self._senders = max(1, senders)
        self.workloads = {
            v: Workload(
                service=service,
                namespace=namespace,
                version=v,
                error_rate=(error_rates or {}).get(v, 0.0),
                latency_ms=(latencies_ms or {}).get(v, 0.0),
                seed=seed,
            )
            for v in self.versions
        }
        self._rps = self._check_rps(rps)
        self.route = Route(unroutable=100, problems=("not yet read from the API server",))
        self._picker = WeightedPicker.for_route(self.route)
        self._route_changed = asyncio.Event()
        self.sent = 0
        self.unrouted = 0
        self.dropped = 0
        self.failed = 0  # requests that got no HTTP answer at all
        self._api: k8s.ApiClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._watcher: RouteWatcher | None = None
        # Requests waiting for a free sender; a full queue means the senders are behind, and requests are dropped.
        self._queue: asyncio.Queue[None] = asyncio.Queue(maxsize=2 * self._senders)
        self._tasks: list[asyncio.Task[None]] = []
        self._control: web.AppRunner | None = None
        self.control_url: str | None = None
        self._started = False
        self._closed = False
        self._targets_written = False
        self._rps_changed = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------------------------------------

    async def __aenter__(self) -> MeshSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, listed_timeout: float = 15.0) -> None:
        """Serve every version, publish the scrape targets, read the routes, then start the load."""
        if self._started:
            raise RuntimeError("MeshSim.start() was already called")
        self._started = True
        try:
            configuration = k8s.Configuration()
            await k8s_config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration)
            self._api = k8s.ApiClient(configuration)
            for workload in self.workloads.values():
                await workload.start()
            self._write_targets()
            self._session = aiohttp.ClientSession(timeout=REQUEST_TIMEOUT)
            self._watcher = RouteWatcher(
                self._api, namespace=self.namespace, name=self.service, on_change=self._update_route
            )
            self._spawn(self._watcher.run(), "watch")
            async with asyncio.timeout(listed_timeout):
                await self._watcher.wait_listed()
            self._update_route()
            if self._control_port is not None:
                await self._start_control(self._control_port)
            self._spawn(self._ticker(), "ticker")
            for i in range(self._senders):
                self._spawn(self._sender(), f"sender-{i}")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the load, the watch and the servers; remove the target list. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._remove_targets()
        if self._control is not None:
            await self._control.cleanup()
        if self._session is not None:
            await self._session.close()
        for workload in self.workloads.values():
            await workload.close()
        if self._api is not None:
            await self._api.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"meshsim-{name}")
        task.add_done_callback(_report_crash)
        self._tasks.append(task)

    # -- what tests and people ask ------------------------------------------------------------------------------

    def weights(self) -> dict[str, int]:
        """Percent of requests per version that the simulator routes by now (from the watched objects)."""
        return dict(self.route.weights)

    def served(self) -> dict[str, tuple[int, int]]:
        """Per version: (requests answered 200, requests answered 500), since start."""
        return {v: (w.served.ok, w.served.errors) for v, w in self.workloads.items()}

    def error_rates(self) -> dict[str, float]:
        return {v: w.error_rate for v, w in self.workloads.items()}

    def addresses(self) -> dict[str, str]:
        """Per version: host:port of its server (``/`` answers requests, ``/metrics`` Istio's metrics)."""
        return {v: w.address for v, w in self.workloads.items()}

    @property
    def rps(self) -> float:
        return self._rps

    @property
    def targets_file(self) -> Path | None:
        if self.targets_dir is None:
            return None
        return self.targets_dir / f"meshsim-{self.namespace}-{self.service}.json"

    def set_error_rate(self, version: str, rate: float) -> None:
        self._workload(version).error_rate = check_rate(rate)
        log.info("error rate of %s is now %s", version, rate)

    def set_latency(self, version: str, ms: float) -> None:
        if ms < 0:
            raise ValueError(f"a latency is not negative: {ms}")
        self._workload(version).latency_ms = float(ms)
        log.info("latency of %s is now %sms", version, ms)

    def set_rps(self, rps: float) -> None:
        self._rps = self._check_rps(rps)
        self._rps_changed.set()
        log.info("load is now %s requests/s", rps)

    async def wait_for_weights(self, expected: Mapping[str, int], *, timeout: float = 10.0) -> None:
        """Return once the simulator routes by exactly ``expected`` (versions with weight 0 may be left out)."""
        wanted = {v: w for v, w in expected.items() if w}
        async with asyncio.timeout(timeout):
            while {v: w for v, w in self.route.weights.items() if w} != wanted or self.route.unroutable:
                self._route_changed.clear()
                await self._route_changed.wait()

    def state(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "namespace": self.namespace,
            "route": self.route.describe(),
            "weights": self.weights(),
            "unroutable_weight": self.route.unroutable,
            "served": {v: {"ok": ok, "errors": errors} for v, (ok, errors) in self.served().items()},
            "error_rates": self.error_rates(),
            "latencies_ms": {v: w.latency_ms for v, w in self.workloads.items()},
            "rps": self._rps,
            "sent": self.sent,
            "unrouted": self.unrouted,
            "dropped": self.dropped,
            "failed": self.failed,
            "addresses": self.addresses(),
            "targets_file": None if self.targets_file is None else str(self.targets_file),
        }

    def _workload(self, version: str) -> Workload:
        try:
            return self.workloads[version]
        except KeyError:
            raise ValueError(f"unknown version {version!r}; simulated: {', '.join(self.versions)}") from None

    @staticmethod
    def _check_rps(rps: float) -> float:
        if not 0 <= rps <= 10_000:
            raise ValueError(f"rps must be between 0 and 10000, not {rps}")
        return float(rps)

    # -- routing ------------------------------------------------------------------------------------------------

    def _update_route(self) -> None:
        assert self._watcher is not None
        if not self._watcher.listed:
            return  # half of the picture (a VirtualService, no DestinationRule yet) would be a made-up route
        route = resolve(
            self._watcher.virtual_service,
            self._watcher.destination_rule,
            service=self.service,
            namespace=self.namespace,
            versions=self.versions,
        )
        if route != self.route:
            log.info("%s/%s now routes %s", self.namespace, self.service, route.describe())
            self.route = route
            self._picker = WeightedPicker.for_route(route)
            self._route_changed.set()

    # -- load ---------------------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        """Put ``rps`` tokens a second into the queue, spread evenly; what does not fit is dropped."""
        loop = asyncio.get_running_loop()
        while True:
            self._rps_changed.clear()
            rps, start, issued = self._rps, loop.time(), 0
            while not self._rps_changed.is_set():
                due = int((loop.time() - start) * rps) - issued
                for _ in range(due):
                    try:
                        self._queue.put_nowait(None)
                    except asyncio.QueueFull:
                        self.dropped += 1
                issued += due
                await asyncio.sleep(TICK)

    async def _sender(self) -> None:
        assert self._session is not None
        while True:
            await self._queue.get()
            version = self._picker.pick()
            if version is None:
                self.unrouted += 1
                continue
            self.sent += 1
            try:
                async with self._session.get(self.workloads[version].url) as resp:
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed += 1
                log.debug("request to %s failed: %r", version, exc)

    # -- scrape targets -----------------------------------------------------------------------------------------

    def _write_targets(self) -> None:
        path = self.targets_file
        if path is None:
            return
        assert self.targets_dir is not None
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        groups = [
            {"targets": [w.address], "labels": {"meshsim_service": self.service, "meshsim_version": v}}
            for v, w in self.workloads.items()
        ]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(groups, indent=2))
        tmp.replace(path)
        self._targets_written = True

    def _remove_targets(self) -> None:
        if self._targets_written and self.targets_file is not None:
            self.targets_file.unlink(missing_ok=True)
            self._targets_written = False

    # -- control server -----------------------------------------------------------------------------------------

    async def _start_control(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/control/error-rate", self._control_error_rate)
        app.router.add_post("/control/latency", self._control_latency)
        app.router.add_post("/control/rps", self._control_rps)
        app.router.add_get("/control/state", self._control_state)
        self._control = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._control.setup()
        await web.TCPSite(self._control, LOOPBACK, port).start()
        self.control_url = f"http://{LOOPBACK}:{self._control.addresses[0][1]}"

    async def _control_error_rate(self, request: web.Request) -> web.Response:
        return self._apply(request, lambda q: self.set_error_rate(q["version"], float(q["rate"])))

    async def _control_latency(self, request: web.Request) -> web.Response:
        return self._apply(request, lambda q: self.set_latency(q["version"], float(q["ms"])))

    async def _control_rps(self, request: web.Request) -> web.Response:
        return self._apply(request, lambda q: self.set_rps(float(q["rps"])))

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    def _apply(self, request: web.Request, change: Callable[[Mapping[str, str]], None]) -> web.Response:
        try:
            change(request.query)
        except KeyError as exc:
            return web.json_response({"error": f"missing query parameter {exc}"}, status=400)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.state())


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception())
