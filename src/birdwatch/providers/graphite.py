"""Graphite: target expressions over the render API (``/render?format=json``), e.g.
``divideSeries(sumSeries(aleph.v04.errors), sumSeries(aleph.v04.requests))``.

Options: ``from`` (how far back to look, Graphite's syntax, default ``-5min``). The value is the last non-null
point of the one series the target returns.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

from .config import ProviderSpec
from .errors import AmbiguousResult, Unavailable
from .http import HttpProvider, snippet

OPTIONS = frozenset({"from"})


class GraphiteProvider(HttpProvider):
    kind: ClassVar[str] = "Graphite"

    def __init__(self, spec: ProviderSpec) -> None:
        super().__init__(spec)
        self._from = spec.option("from") or "-5min"

    async def _probe(self, bound: float) -> None:
        answer = await self._request(
            "GET", f"{self._base}/render", bound=bound, params={"target": "constantLine(1)", "format": "json"}
        )
        if not answer.ok:
            raise self._refused(answer)

    async def _attempt(self, expression: str, bound: float) -> float | None:
        params = {"target": expression, "from": self._from, "until": "now", "format": "json"}
        answer = await self._request("GET", f"{self._base}/render", bound=bound, params=params)
        if not answer.ok:
            raise self._refused(answer, _explanation(answer.body))
        try:
            doc = json.loads(answer.body)
        except ValueError:
            doc = None
        if not isinstance(doc, list):
            raise Unavailable(
                f"Graphite at {self._base} answered something that is not Graphite's JSON: {snippet(answer.body)}"
            )
        if not doc:
            return None
        if len(doc) > 1:
            names = ", ".join(str(s.get("target", "?")) for s in doc[:3]) + (", ..." if len(doc) > 3 else "")
            raise AmbiguousResult(
                f"the target returned {len(doc)} series ({names}) where one number is needed; "
                "combine them, e.g. with sumSeries(...) or maxSeries(...)"
            )
        try:
            points = [p[0] for p in doc[0]["datapoints"] if p[0] is not None]
        except (KeyError, IndexError, TypeError) as exc:
            raise Unavailable(
                f"Graphite at {self._base} answered JSON of an unexpected shape: {snippet(answer.body)}"
            ) from exc
        if not points:
            return None
        value = float(points[-1])
        return None if math.isnan(value) else value


def _explanation(body: bytes) -> str:
    # graphite-web answers a bad target with a plain-text or small HTML page; its first lines say why.
    text = body.decode(errors="replace")
    return snippet(text) if text.strip() else ""


def build(spec: ProviderSpec) -> GraphiteProvider:
    return GraphiteProvider(spec)
