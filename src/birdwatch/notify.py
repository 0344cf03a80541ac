"""Slack notifications for the moments of a canary release that people want to hear about.

Slack is a courtesy, never a dependency of a rollout: ``notify()`` only puts the notice on a bounded in-memory
queue and returns (it never awaits and never raises), and one background task posts the queue to Slack in order.
What slack_sdk can retry is retried (connection errors, HTTP 429 after its Retry-After, HTTP 500/503); whatever
still fails is logged and dropped, and the worker carries on with the next notice.

When the queue is full the *oldest* notice is dropped: after Slack has been away for a thousand notices, the newest
ones say more about the state of the rollouts than the stale ones.

The bot token never reaches a log line: failures are logged by Slack error code, HTTP status and exception class
only, because slack_sdk keeps the request (Authorization header included) inside some of its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

__all__ = ["Moment", "Notice", "Notifier", "NullNotifier", "SlackNotifier", "make_notifier", "render"]

log = structlog.get_logger(__name__)

# Slack rejects a section whose text is longer than 3000 characters (invalid_blocks) and the notice would be lost;
# the free-text part is cut well before that so the headline always fits.
_MAX_MESSAGE_CHARS: Final = 2000
# An exception's text is logged for diagnosis (e.g. "Cannot connect to host slack.com:443"), but kept short.
_MAX_DETAIL_CHARS: Final = 300


class Moment(enum.Enum):
    """An important moment of a canary release. The values double as the reasons of the Kubernetes Events."""

    STARTED = "RolloutStarted"
    UNHEALTHY = "CanaryUnhealthy"
    ROLLED_BACK = "RolledBack"
    FROZEN = "Frozen"
    PROMOTED = "Promoted"
    FAILED = "RolloutFailed"


_EMOJI: Final[Mapping[Moment, str]] = types.MappingProxyType(
    {
        Moment.STARTED: ":hatching_chick:",
        Moment.UNHEALTHY: ":warning:",
        Moment.ROLLED_BACK: ":rewind:",
        Moment.FROZEN: ":ice_cube:",
        Moment.PROMOTED: ":rocket:",
        Moment.FAILED: ":x:",
    }
)

_HEADLINE: Final[Mapping[Moment, str]] = types.MappingProxyType(
    {
        Moment.STARTED: "rollout started",
        Moment.UNHEALTHY: "canary unhealthy",
        Moment.ROLLED_BACK: "rolled back",
        Moment.FROZEN: "frozen",
        Moment.PROMOTED: "promoted",
        Moment.FAILED: "rollout failed",
    }
)


@dataclass(frozen=True, kw_only=True)
class Notice:
    """What happened to which canary, in words a person on the deployment channel understands."""

    moment: Moment
    namespace: str
    name: str
    """The BirdWatch's name."""
    service: str
    """The VirtualService whose traffic is being shifted."""
    canary_version: str
    weight: int
    """Percent of the traffic the canary received at that moment."""
    message: str
    """One human sentence, e.g. "error rate 0.31 exceeded baseline 0.02 by more than 0.1"."""
    value: float | None = None
    baseline: float | None = None


class Notifier(Protocol):
    def notify(self, notice: Notice) -> None:
        """Hand a notice over for delivery. Never blocks, never raises."""
        ...

    async def start(self) -> None: ...

    async def close(self, *, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop."""
        ...


class NullNotifier:
    """The notifier when no Slack token is configured: every notice is silently ignored."""

    def notify(self, notice: Notice) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self, *, timeout: float = 5.0) -> None:
        pass


def _escape(text: str) -> str:
    # In Slack's mrkdwn, <, > and & introduce links and mentions; names and metric sentences are plain data.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _number(value: float) -> str:
    return f"{value:g}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(notice: Notice) -> tuple[str, list[dict[str, Any]]]:
    """The message for a notice: the mrkdwn ``text`` (also the notification fallback) and the Block Kit blocks."""
    who = f"{_escape(notice.namespace)}/{_escape(notice.name)}"
    # A BirdWatch whose spec could not be read has no canary to speak of; "canary  of  at 0%" would only confuse.
    known = bool(notice.canary_version or notice.service)
    text = f"{_EMOJI[notice.moment]} *{who}*: "
    if known:
        text += f"canary {_escape(notice.canary_version)} of {_escape(notice.service)} at {notice.weight}% — "
    text += _HEADLINE[notice.moment]
    if notice.message:
        text += f". {_escape(_shorten(notice.message, _MAX_MESSAGE_CHARS))}"
    if notice.value is not None and notice.baseline is not None:
        text += f" (value {_number(notice.value)} vs baseline {_number(notice.baseline)})"
    elif notice.value is not None:
        text += f" (value {_number(notice.value)})"
    context = f"{notice.moment.value} · BirdWatch {who}"
    if known:
        context += (
            f" · VirtualService {_escape(notice.service)} · canary {_escape(notice.canary_version)}"
            f" · weight {notice.weight}%"
        )
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]
    return text, blocks


def _about(notice: Notice) -> dict[str, str]:
    # The keys of birdwatch's per-canary log lines, so that one jq filter finds a canary's Slack trouble too.
    return {"moment": notice.moment.value, "namespace": notice.namespace, "birdwatch": notice.name}


class SlackNotifier:
    """Posts notices to a Slack channel from one background task, in the order they were given.

    Call ``notify()`` from the event loop's thread. Retries are shared across kinds: a notice is tried at most
    ``1 + max_retries`` times, whatever mix of connection errors, 429s and 5xx it meets.
    """

    def __init__(
        self,
        *,
        token: str,
        channel: str = "deployment",
        base_url: str | None = None,
        queue_size: int = 1000,
        max_retries: int = 3,
        timeout: float = 10.0,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self._token = token.strip()
        self._channel = channel
        self._base_url = base_url or AsyncWebClient.BASE_URL
        self._max_retries = max_retries
        self._timeout = timeout
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(maxsize=queue_size)
        self._session: aiohttp.ClientSession | None = None
        # The event loop keeps only weak references to tasks: without this one the worker could be collected.
        self._worker: asyncio.Task[None] | None = None
        self._sending = False
        self._closed = False
        self._dropped = 0

    def __repr__(self) -> str:
        return f"SlackNotifier(channel={self._channel!r}, base_url={self._base_url!r})"

    @property
    def dropped(self) -> int:
        """How many notices were dropped because the queue was full."""
        return self._dropped

    def notify(self, notice: Notice) -> None:
        if self._closed:
            log.warning("slack notifier is closed, notification not sent", **_about(notice))
            return
        if self._queue.full():
            oldest = self._queue.get_nowait()
            # Keeps the queue's unfinished-task count right, which close() waits on.
            self._queue.task_done()
            self._dropped += 1
            log.warning(
                "slack notification queue full, dropped the oldest notice",
                dropped=self._dropped,
                queue_size=self._queue.maxsize,
                **_about(oldest),
            )
        self._queue.put_nowait(notice)

    async def start(self) -> None:
        if self._worker is not None or self._closed:
            return
        # One session for the notifier's life, instead of slack_sdk opening (and closing) one per call.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        retry_handlers: list[AsyncRetryHandler] = [
            AsyncConnectionErrorRetryHandler(max_retry_count=self._max_retries),
            AsyncRateLimitErrorRetryHandler(max_retry_count=self._max_retries),
            AsyncServerErrorRetryHandler(max_retry_count=self._max_retries),
        ]
        client = AsyncWebClient(
            token=self._token,
            base_url=self._base_url,
            # Only used should the session be gone; the session's ClientTimeout is the one that applies.
            timeout=math.ceil(self._timeout),
            session=self._session,
            retry_handlers=retry_handlers,
        )
        self._worker = asyncio.create_task(self._run(client), name="birdwatch-slack-notifier")

    async def close(self, *, timeout: float = 5.0) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        session, self._session = self._session, None
        try:
            if worker is not None and not worker.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), timeout)
            unsent = self._queue.qsize() + (1 if self._sending else 0)
            if unsent:
                log.warning("slack notifications not sent before shutdown", unsent=unsent)
        finally:
            try:
                if worker is not None:
                    await _cancel_and_wait(worker)
            finally:
                if session is not None:
                    await session.close()

    async def _run(self, client: AsyncWebClient) -> None:
        while True:
            notice = await self._queue.get()
            self._sending = True
            try:
                await self._send(client, notice)
            finally:
                self._sending = False
                self._queue.task_done()

    async def _send(self, client: AsyncWebClient, notice: Notice) -> None:
        text, blocks = render(notice)
        try:
            await client.chat_postMessage(channel=self._channel, text=text, blocks=blocks)
        except SlackApiError as exc:
            status, code = _slack_error(exc)
            log.warning(
                "slack notification failed",
                slack_error=code,
                status=status,
                detail=f"Slack answered {code}" + (f" (HTTP {status})" if status is not None else ""),
                channel=self._channel,
                **_about(notice),
            )
        except Exception as exc:  # Slack must never take the worker down, whatever it throws.
            # slack_error is Slack's error code when Slack answered, else the class of what stopped the call: one
            # key to group failures by.
            log.warning(
                "slack notification failed",
                slack_error=type(exc).__name__,
                detail=_shorten(self._redact(str(exc)), _MAX_DETAIL_CHARS) or type(exc).__name__,
                channel=self._channel,
                **_about(notice),
            )
        else:
            log.debug("slack notification sent", channel=self._channel, **_about(notice))

    def _redact(self, text: str) -> str:
        # Belt and braces: no error text seen so far carries the token, but one must never be logged if it did.
        return text.replace(self._token, "[redacted]") if self._token else text


def _slack_error(exc: SlackApiError) -> tuple[int | None, str]:
    """The HTTP status and Slack's error code of a failed call; never the request, which holds the token."""
    response = exc.response
    status = getattr(response, "status_code", None)
    data = getattr(response, "data", None)
    code = data.get("error") if isinstance(data, dict) else None
    return (
        status if isinstance(status, int) else None,
        code if isinstance(code, str) and code else f"http_{status}",
    )


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        # The worker's own cancellation is expected; a cancellation of the caller must go on propagating.
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def make_notifier(*, token: str | None, channel: str, base_url: str | None = None) -> Notifier:
    """A SlackNotifier posting to ``channel``, or a NullNotifier when no token is configured."""
    if token is None or not token.strip():
        log.info("slack notifications disabled: no token configured")
        return NullNotifier()
    return SlackNotifier(token=token, channel=channel, base_url=base_url)
