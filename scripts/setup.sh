#!/usr/bin/env bash
# One idempotent set-up used by `make`, CI and the Containerfile alike.
#   scripts/setup.sh            system packages + .venv + project
#   SKIP_APT=1 scripts/setup.sh  no apt (packages already there)
#   scripts/setup.sh apt / python  one step each (development and test machine)
#   scripts/setup.sh image-apt / image-python  the agent image (Containerfile): runtime packages,
#                               UAPI headers under /opt/istio-ebpf, the package without any extra
# Then, at run time (not in the image): scripts/setup.sh host  -> bpffs mounted, kernel headers linked.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# What the agent needs on a node (the image holds exactly these).
RUNTIME_PACKAGES=(python3-bpfcc libbpf1 python3-venv ca-certificates util-linux)
# Development, tests, benchmarks and image building, on top of the runtime.
APT_PACKAGES=("${RUNTIME_PACKAGES[@]}" bpfcc-tools bpftool linux-headers-amd64 iptables iproute2 procps
              conntrack python3-dev wrk hey iperf3 golang-go make gcc libc6-dev debootstrap buildah podman)
IMAGE_HEADERS=/opt/istio-ebpf/kernel-headers

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

image_headers() {
  # Debian's headers package depends on gcc and kbuild; the agent only needs the header files.
  # Both halves (-amd64 links into -common) go into one tree, usable as BCC_KERNEL_SOURCE.
  local tmp pkg
  tmp=$(mktemp -d) && chmod 755 "$tmp"   # apt downloads as user _apt
  pkg=$(apt-cache depends linux-headers-amd64 | awk '/Depends:/ {print $2; exit}')
  (cd "$tmp" && apt-get download -q "${pkg%-amd64}-common" "$pkg")
  mkdir -p "$IMAGE_HEADERS"
  for part in "${pkg%-amd64}-common" "$pkg"; do
    dpkg-deb --fsys-tarfile "$tmp/${part}"_*.deb | tar -x -C "$tmp" "./usr/src/$part"
    cp -a "$tmp/usr/src/$part/." "$IMAGE_HEADERS/"
  done
  rm -rf "$tmp" "$IMAGE_HEADERS/scripts" "$IMAGE_HEADERS/tools"
  find "$IMAGE_HEADERS/arch" -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} +
  echo "$pkg" > "$IMAGE_HEADERS/PACKAGE"
}

image_python() {
  # The package as users install it: no editable checkout, no test/bench/sidecar extras.
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q --no-cache-dir .
  rm -rf build ./*.egg-info
  "$VENV/bin/python" -c "import bcc, sys; assert 'dist-packages' in bcc.__file__, bcc.__file__"
}

python_env() {
  # BCC is Debian's python3-bpfcc: the venv must see the system site-packages.
  # Never `pip install bcc` (an unrelated PyPI project).
  if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  local stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[sidecar,test,bench]"
    touch "$stamp"
  fi
  "$VENV/bin/python" -c "import bcc, sys; assert 'dist-packages' in bcc.__file__, bcc.__file__" \
    || { echo "setup: 'import bcc' does not resolve to Debian's python3-bpfcc" >&2; exit 1; }
}

host_runtime() {
  # bpffs for pinned programs and maps. Check the file system type, not `mountpoint`: in the
  # DaemonSet's init container /sys/fs/bpf is kubelet's bind mount of the host directory, a
  # mount point whether or not bpffs is mounted on the host.
  local bpffs=${BPFFS:-/sys/fs/bpf}
  if [ "$(stat -f -c %T "$bpffs" 2>/dev/null)" != bpf_fs ]; then
    mkdir -p "$bpffs" && mount -t bpf bpf "$bpffs"
    echo "setup: mounted bpffs at $bpffs"
  fi
  # BCC compiles against /lib/modules/$(uname -r)/build. When the running kernel has no
  # header package (true on this VM), link the newest installed Debian headers: the
  # programs use only UAPI definitions, which are stable across these versions.
  local k; k=$(uname -r)
  if [ ! -e "/lib/modules/$k/build/include" ]; then
    local hdr common
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$hdr" ] && [ -d "$IMAGE_HEADERS/include" ]; then
      echo "setup: no kernel headers in /usr/src: the agent uses the image's $IMAGE_HEADERS"; return 0
    fi
    if [ -z "$hdr" ]; then
      echo "setup: no kernel headers in /usr/src (install linux-headers-amd64)" >&2; exit 1
    fi
    mkdir -p "/lib/modules/$k"
    ln -sfn "$hdr" "/lib/modules/$k/build"
    [ -n "$common" ] && ln -sfn "$common" "/lib/modules/$k/source"
    echo "setup: linked /lib/modules/$k/build -> $hdr"
  fi
}

case "${1:-all}" in
  all)    [ "${SKIP_APT:-0}" = 1 ] || apt_install "${APT_PACKAGES[@]}"; python_env; host_runtime ;;
  apt)    apt_install "${APT_PACKAGES[@]}" ;;
  python) python_env ;;
  host)   host_runtime ;;
  image-apt)    apt_install "${RUNTIME_PACKAGES[@]}"; image_headers ;;   # the image's system layer
  image-python) image_python ;;                                           # the image's Python layer
  *) echo "usage: $0 [all|apt|python|host|image-apt|image-python]" >&2; exit 2 ;;
esac
