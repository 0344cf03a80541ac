"""birdwatch as a real OS process, run the way users and the kubelet run it: ``.venv/bin/birdwatch run ...`` with
its output in a log file that is kept (and whose tail is attached to the report of a failed test), stopped by
signals, judged by its exit code, its log and its HTTP endpoints.

Also a recorder of every traffic step of every VirtualService in a namespace, from one watch, with the moment each
step arrived, so tests can judge timing (failover, intervals) as well as order.

Loaded as a pytest plugin (``pytest_plugins = ("process",)``) for the ``fleet`` fixture and the log tails. The
tests import it before pytest registers it, too late for assertion rewriting: PYTEST_DONT_REWRITE says so, and its
assertions carry their own messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from birdwatch.kube import VIRTUALSERVICES, Kube, Obj
from birdwatch.router import Record
from birdwatch_sandbox.envtest.controlplane import ControlPlane, free_port
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import follow_objects, route_weights

BIRDWATCH = Path(sys.executable).with_name("birdwatch")  # the console script of the virtualenv running the tests
# Settings a developer's shell may carry that would change what the process under test does.
_FOREIGN_ENV = ("KUBECONFIG", "KUBERNETES_SERVICE_", "PROMETHEUS_", "SLACK_", "BIRDWATCH_", "POD_NAME", "POD_NAMESPACE")
LogEntry = dict[str, Any]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without birdwatch's own settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env.update(extra or {})
    return env


def run_cli(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> Completed:
    """Run ``birdwatch ...`` (or any argv when it starts with a path) to its end and capture what it said."""
    command = list(argv) if argv and os.sep in argv[0] else [str(BIRDWATCH), *argv]
    done = subprocess.run(
        command,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return Completed(
        code=done.returncode,
        stdout=done.stdout.decode(errors="replace"),
        stderr=done.stderr.decode(errors="replace"),
    )


@dataclass(frozen=True)
class Completed:
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit code {self.code}\n--- stderr:\n{self.stderr}--- stdout:\n{self.stdout}"


# --- a running birdwatch -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Proc:
    """One ``birdwatch run`` process and its log file (stdout and stderr together, as a container runtime keeps)."""

    name: str
    argv: list[str]
    log: Path
    health_port: int | None
    popen: subprocess.Popen[bytes]
    started: float  # monotonic

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        assert self.health_port is not None, f"{self.name} serves no health endpoints"
        return f"http://127.0.0.1:{self.health_port}"

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig``; returns the monotonic moment it was sent."""
        at = time.monotonic()
        self.popen.send_signal(sig)
        return at

    def terminate(self) -> float:
        return self.signal(signal.SIGTERM)

    def kill(self) -> float:
        return self.signal(signal.SIGKILL)

    async def wait(self, timeout: float) -> int:
        """The exit code, once the process has ended; fails (with the log's tail) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} (pid {self.pid}) still running after {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.02)
        return code

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def entries(self) -> list[LogEntry]:
        """The log, line by line: JSON objects as they are, anything else (a traceback) as ``{"raw": line}``."""
        out: list[LogEntry] = []
        for line in self.text().splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            out.append(entry if isinstance(entry, dict) else {"raw": line})
        return out

    def said(self, event: str) -> list[LogEntry]:
        return [e for e in self.entries() if e.get("event") == event]

    async def wait_for(self, event: str, *, timeout: float = 20.0) -> LogEntry:
        """The first log entry whose event is ``event``; fails if the process ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.said(event)
            if found:
                return found[0]
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.returncode}) before logging {event!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {event!r} within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


class Fleet:
    """The birdwatch processes of one test: started with the test's control plane and Prometheus, every one's log
    kept under ``folder``, and all still running killed when the test ends."""

    def __init__(self, folder: Path, plane: ControlPlane, prometheus_url: str) -> None:
        self.folder = folder
        self.plane = plane
        self.prometheus_url = prometheus_url
        self.procs: list[Proc] = []
        self._seq = itertools.count(1)

    def start(
        self,
        name: str,
        *,
        namespace: str,
        prometheus_url: str | None = None,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        health: bool = True,
    ) -> Proc:
        port = free_port() if health else None
        argv = [
            str(BIRDWATCH),
            "run",
            "--kubeconfig",
            str(self.plane.kubeconfig),
            "--prometheus-url",
            prometheus_url or self.prometheus_url,
            "--namespace",
            namespace,
            "--health-address",
            f"127.0.0.1:{port}" if port else "off",
            *extra,
        ]
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"{next(self._seq):03d}-{name}.log"
        with log.open("ab") as out:
            out.write(f"# {' '.join(argv)}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=clean_env(env),
                # Its own session: a Ctrl-C meant for pytest does not reach it before the test stops it.
                start_new_session=True,
                close_fds=True,
            )
        proc = Proc(name=name, argv=argv, log=log, health_port=port, popen=popen, started=time.monotonic())
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)

    def sections(self, last: int = 6, lines: int = 60) -> list[tuple[str, str]]:
        """Titles and tails of the last ``last`` processes' logs, for a failure report."""
        return [
            (f"birdwatch process {p.name} pid {p.pid} exit {p.returncode} ({p.log})", p.tail(lines))
            for p in self.procs[-last:]
        ]


FLEET = pytest.StashKey[Fleet]()


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest, control_plane: ControlPlane, prometheus: PrometheusServer, log_dir: Path
) -> Iterator[Fleet]:
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name)
    if len(stem) > 80:  # shortened, but parametrized cases keep folders of their own
        stem = f"{stem[:71]}-{hashlib.sha256(stem.encode()).hexdigest()[:8]}"
    fleet = Fleet(log_dir / "processes" / stem, control_plane, prometheus.url)
    request.node.stash[FLEET] = fleet
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    fleet = item.stash.get(FLEET, None)
    if fleet is not None and report.failed and report.when == "call":
        report.sections.extend(fleet.sections())
    return report


# --- what the endpoints say ----------------------------------------------------------------------------------------


async def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.text()


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def sample(samples: Sequence[Sample], metric: str, /, **labels: str) -> float | None:
    """The value of the one sample named ``metric`` whose labels include ``labels``; None when there is none."""
    found = [s.value for s in samples if s.name == metric and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{len(found)} samples of {metric} with {labels}: {found}"
    return found[0] if found else None


# --- the traffic, as the VirtualServices' watch shows it ------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A change of the canary's weight on one VirtualService, when the watch delivered it."""

    at: float  # monotonic arrival
    weight: int
    record: Record | None


@dataclass
class TrafficLog:
    """Every change of the canary weight of every VirtualService in a namespace (route ``primary``)."""

    kube: Kube
    namespace: str
    canary: str = "canary"
    route: str = "primary"
    steps: dict[str, list[Step]] = field(default_factory=dict)
    last: dict[str, Obj] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def weights(self, name: str) -> list[int]:
        return [s.weight for s in self.steps.get(name, [])]

    def record(self, name: str) -> Record | None:
        obj = self.last.get(name)
        return Record.parse(obj) if obj else None

    def _see(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        self.last[name] = obj
        weight = route_weights(obj, self.route).get(self.canary, 0)
        history = self.steps.setdefault(name, [])
        if not history or history[-1].weight != weight:
            history.append(Step(time.monotonic(), weight, Record.parse(obj)))
            self.changed.set()

    async def _follow(self, ready: asyncio.Event) -> None:
        await follow_objects(self.kube, VIRTUALSERVICES, self.namespace, self._see, listed=ready)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TrafficLog]:
        ready = asyncio.Event()
        task = asyncio.create_task(self._follow(ready), name=f"traffic log {self.namespace}")
        try:
            await asyncio.wait_for(ready.wait(), 15)
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_weight(self, name: str, at_least: int, *, timeout: float = 40.0) -> Step:
        """The first step of ``name`` to ``at_least`` percent or more."""
        deadline = time.monotonic() + timeout
        while True:
            for s in self.steps.get(name, []):
                if s.weight >= at_least:
                    return s
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{name} never reached {at_least}%; weights {self.weights(name)}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def next_step_after(self, name: str, moment: float, *, timeout: float = 40.0) -> Step:
        """The first step of ``name`` that arrived after the monotonic ``moment``."""
        deadline = time.monotonic() + timeout
        while True:
            for s in self.steps.get(name, []):
                if s.at > moment:
                    return s
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no step of {name} after the moment; weights {self.weights(name)}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


def config_flags(source: str) -> list[str]:
    """The flags ``add_argument`` declares in ``source`` (birdwatch/config.py's text)."""
    return re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", source)
