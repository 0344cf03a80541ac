"""`make sandbox-up` / `make sandbox-down`: the test control plane and Prometheus, in the background, for people.

``up`` starts etcd, kube-apiserver (with the BirdWatch and Istio CRDs installed), kube-controller-manager,
kube-scheduler, kwok with a few fake nodes (Deployments become Available by themselves) and Prometheus under
``.sandbox/``, writes ``.sandbox/kubeconfig`` and ``.sandbox/env`` (``export`` lines, for ``. .sandbox/env``), and
returns. A second ``up`` reuses what is running. ``down`` stops every process ``up`` started. ``status`` says
whether it is up.

Prometheus scrapes every ``*.json`` file-SD target list dropped into ``$BIRDWATCH_PROM_TARGETS``.
``BIRDWATCH_SANDBOX_PROFILING=1`` at ``up`` turns on kube-apiserver's pprof endpoints (``bench.py --apiserver-profile``
fetches CPU profiles from them); a running sandbox keeps what it was started with, so ``down`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from .assets import REPO, ensure_assets
from .controlplane import ControlPlane, KubeHTTP, StartupError, pid_alive, stop_pid
from .pki import Pair
from .promserver import PrometheusServer

# BIRDWATCH_SANDBOX puts it elsewhere: the README's test runs a sandbox of its own beside a person's.
SANDBOX = Path(os.environ.get("BIRDWATCH_SANDBOX") or REPO / ".sandbox")
STATE = SANDBOX / "state.json"


def _read_state() -> dict[str, object] | None:
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _running(state: dict[str, object]) -> bool:
    pids = state.get("pids", {})
    if not isinstance(pids, dict) or not pids or not all(pid_alive(int(p)) for p in pids.values()):
        return False
    try:
        api = KubeHTTP(
            "127.0.0.1",
            int(str(state["api_port"])),
            ca=Path(str(state["ca"])),
            client=Pair(Path(str(state["admin_cert"])), Path(str(state["admin_key"]))),
        )
        return api.request("GET", "/readyz")[0] == 200
    except (OSError, KeyError, ValueError):
        return False


def up() -> int:
    state = _read_state()
    if state is not None and _running(state):
        print(f"sandbox already running: {SANDBOX / 'env'}")
        return 0
    if state is not None:
        down(quiet=True)
    started = time.monotonic()
    assets = ensure_assets()
    for leftover in ("controlplane", "prometheus"):
        shutil.rmtree(SANDBOX / leftover, ignore_errors=True)
    SANDBOX.mkdir(exist_ok=True)
    plane = ControlPlane(SANDBOX / "controlplane", assets)
    prometheus = PrometheusServer(SANDBOX / "prometheus", assets.prometheus)
    try:
        plane.start(detach=True)
        prometheus.start(detach=True)
    except StartupError as exc:
        for server in [*plane.servers, *([prometheus.server] if prometheus.server else [])]:
            server.stop()
        print(f"sandbox failed to start: {exc}", file=sys.stderr)
        return 1
    assert prometheus.server is not None
    kubeconfig = SANDBOX / "kubeconfig"
    shutil.copy(plane.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o600)
    STATE.write_text(
        json.dumps(
            {
                "pids": {s.name: s.pid for s in [*plane.servers, prometheus.server]},
                "api_port": plane.api_port,
                "ca": str(plane.ca),
                "admin_cert": str(plane.admin.cert),
                "admin_key": str(plane.admin.key),
                "prometheus_url": prometheus.url,
                "profiling": plane.profiling,
            },
            indent=2,
        )
    )
    kubectl = assets.kubectl or shutil.which("kubectl") or "kubectl"
    (SANDBOX / "env").write_text(
        env_file(
            {
                "KUBECONFIG": str(kubeconfig),
                "PROMETHEUS_URL": prometheus.url,
                "BIRDWATCH_PROM_TARGETS": str(prometheus.targets_dir),
                "KUBECTL": str(kubectl),
            }
        )
    )
    print(f"sandbox up in {time.monotonic() - started:.1f}s: kube-apiserver {plane.url}, Prometheus {prometheus.url}")
    print(f"  source {SANDBOX / 'env'}   # KUBECONFIG, PROMETHEUS_URL, KUBECTL")
    print(f"  {kubectl} --kubeconfig {kubeconfig} get crd")
    return 0


def env_file(variables: dict[str, str]) -> str:
    """``export`` lines: sourced by a shell, the variables reach the programs it starts (``birdwatch run``
    reads KUBECONFIG and PROMETHEUS_URL), and ``set -a`` is not needed."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())


def read_env(path: Path = SANDBOX / "env") -> dict[str, str] | None:
    """The variables of an env file as ``env_file`` writes it (plain ``NAME=value`` lines are read too), or None
    when there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            words = words[1:]
        for word in words:
            name, sep, value = word.partition("=")
            if sep and name:
                values[name] = value
    return values


def down(*, quiet: bool = False) -> int:
    state = _read_state()
    if state is None:
        if not quiet:
            print("sandbox is not running")
        return 0
    pids = state.get("pids", {})
    assert isinstance(pids, dict)
    # The API server's clients first (controllers, kwok, Prometheus), then the API server, then etcd, so none of
    # them logs a storm of lost-connection errors.
    last = ("kube-apiserver", "etcd")
    for name in [*(n for n in pids if n not in last), *last]:
        if name in pids:
            stop_pid(int(pids[name]))
    STATE.unlink(missing_ok=True)
    (SANDBOX / "env").unlink(missing_ok=True)
    if not quiet:
        print("sandbox stopped")
    return 0


def status() -> int:
    state = _read_state()
    if state is not None and _running(state):
        print(f"sandbox running: {SANDBOX / 'env'}")
        return 0
    print("sandbox is not running")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="birdwatch-sandbox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
