#!/bin/bash
# Peak host RSS of `tpuserve serve --device xla-cpu` at several tensor-parallel sizes: weights
# are sliced per device while loading, so the peak should not grow with N copies of the model.
# Each configuration runs twice with one compile cache; the second (warm) start is reported.
# usage: benches/peak_rss_tp.sh MODEL TP...
set -u
BIN=${TPUSERVE_BIN:-$HOME/.cache/tpuserve/target/release/tpuserve}
MODEL=$1; shift
CACHE=$(mktemp -d)
for tp in "$@"; do
  for run in cold warm; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    VLLM_XLA_CACHE_PATH=$CACHE /usr/bin/time -f "%M" -o /tmp/rss.$$ "$BIN" serve "$MODEL" \
      --device xla-cpu --tensor-parallel-size "$tp" --port "$port" --max-model-len 512 \
      --max-num-batched-tokens 64 --max-num-seqs 8 --kv-cache-space 0.1 > /tmp/serve.$$ 2>&1 &
    pid=$!
    until curl -sf -o /dev/null "localhost:$port/health"; do
      kill -0 $pid 2>/dev/null || { tail -5 /tmp/serve.$$; break; }
      sleep 0.5
    done
    curl -s -o /dev/null "localhost:$port/v1/completions" -H 'Content-Type: application/json' \
      -d '{"prompt":"Hello","max_tokens":4}'
    pkill -TERM -P $pid 2>/dev/null; wait $pid 2>/dev/null
    sleep 0.5
    echo "$(basename "$MODEL") TP=$tp $run: peak RSS $(( $(cat /tmp/rss.$$) / 1024 )) MiB"
  done
done
rm -rf "$CACHE" /tmp/rss.$$ /tmp/serve.$$
