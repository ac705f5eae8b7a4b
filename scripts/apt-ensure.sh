#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed yet; idempotent.
# No packaged service is started meanwhile (policy-rc.d): the lab starts its own daemons
# (etcd, containerd) as plain processes with private state.
#   scripts/apt-ensure.sh etcd-server rsync ...
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "apt-ensure: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-o DPkg::Lock::Timeout=900)
apt-get "${apt_opts[@]}" update -q >&2
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get "${apt_opts[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2
