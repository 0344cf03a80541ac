"""``make demo`` (hack/demo.py) end to end, shortened with ``--fast``, on the session's control plane and Prometheus.

The demo runs as people run it: a process of its own, with the real ``birdwatch run`` and the mesh simulator under it.
It is judged by what it prints, its exit code, the JSON log it keeps, and what it leaves behind (no process, no scrape
target list; its objects deleted after a success, kept after an interruption).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from birdwatch_sandbox.envtest.assets import REPO
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.promserver import PrometheusServer

DEMO = REPO / "hack" / "demo.py"
# Settings a developer's shell may carry; the demo must take everything from its flags.
FOREIGN_ENV = ("KUBECONFIG", "PROMETHEUS_", "SLACK_", "BIRDWATCH_")
LIVE_LINE = re.compile(r"^aleph  (v0\d)  \[([#.]{20})\]\s+(\d+)%  value (\S+) / baseline (\S+)  (\w+)\s+\d+s$")

pytestmark = pytest.mark.slow


def demo_command(plane: ControlPlane, prometheus: PrometheusServer, log_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(DEMO),
        "--fast",
        "--kubeconfig",
        str(plane.kubeconfig),
        "--prometheus-url",
        prometheus.url,
        "--targets-dir",
        str(prometheus.targets_dir),
        "--log-dir",
        str(log_dir),
    ]


def demo_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}


def summary_rows(stdout: str) -> list[list[str]]:
    """The summary table's rows below its header, split into cells."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("scenario  "))
    rows = []
    for line in lines[header + 1 :]:
        if not line.startswith(("A ", "B ", "C ")):
            break
        rows.append(re.split(r"\s{2,}", line))
    return rows


def said(pattern: str, stdout: str) -> re.Match[str]:
    found = re.search(pattern, stdout, re.MULTILINE)
    assert found, f"the demo did not say {pattern!r}:\n{stdout}"
    return found


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still there: only a zombie of someone else's would do, and the demo reaps its own children.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def leftover_targets(prometheus: PrometheusServer, namespace: str) -> list[Path]:
    return sorted(prometheus.targets_dir.glob(f"meshsim-{namespace}-*.json"))


def test_demo_promotes_then_rolls_back(
    control_plane: ControlPlane, prometheus: PrometheusServer, admin_http: KubeHTTP, log_dir: Path
) -> None:
    started = time.monotonic()
    done = subprocess.run(
        demo_command(control_plane, prometheus, log_dir / "demo"),
        cwd=REPO,
        env=demo_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    took = time.monotonic() - started
    out = done.stdout
    report = f"exit code {done.returncode} after {took:.0f}s\n--- stdout:\n{out}--- stderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert took < 120, report  # three scenarios at --fast speed take about a minute
    assert "\x1b[" not in out, "no terminal escapes when stdout is not a terminal"

    rows = summary_rows(out)
    assert [row[:3] for row in rows] == [
        ["A healthy", "v04", "Promoted"],
        ["B failing", "v05", "RolledBack"],
        ["C drift", "v05", "Promoted"],
    ], report
    assert said(r"^demo passed in \d+s", out)

    # The live lines: read from the BirdWatch's status, printed only when something changed (stdout is a pipe).
    before_c, _, during_c = out.partition("\nC  ")
    live = [m.groups() for m in map(LIVE_LINE.match, before_c.splitlines()) if m]
    a = [g for g in live if g[0] == "v04"]
    b = [g for g in live if g[0] == "v05"]
    c = [m.groups() for m in map(LIVE_LINE.match, during_c.splitlines()) if m]
    assert sorted({int(g[2]) for g in a if g[5] == "Progressing"} - {0}) == list(range(10, 101, 10)), report
    assert (a[-1][5], a[-1][1]) == ("Promoted", "#" * 20), report
    # A person paused A at 30 % with the kubectl plugin, and resumed it: the weight held, then went on.
    assert said(r"^   \$ kubectl birdwatch pause aleph -n demo-[0-9a-f]+$", out)
    assert said(r"^   paused at 30%$", out)
    assert said(r"^   \$ kubectl birdwatch resume aleph -n demo-[0-9a-f]+$", out)
    assert said(r"^   resumed: Progressing at [34]0%$", out)  # the check was due: it may step at once
    assert any(g[5] == "Paused" and g[2] == "30" for g in a), report
    assert (b[-1][5], b[-1][4]) == ("RolledBack", "0.000"), report
    assert float(b[-1][3]) > 0.05, report
    # C: production drifted to 15 % errors and the canary with it; judged against production, it was promoted.
    assert said(r"^   production v04 now fails 15% of its requests; v05's earlier failures are gone$", out)
    assert (c[-1][5], c[-1][2]) == ("Promoted", "100"), report
    assert float(c[-1][3]) > 0.1, (
        report
    )  # more than the deviation above its first value: baseline: first would not pass
    for version in ("v04", "v05"):
        states = [(w, value, base, phase) for v, _, w, value, base, phase in live if v == version]
        assert all(x != y for x, y in itertools.pairwise(states)), f"a line repeated without a change:\n{out}"

    log = Path(said(r"^birdwatch JSON log: (.+)$", out)[1])
    log = log if log.is_absolute() else REPO / log
    assert log.is_file(), report
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries, log
    assert all(isinstance(e, dict) for e in entries), log
    ended = [e.get("phase") for e in entries if e.get("event") == "rollout ended"]
    assert ended == ["Promoted", "RolledBack", "Promoted"], ended

    # Nothing left running or scraped; the namespace and everything in it are deleted (by the namespace controller,
    # after the demo has returned).
    pid = int(said(r"birdwatch run \(pid (\d+)\)", out)[1])
    namespace = said(r"namespace (demo-[0-9a-f]+) and the demo's objects in it are deleted", out)[1]
    assert process_gone(pid)
    assert leftover_targets(prometheus, namespace) == []
    deadline = time.monotonic() + 60
    while admin_http.request("GET", f"/api/v1/namespaces/{namespace}")[0] != 404:
        assert time.monotonic() < deadline, f"namespace {namespace} is still there"
        time.sleep(0.2)
    for path in (
        f"/apis/otomato.link/v1alpha1/namespaces/{namespace}/birdwatches/aleph",
        f"/apis/networking.istio.io/v1/namespaces/{namespace}/virtualservices/aleph",
        f"/apis/networking.istio.io/v1/namespaces/{namespace}/destinationrules/aleph",
        f"/api/v1/namespaces/{namespace}/services/aleph",
        *(f"/apis/apps/v1/namespaces/{namespace}/deployments/aleph-{v}" for v in ("v03", "v04", "v05")),
    ):
        assert admin_http.request("GET", path)[0] == 404, f"{path} is still there"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_stops_what_it_started_on_a_signal(
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    admin_http: KubeHTTP,
    log_dir: Path,
    sig: signal.Signals,
) -> None:
    demo = subprocess.Popen(
        demo_command(control_plane, prometheus, log_dir / "demo"),
        cwd=REPO,
        env=demo_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any(" Progressing " in line for line in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the demo ended before its first step:\n{''.join(seen)}"
            seen.append(line)
        demo.send_signal(sig)
        code = demo.wait(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    out = "".join(seen)
    assert code == 128 + sig, f"exit code {code}:\n{out}"
    assert said(rf"^demo interrupted \({sig.name}\)", out)

    pid = int(said(r"birdwatch run \(pid (\d+)\)", out)[1])
    namespace = said(r"namespace (demo-[0-9a-f]+):", out)[1]
    assert process_gone(pid), f"birdwatch (pid {pid}) still runs"
    assert leftover_targets(prometheus, namespace) == []
    # Interrupted: nothing but the processes is touched; the objects stay for a look.
    said(rf"objects kept in namespace {namespace}", out)
    status, _ = admin_http.request("GET", f"/apis/otomato.link/v1alpha1/namespaces/{namespace}/birdwatches/aleph")
    assert status == 200
