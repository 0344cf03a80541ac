"""The rollout's rules as a table: for each observation, what ``decide`` writes, says and when it looks again.

No API server, no clock: every phase and transition (fresh, resumed at each phase, spec changed, objects missing
then present, each kind of API failure, stop requested) in a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest

from birdwatch.decision import (
    FAILURE_BACKOFF,
    Decision,
    DestinationRuleChange,
    Failure,
    Need,
    Observed,
    Reading,
    Request,
    decide,
)
from birdwatch.router import Record, Subsets, Traffic
from birdwatch.spec import Analysis, Baseline, BirdWatchSpec, NoData, Phase, Unhealthy
from birdwatch.status import Acknowledgement, Status, now_rfc3339, parse_time

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DIGEST = "d1"
NAMED = Subsets("production", "canary", named=True, host="aleph")
VERSIONS = Subsets("v03", "v04", named=False, host="aleph")
SPEC = BirdWatchSpec(service="aleph", metric="m", deviation=0.05, canary_version="v04", increment=10, interval=10)


def at(seconds: float, *, micro: bool = True) -> str:
    """An RFC 3339 time ``seconds`` from NOW, as birdwatch writes it."""
    import datetime

    moment = datetime.datetime.fromtimestamp(NOW + seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def rec(weight: int = 0, **kw: Any) -> Record:
    fields: dict[str, Any] = {
        "birdwatch": "aleph",
        "uid": "u1",
        "generation": 1,
        "canary": "v04",
        "weight": weight,
        "metric": DIGEST,
    }
    return Record(**{**fields, **kw})


def traffic(weight: int = 0, record: Record | None = None, **kw: Any) -> Traffic:
    fields: dict[str, Any] = {
        "subsets": NAMED,
        "weight": weight,
        "record": record,
        "canary_subset_ready": True,
    }
    return Traffic(**{**fields, **kw})


def status(phase: Phase = Phase.PENDING, **kw: Any) -> Status:
    return Status(phase=phase, observed_generation=kw.pop("observed_generation", 1), **kw)


def obs(**kw: Any) -> Observed:
    spec_changes = kw.pop("spec_changes", {})
    fields: dict[str, Any] = {
        "now": NOW,
        "name": "aleph",
        "uid": "u1",
        "generation": 1,
        "spec": replace(SPEC, **spec_changes),
        "status": status(),
        "traffic": traffic(),
        "metric_digest": DIGEST,
        "query_checked": True,
        "poll": 1.0,
    }
    return Observed(**{**fields, **kw})


# A rollout in flight: baseline 0.0 taken, canary at 20 % since 4 s ago.
STEPPED = rec(20, baseline=0.0, step_time=at(-4))
PROGRESSING = status(Phase.PROGRESSING, canary_weight=20, baseline=0.0, last_step_time=at(-4))
DUE = {"now": NOW + 6}  # the check of the step at -4 is due at +6
PROD = {"baseline": Baseline.PRODUCTION, "metric": 'm{version="{{version}}"}'}
MW = {**PROD, "analysis": Analysis.MANN_WHITNEY}  # five samples per 10 s interval: one every 2 s


@dataclass(frozen=True)
class Expect:
    need: Need | None = None
    dr: DestinationRuleChange | None = None
    weight: int | None = None  # the traffic write's weight; None: no traffic write
    record: dict[str, Any] | None = None  # fields the written record must have
    phase: Phase | None = None  # the status write's phase; None: no status write
    fields: dict[str, Any] | None = None  # status fields that must have these values
    message: str = ""  # in the status message (or the request's acknowledgement)
    say: tuple[str, ...] | None = None  # Event reasons, in order; None: not checked
    wake: float | None = None  # seconds after the observation's time; None: not checked
    ended: Phase | None = None
    stop: bool = False


CASES: list[tuple[str, Observed, Expect]] = [
    # --- stop, bad spec --------------------------------------------------------------------------------------
    ("stop requested", obs(stopping=True), Expect(stop=True)),
    (
        "invalid spec fails at once, traffic untouched",
        obs(spec=None, spec_error="spec lacks required field(s): metric"),
        Expect(
            phase=Phase.FAILED,
            fields={"reason": "InvalidSpec"},
            message="metric",
            say=("InvalidSpec",),
            ended=Phase.FAILED,
        ),
    ),
    (
        "this generation already ended: nothing to do",
        obs(status=status(Phase.PROMOTED, canary_weight=100)),
        Expect(ended=Phase.PROMOTED),
    ),
    # --- objects missing, then present -------------------------------------------------------------------------
    (
        "VirtualService missing: wait, soon",
        obs(traffic=Traffic(problem="VirtualService aleph not found in namespace shop", transient=True)),
        Expect(
            phase=Phase.PENDING,
            fields={"reason": "RouteMissing", "waiting_since": at(0, micro=False)},
            message="waiting for VirtualService aleph in namespace shop",
            wake=1.0,
        ),
    ),
    (
        "still missing, status already says so: no write",
        obs(
            traffic=Traffic(problem="VirtualService aleph not found in namespace shop", transient=True),
            status=status(
                reason="RouteMissing",
                message="waiting for VirtualService aleph in namespace shop",
                waiting_since=at(-5, micro=False),
            ),
        ),
        Expect(wake=1.0),
    ),
    (
        "missing for minutes: look less often",
        obs(
            traffic=Traffic(problem="DestinationRule aleph not found in namespace shop", transient=True),
            status=status(
                reason="RouteMissing",
                message="waiting for DestinationRule aleph in namespace shop",
                waiting_since=at(-300, micro=False),
            ),
        ),
        Expect(wake=10.0),
    ),
    (
        "missing past ready_timeout: Failed",
        obs(
            traffic=Traffic(problem="DestinationRule aleph not found in namespace shop", transient=True),
            status=status(waiting_since=at(-601, micro=False)),
        ),
        Expect(
            phase=Phase.FAILED,
            fields={"reason": "RouteMissing"},
            message="ready_timeout 600s",
            say=("RouteMissing",),
            ended=Phase.FAILED,
        ),
    ),
    (
        "the wait ends no later than ready_timeout",
        obs(
            traffic=Traffic(problem="VirtualService aleph not found in namespace shop", transient=True),
            status=status(
                reason="RouteMissing",
                message="waiting for VirtualService aleph in namespace shop",
                waiting_since=at(-595, micro=False),
            ),
        ),
        Expect(wake=5.0),
    ),
    (
        "a split only the user can mend: Failed at once",
        obs(traffic=Traffic(problem="HTTP route 0 also sends traffic to subset v02", transient=False)),
        Expect(phase=Phase.FAILED, fields={"reason": "RouteInvalid"}, say=("RouteInvalid",), ended=Phase.FAILED),
    ),
    (
        "another BirdWatch's rollout holds the VirtualService",
        obs(traffic=traffic(record=rec(uid="u2", birdwatch="bet")), other_owner="bet"),
        Expect(
            phase=Phase.FAILED,
            fields={"reason": "AlreadyManaged"},
            message="already managed by BirdWatch bet",
            say=("AlreadyManaged",),
            ended=Phase.FAILED,
        ),
    ),
    # --- fresh rollout: nothing written before the first step ---------------------------------------------------
    ("fresh: check the query before writing anything", obs(query_checked=False), Expect(need=Need.METRIC)),
    (
        "fresh, bad PromQL: Failed before any write",
        obs(query_checked=False, reading=Reading(error="Prometheus rejected the metric query: bad", rejected=True)),
        Expect(phase=Phase.FAILED, fields={"reason": "BadQuery"}, say=("BadQuery",), ended=Phase.FAILED),
    ),
    (
        "fresh, Prometheus down: waited for before the baseline, the VirtualService untouched",
        obs(query_checked=False, reading=Reading(error="connection refused"), readiness=(True, "1/1")),
        Expect(phase=Phase.PENDING, fields={"reason": "MetricUnavailable"}, message="connection refused", wake=1.0),
    ),
    (
        "fresh: the canary subset first",
        obs(traffic=traffic(canary_subset_ready=False)),
        Expect(dr=DestinationRuleChange.PREPARE, wake=0.0),
    ),
    ("fresh: no write of its own, is the canary ready?", obs(), Expect(need=Need.READINESS)),
    (
        "fresh, not ready: Waiting in status, the VirtualService untouched",
        obs(readiness=(False, "Deployment aleph-v04: 0/1 replicas available")),
        Expect(phase=Phase.WAITING, fields={"reason": "CanaryNotReady", "canary_weight": 0}, wake=1.0),
    ),
    (
        "fresh and paused: Paused in status, the VirtualService untouched",
        obs(spec_changes={"paused": True}),
        Expect(phase=Phase.PAUSED, fields={"reason": "Paused"}, say=("Paused",)),
    ),
    (
        "fresh, ready: the record, the baseline and the first step in one write",
        obs(readiness=(True, "1/1"), reading=Reading(value=0.01)),
        Expect(
            weight=10,
            record={"baseline": 0.01, "step_time": at(0), "generation": 1, "done": False, "uid": "u1"},
            phase=Phase.PROGRESSING,
            fields={"baseline": 0.01, "canary_weight": 10, "reason": "TrafficShifted"},
            say=("RolloutStarted", "TrafficShifted"),
            wake=10.0,
        ),
    ),
    (
        "fresh with traffic already: the baseline at its weight, one increment up from there",
        obs(traffic=traffic(20), readiness=(True, "1/1"), reading=Reading(value=0.0)),
        Expect(weight=30, record={"weight": 30, "baseline": 0.0}, phase=Phase.PROGRESSING),
    ),
    (
        "a stale record of a BirdWatch that is gone is taken over by the first step",
        obs(
            traffic=traffic(record=rec(30, uid="u0", birdwatch="old"), weight=30),
            other_owner=None,
            readiness=(True, "1/1"),
            reading=Reading(value=0.0),
        ),
        Expect(weight=40, record={"uid": "u1", "birdwatch": "aleph"}, phase=Phase.PROGRESSING),
    ),
    (
        "our rollout of an earlier generation ended: a fresh one",
        obs(
            generation=2,
            traffic=traffic(record=rec(0, done=True, phase="Promoted")),
            readiness=(True, "1/1"),
            reading=Reading(value=0.0),
        ),
        Expect(weight=10, record={"generation": 2, "done": False}, phase=Phase.PROGRESSING),
    ),
    # --- before the baseline -------------------------------------------------------------------------------------
    ("claimed: is the canary ready?", obs(traffic=traffic(record=rec())), Expect(need=Need.READINESS)),
    (
        "not ready, query never checked: check it early",
        obs(traffic=traffic(record=rec()), readiness=(False, "0/1 available"), query_checked=False),
        Expect(need=Need.METRIC),
    ),
    (
        "not ready, query checked: Waiting, saying why",
        obs(traffic=traffic(record=rec()), readiness=(False, "Deployment aleph-v04: 0/1 replicas available")),
        Expect(
            phase=Phase.WAITING,
            fields={"reason": "CanaryNotReady"},
            message="waiting for the canary: Deployment aleph-v04: 0/1 replicas available",
            wake=1.0,
        ),
    ),
    (
        "bad PromQL found while the canary is not ready: Failed at once",
        obs(
            traffic=traffic(record=rec()),
            readiness=(False, "0/1"),
            query_checked=False,
            reading=Reading(error="Prometheus rejected the metric query: parse error", rejected=True),
        ),
        Expect(
            phase=Phase.FAILED,
            fields={"reason": "BadQuery"},
            message="parse error",
            say=("BadQuery",),
            ended=Phase.FAILED,
        ),
    ),
    (
        "never ready within ready_timeout: roll back",
        obs(
            traffic=traffic(record=rec(20), weight=20),
            readiness=(False, "0/1"),
            status=status(Phase.WAITING, waiting_since=at(-600, micro=False)),
        ),
        Expect(
            weight=0,
            record={"done": True, "phase": "RolledBack"},
            phase=Phase.ROLLED_BACK,
            message="not available after ready_timeout 600s",
            say=("ReadyTimeout", "RolledBack"),
            ended=Phase.ROLLED_BACK,
        ),
    ),
    (
        "never ready within ready_timeout, freeze: the split stays",
        obs(
            traffic=traffic(record=rec(20), weight=20),
            readiness=(False, "0/1"),
            status=status(Phase.WAITING, waiting_since=at(-600, micro=False)),
            spec_changes={"if_unhealthy": Unhealthy.FREEZE},
        ),
        Expect(phase=Phase.FROZEN, fields={"canary_weight": 20}, say=("ReadyTimeout", "Frozen"), ended=Phase.FROZEN),
    ),
    ("ready: read the baseline", obs(traffic=traffic(record=rec()), readiness=(True, "1/1")), Expect(need=Need.METRIC)),
    (
        "Prometheus down before the baseline: wait",
        obs(traffic=traffic(record=rec()), readiness=(True, "1/1"), reading=Reading(error="connection refused")),
        Expect(phase=Phase.PENDING, fields={"reason": "MetricUnavailable"}, message="connection refused", wake=1.0),
    ),
    (
        "Prometheus down for ready_timeout: if_unhealthy",
        obs(
            traffic=traffic(record=rec()),
            readiness=(True, "1/1"),
            reading=Reading(error="connection refused"),
            status=status(waiting_since=at(-600, micro=False)),
        ),
        Expect(weight=0, phase=Phase.ROLLED_BACK, say=("NoBaseline", "RolledBack"), ended=Phase.ROLLED_BACK),
    ),
    (
        "baseline taken: the first step in the same write",
        obs(traffic=traffic(record=rec()), readiness=(True, "1/1"), reading=Reading(value=0.01)),
        Expect(
            weight=10,
            record={"baseline": 0.01, "step_time": at(0)},
            phase=Phase.PROGRESSING,
            fields={"baseline": 0.01, "canary_weight": 10, "waiting_since": None},
            say=("RolloutStarted", "TrafficShifted"),
            wake=10.0,
        ),
    ),
    (
        "baseline at the weight the canary had: one increment up from there",
        obs(traffic=traffic(20, record=rec(20)), readiness=(True, "1/1"), reading=Reading(value=0.0)),
        Expect(weight=30, record={"baseline": 0.0}, phase=Phase.PROGRESSING, say=("RolloutStarted", "TrafficShifted")),
    ),
    (
        "no data at 0 % reads as 0 (no_data: zero)",
        obs(traffic=traffic(record=rec()), readiness=(True, "1/1"), reading=Reading(value=None)),
        Expect(weight=10, record={"baseline": 0.0}, phase=Phase.PROGRESSING),
    ),
    (
        "no data for the baseline with no_data: fail",
        obs(
            traffic=traffic(record=rec()),
            readiness=(True, "1/1"),
            reading=Reading(value=None),
            spec_changes={"no_data": NoData.FAIL},
        ),
        Expect(phase=Phase.FAILED, fields={"reason": "NoData"}, message="no data", ended=Phase.FAILED),
    ),
    (
        "no data for the baseline with no_data: skip: wait for data",
        obs(
            traffic=traffic(record=rec()),
            readiness=(True, "1/1"),
            reading=Reading(value=None),
            spec_changes={"no_data": NoData.SKIP},
        ),
        Expect(phase=Phase.WAITING, fields={"reason": "NoBaseline"}, message="no data", wake=1.0),
    ),
    (
        "baseline in status but not on the record (stopped between): step with it",
        obs(traffic=traffic(record=rec()), status=status(Phase.PROGRESSING, baseline=0.02)),
        Expect(weight=10, record={"baseline": 0.02}, phase=Phase.PROGRESSING),
    ),
    # --- progressing -----------------------------------------------------------------------------------------
    (
        "mid-interval: nothing to write, wake when the check is due",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING),
        Expect(wake=6.0),
    ),
    (
        "resumed after a restart that beat the status write: the status catches up, no step",
        obs(traffic=traffic(20, record=STEPPED), status=status(Phase.PROGRESSING, canary_weight=10, baseline=0.0)),
        Expect(phase=Phase.PROGRESSING, fields={"canary_weight": 20, "last_step_time": at(-4)}, wake=6.0),
    ),
    (
        "resumed from Pending status with a record mid-rollout: Progressing again",
        obs(traffic=traffic(20, record=STEPPED), status=status()),
        Expect(phase=Phase.PROGRESSING, fields={"canary_weight": 20, "baseline": 0.0}, wake=6.0),
    ),
    (
        "due: read the metric",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, **DUE),
        Expect(need=Need.METRIC),
    ),
    (
        "the step's write was answered 3 s after it was decided: the check an interval after the traffic moved",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, landed=NOW - 1, **DUE),
        Expect(wake=3.0),
    ),
    (
        "due and healthy: one increment up",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, reading=Reading(value=0.01), **DUE),
        Expect(
            weight=30,
            record={"baseline": 0.0, "step_time": at(6)},
            phase=Phase.PROGRESSING,
            fields={"last_value": 0.01, "failed_checks": 0},
            say=("TrafficShifted",),
            wake=10.0,
        ),
    ),
    (
        "healthy below max_weight by less than an increment: up to max_weight",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=0.0),
            spec_changes={"max_weight": 25},
            **DUE,
        ),
        Expect(weight=25, phase=Phase.PROGRESSING),
    ),
    (
        "healthy at the top, named subsets: production repointed, then all traffic to it",
        obs(
            traffic=traffic(100, record=rec(100, baseline=0.0, step_time=at(-4))),
            status=PROGRESSING,
            reading=Reading(value=0.0),
            **DUE,
        ),
        Expect(
            dr=DestinationRuleChange.PROMOTE,
            weight=0,
            record={"done": True, "phase": "Promoted"},
            phase=Phase.PROMOTED,
            fields={"canary_weight": 100, "reason": "Promoted"},
            say=("Promoted",),
            ended=Phase.PROMOTED,
        ),
    ),
    (
        "healthy at the top, version-named subsets: the canary keeps 100",
        obs(
            traffic=traffic(100, record=rec(100, baseline=0.0, step_time=at(-4)), subsets=VERSIONS),
            status=PROGRESSING,
            reading=Reading(value=0.0),
            **DUE,
        ),
        Expect(weight=100, record={"done": True, "phase": "Promoted"}, phase=Phase.PROMOTED, ended=Phase.PROMOTED),
    ),
    (
        "unhealthy, threshold 1: roll back",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, reading=Reading(value=0.5), **DUE),
        Expect(
            weight=0,
            record={"done": True, "phase": "RolledBack"},
            phase=Phase.ROLLED_BACK,
            fields={"canary_weight": 0, "failed_checks": 1, "last_value": 0.5},
            message="rose 0.5",
            say=("CanaryUnhealthy", "RolledBack"),
            ended=Phase.ROLLED_BACK,
        ),
    ),
    (
        "unhealthy, freeze: the split stays",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=0.5),
            spec_changes={"if_unhealthy": Unhealthy.FREEZE},
            **DUE,
        ),
        Expect(
            phase=Phase.FROZEN,
            fields={"canary_weight": 20, "reason": "Frozen"},
            say=("CanaryUnhealthy", "Frozen"),
            ended=Phase.FROZEN,
        ),
    ),
    (
        "unhealthy under failure_threshold: hold, count, look again in an interval",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=0.5),
            spec_changes={"failure_threshold": 3},
            **DUE,
        ),
        Expect(
            phase=Phase.PROGRESSING,
            fields={"failed_checks": 1, "canary_weight": 20, "reason": "CheckFailed"},
            message="(1/3 failed checks)",
            say=("CheckFailed",),
            wake=10.0,
        ),
    ),
    (
        "the third failed check in a row: roll back",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=replace(PROGRESSING, failed_checks=2),
            reading=Reading(value=0.5),
            spec_changes={"failure_threshold": 3},
            **DUE,
        ),
        Expect(weight=0, phase=Phase.ROLLED_BACK, fields={"failed_checks": 3}, ended=Phase.ROLLED_BACK),
    ),
    (
        "a passing check after a failed one clears the count",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=replace(PROGRESSING, failed_checks=2),
            reading=Reading(value=0.0),
            spec_changes={"failure_threshold": 3},
            **DUE,
        ),
        Expect(weight=30, phase=Phase.PROGRESSING, fields={"failed_checks": 0}),
    ),
    (
        "Prometheus down after the baseline: a failed check",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(error="timed out"),
            spec_changes={"failure_threshold": 2},
            **DUE,
        ),
        Expect(
            phase=Phase.PROGRESSING,
            fields={"failed_checks": 1},
            message="could not be read: timed out",
            say=("CheckFailed",),
        ),
    ),
    (
        "no data, skip: hold without counting a failure",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=None),
            spec_changes={"no_data": NoData.SKIP},
            **DUE,
        ),
        Expect(phase=Phase.PROGRESSING, fields={"skipped_checks": 1, "failed_checks": 0}, wake=10.0),
    ),
    (
        "no data, skip, more than failure_threshold in a row: unhealthy",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=replace(PROGRESSING, skipped_checks=1),
            reading=Reading(value=None),
            spec_changes={"no_data": NoData.SKIP},
            **DUE,
        ),
        Expect(weight=0, phase=Phase.ROLLED_BACK, message="no data for 2 checks in a row", ended=Phase.ROLLED_BACK),
    ),
    (
        "weights moved by someone else: frozen where they put them, said",
        obs(traffic=traffic(0, record=STEPPED), status=PROGRESSING, **DUE),
        Expect(
            phase=Phase.FROZEN,
            fields={"reason": "TrafficOverridden", "canary_weight": 0},
            message="birdwatch last wrote 20%",
            say=("TrafficOverridden",),
            ended=Phase.FROZEN,
        ),
    ),
    (
        "the canary subset was changed under a rollout: prepared again",
        obs(traffic=traffic(20, record=STEPPED, canary_subset_ready=False), status=PROGRESSING),
        Expect(dr=DestinationRuleChange.PREPARE),
    ),
    (
        "the VirtualService deleted mid-rollout: Waiting for it",
        obs(
            traffic=Traffic(problem="VirtualService aleph not found in namespace shop", transient=True),
            status=PROGRESSING,
        ),
        Expect(phase=Phase.WAITING, fields={"reason": "RouteMissing"}, wake=1.0),
    ),
    # --- endings written before their status -----------------------------------------------------------------
    (
        "promoted on the record, status behind: the ending is written",
        obs(traffic=traffic(0, record=rec(0, baseline=0.0, done=True, phase="Promoted")), status=PROGRESSING),
        Expect(phase=Phase.PROMOTED, fields={"canary_weight": 100}, say=("Promoted",), ended=Phase.PROMOTED),
    ),
    (
        "rolled back on the record, status behind",
        obs(traffic=traffic(0, record=rec(0, baseline=0.0, done=True, phase="RolledBack")), status=PROGRESSING),
        Expect(phase=Phase.ROLLED_BACK, fields={"canary_weight": 0}, ended=Phase.ROLLED_BACK),
    ),
    # --- spec changed mid-rollout ------------------------------------------------------------------------------
    (
        "spec changed, same canary and query: on from the weight, same baseline",
        obs(generation=2, traffic=traffic(20, record=STEPPED), status=PROGRESSING, spec_changes={"increment": 5}),
        Expect(
            weight=20,
            record={"generation": 2, "baseline": 0.0, "step_time": at(-4)},
            phase=Phase.PROGRESSING,
            fields={"observed_generation": 2},
            say=("RolloutRestarted",),
            wake=0.0,
        ),
    ),
    (
        "spec changed with a lower max_weight: down to it",
        obs(generation=2, traffic=traffic(20, record=STEPPED), status=PROGRESSING, spec_changes={"max_weight": 10}),
        Expect(weight=10, record={"generation": 2}, phase=Phase.PROGRESSING, say=("RolloutRestarted",)),
    ),
    (
        "spec changed with a new query: a new baseline first",
        obs(generation=2, traffic=traffic(20, record=STEPPED), status=PROGRESSING, metric_digest="d2"),
        Expect(
            weight=20,
            record={"generation": 2, "baseline": None, "step_time": None},
            phase=Phase.PENDING,
            message="new baseline",
            say=("RolloutRestarted",),
        ),
    ),
    (
        "canary_version changed: all traffic back to production first",
        obs(
            generation=2,
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            spec_changes={"canary_version": "v05"},
        ),
        Expect(
            weight=0,
            record={"generation": 2, "canary": "v05", "baseline": None},
            phase=Phase.PENDING,
            say=("TrafficReset",),
        ),
    ),
    # --- against production (baseline: production), by value and by samples --------------------------------
    (
        "production mode: both read at the same moment",
        obs(traffic=traffic(record=rec()), readiness=(True, "1/1"), reading=Reading(value=0.0), spec_changes=PROD),
        Expect(need=Need.METRIC),
    ),
    (
        "production mode: production's value now is the baseline shown; the first step",
        obs(
            traffic=traffic(record=rec()),
            readiness=(True, "1/1"),
            reading=Reading(value=None),
            production=Reading(value=0.02),
            spec_changes=PROD,
        ),
        Expect(
            weight=10,
            record={"baseline": 0.02},
            phase=Phase.PROGRESSING,
            fields={"baseline": 0.02, "production_value": 0.02, "last_value": 0.0},
            say=("RolloutStarted", "TrafficShifted"),
        ),
    ),
    (
        "production with no data and no_data: fail: said, not a division by zero",
        obs(
            traffic=traffic(record=rec()),
            readiness=(True, "1/1"),
            reading=Reading(value=0.0),
            production=Reading(value=None),
            spec_changes={**PROD, "no_data": NoData.FAIL},
        ),
        Expect(
            phase=Phase.FAILED, fields={"reason": "NoData"}, message="has production any traffic?", ended=Phase.FAILED
        ),
    ),
    (
        "production's Prometheus down before the baseline: wait",
        obs(
            traffic=traffic(record=rec()),
            readiness=(True, "1/1"),
            reading=Reading(value=0.0),
            production=Reading(error="timed out"),
            spec_changes=PROD,
        ),
        Expect(phase=Phase.PENDING, fields={"reason": "MetricUnavailable"}, message="production's metric"),
    ),
    (
        "production drifted up, the canary with it: healthy against production (first would roll back)",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=0.31),
            production=Reading(value=0.3),
            spec_changes=PROD,
            **DUE,
        ),
        Expect(weight=30, phase=Phase.PROGRESSING, fields={"production_value": 0.3, "last_value": 0.31}),
    ),
    (
        "the same drift judged against the first value: rolled back",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, reading=Reading(value=0.31), **DUE),
        Expect(weight=0, phase=Phase.ROLLED_BACK, message="from baseline 0", ended=Phase.ROLLED_BACK),
    ),
    (
        "the canary worse than production: rolled back, both numbers said",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=0.2),
            production=Reading(value=0.05),
            spec_changes=PROD,
            **DUE,
        ),
        Expect(
            weight=0,
            phase=Phase.ROLLED_BACK,
            fields={"production_value": 0.05, "last_value": 0.2},
            message="value 0.2 rose 0.15 from production 0.05",
            ended=Phase.ROLLED_BACK,
        ),
    ),
    (
        "production's metric unreadable at a check: a failed check",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=0.0),
            production=Reading(error="timed out"),
            spec_changes={**PROD, "failure_threshold": 2},
            **DUE,
        ),
        Expect(phase=Phase.PROGRESSING, fields={"failed_checks": 1}, message="production's metric could not be read"),
    ),
    (
        "production without data, no_data: skip: the check is skipped",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            reading=Reading(value=0.0),
            production=Reading(value=None),
            spec_changes={**PROD, "no_data": NoData.SKIP},
            **DUE,
        ),
        Expect(phase=Phase.PROGRESSING, fields={"skipped_checks": 1}, message="has production any traffic?"),
    ),
    (
        "mann-whitney: before the first sample's time, wait for it",
        obs(
            traffic=traffic(20, record=rec(20, baseline=0.0, step_time=at(-1))),
            status=replace(PROGRESSING, last_step_time=at(-1)),
            spec_changes=MW,
        ),
        Expect(wake=1.0),
    ),
    (
        "mann-whitney: a sample is due: read both",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, spec_changes=MW),
        Expect(need=Need.METRIC),
    ),
    (
        "mann-whitney: a sample is kept, the next one spaced out",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            spec_changes=MW,
            reading=Reading(value=0.1),
            production=Reading(value=0.1),
            samples=((0.1, 0.1),),
        ),
        Expect(wake=2.0),
    ),
    (
        "mann-whitney at the check: the canary clearly worse: rolled back with the p-value",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            spec_changes=MW,
            reading=Reading(value=0.5),
            production=Reading(value=0.13),  # no ties: the exact test, p = 1/C(10, 5)
            samples=((0.4, 0.11), (0.45, 0.09), (0.42, 0.1), (0.48, 0.12)),
            **DUE,
        ),
        Expect(
            weight=0,
            phase=Phase.ROLLED_BACK,
            fields={"p_value": pytest.approx(1 / 252), "effect": pytest.approx(0.34)},
            message="worse with confidence 0.95",
            ended=Phase.ROLLED_BACK,
        ),
    ),
    (
        "mann-whitney at the check: as good as production: one step up",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            spec_changes=MW,
            reading=Reading(value=0.1),
            production=Reading(value=0.1),
            samples=((0.09, 0.11), (0.12, 0.1), (0.1, 0.08), (0.11, 0.13)),
            **DUE,
        ),
        Expect(weight=30, phase=Phase.PROGRESSING, message="canary at 30%", wake=2.0),  # the next interval's samples
    ),
    (
        "mann-whitney: worse with confidence but within deviation: healthy",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            spec_changes={**MW, "deviation": 0.5},
            reading=Reading(value=0.5),
            production=Reading(value=0.1),
            samples=((0.4, 0.11), (0.45, 0.09), (0.42, 0.1), (0.48, 0.12)),
            **DUE,
        ),
        Expect(weight=30, phase=Phase.PROGRESSING),
    ),
    (
        "mann-whitney at the check with too few samples (a restart): a few more first",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
            spec_changes=MW,
            reading=Reading(value=0.1),
            production=Reading(value=0.1),
            **DUE,
        ),
        Expect(wake=2.0),
    ),
    # --- people in the loop: spec.paused and requests ---------------------------------------------------------
    (
        "paused: the weight holds, no check, nothing to look at until the BirdWatch changes",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, spec_changes={"paused": True}, **DUE),
        Expect(
            phase=Phase.PAUSED,
            fields={"canary_weight": 20, "reason": "Paused"},
            message="paused at 20%",
            say=("Paused",),
            wake=3600.0,
        ),
    ),
    (
        "still paused, said already: no write",
        obs(
            traffic=traffic(20, record=STEPPED),
            spec_changes={"paused": True},
            status=replace(
                PROGRESSING,
                phase=Phase.PAUSED,
                reason="Paused",
                message="paused at 20% (spec.paused): no steps or checks until it is set to false",
            ),
        ),
        Expect(say=(), wake=3600.0),
    ),
    (
        "pausing is a new generation but not a new rollout: adopted quietly",
        obs(
            generation=2,
            spec_digest="s1",
            traffic=traffic(20, record=replace(STEPPED, spec="s1")),
            status=PROGRESSING,
            spec_changes={"paused": True},
        ),
        Expect(weight=20, record={"generation": 2, "baseline": 0.0, "step_time": at(-4)}, phase=Phase.PAUSED, say=()),
    ),
    (
        "resumed from a pause: on with the same baseline, the check due at once",
        obs(
            generation=3,
            spec_digest="s1",
            traffic=traffic(20, record=replace(STEPPED, spec="s1", generation=2)),
            status=replace(PROGRESSING, phase=Phase.PAUSED, observed_generation=2),
        ),
        Expect(weight=20, record={"generation": 3, "baseline": 0.0}, phase=Phase.PROGRESSING, say=()),
    ),
    (
        "promote requested mid-rollout: the same promotion as a healthy end, the request on its record",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, request=Request.parse("promote/1")),
        Expect(
            dr=DestinationRuleChange.PROMOTE,
            weight=0,
            record={"done": True, "phase": "Promoted", "request": "promote/1"},
            phase=Phase.PROMOTED,
            fields={
                "request": Acknowledgement(id="promote/1", action="promote", result="Done", message="promoted at 20%")
            },
            say=("PromoteRequested", "Promoted"),
            ended=Phase.PROMOTED,
        ),
    ),
    (
        "promote a promoted canary: refused, nothing else changes",
        obs(
            traffic=traffic(0, record=rec(0, done=True, phase="Promoted")),
            status=status(Phase.PROMOTED),
            request=Request.parse("promote"),
        ),
        Expect(
            phase=Phase.PROMOTED,
            fields={"canary_weight": 0},
            message="cannot promote a rollout that is Promoted",
            say=("RequestRefused",),
            ended=Phase.PROMOTED,
        ),
    ),
    (
        "abort requested: all traffic back to production now",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, request=Request.parse("abort")),
        Expect(
            weight=0,
            record={"done": True, "phase": "RolledBack", "request": "abort"},
            phase=Phase.ROLLED_BACK,
            fields={"reason": "Aborted"},
            say=("AbortRequested", "Aborted"),
            ended=Phase.ROLLED_BACK,
        ),
    ),
    (
        "abort while frozen: rolled back",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=replace(PROGRESSING, phase=Phase.FROZEN),
            request=Request.parse("abort/7"),
        ),
        Expect(weight=0, phase=Phase.ROLLED_BACK, ended=Phase.ROLLED_BACK),
    ),
    (
        "abort while the VirtualService is missing: refused with what is missing",
        obs(
            traffic=Traffic(problem="VirtualService aleph not found in namespace shop", transient=True),
            request=Request.parse("abort"),
        ),
        Expect(phase=Phase.PENDING, message="VirtualService aleph not found", say=("RequestRefused",)),
    ),
    (
        "retry after a rollback: from 0 % with a fresh baseline",
        obs(
            traffic=traffic(0, record=rec(0, baseline=0.0, done=True, phase="RolledBack")),
            status=status(Phase.ROLLED_BACK, baseline=0.0, failed_checks=1),
            request=Request.parse("retry"),
        ),
        Expect(
            weight=0,
            record={"done": False, "baseline": None, "request": "retry"},
            phase=Phase.PENDING,
            fields={"reason": "Retried", "baseline": None, "failed_checks": 0},
            say=("RetryRequested",),
            wake=0.0,
        ),
    ),
    (
        "retry after frozen at 30 %: back to 0 first",
        obs(
            traffic=traffic(30, record=rec(30, baseline=0.0, step_time=at(-4))),
            status=status(Phase.FROZEN),
            request=Request.parse("retry"),
        ),
        Expect(weight=0, record={"baseline": None}, phase=Phase.PENDING),
    ),
    (
        "retry of a rollout that goes on: refused, the rollout goes on",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, request=Request.parse("retry")),
        Expect(
            phase=Phase.PROGRESSING,
            message="cannot retry a rollout that is Progressing",
            say=("RequestRefused",),
            ended=None,
            wake=0.0,
        ),
    ),
    (
        "resume from frozen: the same baseline, the next check an interval from now",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=replace(PROGRESSING, phase=Phase.FROZEN, failed_checks=1),
            request=Request.parse("resume"),
        ),
        Expect(
            weight=20,
            record={"baseline": 0.0, "step_time": at(0), "request": "resume", "done": False},
            phase=Phase.PROGRESSING,
            fields={"failed_checks": 0, "reason": "Resumed"},
            say=("ResumeRequested",),
        ),
    ),
    (
        "resume after someone else moved the weights: from where they are",
        obs(
            traffic=traffic(0, record=STEPPED),
            status=replace(PROGRESSING, phase=Phase.FROZEN),
            request=Request.parse("resume"),
        ),
        Expect(weight=0, record={"weight": 0}, phase=Phase.PROGRESSING),
    ),
    (
        "resume while spec.paused: refused (set paused to false)",
        obs(
            traffic=traffic(20, record=STEPPED),
            status=replace(PROGRESSING, phase=Phase.PAUSED),
            spec_changes={"paused": True},
            request=Request.parse("resume"),
        ),
        Expect(phase=Phase.PAUSED, message="spec.paused", say=("RequestRefused",)),
    ),
    (
        "an unknown action: refused, naming the known ones",
        obs(traffic=traffic(20, record=STEPPED), status=PROGRESSING, request=Request.parse("promte")),
        Expect(phase=Phase.PROGRESSING, message="use promote, abort, retry, resume", say=("RequestRefused",)),
    ),
    (
        "carried out before a restart but not acknowledged: acknowledged only",
        obs(
            traffic=traffic(0, record=rec(0, baseline=0.0, done=True, phase="RolledBack", request="abort")),
            status=PROGRESSING,
            request=Request.parse("abort"),
        ),
        Expect(
            phase=Phase.PROGRESSING,
            fields={
                "request": Acknowledgement(id="abort", action="abort", result="Done", message="'abort' was carried out")
            },
        ),
    ),
    (
        "a new generation keeps the acknowledgement of the last request",
        obs(
            generation=2,
            traffic=traffic(0, record=rec(0, done=True, phase="Promoted")),
            status=status(Phase.PROMOTED, request=Acknowledgement(id="promote", action="promote", result="Done")),
            readiness=(True, "1/1"),
            reading=Reading(value=0.0),
        ),
        Expect(
            weight=10,
            record={"generation": 2},
            phase=Phase.PROGRESSING,
            fields={"request": Acknowledgement(id="promote", action="promote", result="Done")},
        ),
    ),
    # --- API failures -------------------------------------------------------------------------------------------
    *[
        (
            f"API failure {code}: reported as {reason}, retried",
            obs(failure=Failure(status=code, summary=f"PATCH virtualservices aleph: {code} refused", retryable=False)),
            Expect(
                phase=Phase.PENDING,
                fields={"reason": reason},
                message=f"{code} refused; retrying",
                say=(reason,),
                wake=1.0,
            ),
        )
        for code, reason in [
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (404, "NotFound"),
            (409, "Conflict"),
            (422, "Invalid"),
        ]
    ],
    (
        "a 5xx is retried quietly at first",
        obs(failure=Failure(status=503, summary="GET ...: 503", retryable=True, attempts=1)),
        Expect(wake=0.5),
    ),
    (
        "a 5xx that outlives its retries is reported",
        obs(failure=Failure(status=503, summary="GET virtualservices aleph: 503", retryable=True, attempts=3)),
        Expect(phase=Phase.PENDING, fields={"reason": "ApiError"}, say=("ApiError",), wake=FAILURE_BACKOFF[2]),
    ),
    (
        "an unreachable API server, long: Unreachable",
        obs(failure=Failure(status=0, summary="connection refused", retryable=True, attempts=4)),
        Expect(phase=Phase.PENDING, fields={"reason": "Unreachable"}, wake=FAILURE_BACKOFF[3]),
    ),
    (
        "backoff is capped",
        obs(failure=Failure(status=403, summary="forbidden", retryable=False, attempts=50)),
        Expect(phase=Phase.PENDING, wake=FAILURE_BACKOFF[-1]),
    ),
    (
        "an unexpected error in birdwatch is reported the same way",
        obs(failure=Failure(status=0, summary="internal error", retryable=False, reason="InternalError")),
        Expect(phase=Phase.PENDING, fields={"reason": "InternalError"}, say=("InternalError",)),
    ),
    (
        "the same failure again: the status already says it (the task posts its Event once)",
        obs(
            failure=Failure(status=403, summary="forbidden", retryable=False, attempts=2),
            status=status(reason="Forbidden", message="forbidden; retrying until it succeeds"),
        ),
        Expect(say=("Forbidden",), wake=FAILURE_BACKOFF[1]),
    ),
    (
        "a failure mid-rollout keeps the phase and the weight",
        obs(
            failure=Failure(status=403, summary="forbidden", retryable=False),
            traffic=traffic(20, record=STEPPED),
            status=PROGRESSING,
        ),
        Expect(phase=Phase.PROGRESSING, fields={"canary_weight": 20, "reason": "Forbidden"}),
    ),
]


def check(decision: Decision, expect: Expect, observed: Observed) -> None:
    assert decision.stop is expect.stop
    assert decision.need == expect.need
    assert decision.destination_rule == expect.dr
    assert decision.ended == expect.ended
    if expect.weight is None:
        assert decision.traffic is None, decision.traffic
    else:
        assert decision.traffic is not None, "expected a traffic write"
        assert decision.traffic.weight == expect.weight
        assert decision.traffic.record.weight == expect.weight
        for key, value in (expect.record or {}).items():
            assert getattr(decision.traffic.record, key) == value, key
    if expect.phase is None:
        assert decision.status is None, decision.status
    else:
        assert decision.status is not None, "expected a status write"
        assert decision.status.phase is expect.phase
        acknowledged = decision.status.request.message if decision.status.request else ""
        assert expect.message in decision.status.message + "\n" + acknowledged
        for key, value in (expect.fields or {}).items():
            assert getattr(decision.status, key) == value, key
    if expect.say is not None:
        assert tuple(s.reason for s in decision.say) == expect.say
    if expect.wake is not None:
        assert decision.wake is not None
        assert decision.wake - observed.now == pytest.approx(expect.wake, abs=1e-3)


@pytest.mark.parametrize(("observed", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(observed: Observed, expect: Expect) -> None:
    check(decide(observed), expect, observed)


def test_a_whole_rollout_by_the_rules_alone() -> None:
    """Feed each decision's writes back as the next observation: fresh to promoted, weights one increment at a
    time, a check every interval, and the same decisions whether or not the task restarted in between."""
    now = NOW
    seen = obs()
    weights: list[int] = []
    status_writes = 0
    for _ in range(100):
        decision = decide(seen)
        status_writes += decision.status is not None
        if decision.need is Need.READINESS:
            seen = replace(seen, readiness=(True, "1/1"))
            continue
        if decision.need is Need.METRIC:
            seen = replace(seen, reading=Reading(value=0.0))
            continue
        tr = seen.traffic
        if decision.destination_rule is DestinationRuleChange.PREPARE:
            tr = replace(tr, canary_subset_ready=True)
        if decision.destination_rule is DestinationRuleChange.PROMOTE:
            tr = replace(tr, production_promoted=True)
        if decision.traffic is not None:
            tr = replace(tr, weight=decision.traffic.weight, record=decision.traffic.record)
            weights.append(decision.traffic.weight)
        st = decision.status or seen.status
        if decision.ended is not None:
            assert decision.ended is Phase.PROMOTED
            break
        assert decision.wake is not None
        now = max(now, decision.wake)
        # Each round is a new observation, as after a restart: only readiness and the reading are forgotten.
        seen = replace(seen, now=now, traffic=tr, status=st, readiness=None, reading=None)
    else:
        pytest.fail("the rollout never ended")
    # No write of the start's own: one traffic write and one status write per traffic move (ten steps up, then
    # the promotion), the two writes a step costs.
    assert weights == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 0]
    assert status_writes == len(weights)
    assert now - NOW == pytest.approx(100.0)  # ten steps of ten seconds after the baseline


def test_stamps_round_trip() -> None:
    assert parse_time(at(0)) == pytest.approx(NOW)
    assert parse_time(now_rfc3339(micro=True)) is not None
