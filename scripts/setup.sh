#!/usr/bin/env bash
# One idempotent set-up used by `make`, CI and the Containerfile alike.
#   scripts/setup.sh            system packages + .venv + project
#   SKIP_APT=1 scripts/setup.sh  no apt (packages already there)
#   scripts/setup.sh apt / python  one step each (the Containerfile: apt layer, then the Python layer)
# Then, at run time (not in the image): scripts/setup.sh host  -> bpffs mounted, kernel headers linked.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

APT_PACKAGES=(python3-bpfcc bpfcc-tools bpftool libbpf1 linux-headers-amd64 iptables iproute2 procps util-linux
              python3-venv python3-dev wrk hey iperf3 golang-go make ca-certificates gcc libc6-dev)

apt_install() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
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
  all)    [ "${SKIP_APT:-0}" = 1 ] || apt_install; python_env; host_runtime ;;
  apt)    apt_install ;;      # the image: system packages in their own layer
  python) python_env ;;
  host)   host_runtime ;;
  *) echo "usage: $0 [all|apt|python|host]" >&2; exit 2 ;;
esac
