"""`make soak`: 50 canaries, rollout after rollout, through injected faults for about ten minutes.

birdwatch runs as its own process behind two fault-injecting proxies (tests/faultproxy.py): 10 % of its API
requests fail (500, 503, 429, or hang until its timeout), its watch is cut every 20 s, and Prometheus is down for
1.5 s every 45 s. Every BirdWatch that ends is given a new canary version, so it starts over; one in ten turns
unhealthy and must roll back. The weights are recorded from a watch of our own, straight to the API server.

At the end it reports: faults injected, rollouts run, rollouts that ended wrong (wrong phase, a weight that did not
rise by exactly `increment`, or went above `max_weight`), RSS and asyncio tasks after the warm-up and at the end,
and the error lines in birdwatch's log. It exits non-zero if any rollout ended wrong, if memory or tasks grew, or
if birdwatch logged an error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from birdwatch.kube import BIRDWATCHES, VIRTUALSERVICES, Kube, KubeError  # noqa: E402
from envtest.assets import ensure_assets  # noqa: E402
from envtest.controlplane import ControlPlane, free_port  # noqa: E402
from envtest.exporter import Exporter  # noqa: E402
from envtest.promserver import PrometheusServer  # noqa: E402
from faultproxy import NOT_WATCHES, FaultProxy, api_server_proxy  # noqa: E402
from kit import deployment, make_available  # noqa: E402

NAMESPACE = "soak"
INCREMENT, MAX_WEIGHT, INTERVAL = 10, 50, 2


@dataclass
class Rollout:
    name: str
    version: str
    bad: bool
    id: str = ""
    weights: list[int] = field(default_factory=lambda: [0])
    phase: str = ""


def canary_weight(vs: dict[str, Any]) -> int:
    for d in vs["spec"]["http"][0]["route"]:
        if d["destination"]["subset"] == "canary":
            return int(d.get("weight", 0))
    return 0


def objects(name: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for version in ("v2", "v3"):
        canary = deployment(f"{name}-{version}", version, app=name)
        canary["metadata"]["namespace"] = NAMESPACE
        out.append(canary)
    out.append(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"host": name, "subsets": [{"name": "production", "labels": {"app": name, "version": "v1"}}]},
        }
    )
    out.append(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "hosts": [name],
                "http": [{"name": "primary", "route": [{"destination": {"host": name, "subset": "production"}}]}],
            },
        }
    )
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scrape(port: int, metric: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[1])
    return float("nan")


async def soak(minutes: float, canaries: int, workdir: Path) -> int:
    assets = ensure_assets()
    plane = ControlPlane(workdir / "controlplane", assets)
    plane.start()
    exporter = Exporter().start()
    prometheus = PrometheusServer(workdir / "prometheus", assets.prometheus, static_targets=[exporter.address])
    prometheus.start()
    api = plane.http()
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    names = [f"svc-{i:02d}" for i in range(canaries)]
    for name in names:
        for obj in objects(name):
            api.apply(obj)
            if obj["kind"] == "Deployment":
                make_available(api, NAMESPACE, obj["metadata"]["name"])

    api_proxy, kubeconfig = await api_server_proxy(plane, workdir / "proxy", seed=7)
    prom_proxy = await FaultProxy(prometheus.url, seed=8, name="prometheus proxy").start()
    health = free_port()
    log_path = workdir / "birdwatch.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the soak
        [
            str(REPO / ".venv" / "bin" / "birdwatch"),
            "run",
            "--kubeconfig",
            str(kubeconfig),
            "--prometheus-url",
            prom_proxy.url,
            "--namespace",
            NAMESPACE,
            "--health-address",
            f"127.0.0.1:{health}",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--watch-read-timeout",
            "30",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SLACK_API_TOKEN": ""},
    )
    kube = await Kube.connect(kubeconfig=str(plane.kubeconfig))
    current: dict[str, Rollout] = {}
    finished: list[Rollout] = []
    rng_bad = {name: i % 10 == 0 for i, name in enumerate(names)}

    async def follow() -> None:
        _, rv = await kube.list(VIRTUALSERVICES, NAMESPACE)
        while True:
            try:
                async for event in kube.watch(VIRTUALSERVICES, NAMESPACE, resource_version=rv):
                    rv = event.object["metadata"].get("resourceVersion", rv)
                    if event.type != "MODIFIED":
                        continue
                    rollout = current.get(event.object["metadata"]["name"])
                    weight = canary_weight(event.object)
                    if rollout is not None and rollout.weights[-1] != weight:
                        rollout.weights.append(weight)
            except KubeError:
                await asyncio.sleep(0.2)

    serial = iter(range(1, 1_000_000))

    async def start(name: str, version: str) -> None:
        bad = rng_bad[name]
        # Each rollout reads a series of its own, so no value of an earlier rollout can reach its baseline.
        rollout_id = str(next(serial))
        spec = {
            "service": name,
            "canary_version": version,
            "increment": INCREMENT,
            "interval": INTERVAL,
            "max_weight": MAX_WEIGHT,
            "deviation": 0.5,
            "failure_threshold": 2,
            "metric": f'max(soak_errors{{svc="{name}",rollout="{rollout_id}"}})',
        }
        current[name] = Rollout(name, version, bad, rollout_id)
        try:
            await kube.merge_patch(BIRDWATCHES, NAMESPACE, name, {"spec": spec})
        except KubeError:
            await kube.create(
                BIRDWATCHES,
                NAMESPACE,
                {"apiVersion": "otomato.link/v1alpha1", "kind": "BirdWatch", "metadata": {"name": name}, "spec": spec},
            )

    follower = asyncio.create_task(follow())
    await asyncio.sleep(1.0)
    try:
        for name in names:
            await start(name, "v2")
        began = time.monotonic()
        warm = began + 60.0
        end = began + minutes * 60.0
        baseline: dict[str, float] = {}
        next_outage = began + 45.0
        api_proxy.error_rate(0.10, scope=NOT_WATCHES)
        api_proxy.cut_watches_every(20.0)
        while time.monotonic() < end or current:
            now = time.monotonic()
            if not baseline and now >= warm:
                baseline = {"rss_kb": rss_kb(proc.pid), "tasks": scrape(health, "birdwatch_asyncio_tasks")}
                print(
                    f"after warm-up: RSS {baseline['rss_kb'] / 1024:.1f} MB, asyncio tasks {baseline['tasks']:.0f}",
                    flush=True,
                )
            if now >= next_outage and now < end:
                prom_proxy.down(seconds=1.5)
                next_outage = now + 45.0
            if proc.poll() is not None:
                print(f"birdwatch exited with {proc.returncode}", flush=True)
                return 1
            items, _ = await kube.list(BIRDWATCHES, NAMESPACE)
            for obj in items:
                name = obj["metadata"]["name"]
                rollout = current.get(name)
                status = obj.get("status") or {}
                if rollout is None or status.get("observedGeneration") != obj["metadata"]["generation"]:
                    continue
                if rollout.bad and status.get("phase") == "Progressing" and status.get("baseline") is not None:
                    exporter.set_gauge("soak_errors", 5.0, svc=name, rollout=rollout.id)
                if status.get("phase") in ("Promoted", "RolledBack", "Frozen", "Failed"):
                    rollout.phase = status["phase"]
                    finished.append(current.pop(name))
                    if time.monotonic() < end:
                        await start(name, "v3" if rollout.version == "v2" else "v2")
            if time.monotonic() > end + 180:
                print(f"{len(current)} rollouts did not end within 3 minutes of the soak's end", flush=True)
                break
            await asyncio.sleep(0.5)
        api_proxy.reset()
        prom_proxy.reset()
        await asyncio.sleep(3.0)
        final = {"rss_kb": rss_kb(proc.pid), "tasks": scrape(health, "birdwatch_asyncio_tasks")}
    finally:
        follower.cancel()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
        await kube.close()
        await api_proxy.close()
        await prom_proxy.close()
        exporter.stop()
        prometheus.stop()
        plane.stop()

    wrong = []
    for r in finished + list(current.values()):
        expected = "RolledBack" if r.bad else "Promoted"
        steps = r.weights
        # Both endings drop the canary subset to 0 (promotion repoints production at the canary's version first);
        # before that, every change is one increment up from 0, never past max_weight.
        rising = steps[:-1]
        ok = (
            r.phase == expected
            and steps[-1] == 0
            and all(b - a == INCREMENT for a, b in itertools.pairwise(rising))
            and max(steps) <= MAX_WEIGHT
            and (r.phase != "Promoted" or rising[-1] == MAX_WEIGHT)
        )
        if not ok:
            wrong.append({"name": r.name, "version": r.version, "phase": r.phase, "weights": steps})
    errors = []
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            errors.append(line[:200])
            continue
        if entry.get("level") in ("error", "critical"):
            errors.append(line[:300])
    faults = {f"api {k}": v for k, v in api_proxy.faults().items()}
    faults.update({f"prometheus {k}": v for k, v in prom_proxy.faults().items()})
    summary = {
        "minutes": minutes,
        "canaries": canaries,
        "rollouts": len(finished),
        "unfinished": len(current),
        "wrong": len(wrong),
        "faults": faults,
        "rss_mb": {"after_warmup": round(baseline.get("rss_kb", 0) / 1024, 1), "end": round(final["rss_kb"] / 1024, 1)},
        "asyncio_tasks": {"after_warmup": baseline.get("tasks"), "end": final["tasks"]},
        "error_lines": len(errors),
    }
    for w in wrong[:10]:
        print("wrong:", w)
    for e in errors[:10]:
        print("error line:", e)
    print(f"faults injected: {sum(faults.values())} {faults}")
    print(f"rollouts run: {len(finished)}, ended wrong: {len(wrong)}, unfinished: {len(current)}")
    print(
        f"RSS after warm-up {summary['rss_mb']['after_warmup']} MB, at the end {summary['rss_mb']['end']} MB; "
        f"asyncio tasks {summary['asyncio_tasks']['after_warmup']} -> {summary['asyncio_tasks']['end']}"
    )
    print(json.dumps(summary, separators=(",", ":")))
    grew = final["rss_kb"] > baseline.get("rss_kb", final["rss_kb"]) * 1.25 + 10240
    leaked = final["tasks"] > baseline.get("tasks", final["tasks"]) + 5
    return 1 if wrong or current or errors or grew or leaked else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--canaries", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (birdwatch's log) and say where")
    args = parser.parse_args()
    if args.keep:
        folder = tempfile.mkdtemp(prefix="birdwatch-soak-")
        print(f"work folder: {folder}")
        return asyncio.run(soak(args.minutes, args.canaries, Path(folder)))
    with tempfile.TemporaryDirectory(prefix="birdwatch-soak-") as tmp:
        return asyncio.run(soak(args.minutes, args.canaries, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
