"""birdwatch loads kubernetes_asyncio's configuration modules without its generated client, its ApiClient or urllib3
(``birdwatch/kubeconfig_import.py``), and a library of a notifier or provider only when one is configured.

In a fresh interpreter, because the test process imported the whole of kubernetes_asyncio long ago: the
controller's imports load no generated model or API class; credentials from an exec plugin (refreshed before
they expire), a token file and in-cluster files authenticate against the real API server; and afterwards the
whole library still works in the same process, with the very classes birdwatch used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from birdwatch_sandbox.envtest.controlplane import ControlPlane

SCRIPT = """\
import asyncio, json, sys
from pathlib import Path

import birdwatch.runner  # all that the controller imports
from birdwatch.kube import Kube, Resource

REVIEWS = Resource("authentication.k8s.io", "v1", "selfsubjectreviews", "SelfSubjectReview", False)


async def whoami(kube):
    review = await kube.create(REVIEWS, None, {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    return review["status"]["userInfo"]["username"]


async def main(args):
    out = {}
    kube = await Kube.connect(kubeconfig=args["exec"])
    try:
        out["exec"] = [await whoami(kube)]
        await asyncio.sleep(args["lifetime"])  # the credential is refreshed a fifth of its lifetime before its end
        out["exec"].append(await whoami(kube))
        out["exec_refreshes"] = kube.credentials.refreshes
    finally:
        await kube.close()
    kube = await Kube.connect(kubeconfig=args["token_file"])
    try:
        out["token_file"] = await whoami(kube)
    finally:
        await kube.close()
    kube = await Kube.connect(kubeconfig=None, env=args["env"], service_account=Path(args["service_account"]))
    try:
        out["in_cluster"] = await whoami(kube)
    finally:
        await kube.close()
    out["generated"] = sorted(
        m for m in sys.modules if m.startswith(("kubernetes_asyncio.client.models.", "kubernetes_asyncio.client.api."))
    )
    out["optional"] = sorted({m.partition(".")[0] for m in sys.modules} & {"slack_sdk", "cloudevents", "jsonpath"})
    unused = {"aiosmtplib", "dateutil", "multiprocessing.pool", "urllib3.poolmanager"}  # in a default run
    out["deferred"] = sorted(set(sys.modules) & unused)

    # Before anything runs the client package's __init__: kube_config's ApiClient is loaded by its first call.
    from kubernetes_asyncio.config import kube_config

    api = await kube_config.new_client_from_config(args["token_file"])
    await api.close()

    import kubernetes_asyncio
    import urllib3
    from kubernetes_asyncio import client, config, watch
    from kubernetes_asyncio.client.models import V1Pod

    import birdwatch.kubeconfig_import as lean

    out["whole"] = [
        client.Configuration is lean.Configuration,
        config.ConfigException is lean.ConfigException,
        config.kube_config.KubeConfigLoader is lean.KubeConfigLoader,
        client.CustomObjectsApi.__name__,
        client.V1Pod is V1Pod,
        watch.Watch.__name__,
        kubernetes_asyncio.__version__ == client.__version__,
        type(api) is client.ApiClient,
        config.kube_config.ApiClient is client.ApiClient,
        urllib3.PoolManager.__name__,
    ]
    print(json.dumps(out))


asyncio.run(main(json.loads(sys.argv[1])))
"""

# Prints the next of the tokens the test allowed, valid for the lifetime it is given.
PLUGIN = """\
import datetime, json, sys
counter, lifetime = sys.argv[1], float(sys.argv[2])
with open(counter, "a+") as f:
    f.seek(0)
    n = len(f.read().split()) + 1
    f.write(f"lean-exec-{n}\\n")
until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=lifetime)
print(json.dumps({
    "apiVersion": "client.authentication.k8s.io/v1",
    "kind": "ExecCredential",
    "status": {"token": f"lean-exec-{n}", "expirationTimestamp": until.strftime("%Y-%m-%dT%H:%M:%SZ")},
}))
"""


def kubeconfig(path: Path, plane: ControlPlane, user: dict[str, Any]) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": plane.url, "certificate-authority": str(plane.ca)}}],
        "users": [{"name": "tester", "user": user}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "tester"}}],
        "current-context": "envtest",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def test_the_controller_loads_credentials_without_the_generated_client(
    tmp_path: Path, control_plane: ControlPlane
) -> None:
    tokens = control_plane.tokens
    assert tokens is not None, "the session's control plane runs the token webhook"
    for n in range(1, 6):
        tokens.allow(f"lean-exec-{n}", until=float("inf"), user="lean-exec")
    tokens.allow("lean-file", until=float("inf"), user="lean-file")
    tokens.allow("lean-in-cluster", until=float("inf"), user="lean-in-cluster")
    (tmp_path / "plugin.py").write_text(PLUGIN)
    (tmp_path / "token").write_text("lean-file")
    service_account = tmp_path / "serviceaccount"
    service_account.mkdir()
    (service_account / "ca.crt").write_bytes(control_plane.ca.read_bytes())
    (service_account / "token").write_text("lean-in-cluster")
    lifetime = 3.0
    exec_user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(tmp_path / "plugin.py"), str(tmp_path / "minted"), str(lifetime)],
            "interactiveMode": "Never",
        }
    }
    args = {
        "exec": kubeconfig(tmp_path / "exec.kubeconfig", control_plane, exec_user),
        "token_file": kubeconfig(tmp_path / "file.kubeconfig", control_plane, {"tokenFile": "token"}),
        "lifetime": lifetime,
        "env": {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(control_plane.api_port)},
        "service_account": str(service_account),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])

    assert out["generated"] == []
    assert out["optional"] == []
    assert out["deferred"] == []
    assert out["exec"] == ["lean-exec", "lean-exec"]
    assert out["exec_refreshes"] >= 1
    assert ("lean-exec-2", True) in tokens.reviews()
    assert out["token_file"] == "lean-file"
    assert out["in_cluster"] == "lean-in-cluster"
    assert out["whole"] == [True, True, True, "CustomObjectsApi", True, "Watch", True, True, True, "PoolManager"]
