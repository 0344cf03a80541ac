"""What can go wrong asking any metrics backend for a number, in words every provider shares.

The canary's task needs to know one thing about a failed query: may asking again help? A query the backend
rejects (:class:`BadQuery`) or that is not one number (:class:`AmbiguousResult`) will not get better and ends the
rollout ``Failed`` with the backend's own words; a backend that is unreachable, slow or overloaded
(:class:`Unavailable`) may, so it is retried within the failure budget.
"""

from __future__ import annotations

__all__ = ["AmbiguousResult", "BadQuery", "QueryError", "Unavailable"]


class QueryError(Exception):
    """A query gave no number. ``retryable`` says whether asking again later may help."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class BadQuery(QueryError):
    """The backend rejected the query; the message is the backend's own explanation."""

    retryable = False


class AmbiguousResult(QueryError):
    """The query answered with something other than one number (several series, a range, a string)."""

    retryable = False


class Unavailable(QueryError):
    """The backend could not be asked or could not answer now: unreachable, too slow, overloaded, not itself."""

    retryable = True
