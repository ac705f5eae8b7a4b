#!/usr/bin/env bash
# Packages of the node lab (tests/test_node_e2e.py, `make e2e`): Debian's containerd 1.6, runc 1.1 and
# the CNI plugins. Idempotent. No service is started: the lab runs its own containerd with a private
# config, root, state and socket (on a systemd host, policy-rc.d keeps the packaged service down).
set -euo pipefail
PACKAGES=(containerd runc containernetworking-plugins iproute2 util-linux gcc libc6-dev golang-go)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "setup-node: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-o DPkg::Lock::Timeout=900)
apt-get "${apt_opts[@]}" update -q >&2
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get "${apt_opts[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2
