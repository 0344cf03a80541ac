"""Prometheus's query API: Prometheus itself, VictoriaMetrics, Thanos, Mimir, Cortex.

:class:`PrometheusProvider` is the ``prometheus`` type of the providers file (credentials from files, extra headers
such as a tenant's ``X-Scope-OrgID`` for Mimir or Cortex) and, built from ``--prometheus-url``, the default
provider (:class:`birdwatch.prometheus.PrometheusClient`). Here too is how an answer becomes one number or a typed
error (:func:`interpret`, :func:`one_number`, which Loki's metric queries share).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlencode

from .config import ProviderSpec
from .errors import AmbiguousResult, BadQuery, QueryError, Unavailable
from .http import HttpProvider, snippet

__all__ = ["OPTIONS", "PrometheusProvider", "build", "interpret", "one_number"]

OPTIONS: frozenset[str] = frozenset()
_MAX_LABEL_SETS_SHOWN = 3
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # what aiohttp sends with a form given as a dict


class PrometheusProvider(HttpProvider):
    kind: ClassVar[str] = "Prometheus"
    _ready_path: ClassVar[str | None] = "/-/ready"
    _credential_noun: ClassVar[str] = "bearer token"

    async def _attempt(self, expression: str, bound: float) -> float | None:
        # POST, form-encoded: a query too long for a URL still fits in a body. Encoded here, to the bytes aiohttp
        # would make of {"query": expression}: given a dict, aiohttp first fails a payload look-up (an exception),
        # then builds a FormData to encode it, 32 us a query where this is 8.
        own_type = any(h.lower() == "content-type" for h in (*self._spec.headers, *self._spec.header_files))
        answer = await self._request(
            "POST",
            f"{self._base}/api/v1/query",
            bound=bound,
            data=urlencode({"query": expression}).encode(),
            headers=None if own_type else _FORM,
        )
        return interpret(
            base=self._base,
            status=answer.status,
            reason=answer.reason,
            content_type=answer.content_type,
            body=answer.body,
            authenticated=bool(
                self._spec.username or self._spec.token_file or self._spec.header_files or self._password
            ),
        )


def build(spec: ProviderSpec) -> PrometheusProvider:
    return PrometheusProvider(spec)


@dataclass(frozen=True)
class _Answer:
    base: str
    status: int
    reason: str
    content_type: str
    body: bytes
    authenticated: bool


def _interpret(answer: _Answer) -> float | None:
    status, base = answer.status, answer.base
    try:
        doc: Any = json.loads(answer.body)
    except ValueError:
        doc = None
    prom_error = _prometheus_error(doc)

    if status in (400, 422) and prom_error is not None:
        raise BadQuery(prom_error[1])
    if status >= 500 or status in (408, 429):
        why = f"{prom_error[0]}: {prom_error[1]}" if prom_error else snippet(answer.body)
        raise Unavailable(f"Prometheus at {base} answered HTTP {status} {answer.reason}: {why or 'no explanation'}")
    if status in (401, 403):
        hint = "refused the credentials" if answer.authenticated else "wants credentials (set username or token)"
        raise QueryError(f"Prometheus at {base} {hint}: HTTP {status} {answer.reason}", retryable=False)
    if not 200 <= status < 300:
        why = prom_error[1] if prom_error else snippet(answer.body)
        raise QueryError(f"Prometheus at {base} answered HTTP {status} {answer.reason}: {why}", retryable=False)
    if not isinstance(doc, dict):
        raise Unavailable(
            f"Prometheus at {base} answered with something that is not Prometheus's JSON "
            f"(HTTP {status}, {answer.content_type}): {snippet(answer.body)}"
        )
    if prom_error is not None:
        raise Unavailable(f"Prometheus at {base} answered an error: {prom_error[0]}: {prom_error[1]}")
    try:
        return one_number(doc["data"])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise Unavailable(f"Prometheus at {base} answered JSON of an unexpected shape: {snippet(answer.body)}") from exc


def interpret(
    *, base: str, status: int, reason: str, content_type: str, body: bytes, authenticated: bool
) -> float | None:
    """The number in an answer of Prometheus's query API (or of one that speaks it: VictoriaMetrics, Thanos,
    Mimir, Cortex), or the typed error it amounts to. ``reason`` and ``body`` must be scrubbed of secrets already."""
    return _interpret(
        _Answer(
            base=base, status=status, reason=reason, content_type=content_type, body=body, authenticated=authenticated
        )
    )


def _prometheus_error(doc: Any) -> tuple[str, str] | None:
    if isinstance(doc, dict) and doc.get("status") == "error":
        return str(doc.get("errorType", "error")), str(doc.get("error", ""))
    return None


def one_number(data: Mapping[str, Any]) -> float | None:
    """The number in a query answer's ``data`` (Prometheus's shape, which Loki's metric queries share too)."""
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return _sample(result)
    if kind == "vector":
        if not result:
            return None
        if len(result) > 1:
            raise AmbiguousResult(
                f"the query returned {len(result)} series ({_label_sets(result)}) where one number is needed; "
                "aggregate them into one, e.g. with sum(...) or max(...)"
            )
        series = result[0]
        if "value" not in series and "histogram" in series:
            raise AmbiguousResult(
                "the query returned a native histogram, not a number; "
                "reduce it with e.g. histogram_quantile(...) or histogram_sum(...)"
            )
        return _sample(series["value"])
    if kind == "matrix":
        raise AmbiguousResult(
            f"the query returned a range vector of {len(result)} series where one number is needed; "
            "reduce it with e.g. rate(...) or avg_over_time(...) and aggregate it with e.g. sum(...)"
        )
    raise AmbiguousResult(f"the query returned a {kind}, not a number")


def _sample(pair: list[Any]) -> float | None:
    value = float(pair[1])
    # Prometheus says NaN where a ratio has nothing to divide (no traffic yet): that is no data, not a number.
    return None if math.isnan(value) else value


def _label_sets(result: list[dict[str, Any]]) -> str:
    shown = []
    for series in result[:_MAX_LABEL_SETS_SHOWN]:
        labels = ", ".join(f'{k}="{v}"' for k, v in sorted(series.get("metric", {}).items()))
        shown.append("{" + labels + "}")
    more = ", ..." if len(result) > _MAX_LABEL_SETS_SHOWN else ""
    return ", ".join(shown) + more
