"""Route arithmetic on VirtualService and DestinationRule objects (pure; the API server tests are elsewhere)."""

from __future__ import annotations

from typing import Any

import pytest

from birdwatch.router import (
    Record,
    RouteError,
    canary_weight,
    detect_subsets,
    same_host,
    subsets_promoted,
    subsets_with_canary,
    weighted_http,
)


def vs(*routes: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "aleph"}, "spec": {"hosts": ["aleph"], "http": list(routes)}}


def dr(*subsets: tuple[str, str], host: str = "aleph") -> dict[str, Any]:
    return {
        "metadata": {"name": "aleph"},
        "spec": {"host": host, "subsets": [{"name": n, "labels": {"version": v, "app": "aleph"}} for n, v in subsets]},
    }


def route(*dests: tuple[str, int | None], host: str = "aleph", **extra: Any) -> dict[str, Any]:
    out = []
    for subset, weight in dests:
        d: dict[str, Any] = {"destination": {"host": host, "subset": subset, "port": {"number": 80}}}
        if weight is not None:
            d["weight"] = weight
        out.append(d)
    return {"route": out, **extra}


NAMED_DR = dr(("production", "v03"), ("canary", "v04"))


def test_named_convention_adds_canary_beside_every_production_route_in_one_go() -> None:
    v = vs(
        route(("production", None), name="a", timeout="5s"),
        route(("production", 100), name="b", match=[{"headers": {"x": {"exact": "1"}}}]),
        route(("other", None), host="elsewhere", name="c"),
    )
    subsets = detect_subsets(v, NAMED_DR, "v04")
    assert subsets.named
    http = weighted_http(v, subsets, 30)
    assert [[(d["destination"]["subset"], d["weight"]) for d in r["route"]] for r in http[:2]] == [
        [("production", 70), ("canary", 30)],
        [("production", 70), ("canary", 30)],
    ]
    assert http[0]["route"][1]["destination"] == {"host": "aleph", "subset": "canary", "port": {"number": 80}}
    assert http[0]["timeout"] == "5s"
    assert http[1]["match"] == [{"headers": {"x": {"exact": "1"}}}]
    assert http[2] == v["spec"]["http"][2]
    assert v["spec"]["http"][0]["route"][0].get("weight") is None  # the input is not modified


def test_weights_always_sum_to_100() -> None:
    v = vs(route(("production", 100), ("canary", 0)))
    subsets = detect_subsets(v, NAMED_DR, "v04")
    for w in range(101):
        assert sum(d["weight"] for d in weighted_http(v, subsets, w)[0]["route"]) == 100
    with pytest.raises(ValueError, match="outside"):
        weighted_http(v, subsets, 101)


def test_version_named_convention_finds_production_by_its_traffic() -> None:
    d = dr(("v02", "v02"), ("v03", "v03"), ("v04", "v04"))
    v = vs(route(("v03", 100), ("v02", 0)))
    subsets = detect_subsets(v, d, "v04")
    assert (subsets.production, subsets.canary, subsets.named) == ("v03", "v04", False)
    http = weighted_http(v, subsets, 10)
    assert [(x["destination"]["subset"], x["weight"]) for x in http[0]["route"]] == [
        ("v03", 90),
        ("v02", 0),
        ("v04", 10),
    ]
    assert canary_weight({"spec": {"http": http}}, subsets) == 10


@pytest.mark.parametrize(
    ("virtual", "destination", "says"),
    [
        (
            vs(route(("canary", None))),
            NAMED_DR,
            "no HTTP route of VirtualService aleph sends traffic to subset production",
        ),
        (vs(route(("production", None))), dr(("canary", "v04")), "DestinationRule aleph has no subset production"),
        (vs(route(("v02", 50), ("v03", 50))), dr(("v02", "v02"), ("v03", "v03")), "several subsets (v02, v03)"),
        (vs(route(("v04", 100))), dr(("v04", "v04")), "sends traffic to a production subset"),
        (vs(route(("v03", 100))), dr(("v02", "v02")), "DestinationRule aleph has no subset v03"),
    ],
)
def test_objects_that_cannot_carry_a_canary_say_why(virtual: Any, destination: Any, says: str) -> None:
    with pytest.raises(RouteError, match=None) as err:
        detect_subsets(virtual, destination, "v04")
    assert says in str(err.value)


def test_a_third_subset_with_traffic_is_refused() -> None:
    v = vs(route(("production", 80), ("canary", 10), ("mirror", 10)))
    with pytest.raises(RouteError, match="also sends traffic to subset mirror"):
        weighted_http(v, detect_subsets(v, NAMED_DR, "v04"), 20)


def test_destination_rule_subsets() -> None:
    subsets = detect_subsets(vs(route(("production", None))), NAMED_DR, "v05")
    changed = subsets_with_canary(NAMED_DR, subsets, "v05")
    assert changed == [
        {"name": "production", "labels": {"version": "v03", "app": "aleph"}},
        {"name": "canary", "labels": {"version": "v05", "app": "aleph"}},
    ]
    assert subsets_with_canary(NAMED_DR, subsets, "v04") is None
    missing = dr(("production", "v03"))
    assert subsets_with_canary(missing, subsets, "v05") == [
        {"name": "production", "labels": {"version": "v03", "app": "aleph"}},
        {"name": "canary", "labels": {"version": "v05", "app": "aleph"}},
    ]
    assert subsets_promoted(NAMED_DR, subsets, "v04") == [
        {"name": "production", "labels": {"version": "v04", "app": "aleph"}},
        {"name": "canary", "labels": {"version": "v04", "app": "aleph"}},
    ]


def test_hosts() -> None:
    assert same_host("aleph", "aleph.shop.svc.cluster.local")
    assert same_host("aleph.shop.svc.cluster.local", "aleph.shop.svc.cluster.local")
    assert not same_host("aleph", "beth")
    assert not same_host("aleph.a.svc.cluster.local", "aleph.b.svc.cluster.local")


def test_record_round_trips_and_ignores_garbage() -> None:
    record = Record(
        birdwatch="aleph",
        uid="u1",
        generation=2,
        canary="v04",
        weight=30,
        baseline=0.1,
        step_time="2026-11-26T10:00:00Z",
        metric="abc",
    )
    obj = {"metadata": {"annotations": {"birdwatch.otomato.link/rollout": record.to_json()}}}
    assert Record.parse(obj) == record
    assert Record.parse({"metadata": {"annotations": {"birdwatch.otomato.link/rollout": "{not json"}}}) is None
    assert Record.parse({"metadata": {}}) is None
