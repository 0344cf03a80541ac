"""Local servers speaking the incoming-webhook protocols of Microsoft Teams (Workflows), Discord, Google Chat,
Mattermost and Rocket.Chat, and a receiver of birdwatch's generic CloudEvents webhook: the fakes for the SaaS
notifiers, as ``slackfake`` is Slack's.

Each listens on a real loopback socket, at the path the service uses, with the credential in the URL where the
service keeps it (a Workflows ``sig``, a Discord token, a Google Chat key and token, a Mattermost hook key, a
Rocket.Chat integration id and token), checks what the service checks (method, Content-Type, the body's shape and
its limits), and answers as the service answers: Teams 202 with no body, Discord 200 with the message for
``?wait=true`` (204 without), Google Chat 200 with the message and its thread, Mattermost ``ok`` as text/plain,
Rocket.Chat ``{"success": true}``. A wrong credential gets the service's own refusal.

The CloudEvents receiver parses the body with the ``cloudevents`` package (structured mode, the spec's JSON
format), refuses a wrong Content-Type (415) and, when given a secret, a missing or wrong
``X-Birdwatch-Signature-256`` HMAC (401).

Faults: ``fail_next(n, status=500)``, ``hang(seconds)`` (hold every answer), as slackfake has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_structured
from cloudevents.core.formats.json import JSONFormat


@dataclass(frozen=True)
class Received:
    """One request the fake accepted."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Faults:
    failing: int = 0
    status: int = 500
    hang: float = 0.0
    limited: int = 0
    retry_after: float = 1.0


class HookFake:
    """The shared machinery: a server on a free loopback port, what it accepted, its faults."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.requests = 0  # everything that arrived, answered or not, accepted or not
        self._faults = _Faults()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._changed: asyncio.Condition | None = None
        self._closing: asyncio.Event | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> HookFake:
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HookFake:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def origin(self) -> str:
        if self._port is None:
            raise RuntimeError("not started")
        return f"http://127.0.0.1:{self._port}"

    def fail_next(self, n: int = 1, *, status: int = 500) -> None:
        self._faults.failing, self._faults.status = n, status

    def rate_limit_next(self, n: int = 1, *, retry_after: float = 1.0) -> None:
        """Answer the next ``n`` requests 429 with ``Retry-After`` (and Discord's ``retry_after`` in the body)."""
        self._faults.limited, self._faults.retry_after = n, retry_after

    def hang(self, seconds: float) -> None:
        """Hold every answer from now on for ``seconds`` (0: prompt again)."""
        self._faults.hang = seconds

    async def wait_for(self, n: int, *, timeout: float = 10.0) -> list[Received]:
        await self._wait(lambda: len(self.received) >= n, timeout, f"{n} accepted requests")
        return list(self.received)

    async def wait_for_requests(self, n: int, *, timeout: float = 10.0) -> None:
        await self._wait(lambda: self.requests >= n, timeout, f"{n} requests")

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        assert self._changed is not None, "not started"
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(
                f"{type(self).__name__}: expected {what} within {timeout}s; got {len(self.received)} of {self.requests}"
            ) from None

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _arrive(self, request: web.Request) -> web.Response | None:
        """Count the request and play the faults; a Response when a fault answers it."""
        self.requests += 1
        await self._notify()
        if self._faults.limited > 0:
            self._faults.limited -= 1
            wait = self._faults.retry_after
            return web.json_response(
                {"message": "You are being rate limited.", "retry_after": wait, "global": False},
                status=429,
                headers={"Retry-After": f"{wait:g}"},
            )
        if self._faults.failing > 0:
            self._faults.failing -= 1
            return web.json_response({"error": "injected"}, status=self._faults.status)
        if self._faults.hang > 0:
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._faults.hang):
                    await self._closing.wait()
        return None

    async def _accept(self, request: web.Request, body: bytes) -> None:
        self.received.append(
            Received(path=request.path, query=dict(request.query), headers=dict(request.headers), body=body)
        )
        await self._notify()


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


class FakeTeams(HookFake):
    """A Power Automate Workflows trigger "When a Teams webhook request is received"."""

    WORKFLOW = "5f1d2c0e8f2a4b8e9d0c1b2a3f4e5d6c"

    def __init__(self, *, sig: str) -> None:
        super().__init__()
        self.sig = sig

    @property
    def url(self) -> str:
        return (
            f"{self.origin}/workflows/{self.WORKFLOW}/triggers/manual/paths/invoke"
            f"?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={self.sig}"
        )

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/workflows/{workflow}/triggers/manual/paths/invoke", self._invoke)

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        fault = await self._arrive(request)
        if fault is not None:
            return fault
        if request.match_info["workflow"] != self.WORKFLOW or request.query.get("sig") != self.sig:
            return web.json_response(
                {"error": {"code": "DirectApiAuthorizationRequired", "message": "The request must be authenticated"}},
                status=401,
            )
        body = await request.read()
        data = _json_body(body)
        if request.content_type != "application/json" or not isinstance(data, dict):
            return web.json_response({"error": {"code": "InvalidRequestContent"}}, status=400)
        attachments = data.get("attachments")
        if data.get("type") != "message" or not isinstance(attachments, list) or not attachments:
            return web.json_response({"error": {"code": "InvalidTemplate", "message": "no attachments"}}, status=400)
        for attachment in attachments:
            content = attachment.get("content") or {}
            if (
                attachment.get("contentType") != "application/vnd.microsoft.card.adaptive"
                or content.get("type") != "AdaptiveCard"
                or not isinstance(content.get("body"), list)
            ):
                return web.json_response({"error": {"code": "InvalidTemplate", "message": "not a card"}}, status=400)
        await self._accept(request, body)
        return web.Response(status=202)


class FakeDiscord(HookFake):
    WEBHOOK_ID = "1180000000000000001"

    def __init__(self, *, token: str) -> None:
        super().__init__()
        self.token = token
        self._ids = itertools.count(1190000000000000001)

    @property
    def url(self) -> str:
        return f"{self.origin}/api/webhooks/{self.WEBHOOK_ID}/{self.token}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/webhooks/{id}/{token}", self._execute)

    async def _execute(self, request: web.Request) -> web.StreamResponse:
        fault = await self._arrive(request)
        if fault is not None:
            return fault
        if request.match_info["id"] != self.WEBHOOK_ID or request.match_info["token"] != self.token:
            return web.json_response({"message": "Invalid Webhook Token", "code": 50027}, status=401)
        body = await request.read()
        data = _json_body(body)
        if request.content_type != "application/json" or not isinstance(data, dict):
            return web.json_response({"message": "Cannot send an empty message", "code": 50006}, status=400)
        embeds = data.get("embeds") or []
        if not data.get("content") and not embeds:
            return web.json_response({"message": "Cannot send an empty message", "code": 50006}, status=400)
        problems = _discord_limits(embeds)
        if problems:
            return web.json_response({"code": 50035, "message": "Invalid Form Body", "errors": problems}, status=400)
        await self._accept(request, body)
        if request.query.get("wait") != "true":
            return web.Response(status=204)
        return web.json_response({"id": str(next(self._ids)), "webhook_id": self.WEBHOOK_ID, "embeds": embeds})


def _discord_limits(embeds: list[dict[str, Any]]) -> list[str]:
    problems = []
    if len(embeds) > 10:
        problems.append("more than 10 embeds")
    for embed in embeds:
        if len(embed.get("title", "")) > 256:
            problems.append("title over 256")
        if len(embed.get("description", "")) > 4096:
            problems.append("description over 4096")
        fields = embed.get("fields", [])
        if len(fields) > 25 or any(len(f.get("value", "")) > 1024 or not f.get("value") for f in fields):
            problems.append("fields")
        if not isinstance(embed.get("color", 0), int):
            problems.append("color not an integer")
    return problems


class FakeGoogleChat(HookFake):
    SPACE = "AAAAbirdwatch"

    def __init__(self, *, key: str, token: str) -> None:
        super().__init__()
        self.key, self.token = key, token
        self.threads: dict[str, str] = {}  # threadKey -> thread name
        self._seq = itertools.count(1)

    @property
    def url(self) -> str:
        return f"{self.origin}/v1/spaces/{self.SPACE}/messages?key={self.key}&token={self.token}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/spaces/{space}/messages", self._create)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        fault = await self._arrive(request)
        if fault is not None:
            return fault
        if request.query.get("key") != self.key or request.query.get("token") != self.token:
            return web.json_response(
                {
                    "error": {
                        "code": 401,
                        "message": "Request had invalid authentication credentials.",
                        "status": "UNAUTHENTICATED",
                    }
                },
                status=401,
            )
        body = await request.read()
        data = _json_body(body)
        if request.content_type != "application/json" or not isinstance(data, dict):
            return web.json_response({"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, status=400)
        cards = data.get("cardsV2")
        if not data.get("text") and not cards:
            return web.json_response(
                {"error": {"code": 400, "message": "Message cannot be empty.", "status": "INVALID_ARGUMENT"}},
                status=400,
            )
        for card in cards or []:
            if not card.get("cardId") or not isinstance((card.get("card") or {}).get("sections"), list):
                return web.json_response({"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, status=400)
        key = request.query.get("threadKey")
        n = next(self._seq)
        thread = (
            self.threads.setdefault(key, f"spaces/{self.SPACE}/threads/t{n}")
            if key
            else (f"spaces/{self.SPACE}/threads/t{n}")
        )
        await self._accept(request, body)
        return web.json_response(
            {"name": f"spaces/{self.SPACE}/messages/m{n}", "text": data.get("text", ""), "thread": {"name": thread}}
        )


class FakeMattermost(HookFake):
    def __init__(self, *, key: str) -> None:
        super().__init__()
        self.key = key

    @property
    def url(self) -> str:
        return f"{self.origin}/hooks/{self.key}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/hooks/{key}", self._hook)

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        fault = await self._arrive(request)
        if fault is not None:
            return fault
        if request.match_info["key"] != self.key:
            return web.json_response(
                {"id": "web.incoming_webhook.invalid.app_error", "message": "Invalid webhook.", "status_code": 400},
                status=400,
            )
        body = await request.read()
        data = _json_body(body)
        if request.content_type != "application/json" or not isinstance(data, dict):
            return web.json_response({"id": "api.webhook.incoming.error"}, status=400)
        if not data.get("text") and not data.get("attachments"):
            return web.json_response(
                {"id": "web.incoming_webhook.text.app_error", "message": "No text specified.", "status_code": 400},
                status=400,
            )
        await self._accept(request, body)
        return web.Response(text="ok", content_type="text/plain")


class FakeRocketChat(HookFake):
    INTEGRATION = "6a3fbirdwatch01"

    def __init__(self, *, token: str) -> None:
        super().__init__()
        self.token = token

    @property
    def url(self) -> str:
        return f"{self.origin}/hooks/{self.INTEGRATION}/{self.token}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/hooks/{id}/{token}", self._hook)

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        fault = await self._arrive(request)
        if fault is not None:
            return fault
        if request.match_info["id"] != self.INTEGRATION or request.match_info["token"] != self.token:
            return web.json_response(
                {"success": False, "error": "Invalid integration id or token provided."}, status=404
            )
        body = await request.read()
        data = _json_body(body)
        if not isinstance(data, dict) or not (data.get("text") or data.get("attachments")):
            return web.json_response({"success": False, "error": "no text"}, status=400)
        await self._accept(request, body)
        return web.json_response({"success": True})


class CloudEventsReceiver(HookFake):
    """A user's own service for birdwatch's generic webhook: takes structured CloudEvents, checks the HMAC."""

    def __init__(self, *, secret: str | None = None) -> None:
        super().__init__()
        self.secret = secret
        self.events: list[Any] = []  # the parsed cloudevents.core CloudEvents
        self.refused: list[int] = []  # the statuses of what was refused

    @property
    def url(self) -> str:
        return f"{self.origin}/birdwatch/events"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/birdwatch/events", self._event)

    async def _event(self, request: web.Request) -> web.StreamResponse:
        fault = await self._arrive(request)
        if fault is not None:
            return fault
        body = await request.read()
        if request.content_type != "application/cloudevents+json":
            self.refused.append(415)
            return web.Response(status=415, text="structured CloudEvents only")
        if self.secret is not None:
            given = request.headers.get("X-Birdwatch-Signature-256", "")
            wanted = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(given, wanted):
                self.refused.append(401)
                return web.Response(status=401, text="bad signature")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            event = from_structured(HTTPMessage(headers=headers, body=body), JSONFormat())
        except Exception as exc:  # what the SDK refuses is a bad request, whatever its class
            self.refused.append(400)
            return web.Response(status=400, text=f"not a CloudEvent: {exc}")
        self.events.append(event)
        await self._accept(request, body)
        return web.Response(status=204)
