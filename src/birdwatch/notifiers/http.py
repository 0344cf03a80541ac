"""What the webhook-based services share: one aiohttp session per notifier, a POST of a body, and what its answer
means (2xx sent; 429 and 5xx, timeouts and connection errors retried, after Retry-After when given; other 4xx
refused). A chat service's webhook URL is its credential, so nothing here logs it: failures name the HTTP status,
the exception class and a detail with the URL cut out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from birdwatch.notify import Notice

from .delivery import Verdict, detail

USER_AGENT = "birdwatch (+https://github.com/otomato-gh/birdwatch)"


class Refused(Exception):
    """The service answered, and asking again will not help (4xx other than 429)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class Unavailable(Exception):
    """The service answered 429 or 5xx: worth asking again, after ``retry_after`` when it said so."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class WebhookClient:
    """POSTs to one URL. ``open()`` before the first ``post()``, ``aclose()`` at the end."""

    def __init__(self, *, url: str, timeout: float, secrets: tuple[str, ...] = ()) -> None:
        self.url = url
        self._timeout = timeout
        parts = URL(url)
        # The path and query of a chat webhook are its token; cut them (and any other secret) from every detail.
        self._secrets = tuple(s for s in (url, parts.path_qs, parts.path, parts.query_string, *secrets) if len(s) > 1)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"WebhookClient(host={URL(self.url).host!r})"

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout), headers={"User-Agent": USER_AGENT}
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def post(
        self, body: bytes, *, content_type: str, headers: Mapping[str, str] | None = None, url: str | None = None
    ) -> tuple[int, str]:
        """The status and text of a 2xx answer; raises ``Refused`` or ``Unavailable`` otherwise."""
        if self._session is None:
            raise RuntimeError("the notifier is not started")
        sent = {"Content-Type": content_type, **(headers or {})}
        async with self._session.post(URL(url or self.url, encoded=True), data=body, headers=sent) as answer:
            text = await answer.text(errors="replace")
            if 200 <= answer.status < 300:
                return answer.status, text
            if answer.status == 429 or answer.status >= 500:
                raise Unavailable(answer.status, _retry_after(answer.headers.get("Retry-After"), text))
            raise Refused(answer.status, text[:200])

    def judge(self, exc: BaseException) -> Verdict:
        if isinstance(exc, Unavailable):
            return Verdict(
                retryable=True, after=exc.retry_after, fields={"error": f"http_{exc.status}", "status": exc.status}
            )
        if isinstance(exc, Refused):
            return Verdict(
                retryable=False,
                fields={"error": f"http_{exc.status}", "status": exc.status, "detail": detail(exc, *self._secrets)},
            )
        if isinstance(exc, TimeoutError):
            return Verdict(
                retryable=True, fields={"error": "TimeoutError", "detail": f"no answer within {self._timeout:g}s"}
            )
        return Verdict(
            retryable=isinstance(exc, aiohttp.ClientError | OSError),
            fields={"error": type(exc).__name__, "detail": detail(exc, *self._secrets)},
        )


def _retry_after(header: str | None, text: str) -> float | None:
    if header:
        try:
            return float(header)
        except ValueError:
            return None
    # Discord also says it in the body, in seconds: {"retry_after": 0.5, ...}.
    if '"retry_after"' in text:
        try:
            value: Any = json.loads(text).get("retry_after")
        except (ValueError, AttributeError):
            return None
        return float(value) if isinstance(value, int | float) else None
    return None


class JSONWebhookSender:
    """A sender for a chat service's incoming webhook: the service module gives the body for a notice."""

    def __init__(
        self,
        *,
        kind: str,
        url: str,
        timeout: float,
        body: Callable[[Notice], dict[str, Any]],
        query: Callable[[Notice], dict[str, str]] | None = None,
    ) -> None:
        self.kind = kind
        self._client = WebhookClient(url=url, timeout=timeout)
        self._body = body
        self._query = query

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, {self._client!r})"

    async def open(self) -> None:
        await self._client.open()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, notice: Notice) -> None:
        url = None
        if self._query is not None:
            url = str(URL(self._client.url).update_query(self._query(notice)))
        body = json.dumps(self._body(notice), ensure_ascii=False).encode()
        await self._client.post(body, content_type="application/json", url=url)

    def judge(self, exc: BaseException) -> Verdict:
        return self._client.judge(exc)
