"""A local server speaking New Relic's NerdGraph (GraphQL over ``POST /graphql``, key in ``API-Key``) for NRQL
queries, since New Relic's servers cannot be reached from tests.

``SELECT latest(<attribute>) FROM <type> WHERE ns = '<ns>' [SINCE ...]`` answers one row ``{"latest.<attribute>":
values["<attribute>{<ns>}"]}`` (no row when the key is absent); other NRQL gets NerdGraph's error for a syntax error
(HTTP 200, ``errors`` and a null ``nrql``), a bad key NerdGraph's ``UNAUTHORIZED`` error.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from wireserver import WireServer

NRQL = re.compile(r"^SELECT latest\((\w+)\) FROM \w+ WHERE ns = '([\w-]+)'(?: SINCE \d+ \w+ ago)?$", re.IGNORECASE)


class FakeNewRelic(WireServer):
    def __init__(self, *, api_key: str, account: int) -> None:
        super().__init__()
        self.api_key, self.account = api_key, account

    @property
    def endpoint(self) -> str:
        return f"{self.url}/graphql"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/graphql", self._graphql)

    async def _graphql(self, request: web.Request) -> web.Response:
        body: Any = await request.json()
        if request.headers.get("API-Key") != self.api_key:
            return _errors("Invalid credentials", "UNAUTHORIZED", data=None)
        query, variables = body.get("query", ""), body.get("variables") or {}
        if "user" in query and "nrql" not in query:
            return web.json_response({"data": {"actor": {"user": {"id": 1}}}})
        if variables.get("account") != self.account:
            return _errors(f"Account {variables.get('account')} not found", "FORBIDDEN", data=None)
        nrql = str(variables.get("nrql", ""))
        match = NRQL.match(nrql)
        if match is None:
            word = nrql.split()[0] if nrql.split() else ""
            return _errors(
                f"NRQL Syntax Error: Error at line 1 position 1, unexpected '{word}'",
                "INVALID_INPUT",
                data={"actor": {"account": {"nrql": None}}},
            )
        key = f"{match[1]}{{{match[2]}}}"
        rows = [{f"latest.{match[1]}": self.values[key]}] if key in self.values else []
        return web.json_response({"data": {"actor": {"account": {"nrql": {"results": rows}}}}})


def _errors(message: str, error_class: str, *, data: Any) -> web.Response:
    return web.json_response(
        {
            "data": data,
            "errors": [
                {"message": message, "path": ["actor", "account", "nrql"], "extensions": {"errorClass": error_class}}
            ],
        }
    )
