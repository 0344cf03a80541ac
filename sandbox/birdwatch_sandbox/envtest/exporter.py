"""A small Prometheus exporter whose series a test sets, served over real HTTP for a real Prometheus to scrape.

``set_gauge`` publishes a value as it is; ``set_rate`` publishes a counter that grows at that many units per second,
so ``rate(...)`` queries see the rate a test asked for ("the canary's 5xx rate is now 0.3/s").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _render_labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), "")}"'
        for k, v in labels
    )
    return "{" + ",".join(escaped) + "}"


class Exporter:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._gauges: dict[tuple[str, Labels], float] = {}
        # counter -> (value at last change, rate per second, monotonic time of last change)
        self._counters: dict[tuple[str, Labels], tuple[float, float, float]] = {}
        self.scrapes = 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="exporter", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> Exporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[(name, _labels(labels))] = value

    def remove(self, name: str, **labels: str) -> None:
        with self._lock:
            self._gauges.pop((name, _labels(labels)), None)
            self._counters.pop((name, _labels(labels)), None)

    def set_rate(self, name: str, per_second: float, **labels: str) -> None:
        key = (name, _labels(labels))
        now = time.monotonic()
        with self._lock:
            value, rate, since = self._counters.get(key, (0.0, 0.0, now))
            self._counters[key] = (value + rate * (now - since), per_second, now)

    def render(self) -> str:
        now = time.monotonic()
        lines = []
        with self._lock:
            self.scrapes += 1
            for (name, labels), value in sorted(self._gauges.items()):
                lines.append(f"{name}{_render_labels(labels)} {value!r}")
            for (name, labels), (value, rate, since) in sorted(self._counters.items()):
                lines.append(f"{name}{_render_labels(labels)} {value + rate * (now - since)!r}")
        return "\n".join(lines) + "\n"
