"""Leader election on a ``coordination.k8s.io/v1`` Lease, so that of several birdwatch replicas only one acts.

Every replica tries to write itself into the Lease as ``holderIdentity``; the leader renews it every
``retry_period`` and the others take it over once it has gone stale. The rules, which follow client-go's:

* Writes are PUTs carrying the ``resourceVersion`` that was read, so when two replicas race for the same Lease the
  API server lets exactly one through and the other gets 409 Conflict (it lost the round).
* Whether a foreign Lease has expired is judged by this replica's own monotonic clock, never by comparing
  ``renewTime`` (the holder's wall clock) with ours: the record (holder, renewTime, leaseTransitions) must have
  stayed unchanged for the holder's ``leaseDurationSeconds`` since we first saw it. Clock skew between nodes can
  then neither make us steal a live lease nor wait forever for a dead one.
* The leader steps down when it could not renew for ``renew_deadline`` (shorter than the lease duration, so it
  stops before anyone may take over), when its ``healthy()`` probe fails, or when its work ends.
* Stepping down (or stopping) cancels the work first, and only then releases the Lease: ``holderIdentity`` is
  removed and ``leaseDurationSeconds`` set to 1, as client-go's ReleaseOnCancel does. An empty holder is free at
  once for client-go and for us, and an elector that ignored the empty holder still waits one second only.
* Each shard (``--label-selector``) elects on a Lease of its own. The holder writes its selector on the Lease (the
  annotation ``birdwatch.otomato.link/label-selector``); a replica that finds the Lease held for another selector
  says so loudly, since two shards on one Lease would take turns instead of working side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from .config import LeaderSettings
from .kube import LEASES, Conflict, Kube, KubeError, NotFound, Obj
from .metrics import Metrics

log = structlog.get_logger(__name__)

RELEASED_LEASE_SECONDS = 1  # the API server refuses 0; with no holder the value hardly matters anyway
SELECTOR_ANNOTATION = "birdwatch.otomato.link/label-selector"  # the shard the holder works for ("" for all)
_SPEC_FIELDS = ("holderIdentity", "leaseDurationSeconds", "acquireTime", "renewTime", "leaseTransitions")


def micro_time(moment: datetime | None = None) -> str:
    """A Kubernetes MicroTime: RFC 3339 in UTC with microseconds, e.g. ``2026-11-26T14:00:00.000000Z``."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, kw_only=True)
class LeaseRecord:
    """The election's part of a Lease's spec."""

    holder: str = ""
    duration: int = 0  # leaseDurationSeconds; 0 when absent
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def of(cls, lease: Obj) -> LeaseRecord:
        spec: dict[str, Any] = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=_int(spec.get("leaseDurationSeconds")),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=_int(spec.get("leaseTransitions")),
        )

    @property
    def version(self) -> tuple[str, str | None, int]:
        """What changes whenever a live holder renews, or someone else takes over."""
        return (self.holder, self.renew_time, self.transitions)

    def spec(self, base: Obj | None = None) -> Obj:
        """``base`` (fields other electors may have set, such as ``strategy``) with the election fields replaced;
        fields this record leaves empty are left out, which is how a release clears the holder."""
        spec = {k: v for k, v in (base or {}).items() if k not in _SPEC_FIELDS}
        if self.holder:
            spec["holderIdentity"] = self.holder
        if self.duration > 0:
            spec["leaseDurationSeconds"] = self.duration
        if self.acquire_time:
            spec["acquireTime"] = self.acquire_time
        if self.renew_time:
            spec["renewTime"] = self.renew_time
        spec["leaseTransitions"] = self.transitions
        return spec


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, kw_only=True)
class _Observation:
    """The Lease record as last seen, and when (monotonic) it was first seen in that version."""

    record: LeaseRecord
    since: float


class _Outcome(enum.Enum):
    ACQUIRED = "acquired"  # we hold the Lease now (newly, or renewed)
    HELD = "held"  # someone else holds it and it has not expired
    LOST_RACE = "lost race"  # another write came first (409)
    FAILED = "failed"  # the API server could not be asked; try again next period


@dataclass(frozen=True, kw_only=True)
class _Attempt:
    outcome: _Outcome
    written_at: float = 0.0  # monotonic time just before our successful write


class LeaderElector:
    """Runs ``work`` only while this replica holds the Lease named by ``settings``.

    ``identity`` must be unique among the replicas (the pod name). ``healthy`` is asked before every renewal
    while leading; a leader whose probe says False steps down so that a healthy standby takes over.
    """

    def __init__(
        self,
        kube: Kube,
        settings: LeaderSettings,
        *,
        identity: str,
        metrics: Metrics | None = None,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        if not identity:
            raise ValueError("leader election needs a non-empty identity")
        if not (settings.retry_period > 0 and 0 < settings.renew_deadline < settings.lease_duration):
            raise ValueError("leader election needs 0 < retry_period and 0 < renew_deadline < lease_duration")
        self._kube = kube
        self.settings = settings
        self.identity = identity
        self._metrics = metrics
        self._healthy = healthy
        # Written into the Lease as a whole number of seconds; rounding up keeps our renew_deadline inside it.
        self._lease_seconds = max(1, math.ceil(settings.lease_duration))
        self._observed: _Observation | None = None
        self._announced: str | None = None  # the holder "waiting for leadership" was last logged for
        self._other_shard: tuple[str, str] | None = None  # (holder, selector) last warned about
        self._leading = False
        self._log = log.bind(lease=f"{settings.namespace}/{settings.name}", identity=identity)

    @property
    def leading(self) -> bool:
        return self._leading

    async def run(
        self,
        work: Callable[[], Awaitable[None]],
        *,
        stop: asyncio.Event,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        """Acquire, run ``work`` while leading, step down and try again, until ``stop`` is set; then release."""
        self._set_metric(0)
        while not stop.is_set():
            attempt = await self._acquire(stop)
            if attempt is None:
                return
            if stop.is_set():
                # Won the Lease just as we were told to stop: hand it straight back.
                await self._release()
                return
            await self._lead(work, stop=stop, on_change=on_change, renewed_at=attempt.written_at)
            if not stop.is_set():
                # We released the Lease a moment ago; a standby polling every retry_period must get the first
                # go at it, or an unhealthy leader would win it straight back.
                await _sleep(stop, 2 * self.settings.retry_period)

    # --- the two phases ---------------------------------------------------------------------------------------

    async def _acquire(self, stop: asyncio.Event) -> _Attempt | None:
        """Try every retry_period until we hold the Lease (the attempt) or ``stop`` is set (None)."""
        while not stop.is_set():
            attempt = await self._attempt()
            if attempt.outcome is _Outcome.ACQUIRED:
                return attempt
            await _sleep(stop, self.settings.retry_period)
        return None

    async def _lead(
        self,
        work: Callable[[], Awaitable[None]],
        *,
        stop: asyncio.Event,
        on_change: Callable[[bool], None] | None,
        renewed_at: float,
    ) -> None:
        settings = self.settings
        self._leading = True
        self._announced = None
        self._set_metric(1)
        _notify(on_change, True)
        self._log.info("became leader", transitions=self._observed.record.transitions if self._observed else 0)
        task = asyncio.create_task(_run(work), name="leader work")  # held until awaited in the finally
        stopped = asyncio.create_task(stop.wait(), name="leader stop")
        reason, holding = "cancelled", True
        try:
            next_renewal = renewed_at + settings.retry_period
            while True:
                await asyncio.wait(
                    (task, stopped),
                    timeout=max(0.0, next_renewal - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stop.is_set():
                    reason = "stopping"
                    break
                if task.done():
                    reason = self._work_ended(task)
                    break
                if not self._is_healthy():
                    reason = "unhealthy: not renewing"
                    break
                now = time.monotonic()
                remaining = renewed_at + settings.renew_deadline - now
                if remaining <= 0:
                    reason = "renew deadline exceeded"
                    break
                next_renewal = now + settings.retry_period
                # Bounded by what is left of the deadline, so a hung request cannot keep us leading past it.
                attempt = await self._attempt(timeout=remaining)
                if attempt.outcome is _Outcome.ACQUIRED:
                    renewed_at = attempt.written_at
                elif attempt.outcome is _Outcome.HELD:
                    holder = self._observed.record.holder if self._observed else "?"
                    reason, holding = f"lease taken over by {holder}", False
                    break
                elif time.monotonic() - renewed_at >= settings.renew_deadline:
                    reason = "renew deadline exceeded"
                    break
        finally:
            stopped.cancel()
            (self._log.info if reason == "stopping" else self._log.warning)("lost leadership", detail=reason)
            await self._stop_work(task)
            self._leading = False
            _notify(on_change, False)
            self._set_metric(0)
            if holding:
                await self._release()

    # --- talking to the API server ----------------------------------------------------------------------------

    async def _attempt(self, *, timeout: float | None = None) -> _Attempt:
        """One round of acquire-or-renew; API trouble is logged and becomes FAILED, never an exception."""
        try:
            return await asyncio.wait_for(self._acquire_or_renew(), timeout or self.settings.renew_deadline)
        except TimeoutError:
            self._log.warning("lease request timed out; retrying", timeout=timeout or self.settings.renew_deadline)
        except KubeError as exc:
            # Not retryable (403, 422) means misconfiguration; trying again still beats a dead replica.
            (self._log.warning if exc.retryable else self._log.error)(
                "lease request failed; retrying", status=exc.status, detail=str(exc)
            )
        except Exception:
            self._log.exception("lease request failed unexpectedly; retrying")
        return _Attempt(outcome=_Outcome.FAILED)

    async def _acquire_or_renew(self) -> _Attempt:
        ns, name = self.settings.namespace, self.settings.name
        try:
            lease = await self._kube.get(LEASES, ns, name)
        except NotFound:
            mine = self._record(None)
            written_at = time.monotonic()
            body: Obj = {
                "apiVersion": LEASES.api_version,
                "kind": LEASES.kind,
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "annotations": {SELECTOR_ANNOTATION: self.settings.label_selector},
                },
                "spec": mine.spec(),
            }
            try:
                await self._kube.create(LEASES, ns, body)
            except Conflict:
                return _Attempt(outcome=_Outcome.LOST_RACE)
            self._observe(mine, written_at)
            return _Attempt(outcome=_Outcome.ACQUIRED, written_at=written_at)
        current = LeaseRecord.of(lease)
        self._observe(current, time.monotonic())
        if current.holder and current.holder != self.identity and not self._expired():
            self._announce(current.holder)
            self._check_shard(current.holder, lease)
            return _Attempt(outcome=_Outcome.HELD)
        mine = self._record(current)
        written_at = time.monotonic()
        meta = lease.get("metadata") or {}
        annotations = {**(meta.get("annotations") or {}), SELECTOR_ANNOTATION: self.settings.label_selector}
        body = {**lease, "metadata": {**meta, "annotations": annotations}, "spec": mine.spec(lease.get("spec"))}
        try:
            await self._kube.replace(LEASES, ns, name, body)
        except Conflict:
            return _Attempt(outcome=_Outcome.LOST_RACE)
        self._observe(mine, written_at)
        return _Attempt(outcome=_Outcome.ACQUIRED, written_at=written_at)

    def _record(self, current: LeaseRecord | None) -> LeaseRecord:
        """Our record on top of ``current`` (None: a new Lease); a renewal keeps acquireTime and the count of
        transitions, a takeover counts one more."""
        now = micro_time()
        if current is None:
            return LeaseRecord(
                holder=self.identity, duration=self._lease_seconds, acquire_time=now, renew_time=now, transitions=0
            )
        if current.holder == self.identity:
            return LeaseRecord(
                holder=self.identity,
                duration=self._lease_seconds,
                acquire_time=current.acquire_time or now,
                renew_time=now,
                transitions=current.transitions,
            )
        return LeaseRecord(
            holder=self.identity,
            duration=self._lease_seconds,
            acquire_time=now,
            renew_time=now,
            transitions=current.transitions + 1,
        )

    async def _release(self) -> None:
        """Hand the Lease back if it is still ours, so a standby need not wait for it to expire."""
        try:
            released = await asyncio.wait_for(self._try_release(), self.settings.renew_deadline)
        except (KubeError, TimeoutError) as exc:
            self._log.warning("could not release lease; it expires by itself", detail=str(exc) or type(exc).__name__)
            return
        if released:
            self._log.info("released lease")

    async def _try_release(self) -> bool:
        ns, name = self.settings.namespace, self.settings.name
        try:
            lease = await self._kube.get(LEASES, ns, name)
        except NotFound:
            return False
        current = LeaseRecord.of(lease)
        if current.holder != self.identity:
            return False
        now = micro_time()
        released = LeaseRecord(
            duration=RELEASED_LEASE_SECONDS, acquire_time=now, renew_time=now, transitions=current.transitions
        )
        try:
            await self._kube.replace(LEASES, ns, name, {**lease, "spec": released.spec(lease.get("spec"))})
        except Conflict:
            return False  # someone else wrote it since we read it: it is not ours to release any more
        self._observe(released, time.monotonic())
        return True

    # --- bookkeeping ------------------------------------------------------------------------------------------

    def _observe(self, record: LeaseRecord, at: float) -> None:
        if self._observed is None or self._observed.record.version != record.version:
            self._observed = _Observation(record=record, since=at)

    def _expired(self) -> bool:
        """Unchanged for the holder's own lease duration, by our clock, since we first saw this version."""
        if self._observed is None:
            return False
        duration = self._observed.record.duration or self.settings.lease_duration
        return time.monotonic() - self._observed.since >= duration

    def _announce(self, holder: str) -> None:
        if holder != self._announced:
            self._announced = holder
            self._log.info("waiting for leadership", holder=holder)

    def _check_shard(self, holder: str, lease: Obj) -> None:
        """Warn (once per holder and selector) when the Lease's holder works for another label selector."""
        theirs = ((lease.get("metadata") or {}).get("annotations") or {}).get(SELECTOR_ANNOTATION)
        if theirs is None or theirs == self.settings.label_selector or self._other_shard == (holder, theirs):
            return  # written by a birdwatch from before shards, or the same shard
        self._other_shard = (holder, theirs)
        self._log.error(
            "lease held by another shard; give each shard its own --leader-elect-name",
            holder=holder,
            holder_label_selector=theirs or "(all BirdWatches)",
            label_selector=self.settings.label_selector or "(all BirdWatches)",
            detail="two shards on one Lease take turns instead of working side by side; this replica waits for "
            "the Lease (expected only while a Deployment changes its --label-selector)",
        )

    def _is_healthy(self) -> bool:
        if self._healthy is None:
            return True
        try:
            return bool(self._healthy())
        except Exception:
            self._log.exception("health probe raised; counting it as unhealthy")
            return False

    def _work_ended(self, task: asyncio.Task[None]) -> str:
        if task.cancelled():
            self._log.warning("leader work was cancelled")
            return "work cancelled"
        exc = task.exception()
        if exc is not None:
            self._log.error("leader work failed", exc_info=exc)
            return f"work failed: {type(exc).__name__}: {exc}"
        self._log.warning("leader work ended")
        return "work ended"

    async def _stop_work(self, task: asyncio.Task[None]) -> None:
        if task.done():
            return  # already reported by _work_ended
        task.cancel()
        await asyncio.wait((task,))
        if not task.cancelled() and task.exception() is not None:
            self._log.error("leader work failed while stopping", exc_info=task.exception())

    def _set_metric(self, value: int) -> None:
        if self._metrics is not None:
            self._metrics.leader.set(value)


async def _run(work: Callable[[], Awaitable[None]]) -> None:
    # create_task needs a coroutine; ``work`` may return any awaitable.
    await work()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _notify(on_change: Callable[[bool], None] | None, leading: bool) -> None:
    if on_change is None:
        return
    try:
        on_change(leading)
    except Exception:
        log.exception("leadership callback raised", leading=leading)
