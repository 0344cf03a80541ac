"""One canary release: the coroutine task a BirdWatch gets while it is being carried out.

The task is a loop: observe (the rollout record and weights on the VirtualService, the DestinationRule, the
BirdWatch's status; the canary Deployment and the metric when the rules ask), decide (``decision.decide``, pure),
make the writes it returns in order (DestinationRule, traffic, status, then Events, notifications and logs), and
sleep until it says to look again or a stop is asked for. Resuming after a restart is the same path as any round.

Requests stay lean: the VirtualService and DestinationRule are read once and then kept from each write's answer;
they are read again only after a conflict or while something is missing. An API call that fails is not the end of
the task: the next round reports it (status, a Warning Event, a log line) and tries again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from .decision import Decision, DestinationRuleChange, Failure, Need, Observed, Reading, Request, Say, decide
from .events import EventRecorder, ObjectRef
from .kube import BIRDWATCHES, Conflict, Kube, KubeError, NotFound, Obj
from .metrics import Metrics
from .notify import Notice, Notifier, next_step
from .providers.base import ProviderLookup
from .providers.errors import BadQuery, QueryError
from .router import Record, Router, Traffic
from .spec import TERMINAL, Baseline, BirdWatchSpec, InvalidSpec, Phase
from .status import Status, StatusWriter, parse_time
from .updates import Updates
from .workload import canary_available

log = structlog.get_logger(__name__)

READY_POLL = 1.0  # shortest wait between looks at what is missing or not ready yet
MAX_CONFLICTS = 5  # conflicts in a row before they are reported (each is re-read and decided afresh)


class OwnerLookup(Protocol):
    def __call__(self, namespace: str, name: str) -> Obj | None: ...


@dataclass(frozen=True, kw_only=True)
class Ports:
    """Everything a canary talks to. The controller builds one and shares it between all canaries."""

    kube: Kube
    providers: ProviderLookup  # spec.provider's name -> the backend answering spec.metric
    events: EventRecorder
    notifier: Notifier
    metrics: Metrics
    owners: OwnerLookup
    ready_poll: float = READY_POLL


def metric_digest(metric: str) -> str:
    return hashlib.sha256(metric.encode()).hexdigest()[:16]


def spec_digest(raw: object) -> str:
    """Of the spec as written, but ``paused``: pausing and resuming change the generation, not the rollout."""
    spec = {k: v for k, v in raw.items() if k != "paused"} if isinstance(raw, dict) else raw
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Canary:
    def __init__(self, obj: Obj, ports: Ports, *, stop: asyncio.Event, updates: Updates | None = None) -> None:
        meta = obj["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid", "")
        self.generation: int = int(meta.get("generation", 1))
        self._ports = ports
        self._stop = stop
        self._updates = updates or Updates(obj)
        self._ref = ObjectRef.of(obj)
        self._writer = StatusWriter(ports.kube, namespace=self.namespace, name=self.name, current=obj)
        self.status = Status.parse(obj) or Status(phase=Phase.PENDING, observed_generation=self.generation)
        self.spec: BirdWatchSpec | None = None
        self._spec_error = ""
        try:
            self.spec = BirdWatchSpec.from_dict(obj.get("spec"))
        except InvalidSpec as exc:
            self._spec_error = str(exc)
        self._digest = metric_digest(self.spec.metric) if self.spec else ""
        self._spec_digest = spec_digest(obj.get("spec"))
        self.router = (
            Router(
                ports.kube, namespace=self.namespace, service=self.spec.service, canary_version=self.spec.canary_version
            )
            if self.spec
            else None
        )
        self.weight = 0
        self._query_checked = False
        self._failure: Failure | None = None
        self._conflicts = 0
        self._landed: tuple[str, float] | None = None  # (step time, when its write was answered): see Observed
        self._gone_owner: str | None = None  # uid of a record's owner the API server said is gone
        self._said: set[tuple[str, str]] = set()  # Warnings already posted while a failure lasts
        # mann-whitney: (canary, production) readings of this interval; kept in memory only, since after a
        # restart a few fresh samples are as good as the lost ones.
        self._samples: list[tuple[float | None, float | None]] = []

    # --- the loop --------------------------------------------------------------------------------------------

    async def run(self) -> Phase | None:
        """Carry the rollout out; returns its terminal phase, or None when stopped (or deleted) before one."""
        structlog.contextvars.bind_contextvars(
            namespace=self.namespace, birdwatch=self.name, uid=self.uid, generation=self.generation
        )
        if self.spec is not None:
            structlog.contextvars.bind_contextvars(service=self.spec.service, version=self.spec.canary_version)
        first = True
        while True:
            decision = await self._round(announce=first)
            first = False
            if decision.stop:
                log.info("canary task stopped", weight=self.weight)
                return None
            if decision.ended is not None:
                return decision.ended
            if decision.wake is None or not await self._sleep_until(decision.wake):
                log.info("canary task stopped", weight=self.weight)
                return None

    async def _round(self, *, announce: bool = False) -> Decision:
        """One observe-decide-act round. Whatever fails is kept for the next round to report."""
        observed: Observed | None = None
        try:
            observed = await self._observe()
            if announce:
                self._announce(observed.traffic.record)
            decision = decide(observed)
            while decision.need is not None:
                observed = await self._gather(observed, decision.need)
                decision = decide(observed)
            lag = await self._carry_out(decision, observed)
            if lag and decision.wake is not None:
                decision = decision.but(wake=decision.wake + lag)  # the check an interval after the traffic moved
        except Conflict as exc:
            # Someone else wrote; the router kept what is there now. Decide again from it, at once.
            self._conflicts += 1
            if self._conflicts <= MAX_CONFLICTS:
                log.info("conflict writing; deciding again from what is there now", detail=str(exc))
                return Decision(wake=time.time())
            return await self._failed(observed, Failure(status=409, summary=exc.describe(), retryable=True))
        except NotFound as exc:
            if self.router is not None and self.router.vs is None:
                return Decision(wake=time.time())  # the VirtualService went away: the next round says so
            if "/birdwatches/" in exc.path:
                log.info("birdwatch deleted during a write; stopping", detail=str(exc))
                return Decision(stop=True)
            return await self._failed(observed, Failure(status=404, summary=exc.describe(), retryable=False))
        except KubeError as exc:
            return await self._failed(
                observed, Failure(status=exc.status, summary=exc.describe(), retryable=exc.retryable)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a canary task never crash-loops: the user hears of it instead
            log.exception("unexpected error in canary task", detail=repr(exc))
            summary = f"internal error in birdwatch: {type(exc).__name__}: {exc}"
            return await self._failed(
                observed, Failure(status=0, summary=summary, retryable=False, reason="InternalError")
            )
        self._conflicts = 0
        self._failure = None
        self._said.clear()
        return decision

    async def _failed(self, observed: Observed | None, failure: Failure) -> Decision:
        """Report a failed call through the rules (status, Event, log), best effort, and say when to retry."""
        attempts = self._failure.attempts + 1 if self._failure is not None else 1
        self._failure = failure = replace(failure, attempts=attempts)
        log.warning("kubernetes API call failed", detail=failure.summary, attempt=attempts, status=failure.status)
        if observed is None:
            observed = self._observed(Traffic())
        decision = decide(replace(observed, failure=failure, reading=None, readiness=None))
        if decision.status is not None:
            try:
                await self._writer.write(decision.status)
                self.status = decision.status
            except KubeError as exc:
                log.warning("could not report the failure in status", detail=exc.describe())
        for say in decision.say:
            self._tell(say)
        return Decision(wake=decision.wake if decision.wake is not None else time.time() + 1.0)

    # --- observing -------------------------------------------------------------------------------------------

    async def _observe(self) -> Observed:
        traffic = Traffic()
        if self.router is not None:
            await self.router.fetch()
            traffic = self.router.observe()
            if traffic.problem is not None:
                self.router.forget()  # read both again next round: what is missing may have appeared
        return self._observed(traffic, await self._unknown_owner(traffic.record))

    def _observed(self, traffic: Traffic, fetched_owner: Obj | None = None) -> Observed:
        return Observed(
            now=time.time(),
            name=self.name,
            uid=self.uid,
            generation=self.generation,
            spec=self.spec,
            spec_error=self._spec_error,
            status=self.status,
            traffic=traffic,
            metric_digest=self._digest,
            spec_digest=self._spec_digest,
            request=self._request(),
            samples=tuple(self._samples),
            other_owner=self._other_owner(traffic.record, fetched_owner),
            query_checked=self._query_checked,
            stopping=self._stop.is_set(),
            poll=self._ports.ready_poll,
            landed=self._landed[1]
            if self._landed is not None and traffic.record is not None and traffic.record.step_time == self._landed[0]
            else None,
        )

    def _announce(self, record: Record | None) -> None:
        """Say once, at the start, that this task picks up a rollout already under way (a restart, a failover)."""
        if record is not None and record.uid == self.uid and not record.done and record.generation == self.generation:
            log.info("resuming rollout", weight=record.weight, baseline=record.baseline, step_time=record.step_time)

    def _request(self) -> Request | None:
        """A person's request that this BirdWatch's status has not acknowledged yet."""
        value = self._updates.request
        acknowledged = self.status.request.id if self.status.request is not None else None
        return Request.parse(value) if value and value != acknowledged else None

    async def _unknown_owner(self, record: Record | None) -> Obj | None:
        """Another BirdWatch's unfinished rollout holds the VirtualService and this birdwatch does not know that
        BirdWatch: with a label selector it may be another shard's, whose record is not stale. Asked of the API
        server while such a record is there: another shard's rollout ends this one ``AlreadyManaged`` at once, and
        an owner found gone is not asked about again (a uid never comes back), however many rounds this rollout
        waits before its first step takes the VirtualService over."""
        if record is None or record.uid == self.uid or record.done or record.uid == self._gone_owner:
            return None
        if self._ports.owners(self.namespace, record.birdwatch) is not None:
            return None
        try:
            owner = await self._ports.kube.get(BIRDWATCHES, self.namespace, record.birdwatch)
        except NotFound:
            self._gone_owner = record.uid
            return None
        if owner["metadata"].get("uid") != record.uid:
            self._gone_owner = record.uid  # the name was taken again by a new BirdWatch
        return owner

    def _other_owner(self, record: Record | None, fetched: Obj | None = None) -> str | None:
        """The BirdWatch whose rollout holds the VirtualService, if it is another one and its rollout goes on."""
        if record is None or record.uid == self.uid or record.done:
            return None
        owner = self._ports.owners(self.namespace, record.birdwatch) or fetched
        if owner is None or owner["metadata"].get("uid") != record.uid:
            return None  # the owner is gone: its record is stale
        owner_status = Status.parse(owner)
        generation = int(owner["metadata"].get("generation", 0))
        if (
            owner_status is not None
            and owner_status.phase in TERMINAL
            and owner_status.observed_generation == generation
        ):
            return None  # its rollout ended; the VirtualService is free
        return record.birdwatch

    async def _gather(self, observed: Observed, need: Need) -> Observed:
        if need is Need.READINESS:
            assert self.router is not None
            readiness = await canary_available(
                self._ports.kube, namespace=self.namespace, labels=self.router.canary_labels()
            )
            return replace(observed, readiness=readiness)
        spec = self.spec
        assert spec is not None
        if spec.baseline is not Baseline.PRODUCTION:
            return replace(observed, reading=await self._read(spec.canary_query()))
        # Both at the same moment: production's value now is what the canary is judged against.
        production_query = spec.production_query(observed.traffic.production_version)
        canary, production = await asyncio.gather(self._read(spec.canary_query()), self._read(production_query))
        return replace(observed, reading=canary, production=production)

    async def _read(self, expression: str) -> Reading:
        assert self.spec is not None
        spec = self.spec
        provider = self._ports.providers.get(spec.provider)
        if provider is None:
            # Only the controller's configuration can add one: nothing to wait for.
            known = ", ".join(self._ports.providers.names())
            return Reading(error=f"unknown provider {spec.provider!r}; known: {known}", rejected=True)
        try:
            raw = await provider.query(expression, budget=float(max(spec.interval, 2)))
        except BadQuery as exc:
            return Reading(error=f"{provider.kind} rejected the metric query: {exc}", rejected=True)
        except QueryError as exc:
            if not exc.retryable:
                return Reading(error=f"the metric query cannot be judged: {exc}", rejected=True)
            log.warning("metric query failed", detail=str(exc), provider=provider.name)
            return Reading(error=str(exc))
        self._query_checked = True
        if raw is not None and expression == spec.canary_query():
            self._ports.metrics.metric_value.labels(self.namespace, self.name).set(raw)
        return Reading(value=raw)

    # --- acting ----------------------------------------------------------------------------------------------

    async def _carry_out(self, decision: Decision, observed: Observed) -> float:
        """The writes in order: the DestinationRule, the traffic (with its record), the status; then tell.
        Returns how long after the decision a step's traffic write was answered (0.0 without a step)."""
        lag = 0.0
        metrics = self._ports.metrics
        if decision.sample and observed.reading is not None and observed.production is not None:
            self._samples.append((observed.reading.value, observed.production.value))
        elif observed.reading is not None and self._samples:
            self._samples.clear()  # judged: the next check samples its own interval
        if decision.destination_rule is not None:
            assert self.router is not None
            subsets = observed.traffic.subsets
            assert subsets is not None
            if decision.destination_rule is DestinationRuleChange.PREPARE:
                await self.router.prepare_destination_rule(subsets)
                log.info("destination rule subset points at the canary", subset=subsets.canary)
            else:
                await self.router.promote_destination_rule(subsets)
        if decision.traffic is not None:
            assert self.router is not None
            write = decision.traffic
            await self.router.write(write.weight, write.record, write.subsets)
            self._observe_lateness(observed, write.record)
            if write.record.step_time and not write.record.done:
                landed = time.time()
                self._landed = (write.record.step_time, landed)
                lag = max(0.0, landed - observed.now)
            self.weight = write.weight
            structlog.contextvars.bind_contextvars(weight=write.weight)
            metrics.canary_weight.labels(self.namespace, self.name).set(write.weight)
            before = observed.traffic.record
            if write.record.step_time and not write.record.done and write.weight > (before.weight if before else 0):
                log.info("traffic shifted")  # one line per step, for people following the log
        if decision.status is not None:
            await self._writer.write(decision.status)
            self.status = decision.status
            metrics.phase(self.namespace, self.name, decision.status.phase)
            if decision.status.baseline is not None:
                metrics.baseline_value.labels(self.namespace, self.name).set(decision.status.baseline)
                structlog.contextvars.bind_contextvars(baseline=decision.status.baseline)
        for note in decision.notes:
            log.info(note)
        for say in decision.say:
            self._tell(say)
        if decision.ended is not None:
            metrics.rollouts.labels(decision.ended.value).inc()
            weight = decision.status.canary_weight if decision.status else self.weight
            if decision.ended is Phase.FAILED and decision.status is not None:
                log.error("rollout failed", reason=decision.status.reason, detail=decision.status.message)
            log.info("rollout ended", phase=decision.ended.value, weight=weight)
        return lag

    def _tell(self, say: Say) -> None:
        kind, reason, message, moment = say.type, say.reason, say.message, say.moment
        if kind == "Warning":
            if (reason, message) in self._said:
                return  # one Event per distinct message, not one per retry
            self._said.add((reason, message))
        if say.event:
            self._ports.events.record(self._ref, type=kind, reason=reason, message=message)
        (log.warning if kind == "Warning" else log.info)("rollout moment", reason=reason, detail=message)
        if moment is not None:
            spec = self.spec
            weight = self.status.canary_weight if self.status.phase in TERMINAL else self.weight
            self._ports.notifier.notify(
                Notice(
                    moment=moment,
                    namespace=self.namespace,
                    name=self.name,
                    service=spec.service if spec else "",
                    canary_version=spec.canary_version if spec else "",
                    weight=weight,
                    message=message,
                    # A step says no value of its own: the check that allowed it is in the status just written.
                    value=say.value if say.value is not None else self.status.last_value,
                    baseline=self.status.baseline,
                    uid=self.uid,
                    generation=self.generation,
                    next_step=next_step(moment, spec, weight=weight, failed_checks=self.status.failed_checks),
                    targets=spec.notify if spec else None,
                    production_value=self.status.production_value,
                )
            )

    def _observe_lateness(self, observed: Observed, after: Record) -> None:
        """Seconds a step came later than its interval asked: from the previous step's traffic move (its write's
        answer, or after a restart its record's time) to this step's decision, less the interval."""
        before = observed.traffic.record
        if self.spec is None or before is None or not after.step_time or after.step_time == before.step_time:
            return
        previous, now = parse_time(before.step_time), parse_time(after.step_time)
        if previous is not None and observed.landed is not None:
            previous = max(previous, observed.landed)
        if previous is not None and now is not None and after.weight > before.weight:
            self._ports.metrics.step_lateness.observe(max(0.0, now - previous - self.spec.interval))

    async def _sleep_until(self, wake: float) -> bool:
        """Until ``wake``, or until a person's request arrives; False when a stop was asked for first."""
        if self._stop.is_set():
            return False
        seconds = wake - time.time()
        if seconds <= 0 or self._updates.changed.is_set():
            self._updates.changed.clear()
            return True
        # The registry sets ``changed`` for a request and when it asks the task to stop: one event to wait on.
        # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own, once a step.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._updates.changed.wait()
        self._updates.changed.clear()
        return not self._stop.is_set()
