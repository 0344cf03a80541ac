"""A BirdWatch's status subresource: what users read with ``kubectl get bw``, and what a restart resumes from.

Every write carries the whole status, so a lost write is healed by the next one, and conditions keep their
``lastTransitionTime`` while their state stands.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, fields
from typing import Any

from .kube import BIRDWATCHES, Kube, Obj
from .spec import Phase


def now_rfc3339(*, micro: bool = False) -> str:
    """Now in UTC; ``micro`` keeps the microseconds (a step's time: a resumed rollout waits out the rest of its
    interval from it, and whole seconds would cut that short by up to a second)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch, or None."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True)
class Acknowledgement:
    """birdwatch's answer to a request made through the annotation ``birdwatch.otomato.link/request``."""

    id: str  # the annotation's value, as it was when acted on: the same value is never acted on twice
    action: str
    result: str  # Done or Refused
    message: str = ""

    def body(self) -> dict[str, str]:
        return {"id": self.id, "action": self.action, "result": self.result, "message": self.message}

    @classmethod
    def parse(cls, raw: Any) -> Acknowledgement | None:
        if not isinstance(raw, dict) or not raw.get("id"):
            return None
        return cls(
            id=str(raw["id"]),
            action=str(raw.get("action", "")),
            result=str(raw.get("result", "")),
            message=str(raw.get("message", "")),
        )


@dataclass(frozen=True, kw_only=True)
class Status:
    phase: Phase
    observed_generation: int
    canary_weight: int = 0
    baseline: float | None = None
    last_value: float | None = None
    failed_checks: int = 0
    skipped_checks: int = 0
    last_step_time: str | None = None
    message: str = ""
    reason: str = ""  # the machine reason of the phase, as in the Event that announced it
    waiting_since: str | None = None  # when this generation began waiting (ready_timeout counts from here)
    request: Acknowledgement | None = None  # the last request (promote, abort, ...) and what came of it
    production_value: float | None = None  # baseline: production: production's value at the last check
    p_value: float | None = None  # analysis: mann-whitney: the last test's p-value
    effect: float | None = None  # analysis: mann-whitney: canary's median minus production's

    def but(self, **changes: Any) -> Status:
        # The decision makes several of these a step: dataclasses.replace, through __init__, cost four times this
        # copy of the fields with the changes over them (the same value; a wrong name still raises).
        if not changes.keys() <= _STATUS_FIELDS:
            raise TypeError(f"Status has no field {sorted(changes.keys() - _STATUS_FIELDS)[0]!r}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__, **changes)
        return new

    @classmethod
    def parse(cls, obj: Obj) -> Status | None:
        raw = obj.get("status") or {}
        try:
            return cls(
                phase=Phase(raw["phase"]),
                observed_generation=int(raw.get("observedGeneration", 0)),
                canary_weight=int(raw.get("canaryWeight", 0)),
                baseline=None if raw.get("baseline") is None else float(raw["baseline"]),
                last_value=None if raw.get("lastValue") is None else float(raw["lastValue"]),
                failed_checks=int(raw.get("failedChecks", 0)),
                skipped_checks=int(raw.get("skippedChecks", 0)),
                last_step_time=raw.get("lastStepTime"),
                message=str(raw.get("message", "")),
                reason=str(raw.get("reason", "")),
                waiting_since=raw.get("waitingSince"),
                request=Acknowledgement.parse(raw.get("request")),
                production_value=_number(raw.get("productionValue")),
                p_value=_number(raw.get("pValue")),
                effect=_number(raw.get("effect")),
            )
        except (KeyError, ValueError, TypeError):
            return None


_STATUS_FIELDS = frozenset(f.name for f in fields(Status))


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _conditions(status: Status) -> dict[str, tuple[str, str]]:
    """type -> (status, reason). Ready: the canary is production. Progressing: a rollout is under way. The reason
    is the specific one (BadQuery, Forbidden, ...) where there is one, else the phase."""
    phase = status.phase
    reason = status.reason or phase.value
    return {
        "Ready": ("True" if phase is Phase.PROMOTED else "False", reason),
        "Progressing": ("True" if not phase.terminal else "False", reason),
    }


class StatusWriter:
    def __init__(self, kube: Kube, *, namespace: str, name: str, current: Obj | None = None) -> None:
        self._kube = kube
        self._namespace = namespace
        self._name = name
        # type -> (status, lastTransitionTime): keeps transition times across writes and across restarts.
        self._since: dict[str, tuple[str, str]] = {}
        for c in ((current or {}).get("status") or {}).get("conditions") or []:
            if isinstance(c, dict) and "type" in c:
                self._since[c["type"]] = (str(c.get("status")), str(c.get("lastTransitionTime", "")))

    def body(self, status: Status) -> dict[str, Any]:
        now = now_rfc3339()
        conditions = []
        for kind, (state, reason) in _conditions(status).items():
            previous = self._since.get(kind)
            since = previous[1] if previous and previous[0] == state and previous[1] else now
            self._since[kind] = (state, since)
            conditions.append(
                {
                    "type": kind,
                    "status": state,
                    "reason": reason,
                    "message": status.message[:1024],
                    "lastTransitionTime": since,
                    "observedGeneration": status.observed_generation,
                }
            )
        return {
            "phase": status.phase.value,
            "observedGeneration": status.observed_generation,
            "canaryWeight": status.canary_weight,
            "baseline": status.baseline,
            "lastValue": status.last_value,
            "failedChecks": status.failed_checks,
            "skippedChecks": status.skipped_checks,
            "lastStepTime": status.last_step_time,
            "message": status.message,
            "reason": status.reason,
            "waitingSince": status.waiting_since,
            "request": status.request.body() if status.request else None,
            "productionValue": status.production_value,
            "pValue": status.p_value,
            "effect": status.effect,
            "conditions": conditions,
        }

    async def write(self, status: Status) -> None:
        # The answer (the whole BirdWatch) is not decoded: nothing reads it, and the watch brings the object anyway.
        await self._kube.merge_patch(
            BIRDWATCHES, self._namespace, self._name, {"status": self.body(status)}, subresource="status", decode=False
        )
