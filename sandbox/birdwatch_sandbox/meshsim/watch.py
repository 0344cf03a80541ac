"""Follows one VirtualService and one DestinationRule through the API server, as istiod does for Envoy.

Each object is read with a LIST (by name) and then followed with a WATCH from the list's resourceVersion. A watch that
ends (server timeout, closed connection) is resumed from the last resourceVersion seen; a 410 Gone (the version is
too old) means a fresh LIST. Other failures are logged and retried with a capped backoff, so a restarted API server
does not stop the simulator. ``on_change`` is called (on the event loop) after every change of either object.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s

log = logging.getLogger("meshsim.watch")

GROUP, VERSION = "networking.istio.io", "v1"
VIRTUALSERVICES, DESTINATIONRULES = "virtualservices", "destinationrules"
# The server ends each watch after WATCH_SECONDS; the client gives up on a silent connection after sock_read.
WATCH_SECONDS = 60
WATCH_TIMEOUT = aiohttp.ClientTimeout(sock_connect=10, sock_read=90)
LIST_TIMEOUT = aiohttp.ClientTimeout(total=15)
MAX_BACKOFF = 5.0


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class RouteWatcher:
    """The current VirtualService and DestinationRule named ``name`` in ``namespace`` (None while absent)."""

    def __init__(
        self, api: k8s.ApiClient, *, namespace: str, name: str, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self._custom = k8s.CustomObjectsApi(api)
        self.namespace, self.name = namespace, name
        self.objects: dict[str, dict[str, Any] | None] = {VIRTUALSERVICES: None, DESTINATIONRULES: None}
        self._listed = {plural: asyncio.Event() for plural in self.objects}
        self._on_change = on_change

    @property
    def virtual_service(self) -> dict[str, Any] | None:
        return self.objects[VIRTUALSERVICES]

    @property
    def destination_rule(self) -> dict[str, Any] | None:
        return self.objects[DESTINATIONRULES]

    @property
    def listed(self) -> bool:
        """Both objects have been listed once, so what ``objects`` holds is what the API server holds."""
        return all(event.is_set() for event in self._listed.values())

    async def wait_listed(self) -> None:
        """Return once both objects have been listed once (each may still be absent)."""
        for event in self._listed.values():
            await event.wait()

    async def run(self) -> None:
        """Follow both objects until cancelled."""
        async with asyncio.TaskGroup() as group:
            for plural in self.objects:
                group.create_task(self._follow(plural), name=f"meshsim-watch-{plural}")

    def _set(self, plural: str, obj: dict[str, Any] | None) -> None:
        self.objects[plural] = obj
        self._on_change()

    async def _follow(self, plural: str) -> None:
        backoff = 0.2
        while True:
            try:
                resource_version = await self._list(plural)
                if not self._listed[plural].is_set():
                    self._listed[plural].set()
                    self._on_change()
                backoff = 0.2
                while True:
                    resource_version = await self._watch(plural, resource_version)
            except _Gone:
                log.info("watch of %s %s/%s: resourceVersion too old, listing again", plural, self.namespace, self.name)
            except (k8s.ApiException, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                log.warning(
                    "watch of %s %s/%s failed (%s); again in %.1fs", plural, self.namespace, self.name, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _list(self, plural: str) -> str:
        found = await self._custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            plural,
            field_selector=f"metadata.name={self.name}",
            _request_timeout=LIST_TIMEOUT,
        )
        items = found.get("items") or []
        obj = items[0] if items else None
        if obj != self.objects[plural]:
            self._set(plural, obj)
        return str(found["metadata"]["resourceVersion"])

    async def _watch(self, plural: str, resource_version: str) -> str:
        """One watch request: apply its events until the server ends it; returns the last resourceVersion."""
        resp = await self._custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            plural,
            field_selector=f"metadata.name={self.name}",
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=WATCH_TIMEOUT,
        )
        try:
            if resp.status == 410:
                raise _Gone
            if resp.status != 200:
                body = (await resp.read())[:300]
                raise k8s.ApiException(status=resp.status, reason=body.decode(errors="replace"))
            while line := await resp.content.readline():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone
                    raise k8s.ApiException(status=obj.get("code", 0), reason=str(obj.get("message")))
                resource_version = str(obj["metadata"]["resourceVersion"])
                if kind in ("ADDED", "MODIFIED"):
                    self._set(plural, obj)
                elif kind == "DELETED":
                    self._set(plural, None)
            return resource_version
        finally:
            resp.release()
