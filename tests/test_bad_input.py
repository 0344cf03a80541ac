"""Bad input, three ways, on the real API server and Prometheus.

1. BirdWatches the CRD schema forbids: the API server refuses them (422) and names the field.
2. BirdWatches the schema allows but that cannot be carried out (missing or odd routes, PromQL that Prometheus
   rejects or that gives several numbers, a canary no Deployment carries): each ends Failed (or waits, then carries
   out if_unhealthy) with a clear status message, a Warning Event and a log line, while a healthy canary beside it
   in the same namespace is promoted unharmed. Odd but valid queries (10 kB long, non-ASCII) work.
3. Secrets: the Slack token and the Prometheus password never show in logs, Events, status or Slack messages, even
   when the servers refuse them and echo them back.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from aiohttp import web

from birdwatch.kube import BIRDWATCHES, Invalid, NotFound
from birdwatch.log import configure
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import (
    Cluster,
    Obj,
    apply_all,
    birdwatch,
    controller,
    deployment,
    destination_rule,
    eventually,
    mesh,
    virtual_service,
    wait_available,
)
from slackfake import FakeSlack

# --- captured logs ------------------------------------------------------------------------------------------------


class JsonLog:
    """What birdwatch logs, rendered as in production (``birdwatch.log.configure(fmt="json")``), one dict a line."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.text.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def about(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("namespace") == namespace and e.get("birdwatch") == name]


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Iterator[JsonLog]:
    """birdwatch's own logging set up as ``birdwatch run`` does it, into a buffer; restored afterwards.

    In-process controllers (kit.controller) do not configure logging: cli.main does. Here it is configured as there,
    at debug, but without cache_logger_on_first_use: a cached logger stays bound to this test's buffer for the rest
    of the session, and later tests' structlog.testing.capture_logs would no longer see anything.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure(fmt="json", level="debug", stream=stream)
    structlog.configure(cache_logger_on_first_use=False)
    # slack_sdk and aiohttp log requests at DEBUG (not emitted in production, where stdlib stays at INFO): look there
    # too, through pytest's handler.
    for name in ("slack_sdk", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    try:
        yield JsonLog(stream)
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


# --- 1. what the schema refuses ----------------------------------------------------------------------------------

MISSING = object()
VALID_SPEC: Obj = {"service": "aleph", "metric": "vector(0)", "deviation": 0.5, "canary_version": "v04"}


@dataclass(frozen=True)
class Refused:
    field: str  # "spec" for the whole spec, else a field of it
    value: Any  # MISSING: left out
    rule: str  # what the API server says about it (a fragment of its message)
    label: str = ""

    @property
    def id(self) -> str:
        shown = "missing" if self.value is MISSING else self.label or repr(self.value)
        return f"{self.field}={shown}"

    def body(self) -> Obj:
        obj: Obj = {"apiVersion": "otomato.link/v1alpha1", "kind": "BirdWatch", "metadata": {"name": "refused"}}
        if self.field == "spec":
            if self.value is not MISSING:
                obj["spec"] = self.value
            return obj
        spec = dict(VALID_SPEC)
        if self.value is MISSING:
            spec.pop(self.field, None)
        else:
            spec[self.field] = self.value
        obj["spec"] = spec
        return obj


REFUSED = [
    Refused("spec", MISSING, "Required value"),
    Refused("spec", "aleph", 'must be of type object: "string"', label="a string"),
    Refused("spec", ["aleph"], 'must be of type object: "array"', label="a list"),
    *(Refused(f, MISSING, "Required value") for f in ("service", "metric", "deviation", "canary_version")),
    Refused("service", "Aleph", "should match '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'"),
    Refused("service", "aleph_web", "should match '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'"),
    Refused("service", "", "should be at least 1 chars long"),
    Refused("service", "a" * 254, "may not be more than 253 bytes", label="254 chars"),
    Refused("metric", "", "should be at least 1 chars long"),
    Refused("metric", "vector(0)" + " + vector(0)" * 1400, "may not be more than 16384 bytes", label="16.8k chars"),
    Refused("metric", 42, 'must be of type string: "integer"'),
    Refused("deviation", -0.1, "should be greater than or equal to 0"),
    Refused("deviation", "0.1", 'must be of type number: "string"'),
    Refused("canary_version", "v 04", "should match '^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$'"),
    Refused("canary_version", "-v04", "should match '^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$'"),
    Refused("canary_version", "v" * 64, "may not be more than 63 bytes", label="64 chars"),
    Refused("canary_version", "", "should be at least 1 chars long"),
    Refused("increment", 0, "should be greater than or equal to 1"),
    Refused("increment", 11, "should be less than or equal to 10"),
    Refused("increment", 2.5, 'must be of type integer: "number"'),
    Refused("increment", "5", 'must be of type integer: "string"'),
    Refused("interval", 0, "should be greater than or equal to 1"),
    Refused("interval", 601, "should be less than or equal to 600"),
    Refused("if_unhealthy", "other", 'supported values: "freeze", "rollback"'),
    Refused("if_unhealthy", "Rollback", 'supported values: "freeze", "rollback"'),
    Refused("max_weight", 0, "should be greater than or equal to 1"),
    Refused("max_weight", 101, "should be less than or equal to 100"),
    Refused("failure_threshold", 0, "should be greater than or equal to 1"),
    Refused("failure_threshold", 101, "should be less than or equal to 100"),
    Refused("deviation_direction", "other", 'supported values: "increase", "decrease", "either"'),
    Refused("no_data", "other", 'supported values: "zero", "fail", "skip"'),
    Refused("ready_timeout", 0, "should be greater than or equal to 1"),
    Refused("ready_timeout", 86401, "should be less than or equal to 86400"),
    Refused("paused", "yes", 'must be of type boolean: "string"'),
    Refused("baseline", "yesterday", 'supported values: "first", "production"'),
    Refused("analysis", "t-test", 'supported values: "threshold", "mann-whitney"'),
    Refused("confidence", 1, "should be less than 1"),
    Refused("confidence", 0.4, "should be greater than or equal to 0.5"),
    Refused("samples", 2, "should be greater than or equal to 3"),
    Refused("paused", 1, 'must be of type boolean: "integer"'),
]


async def test_the_valid_base_of_the_refused_corpus_is_accepted(cluster: Cluster) -> None:
    """Each refused case below differs from this one by one field, so its refusal is that field's doing."""
    created = await cluster.create_bw(Refused("increment", 1, "").body())
    assert created["spec"]["increment"] == 1
    assert created["spec"]["if_unhealthy"] == "rollback"  # defaults applied: the schema is the deployed one


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
async def test_the_api_server_refuses_what_the_schema_forbids(cluster: Cluster, case: Refused) -> None:
    with pytest.raises(Invalid) as refused:
        await cluster.create_bw(case.body())
    error = refused.value
    assert error.status == 422
    assert error.reason == "Invalid"
    path = case.field if case.field == "spec" else f"spec.{case.field}"
    # e.g. 'BirdWatch.otomato.link "refused" is invalid: spec.increment: Invalid value: 0: spec.increment in body
    # should be greater than or equal to 1'
    assert f"is invalid: {path}: " in error.message, error.message
    assert case.rule in error.message, error.message
    with pytest.raises(NotFound):
        await cluster.kube.get(BIRDWATCHES, cluster.namespace, "refused")


# --- 2. what the schema allows but cannot be carried out ---------------------------------------------------------


def new_namespace(admin: KubeHTTP, stem: str) -> str:
    name = f"bad-{stem}-{uuid.uuid4().hex[:6]}"
    admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def service(admin: KubeHTTP, namespace: str, name: str, production: str, canary: str) -> None:
    """A second service beside aleph, in the named convention, with both versions' Deployments available."""
    objs = [deployment(f"{name}-{v}", v, app=name) for v in (production, canary)]
    objs += [
        destination_rule(name, {"production": production, "canary": canary}),
        virtual_service(name, {"production": 100, "canary": 0}),
    ]
    apply_all(admin, namespace, objs)
    wait_available(admin, namespace, *(f"{name}-{v}" for v in (production, canary)))


def delete(admin: KubeHTTP, namespace: str, plural: str, name: str) -> None:
    status, body = admin.request("DELETE", f"/apis/networking.istio.io/v1/namespaces/{namespace}/{plural}/{name}")
    assert status == 200, body


def only_route(name: str, destinations: list[Obj]) -> Obj:
    return {
        **virtual_service(name, {}),
        "spec": {"hosts": [name], "http": [{"name": "primary", "route": destinations}]},
    }


def many_terms(target: int) -> str:
    """A valid query of about ``target`` characters: vector(0) + vector(0) + ..."""
    return " + ".join(["vector(0)"] * (target // len(" + vector(0)") + 1))


@dataclass
class Corpus:
    """One semantically bad (or merely odd) BirdWatch named aleph, in a namespace of its own."""

    key: str
    spec: Obj
    phase: str  # how it ends
    says: tuple[str, ...] = ()  # fragments of its final status.message
    reason: str = ""  # the Warning Event's reason ("" for a good ending)
    waiting: str = ""  # a fragment of the Waiting message on the way, if it waits
    baseline: float | None = None
    setup: Callable[[KubeHTTP, str], None] | None = None
    named: bool = True
    versions: tuple[str, ...] = ("v03", "v04")
    namespace: str = field(default="", init=False)
    vs_before: Obj | None = field(default=None, init=False)


def _route_without_production(admin: KubeHTTP, ns: str) -> None:
    apply_all(admin, ns, [virtual_service("aleph", {"canary": 100})])


def _route_to_another_host(admin: KubeHTTP, ns: str) -> None:
    apply_all(admin, ns, [only_route("aleph", [{"destination": {"host": "elsewhere", "subset": "v03"}}])])


def _no_destination_rule(admin: KubeHTTP, ns: str) -> None:
    delete(admin, ns, "destinationrules", "aleph")


def _third_subset_with_traffic(admin: KubeHTTP, ns: str) -> None:
    apply_all(
        admin,
        ns,
        [
            destination_rule("aleph", {"production": "v03", "canary": "v04", "legacy": "v02"}),
            virtual_service("aleph", {"production": 80, "canary": 0, "legacy": 20}),
        ],
    )


def _two_serving_subsets(admin: KubeHTTP, ns: str) -> None:
    apply_all(admin, ns, [virtual_service("aleph", {"v03": 90, "v02": 10})])


def corpus(namespace_of: Callable[[str], str]) -> list[Corpus]:
    ns = namespace_of
    return [
        # What is missing may yet be applied: waited for, then Failed after ready_timeout.
        Corpus(
            "no-virtualservice",
            {"service": "ghost", "ready_timeout": 2},
            "Failed",
            (f"waiting for VirtualService ghost in namespace {ns('no-virtualservice')}", "ready_timeout 2s"),
            "RouteMissing",
        ),
        Corpus(
            "no-production-route",
            {"ready_timeout": 2},
            "Failed",
            ("no HTTP route of VirtualService aleph sends traffic to subset production", "ready_timeout 2s"),
            "RouteMissing",
            setup=_route_without_production,
        ),
        Corpus(
            "no-route-on-the-host",
            {"ready_timeout": 2},
            "Failed",
            ("no HTTP route of VirtualService aleph sends traffic to a production subset", "ready_timeout 2s"),
            "RouteMissing",
            setup=_route_to_another_host,
            named=False,
        ),
        Corpus(
            "no-destinationrule",
            {"ready_timeout": 2},
            "Failed",
            (f"waiting for DestinationRule aleph in namespace {ns('no-destinationrule')}", "ready_timeout 2s"),
            "RouteMissing",
            setup=_no_destination_rule,
        ),
        Corpus(
            "third-subset",
            {},
            "Failed",
            ("HTTP route primary of VirtualService aleph also sends traffic to subset legacy",),
            "RouteInvalid",
            setup=_third_subset_with_traffic,
            versions=("v03", "v04", "v02"),
        ),
        Corpus(
            "two-serving-subsets",
            {},
            "Failed",
            ("sends traffic to several subsets (v02, v03): cannot tell which is production",),
            "RouteInvalid",
            setup=_two_serving_subsets,
            named=False,
            versions=("v03", "v04", "v02"),
        ),
        Corpus(
            "promql-syntax",
            {"metric": "sum(rate(http_requests_total[5m]"},
            "Failed",
            ("Prometheus rejected the metric query", "parse error", "unclosed left parenthesis"),
            "BadQuery",
        ),
        Corpus(
            "several-series",
            {"metric": 'label_replace(vector(1), "pod", "a", "", "") or label_replace(vector(2), "pod", "b", "", "")'},
            "Failed",
            ("the query returned 2 series", '{pod="a"}, {pod="b"}', "aggregate them into one, e.g. with sum(...)"),
            "BadQuery",
        ),
        Corpus(
            "non-ascii-metric-name",
            {"metric": "sum(métrique)"},
            "Failed",
            ("Prometheus rejected the metric query", "parse error: unexpected character: 'é'"),
            "BadQuery",
        ),
        Corpus(
            "no-deployment-rollback",
            {"canary_version": "v99", "ready_timeout": 2},
            "RolledBack",
            ("rolled back: the canary was not available after ready_timeout 2s", "no Deployment labelled version=v99"),
            "ReadyTimeout",
            waiting=f"no Deployment labelled version=v99 in namespace {ns('no-deployment-rollback')}",
        ),
        Corpus(
            "no-deployment-freeze",
            {"canary_version": "v99", "ready_timeout": 2, "if_unhealthy": "freeze"},
            "Frozen",
            ("frozen at 0%: the canary was not available after ready_timeout 2s", "labelled version=v99"),
            "ReadyTimeout",
            waiting="no Deployment labelled version=v99",
        ),
        # Odd, but valid: these must work.
        Corpus("long-query", {"metric": many_terms(10_000), "max_weight": 20}, "Promoted", baseline=0.0),
        Corpus(
            "non-ascii-label-value",
            {"metric": f'max(bwtest_utf{{ns="{ns("non-ascii-label-value")}", city="café"}})', "max_weight": 20},
            "Promoted",
            baseline=0.25,
        ),
    ]


async def test_semantically_bad_birdwatches_fail_clearly_and_harm_no_neighbour(
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
    json_log: JsonLog,
) -> None:
    namespaces: dict[str, str] = {}

    def ns(key: str) -> str:
        if key not in namespaces:
            namespaces[key] = new_namespace(admin_http, key)
        return namespaces[key]

    cases = corpus(ns)
    assert len(next(c for c in cases if c.key == "long-query").spec["metric"]) >= 10_000
    for case in cases:
        case.namespace = ns(case.key)
        mesh(admin_http, case.namespace, named=case.named, versions=case.versions)
        if case.setup is not None:
            case.setup(admin_http, case.namespace)
        service(admin_http, case.namespace, "beth", "b1", "b2")
        with contextlib.suppress(NotFound):
            case.vs_before = await Cluster(cluster.kube, case.namespace).vs()
    café = ns("non-ascii-label-value")
    exporter.set_gauge("bwtest_utf", 0.25, ns=café, city="café")
    prometheus.wait_for_value(f'max(bwtest_utf{{ns="{café}", city="café"}})', 0.25)

    async with controller(control_plane, prometheus_url=prometheus.url, namespaces=list(namespaces.values())):
        for case in cases:
            user = Cluster(cluster.kube, case.namespace)
            await user.create_bw(birdwatch("aleph", **{"metric": "vector(0)", **case.spec}))
            await user.create_bw(
                birdwatch("beth", service="beth", canary_version="b2", metric="vector(0.1)", max_weight=20)
            )
        outcomes = await asyncio.gather(*(_outcome(Cluster(cluster.kube, c.namespace), c) for c in cases))

    for case, (status, neighbour) in zip(cases, outcomes, strict=True):
        user = Cluster(cluster.kube, case.namespace)
        await _check_bad(user, case, status, json_log)
        await _check_unharmed(user, neighbour)


async def _outcome(user: Cluster, case: Corpus) -> tuple[Obj, Obj]:
    if case.waiting:
        waiting = await user.wait_phase("Waiting")
        assert case.waiting in waiting["message"], (case.key, waiting)
        assert waiting["message"].startswith("waiting for the canary: "), (case.key, waiting)
    status, neighbour = await asyncio.gather(user.wait_phase(case.phase), user.wait_phase("Promoted", "beth"))
    return status, neighbour


async def _check_bad(user: Cluster, case: Corpus, status: Obj, logs: JsonLog) -> None:
    what = f"{case.key}: {status}"
    for fragment in case.says:
        assert fragment in status["message"], what
    if case.baseline is not None:
        assert status["baseline"] == pytest.approx(case.baseline), what
    events = await user.events("aleph")
    warnings = [e for e in events if e["type"] == "Warning"]
    if not case.reason:
        assert not warnings, (case.key, warnings)
        assert await user.weights() == {"production": 100, "canary": 0}  # promoted: production is the canary now
        return
    assert status["observedGeneration"] == 1
    assert any(e["reason"] == case.reason and case.says[-1] in e["message"] for e in warnings), (case.key, events)
    # The Event that ends it carries the status message as it is (non-ASCII included).
    assert any(e["message"] == status["message"] for e in warnings), (case.key, status["message"], events)
    logged = [e for e in logs.about(user.namespace, "aleph") if e.get("level") in ("warning", "error")]
    assert any(case.says[-1] in " ".join(str(v) for v in entry.values()) for entry in logged), (case.key, logged)
    # Nothing was shifted: where there is a VirtualService, its routes are as the user wrote them.
    if case.vs_before is not None:
        assert (await user.vs())["spec"]["http"] == case.vs_before["spec"]["http"], case.key


async def _check_unharmed(user: Cluster, status: Obj) -> None:
    assert status["baseline"] == pytest.approx(0.1)
    assert status["canaryWeight"] == 100
    events = await user.events("beth")
    assert [e for e in events if e["type"] == "Warning"] == []
    assert await user.weights("beth") == {"production": 100, "canary": 0}
    dr = await user.dr("beth")
    assert {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]} == {"production": "b2", "canary": "b2"}


# --- 3. secrets -----------------------------------------------------------------------------------------------------

SLACK_TOKEN = "xoxb-SECRET-TOKEN-1234"
PROM_USER = "birdwatch"
PROM_PASSWORD = "PROM-SECRET-5678"
BASIC = base64.b64encode(f"{PROM_USER}:{PROM_PASSWORD}".encode()).decode()


def leaks(text: str) -> list[str]:
    """Which secret, or recognisable piece of one, is in ``text``."""
    pieces = {
        "SECRET (a secret or its readable part)": "SECRET",
        "the Slack token": SLACK_TOKEN,
        "the Prometheus password": PROM_PASSWORD,
        "the basic-auth credentials": BASIC,
        # The base64 of ':PROM-SEC' (offset 12 of 'birdwatch:PROM-SECRET-5678' is on a 3-byte boundary): a
        # truncated credential still gives most of the password away.
        "a piece of the basic-auth credentials": BASIC[12:24],
    }
    return [name for name, piece in pieces.items() if piece in text]


class EchoingPrometheus:
    """Stands where Prometheus should be, refuses birdwatch's credentials and echoes them back, as careless proxies
    and error pages do. What it answers depends on the query (a word in it):

    ``refuse_401``   401, the Authorization header in the reason phrase and in the body
    ``echo_400``     400 bad_data in Prometheus's own JSON, the header and the decoded credentials in its error
    ``echo_503``     503 in Prometheus's JSON (retried by birdwatch), the header in its error
    ``proxy_407``    407 from a proxy, a short text body with the header
    ``proxy_502``    502 from a proxy, an HTML page echoing the header after ``pad`` characters
    ``then_401``     the first two queries (the query's early check, the baseline) answer 0; later ones are
                     refused as refuse_401
    ``/-/ready``     401 with the header in the body
    """

    def __init__(self, *, pad: int = 0) -> None:
        self.pad = pad
        self.queries: collections.Counter[str] = collections.Counter()
        self.authorizations: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> EchoingPrometheus:
        app = web.Application()
        app.router.add_post("/api/v1/query", self._query)
        app.router.add_get("/-/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _echo(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        self.authorizations.add(header)
        decoded = ""
        if header.startswith("Basic "):
            decoded = base64.b64decode(header.removeprefix("Basic ")).decode(errors="replace")
        return f"Authorization: {header} (that is {decoded})"

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=401, text=f"not for you: {self._echo(request)}")

    async def _query(self, request: web.Request) -> web.Response:
        query = str((await request.post()).get("query", ""))
        self.queries[query] += 1
        echo = self._echo(request)
        header = request.headers.get("Authorization", "")
        if "then_401" in query and self.queries[query] <= 2:
            return web.json_response({"status": "success", "data": {"resultType": "scalar", "result": [0, "0"]}})
        if "refuse_401" in query or "then_401" in query:
            return web.Response(status=401, reason=f"Unauthorized {header}", text=f"denied: {echo}")
        if "echo_400" in query:
            error = {"status": "error", "errorType": "bad_data", "error": f"invalid parameter: {echo}"}
            return web.json_response(error, status=400)
        if "echo_503" in query:
            error = {"status": "error", "errorType": "unavailable", "error": f"overloaded, try again: {echo}"}
            return web.json_response(error, status=503)
        if "proxy_407" in query:
            return web.Response(status=407, text=f"proxy says no: {echo}")
        if "proxy_502" in query:
            page = f"<html><body><h1>502 Bad Gateway</h1><p>{'.' * self.pad}{echo}</p></body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        return web.json_response(
            {"status": "error", "errorType": "bad_data", "error": "unknown test query"}, status=400
        )


@dataclass(frozen=True)
class Refusal:
    """A BirdWatch whose metric meets one of EchoingPrometheus's refusals, on a service of its own."""

    name: str
    metric: str
    phase: str
    says: str

    @property
    def versions(self) -> tuple[str, str]:
        return f"{self.name}-1", f"{self.name}-2"


REFUSALS = [
    Refusal("refused", "sum(refuse_401)", "Failed", "refused the credentials: HTTP 401 Unauthorized Basic ***"),
    Refusal("echoed", "sum(echo_400)", "Failed", "Prometheus rejected the metric query: invalid parameter"),
    # Prometheus overloaded before the baseline is waited out (ready_timeout), then rolled back.
    Refusal("flaky", "sum(echo_503)", "RolledBack", "answered HTTP 503 Service Unavailable: unavailable: overloaded"),
    Refusal("proxied", "sum(proxy_407)", "Failed", "answered HTTP 407 Proxy Authentication Required: proxy says no"),
    Refusal("flip", "sum(then_401)", "RolledBack", "the metric could not be read"),
]


@contextlib.asynccontextmanager
async def secret_run(
    cluster: Cluster, admin: KubeHTTP, plane: ControlPlane, prom: EchoingPrometheus, slack: FakeSlack
) -> AsyncIterator[None]:
    env = {"SLACK_API_TOKEN": SLACK_TOKEN, "SLACK_API_URL": slack.base_url, "PROMETHEUS_PASSWORD": PROM_PASSWORD}
    async with controller(
        plane,
        prometheus_url=prom.url,
        namespaces=[cluster.namespace],
        extra=["--prometheus-username", PROM_USER],
        env=env,
    ):
        yield


async def everything_said(cluster: Cluster, logs: JsonLog, caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """Everything a person could read afterwards, by where it is."""
    ns = cluster.namespace
    events = await cluster.kube.request("GET", f"/api/v1/namespaces/{ns}/events")
    birdwatches = await cluster.kube.request("GET", f"/apis/otomato.link/v1alpha1/namespaces/{ns}/birdwatches")
    vss = await cluster.kube.request("GET", f"/apis/networking.istio.io/v1/namespaces/{ns}/virtualservices")
    drs = await cluster.kube.request("GET", f"/apis/networking.istio.io/v1/namespaces/{ns}/destinationrules")
    return {
        "birdwatch's log": logs.text,
        "stdlib log records (DEBUG)": caplog.text,
        "Events": json.dumps(events, ensure_ascii=False),
        "BirdWatch objects (status)": json.dumps(birdwatches, ensure_ascii=False),
        "VirtualServices and DestinationRules": json.dumps([vss, drs], ensure_ascii=False),
    }


@pytest.mark.parametrize("slack_answers", ["ok", "invalid_auth", "http_500"])
async def test_secrets_never_appear(
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    json_log: JsonLog,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    slack_answers: str,
) -> None:
    ns = cluster.namespace
    for refusal in REFUSALS:
        service(admin_http, ns, refusal.name, *refusal.versions)
    slack_token_accepted = SLACK_TOKEN if slack_answers != "invalid_auth" else "xoxb-another-token"
    async with EchoingPrometheus() as prom, FakeSlack(token=slack_token_accepted) as slack:
        if slack_answers == "http_500":
            slack.fail_next(10_000, status=500)
        async with secret_run(cluster, admin_http, control_plane, prom, slack):
            for r in REFUSALS:
                await cluster.create_bw(
                    birdwatch(
                        r.name,
                        service=r.name,
                        canary_version=r.versions[1],
                        metric=r.metric,
                        interval=1,
                        ready_timeout=3,
                    )
                )
            statuses = await asyncio.gather(*(cluster.wait_phase(r.phase, r.name) for r in REFUSALS))
            if slack_answers == "ok":
                # Failed x3, unhealthy + rolled back (flaky), started + unhealthy + rolled back (flip), and the
                # Prometheus-down notice.
                await slack.wait_for_messages(8, timeout=10)
            else:
                await eventually(
                    lambda: _soon_logged(json_log, "slack notification failed"), timeout=15, what="a failed Slack post"
                )
        said = await everything_said(cluster, json_log, caplog)
        messages = list(slack.messages)
    out, err = capsys.readouterr()
    said["stdout and stderr"] = out + err

    # The servers were asked with the secret, refused it, and echoed it back: the test tested something.
    assert prom.authorizations == {f"Basic {BASIC}"}
    assert {r.metric for r in REFUSALS} <= set(prom.queries)
    for r, status in zip(REFUSALS, statuses, strict=True):
        assert r.says in status["message"], (r.name, status)
    assert "***" in statuses[0]["message"]  # the echoed credentials were there, and were scrubbed
    if slack_answers == "ok":
        said["Slack messages"] = json.dumps([[m.text, m.blocks] for m in messages], ensure_ascii=False)
        assert any("Prometheus at" in (m.text or "") for m in messages)
        assert any("refused the credentials" in (m.text or "") for m in messages)
    else:
        failed = [e for e in json_log.lines() if e.get("event") == "slack notification failed"]
        assert failed, json_log.text
        expected = "invalid_auth" if slack_answers == "invalid_auth" else "internal_error"
        assert {e["slack_error"] for e in failed} == {expected}
    assert _logged(json_log, "rollout failed")
    assert _logged(json_log, "prometheus not reachable; canaries count failed checks until it is")

    found = {where: leaks(text) for where, text in said.items()}
    assert found == {where: [] for where in said}, found


async def test_secrets_never_appear_when_nothing_answers(
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    unused_tcp_port: int,
    json_log: JsonLog,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Prometheus and Slack both on a port nobody listens on: connection errors, retries, then no baseline within
    ready_timeout (rolled back)."""
    service(admin_http, cluster.namespace, "aleph", "v03", "v04")
    dead = f"http://127.0.0.1:{unused_tcp_port}"
    env = {"SLACK_API_TOKEN": SLACK_TOKEN, "SLACK_API_URL": f"{dead}/api/", "PROMETHEUS_PASSWORD": PROM_PASSWORD}
    async with controller(
        control_plane,
        prometheus_url=dead,
        namespaces=[cluster.namespace],
        extra=["--prometheus-username", PROM_USER],
        env=env,
    ):
        await cluster.create_bw(birdwatch("aleph", metric="sum(up)", interval=1, ready_timeout=3))
        status = await cluster.wait_phase("RolledBack")
        await eventually(lambda: _soon_logged(json_log, "slack notification failed"), timeout=15, what="a failed post")
    assert "cannot reach Prometheus at" in status["message"]
    said = await everything_said(cluster, json_log, caplog)
    found = {where: leaks(text) for where, text in said.items()}
    assert found == {where: [] for where in said}, found


async def test_an_error_page_cut_mid_credentials_leaks_no_piece_of_them(
    cluster: Cluster, admin_http: KubeHTTP, control_plane: ControlPlane, json_log: JsonLog
) -> None:
    """A proxy's error page that echoes the Authorization header, where birdwatch's 200-character excerpt of the
    page ends inside the credentials. The whole credential is scrubbed from messages, but a cut one is not."""
    service(admin_http, cluster.namespace, "aleph", "v03", "v04")
    # The excerpt of the page: '<html>...<p>' + pad + 'Authorization: Basic ' + credentials; end it 24 characters into
    # the credentials (BASIC[:24] is the base64 of 'birdwatch:PROM-SEC').
    head = len("<html><body><h1>502 Bad Gateway</h1><p>") + len("Authorization: Basic ")
    async with (
        EchoingPrometheus(pad=200 - head - 24) as prom,
        FakeSlack(token=SLACK_TOKEN) as slack,
        secret_run(cluster, admin_http, control_plane, prom, slack),
    ):
        await cluster.create_bw(birdwatch("aleph", metric="sum(proxy_502)", interval=1, ready_timeout=3))
        status = await cluster.wait_phase("RolledBack")
    assert "answered HTTP 502 Bad Gateway" in status["message"]
    assert leaks(status["message"]) == [], status["message"]
    assert leaks(json_log.text) == []


def _logged(logs: JsonLog, event: str) -> bool:
    return any(e.get("event") == event for e in logs.lines())


async def _soon_logged(logs: JsonLog, event: str) -> bool:
    return _logged(logs, event)
