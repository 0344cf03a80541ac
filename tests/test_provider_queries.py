"""Each provider type's reading of its backend, asked directly (no rollout): a number, no data, answers that are not
one number, queries the backend rejects, a backend that is gone; the providers file's checks at start-up; and a
running controller's /readyz and /metrics per provider. Real servers where they run here, as in test_providers.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from birdwatch.cli import build_parser
from birdwatch.config import settings_from
from birdwatch.errors import ConfigError
from birdwatch.providers.base import Provider
from birdwatch.providers.config import ProviderSpec, parse_providers
from birdwatch.providers.errors import AmbiguousResult, BadQuery, QueryError, Unavailable
from birdwatch.providers.registry import build_providers
from birdwatch_sandbox.envtest.backends import Graphite, InfluxDB, VictoriaMetrics
from birdwatch_sandbox.envtest.controlplane import ControlPlane, free_port
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import controller, eventually
from jsonserver import JsonServer
from lokifake import FakeLoki
from providerkit import providers_file, secret_file


def provider(entry: dict[str, Any]) -> Provider:
    (spec,) = parse_providers({"providers": [{"name": "p", **entry}]})
    (built,) = [p for p in build_providers([spec]) if p.name == "p"]
    return built


async def test_victoriametrics_as_a_prometheus_provider(victoria: VictoriaMetrics) -> None:
    ns = f"q{time.monotonic_ns()}"
    victoria.push(f'bwq_errors{{ns="{ns}",pod="a"}} 0.25\nbwq_errors{{ns="{ns}",pod="b"}} 0.5')
    p = provider({"type": "prometheus", "address": victoria.url})
    try:
        await eventually(lambda: p.query(f'max(bwq_errors{{ns="{ns}"}})'), what="the pushed samples")
        assert await p.query(f'max(bwq_errors{{ns="{ns}"}})') == 0.5
        assert await p.query(f'bwq_errors{{ns="{ns}-none"}}') is None
        with pytest.raises(AmbiguousResult, match="returned 2 series"):
            await p.query(f'bwq_errors{{ns="{ns}"}}')
        with pytest.raises(BadQuery, match="unexpected token"):
            await p.query("max(bwq_errors")
        assert await p.ready() == (True, "ready")
    finally:
        await p.close()


async def test_influxdb_readings(influx: InfluxDB) -> None:
    ns = f"q{time.monotonic_ns()}"
    now = int(time.time())
    influx.write("bw", f"latency,ns={ns},pod=a value=0.5 {now - 1}\nlatency,ns={ns},pod=b value=0.7 {now}")
    p = provider({"type": "influxdb", "address": influx.url, "database": "bw"})
    try:
        assert await p.query(f"SELECT max(value) FROM latency WHERE ns = '{ns}'") == 0.7  # noqa: S608
        assert await p.query(f"SELECT last(value) FROM latency WHERE ns = '{ns}-none'") is None  # noqa: S608
        with pytest.raises(AmbiguousResult, match="2 rows"):
            await p.query(f"SELECT value FROM latency WHERE ns = '{ns}'")  # noqa: S608
        with pytest.raises(AmbiguousResult, match="2 series"):
            await p.query(f"SELECT last(value) FROM latency WHERE ns = '{ns}' GROUP BY pod")  # noqa: S608
        with pytest.raises(BadQuery, match="error parsing query"):
            await p.query("SELECT FROM")
        assert await p.ready() == (True, "ready")
    finally:
        await p.close()
    other = provider({"type": "influxdb", "address": influx.url, "database": "nowhere"})
    try:
        with pytest.raises(BadQuery, match="database not found: nowhere"):
            await other.query("SELECT last(value) FROM latency")
    finally:
        await other.close()


async def test_graphite_readings(graphite: Graphite) -> None:
    ns = f"q{time.monotonic_ns()}"
    graphite.send(f"bwq.{ns}.a.errors", 0.25)
    graphite.send(f"bwq.{ns}.b.errors", 0.75)
    p = provider({"type": "graphite", "address": graphite.url})
    try:
        await eventually(lambda: p.query(f"maxSeries(bwq.{ns}.*.errors)"), what="the points")
        assert await p.query(f"maxSeries(bwq.{ns}.*.errors)") == 0.75
        assert await p.query(f"bwq.{ns}.none.errors") is None
        with pytest.raises(AmbiguousResult, match="returned 2 series"):
            await p.query(f"bwq.{ns}.*.errors")
        with pytest.raises(BadQuery, match="unknown function"):
            await p.query("nosuchfunction(x)")
        assert await p.ready() == (True, "ready")
    finally:
        await p.close()


async def test_web_readings_and_a_rotated_key(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("first-key\n")
    async with JsonServer(api_key="first-key") as server:
        assert isinstance(server, JsonServer)
        server.document = {"a": {"ratio": 0.2}, "s": {"ratio": "0.3"}, "n": {"ratio": None}, "many": [1, 2]}
        p = provider({"type": "web", "address": server.endpoint, "header_files": {"X-Api-Key": str(key)}})
        try:
            assert await p.query("$.a.ratio") == 0.2
            assert await p.query("$.s.ratio") == 0.3
            assert await p.query("$.n.ratio") is None
            assert await p.query("$.missing") is None
            with pytest.raises(AmbiguousResult, match="matched 2 values"):
                await p.query("$.many[*]")
            with pytest.raises(BadQuery, match="does not parse"):
                await p.query("$.a[")
            # The Secret is rotated: the next request carries the new key, with no restart.
            server.api_key = "second-key"
            with pytest.raises(QueryError, match="refused the credentials"):
                await p.query("$.a.ratio")
            key.write_text("second-key\n")
            assert await p.query("$.a.ratio") == 0.2
        finally:
            await p.close()


async def test_a_loki_log_query_is_refused_with_a_hint() -> None:
    async with FakeLoki() as loki:
        p = provider({"type": "loki", "address": loki.url})
        try:
            with pytest.raises(AmbiguousResult, match="make it a metric query"):
                await p.query('{ns="x"}')
        finally:
            await p.close()


async def test_a_backend_that_is_gone_is_unavailable_within_the_budget() -> None:
    p = provider({"type": "influxdb", "address": f"http://127.0.0.1:{free_port()}", "database": "x", "timeout": 1})
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="cannot reach InfluxDB"):
            await p.query("SELECT 1", budget=1.5)
        assert 1.0 <= time.monotonic() - started < 4.0  # retried within the budget, then given up
        ok, why = await p.ready()
        assert not ok
        assert "cannot reach InfluxDB" in why
    finally:
        await p.close()


def settings(env: dict[str, str]) -> object:
    return settings_from(build_parser(env).parse_args(["run"]), env)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"name": "x", "type": "influxdb"}, "address (an http(s) URL) is required"),
        ({"name": "x", "type": "influxdb", "address": "http://i:8086"}, "an influxdb provider needs a database"),
        ({"name": "x", "type": "statsd", "address": "http://i"}, "type must be one of prometheus, influxdb"),
        ({"name": "X", "type": "web", "address": "http://i"}, "must be a DNS label"),
        ({"name": "x", "type": "web", "address": "http://u:p@i"}, "not in the address"),
        ({"name": "x", "type": "web", "address": "http://i", "password": "p"}, "password must come from a file"),
        ({"name": "x", "type": "web", "address": "http://i", "databse": "d"}, "unknown key(s) for type web: databse"),
        ({"name": "x", "type": "datadog", "address": "http://d"}, "api_key_file must name a file"),
        ({"name": "x", "type": "newrelic", "address": "http://n", "account_id": "one"}, "account_id must be"),
        ({"name": "x", "type": "web", "address": "http://i", "token_file": "/nonexistent"}, "does not exist"),
    ],
)
def test_the_providers_file_is_checked_at_start_up(tmp_path: Path, entry: dict[str, Any], says: str) -> None:
    file = tmp_path / "providers.yaml"
    file.write_text(yaml.safe_dump({"providers": [entry]}))
    with pytest.raises(ConfigError) as refused:
        settings({"BIRDWATCH_PROVIDERS_FILE": str(file)})
    assert says in str(refused.value)
    assert str(file) in str(refused.value)


def test_two_providers_of_one_name_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text("providers:\n" + "  - {name: a, type: web, address: 'http://i'}\n" * 2)
    with pytest.raises(ConfigError, match="'a' is used twice"):
        settings({"BIRDWATCH_PROVIDERS_FILE": str(file)})


def test_the_file_names_no_secret_and_its_specs_keep_paths(tmp_path: Path) -> None:
    key = secret_file(tmp_path, "k", "a-SECRET-value")
    (spec,) = parse_providers({"providers": [{"name": "w", "type": "web", "address": "http://i", "token_file": key}]})
    assert isinstance(spec, ProviderSpec)
    assert "SECRET" not in repr(spec)


async def test_readyz_and_metrics_say_which_providers_answer(
    control_plane: ControlPlane, prometheus: PrometheusServer, influx: InfluxDB, tmp_path: Path, namespace: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    file = providers_file(
        tmp_path,
        {
            "influx": {"type": "influxdb", "address": influx.url, "database": "bw"},
            "gone": {"type": "influxdb", "address": dead, "database": "bw"},
        },
    )
    async with controller(
        control_plane, prometheus_url=prometheus.url, namespaces=[namespace], extra=["--providers-file", str(file)]
    ) as app:
        assert app.health is not None
        base = f"http://127.0.0.1:{app.health.port}"
        async with aiohttp.ClientSession() as session:

            async def readyz() -> str | None:
                async with session.get(f"{base}/readyz") as resp:
                    text = await resp.text()
                return text if "not checked yet" not in text else None

            text = await eventually(readyz, what="the providers' first check")
            lines = text.splitlines()
            assert "[+]prometheus ready" in lines, text
            assert "[+]provider/influx ready" in lines, text
            gone = next(line for line in lines if line.startswith("[-]provider/gone"))
            assert "cannot reach InfluxDB" in gone, text
            assert dead in gone, text
            assert lines[-1] == "not ok"
            async with session.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
    assert "# TYPE birdwatch_provider_queries_total counter" in metrics
    assert "# TYPE birdwatch_provider_query_duration_seconds histogram" in metrics
