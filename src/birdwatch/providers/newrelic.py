"""New Relic: NRQL through NerdGraph (New Relic's GraphQL API), e.g.
``SELECT percentage(count(*), WHERE error IS true) FROM Transaction WHERE appName = 'aleph' SINCE 1 minute ago``.

Options: ``account_id`` (required) and ``api_key_file`` (required: a file holding a user API key, sent as
``API-Key``). ``address`` is the NerdGraph endpoint, e.g. ``https://api.newrelic.com/graphql`` (EU:
``https://api.eu.newrelic.com/graphql``). The query must return one row with one number.

aiohttp rather than a GraphQL client library: one fixed query with two variables is all birdwatch sends.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

from .config import ProviderConfigError, ProviderSpec
from .errors import AmbiguousResult, BadQuery, QueryError, Unavailable
from .http import HttpProvider, snippet
from .secrets import FileSecret

OPTIONS = frozenset({"account_id", "api_key_file"})

NRQL = "query($account: Int!, $nrql: Nrql!) { actor { account(id: $account) { nrql(query: $nrql) { results } } } }"
WHO_AM_I = "{ actor { user { id } } }"
# NerdGraph's error classes that say the service, not the query, is at fault.
_PASSING = frozenset({"TIMEOUT", "SERVER_ERROR", "INTERNAL_SERVER_ERROR", "SERVICE_UNAVAILABLE"})
_AUTH = frozenset({"UNAUTHORIZED", "FORBIDDEN", "UNAUTHENTICATED"})


class NewRelicProvider(HttpProvider):
    kind: ClassVar[str] = "New Relic"

    def __init__(self, spec: ProviderSpec) -> None:
        super().__init__(spec)
        account = spec.options.get("account_id")
        if isinstance(account, str) and account.isdigit():
            account = int(account)
        if isinstance(account, bool) or not isinstance(account, int) or account <= 0:
            raise ProviderConfigError(f"provider {spec.name!r}: account_id must be a New Relic account number")
        self._account = account
        path = spec.option("api_key_file")
        if not path or not Path(path).is_file():
            raise ProviderConfigError(f"provider {spec.name!r}: api_key_file must name a file holding the API key")
        self._key = FileSecret(Path(path), what="New Relic API key")
        self.scrubber.add(self._key)

    async def _graphql(self, query: str, variables: dict[str, Any], bound: float) -> Any:
        answer = await self._request(
            "POST",
            self._base,
            bound=bound,
            json={"query": query, "variables": variables},
            headers={"API-Key": self._key.value()},
        )
        doc = _json(answer.body)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if errors:
            raise _graphql_error(self._base, errors)
        if not answer.ok:
            raise self._refused(answer)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
            raise Unavailable(
                f"New Relic at {self._base} answered something that is not GraphQL's JSON: {snippet(answer.body)}"
            )
        return doc["data"]

    async def _probe(self, bound: float) -> None:
        await self._graphql(WHO_AM_I, {}, bound)

    async def _attempt(self, expression: str, bound: float) -> float | None:
        data = await self._graphql(NRQL, {"account": self._account, "nrql": expression}, bound)
        try:
            results = data["actor"]["account"]["nrql"]["results"]
        except (KeyError, TypeError) as exc:
            raise Unavailable(
                f"New Relic at {self._base} answered JSON of an unexpected shape: {snippet(json.dumps(data))}"
            ) from exc
        if not results:
            return None
        if len(results) > 1:
            raise AmbiguousResult(
                f"the query returned {len(results)} rows where one number is needed; drop FACET and TIMESERIES"
            )
        return _one_value(results[0])


def _one_value(row: dict[str, Any]) -> float | None:
    # NRQL puts the time window beside the value; a nested {"95": ...} holds a percentile's one number.
    values = {k: v for k, v in row.items() if k not in ("beginTimeSeconds", "endTimeSeconds", "timestamp")}
    if len(values) == 1:
        ((key, value),) = values.items()
        if isinstance(value, dict) and len(value) == 1:
            value = next(iter(value.values()))
        if value is None:
            return None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
            return None if math.isnan(number) else number
        raise AmbiguousResult(f"the query returned {key} = {snippet(json.dumps(value))}, not a number")
    raise AmbiguousResult(
        f"the query returned {len(values)} values ({', '.join(values)}) where one number is needed; select one"
    )


def _graphql_error(base: str, errors: list[Any]) -> QueryError:
    messages = [str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors]
    classes = {str((e.get("extensions") or {}).get("errorClass", "")) for e in errors if isinstance(e, dict)}
    said = "; ".join(messages)
    if classes & _AUTH:
        return QueryError(f"New Relic at {base} refused the credentials: {said}")
    if classes & _PASSING:
        return Unavailable(f"New Relic at {base} answered an error: {said}")
    return BadQuery(said)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def build(spec: ProviderSpec) -> NewRelicProvider:
    return NewRelicProvider(spec)
