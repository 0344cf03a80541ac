"""Datadog: the metrics query API (``GET /api/v1/query``), e.g.
``sum:trace.http.request.errors{service:aleph,version:v04}.as_count()``.

Options: ``api_key_file`` and ``application_key_file`` (both required: files holding the keys, sent as
``DD-API-KEY`` / ``DD-APPLICATION-KEY``), ``window`` (seconds of history asked for, default 300). The value is
the last non-null point of the one series the query returns. ``address`` is the site's API, e.g.
``https://api.datadoghq.com`` or ``https://api.datadoghq.eu``.

aiohttp rather than ``datadog-api-client``: that client's async mode needs another HTTP library (aiosonic) and its
generated models add tens of megabytes of imports to a process that asks one GET per step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar

from .config import ProviderConfigError, ProviderSpec
from .errors import AmbiguousResult, Unavailable
from .http import HttpProvider, snippet
from .secrets import FileSecret

OPTIONS = frozenset({"api_key_file", "application_key_file", "window"})


class DatadogProvider(HttpProvider):
    kind: ClassVar[str] = "Datadog"

    def __init__(self, spec: ProviderSpec) -> None:
        super().__init__(spec)
        keys: list[FileSecret] = []
        for option, what in (("api_key_file", "Datadog API key"), ("application_key_file", "Datadog application key")):
            path = spec.option(option)
            if not path or not Path(path).is_file():
                raise ProviderConfigError(f"provider {spec.name!r}: {option} must name a file holding the {what}")
            keys.append(FileSecret(Path(path), what=what))
            self.scrubber.add(keys[-1])
        self._api_key, self._app_key = keys
        try:
            self._window = int(spec.option("window") or 300)
        except ValueError:
            raise ProviderConfigError(f"provider {spec.name!r}: window must be a number of seconds") from None
        if not 0 < self._window <= 86400:
            raise ProviderConfigError(f"provider {spec.name!r}: window must be 1-86400 seconds")

    def _keys(self) -> dict[str, str]:
        return {"DD-API-KEY": self._api_key.value(), "DD-APPLICATION-KEY": self._app_key.value()}

    async def _probe(self, bound: float) -> None:
        answer = await self._request("GET", f"{self._base}/api/v1/validate", bound=bound, headers=self._keys())
        if not answer.ok:
            raise self._refused(answer, _errors(_json(answer.body)))

    async def _attempt(self, expression: str, bound: float) -> float | None:
        now = int(time.time())
        params = {"from": str(now - self._window), "to": str(now), "query": expression}
        answer = await self._request(
            "GET", f"{self._base}/api/v1/query", bound=bound, params=params, headers=self._keys()
        )
        doc = _json(answer.body)
        if not answer.ok:
            raise self._refused(answer, _errors(doc))
        if not isinstance(doc, dict):
            raise Unavailable(
                f"Datadog at {self._base} answered something that is not Datadog's JSON: {snippet(answer.body)}"
            )
        if doc.get("status") == "error" or doc.get("error"):
            raise Unavailable(f"Datadog at {self._base} answered an error: {doc.get('error') or 'no explanation'}")
        series = doc.get("series") or []
        if not series:
            return None
        if len(series) > 1:
            scopes = ", ".join(str(s.get("scope", "?")) for s in series[:3]) + (", ..." if len(series) > 3 else "")
            raise AmbiguousResult(
                f"the query returned {len(series)} series ({scopes}) where one number is needed; "
                "aggregate them into one, e.g. sum:metric{...} without a 'by {...}'"
            )
        try:
            points = [p[1] for p in series[0].get("pointlist") or [] if p[1] is not None]
            value = float(points[-1]) if points else None
        except (IndexError, TypeError, ValueError) as exc:
            raise Unavailable(
                f"Datadog at {self._base} answered points of an unexpected shape: {snippet(answer.body)}"
            ) from exc
        return None if value is None or math.isnan(value) else value


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _errors(doc: Any) -> str:
    """Datadog's own explanation: ``{"errors": [...]}``, or ``{"error": "..."}`` from the query endpoint."""
    if isinstance(doc, dict):
        if isinstance(doc.get("errors"), list):
            return "; ".join(str(e) for e in doc["errors"])
        if doc.get("error"):
            return str(doc["error"])
    return ""


def build(spec: ProviderSpec) -> DatadogProvider:
    return DatadogProvider(spec)
