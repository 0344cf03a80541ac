"""One notifier's delivery: a bounded queue and one worker task that sends in order, with retries and backoff.

Every notifier has its own ``Delivery``, so a dead or slow endpoint only ever holds up its own queue: ``notify()``
puts the notice on the queue and returns (it never awaits and never raises). Each attempt is bounded by
``timeout``; what fails is retried with exponential backoff (or after the service's Retry-After) up to
``max_retries`` times, then logged and counted, and the worker carries on with the next notice.

When the queue is full the *oldest* notice is dropped: after an endpoint has been away for a thousand notices, the
newest ones say more about the state of the rollouts than the stale ones.

Secrets (tokens, webhook URLs, passwords) never reach a log line: what is logged about a failure comes from the
sender's ``judge()``, which names an error code, an HTTP status and a redacted detail only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from birdwatch.notify import Notice

log = structlog.get_logger(__name__)

# Seconds before retry n (then the last one again): quick for a blip, spaced out for an endpoint that is down.
BACKOFF: Final = (0.5, 1.0, 2.0, 4.0, 8.0)
MAX_RETRY_AFTER: Final = 60.0  # a Retry-After beyond this is cut: the notice would be stale by then
MAX_DETAIL_CHARS: Final = 300

OnResult = Callable[[str, str], None]
"""Told ``(notifier name, result)`` for every outcome: sent, retried, failed, dropped, unsent."""


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """What a sender makes of a failed attempt."""

    retryable: bool
    after: float | None = None  # the service's Retry-After, seconds
    fields: dict[str, Any] = field(default_factory=dict)  # for the log line: error code, status, redacted detail


class Sender(Protocol):
    """How one service is spoken to. ``send`` raises on failure; ``judge`` says what the failure means."""

    kind: str  # slack, teams, discord, googlechat, mattermost, rocketchat, webhook, email

    async def open(self) -> None: ...

    async def send(self, notice: Notice) -> None: ...

    def judge(self, exc: BaseException) -> Verdict: ...

    async def aclose(self) -> None: ...


class Delivery:
    """A notifier: ``notify()`` from the event loop's thread; ``start()``, then ``close()`` at the end."""

    def __init__(
        self,
        *,
        name: str,
        sender: Sender,
        queue_size: int = 1000,
        max_retries: int = 3,
        timeout: float = 10.0,
        on_result: OnResult | None = None,
        backoff: tuple[float, ...] = BACKOFF,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self.name = name
        self._sender = sender
        self._kind = sender.kind
        self._max_retries = max_retries
        self._timeout = timeout
        self._on_result = on_result
        self._backoff = backoff
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(maxsize=queue_size)
        # The event loop keeps only weak references to tasks: without this one the worker could be collected.
        self._worker: asyncio.Task[None] | None = None
        self._sending = False
        self._closed = False
        self._dropped = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self._kind!r})"

    @property
    def dropped(self) -> int:
        """How many notices were dropped because the queue was full."""
        return self._dropped

    def notify(self, notice: Notice) -> None:
        if self._closed:
            log.warning(f"{self._kind} notifier is closed, notification not sent", **self._about(notice))
            self._count("dropped")
            return
        if self._queue.full():
            oldest = self._queue.get_nowait()
            # Keeps the queue's unfinished-task count right, which close() waits on.
            self._queue.task_done()
            self._dropped += 1
            self._count("dropped")
            log.warning(
                f"{self._kind} notification queue full, dropped the oldest notice",
                dropped=self._dropped,
                queue_size=self._queue.maxsize,
                **self._about(oldest),
            )
        self._queue.put_nowait(notice)

    async def start(self) -> None:
        if self._worker is not None or self._closed:
            return
        await self._sender.open()
        self._worker = asyncio.create_task(self._run(), name=f"birdwatch-{self.name}-notifier")

    async def close(self, *, timeout: float = 5.0) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        try:
            if worker is not None and not worker.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), timeout)
            unsent = self._queue.qsize() + (1 if self._sending else 0)
            if unsent:
                log.warning(f"{self._kind} notifications not sent before shutdown", unsent=unsent, notifier=self.name)
                for _ in range(unsent):
                    self._count("unsent")
        finally:
            try:
                if worker is not None:
                    await _cancel_and_wait(worker)
            finally:
                await self._sender.aclose()

    async def _run(self) -> None:
        while True:
            notice = await self._queue.get()
            self._sending = True
            try:
                await self._deliver(notice)
            finally:
                self._sending = False
                self._queue.task_done()

    async def _deliver(self, notice: Notice) -> None:
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    await self._sender.send(notice)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an endpoint must never take the worker down, whatever it throws
                verdict = self._sender.judge(exc)
                if verdict.retryable and attempt < self._max_retries:
                    pause = self._backoff[min(attempt, len(self._backoff) - 1)]
                    if verdict.after is not None:
                        pause = max(pause, min(verdict.after, MAX_RETRY_AFTER))
                    attempt += 1
                    self._count("retried")
                    log.debug(
                        f"{self._kind} notification failed, retrying",
                        attempt=attempt,
                        pause=pause,
                        **verdict.fields,
                        **self._about(notice),
                    )
                    await asyncio.sleep(pause)
                    continue
                self._count("failed")
                log.warning(f"{self._kind} notification failed", **verdict.fields, **self._about(notice))
                return
            self._count("sent")
            log.debug(f"{self._kind} notification sent", **self._about(notice))
            return

    def _count(self, result: str) -> None:
        if self._on_result is not None:
            self._on_result(self.name, result)

    def _about(self, notice: Notice) -> dict[str, str]:
        # The keys of birdwatch's per-canary log lines, so that one jq filter finds a canary's notification trouble.
        return {
            "notifier": self.name,
            "moment": notice.moment.value,
            "namespace": notice.namespace,
            "birdwatch": notice.name,
        }


def detail(exc: BaseException, *secrets: str) -> str:
    """An exception's text for a log line, short, with every secret given (tokens, URLs, passwords) cut out."""
    text = str(exc)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return (text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…") or type(exc).__name__


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        # The worker's own cancellation is expected; a cancellation of the caller must go on propagating.
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
