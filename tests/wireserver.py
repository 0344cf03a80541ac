"""A local aiohttp server on a loopback port that can stop answering and come back on the same port: the base of
the JSON endpoint and of the wire-protocol servers for backends that cannot run here (Datadog, New Relic, Loki)."""

from __future__ import annotations

from types import TracebackType

from aiohttp import web

from birdwatch_sandbox.envtest.controlplane import free_port


class WireServer:
    """Subclasses add routes in ``routes``; ``values`` maps a series' key to the number it holds now."""

    def __init__(self) -> None:
        self.port = free_port()
        self.values: dict[str, float | None] = {}
        self.requests: list[web.Request] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> WireServer:
        app = web.Application(middlewares=[self._record])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        """Stop answering: connections are refused until ``start()`` again."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        self.requests.append(request)
        return await handler(request)

    async def __aenter__(self) -> WireServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
