"""Prometheus's query API from the providers file: Prometheus itself, VictoriaMetrics, Thanos, Mimir, Cortex.

The default provider ``prometheus`` is :class:`birdwatch.prometheus.PrometheusClient`, built from
``--prometheus-url``; this type is for more of them, with credentials from files and extra headers (a tenant's
``X-Scope-OrgID`` for Mimir or Cortex). Answers are read by the same code as the default's.
"""

from __future__ import annotations

from typing import ClassVar

from birdwatch.prometheus import interpret

from .config import ProviderSpec
from .http import HttpProvider

OPTIONS: frozenset[str] = frozenset()


class PrometheusProvider(HttpProvider):
    kind: ClassVar[str] = "Prometheus"
    _ready_path: ClassVar[str | None] = "/-/ready"

    async def _attempt(self, expression: str, bound: float) -> float | None:
        # POST, form-encoded: a query too long for a URL still fits in a body.
        answer = await self._request("POST", f"{self._base}/api/v1/query", bound=bound, data={"query": expression})
        return interpret(
            base=self._base,
            status=answer.status,
            reason=answer.reason,
            content_type=answer.content_type,
            body=answer.body,
            authenticated=bool(self._spec.username or self._spec.token_file or self._spec.header_files),
        )


def build(spec: ProviderSpec) -> PrometheusProvider:
    return PrometheusProvider(spec)
