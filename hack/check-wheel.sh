#!/usr/bin/env bash
# Proves the Dockerfile's install steps without Docker: builds birdwatch's wheel from a copy of the sources (as the
# builder stage does: setuptools and wheel from constraints.txt, then `pip wheel --no-build-isolation --no-deps`),
# installs only that wheel into a new, clean virtualenv with its dependencies from the package index at the versions
# constraints.txt pins (`pip install -c constraints.txt`, as the runtime stage does), then checks that
#   - every package in that virtualenv is pinned by constraints.txt (else a rebuild could pick another version),
#   - the wheel holds birdwatch/py.typed and nothing but the birdwatch package (no tests, no test helpers),
#   - `birdwatch --version` exits 0 and prints "birdwatch <the wheel's version>",
#   - `birdwatch run --help` exits 0 and shows the run flags,
#   - the installed birdwatch is the venv's own (not the work tree's src/) and `pip check` finds its dependencies
#     consistent.
# Everything happens in a temporary folder, removed at the end; the work tree is not written to.
# Usage: bash hack/check-wheel.sh   (PYTHON=python3.11 to choose the interpreter; the image uses 3.11)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/birdwatch-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

say() { printf 'check-wheel: %s\n' "$*"; }
ok() { printf 'check-wheel: ok: %s\n' "$*"; }
die() {
  printf 'check-wheel: FAILED: %s\n' "$1" >&2
  if [ -n "${2:-}" ] && [ -f "$2" ]; then sed 's/^/  | /' "$2" >&2; fi
  exit 1
}

say "python: $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. The wheel, from a copy of what the Docker build context holds for it (a pip build in the work tree itself
#    would leave build/ and *.egg-info behind there).
src=$work/context
mkdir -p "$src"
constraints=$repo/constraints.txt
[ -f "$constraints" ] || die "no constraints.txt in $repo (the image installs its dependencies from it)"
for f in pyproject.toml setup.cfg README.md LICENSE constraints.txt; do
  if [ -e "$repo/$f" ]; then cp "$repo/$f" "$src/"; fi
done
cp -R "$repo/src" "$src/src"
find "$src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$python" -m venv "$work/build"
"$work/build/bin/python" -m pip install --quiet -c "$constraints" setuptools wheel >"$work/build.log" 2>&1 \
  || die "installing the pinned build backend failed" "$work/build.log"
"$work/build/bin/python" -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/dist" "$src" \
  >"$work/wheel.log" 2>&1 || die "pip wheel failed" "$work/wheel.log"
shopt -s nullglob
wheels=("$work"/dist/birdwatch-*.whl)
shopt -u nullglob
[ "${#wheels[@]}" -eq 1 ] || die "expected one birdwatch wheel in dist/, found ${#wheels[@]}: $(ls "$work/dist")"
wheel=${wheels[0]}
version=$(basename "$wheel" | cut -d- -f2)
ok "built $(basename "$wheel") (version $version)"

# 2. What the wheel holds.
"$python" - "$wheel" "$version" <<'PY' || die "the wheel's contents are wrong (see above)"
import sys
import zipfile

wheel, version = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
problems = []
if "birdwatch/py.typed" not in names:
    problems.append("no birdwatch/py.typed (PEP 561 marker)")
if "birdwatch/__init__.py" not in names:
    problems.append("no birdwatch/__init__.py")
allowed = ("birdwatch/", f"birdwatch-{version}.dist-info/")
strays = [n for n in names if not n.startswith(allowed)]
if strays:
    problems.append(f"files outside the birdwatch package: {strays}")
tests = [n for n in names if "tests/" in n or n.rsplit("/", 1)[-1].startswith(("test_", "conftest"))]
if tests:
    problems.append(f"test files: {tests}")
for p in problems:
    print(f"check-wheel: wheel: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
modules = [n for n in names if n.endswith(".py")]
print(f"check-wheel: ok: the wheel holds {len(names)} files: {len(modules)} modules of birdwatch, birdwatch/py.typed "
      "and its dist-info; no tests")
PY

# 3. A clean virtualenv with only the wheel and its dependencies.
"$python" -m venv "$work/venv"
venv=$work/venv/bin
"$venv/python" -m pip install --quiet -c "$constraints" "$wheel" >"$work/install.log" 2>&1 \
  || die "pip install -c constraints.txt of the wheel into a clean venv failed" "$work/install.log"
"$venv/python" -m pip check >"$work/check.log" 2>&1 || die "pip check: inconsistent dependencies" "$work/check.log"
ok "installed into a clean virtualenv with its dependencies (pip install -c constraints.txt); pip check is clean"
"$venv/python" -m pip list --format=freeze --exclude birdwatch --exclude pip --exclude setuptools >"$work/freeze.txt"
"$python" - "$constraints" "$work/freeze.txt" <<'PY' || die "constraints.txt does not pin what the image installs"
import re
import sys

def pins(path):
    found = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found

wanted, installed = pins(sys.argv[1]), pins(sys.argv[2])
loose = sorted(n for n in installed if n not in wanted)
wrong = sorted(f"{n} {installed[n]} (pinned {wanted[n]})" for n in installed if n in wanted and wanted[n] != installed[n])
for n in loose:
    print(f"check-wheel: installed but not pinned in constraints.txt: {n}=={installed[n]}", file=sys.stderr)
for w in wrong:
    print(f"check-wheel: installed at another version than constraints.txt pins: {w}", file=sys.stderr)
if loose or wrong:
    sys.exit(1)
print(f"check-wheel: ok: all {len(installed)} installed dependencies are pinned by constraints.txt")
PY
say "installed: $("$venv/python" -m pip list --format=freeze 2>/dev/null | grep -v -E '^(pip|setuptools)==' | tr '\n' ' ')"

# 4. The entry point, run from outside the work tree so nothing but the venv can be imported.
cd "$work"
unset PYTHONPATH
location=$("$venv/python" -c 'import birdwatch; print(birdwatch.__file__)')
case $location in
  "$work"/venv/*) ok "birdwatch imports from the venv ($location)" ;;
  *) die "birdwatch imports from $location, not from the clean venv" ;;
esac

set +e
out=$("$venv/birdwatch" --version 2>&1)
rc=$?
set -e
[ "$rc" -eq 0 ] || die "birdwatch --version exited $rc: $out"
[ "$out" = "birdwatch $version" ] || die "birdwatch --version printed '$out', not 'birdwatch $version'"
ok "birdwatch --version exits 0 and prints '$out'"

set +e
"$venv/birdwatch" run --help >"$work/help.txt" 2>&1
rc=$?
set -e
[ "$rc" -eq 0 ] || die "birdwatch run --help exited $rc" "$work/help.txt"
for flag in --kubeconfig --prometheus-url --health-address --leader-elect; do
  grep -q -- "$flag" "$work/help.txt" || die "birdwatch run --help does not mention $flag" "$work/help.txt"
done
ok "birdwatch run --help exits 0 ($(wc -l <"$work/help.txt") lines; --kubeconfig, --prometheus-url, --health-address, --leader-elect shown)"

say "all checks passed"
