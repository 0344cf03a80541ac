"""Grafana Loki: LogQL metric queries over ``/loki/api/v1/query``, e.g.
``sum(rate({app="aleph"} |= "error" [1m])) / sum(rate({app="aleph"} [1m]))``.

Options: ``org_id`` (the tenant, sent as ``X-Scope-OrgID``). Loki answers metric queries in Prometheus's shape, so
the number is read by the same code; a log query (streams, not numbers) is refused with a hint.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from .config import ProviderSpec
from .errors import AmbiguousResult, Unavailable
from .http import HttpProvider, snippet
from .prometheus import one_number

OPTIONS = frozenset({"org_id"})


class LokiProvider(HttpProvider):
    kind: ClassVar[str] = "Loki"
    _ready_path: ClassVar[str | None] = "/ready"

    def __init__(self, spec: ProviderSpec) -> None:
        super().__init__(spec)
        org = spec.option("org_id")
        self._tenant = {"X-Scope-OrgID": org} if org else {}

    async def _attempt(self, expression: str, bound: float) -> float | None:
        answer = await self._request(
            "GET", f"{self._base}/loki/api/v1/query", bound=bound, params={"query": expression}, headers=self._tenant
        )
        doc = _json(answer.body)
        if not answer.ok:
            # Loki explains a bad query in plain text (older) or in Prometheus's error JSON (newer).
            why = str(doc.get("error", "")) if isinstance(doc, dict) else snippet(answer.body)
            raise self._refused(answer, why)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
            raise Unavailable(
                f"Loki at {self._base} answered something that is not Loki's JSON: {snippet(answer.body)}"
            )
        if doc.get("status") == "error":
            raise Unavailable(f"Loki at {self._base} answered an error: {doc.get('error', '')}")
        data = doc["data"]
        if data.get("resultType") == "streams":
            raise AmbiguousResult(
                "the query is a log query and returned log lines, not a number; make it a metric query, e.g. "
                'sum(count_over_time({app="aleph"} |= "error" [1m]))'
            )
        try:
            return one_number(data)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise Unavailable(
                f"Loki at {self._base} answered JSON of an unexpected shape: {snippet(answer.body)}"
            ) from exc


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def build(spec: ProviderSpec) -> LokiProvider:
    return LokiProvider(spec)
