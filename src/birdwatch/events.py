"""Kubernetes Events on BirdWatch objects, posted from a background queue so a slow API never delays a step.

A failed Event is logged and dropped: Events are a courtesy to the people running ``kubectl describe``, and
losing one must never stop a rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .kube import EVENTS, Kube, KubeError, Obj

log = structlog.get_logger(__name__)
MAX_MESSAGE = 1024  # the API server's limit for an Event's message


@dataclass(frozen=True, kw_only=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, obj: Obj) -> ObjectRef:
        meta = obj["metadata"]
        return cls(
            api_version=obj.get("apiVersion", ""),
            kind=obj.get("kind", ""),
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
        )


@dataclass(frozen=True, kw_only=True)
class PendingEvent:
    ref: ObjectRef
    type: str  # Normal or Warning
    reason: str
    message: str
    time: str


class EventRecorder:
    def __init__(
        self,
        kube: Kube,
        *,
        component: str = "birdwatch",
        instance: str | None = None,
        queue_size: int = 10000,
        workers: int = 8,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self._kube = kube
        self._component = component
        self._instance = instance or socket.gethostname()
        self._queue: asyncio.Queue[PendingEvent] = asyncio.Queue(maxsize=queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._count = workers
        self._on_drop = on_drop
        self.dropped = 0

    def record(self, ref: ObjectRef, *, type: str, reason: str, message: str) -> None:  # noqa: A002 - Event's field
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = PendingEvent(ref=ref, type=type, reason=reason, message=message[:MAX_MESSAGE], time=now)
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped()
            # Once per thousand: a saturated API server would otherwise get a log line per lost Event.
            if self.dropped % 1000 == 1:
                log.warning("event queue full, events dropped", reason=reason, dropped=self.dropped)

    async def start(self) -> None:
        for i in range(self._count):
            self._workers.append(asyncio.create_task(self._work(), name=f"events-{i}"))

    async def close(self, *, timeout: float = 5.0) -> None:
        """Post what is queued (for at most ``timeout`` seconds), then stop."""
        if self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    async def _work(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._post(event)
            except KubeError as exc:
                log.warning(
                    "could not post event",
                    reason=event.reason,
                    error=str(exc),
                    birdwatch=f"{event.ref.namespace}/{event.ref.name}",
                )
            finally:
                self._queue.task_done()

    def _dropped(self) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop()

    async def _post(self, event: PendingEvent) -> None:
        ref = event.ref
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "namespace": ref.namespace,
                "name": ref.name,
                "uid": ref.uid,
            },
            "reason": event.reason,
            "message": event.message,
            "type": event.type,
            "source": {"component": self._component},
            "reportingComponent": self._component,
            "reportingInstance": self._instance,
            "action": event.reason,
            "firstTimestamp": event.time,
            "lastTimestamp": event.time,
            "count": 1,
        }
        await self._kube.create(EVENTS, ref.namespace, body)
