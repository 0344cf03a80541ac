"""The BirdWatch resource as birdwatch reads it: the spec users write, with defaults, checked for sense."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.Enum)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

GROUP = "otomato.link"
VERSION = "v1alpha1"
PLURAL = "birdwatches"
KIND = "BirdWatch"


class Unhealthy(enum.Enum):
    ROLLBACK = "rollback"
    FREEZE = "freeze"


class Direction(enum.Enum):
    INCREASE = "increase"
    DECREASE = "decrease"
    EITHER = "either"


class NoData(enum.Enum):
    ZERO = "zero"
    FAIL = "fail"
    SKIP = "skip"


class Baseline(enum.Enum):
    FIRST = "first"  # the metric's first value, before the first step (the original birdwatch)
    PRODUCTION = "production"  # production's value at each check, read at the same moment as the canary's


class Analysis(enum.Enum):
    THRESHOLD = "threshold"  # one value against one value
    MANN_WHITNEY = "mann-whitney"  # samples of both over the interval, a Mann-Whitney U test (Kayenta's)


VERSION_PLACEHOLDER = "{{version}}"


class Phase(enum.Enum):
    PENDING = "Pending"
    WAITING = "Waiting"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    FROZEN = "Frozen"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Phase.PROMOTED, Phase.ROLLED_BACK, Phase.FROZEN, Phase.FAILED})


class InvalidSpec(ValueError):
    """The spec cannot be carried out; the message says which field and why, for status and Events."""


@dataclass(frozen=True, kw_only=True, slots=True)  # one per canary: no __dict__ each
class BirdWatchSpec:
    service: str
    metric: str
    deviation: float
    canary_version: str
    increment: int = 1
    interval: int = 5
    if_unhealthy: Unhealthy = Unhealthy.ROLLBACK
    max_weight: int = 100
    failure_threshold: int = 1
    deviation_direction: Direction = Direction.INCREASE
    no_data: NoData = NoData.ZERO
    ready_timeout: int = 600
    notify: tuple[str, ...] | None = None  # notifiers by name; None: every notifier whose filters match
    provider: str = "prometheus"  # the metric provider that answers ``metric``, by its name in the providers file
    paused: bool = False  # hold the weight where it is: no steps, no checks, until set back to false
    baseline: Baseline = Baseline.FIRST
    production_metric: str | None = None  # production's query; default: ``metric`` with production's version
    analysis: Analysis = Analysis.THRESHOLD
    confidence: float = 0.95  # mann-whitney: how sure the test must be that the canary is worse
    samples: int = 5  # mann-whitney: readings of each side per interval

    def canary_query(self) -> str:
        return self.metric.replace(VERSION_PLACEHOLDER, self.canary_version)

    def production_query(self, production_version: str) -> str:
        return (self.production_metric or self.metric).replace(VERSION_PLACEHOLDER, production_version)

    @classmethod
    def from_dict(cls, raw: Any) -> BirdWatchSpec:
        """Parse ``.spec``. The CRD schema already enforces types and ranges; this guards against objects
        written before a schema change or through an API server that does not validate."""
        if not isinstance(raw, dict):
            raise InvalidSpec("spec is missing or not an object")
        missing = [f for f in ("service", "metric", "deviation", "canary_version") if raw.get(f) in (None, "")]
        if missing:
            raise InvalidSpec(f"spec lacks required field(s): {', '.join(missing)}")
        return cls(
            service=_text(raw, "service"),
            metric=_text(raw, "metric").strip(),
            deviation=_number(raw, "deviation", low=0.0),
            canary_version=_text(raw, "canary_version"),
            increment=_integer(raw, "increment", 1, low=1, high=10),
            interval=_integer(raw, "interval", 5, low=1, high=600),
            if_unhealthy=_choice(raw, "if_unhealthy", Unhealthy, Unhealthy.ROLLBACK),
            max_weight=_integer(raw, "max_weight", 100, low=1, high=100),
            failure_threshold=_integer(raw, "failure_threshold", 1, low=1, high=100),
            deviation_direction=_choice(raw, "deviation_direction", Direction, Direction.INCREASE),
            no_data=_choice(raw, "no_data", NoData, NoData.ZERO),
            ready_timeout=_integer(raw, "ready_timeout", 600, low=1, high=86400),
            notify=_names(raw, "notify"),
            provider=_label(raw, "provider", "prometheus"),
            paused=_flag(raw, "paused"),
            baseline=_choice(raw, "baseline", Baseline, Baseline.FIRST),
            production_metric=_optional_text(raw, "production_metric"),
            analysis=_choice(raw, "analysis", Analysis, Analysis.THRESHOLD),
            confidence=_fraction(raw, "confidence", 0.95),
            samples=_integer(raw, "samples", 5, low=3, high=30),
        )._checked()

    def _checked(self) -> BirdWatchSpec:
        """What the schema cannot say: the fields that only make sense together."""
        if self.analysis is Analysis.MANN_WHITNEY and self.baseline is not Baseline.PRODUCTION:
            raise InvalidSpec("analysis: mann-whitney compares the canary with production: set baseline: production")
        if (
            self.baseline is Baseline.PRODUCTION
            and self.production_metric is None
            and VERSION_PLACEHOLDER not in self.metric
        ):
            raise InvalidSpec(
                "baseline: production needs production's query: put {{version}} in metric where the version goes "
                "(birdwatch fills in canary_version and production's version), or set production_metric"
            )
        return self


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw[name]
    if not isinstance(value, str) or not value.strip():
        raise InvalidSpec(f"spec.{name} must be a non-empty string")
    return value


def _optional_text(raw: dict[str, Any], name: str) -> str | None:
    if raw.get(name) in (None, ""):
        return None
    return _text(raw, name).strip()


def _fraction(raw: dict[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.5 <= value < 1:
        raise InvalidSpec(f"spec.{name} must be a number from 0.5 up to (not including) 1, not {value!r}")
    return float(value)


def _flag(raw: dict[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidSpec(f"spec.{name} must be true or false, not {value!r}")
    return value


def _label(raw: dict[str, Any], name: str, default: str) -> str:
    value = raw.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise InvalidSpec(f"spec.{name} must be a DNS label (a-z, 0-9 and '-', at most 63 characters), not {value!r}")
    return value


def _names(raw: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidSpec(f"spec.{name} must be a list of notifier names, not {value!r}")
    return tuple(dict.fromkeys(value))


def _number(raw: dict[str, Any], name: str, *, low: float) -> float:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise InvalidSpec(f"spec.{name} must be a finite number >= {low:g}, not {value!r}")
    return float(value)


def _integer(raw: dict[str, Any], name: str, default: int, *, low: int, high: int) -> int:
    value = raw.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpec(f"spec.{name} must be an integer from {low} to {high}, not {value!r}")
    return value


def _choice(raw: dict[str, Any], name: str, kind: type[E], default: E) -> E:
    value = raw.get(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(e.value) for e in kind)
        raise InvalidSpec(f"spec.{name} must be one of {allowed}, not {value!r}") from None
