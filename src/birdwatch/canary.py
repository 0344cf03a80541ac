"""One canary release, start to end: the coroutine a BirdWatch gets while it is being carried out.

Pending (check the objects) -> Waiting (for the canary Deployment) -> Progressing (baseline, then a step every
``interval``: raise the weight, wait, query, judge) -> Promoted, RolledBack, Frozen or Failed.

What the traffic looks like is written together with a record of the step (see ``router``), and the status after
it; a task that starts and finds its own record resumes from it: same weight, same baseline, only the rest of the
interval to wait. A stop request is honoured only while waiting, never between a traffic write and its status.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol, TypeVar

import structlog

from .events import EventRecorder, ObjectRef
from .judge import Judgement, Verdict, at_top, judge, next_weight, read_value
from .kube import Kube, KubeError, Obj
from .metrics import Metrics
from .notify import Moment, Notice, Notifier
from .prometheus import BadQuery, QueryError
from .router import AlreadyManaged, Record, RouteError, Router
from .spec import TERMINAL, BirdWatchSpec, InvalidSpec, NoData, Phase, Unhealthy
from .status import Status, StatusWriter, now_rfc3339, parse_time
from .workload import canary_available

log = structlog.get_logger(__name__)
T = TypeVar("T")

READY_POLL = 2.0  # seconds between looks at the canary Deployment while Waiting
KUBE_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


class MetricSource(Protocol):
    async def query(self, promql: str, *, budget: float = 0.0) -> float | None: ...


class OwnerLookup(Protocol):
    def __call__(self, namespace: str, name: str) -> Obj | None: ...


@dataclass(frozen=True, kw_only=True)
class Ports:
    """Everything a canary talks to. The controller builds one and shares it between all canaries."""

    kube: Kube
    metrics_source: MetricSource
    events: EventRecorder
    notifier: Notifier
    metrics: Metrics
    owners: OwnerLookup
    ready_poll: float = READY_POLL


class Stopped(Exception):
    """A stop was requested while the task was waiting."""


class Ended(Exception):
    """The rollout reached a terminal phase; raised from deep inside to unwind to ``run``."""

    def __init__(self, phase: Phase) -> None:
        super().__init__(phase.value)
        self.phase = phase


def metric_digest(metric: str) -> str:
    return hashlib.sha256(metric.encode()).hexdigest()[:16]


class Canary:
    def __init__(self, obj: Obj, ports: Ports, *, stop: asyncio.Event) -> None:
        meta = obj["metadata"]
        self.obj = obj
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid", "")
        self.generation: int = int(meta.get("generation", 1))
        self._ports = ports
        self._stop = stop
        self._ref = ObjectRef.of(obj)
        self._writer = StatusWriter(ports.kube, namespace=self.namespace, name=self.name, current=obj)
        self.status = Status(phase=Phase.PENDING, observed_generation=self.generation)
        self.spec: BirdWatchSpec | None = None
        self.router: Router | None = None
        self.baseline: float | None = None
        self.weight = 0
        self._step_started = 0.0  # monotonic time of the last traffic step (or check)
        self._wrote = False  # this task has written the VirtualService (and so claimed it)

    # --- the outside ------------------------------------------------------------------------------------------

    async def run(self) -> Phase | None:
        """Carry the rollout out; returns its terminal phase, or None when stopped before one."""
        structlog.contextvars.bind_contextvars(namespace=self.namespace, birdwatch=self.name)
        try:
            await self._run()
        except Ended as end:
            return end.phase
        except Stopped:
            log.info("canary task stopped", weight=self.weight)
            return None
        return None

    # --- the rollout ------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            spec = BirdWatchSpec.from_dict(self.obj.get("spec"))
        except InvalidSpec as exc:
            await self._fail("InvalidSpec", str(exc))
        self.spec = spec
        structlog.contextvars.bind_contextvars(version=spec.canary_version, service=spec.service)
        previous = Status.parse(self.obj)
        resumed_status = previous is not None and previous.observed_generation == self.generation
        if resumed_status and previous is not None:
            self.status = previous
        else:
            await self._set(
                Status(
                    phase=Phase.PENDING,
                    observed_generation=self.generation,
                    message=f"checking VirtualService and DestinationRule {spec.service}",
                )
            )

        self.router = Router(
            self._ports.kube, namespace=self.namespace, service=spec.service, canary_version=spec.canary_version
        )
        try:
            await self._kube(self.router.inspect)
        except RouteError as exc:
            await self._fail("RouteInvalid", str(exc))
        record = self.router.record
        await self._check_owner(record)
        try:
            resume = await self._resume_point(record, spec)

            if await self._kube(self.router.prepare_destination_rule):
                log.info("destination rule subset points at the canary", subset=self.router.subsets)
            if resume is None and not self._wrote:
                # Claim the VirtualService: the record names us, and the canary destinations exist at our weight.
                await self._write_traffic(self.weight)
        except RouteError as exc:
            await self._fail("AlreadyManaged" if isinstance(exc, AlreadyManaged) else "RouteInvalid", str(exc))

        if self.baseline is None:
            # Before the baseline nothing was judged yet, so the canary must (still) be ready first.
            await self._wait_until_ready(spec)
            await self._take_baseline(spec)
        try:
            await self._progress(spec, resume)
        except RouteError as exc:
            await self._fail("AlreadyManaged" if isinstance(exc, AlreadyManaged) else "RouteInvalid", str(exc))

    async def _check_owner(self, record: Record | None) -> None:
        """Fail when another BirdWatch's rollout is under way on the same VirtualService."""
        assert self.spec is not None
        assert self.router is not None
        if record is None or record.uid == self.uid or record.done:
            return
        owner = self._ports.owners(self.namespace, record.birdwatch)
        if owner is None or owner["metadata"].get("uid") != record.uid:
            self.router.accept_claim_of(record.uid)  # the owner is gone: its claim is stale
            return
        owner_status = Status.parse(owner)
        owner_generation = int(owner["metadata"].get("generation", 0))
        if (
            owner_status is not None
            and owner_status.phase in TERMINAL
            and owner_status.observed_generation == owner_generation
        ):
            self.router.accept_claim_of(record.uid)  # the owner's rollout ended; the VirtualService is free
            return
        await self._fail(
            "AlreadyManaged", f"VirtualService {self.spec.service} is already managed by BirdWatch {record.birdwatch}"
        )

    async def _resume_point(self, record: Record | None, spec: BirdWatchSpec) -> float | None:
        """Where to pick up. Returns the wall-clock time of the last step when resuming mid-rollout."""
        assert self.router is not None
        if record is not None and record.uid == self.uid and record.generation == self.generation and record.done:
            await self._ended_before(record)
        if record is None or record.uid != self.uid or record.done:
            self.weight = 0  # a fresh rollout always starts with no canary traffic
            return None
        if record.generation == self.generation:
            self.weight = record.weight
            self.baseline = record.baseline
            structlog.contextvars.bind_contextvars(weight=self.weight, baseline=self.baseline)
            log.info("resuming rollout", step_time=record.step_time)
            return parse_time(record.step_time) or time.time()
        # The spec changed mid-rollout.
        if record.canary != spec.canary_version:
            self.weight = 0
            await self._write_traffic(0)
            self._event(
                "Warning",
                "TrafficReset",
                f"canary_version changed from {record.canary} to {spec.canary_version}: "
                "all traffic back to production before starting over",
            )
            log.warning("canary version changed mid-rollout; traffic back to production", old=record.canary)
            return None
        self.weight = min(record.weight, spec.max_weight)
        self.baseline = record.baseline if record.metric == metric_digest(spec.metric) else None
        await self._write_traffic(self.weight, step_time=record.step_time)
        self._event("Normal", "RolloutRestarted", f"spec changed: going on from {self.weight}% under the new spec")
        log.info("spec changed mid-rollout; going on from the current weight", weight=self.weight)
        return parse_time(record.step_time) if self.weight else None

    async def _ended_before(self, record: Record) -> None:
        """This generation's rollout ended (its last traffic write says so) but its status was not written: the
        process stopped between the two writes. Write the ending it reached; the traffic is already right, and
        starting over would release the canary again (after a rollback, against a baseline taken from the bad
        canary). Returns only for a record written before ``phase`` was kept: that one starts over, as before."""
        endings = {
            Phase.PROMOTED.value: (Phase.PROMOTED, "Promoted", Moment.PROMOTED, "Normal", 100),
            Phase.ROLLED_BACK.value: (Phase.ROLLED_BACK, "RolledBack", Moment.ROLLED_BACK, "Warning", 0),
        }
        if record.phase not in endings:
            return
        phase, reason, moment, kind, weight = endings[record.phase]
        self.weight, self.baseline = weight, record.baseline
        log.warning("rollout had ended when birdwatch stopped; writing its status", phase=phase.value)
        await self._end(
            phase,
            f"{phase.value}: the rollout had ended when birdwatch stopped, before its status was written",
            value=None,
            reason=reason,
            moment=moment,
            kind=kind,
            weight=weight,
        )

    async def _wait_until_ready(self, spec: BirdWatchSpec) -> None:
        assert self.router is not None
        labels = self.router.canary_labels()
        started = time.monotonic()
        announced = False
        while True:
            ok, why = await self._kube(
                lambda: canary_available(self._ports.kube, namespace=self.namespace, labels=labels)
            )
            if ok:
                log.info("canary deployment available", detail=why)
                return
            if not announced or self.status.message != why:
                await self._set(self.status.but(phase=Phase.WAITING, message=f"waiting for the canary: {why}"))
                announced = True
            if time.monotonic() - started >= spec.ready_timeout:
                await self._unhealthy(
                    spec,
                    f"the canary was not available after ready_timeout {spec.ready_timeout}s: {why}",
                    reason="ReadyTimeout",
                )
            await self._sleep(min(self._ports.ready_poll, max(0.0, started + spec.ready_timeout - time.monotonic())))

    async def _take_baseline(self, spec: BirdWatchSpec) -> None:
        failures = 0
        while True:
            try:
                raw = await self._ports.metrics_source.query(spec.metric, budget=float(spec.interval))
            except BadQuery as exc:
                await self._fail("BadQuery", f"Prometheus rejected the metric query: {exc}")
            except QueryError as exc:
                if not exc.retryable:
                    await self._fail("BadQuery", f"the metric query cannot be judged: {exc}")
                failures += 1
                why = f"could not read the baseline ({failures}/{spec.failure_threshold}): {exc}"
            else:
                value = read_value(raw, spec.no_data)
                if value is not None:
                    self.baseline = value
                    await self._set(
                        self.status.but(
                            phase=Phase.PROGRESSING,
                            baseline=value,
                            last_value=value,
                            canary_weight=self.weight,
                            message=f"baseline {value:g} taken",
                            failed_checks=0,
                            skipped_checks=0,
                        )
                    )
                    self._event(
                        "Normal",
                        "RolloutStarted",
                        f"baseline {value:g}; stepping {spec.increment}% every {spec.interval}s "
                        f"up to {spec.max_weight}%",
                    )
                    self._notify(Moment.STARTED, f"baseline {value:g}; {spec.increment}% every {spec.interval}s")
                    self._ports.metrics.baseline_value.labels(self.namespace, self.name).set(value)
                    structlog.contextvars.bind_contextvars(baseline=value)
                    log.info("baseline taken")
                    return
                if spec.no_data is NoData.FAIL:
                    await self._fail("NoData", "the metric returned no data for the baseline (no_data: fail)")
                failures += 1
                why = f"the metric returned no data for the baseline ({failures}/{spec.failure_threshold})"
            # Skipped (no data) baselines get failure_threshold retries; unreadable ones fail at the threshold.
            limit = spec.failure_threshold + (1 if spec.no_data is NoData.SKIP and "no data" in why else 0)
            if failures >= limit:
                await self._fail("NoBaseline", why)
            await self._set(self.status.but(message=why))
            log.warning("baseline not taken yet", reason=why)
            await self._sleep(float(spec.interval))

    async def _progress(self, spec: BirdWatchSpec, resume: float | None) -> None:
        assert self.baseline is not None
        failed = self.status.failed_checks if resume is not None else 0
        skipped = self.status.skipped_checks if resume is not None else 0
        step = resume is None or self.weight == 0
        if not step:
            # Resuming: the step at self.weight was applied at `resume`; wait only the rest of its interval.
            elapsed = max(0.0, time.time() - (resume or time.time()))
            self._step_started = time.monotonic() - min(elapsed, float(spec.interval))
        while True:
            if step:
                await self._step(spec)
                failed = skipped = 0
            await self._sleep(max(0.0, self._step_started + spec.interval - time.monotonic()))
            judgement, error = await self._check(spec)
            verdict = judgement.verdict if judgement else Verdict.UNHEALTHY
            value = judgement.value if judgement else None
            reason = judgement.reason if judgement else f"the metric could not be read: {error}"
            if value is not None:
                self._ports.metrics.metric_value.labels(self.namespace, self.name).set(value)
                structlog.contextvars.bind_contextvars(value=value)
            if verdict is Verdict.HEALTHY:
                if at_top(self.weight, spec):
                    await self._promote(spec, value, reason)
                self.status = self.status.but(last_value=value, failed_checks=0, skipped_checks=0)
                step = True
                continue
            if verdict is Verdict.SKIPPED:
                skipped += 1
                self.status = self.status.but(last_value=value, skipped_checks=skipped)
                if skipped > spec.failure_threshold:
                    await self._unhealthy(spec, f"no data for {skipped} checks in a row", value=value)
                message = f"{reason}; holding at {self.weight}% ({skipped}/{spec.failure_threshold} skipped)"
            else:
                failed += 1
                self.status = self.status.but(last_value=value, failed_checks=failed)
                if failed >= spec.failure_threshold:
                    await self._unhealthy(spec, reason, value=value)
                message = f"{reason}; holding at {self.weight}% ({failed}/{spec.failure_threshold} failed checks)"
                self._event("Warning", "CheckFailed", message)
            log.warning(
                "check did not pass", verdict=verdict.value, reason=reason, failed_checks=failed, skipped_checks=skipped
            )
            await self._set(
                self.status.but(last_value=value, failed_checks=failed, skipped_checks=skipped, message=message)
            )
            self._step_started = time.monotonic()
            step = False

    async def _step(self, spec: BirdWatchSpec) -> None:
        weight = next_weight(self.weight, spec)
        now_mono = time.monotonic()
        if self._step_started:
            self._ports.metrics.step_lateness.observe(max(0.0, now_mono - self._step_started - spec.interval))
        stamp = now_rfc3339(micro=True)
        await self._write_traffic(weight, step_time=stamp)
        self._step_started = now_mono
        self.weight = weight
        structlog.contextvars.bind_contextvars(weight=weight)
        # No stop request is honoured here: the status must follow the traffic it describes.
        await self._set(
            self.status.but(
                phase=Phase.PROGRESSING,
                canary_weight=weight,
                last_step_time=stamp,
                failed_checks=0,
                skipped_checks=0,
                message=f"canary at {weight}%",
            ),
            interruptible=False,
        )
        self._event("Normal", "TrafficShifted", f"canary weight {weight}% (production {100 - weight}%)")
        log.info("traffic shifted")

    async def _check(self, spec: BirdWatchSpec) -> tuple[Judgement | None, str]:
        assert self.baseline is not None
        try:
            raw = await self._ports.metrics_source.query(spec.metric, budget=float(max(spec.interval, 2)))
        except QueryError as exc:
            log.warning("metric query failed", error=str(exc))
            return None, str(exc)
        return judge(raw, baseline=self.baseline, spec=spec), ""

    # --- endings ----------------------------------------------------------------------------------------------

    async def _promote(self, spec: BirdWatchSpec, value: float | None, reason: str) -> NoReturn:
        assert self.router is not None
        assert self.router.subsets is not None
        if self.router.subsets.named:
            await self._kube(self.router.promote_destination_rule)
            await self._write_traffic(0, done=Phase.PROMOTED)
        else:
            await self._write_traffic(100, done=Phase.PROMOTED)
        self.weight = 100
        message = f"canary {spec.canary_version} promoted to production ({reason})"
        await self._end(
            Phase.PROMOTED, message, value=value, reason="Promoted", moment=Moment.PROMOTED, kind="Normal", weight=100
        )

    async def _unhealthy(
        self, spec: BirdWatchSpec, why: str, *, value: float | None = None, reason: str = "CanaryUnhealthy"
    ) -> NoReturn:
        self._event("Warning", reason, why)
        self._notify(Moment.UNHEALTHY, why, value=value)
        log.warning("canary unhealthy", reason=why)
        if spec.if_unhealthy is Unhealthy.ROLLBACK:
            await self._write_traffic(0, done=Phase.ROLLED_BACK)
            self.weight = 0
            await self._end(
                Phase.ROLLED_BACK,
                f"rolled back: {why}",
                value=value,
                reason="RolledBack",
                moment=Moment.ROLLED_BACK,
                kind="Warning",
                weight=0,
            )
        await self._end(
            Phase.FROZEN,
            f"frozen at {self.weight}%: {why}",
            value=value,
            reason="Frozen",
            moment=Moment.FROZEN,
            kind="Warning",
            weight=self.weight,
        )

    async def _fail(self, reason: str, message: str) -> NoReturn:
        log.error("rollout failed", reason=reason, error=message)
        await self._end(
            Phase.FAILED, message, value=None, reason=reason, moment=Moment.FAILED, kind="Warning", weight=self.weight
        )

    async def _end(
        self, phase: Phase, message: str, *, value: float | None, reason: str, moment: Moment, kind: str, weight: int
    ) -> NoReturn:
        await self._set(
            self.status.but(
                phase=phase,
                canary_weight=weight,
                message=message,
                last_value=value if value is not None else self.status.last_value,
            ),
            interruptible=False,
        )
        self._ports.metrics.canary_weight.labels(self.namespace, self.name).set(weight)
        self._event(kind, reason, message)
        self._notify(moment, message, value=value)
        self._ports.metrics.rollouts.labels(phase.value).inc()
        log.info("rollout ended", phase=phase.value, message=message)
        raise Ended(phase)

    # --- ports ------------------------------------------------------------------------------------------------

    async def _write_traffic(self, weight: int, *, step_time: str | None = None, done: Phase | None = None) -> None:
        assert self.router is not None
        assert self.spec is not None
        record = Record(
            birdwatch=self.name,
            uid=self.uid,
            generation=self.generation,
            canary=self.spec.canary_version,
            weight=weight,
            baseline=self.baseline,
            step_time=step_time,
            done=done is not None,
            metric=metric_digest(self.spec.metric),
            phase=done.value if done is not None else None,
        )
        router = self.router
        await self._kube(lambda: router.write(weight, record))
        self._wrote = True
        self._ports.metrics.canary_weight.labels(self.namespace, self.name).set(weight)

    async def _set(self, status: Status, *, interruptible: bool = True) -> None:
        self.status = status
        self._ports.metrics.phase(self.namespace, self.name, status.phase)
        await self._kube(lambda: self._writer.write(status), interruptible=interruptible)

    def _event(self, kind: str, reason: str, message: str) -> None:
        self._ports.events.record(self._ref, type=kind, reason=reason, message=message)

    def _notify(self, moment: Moment, message: str, *, value: float | None = None) -> None:
        spec = self.spec
        self._ports.notifier.notify(
            Notice(
                moment=moment,
                namespace=self.namespace,
                name=self.name,
                service=spec.service if spec else "",
                canary_version=spec.canary_version if spec else "",
                weight=self.weight,
                message=message,
                value=value,
                baseline=self.baseline,
            )
        )

    async def _kube(self, call: Callable[[], Awaitable[T]], *, interruptible: bool = True) -> T:
        """Retry what the API server may answer better next time (timeouts, 429, 5xx), with backoff."""
        attempt = 0
        while True:
            try:
                return await call()
            except KubeError as exc:
                if not exc.retryable:
                    raise
                delay = KUBE_BACKOFF[min(attempt, len(KUBE_BACKOFF) - 1)]
                attempt += 1
                log.warning("kubernetes API call failed; retrying", error=str(exc), attempt=attempt, delay=delay)
                if interruptible:
                    await self._sleep(delay)
                else:
                    await asyncio.sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        if self._stop.is_set():
            raise Stopped
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return
        raise Stopped
