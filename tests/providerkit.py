"""The metric backends a provider test runs birdwatch against, behind one small interface: set the canary's value
(and wait until the backend answers it), the query in the backend's language, a query it rejects, a providers-file
entry, and a way to make it stop answering and come back.

Real servers where they run here (VictoriaMetrics, InfluxDB, Graphite: session-wide, started once), a real local
HTTP server for ``web``, and wire-protocol servers for Datadog, New Relic and Loki (see each fake's docstring for
why).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from birdwatch_sandbox.envtest.backends import BackendBinaries, Graphite, InfluxDB, VictoriaMetrics, ensure_backends
from datadogfake import FakeDatadog
from jsonserver import JsonServer
from lokifake import FakeLoki
from newrelicfake import FakeNewRelic
from wireserver import WireServer

# Known secrets: none may be found in anything birdwatch says (tests/test_provider_secrets.py looks).
DD_API_KEY = "dd-api-SECRET-1111"
DD_APP_KEY = "dd-app-SECRET-2222"
NR_API_KEY = "NRAK-SECRET-3333"
WEB_API_KEY = "web-SECRET-4444"
INFLUX_PASSWORD = "influx-SECRET-5555"
VM_TOKEN = "vm-SECRET-6666"
NR_ACCOUNT = 424242


class Backend(Protocol):
    type: str
    rejected: str  # a query the backend rejects
    says: str  # words of the backend's own in its rejection

    def entry(self, secrets: Path) -> dict[str, Any]: ...

    def metric(self, ns: str) -> str: ...

    async def set(self, ns: str, value: float) -> None: ...

    async def stop(self) -> None: ...

    async def start(self) -> None: ...


def secret_file(folder: Path, name: str, value: str) -> str:
    path = folder / name
    path.write_text(value + "\n")
    return str(path)


@dataclass
class VictoriaBackend:
    vm: VictoriaMetrics
    type: str = "prometheus"
    rejected: str = 'max(bwtest_errors{ns="x"}'
    says: str = "unexpected token"

    def entry(self, secrets: Path) -> dict[str, Any]:
        return {"type": "prometheus", "address": self.vm.url}

    def metric(self, ns: str) -> str:
        return f'max(bwtest_errors{{ns="{ns}"}})'

    async def set(self, ns: str, value: float) -> None:
        await asyncio.to_thread(self.vm.push, f'bwtest_errors{{ns="{ns}"}} {value}')
        await _until(lambda: self.vm.value(self.metric(ns)) == value, f"VictoriaMetrics to answer {value}")

    async def stop(self) -> None:
        await asyncio.to_thread(self.vm.stop)

    async def start(self) -> None:
        await asyncio.to_thread(self.vm.start)


@dataclass
class InfluxBackend:
    influx: InfluxDB
    type: str = "influxdb"
    rejected: str = "SELEC last(value) FROM errors"
    says: str = "error parsing query: found SELEC"

    def entry(self, secrets: Path) -> dict[str, Any]:
        return {"type": "influxdb", "address": self.influx.url, "database": "bw"}

    def metric(self, ns: str) -> str:
        return f'SELECT last("value") FROM "errors" WHERE "ns" = \'{ns}\''  # noqa: S608 - InfluxQL, a test's own namespace

    async def set(self, ns: str, value: float) -> None:
        await asyncio.to_thread(self.influx.write, "bw", f"errors,ns={ns} value={value} {int(time.time())}")

        def seen() -> bool:
            series = self.influx.query(self.metric(ns), db="bw")["results"][0].get("series")  # type: ignore[index]
            return bool(series) and series[0]["values"][0][1] == value

        await _until(seen, f"InfluxDB to answer {value}")

    async def stop(self) -> None:
        await asyncio.to_thread(self.influx.stop)

    async def start(self) -> None:
        await asyncio.to_thread(self.influx.start)


@dataclass
class GraphiteBackend:
    graphite: Graphite
    type: str = "graphite"
    rejected: str = "nosuchfunction(bwtest.x.errors)"
    says: str = "unknown function: nosuchfunction"

    def entry(self, secrets: Path) -> dict[str, Any]:
        return {"type": "graphite", "address": self.graphite.url, "from": "-5min"}

    def metric(self, ns: str) -> str:
        return f"maxSeries(bwtest.{ns}.errors)"

    async def set(self, ns: str, value: float) -> None:
        await asyncio.to_thread(self.graphite.send, f"bwtest.{ns}.errors", value)
        await _until(lambda: self.graphite.last(self.metric(ns)) == value, f"Graphite to answer {value}")

    async def stop(self) -> None:
        await asyncio.to_thread(self.graphite.stop)

    async def start(self) -> None:
        await asyncio.to_thread(self.graphite.start)


@dataclass
class WireBackend:
    """A backend served from this test's event loop; ``stop()`` refuses connections until ``start()``."""

    server: WireServer
    type: str
    rejected: str
    says: str

    async def stop(self) -> None:
        await self.server.stop()

    async def start(self) -> None:
        await self.server.start()


class WebBackend(WireBackend):
    def __init__(self, server: JsonServer) -> None:
        super().__init__(server, "web", "$.stats[", "does not parse")
        self.json = server
        server.document = {}

    def entry(self, secrets: Path) -> dict[str, Any]:
        return {
            "type": "web",
            "address": self.json.endpoint,
            "header_files": {"X-Api-Key": secret_file(secrets, "web-key", WEB_API_KEY)},
        }

    def metric(self, ns: str) -> str:
        return f"$['{ns}'].errors"

    async def set(self, ns: str, value: float) -> None:
        self.json.document[ns] = {"errors": value, "requests": 100}


class LokiBackend(WireBackend):
    def __init__(self, server: FakeLoki) -> None:
        super().__init__(server, "loki", 'sum(rate({ns="x"} [1m])', "parse error at line 1")

    def entry(self, secrets: Path) -> dict[str, Any]:
        return {"type": "loki", "address": self.server.url, "org_id": "team-aleph"}

    def metric(self, ns: str) -> str:
        return f'sum(rate({{ns="{ns}"}} |= "error" [1m]))'

    async def set(self, ns: str, value: float) -> None:
        self.server.values[ns] = value


class DatadogBackend(WireBackend):
    def __init__(self, server: FakeDatadog) -> None:
        super().__init__(server, "datadog", "avg:bwtest.errors{ns:x", "Error parsing query")

    def entry(self, secrets: Path) -> dict[str, Any]:
        return {
            "type": "datadog",
            "address": self.server.url,
            "api_key_file": secret_file(secrets, "dd-api-key", DD_API_KEY),
            "application_key_file": secret_file(secrets, "dd-app-key", DD_APP_KEY),
        }

    def metric(self, ns: str) -> str:
        return f"avg:bwtest.errors{{ns:{ns}}}"

    async def set(self, ns: str, value: float) -> None:
        self.server.values[f"bwtest.errors{{ns:{ns}}}"] = value


class NewRelicBackend(WireBackend):
    def __init__(self, server: FakeNewRelic) -> None:
        super().__init__(server, "newrelic", "SELEC latest(errors) FROM Metric", "NRQL Syntax Error")
        self.nr = server

    def entry(self, secrets: Path) -> dict[str, Any]:
        return {
            "type": "newrelic",
            "address": self.nr.endpoint,
            "account_id": NR_ACCOUNT,
            "api_key_file": secret_file(secrets, "nr-key", NR_API_KEY),
        }

    def metric(self, ns: str) -> str:
        return f"SELECT latest(errors) FROM Metric WHERE ns = '{ns}' SINCE 1 minute ago"  # noqa: S608 - NRQL

    async def set(self, ns: str, value: float) -> None:
        self.server.values[f"errors{{{ns}}}"] = value


async def _until(probe: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(probe):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def providers_file(folder: Path, entries: dict[str, dict[str, Any]]) -> Path:
    path = folder / "providers.yaml"
    path.write_text(yaml.safe_dump({"providers": [{"name": n, **e} for n, e in entries.items()]}))
    return path


# --- fixtures (registered once, in conftest.py: imported into each test module they would start twice) -----------

TYPES = ["victoriametrics", "influxdb", "graphite", "web", "loki", "datadog", "newrelic"]


@pytest.fixture(scope="session")
def backend_binaries() -> BackendBinaries:
    return ensure_backends()


@pytest.fixture(scope="session")
def victoria(backend_binaries: BackendBinaries, log_dir: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(log_dir / "victoria-metrics", backend_binaries.victoria_metrics)
    started = time.monotonic()
    server.start()
    print(f"VictoriaMetrics started in {time.monotonic() - started:.2f} s")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def influx(backend_binaries: BackendBinaries, log_dir: Path) -> Iterator[InfluxDB]:
    server = InfluxDB(log_dir / "influxdb", backend_binaries.influxd)
    started = time.monotonic()
    server.start()
    server.query("CREATE DATABASE bw")
    print(f"InfluxDB started in {time.monotonic() - started:.2f} s")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def graphite(backend_binaries: BackendBinaries, log_dir: Path) -> Iterator[Graphite]:
    assert backend_binaries.graphite_web is not None, "hack/install-backends.sh found no graphite-web"
    server = Graphite(log_dir / "graphite", backend_binaries.carbon_cache, backend_binaries.graphite_web)
    started = time.monotonic()
    server.start()
    print(f"Graphite (carbon-cache and graphite-web) started in {time.monotonic() - started:.2f} s")
    yield server
    server.stop()


@asynccontextmanager
async def backend_of(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The backend of ``kind``, up for the test (a real session server is started again if a test stopped it)."""
    if kind == "victoriametrics":
        vm = request.getfixturevalue("victoria")
        yield VictoriaBackend(vm)
        if vm.server is None or not vm.server.alive():
            vm.start()
        return
    if kind == "influxdb":
        influx = request.getfixturevalue("influx")
        yield InfluxBackend(influx)
        if influx.server is None or not influx.server.alive():
            influx.start()
        return
    if kind == "graphite":
        graphite = request.getfixturevalue("graphite")
        yield GraphiteBackend(graphite)
        if not graphite.alive():
            graphite.stop()
            graphite.start()
        return
    server: WireServer
    backend: WireBackend
    if kind == "web":
        server = JsonServer(api_key=WEB_API_KEY)
        backend = WebBackend(server)
    elif kind == "loki":
        server = FakeLoki()
        backend = LokiBackend(server)
    elif kind == "datadog":
        server = FakeDatadog(api_key=DD_API_KEY, app_key=DD_APP_KEY)
        backend = DatadogBackend(server)
    elif kind == "newrelic":
        server = FakeNewRelic(api_key=NR_API_KEY, account=NR_ACCOUNT)
        backend = NewRelicBackend(server)
    else:
        raise ValueError(kind)
    async with server:
        yield backend
