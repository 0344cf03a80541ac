"""birdwatch's own Prometheus metrics, in a registry of their own (no process-global state).

Per-canary series are labelled ``namespace`` and ``birdwatch`` (the BirdWatch's name), the same keys as the log
lines, so one name finds a canary in both. Callers pass the values positionally: ``.labels(namespace, name)``.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .spec import Phase

CANARY_LABELS = ("namespace", "birdwatch")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._phases: dict[tuple[str, str], Phase] = {}  # the phase each canary's series say now
        labels = CANARY_LABELS
        self.canary_weight = Gauge(
            "birdwatch_canary_weight", "Canary traffic weight in percent", labels, registry=self.registry
        )
        self.canary_phase = Gauge(
            "birdwatch_canary_phase",
            "1 for the phase a canary is in, 0 for the others",
            (*labels, "phase"),
            registry=self.registry,
        )
        self.metric_value = Gauge(
            "birdwatch_metric_value", "Last value of the canary's health metric", labels, registry=self.registry
        )
        self.baseline_value = Gauge(
            "birdwatch_baseline_value", "Baseline of the canary's health metric", labels, registry=self.registry
        )
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
        # A series per phase, each a label look-up, at every status write; the phase seldom changes between them.
        key = (namespace, name)
        if self._phases.get(key) is phase:
            return
        self._phases[key] = phase
        for p in Phase:
            self.canary_phase.labels(namespace, name, p.value).set(1 if p is phase else 0)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted BirdWatch's series, so thousands of past canaries do not grow the registry."""
        self._phases.pop((namespace, name), None)
        for gauge in (self.canary_weight, self.metric_value, self.baseline_value):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
        for p in Phase:
            with contextlib.suppress(KeyError):
                self.canary_phase.remove(namespace, name, p.value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
