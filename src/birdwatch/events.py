"""Kubernetes Events on BirdWatch objects, posted in the background so a slow API server never delays a step.

``record()`` never awaits and never raises. Behind it:

- **Order per object.** Each involved object (by uid) has its own FIFO, drained by at most one of ``workers`` tasks
  at a time, so its Events are created in the order of the moments they describe; different objects are posted in
  parallel (at most ``workers`` requests at once), taking turns: an object with Events waiting is in one queue of
  objects, and goes to its end again after each of its Events. A slow API server can keep an Event waiting for
  every canary (1,000 at once in the benchmark): what waits is that Event in a list, not a task and a deque per
  object (2.4 kB each). Event names are the object's name and the moment in hex nanoseconds, as
  client-go makes them: the API server lists Events by name, and ``kubectl describe`` sorts by a timestamp of
  whole seconds, so moments within one second still come out in order.
- **Repeats aggregate, as client-go's EventCorrelator does.** The same (object, type, reason, message) recorded again
  within ``repeat_window`` seconds of the last post PATCHes that Event's ``count`` and ``lastTimestamp`` instead of
  creating another one (``kubectl describe`` shows "(x5 over 2m)"); identical records still waiting in an object's
  queue are merged before they are sent, so an API outage that makes a canary repeat a Warning on every retry costs
  one request per object, not one per retry.
- **Bounded, and lossy on purpose.** At most ``queue_size`` Events wait; beyond that, or when the API server refuses
  one after a few quick tries, the Event is dropped, counted (``dropped``, ``on_drop``: the metric
  ``birdwatch_events_dropped_total``) and logged. Events are a courtesy to people running ``kubectl describe``:
  losing one must never stop or slow a rollout. What got through is counted too (``posted``, ``on_post``: the
  metric ``birdwatch_events_posted_total``, one per create or repeat's update).

Retrying a create is safe because the name is chosen here: a POST whose answer was lost and that is sent again gets
409 AlreadyExists, which means it was created.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .kube import EVENTS, Conflict, Kube, KubeError, NotFound, Obj

log = structlog.get_logger(__name__)
MAX_MESSAGE = 1024  # the API server's limit for an Event's message
MAX_NAME = 253  # an Event's name is a DNS subdomain
_SUFFIX = 17  # "." and 16 hex digits of nanoseconds
_ATTEMPTS = 3  # per request, for transport failures, 429 and 5xx
_RETRY_DELAY = 0.2  # seconds, doubled per attempt
_SERIES_CACHE = 4096  # repeats tracked (client-go's EventCorrelator keeps as many)


@dataclass(frozen=True, kw_only=True, slots=True)  # one per canary, one per Event waiting: no __dict__ each
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

    @property
    def key(self) -> str:
        """One queue per object: its uid, so a re-created BirdWatch of the same name is another object."""
        return self.uid or f"{self.namespace}/{self.name}"


@dataclass(kw_only=True, slots=True)
class PendingEvent:
    ref: ObjectRef
    type: str  # Normal or Warning
    reason: str
    message: str
    time: str  # the moment, as the Event's firstTimestamp
    nanos: int  # the moment, for the Event's name
    last_time: str = ""  # the latest identical record merged into this one
    repeats: int = 0  # identical records merged into this one while it waited

    @property
    def same(self) -> tuple[str, str, str]:
        return (self.type, self.reason, self.message)


@dataclass(kw_only=True, slots=True)  # up to _SERIES_CACHE of them
class _Series:
    """An Event on the server that identical later records add to."""

    name: str
    count: int
    posted: float  # monotonic time of the last create or patch


class EventRecorder:
    def __init__(
        self,
        kube: Kube,
        *,
        component: str = "birdwatch",
        instance: str | None = None,
        queue_size: int = 10000,
        workers: int = 8,
        repeat_window: float = 600.0,
        on_drop: Callable[[], None] | None = None,
        on_post: Callable[[], None] | None = None,
    ) -> None:
        self._kube = kube
        self._component = component
        self._instance = instance or socket.gethostname()
        self._limit = queue_size
        self._workers = workers
        self._window = repeat_window
        self._on_drop = on_drop
        self._on_post = on_post
        # Per object, its Events in order; short lists (identical records merge), so pop(0) is cheap.
        self._pending: dict[str, list[PendingEvent]] = {}
        self._queued = 0
        self._sending = 0
        # Objects with Events waiting, each once: in _turns, or taken by a worker that puts it back if it has more.
        self._active: set[str] = set()
        self._turns: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []  # the workers; kept because the loop holds tasks only weakly
        self._series: collections.OrderedDict[tuple[str, str, str, str], _Series] = collections.OrderedDict()
        self._last_nanos = 0
        self._started = False
        self._closed = False
        self.dropped = 0
        self.posted = 0  # creates and repeats' updates that the API server took

    @property
    def queued(self) -> int:
        """Events waiting to be posted (not counting those being posted right now)."""
        return self._queued

    def record(self, ref: ObjectRef, *, type: str, reason: str, message: str) -> None:  # noqa: A002 - Event's field
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        message = message[:MAX_MESSAGE]
        queue = self._pending.get(ref.key)
        if queue and queue[-1].same == (type, reason, message):
            queue[-1].repeats += 1
            queue[-1].last_time = now
            return
        if self._closed or self._queued >= self._limit:
            self._drop(ref, reason, "event recorder closed" if self._closed else "event queue full")
            return
        # Strictly increasing, so that two moments never share a name and names sort as the moments do.
        self._last_nanos = max(time.time_ns(), self._last_nanos + 1)
        event = PendingEvent(ref=ref, type=type, reason=reason, message=message, time=now, nanos=self._last_nanos)
        self._pending.setdefault(ref.key, []).append(event)
        self._queued += 1
        if self._started:
            self._take_turn(ref.key)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._tasks = [asyncio.create_task(self._work(), name=f"events {i}") for i in range(self._workers)]
        for key in list(self._pending):
            self._take_turn(key)

    async def flush(self, *, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` seconds) until everything recorded so far has been posted or dropped."""
        if not self._active:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._turns.join()
        except TimeoutError:
            return False
        return True

    async def close(self, *, timeout: float = 5.0) -> None:
        """Post what is queued (for at most ``timeout`` seconds), then stop; what is left is dropped and said."""
        self._closed = True
        await self.flush(timeout=timeout)
        unsent = self._queued + self._sending
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if unsent:
            self.dropped += unsent
            if self._on_drop is not None:
                for _ in range(unsent):
                    self._on_drop()
            log.warning("events not posted before shutdown", unsent=unsent, dropped=self.dropped)
        self._pending.clear()
        self._active.clear()
        self._turns = asyncio.Queue()
        self._queued = 0

    # --- posting ---------------------------------------------------------------------------------------------

    def _take_turn(self, key: str) -> None:
        if key not in self._active:
            self._active.add(key)
            self._turns.put_nowait(key)

    async def _work(self) -> None:
        while True:
            key = await self._turns.get()
            try:
                queue = self._pending.get(key)
                if queue:
                    event = queue.pop(0)
                    self._queued -= 1
                    self._sending += 1
                    try:
                        await self._deliver(event)
                    except Exception as exc:  # a worker must outlive any one Event, whatever went wrong with it
                        self._drop(event.ref, event.reason, f"{type(exc).__name__}: {exc}", unexpected=True)
                    finally:
                        self._sending -= 1
            finally:
                if self._pending.get(key):
                    self._turns.put_nowait(key)  # its next Event, after those of the objects waiting now
                else:
                    self._active.discard(key)
                    self._pending.pop(key, None)
                self._turns.task_done()

    async def _deliver(self, event: PendingEvent) -> None:
        ref = event.ref
        occurrences = 1 + event.repeats
        key = (ref.key, event.type, event.reason, event.message)
        series = self._series.get(key)
        try:
            if series is not None and time.monotonic() - series.posted <= self._window:
                try:
                    await self._patch(event, series.name, series.count + occurrences)
                    series.count += occurrences
                    series.posted = time.monotonic()
                    self._series.move_to_end(key)
                    self._count_post()
                    return
                except NotFound:
                    pass  # expired (the API server keeps Events for an hour) or deleted: a new one
            name = await self._create(event, occurrences)
        except KubeError as exc:
            self._drop(ref, event.reason, str(exc), status=exc.status)
            return
        self._count_post()
        self._series[key] = _Series(name=name, count=occurrences, posted=time.monotonic())
        self._series.move_to_end(key)
        while len(self._series) > _SERIES_CACHE:
            self._series.popitem(last=False)

    async def _create(self, event: PendingEvent, count: int) -> str:
        ref = event.ref
        name = f"{ref.name[: MAX_NAME - _SUFFIX]}.{event.nanos:016x}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ref.namespace},
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
            "lastTimestamp": event.last_time or event.time,
            "count": count,
        }
        for attempt in range(_ATTEMPTS):
            try:
                await self._kube.create(EVENTS, ref.namespace, body)
                return name
            except Conflict:
                return name  # an earlier attempt of ours got through, only its answer was lost
            except KubeError as exc:
                if not exc.retryable or attempt == _ATTEMPTS - 1:
                    raise
            await asyncio.sleep(_RETRY_DELAY * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _patch(self, event: PendingEvent, name: str, count: int) -> None:
        # Absolute values, not increments: a retried PATCH whose first answer was lost sets the same thing again.
        patch = {"count": count, "lastTimestamp": event.last_time or event.time}
        for attempt in range(_ATTEMPTS):
            try:
                await self._kube.merge_patch(EVENTS, event.ref.namespace, name, patch)
                return
            except KubeError as exc:
                if isinstance(exc, NotFound) or not exc.retryable or attempt == _ATTEMPTS - 1:
                    raise
            await asyncio.sleep(_RETRY_DELAY * 2**attempt)

    def _count_post(self) -> None:
        self.posted += 1
        if self._on_post is not None:
            self._on_post()

    def _drop(
        self, ref: ObjectRef, reason: str, detail: str, *, status: int | None = None, unexpected: bool = False
    ) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop()
        # Refusals are few (each follows a few tries); a full queue can drop thousands a second: there, the first
        # and then every thousandth is said, with the running total.
        if status is None and not unexpected and self.dropped % 1000 != 1:
            return
        log.warning(
            "event dropped",
            reason=reason,
            detail=detail,
            status=status,
            namespace=ref.namespace,
            birdwatch=ref.name,
            dropped=self.dropped,
        )
