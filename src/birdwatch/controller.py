"""The watch loop: LIST the BirdWatches, WATCH from the list's resourceVersion, hand every change to the registry.

It keeps the last resourceVersion it saw (bookmarks included); when the server says 410 Gone it LISTs again and
reconciles what changed while it was away; a broken or silent stream is re-opened with backoff. One loop per watched
scope (all namespaces, or each namespace given). With a label selector (a shard, ``--label-selector``) the API server
sends only the BirdWatches that match: one relabelled away comes as DELETED (its labels as they were before), and is
forgotten as a deleted one is.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from .kube import BIRDWATCHES, Gone, Kube, KubeError, Obj, Resource
from .registry import Key

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class WatchSettings:
    timeout_seconds: int = 300  # the server ends each watch after this; we re-open from the same point
    read_timeout: float = 90.0  # bookmarks come about every minute, so longer silence is a dead connection
    backoff_max: float = 30.0


class Sink(Protocol):
    """What a watch feeds: the registry for BirdWatches, the ending audit for VirtualServices and DestinationRules."""

    def sync(self, objs: list[Obj], *, scope: Callable[[Key], bool]) -> None: ...
    def observe(self, obj: Obj) -> None: ...
    def forget(self, namespace: str, name: str) -> None: ...


class Watcher:
    """Feeds one scope's events of one resource (BirdWatches unless told) into a sink until cancelled."""

    def __init__(
        self,
        kube: Kube,
        registry: Sink,
        *,
        namespace: str | None,
        settings: WatchSettings = WatchSettings(),
        resource: Resource = BIRDWATCHES,
        wanted: Callable[[bytes], bool] | None = None,
        label_selector: str | None = None,
    ) -> None:
        self._kube = kube
        self._registry = registry
        self._namespace = namespace
        self._settings = settings
        self._resource = resource
        self._wanted = wanted  # a cheap look at each raw event: the ones it declines are not even decoded
        self._label_selector = label_selector  # asked of the API server on the LIST and the WATCH
        self.established = asyncio.Event()  # set once the first LIST has been reconciled
        self.relists = 0

    def _in_scope(self) -> Callable[[Key], bool]:
        namespace = self._namespace
        return lambda key: namespace is None or key[0] == namespace

    async def run(self) -> None:
        scope = self._namespace or "all namespaces"
        failures = 0
        opened = time.monotonic()
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    items, resource_version = await self._kube.list(
                        self._resource, self._namespace, label_selector=self._label_selector
                    )
                    for item in items:  # LIST items carry no apiVersion/kind of their own
                        item.setdefault("apiVersion", self._resource.api_version)
                        item.setdefault("kind", self._resource.kind)
                    self._registry.sync(items, scope=self._in_scope())
                    self.relists += 1
                    self.established.set()
                    log.info(
                        f"listed {self._resource.plural}",
                        scope=scope,
                        count=len(items),
                        resource_version=resource_version,
                        **({"label_selector": self._label_selector} if self._label_selector else {}),
                    )
                    # This frame lives as long as the watch: held here, the LIST's objects would outlive their use
                    # (about 7 kB per VirtualService and DestinationRule the ending audit listed).
                    del items
                opened = time.monotonic()
                async for event in self._kube.watch(
                    self._resource,
                    self._namespace,
                    resource_version=resource_version,
                    timeout_seconds=self._settings.timeout_seconds,
                    read_timeout=self._settings.read_timeout,
                    wanted=self._wanted,
                    label_selector=self._label_selector,
                ):
                    failures = 0
                    obj = event.object
                    resource_version = obj.get("metadata", {}).get("resourceVersion") or resource_version
                    if event.type == "BOOKMARK":
                        continue
                    self._dispatch(event.type, obj)
            except Gone:
                log.info("watch expired (410 Gone); listing again", scope=scope)
                resource_version = None
            except KubeError as exc:
                # A stream that served a while before it broke was healthy: start the backoff over. Only
                # failures in a row (refused, broken at once) should wait longer and longer.
                if time.monotonic() - opened > self._settings.read_timeout / 2:
                    failures = 0
                failures += 1
                delay = min(self._settings.backoff_max, 0.5 * 2 ** min(failures, 8)) * random.uniform(0.8, 1.2)  # noqa: S311
                log.warning(
                    "watch failed; reconnecting", scope=scope, status=exc.status, detail=str(exc), delay=round(delay, 2)
                )
                if exc.status in (401, 403, 404):
                    # Credentials, RBAC or a missing CRD: a fresh LIST says which, loudly, on the next round.
                    resource_version = None
                await asyncio.sleep(delay)

    def _dispatch(self, kind: str, obj: Obj) -> None:
        try:
            if kind in ("ADDED", "MODIFIED"):
                self._registry.observe(obj)
            elif kind == "DELETED":
                # Deleted, or (with a label selector) relabelled so that it no longer matches: the API server
                # sends both alike, with the object as it was before, and both mean the same here.
                self._registry.forget(obj["metadata"]["namespace"], obj["metadata"]["name"])
            else:
                log.warning("unknown watch event type; skipped", type=kind)
        except (KeyError, TypeError, ValueError) as exc:
            # One malformed object must not stop the loop that serves every other canary.
            log.error(
                "could not handle watch event; skipped",
                type=kind,
                detail=repr(exc),
                namespace=(obj.get("metadata") or {}).get("namespace"),
                birdwatch=(obj.get("metadata") or {}).get("name"),
            )
