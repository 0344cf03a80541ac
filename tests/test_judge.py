"""The rules of judgement and the weight arithmetic, exhaustively (pure functions, no servers)."""

from __future__ import annotations

import math

import pytest

from birdwatch.judge import Verdict, at_top, judge, judge_against_production, judge_samples, next_weight, read_value
from birdwatch.spec import BirdWatchSpec, InvalidSpec, NoData

BASE = {"service": "aleph", "metric": "up", "deviation": 0.5, "canary_version": "v04"}


def spec(**kw: object) -> BirdWatchSpec:
    return BirdWatchSpec.from_dict({**BASE, **kw})


@pytest.mark.parametrize(
    ("increment", "max_weight", "walk"),
    [
        (10, 100, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]),
        (3, 10, [3, 6, 9, 10]),
        (7, 100, [7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 77, 84, 91, 98, 100]),
        (1, 1, [1]),
        (10, 25, [10, 20, 25]),
    ],
)
def test_weights_step_by_increment_and_stop_at_max(increment: int, max_weight: int, walk: list[int]) -> None:
    s = spec(increment=increment, max_weight=max_weight)
    weight, seen = 0, []
    while not at_top(weight, s):
        weight = next_weight(weight, s)
        seen.append(weight)
    assert seen == walk
    assert next_weight(max_weight, s) == max_weight


def test_weight_never_goes_down_when_max_is_lowered() -> None:
    assert next_weight(50, spec(max_weight=30)) == 50


@pytest.mark.parametrize(
    ("direction", "value", "verdict"),
    [
        ("increase", 1.5, Verdict.HEALTHY),  # exactly at the limit is still allowed
        ("increase", 1.51, Verdict.UNHEALTHY),
        ("increase", -10.0, Verdict.HEALTHY),
        ("decrease", 0.5, Verdict.HEALTHY),
        ("decrease", 0.49, Verdict.UNHEALTHY),
        ("decrease", 10.0, Verdict.HEALTHY),
        ("either", 1.51, Verdict.UNHEALTHY),
        ("either", 0.49, Verdict.UNHEALTHY),
        ("either", 1.2, Verdict.HEALTHY),
        ("increase", math.inf, Verdict.UNHEALTHY),
        ("decrease", -math.inf, Verdict.UNHEALTHY),
    ],
)
def test_direction_decides_which_way_is_bad(direction: str, value: float, verdict: Verdict) -> None:
    judgement = judge(value, baseline=1.0, spec=spec(deviation_direction=direction))
    assert judgement.verdict is verdict
    assert judgement.value == value


def test_unhealthy_reason_names_value_baseline_and_allowance() -> None:
    judgement = judge(0.9, baseline=0.1, spec=spec(deviation=0.2))
    assert judgement.reason == "value 0.9 rose 0.8 from baseline 0.1, more than the allowed 0.2"


@pytest.mark.parametrize("missing", [None, math.nan])
@pytest.mark.parametrize(
    ("no_data", "verdict", "value"),
    [("zero", Verdict.HEALTHY, 0.0), ("fail", Verdict.UNHEALTHY, None), ("skip", Verdict.SKIPPED, None)],
)
def test_no_data(missing: float | None, no_data: str, verdict: Verdict, value: float | None) -> None:
    judgement = judge(missing, baseline=0.0, spec=spec(no_data=no_data))
    assert judgement.verdict is verdict
    assert judgement.value == value


def test_zero_for_no_data_is_judged_like_any_value() -> None:
    assert judge(None, baseline=1.0, spec=spec(deviation_direction="decrease")).verdict is Verdict.UNHEALTHY
    assert read_value(None, NoData.ZERO) == 0.0
    assert read_value(2.0, NoData.FAIL) == 2.0


def test_defaults_are_the_prototypes() -> None:
    s = spec()
    assert (s.increment, s.interval, s.if_unhealthy.value, s.max_weight, s.failure_threshold) == (
        1,
        5,
        "rollback",
        100,
        1,
    )
    assert (s.deviation_direction.value, s.no_data.value, s.ready_timeout) == ("increase", "zero", 600)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"service": "aleph"}, "spec lacks required field(s): metric, deviation, canary_version"),
        ({**BASE, "increment": 11}, "spec.increment must be an integer from 1 to 10, not 11"),
        ({**BASE, "increment": True}, "spec.increment must be an integer"),
        ({**BASE, "deviation": -1}, "spec.deviation must be a finite number >= 0"),
        ({**BASE, "deviation": "0.5"}, "spec.deviation must be a finite number"),
        ({**BASE, "if_unhealthy": "explode"}, "spec.if_unhealthy must be one of rollback, freeze, not 'explode'"),
        ({**BASE, "metric": "   "}, "spec.metric must be a non-empty string"),
        ("nonsense", "spec is missing or not an object"),
        ({**BASE, "analysis": "mann-whitney"}, "analysis: mann-whitney compares the canary with production"),
        ({**BASE, "baseline": "production"}, "put {{version}} in metric"),
        ({**BASE, "baseline": "yesterday"}, "spec.baseline must be one of first, production"),
        ({**BASE, "confidence": 1.0}, "spec.confidence must be a number from 0.5 up to"),
        ({**BASE, "paused": "yes"}, "spec.paused must be true or false"),
    ],
)
def test_invalid_specs_say_what_is_wrong(raw: object, says: str) -> None:
    with pytest.raises(InvalidSpec, match=None) as err:
        BirdWatchSpec.from_dict(raw)
    assert says in str(err.value)


def test_version_placeholder_fills_canary_and_production() -> None:
    s = spec(metric='errors{version="{{version}}"}', baseline="production")
    assert s.canary_query() == 'errors{version="v04"}'
    assert s.production_query("v03") == 'errors{version="v03"}'
    explicit = spec(metric="canary_errors", baseline="production", production_metric="prod_errors")
    assert (explicit.canary_query(), explicit.production_query("v03")) == ("canary_errors", "prod_errors")


def test_against_production_by_value_and_by_samples() -> None:
    s = spec(metric='e{v="{{version}}"}', baseline="production", deviation=0.05)
    assert judge_against_production(0.31, 0.3, spec=s).verdict is Verdict.HEALTHY
    worse = judge_against_production(0.4, 0.3, spec=s)
    assert worse.verdict is Verdict.UNHEALTHY
    assert worse.production == 0.3
    assert "from production 0.3" in worse.reason
    assert judge_against_production(0.0, None, spec=s).production == 0.0  # no_data: zero, both sides
    mw = spec(metric='e{v="{{version}}"}', baseline="production", analysis="mann-whitney", deviation=0.05)
    few = [(0.5, 0.1)] * 3
    assert judge_samples(few, spec=mw) is None  # 3 + 3 cannot reach p < 0.05: no verdict, never a pass
    clear = judge_samples([(0.5 + i / 100, 0.1 + i / 100) for i in range(5)], spec=mw)
    assert clear is not None
    assert clear.verdict is Verdict.UNHEALTHY
    assert clear.p_value == pytest.approx(1 / 252)
