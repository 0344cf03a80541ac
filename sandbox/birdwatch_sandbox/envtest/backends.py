"""Real metric backends for the provider tests, each a child process on a free loopback port with its data in a
temp folder: InfluxDB 1.x, VictoriaMetrics and Graphite (installed, when missing, by hack/install-backends.sh)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
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
        try:
            wait_until("InfluxDB /ping", lambda: _answers(f"{self.url}/ping", 204), timeout=30, server=self.server)
        except BaseException:
            self.stop()  # a fixture whose set-up fails is never torn down
            raise

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
        try:
            wait_until(
                "VictoriaMetrics /-/ready", lambda: _answers(f"{self.url}/-/ready", 200), timeout=30, server=self.server
            )
        except BaseException:
            self.stop()  # a fixture whose set-up fails is never torn down
            raise

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


@dataclass
class Graphite:
    """Graphite as it is deployed: carbon-cache (plaintext receiver, whisper files, the cache query port) and
    graphite-web (the Django app's render API, on Django's own server), both run by Debian's python3, with their
    settings, data and logs in ``workdir``. Points are visible to the render API at once through carbon's cache."""

    workdir: Path
    carbon: Path
    webapp: Path
    port: int = 0
    line_port: int = 0
    servers: list[Server] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        storage, logs = self.workdir / "storage", self.workdir / "log"
        for folder in (storage / "whisper", logs, self.workdir / "pid"):
            folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.line_port = self.line_port or free_port()
        query_port, pickle_port = free_port(), free_port()
        (self.workdir / "carbon.conf").write_text(
            f"""[cache]
STORAGE_DIR = {storage}/
LOCAL_DATA_DIR = {storage}/whisper/
CONF_DIR = {self.workdir}/
LOG_DIR = {logs}/
PID_DIR = {self.workdir / "pid"}/
DATABASE = whisper
ENABLE_LOGROTATION = False
ENABLE_TAGS = False
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = 5000
MAX_CREATES_PER_MINUTE = inf
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {self.line_port}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle_port}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {query_port}
"""
        )
        (self.workdir / "storage-schemas.conf").write_text("[default]\npattern = .*\nretentions = 1s:1h\n")
        (self.workdir / "bw_graphite_settings.py").write_text(
            f"""SECRET_KEY = "birdwatch-tests-only"
STORAGE_DIR = "{storage}/"
WHISPER_DIR = "{storage}/whisper/"
LOG_DIR = "{logs}/"
INDEX_FILE = "{storage}/index"
CARBONLINK_HOSTS = ["127.0.0.1:{query_port}:a"]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": "{storage}/graphite.db"}}}}
"""
        )
        carbon = Server(
            "carbon-cache",
            ["/usr/bin/python3", str(self.carbon), f"--config={self.workdir / 'carbon.conf'}", "--debug", "start"],
            logs / "carbon-cache.out",
        )
        # graphite-web reads GRAPHITE_SETTINGS_MODULE from its environment; the Server runs children with ours.
        web = Server(
            "graphite-web",
            [
                "/usr/bin/env",
                f"PYTHONPATH={self.workdir}",
                "GRAPHITE_SETTINGS_MODULE=bw_graphite_settings",
                "DJANGO_SETTINGS_MODULE=graphite.settings",
                "/usr/bin/python3",
                "-m",
                "django",
                "runserver",
                "--noreload",
                f"127.0.0.1:{self.port}",
            ],
            logs / "graphite-web.out",
        )
        carbon.start()
        web.start()
        self.servers = [carbon, web]
        try:
            wait_until("carbon-cache's line receiver", lambda: _listening(self.line_port), timeout=30, server=carbon)
            ready = f"{self.url}/render?target=constantLine(1)&format=json"
            wait_until("graphite-web's render API", lambda: _answers(ready, 200), timeout=30, server=web)
        except BaseException:
            # A fixture whose set-up fails is never torn down: the half that started must not outlive the tests.
            self.stop()
            raise

    def send(self, path: str, value: float) -> None:
        """One point now, in carbon's plaintext protocol."""
        with socket.create_connection(("127.0.0.1", self.line_port), timeout=5) as conn:
            conn.sendall(f"{path} {value} {int(time.time())}\n".encode())

    def last(self, target: str) -> float | None:
        query = urllib.parse.urlencode({"target": target, "from": "-5min", "format": "json"})
        status, body = http("GET", f"{self.url}/render?{query}")
        series = json.loads(body) if status == 200 else []
        points = [p[0] for p in series[0]["datapoints"] if p[0] is not None] if len(series) == 1 else []
        return float(points[-1]) if points else None

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers = []

    def alive(self) -> bool:
        return bool(self.servers) and all(s.alive() for s in self.servers)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
