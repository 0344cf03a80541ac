"""The one interface every metric provider speaks, so a rollout never knows which backend answered."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Provider", "ProviderLookup"]


class Provider(Protocol):
    """One configured backend, shared by every canary that names it.

    ``query`` returns the expression's value, or ``None`` for no data (nothing matched, NaN, null). It retries
    :class:`~birdwatch.providers.errors.Unavailable` within ``budget`` seconds (0: one attempt), each attempt bounded
    by the provider's timeout, and raises the other :class:`~birdwatch.providers.errors.QueryError` kinds at once.
    Messages never carry the provider's credentials.
    """

    @property
    def name(self) -> str:
        """The name BirdWatches use in ``spec.provider``."""
        ...

    @property
    def kind(self) -> str:
        """The backend in words for messages ("Prometheus", "InfluxDB")."""
        ...

    @property
    def address(self) -> str:
        """Where the backend is, for messages (never with credentials)."""
        ...

    async def query(self, expression: str, *, budget: float = 0.0) -> float | None: ...

    async def ready(self) -> tuple[bool, str]:
        """Whether the backend answers, and if not why; never raises for network errors."""
        ...

    async def close(self) -> None: ...


class ProviderLookup(Protocol):
    """What a canary needs of the registry: a provider by name, and the names there are."""

    def get(self, name: str) -> Provider | None: ...

    def names(self) -> list[str]: ...
