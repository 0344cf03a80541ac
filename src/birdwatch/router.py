"""Traffic: reads and rewrites the weights of an Istio VirtualService (and the subsets of its DestinationRule).

Two conventions are understood. Named subsets ``production`` and ``canary`` (the original birdwatch's), where
promotion repoints ``production`` at the canary's version; and subsets named after versions (``v03``, ``v04``),
where promotion leaves the canary's subset at 100. Every HTTP route that sends traffic to the production subset is
rewritten in one conditional merge-patch, so no reader ever sees routes that disagree; nothing else in the objects
is touched. Each write also records the rollout's progress in one annotation on the VirtualService, atomically with
the weights it describes, so a restarted birdwatch knows exactly which step was applied and when.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from .kube import DESTINATIONRULES, VIRTUALSERVICES, Conflict, Kube, NotFound, Obj, Resource

RECORD_ANNOTATION = "birdwatch.otomato.link/rollout"
VERSION_LABEL = "version"
NAMED_PRODUCTION, NAMED_CANARY = "production", "canary"


class RouteError(Exception):
    """The VirtualService or DestinationRule cannot carry this canary; the message says what is wrong."""

    transient = False  # only the user can mend it (several production subsets, a foreign subset in the split)


class RouteMissing(RouteError):
    """Something the rollout needs is not there yet: an object, a subset, a route to production. ``kubectl apply
    -f`` of a folder, and GitOps tools, create objects in an order of their own, so this is waited out."""

    transient = True


@dataclass(frozen=True, kw_only=True)
class Record:
    """The rollout's progress as written beside the weights (annotation ``birdwatch.otomato.link/rollout``)."""

    birdwatch: str
    uid: str
    generation: int
    canary: str
    weight: int
    baseline: float | None = None
    step_time: str | None = None  # RFC 3339, when ``weight`` was written
    done: bool = False  # the rollout ended (promoted, rolled back or failed): the VirtualService is free again
    metric: str | None = None  # digest of the metric query the baseline was taken with
    phase: str | None = None  # with ``done``: how the rollout ended (Promoted, RolledBack)
    spec: str | None = None  # digest of the spec but ``paused``: a pause or resume is not a new spec
    request: str | None = None  # the last request (promote, abort, ...) acted on, written with what it did

    def to_json(self) -> str:
        # The fields are all plain values, in field order: asdict's recursive copy of them cost more than the dump.
        return json.dumps(vars(self), separators=(",", ":"))

    @classmethod
    def parse(cls, obj: Obj) -> Record | None:
        raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(RECORD_ANNOTATION)
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(
                birdwatch=str(data["birdwatch"]),
                uid=str(data["uid"]),
                generation=int(data["generation"]),
                canary=str(data["canary"]),
                weight=int(data["weight"]),
                baseline=None if data.get("baseline") is None else float(data["baseline"]),
                step_time=data.get("step_time"),
                done=bool(data.get("done", False)),
                metric=data.get("metric"),
                phase=data.get("phase"),
                spec=data.get("spec"),
                request=data.get("request"),
            )
        except (ValueError, KeyError, TypeError):
            return None  # hand-edited or foreign: treated as absent, and overwritten by the next write


@dataclass(frozen=True)
class Subsets:
    production: str
    canary: str
    named: bool  # the production/canary convention
    host: str = ""  # the DestinationRule's host; destinations elsewhere are not ours

    def is_production(self, dest: dict[str, Any]) -> bool:
        return _subset(dest) == self.production and same_host(_host(dest), self.host)

    def is_canary(self, dest: dict[str, Any]) -> bool:
        return _subset(dest) == self.canary and same_host(_host(dest), self.host)


def _destinations(route: dict[str, Any]) -> list[dict[str, Any]]:
    return list(route.get("route") or [])


def _subset(dest: dict[str, Any]) -> str | None:
    return (dest.get("destination") or {}).get("subset")


def _host(dest: dict[str, Any]) -> str:
    return str((dest.get("destination") or {}).get("host", ""))


def same_host(a: str, b: str) -> bool:
    """``aleph`` and ``aleph.shop.svc.cluster.local`` are one service to Istio (short names are namespace-local)."""
    if a == b:
        return True
    return ("." not in a or "." not in b) and a.split(".")[0] == b.split(".")[0]


def _weight(dest: dict[str, Any], alone: bool) -> int:
    # Istio: a lone destination without a weight gets all the traffic.
    return int(dest.get("weight", 100 if alone else 0))


def detect_subsets(vs: Obj, dr: Obj, canary_version: str) -> Subsets:
    """Which convention the objects follow, and which subsets are production and canary. Only destinations on the
    DestinationRule's host count: a VirtualService may route some paths to other services."""
    host = str((dr.get("spec") or {}).get("host", ""))
    http = (vs.get("spec") or {}).get("http") or []
    dr_subsets = {s.get("name") for s in (dr.get("spec") or {}).get("subsets") or []}
    mine = [[d for d in _destinations(r) if same_host(_host(d), host)] for r in http]
    named_in_vs = any(_subset(d) == NAMED_PRODUCTION for dests in mine for d in dests)
    if NAMED_PRODUCTION in dr_subsets or named_in_vs:
        if NAMED_PRODUCTION not in dr_subsets:
            raise RouteMissing(f"DestinationRule {_name(dr)} has no subset {NAMED_PRODUCTION}")
        if not named_in_vs:
            raise RouteMissing(
                f"no HTTP route of VirtualService {_name(vs)} sends traffic to subset {NAMED_PRODUCTION}"
            )
        return Subsets(NAMED_PRODUCTION, NAMED_CANARY, named=True, host=host)
    serving = sorted(
        {
            s
            for r in http
            for d in _destinations(r)
            if same_host(_host(d), host)
            and (s := _subset(d))
            and s != canary_version
            and _weight(d, len(_destinations(r)) == 1) > 0
        }
    )
    if not serving:
        raise RouteMissing(f"no HTTP route of VirtualService {_name(vs)} sends traffic to a production subset")
    if len(serving) > 1:
        raise RouteError(
            f"VirtualService {_name(vs)} sends traffic to several subsets ({', '.join(serving)}): cannot tell "
            "which is production; route to one, or name the subsets production and canary"
        )
    if serving[0] not in dr_subsets:
        raise RouteMissing(f"DestinationRule {_name(dr)} has no subset {serving[0]}")
    return Subsets(serving[0], canary_version, named=False, host=host)


def managed_routes(http: list[dict[str, Any]], subsets: Subsets) -> list[int]:
    return [i for i, r in enumerate(http) if any(subsets.is_production(d) for d in _destinations(r))]


def canary_weight(vs: Obj, subsets: Subsets) -> int:
    """The canary's weight as the VirtualService has it now (of the first managed route)."""
    http = (vs.get("spec") or {}).get("http") or []
    for i in managed_routes(http, subsets):
        dests = _destinations(http[i])
        for d in dests:
            if subsets.is_canary(d):
                return _weight(d, len(dests) == 1)
        return 0
    return 0


def splittable_routes(vs: Obj, subsets: Subsets) -> list[int]:
    """The managed routes' indices; raises when there is none, or when one also sends traffic to a third subset."""
    http = (vs.get("spec") or {}).get("http") or []
    indices = managed_routes(http, subsets)
    if not indices:
        raise RouteMissing(f"no HTTP route of VirtualService {_name(vs)} sends traffic to subset {subsets.production}")
    for i in indices:
        dests = _destinations(http[i])
        for d in dests:
            other = not subsets.is_production(d) and not subsets.is_canary(d)
            if other and _weight(d, len(dests) == 1) > 0:
                raise RouteError(
                    f"HTTP route {http[i].get('name') or i} of VirtualService {_name(vs)} also sends traffic to "
                    f"subset {_subset(d)}; birdwatch only splits between {subsets.production} and {subsets.canary}"
                )
    return indices


def weighted_http(vs: Obj, subsets: Subsets, canary: int) -> list[dict[str, Any]]:
    """All of ``spec.http`` with the canary at ``canary`` percent and production at the rest in every managed
    route (adding a canary destination beside production where there is none). Other routes, and every other
    field of the managed ones, are returned as they were."""
    _in_range(canary)
    # Only the managed routes and their destinations are built anew; the rest is shared with ``vs``, not copied:
    # a deep copy of the whole list, twice a step, was the largest cost of a step's own work. Nothing mutates it.
    http = list((vs.get("spec") or {}).get("http") or [])
    for i in splittable_routes(vs, subsets):
        dests = _destinations(http[i])
        production = next(d for d in dests if subsets.is_production(d))
        if not any(subsets.is_canary(d) for d in dests):
            dest = copy.deepcopy(production)
            dest["destination"]["subset"] = subsets.canary
            dest.pop("headers", None)
            dests.append(dest)
        weighted: list[dict[str, Any]] = []
        for d in dests:
            if subsets.is_production(d):
                weight = 100 - canary
            elif subsets.is_canary(d):
                weight = canary
            else:
                weight = 0
            weighted.append({**d, "weight": weight})
        http[i] = {**http[i], "route": weighted}
    return http


def subsets_with_canary(dr: Obj, subsets: Subsets, canary_version: str) -> list[dict[str, Any]] | None:
    """DestinationRule subsets with one for the canary pointing at ``canary_version`` (copied from production's
    when missing); None when nothing needs to change."""
    current = (dr.get("spec") or {}).get("subsets") or []
    # Every step observes this; the copy below is only needed when something changes, which is once a rollout.
    next(s for s in current if s.get("name") == subsets.production)
    kept = next((s for s in current if s.get("name") == subsets.canary), None)
    if kept is not None and _selects(kept, canary_version):
        return None
    new = copy.deepcopy(current)
    production = next(s for s in new if s.get("name") == subsets.production)
    canary = next((s for s in new if s.get("name") == subsets.canary), None)
    if canary is None:
        canary = copy.deepcopy(production)
        canary["name"] = subsets.canary
        new.append(canary)
    labels = canary.setdefault("labels", {})
    labels[VERSION_LABEL] = canary_version
    return None if new == current else new


def subsets_promoted(dr: Obj, subsets: Subsets, canary_version: str) -> list[dict[str, Any]] | None:
    """Named convention: the production subset now selects the canary's version."""
    current = (dr.get("spec") or {}).get("subsets") or []
    kept = next(s for s in current if s.get("name") == subsets.production)
    labels = kept.get("labels", {})
    if isinstance(labels, dict):
        # Each step's observation asks this (production_promoted): built without copying what does not change.
        if VERSION_LABEL in labels and labels[VERSION_LABEL] == canary_version:
            return None
        moved = {**kept, "labels": {**labels, VERSION_LABEL: canary_version}}
        return [moved if s is kept else s for s in current]
    new = copy.deepcopy(current)
    production = next(s for s in new if s.get("name") == subsets.production)
    production.setdefault("labels", {})[VERSION_LABEL] = canary_version
    return None if new == current else new


def _in_range(canary: int) -> None:
    if not 0 <= canary <= 100:
        raise ValueError(f"canary weight {canary} outside 0..100")


def _selects(subset: dict[str, Any], version: str) -> bool:
    """The subset already selects ``version``: setting its label would change nothing."""
    labels = subset.get("labels")
    return isinstance(labels, dict) and VERSION_LABEL in labels and labels[VERSION_LABEL] == version


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", "?"))


@dataclass(frozen=True, kw_only=True)
class Traffic:
    """What the VirtualService and DestinationRule say about one canary, as the decision function reads it."""

    problem: str | None = None  # why they cannot carry the canary (None: they can)
    transient: bool = False  # the problem is something missing, which may yet appear
    subsets: Subsets | None = None
    weight: int = 0  # the canary's weight now (of the first managed route)
    record: Record | None = None  # the rollout record on the VirtualService, whoever wrote it
    canary_subset_ready: bool = False  # the DestinationRule's canary subset selects the canary's version
    production_promoted: bool = False  # named subsets: production already selects the canary's version
    production_version: str = ""  # the version label production's subset selects (for baseline: production)


def observe(vs: Obj | None, dr: Obj | None, *, namespace: str, service: str, canary_version: str) -> Traffic:
    """Read the two objects (None: not found) into :class:`Traffic`. Pure, so the decision's inputs are data."""
    if vs is None:
        return Traffic(problem=f"VirtualService {service} not found in namespace {namespace}", transient=True)
    record = Record.parse(vs)
    if dr is None:
        return Traffic(
            problem=f"DestinationRule {service} not found in namespace {namespace}", transient=True, record=record
        )
    try:
        subsets = detect_subsets(vs, dr, canary_version)
        weight = canary_weight(vs, subsets)
        _in_range(weight)
        splittable_routes(vs, subsets)  # raises on a foreign subset in the split
    except RouteError as exc:
        return Traffic(problem=str(exc), transient=exc.transient, record=record)
    return Traffic(
        subsets=subsets,
        weight=weight,
        record=record,
        canary_subset_ready=subsets_with_canary(dr, subsets, canary_version) is None,
        production_promoted=subsets.named and subsets_promoted(dr, subsets, canary_version) is None,
        production_version=_subset_version(dr, subsets.production),
    )


def _subset_version(dr: Obj, name: str) -> str:
    """The ``version`` label a DestinationRule subset selects; a subset named after its version otherwise."""
    for subset in (dr.get("spec") or {}).get("subsets") or []:
        if subset.get("name") == name:
            return str((subset.get("labels") or {}).get(VERSION_LABEL) or name)
    return name


class Router:
    """One canary's handle on its VirtualService and DestinationRule.

    It keeps the last copy of each object it read or wrote, so a step costs one PATCH and no GET. Every write is
    conditional on the kept copy's resourceVersion and tried once: on a conflict (someone else wrote) it reads the
    object again and raises, so the caller decides afresh from what is there now instead of reapplying blindly.
    """

    def __init__(self, kube: Kube, *, namespace: str, service: str, canary_version: str) -> None:
        self._kube = kube
        self.namespace = namespace
        self.service = service
        self.canary_version = canary_version
        self.vs: Obj | None = None
        self.dr: Obj | None = None
        # The last observation and the objects it was made of: a step observes the same kept objects several
        # times, and reading them (subsets, weights, the record) is the most expensive part of a round.
        self._observed: tuple[Obj | None, Obj | None, Traffic] | None = None

    async def fetch(self) -> None:
        """Read whichever object is not kept (never read, deleted, or stale after a conflict)."""
        if self.vs is None:
            self.vs = await self._get(VIRTUALSERVICES)
        if self.dr is None and self.vs is not None:
            self.dr = await self._get(DESTINATIONRULES)

    def forget(self) -> None:
        """Drop the kept copies: the next ``fetch`` reads both again."""
        self.vs = self.dr = None

    def observe(self) -> Traffic:
        cached = self._observed
        if cached is not None and cached[0] is self.vs and cached[1] is self.dr:
            return cached[2]
        traffic = observe(
            self.vs, self.dr, namespace=self.namespace, service=self.service, canary_version=self.canary_version
        )
        self._observed = (self.vs, self.dr, traffic)
        return traffic

    def canary_labels(self) -> dict[str, str]:
        """The labels the canary subset selects pods by (at least ``version: <canary_version>``)."""
        traffic = self.observe()
        for subset in ((self.dr or {}).get("spec") or {}).get("subsets") or []:
            if traffic.subsets is not None and subset.get("name") == traffic.subsets.canary:
                return {
                    **{str(k): str(v) for k, v in (subset.get("labels") or {}).items()},
                    VERSION_LABEL: self.canary_version,
                }
        return {VERSION_LABEL: self.canary_version}

    async def prepare_destination_rule(self, subsets: Subsets) -> None:
        """Make sure the canary subset exists and selects the canary's version."""
        await self._patch_dr(subsets_with_canary, subsets)

    async def promote_destination_rule(self, subsets: Subsets) -> None:
        await self._patch_dr(subsets_promoted, subsets)

    async def write(self, canary: int, record: Record, subsets: Subsets) -> None:
        """Set the canary's weight in every managed route and the record beside it, in one conditional write."""
        assert self.vs is not None
        patch = {
            "metadata": {
                "resourceVersion": self.vs["metadata"]["resourceVersion"],
                "annotations": {RECORD_ANNOTATION: record.to_json()},
            },
            "spec": {"http": weighted_http(self.vs, subsets, canary)},
        }
        self.vs = await self._patch(VIRTUALSERVICES, patch)

    async def _patch_dr(self, change: Any, subsets: Subsets) -> None:
        assert self.dr is not None
        new = change(self.dr, subsets, self.canary_version)
        if new is None:
            return
        patch = {"metadata": {"resourceVersion": self.dr["metadata"]["resourceVersion"]}, "spec": {"subsets": new}}
        self.dr = await self._patch(DESTINATIONRULES, patch)

    async def _get(self, resource: Resource) -> Obj | None:
        try:
            return await self._kube.get(resource, self.namespace, self.service)
        except NotFound:
            return None

    async def _patch(self, resource: Resource, patch: Obj) -> Obj:
        try:
            return await self._kube.merge_patch(resource, self.namespace, self.service, patch)
        except Conflict:
            # Someone else wrote: keep what is there now, so the next decision starts from it.
            fresh = await self._get(resource)
            if resource is VIRTUALSERVICES:
                self.vs = fresh
            else:
                self.dr = fresh
            raise
        except NotFound:
            self.forget()
            raise
