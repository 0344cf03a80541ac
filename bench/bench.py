"""`make bench`: what one canary step costs birdwatch, and how it scales with concurrent canaries.

Against the sandbox (real kube-apiserver and Prometheus, see birdwatch_sandbox.envtest.sandbox), for each N it creates N
VirtualServices, DestinationRules and available Deployments in a fresh namespace, starts `birdwatch run` as its own
process, creates N BirdWatches (increment 10, a short interval, the cheap metric `vector(0)`), and watches the
VirtualServices itself to time every traffic write. A last group turns unhealthy mid-rollout to time rollbacks.

It prints, per N: step lateness (time between a canary's traffic writes minus its interval; also once every canary has
made its first step, apart from the start of N rollouts at once), reaction (creation to first traffic write), rollback
reaction (an unhealthy value visible in Prometheus to the rollback write), the controller's CPU per step, its peak RSS
and RSS per canary (peak less the RSS before any BirdWatch existed, over N), API requests per step by verb (from the API
server's own apiserver_request_total), the API server's CPU per step (its process_cpu_seconds_total: the cost birdwatch
puts on the cluster) and etcd's, Prometheus queries per step, Events posted and dropped (birdwatch's own /metrics), the
run's duration against its ideal, and how busy the machine was (load average, all cores' use and the share of it that
was not the bench's). The last line is one JSON object; results are kept in bench/results/ (`--table RESULTS` prints
one as the README's table). It also gives the watches open on the VirtualServices, DestinationRules and BirdWatches
while birdwatch steps (apiserver_longrunning_requests) and the watch events the API server sent on them per step
(apiserver_watch_events_total and _sizes: every VirtualService write goes out once per watcher).

`--apiserver-profile SECONDS` takes two CPU profiles of kube-apiserver, SECONDS long each: "start" from the first
BirdWatch's creation (N rollouts starting at once) and "steady" from the moment every canary has made its first step;
they land in .sandbox/bench/apiserver-N-start.pprof and -steady.pprof (`go tool pprof -top FILE`). The API server's
pprof endpoints are off unless the sandbox was started with BIRDWATCH_SANDBOX_PROFILING=1.

`make bench` runs N = 10, 100, 500 and 1000, all with `--interval 10` (as the Flagger comparison of issue 16: N/10
steps per second, 100 at N = 1000), so that the figures of different N differ only in N. Run alone, the script's
default is `--interval 2` at N = 10, 100 and 500, the settings of the earlier N = 100 comparisons in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from birdwatch.kube import BIRDWATCHES, VIRTUALSERVICES, Kube
from birdwatch_sandbox.envtest.controlplane import KubeHTTP, free_port
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.pki import Pair
from birdwatch_sandbox.envtest.sandbox import SANDBOX, STATE, read_env, up
from birdwatch_sandbox.kit import deployment, follow_objects, wait_available

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results"
BIRDWATCH = REPO / ".venv" / "bin" / "birdwatch"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Canary:
    name: str
    created: float = 0.0
    writes: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, canary weight)


@dataclass
class Result:
    n: int
    interval: int
    steps: int
    lateness_ms: dict[str, float]
    lateness_started_ms: dict[str, float]  # steps after every canary's first: the start of N at once left out
    reaction_ms: dict[str, float]
    rollback_reaction_ms: dict[str, float]
    cpu_ms_per_step: float
    cpu_user_ms_per_step: float
    cpu_system_ms_per_step: float
    rss_mb_peak: float
    rss_mb_idle: float
    rss_mb_end: float
    rss_kb_per_canary: float
    api_requests_per_step: dict[str, float]
    api_requests_total_per_step: float
    apiserver_cpu_ms_per_step: float
    apiserver_cpu_ms_per_step_over_idle: float
    apiserver_idle_cores: float
    etcd_cpu_ms_per_step: float
    prometheus_queries_per_step: float
    events_posted: int
    events_dropped: int
    duration_ratio: float
    duration_ratio_p99: float
    wrong_endings: int
    measured_seconds: float
    load_before: list[float]
    load_after: list[float]
    machine_busy_cores: float
    others_busy_cores: float
    bench_busy_cores: float  # this process: creating the BirdWatches, its watch of the VirtualServices
    cores_by_process: dict[str, float]  # birdwatch and each of the sandbox's processes, while measured
    # Open WATCH requests per resource (the most seen during the run, every 15 s from the first create), and the watch
    # events sent on each resource per step (one per watcher per write) with their bytes.
    watchers: dict[str, float] = field(default_factory=dict)
    watch_events_per_step: dict[str, float] = field(default_factory=dict)
    watch_kb_per_step: dict[str, float] = field(default_factory=dict)


def objects(name: str, namespace: str) -> list[dict[str, Any]]:
    canary = deployment(f"{name}-v2", "v2", app=name)
    canary["metadata"]["namespace"] = namespace
    return [
        canary,
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "host": name,
                "subsets": [
                    {"name": "production", "labels": {"app": name, "version": "v1"}},
                    {"name": "canary", "labels": {"app": name, "version": "v2"}},
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "hosts": [name],
                "http": [
                    {
                        "name": "primary",
                        "route": [
                            {"destination": {"host": name, "subset": "production"}, "weight": 100},
                            {"destination": {"host": name, "subset": "canary"}, "weight": 0},
                        ],
                    }
                ],
            },
        },
    ]


def canary_weight(vs: dict[str, Any]) -> int:
    for d in vs["spec"]["http"][0]["route"]:
        if d["destination"]["subset"] == "canary":
            return int(d.get("weight", 0))
    return 0


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_rss_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine, every core, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def pid_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        return sum(proc_cpu_seconds(pid))
    except (OSError, IndexError, ValueError):
        return 0.0


def sample_value(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus's text format (every label set)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def apiserver_metrics(api: KubeHTTP) -> str:
    status, body = api.request("GET", "/metrics")
    assert status == 200, body
    return str(body)


WATCHED = ("virtualservices", "destinationrules", "birdwatches")


def by_resource(text: str, name: str, *, verb: str | None = None) -> dict[str, float]:
    """A metric's samples summed per ``resource`` label, for the resources birdwatch works on (WATCHED)."""
    pattern = re.compile(rf"^{name}\{{(.*)\}} ([0-9.e+]+)$")
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        resource = labels.get("resource", "")
        if resource in WATCHED and (verb is None or labels.get("verb") == verb):
            out[resource] = out.get(resource, 0.0) + float(m.group(2))
    return out


def take_profile(api: KubeHTTP, seconds: int, out: Path) -> str:
    """A CPU profile of the API server, ``seconds`` long, written to ``out``; what happened, as a line."""
    try:
        status, body = api.fetch(f"/debug/pprof/profile?seconds={seconds}", timeout=seconds + 60)
    except OSError as exc:
        return f"API server profile failed: {exc}"
    if status == 404:
        return (
            "API server profile: 404 (pprof is off unless the sandbox was started with BIRDWATCH_SANDBOX_PROFILING=1:"
            " down, then up with it)"
        )
    if status != 200:
        return f"API server profile: HTTP {status}: {body[:200].decode(errors='replace').strip()}"
    out.write_bytes(body)
    return f"API server CPU profile, {seconds} s: {out} (go tool pprof -top {out})"


def own_metrics(port: int) -> str:
    """birdwatch's own /metrics ("" while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def request_counts(text: str) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    pattern = re.compile(r"^apiserver_request_total\{(.*)\} ([0-9.e+]+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        key = (labels.get("verb", ""), resource)
        counts[key] = counts.get(key, 0.0) + float(m.group(2))
    return counts


def prometheus_queries(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:  # noqa: S310 - the sandbox's loopback URL
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def follow(kube: Kube, namespace: str, canaries: dict[str, Canary]) -> None:
    """Time every traffic write from our own watch of the VirtualServices (the kit's follower: LIST, WATCH, and
    LIST again after a 410 Gone, where a bare watch would retry its stale resourceVersion forever)."""
    last: dict[str, int] = {}

    def see(obj: dict[str, Any]) -> None:
        now = time.monotonic()
        name, weight = obj["metadata"]["name"], canary_weight(obj)
        if name not in last:
            last[name] = weight  # the state before the run, not a write
        elif last[name] != weight:
            last[name] = weight
            if name in canaries:
                canaries[name].writes.append((now, weight))

    await follow_objects(kube, VIRTUALSERVICES, namespace, see)


async def run_one(
    n: int,
    *,
    interval: int,
    bad: int,
    env: dict[str, str],
    api: KubeHTTP,
    exporter: Exporter,
    log_dir: Path,
    pids: dict[str, int],
    namespaces: list[str],
    profile: bool = False,
    apiserver_profile: int = 0,
) -> Result:
    namespace = f"bench-{n}-{uuid.uuid4().hex[:5]}"
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    namespaces.append(namespace)
    names = [f"svc-{i:04d}" for i in range(n)]
    bad_names = set(names[:bad])
    # A few at a time (each KubeHTTP request is a connection of its own): 3,000 objects one by one take a minute.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for created in pool.map(lambda name: [api.apply(obj) for obj in objects(name, namespace)], names):
            assert created
    # The harness's controller-manager, scheduler and kwok make them available, as a cluster would.
    wait_available(api, namespace, *(f"{name}-v2" for name in names), timeout=60 + n * 0.2)
    exporter.set_gauge("bench_errors", 0.0, ns=namespace)
    # The API server's CPU with no birdwatch (its own loops, the controllers' watches, Prometheus's scrape), to take
    # from what it spends during the run.
    await asyncio.sleep(2.0)
    idle_from, idle_cpu0 = time.monotonic(), sample_value(apiserver_metrics(api), "process_cpu_seconds_total")
    await asyncio.sleep(5.0)
    idle_cpu1, idle_until = sample_value(apiserver_metrics(api), "process_cpu_seconds_total"), time.monotonic()
    apiserver_idle = (idle_cpu1 - idle_cpu0) / (idle_until - idle_from)

    health = free_port()
    log_file = (log_dir / f"birdwatch-{n}.log").open("w")
    command = [str(BIRDWATCH)]
    if profile:
        command = [
            str(REPO / ".venv" / "bin" / "python"),
            "-m",
            "cProfile",
            "-o",
            str(log_dir / f"profile-{n}.prof"),
            "-m",
            "birdwatch",
        ]
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
        [
            *command,
            "run",
            "--kubeconfig",
            env["KUBECONFIG"],
            "--prometheus-url",
            env["PROMETHEUS_URL"],
            "--namespace",
            namespace,
            "--health-address",
            f"127.0.0.1:{health}",
            "--log-level",
            "warning",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SLACK_API_TOKEN": ""},
    )
    kube = await Kube.connect(kubeconfig=env["KUBECONFIG"])
    canaries = {name: Canary(name) for name in names}
    watcher = asyncio.create_task(follow(kube, namespace, canaries))
    watchers: dict[str, float] = {}
    side_tasks: list[asyncio.Task[None]] = []

    async def count_watchers() -> None:
        """The most WATCH requests open on each resource, from the first create until the run ends."""
        while True:
            text = await asyncio.to_thread(apiserver_metrics, api)
            for resource, value in by_resource(text, "apiserver_longrunning_requests", verb="WATCH").items():
                watchers[resource] = max(watchers.get(resource, 0.0), value)
            await asyncio.sleep(15.0)  # each /metrics costs the API server some 20 ms

    async def profile_from(phase: str, after: asyncio.Task[None] | None = None) -> None:
        while phase == "steady":
            if all(c.writes for c in canaries.values()):
                break
            await asyncio.sleep(0.2)
        if after is not None:
            await after  # the Go runtime takes one CPU profile at a time (a second one is a 500)
        out = log_dir / f"apiserver-{n}-{phase}.pprof"
        before, t0 = await asyncio.to_thread(apiserver_metrics, api), time.monotonic()
        said = await asyncio.to_thread(take_profile, api, apiserver_profile, out)
        t1, after_ = time.monotonic(), await asyncio.to_thread(apiserver_metrics, api)
        # What the profile's window held, to turn its seconds into milliseconds per step or per request.
        steps = sum(1 for c in canaries.values() for t, w in c.writes if w > 0 and t0 <= t <= t1)
        counts0, counts1 = request_counts(before), request_counts(after_)
        window = {
            "seconds": round(t1 - t0, 2),
            "steps": steps,
            "apiserver_cpu_s": round(
                sample_value(after_, "process_cpu_seconds_total") - sample_value(before, "process_cpu_seconds_total"), 2
            ),
            "requests": {
                f"{verb} {resource}": delta
                for (verb, resource), value in sorted(counts1.items())
                if (delta := round(value - counts0.get((verb, resource), 0.0))) > 0
            },
        }
        out.with_suffix(".json").write_text(json.dumps(window, indent=2) + "\n")
        print(f"  {phase}: {said}; {steps} steps in its {window['seconds']} s", flush=True)

    def own() -> dict[str, float]:
        text = own_metrics(health)
        return {
            "posted": sample_value(text, "birdwatch_events_posted_total"),
            "dropped": sample_value(text, "birdwatch_events_dropped_total"),
        }

    def ours() -> float:
        """CPU seconds of everything the bench runs: birdwatch, the sandbox's processes and this one."""
        return pid_cpu_seconds(proc.pid) + sum(pid_cpu_seconds(p) for p in pids.values()) + sum(os.times()[:2])

    try:
        await asyncio.sleep(2.0)  # the controller's LIST and WATCH are up
        load0 = [round(x, 2) for x in os.getloadavg()]
        rss_idle = proc_rss_kb(proc.pid, "VmRSS")
        metrics0 = apiserver_metrics(api)
        cpu0, req0, q0 = proc_cpu_seconds(proc.pid), request_counts(metrics0), prometheus_queries(env["PROMETHEUS_URL"])
        api_cpu0, etcd0 = sample_value(metrics0, "process_cpu_seconds_total"), pid_cpu_seconds(pids.get("etcd"))
        events0 = by_resource(metrics0, "apiserver_watch_events_total")
        bytes0 = by_resource(metrics0, "apiserver_watch_events_sizes_sum")
        own0, machine0, ours0, from_ = own(), machine_cpu_seconds(), ours(), time.monotonic()
        self0 = sum(os.times()[:2])
        by_process0 = {"birdwatch": pid_cpu_seconds(proc.pid)} | {k: pid_cpu_seconds(p) for k, p in pids.items()}
        good_metric = "vector(0)"
        bad_metric = f'max(bench_errors{{ns="{namespace}"}})'
        started = time.monotonic()
        side_tasks.append(asyncio.create_task(count_watchers()))
        if apiserver_profile:
            first = asyncio.create_task(profile_from("start"))
            side_tasks.extend([first, asyncio.create_task(profile_from("steady", after=first))])

        async def create(name: str) -> None:
            spec = {
                "service": name,
                "canary_version": "v2",
                "increment": 10,
                "interval": interval,
                "deviation": 0.5,
                "metric": bad_metric if name in bad_names else good_metric,
            }
            canaries[name].created = time.monotonic()
            await kube.create(
                BIRDWATCHES,
                namespace,
                {"apiVersion": "otomato.link/v1alpha1", "kind": "BirdWatch", "metadata": {"name": name}, "spec": spec},
            )

        for i in range(0, n, 50):
            await asyncio.gather(*(create(name) for name in names[i : i + 50]))

        # Turn the unhealthy group bad once each of them is at 30 %, and time the rollback from the moment
        # Prometheus shows the bad value.
        visible_at = 0.0
        own_queries = 0  # the bench's, to take from Prometheus's count
        deadline = started + interval * 12 + 120
        if bad_names:
            # Bounded, as everything else here: a run that never gets there says so and goes on to its figures.
            while min(max((w for _, w in canaries[b].writes), default=0) for b in bad_names) < 30:
                if time.monotonic() > deadline:
                    print("  the unhealthy group never reached 30 %: no rollback reaction", file=sys.stderr)
                    break
                await asyncio.sleep(0.05)
            else:
                exporter.set_gauge("bench_errors", 1.0, ns=namespace)
                while time.monotonic() < deadline:
                    out = await asyncio.to_thread(_query, env["PROMETHEUS_URL"], bad_metric)
                    own_queries += 1
                    if out == 1.0:
                        visible_at = time.monotonic()
                        break
                    await asyncio.sleep(0.05)
                else:
                    print("  Prometheus never showed the unhealthy value: no rollback reaction", file=sys.stderr)

        while time.monotonic() < deadline:
            done = sum(1 for c in canaries.values() if c.writes and c.writes[-1][1] in (0,) and len(c.writes) > 1)
            if done == n:
                break
            await asyncio.sleep(0.5)
        # The last Events (the endings) may still be on their way: wait until the count stands still.
        own1, still = own(), time.monotonic()
        while time.monotonic() - still < 1.0 and time.monotonic() < deadline + 15:
            await asyncio.sleep(0.25)
            latest = own()
            if latest != own1:
                own1, still = latest, time.monotonic()
        metrics1 = apiserver_metrics(api)
        cpu1, req1, q1 = proc_cpu_seconds(proc.pid), request_counts(metrics1), prometheus_queries(env["PROMETHEUS_URL"])
        api_cpu1, etcd1 = sample_value(metrics1, "process_cpu_seconds_total"), pid_cpu_seconds(pids.get("etcd"))
        events1 = by_resource(metrics1, "apiserver_watch_events_total")
        bytes1 = by_resource(metrics1, "apiserver_watch_events_sizes_sum")
        machine1, ours1, until = machine_cpu_seconds(), ours(), time.monotonic()
        self1 = sum(os.times()[:2])
        by_process1 = {"birdwatch": pid_cpu_seconds(proc.pid)} | {k: pid_cpu_seconds(p) for k, p in pids.items()}
        load1 = [round(x, 2) for x in os.getloadavg()]
        rss_peak, rss_end = proc_rss_kb(proc.pid, "VmHWM"), proc_rss_kb(proc.pid, "VmRSS")
        statuses = (await kube.list(BIRDWATCHES, namespace))[0]
    finally:
        watcher.cancel()
        for task in side_tasks:
            task.cancel()  # a profile being fetched finishes in its thread; its file is not written
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
        await kube.close()

    steps = sum(len([w for _, w in c.writes if w > 0]) for c in canaries.values())
    lateness: list[float] = []
    lateness_started: list[float] = []
    all_started = max((w[0] for c in canaries.values() for w in c.writes[:1]), default=0.0)
    reaction: list[float] = []
    rollback: list[float] = []
    ratios: list[float] = []
    for c in canaries.values():
        up_steps = [(t, w) for t, w in c.writes if w > 0]
        if up_steps:
            reaction.append(up_steps[0][0] - c.created)
        for (t0, _), (t1, _) in itertools.pairwise(up_steps):
            lateness.append(t1 - t0 - interval)
            if t0 >= all_started:
                lateness_started.append(t1 - t0 - interval)
        if c.name in bad_names:
            zero = [t for t, w in c.writes if w == 0 and t > visible_at]
            if zero and visible_at:
                rollback.append(zero[0] - visible_at)
        elif up_steps and c.writes[-1][1] == 0 and len(c.writes) > 1:
            ratios.append((c.writes[-1][0] - up_steps[0][0]) / (len(up_steps) * interval))
    wanted = {name: ("RolledBack" if name in bad_names else "Promoted") for name in names}
    wrong = sum(1 for obj in statuses if (obj.get("status") or {}).get("phase") != wanted[obj["metadata"]["name"]])
    bench_requests = {("POST", "birdwatches"): n}  # ours; everything else on these resources is birdwatch's
    per_verb: dict[str, float] = {}
    total_requests = 0.0
    for (verb, resource), value in req1.items():
        if resource.split("/")[0] not in (
            "virtualservices",
            "destinationrules",
            "birdwatches",
            "events",
            "deployments",
        ):
            continue
        delta = value - req0.get((verb, resource), 0.0) - bench_requests.get((verb, resource), 0)
        if delta > 0 and verb != "WATCH":
            per_verb[f"{verb} {resource}"] = round(delta / max(steps, 1), 3)
            total_requests += delta

    def ms(xs: list[float]) -> dict[str, float]:
        return {
            "p50": round(pct(xs, 50) * 1000, 1),
            "p99": round(pct(xs, 99) * 1000, 1),
            "max": round(max(xs, default=float("nan")) * 1000, 1),
        }

    return Result(
        n=n,
        interval=interval,
        steps=steps,
        lateness_ms=ms(lateness),
        lateness_started_ms=ms(lateness_started),
        reaction_ms=ms(reaction),
        rollback_reaction_ms=ms(rollback),
        cpu_ms_per_step=round((sum(cpu1) - sum(cpu0)) / max(steps, 1) * 1000, 3),
        cpu_user_ms_per_step=round((cpu1[0] - cpu0[0]) / max(steps, 1) * 1000, 3),
        cpu_system_ms_per_step=round((cpu1[1] - cpu0[1]) / max(steps, 1) * 1000, 3),
        rss_mb_peak=round(rss_peak / 1024, 1),
        rss_mb_idle=round(rss_idle / 1024, 1),
        rss_mb_end=round(rss_end / 1024, 1),
        rss_kb_per_canary=round((rss_peak - rss_idle) / n, 1),
        api_requests_per_step=dict(sorted(per_verb.items(), key=lambda kv: -kv[1])),
        api_requests_total_per_step=round(total_requests / max(steps, 1), 3),
        apiserver_cpu_ms_per_step=round((api_cpu1 - api_cpu0) / max(steps, 1) * 1000, 3),
        apiserver_cpu_ms_per_step_over_idle=round(
            (api_cpu1 - api_cpu0 - apiserver_idle * (until - from_)) / max(steps, 1) * 1000, 3
        ),
        apiserver_idle_cores=round(apiserver_idle, 3),
        etcd_cpu_ms_per_step=round((etcd1 - etcd0) / max(steps, 1) * 1000, 3),
        prometheus_queries_per_step=round((q1 - q0 - own_queries) / max(steps, 1), 3),
        events_posted=round(own1["posted"] - own0["posted"]),
        events_dropped=round(own1["dropped"] - own0["dropped"]),
        duration_ratio=round(statistics.median(ratios), 3) if ratios else float("nan"),
        duration_ratio_p99=round(pct(ratios, 99), 3),
        wrong_endings=wrong,
        measured_seconds=round(until - from_, 1),
        load_before=load0,
        load_after=load1,
        machine_busy_cores=round((machine1[0] - machine0[0]) / (until - from_), 2),
        others_busy_cores=round(max(0.0, (machine1[0] - machine0[0]) - (ours1 - ours0)) / (until - from_), 2),
        bench_busy_cores=round((self1 - self0) / (until - from_), 3),
        cores_by_process={k: round((by_process1[k] - v) / (until - from_), 3) for k, v in by_process0.items()},
        watchers=dict(sorted(watchers.items())),
        watch_events_per_step={
            k: round((v - events0.get(k, 0.0)) / max(steps, 1), 3) for k, v in sorted(events1.items())
        },
        watch_kb_per_step={
            k: round((v - bytes0.get(k, 0.0)) / max(steps, 1) / 1024, 3) for k, v in sorted(bytes1.items())
        },
    )


def _query(url: str, promql: str) -> float | None:
    import urllib.parse

    with urllib.request.urlopen(  # noqa: S310 - the sandbox's loopback URL
        f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}),
        timeout=5,
    ) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(int(mem) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def commit() -> dict[str, Any]:
    """The commit measured, and the files under src/ that differed from it (birdwatch runs from the checkout)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"head": "unknown", "changed": []}
    return {"head": head, "changed": [line[3:] for line in status.splitlines()]}


def report(r: Result) -> str:
    """One N's figures, as lines for a person (the JSON line at the end has them all)."""
    verbs = ", ".join(f"{verb} {value}" for verb, value in r.api_requests_per_step.items())
    return "\n".join(
        [
            f"N={r.n}  interval {r.interval} s ({r.n / r.interval:g} steps/s)  steps {r.steps}  "
            f"measured {r.measured_seconds} s  wrong endings {r.wrong_endings}",
            f"  step lateness p50/p99/max  {r.lateness_ms['p50']} / {r.lateness_ms['p99']} / {r.lateness_ms['max']} ms;"
            f" once all started {r.lateness_started_ms['p50']} / {r.lateness_started_ms['p99']} / "
            f"{r.lateness_started_ms['max']} ms",
            f"  reaction p50/p99           {r.reaction_ms['p50'] / 1000:.2f} / {r.reaction_ms['p99'] / 1000:.2f} s"
            f"   rollback reaction p50/p99 {r.rollback_reaction_ms['p50'] / 1000:.2f} / "
            f"{r.rollback_reaction_ms['p99'] / 1000:.2f} s",
            f"  duration / ideal           {r.duration_ratio} (p99 {r.duration_ratio_p99})",
            f"  birdwatch CPU per step     {r.cpu_ms_per_step} ms (user {r.cpu_user_ms_per_step}, system "
            f"{r.cpu_system_ms_per_step})",
            f"  birdwatch RSS              peak {r.rss_mb_peak} MB, idle {r.rss_mb_idle} MB, at the end "
            f"{r.rss_mb_end} MB; {r.rss_kb_per_canary} kB per canary (peak less idle, over N)",
            f"  API server CPU per step    {r.apiserver_cpu_ms_per_step} ms (process_cpu_seconds_total), "
            f"{r.apiserver_cpu_ms_per_step_over_idle} ms over its idle {r.apiserver_idle_cores} cores; etcd "
            f"{r.etcd_cpu_ms_per_step} ms",
            f"  API requests per step      {r.api_requests_total_per_step}: {verbs}",
            f"  Prometheus queries / step  {r.prometheus_queries_per_step}",
            f"  Events                     {r.events_posted} posted, {r.events_dropped} dropped "
            f"({r.events_posted / max(r.steps, 1):.3f} posted per step)",
            f"  machine                    load {r.load_before[0]} before, {r.load_after[0]} after (1-min); "
            f"{r.machine_busy_cores} cores busy, {r.others_busy_cores} of them not the bench's (the bench itself "
            f"{r.bench_busy_cores})",
            "  cores by process           " + ", ".join(f"{k} {v}" for k, v in r.cores_by_process.items()),
            "  watches open               " + ", ".join(f"{k} {v:g}" for k, v in r.watchers.items()),
            "  watch events per step      "
            + ", ".join(f"{k} {v} ({r.watch_kb_per_step.get(k, 0.0)} kB)" for k, v in r.watch_events_per_step.items()),
        ]
    )


def table(path: Path) -> str:
    """A saved run as the README's Markdown table."""
    rows = [
        "| N (steps/s) | step lateness p50 / p99 (p99 once all started) | reaction p50 / p99 | rollback reaction "
        "p50 / p99 | CPU per step | RSS peak (per canary) | API requests per step | API server CPU per step "
        "(over its idle) | Events posted / dropped | run / ideal (p99) | load, others' cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in json.loads(path.read_text())["results"]:
        late, react, back = r["lateness_ms"], r["reaction_ms"], r["rollback_reaction_ms"]
        started = r.get("lateness_started_ms", {}).get("p99", float("nan"))
        over_idle = r.get("apiserver_cpu_ms_per_step_over_idle", float("nan"))
        rows.append(
            f"| {r['n']:,} ({r['n'] / r['interval']:g}) | {late['p50']:g} / {late['p99']:,g} ms "
            f"({started:,g} ms) | {react['p50'] / 1000:.2f} / {react['p99'] / 1000:.2f} s | "
            f"{back['p50'] / 1000:.2f} / {back['p99'] / 1000:.2f} s | {r['cpu_ms_per_step']:.2f} ms | "
            f"{r['rss_mb_peak']:g} MB ({r['rss_kb_per_canary']:g} kB) | {r['api_requests_total_per_step']:.2f} | "
            f"{r['apiserver_cpu_ms_per_step']:.1f} ({over_idle:.1f}) ms"
            f" | {r['events_posted']:,} / {r['events_dropped']:,} | "
            f"{r['duration_ratio']:.3f} ({r['duration_ratio_p99']:.2f}) | "
            f"{r['load_before'][0]:g}-{r['load_after'][0]:g}, {r['others_busy_cores']:g} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--n",
        type=int,
        action="append",
        help="concurrent canaries (repeatable); default 10 100 500 (make bench: and 1000)",
    )
    parser.add_argument("--interval", type=int, default=2, help="seconds between steps (default 2; make bench: 10)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run birdwatch under cProfile (slower); the profile lands in .sandbox/bench/",
    )
    parser.add_argument(
        "--apiserver-profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="take two CPU profiles of kube-apiserver, SECONDS each, at the start and in steady state (needs a "
        "sandbox started with BIRDWATCH_SANDBOX_PROFILING=1); they land in .sandbox/bench/",
    )
    parser.add_argument("--bad", type=float, default=0.1, help="share of canaries that turn unhealthy (default 0.1)")
    parser.add_argument(
        "--table", type=Path, metavar="RESULTS", help="print a saved run as the README's table, and stop"
    )
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    began = time.monotonic()
    measured = commit()
    if up() != 0:
        return 1
    env = read_env(SANDBOX / "env") or {}
    state = json.loads(STATE.read_text())
    api = KubeHTTP(
        "127.0.0.1",
        int(state["api_port"]),
        ca=Path(state["ca"]),
        client=Pair(Path(state["admin_cert"]), Path(state["admin_key"])),
    )
    exporter = Exporter().start()
    targets = Path(env["BIRDWATCH_PROM_TARGETS"])
    # A file of this run's own: another bench on the same sandbox must not take this one's target away at its end.
    target_file = targets / f"bench-{os.getpid()}.json"
    target_file.write_text(json.dumps([{"targets": [exporter.address]}]))
    log_dir = SANDBOX / "bench"
    log_dir.mkdir(exist_ok=True)
    results = []
    namespaces: list[str] = []
    pids = {name: int(pid) for name, pid in state.get("pids", {}).items()}
    try:
        time.sleep(2.5)  # Prometheus picks up the exporter
        for n in args.n or [10, 100, 500]:
            bad = max(1, int(n * args.bad)) if args.bad > 0 else 0
            result = asyncio.run(
                run_one(
                    n,
                    interval=args.interval,
                    bad=bad,
                    env=env,
                    api=api,
                    exporter=exporter,
                    log_dir=log_dir,
                    pids=pids,
                    namespaces=namespaces,
                    profile=args.profile,
                    apiserver_profile=args.apiserver_profile,
                )
            )
            results.append(result)
            print(report(result), flush=True)
    finally:
        exporter.stop()
        target_file.unlink(missing_ok=True)
        # What the runs left (N Deployments, their pods, BirdWatches...) goes once all are measured, in the
        # background (between runs, the namespace controller's work would load the next N's measurement); a kept
        # sandbox would otherwise grow by every run.
        for namespace in namespaces:
            api.request("DELETE", f"/api/v1/namespaces/{namespace}")
    took = time.monotonic() - began
    summary = {
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": measured,
        "bench_seconds": round(took, 1),
        "results": [asdict(r) for r in results],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    changed = f" with {', '.join(measured['changed'])} changed" if measured["changed"] else ""
    print(f"commit {measured['head']}{changed}; bench took {took / 60:.1f} min; saved {out.relative_to(REPO)}")
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
