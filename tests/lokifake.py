"""A local server speaking Loki's query API (``GET /loki/api/v1/query``, ``GET /ready``). Grafana Loki cannot run
here (no Debian package: Debian's ``loki`` is a genetics program; Grafana's own builds would be downloaded), so this
answers as Loki 2.x does over a real socket.

``sum(rate({ns="<ns>"} |= "error" [<d>]))`` (and ``count_over_time``) answers ``values["<ns>"]`` as a vector in
Loki's JSON (an absent key: an empty vector); a bare selector ``{...}`` answers streams; anything else HTTP 400 with
Loki's plain-text parse error.
"""

from __future__ import annotations

import re
import time

from aiohttp import web

from wireserver import WireServer

METRIC = re.compile(r'^sum\((?:rate|count_over_time)\(\{ns="([\w-]+)"\}(?: \|= "\w+")? \[\d+[smh]\]\)\)$')
SELECTOR = re.compile(r'^\{ns="([\w-]+)"\}')


class FakeLoki(WireServer):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/loki/api/v1/query", self._query)
        app.router.add_get("/ready", self._ready)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    async def _query(self, request: web.Request) -> web.Response:
        query = request.query.get("query", "")
        now = time.time()
        match = METRIC.match(query)
        if match is not None:
            value = self.values.get(match[1], None)
            result = [] if match[1] not in self.values else [{"metric": {}, "value": [now, str(value)]}]
            return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})
        if SELECTOR.fullmatch(query):
            stream = {"stream": {"ns": "x"}, "values": [[str(int(now * 1e9)), "GET /health 500"]]}
            return web.json_response({"status": "success", "data": {"resultType": "streams", "result": [stream]}})
        col = next((i + 1 for i, c in enumerate(query) if c in "()[]"), len(query))
        return web.Response(status=400, text=f"parse error at line 1, col {col}: syntax error: unexpected IDENTIFIER\n")
