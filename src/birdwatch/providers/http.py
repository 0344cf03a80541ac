"""What every HTTP metric provider shares: one aiohttp session, credentials from files, bounded attempts retried
within the caller's budget, and messages scrubbed of every secret that was sent.

A type's module subclasses :class:`HttpProvider` and writes ``_attempt`` (one query, turned into a number or a
typed error) and, where the backend has one, ``_ready_path``.
"""

from __future__ import annotations

import asyncio
import base64
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp

from birdwatch import __version__

from .config import ProviderSpec
from .errors import BadQuery, QueryError, Unavailable
from .secrets import FileSecret, FixedSecret, Scrubber

__all__ = ["Answer", "HttpProvider", "snippet"]

_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 2.0
_JITTER = 0.1
# An attempt squeezed into the last milliseconds of a budget could never succeed; give it this much at least.
_MIN_ATTEMPT = 0.5
# Queries are short and a canary asks one per step: 16 connections carry 1,000 canaries' checks (100 a second at
# interval 10, a few ms each) with room to spare, while each TLS connection costs ~290 kB (asyncio's read buffer).
_CONNECTION_LIMIT = 16
_SNIPPET = 200


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, already scrubbed of secrets."""

    status: int
    reason: str
    content_type: str
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def snippet(body: bytes | str) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


class HttpProvider:
    """Base of the HTTP providers: one session per provider, shared by every canary that names it."""

    kind: ClassVar[str] = "HTTP endpoint"
    _ready_path: ClassVar[str | None] = None  # GET here answering 2xx means ready; None: a harmless query instead
    _credential_noun: ClassVar[str] = "token"  # how messages name the token file

    def __init__(
        self,
        spec: ProviderSpec,
        *,
        password: str | None = None,
        on_error: Callable[[QueryError], None] | None = None,
    ) -> None:
        """``password`` is for a password given as a value rather than a file (``$PROMETHEUS_PASSWORD`` of the
        default provider); ``on_error`` hears of every failed attempt, retried or not, and should not raise."""
        self._spec = spec
        self._on_error = on_error
        self._base = spec.address
        self._ssl: ssl.SSLContext | bool = True
        if spec.ca_file is not None:
            # Built now, not on first use, so that an unreadable CA bundle stops the controller at start-up.
            self._ssl = ssl.create_default_context(cafile=str(spec.ca_file))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.scrubber = Scrubber()
        self._password: FileSecret | FixedSecret | None = None
        if spec.password_file is not None:
            self._password = FileSecret(spec.password_file, what="password")
        elif password is not None:
            self._password = FixedSecret(password)
        self._token = FileSecret(spec.token_file, what=self._credential_noun) if spec.token_file else None
        self._header_files = {h: FileSecret(p, what=f"{h} header") for h, p in spec.header_files.items()}
        for secret in (self._password, self._token, *self._header_files.values()):
            if secret is not None:
                self.scrubber.add(secret)
        self._basic = ""
        self.scrubber.add(lambda: self._basic)

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def address(self) -> str:
        return self._base

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def query(self, expression: str, *, budget: float = 0.0) -> float | None:
        """See :class:`~birdwatch.providers.base.Provider`."""
        deadline = time.monotonic() + max(budget, 0.0)
        backoff = _FIRST_BACKOFF
        last_chance = budget <= 0
        while True:
            if budget <= 0:
                bound = self._spec.timeout
            else:
                bound = min(self._spec.timeout, max(deadline - time.monotonic(), _MIN_ATTEMPT))
            try:
                return await self._attempt(expression, bound)
            except QueryError as err:
                err.message = self.scrubber.text(err.message)
                err.args = (err.message,)
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
        """See :class:`~birdwatch.providers.base.Provider`."""
        try:
            await self._probe(self._spec.timeout)
        except QueryError as err:
            return False, self.scrubber.text(err.message)
        return True, "ready"

    async def _probe(self, bound: float) -> None:
        if self._ready_path is None:
            return
        answer = await self._request("GET", f"{self._base}{self._ready_path}", bound=bound)
        if not answer.ok:
            raise Unavailable(f"{self.kind} at {self._base} is not ready: HTTP {answer.status}: {snippet(answer.body)}")

    async def _attempt(self, expression: str, bound: float) -> float | None:
        raise NotImplementedError

    # --- for the types -----------------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        url: str,
        *,
        bound: float,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | str | bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One request within ``bound`` seconds, with the provider's credentials; a network failure or timeout is
        :class:`Unavailable`. The answer's reason and body are scrubbed of secrets before anyone sees them."""
        all_headers = {**self._spec.headers, **self._auth_headers(), **(headers or {})}
        try:
            async with asyncio.timeout(bound):
                async with self._session_now().request(
                    method, url, params=params, data=data, json=json, headers=all_headers, allow_redirects=False
                ) as resp:
                    body = await resp.read()
                    answer = Answer(resp.status, resp.reason or "", resp.content_type, body)
        except TimeoutError as exc:
            raise Unavailable(f"{self.kind} at {self._base} did not answer within {bound:.3g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            # A certificate we do not trust will not become trusted by asking again.
            raise QueryError(
                f"{self.kind} at {self._base} has a certificate we do not trust (set ca_file?): {exc}"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"cannot reach {self.kind} at {self._base}: {exc or type(exc).__name__}") from exc
        return Answer(
            answer.status, self.scrubber.text(answer.reason), answer.content_type, self.scrubber.body(answer.body)
        )

    def _auth_headers(self) -> dict[str, str]:
        headers = {h: secret.value() for h, secret in self._header_files.items()}
        if self._token is not None:
            headers["Authorization"] = f"{self._token_scheme()} {self._token.value()}"
        elif self._spec.username is not None:
            password = self._password.value() if self._password is not None else ""
            self._basic = base64.b64encode(f"{self._spec.username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {self._basic}"
        return headers

    def _token_scheme(self) -> str:
        return "Bearer"

    def _refused(self, answer: Answer, why: str = "") -> QueryError:
        """The error for an answer that is not a success, where the type has nothing more specific to say.
        ``why`` is the backend's own explanation when the type could find one in the body."""
        explanation = why or snippet(answer.body) or "no explanation"
        head = f"{self.kind} at {self._base} answered HTTP {answer.status} {answer.reason}"
        if answer.status >= 500 or answer.status in (408, 429):
            return Unavailable(f"{head}: {explanation}")
        if answer.status in (401, 403):
            authenticated = bool(self._password or self._token or self._header_files or self._spec.username)
            hint = "refused the credentials" if authenticated else "wants credentials"
            return QueryError(f"{self.kind} at {self._base} {hint}: HTTP {answer.status} {answer.reason}")
        if answer.status in (400, 422):
            return BadQuery(why or explanation)
        return QueryError(f"{head}: {explanation}")

    def _session_now(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"provider {self.name} is closed")
        if self._session is None:
            # Created here, inside the running loop, because a session belongs to the loop it was made in. No
            # trust_env: a per-request .netrc and proxy look-up would read files on the loop.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=_CONNECTION_LIMIT, ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=None),
                headers={"User-Agent": f"birdwatch/{__version__}", "Accept": "application/json"},
            )
        return self._session
