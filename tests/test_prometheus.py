"""The Prometheus client against a real Prometheus: what a canary's task gets back, and what it is told when it fails.

Most tests ask the session's Prometheus (scraping the test exporter); a second, module-scoped Prometheus serves TLS
with basic auth. A small aiohttp server on a loopback socket stands in only for what a real Prometheus cannot be
made to do on demand: stall, answer like a proxy's error page, echo credentials back, or check bearer tokens.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from birdwatch.prometheus import (
    AmbiguousResult,
    BadQuery,
    PrometheusClient,
    PrometheusConfig,
    QueryError,
    Unavailable,
)
from birdwatch.providers.config import ProviderSpec
from birdwatch.providers.prometheus import PrometheusProvider
from birdwatch_sandbox.envtest.assets import Assets
from birdwatch_sandbox.envtest.controlplane import Server, free_port, wait_until
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.pki import CertificateAuthority
from birdwatch_sandbox.envtest.promserver import PrometheusServer

USER = "birdwatch"
PASSWORD = "pw-for-promtest-only"
# bcrypt of PASSWORD at cost 4 (the lowest, so Prometheus checks it quickly), made once with crypt(3).
PASSWORD_BCRYPT = "$2b$04$c.e/qDpeKxUgyJ1GQRH8luV5P0aAxwA1lXsOlV1kOh2cKflfZFWk."
TOKEN = "tok-for-promtest-only"

# Scheduling slack for timing assertions: upper bounds only, so a busy machine cannot make a test pass wrongly.
SLACK = 0.3


@dataclass
class Attempts:
    """An on_error callback that remembers every failed attempt and when it ended."""

    errors: list[QueryError] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, err: QueryError) -> None:
        self.errors.append(err)
        self.times.append(time.monotonic())
        self.first.set()


# --- the session's real Prometheus ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series(exporter: Exporter, prometheus: PrometheusServer) -> Iterator[None]:
    exporter.set_gauge("promtest_error_ratio", 0.25, service="aleph", version="v04")
    for pod, value in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        exporter.set_gauge("promtest_requests", value, pod=pod)
    prometheus.wait_for_value('promtest_error_ratio{service="aleph"}', 0.25)
    prometheus.wait_for_value("count(promtest_requests)", 3)
    yield
    exporter.remove("promtest_error_ratio", service="aleph", version="v04")
    for pod in ("a", "b", "c"):
        exporter.remove("promtest_requests", pod=pod)


@pytest.fixture
async def client(prometheus: PrometheusServer) -> AsyncIterator[PrometheusClient]:
    async with PrometheusClient(PrometheusConfig(prometheus.url)) as c:
        yield c


@pytest.mark.usefixtures("series")
@pytest.mark.parametrize(
    ("promql", "expected"),
    [
        ("42", 42.0),  # a scalar
        ("scalar(vector(3.5))", 3.5),
        ("vector(0)", 0.0),  # a vector of one series: zero is a number, not "no data"
        ('promtest_error_ratio{service="aleph"}', 0.25),
        ("1 / 0", math.inf),
        ("-1 / 0", -math.inf),
    ],
)
async def test_one_number_comes_back_as_a_float(client: PrometheusClient, promql: str, expected: float) -> None:
    assert await client.query(promql) == expected


@pytest.mark.usefixtures("series")
@pytest.mark.parametrize(
    "promql",
    [
        "promtest_never_exported",  # no series
        'promtest_error_ratio{service="bet"}',
        "0 / 0",  # scalar NaN
        "vector(0) / 0",  # one series whose value is NaN
    ],
)
async def test_no_data_is_none(client: PrometheusClient, promql: str) -> None:
    assert await client.query(promql) is None


@pytest.mark.usefixtures("series")
async def test_several_series_are_ambiguous_and_the_message_says_to_aggregate(prometheus: PrometheusServer) -> None:
    attempts = Attempts()
    async with PrometheusClient(PrometheusConfig(prometheus.url), on_error=attempts) as client:
        with pytest.raises(AmbiguousResult) as raised:
            await client.query("promtest_requests", budget=5)
        # Following the advice gives one number.
        assert await client.query("sum(promtest_requests)") == 6.0

    assert not raised.value.retryable
    assert "3 series" in raised.value.message
    assert "sum(" in raised.value.message
    assert 'pod="a"' in raised.value.message  # which labels differ, to aggregate them away
    assert attempts.errors == [raised.value]  # not retried, budget or not


@pytest.mark.usefixtures("series")
async def test_a_range_vector_is_ambiguous(client: PrometheusClient) -> None:
    with pytest.raises(AmbiguousResult, match="range vector"):
        await client.query("promtest_requests[1m]")


@pytest.mark.usefixtures("series")
@pytest.mark.parametrize(
    ("promql", "says"),
    [
        ("sum(rate(istio_requests_total[5m])", "parse error: unclosed left parenthesis"),
        ("vector(1) + on() promtest_requests", "many-to-many matching not allowed"),  # HTTP 422, at evaluation
    ],
)
async def test_bad_promql_is_a_bad_query_in_prometheus_words(
    prometheus: PrometheusServer, promql: str, says: str
) -> None:
    attempts = Attempts()
    started = time.monotonic()
    async with PrometheusClient(PrometheusConfig(prometheus.url), on_error=attempts) as client:
        with pytest.raises(BadQuery) as raised:
            await client.query(promql, budget=5)

    assert says in raised.value.message
    assert str(raised.value) == raised.value.message
    assert not raised.value.retryable
    assert len(attempts.errors) == 1
    assert time.monotonic() - started < 1


async def test_a_very_long_query_works(client: PrometheusClient) -> None:
    promql = "42" + " + 0" * 5000
    assert len(promql) > 20_000
    assert await client.query(promql) == 42.0


async def test_many_canaries_share_one_client(client: PrometheusClient) -> None:
    answers = await asyncio.gather(*(client.query(f"vector({i})") for i in range(50)))
    assert answers == [float(i) for i in range(50)]


async def test_ready_against_a_running_prometheus(client: PrometheusClient) -> None:
    assert await client.ready() == (True, "ready")


# --- nothing listening ----------------------------------------------------------------------------------------


@pytest.fixture
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def test_unreachable_is_retried_with_backoff_until_the_budget_is_spent(dead_url: str) -> None:
    attempts = Attempts()
    started = time.monotonic()
    async with PrometheusClient(PrometheusConfig(dead_url), on_error=attempts) as client:
        with pytest.raises(Unavailable) as raised:
            await client.query("42", budget=1.0)
    elapsed = time.monotonic() - started

    assert 1.0 <= elapsed < 1.0 + SLACK
    # 0.2 s, then 0.4 s, then what is left of the budget: four attempts, the last at the end of the budget.
    assert len(attempts.errors) == 4
    gaps = [b - a for a, b in zip(attempts.times, attempts.times[1:], strict=False)]
    assert gaps[0] >= 0.2 * 0.9
    assert gaps[1] >= 0.4 * 0.9
    assert attempts.errors[-1] is raised.value
    assert all(e.retryable and isinstance(e, Unavailable) for e in attempts.errors)
    assert raised.value.message.startswith(f"cannot reach Prometheus at {dead_url}")


async def test_budget_zero_is_one_attempt(dead_url: str) -> None:
    attempts = Attempts()
    started = time.monotonic()
    async with PrometheusClient(PrometheusConfig(dead_url), on_error=attempts) as client:
        with pytest.raises(Unavailable):
            await client.query("42")
    assert len(attempts.errors) == 1
    assert time.monotonic() - started < 0.5


async def test_not_ready_when_nothing_listens(dead_url: str) -> None:
    async with PrometheusClient(PrometheusConfig(dead_url)) as client:
        ok, reason = await client.ready()
    assert not ok
    assert reason.startswith(f"cannot reach Prometheus at {dead_url}")


async def test_cancelling_during_backoff_cancels(dead_url: str) -> None:
    attempts = Attempts()
    async with PrometheusClient(PrometheusConfig(dead_url), on_error=attempts) as client:
        task = asyncio.create_task(client.query("42", budget=30))
        await attempts.first.wait()
        task.cancel()
        async with asyncio.timeout(1):
            with pytest.raises(asyncio.CancelledError):
                await task
    assert len(attempts.errors) == 1


# --- a fake Prometheus for what the real one cannot be made to do ---------------------------------------------

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _scalar(value: str) -> web.Response:
    return web.json_response({"status": "success", "data": {"resultType": "scalar", "result": [time.time(), value]}})


@dataclass
class FakePrometheus:
    """Answers Prometheus's query API on a real loopback socket; ``behaviour`` decides how."""

    url: str = ""
    behaviour: Behaviour | None = None
    authorizations: list[str | None] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        self.authorizations.append(request.headers.get("Authorization"))
        self.arrived.set()
        if self.behaviour is not None:
            return await self.behaviour(request)
        return _scalar("1")

    async def stall(self, request: web.Request) -> web.StreamResponse:
        await self.release.wait()
        return _scalar("1")


@pytest.fixture
async def fake() -> AsyncIterator[FakePrometheus]:
    server = FakePrometheus()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", server.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("timeout", "budget", "per_attempt", "attempts_made"),
    [
        pytest.param(0.3, 0.0, 0.3, 1, id="one-attempt-bounded-by-timeout"),
        pytest.param(0.3, 1.0, 0.3, 3, id="each-retry-bounded-by-timeout"),
        pytest.param(10.0, 1.0, 1.0, 1, id="bounded-by-the-budget-left"),
        pytest.param(10.0, 0.2, 0.5, 1, id="but-given-half-a-second"),
    ],
)
async def test_a_stalled_prometheus_is_given_up_on_in_time(
    fake: FakePrometheus, timeout: float, budget: float, per_attempt: float, attempts_made: int
) -> None:
    fake.behaviour = fake.stall
    attempts = Attempts()
    started = time.monotonic()
    async with PrometheusClient(PrometheusConfig(fake.url, timeout=timeout), on_error=attempts) as client:
        with pytest.raises(Unavailable) as raised:
            await client.query("42", budget=budget)
    elapsed = time.monotonic() - started

    assert len(attempts.errors) == attempts_made
    for arrival, failed in zip(fake.arrivals, attempts.times, strict=True):
        assert per_attempt - 0.1 <= failed - arrival <= per_attempt + SLACK
    assert elapsed <= max(budget, per_attempt) + per_attempt + SLACK
    assert raised.value.retryable
    assert f"did not answer within {per_attempt:.3g} s" in raised.value.message


async def test_the_query_goes_as_the_form_aiohttp_would_make_of_it(fake: FakePrometheus) -> None:
    # The form body is encoded once per expression (not by aiohttp on every query): the same bytes, the same type.
    seen: list[tuple[str, bytes, str]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append((request.content_type, await request.read(), (await request.post())["query"]))
        return _scalar("1")

    fake.behaviour = record
    promql = 'sum(rate(x{a="b", c=~"5.."}[30s])) / 2 + vector(0) # é&=?'
    async with PrometheusClient(PrometheusConfig(fake.url)) as client:
        assert await client.query(promql) == 1.0
        assert await client.query(promql) == 1.0
    expected = aiohttp.FormData({"query": promql})()
    assert seen == [("application/x-www-form-urlencoded", expected.decode().encode(), promql)] * 2
    assert expected.content_type == "application/x-www-form-urlencoded"


async def test_a_content_type_the_provider_sets_is_kept(fake: FakePrometheus) -> None:
    types: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        types.append(request.headers["Content-Type"])
        return _scalar("1")

    fake.behaviour = record
    spec = ProviderSpec(name="p", type="prometheus", address=fake.url, headers={"content-type": "text/x-mine"})
    provider = PrometheusProvider(spec)
    try:
        assert await provider.query("42") == 1.0
    finally:
        await provider.close()
    assert types == ["text/x-mine"]


async def test_cancelling_a_waiting_query_cancels(fake: FakePrometheus) -> None:
    fake.behaviour = fake.stall
    attempts = Attempts()
    async with PrometheusClient(PrometheusConfig(fake.url), on_error=attempts) as client:
        task = asyncio.create_task(client.query("42", budget=30))
        await fake.arrived.wait()
        task.cancel()
        async with asyncio.timeout(1):
            with pytest.raises(asyncio.CancelledError):
                await task
    assert attempts.errors == []


async def _proxy_error_page(request: web.Request) -> web.StreamResponse:
    return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html")


async def _login_page(request: web.Request) -> web.StreamResponse:
    return web.Response(status=200, text="<html><body>Please sign in</body></html>", content_type="text/html")


async def _overloaded(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"status": "error", "errorType": "timeout", "error": "query timed out in expression evaluation"}, status=503
    )


@pytest.mark.parametrize(
    ("behaviour", "says"),
    [
        pytest.param(_proxy_error_page, "HTTP 502 Bad Gateway: <html><body><h1>502 Bad Gateway", id="proxy-502"),
        pytest.param(_login_page, "not Prometheus's JSON (HTTP 200, text/html): <html><body>Please sign", id="html"),
        pytest.param(_overloaded, "HTTP 503 Service Unavailable: timeout: query timed out", id="503"),
    ],
)
async def test_an_answer_that_is_not_a_result_is_unavailable(
    fake: FakePrometheus, behaviour: Behaviour, says: str
) -> None:
    fake.behaviour = behaviour
    attempts = Attempts()
    async with PrometheusClient(PrometheusConfig(fake.url), on_error=attempts) as client:
        with pytest.raises(Unavailable) as raised:
            await client.query("42", budget=0.3)
    assert raised.value.retryable
    assert says in raised.value.message
    assert len(attempts.errors) >= 2  # retried


async def test_the_bearer_token_is_read_again_when_the_file_changes(fake: FakePrometheus, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    async with PrometheusClient(PrometheusConfig(fake.url, bearer_token_file=token_file)) as client:
        assert await client.query("42") == 1.0
        assert (await client.ready())[0]

        mtime = token_file.stat().st_mtime_ns
        token_file.write_text("second-token\n")
        os.utime(token_file, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))  # coarse clocks: make it differ
        assert await client.query("42") == 1.0

        token_file.unlink()
        with pytest.raises(Unavailable, match=f"cannot read the bearer token file {token_file}"):
            await client.query("42")

    assert fake.authorizations == ["Bearer first-token", "Bearer first-token", "Bearer second-token"]


async def _echo_credentials(request: web.Request) -> web.StreamResponse:
    # What a misbehaving proxy might do: quote the request back in its error.
    said = f"upstream rejected request with Authorization: {request.headers.get('Authorization')}"
    return web.json_response({"status": "error", "errorType": "internal", "error": said}, status=500)


@pytest.mark.parametrize("auth", ["bearer", "basic"])
async def test_credentials_never_show(fake: FakePrometheus, tmp_path: Path, auth: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    if auth == "bearer":
        config = PrometheusConfig(fake.url, bearer_token_file=token_file)
    else:
        config = PrometheusConfig(fake.url, username=USER, password=PASSWORD)
    fake.behaviour = _echo_credentials
    async with PrometheusClient(config) as client:
        with pytest.raises(Unavailable) as raised:
            await client.query("42")

    assert fake.authorizations  # the server did get them
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for shown in (repr(config), str(config), raised.value.message, str(raised.value), repr(raised.value)):
        for secret in (TOKEN, PASSWORD, basic):
            assert secret not in shown
    assert "Authorization: Bearer ***" in raised.value.message or "Authorization: Basic ***" in raised.value.message


# --- a real Prometheus behind TLS and basic auth ----------------------------------------------------------------


@dataclass(frozen=True)
class Secured:
    url: str
    ca_file: Path


@pytest.fixture(scope="module")
def secured_prometheus(assets: Assets, log_dir: Path) -> Iterator[Secured]:
    folder = log_dir / "secured-prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(folder / "pki")
    pair = ca.issue("prometheus", common_name="127.0.0.1", server=True)
    web_config = folder / "web.yml"
    web_config.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": str(pair.cert), "key_file": str(pair.key)},
                "basic_auth_users": {USER: PASSWORD_BCRYPT},
            }
        )
    )
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": []}))
    port = free_port()
    server = Server(
        "secured-prometheus",
        [
            str(assets.prometheus),
            f"--config.file={config}",
            f"--web.config.file={web_config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        folder / "prometheus.log",
    )
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(ca.cert))
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def ready() -> bool:
        request = urllib.request.Request(f"{url}/-/ready", headers={"Authorization": basic})  # noqa: S310 - https
        with urllib.request.urlopen(request, context=context, timeout=5) as resp:  # noqa: S310 - loopback
            return bool(resp.status == 200)

    try:
        server.start()
        wait_until("secured Prometheus /-/ready", ready, timeout=60, server=server)
        yield Secured(url, ca.cert)
    finally:
        server.stop()


async def test_tls_and_basic_auth_against_a_real_prometheus(secured_prometheus: Secured) -> None:
    config = PrometheusConfig(
        secured_prometheus.url, username=USER, password=PASSWORD, ca_file=secured_prometheus.ca_file
    )
    async with PrometheusClient(config) as client:
        assert await client.query("scalar(vector(7))") == 7.0
        assert await client.ready() == (True, "ready")


async def test_a_wrong_password_is_refused_at_once(secured_prometheus: Secured) -> None:
    attempts = Attempts()
    config = PrometheusConfig(
        secured_prometheus.url, username=USER, password="not-the-" + PASSWORD, ca_file=secured_prometheus.ca_file
    )
    async with PrometheusClient(config, on_error=attempts) as client:
        with pytest.raises(QueryError) as raised:
            await client.query("42", budget=5)
        ok, reason = await client.ready()

    assert not raised.value.retryable
    assert "refused the credentials: HTTP 401" in raised.value.message
    assert PASSWORD not in raised.value.message
    assert len(attempts.errors) == 1
    assert not ok
    assert "HTTP 401" in reason


async def test_an_untrusted_certificate_is_refused_at_once(secured_prometheus: Secured) -> None:
    attempts = Attempts()
    config = PrometheusConfig(secured_prometheus.url, username=USER, password=PASSWORD)  # no ca_file
    async with PrometheusClient(config, on_error=attempts) as client:
        with pytest.raises(QueryError) as raised:
            await client.query("42", budget=5)
        ok, reason = await client.ready()

    assert not raised.value.retryable
    assert "certificate" in raised.value.message
    assert len(attempts.errors) == 1
    assert not ok
    assert "certificate" in reason


async def test_plain_http_to_a_tls_prometheus_says_so(secured_prometheus: Secured) -> None:
    config = PrometheusConfig(secured_prometheus.url.replace("https://", "http://"), username=USER, password=PASSWORD)
    async with PrometheusClient(config) as client:
        with pytest.raises(QueryError) as raised:
            await client.query("42", budget=5)
    assert not raised.value.retryable
    assert "HTTP 400" in raised.value.message
    assert "HTTPS server" in raised.value.message


# --- configuration and life cycle -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"url": "prometheus:9090"}, "must be http"),
        ({"url": "ftp://prometheus:9090"}, "must be http"),
        ({"url": f"http://{USER}:{PASSWORD}@prometheus:9090"}, "not in the url"),
        ({"url": "http://prometheus:9090", "password": PASSWORD}, "needs a username"),
        ({"url": "http://p:9090", "username": USER, "bearer_token_file": Path("/t")}, "not both"),
        ({"url": "http://prometheus:9090", "timeout": 0}, "must be positive"),
    ],
)
def test_a_config_that_cannot_work_is_refused(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says) as raised:
        PrometheusConfig(**kwargs)  # type: ignore[arg-type]
    assert PASSWORD not in str(raised.value)


async def test_a_closed_client_is_not_used_again(client: PrometheusClient) -> None:
    assert await client.query("1") == 1.0
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.query("1")
