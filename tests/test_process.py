"""birdwatch as users and the kubelet run it: a real OS process (``.venv/bin/birdwatch run ...``) against the real
API server and Prometheus, stopped with SIGTERM, killed with SIGKILL, restarted, run as two replicas, scraped, and
started with bad configuration. Each process's log is kept under .test-logs/<run>/processes/ and its tail is
attached to the report of a failed test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from birdwatch import __version__
from birdwatch import config as config_module
from birdwatch.kube import BIRDWATCHES, LEASES, Obj
from birdwatch.router import Record
from birdwatch.status import parse_time
from birdwatch_sandbox.envtest.controlplane import KubeHTTP, free_port
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import (
    TERMINAL,
    Cluster,
    apply_all,
    birdwatch,
    deployment,
    destination_rule,
    eventually,
    mesh,
    route_weights,
    virtual_service,
    wait_available,
)
from process import (
    Fleet,
    Proc,
    TrafficLog,
    config_flags,
    http_get,
    parse_metrics,
    run_cli,
    sample,
)

pytest_plugins = ("process",)

BASELINE = 0.25
STEPS = [0, 10, 20, 30, 40, 50, 0]  # max_weight 50 by 10, then promotion (named subsets: the canary's back to 0)
# Watch events arrive within milliseconds of the write; this much jitter between two of them is allowed.
ARRIVAL_SLACK = 0.25


def metric(namespace: str) -> str:
    return f'max(bwtest_errors{{ns="{namespace}"}})'


async def set_metric(prometheus: PrometheusServer, exporter: Exporter, namespace: str, value: float) -> None:
    """Publish the test's metric and wait until Prometheus answers with it."""
    exporter.set_gauge("bwtest_errors", value, ns=namespace)
    await asyncio.to_thread(prometheus.wait_for_value, metric(namespace), value)


def shifted(fleet: Fleet) -> int:
    """The steps birdwatch logged ("traffic shifted"), over every process of the test."""
    return sum(len(proc.said("traffic shifted")) for proc in fleet.procs)


def leader_flags(namespace: str, identity: str, *, fast: bool = False) -> list[str]:
    flags = ["--leader-elect", "--leader-elect-namespace", namespace, "--leader-elect-identity", identity]
    if fast:
        flags += ["--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5"]
    return flags


def no_traceback(proc: Proc) -> None:
    raw = [e["raw"] for e in proc.entries() if "raw" in e]
    assert not any("Traceback" in line for line in raw), f"{proc.name} printed a traceback:\n{proc.tail()}"


def rises_by(weights: list[int], increment: int) -> bool:
    return all(b - a == increment for a, b in itertools.pairwise(weights))


async def lease_holder(cluster: Cluster, name: str = "birdwatch") -> str:
    lease = await cluster.kube.get(LEASES, cluster.namespace, name)
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


# --- 1. graceful shutdown ----------------------------------------------------------------------------------------


async def test_sigterm_mid_rollout_stops_at_a_safe_point_and_a_new_process_resumes(
    fleet: Fleet, cluster: Cluster, admin_http: KubeHTTP, prometheus: PrometheusServer, exporter: Exporter
) -> None:
    ns = cluster.namespace
    mesh(admin_http, ns)
    await set_metric(prometheus, exporter, ns, BASELINE)
    async with TrafficLog(cluster.kube, ns).running() as traffic:
        first = fleet.start("first", namespace=ns, extra=leader_flags(ns, "first"))
        await first.wait_for("became leader")
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), interval=2, max_weight=50))
        await traffic.wait_weight("aleph", 20)
        # Straight after a traffic write: its status write is under way or just done.
        sent = first.terminate()
        code = await first.wait(15)
        shutdown = time.monotonic() - sent
        print(f"\nSIGTERM to exit: {shutdown:.2f} s (exit code {code})")

        assert code == 0, first.tail()
        assert shutdown < 10, f"took {shutdown:.1f}s to stop"
        entries = first.entries()
        assert entries[-1].get("event") == "stopped", first.tail()
        assert [e for e in entries if e.get("event") == "signal received; stopping" and e.get("signal") == "SIGTERM"]
        assert first.said("released lease"), first.tail()
        no_traceback(first)
        # The traffic and its status agree: no canary was left between the two writes.
        vs, status = await cluster.vs(), await cluster.status()
        record = Record.parse(vs)
        assert record is not None
        assert record.weight == status["canaryWeight"] == route_weights(vs)["canary"], (record, status)
        assert record.weight >= 20
        assert status["phase"] == "Progressing"
        assert await lease_holder(cluster) == "", "the Lease was not released"

        await set_metric(prometheus, exporter, ns, 0.5)  # a new baseline would read 0.5; the resumed one keeps 0.25
        second = fleet.start("second", namespace=ns, extra=leader_flags(ns, "second"))
        status = await cluster.wait_phase("Promoted", timeout=40)
        assert second.said("resuming rollout"), second.tail()
        second.terminate()
        assert await second.wait(15) == 0, second.tail()
    assert traffic.weights("aleph") == STEPS
    # The new process waited out the rest of the interval the stopped one had begun.
    gaps = [b.at - a.at for a, b in itertools.pairwise(traffic.steps["aleph"][1:])]
    assert min(gaps) >= 2 - ARRIVAL_SLACK, f"steps {traffic.weights('aleph')[1:]} came {gaps} s apart (interval 2)"
    assert status["baseline"] == pytest.approx(BASELINE)
    assert shifted(fleet) == len(STEPS) - 2


# --- 2. two replicas, the leader killed -------------------------------------------------------------------------


async def test_two_replicas_one_acts_and_the_other_takes_over_after_sigkill(
    fleet: Fleet, cluster: Cluster, admin_http: KubeHTTP, prometheus: PrometheusServer, exporter: Exporter
) -> None:
    ns = cluster.namespace
    lease_duration, interval = 4.0, 2
    mesh(admin_http, ns)
    await set_metric(prometheus, exporter, ns, BASELINE)
    async with TrafficLog(cluster.kube, ns).running() as traffic:
        replicas = {
            ident: fleet.start(ident, namespace=ns, extra=leader_flags(ns, ident, fast=True)) for ident in ("a", "b")
        }

        async def leader() -> str | None:
            said = [ident for ident, p in replicas.items() if p.said("became leader")]
            return said[0] if said else None

        first: str = await eventually(leader, timeout=20, what="a leader")
        other = "b" if first == "a" else "a"
        leading, standby = replicas[first], replicas[other]
        await standby.wait_for("waiting for leadership")
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), interval=interval, max_weight=50))
        step = await traffic.wait_weight("aleph", 20)
        # Mid-interval, so the step's Event has been posted before the leader dies.
        await asyncio.sleep(max(0.0, step.at + interval / 2 - time.monotonic()))

        # Only one acts.
        assert await lease_holder(cluster) == first
        assert len(leading.said("became leader")) == 1
        assert not standby.said("became leader"), standby.tail()
        assert not standby.said("listed birdwatches"), "the standby watched BirdWatches"
        assert not standby.said("traffic shifted"), "the standby shifted traffic"

        weight_at_kill = traffic.weights("aleph")[-1]
        killed = leading.kill()
        assert await leading.wait(5) == -signal.SIGKILL
        exporter.set_gauge("bwtest_errors", 0.5, ns=ns)  # a new baseline would read 0.5
        following = await traffic.next_step_after("aleph", killed, timeout=30)
        failover = following.at - killed
        print(f"\nSIGKILL of the leader to the next traffic step: {failover:.2f} s")
        assert following.weight == weight_at_kill + 10
        assert failover < lease_duration + interval + 2.5, f"failover took {failover:.1f}s"
        await standby.wait_for("became leader")
        status = await cluster.wait_phase("Promoted", timeout=40)
        standby.terminate()
        assert await standby.wait(15) == 0, standby.tail()

    weights = traffic.weights("aleph")
    assert weights == STEPS
    assert rises_by(weights[:-1], 10)
    # Every step once: as many "traffic shifted" lines, over both processes, as distinct steps.
    assert shifted(fleet) == len(set(weights) - {0})
    assert status["baseline"] == pytest.approx(BASELINE)
    assert status["lastValue"] == pytest.approx(0.5)
    no_traceback(standby)


# --- 3. health and metrics ---------------------------------------------------------------------------------------


async def test_health_readiness_and_metrics_during_a_rollout(
    fleet: Fleet, cluster: Cluster, admin_http: KubeHTTP, prometheus: PrometheusServer, exporter: Exporter
) -> None:
    ns = cluster.namespace
    mesh(admin_http, ns)
    await set_metric(prometheus, exporter, ns, BASELINE)
    proc = fleet.start("bw", namespace=ns, extra=leader_flags(ns, "bw"))
    await proc.wait_for("became leader")
    await cluster.create_bw(birdwatch("aleph", metric=metric(ns), interval=2, max_weight=30))
    # At 20 % one check has passed, so every per-canary series is there.
    await eventually(lambda: _weight_at_least(cluster, 20), timeout=30, what="canary at 20%")

    for _ in range(20):  # a scrape between two reads of the same weight
        before = (await cluster.status())["canaryWeight"]
        code, text = await http_get(f"{proc.url}/metrics")
        if (await cluster.status())["canaryWeight"] == before:
            break
        await asyncio.sleep(0.2)
    assert code == 200
    samples = parse_metrics(text)
    labels = {"namespace": ns, "birdwatch": "aleph"}
    assert sample(samples, "birdwatch_canary_weight", **labels) == before
    assert sample(samples, "birdwatch_canary_phase", **labels, phase="Progressing") == 1
    assert sample(samples, "birdwatch_canary_phase", **labels, phase="Promoted") == 0
    assert sample(samples, "birdwatch_metric_value", **labels) == pytest.approx(BASELINE)
    assert sample(samples, "birdwatch_baseline_value", **labels) == pytest.approx(BASELINE)
    assert sample(samples, "birdwatch_step_lateness_seconds_bucket", le="+Inf") is not None
    assert (sample(samples, "birdwatch_step_lateness_seconds_count") or 0) >= 1
    assert sample(samples, "birdwatch_leader") == 1
    assert sample(samples, "birdwatch_canaries") == 1

    for path in ("/healthz", "/readyz"):
        code, body = await http_get(f"{proc.url}{path}")
        assert (code, body.splitlines()[-1]) == (200, "ok"), body
    _, ready = await http_get(f"{proc.url}/readyz")
    assert "[+]prometheus" in ready, ready
    assert "[+]watch" in ready, ready

    await cluster.wait_phase("Promoted", timeout=40)
    _, text = await http_get(f"{proc.url}/metrics")
    samples = parse_metrics(text)
    assert sample(samples, "birdwatch_rollouts_total", result="Promoted") == 1
    assert sample(samples, "birdwatch_canary_phase", **labels, phase="Promoted") == 1
    assert sample(samples, "birdwatch_canary_phase", **labels, phase="Progressing") == 0
    proc.terminate()
    assert await proc.wait(15) == 0, proc.tail()
    no_traceback(proc)


async def test_readyz_says_why_while_prometheus_is_unreachable_and_the_process_keeps_running(
    fleet: Fleet, cluster: Cluster
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = fleet.start("no-prometheus", namespace=cluster.namespace, prometheus_url=dead)
    await proc.wait_for("prometheus not reachable; canaries count failed checks until it is")

    async def not_ready() -> tuple[int, str] | None:
        code, body = await http_get(f"{proc.url}/readyz")
        return (code, body) if code == 503 and "not checked yet" not in body else None

    code, body = await eventually(not_ready, timeout=20, what="/readyz to say Prometheus is down")
    line = next((x for x in body.splitlines() if x.startswith("[-]prometheus")), "")
    assert dead.removeprefix("http://") in line, body  # the reason names the address it could not reach
    assert body.splitlines()[-1] == "not ok"
    code, body = await http_get(f"{proc.url}/healthz")
    assert code == 200, body
    await asyncio.sleep(2)
    assert proc.alive(), proc.tail()
    proc.terminate()
    assert await proc.wait(15) == 0, proc.tail()
    no_traceback(proc)


async def _weight_at_least(cluster: Cluster, weight: int) -> bool:
    return int((await cluster.status()).get("canaryWeight", 0)) >= weight


# --- 4. SIGKILL at random moments -------------------------------------------------------------------------------

CHAOS_SEED = 20261126
CHAOS_ROLLOUTS = 20
CHAOS_AT_ONCE = 5
CHAOS_INTERVAL = 1
CHAOS_BASELINE = 0.2
CHAOS_STEPS = [0, 10, 20, 30, 40, 50, 0]


@dataclass
class Feeder:
    """Keeps ``at_once`` BirdWatches going in the namespace until ``total`` have ended."""

    cluster: Cluster
    names: list[str]
    at_once: int
    ended: dict[str, Obj]

    async def run(self) -> None:
        created = 0
        while len(self.ended) < len(self.names):
            items, _ = await self.cluster.kube.list(BIRDWATCHES, self.cluster.namespace)
            for item in items:
                status = item.get("status") or {}
                if (
                    status.get("phase") in TERMINAL
                    and status.get("observedGeneration") == item["metadata"]["generation"]
                ):
                    self.ended.setdefault(item["metadata"]["name"], status)
            while created < len(self.names) and created - len(self.ended) < self.at_once:
                name = self.names[created]
                await self.cluster.create_bw(
                    birdwatch(
                        name,
                        service=name,
                        metric=metric(self.cluster.namespace),
                        interval=CHAOS_INTERVAL,
                        increment=10,
                        max_weight=50,
                    )
                )
                created += 1
            await asyncio.sleep(0.2)


def judge_rollout(status: Obj | None, steps: list[tuple[float, int, Record | None]]) -> list[str]:
    """What went wrong with one rollout (nothing, when it went right)."""
    wrong: list[str] = []
    weights = [w for _, w, _ in steps]
    if status is None or status.get("phase") != "Promoted":
        wrong.append(f"ended {status and status.get('phase')}: {status and status.get('message')}")
    if weights != CHAOS_STEPS:
        wrong.append(f"weights {weights}")
    if status is not None and status.get("baseline") != pytest.approx(CHAOS_BASELINE):
        wrong.append(f"baseline {status.get('baseline')}")
    # Every step after the first (and the promotion) comes at least an interval after the one before.
    for (t0, w0, r0), (t1, w1, r1) in itertools.pairwise(steps[1:]):
        if t1 - t0 < CHAOS_INTERVAL - ARRIVAL_SLACK:
            wrong.append(f"{w0}% -> {w1}% after {t1 - t0:.2f}s (interval {CHAOS_INTERVAL}s)")
        # The controller's own stamps (the promotion has none); whole seconds allow a second's rounding.
        t0s, t1s = (r.step_time if r else None for r in (r0, r1))
        s0, s1 = parse_time(t0s), parse_time(t1s)
        if s0 is not None and s1 is not None and t0s and t1s:
            rounding = 0.0 if "." in t0s and "." in t1s else 1.0
            if s1 - s0 < CHAOS_INTERVAL - rounding - 0.01:
                wrong.append(f"{w0}% -> {w1}% stamped {t0s} then {t1s}")
    return wrong


@pytest.mark.slow
async def test_rollouts_survive_sigkill_at_random_moments(
    fleet: Fleet, cluster: Cluster, admin_http: KubeHTTP, prometheus: PrometheusServer, exporter: Exporter
) -> None:
    ns = cluster.namespace
    names = [f"svc-{i}" for i in range(CHAOS_ROLLOUTS)]
    objs: list[Obj] = [deployment("aleph-v04", "v04")]
    for name in names:
        objs += [
            destination_rule(name, {"production": "v03", "canary": "v04"}),
            virtual_service(name, {"production": 100, "canary": 0}),
        ]
    apply_all(admin_http, ns, objs)
    wait_available(admin_http, ns, "aleph-v04")
    await set_metric(prometheus, exporter, ns, CHAOS_BASELINE)
    rng = random.Random(CHAOS_SEED)
    kills = 0
    started = time.monotonic()
    ended: dict[str, Obj] = {}
    async with TrafficLog(cluster.kube, ns).running() as traffic:
        feeder = asyncio.create_task(Feeder(cluster, names, CHAOS_AT_ONCE, ended).run(), name="feeder")
        try:
            while True:
                proc = fleet.start("life", namespace=ns, health=False)
                done, _ = await asyncio.wait({feeder}, timeout=rng.uniform(0.5, 3.0))
                if done:
                    break
                proc.kill()
                kills += 1
                assert await proc.wait(10) == -signal.SIGKILL
                assert time.monotonic() - started < 150, f"only {len(ended)} of {CHAOS_ROLLOUTS} ended in 150s"
        finally:
            if not feeder.done():
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
        feeder.result()  # what stopped it, if it was not the end of the last rollout
        # Before its signal handlers are in place (the first half second) SIGTERM would end it the default way.
        await proc.wait_for("listed birdwatches")
        proc.terminate()
        assert await proc.wait(15) == 0, proc.tail()
        await asyncio.sleep(0.5)  # the last promotions' watch events
        history = {name: [(s.at, s.weight, s.record) for s in traffic.steps.get(name, [])] for name in names}
    verdicts = {name: judge_rollout(ended.get(name), history[name]) for name in names}
    wrong = {name: v for name, v in verdicts.items() if v}
    print(
        f"\nSIGKILLs performed: {kills}; rollouts run: {len(ended)}; rollouts that ended wrong: {len(wrong)}; "
        f"{time.monotonic() - started:.0f} s"
    )
    for name, problems in wrong.items():
        print(f"  {name}: {'; '.join(problems)}")
    assert len(ended) == CHAOS_ROLLOUTS
    assert kills >= 10
    assert not wrong, wrong


@pytest.mark.parametrize("ending", ["Promoted", "RolledBack"])
async def test_a_restart_between_the_ending_traffic_write_and_its_status_does_not_start_over(
    ending: str,
    fleet: Fleet,
    cluster: Cluster,
    admin_http: KubeHTTP,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    """A SIGKILL after a rollout's last traffic write (its record says done) and before its terminal status write
    leaves the status Progressing. That moment is a few milliseconds wide, too narrow to hit from outside, so the
    test writes what it leaves behind: the ended rollout with the status it had just before. The next process must
    say how the rollout ended, not release the canary a second time (after a rollback, with a new baseline)."""
    ns = cluster.namespace
    mesh(admin_http, ns)
    await set_metric(prometheus, exporter, ns, BASELINE)
    async with TrafficLog(cluster.kube, ns).running() as traffic:
        first = fleet.start("first", namespace=ns)
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), interval=1, max_weight=30))
        if ending == "RolledBack":
            await traffic.wait_weight("aleph", 20)
            exporter.set_gauge("bwtest_errors", 5.0, ns=ns)
        await cluster.wait_phase(ending, timeout=30)
        first.terminate()
        assert await first.wait(15) == 0, first.tail()
        ended = traffic.weights("aleph")
        record = traffic.record("aleph")
        assert record is not None
        assert record.done
        last = ended[-2]  # the canary's weight before the ending's write
        await cluster.kube.merge_patch(
            BIRDWATCHES,
            ns,
            "aleph",
            {"status": {"phase": "Progressing", "canaryWeight": last, "message": f"canary at {last}%"}},
            subresource="status",
        )
        second = fleet.start("second", namespace=ns)

        async def ended_again() -> Obj | None:
            status = await cluster.status()
            return status if status.get("phase") in TERMINAL else None

        status = await eventually(ended_again, timeout=20, what="the rollout to end again")
        await asyncio.sleep(0.5)
        assert (status["phase"], traffic.weights("aleph")) == (ending, ended), second.tail()
        second.terminate()
        assert await second.wait(15) == 0, second.tail()


# --- 5. bad configuration ----------------------------------------------------------------------------------------

KUBECONFIG_NO_FILES = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9", certificate-authority: /nonexistent/ca.crt}}]
users: [{name: u, user: {client-certificate: /nonexistent/u.crt, client-key: /nonexistent/u.key}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
KUBECONFIG_GARBAGE_CA = KUBECONFIG_NO_FILES.replace("/nonexistent/ca.crt", "{dir}/garbage.pem").replace(
    "client-certificate: /nonexistent/u.crt, client-key: /nonexistent/u.key", "token: t"
)
KUBECONFIG_OK = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
# Past the flag checks, so that only the kubeconfig can stop it.
FINE = ["--prometheus-url", "http://127.0.0.1:9", "--health-address", "off"]


@dataclass(frozen=True)
class BadStart:
    args: list[str]
    says: str  # what the one line must mention
    kubeconfig: str | bytes | None = None  # written to a file whose path replaces "{kubeconfig}"
    env: dict[str, str] | None = None


BAD_STARTS = {
    "unknown-flag": BadStart(["run", "--no-such-flag"], "--no-such-flag"),
    "ftp-prometheus-url": BadStart(["run", "--prometheus-url", "ftp://x"], "ftp://x"),
    "nonsense-prometheus-url": BadStart(["run", "--prometheus-url", "nonsense"], "nonsense"),
    "unknown-log-format": BadStart(["run", "--log-format", "xml"], "xml"),
    "bad-health-address": BadStart(["run", "--health-address", "8080"], "--health-address"),
    "renew-deadline-too-long": BadStart(
        ["run", "--leader-elect", "--lease-duration", "3", "--renew-deadline", "5"], "--renew-deadline"
    ),
    "password-without-user": BadStart(
        ["run", "--prometheus-url", "http://127.0.0.1:9"], "PROMETHEUS_PASSWORD", env={"PROMETHEUS_PASSWORD": "pw"}
    ),
    "missing-kubeconfig": BadStart(["run", "--kubeconfig", "/nonexistent", *FINE], "/nonexistent"),
    "kubeconfig-is-a-directory": BadStart(["run", "--kubeconfig", "{dir}", *FINE], "{dir}"),
    "garbage-kubeconfig": BadStart(["run", "--kubeconfig", "{kubeconfig}", *FINE], "{kubeconfig}", "clusters: [\n"),
    "binary-kubeconfig": BadStart(["run", "--kubeconfig", "{kubeconfig}", *FINE], "{kubeconfig}", b"\x00\x01\xff"),
    "kubeconfig-of-words": BadStart(["run", "--kubeconfig", "{kubeconfig}", *FINE], "{kubeconfig}", "just words\n"),
    "empty-kubeconfig": BadStart(["run", "--kubeconfig", "{kubeconfig}", *FINE], "{kubeconfig}", ""),
    "kubeconfig-naming-missing-files": BadStart(
        ["run", "--kubeconfig", "{kubeconfig}", *FINE], "/nonexistent/", KUBECONFIG_NO_FILES
    ),
    "kubeconfig-naming-a-garbage-certificate": BadStart(
        ["run", "--kubeconfig", "{kubeconfig}", *FINE], "{kubeconfig}", KUBECONFIG_GARBAGE_CA
    ),
    "unknown-context": BadStart(
        ["run", "--kubeconfig", "{kubeconfig}", "--context", "nope", *FINE], "nope", KUBECONFIG_OK
    ),
    "no-credentials-at-all": BadStart(["run", *FINE], "kube", env={"HOME": "{dir}"}),
}


@pytest.mark.parametrize("case", list(BAD_STARTS), ids=list(BAD_STARTS))
def test_bad_configuration_ends_at_start_with_one_line_and_exit_code_2(case: str, tmp_path: Path) -> None:
    bad = BAD_STARTS[case]
    kubeconfig = tmp_path / "kubeconfig"
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "garbage.pem").write_text("not a certificate\n")

    def fill(text: str) -> str:
        return text.replace("{kubeconfig}", str(kubeconfig)).replace("{dir}", str(folder))

    if isinstance(bad.kubeconfig, bytes):
        kubeconfig.write_bytes(bad.kubeconfig)
    elif bad.kubeconfig is not None:
        kubeconfig.write_text(fill(bad.kubeconfig))

    env = {k: fill(v) for k, v in (bad.env or {}).items()}
    done = run_cli([fill(a) for a in bad.args], env=env)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.code == 2, done
    assert "Traceback" not in done.stderr + done.stdout, done
    assert len(lines) == 1, done
    # JSON is the default log format, and then the fatal line is JSON too (tests/test_logs.py: console mode).
    entry = json.loads(lines[0])
    assert (entry["level"], entry["reason"], entry["exit_code"]) == ("error", "BadConfiguration", 2), done
    assert fill(bad.says) in entry["detail"], done


# --- 6. the command line ----------------------------------------------------------------------------------------


def test_version() -> None:
    done = run_cli(["--version"])
    assert (done.code, done.stdout) == (0, "birdwatch 0.1.0\n"), done
    assert __version__ == "0.1.0"


def test_run_help_mentions_every_flag() -> None:
    done = run_cli([sys.executable, "-m", "birdwatch", "run", "--help"])
    assert done.code == 0, done
    flags = config_flags(Path(config_module.__file__).read_text())
    assert len(flags) >= 20, flags  # the pattern still finds them
    words = set(done.stdout.replace(",", " ").replace("[", " ").replace("]", " ").split())
    missing = [flag for flag in flags if flag not in words]
    assert not missing, done.stdout
