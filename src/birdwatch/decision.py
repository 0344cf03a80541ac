"""The rules of a rollout, in one pure function: from what a canary task observes, what to write and when to look
again.

``decide(observed)`` does no I/O and reads no clock (the time is an argument), so every rule is unit-tested as a
table, and a task resumed after a restart takes the same path as one that never stopped: it observes the rollout's
record on the VirtualService (written atomically with the weights), the BirdWatch's status, the DestinationRule
and, when the rules ask for them, the canary Deployment's readiness and one metric reading; then it decides.

Top to bottom, the rules are:

1. A spec that cannot be carried out ends ``Failed`` at once; so does anything only the user can mend (PromQL that
   Prometheus rejects, a VirtualService another BirdWatch manages, a split with a foreign subset).
2. An API call that failed is reported (status, a Warning Event, a log line) and tried again with capped backoff.
3. Whatever is missing (VirtualService, DestinationRule, production route) is waited for, within ``ready_timeout``.
4. The rollout record says where the rollout is. A record of an earlier generation means the spec changed (only
   ``paused`` changed: the same rollout goes on); no record means a fresh rollout, which starts from the weight the
   canary has now (no traffic moves before a check).
5. A person's request (promote, abort, retry, resume) is carried out once, or refused, before anything else.
6. Before the baseline: the query checked (a bad one fails before anything is written), the canary subset, the
   canary Deployment available, then the baseline and the first step: the record, the baseline and the first
   weights in one traffic write, so a rollout's start costs no writes of its own. ``spec.paused`` holds
   everything where it is.
7. After it: at each check (against the first value, against production's value now, or over samples of both),
   healthy steps up (or promotes at the top); unhealthy counts towards ``failure_threshold`` and then rolls back or
   freezes; weights someone else moved stop the rollout.
"""

from __future__ import annotations

import datetime
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from .judge import Judgement, Verdict, at_top, judge, judge_against_production, judge_samples, next_weight, read_value
from .notify import Moment
from .router import Record, Subsets, Traffic
from .spec import TERMINAL, Analysis, Baseline, BirdWatchSpec, NoData, Phase, Unhealthy
from .status import Acknowledgement, Status, parse_time

# How often to look again while waiting for something to appear or become ready: soon at first, so that an
# ``apply -f`` of a folder goes on within seconds, then less often for what takes long.
WAIT_POLL = ((15.0, 1.0), (120.0, 2.5), (math.inf, 10.0))
# After an API failure: 1, 2, 4, ... seconds, capped, so a fixed cause (RBAC granted) is noticed within 30 s.
FAILURE_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
QUIET_RETRIES = 2  # transient API failures (5xx, 429, transport) retried this often before they are reported


class Need(enum.Enum):
    """An observation the rules need before they can decide; the task makes it and asks again."""

    READINESS = "readiness"
    METRIC = "metric"


class Action(enum.Enum):
    """What a person may ask of a rollout with the annotation ``birdwatch.otomato.link/request``."""

    PROMOTE = "promote"  # finish now: the same promotion as a healthy end
    ABORT = "abort"  # roll back now, whatever if_unhealthy says
    RETRY = "retry"  # start the same spec over (a fresh baseline) after RolledBack, Frozen or Failed
    RESUME = "resume"  # go on from Frozen with the same baseline, from the weight the canary has


@dataclass(frozen=True, kw_only=True)
class Request:
    """A request not acknowledged yet: ``id`` is the annotation's whole value (``promote`` or ``promote/2``)."""

    id: str
    action: Action | None  # None: not an action birdwatch knows

    @classmethod
    def parse(cls, value: str) -> Request:
        word = value.strip().split("/", 1)[0].strip().lower()
        try:
            return cls(id=value, action=Action(word))
        except ValueError:
            return cls(id=value, action=None)


class DestinationRuleChange(enum.Enum):
    PREPARE = "prepare"  # the canary subset exists and selects the canary's version
    PROMOTE = "promote"  # named subsets: production selects the canary's version


@dataclass(frozen=True, kw_only=True)
class Reading:
    """One answer to the metric query."""

    value: float | None = None  # None: no data
    error: str | None = None  # the query gave no number
    rejected: bool = False  # with ``error``: asking again will not help (bad PromQL, several series)


@dataclass(frozen=True, kw_only=True)
class Failure:
    """An API call of the last round that failed for good (or for the ``attempts``-th time in a row)."""

    status: int  # HTTP status, 0 for a transport failure
    summary: str  # which verb on which object, and the API server's own words
    retryable: bool  # the server may answer better as it is (5xx, 429, transport)
    attempts: int = 1
    reason: str = ""  # overrides the reason derived from ``status`` (InternalError)


@dataclass(frozen=True, kw_only=True)
class Observed:
    """Everything the rules read. ``spec`` is None when it could not be parsed (``spec_error`` says why)."""

    now: float  # seconds since the epoch
    name: str
    uid: str
    generation: int
    spec: BirdWatchSpec | None
    spec_error: str = ""
    status: Status  # the BirdWatch's status as last read or written
    traffic: Traffic
    metric_digest: str = ""  # of the spec's metric: a changed query means a new baseline
    spec_digest: str = ""  # of the whole spec but ``paused``: a pause or resume alone is not a new spec
    request: Request | None = None  # a person's request, not acknowledged yet
    other_owner: str | None = None  # another BirdWatch whose rollout holds the VirtualService
    query_checked: bool = False  # Prometheus accepted the query once in this task
    readiness: tuple[bool, str] | None = None  # (available, why), when asked for
    reading: Reading | None = None  # when asked for
    production: Reading | None = None  # baseline: production: production's reading, at the same moment
    samples: tuple[tuple[float | None, float | None], ...] = ()  # mann-whitney: (canary, production) this interval
    failure: Failure | None = None
    stopping: bool = False
    poll: float = 1.0  # shortest wait between looks while waiting
    # When the API server answered the write of the record's step, if this task made it: the traffic moved then,
    # not when the step was decided, and a write that waited in a busy API server's queue must not shorten the
    # interval the canary is judged over. None after a restart: the record's step time stands in.
    landed: float | None = None


@dataclass(frozen=True, kw_only=True)
class TrafficWrite:
    weight: int
    record: Record
    subsets: Subsets


@dataclass(frozen=True, kw_only=True)
class Say:
    """A moment worth telling: an Event, a log line, and a notification when ``moment`` is set."""

    type: str  # Normal or Warning
    reason: str
    message: str
    moment: Moment | None = None
    value: float | None = None
    event: bool = True  # False: logged and notified, but no Kubernetes Event (per-step progress is in status)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What to do, in this order: the DestinationRule, the traffic, the status, then tell. ``wake`` is when to
    look again (seconds since the epoch); ``ended`` says the rollout reached a terminal phase and the task ends.
    ``need`` asks for an observation first, and then nothing else is done."""

    need: Need | None = None
    destination_rule: DestinationRuleChange | None = None
    traffic: TrafficWrite | None = None
    status: Status | None = None
    say: tuple[Say, ...] = ()
    notes: tuple[str, ...] = ()  # log lines without an Event (info level)
    wake: float | None = None
    ended: Phase | None = None
    stop: bool = False
    sample: bool = False  # mann-whitney: keep this round's readings as a sample of the interval

    def but(self, **changes: object) -> Decision:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class _Ctx:
    """What every rule below needs, worked out once."""

    o: Observed
    spec: BirdWatchSpec
    status: Status  # the status of this generation (a fresh one when the stored one is older)
    record: Record | None  # ours, of any generation; None when absent or another BirdWatch's
    waiting_since: float


def decide(o: Observed) -> Decision:
    if o.stopping:
        return Decision(stop=True)
    current = o.status.observed_generation == o.generation
    # A new generation starts with a fresh status, but keeps the last request's acknowledgement: a request
    # already acted on must never be acted on again under a later spec.
    status = (
        o.status if current else Status(phase=Phase.PENDING, observed_generation=o.generation, request=o.status.request)
    )
    if o.spec is None:
        return _end(status, Phase.FAILED, "InvalidSpec", o.spec_error, weight=o.traffic.weight)
    if current and o.status.phase in TERMINAL and o.request is None:
        return Decision(ended=o.status.phase)  # this generation already ended; nothing left to do
    since = parse_time(status.waiting_since) or o.now
    record = o.traffic.record if o.traffic.record is not None and o.traffic.record.uid == o.uid else None
    ctx = _Ctx(o=o, spec=o.spec, status=status, record=record, waiting_since=since)
    if o.failure is not None:
        return _report_failure(ctx, o.failure)
    traffic = o.traffic
    if traffic.problem is not None:
        if o.request is not None:
            return _requested_without_traffic(ctx, o.request, traffic.problem)
        if not traffic.transient:
            return _end(status, Phase.FAILED, "RouteInvalid", traffic.problem, weight=traffic.weight)
        return _wait(ctx, "RouteMissing", _waiting_for(traffic.problem), timed_out=_fail_timeout)
    if o.other_owner is not None:
        message = f"VirtualService {o.spec.service} is already managed by BirdWatch {o.other_owner}"
        return _end(status, Phase.FAILED, "AlreadyManaged", message, weight=traffic.weight)
    if record is not None and record.generation != o.generation and not record.done:
        return _spec_changed(ctx, record)
    if o.request is not None:
        return _requested(ctx, o.request, record)
    if record is not None and record.generation == o.generation and record.done and record.phase in _ENDINGS:
        return _ended_before(ctx, record)
    if record is None or record.generation != o.generation or record.done:
        if not o.query_checked:
            # A bad query is found before anything is written, even before the canary is ready.
            if o.reading is None:
                return Decision(need=Need.METRIC)
            for reading in (o.reading, o.production):
                if reading is not None and reading.rejected:
                    return _end(status, Phase.FAILED, "BadQuery", reading.error or "", weight=traffic.weight)
        return _fresh(ctx)
    if not traffic.canary_subset_ready and not traffic.production_promoted:
        return Decision(destination_rule=DestinationRuleChange.PREPARE, wake=o.now)
    if traffic.weight != record.weight:
        return _overridden(ctx, record)
    baseline = record.baseline if record.baseline is not None else _kept_baseline(ctx, record)
    if o.spec.paused:
        return _paused(ctx, record, baseline)
    if baseline is None:
        return _before_baseline(ctx, record)
    return _progress(ctx, record, baseline)


# --- before the rollout is ours --------------------------------------------------------------------------------


def _fresh(ctx: _Ctx) -> Decision:
    """A fresh rollout (no record of this generation). The VirtualService is not written before the first step:
    the record comes with it, in the same conditional write as the weights and the baseline. Until then the
    rollout builds on the record that write will carry, at the weight the canary has now (no traffic moves before
    the first check). Nothing is lost by not writing earlier: a restart before the first step starts over from
    what is there (``waitingSince`` is in status), and of two BirdWatches racing for one VirtualService the
    conditional write lets one step first; the other then finds its record (``AlreadyManaged``)."""
    o, traffic = ctx.o, ctx.o.traffic
    if not traffic.canary_subset_ready:
        return Decision(destination_rule=DestinationRuleChange.PREPARE, wake=o.now)
    record = _record(ctx, weight=traffic.weight)
    if ctx.spec.paused:
        return _paused(ctx, record, None)
    return _before_baseline(ctx, record)


def _spec_changed(ctx: _Ctx, record: Record) -> Decision:
    """The spec changed mid-rollout. A new canary version sends all traffic back to production first (its pods
    are not the ones judged so far); otherwise the rollout goes on from the current weight under the new spec,
    with the same baseline unless the query changed."""
    o, spec, traffic = ctx.o, ctx.spec, ctx.o.traffic
    assert traffic.subsets is not None
    if record.spec is not None and record.spec == o.spec_digest:
        # Only ``paused`` changed: the same rollout under a new generation, nothing else to say.
        adopted = replace(record, generation=o.generation)
        phase = Phase.PAUSED if spec.paused else (Phase.PROGRESSING if record.baseline is not None else Phase.PENDING)
        # The status goes on too (values, counts, the last request's acknowledgement), under the new generation.
        status = o.status.but(observed_generation=o.generation, phase=phase, canary_weight=record.weight)
        return Decision(
            traffic=TrafficWrite(weight=record.weight, record=adopted, subsets=traffic.subsets),
            status=status.but(baseline=record.baseline),
            notes=("paused" if spec.paused else "resumed",),
            wake=o.now,
        )
    if record.canary != spec.canary_version:
        message = (
            f"canary_version changed from {record.canary} to {spec.canary_version}: "
            "all traffic back to production before starting over"
        )
        return Decision(
            traffic=TrafficWrite(weight=0, record=_record(ctx, weight=0), subsets=traffic.subsets),
            status=ctx.status.but(phase=Phase.PENDING, canary_weight=0, reason="TrafficReset", message=message),
            say=(Say(type="Warning", reason="TrafficReset", message=message),),
            wake=o.now,
        )
    weight = min(traffic.weight, spec.max_weight)
    baseline = record.baseline if record.metric == o.metric_digest else None
    step_time = record.step_time if baseline is not None else None
    message = f"spec changed: going on from {weight}% under the new spec"
    if baseline is None and record.baseline is not None:
        message += " (the metric changed: a new baseline first)"
    return Decision(
        traffic=TrafficWrite(
            weight=weight,
            record=_record(ctx, weight=weight, baseline=baseline, step_time=step_time),
            subsets=traffic.subsets,
        ),
        status=ctx.status.but(
            phase=Phase.PROGRESSING if baseline is not None else Phase.PENDING,
            canary_weight=weight,
            baseline=baseline,
            reason="RolloutRestarted",
            message=message,
        ),
        say=(Say(type="Normal", reason="RolloutRestarted", message=message),),
        wake=o.now,
    )


def _ended_before(ctx: _Ctx, record: Record) -> Decision:
    """This generation's last traffic write says the rollout ended, but its status does not: birdwatch stopped
    between the two writes. Write the ending it reached; the traffic is already right."""
    phase, moment, kind, weight = _ENDINGS[record.phase or ""]
    message = f"{phase.value}: the rollout had ended when birdwatch stopped, before its status was written"
    status = ctx.status.but(phase=phase, canary_weight=weight, baseline=record.baseline, reason=phase.value)
    return _end(status, phase, phase.value, message, weight=weight, moment=moment, kind=kind)


_ENDINGS = {
    Phase.PROMOTED.value: (Phase.PROMOTED, Moment.PROMOTED, "Normal", 100),
    Phase.ROLLED_BACK.value: (Phase.ROLLED_BACK, Moment.ROLLED_BACK, "Warning", 0),
}


def _kept_baseline(ctx: _Ctx, record: Record) -> float | None:
    """A baseline in this generation's status but not yet on the record: birdwatch stopped between taking it and
    the first step. Its query is the same (the record's digest), so the value stands."""
    if (
        ctx.status.baseline is not None
        and record.metric == ctx.o.metric_digest
        and ctx.status.phase is Phase.PROGRESSING
    ):
        return ctx.status.baseline
    return None


# --- waiting for the objects, the canary and the baseline ------------------------------------------------------


def _before_baseline(ctx: _Ctx, record: Record) -> Decision:
    o, spec = ctx.o, ctx.spec
    if o.readiness is None:
        return Decision(need=Need.READINESS)
    ready, why = o.readiness
    reading = o.reading
    if reading is None and (ready or not o.query_checked):
        return Decision(need=Need.METRIC)  # before the canary is ready: only to find a bad query early
    if reading is not None and reading.error is not None:
        if reading.rejected:
            return _end(ctx.status, Phase.FAILED, "BadQuery", reading.error, weight=record.weight)
        return _wait(
            ctx,
            "MetricUnavailable",
            f"waiting for the metric: {reading.error}",
            timed_out=lambda c, message: _unhealthy(c, record, message, reason="NoBaseline"),
        )
    if not ready:
        return _wait(
            ctx,
            "CanaryNotReady",
            f"waiting for the canary: {why}",
            phase=Phase.WAITING,
            timed_out=lambda c, _: _unhealthy(
                c,
                record,
                f"the canary was not available after ready_timeout {spec.ready_timeout}s: {why}",
                reason="ReadyTimeout",
            ),
        )
    assert reading is not None
    if spec.baseline is Baseline.PRODUCTION:
        return _production_baseline(ctx, record, reading)
    value = read_value(reading.value, spec.no_data)
    if value is None:
        if spec.no_data is NoData.FAIL:
            message = "the metric returned no data for the baseline (no_data: fail)"
            return _end(ctx.status, Phase.FAILED, "NoData", message, weight=record.weight)
        return _wait(
            ctx,
            "NoBaseline",
            "the metric returned no data for the baseline yet (no_data: skip)",
            phase=Phase.WAITING,
            timed_out=lambda c, message: _unhealthy(c, record, message, reason="NoBaseline"),
        )
    started = Say(
        type="Normal",
        reason="RolloutStarted",
        message=f"baseline {value:g} at {record.weight}%; stepping {spec.increment}% every {spec.interval}s "
        f"up to {spec.max_weight}%",
        moment=Moment.STARTED,
        value=value,
    )
    step = _step(ctx, record, baseline=value, last_value=value)
    return step.but(say=(started, *step.say), notes=("baseline taken",))


def _production_baseline(ctx: _Ctx, record: Record, canary: Reading) -> Decision:
    """``baseline: production``: the canary is judged against production's value at each check; the baseline in
    status is production's value when the rollout starts, for people to compare."""
    o, spec = ctx.o, ctx.spec
    production = o.production
    if production is None:
        return Decision(need=Need.METRIC)
    if production.error is not None:
        if production.rejected:
            return _end(
                ctx.status, Phase.FAILED, "BadQuery", f"production's query: {production.error}", weight=record.weight
            )
        return _wait(
            ctx,
            "MetricUnavailable",
            f"waiting for production's metric: {production.error}",
            timed_out=lambda c, message: _unhealthy(c, record, message, reason="NoBaseline"),
        )
    value = read_value(production.value, spec.no_data)
    if value is None:
        why = "production's metric returned no data (has production any traffic?)"
        if spec.no_data is NoData.FAIL:
            return _end(ctx.status, Phase.FAILED, "NoData", f"{why} (no_data: fail)", weight=record.weight)
        return _wait(
            ctx,
            "NoBaseline",
            why,
            phase=Phase.WAITING,
            timed_out=lambda c, message: _unhealthy(c, record, message, reason="NoBaseline"),
        )
    mode = "samples of both, a Mann-Whitney U test" if spec.analysis is Analysis.MANN_WHITNEY else "its value"
    started = Say(
        type="Normal",
        reason="RolloutStarted",
        message=f"production at {value:g}; the canary is judged against production ({mode}) at each check; "
        f"stepping {spec.increment}% every {spec.interval}s from {record.weight}% up to {spec.max_weight}%",
        moment=Moment.STARTED,
        value=value,
    )
    ctx = replace(ctx, status=ctx.status.but(production_value=value))
    step = _step(ctx, record, baseline=value, last_value=read_value(canary.value, spec.no_data))
    return step.but(say=(started, *step.say), notes=("baseline taken (production)",))


def _wait(
    ctx: _Ctx,
    reason: str,
    message: str,
    *,
    phase: Phase | None = None,
    timed_out: Callable[[_Ctx, str], Decision],
) -> Decision:
    """Waiting for something that may yet appear, bounded by ``ready_timeout`` from when this generation began
    waiting (kept in status, so a restart does not start the clock over)."""
    o, spec = ctx.o, ctx.spec
    waited = o.now - ctx.waiting_since
    if waited >= spec.ready_timeout:
        return timed_out(ctx, f"{message} (for ready_timeout {spec.ready_timeout}s)")
    if phase is None:
        phase = Phase.PENDING if ctx.status.phase is Phase.PENDING else Phase.WAITING
    status = ctx.status.but(phase=phase, reason=reason, message=message, waiting_since=_stamp(ctx.waiting_since))
    poll = max(o.poll, next(p for limit, p in WAIT_POLL if waited < limit))
    wake = min(o.now + poll, ctx.waiting_since + spec.ready_timeout)
    changed = status != ctx.status
    return Decision(
        status=status if changed else None,
        notes=(message,) if changed and status.message != ctx.status.message else (),
        wake=wake,
    )


# --- the rollout proper --------------------------------------------------------------------------------------


def _progress(ctx: _Ctx, record: Record, baseline: float) -> Decision:
    o, spec = ctx.o, ctx.spec
    step_time = parse_time(record.step_time)
    if step_time is not None and o.landed is not None:
        step_time = max(step_time, o.landed)
    due = (step_time if step_time is not None else o.now) + spec.interval
    # What the status should say at this point of the record (also mends a status a restart left behind).
    status = ctx.status.but(
        phase=Phase.PROGRESSING,
        canary_weight=record.weight,
        baseline=baseline,
        last_step_time=record.step_time,
    )
    if ctx.status.phase is not Phase.PROGRESSING:
        status = status.but(reason="Progressing", message=f"canary at {record.weight}%")
    if step_time is None:
        # The record has a baseline but no step (the spec changed before the first step): step now.
        return _step(ctx, record, baseline=baseline, last_value=status.last_value)
    if spec.analysis is Analysis.MANN_WHITNEY:
        early = _sample(ctx, status, step_time=step_time, due=due)
        if early is not None:
            return early
    elif o.now < due:
        return Decision(status=status if status != ctx.status else None, wake=due)
    if o.reading is None or (spec.baseline is Baseline.PRODUCTION and o.production is None):
        return Decision(need=Need.METRIC)
    judgement = _check(ctx, baseline)
    if judgement is None:
        # Mann-Whitney without enough samples with data (after a restart, or no data): a few more first.
        return Decision(sample=True, wake=o.now + spec.interval / spec.samples)
    verdict, value, why = judgement.verdict, judgement.value, judgement.reason
    status = status.but(production_value=judgement.production, p_value=judgement.p_value, effect=judgement.effect)
    ctx = replace(ctx, status=status)
    if verdict is Verdict.HEALTHY:
        if at_top(record.weight, spec):
            return _promote(ctx, record, value, why)
        return _step(ctx, record, baseline=baseline, last_value=value)
    if verdict is Verdict.SKIPPED:
        skipped = status.skipped_checks + 1
        if skipped > spec.failure_threshold:
            ctx = replace(ctx, status=status.but(skipped_checks=skipped))
            return _unhealthy(ctx, record, f"no data for {skipped} checks in a row", value=value)
        message = f"{why}; holding at {record.weight}% ({skipped}/{spec.failure_threshold} skipped)"
        held = status.but(last_value=value, skipped_checks=skipped, reason="CheckSkipped", message=message)
        return Decision(status=held, notes=(message,), wake=o.now + spec.interval)
    failed = status.failed_checks + 1
    if failed >= spec.failure_threshold:
        return _unhealthy(replace(ctx, status=status.but(failed_checks=failed)), record, why, value=value)
    message = f"{why}; holding at {record.weight}% ({failed}/{spec.failure_threshold} failed checks)"
    held = status.but(last_value=value, failed_checks=failed, reason="CheckFailed", message=message)
    return Decision(
        status=held,
        say=(Say(type="Warning", reason="CheckFailed", message=message, value=value, moment=Moment.CHECK_FAILED),),
        wake=o.now + spec.interval,
    )


def _sample(ctx: _Ctx, status: Status, *, step_time: float, due: float) -> Decision | None:
    """``analysis: mann-whitney``: ``samples`` readings of both sides spread over the interval, the last at the
    check. None: the check is due (judge now)."""
    o, spec = ctx.o, ctx.spec
    if o.now >= due:
        return None
    spacing = spec.interval / spec.samples
    next_at = step_time + spacing * (len(o.samples) + 1)
    if o.now < next_at:
        return Decision(status=status if status != ctx.status else None, wake=min(next_at, due))
    if o.reading is None or o.production is None:
        return Decision(need=Need.METRIC)
    wake = min(max(next_at, o.now) + spacing, due)  # behind schedule (a restart): spaced from now on
    if o.reading.error is not None or o.production.error is not None:
        return Decision(notes=("a sample could not be read; the check counts what it has",), wake=wake)
    return Decision(sample=True, wake=wake)


def _check(ctx: _Ctx, baseline: float) -> Judgement | None:
    """Judge this check's reading(s): against the first value, against production's now, or over the samples."""
    o, spec = ctx.o, ctx.spec
    reading, production = o.reading, o.production
    assert reading is not None
    if reading.error is not None:
        return Judgement(Verdict.UNHEALTHY, None, f"the metric could not be read: {reading.error}")
    if spec.baseline is Baseline.FIRST:
        return judge(reading.value, baseline=baseline, spec=spec)
    assert production is not None
    if production.error is not None:
        return Judgement(Verdict.UNHEALTHY, None, f"production's metric could not be read: {production.error}")
    if spec.analysis is Analysis.MANN_WHITNEY:
        return judge_samples((*o.samples, (reading.value, production.value)), spec=spec)
    return judge_against_production(reading.value, production.value, spec=spec)


def _step(ctx: _Ctx, record: Record, *, baseline: float, last_value: float | None) -> Decision:
    o, spec, traffic = ctx.o, ctx.spec, ctx.o.traffic
    assert traffic.subsets is not None
    weight = next_weight(record.weight, spec)
    stamp = _stamp(o.now, micro=True)
    message = f"canary at {weight}%"
    status = ctx.status.but(
        phase=Phase.PROGRESSING,
        canary_weight=weight,
        baseline=baseline,
        last_value=last_value,
        last_step_time=stamp,
        failed_checks=0,
        skipped_checks=0,
        reason="TrafficShifted",
        message=message,
        waiting_since=None,  # the wait is over: a later one (the VirtualService deleted mid-rollout) starts afresh
    )
    return Decision(
        traffic=TrafficWrite(
            weight=weight,
            record=_record(ctx, weight=weight, baseline=baseline, step_time=stamp),
            subsets=traffic.subsets,
        ),
        status=status,
        say=(
            Say(
                type="Normal",
                reason="TrafficShifted",
                message=f"canary weight {weight}% (production {100 - weight}%)",
                moment=Moment.STEP,
                # An Event per step would be a third API write per step for what status and the log already say;
                # Events are for the moments that change the story (start, failed checks, requests, the ending).
                event=False,
            ),
        ),
        wake=o.now + _first_look(spec),
    )


def _first_look(spec: BirdWatchSpec) -> float:
    """After a step: the check an interval later, or with mann-whitney the first of its samples."""
    return spec.interval / spec.samples if spec.analysis is Analysis.MANN_WHITNEY else float(spec.interval)


def _overridden(ctx: _Ctx, record: Record) -> Decision:
    """Someone else (a person, a GitOps tool syncing the VirtualService back to git) set the weights to something
    birdwatch did not write. Fighting them would flap production traffic; following them would release a canary
    nobody judged at that weight. So the rollout stops where they put it, and says so."""
    weight = ctx.o.traffic.weight
    message = (
        f"traffic overridden: the canary has {weight}% but birdwatch last wrote {record.weight}%; "
        "the rollout is frozen so as not to fight whoever changed it (see the README on GitOps)"
    )
    return _end(
        ctx.status.but(last_step_time=record.step_time),
        Phase.FROZEN,
        "TrafficOverridden",
        message,
        weight=weight,
        moment=Moment.FROZEN,
    )


# --- endings -------------------------------------------------------------------------------------------------


def _promote(ctx: _Ctx, record: Record, value: float | None, why: str) -> Decision:
    traffic, spec = ctx.o.traffic, ctx.spec
    assert traffic.subsets is not None
    named = traffic.subsets.named
    # Named subsets: production selects the canary's version first, then all traffic goes to production.
    weight = 0 if named else 100
    message = f"canary {spec.canary_version} promoted to production ({why})"
    ending = _end(ctx.status, Phase.PROMOTED, "Promoted", message, weight=100, moment=Moment.PROMOTED, value=value)
    return ending.but(
        destination_rule=DestinationRuleChange.PROMOTE if named else None,
        traffic=TrafficWrite(
            weight=weight,
            record=_record(ctx, weight=weight, baseline=record.baseline, done=Phase.PROMOTED),
            subsets=traffic.subsets,
        ),
    )


def _unhealthy(
    ctx: _Ctx, record: Record, why: str, *, value: float | None = None, reason: str = "CanaryUnhealthy"
) -> Decision:
    traffic, spec = ctx.o.traffic, ctx.spec
    assert traffic.subsets is not None
    alarm = Say(type="Warning", reason=reason, message=why, moment=Moment.UNHEALTHY, value=value)
    if spec.if_unhealthy is Unhealthy.ROLLBACK:
        ending = _end(
            ctx.status,
            Phase.ROLLED_BACK,
            "RolledBack",
            f"rolled back: {why}",
            weight=0,
            moment=Moment.ROLLED_BACK,
            value=value,
        )
        return ending.but(
            traffic=TrafficWrite(
                weight=0,
                record=_record(ctx, weight=0, baseline=record.baseline, done=Phase.ROLLED_BACK),
                subsets=traffic.subsets,
            ),
            say=(alarm, *ending.say),
        )
    ending = _end(
        ctx.status,
        Phase.FROZEN,
        "Frozen",
        f"frozen at {record.weight}%: {why}",
        weight=record.weight,
        moment=Moment.FROZEN,
        value=value,
    )
    return ending.but(say=(alarm, *ending.say))


def _fail_timeout(ctx: _Ctx, message: str) -> Decision:
    return _end(ctx.status, Phase.FAILED, "RouteMissing", message, weight=ctx.o.traffic.weight)


def _end(
    status: Status,
    phase: Phase,
    reason: str,
    message: str,
    *,
    weight: int,
    moment: Moment | None = None,
    kind: str = "",
    value: float | None = None,
) -> Decision:
    kind = kind or ("Normal" if phase is Phase.PROMOTED else "Warning")
    final = status.but(
        phase=phase,
        canary_weight=weight,
        reason=reason,
        message=message,
        last_value=value if value is not None else status.last_value,
    )
    return Decision(
        status=final,
        say=(Say(type=kind, reason=reason, message=message, moment=moment or _MOMENTS.get(phase), value=value),),
        ended=phase,
    )


_MOMENTS = {
    Phase.PROMOTED: Moment.PROMOTED,
    Phase.ROLLED_BACK: Moment.ROLLED_BACK,
    Phase.FROZEN: Moment.FROZEN,
    Phase.FAILED: Moment.FAILED,
}


# --- people in the loop -----------------------------------------------------------------------------------------

# Where each action makes sense; elsewhere it is refused, and nothing else changes.
_ALLOWED = {
    Action.PROMOTE: {Phase.PROGRESSING, Phase.PAUSED, Phase.FROZEN},
    Action.ABORT: {Phase.PENDING, Phase.WAITING, Phase.PROGRESSING, Phase.PAUSED, Phase.FROZEN},
    Action.RETRY: {Phase.ROLLED_BACK, Phase.FROZEN, Phase.FAILED},
    Action.RESUME: {Phase.FROZEN},
}


def _paused(ctx: _Ctx, record: Record, baseline: float | None) -> Decision:
    """``spec.paused``: the weight holds, no steps and no checks. Only a change of the BirdWatch ends it (the
    watch hands the task the new generation), so there is nothing to look at until then."""
    message = f"paused at {record.weight}% (spec.paused): no steps or checks until it is set to false"
    status = ctx.status.but(
        phase=Phase.PAUSED, canary_weight=record.weight, baseline=baseline, reason="Paused", message=message
    )
    if status == ctx.status:
        return Decision(wake=ctx.o.now + 3600.0)
    return Decision(status=status, say=(Say(type="Normal", reason="Paused", message=message),), wake=ctx.o.now + 3600.0)


def _effective_phase(ctx: _Ctx, record: Record | None) -> Phase:
    """The phase the rollout is in, also when its ending is on the record but not yet in status."""
    if record is not None and record.generation == ctx.o.generation and record.done and record.phase in _ENDINGS:
        return _ENDINGS[record.phase][0]
    return ctx.status.phase


def _acknowledge(ctx: _Ctx, request: Request, result: str, message: str) -> Acknowledgement:
    action = request.action.value if request.action is not None else request.id
    return Acknowledgement(id=request.id, action=action, result=result, message=message)


def _refuse(ctx: _Ctx, request: Request, why: str, *, phase: Phase) -> Decision:
    message = f"request {request.id!r} refused: {why}"
    ack = _acknowledge(ctx, request, "Refused", message)
    return Decision(
        status=ctx.status.but(request=ack),
        say=(Say(type="Warning", reason="RequestRefused", message=message),),
        ended=phase if phase in TERMINAL else None,
        wake=ctx.o.now,
    )


def _requested(ctx: _Ctx, request: Request, record: Record | None) -> Decision:
    """A person's request, acted on exactly once: the traffic write that carries it out records its id beside the
    weights, so a restart between that write and the status's acknowledgement only acknowledges it."""
    o, spec, traffic = ctx.o, ctx.spec, ctx.o.traffic
    assert traffic.subsets is not None
    phase = _effective_phase(ctx, record)
    if record is not None and record.request == request.id:
        ack = _acknowledge(ctx, request, "Done", f"{request.id!r} was carried out")
        return Decision(status=ctx.status.but(request=ack), wake=o.now)
    if request.action is None:
        known = ", ".join(a.value for a in Action)
        return _refuse(ctx, request, f"not an action birdwatch knows (use {known})", phase=phase)
    action = request.action
    if spec.paused and action is Action.RESUME:
        return _refuse(ctx, request, "the rollout is paused by spec.paused: set it to false to resume", phase=phase)
    if phase not in _ALLOWED[action]:
        return _refuse(ctx, request, f"cannot {action.value} a rollout that is {phase.value}", phase=phase)
    if record is None and action in (Action.PROMOTE, Action.RESUME):
        why = f"the VirtualService carries no record of this rollout: nothing to {action.value}"
        return _refuse(ctx, request, why, phase=phase)
    weight = traffic.weight
    asked = Say(type="Normal", reason=f"{action.value.capitalize()}Requested", message=f"{action.value} requested")
    if action is Action.PROMOTE:
        assert record is not None
        done = _promote(ctx, replace(record, request=request.id), None, f"promoted by request at {weight}%")
        ack = _acknowledge(ctx, request, "Done", f"promoted at {weight}%")
        return _with_request(done, request, ack, asked)
    if action is Action.ABORT:
        message = f"rolled back by request at {weight}%"
        ending = _end(ctx.status, Phase.ROLLED_BACK, "Aborted", message, weight=0, moment=Moment.ROLLED_BACK)
        rec = _record(
            ctx,
            weight=0,
            baseline=record.baseline if record else None,
            done=Phase.ROLLED_BACK,
        )
        ack = _acknowledge(ctx, request, "Done", message)
        return _with_request(
            ending.but(traffic=TrafficWrite(weight=0, record=rec, subsets=traffic.subsets)), request, ack, asked
        )
    if action is Action.RETRY:
        message = f"retry requested: starting over from 0% with a new baseline (was {phase.value} at {weight}%)"
        fresh = Status(phase=Phase.PENDING, observed_generation=o.generation, reason="Retried", message=message)
        ack = _acknowledge(ctx, request, "Done", "started over")
        return Decision(
            traffic=TrafficWrite(weight=0, record=_record(ctx, weight=0, request=request.id), subsets=traffic.subsets),
            status=fresh.but(request=ack),
            say=(Say(type="Normal", reason="RetryRequested", message=message, moment=Moment.STARTED),),
            wake=o.now,
        )
    # RESUME, from Frozen: the same baseline, from the weight the canary has now, the next check an interval away.
    assert record is not None
    stamp = _stamp(o.now, micro=True)
    resumed = replace(record, generation=o.generation, weight=weight, step_time=stamp, request=request.id, done=False)
    message = f"resumed at {weight}% by request" + ("" if record.baseline is not None else "; taking the baseline")
    ack = _acknowledge(ctx, request, "Done", message)
    status = ctx.status.but(
        phase=Phase.PROGRESSING if record.baseline is not None else Phase.WAITING,
        canary_weight=weight,
        failed_checks=0,
        skipped_checks=0,
        reason="Resumed",
        message=message,
        last_step_time=stamp,
        waiting_since=None,
        request=ack,
    )
    return Decision(
        traffic=TrafficWrite(weight=weight, record=resumed, subsets=traffic.subsets),
        status=status,
        say=(Say(type="Normal", reason="ResumeRequested", message=message),),
        wake=o.now,
    )


def _with_request(decision: Decision, request: Request, ack: Acknowledgement, asked: Say) -> Decision:
    """The ending a request brought about, with the request's id on its record and its acknowledgement in
    status."""
    traffic = decision.traffic
    if traffic is not None:
        traffic = replace(traffic, record=replace(traffic.record, request=request.id))
    status = decision.status.but(request=ack) if decision.status is not None else None
    return decision.but(traffic=traffic, status=status, say=(asked, *decision.say))


def _requested_without_traffic(ctx: _Ctx, request: Request, problem: str) -> Decision:
    """A request while the VirtualService or DestinationRule cannot carry the canary: only a retry of an ended
    rollout makes sense (it waits for the objects again, with a fresh ready_timeout)."""
    phase = ctx.status.phase
    if request.action is Action.RETRY and phase in _ALLOWED[Action.RETRY]:
        message = f"retry requested: starting over ({problem})"
        ack = _acknowledge(ctx, request, "Done", "started over")
        fresh = Status(phase=Phase.PENDING, observed_generation=ctx.o.generation, reason="Retried", message=message)
        return Decision(
            status=fresh.but(request=ack),
            say=(Say(type="Normal", reason="RetryRequested", message=message),),
            wake=ctx.o.now,
        )
    return _refuse(ctx, request, problem, phase=phase)


# --- API failures ----------------------------------------------------------------------------------------------

_FAILURE_REASONS = {0: "Unreachable", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict"}


def failure_reason(status: int) -> str:
    if status in _FAILURE_REASONS:
        return _FAILURE_REASONS[status]
    if status == 422:
        return "Invalid"
    if status == 429:
        return "Throttled"
    return "ApiError"


def _report_failure(ctx: _Ctx, failure: Failure) -> Decision:
    """Say what the API server refused (which verb on which object, in its own words) and try again later. The
    phase and the traffic stay as they are: nothing was half-done, since each write is one request."""
    o = ctx.o
    delay = FAILURE_BACKOFF[min(failure.attempts - 1, len(FAILURE_BACKOFF) - 1)]
    if failure.retryable and failure.attempts <= QUIET_RETRIES:
        return Decision(notes=(f"API call failed; retrying: {failure.summary}",), wake=o.now + delay / 2)
    reason = failure.reason or failure_reason(failure.status)
    message = f"{failure.summary}; retrying until it succeeds"
    status = ctx.status.but(reason=reason, message=message)
    return Decision(
        status=status if status != ctx.status else None,
        say=(Say(type="Warning", reason=reason, message=message),),
        wake=o.now + delay,
    )


# --- small helpers ---------------------------------------------------------------------------------------------


def _record(
    ctx: _Ctx,
    *,
    weight: int,
    baseline: float | None = None,
    step_time: str | None = None,
    done: Phase | None = None,
    request: str | None = None,
) -> Record:
    o = ctx.o
    return Record(
        birdwatch=o.name,
        uid=o.uid,
        generation=o.generation,
        canary=ctx.spec.canary_version,
        weight=weight,
        baseline=baseline,
        step_time=step_time,
        done=done is not None,
        metric=o.metric_digest,
        phase=done.value if done is not None else None,
        spec=o.spec_digest or None,
        request=request if request is not None else (ctx.record.request if ctx.record is not None else None),
    )


def _waiting_for(problem: str) -> str:
    """'waiting for VirtualService x in namespace y', or 'waiting: <what is wrong>'."""
    if " not found in namespace " in problem:
        return "waiting for " + problem.replace(" not found in namespace ", " in namespace ")
    return f"waiting: {problem}"


def _stamp(when: float, *, micro: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


__all__ = [
    "Action",
    "Decision",
    "DestinationRuleChange",
    "Failure",
    "Need",
    "Observed",
    "Reading",
    "Request",
    "Say",
    "TrafficWrite",
    "decide",
    "failure_reason",
]
