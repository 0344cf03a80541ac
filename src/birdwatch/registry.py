"""The canary tasks: one per BirdWatch being carried out, held by strong references, each on its own.

The watch loop tells the registry what it sees; the registry starts, replaces and stops tasks. A new generation
(a spec change) replaces the task; a person's request (the annotation ``birdwatch.otomato.link/request``) is handed
to the running task, which wakes for it, or starts a task for a rollout that had ended. One task's crash never
touches another: it is logged and the task restarted with backoff (it resumes from its record). It also keeps the
last seen copy of every BirdWatch, which canaries consult to tell whether another BirdWatch still owns a
VirtualService.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from .kube import Obj
from .spec import Phase
from .updates import Updates, unacknowledged_request

log = structlog.get_logger(__name__)

Key = tuple[str, str]
RESTART_BACKOFF = (1.0, 5.0, 15.0, 60.0)


def key_of(obj: Obj) -> Key:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


CanaryFactory = Callable[[Obj, asyncio.Event, Updates], Coroutine[Any, Any, Phase | None]]


@dataclass(eq=False)
class Entry:
    uid: str
    generation: int
    updates: Updates
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Phase | None] | None = None
    crashes: int = 0

    def halt(self) -> None:
        """Ask the task to stop; it is woken if it sleeps."""
        self.stop.set()
        self.updates.changed.set()


class Registry:
    def __init__(
        self,
        factory: CanaryFactory,
        *,
        grace: float = 10.0,
        on_forget: Callable[[str, str], None] | None = None,
        label_selector: str | None = None,
    ) -> None:
        self._factory = factory
        self._label_selector = label_selector  # this shard's (only for what the log says)
        self._grace = grace
        self._on_forget = on_forget
        self._entries: dict[Key, Entry] = {}
        self._objects: dict[Key, Obj] = {}
        # Which BirdWatches serve which VirtualService, for the ending audit's look-ups on every change of one.
        self._by_service: dict[tuple[str, str], set[Key]] = {}
        # (uid, generation) whose rollout ended here: later echoes of our own status writes must not restart it.
        self._finished: dict[Key, tuple[str, int]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    def owner(self, namespace: str, name: str) -> Obj | None:
        return self._objects.get((namespace, name))

    def ended(self, namespace: str, service: str) -> list[Obj]:
        """The BirdWatches of ``service`` in ``namespace`` whose rollout ended Promoted or RolledBack (this spec's)."""
        endings = (Phase.PROMOTED.value, Phase.ROLLED_BACK.value)
        found = []
        for key in self._by_service.get((namespace, service), ()):
            obj = self._objects[key]
            status = obj.get("status") or {}
            if status.get("phase") in endings and status.get("observedGeneration") == obj["metadata"].get("generation"):
                found.append(obj)
        return found

    def _index(self, key: Key, obj: Obj | None) -> None:
        """Keep ``_by_service`` (namespace, service) -> BirdWatches up to date; ``obj`` None: forgotten."""
        old = self._objects.get(key)
        if old is not None:
            before = (key[0], str((old.get("spec") or {}).get("service", "")))
            self._by_service.get(before, set()).discard(key)
        if obj is not None:
            after = (key[0], str((obj.get("spec") or {}).get("service", "")))
            self._by_service.setdefault(after, set()).add(key)

    def tasks(self) -> list[asyncio.Task[Phase | None]]:
        return [e.task for e in self._entries.values() if e.task is not None]

    # --- what the watch saw -----------------------------------------------------------------------------------

    def observe(self, obj: Obj) -> None:
        if self._closed:
            return
        key = key_of(obj)
        meta = obj["metadata"]
        uid, generation = str(meta.get("uid", "")), int(meta.get("generation", 1))
        self._index(key, obj)
        self._objects[key] = obj
        entry = self._entries.get(key)
        if entry is not None and entry.uid == uid and entry.generation == generation:
            entry.updates.see(obj)  # a request wakes the task; our own status write coming back does not
            return
        requested = bool(unacknowledged_request(obj))
        if self._finished.get(key) == (uid, generation) and not requested:
            return
        status = obj.get("status") or {}
        if (
            entry is None
            and not requested
            and status.get("observedGeneration") == generation
            and status.get("phase") in {p.value for p in Phase if p.terminal}
        ):
            self._finished[key] = (uid, generation)
            return
        self._finished.pop(key, None)
        new = Entry(uid, generation, Updates(obj))
        self._entries[key] = new
        previous = entry.task if entry is not None else None
        if entry is not None:
            entry.halt()
            log.info(
                "birdwatch changed; replacing its canary task",
                namespace=key[0],
                birdwatch=key[1],
                generation=generation,
            )
        self._launch(key, new, after=previous)

    def forget(self, namespace: str, name: str) -> None:
        """The BirdWatch was deleted, or (with a label selector) relabelled so that it no longer matches: the API
        server says both alike. Either way: stop its task, leave the traffic where it is; a shard that carries it
        out now resumes from the record on its VirtualService."""
        key = (namespace, name)
        self._index(key, None)
        self._objects.pop(key, None)
        self._finished.pop(key, None)
        entry = self._entries.pop(key, None)
        if entry is not None and self._label_selector:
            log.info(
                "birdwatch deleted, or relabelled out of this shard; stopping its canary task (traffic stays as it is)",
                namespace=namespace,
                birdwatch=name,
                label_selector=self._label_selector,
            )
        elif entry is not None:
            log.info(
                "birdwatch deleted; stopping its canary task (traffic stays as it is)",
                namespace=namespace,
                birdwatch=name,
            )
        if entry is not None:
            self._retire(entry)
        if self._on_forget is not None:
            self._on_forget(namespace, name)

    def sync(self, objs: list[Obj], *, scope: Callable[[Key], bool]) -> None:
        """After a LIST: forget what vanished (within this watcher's scope) while we were not watching."""
        present = {key_of(o) for o in objs}
        for key in [k for k in self._objects if scope(k) and k not in present]:
            self.forget(*key)
        for obj in objs:
            self.observe(obj)

    # --- the tasks --------------------------------------------------------------------------------------------

    def _launch(self, key: Key, entry: Entry, *, after: asyncio.Task[Phase | None] | None, delay: float = 0.0) -> None:
        # The task starts from the newest object seen, and keeps no copy of its own: a task lives as long as its
        # rollout, and the object it was launched for is stale after the first status write (~3 kB a canary).
        async def carry_out() -> Phase | None:
            if after is not None:
                await self._wait_retired(after)
            if delay:
                await asyncio.sleep(delay)
            if key not in self._objects:
                return None  # forgotten while it waited
            return await self._factory(self._objects[key], entry.stop, entry.updates)

        task = asyncio.create_task(carry_out(), name=f"canary {key[0]}/{key[1]} gen {entry.generation}")
        entry.task = task
        task.add_done_callback(lambda t: self._done(key, entry, t))

    def _done(self, key: Key, entry: Entry, task: asyncio.Task[Phase | None]) -> None:
        current = self._entries.get(key) is entry
        if task.cancelled():
            if current:
                self._entries.pop(key, None)
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "canary task crashed", namespace=key[0], birdwatch=key[1], exc_info=(type(exc), exc, exc.__traceback__)
            )
            if current and not self._closed and not entry.stop.is_set() and key in self._objects:
                delay = RESTART_BACKOFF[min(entry.crashes, len(RESTART_BACKOFF) - 1)]
                entry.crashes += 1
                # Its record on the VirtualService lets the new task resume where this one died.
                self._launch(key, entry, after=None, delay=delay)
            elif current:
                self._entries.pop(key, None)
            return
        if current:
            self._entries.pop(key, None)
            phase = task.result()
            if phase is not None and phase.terminal:
                self._finished[key] = (entry.uid, entry.generation)

    def _retire(self, entry: Entry) -> None:
        entry.halt()
        if entry.task is not None and not entry.task.done():
            waiter = asyncio.create_task(self._wait_retired(entry.task))
            self._stopping.add(waiter)
            waiter.add_done_callback(self._stopping.discard)

    async def _wait_retired(self, task: asyncio.Task[Phase | None]) -> None:
        """Give a stopping task the grace period to reach a safe point, then cancel it."""
        done, _ = await asyncio.wait({task}, timeout=self._grace)
        if not done:
            log.warning("canary task did not stop within the grace period; cancelling it", task=task.get_name())
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        """Stop every task: ask, wait up to the grace period, then cancel what still runs."""
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            entry.halt()
        tasks = [e.task for e in entries if e.task is not None and not e.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._grace)
            for task in pending:
                log.warning("canary task did not stop in time; cancelling it", task=task.get_name())
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        if self._stopping:
            await asyncio.wait(set(self._stopping), timeout=self._grace + 2.0)
