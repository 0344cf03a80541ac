#!/usr/bin/env bash
# Builds, once, the local control plane that birdwatch's tests, sandbox, demo and benchmark run on, and prints
# the folder that holds it:
#   kube-apiserver, kubectl,
#   kube-controller-manager,
#   kube-scheduler           from k8s.io/kubernetes   (hack/tools/kubernetes/go.mod pins the release)
#   etcd                     from go.etcd.io/etcd/server/v3 (hack/tools/etcd/go.mod)
#   kwok                     from sigs.k8s.io/kwok    (hack/tools/kwok/go.mod): fake nodes for the pods
#   istio-crds.yaml          from istio.io/api         (hack/tools/istio/go.mod)
#   prometheus               $PROMETHEUS_BIN, else the one on PATH, else Debian's package (installed as root)
# The folder is keyed by those versions, so a second run builds nothing. If KUBEBUILDER_ASSETS names a folder
# holding kube-apiserver and etcd (the envtest convention), those are used; envtest's folders have no
# controller-manager, scheduler or kwok, so those are still built unless that folder has them too.
# Everything it says goes to stderr; stdout carries only the folder, for scripts.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tools=$repo/hack/tools
say() { printf 'install-control-plane: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

modver() { # modver GOMOD MODULE -> the version the tools module requires
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1"
}
kube_version=$(modver "$tools/kubernetes/go.mod" k8s.io/kubernetes)
etcd_version=$(modver "$tools/etcd/go.mod" go.etcd.io/etcd/server/v3)
istio_version=$(modver "$tools/istio/go.mod" istio.io/api)
kwok_version=$(modver "$tools/kwok/go.mod" sigs.k8s.io/kwok)
[ -n "$kube_version" ] && [ -n "$etcd_version" ] && [ -n "$istio_version" ] && [ -n "$kwok_version" ] \
  || die "cannot read pinned versions"

cache=${BIRDWATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/birdwatch}
out=$cache/k8s-$kube_version-etcd-$etcd_version-istio-$istio_version
mkdir -p "$out"
# One install at a time per cache: test sessions started side by side would otherwise build into the same files.
exec 9>"$cache/.install.lock"
flock 9

need_go() {
  command -v go >/dev/null || die "Go is needed to build the control plane (Go >= 1.26; or set KUBEBUILDER_ASSETS)"
}

build_go() { # build_go MODULE_DIR PACKAGE OUTPUT [LDFLAGS]
  local started=$SECONDS
  say "building $(basename "$3") from $2 (first run only; a few minutes on 2 cores)"
  # nice: the build shares the machine with whatever else runs there (tests, other builds).
  (cd "$1" && CGO_ENABLED=0 nice go build -trimpath -ldflags "-s -w ${4:-}" -o "$3.tmp" "$2")
  mv "$3.tmp" "$3"
  say "built $(basename "$3") in $((SECONDS - started)) s"
}

version_flags="-X k8s.io/component-base/version.gitVersion=$kube_version
  -X k8s.io/component-base/version.gitMajor=$(echo "$kube_version" | cut -d. -f1 | tr -d v)
  -X k8s.io/component-base/version.gitMinor=$(echo "$kube_version" | cut -d. -f2)
  -X k8s.io/component-base/version.gitTreeState=clean
  -X k8s.io/client-go/pkg/version.gitVersion=$kube_version"
if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  say "using kube-apiserver and etcd from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  ln -sf "$KUBEBUILDER_ASSETS/kube-apiserver" "$out/kube-apiserver"
  ln -sf "$KUBEBUILDER_ASSETS/etcd" "$out/etcd"
  for binary in kubectl kube-controller-manager kube-scheduler; do
    if [ -x "$KUBEBUILDER_ASSETS/$binary" ]; then ln -sf "$KUBEBUILDER_ASSETS/$binary" "$out/$binary"; fi
  done
else
  if [ ! -x "$out/kube-apiserver" ]; then
    need_go
    build_go "$tools/kubernetes" k8s.io/kubernetes/cmd/kube-apiserver "$out/kube-apiserver" "$version_flags"
  fi
  if [ ! -x "$out/kubectl" ]; then
    need_go
    build_go "$tools/kubernetes" k8s.io/kubernetes/cmd/kubectl "$out/kubectl" "$version_flags"
  fi
  if [ ! -x "$out/etcd" ]; then
    need_go
    build_go "$tools/etcd" go.etcd.io/etcd/server/v3 "$out/etcd" \
      "-X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_version"
  fi
fi
# The Deployment, ReplicaSet, namespace and garbage-collector controllers, and the scheduler that puts their pods
# on kwok's nodes. Built after kube-apiserver, they reuse most of its compiled packages.
for binary in kube-controller-manager kube-scheduler; do
  if [ ! -x "$out/$binary" ]; then
    need_go
    build_go "$tools/kubernetes" "k8s.io/kubernetes/cmd/$binary" "$out/$binary" "$version_flags"
  fi
done
# kwok has its own module (its Kubernetes libraries are not the API server's), so its folder has its own key; the
# link keeps every consumer looking in one place.
kwok_dir=$cache/kwok-$kwok_version
if [ ! -x "$kwok_dir/kwok" ]; then
  need_go
  mkdir -p "$kwok_dir"
  build_go "$tools/kwok" sigs.k8s.io/kwok/cmd/kwok "$kwok_dir/kwok" \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=${kwok_version#v}"
fi
ln -sf "$kwok_dir/kwok" "$out/kwok"

if [ ! -s "$out/istio-crds.yaml" ]; then
  need_go
  dir=$(cd "$tools/istio" && go mod download -json istio.io/api | awk -F'"' '$2 == "Dir" { print $4 }')
  [ -f "$dir/kubernetes/customresourcedefinitions.gen.yaml" ] || die "istio.io/api $istio_version has no CRD file"
  cp "$dir/kubernetes/customresourcedefinitions.gen.yaml" "$out/istio-crds.yaml.tmp"
  mv "$out/istio-crds.yaml.tmp" "$out/istio-crds.yaml"
  chmod u+w "$out/istio-crds.yaml"
fi

prometheus=${PROMETHEUS_BIN:-}
if [ -z "$prometheus" ]; then
  prometheus=$(command -v prometheus || true)
fi
if [ -z "$prometheus" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's prometheus package"
    # The package's own service is never started here: the harness runs its own Prometheus per test session.
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >&2 \
      || die "apt-get install prometheus failed"
    prometheus=$(command -v prometheus) || die "prometheus is still missing after apt-get"
  else
    die "no prometheus binary: install Prometheus >= 2.40 or set PROMETHEUS_BIN"
  fi
fi
ln -sf "$prometheus" "$out/prometheus"

echo "$out"
