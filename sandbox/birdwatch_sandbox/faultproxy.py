"""A fault-injecting HTTP(S) reverse proxy on a real loopback socket, put between birdwatch and a server it talks to
(kube-apiserver, Prometheus), so tests can break the conversation the way networks, load balancers and overloaded
servers do, while both ends run unchanged.

Requests are forwarded as they came; responses are streamed back chunk by chunk, so a watch reaches the client event
by event. Faults, switched at runtime from the event loop or from any other thread:

* ``error_rate(p)``: a fraction ``p`` of requests is answered 500, 503 or 429 (with ``Retry-After: 1``) without
  reaching the server, or held unanswered until the client gives up (``"hang"``); optionally ``"lost"``: forwarded,
  so the server acts on it, and then the connection is closed before the answer is passed on;
* ``cut_watches()`` / ``cut_watches_every(s)``: open watch streams are closed abruptly (no final chunk);
* ``silence_watches()``: open watch streams stay open, but nothing more is forwarded on them;
* ``down()`` / ``up()``: the connection is closed as soon as a request arrives, and open streams are closed at once;
  ``down(seconds=s, on_next=True)`` starts an ``s``-second outage at the next request;
* ``delay(s)``: requests wait ``s`` seconds before they are forwarded (``math.inf``: until the delay is lifted).

Each fault applies only to the requests its ``scope`` selects (``ANY``, ``WATCHES``, ``NOT_WATCHES``, ``WRITES``,
``Scope.path(prefix)``, or any predicate). ``faults()`` counts what was injected, by kind; ``statuses()`` counts the
upstream's own answers (to see, e.g., how many 409 Conflicts the client met). Everything the proxy holds is released
and every connection closed at ``close()``.

    async with FaultProxy(control_plane.url, upstream_ssl=ctx, listen_ssl=serving) as proxy:
        proxy.error_rate(0.15, scope=NOT_WATCHES)
        ...
        print(proxy.faults())
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .envtest.controlplane import ControlPlane, write_kubeconfig
from .envtest.pki import CertificateAuthority

ERROR_KINDS: tuple[str, ...] = ("500", "503", "429", "hang")
"""What ``error_rate`` answers by default, picked evenly: Kubernetes' and Prometheus's own ways of failing."""

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_POLL = 0.05  # how often a held request looks at the switches again


@dataclass(frozen=True)
class Call:
    """What the proxy knows of a request when it decides on a fault."""

    method: str
    path: str
    watch: bool


@dataclass(frozen=True)
class Scope:
    """Which requests a fault applies to."""

    name: str
    test: Callable[[Call], bool] = field(repr=False)

    def __call__(self, call: Call) -> bool:
        return self.test(call)

    @staticmethod
    def path(prefix: str) -> Scope:
        return Scope(f"path {prefix}", lambda call: call.path.startswith(prefix))

    def __and__(self, other: Scope) -> Scope:
        return Scope(f"{self.name} and {other.name}", lambda call: self(call) and other(call))


ANY = Scope("any", lambda call: True)
WATCHES = Scope("watches", lambda call: call.watch)
NOT_WATCHES = Scope("not watches", lambda call: not call.watch)
WRITES = Scope("writes", lambda call: call.method in _WRITES)


@dataclass(eq=False)
class _Stream:
    """A response being streamed to a client."""

    call: Call
    transport: asyncio.Transport
    silenced_at: float | None = None


@dataclass
class _Switches:
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = ERROR_KINDS
    error_scope: Scope = ANY
    down_scope: Scope | None = None
    down_until: float = math.inf
    armed: tuple[Scope, float] | None = None  # an outage of that many seconds starting at the next request in scope
    delay: float = 0.0
    delay_scope: Scope = ANY
    silence_new: bool = False


class FaultProxy:
    """A reverse proxy to ``upstream`` (``http(s)://host:port``) that injects the faults it is told to."""

    def __init__(
        self,
        upstream: str,
        *,
        listen_ssl: ssl.SSLContext | None = None,
        upstream_ssl: ssl.SSLContext | None = None,
        seed: int = 0,
        max_hold: float = 120.0,
        name: str = "proxy",
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.name = name
        self._listen_ssl = listen_ssl
        self._upstream_ssl = upstream_ssl
        self._max_hold = max_hold
        self._lock = threading.Lock()  # guards the switches, the counters and the random generator
        self._switches = _Switches()
        self._random = random.Random(seed)
        self._faults: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self.requests = 0
        self.abandoned: deque[float] = deque(maxlen=1000)  # how long clients waited on delayed requests they gave up
        self.silenced_for: deque[float] = deque(maxlen=1000)  # how long silenced streams stayed open after silence
        self._streams: set[_Stream] = set()  # touched on the loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._cutter: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._upstream_ssl if self._upstream_ssl else False, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,  # bodies pass through as the server encoded them, with their Content-Encoding
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that leaves cancels its handler, which lets go of the upstream request.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._listen_ssl)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        """Stop: lift every hold, close every connection, stop the watch cutter. Safe to call twice."""
        if self._closing is None or self._closing.is_set():
            return
        self._closing.set()
        if self._cutter is not None:
            self._cutter.cancel()
            await asyncio.gather(self._cutter, return_exceptions=True)
            self._cutter = None
        for stream in list(self._streams):
            stream.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"{'https' if self._listen_ssl else 'http'}://127.0.0.1:{self._port}"

    # -- switches (any thread) ---------------------------------------------------------------------------------------

    def error_rate(self, rate: float, *, kinds: Sequence[str] = ERROR_KINDS, scope: Scope = ANY) -> None:
        """Answer a fraction ``rate`` of the requests in ``scope`` with one of ``kinds`` (picked evenly): "500",
        "503", "429" (``Retry-After: 1``), "hang" (no answer until the client gives up) or "lost" (forwarded, then
        the connection closed before the answer)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"error rate {rate} outside 0..1")
        unknown = set(kinds) - {"500", "503", "429", "hang", "lost"}
        if unknown or not kinds:
            raise ValueError(f"unknown error kinds {sorted(unknown)}" if unknown else "no error kinds")
        with self._lock:
            switches = self._switches
            switches.error_rate, switches.error_kinds, switches.error_scope = rate, tuple(kinds), scope

    def down(self, scope: Scope = ANY, *, seconds: float | None = None, on_next: bool = False) -> None:
        """Refuse the requests in ``scope`` (close the connection as soon as one arrives) and close the open streams
        in it now; for ``seconds`` if given, else until ``up()``. ``on_next``: the outage starts at the next request
        in scope (which is the first one refused), so a test can make it meet a request it cannot time exactly."""
        length = math.inf if seconds is None else seconds
        with self._lock:
            if on_next:
                self._switches.armed = (scope, length)
                return
            self._switches.down_scope, self._switches.down_until = scope, time.monotonic() + length
        self._on_loop(lambda: self._close_streams(scope, "refused"))

    def up(self) -> None:
        with self._lock:
            self._switches.down_scope, self._switches.armed = None, None

    def delay(self, seconds: float, *, scope: Scope = ANY) -> None:
        """Hold each request in ``scope`` ``seconds`` before forwarding it; requests already held follow the new
        setting (so ``delay(math.inf)`` holds until ``delay(0)``)."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        with self._lock:
            self._switches.delay, self._switches.delay_scope = seconds, scope

    def cut_watches(self) -> None:
        """Close every open watch stream abruptly, now."""
        self._on_loop(lambda: self._close_streams(WATCHES, "cut"))

    def cut_watches_every(self, seconds: float | None) -> None:
        """Cut the open watch streams every ``seconds`` from now on (None: stop)."""
        if seconds is not None and seconds <= 0:
            raise ValueError("the period must be positive")

        def switch() -> None:
            if self._cutter is not None:
                self._cutter.cancel()
                self._cutter = None
            if seconds is not None and self._closing is not None and not self._closing.is_set():
                self._cutter = asyncio.get_running_loop().create_task(self._cut_every(seconds), name="watch cutter")

        self._on_loop(switch)

    def silence_watches(self, *, new: bool = False) -> None:
        """Forward nothing more on the watch streams open now (they stay open); with ``new``, on those opened later
        too, until ``speak()``."""
        with self._lock:
            self._switches.silence_new = new
        self._on_loop(self._silence_open)

    def speak(self) -> None:
        """New watch streams are forwarded again (streams already silenced stay silent)."""
        with self._lock:
            self._switches.silence_new = False

    def reset(self) -> None:
        """No more faults: no errors, no outage, no delay, no silence, no cutting."""
        with self._lock:
            self._switches = _Switches()
        self.cut_watches_every(None)

    # -- what happened -----------------------------------------------------------------------------------------------

    def faults(self) -> Counter[str]:
        """Faults injected so far, by kind."""
        with self._lock:
            return Counter(self._faults)

    def statuses(self) -> Counter[int]:
        """The upstream's answers passed on, by HTTP status."""
        with self._lock:
            return Counter(self._statuses)

    @property
    def open_watches(self) -> int:
        """Watch streams open now."""
        return sum(1 for s in list(self._streams) if s.call.watch)

    def _count(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    # -- the loop's side ---------------------------------------------------------------------------------------------

    def _on_loop(self, action: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self.name} is not started")
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            action()
        else:
            loop.call_soon_threadsafe(action)

    def _close_streams(self, scope: Scope, kind: str) -> None:
        for stream in list(self._streams):
            if scope(stream.call) and not stream.transport.is_closing():
                self._count(kind)
                stream.transport.abort()

    def _silence_open(self) -> None:
        now = time.monotonic()
        for stream in self._streams:
            if stream.call.watch and stream.silenced_at is None:
                stream.silenced_at = now
                self._count("silenced")

    async def _cut_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self._close_streams(WATCHES, "cut")

    def _decide(self, call: Call) -> tuple[str | None, float]:
        """The fault for this request ("refused", an error kind, or None) and how long to delay it."""
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            s = self._switches
            if s.armed is not None and s.armed[0](call):
                s.down_scope, s.down_until = s.armed[0], now + s.armed[1]
                s.armed = None
            if s.down_scope is not None and now >= s.down_until:
                s.down_scope = None
            if s.down_scope is not None and s.down_scope(call):
                return "refused", 0.0
            if s.error_rate > 0 and s.error_scope(call) and self._random.random() < s.error_rate:
                return self._random.choice(s.error_kinds), 0.0
            return None, s.delay if s.delay_scope(call) else 0.0

    def _delay_left(self, call: Call, since: float) -> float:
        with self._lock:
            s = self._switches
            wanted = s.delay if s.delay_scope(call) else 0.0
        return since + wanted - time.monotonic()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._closing is not None
        call = Call(request.method, request.path, request.query.get("watch", "").lower() in ("true", "1"))
        if self._closing.is_set():
            return self._refuse(request, None)
        fault, delay = self._decide(call)
        if fault == "refused":
            return self._refuse(request, "refused")
        if fault in ("500", "503", "429"):
            self._count(fault)
            return _error_response(int(fault))
        if fault == "hang":
            self._count("hang")
            await self._hold_until_gone()
            return self._refuse(request, None)
        if delay > 0:
            self._count("delayed")
            await self._wait_out_delay(call)
            if self._closing.is_set():
                return self._refuse(request, None)
        return await self._forward(request, call, lost=fault == "lost")

    def _refuse(self, request: web.Request, kind: str | None) -> web.StreamResponse:
        if kind is not None:
            self._count(kind)
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)  # never reaches the client: the connection is gone

    async def _hold_until_gone(self) -> None:
        """Say nothing until the client gives up (its handler is cancelled then), the proxy closes, or max_hold."""
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._max_hold):
                await self._closing.wait()

    async def _wait_out_delay(self, call: Call) -> None:
        assert self._closing is not None
        since = time.monotonic()
        try:
            while not self._closing.is_set():
                left = self._delay_left(call, since)
                if left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, _POLL)):
                        await self._closing.wait()
        except asyncio.CancelledError:
            self.abandoned.append(time.monotonic() - since)  # the client gave up while we held its request
            raise

    async def _forward(self, request: web.Request, call: Call, *, lost: bool) -> web.StreamResponse:
        assert self._session is not None
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        body = await request.read() if request.body_exists else None
        url = self.upstream + request.path_qs
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError) as exc:
            return _error_response(502, f"{self.name}: upstream {self.upstream} unreachable: {exc}")
        async with upstream:
            with self._lock:
                self._statuses[upstream.status] += 1
            if lost:
                # The server did what was asked; the client never hears of it.
                self._count("lost")
                return self._refuse(request, None)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            assert request.transport is not None
            stream = _Stream(call, request.transport)
            with self._lock:
                silence_new = self._switches.silence_new
            if call.watch and silence_new:
                stream.silenced_at = time.monotonic()
                self._count("silenced")
            self._streams.add(stream)
            try:
                await response.prepare(request)
                while True:
                    chunk = await upstream.content.readany()
                    if not chunk:
                        break
                    if stream.silenced_at is None:
                        await response.write(chunk)
                await response.write_eof()
            except (aiohttp.ClientError, ConnectionError):
                # The upstream broke off, or the client left: the client sees the connection end short.
                if not request.transport.is_closing():
                    request.transport.abort()
            finally:
                self._streams.discard(stream)
                if stream.silenced_at is not None:
                    self.silenced_for.append(time.monotonic() - stream.silenced_at)
            return response


def _error_response(status: int, message: str | None = None) -> web.Response:
    """An error as kube-apiserver words it (Prometheus clients only look at the status)."""
    reason = {429: "TooManyRequests", 500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable"}[status]
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message or f"faultproxy: injected {status}",
        "reason": reason,
        "code": status,
    }
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


async def api_server_proxy(control_plane: ControlPlane, folder: Path, *, seed: int = 0) -> tuple[FaultProxy, Path]:
    """A started FaultProxy in front of ``control_plane``'s API server, and a kubeconfig that points at it.

    The proxy serves TLS with a certificate of its own CA (made here, in ``folder``: the control plane's CA key is
    not kept), which the kubeconfig trusts; upstream it trusts the control plane's CA and presents the admin's
    client certificate, so requests reach the API server as the admin's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority(folder / "pki")
    serving = authority.issue("faultproxy", common_name="faultproxy", server=True)
    listen = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    listen.load_cert_chain(str(serving.cert), str(serving.key))
    upstream = ssl.create_default_context(cafile=str(control_plane.ca))
    upstream.load_cert_chain(str(control_plane.admin.cert), str(control_plane.admin.key))
    proxy = await FaultProxy(
        control_plane.url, listen_ssl=listen, upstream_ssl=upstream, seed=seed, name="api proxy"
    ).start()
    kubeconfig = write_kubeconfig(
        folder / "kubeconfig", server=proxy.url, ca=authority.cert, client=control_plane.admin
    )
    return proxy, kubeconfig
