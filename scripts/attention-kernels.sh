#!/usr/bin/env bash
# Writes the Pallas paged-attention kernel's artifacts for one serving configuration:
#   scripts/attention-kernels.sh --out DIR <tpuserve plan flags: --model, --tensor-parallel-size, …>
# `tpuserve plan --attention-shapes` lists the kernel shapes that configuration compiles (one
# per bucket); the kernels tool (its own venv, JAX on the CPU, made by
# `scripts/setup.sh --test`) lowers each for a TPU into DIR, where `serve
# --attention-kernels DIR` and `plan --cost --attention-backend pallas` look for them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/env.sh"
out=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
[ -n "$out" ] || { echo "usage: $0 --out DIR <tpuserve plan flags>" >&2; exit 2; }
[ -x "$KERNELS_PY" ] || { echo "no kernels venv at $KERNELS_VENV: run scripts/setup.sh --test" >&2; exit 1; }
bin="${TPUSERVE_BIN:-$(command -v tpuserve || true)}"
[ -n "$bin" ] || { echo "no tpuserve binary: set TPUSERVE_BIN or put tpuserve on PATH" >&2; exit 1; }
shapes="$(mktemp)"
trap 'rm -f "$shapes"' EXIT
"$bin" plan "${args[@]}" --attention-shapes > "$shapes"
cd "$here/../kernels"
"$KERNELS_PY" -m tpuserve_kernels paged-attention --shapes "$shapes" --out-dir "$out"
