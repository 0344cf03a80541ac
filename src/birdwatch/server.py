"""The health and metrics endpoints (aiohttp): /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from .metrics import Metrics

Check = Callable[[], tuple[bool, str]]


class HealthServer:
    """``/healthz`` answers while the process works (its loops are alive); ``/readyz`` while every readiness check
    passes; ``/metrics`` is Prometheus's text format."""

    def __init__(
        self, *, host: str, port: int, metrics: Metrics, live: dict[str, Check], ready: dict[str, Check]
    ) -> None:
        self._host, self._port = host, port
        self._metrics = metrics
        self._live, self._ready = live, ready
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        self._app = app

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        if self._port == 0 and site._server is not None:
            sockets = getattr(site._server, "sockets", None)
            if sockets:
                self._port = int(sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _report(checks: dict[str, Check]) -> web.Response:
        lines, healthy = [], True
        for name, check in checks.items():
            ok, why = check()
            healthy = healthy and ok
            lines.append(f"[{'+' if ok else '-'}]{name} {why}")
        lines.append("ok" if healthy else "not ok")
        return web.Response(status=200 if healthy else 503, text="\n".join(lines) + "\n")

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._report(self._live)

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._report(self._ready)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        self._metrics.tasks.set(len(asyncio.all_tasks()))
        return web.Response(
            body=self._metrics.exposition(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )
