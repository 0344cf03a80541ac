"""birdwatch's own Prometheus metrics, in a registry of their own (no process-global state).

Per-canary series are labelled ``namespace`` and ``birdwatch`` (the BirdWatch's name), the same keys as the log
lines, so one name finds a canary in both. Callers pass the values positionally: ``.labels(namespace, name)``.

The per-canary gauges are not prometheus_client ``Gauge`` children: a child is an object with a lock and a value
holder of its own, and a canary has eleven series (its weight, value, baseline and one per phase), about 7 kB a
canary, 7 MB of RSS at 1,000 canaries. Their values live in one small record per canary instead (``_Canary``),
read by a collector when ``/metrics`` is scraped; the exposition is the same series with the same values.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .spec import Phase

CANARY_LABELS = ("namespace", "birdwatch")
_PHASES = tuple(Phase)


class _Canary:
    """What one canary's series say now; None for a series not set yet (it is not exposed until it is)."""

    __slots__ = ("baseline", "phase", "value", "weight")

    def __init__(self) -> None:
        self.weight: float | None = None
        self.value: float | None = None
        self.baseline: float | None = None
        self.phase: Phase | None = None


class _Series:
    __slots__ = ("_canaries", "_field", "_key")

    def __init__(self, canaries: dict[tuple[str, str], _Canary], key: tuple[str, str], field: str) -> None:
        self._canaries = canaries
        self._key = key
        self._field = field

    def set(self, value: float) -> None:
        canary = self._canaries.get(self._key)
        if canary is None:
            canary = self._canaries[self._key] = _Canary()
        setattr(canary, self._field, float(value))


class CanaryGauge:
    """A per-canary gauge as callers use it: ``.labels(namespace, name).set(value)``."""

    def __init__(self, canaries: dict[tuple[str, str], _Canary], field: str) -> None:
        self._canaries = canaries
        self._field = field

    def labels(self, namespace: str, name: str) -> _Series:
        return _Series(self._canaries, (namespace, name), self._field)


class _CanaryCollector(Collector):
    def __init__(self, canaries: dict[tuple[str, str], _Canary]) -> None:
        self._canaries = canaries

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        # A copy: a scrape served from another thread must not see the dict change size under it.
        canaries = tuple(self._canaries.items())
        weight, phase, value, baseline = families = _families()
        for key, c in canaries:
            if c.weight is not None:
                weight.add_metric(key, c.weight)
            if c.phase is not None:
                for p in _PHASES:
                    phase.add_metric((*key, p.value), 1.0 if p is c.phase else 0.0)
            if c.value is not None:
                value.add_metric(key, c.value)
            if c.baseline is not None:
                baseline.add_metric(key, c.baseline)
        return iter(families)


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    # In the order they were registered when they were Gauges, so /metrics reads as it did.
    return (
        GaugeMetricFamily("birdwatch_canary_weight", "Canary traffic weight in percent", labels=CANARY_LABELS),
        GaugeMetricFamily(
            "birdwatch_canary_phase",
            "1 for the phase a canary is in, 0 for the others",
            labels=(*CANARY_LABELS, "phase"),
        ),
        GaugeMetricFamily("birdwatch_metric_value", "Last value of the canary's health metric", labels=CANARY_LABELS),
        GaugeMetricFamily("birdwatch_baseline_value", "Baseline of the canary's health metric", labels=CANARY_LABELS),
    )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._canaries: dict[tuple[str, str], _Canary] = {}
        self.registry.register(_CanaryCollector(self._canaries))
        self.canary_weight = CanaryGauge(self._canaries, "weight")
        self.metric_value = CanaryGauge(self._canaries, "value")
        self.baseline_value = CanaryGauge(self._canaries, "baseline")
        self.rollouts = Counter(
            "birdwatch_rollouts", "Rollouts ended, by result (phase)", ("result",), registry=self.registry
        )
        self.prometheus_errors = Counter(
            "birdwatch_prometheus_errors", "Failed Prometheus queries (each attempt)", registry=self.registry
        )
        self.provider_queries = Counter(
            "birdwatch_provider_queries",
            "Metric queries by provider and result: value, no_data, rejected, unavailable, error "
            "(one per check, however many attempts it took)",
            ("provider", "result"),
            registry=self.registry,
        )
        self.provider_query_duration = Histogram(
            "birdwatch_provider_query_duration_seconds",
            "How long a metric query took, retries within its budget included",
            ("provider",),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.step_lateness = Histogram(
            "birdwatch_step_lateness_seconds",
            "How late a traffic step was against its interval",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.leader = Gauge("birdwatch_leader", "1 while this replica leads", registry=self.registry)
        self.canaries = Gauge("birdwatch_canaries", "Canary tasks running", registry=self.registry)
        self.tasks = Gauge(
            "birdwatch_asyncio_tasks", "asyncio tasks alive in the process (leaks show here)", registry=self.registry
        )
        self.events_dropped = Counter(
            "birdwatch_events_dropped", "Kubernetes Events dropped: queue full or refused", registry=self.registry
        )
        self.events_posted = Counter(
            "birdwatch_events_posted",
            "Kubernetes Events posted: each create, and each update of a repeat's count",
            registry=self.registry,
        )
        self.notifications = Counter(
            "birdwatch_notifications",
            "Notifications by notifier and result: sent, retried (each retry), failed (given up), dropped (queue "
            "full), unsent (still queued at shutdown)",
            ("notifier", "result"),
            registry=self.registry,
        )

    def provider_query(self, provider: str, result: str, seconds: float) -> None:
        self.provider_queries.labels(provider, result).inc()
        self.provider_query_duration.labels(provider).observe(seconds)

    def notification(self, notifier: str, result: str) -> None:
        self.notifications.labels(notifier, result).inc()

    def phase(self, namespace: str, name: str, phase: Phase) -> None:
        """Set the canary's eight ``birdwatch_canary_phase`` series: 1 for ``phase``, 0 for the others."""
        key = (namespace, name)
        canary = self._canaries.get(key)
        if canary is None:
            canary = self._canaries[key] = _Canary()
        canary.phase = phase

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted BirdWatch's series, so thousands of past canaries do not grow the registry."""
        self._canaries.pop((namespace, name), None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
