"""Real metric backends for the provider tests, each a child process on a free loopback port with its data in a
temp folder: InfluxDB 1.x and VictoriaMetrics (installed, when missing, by hack/install-backends.sh)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .assets import REPO
from .controlplane import Server, free_port, wait_until

INSTALL_SCRIPT = REPO / "hack" / "install-backends.sh"


@dataclass(frozen=True)
class BackendBinaries:
    influxd: Path
    victoria_metrics: Path
    carbon_cache: Path
    graphite_web: Path | None


def ensure_backends() -> BackendBinaries:
    """Install what is missing (first run on a machine only) and say where everything is."""
    done = subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return BackendBinaries(
        influxd=Path(found["influxd"]),
        victoria_metrics=Path(found["victoria-metrics"]),
        carbon_cache=Path(found["carbon-cache"]),
        graphite_web=Path(found["graphite-web"]) if found.get("graphite-web") else None,
    )


def http(method: str, url: str, body: bytes | None = None, *, timeout: float = 5) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method)  # noqa: S310 - loopback URLs built here
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        raise OSError(str(exc)) from exc


def _answers(url: str, status: int) -> bool:
    try:
        return http("GET", url)[0] == status
    except OSError:
        return False


@dataclass
class InfluxDB:
    """InfluxDB 1.x with its HTTP API on a free port; ``stop()`` and ``start()`` again keep port and data."""

    workdir: Path
    binary: Path
    port: int = 0
    server: Server | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        rpc = free_port()
        config = self.workdir / "influxdb.conf"
        config.write_text(
            f"""reporting-enabled = false
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{self.workdir / "meta"}"
[data]
  dir = "{self.workdir / "data"}"
  wal-dir = "{self.workdir / "wal"}"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
"""
        )
        self.server = Server(
            "influxdb", [str(self.binary), "run", "-config", str(config)], self.workdir / "influxd.log"
        )
        self.server.start()
        wait_until("InfluxDB /ping", lambda: _answers(f"{self.url}/ping", 204), timeout=30, server=self.server)

    def query(self, q: str, *, db: str = "") -> dict[str, object]:
        params = urllib.parse.urlencode({"q": q, "db": db, "epoch": "s"})
        status, body = http("POST", f"{self.url}/query?{params}")
        if status != 200:
            raise RuntimeError(f"InfluxQL {q!r}: HTTP {status} {body[:300]}")
        return dict(json.loads(body))

    def write(self, db: str, line: str) -> None:
        status, body = http("POST", f"{self.url}/write?db={db}&precision=s", line.encode())
        if status != 204:
            raise RuntimeError(f"write to {db}: HTTP {status} {body[:300]}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@dataclass
class VictoriaMetrics:
    """Single-node VictoriaMetrics, samples pushed in Prometheus's text format, visible to queries within a second
    (no latency offset, no response cache)."""

    workdir: Path
    binary: Path
    port: int = 0
    server: Server | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        argv = [
            str(self.binary),
            f"-storageDataPath={self.workdir / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-loggerLevel=WARN",
            "-search.latencyOffset=0s",
            "-search.disableCache",
        ]
        self.server = Server("victoria-metrics", argv, self.workdir / "victoria-metrics.log")
        self.server.start()
        wait_until(
            "VictoriaMetrics /-/ready", lambda: _answers(f"{self.url}/-/ready", 200), timeout=30, server=self.server
        )

    def push(self, text: str) -> None:
        status, body = http("POST", f"{self.url}/api/v1/import/prometheus", text.encode())
        if status != 204:
            raise RuntimeError(f"import: HTTP {status} {body[:300]}")

    def value(self, promql: str) -> float | None:
        status, body = http("POST", f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
