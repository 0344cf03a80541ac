"""``make release``: hack/release.py renders deploy/crd/ and deploy/ into one install file with the release's image,
the same objects ``kubectl kustomize`` renders, which the real API server accepts; and the file's uninstall command
(``kubectl delete -f install.yaml -l app.kubernetes.io/component!=crd``) leaves the CRD alone.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from birdwatch_sandbox.envtest.assets import REPO, Assets
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP

RELEASE = REPO / "hack" / "release.py"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def kubectl(assets: Assets) -> Path:
    found = assets.kubectl or shutil.which("kubectl")
    assert found, "no kubectl: hack/install-control-plane.sh builds one unless KUBEBUILDER_ASSETS lacks it"
    return Path(found)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def kubectl_run(kubectl: Path, plane: ControlPlane, *args: str) -> str:
    done = run([str(kubectl), "--kubeconfig", str(plane.kubeconfig), *args])
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}{done.stdout}"
    return done.stdout


def release(tmp_path: Path, *args: str) -> tuple[str, list[Obj]]:
    out = tmp_path / "install.yaml"
    done = run([sys.executable, str(RELEASE), "--output", str(out), *args])
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    return text, [d for d in yaml.safe_load_all(text) if d]


def ident(obj: Obj) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def test_release_renders_what_kustomize_renders_with_the_releases_image(
    tmp_path: Path, kubectl: Path, control_plane: ControlPlane, admin_http: KubeHTTP
) -> None:
    text, docs = release(tmp_path, "--version", "1.2.3", "--image", "registry.example/team/birdwatch")
    assert text.startswith("# birdwatch 1.2.3:")
    kinds = [d["kind"] for d in docs]
    assert kinds[:2] == ["CustomResourceDefinition", "Namespace"], kinds  # applied in file order
    crd = [d for d in yaml.safe_load_all(kubectl_run(kubectl, control_plane, "kustomize", "deploy/crd/")) if d]
    rest = [d for d in yaml.safe_load_all(kubectl_run(kubectl, control_plane, "kustomize", "deploy/")) if d]
    assert sorted(map(ident, docs)) == sorted(map(ident, crd + rest))

    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/team/birdwatch:1.2.3"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == "1.2.3"
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "1.2.3"
    # Apart from image and version, the objects are kustomize's.
    by_ident = {ident(d): d for d in crd + rest}
    for doc in docs:
        expected = copy.deepcopy(by_ident[ident(doc)])
        if doc["kind"] == "Deployment":
            expected["spec"]["template"]["spec"]["containers"][0]["image"] = container["image"]
            for meta in (expected["metadata"], expected["spec"]["template"]["metadata"]):
                meta["labels"]["app.kubernetes.io/version"] = "1.2.3"
        assert doc == expected, ident(doc)

    # The API server takes the file as it is (a server-side dry run leaves the session's objects alone). A dry run
    # creates no namespace, so birdwatch-system (the one deploy/ makes, for the session's other tests too) first.
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    admin_http.apply(namespace)
    applied = kubectl_run(kubectl, control_plane, "apply", "--dry-run=server", "-f", str(tmp_path / "install.yaml"))
    assert len(applied.strip().splitlines()) == len(docs), applied


def test_the_default_version_is_the_packages(tmp_path: Path) -> None:
    from birdwatch import __version__

    _, docs = release(tmp_path)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/otomato-gh/birdwatch:{__version__}"


def test_the_uninstall_command_of_the_file_keeps_the_crd(
    tmp_path: Path, kubectl: Path, control_plane: ControlPlane
) -> None:
    release(tmp_path)
    path = str(tmp_path / "install.yaml")
    kubectl_run(kubectl, control_plane, "apply", "-f", path)  # the same objects the session installed: unchanged
    would = kubectl_run(
        kubectl,
        control_plane,
        *("delete", "-f", path, "-l", "app.kubernetes.io/component!=crd", "--dry-run=server", "-o", "name"),
    ).split()
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    assert len(would) == len(docs) - 1, would
    assert not [n for n in would if n.startswith("customresourcedefinition")], would
    everything = kubectl_run(kubectl, control_plane, "delete", "-f", path, "--dry-run=server", "-o", "name").split()
    assert len([n for n in everything if n.startswith("customresourcedefinition")]) == 1, everything


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--version", "1.2.3 beta"], "not a valid image tag"), (["--image", "repo/birdwatch:1.0"], "without a tag")],
)
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], says: str) -> None:
    done = run([sys.executable, str(RELEASE), "--output", str(tmp_path / "x.yaml"), *args])
    assert done.returncode == 2
    assert says in done.stderr
    assert not (tmp_path / "x.yaml").exists()
