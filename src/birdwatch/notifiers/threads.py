"""Where a Slack thread per rollout is remembered: an annotation on the BirdWatch itself.

The thread's first message is the rollout's line in the channel; its ``ts`` must outlive the process, or a
restarted birdwatch would start a second thread for the same rollout. birdwatch keeps every other part of a
rollout's record on the objects it works on, so the thread goes there too: the annotation
``threads.birdwatch.otomato.link/<notifier>`` holds ``{"rollout": "<uid>/<generation>", "channel": "C…",
"ts": "…"}``, written with a merge-patch of that one key (so two Slack notifiers never overwrite each other).
Metadata changes do not bump ``generation``, and the watch loop ignores same-generation updates, so writing it
never restarts a rollout. A new generation (a spec change) or a new object (same name, new uid) is a new rollout:
its ``rollout`` differs from the one stored, and it gets a new thread.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Protocol

from birdwatch.kube import BIRDWATCHES, Kube, NotFound

ANNOTATION_PREFIX = "threads.birdwatch.otomato.link/"


@dataclass(frozen=True, kw_only=True)
class Thread:
    rollout: str  # uid/generation
    channel: str  # the channel's ID, as chat.postMessage answered (chat.update wants the ID)
    ts: str  # the first message's timestamp: the thread's ID

    def dumps(self) -> str:
        return json.dumps({"rollout": self.rollout, "channel": self.channel, "ts": self.ts}, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> Thread | None:
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        fields = [raw.get(k) for k in ("rollout", "channel", "ts")]
        if not all(isinstance(f, str) and f for f in fields):
            return None
        rollout, channel, ts = (str(f) for f in fields)
        return cls(rollout=rollout, channel=channel, ts=ts)


class ThreadStore(Protocol):
    async def load(self, namespace: str, name: str) -> Thread | None: ...

    async def save(self, namespace: str, name: str, thread: Thread) -> None: ...


class AnnotationThreads:
    """Threads kept in an annotation on the BirdWatch, one key per notifier."""

    def __init__(self, kube: Kube, *, notifier: str) -> None:
        self._kube = kube
        self.annotation = ANNOTATION_PREFIX + notifier

    async def load(self, namespace: str, name: str) -> Thread | None:
        try:
            obj = await self._kube.get(BIRDWATCHES, namespace, name)
        except NotFound:
            return None
        text = ((obj.get("metadata") or {}).get("annotations") or {}).get(self.annotation)
        return Thread.loads(text) if isinstance(text, str) else None

    async def save(self, namespace: str, name: str, thread: Thread) -> None:
        patch = {"metadata": {"annotations": {self.annotation: thread.dumps()}}}
        # NotFound: the BirdWatch was deleted meanwhile, and there is no rollout left to thread.
        with contextlib.suppress(NotFound):
            await self._kube.merge_patch(BIRDWATCHES, namespace, name, patch)


class MemoryThreads:
    """Threads for this process's life only: for a notifier without a Kubernetes client."""

    def __init__(self) -> None:
        self._threads: dict[tuple[str, str], Thread] = {}

    async def load(self, namespace: str, name: str) -> Thread | None:
        return self._threads.get((namespace, name))

    async def save(self, namespace: str, name: str, thread: Thread) -> None:
        self._threads[(namespace, name)] = thread
