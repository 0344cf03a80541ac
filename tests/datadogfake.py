"""A local server speaking Datadog's metrics query API (``GET /api/v1/query``, ``GET /api/v1/validate``), since
Datadog's servers cannot be reached from tests.

Keys are checked as Datadog checks them (``DD-API-KEY``, ``DD-APPLICATION-KEY``; 403 ``{"errors": ["Forbidden"]}``).
A query ``<agg>:<metric>{<scope>}`` answers the series ``values["<metric>{<scope>}"]`` as Datadog's JSON (a
pointlist of ``[ms, value]`` over the asked window); anything else is refused with HTTP 400 and Datadog's error
shape. A key whose value is ``None`` is a series with only null points.
"""

from __future__ import annotations

import re

from aiohttp import web

from wireserver import WireServer

QUERY = re.compile(r"^(avg|sum|min|max):([A-Za-z][\w.]*)\{([^{}]*)\}$")


class FakeDatadog(WireServer):
    def __init__(self, *, api_key: str, app_key: str) -> None:
        super().__init__()
        self.api_key, self.app_key = api_key, app_key

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/query", self._query)
        app.router.add_get("/api/v1/validate", self._validate)

    def _forbidden(self, request: web.Request, *, app_key: bool = True) -> web.Response | None:
        good = request.headers.get("DD-API-KEY") == self.api_key
        if app_key:
            good = good and request.headers.get("DD-APPLICATION-KEY") == self.app_key
        return None if good else web.json_response({"errors": ["Forbidden"]}, status=403)

    async def _validate(self, request: web.Request) -> web.Response:
        return self._forbidden(request, app_key=False) or web.json_response({"valid": True})

    async def _query(self, request: web.Request) -> web.Response:
        refused = self._forbidden(request)
        if refused is not None:
            return refused
        query = request.query.get("query", "")
        try:
            start, end = int(request.query["from"]), int(request.query["to"])
        except (KeyError, ValueError):
            return web.json_response({"errors": ["The from and to parameters are required"]}, status=400)
        match = QUERY.match(query)
        if match is None:
            return web.json_response(
                {
                    "status": "error",
                    "res_type": "time_series",
                    "series": [],
                    "error": f"Error parsing query: \n unable to parse {query}: Rule 'scope_expr' didn't match",
                    "query": query,
                },
                status=400,
            )
        key = f"{match[2]}{{{match[3]}}}"
        series = []
        if key in self.values:
            value = self.values[key]
            points = [[float(t * 1000), value] for t in range(max(start, end - 60), end + 1, 20)]
            series.append(
                {
                    "metric": match[2],
                    "scope": match[3],
                    "expression": query,
                    "pointlist": points,
                    "length": len(points),
                    "aggr": match[1],
                }
            )
        return web.json_response(
            {
                "status": "ok",
                "res_type": "time_series",
                "series": series,
                "from_date": start * 1000,
                "to_date": end * 1000,
                "query": query,
                "message": "",
                "error": None,
            }
        )
