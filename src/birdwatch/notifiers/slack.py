"""Slack, through slack_sdk's AsyncWebClient: one thread per rollout, its first message updated at the end.

The first moment of a rollout posts a message to the channel; later moments reply in its thread; the ending also
updates the first message, so the channel shows one line per rollout with its outcome. The thread is remembered
in an annotation on the BirdWatch (``threads``), so a restarted birdwatch goes on in the same thread. A notice
about no one rollout (Prometheus unreachable) is a message of its own.

Retries are the ``Delivery``'s (slack_sdk's own retry handlers are off, so a notice is tried at most
``1 + max_retries`` times whatever mix of connection errors, 429s and 5xx it meets); Slack's Retry-After is
honoured. The bot token never reaches a log line: failures are logged by Slack error code, HTTP status and
exception class only, because slack_sdk keeps the request (Authorization header included) inside some errors.
"""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import structlog
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from birdwatch.kube import KubeError
from birdwatch.notify import ENDINGS, Notice

from .delivery import Delivery, OnResult, Verdict, detail
from .text import HEADLINES, LOOKS, known, message, number, reading
from .threads import MemoryThreads, Thread, ThreadStore

__all__ = ["SlackNotifier", "SlackSender", "render"]

log = structlog.get_logger(__name__)


def _escape(text: str) -> str:
    # In Slack's mrkdwn, <, > and & introduce links and mentions; names and metric sentences are plain data.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render(notice: Notice) -> tuple[str, list[dict[str, Any]]]:
    """The message for a notice: the mrkdwn ``text`` (also the notification fallback) and the Block Kit blocks."""
    who = f"{_escape(notice.namespace)}/{_escape(notice.name)}"
    text = f"{LOOKS[notice.moment].emoji} *{who}*: "
    if known(notice):
        text += f"canary {_escape(notice.canary_version)} of {_escape(notice.service)} at {notice.weight}% — "
    text += HEADLINES[notice.moment]
    if notice.message:
        text += f". {_escape(message(notice))}"
    if notice.value is not None and notice.production_value is not None:
        text += f" ({reading(notice)})"
    elif notice.value is not None and notice.baseline is not None:
        text += f" (value {number(notice.value)} vs baseline {number(notice.baseline)})"
    elif notice.value is not None:
        text += f" (value {number(notice.value)})"
    context = f"{notice.moment.value} · BirdWatch {who}"
    if known(notice):
        context += (
            f" · VirtualService {_escape(notice.service)} · canary {_escape(notice.canary_version)}"
            f" · weight {notice.weight}%"
        )
    if notice.next_step:
        context += f" · next: {_escape(notice.next_step)}"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]
    return text, blocks


class SlackSender:
    kind = "slack"

    def __init__(
        self,
        *,
        token: str,
        channel: str,
        base_url: str | None = None,
        timeout: float = 10.0,
        threads: ThreadStore | None = None,
    ) -> None:
        self._token = token.strip()
        self._channel = channel
        self._base_url = base_url or AsyncWebClient.BASE_URL
        self._timeout = timeout
        self._store: ThreadStore = threads if threads is not None else MemoryThreads()
        self._threads: dict[tuple[str, str], Thread] = {}  # the rollouts under way, to spare a GET per notice
        self._session: aiohttp.ClientSession | None = None
        self._client: AsyncWebClient | None = None
        self._replied: Notice | None = None  # an ending whose reply went out, its parent's update not yet

    def __repr__(self) -> str:
        return f"SlackSender(channel={self._channel!r}, base_url={self._base_url!r})"

    async def open(self) -> None:
        # One session for the notifier's life, instead of slack_sdk opening (and closing) one per call.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._client = AsyncWebClient(
            token=self._token,
            base_url=self._base_url,
            # Only used should the session be gone; the session's ClientTimeout is the one that applies.
            timeout=math.ceil(self._timeout),
            session=self._session,
            retry_handlers=[],  # the Delivery retries, with one budget for every kind of failure
        )

    async def aclose(self) -> None:
        session, self._session, self._client = self._session, None, None
        if session is not None:
            await session.close()

    async def send(self, notice: Notice) -> None:
        client = self._client
        if client is None:
            raise RuntimeError("the Slack notifier is not started")
        text, blocks = render(notice)
        if not notice.rollout:
            await client.chat_postMessage(channel=self._channel, text=text, blocks=blocks)
            return
        key = (notice.namespace, notice.name)
        thread = self._threads.get(key)
        if thread is None or thread.rollout != notice.rollout:
            thread = await self._store.load(*key)
        if thread is None or thread.rollout != notice.rollout:
            answer = await client.chat_postMessage(channel=self._channel, text=text, blocks=blocks)
            thread = Thread(rollout=notice.rollout, channel=str(answer["channel"]), ts=str(answer["ts"]))
            self._threads[key] = thread
            await self._remember(notice, thread)
        else:
            self._threads[key] = thread
            if self._replied is not notice:  # a retried ending does not reply twice
                await client.chat_postMessage(channel=thread.channel, thread_ts=thread.ts, text=text, blocks=blocks)
                self._replied = notice
            if notice.moment in ENDINGS:
                await client.chat_update(channel=thread.channel, ts=thread.ts, text=text, blocks=blocks)
        if notice.moment in ENDINGS:
            self._threads.pop(key, None)
        self._replied = None

    async def _remember(self, notice: Notice, thread: Thread) -> None:
        # The message is out: failing to remember its thread costs a second thread after a restart, not a notice.
        try:
            await self._store.save(notice.namespace, notice.name, thread)
        except KubeError as exc:
            log.warning(
                "slack thread not remembered; after a restart this rollout starts a new thread",
                detail=str(exc),
                namespace=notice.namespace,
                birdwatch=notice.name,
            )

    def judge(self, exc: BaseException) -> Verdict:
        if isinstance(exc, SlackApiError):
            status, code = _slack_error(exc)
            return Verdict(
                retryable=status == 429 or (status is not None and status >= 500),
                after=_retry_after(exc),
                fields={
                    "slack_error": code,
                    "status": status,
                    "detail": f"Slack answered {code}" + (f" (HTTP {status})" if status is not None else ""),
                    "channel": self._channel,
                },
            )
        if isinstance(exc, KubeError):
            fields = {"slack_error": type(exc).__name__, "detail": str(exc), "channel": self._channel}
            return Verdict(retryable=exc.retryable, fields=fields)
        if isinstance(exc, TimeoutError):
            fields = {
                "slack_error": "TimeoutError",
                "detail": f"no answer within {self._timeout:g}s",
                "channel": self._channel,
            }
            return Verdict(retryable=True, fields=fields)
        # slack_error is Slack's error code when Slack answered, else the class of what stopped the call: one key
        # to group failures by.
        return Verdict(
            retryable=isinstance(exc, aiohttp.ClientError | OSError),
            fields={
                "slack_error": type(exc).__name__,
                "detail": detail(exc, self._token),
                "channel": self._channel,
            },
        )


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


def _retry_after(exc: SlackApiError) -> float | None:
    headers = getattr(exc.response, "headers", None) or {}
    for name, value in dict(headers).items():
        if str(name).lower() == "retry-after":
            try:
                return float(value[0] if isinstance(value, list) else value)
            except (TypeError, ValueError):
                return None
    return None


class SlackNotifier(Delivery):
    """A Slack notifier on a queue of its own (the settings as today's ``SLACK_*`` give them)."""

    def __init__(
        self,
        *,
        token: str,
        channel: str = "deployment",
        base_url: str | None = None,
        queue_size: int = 1000,
        max_retries: int = 3,
        timeout: float = 10.0,
        name: str = "slack",
        threads: ThreadStore | None = None,
        on_result: OnResult | None = None,
    ) -> None:
        self._slack = SlackSender(token=token, channel=channel, base_url=base_url, timeout=timeout, threads=threads)
        super().__init__(
            name=name,
            sender=self._slack,
            queue_size=queue_size,
            max_retries=max_retries,
            timeout=timeout,
            on_result=on_result,
        )

    def __repr__(self) -> str:
        return f"SlackNotifier(name={self.name!r}, {self._slack!r})"
