"""The per-canary series (kept in a record per canary, not in prometheus_client Gauges) are exposed exactly as the
Gauges they replaced exposed them: the same families, help, labels, values and order, and forgetting a BirdWatch
takes all of its series away. ``exposition()`` is prometheus_client's own text format of the whole registry."""

from __future__ import annotations

import gc
import math
import tracemalloc

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from birdwatch.metrics import Metrics
from birdwatch.spec import Phase

LABELS = ("namespace", "birdwatch")


def reference() -> tuple[CollectorRegistry, Gauge, Gauge, Gauge, Gauge]:
    """The four gauges as they were declared before, in a registry of their own."""
    registry = CollectorRegistry(auto_describe=True)
    weight = Gauge("birdwatch_canary_weight", "Canary traffic weight in percent", LABELS, registry=registry)
    phase = Gauge(
        "birdwatch_canary_phase",
        "1 for the phase a canary is in, 0 for the others",
        (*LABELS, "phase"),
        registry=registry,
    )
    value = Gauge("birdwatch_metric_value", "Last value of the canary's health metric", LABELS, registry=registry)
    baseline = Gauge("birdwatch_baseline_value", "Baseline of the canary's health metric", LABELS, registry=registry)
    return registry, weight, phase, value, baseline


def canary_part(metrics: Metrics) -> bytes:
    """The exposition up to the first family that is not per canary."""
    text = metrics.exposition()
    return text[: text.index(b"# HELP birdwatch_rollouts_total")]


def test_the_per_canary_series_read_as_the_gauges_did() -> None:
    metrics = Metrics()
    registry, weight, phase, value, baseline = reference()
    assert canary_part(metrics) == generate_latest(registry)

    def set_phase(namespace: str, name: str, now: Phase) -> None:
        metrics.phase(namespace, name, now)
        for p in Phase:
            phase.labels(namespace, name, p.value).set(1 if p is now else 0)

    set_phase("team-a", "aleph", Phase.PENDING)
    metrics.canary_weight.labels("team-a", "aleph").set(10)
    weight.labels("team-a", "aleph").set(10)
    metrics.metric_value.labels("team-a", "aleph").set(0.125)
    value.labels("team-a", "aleph").set(0.125)
    metrics.baseline_value.labels("team-a", "aleph").set(math.nan)
    baseline.labels("team-a", "aleph").set(math.nan)
    set_phase("team-a", "aleph", Phase.PROGRESSING)
    set_phase("team-b", 'q"uo\\te\n', Phase.WAITING)  # label values escaped as prometheus_client escapes them
    metrics.metric_value.labels("team-b", 'q"uo\\te\n').set(math.inf)
    value.labels("team-b", 'q"uo\\te\n').set(math.inf)
    set_phase("team-a", "aleph", Phase.PROMOTED)
    assert canary_part(metrics) == generate_latest(registry)
    assert metrics.exposition() == generate_latest(metrics.registry)
    sample = metrics.registry.get_sample_value
    assert sample("birdwatch_canary_phase", {"namespace": "team-a", "birdwatch": "aleph", "phase": "Promoted"}) == 1
    assert sample("birdwatch_canary_phase", {"namespace": "team-a", "birdwatch": "aleph", "phase": "Pending"}) == 0
    assert sample("birdwatch_canary_weight", {"namespace": "team-a", "birdwatch": "aleph"}) == 10
    assert sample("birdwatch_baseline_value", {"namespace": "team-b", "birdwatch": 'q"uo\\te\n'}) is None  # not set


def test_forgetting_a_birdwatch_takes_all_of_its_series() -> None:
    metrics = Metrics()
    for name in ("aleph", "bet"):
        metrics.phase("ns", name, Phase.PROGRESSING)
        metrics.canary_weight.labels("ns", name).set(30)
        metrics.metric_value.labels("ns", name).set(0.0)
        metrics.baseline_value.labels("ns", name).set(0.0)
    metrics.forget("ns", "aleph")
    metrics.forget("ns", "never-seen")
    assert b'birdwatch="aleph"' not in metrics.exposition()
    assert metrics.exposition().count(b'birdwatch="bet"') == 3 + len(Phase)
    # A BirdWatch of the same name made again starts with no series but those it sets.
    metrics.canary_weight.labels("ns", "aleph").set(0)
    assert metrics.exposition().count(b'birdwatch="aleph"') == 1
    assert metrics.exposition() == generate_latest(metrics.registry)


def test_a_canary_s_series_cost_a_few_hundred_bytes() -> None:
    """Eleven series a canary, for 1,000 canaries: about 0.25 kB each (as prometheus_client Gauge children, 7.9 kB)."""
    metrics = Metrics()
    names = [f"bench-{i:04d}" for i in range(1000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in names:
            metrics.phase("ns", name, Phase.PROGRESSING)
            metrics.canary_weight.labels("ns", name).set(30)
            metrics.metric_value.labels("ns", name).set(0.0)
            metrics.baseline_value.labels("ns", name).set(0.0)
        gc.collect()
        each = (tracemalloc.get_traced_memory()[0] - before) / len(names)
    finally:
        tracemalloc.stop()
    assert each < 500, f"{each:.0f} B a canary"
