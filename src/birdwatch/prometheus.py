"""The default metric provider: Prometheus at ``--prometheus-url``, one health number per canary step.

A canary's task asks one PromQL question per step ("what is the canary's error rate?") and needs one float back,
or ``None`` when there is no data yet. Everything that can go wrong is a :class:`QueryError` that says whether
asking again can help: a wrong query (:class:`BadQuery`) or one that is not a single number
(:class:`AmbiguousResult`) will not get better, an unreachable or overloaded Prometheus (:class:`Unavailable`)
may, so :meth:`PrometheusClient.query` retries only those, within the time budget its caller gives it.

The client is the providers file's ``prometheus`` type (:mod:`birdwatch.providers.prometheus`) configured from
flags: one HTTP layer, one way of reading answers, for the default provider and every other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from .providers.config import ProviderSpec
from .providers.errors import AmbiguousResult, BadQuery, QueryError, Unavailable
from .providers.prometheus import PrometheusProvider, interpret, one_number

__all__ = [
    "AmbiguousResult",
    "BadQuery",
    "PrometheusClient",
    "PrometheusConfig",
    "QueryError",
    "Unavailable",
    "interpret",
    "one_number",
]


@dataclass(frozen=True)
class PrometheusConfig:
    """Where Prometheus is and how to prove who we are to it. The repr never shows the password."""

    url: str
    bearer_token_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"Prometheus url must be http(s)://host[:port][/prefix], not {_without_userinfo(self.url)!r}"
            )
        if parts.username is not None or parts.password is not None:
            # Credentials in the URL would show up wherever the URL is printed.
            raise ValueError("put Prometheus credentials in username/password, not in the url")
        if self.password is not None and self.username is None:
            raise ValueError("a Prometheus password needs a username")
        if self.username is not None and self.bearer_token_file is not None:
            raise ValueError("use either basic auth (username/password) or a bearer token file, not both")
        if not self.timeout > 0:
            raise ValueError(f"Prometheus timeout must be positive, not {self.timeout}")


class PrometheusClient(PrometheusProvider):
    """One connection pool to one Prometheus, shared by every canary's task.

    ``on_error`` hears of every failed attempt, retried or not (for metrics and logs); it should not raise.
    Use as ``async with PrometheusClient(config) as client:``, or call :meth:`close`; a closed client is done.
    """

    def __init__(
        self,
        config: PrometheusConfig,
        *,
        on_error: Callable[[QueryError], None] | None = None,
        name: str = "prometheus",
    ) -> None:
        spec = ProviderSpec(
            name=name,  # as a BirdWatch's spec.provider names it: this client is a provider among others
            type="prometheus",
            address=config.url.rstrip("/"),
            timeout=config.timeout,
            ca_file=config.ca_file,
            username=config.username,
            token_file=config.bearer_token_file,
        )
        super().__init__(spec, password=config.password, on_error=on_error)

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
