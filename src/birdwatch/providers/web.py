"""Any HTTP(S) endpoint answering JSON: the BirdWatch's ``metric`` is a JSONPath (RFC 9535) that picks the number.

Options: ``method`` (GET or POST, default GET), ``body`` (sent with POST, as JSON text). Headers: ``headers``
(plain) and ``header_files`` (values read from files, for API keys); or ``username`` + ``password_file``, or
``token_file`` (a bearer token). The ``address`` is the endpoint's whole URL.

JSONPath is parsed by ``python-jsonpath`` (a maintained, typed, pure-Python implementation of RFC 9535), so the
language is the standard's, not a hand-written subset. A path that does not parse is rejected with that library's
words; a path matching nothing, or ``null``, is no data; one matching several values is ambiguous.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, ClassVar

from .config import ProviderConfigError, ProviderSpec
from .errors import AmbiguousResult, BadQuery, Unavailable
from .http import Answer, HttpProvider, snippet

if TYPE_CHECKING:
    import jsonpath

OPTIONS = frozenset({"method", "body"})
_MAX_PATHS = 1024


class WebProvider(HttpProvider):
    kind: ClassVar[str] = "the web endpoint"

    def __init__(self, spec: ProviderSpec) -> None:
        super().__init__(spec)
        method = (spec.option("method") or "GET").upper()
        if method not in ("GET", "POST"):
            raise ProviderConfigError(f"provider {spec.name!r}: method must be GET or POST, not {method!r}")
        self._method = method
        self._body = spec.option("body")
        self._paths: dict[str, jsonpath.JSONPath | jsonpath.CompoundJSONPath] = {}

    async def _probe(self, bound: float) -> None:
        answer = await self._fetch(bound)
        if not answer.ok:
            raise Unavailable(f"the web endpoint {self._base} answered HTTP {answer.status} {answer.reason}")

    async def _attempt(self, expression: str, bound: float) -> float | None:
        path = self._compile(expression)
        answer = await self._fetch(bound)
        if not answer.ok:
            raise self._refused(answer)
        try:
            doc = json.loads(answer.body)
        except ValueError:
            raise Unavailable(
                f"the web endpoint {self._base} answered something that is not JSON "
                f"(HTTP {answer.status}, {answer.content_type}): {snippet(answer.body)}"
            ) from None
        found = path.findall(doc)
        if not found:
            return None
        if len(found) > 1:
            raise AmbiguousResult(
                f"the JSONPath {expression} matched {len(found)} values ({snippet(json.dumps(found[:3]))}) where "
                "one number is needed"
            )
        return _number(found[0], expression)

    async def _fetch(self, bound: float) -> Answer:
        headers = {"Content-Type": "application/json"} if self._body is not None else None
        return await self._request(self._method, self._base, bound=bound, data=self._body, headers=headers)

    def _compile(self, expression: str) -> jsonpath.JSONPath | jsonpath.CompoundJSONPath:
        compiled = self._paths.get(expression)
        if compiled is None:
            # Here, not at the top: python-jsonpath (1.5 MB of RSS) only for a configuration that uses this type.
            import jsonpath

            try:
                compiled = jsonpath.compile(expression)
            except jsonpath.JSONPathError as exc:
                raise BadQuery(f"the JSONPath {expression!r} does not parse: {' '.join(str(exc).split())}") from None
            # Canaries ask the same few paths every step; parse each once (bounded: specs come and go).
            if len(self._paths) >= _MAX_PATHS:
                self._paths.clear()
            self._paths[expression] = compiled
        return compiled


def _number(value: Any, expression: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise AmbiguousResult(f"the JSONPath {expression} matched {value!r}, not a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        # Some endpoints quote their numbers (as Prometheus does); take those, nothing else.
        try:
            number = float(value)
        except ValueError:
            raise AmbiguousResult(f"the JSONPath {expression} matched {snippet(value)!r}, not a number") from None
    else:
        raise AmbiguousResult(f"the JSONPath {expression} matched {snippet(json.dumps(value))}, not a number")
    return None if math.isnan(number) else number


def build(spec: ProviderSpec) -> WebProvider:
    return WebProvider(spec)
