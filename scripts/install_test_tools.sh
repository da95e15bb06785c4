#!/usr/bin/env bash
# System tools the test suite runs for real: promtool and prometheus (Debian's prometheus package),
# systemd-analyze, and Patroni with etcd (Debian's patroni and etcd-server packages) for the
# throwaway PostgreSQL cluster of tests/test_patroni.py. Installs what is missing when run as root;
# otherwise says what to install.
# Exits non-zero, saying why, when a tool is still missing afterwards.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v patroni >/dev/null 2>&1 || missing+=(patroni)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "the tests need: ${missing[*]}; install with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

log=$(mktemp)
policy=/usr/sbin/policy-rc.d
made_policy=
cleanup() {
  [ -n "$made_policy" ] && rm -f "$policy"
  rm -f "$log"
}
trap cleanup EXIT

# The packages' own daemons are not wanted (the tests start their own Prometheus, etcd and Patroni
# on free ports):
# policy-rc.d answering 101 stops invoke-rc.d and deb-systemd-invoke from starting it, so nothing
# has to be stopped afterwards. An existing policy is left as it is.
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  made_policy=1
fi

run() {  # a command whose output is shown only when it fails
  if ! "$@" >"$log" 2>&1; then
    echo "install_test_tools: failed: $*" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

echo "installing ${missing[*]}"
run apt-get update -qq
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"

still=()
for tool in promtool prometheus systemd-analyze patroni etcd; do
  command -v "$tool" >/dev/null 2>&1 || still+=("$tool")
done
if [ ${#still[@]} -ne 0 ]; then
  echo "install_test_tools: still missing after installing ${missing[*]}: ${still[*]}" >&2
  exit 1
fi
