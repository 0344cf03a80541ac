"""`make sandbox-up` / `make sandbox-down`: the test control plane and Prometheus, in the background, for people.

``up`` starts etcd, kube-apiserver (with the BirdWatch and Istio CRDs installed) and Prometheus under
``.sandbox/``, writes ``.sandbox/kubeconfig`` and ``.sandbox/env``, and returns. A second ``up`` reuses what is
running. ``down`` stops every process ``up`` started. ``status`` says whether it is up.

Prometheus scrapes every ``*.json`` file-SD target list dropped into ``$BIRDWATCH_PROM_TARGETS``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .assets import REPO, ensure_assets
from .controlplane import ControlPlane, KubeHTTP, StartupError, pid_alive, stop_pid
from .pki import Pair
from .promserver import PrometheusServer

SANDBOX = REPO / ".sandbox"
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
            },
            indent=2,
        )
    )
    kubectl = assets.kubectl or shutil.which("kubectl") or "kubectl"
    (SANDBOX / "env").write_text(
        f"KUBECONFIG={kubeconfig}\n"
        f"PROMETHEUS_URL={prometheus.url}\n"
        f"BIRDWATCH_PROM_TARGETS={prometheus.targets_dir}\n"
        f"KUBECTL={kubectl}\n"
    )
    print(f"sandbox up in {time.monotonic() - started:.1f}s: kube-apiserver {plane.url}, Prometheus {prometheus.url}")
    print(f"  source {SANDBOX / 'env'}   # KUBECONFIG, PROMETHEUS_URL, KUBECTL")
    print(f"  {kubectl} --kubeconfig {kubeconfig} get crd")
    return 0


def down(*, quiet: bool = False) -> int:
    state = _read_state()
    if state is None:
        if not quiet:
            print("sandbox is not running")
        return 0
    pids = state.get("pids", {})
    assert isinstance(pids, dict)
    # Prometheus and the API server before etcd, so none of them logs a storm of lost-connection errors.
    for name in ("prometheus", "kube-apiserver", "etcd"):
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
        prog="sandbox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
