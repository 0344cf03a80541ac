"""Reads one health number for a canary from Prometheus's HTTP query API.

A canary's task asks one PromQL question per step ("what is the canary's error rate?") and needs one float back,
or ``None`` when there is no data yet. Everything that can go wrong is a :class:`QueryError` that says whether
asking again can help: a wrong query (:class:`BadQuery`) or one that is not a single number
(:class:`AmbiguousResult`) will not get better, an unreachable or overloaded Prometheus (:class:`Unavailable`)
may, so :meth:`PrometheusClient.query` retries only those, within the time budget its caller gives it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from birdwatch import __version__

from .providers.errors import AmbiguousResult, BadQuery, QueryError, Unavailable

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

_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 2.0
_JITTER = 0.1
# An attempt squeezed into the last milliseconds of a budget could never succeed; give it this much at least.
_MIN_ATTEMPT = 0.5
_CONNECTION_LIMIT = 100
_SNIPPET = 200
_MAX_LABEL_SETS_SHOWN = 3


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


class PrometheusClient:
    """One connection pool to one Prometheus, shared by every canary's task.

    ``on_error`` hears of every failed attempt, retried or not (for metrics and logs); it should not raise.
    Use as ``async with PrometheusClient(config) as client:``, or call :meth:`close`; a closed client is done.
    """

    kind = "Prometheus"

    def __init__(
        self,
        config: PrometheusConfig,
        *,
        on_error: Callable[[QueryError], None] | None = None,
        name: str = "prometheus",
    ) -> None:
        self.name = name  # as a BirdWatch's spec.provider names it: this client is a provider among others
        self._config = config
        self._on_error = on_error
        self._base = config.url.rstrip("/")
        self.address = self._base
        self._ssl: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            # Built now, not on first use, so that an unreadable CA bundle stops the controller at start-up.
            self._ssl = ssl.create_default_context(cafile=str(config.ca_file))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._token_key: tuple[int, int, int] | None = None
        self._token = ""
        self._basic = ""
        if config.username is not None:
            credentials = f"{config.username}:{config.password or ''}"
            self._basic = base64.b64encode(credentials.encode()).decode()

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def query(self, promql: str, *, budget: float = 0.0) -> float | None:
        """The value of an instant query: a float, or ``None`` when there is no data (no series, or NaN).

        Retries :class:`Unavailable` with backoff until ``budget`` seconds have passed (0: one attempt), then raises
        the last error; other errors are raised at once.
        """
        deadline = time.monotonic() + max(budget, 0.0)
        backoff = _FIRST_BACKOFF
        last_chance = budget <= 0
        while True:
            if budget <= 0:
                bound = self._config.timeout
            else:
                bound = min(self._config.timeout, max(deadline - time.monotonic(), _MIN_ATTEMPT))
            try:
                return await self._attempt(promql, bound)
            except QueryError as err:
                self._redact(err)
                if self._on_error is not None:
                    self._on_error(err)
                left = deadline - time.monotonic()
                if not err.retryable or last_chance or left <= 0:
                    raise
                pause = backoff * random.uniform(1 - _JITTER, 1 + _JITTER)  # noqa: S311 - jitter, not a secret
                if pause >= left:
                    # Sleeping to the end of the budget leaves room for one more attempt, and no more.
                    pause, last_chance = left, True
                await asyncio.sleep(pause)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    async def ready(self) -> tuple[bool, str]:
        """Whether Prometheus says it is ready to answer queries, and if not, why. Never raises for network errors."""
        url = f"{self._base}/-/ready"
        try:
            async with asyncio.timeout(self._config.timeout):
                async with self._session_now().get(url, headers=self._headers()) as resp:
                    body = await resp.read()
        except QueryError as err:
            return False, self._scrub(err.message)
        except TimeoutError:
            return False, f"Prometheus at {self._base} did not answer within {self._config.timeout:.3g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, self._scrub(_connection_problem(self._base, exc).message)
        if resp.status == 200:
            return True, "ready"
        excerpt = _snippet(self._scrub_body(body))
        return False, self._scrub(f"Prometheus at {self._base} is not ready: HTTP {resp.status}: {excerpt}")

    async def _attempt(self, promql: str, bound: float) -> float | None:
        url = f"{self._base}/api/v1/query"
        try:
            async with asyncio.timeout(bound):
                session = self._session_now()
                # POST, form-encoded: a query too long for a URL still fits in a body.
                async with session.post(
                    url, data={"query": promql}, headers=self._headers(), allow_redirects=False
                ) as resp:
                    body = await resp.read()
                    status, reason, content_type = resp.status, resp.reason or "", resp.content_type
        except TimeoutError as exc:
            raise Unavailable(f"Prometheus at {self._base} did not answer within {bound:.3g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _connection_problem(self._base, exc) from exc
        return _interpret(
            _Answer(
                base=self._base,
                status=status,
                reason=self._scrub(reason),
                content_type=content_type,
                body=self._scrub_body(body),
                authenticated=self._config.username is not None or self._config.bearer_token_file is not None,
            )
        )

    def _session_now(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this PrometheusClient is closed")
        if self._session is None:
            # Created here, inside the running loop, because a session belongs to the loop it was made in.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=_CONNECTION_LIMIT, ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=None),
                headers={"User-Agent": f"birdwatch/{__version__}", "Accept": "application/json"},
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        if self._config.bearer_token_file is not None:
            return {"Authorization": f"Bearer {self._read_token(self._config.bearer_token_file)}"}
        if self._config.username is not None:
            return {"Authorization": f"Basic {self._basic}"}
        return {}

    def _read_token(self, path: Path) -> str:
        # Tokens rotate (projected service-account tokens are swapped in through a symlink), so look at the file
        # each time but read it only when it changed. A stat and a small read do not hold the loop up noticeably.
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._token_key:
                token = path.read_text().strip()
                if not token:
                    raise Unavailable(f"the bearer token file {path} is empty")
                self._token, self._token_key = token, key
        except OSError as exc:
            raise Unavailable(f"cannot read the bearer token file {path}: {exc.strerror or exc}") from exc
        return self._token

    def _secrets(self) -> list[str]:
        found = [s for s in (self._config.password, self._token) if s]
        if self._basic:
            found.append(self._basic)
        return found

    def _scrub(self, text: str) -> str:
        # A proxy or a server may echo what it was sent; what we were given to authenticate must not leak into logs.
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def _scrub_body(self, body: bytes) -> bytes:
        # Before an excerpt is cut from it: a secret cut in two no longer matches, and half a secret is still a leak.
        for secret in self._secrets():
            body = body.replace(secret.encode(), b"***")
        return body

    def _redact(self, err: QueryError) -> None:
        err.message = self._scrub(err.message)
        err.args = (err.message,)


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
        why = f"{prom_error[0]}: {prom_error[1]}" if prom_error else _snippet(answer.body)
        raise Unavailable(f"Prometheus at {base} answered HTTP {status} {answer.reason}: {why or 'no explanation'}")
    if status in (401, 403):
        hint = "refused the credentials" if answer.authenticated else "wants credentials (set username or token)"
        raise QueryError(f"Prometheus at {base} {hint}: HTTP {status} {answer.reason}", retryable=False)
    if not 200 <= status < 300:
        why = prom_error[1] if prom_error else _snippet(answer.body)
        raise QueryError(f"Prometheus at {base} answered HTTP {status} {answer.reason}: {why}", retryable=False)
    if not isinstance(doc, dict):
        raise Unavailable(
            f"Prometheus at {base} answered with something that is not Prometheus's JSON "
            f"(HTTP {status}, {answer.content_type}): {_snippet(answer.body)}"
        )
    if prom_error is not None:
        raise Unavailable(f"Prometheus at {base} answered an error: {prom_error[0]}: {prom_error[1]}")
    try:
        return one_number(doc["data"])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise Unavailable(
            f"Prometheus at {base} answered JSON of an unexpected shape: {_snippet(answer.body)}"
        ) from exc


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


def _connection_problem(base: str, exc: Exception) -> QueryError:
    cause = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # A certificate we do not trust will not become trusted by asking again.
        return QueryError(f"Prometheus at {base} has a certificate we do not trust (set ca_file?): {cause}")
    return Unavailable(f"cannot reach Prometheus at {base}: {cause}")


def _snippet(body: bytes) -> str:
    text = " ".join(body.decode(errors="replace").split())
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
