#!/usr/bin/env bash
# The agent image, built on this machine from the project's Containerfile, without any registry:
#   1. Debian bookworm from Debian's archive (debootstrap --variant=minbase), cached as a tarball;
#   2. imported as docker.io/library/debian:bookworm-slim (the Containerfile's FROM) into a PRIVATE
#      container storage under the cache (the host's default storage and config are never used);
#   3. `buildah bud` of the Containerfile (chroot isolation, host network for apt and pip);
#   4. saved as a docker-archive (`ctr -n k8s.io images import FILE` and `podman load` accept it).
#   scripts/build-image.sh   -> prints the archive path as its LAST line:
#                               /var/cache/istio-ebpf/agent-image-<version>-<inputs hash>.tar
#   scripts/build-image.sh --inputs-hash   -> prints only the hash (nothing is built)
# Idempotent: the archive is named after a hash of what goes into the image, so an unchanged tree
# returns at once. Guarded by flock. Environment: ISTIO_EBPF_CACHE (default /var/cache/istio-ebpf);
# DATAPATH_VARIANT=N (N > 0): image B of the upgrade tests, another datapath version from the same
# tree (Containerfile ARG DATAPATH_VARIANT), tagged <version>-variantN.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${ISTIO_EBPF_CACHE:-/var/cache/istio-ebpf}
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' istio_ebpf_plugin/__init__.py)
DATAPATH_VARIANT=${DATAPATH_VARIANT:-0}
SUFFIX=$([ "$DATAPATH_VARIANT" = 0 ] || echo "-variant$DATAPATH_VARIANT")
IMAGE=ghcr.io/istio-ebpf/agent:$VERSION$SUFFIX
BASE_IMAGE=docker.io/library/debian:bookworm-slim

# What the image is made of: the build context .containerignore lets through (README, tests, docs
# and the lab are not in it: changing them must not rebuild the image).
inputs_hash() {
  { printf '%s\n' Containerfile .containerignore pyproject.toml scripts/setup.sh
    find istio_ebpf_plugin hooks bpf manifests -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
      ! -path 'istio_ebpf_plugin/harness/*' ! -path 'istio_ebpf_plugin/bench/*'
  } | LC_ALL=C sort | while read -r f; do [ -f "$f" ] && { echo "$f"; cat "$f"; }; done | sha256sum | cut -c1-12
}
if [ "${1:-}" = --inputs-hash ]; then inputs_hash; exit 0; fi
ARCHIVE=$CACHE/agent-image-$VERSION$SUFFIX-$(inputs_hash).tar
if [ -s "$ARCHIVE" ]; then echo "$ARCHIVE"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/agent-image.lock"
flock 9
if [ -s "$ARCHIVE" ]; then echo "$ARCHIVE"; exit 0; fi   # built by whoever held the lock

for tool in debootstrap buildah podman; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool missing (run: scripts/setup.sh apt)" >&2; exit 2; }
done

# Private storage: CONTAINERS_STORAGE_CONF applies to buildah and podman alike.
STORE=$CACHE/containers
mkdir -p "$STORE"
cat > "$STORE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$STORE/storage"
runroot = "$STORE/run"
EOF
export CONTAINERS_STORAGE_CONF=$STORE/storage.conf

work=$(mktemp -d "$CACHE/build-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. Base root file system (206 MB unpacked; 23 s from Debian's archive).
BASE_TAR=$CACHE/debian-bookworm-minbase.tar
if [ ! -s "$BASE_TAR" ]; then
  echo "build-image: debootstrap --variant=minbase bookworm" >&2
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >&2
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" --numeric-owner -cf "$BASE_TAR.tmp" .
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$work/rootfs"
fi

# 2. The Containerfile's FROM, from that tarball (re-imported when the tarball is newer).
stamp=$STORE/base-image.stamp
if ! podman image exists "$BASE_IMAGE" || [ ! -f "$stamp" ] || [ "$BASE_TAR" -nt "$stamp" ]; then
  podman import --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" >&2
  touch "$stamp"
fi

# 3. Build. pip inside the build needs this machine's CA bundle (TLS to PyPI may be inspected
# here); it is bind-mounted for the RUN steps only and is not part of any layer.
printf '[global]\ncert = /run/istio-ebpf-host-ca.crt\n' > "$work/pip.conf"
buildah bud --isolation chroot --network host --pull=never --layers \
  --build-arg "DATAPATH_VARIANT=$DATAPATH_VARIANT" \
  -v /etc/ssl/certs/ca-certificates.crt:/run/istio-ebpf-host-ca.crt:ro \
  -v "$work/pip.conf:/etc/pip.conf:ro" \
  -t "$IMAGE" -f Containerfile . >&2

# 4. Archive, appearing whole or not at all; keep the three newest, and in the private store only
# the layers the current image uses (earlier builds' images are dangling now).
podman save --format docker-archive -o "$work/image.tar" "$IMAGE" >&2
mv "$work/image.tar" "$ARCHIVE"
podman image prune -f >/dev/null
ls -1t "$CACHE"/agent-image-*.tar | tail -n +4 | xargs -r rm -f
echo "build-image: $IMAGE, $(du -m "$ARCHIVE" | cut -f1) MiB archive" >&2
echo "$ARCHIVE"
