#!/usr/bin/env bash
# System tools the test suite runs for real: promtool and prometheus (Debian's prometheus package),
# systemd-analyze (Debian's systemd package), prometheus-alertmanager and amtool (Debian's
# prometheus-alertmanager package), and, as root only, Patroni with etcd (Debian's patroni and
# etcd-server packages) for the throwaway PostgreSQL cluster of tests/test_patroni.py, and the
# locale sources localedef compiles de_DE.UTF-8 from (Debian's locales package) for the throwaway
# server of tests/test_pg_errors.py that answers in German (both run PostgreSQL as the postgres
# user, so need root anyway).
#
# As root, what is missing is installed with apt-get. As anyone else, nothing system-wide is
# touched: `apt-get download` fetches the same packages (no root needed) and `dpkg-deb -x` unpacks
# them under TOOLS_DIR (default .venv/tools), whose bin/ the Makefile puts first on the tests' PATH.
# Exits non-zero, saying why, when a tool is still missing afterwards.
set -euo pipefail

tools_dir=${TOOLS_DIR:-.venv/tools}
export PATH="$tools_dir/bin:$PATH"

# What localedef needs to compile de_DE.UTF-8 (tests/pg_servers.py message_locale).
locale_sources() {
  command -v localedef >/dev/null 2>&1 && [ -e /usr/share/i18n/locales/de_DE ] \
    && { [ -e /usr/share/i18n/charmaps/UTF-8.gz ] || [ -e /usr/share/i18n/charmaps/UTF-8 ]; }
}

missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v prometheus-alertmanager >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
root_tools=()
if [ "$(id -u)" -eq 0 ]; then
  root_tools=(patroni etcd)
  command -v patroni >/dev/null 2>&1 || missing+=(patroni)
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  locale_sources || missing+=(locales)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

log=$(mktemp)
policy=/usr/sbin/policy-rc.d
made_policy=
workdir=
cleanup() {
  [ -n "$made_policy" ] && rm -f "$policy"
  [ -n "$workdir" ] && rm -rf "$workdir"
  rm -f "$log"
}
trap cleanup EXIT

run() {  # a command whose output is shown only when it fails
  if ! "$@" >"$log" 2>&1; then
    echo "install_test_tools: failed: $*" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

if [ "$(id -u)" -ne 0 ]; then
  echo "installing ${missing[*]} under $tools_dir (no root needed)"
  workdir=$(mktemp -d)
  root="$tools_dir/root"
  mkdir -p "$root" "$tools_dir/bin"
  # Into a scratch directory: apt-get download writes where it runs.
  packages=("${missing[@]}")
  # systemd-analyze's private libraries come in a package of their own.
  [[ " ${missing[*]} " == *" systemd "* ]] && packages+=(libsystemd-shared)
  if ! (cd "$workdir" && apt-get download "${packages[@]}") >"$log" 2>&1; then
    echo "install_test_tools: apt-get download ${packages[*]} failed (are the package lists there? 'apt-get update' as root once):" >&2
    tail -n 10 "$log" >&2
    exit 1
  fi
  for deb in "$workdir"/*.deb; do
    run dpkg-deb -x "$deb" "$root"
  done
  root=$(cd "$root" && pwd)
  for tool in promtool prometheus prometheus-alertmanager amtool; do
    [ -x "$root/usr/bin/$tool" ] && ln -sf "$root/usr/bin/$tool" "$tools_dir/bin/$tool"
  done
  if [ -x "$root/usr/bin/systemd-analyze" ]; then
    # Its private libraries are found through a RUNPATH that names /usr/lib/... absolutely.
    libs=$(find "$root" -name 'libsystemd-*.so' -printf '%h\n' | sort -u | paste -sd: -)
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
      "$libs" "$root/usr/bin/systemd-analyze" >"$tools_dir/bin/systemd-analyze"
    chmod 755 "$tools_dir/bin/systemd-analyze"
  fi
else
  # The packages' own daemons are not wanted (the tests start their own Prometheus, Alertmanager,
  # etcd and Patroni on free ports):
  # policy-rc.d answering 101 stops invoke-rc.d and deb-systemd-invoke from starting it, so nothing
  # has to be stopped afterwards. An existing policy is left as it is.
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  echo "installing ${missing[*]}"
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

still=()
for tool in promtool prometheus systemd-analyze prometheus-alertmanager amtool "${root_tools[@]}"; do
  "$tool" --version >/dev/null 2>&1 || still+=("$tool")
done
if [ "$(id -u)" -eq 0 ] && ! locale_sources; then
  still+=("localedef or the de_DE locale sources (/usr/share/i18n)")
fi
if [ ${#still[@]} -ne 0 ]; then
  echo "install_test_tools: still missing or not running after installing ${missing[*]}: ${still[*]}" >&2
  exit 1
fi
