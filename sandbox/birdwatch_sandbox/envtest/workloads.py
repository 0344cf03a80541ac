"""kube-controller-manager, kube-scheduler and kwok beside the API server: a cluster in miniature.

With them a Deployment that a test or a person applies becomes Available by itself, the way it does on a real
cluster: the Deployment controller creates a ReplicaSet, the ReplicaSet controller its Pods, the scheduler puts them
on kwok's fake Nodes and kwok reports them Running and Ready (no containers run anywhere). Deleting a namespace
deletes what is in it (namespace and garbage-collector controllers; kwok finishes the pods' graceful deletion as a
kubelet would).

Pods can fail on purpose, for tests and the demo (kwok.yaml's stages react to the label ``POD_BEHAVIOUR`` on a pod
template): ``NEVER_READY`` pods run but never pass readiness, so the Deployment controller eventually reports
``ProgressDeadlineExceeded``; ``CRASH`` pods are Ready first and crash ``CRASH_AFTER`` later (annotation, a Go
duration such as ``3s``; default 5s).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .pki import CertificateAuthority

if TYPE_CHECKING:
    from .controlplane import ControlPlane, KubeHTTP, Server

KWOK_STAGES = Path(__file__).with_name("kwok.yaml")
POD_BEHAVIOUR = "sandbox.birdwatch.otomato.link/pods"
NEVER_READY = "never-ready"
CRASH = "crash"
CRASH_AFTER = "sandbox.birdwatch.otomato.link/crash-after"
NODE_NAMES = tuple(f"kwok-node-{i}" for i in range(3))

# Only the controllers that birdwatch's world needs: Deployments become ReplicaSets become Pods (deployment,
# replicaset), a deleted namespace is emptied and removed (namespace), and what a deleted Deployment owned goes with it
# (garbage collector). Not the serviceaccount or token controllers: the API server runs without the ServiceAccount
# admission plugin, so pods need no ServiceAccount or token, and every client here has a certificate. Not the node
# lifecycle controller: kwok's nodes send no heartbeats (nothing would watch them), so it would only evict pods.
CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "namespace-controller",
    "garbage-collector-controller",
)


@dataclass
class Workloads:
    """The three processes (already in the control plane's ``servers``) and how to tell that they work."""

    servers: list[Server]
    detach: bool = False
    restarted: set[str] = field(default_factory=set)

    def wait_ready(self, api: KubeHTTP, *, timeout: float = 30) -> None:
        """Return once kwok has made every fake node Ready; fail if any of the three processes exited twice."""
        from .controlplane import StartupError

        deadline = time.monotonic() + timeout
        while True:
            for server in self.servers:
                if server.alive():
                    continue
                # kube-controller-manager has been seen to exit in its first second, once in many starts on a loaded
                # machine, its log saying only "Unauthorized" (15 starts in a row could not repeat it). One more
                # start, said on stderr and kept in the same log; a second exit is a real failure.
                if server.name in self.restarted:
                    raise StartupError(f"{server.name} exited while starting, twice; its log ends:\n{server.tail()}")
                self.restarted.add(server.name)
                print(
                    f"envtest: {server.name} exited while starting; starting it once more. Its log ends:\n"
                    f"{server.tail(10)}",
                    file=sys.stderr,
                )
                server.start(detach=self.detach)
            if all(_node_ready(api, name) for name in NODE_NAMES):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"{s.name} log ends:\n{s.tail(15)}" for s in self.servers)
                raise StartupError(f"timed out after {timeout:.0f}s waiting for kwok's nodes to be Ready\n{tails}")
            time.sleep(0.1)


def start_workloads(plane: ControlPlane, authority: CertificateAuthority, *, detach: bool = False) -> Workloads:
    """Create the fake Nodes and start kube-controller-manager, kube-scheduler and kwok against ``plane``'s API
    server (which must be ready); they join ``plane.servers``, so ``plane.stop()`` stops them first."""
    from .controlplane import Server, write_kubeconfig

    folder = plane.workdir / "workloads"
    folder.mkdir(parents=True, exist_ok=True)
    api = plane.http()
    for name in NODE_NAMES:
        _create_node(api, name)

    def kubeconfig(component: str, common_name: str, organizations: tuple[str, ...]) -> Path:
        pair = authority.issue(component, common_name=common_name, organizations=organizations)
        return write_kubeconfig(
            folder / f"{component}.kubeconfig", server=plane.url, ca=plane.ca, client=pair, user=component
        )

    # The controller-manager runs every controller under its own identity (no per-controller ServiceAccounts, which
    # would need the token controllers), and the bootstrap role of system:kube-controller-manager covers only
    # what it does itself: so it is in system:masters, as is kwok, which plays every node's kubelet (no Node
    # authorizer here). The scheduler's bootstrap ClusterRoleBindings are enough for it, as on a real cluster.
    kcm_config = kubeconfig("kube-controller-manager", "system:kube-controller-manager", ("system:masters",))
    scheduler_config = kubeconfig("kube-scheduler", "system:kube-scheduler", ())
    kwok_config = kubeconfig("kwok", "kwok", ("system:masters",))

    # Client rate limits well above the defaults (20/s): a benchmark applies hundreds of Deployments at once, and a
    # throttled controller would make them slow to become Available for reasons no real cluster has.
    qps, burst = 200, 400
    (folder / "scheduler.json").write_text(
        json.dumps(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(scheduler_config), "qps": qps, "burst": burst},
                "leaderElection": {"leaderElect": False},
            }
        )
    )
    kwok_home = folder / "kwok-home"
    kwok_home.mkdir(exist_ok=True)
    servers = [
        Server(
            "kube-controller-manager",
            [
                str(plane.assets.kube_controller_manager),
                f"--kubeconfig={kcm_config}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                # Nothing here reads its /healthz or /metrics; not serving them saves a port and a certificate.
                "--secure-port=0",
                f"--kube-api-qps={qps}",
                f"--kube-api-burst={burst}",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--v=0",
            ],
            plane.workdir / "kube-controller-manager.log",
        ),
        Server(
            "kube-scheduler",
            [
                str(plane.assets.kube_scheduler),
                f"--config={folder / 'scheduler.json'}",
                "--secure-port=0",
                "--v=0",
            ],
            plane.workdir / "kube-scheduler.log",
        ),
        Server(
            "kwok",
            [
                # kwok also reads ~/.kwok/kwok.yaml when it exists: a HOME of its own keeps a person's file out.
                "env",
                f"HOME={kwok_home}",
                str(plane.assets.kwok),
                f"--kubeconfig={kwok_config}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=true",
                # No Leases and no heartbeat stage: no node lifecycle controller runs to miss them.
                "--node-lease-duration-seconds=0",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.96.0.10",
            ],
            plane.workdir / "kwok.log",
        ),
    ]
    for server in servers:
        plane.servers.append(server)
        server.start(detach=detach)
    return Workloads(servers, detach=detach)


def _create_node(api: KubeHTTP, name: str) -> None:
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
    }
    status, body = api.request("POST", "/api/v1/nodes", node)
    if status not in (201, 409):
        raise RuntimeError(f"creating Node {name}: {status} {body}")
    # The TaintNodesByCondition admission plugin gives every new Node the not-ready taint; on a cluster the node
    # lifecycle controller lifts it once the kubelet reports Ready. That controller does not run here (see
    # CONTROLLERS), so the harness lifts it, which admission allows on update.
    status, body = api.request(
        "PATCH", f"/api/v1/nodes/{name}", {"spec": {"taints": None}}, content_type="application/merge-patch+json"
    )
    if status != 200:
        raise RuntimeError(f"untainting Node {name}: {status} {body}")


def _node_ready(api: KubeHTTP, name: str) -> bool:
    status, node = api.request("GET", f"/api/v1/nodes/{name}")
    if status != 200:
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
