#!/usr/bin/env bash
# Does a step cost the whole KV cache? tiny-llama3 on `--device xla-cpu`, one greedy request of
# 9 tokens (median of 5, after a warm-up request), at TP 1 and TP 8 with KV caches 16× apart
# (`--kv-cache-space` 1 and 1/16 GiB): the issue-20 table. With the cache sharded by KV head,
# donated and never copied, the TP-8 times at the two sizes should match.
# usage: benches/kv_size_step.sh   (programs are cached in ~/.cache/tpuserve/bench-xla-cache)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TPUSERVE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tpuserve/target}/release/tpuserve}
MODEL=${TPUSERVE_TINY_LLAMA3:-$ROOT/../shared/fixtures/tiny-llama3/model}
export VLLM_XLA_CACHE_PATH=${VLLM_XLA_CACHE_PATH:-$HOME/.cache/tpuserve/bench-xla-cache}

run() {  # tp, GiB
  local tp=$1 space=$2 port log=/tmp/tpuserve-kvstep.$$.log
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$BIN" serve "$MODEL" --device xla-cpu --tensor-parallel-size "$tp" --kv-cache-space "$space" \
    --max-model-len 512 --max-num-batched-tokens 32 --max-num-seqs 4 --served-model-name m \
    --host 127.0.0.1 --port "$port" > "$log" 2>&1 &
  local pid=$!
  until curl -sf -o /dev/null "http://127.0.0.1:$port/health"; do
    kill -0 $pid 2>/dev/null || { echo "server exited"; tail -20 "$log"; return 1; }
    sleep 0.2
  done
  python3 - "$port" "$tp" "$space" "$(grep -o 'KV cache: [0-9]* blocks' "$log")" <<'PY'
import json, statistics, sys, time, urllib.request
port, tp, space, blocks = sys.argv[1:]
body = json.dumps({"model": "m", "prompt": "The quick brown fox", "max_tokens": 9,
                   "temperature": 0, "ignore_eos": True}).encode()
def once():
    t = time.perf_counter()
    r = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
        data=body, headers={"Content-Type": "application/json"}))
    assert json.loads(r.read())["usage"]["completion_tokens"] == 9
    return time.perf_counter() - t
once()
med = statistics.median(once() for _ in range(5))
print(f"TP {tp}  --kv-cache-space {space:>6} GiB  {blocks:>26}  9 tokens: {med:.3f} s (median of 5)")
PY
  kill -TERM $pid; wait $pid 2>/dev/null || true
  rm -f "$log"
}

run 1 1
run 8 1
run 8 0.0625
