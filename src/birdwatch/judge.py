"""The pure arithmetic of a rollout: the next canary weight, and whether a metric value is healthy.

No I/O here, so every rule a user relies on is unit-tested exhaustively.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .spec import BirdWatchSpec, Direction, NoData


class Verdict(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    SKIPPED = "skipped"  # no data, and the spec says not to count it either way


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    value: float | None  # the value judged (no data read as zero becomes 0.0)
    reason: str


def next_weight(current: int, spec: BirdWatchSpec) -> int:
    """One step up: ``increment`` more, never past ``max_weight`` (and never down)."""
    return max(current, min(current + spec.increment, spec.max_weight))


def at_top(weight: int, spec: BirdWatchSpec) -> bool:
    return weight >= spec.max_weight


def read_value(value: float | None, no_data: NoData) -> float | None:
    """What a raw query result counts as; None means there is no number to judge."""
    if value is None or math.isnan(value):
        return 0.0 if no_data is NoData.ZERO else None
    return value


def judge(value: float | None, *, baseline: float, spec: BirdWatchSpec) -> Judgement:
    """Healthy unless the value moved past the baseline by more than ``deviation`` the bad way."""
    seen = read_value(value, spec.no_data)
    if seen is None:
        if spec.no_data is NoData.FAIL:
            return Judgement(Verdict.UNHEALTHY, None, "the metric returned no data (no_data: fail)")
        return Judgement(Verdict.SKIPPED, None, "the metric returned no data (no_data: skip)")
    moved = seen - baseline
    bad = {
        Direction.INCREASE: moved,
        Direction.DECREASE: -moved,
        Direction.EITHER: abs(moved),
    }[spec.deviation_direction]
    # NaN never reaches here; an infinite value is as bad as it gets.
    if bad > spec.deviation:
        way = "rose" if moved > 0 else "fell"
        return Judgement(
            Verdict.UNHEALTHY,
            seen,
            f"value {seen:g} {way} {abs(moved):g} from baseline {baseline:g}, more than the allowed {spec.deviation:g}",
        )
    return Judgement(Verdict.HEALTHY, seen, f"value {seen:g} within {spec.deviation:g} of baseline {baseline:g}")
