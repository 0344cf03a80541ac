"""InfluxDB: InfluxQL over the 1.x HTTP API (``/query``), which InfluxDB 2.x also serves for compatibility.

Options: ``database`` (required), ``retention_policy``. Credentials: ``username`` + ``password_file`` (1.x), or
``token_file`` (2.x, sent as ``Authorization: Token ...``).

The query must come back as one number: one statement, one series, one row and one field besides ``time``, e.g.
``SELECT last("value") FROM "errors" WHERE "service" = 'aleph' AND time > now() - 1m``.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

from .config import ProviderConfigError, ProviderSpec
from .errors import AmbiguousResult, BadQuery, Unavailable
from .http import HttpProvider, snippet

OPTIONS = frozenset({"database", "retention_policy"})


class InfluxDBProvider(HttpProvider):
    kind: ClassVar[str] = "InfluxDB"
    _ready_path: ClassVar[str | None] = "/ping"

    def __init__(self, spec: ProviderSpec) -> None:
        super().__init__(spec)
        database = spec.option("database")
        if not database:
            raise ProviderConfigError(f"provider {spec.name!r}: an influxdb provider needs a database")
        self._params = {"db": database, "epoch": "s"}
        rp = spec.option("retention_policy")
        if rp:
            self._params["rp"] = rp

    def _token_scheme(self) -> str:
        return "Token"

    async def _attempt(self, expression: str, bound: float) -> float | None:
        # POST, form-encoded: a long query still fits, and a SELECT over POST is what the API allows.
        answer = await self._request(
            "POST", f"{self._base}/query", bound=bound, params=self._params, data={"q": expression}
        )
        doc = _json(answer.body)
        error = doc.get("error") if isinstance(doc, dict) else None
        if not answer.ok:
            raise self._refused(answer, str(error) if error else "")
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
            raise Unavailable(
                f"InfluxDB at {self._base} answered something that is not InfluxDB's JSON: {snippet(answer.body)}"
            )
        if error:
            raise Unavailable(f"InfluxDB at {self._base} answered an error: {error}")
        return _one_number(doc["results"])


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _one_number(results: list[Any]) -> float | None:
    if len(results) != 1:
        raise AmbiguousResult(f"the query has {len(results)} statements where one is needed")
    result = results[0]
    if result.get("error"):
        # e.g. "database not found: x": InfluxDB's words, and asking again will not change them.
        raise BadQuery(str(result["error"]))
    series = result.get("series") or []
    if not series:
        return None
    if len(series) > 1:
        names = ", ".join(_series_name(s) for s in series[:3]) + (", ..." if len(series) > 3 else "")
        raise AmbiguousResult(
            f"the query returned {len(series)} series ({names}) where one number is needed; "
            "drop the GROUP BY or aggregate them"
        )
    columns, rows = series[0].get("columns") or [], series[0].get("values") or []
    if not rows:
        return None
    if len(rows) > 1:
        raise AmbiguousResult(
            f"the query returned {len(rows)} rows where one number is needed; "
            "select one with an aggregate such as last(), mean() or max()"
        )
    fields = [(c, v) for c, v in zip(columns, rows[0], strict=False) if c != "time"]
    if len(fields) != 1:
        raise AmbiguousResult(
            f"the query returned {len(fields)} fields ({', '.join(c for c, _ in fields)}); select one"
        )
    value = fields[0][1]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AmbiguousResult(f"the query returned {value!r}, not a number")
    number = float(value)
    return None if math.isnan(number) else number


def _series_name(series: dict[str, Any]) -> str:
    tags = ",".join(f"{k}={v}" for k, v in sorted((series.get("tags") or {}).items()))
    return f"{series.get('name', '?')}{{{tags}}}"


def build(spec: ProviderSpec) -> InfluxDBProvider:
    return InfluxDBProvider(spec)
