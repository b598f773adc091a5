#!/usr/bin/env bash
# The Pallas attention kernel's artifacts the TPU image ships, one folder per configuration:
#   docker/build-attention-kernels.sh OUT
# Each docker/attention-kernels/NAME/ holds the model's config.json and `flags`: the `serve`
# flags, one a line, that decide the kernel's shapes (tensor parallelism, step sizes, and a
# pinned KV block count: the cache's page count is part of every shape, and a server sizing
# its cache from device memory could land on another). The manifest that serves NAME passes
# the same flags with --attention-backend=pallas --attention-kernels=/opt/tpuserve/kernels/NAME
# (k8s/overlays/tpu-v6e-8-pallas; tests/python/test_deploy.py checks they agree).
# docker/Dockerfile runs this in its attention-kernels stage; kernels/tests runs it in CI.
# Needs TPUSERVE_BIN (or tpuserve on PATH) and the kernels venv (TPUSERVE_KERNELS_VENV).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 OUT" >&2; exit 2; }
out="$1"
mkdir -p "$out"
for dir in "$here"/attention-kernels/*/; do
  name="$(basename "$dir")"
  mapfile -t flags < <(grep -v '^[[:space:]]*\(#\|$\)' "$dir/flags")
  "$here/../scripts/attention-kernels.sh" --out "$out/$name" \
    --model "$dir/config.json" "${flags[@]}"
  echo "$name: $(find "$out/$name" -name 'paged_attention-*.json' | wc -l) kernel artifacts"
done
