"""Render the install manifests of one release into a single file: ``make release`` (``dist/install.yaml``).

The file holds deploy/crd/ and then deploy/, in the order of their kustomizations, with the image set to
``IMAGE:VERSION`` and the ``app.kubernetes.io/version`` labels to VERSION: ``kubectl apply -f install.yaml`` installs
or upgrades everything in one step, like the install.yaml that Argo Rollouts attaches to each release.

No kustomize or kubectl is needed: the two kustomizations only list resources, and this script refuses one that
uses anything else (patches, images, ...), which it would otherwise silently leave out. tests/test_release.py
checks that it renders exactly what ``kubectl kustomize`` renders, apart from the image and version.

    python hack/release.py [--version 0.1.0] [--image ghcr.io/otomato-gh/birdwatch] [--output dist/install.yaml]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# The CRD first: on a new cluster the controller's objects may name it (and kubectl applies in file order).
KUSTOMIZATIONS = (REPO / "deploy" / "crd", REPO / "deploy")
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_KEYS = {"apiVersion", "kind", "resources"}
DEFAULT_IMAGE = "ghcr.io/otomato-gh/birdwatch"
VERSION_LABEL = "app.kubernetes.io/version"

Obj = dict[str, Any]


class ReleaseError(Exception):
    pass


def package_version() -> str:
    text = (REPO / "src" / "birdwatch" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if not found:
        raise ReleaseError("no __version__ in src/birdwatch/__init__.py")
    return found.group(1)


def kustomization_file(folder: Path) -> Path:
    found = [folder / name for name in KUSTOMIZATION_NAMES if (folder / name).exists()]
    if len(found) != 1:
        raise ReleaseError(f"{folder}: expected one kustomization file, found {[p.name for p in found]}")
    return found[0]


def resources(folder: Path) -> list[Obj]:
    """The objects a kustomization of plain resources lists, in its order."""
    path = kustomization_file(folder)
    kustomization = yaml.safe_load(path.read_text()) or {}
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise ReleaseError(f"{path}: hack/release.py renders only `resources`, not {sorted(unknown)}")
    objs: list[Obj] = []
    for entry in kustomization.get("resources") or []:
        target = folder / entry
        if target.is_dir():
            objs.extend(resources(target))
            continue
        objs.extend(doc for doc in yaml.safe_load_all(target.read_text()) if doc)
    return objs


def set_version(obj: Obj, image: str, version: str) -> None:
    """The release's image in every birdwatch container; its version wherever a version label is set."""
    for meta in _metadatas(obj):
        labels = meta.get("labels") or {}
        if VERSION_LABEL in labels:
            labels[VERSION_LABEL] = version
    pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
        if str(container.get("image", "")).startswith(f"{DEFAULT_IMAGE}:") or container.get("name") == "birdwatch":
            container["image"] = f"{image}:{version}"


def _metadatas(obj: Obj) -> list[Obj]:
    found = [obj.get("metadata") or {}]
    template = (obj.get("spec") or {}).get("template")
    if isinstance(template, dict):
        found.append(template.get("metadata") or {})
    return found


def render(*, image: str, version: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", version):
        raise ReleaseError(f"{version!r} is not a valid image tag")
    if not image or ":" in image.rsplit("/", 1)[-1] or "@" in image:
        raise ReleaseError(f"--image {image!r}: give the repository without a tag (the tag is --version)")
    docs: list[Obj] = []
    for folder in KUSTOMIZATIONS:
        for obj in resources(folder):
            set_version(obj, image, version)
            docs.append(obj)
    header = (
        f"# birdwatch {version}: the CRD and the controller in one file (rendered by `make release` from deploy/).\n"
        f"#   install or upgrade:  kubectl apply -f install.yaml\n"
        f"#   uninstall, keeping the CRD and every BirdWatch:\n"
        f"#                        kubectl delete -f install.yaml -l app.kubernetes.io/component!=crd\n"
        f"#   remove the CRD too, and with it every BirdWatch: kubectl delete -f install.yaml\n"
    )
    return header + "".join(f"---\n{yaml.safe_dump(doc, sort_keys=False, width=120)}" for doc in docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--version", default=None, help="image tag and version label (default: birdwatch.__version__)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"image repository (default {DEFAULT_IMAGE})")
    parser.add_argument("--output", default=str(REPO / "dist" / "install.yaml"), help="default dist/install.yaml")
    args = parser.parse_args(argv)
    try:
        version = args.version or package_version()
        text = render(image=args.image, version=version)
    except (ReleaseError, OSError, yaml.YAMLError) as exc:
        print(f"release: error: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    count = text.count("\n---\n")  # every document starts on a "---" line after the header
    print(f"release: wrote {output} ({count} objects, image {args.image}:{version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
