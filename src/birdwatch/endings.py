"""Keeps watch over rollouts that ended: their traffic must stay the way the ending left it.

A BirdWatch stays after its rollout ends, and its status is the record: ``Promoted`` says production is the canary
now. Re-applying the folder the release came from (a CI habit, a GitOps sync) puts the DestinationRule's
``production`` subset back on the old version, or the VirtualService's weights back on it, while the BirdWatch
still says Promoted: the release is silently undone. The audit watches VirtualServices and DestinationRules, and
when one that serves an ended rollout changes, checks it against the ending (through the router's own reading of
the objects). If the ending no longer holds it says so: a Warning Event ``EndingUndone`` and the status condition
``EndingHolds`` False, with what it found; if it holds again, the condition goes back to True. It never writes
traffic: which of the two is right, git or the BirdWatch, is for a person to say.

Quiet while nothing changes: one watch per resource and scope, and reads only for objects of ended rollouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from .events import EventRecorder, ObjectRef
from .kube import BIRDWATCHES, DESTINATIONRULES, VIRTUALSERVICES, Kube, KubeError, NotFound, Obj, Resource
from .registry import Key, Registry
from .router import RECORD_ANNOTATION, observe, same_host
from .spec import Phase
from .status import now_rfc3339

log = structlog.get_logger(__name__)

CONDITION = "EndingHolds"
RECORD_KEY = RECORD_ANNOTATION.encode()


def broken(ending: Phase, *, vs: Obj | None, dr: Obj | None, namespace: str, service: str, canary: str) -> str | None:
    """Why the objects no longer show the ending (None: they do)."""
    traffic = observe(vs, dr, namespace=namespace, service=service, canary_version=canary)
    if traffic.subsets is None and ending is Phase.PROMOTED and vs is not None and dr is not None:
        # Subsets named after versions: after the promotion the canary's subset has all the traffic, and nothing is
        # "production" for the router to find; read the routes directly.
        share = _share_of(vs, dr, canary)
        return None if share == 100 else f"version {canary} has {share}% of the traffic, not all of it"
    if traffic.subsets is None:
        return traffic.problem or "the VirtualService and DestinationRule cannot be read as they were"
    if ending is Phase.PROMOTED:
        if traffic.subsets.named and not traffic.production_promoted:
            return f"the DestinationRule's production subset no longer selects version {canary}"
        if traffic.subsets.named and traffic.weight != 0:
            return f"the canary subset has {traffic.weight}% of the traffic again"
        if not traffic.subsets.named and traffic.weight != 100:
            return f"version {canary} has {traffic.weight}% of the traffic, not all of it"
        return None
    if traffic.weight != 0:
        return f"the rolled-back canary {canary} has {traffic.weight}% of the traffic again"
    return None


def _share_of(vs: Obj, dr: Obj, subset: str) -> int:
    """The smallest share, over the HTTP routes to the DestinationRule's host, that ``subset`` receives."""
    host = str((dr.get("spec") or {}).get("host", ""))
    shares = []
    for route in (vs.get("spec") or {}).get("http") or []:
        dests = [
            d for d in route.get("route") or [] if same_host(str((d.get("destination") or {}).get("host", "")), host)
        ]
        if dests:
            alone = len(dests) == 1
            shares.append(
                sum(
                    int(d.get("weight", 100 if alone else 0))
                    for d in dests
                    if (d.get("destination") or {}).get("subset") == subset
                )
            )
    return min(shares, default=0)


def about_an_ending(line: bytes) -> bool:
    """Whether a VirtualService's raw watch event may concern an ended rollout: it carries no rollout record (a
    replace may have dropped it), or one that says done. Every step of every rollout under way comes back through
    this watch, with a record that says not done: those are not worth decoding."""
    return RECORD_KEY not in line or b'\\"done\\":true' in line


class EndingAudit:
    """The sink of the VirtualService and DestinationRule watches (see ``controller.Watcher``)."""

    def __init__(self, kube: Kube, registry: Registry, events: EventRecorder) -> None:
        self._kube = kube
        self._registry = registry
        self._events = events
        self._undone: dict[tuple[str, str, str], str] = {}  # (namespace, birdwatch, uid) -> what was found
        self._checks: set[asyncio.Task[None]] = set()  # strong references to the running checks

    # --- the sink ----------------------------------------------------------------------------------------------

    def sync(self, objs: list[Obj], *, scope: Callable[[Key], bool]) -> None:
        for obj in objs:
            self.observe(obj)

    def observe(self, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        for birdwatch in self._registry.ended(namespace, name):
            task = asyncio.create_task(self._check(birdwatch), name=f"ending {namespace}/{name}")
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    def forget(self, namespace: str, name: str) -> None:
        for birdwatch in self._registry.ended(namespace, name):
            self.observe(birdwatch)  # deleted: the check says what is missing

    async def close(self) -> None:
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)

    # --- the check -------------------------------------------------------------------------------------------

    async def _check(self, birdwatch: Obj) -> None:
        meta, spec = birdwatch["metadata"], birdwatch.get("spec") or {}
        namespace, name, uid = meta["namespace"], meta["name"], str(meta.get("uid", ""))
        ending = Phase((birdwatch.get("status") or {}).get("phase"))
        service, canary = str(spec.get("service", "")), str(spec.get("canary_version", ""))
        try:
            vs = await self._get(VIRTUALSERVICES, namespace, service)
            dr = await self._get(DESTINATIONRULES, namespace, service)
            why = broken(ending, vs=vs, dr=dr, namespace=namespace, service=service, canary=canary)
            key = (namespace, name, uid)
            if why is not None and self._undone.get(key) != why:
                message = f"{ending.value} no longer holds: {why} (the BirdWatch still says {ending.value})"
                log.warning("ending undone", namespace=namespace, birdwatch=name, reason="EndingUndone", detail=message)
                self._events.record(ObjectRef.of(birdwatch), type="Warning", reason="EndingUndone", message=message)
                await self._condition(birdwatch, holds=False, reason="EndingUndone", message=message)
                self._undone[key] = why
            elif why is None and key in self._undone:
                message = f"the objects show the ending again: {ending.value}"
                log.info("ending holds again", namespace=namespace, birdwatch=name, detail=message)
                self._events.record(ObjectRef.of(birdwatch), type="Normal", reason="EndingRestored", message=message)
                await self._condition(birdwatch, holds=True, reason="EndingRestored", message=message)
                del self._undone[key]
        except KubeError as exc:
            log.warning("could not check an ended rollout", namespace=namespace, birdwatch=name, detail=str(exc))

    async def _get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        try:
            return await self._kube.get(resource, namespace, name)
        except NotFound:
            return None

    async def _condition(self, birdwatch: Obj, *, holds: bool, reason: str, message: str) -> None:
        """The condition beside the phase's own (a merge-patch replaces the list: the others go along as they are)."""
        status = birdwatch.get("status") or {}
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != CONDITION]
        conditions.append(
            {
                "type": CONDITION,
                "status": "True" if holds else "False",
                "reason": reason,
                "message": message[:1024],
                "lastTransitionTime": now_rfc3339(),
                "observedGeneration": status.get("observedGeneration", 0),
            }
        )
        meta = birdwatch["metadata"]
        await self._kube.merge_patch(
            BIRDWATCHES, meta["namespace"], meta["name"], {"status": {"conditions": conditions}}, subresource="status"
        )
