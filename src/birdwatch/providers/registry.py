"""The named providers a controller may ask: built from the providers file and the default ``prometheus``, each
wrapped so that every query is counted and timed by provider and result, whichever backend answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Protocol

from . import datadog, graphite, influxdb, loki, newrelic, prometheus, web
from .base import Provider
from .config import COMMON_KEYS, ProviderConfigError, ProviderSpec
from .errors import AmbiguousResult, BadQuery, QueryError

__all__ = ["DEFAULT", "Observe", "Providers", "build_providers", "check_specs"]

DEFAULT = "prometheus"


class _Type(Protocol):
    OPTIONS: frozenset[str]

    def build(self, spec: ProviderSpec) -> Provider: ...


# One module per type; read-only so no one adds to it at run time.
TYPES: Mapping[str, _Type] = MappingProxyType(
    {
        "prometheus": prometheus,
        "influxdb": influxdb,
        "graphite": graphite,
        "loki": loki,
        "datadog": datadog,
        "newrelic": newrelic,
        "web": web,
    }
)

Observe = Callable[[str, str, float], None]
"""Hears of every query: the provider's name, its result (value, no_data, rejected, unavailable, error), seconds."""


class _Instrumented:
    """A provider whose queries are counted and timed; otherwise the provider itself."""

    def __init__(self, inner: Provider, observe: Observe) -> None:
        self._inner = inner
        self._observe = observe

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def kind(self) -> str:
        return self._inner.kind

    @property
    def address(self) -> str:
        return self._inner.address

    async def query(self, expression: str, *, budget: float = 0.0) -> float | None:
        started = time.monotonic()
        result = "error"
        try:
            value = await self._inner.query(expression, budget=budget)
            result = "value" if value is not None else "no_data"
            return value
        except (BadQuery, AmbiguousResult):
            result = "rejected"
            raise
        except QueryError as exc:
            result = "unavailable" if exc.retryable else "error"
            raise
        finally:
            self._observe(self._inner.name, result, time.monotonic() - started)

    async def ready(self) -> tuple[bool, str]:
        return await self._inner.ready()

    async def close(self) -> None:
        await self._inner.close()


class Providers:
    """Name -> provider, shared by every canary. ``get`` answers None for a name nobody configured."""

    def __init__(self, providers: Iterable[Provider], *, observe: Observe | None = None) -> None:
        self._by_name: dict[str, Provider] = {}
        for provider in providers:
            self._by_name[provider.name] = _Instrumented(provider, observe) if observe is not None else provider

    def get(self, name: str) -> Provider | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._by_name[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._by_name)

    async def ready(self) -> dict[str, tuple[bool, str]]:
        """Every provider's readiness, asked side by side (a slow one does not hold up the others' answers)."""
        providers = list(self)
        answers = await asyncio.gather(*(p.ready() for p in providers))
        return {p.name: answer for p, answer in zip(providers, answers, strict=True)}

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self._by_name.values()), return_exceptions=True)


def build_providers(
    specs: Iterable[ProviderSpec], *, default: Provider | None = None, observe: Observe | None = None
) -> Providers:
    """The registry: ``default`` (today's ``--prometheus-url``) unless the file names one ``prometheus`` itself."""
    built = [_build(spec) for spec in specs]
    if default is not None and all(p.name != default.name for p in built):
        built.insert(0, default)
    return Providers(built, observe=observe)


def check_specs(specs: Iterable[ProviderSpec]) -> None:
    """Raise :class:`ProviderConfigError` for the first entry its type cannot use (at start-up, before anything
    runs). A provider holds nothing until its first query, so building one to check it costs nothing."""
    for spec in specs:
        _build(spec)


def _build(spec: ProviderSpec) -> Provider:
    kind = TYPES[spec.type]
    unknown = sorted(set(spec.options) - kind.OPTIONS)
    if unknown:
        allowed = ", ".join(sorted(COMMON_KEYS | kind.OPTIONS))
        raise ProviderConfigError(
            f"provider {spec.name!r}: unknown key(s) for type {spec.type}: {', '.join(unknown)} (known: {allowed})"
        )
    return kind.build(spec)
