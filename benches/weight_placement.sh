#!/usr/bin/env bash
# Weight placement rate at start-up next to the raw read rate of the same checkpoint.
# Generates a Llama-shaped bf16 safetensors model (benches/gen_checkpoint.py), then for a cold
# page cache (dropped when root may, else both warm — the output says which):
#   read   `cat model.safetensors > /dev/null`
#   serve  `tpuserve serve DIR --dtype bfloat16` until the KV cache is placed; the server's own
#          start-up log line gives the placement time (read + upload + layout) and host RSS
#   dummy  the same with `--load-format dummy` (no checkpoint read)
# usage: benches/weight_placement.sh [--device xla-cpu|cuda|tpu] [--shape 1b|8b] [--tp N]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BIN=${TPUSERVE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tpuserve/target}/release/tpuserve}
DEVICE=xla-cpu SHAPE=1b TP=1
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --shape) SHAPE=$2; shift 2 ;;
    --tp) TP=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case $SHAPE in
  1b) GEN=(--layers 16 --hidden 2048 --inter 8192 --heads 32 --kv-heads 8) ;;
  8b) GEN=(--layers 32 --hidden 4096 --inter 14336 --heads 32 --kv-heads 8) ;;
  *) echo "--shape 1b or 8b" >&2; exit 2 ;;
esac
DIR=${TPUSERVE_BENCH_MODEL_DIR:-$HOME/.cache/tpuserve/bench-model-$SHAPE}
TOK=${TPUSERVE_BENCH_TOKENIZER:-$ROOT/../shared/fixtures/smollm2/tokenizer}
[ -f "$DIR/model.safetensors" ] || python3 "$HERE/gen_checkpoint.py" "$DIR" --tokenizer-from "$TOK" "${GEN[@]}"
FILE=$DIR/model.safetensors
GB=$(python3 -c "import os; print(os.path.getsize('$FILE') / 1e9)")

drop() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then CACHE=cold; else CACHE=warm; cat "$FILE" > /dev/null; fi
}

drop
t0=$(date +%s.%N); cat "$FILE" > /dev/null; t1=$(date +%s.%N)
READ_S=$(python3 -c "print($t1 - $t0)")

place() {  # label, extra serve flags...
  local label=$1; shift
  local log=/tmp/tpuserve-placement.$$.log port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$BIN" serve "$DIR" --device "$DEVICE" --tensor-parallel-size "$TP" --dtype bfloat16 \
    --max-model-len 64 --max-num-batched-tokens 16 --max-num-seqs 4 --kv-cache-space 0.1 \
    --gpu-memory-utilization 0.9 --host 127.0.0.1 --port "$port" "$@" > "$log" 2>&1 &
  local pid=$!
  until grep -q "KV cache:" "$log"; do
    kill -0 $pid 2>/dev/null || { echo "$label: server exited"; tail -20 "$log"; return 1; }
    sleep 0.1
  done
  kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true
  local line
  line=$(grep -o 'on [0-9]* device(s): .*' "$log" | head -1)
  printf '%-8s %s\n' "$label" "$line"
  PLACED_S=$(echo "$line" | sed -n 's/.* placed in \([0-9.]*\)s.*/\1/p')
  rm -f "$log"
}

echo "checkpoint $FILE: $GB GB bf16 ($SHAPE shapes), device $DEVICE, TP $TP, page cache $CACHE"
printf '%-8s %.2f s, %.0f MB/s (cat > /dev/null)\n' read "$READ_S" "$(python3 -c "print($GB * 1e3 / $READ_S)")"
drop
place serve
python3 -c "
r, p = $READ_S, float('${PLACED_S:-nan}')
print(f'placement {$GB * 1e3 / p:.0f} MB/s = {r / p:.2f} x the read rate ({\"$CACHE\"} page cache)')"
place dummy --load-format dummy
