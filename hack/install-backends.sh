#!/usr/bin/env bash
# Makes sure of the real metric backends the provider tests run birdwatch against, and prints where they are:
#   influxd            InfluxDB 1.x      (Debian: influxdb)
#   victoria-metrics   VictoriaMetrics   (Debian: victoria-metrics)
#   carbon-cache       Graphite's carbon (Debian: graphite-carbon)
#   graphite-web       Graphite's render API, a Django app (Debian: graphite-web)
# Each is taken from PATH when there; otherwise, as root with apt-get, Debian's packages are installed (their own
# services are never started here: the test harness runs its own on free loopback ports, data in temp folders).
# Grafana Loki has no Debian package (Debian's `loki` is an unrelated genetics program), so it is not installed.
# Everything it says goes to stderr; stdout carries one `name=path` line per backend, for the harness.
set -euo pipefail

say() { printf 'install-backends: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

declare -A packages=(
  [influxd]=influxdb
  [victoria-metrics]=victoria-metrics
  [carbon-cache]=graphite-carbon
  [graphite-manage]=graphite-web
)
missing=()
for binary in "${!packages[@]}"; do
  command -v "$binary" >/dev/null || missing+=("${packages[$binary]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || die "missing ${missing[*]}: install Debian's packages (as root: apt-get install ${missing[*]})"
  started=$SECONDS
  say "installing Debian's ${missing[*]}"
  # One install at a time: test sessions started side by side would otherwise fight over dpkg's lock.
  exec 9>/tmp/birdwatch-install-backends.lock
  flock 9
  # policy-rc.d 101: the packages' own services must not start (they would take the default ports).
  policy=/usr/sbin/policy-rc.d
  restore=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && restore=yes
  fi
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") >&2 \
    || { [ -n "$restore" ] && rm -f "$policy"; die "apt-get install ${missing[*]} failed"; }
  [ -n "$restore" ] && rm -f "$policy"
  say "installed in $((SECONDS - started)) s"
fi
webapp=$(/usr/bin/python3 -c 'import graphite, os; print(os.path.dirname(graphite.__file__))' 2>/dev/null || true)
echo "influxd=$(command -v influxd)"
echo "victoria-metrics=$(command -v victoria-metrics)"
echo "carbon-cache=$(command -v carbon-cache)"
echo "graphite-web=${webapp}"
