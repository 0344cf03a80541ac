"""What Envoy would do with one service's requests, given its VirtualService and DestinationRule (pure functions).

``resolve`` turns the two objects into a ``Route``: the percentage of requests each version gets. The route read is
the HTTP route named ``primary``, else the first one (``http[0]``). Each destination's subset is looked up in the
DestinationRule and becomes the ``version`` label that subset selects, as istiod would turn it into an Envoy
cluster. What Envoy could not deliver (no VirtualService, a subset the DestinationRule lacks, a version nobody
simulates, another host) is ``unroutable``: real Envoy would answer 503 from the caller's side.

One deliberate simplification: without a VirtualService real Istio falls back to the Kubernetes Service and spreads
requests over every version's pods; here such requests are unroutable, so a vanished VirtualService is visible.

``WeightedPicker`` chooses the target of each request by smooth weighted round-robin (nginx's): deterministic, and
exact over every cycle of ``sum(weights)`` requests, so tests can use tight bounds without flakiness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PRIMARY_ROUTE = "primary"
VERSION_LABEL = "version"

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Route:
    """Percent of requests per version (summed over destinations), and the percent nothing can serve."""

    weights: dict[str, int] = field(default_factory=dict)
    unroutable: int = 0
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"{version}={weight}" for version, weight in sorted(self.weights.items())]
        if self.unroutable:
            parts.append(f"unroutable={self.unroutable}")
        text = " ".join(parts) or "no route"
        return f"{text} ({'; '.join(self.problems)})" if self.problems else text


def pick_http_route(virtual_service: Obj) -> dict[str, Any] | None:
    """The route named ``primary``, else ``http[0]``; None when the VirtualService has no HTTP routes."""
    routes = [r for r in (virtual_service.get("spec") or {}).get("http") or [] if isinstance(r, dict)]
    for route in routes:
        if route.get("name") == PRIMARY_ROUTE:
            return route
    return routes[0] if routes else None


def subset_versions(destination_rule: Obj | None) -> dict[str, str | None]:
    """Subset name -> the ``version`` label it selects (None when it selects no particular version)."""
    subsets = ((destination_rule or {}).get("spec") or {}).get("subsets") or []
    return {
        str(s["name"]): (s.get("labels") or {}).get(VERSION_LABEL)
        for s in subsets
        if isinstance(s, dict) and s.get("name")
    }


def _host_matches(host: str, service: str, namespace: str) -> bool:
    return host in (service, f"{service}.{namespace}", f"{service}.{namespace}.svc") or host.startswith(
        f"{service}.{namespace}.svc."
    )


def resolve(
    virtual_service: Obj | None,
    destination_rule: Obj | None,
    *,
    service: str,
    namespace: str,
    versions: Iterable[str],
) -> Route:
    """Where each percent of ``service``'s requests goes, as Envoy would be configured by istiod."""
    if virtual_service is None:
        return Route(unroutable=100, problems=(f"no VirtualService {service}",))
    route = pick_http_route(virtual_service)
    if route is None:
        return Route(unroutable=100, problems=(f"VirtualService {service} has no http route",))
    destinations = [d for d in route.get("route") or [] if isinstance(d, dict)]
    if not destinations:
        return Route(unroutable=100, problems=("the http route has no destinations",))
    known = list(dict.fromkeys(versions))
    subsets = subset_versions(destination_rule)
    weights: dict[str, int] = {}
    unroutable = 0
    problems: list[str] = []
    for dest in destinations:
        target = dest.get("destination") or {}
        # Istio: a lone destination without a weight takes everything; among several, a missing weight is 0.
        weight = int(dest.get("weight", 100 if len(destinations) == 1 else 0) or 0)
        host, subset = str(target.get("host", "")), target.get("subset")
        if not _host_matches(host, service, namespace):
            unroutable += weight
            problems.append(f"host {host!r} is not {service}")
            continue
        if subset is None:
            # No subset: every endpoint of the Service, i.e. every version, round-robin.
            for version, share in zip(known, _spread(weight, len(known)), strict=True):
                weights[version] = weights.get(version, 0) + share
            continue
        if subset not in subsets:
            unroutable += weight
            problems.append(f"subset {subset!r} is not in DestinationRule {service}")
            continue
        selected = subsets[subset]
        if selected is None or selected not in known:
            unroutable += weight
            problems.append(f"subset {subset!r} selects version {selected!r}, which has no endpoints")
            continue
        weights[selected] = weights.get(selected, 0) + weight
    return Route(weights=weights, unroutable=unroutable, problems=tuple(problems))


def _spread(total: int, parts: int) -> list[int]:
    if parts == 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class WeightedPicker:
    """Smooth weighted round-robin over ``(target, weight)``; ``None`` as a target stands for "unroutable"."""

    def __init__(self, weights: Sequence[tuple[str | None, int]]) -> None:
        self._items = [(target, weight) for target, weight in weights if weight > 0]
        self._total = sum(weight for _, weight in self._items)
        self._current = [0] * len(self._items)

    @classmethod
    def for_route(cls, route: Route) -> WeightedPicker:
        return cls([*sorted(route.weights.items()), (None, route.unroutable)])

    @property
    def empty(self) -> bool:
        return not self._items

    def pick(self) -> str | None:
        """The next request's version, or None when it cannot be routed (also when every weight is 0)."""
        if not self._items:
            return None
        best = 0
        for i, (_, weight) in enumerate(self._items):
            self._current[i] += weight
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= self._total
        return self._items[best][0]
