"""deploy/ as an operator installs it: the CRD in deploy/crd/ and the controller in deploy/, both with ``kubectl
apply -f`` and ``kubectl apply -k`` on the real API server; ``kubectl delete -k deploy/`` removes the controller and
keeps the CRD and every BirdWatch; the RBAC rules hold no wildcard, the Deployment is locked down, a
PodDisruptionBudget and a NetworkPolicy cover its pods, one object only asks to be scraped, and birdwatch runs a
whole rollout under its ServiceAccount's own identity, so the ClusterRole and the leader-election Role are enough.

The ServiceAccount's identity comes from a real token (TokenRequest API). A kubeconfig that impersonates it
(``as:`` / ``as-groups:``) would not do: kubernetes_asyncio's kubeconfig loader ignores those fields, and birdwatch
would silently run as the harness's admin in system:masters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from birdwatch.cli import build_parser
from birdwatch.config import DEFAULT_PROMETHEUS, settings_from
from birdwatch.kube import BIRDWATCHES, LEASES, Kube, KubeError, Resource
from birdwatch.runner import App
from birdwatch_sandbox.envtest.assets import REPO, Assets
from birdwatch_sandbox.envtest.controlplane import (
    BIRDWATCH_CRD,
    ControlPlane,
    KubeHTTP,
    load_yaml_documents,
    resource_path,
)
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import Cluster, apply_all, birdwatch, eventually, mesh

DEPLOY = REPO / "deploy"
CRD_DIR = DEPLOY / "crd"
CRD_NAME = "birdwatches.otomato.link"
SYSTEM_NS = "birdwatch-system"
SA_NAME = "birdwatch"
SA_USER = f"system:serviceaccount:{SYSTEM_NS}:{SA_NAME}"
KUSTOMIZE_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# What kubectl apply -f DIR reads (not recursively): files with these extensions, in name order.
KUBECTL_EXTENSIONS = (".yaml", ".yml", ".json")
SECRETS = Resource("", "v1", "secrets", "Secret")
PDB_LINE = "poddisruptionbudget.policy/"

Obj = dict[str, Any]


# --- the manifests as files ---------------------------------------------------------------------------------------


def manifest_files(folder: Path = DEPLOY) -> list[Path]:
    """The files ``kubectl apply -f FOLDER`` reads, in the order it reads them (crd/, examples/ are folders:
    skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in KUBECTL_EXTENSIONS)


def manifests(folder: Path = DEPLOY) -> list[Obj]:
    return [doc for path in manifest_files(folder) for doc in load_yaml_documents(path)]


def kustomization(folder: Path = DEPLOY) -> Path:
    found = [folder / name for name in KUSTOMIZE_NAMES if (folder / name).exists()]
    assert len(found) == 1, f"{folder} needs exactly one kustomization file, has {[p.name for p in found]}"
    return found[0]


def one(kind: str, name: str) -> Obj:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/, found {len(found)}"
    return found[0]


# Kinds of deploy/ the harness's resource_path does not know (all namespaced).
_MORE_PLURALS = {"PodDisruptionBudget": "poddisruptionbudgets", "NetworkPolicy": "networkpolicies"}


def object_path(obj: Obj) -> str:
    """The API path of one object of the manifests."""
    meta = obj["metadata"]
    if obj["kind"] in _MORE_PLURALS:
        group_version = obj["apiVersion"]
        return f"/apis/{group_version}/namespaces/{meta['namespace']}/{_MORE_PLURALS[obj['kind']]}/{meta['name']}"
    return f"{resource_path(obj)}/{meta['name']}"


def ident(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


# --- kubectl against the session's control plane -----------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl(assets: Assets) -> Path:
    found = assets.kubectl or shutil.which("kubectl")
    assert found, "no kubectl: hack/install-control-plane.sh builds one unless KUBEBUILDER_ASSETS lacks it"
    return Path(found)


def run_kubectl(kubectl: Path, plane: ControlPlane, *args: str) -> str:
    done = subprocess.run(
        [str(kubectl), "--kubeconfig", str(plane.kubeconfig), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}{done.stdout}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(kubectl: Path, control_plane: ControlPlane) -> str:
    """The README's install, once for the module: ``kubectl apply -f deploy/crd/`` (the harness installed the same
    CRD already: unchanged, or configured when the harness's copy differs), then ``kubectl apply -f deploy/``."""
    run_kubectl(kubectl, control_plane, "apply", "-f", "deploy/crd/")
    return run_kubectl(kubectl, control_plane, "apply", "-f", "deploy/")


def test_the_crd_has_a_kustomization_of_its_own_and_the_controllers_leaves_it_out(
    installed: str, kubectl: Path, control_plane: ControlPlane
) -> None:
    (crd,) = manifests(CRD_DIR)
    assert (crd["kind"], crd["metadata"]["name"]) == ("CustomResourceDefinition", CRD_NAME)
    assert crd["metadata"]["labels"]["app.kubernetes.io/component"] == "crd"  # what -l ...!=crd leaves out
    assert not any(d["kind"] == "CustomResourceDefinition" for d in manifests()), "the CRD must not be in deploy/"
    assert "crd" not in str(yaml.safe_load(kustomization().read_text())["resources"])
    built = [d for d in yaml.safe_load_all(run_kubectl(kubectl, control_plane, "kustomize", "deploy/crd/")) if d]
    assert [ident(d) for d in built] == [ident(crd)]
    assert run_kubectl(kubectl, control_plane, "apply", "-k", "deploy/crd/").strip().endswith(" unchanged")
    # The harness loads the same file.
    assert BIRDWATCH_CRD == CRD_DIR / "crd.yaml"
    assert not any(d.get("kind") == "Kustomization" for d in manifests(CRD_DIR)), "use the file name Kustomization"


def test_apply_f_and_apply_k_both_succeed_and_create_the_same_objects(
    installed: str, kubectl: Path, control_plane: ControlPlane, admin_http: KubeHTTP
) -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} == {
        "Namespace",
        "ConfigMap",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    # Every object of every file was applied (kubectl prints one line per object) and is on the server now.
    assert len(installed.strip().splitlines()) == len(docs), installed
    for doc in docs:
        path = object_path(doc)
        status, body = admin_http.request("GET", path)
        assert status == 200, f"{doc['kind']} {doc['metadata']['name']}: {status} {body}"

    # The kustomization names exactly the files -f reads: the same objects either way.
    built = [d for d in yaml.safe_load_all(run_kubectl(kubectl, control_plane, "kustomize", "deploy/")) if d]
    assert sorted(map(ident, built)) == sorted(map(ident, docs))
    assert not any("examples" in str(r) for r in yaml.safe_load(kustomization().read_text())["resources"])

    # -k after -f changes nothing (the same objects), and -f is repeatable.
    applied_k = run_kubectl(kubectl, control_plane, "apply", "-k", "deploy/").strip().splitlines()
    assert len(applied_k) == len(docs)
    assert all(line.endswith(" unchanged") for line in applied_k if not line.startswith(PDB_LINE)), applied_k
    again = run_kubectl(kubectl, control_plane, "apply", "-f", "deploy/").strip().splitlines()
    assert all(line.endswith(" unchanged") for line in again if not line.startswith(PDB_LINE)), again
    # kubectl says "configured" for a PodDisruptionBudget on every apply: its selector's patch strategy is
    # "replace", so the client-side patch always carries it. The API server changes nothing: same generation.
    status, pdb = admin_http.request("GET", object_path(one("PodDisruptionBudget", "birdwatch")))
    assert status == 200
    assert pdb["metadata"]["generation"] == 1, pdb["metadata"]


def test_apply_f_creates_the_namespace_before_what_lives_in_it() -> None:
    """kubectl apply -f takes files in name order and does not sort by kind: on a new cluster, an object in
    birdwatch-system applied before the Namespace fails with 'namespaces "birdwatch-system" not found'."""
    order = [(path.name, doc) for path in manifest_files() for doc in load_yaml_documents(path)]
    first_ns = next(i for i, (_, d) in enumerate(order) if d["kind"] == "Namespace")
    inside = [(f, d["kind"]) for i, (f, d) in enumerate(order[:first_ns]) if d["metadata"].get("namespace")]
    assert not inside, f"applied before the Namespace by kubectl apply -f deploy/: {inside}"
    # A kustomization.yaml would be read by -f as an object of kind Kustomization, and fail.
    assert not any(d.get("kind") == "Kustomization" for _, d in order), "use the file name Kustomization"


def test_delete_k_deploy_removes_the_controller_and_keeps_the_crd_and_every_birdwatch(
    installed: str, kubectl: Path, control_plane: ControlPlane, admin_http: KubeHTTP, namespace: str, tmp_path: Path
) -> None:
    # What `kubectl delete -k deploy/` would delete, asked of the API server itself (a server-side dry run, so the
    # session's birdwatch-system stays for the other tests): the controller's objects, and not the CRD.
    would = run_kubectl(kubectl, control_plane, "delete", "-k", "deploy/", "--dry-run=server", "-o", "name").split()
    assert len(would) == len(manifests()), would
    assert not [n for n in would if n.startswith("customresourcedefinition")], would

    # For real, on deploy/ under other names: an overlay with its own namespace and a name prefix.
    tag = uuid.uuid4().hex[:6]
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": f"bw-uninstall-{tag}",
                "namePrefix": f"uninstall-{tag}-",
                "resources": [os.path.relpath(DEPLOY, overlay)],
            }
        )
    )
    rendered = [d for d in yaml.safe_load_all(run_kubectl(kubectl, control_plane, "kustomize", str(overlay))) if d]
    assert len(rendered) == len(manifests())
    run_kubectl(kubectl, control_plane, "apply", "-k", str(overlay))
    apply_all(admin_http, namespace, [birdwatch("keep-me", metric="vector(0)")])
    record = f"/apis/otomato.link/v1alpha1/namespaces/{namespace}/birdwatches/keep-me"
    assert admin_http.request("GET", record)[0] == 200

    deleted = run_kubectl(kubectl, control_plane, "delete", "-k", str(overlay), "--wait=false").strip().splitlines()
    assert len(deleted) == len(rendered), deleted
    for doc in rendered:
        status, body = admin_http.request("GET", object_path(doc))
        # A Namespace goes through Terminating (its finalizer waits for what is inside it); the rest is gone.
        gone = status == 404 or (doc["kind"] == "Namespace" and body["status"]["phase"] == "Terminating")
        assert gone, f"{doc['kind']} {doc['metadata']['name']} still there: {status}"
    status, crd = admin_http.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
    assert status == 200
    assert "deletionTimestamp" not in crd["metadata"]
    status, kept = admin_http.request("GET", record)
    assert status == 200, kept
    assert kept["spec"]["metric"] == "vector(0)"


# --- RBAC -----------------------------------------------------------------------------------------------------------


def rbac_rules() -> list[tuple[str, Obj]]:
    return [
        (f"{d['kind']} {d['metadata']['name']}", rule)
        for d in manifests()
        if d["kind"] in ("ClusterRole", "Role")
        for rule in d.get("rules") or []
    ]


def test_no_rbac_rule_uses_a_wildcard() -> None:
    rules = rbac_rules()
    assert rules
    for where, rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            values = rule.get(key) or []
            assert all("*" not in str(v) for v in values), f"{where}: {key} {values} holds a wildcard"
    assert not any(d["kind"] == "ClusterRole" and d.get("aggregationRule") for d in manifests())


def test_rbac_grants_exactly_what_birdwatch_needs() -> None:
    def grants(kind: str, name: str) -> set[tuple[str, str, str]]:
        obj = one(kind, name)
        return {
            (group, resource, verb)
            for rule in obj["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }

    def each(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
        return {(group, r, v) for r in resources for v in verbs}

    istio = ["virtualservices", "destinationrules"]
    assert grants("ClusterRole", "birdwatch") == (
        each("otomato.link", ["birdwatches"], ["get", "list", "watch", "patch"])
        | each("otomato.link", ["birdwatches/status"], ["get", "patch", "update"])
        | each("networking.istio.io", istio, ["get", "list", "watch", "patch", "update"])
        | each("apps", ["deployments"], ["get", "list", "watch"])
        | each("", ["events"], ["create", "patch"])
    )
    role = one("Role", "birdwatch-leader-election")
    assert role["metadata"]["namespace"] == SYSTEM_NS
    leases = each("coordination.k8s.io", ["leases"], ["get", "create", "update"])
    assert grants("Role", "birdwatch-leader-election") == leases
    subject = {"kind": "ServiceAccount", "name": SA_NAME, "namespace": SYSTEM_NS}
    binding = one("ClusterRoleBinding", "birdwatch")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "birdwatch"}
    assert binding["subjects"] == [subject]
    role_binding = one("RoleBinding", "birdwatch-leader-election")
    assert role_binding["metadata"]["namespace"] == SYSTEM_NS
    assert role_binding["roleRef"]["kind"] == "Role"
    assert role_binding["roleRef"]["name"] == "birdwatch-leader-election"
    assert role_binding["subjects"] == [subject]
    assert one("ServiceAccount", SA_NAME)["metadata"]["namespace"] == SYSTEM_NS


# --- the Deployment -------------------------------------------------------------------------------------------------


def test_deployment_is_locked_down_and_runs_with_leader_election(tmp_path: Path) -> None:
    dep = one("Deployment", "birdwatch")
    assert dep["metadata"]["namespace"] == SYSTEM_NS
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    assert spec["replicas"] == 2
    assert pod["serviceAccountName"] == SA_NAME
    assert pod["terminationGracePeriodSeconds"] == 15
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    # Asked to be scraped once: a Prometheus honouring the annotation on both Pods and Services (Istio's addon
    # does) would scrape every replica twice.
    scraped = [
        f"{d['kind']} {d['metadata']['name']}"
        for d in manifests()
        for meta in (d["metadata"], ((d.get("spec") or {}).get("template") or {}).get("metadata") or {})
        if any(k.startswith("prometheus.io/") for k in (meta.get("annotations") or {}))
    ]
    assert scraped == ["Deployment birdwatch"], scraped
    assert set(spec["selector"]["matchLabels"].items()) <= set(dep["spec"]["template"]["metadata"]["labels"].items())

    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/otomato-gh/birdwatch:0.1.0"
    pod_sc, sc = pod.get("securityContext") or {}, container["securityContext"]

    def setting(key: str) -> Any:  # the container's own setting wins over the pod's
        return sc[key] if key in sc else pod_sc.get(key)

    assert setting("runAsNonRoot") is True
    uid = setting("runAsUser")
    assert type(uid) is int, f"runAsUser must be a numeric UID, not {uid!r}"
    assert uid > 0, "runAsUser 0 is root"
    assert (setting("seccompProfile") or {}).get("type") == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert not sc.get("privileged")
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) >= {"cpu", "memory"}, kind

    (port,) = container["ports"]
    assert port == {"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}

    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["SLACK_API_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "birdwatch-slack", "key": "token", "optional": True}
    }
    assert env["PROMETHEUS_URL"]["value"] == DEFAULT_PROMETHEUS
    assert env["SLACK_CHANNEL"]["value"]

    # birdwatch itself accepts the arguments and environment: `birdwatch run` is the image's entrypoint.
    values = {name: e.get("value", "") for name, e in env.items()}
    values |= {"POD_NAME": "birdwatch-7d4b9c-x2x9k", "POD_NAMESPACE": SYSTEM_NS, "SLACK_API_TOKEN": "xoxb-from-secret"}
    # The providers file is the ConfigMap's, mounted where BIRDWATCH_PROVIDERS_FILE says; its Secret is optional.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    providers_cm = one("ConfigMap", "birdwatch-providers")
    assert volumes["providers"]["configMap"]["name"] == providers_cm["metadata"]["name"]
    assert values["BIRDWATCH_PROVIDERS_FILE"] == f"{mounts['providers']}/providers.yaml"
    assert volumes["provider-secrets"]["secret"] == {"secretName": "birdwatch-provider-secrets", "optional": True}
    local = tmp_path / "providers.yaml"
    local.write_text(providers_cm["data"]["providers.yaml"])
    values["BIRDWATCH_PROVIDERS_FILE"] = str(local)
    # The notifiers file (the ConfigMap birdwatch-notifiers) is read and checked in tests/test_notifiers_file.py.
    values["BIRDWATCH_NOTIFIERS_FILE"] = ""
    settings = settings_from(build_parser(values).parse_args(["run", *container.get("args", [])]), values)
    assert settings.providers == ()
    assert settings.leader.enabled
    assert settings.leader.namespace == SYSTEM_NS
    assert settings.leader.identity == "birdwatch-7d4b9c-x2x9k"
    assert settings.leader.name == "birdwatch"  # the Lease it had before shards: an upgrade never runs two leaders
    assert settings.health_address is not None
    assert settings.health_address.endswith(":8080")
    assert settings.slack_token == "xoxb-from-secret"
    # SIGTERM's grace fits inside the pod's: canaries get their safe point before the kubelet's SIGKILL.
    assert settings.shutdown_grace < pod["terminationGracePeriodSeconds"]


# --- a second shard: deploy/shard1/ ---------------------------------------------------------------------------------

SHARD_DIR = DEPLOY / "shard1"
SHARD_KEY = "birdwatch.otomato.link/shard"


def container_settings(dep: Obj) -> Any:
    """What ``birdwatch run`` makes of a Deployment's arguments and environment (files set aside)."""
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    values = {e["name"]: e.get("value", "") for e in container["env"]}
    values |= {"POD_NAME": f"{dep['metadata']['name']}-7d4b9c-x2x9k", "POD_NAMESPACE": SYSTEM_NS}
    values |= {"BIRDWATCH_PROVIDERS_FILE": "", "BIRDWATCH_NOTIFIERS_FILE": ""}
    return settings_from(build_parser(values).parse_args(["run", *container.get("args", [])]), values)


def test_the_shard_is_the_main_pod_for_its_own_birdwatches_on_a_lease_of_its_own(
    installed: str, kubectl: Path, control_plane: ControlPlane, admin_http: KubeHTTP, namespace: str
) -> None:
    docs = manifests(SHARD_DIR)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("Deployment", "birdwatch-shard1"),
        ("NetworkPolicy", "birdwatch-shard1"),
        ("PodDisruptionBudget", "birdwatch-shard1"),
    ]
    assert all(d["metadata"]["namespace"] == SYSTEM_NS for d in docs)
    built = [d for d in yaml.safe_load_all(run_kubectl(kubectl, control_plane, "kustomize", str(SHARD_DIR))) if d]
    assert sorted(map(ident, built)) == sorted(map(ident, docs))
    assert not any(d.get("kind") == "Kustomization" for d in docs), "use the file name Kustomization"

    main = one("Deployment", "birdwatch")
    (shard,) = [d for d in docs if d["kind"] == "Deployment"]
    main_labels = main["spec"]["template"]["metadata"]["labels"]
    shard_labels = shard["spec"]["template"]["metadata"]["labels"]
    # No selector of one instance takes the other's pods in (a Deployment's, a budget's, a network policy's).
    for selector in (
        main["spec"]["selector"]["matchLabels"],
        one("PodDisruptionBudget", "birdwatch")["spec"]["selector"]["matchLabels"],
        one("NetworkPolicy", "birdwatch")["spec"]["podSelector"]["matchLabels"],
    ):
        assert not selector.items() <= shard_labels.items(), selector
    for d in docs:
        selector = (d["spec"].get("selector") or d["spec"].get("podSelector"))["matchLabels"]
        assert selector.items() <= shard_labels.items(), d["kind"]
        assert not selector.items() <= main_labels.items(), d["kind"]

    # The same pod as the main instance's, but for its labels and its shard's two settings.
    def pod(dep: Obj) -> Obj:
        template = yaml.safe_load(yaml.safe_dump(dep["spec"]["template"]))
        template["metadata"].pop("labels")
        for term in template["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]:
            term["podAffinityTerm"]["labelSelector"].pop("matchLabels")
        (container,) = template["spec"]["containers"]
        shards = ("BIRDWATCH_LABEL_SELECTOR", "BIRDWATCH_LEADER_ELECT_NAME")
        container["env"] = [e for e in container["env"] if e["name"] not in shards]
        return template

    assert pod(shard) == pod(main)
    assert shard["spec"]["replicas"] == main["spec"]["replicas"]

    # Each carries out its own BirdWatches, on a Lease of its own.
    main_settings, shard_settings = container_settings(main), container_settings(shard)
    assert main_settings.label_selector == f"!{SHARD_KEY}"
    assert shard_settings.label_selector == f"{SHARD_KEY}=shard1"
    assert (main_settings.leader.name, shard_settings.leader.name) == ("birdwatch", "birdwatch-shard1")
    assert main_settings.leader.enabled
    assert shard_settings.leader.enabled

    # The API server splits BirdWatches between the two selectors without overlap or gap.
    apply_all(admin_http, namespace, [birdwatch("plain", metric="vector(0)")])
    labelled = birdwatch("sharded", metric="vector(0)")
    labelled["metadata"]["labels"] = {SHARD_KEY: "shard1"}
    apply_all(admin_http, namespace, [labelled])
    for settings, expected in ((main_settings, ["plain"]), (shard_settings, ["sharded"])):
        selector = urllib.parse.quote(settings.label_selector)
        path = f"/apis/otomato.link/v1alpha1/namespaces/{namespace}/birdwatches?labelSelector={selector}"
        status, body = admin_http.request("GET", path)
        assert status == 200, body
        assert [i["metadata"]["name"] for i in body["items"]] == expected

    # Beside deploy/, the API server takes it (a server-side dry run: the session's birdwatch-system stays as it is).
    applied = run_kubectl(kubectl, control_plane, "apply", "-k", str(SHARD_DIR), "--dry-run=server").splitlines()
    assert len(applied) == len(docs), applied


def test_a_disruption_budget_keeps_one_replica_through_a_drain() -> None:
    pdb, dep = one("PodDisruptionBudget", "birdwatch"), one("Deployment", "birdwatch")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == SYSTEM_NS
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # Of 2 replicas one may go; at 1 replica the drain is not blocked (minAvailable: 1 would block it).
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    assert dep["spec"]["replicas"] - pdb["spec"]["maxUnavailable"] >= 1


def test_the_network_policy_admits_only_the_scraper_to_the_metrics_port() -> None:
    policy, dep = one("NetworkPolicy", "birdwatch"), one("Deployment", "birdwatch")
    assert policy["metadata"]["namespace"] == SYSTEM_NS
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]  # egress (API server, Prometheus, Slack) stays open
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    # Istio's Prometheus addon: namespace istio-system, pods labelled app.kubernetes.io/name=prometheus. Both in
    # one peer: pods with that label in that namespace, not every pod of the namespace or every such pod anywhere.
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    (port,) = rule["ports"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert port == {"port": container["ports"][0]["name"], "protocol": "TCP"}
    assert container["ports"][0]["containerPort"] == 8080


def test_metrics_service_reaches_the_pods_named_port() -> None:
    svc = one("Service", "birdwatch-metrics")
    dep = one("Deployment", "birdwatch")
    assert svc["metadata"]["namespace"] == SYSTEM_NS
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8080
    assert port["targetPort"] == "http-metrics"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"]
    assert set(svc["spec"]["selector"].items()) <= set(labels.items())


# --- a whole rollout as the ServiceAccount ------------------------------------------------------------------------


def service_account_kubeconfig(admin: KubeHTTP, plane: ControlPlane, folder: Path) -> Path:
    """A kubeconfig with a bound token of birdwatch's ServiceAccount, minted through the TokenRequest API."""
    status, body = admin.request(
        "POST",
        f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts/{SA_NAME}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )
    assert status == 201, f"TokenRequest: {status} {body}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": {"server": plane.url, "certificate-authority": str(plane.ca)}}],
        "users": [{"name": SA_NAME, "user": {"token": body["status"]["token"]}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": SA_NAME}}],
        "current-context": "envtest",
    }
    path = folder / "birdwatch-sa.kubeconfig"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


@pytest.fixture
def sa_kubeconfig(installed: str, admin_http: KubeHTTP, control_plane: ControlPlane, tmp_path: Path) -> Path:
    return service_account_kubeconfig(admin_http, control_plane, tmp_path)


@pytest.fixture
async def as_sa(sa_kubeconfig: Path) -> AsyncIterator[Kube]:
    kube = await Kube.connect(kubeconfig=str(sa_kubeconfig))
    try:
        yield kube
    finally:
        await kube.close()


async def whoami(kube: Kube) -> Obj:
    review = await kube.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    info: Obj = review["status"]["userInfo"]
    return info


async def test_the_token_is_the_service_accounts_and_no_more(as_sa: Kube, namespace: str) -> None:
    info = await whoami(as_sa)
    assert info["username"] == SA_USER
    assert "system:masters" not in info.get("groups", [])
    for ns in (SYSTEM_NS, namespace):
        with pytest.raises(KubeError) as denied:
            await as_sa.list(SECRETS, ns)
        assert denied.value.status == 403, denied.value
    with pytest.raises(KubeError) as denied:  # leases only in birdwatch-system
        await as_sa.list(LEASES, namespace)
    assert denied.value.status == 403
    await as_sa.list(BIRDWATCHES)  # every namespace: what `birdwatch run` without --namespace watches


@contextlib.asynccontextmanager
async def running(argv: list[str]) -> AsyncIterator[App]:
    """birdwatch in this event loop, built from ``birdwatch run`` arguments; stopped gracefully at the end."""
    app = App(settings_from(build_parser({}).parse_args(["run", *argv]), {}))
    task = asyncio.create_task(app.run())

    async def working() -> bool:
        if task.done():
            task.result()  # raise what made it stop
        # With --leader-elect the watchers only exist once this replica holds the Lease.
        return bool(app.watchers) and all(w.established.is_set() for w in app.watchers)

    try:
        await eventually(working, timeout=20, what="birdwatch to lead and watch")
        yield app
    finally:
        app.stop()
        await asyncio.wait_for(task, 15)


@pytest.fixture
def lease_name() -> str:
    """Its own Lease, so no other test's (or a crashed run's) holder can make this one wait."""
    return f"birdwatch-manifests-{uuid.uuid4().hex[:6]}"


async def test_a_whole_rollout_under_the_service_account(
    sa_kubeconfig: Path,
    as_sa: Kube,
    cluster: Cluster,
    admin_http: KubeHTTP,
    prometheus: PrometheusServer,
    exporter: Exporter,
    lease_name: str,
) -> None:
    assert (await whoami(as_sa))["username"] == SA_USER
    ns = cluster.namespace
    mesh(admin_http, ns, named=True)
    query = f'max(bwtest_errors{{ns="{ns}"}})'
    exporter.set_gauge("bwtest_errors", 0.1, ns=ns)
    prometheus.wait_for_value(query, 0.1)
    identity = f"birdwatch-sa-test-{uuid.uuid4().hex[:6]}"
    argv = [
        *("--kubeconfig", str(sa_kubeconfig)),
        *("--namespace", ns),
        *("--prometheus-url", prometheus.url),
        *("--health-address", "127.0.0.1:0"),
        *("--log-format", "console", "--log-level", "debug", "--shutdown-grace", "3"),
        "--leader-elect",
        *("--leader-elect-namespace", SYSTEM_NS, "--leader-elect-name", lease_name),
        *("--leader-elect-identity", identity),
        *("--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5"),
        *("--label-selector", "!birdwatch.otomato.link/shard"),  # deploy/'s main instance, as a shard
    ]
    async with running(argv) as app:
        assert app.settings.kubeconfig == str(sa_kubeconfig)
        await cluster.create_bw(birdwatch("aleph", metric=query, max_weight=20))
        status = await cluster.wait_phase("Promoted")
        lease = await cluster.kube.get(LEASES, SYSTEM_NS, lease_name)
        assert lease["spec"]["holderIdentity"] == identity
        assert lease["spec"]["leaseDurationSeconds"] == 4
    # Status written (birdwatches/status patch), weights and subsets rewritten (virtualservices and
    # destinationrules get/patch), the canary's Deployment seen (deployments list).
    assert status["observedGeneration"] == 1
    assert status["canaryWeight"] == 100
    assert await cluster.weights() == {"production": 100, "canary": 0}
    dr = await cluster.dr()
    assert {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]} == {"production": "v04", "canary": "v04"}
    # Events created (events create): the recorder flushes its queue when birdwatch stops.
    events = await cluster.events()
    reasons = [e["reason"] for e in events]
    assert {"RolloutStarted", "Promoted"} <= set(reasons), reasons
    assert all(e["reportingComponent"] == "birdwatch" for e in events)
    # Leases get/update: stopping released the Lease (the holder is cleared), as a rolling update of the pods would.
    released = await cluster.kube.get(LEASES, SYSTEM_NS, lease_name)
    assert not released["spec"].get("holderIdentity")
