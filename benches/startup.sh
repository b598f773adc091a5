#!/usr/bin/env bash
# Start-up to the first successful completion: `--device cpu`, then `--device xla-cpu` cold
# (empty VLLM_XLA_CACHE_PATH: every program compiled) and warm (the same cache, filled by the
# cold start: every program loaded). A benchmark: run on a quiet machine, compare ratios.
# usage: benches/startup.sh [MODEL] [extra serve flags...]
set -euo pipefail
BIN=${TPUSERVE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tpuserve/target}/release/tpuserve}
MODEL=${1:-}
[ $# -gt 0 ] && shift
CACHE=$(mktemp -d /tmp/tpuserve-startup-cache.XXXXXX)
trap 'rm -rf "$CACHE"' EXIT

first_completion() {  # label, serve args...
  local label=$1; shift
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local t0 log=/tmp/tpuserve-startup.$$.log
  t0=$(date +%s.%N)
  VLLM_XLA_CACHE_PATH=$CACHE "$BIN" serve ${MODEL:+"$MODEL"} --host 127.0.0.1 --port "$port" \
    --served-model-name m --max-model-len 1024 "$@" > "$log" 2>&1 &
  local pid=$!
  until curl -sf -o /dev/null "http://127.0.0.1:$port/v1/completions" \
      -H 'Content-Type: application/json' -d '{"model":"m","prompt":"Hello","max_tokens":1}'; do
    kill -0 $pid 2>/dev/null || { echo "$label: server exited"; tail -5 "$log"; return 1; }
    sleep 0.05
  done
  local t1
  t1=$(date +%s.%N)
  local rss
  rss=$(awk '/VmRSS/{print int($2/1024)}' /proc/$pid/status)
  kill -TERM $pid; wait $pid || true
  printf '%-22s %7.2f s to first completion, RSS %s MiB  (%s)\n' "$label" \
    "$(echo "$t1 - $t0" | bc)" "$rss" "$(grep -o '[0-9]* programs[^,]*' "$log" | head -1)"
  rm -f "$log"
}

first_completion "cpu" --device cpu "$@"
first_completion "xla-cpu cold cache" --device xla-cpu "$@"
first_completion "xla-cpu warm cache" --device xla-cpu "$@"
