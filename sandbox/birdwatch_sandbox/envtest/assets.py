"""Where the control plane's binaries are: built once by hack/install-control-plane.sh, then cached."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
INSTALL_SCRIPT = REPO / "hack" / "install-control-plane.sh"


@dataclass(frozen=True)
class Assets:
    folder: Path

    @property
    def kube_apiserver(self) -> Path:
        return self.folder / "kube-apiserver"

    @property
    def etcd(self) -> Path:
        return self.folder / "etcd"

    @property
    def kube_controller_manager(self) -> Path:
        return self.folder / "kube-controller-manager"

    @property
    def kube_scheduler(self) -> Path:
        return self.folder / "kube-scheduler"

    @property
    def kwok(self) -> Path:
        return self.folder / "kwok"

    @property
    def kubectl(self) -> Path | None:
        path = self.folder / "kubectl"
        return path if path.exists() else None

    @property
    def prometheus(self) -> Path:
        return self.folder / "prometheus"

    @property
    def istio_crds(self) -> Path:
        return self.folder / "istio-crds.yaml"


def ensure_assets() -> Assets:
    """Build what is missing (first run only) and return where everything is."""
    done = subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    folder = Path(done.stdout.strip().splitlines()[-1])
    return Assets(folder)
