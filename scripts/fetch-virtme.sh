#!/usr/bin/env bash
# virtme-ng (PyPI) in its own venv outside the clone, and the Debian packages it boots kernels with.
#   scripts/fetch-virtme.sh   -> prints the path of `vng`
set -euo pipefail
VERSION=1.42
CACHE=${ISTIO_EBPF_CACHE:-/var/cache/istio-ebpf}/virtme-ng-$VERSION
# qemu runs the guest; kmod gives depmod (host) and modprobe (guest: it sees the host's filesystem);
# busybox-static builds virtme-ng's initramfs.
PACKAGES=(qemu-system-x86 kmod busybox-static)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "fetch-virtme: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
mkdir -p "$(dirname "$CACHE")"
exec 9>"$CACHE.lock"
flock 9
if [ ! -x "$CACHE/bin/vng" ]; then
  rm -rf "$CACHE.tmp"
  /usr/bin/python3 -m venv "$CACHE.tmp"
  "$CACHE.tmp/bin/pip" install -q "virtme-ng==$VERSION" >&2
  rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
  # a venv's scripts name their interpreter by absolute path: re-point them after the move
  sed -i "1s|^#!.*/virtme-ng-$VERSION.tmp/|#!$CACHE/|" "$CACHE"/bin/*
fi
echo "$CACHE/bin/vng"
