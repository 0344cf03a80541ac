"""Kube.watch's read timeout on a loopback server that misbehaves on demand: a silent stream is ended within its
read timeout, a reader slower than the timeout is not taken for a dead connection, an answer whose
head never comes is given up on."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from birdwatch.kube import VIRTUALSERVICES, Kube, KubeError
from birdwatch.kubeconfig_import import Configuration

SLACK = 2.0  # scheduling on a busy shared machine: upper bounds only, far below "never"


def _line(n: int) -> bytes:
    obj = {"metadata": {"name": f"vs-{n}", "namespace": "ns", "resourceVersion": str(n)}}
    return (json.dumps({"type": "MODIFIED", "object": obj}) + "\n").encode()


async def _events(request: web.Request) -> web.StreamResponse:
    """The namespace gives the orders, ``<then>_<count>_<gap>``: ``silent``, ``count`` events then nothing on an
    open connection; ``end``, ``count`` events ``gap`` seconds apart, then the end; ``nohead``, no answer at all."""
    then, count_text, gap_text = request.match_info["namespace"].split("_")
    count, gap = int(count_text), float(gap_text)
    if then == "nohead":
        await asyncio.sleep(30)
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for n in range(count):
        await response.write(_line(n))
        await asyncio.sleep(gap)
    if then == "silent":
        await asyncio.sleep(30)
    await response.write_eof()
    return response


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    app = web.Application()
    app.router.add_route("GET", "/apis/networking.istio.io/v1/namespaces/{namespace}/virtualservices", _events)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    configuration = Configuration()
    configuration.host = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = Kube(configuration, env={})
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


async def _watch(kube: Kube, orders: str, *, read_timeout: float, pause: float = 0.0) -> list[str]:
    names = []
    async for event in kube.watch(VIRTUALSERVICES, orders, resource_version="1", read_timeout=read_timeout):
        names.append(event.object["metadata"]["name"])
        await asyncio.sleep(pause)
    return names


async def test_a_silent_stream_is_ended_within_its_read_timeout(kube: Kube) -> None:
    started = time.monotonic()
    with pytest.raises(KubeError) as raised:
        await _watch(kube, "silent_3_0", read_timeout=0.4)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed <= 0.4 + SLACK
    assert raised.value.reason == "WatchBroken"
    assert "Timeout" in raised.value.message


async def test_a_reader_slower_than_the_read_timeout_is_not_a_dead_connection(kube: Kube) -> None:
    # Events keep coming (every 0.1 s); the reader takes 0.6 s over each, longer than the timeout of 0.4 s.
    names = await _watch(kube, "end_4_0.1", read_timeout=0.4, pause=0.6)
    assert names == ["vs-0", "vs-1", "vs-2", "vs-3"]


async def test_an_answer_that_never_starts_is_given_up_on(kube: Kube) -> None:
    started = time.monotonic()
    with pytest.raises(KubeError) as raised:
        await _watch(kube, "nohead_0_0", read_timeout=0.4)
    assert 0.4 <= time.monotonic() - started <= 0.4 + SLACK
    assert raised.value.reason == "WatchBroken"
