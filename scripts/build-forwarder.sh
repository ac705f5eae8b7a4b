#!/usr/bin/env bash
# Builds the bench's capture-only sidecar (tools/capture_forwarder.c) into a cache outside the
# clone: /var/cache/istio-ebpf/capture-forwarder-<source hash>/capture_forwarder.
# Idempotent (rebuilt only when missing), flock-guarded, prints the binary's path. Seconds, cold.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=tools/capture_forwarder.c
HASH=$(sha256sum "$SRC" | cut -c1-12)
CACHE=${ISTIO_EBPF_CACHE:-/var/cache/istio-ebpf}
DIR="$CACHE/capture-forwarder-$HASH"
BIN="$DIR/capture_forwarder"
mkdir -p "$CACHE"
chmod 755 "$CACHE"
exec 9>"$CACHE/.capture-forwarder.lock"
flock 9
if [ ! -x "$BIN" ]; then
  command -v gcc >/dev/null || { echo "build-forwarder: gcc missing (scripts/setup.sh installs it)" >&2; exit 2; }
  mkdir -p "$DIR"
  gcc -O2 -Wall -Wextra -Werror -o "$BIN.tmp" "$SRC"
  chmod 755 "$DIR" "$BIN.tmp"      # the forwarder runs as UID 1337
  mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
