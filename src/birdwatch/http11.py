"""A small keep-alive HTTP/1.1 client for the controller's hot path: short JSON requests to one host.

A canary step is three small requests to the API server; through aiohttp each costs about 0.5 ms of CPU on a 2-core
machine, most of it in generic machinery (tracing hooks, timers, cookie and redirect handling, multidicts) that a
request with a fixed shape never needs. This client speaks just enough HTTP/1.1 for that shape: a request with a
Content-Length body, a response with Content-Length or chunked encoding, connections kept alive in a pool. Anything
unusual (a closed connection, a malformed answer) is an ``OSError`` the caller treats like any transport failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEADER = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class Http11Pool:
    """Keep-alive connections to one ``http(s)://host:port``, at most ``size`` open at once."""

    def __init__(
        self, base_url: str, *, ssl_context: ssl.SSLContext | None, server_hostname: str | None = None, size: int = 64
    ) -> None:
        parts = urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._host_header = parts.netloc.rsplit("@", 1)[-1].encode()
        self._ssl = ssl_context if self._https else None
        self._server_hostname = server_hostname
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    async def request(
        self, method: str, target: str, *, headers: Mapping[str, str], body: bytes | None, timeout: float
    ) -> Response:
        """One request; ``target`` is the path with its query string. Raises OSError or TimeoutError."""
        head = [f"{method} {target} HTTP/1.1\r\n".encode(), b"Host: ", self._host_header, b"\r\n"]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n".encode())
        if body is not None:
            head.append(f"Content-Length: {len(body)}\r\n".encode())
        head.append(b"\r\n")
        payload = b"".join(head) + (body or b"")
        async with self._slots:
            async with asyncio.timeout(timeout):
                # A pooled connection may have been closed by the server while idle: then one fresh try.
                for attempt in (0, 1):
                    conn, reused = await self._take()
                    try:
                        conn.writer.write(payload)
                        response, keep = await _read_response(conn.reader, method)
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        conn.close()
                        if (
                            reused
                            and attempt == 0
                            # Never a POST: the server may have acted on it before the connection broke, and a
                            # create sent again is made twice (an Event) or refused as already there (a Lease).
                            # birdwatch's PATCHes are conditional (a replay is answered 409) or idempotent.
                            and method in ("GET", "PATCH", "PUT", "DELETE")
                            and isinstance(exc, ConnectionError | asyncio.IncompleteReadError)
                        ):
                            continue
                        raise OSError(f"{type(exc).__name__}: {exc}") from exc
                    except BaseException:
                        conn.close()  # cancelled or timed out mid-exchange: the connection's state is unknown
                        raise
                    if keep and not self._closed:
                        self._idle.append(conn)
                    else:
                        conn.close()
                    return response
        raise AssertionError("unreachable")

    async def _take(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn, True
            conn.close()
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=(self._server_hostname or self._host) if self._ssl else None,
            limit=MAX_HEADER,
        )
        return _Connection(reader, writer), False

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[Response, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    status = int(rest[:3])
    length: int | None = None
    chunked = False
    keep = version == "HTTP/1.1"
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            keep = value.lower() != "close" if keep else value.lower() == "keep-alive"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Response(status, b""), keep
    if chunked:
        parts = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            total += size
            if total > MAX_BODY:
                raise ValueError("response body too large")
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return Response(status, b"".join(parts)), keep
    if length is not None:
        if length > MAX_BODY:
            raise ValueError("response body too large")
        return Response(status, await reader.readexactly(length)), keep
    # Neither: the body runs to the end of the connection.
    return Response(status, await reader.read(MAX_BODY)), False
