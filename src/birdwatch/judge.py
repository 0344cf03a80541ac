"""The pure arithmetic of a rollout: the next canary weight, and whether a metric value is healthy (against the
first value, against production's value now, or over samples of both).

No I/O here, so every rule a user relies on is unit-tested exhaustively.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from .analysis import Alternative, effect, mann_whitney, smallest_p
from .spec import BirdWatchSpec, Direction, NoData

MIN_SAMPLES = 3  # of each side, with data, before the test is worth running
# Worse is greater for errors and latency, less for a success rate, either way for "either".
_ALTERNATIVES: dict[Direction, Alternative] = {
    Direction.INCREASE: "greater",
    Direction.DECREASE: "less",
    Direction.EITHER: "two-sided",
}


class Verdict(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    SKIPPED = "skipped"  # no data, and the spec says not to count it either way


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    value: float | None  # the value judged (no data read as zero becomes 0.0); mann-whitney: the canary's median
    reason: str
    production: float | None = None  # baseline: production: production's value (mann-whitney: its median)
    p_value: float | None = None
    effect: float | None = None


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


def judge(value: float | None, *, baseline: float, spec: BirdWatchSpec, against: str = "baseline") -> Judgement:
    """Healthy unless the value moved past the baseline by more than ``deviation`` the bad way. ``against`` names
    what the baseline is, for the reason ("production" when it is production's value now)."""
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
            f"value {seen:g} {way} {abs(moved):g} from {against} {baseline:g}, "
            f"more than the allowed {spec.deviation:g}",
        )
    return Judgement(Verdict.HEALTHY, seen, f"value {seen:g} within {spec.deviation:g} of {against} {baseline:g}")


def judge_against_production(canary: float | None, production: float | None, *, spec: BirdWatchSpec) -> Judgement:
    """``baseline: production``: the canary's value now against production's now, by the same rules; production's
    no data follows ``no_data`` as the canary's does."""
    seen = read_value(production, spec.no_data)
    if seen is None:
        why = "production's metric returned no data (has production any traffic?)"
        if spec.no_data is NoData.FAIL:
            return Judgement(Verdict.UNHEALTHY, None, f"{why} (no_data: fail)")
        return Judgement(Verdict.SKIPPED, None, f"{why} (no_data: skip)")
    judgement = judge(canary, baseline=seen, spec=spec, against="production")
    return replace(judgement, production=seen)


def judge_samples(samples: Sequence[tuple[float | None, float | None]], *, spec: BirdWatchSpec) -> Judgement | None:
    """``analysis: mann-whitney``: samples of (canary, production) over the interval. Unhealthy when the test says
    the canary is worse with ``confidence`` and its median is worse by more than ``deviation`` (Kayenta's rule:
    significant and large enough to matter). None: too few samples with data to judge yet."""
    canary = _with_data((c for c, _ in samples), spec.no_data)
    production = _with_data((p for _, p in samples), spec.no_data)
    if spec.no_data is NoData.FAIL and (len(canary) < len(samples) or len(production) < len(samples)):
        return Judgement(Verdict.UNHEALTHY, None, "the metric returned no data in a sample (no_data: fail)")
    alpha = round(1 - spec.confidence, 12)  # 1 - 0.95 is 0.050000000000000044 in floating point
    if len(canary) < MIN_SAMPLES or len(production) < MIN_SAMPLES:
        return None
    alternative = _ALTERNATIVES[spec.deviation_direction]
    if smallest_p(len(canary), len(production), alternative=alternative) >= alpha:
        # So few samples could not show the canary worse even if it were: no verdict yet (never a pass).
        return None
    test = mann_whitney(canary, production, alternative=alternative)
    moved = effect(canary, production)
    bad = {Direction.INCREASE: moved, Direction.DECREASE: -moved, Direction.EITHER: abs(moved)}[
        spec.deviation_direction
    ]
    medians = f"canary median {statistics.median(canary):g} against production's {statistics.median(production):g}"
    numbers = f"(p={test.p:.3g}, effect {moved:+.3g}, {len(canary)}+{len(production)} samples)"
    significant = test.p < alpha
    verdict = Verdict.UNHEALTHY if significant and bad > spec.deviation else Verdict.HEALTHY
    if verdict is Verdict.UNHEALTHY:
        reason = f"{medians}: worse with confidence {spec.confidence:g} by more than {spec.deviation:g} {numbers}"
    elif significant:
        reason = f"{medians}: worse, but within {spec.deviation:g} {numbers}"
    else:
        reason = f"{medians}: not worse with confidence {spec.confidence:g} {numbers}"
    return Judgement(
        verdict,
        statistics.median(canary),
        reason,
        production=statistics.median(production),
        p_value=test.p,
        effect=moved,
    )


def _with_data(values: Iterable[float | None], no_data: NoData) -> list[float]:
    read = (read_value(v, no_data) for v in values)
    return [v for v in read if v is not None]
