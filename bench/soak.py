"""`make soak`: 50 canaries, rollout after rollout, through injected faults and leader kills for about ten minutes.

Two birdwatch replicas run as their own processes with ``--leader-elect``, behind two fault-injecting proxies
(birdwatch_sandbox.faultproxy): 10 % of their API requests fail (500, 503, 429, or hang until their timeout), their
watches are cut every 20 s, and Prometheus is down for 1.5 s every 45 s. Every 20-60 s (seeded, so every run kills at
the same moments) the leader is SIGKILLed and started again at once, as a standby; the other replica must take over from
the rollout records. Every BirdWatch that ends is given a new canary version, so it starts over; one in ten turns
unhealthy and must roll back. The canaries' Deployments become available through the harness's real controllers. The
weights, the rollout records and the Lease are followed from watches of our own, straight to the API server.

Each rollout's metric starts at its own value and is moved (within ``deviation`` for a healthy canary) once the baseline
is taken, so a baseline taken a second time would read a different value and be seen.

At the end it reports: faults and kills, rollouts ended right and wrong (wrong phase, a weight that fell back or jumped
more than one increment, or went above ``max_weight``), baselines retaken, failover time (leader killed -> the next
traffic write, by the replica that took the Lease) p50 / p99, RSS (per process: none lives long, so it is reported, not
judged), asyncio tasks of the leader at the end against those of a fresh leader taking over from it with the same
BirdWatches, and the error lines in the replicas' logs (those that report the injected Prometheus outages are expected,
and counted apart). It exits non-zero if any rollout ended wrong or did not end, a baseline was retaken, the leader at
the end (its count once steady) had more tasks than the fresh one beyond 2 plus one per 200 rollouts run (a leak grows
with the work), or a replica logged an unexpected error."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birdwatch.kube import BIRDWATCHES, LEASES, VIRTUALSERVICES, Kube, KubeError
from birdwatch.router import Record
from birdwatch_sandbox.envtest.assets import ensure_assets
from birdwatch_sandbox.envtest.controlplane import ControlPlane, free_port
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.faultproxy import NOT_WATCHES, FaultProxy, api_server_proxy
from birdwatch_sandbox.kit import deployment, follow_objects, wait_available

REPO = Path(__file__).resolve().parents[1]

NAMESPACE = "soak"
INCREMENT, MAX_WEIGHT, INTERVAL = 10, 50, 2
START_VALUE, HEALTHY_SHIFT, BAD_VALUE, DEVIATION = 0.1, 0.2, 5.0, 0.5
KILL_EVERY = (20.0, 60.0)
# Leader election as fast as the faults allow: a renewal may hang until its timeout, so the renew deadline leaves
# room for several tries within it.
LEASE_FLAGS = ["--lease-duration", "5", "--renew-deadline", "4", "--retry-period", "0.5"]


@dataclass
class Rollout:
    name: str
    version: str
    bad: bool
    id: str = ""
    weights: list[int] = field(default_factory=lambda: [0])
    phase: str = ""
    baselines: list[float] = field(default_factory=list)  # distinct baselines in its records, in order
    shifted: bool = False  # the metric was moved after the baseline
    generation: int = 0  # the BirdWatch's generation this rollout runs under
    traffic_ended: str = ""  # the ending its record on the VirtualService gives, beside the last weights
    status_ended_at: float = 0.0  # when its status first showed an ending


class Replica:
    """One birdwatch process slot: started again, under a new identity, each time it is killed."""

    def __init__(self, slot: str, argv: list[str], workdir: Path) -> None:
        self.slot, self.argv, self.workdir = slot, argv, workdir
        self.generation = 0
        self.health = 0
        self.identity = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> None:
        self.generation += 1
        self.identity = f"soak-{self.slot}-{self.generation}"
        self.health = free_port()
        log = self.workdir / f"birdwatch-{self.identity}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *self.argv,
                    *("--health-address", f"127.0.0.1:{self.health}"),
                    *("--leader-elect", "--leader-elect-namespace", NAMESPACE),
                    *("--leader-elect-identity", self.identity),
                    *LEASE_FLAGS,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SLACK_API_TOKEN": ""},
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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


async def soak(minutes: float, canaries: int, workdir: Path, *, seed: int = 11) -> int:
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
    # The harness's controller-manager, scheduler and kwok make the canaries' Deployments available.
    wait_available(api, NAMESPACE, *(f"{name}-{v}" for name in names for v in ("v2", "v3")), timeout=120)

    api_proxy, kubeconfig = await api_server_proxy(plane, workdir / "proxy", seed=7)
    prom_proxy = await FaultProxy(prometheus.url, seed=8, name="prometheus proxy").start()
    argv = [
        str(REPO / ".venv" / "bin" / "birdwatch"),
        "run",
        *("--kubeconfig", str(kubeconfig)),
        *("--prometheus-url", prom_proxy.url),
        *("--namespace", NAMESPACE),
        *("--log-format", "json", "--log-level", "info"),
        *("--watch-read-timeout", "30"),
    ]
    replicas = {slot: Replica(slot, argv, workdir) for slot in ("a", "b")}
    for replica in replicas.values():
        replica.start()
    kube = await Kube.connect(kubeconfig=str(plane.kubeconfig))
    current: dict[str, Rollout] = {}
    finished: list[Rollout] = []
    rng_bad = {name: i % 10 == 0 for i, name in enumerate(names)}
    rng = random.Random(seed)  # noqa: S311 - the kill moments, not a secret
    holder = ""
    lease_changes: list[tuple[float, str]] = []  # (when, new holder)
    writes: list[float] = []  # when each traffic write was seen
    kills: list[tuple[float, str]] = []  # (when, identity killed)
    rss_at_kill: list[float] = []
    last_weight: dict[str, int] = {}

    def see_vs(obj: dict[str, Any]) -> None:
        now = time.monotonic()
        name = obj["metadata"]["name"]
        weight = canary_weight(obj)
        if last_weight.get(name, weight) != weight:
            writes.append(now)
        last_weight[name] = weight
        rollout = current.get(name)
        if rollout is None:
            return
        if rollout.weights[-1] != weight:
            rollout.weights.append(weight)
        record = Record.parse(obj)
        if record is None or record.canary != rollout.version or record.generation != rollout.generation:
            return
        if record.done:
            rollout.traffic_ended = record.phase or "done"
        elif record.baseline is not None and (not rollout.baselines or rollout.baselines[-1] != record.baseline):
            rollout.baselines.append(record.baseline)

    def see_lease(obj: dict[str, Any]) -> None:
        nonlocal holder
        if obj["metadata"]["name"] != "birdwatch":
            return
        now_holder = str((obj.get("spec") or {}).get("holderIdentity") or "")
        if now_holder != holder:
            holder = now_holder
            lease_changes.append((time.monotonic(), now_holder))

    serial = iter(range(1, 1_000_000))

    async def start(name: str, version: str) -> None:
        bad = rng_bad[name]
        # Each rollout reads a series of its own, so no value of an earlier rollout can reach its baseline.
        rollout_id = str(next(serial))
        exporter.set_gauge("soak_errors", START_VALUE, svc=name, rollout=rollout_id)
        spec = {
            "service": name,
            "canary_version": version,
            "increment": INCREMENT,
            "interval": INTERVAL,
            "max_weight": MAX_WEIGHT,
            "deviation": DEVIATION,
            "failure_threshold": 2,
            "metric": f'max(soak_errors{{svc="{name}",rollout="{rollout_id}"}})',
        }
        rollout = current[name] = Rollout(name, version, bad, rollout_id)
        try:
            obj = await kube.merge_patch(BIRDWATCHES, NAMESPACE, name, {"spec": spec})
        except KubeError:
            obj = await kube.create(
                BIRDWATCHES,
                NAMESPACE,
                {"apiVersion": "otomato.link/v1alpha1", "kind": "BirdWatch", "metadata": {"name": name}, "spec": spec},
            )
        rollout.generation = int(obj["metadata"]["generation"])

    def leader() -> Replica | None:
        return next((r for r in replicas.values() if r.identity == holder), None)

    followers = [
        asyncio.create_task(follow_objects(kube, VIRTUALSERVICES, NAMESPACE, see_vs)),
        asyncio.create_task(follow_objects(kube, LEASES, NAMESPACE, see_lease)),
    ]
    final: dict[str, float] = {}
    idle: dict[str, float] = {}
    reference: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 60
        while leader() is None:
            if time.monotonic() > deadline:
                print("no replica took the Lease within 60 s", flush=True)
                return 1
            await asyncio.sleep(0.2)
        first = leader()
        assert first is not None
        await asyncio.sleep(2.0)  # its watch is up and idle
        idle = {"rss_kb": rss_kb(first.proc.pid), "tasks": scrape(first.health, "birdwatch_asyncio_tasks")}  # type: ignore[union-attr]
        print(f"idle leader: RSS {idle['rss_kb'] / 1024:.1f} MB, asyncio tasks {idle['tasks']:.0f}", flush=True)
        for name in names:
            await start(name, "v2")
        began = time.monotonic()
        end = began + minutes * 60.0
        next_outage = began + 45.0
        next_kill = began + rng.uniform(*KILL_EVERY)
        api_proxy.error_rate(0.10, scope=NOT_WATCHES)
        api_proxy.cut_watches_every(20.0)
        while time.monotonic() < end or current:
            now = time.monotonic()
            if now >= next_outage and now < end:
                prom_proxy.down(seconds=1.5)
                next_outage = now + 45.0
            if now >= next_kill and now < end:
                victim = leader()
                if victim is not None and victim.proc is not None and victim.proc.poll() is None:
                    rss_at_kill.append(rss_kb(victim.proc.pid) / 1024)
                    kills.append((time.monotonic(), victim.identity))
                    victim.kill()
                    victim.start()  # at once: it comes back as the standby
                next_kill = now + rng.uniform(*KILL_EVERY)
            for replica in replicas.values():
                assert replica.proc is not None
                if replica.proc.poll() is not None:
                    print(f"birdwatch {replica.identity} exited with {replica.proc.returncode}", flush=True)
                    return 1
            items, _ = await kube.list(BIRDWATCHES, NAMESPACE)
            for obj in items:
                name = obj["metadata"]["name"]
                rollout = current.get(name)
                status = obj.get("status") or {}
                if rollout is None or status.get("observedGeneration") != obj["metadata"]["generation"]:
                    continue
                if not rollout.shifted and status.get("phase") == "Progressing" and status.get("baseline") is not None:
                    # Move the metric once the baseline is taken: a healthy canary stays within the deviation, a
                    # bad one goes far past it; a baseline taken again would read the moved value.
                    value = BAD_VALUE if rollout.bad else float(status["baseline"]) + HEALTHY_SHIFT
                    exporter.set_gauge("soak_errors", value, svc=name, rollout=rollout.id)
                    rollout.shifted = True
                if status.get("phase") in ("Promoted", "RolledBack", "Frozen", "Failed"):
                    # The status is written after the traffic: wait until our watch of the VirtualService has seen
                    # the ending's weights too (its record says so), so they are counted for this rollout and not
                    # the next. A status without that record for 15 s is judged on what was seen.
                    rollout.status_ended_at = rollout.status_ended_at or time.monotonic()
                    if not rollout.traffic_ended and time.monotonic() - rollout.status_ended_at < 15:
                        continue
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
        # Idle again: give queued Events, retries and last checks time to finish (a request the proxy left hanging
        # ends only at birdwatch's 30 s request timeout), and count the tasks once their number stands still
        # (three readings a second apart) near the idle count: a count taken while they still run is a moment, not
        # a leak, which would grow with the rollouts run.
        settle = time.monotonic() + 45
        counts: list[float] = []
        while True:
            await asyncio.sleep(1.0)
            last = leader()
            if last is None or last.proc is None:
                continue
            final = {"rss_kb": rss_kb(last.proc.pid), "tasks": scrape(last.health, "birdwatch_asyncio_tasks")}
            counts.append(final["tasks"])
            steady = len(counts) >= 3 and counts[-1] == counts[-2] == counts[-3]
            if (steady and final["tasks"] <= idle["tasks"] + 2) or time.monotonic() > settle:
                break
        # The reference for "no task leaked": the standby, taking over now, idle with the same BirdWatches (all
        # ended) but none of the soak's history. (The idle leader at the start had no BirdWatches at all, and some
        # tasks start only once there is work.)
        ended_leader = leader()
        if ended_leader is not None:
            ended_leader.kill()
            settle = time.monotonic() + 30
            readings: list[float] = []
            while time.monotonic() < settle:
                await asyncio.sleep(1.0)
                standby = leader()
                if standby is None or standby is ended_leader or standby.proc is None:
                    continue
                readings.append(scrape(standby.health, "birdwatch_asyncio_tasks"))
                if len(readings) >= 5 and readings[-1] == readings[-2] == readings[-3]:
                    reference["tasks"] = readings[-1]
                    break
    finally:
        for task in followers:
            task.cancel()
        for replica in replicas.values():
            replica.stop()
        await kube.close()
        await api_proxy.close()
        await prom_proxy.close()
        exporter.stop()
        prometheus.stop()
        plane.stop()

    wrong = []
    right = 0
    fell_back = jumped = 0
    retaken = 0
    for r in finished + list(current.values()):
        expected = "RolledBack" if r.bad else "Promoted"
        steps = r.weights
        # Both endings drop the canary subset to 0 (promotion repoints production at the canary's version first);
        # before that, every change is one increment up from 0, never past max_weight.
        rising = steps[:-1]
        backs = sum(1 for a, b in itertools.pairwise(rising) if b < a)
        jumps = sum(1 for a, b in itertools.pairwise(rising) if b - a > INCREMENT)
        fell_back += backs
        jumped += jumps
        retaken += max(0, len(r.baselines) - 1)
        ok = (
            r.phase == expected
            and steps[-1] == 0
            and all(b - a == INCREMENT for a, b in itertools.pairwise(rising))
            and max(steps) <= MAX_WEIGHT
            and (r.phase != "Promoted" or rising[-1] == MAX_WEIGHT)
            and len(r.baselines) <= 1
        )
        if ok:
            right += 1
        else:
            wrong.append(
                {"name": r.name, "version": r.version, "phase": r.phase, "weights": steps, "baselines": r.baselines}
            )
    failovers = []
    for killed_at, identity in kills:
        taken = next((t for t, h in lease_changes if t > killed_at and h and h != identity), None)
        if taken is None:
            continue
        step = next((t for t in writes if t >= taken), None)
        if step is not None:
            failovers.append(step - killed_at)
    errors = []
    outage_errors = 0
    for replica in replicas.values():
        for log_path in replica.logs:
            for line in log_path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    errors.append(f"{log_path.name}: {line[:200]}")
                    continue
                if entry.get("level") not in ("error", "critical"):
                    continue
                if entry.get("provider") == "prometheus" and "not reachable" in str(entry.get("event")):
                    outage_errors += 1  # said of an outage the soak itself injects: expected
                else:
                    errors.append(f"{log_path.name}: {line[:300]}")
    faults = {f"api {k}": v for k, v in api_proxy.faults().items()}
    faults.update({f"prometheus {k}": v for k, v in prom_proxy.faults().items()})
    summary: dict[str, Any] = {
        "minutes": minutes,
        "canaries": canaries,
        "rollouts": len(finished),
        "right": right,
        "wrong": len(wrong),
        "unfinished": len(current),
        "weights_fell_back": fell_back,
        "weights_jumped": jumped,
        "baselines_retaken": retaken,
        "kills": len(kills),
        "failover_s": {
            "n": len(failovers),
            "p50": round(percentile(failovers, 0.5), 2),
            "p99": round(percentile(failovers, 0.99), 2),
            "max": round(max(failovers, default=float("nan")), 2),
            "mean": round(statistics.fmean(failovers), 2) if failovers else None,
        },
        "faults": faults,
        "rss_mb": {
            "idle_leader": round(idle.get("rss_kb", 0) / 1024, 1),
            "leaders_at_kill_max": round(max(rss_at_kill, default=0.0), 1),
            "end_leader": round(final.get("rss_kb", 0) / 1024, 1),
        },
        "asyncio_tasks": {
            "idle_leader": idle.get("tasks"),
            "end_leader": final.get("tasks"),
            "fresh_leader_after": reference.get("tasks"),
        },
        "error_lines": len(errors),
        "error_lines_for_injected_outages": outage_errors,
    }
    for w in wrong[:10]:
        print("wrong:", w)
    for e in errors[:10]:
        print("error line:", e)
    print(f"faults injected: {sum(faults.values())} {faults}")
    print(f"rollouts run: {len(finished)}, ended right: {right}, ended wrong: {len(wrong)}, unfinished: {len(current)}")
    print(
        f"weights that fell back: {fell_back}, jumped more than one increment: {jumped}; baselines retaken: {retaken}"
    )
    print(
        f"leader kills: {len(kills)}; failover (killed -> next step by the standby) p50 "
        f"{summary['failover_s']['p50']} s, p99 {summary['failover_s']['p99']} s over {len(failovers)}"
    )
    print(
        f"RSS: idle leader {summary['rss_mb']['idle_leader']} MB, leaders when killed up to "
        f"{summary['rss_mb']['leaders_at_kill_max']} MB, leader at the end {summary['rss_mb']['end_leader']} MB; "
        f"asyncio tasks: idle leader at the start {idle.get('tasks')}, the leader at the end {final.get('tasks')}, "
        f"a fresh leader then {reference.get('tasks')}"
    )
    print(f"error lines: {len(errors)} (besides {outage_errors} that report the injected Prometheus outages)")
    print(json.dumps(summary, separators=(",", ":")))
    # A leak grows with the work done (a task per rollout, per step); a leader that has worked for ten minutes may
    # hold a few long-lived tasks more than a fresh one (connections, queues made on first use). So: a fresh
    # leader's count, plus 2, plus one for every 200 rollouts run, is still no leak; 1,700 leaked tasks would be.
    allowance = 2 + len(finished) // 200
    leaked = not final or not reference or final["tasks"] > reference["tasks"] + allowance
    return 1 if wrong or current or errors or leaked or retaken else 0


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
