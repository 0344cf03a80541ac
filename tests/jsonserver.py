"""A real local HTTP server answering JSON for the ``web`` provider: ``GET /stats`` returns ``document``, which the
test changes; with ``api_key`` set, only requests carrying ``X-Api-Key: <api_key>`` get it (others 401)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from wireserver import WireServer


class JsonServer(WireServer):
    def __init__(self, *, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.document: Any = {}

    @property
    def endpoint(self) -> str:
        return f"{self.url}/stats"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/stats", self._stats)

    async def _stats(self, request: web.Request) -> web.Response:
        if self.api_key is not None and request.headers.get("X-Api-Key") != self.api_key:
            # Echo what was sent, as careless servers do: birdwatch must scrub it.
            said = request.headers.get("X-Api-Key", "")
            return web.json_response({"error": f"bad key {said}"}, status=401)
        return web.Response(text=json.dumps(self.document), content_type="application/json")
