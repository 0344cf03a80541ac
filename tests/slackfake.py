"""A local, Slack-compatible Web API server: the one fake of birdwatch's test suite.

Everything else the tests talk to is the real thing (kube-apiserver, etcd, Prometheus). Slack cannot be: its servers
are not reachable from where the tests run, and a test must not post to a real workspace anyway. So this fake speaks
Slack's own wire protocol on a real loopback socket, and the code under test runs unchanged: slack_sdk's
AsyncWebClient, its retry handlers and aiohttp all do exactly what they would against https://slack.com/api/.

What it speaks, as Slack does:

* ``POST /api/<method>`` with a form (``application/x-www-form-urlencoded`` or multipart) or a JSON body (slack_sdk
  sends chat.postMessage as JSON); the token in ``Authorization: Bearer <token>``, or a ``token`` form field.
* Errors as HTTP 200 with ``{"ok": false, "error": "<code>"}``: ``not_authed``, ``invalid_auth``,
  ``channel_not_found`` (when an allow-list of channels is given), ``no_text``, ``invalid_blocks``, ``invalid_json``,
  ``unknown_method``.
* ``chat.postMessage`` answers ``{"ok": true, "channel": "C…", "ts": "1700000000.000100", "message": {…}}``;
  with ``thread_ts`` it is a reply in that thread (``thread_not_found`` when no such message); the channel may be
  named or given by the ID an earlier answer gave.
* ``chat.update`` (``channel`` must be the ID, as Slack wants it) replaces a message's text and blocks
  (``message_not_found``, ``channel_not_found``); every update is in ``updates``.
* ``auth.test`` answers with the fake team and bot.

Faults a test can switch on: ``rate_limit_next(n, retry_after=1)`` (HTTP 429 with a Retry-After header, as Slack
rate-limits), ``fail_next(n, status=500)`` (server errors), ``delay(seconds)`` (a slow Slack). Every request received
is in ``requests`` (with the time it arrived and the status it got), every accepted message in ``messages``.

    async with FakeSlack(token="xoxb-test", channels=["deployment"]) as slack:
        notifier = SlackNotifier(token="xoxb-test", base_url=slack.base_url)  # birdwatch.notifiers.slack
        ...
        [message] = await slack.wait_for_messages(1)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{8,}$")


@dataclass(frozen=True)
class PostedMessage:
    """A message chat.postMessage accepted."""

    channel: str
    """The channel as the client named it (a name without '#', or an ID)."""
    text: str | None
    blocks: list[dict[str, Any]] | None
    ts: str
    content_type: str
    thread_ts: str | None = None
    """The parent's ts when the message is a reply in a thread."""


@dataclass(frozen=True)
class UpdatedMessage:
    """A chat.update that Slack accepted."""

    channel: str
    ts: str
    text: str | None
    blocks: list[dict[str, Any]] | None


@dataclass
class ReceivedRequest:
    """One HTTP request, whatever became of it."""

    method: str
    """The Slack API method, e.g. "chat.postMessage"."""
    content_type: str
    at: float
    """When it arrived, on the event loop's clock."""
    status: int | None = None
    """The HTTP status answered; None while the answer is still pending."""
    error: str | None = None
    """Slack's error code when the answer was not ok."""


@dataclass
class _Faults:
    rate_limited: int = 0
    retry_after: int = 1
    failing: int = 0
    failure_status: int = 500
    delay: float = 0.0


class FakeSlack:
    def __init__(self, *, token: str, channels: Iterable[str] | None = None, host: str = "127.0.0.1") -> None:
        """``token`` is the one bot token accepted; ``channels``, when given, the only channels that exist."""
        self.token = token
        self.channels = None if channels is None else {c.lstrip("#") for c in channels}
        self.messages: list[PostedMessage] = []
        self.updates: list[UpdatedMessage] = []
        self._ids: dict[str, str] = {}  # channel ID -> name, for the IDs the answers gave out
        self.requests: list[ReceivedRequest] = []
        self._host = host
        self._faults = _Faults()
        self._seq = 100
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._changed: asyncio.Condition | None = None
        self._closing: asyncio.Event | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/api/{method}", self._handle)
        # A short shutdown: slow answers are released by close() and must not hold the test up for aiohttp's 60 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSlack:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """What to give slack_sdk as base_url, e.g. ``http://127.0.0.1:40123/api/``."""
        if self._port is None:
            raise RuntimeError("FakeSlack is not started")
        return f"http://{self._host}:{self._port}/api/"

    # -- faults --------------------------------------------------------------------------------------------------

    def rate_limit_next(self, n: int = 1, *, retry_after: int = 1) -> None:
        """Answer the next ``n`` requests with HTTP 429, ``Retry-After: retry_after`` and error ``ratelimited``."""
        self._faults.rate_limited = n
        self._faults.retry_after = retry_after

    def fail_next(self, n: int = 1, *, status: int = 500) -> None:
        """Answer the next ``n`` requests with HTTP ``status`` (after any rate limiting switched on)."""
        self._faults.failing = n
        self._faults.failure_status = status

    def delay(self, seconds: float) -> None:
        """Hold every answer from now on for ``seconds`` (0 for prompt answers again)."""
        self._faults.delay = seconds

    # -- observation ---------------------------------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """All requests received, answered or not, whatever their answer."""
        return len(self.requests)

    async def wait_for_messages(self, n: int, *, timeout: float = 5.0) -> list[PostedMessage]:
        """The accepted messages once there are at least ``n``; AssertionError if not within ``timeout``."""
        await self._wait(lambda: len(self.messages) >= n, timeout, f"{n} messages")
        return list(self.messages)

    async def wait_for_requests(self, n: int, *, answered: bool = True, timeout: float = 5.0) -> list[ReceivedRequest]:
        """All requests once at least ``n`` are answered (or, with ``answered=False``, have merely arrived);
        AssertionError if not within ``timeout``."""
        if answered:
            await self._wait(
                lambda: sum(r.status is not None for r in self.requests) >= n, timeout, f"{n} answered requests"
            )
        else:
            await self._wait(lambda: len(self.requests) >= n, timeout, f"{n} requests")
        return list(self.requests)

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if self._changed is None:
            raise RuntimeError("FakeSlack is not started")
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(
                f"FakeSlack: expected {what} within {timeout}s; messages: {[m.text for m in self.messages]}, "
                f"requests: {[(r.method, r.status, r.error) for r in self.requests]}"
            ) from None

    async def _changed_now(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    # -- the API -------------------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        record = ReceivedRequest(method=request.match_info["method"], content_type=request.content_type, at=loop.time())
        self.requests.append(record)
        await self._changed_now()
        # Faults are decided on arrival, so concurrent requests consume them in the order they came in.
        fault = self._take_fault()
        if self._faults.delay > 0:
            await self._hold(self._faults.delay)
        answer = fault if fault is not None else await self._answer(record.method, request)
        record.status = answer.status
        if not answer.payload.get("ok"):
            record.error = answer.payload.get("error")
        await self._changed_now()
        return web.json_response(answer.payload, status=answer.status, headers=answer.headers)

    def _take_fault(self) -> _Answer | None:
        faults = self._faults
        if faults.rate_limited > 0:
            faults.rate_limited -= 1
            return _Answer(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(faults.retry_after)}
            )
        if faults.failing > 0:
            faults.failing -= 1
            return _Answer({"ok": False, "error": "internal_error"}, status=faults.failure_status)
        return None

    async def _hold(self, seconds: float) -> None:
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    async def _answer(self, method: str, request: web.Request) -> _Answer:
        body, error = await self._read_body(request)
        if error is not None:
            return _error(error)
        error = self._check_auth(request, body)
        if error is not None:
            return _error(error)
        if method == "auth.test":
            return _Answer(
                {
                    "ok": True,
                    "url": "https://birdwatch-test.slack.com/",
                    "team": "birdwatch-test",
                    "user": "birdwatch",
                    "team_id": "T0BIRDWATCH",
                    "user_id": "U0BIRDWATCH",
                    "bot_id": "B0BIRDWATCH",
                    "is_enterprise_install": False,
                }
            )
        if method == "chat.postMessage":
            return self._post_message(body, request.content_type)
        if method == "chat.update":
            return self._update(body)
        return _Answer({"ok": False, "error": "unknown_method", "req_method": method})

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], str | None]:
        fields: dict[str, Any] = dict(request.query)
        if not request.body_exists:
            return fields, None
        if request.content_type == "application/json":
            try:
                data = await request.json()
            except ValueError:
                return fields, "invalid_json"
            if not isinstance(data, dict):
                return fields, "invalid_json"
            fields.update(data)
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            fields.update({k: v for k, v in form.items() if isinstance(v, str)})
        else:
            return fields, "invalid_form_data"
        return fields, None

    def _check_auth(self, request: web.Request, body: dict[str, Any]) -> str | None:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, given = header.partition(" ")
            token = given.strip() if scheme.lower() == "bearer" else ""
        elif request.content_type != "application/json" and isinstance(body.get("token"), str):
            # Slack takes a form field too, but never a token inside a JSON body.
            token = body["token"]
        else:
            return "not_authed"
        return None if token == self.token else "invalid_auth"

    def _post_message(self, body: dict[str, Any], content_type: str) -> _Answer:
        channel = body.get("channel")
        if not isinstance(channel, str) or not channel:
            return _error("channel_not_found")
        name = self._ids.get(channel, channel.lstrip("#"))
        if self.channels is not None and name not in self.channels:
            return _error("channel_not_found")
        thread_ts = body.get("thread_ts") or None
        if thread_ts is not None and not any(m.ts == thread_ts and m.channel == name for m in self.messages):
            return _error("thread_not_found")
        blocks, error = _blocks(body)
        if error is not None:
            return _error(error)
        text = body.get("text")
        if text is not None and not isinstance(text, str):
            text = str(text)
        if not text and not blocks:
            return _error("no_text")
        ts = f"{1_700_000_000 + self._seq // 1_000_000}.{self._seq % 1_000_000:06d}"
        self._seq += 1
        self.messages.append(
            PostedMessage(channel=name, text=text, blocks=blocks, ts=ts, content_type=content_type, thread_ts=thread_ts)
        )
        message: dict[str, Any] = {
            "type": "message",
            "subtype": "bot_message",
            "text": text or "",
            "user": "U0BIRDWATCH",
            "bot_id": "B0BIRDWATCH",
            "ts": ts,
        }
        if thread_ts is not None:
            message["thread_ts"] = thread_ts
        if blocks:
            message["blocks"] = blocks
        channel_id = _channel_id(name)
        self._ids[channel_id] = name
        return _Answer({"ok": True, "channel": channel_id, "ts": ts, "message": message})

    def _update(self, body: dict[str, Any]) -> _Answer:
        channel, ts = body.get("channel"), body.get("ts")
        if not isinstance(channel, str) or channel not in self._ids:
            return _error("channel_not_found")  # chat.update takes the channel's ID only
        name = self._ids[channel]
        if not any(m.ts == ts and m.channel == name for m in self.messages):
            return _error("message_not_found")
        blocks, error = _blocks(body)
        if error is not None:
            return _error(error)
        text = body.get("text")
        if not text and not blocks:
            return _error("no_text")
        self.updates.append(UpdatedMessage(channel=name, ts=str(ts), text=text, blocks=blocks))
        return _Answer({"ok": True, "channel": channel, "ts": ts, "text": text or ""})

    def thread(self, ts: str) -> list[PostedMessage]:
        """The replies in the thread of the message ``ts``, in order."""
        return [m for m in self.messages if m.thread_ts == ts]


@dataclass(frozen=True)
class _Answer:
    payload: dict[str, Any]
    status: int = 200
    headers: dict[str, str] | None = None


def _blocks(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
    blocks = body.get("blocks")
    if isinstance(blocks, str):  # a form field carries blocks JSON-encoded
        try:
            blocks = json.loads(blocks)
        except ValueError:
            return None, "invalid_blocks"
    if blocks is not None and not (isinstance(blocks, list) and all(isinstance(b, dict) for b in blocks)):
        return None, "invalid_blocks"
    return blocks, None


def _error(code: str) -> _Answer:
    # Slack answers API errors with HTTP 200; only the body says it failed.
    return _Answer({"ok": False, "error": code})


def _channel_id(channel: str) -> str:
    if _CHANNEL_ID.match(channel):
        return channel
    return "C" + hashlib.sha256(channel.encode()).hexdigest()[:10].upper()
