#!/usr/bin/env python3
"""``make demo``: two canary releases of the aleph example on the local sandbox, for real, start to end.

What runs:

1. A fresh namespace ``demo-<random>`` on the sandbox's API server, with deploy/examples/aleph/ applied (all but the
   BirdWatch) and a Deployment aleph-v05 beside them. The sandbox's controller-manager, scheduler and kwok's fake
   nodes make every Deployment available, through ReplicaSets and Pods, as on a cluster (no container runs).
2. The mesh simulator (sandbox/, in this process) serving v03, v04 and v05, v05 answering 20 % of its requests
   with a 500, at 40 requests/s split by the VirtualService's current weights; Prometheus scrapes its Istio metrics.
3. The real controller, ``.venv/bin/birdwatch run``, as a child process; its JSON log goes to
   ``.demo/birdwatch-<time>.log``.
4. Scenario A: the example BirdWatch, at demo speed, releases v04 (healthy); at 30 % a person pauses it with
   ``kubectl birdwatch pause`` (the weight holds), then resumes it with ``kubectl birdwatch resume``: promoted.
   Scenario B: the same BirdWatch patched to canary_version v05 (failing): rolled back. Scenario C: v05 fixed, while
   a shared dependency makes every version, production too, fail 15 % of its requests: judged against its first
   value (0, before it has traffic) it would be rolled back; judged against production as it is now
   (``baseline: production``) it is promoted.

It shows a live line per canary (weight bar, the metric against its baseline, phase, all read from the BirdWatch's
status), then a summary table. Exit 0 when A ends Promoted and B RolledBack, 1 otherwise, 2 when the sandbox is not
there; 130/143 after SIGINT/SIGTERM, which stop birdwatch and the simulator (and nothing else).

On success the demo's namespace is deleted (the namespace controller deletes what is in it); after a failure, an
interruption or with --keep it stays for a look.

Run ``make sandbox-up`` first; ``--kubeconfig``, ``--prometheus-url`` and ``--targets-dir`` (all three) point it at
another control plane and Prometheus instead (the tests do). The shell's $KUBECONFIG is never used: the demo creates
and deletes objects, so it goes only where it is told.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]

try:
    import aiohttp
    import yaml
    from kubernetes_asyncio.config import ConfigException

    from birdwatch.kube import (
        BIRDWATCHES,
        DEPLOYMENTS,
        DESTINATIONRULES,
        VIRTUALSERVICES,
        Kube,
        KubeError,
        Obj,
        Resource,
    )
    from birdwatch.workload import deployment_available
    from birdwatch_sandbox.envtest.sandbox import read_env
    from birdwatch_sandbox.meshsim import MeshSim, resolve
except ImportError as missing:
    sys.exit(f"demo: {missing}; run it with the project's virtualenv: make install && .venv/bin/python hack/demo.py")

SANDBOX_ENV = REPO / ".sandbox" / "env"
EXAMPLE = REPO / "deploy" / "examples" / "aleph"
SERVICE = "aleph"
PRODUCTION, CANARY, FAILING = "v03", "v04", "v05"
FAILING_RATE = 0.2
RPS = 40.0
# The simulator decides each request's fate with a seeded random sequence, the same in every run. Seed 4's stays near
# the set 20 % from the start (v05's first 20 requests: 4 failures, first 100: 19). The default seed 0's front-loads
# them (3 in the first 10, then 1 in the next 30); rate() cannot see a series' first increase, so a trial run read
# 0 % at 10 % and 20 % and rolled back only at 30 %, at 0.052: a demo of luck rather than of the rule.
SEED = 4
WINDOW = "10s"  # the metric's rate window: ten 1 s scrapes, so the ratio follows each step within seconds
TERMINAL = ("Promoted", "RolledBack", "Frozen", "Failed")
POLL = 0.25
PAUSE_AT = 30  # scenario A's weight where a person pauses the rollout, for two intervals
# Scenario C: the drift every version suffers, the deviation allowed against production, and the load that keeps a
# 10 % canary's ratio steady enough for it (200 of its requests per 10 s window: noise about 0.03, well under 0.1).
DRIFT_RATE, DRIFT_DEVIATION, DRIFT_RPS = 0.15, 0.1, 200.0

SERVICES = Resource("", "v1", "services", "Service")
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
RESOURCES = {r.kind: r for r in (DEPLOYMENTS, SERVICES, DESTINATIONRULES, VIRTUALSERVICES, BIRDWATCHES)}
# Settings a developer's shell may carry that must not reach the demo's birdwatch (a real Slack token, say).
FOREIGN_ENV = ("KUBECONFIG", "KUBERNETES_SERVICE_", "PROMETHEUS_", "SLACK_", "BIRDWATCH_", "POD_NAME", "POD_NAMESPACE")


class DemoError(Exception):
    """Something the person running the demo must be told, in a sentence; exit code ``code``."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Speed:
    increment: int
    interval: int
    timeout_a: float  # bounds on each scenario, so the demo always ends
    timeout_b: float


NORMAL = Speed(increment=10, interval=4, timeout_a=90, timeout_b=45)
FAST = Speed(increment=10, interval=2, timeout_a=50, timeout_b=30)


@dataclass(frozen=True)
class Target:
    kubeconfig: str
    prometheus_url: str
    targets_dir: Path


@dataclass
class Outcome:
    """How one scenario ended, for the summary."""

    scenario: str
    canary: str
    expected: str
    phase: str = "-"
    message: str = ""
    baseline: float | None = None
    last_value: float | None = None
    duration: float = 0.0
    steps: int = 0
    peak: int = 0
    weights: str = "-"

    @property
    def ok(self) -> bool:
        return self.phase == self.expected


@dataclass
class Report:
    namespace: str = ""
    log: Path | None = None
    stderr: Path | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    served: str = ""
    keep_objects: bool = True


# --- the screen -----------------------------------------------------------------------------------------------------


class Screen:
    """Plain lines, and one live line redrawn in place on a terminal (a new line per change otherwise)."""

    COLORS: Mapping[str, str] = {
        "Promoted": "32",
        "RolledBack": "31",
        "Failed": "31",
        "Frozen": "33",
        "Progressing": "36",
        "Paused": "35",
    }

    def __init__(self, stream: TextIO, *, tty: bool, color: bool) -> None:
        self.stream, self.tty, self.color = stream, tty, color
        self._live_drawn = False
        self._last_key: object = None

    def say(self, text: str = "") -> None:
        # Below the live line, which stays as it is: a change after this line is printed, a repeat is not.
        key = self._last_key
        self.settle()
        self._last_key = key
        self.stream.write(text + "\n")
        self.stream.flush()

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def live(self, parts: tuple[str, str, str], key: object) -> None:
        """``parts`` = (before the phase, the phase, after it); ``key`` is what counts as a change."""
        before, phase, after = parts
        plain = before + phase + after
        if not self.tty:
            if key != self._last_key:
                self._last_key = key
                self.stream.write(plain + "\n")
                self.stream.flush()
            return
        width = shutil.get_terminal_size((100, 24)).columns - 1
        text = before + self.paint(phase, self.COLORS.get(phase, "0")) + after
        if len(plain) > width:  # a wrapped line could not be redrawn in place: cut it
            text = plain[:width]
        self.stream.write("\r\x1b[2K" + text)
        self.stream.flush()
        self._live_drawn = True

    def settle(self) -> None:
        """Leave the live line as it is and move below it."""
        if self._live_drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._live_drawn = False
        self._last_key = None


def bar(weight: int, width: int = 20) -> str:
    filled = max(0, min(width, round(weight * width / 100)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def canary_line(
    name: str, version: str, status: Obj, phase: str, elapsed: float
) -> tuple[tuple[str, str, str], object]:
    weight = int(status.get("canaryWeight") or 0)
    value, baseline = status.get("lastValue"), status.get("baseline")
    before = f"{name}  {version}  {bar(weight)} {weight:>3}%  value {number(value)} / baseline {number(baseline)}  "
    return (before, phase, f"{' ' * (11 - len(phase))}  {elapsed:3.0f}s"), (weight, value, baseline, phase)


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


# --- the sandbox ----------------------------------------------------------------------------------------------------


def resolve_target(args: argparse.Namespace) -> Target:
    given = (args.kubeconfig, args.prometheus_url, args.targets_dir)
    if all(given):
        kubeconfig, url, targets = given
    elif any(given):
        raise DemoError("--kubeconfig, --prometheus-url and --targets-dir go together: give all three or none", code=2)
    else:
        env = read_env(SANDBOX_ENV)
        if env is None:
            raise DemoError(f"the sandbox is not up ({SANDBOX_ENV} is missing): run `make sandbox-up` first", code=2)
        try:
            kubeconfig, url, targets = env["KUBECONFIG"], env["PROMETHEUS_URL"], env["BIRDWATCH_PROM_TARGETS"]
        except KeyError as exc:
            raise DemoError(f"{SANDBOX_ENV} lacks {exc}: run `make sandbox-down sandbox-up`", code=2) from None
    if not os.access(kubeconfig, os.R_OK):
        raise DemoError(f"kubeconfig {kubeconfig} cannot be read: is the sandbox up? (`make sandbox-up`)", code=2)
    if not Path(targets).is_dir():
        raise DemoError(f"{targets} is not a folder Prometheus reads target lists from (--targets-dir)", code=2)
    return Target(str(kubeconfig), str(url).rstrip("/"), Path(targets))


async def check_servers(kube: Kube, target: Target) -> None:
    try:
        await asyncio.wait_for(kube.request("GET", "/version"), 10)
    except (KubeError, TimeoutError) as exc:
        raise DemoError(
            f"the API server at {kube.host} does not answer ({exc}): is the sandbox up? (`make sandbox-up`)", code=2
        ) from None
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{target.prometheus_url}/-/ready") as resp,
        ):
            ready = resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        ready = False
    if not ready:
        raise DemoError(
            f"Prometheus at {target.prometheus_url} is not ready: is the sandbox up? (`make sandbox-up`)", code=2
        )


async def promql(url: str, query: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"{url}/api/v1/query", params={"query": query}) as resp,
    ):
        body = await resp.json()
    if body.get("status") != "success":
        raise DemoError(f"Prometheus rejected {query!r}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def eventually(what: str, probe: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.25)


# --- the objects ----------------------------------------------------------------------------------------------------


def example_objects() -> list[Obj]:
    objects: list[Obj] = []
    for path in sorted(EXAMPLE.glob("*.yaml")):
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def v05_deployment(v04: Obj) -> Obj:
    """aleph-v05: the example's v04 Deployment with every mention of v04 made v05 (name, labels, image)."""
    text = json.dumps(v04).replace(CANARY, FAILING)
    obj: Obj = json.loads(text)
    return obj


def demo_metric(example_metric: str, namespace: str, version: str) -> str:
    """The example's metric (the canary's 5xx ratio) at demo speed: a [10s] rate window, this namespace only (earlier
    tries' requests must not count), and the given canary version."""
    metric, windows = re.subn(r"\[\d+[smh]\]", f"[{WINDOW}]", example_metric)
    metric, scoped = re.subn(
        rf'destination_service_name="{SERVICE}"',
        f'destination_service_name="{SERVICE}",destination_service_namespace="{namespace}"',
        metric,
    )
    metric, versioned = re.subn(r'destination_version="[^"]*"', f'destination_version="{version}"', metric)
    if not windows or scoped != 2 or versioned != 2:
        raise DemoError(
            "the example's metric no longer looks like the canary's 5xx ratio "
            f"(deploy/examples/aleph/birdwatch.yaml): {example_metric}"
        )
    return metric


async def wait_available(kube: Kube, namespace: str, names: Sequence[str], *, timeout: float = 60) -> None:
    """Until the Deployment controller reports every one of them available, read as birdwatch reads it."""

    async def available() -> bool:
        for name in names:
            ok, _ = deployment_available(await kube.get(DEPLOYMENTS, namespace, name))
            if not ok:
                return False
        return True

    await eventually(f"Deployments {', '.join(names)} to be available", available, timeout=timeout)


# --- the birdwatch process ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def log_entries(path: Path) -> list[Obj]:
    entries: list[Obj] = []
    with contextlib.suppress(OSError), path.open(errors="replace") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
    return entries


def count_steps(log: Path, namespace: str, version: str) -> tuple[int, int]:
    """(traffic steps birdwatch logged for this canary, the highest weight among them)."""
    weights = [
        int(e.get("weight") or 0)
        for e in log_entries(log)
        if e.get("event") == "traffic shifted" and e.get("namespace") == namespace and e.get("version") == version
    ]
    return len(weights), max(weights, default=0)


class Controller:
    """``birdwatch run`` as a child process in a session of its own (stopped by this script, not by the terminal)."""

    def __init__(self, binary: Path, target: Target, namespace: str, log: Path, stderr: Path) -> None:
        self.port = free_port()
        self.argv = [
            str(binary),
            "run",
            "--kubeconfig",
            target.kubeconfig,
            "--prometheus-url",
            target.prometheus_url,
            "--namespace",
            namespace,
            "--log-format",
            "json",
            "--health-address",
            f"127.0.0.1:{self.port}",
            "--shutdown-grace",
            "3",
        ]
        self.log, self.stderr = log, stderr
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=clean_env(),
                start_new_session=True,
            )

    def died(self) -> DemoError:
        return DemoError(
            f"birdwatch exited with code {self.exited}; the end of its output:\n{tail(self.stderr) or tail(self.log)}"
        )

    async def wait_ready(self, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

            async def ready() -> bool:
                if self.exited is not None:
                    raise self.died()
                try:
                    async with session.get(url) as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await eventually("birdwatch to be ready (/readyz)", ready, timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (birdwatch stops its canaries at a safe point), SIGKILL after ``grace`` seconds."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            self.kill()
            await self.proc.wait()


# --- the demo -------------------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, args: argparse.Namespace, target: Target, screen: Screen) -> None:
        self.args, self.target, self.screen = args, target, screen
        self.speed = FAST if args.fast else NORMAL
        self.report = Report()
        self.controller: Controller | None = None
        self.kube: Kube | None = None
        self.namespace = f"demo-{secrets.token_hex(3)}"
        self.created: list[Obj] = []  # what it made (deleting the namespace at the end deletes them all)
        self.stopping = False  # tearing down: a signal now must not cut the teardown short

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._run(stack)
            finally:
                self.stopping = True

    async def _run(self, stack: contextlib.AsyncExitStack) -> None:
        say = self.screen.say
        try:
            self.kube = kube = await Kube.connect(kubeconfig=self.target.kubeconfig)
        except (ConfigException, OSError, ValueError) as exc:
            raise DemoError(f"cannot use kubeconfig {self.target.kubeconfig}: {exc}", code=2) from None
        stack.push_async_callback(kube.close)
        await check_servers(kube, self.target)
        say(f"birdwatch demo: API server {kube.host}, Prometheus {self.target.prometheus_url}")

        ns = self.report.namespace = self.namespace
        objects = example_objects()
        birdwatch = next(o for o in objects if o["kind"] == "BirdWatch")
        applied = [o for o in objects if o["kind"] != "BirdWatch"]
        v04 = next(o for o in applied if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(CANARY))
        applied.append(v05_deployment(v04))
        await kube.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        stack.push_async_callback(self._delete_objects)
        for obj in applied:
            self.created.append(await kube.create(RESOURCES[obj["kind"]], ns, obj))
        await wait_available(kube, ns, [o["metadata"]["name"] for o in applied if o["kind"] == "Deployment"])
        say(
            f"> namespace {ns}: deploy/examples/aleph/ but the BirdWatch, and Deployment aleph-{FAILING}; "
            "Deployments available (their pods run on the sandbox's fake nodes)"
        )

        sim = MeshSim(
            kubeconfig=self.target.kubeconfig,
            namespace=ns,
            service=SERVICE,
            versions=[PRODUCTION, CANARY, FAILING],
            rps=RPS,
            error_rates={FAILING: FAILING_RATE},
            targets_dir=self.target.targets_dir,
            seed=SEED,
        )
        try:
            await sim.start()
        except (TimeoutError, OSError) as exc:
            raise DemoError(f"the mesh simulator did not start: {exc!r}") from None
        stack.push_async_callback(sim.close)
        try:
            await sim.wait_for_weights({PRODUCTION: 100})
        except TimeoutError:
            raise DemoError(f"the mesh simulator does not route {SERVICE}: {sim.route.describe()}") from None
        await self._wait_scraped(ns)
        say(
            f"> mesh simulator: {PRODUCTION} {CANARY} {FAILING} at {RPS:g} requests/s by the VirtualService's "
            f"weights; {FAILING} fails {FAILING_RATE:.0%}; Prometheus scrapes them"
        )

        stamp = time.strftime("%Y%m%d-%H%M%S")
        log_dir = Path(self.args.log_dir)
        if (log_dir / f"birdwatch-{stamp}.log").exists():  # another demo started in the same second
            stamp = f"{stamp}-{ns}"
        self.report.log = log_dir / f"birdwatch-{stamp}.log"
        self.report.stderr = log_dir / f"birdwatch-{stamp}.stderr"
        self.controller = controller = Controller(
            Path(self.args.birdwatch), self.target, ns, self.report.log, self.report.stderr
        )
        stack.push_async_callback(self._stop_controller)
        await controller.start()
        await controller.wait_ready(timeout=30)
        say(f"> birdwatch run (pid {controller.pid}) ready; JSON log {display(self.report.log)}")

        await self._scenarios(kube, ns, birdwatch, sim)
        self.report.served = await self._served(ns)
        self.report.keep_objects = self.args.keep or not all(o.ok for o in self.report.outcomes)

    async def _scenarios(self, kube: Kube, ns: str, example: Obj, sim: MeshSim) -> None:
        speed, say = self.speed, self.screen.say
        spec = example["spec"]
        bw = copy.deepcopy(example)
        bw["spec"].update(
            increment=speed.increment,
            interval=speed.interval,
            metric=demo_metric(spec["metric"], ns, CANARY),
        )
        name = bw["metadata"]["name"]
        say()
        say(
            f"A  a healthy canary: {CANARY}, {speed.increment}% more traffic every {speed.interval}s while its 5xx "
            f"ratio stays within {spec['deviation']} of the baseline"
        )
        started = time.monotonic()
        created = await kube.create(BIRDWATCHES, ns, bw)
        self.created.append(created)
        a = Outcome("A healthy", CANARY, expected="Promoted")
        self.report.outcomes.append(a)
        steering = asyncio.create_task(self._pause_and_resume(kube, ns, name, hold=2 * speed.interval))
        try:
            await self._follow(kube, ns, name, created["metadata"]["generation"], a, started, speed.timeout_a)
        finally:
            steering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await steering
        if not a.ok:
            self.report.outcomes.append(Outcome("B failing", FAILING, expected="RolledBack", phase="skipped"))
            return

        say()
        say(
            f"B  a failing canary: canary_version {FAILING} ({FAILING_RATE:.0%} of its requests answer 500); "
            "the DestinationRule's canary subset follows"
        )
        started = time.monotonic()
        patched = await kube.merge_patch(
            BIRDWATCHES,
            ns,
            name,
            {"spec": {"canary_version": FAILING, "metric": demo_metric(spec["metric"], ns, FAILING)}},
        )
        b = Outcome("B failing", FAILING, expected="RolledBack")
        self.report.outcomes.append(b)
        await self._follow(kube, ns, name, patched["metadata"]["generation"], b, started, speed.timeout_b)
        if not b.ok:
            self.report.outcomes.append(Outcome("C drift", FAILING, expected="Promoted", phase="skipped"))
            return

        say()
        say(
            f"C  {FAILING} fixed; meanwhile a shared dependency fails {DRIFT_RATE:.0%} of every version's requests, "
            f"production {CANARY}'s too. Against its first value (0, before it has traffic) the canary would look "
            f"{DRIFT_RATE} worse and be rolled back; judged against production as it is now (baseline: production, "
            f"deviation {DRIFT_DEVIATION}) it is as healthy"
        )
        for version in (PRODUCTION, CANARY, FAILING):
            sim.set_error_rate(version, DRIFT_RATE)
        sim.set_rps(DRIFT_RPS)
        await self._drifted(ns, spec["metric"])
        say(f"   production {CANARY} now fails {DRIFT_RATE:.0%} of its requests; {FAILING}'s earlier failures are gone")
        started = time.monotonic()
        patched = await kube.merge_patch(
            BIRDWATCHES,
            ns,
            name,
            {
                "spec": {
                    "metric": demo_metric(spec["metric"], ns, "{{version}}"),
                    "baseline": "production",
                    "deviation": DRIFT_DEVIATION,
                    "max_weight": 50,
                }
            },
        )
        c = Outcome("C drift", FAILING, expected="Promoted")
        self.report.outcomes.append(c)
        await self._follow(kube, ns, name, patched["metadata"]["generation"], c, started, speed.timeout_b)

    async def _drifted(self, ns: str, example_metric: str) -> None:
        """Until Prometheus sees production failing at the drift's rate, and no longer sees B's failures of the canary
        (its metric's window holds no requests of it: 0/0, which is NaN to Prometheus and no data to birdwatch)."""
        production = demo_metric(example_metric, ns, CANARY)
        canary = demo_metric(example_metric, ns, FAILING)

        async def value(query: str) -> float:
            rows = await promql(self.target.prometheus_url, query)
            return float(rows[0]["value"][1]) if rows else math.nan

        async def ready() -> bool:
            drifted, old = await value(production), await value(canary)
            return drifted >= DRIFT_RATE * 0.8 and (math.isnan(old) or old == 0)

        await eventually("production's drift and the canary's clean window", ready, timeout=40)

    async def _pause_and_resume(self, kube: Kube, ns: str, name: str, *, hold: float) -> None:
        """What a person at a terminal does: at PAUSE_AT %, pause the rollout with the kubectl plugin, look for a
        while (the weight holds), and resume it (the same rollout goes on, with the same baseline)."""

        async def there() -> bool:
            status = (await kube.get(BIRDWATCHES, ns, name)).get("status") or {}
            return int(status.get("canaryWeight") or 0) >= PAUSE_AT

        await eventually(f"the canary at {PAUSE_AT}%", there, timeout=60)
        await self._plugin("pause", name, ns)
        await asyncio.sleep(hold)
        await self._plugin("resume", name, ns)

    async def _plugin(self, action: str, name: str, ns: str) -> None:
        command = Path(self.args.birdwatch).with_name("kubectl-birdwatch")
        self.screen.say(f"   $ kubectl birdwatch {action} {name} -n {ns}")
        proc = await asyncio.create_subprocess_exec(
            str(command),
            action,
            name,
            "-n",
            ns,
            "--kubeconfig",
            self.target.kubeconfig,
            env=clean_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        for line in out.decode(errors="replace").splitlines():
            self.screen.say(f"   {line}")
        if proc.returncode != 0:
            raise DemoError(f"kubectl birdwatch {action} exited {proc.returncode}")

    async def _follow(
        self, kube: Kube, ns: str, name: str, generation: int, outcome: Outcome, started: float, timeout: float
    ) -> None:
        """Show the BirdWatch's status as it changes, until it ends (under ``generation``) or ``timeout`` passes."""
        assert self.controller is not None
        status: Obj = {}
        errors = 0
        try:
            while True:
                try:
                    obj = await kube.get(BIRDWATCHES, ns, name)
                    errors = 0
                except KubeError as exc:
                    errors += 1
                    if errors > 20:
                        raise DemoError(f"cannot read BirdWatch {name}: {exc}") from None
                    await asyncio.sleep(POLL)
                    continue
                status = obj.get("status") or {}
                current = int(status.get("observedGeneration") or 0) >= generation
                phase = str(status.get("phase")) if current and status.get("phase") else "Pending"
                elapsed = time.monotonic() - started
                parts, key = canary_line(name, outcome.canary, status if current else {}, phase, elapsed)
                self.screen.live(parts, key)
                outcome.phase, outcome.duration = phase, elapsed
                if current and phase in TERMINAL:
                    break
                if self.controller.exited is not None:
                    raise self.controller.died()
                if elapsed > timeout:
                    outcome.phase = f"timeout ({phase})"
                    raise DemoError(
                        f"scenario {outcome.scenario} did not end within {timeout:.0f}s: {phase} at "
                        f"{status.get('canaryWeight', 0)}%: {status.get('message', '')}"
                    )
                await asyncio.sleep(POLL)
        finally:
            self.screen.settle()
            outcome.message = str(status.get("message") or "")
            outcome.baseline, outcome.last_value = status.get("baseline"), status.get("lastValue")
            if self.report.log is not None:
                outcome.steps, outcome.peak = count_steps(self.report.log, ns, outcome.canary)
        self.screen.say(f"   {outcome.message}")
        outcome.weights = await self._weights(kube, ns)

    async def _weights(self, kube: Kube, ns: str) -> str:
        """Where the VirtualService sends aleph's traffic, per version (through the DestinationRule's subsets)."""
        route = resolve(
            await kube.get(VIRTUALSERVICES, ns, SERVICE),
            await kube.get(DESTINATIONRULES, ns, SERVICE),
            service=SERVICE,
            namespace=ns,
            versions=[PRODUCTION, CANARY, FAILING],
        )
        shares = sorted(route.weights.items(), key=lambda kv: (-kv[1], kv[0]))
        return " ".join(f"{v}:{w}" for v, w in shares) or route.describe()

    async def _wait_scraped(self, ns: str) -> None:
        query = f'sum(istio_requests_total{{destination_service_namespace="{ns}"}})'

        async def scraped() -> bool:
            return bool(await promql(self.target.prometheus_url, query))

        try:
            await eventually("Prometheus to scrape the mesh simulator", scraped, timeout=30)
        except DemoError:
            raise DemoError(
                f"Prometheus at {self.target.prometheus_url} does not scrape the simulator: is "
                f"{self.target.targets_dir} the folder it reads file-SD target lists from?"
            ) from None

    async def _served(self, ns: str) -> str:
        """The requests each version answered, as Prometheus counted them from the simulated sidecars."""
        try:
            rows = await promql(
                self.target.prometheus_url,
                "sum by (destination_version, response_code) "
                f'(istio_requests_total{{reporter="destination",destination_service_namespace="{ns}"}})',
            )
        except (DemoError, aiohttp.ClientError, TimeoutError):
            return ""
        totals: dict[str, list[int]] = {}
        for row in rows:
            version, code = row["metric"].get("destination_version", "?"), row["metric"].get("response_code", "")
            count = round(float(row["value"][1]))
            seen = totals.setdefault(version, [0, 0])
            seen[0] += count
            seen[1] += count if code.startswith("5") else 0
        return ", ".join(f"{v} {n} ({e} 5xx)" for v, (n, e) in sorted(totals.items()))

    async def _stop_controller(self) -> None:
        if self.controller is not None and self.controller.exited is None:
            await self.controller.stop()

    async def _delete_objects(self) -> None:
        if self.report.keep_objects or self.kube is None:
            return
        with contextlib.suppress(KubeError):
            # The namespace controller deletes what is in it; the demo does not wait for that.
            await self.kube.delete(NAMESPACES, None, self.report.namespace)

    def interrupt_again(self) -> None:
        """A signal while stopping: no more grace for birdwatch."""
        if self.controller is not None:
            self.controller.kill()


def display(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def summary(report: Report) -> list[str]:
    rows = [["scenario", "canary", "result", "weights now", "baseline", "last value", "duration", "steps"]]
    for o in report.outcomes:
        rows.append(
            [
                o.scenario,
                o.canary,
                o.phase,
                o.weights,
                number(o.baseline),
                number(o.last_value),
                f"{o.duration:.1f}s" if o.duration else "-",
                f"{o.steps} (to {o.peak}%)" if o.steps else "0",
            ]
        )
    return table(rows)


async def amain(args: argparse.Namespace, screen: Screen) -> int:
    target = resolve_target(args)
    demo = Demo(args, target, screen)
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    work = asyncio.create_task(demo.run(), name="demo")
    caught: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if caught or demo.stopping:
            demo.interrupt_again()  # already stopping: no more grace for birdwatch
            return
        caught.append(sig)
        screen.say(f"{sig.name}: stopping birdwatch and the mesh simulator (again to kill them now)")
        work.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    error: DemoError | None = None
    try:
        await work
    except asyncio.CancelledError:
        if not caught:
            raise
    except DemoError as exc:
        error = exc
    except KubeError as exc:
        error = DemoError(f"the API server refused: {exc}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return finish(demo.report, screen, error, caught[0] if caught else None, time.monotonic() - started)


def finish(report: Report, screen: Screen, error: DemoError | None, sig: signal.Signals | None, took: float) -> int:
    say = screen.say
    if report.outcomes:
        say()
        for line in summary(report):
            say(line)
    if report.served:
        say(f"requests answered, as Prometheus counted them: {report.served}")
    if report.log is not None:
        say(f"birdwatch JSON log: {display(report.log)}")
        if report.stderr is not None:
            if report.stderr.exists() and report.stderr.stat().st_size == 0:
                report.stderr.unlink()
            elif report.stderr.exists():
                say(f"birdwatch stderr: {display(report.stderr)}")
    if report.namespace:
        if report.keep_objects:
            say(f"objects kept in namespace {report.namespace} (kubectl get bw,vs,dr,deploy -n {report.namespace})")
        else:
            say(f"namespace {report.namespace} and the demo's objects in it are deleted (--keep keeps them)")
    if sig is not None:
        say(f"demo interrupted ({sig.name}) after {took:.0f}s; every process it started is stopped")
        return 128 + int(sig)
    if error is not None:
        say(f"demo: {error}" if error.code == 2 else screen.paint(f"demo FAILED: {error}", "31"))
        return error.code
    failed = [o for o in report.outcomes if not o.ok]
    if failed:
        why = "; ".join(f"{o.scenario} ended {o.phase}, not {o.expected}" for o in failed)
        say(screen.paint(f"demo FAILED: {why}", "31"))
        return 1
    say(
        screen.paint(
            f"demo passed in {took:.0f}s: {CANARY} promoted, {FAILING} rolled back, "
            f"{FAILING} fixed promoted against a drifting production",
            "32",
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hack/demo.py",
        description="Two canary releases on the local sandbox with the real birdwatch: v04 promoted, v05 rolled back.",
    )
    parser.add_argument("--fast", action="store_true", help="steps every 2 s instead of 4 (for the tests)")
    parser.add_argument("--keep", action="store_true", help="keep the demo's objects at the end (for a look)")
    parser.add_argument("--kubeconfig", help="the API server to use (default: the sandbox's, from .sandbox/env)")
    parser.add_argument("--prometheus-url", help="the Prometheus to use (default: the sandbox's)")
    parser.add_argument("--targets-dir", help="folder that Prometheus reads file-SD target lists from (the sandbox's)")
    parser.add_argument("--log-dir", default=str(REPO / ".demo"), help="where birdwatch's JSON log goes (.demo/)")
    parser.add_argument(
        "--birdwatch",
        default=str(Path(sys.executable).with_name("birdwatch")),
        help="the birdwatch command (default: beside this Python, .venv/bin/birdwatch)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    screen = Screen(sys.stdout, tty=sys.stdout.isatty(), color=color)
    if not os.access(args.birdwatch, os.X_OK):
        screen.say(f"demo: {args.birdwatch} is not there: run `make install`")
        return 2
    try:
        return asyncio.run(amain(args, screen))
    except DemoError as exc:
        screen.say(f"demo: {exc}")
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
