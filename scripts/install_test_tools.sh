#!/usr/bin/env bash
# System tools the test suite runs for real: promtool and prometheus (Debian's prometheus package),
# systemd-analyze and openssl. Installs what is missing when run as root; otherwise says what to install.
set -u
missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "the tests need: ${missing[*]}; install with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}"
apt-get update -qq
# The package's own daemon is not wanted: the tests start their own Prometheus on a free port.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
pkill -x prometheus 2>/dev/null || true
