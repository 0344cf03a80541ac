"""What a canary release tells people, and the interface every notifier offers.

A notification is a courtesy, never a dependency of a rollout: ``Notifier.notify()`` only hands the notice over (it
never awaits and never raises). The notifiers themselves, one module per service, live in ``birdwatch.notifiers``;
this module is what the canary task and the decision rules import, so they never depend on any one service.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from .spec import BirdWatchSpec, Unhealthy

__all__ = ["ENDINGS", "Moment", "Notice", "Notifier", "NullNotifier", "next_step"]


class Moment(enum.Enum):
    """An important moment of a canary release. The values double as the reasons of the Kubernetes Events."""

    STARTED = "RolloutStarted"
    STEP = "TrafficShifted"
    CHECK_FAILED = "CheckFailed"
    UNHEALTHY = "CanaryUnhealthy"
    ROLLED_BACK = "RolledBack"
    FROZEN = "Frozen"
    PROMOTED = "Promoted"
    FAILED = "RolloutFailed"

    @property
    def key(self) -> str:
        """The moment's name in the notifiers file: ``started``, ``step``, ``check_failed``, ..."""
        return self.name.lower()


# The moments that end a rollout: a Slack thread's first message is updated with them.
ENDINGS = frozenset({Moment.PROMOTED, Moment.ROLLED_BACK, Moment.FROZEN, Moment.FAILED})


@dataclass(frozen=True, kw_only=True)
class Notice:
    """What happened to which canary, in words a person on the deployment channel understands."""

    moment: Moment
    namespace: str
    name: str
    """The BirdWatch's name."""
    service: str
    """The VirtualService whose traffic is being shifted."""
    canary_version: str
    weight: int
    """Percent of the traffic the canary received at that moment."""
    message: str
    """One human sentence, e.g. "error rate 0.31 exceeded baseline 0.02 by more than 0.1"."""
    value: float | None = None
    baseline: float | None = None
    uid: str = ""
    """The BirdWatch's uid; with ``generation`` it names one rollout (a Slack thread per rollout)."""
    generation: int = 0
    next_step: str = ""
    """What happens next, e.g. "next step to 30% in 10s"."""
    targets: tuple[str, ...] | None = None
    """The notifiers the BirdWatch's ``spec.notify`` names; None: every notifier whose filters match."""
    production_value: float | None = None
    """With ``baseline: production``: production's value at the same check, what ``value`` was judged against."""

    @property
    def rollout(self) -> str:
        """``uid/generation``, or "" for a notice about no one rollout (Prometheus unreachable)."""
        return f"{self.uid}/{self.generation}" if self.uid else ""


class Notifier(Protocol):
    def notify(self, notice: Notice) -> None:
        """Hand a notice over for delivery. Never blocks, never raises."""
        ...

    async def start(self) -> None: ...

    async def close(self, *, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop."""
        ...


class NullNotifier:
    """The notifier when none is configured: every notice is silently ignored."""

    def notify(self, notice: Notice) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self, *, timeout: float = 5.0) -> None:
        pass


def next_step(moment: Moment, spec: BirdWatchSpec | None, *, weight: int, failed_checks: int = 0) -> str:
    """What happens after ``moment``, in a few words for the person reading the notification."""
    if spec is None:
        return "fix the BirdWatch's spec; birdwatch tries again when it changes"
    action = "roll back" if spec.if_unhealthy is Unhealthy.ROLLBACK else "freeze"
    if moment in (Moment.STARTED, Moment.STEP):
        if weight >= spec.max_weight:
            return f"promotion after a healthy check in {spec.interval}s"
        return f"next step to {min(weight + spec.increment, spec.max_weight)}% in {spec.interval}s if healthy"
    if moment is Moment.CHECK_FAILED:
        left = max(spec.failure_threshold - failed_checks, 1)
        return f"holding at {weight}%; {left} more failed check(s) and birdwatch will {action}"
    if moment is Moment.UNHEALTHY:
        return "all traffic back to production" if spec.if_unhealthy is Unhealthy.ROLLBACK else "traffic frozen"
    if moment is Moment.PROMOTED:
        return "none: the canary is production"
    if moment is Moment.ROLLED_BACK:
        return "fix the canary, then change the spec to try again"
    if moment is Moment.FROZEN:
        return "a person decides: set the weights by hand, or change the spec to start over"
    return "fix what the message says; birdwatch tries again when the spec changes"
