#!/usr/bin/env bash
# Real Kubernetes 1.20.2 control plane + kubelet, built from Debian bookworm's source package
# `kubernetes` (1.20.5+really1.20.2: the full tree with vendor/) with Debian's golang-go, offline.
# Cached outside the clone, keyed by version; idempotent, guarded by flock, rebuilt when missing.
# Prints the directory holding the binaries:
#   scripts/build-kubernetes.sh   -> /var/cache/istio-ebpf/kubernetes-1.20.2/bin
#     (kube-apiserver kube-controller-manager kube-scheduler kubelet)
# etcd is Debian's etcd-server (installed here, never started as a service).
set -euo pipefail
VERSION=1.20.2
ROOT=${ISTIO_EBPF_CACHE:-/var/cache/istio-ebpf}/kubernetes-$VERSION
BIN=$ROOT/bin
TARGETS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
APT_PACKAGES=(rsync etcd-server golang-go dpkg-dev make ca-certificates)

complete() {
  local t
  for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
  command -v etcd >/dev/null
}

if complete; then echo "$BIN"; exit 0; fi

mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock 9          # another run builds: wait for it, then re-check
if complete; then echo "$BIN"; exit 0; fi

bash "$(dirname "$0")/apt-ensure.sh" "${APT_PACKAGES[@]}"

# Source: a private apt configuration holding only a deb-src line; the host's sources stay untouched.
SRC=$ROOT/src
if [ ! -f "$SRC/.unpacked" ]; then
  apt_dir=$ROOT/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb-src http://deb.debian.org/debian bookworm main" >"$apt_dir/sources.list"
  private=(-o Dir::Etc::sourcelist="$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
           -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache"
           -o APT::Get::List-Cleanup=0)
  apt-get "${private[@]}" update -q >&2
  rm -rf "$SRC" "$ROOT/fetch" && mkdir -p "$ROOT/fetch"
  (cd "$ROOT/fetch" && apt-get "${private[@]}" source -q --download-only kubernetes >&2 \
     && dpkg-source -x --no-check --no-copy kubernetes_*.dsc "$SRC.tmp" >&2)
  rm -rf "$ROOT/fetch"
  mv "$SRC.tmp" "$SRC"
  touch "$SRC/.unpacked"
fi

# Build: one make for all four binaries (shared package compilation), in a GOPATH layout.
export GOPATH=$SRC/.go GOCACHE=$ROOT/gocache GOFLAGS=-mod=vendor
export CGO_ENABLED=0 GOPROXY=off GO111MODULE=on KUBE_BUILD_PLATFORMS=linux/amd64
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn ../../.. "$GOPATH/src/k8s.io/kubernetes"
whats=()
for t in "${TARGETS[@]}"; do whats+=("cmd/$t"); done
start=$(date +%s)
(cd "$GOPATH/src/k8s.io/kubernetes" && make WHAT="${whats[*]}" >&2)
mkdir -p "$BIN.tmp"
for t in "${TARGETS[@]}"; do
  install -m 0755 "$SRC/_output/local/bin/linux/amd64/$t" "$BIN.tmp/$t"
done
"$BIN.tmp/kube-apiserver" --version >&2
rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"     # appears whole or not at all
echo "build-kubernetes: built in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
