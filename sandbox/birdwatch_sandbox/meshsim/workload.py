"""One version of the simulated service: an HTTP server on a loopback port, plus what its Istio sidecar would export.

``GET /`` answers 200, or 500 at the version's error rate (decided by a ``random.Random`` seeded from the seed and
the version, so runs repeat), after an optional delay. ``GET /metrics`` serves Istio's standard metrics as the
destination's sidecar reports them: the counter ``istio_requests_total`` and the histogram
``istio_request_duration_milliseconds``, labelled ``reporter="destination"``, ``destination_service_name``,
``destination_service_namespace``, ``destination_version``, ``response_code`` and the like. As with Istio, a
series appears with the first request it counts, so a version that served nothing (or never failed) has no series.
Each workload has its own ``CollectorRegistry``.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LOOPBACK = "127.0.0.1"
# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000)
LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "response_flags",
)
SOURCE_WORKLOAD = "meshsim-loadgen"


@dataclass
class Served:
    ok: int = 0
    errors: int = 0


class Workload:
    """The pods of one version, as one HTTP server. ``start()`` binds a free loopback port."""

    def __init__(
        self,
        *,
        service: str,
        namespace: str,
        version: str,
        error_rate: float = 0.0,
        latency_ms: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.service, self.namespace, self.version = service, namespace, version
        self.error_rate = check_rate(error_rate)
        self.latency_ms = max(0.0, latency_ms)
        self.served = Served()
        self._rng = random.Random(f"{seed}:{version}")
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "istio_requests", "Requests handled, as Istio's sidecars count them.", LABELS, registry=self.registry
        )
        self._duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, as Istio's sidecars measure it.",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        app = web.Application()
        app.router.add_get("/", self._handle)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.port = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        await self._runner.cleanup()

    def _labels(self, code: int) -> dict[str, str]:
        return {
            "reporter": "destination",
            "source_workload": SOURCE_WORKLOAD,
            "source_workload_namespace": self.namespace,
            "destination_workload": f"{self.service}-{self.version}",
            "destination_workload_namespace": self.namespace,
            "destination_app": self.service,
            "destination_version": self.version,
            "destination_service": f"{self.service}.{self.namespace}.svc.cluster.local",
            "destination_service_name": self.service,
            "destination_service_namespace": self.namespace,
            "request_protocol": "http",
            "response_code": str(code),
            "response_flags": "-",
        }

    async def _handle(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        started = loop.time()
        failed = self._rng.random() < self.error_rate
        if self.latency_ms > 0:
            # +-20 % jitter around the configured delay.
            await asyncio.sleep(self.latency_ms * self._rng.uniform(0.8, 1.2) / 1000)
        code = 500 if failed else 200
        labels = self._labels(code)
        self._requests.labels(**labels).inc()
        self._duration.labels(**labels).observe((loop.time() - started) * 1000)
        if failed:
            self.served.errors += 1
            return web.Response(status=500, text=f"{self.service} {self.version}: simulated failure\n")
        self.served.ok += 1
        return web.Response(text=f"{self.service} {self.version}\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def check_rate(rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"an error rate is a fraction between 0 and 1, not {rate}")
    return float(rate)
