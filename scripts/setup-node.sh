#!/usr/bin/env bash
# Packages of the node lab (tests/test_node_e2e.py, `make e2e`): Debian's containerd 1.6, runc 1.1 and
# the CNI plugins. Idempotent. No service is started: the lab runs its own containerd with a private
# config, root, state and socket (on a systemd host, policy-rc.d keeps the packaged service down).
set -euo pipefail
PACKAGES=(containerd runc containernetworking-plugins iproute2 util-linux gcc libc6-dev golang-go)
exec bash "$(dirname "$0")/apt-ensure.sh" "${PACKAGES[@]}"
