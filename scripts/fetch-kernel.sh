#!/usr/bin/env bash
# A Debian kernel (image + headers) extracted into a cache outside the clone, ready for virtme-ng.
#   scripts/fetch-kernel.sh bullseye|bookworm|trixie   -> prints the cache directory
#   /var/cache/istio-ebpf/kernels/<release>/
#     vmlinuz                     the kernel image (-> modules/boot/vmlinuz-<rel>: give virtme-ng this path)
#     modules/lib/modules/<rel>/  module tree with modules.dep (depmod -b), build -> headers
#     root/                       everything the packages hold (dpkg -x), headers under usr/src
#     release                     the release string (uname -r inside the guest)
# apt runs with a private sources list and private state: the host's apt set-up is never touched.
# The newest amd64 (not cloud/rt) kernel of the suite is taken unless ISTIO_EBPF_KERNEL_RELEASE
# names one (e.g. 5.10.0-32-amd64).
set -euo pipefail
command -v depmod >/dev/null || { echo "fetch-kernel: depmod missing (install kmod; scripts/fetch-virtme.sh does)" >&2; exit 1; }
suite=${1:?usage: fetch-kernel.sh bullseye|bookworm|trixie}
BASE=${ISTIO_EBPF_CACHE:-/var/cache/istio-ebpf}/kernels
mkdir -p "$BASE"
exec 9>"$BASE/.lock"
flock 9   # one fetch at a time: two helpers may ask for the same kernel

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
mirror=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
case "$suite" in
  bullseye) lines=("$mirror bullseye main"); series='5\.10\.0-[0-9]+' ;;
  bookworm) lines=("$mirror bookworm main" "$mirror-security bookworm-security main"); series='6\.1\.0-[0-9]+' ;;
  trixie)   lines=("$mirror trixie main" "$mirror-security trixie-security main"); series='6\.12\.[0-9]+\+deb13[.0-9]*' ;;
  *) echo "fetch-kernel: unknown suite '$suite' (bullseye, bookworm, trixie)" >&2; exit 2 ;;
esac

# Fast path: a complete cache for this suite (the suite's link points at a finished release).
if [ -z "${ISTIO_EBPF_KERNEL_RELEASE:-}" ] && [ -f "$BASE/$suite/release" ] && [ -z "${ISTIO_EBPF_KERNEL_REFRESH:-}" ]; then
  readlink -f "$BASE/$suite"; exit 0
fi

apt_dir="$BASE/.apt-$suite"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
: > "$apt_dir/sources.list"
for l in "${lines[@]}"; do echo "deb [signed-by=$keyring] $l" >> "$apt_dir/sources.list"; done
apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt_dir/lists"
          -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1 -q)
apt-get "${apt_opts[@]}" update >&2

if [ -n "${ISTIO_EBPF_KERNEL_RELEASE:-}" ]; then
  rel=$ISTIO_EBPF_KERNEL_RELEASE
else
  rel=$(apt-cache "${apt_opts[@]}" pkgnames linux-image- | grep -E "^linux-image-${series}-amd64-unsigned$" \
        | sed -e 's/^linux-image-//' -e 's/-unsigned$//' | sort -V | tail -n1)
fi
[ -n "$rel" ] || { echo "fetch-kernel: no amd64 kernel found in $suite" >&2; exit 1; }
dest="$BASE/$rel"
if [ ! -f "$dest/release" ]; then
  flavour_less=${rel%-amd64}
  work=$(mktemp -d "$BASE/.work-XXXXXX")
  trap 'rm -rf "$work"' EXIT
  chmod 0755 "$work"   # apt downloads as _apt
  (cd "$work" && apt-get "${apt_opts[@]}" download "linux-image-$rel-unsigned" "linux-headers-$rel" \
      "linux-headers-$flavour_less-common") >&2
  mkdir -p "$work/out/root"
  for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/out/root"; done
  # trixie moved modules to /usr/lib/modules
  mods=$(ls -d "$work/out/root/lib/modules/$rel" "$work/out/root/usr/lib/modules/$rel" 2>/dev/null | head -n1 || true)
  [ -n "$mods" ] || { echo "fetch-kernel: no module tree in the $rel package" >&2; exit 1; }
  mkdir -p "$work/out/modules/lib/modules"
  mv "$mods" "$work/out/modules/lib/modules/$rel"
  depmod -b "$work/out/modules" "$rel"
  # BCC compiles against <modules>/build: the extracted headers (the package's own link is absolute).
  # Relative links: the guest sees this directory under another path (virtme-ng hides /var/cache).
  ln -sfn "../../../../root/usr/src/linux-headers-$rel" "$work/out/modules/lib/modules/$rel/build"
  ln -sfn "../../../../root/usr/src/linux-headers-$flavour_less-common" "$work/out/modules/lib/modules/$rel/source"
  # virtme-ng finds the module tree from the image's path (<root>/boot/vmlinuz-<rel> -> <root>/lib/modules)
  mkdir -p "$work/out/modules/boot"
  mv "$work/out/root/boot/vmlinuz-$rel" "$work/out/modules/boot/"
  ln -s "modules/boot/vmlinuz-$rel" "$work/out/vmlinuz"
  echo "$rel" > "$work/out/release"
  rm -rf "$dest" && mv "$work/out" "$dest"   # appears whole or not at all
fi
ln -sfn "$rel" "$BASE/$suite"
echo "$dest"
