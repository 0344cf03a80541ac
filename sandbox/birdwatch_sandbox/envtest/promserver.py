"""A real Prometheus scraping, every second, the static targets it is given and any in ``targets/*.json``."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .controlplane import Server, free_port, wait_until


@dataclass
class PrometheusServer:
    workdir: Path
    binary: Path
    static_targets: Sequence[str] = ()
    port: int = 0
    server: Server | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets_dir(self) -> Path:
        return self.workdir / "targets"

    def start(self, *, detach: bool = False) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(exist_ok=True)
        self.port = self.port or free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "envtest",
                    "static_configs": [{"targets": list(self.static_targets)}] if self.static_targets else [],
                    "file_sd_configs": [{"files": [str(self.targets_dir / "*.json")], "refresh_interval": "1s"}],
                }
            ],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.server = Server(
            "prometheus",
            [
                str(self.binary),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                "--storage.tsdb.retention.time=2h",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.workdir / "prometheus.log",
        )
        self.server.start(detach=detach)
        wait_until("Prometheus /-/ready", lambda: _get(f"{self.url}/-/ready")[0] == 200, timeout=60, server=self.server)

    def add_targets(self, name: str, targets: Sequence[str], labels: dict[str, str] | None = None) -> None:
        tmp = self.targets_dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps([{"targets": list(targets), "labels": labels or {}}]))
        tmp.rename(self.targets_dir / f"{name}.json")

    def query(self, promql: str) -> list[dict[str, Any]]:
        status, body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {status} {body[:300]!r}")
        result = data["data"]["result"]
        return result if isinstance(result, list) else [{"value": result}]

    def wait_for_value(self, promql: str, expected: float, *, timeout: float = 15, tolerance: float = 1e-9) -> None:
        """Block until ``promql`` returns ``expected``: the scrape after a test's change has landed."""

        def seen() -> bool:
            result = self.query(promql)
            return len(result) == 1 and abs(float(result[0]["value"][1]) - expected) <= tolerance

        wait_until(f"{promql} == {expected}", seen, timeout=timeout, server=self.server)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback URL built above
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        raise OSError(str(exc)) from exc
