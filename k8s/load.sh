#!/usr/bin/env bash
# Load for the HPA demo, as in the GKE tutorial's load.sh: PARALLEL_PROCESSES workers, each in a
# loop sending one completion request at a time to vllm-service, so at most PARALLEL_PROCESSES
# requests are in flight. With more workers than --max-num-seqs, requests queue and
# vllm:num_requests_waiting (the HPA's metric) rises.
#
#   PARALLEL_PROCESSES=64 ./k8s/load.sh                      # the Service's external IP, until ^C
#   VLLM_SERVICE=127.0.0.1 MODEL=SmolLM2-135M-Instruct DURATION=20 ./k8s/load.sh
#
# Settings (environment): VLLM_SERVICE (default: the LoadBalancer IP of vllm-service, from
# kubectl), PORT (8000), MODEL (meta-llama/Llama-3.1-70B), PROMPT, MAX_TOKENS (100),
# DURATION (seconds; 0 = until interrupted), REQUEST_TIMEOUT (seconds per request, 300).
# Prints one line per request: HTTP status and seconds; a summary at the end.
set -euo pipefail

N=${PARALLEL_PROCESSES:-8}
PORT=${PORT:-8000}
MODEL=${MODEL:-meta-llama/Llama-3.1-70B}
PROMPT=${PROMPT:-Write a story about san francisco}
MAX_TOKENS=${MAX_TOKENS:-100}
DURATION=${DURATION:-0}
REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-300}

if [ -z "${VLLM_SERVICE:-}" ]; then
    VLLM_SERVICE=$(kubectl get service vllm-service -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
fi
if [ -z "$VLLM_SERVICE" ]; then
    echo "load.sh: vllm-service has no external IP yet (or set VLLM_SERVICE)" >&2
    exit 1
fi
url="http://$VLLM_SERVICE:$PORT/v1/completions"
body=$(printf '{"model": "%s", "prompt": "%s", "max_tokens": %d, "temperature": 0}' \
    "$MODEL" "$PROMPT" "$MAX_TOKENS")

results=$(mktemp)
cleanup() {
    # Only this script's own workers.
    local pid
    for pid in $(jobs -p); do
        pkill -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    local ok total
    total=$(wc -l <"$results")
    ok=$(grep -c '^200 ' "$results" || true)
    echo "load.sh: $total requests, $ok answered 200, $N workers, target $url" >&2
    rm -f "$results"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

deadline=$((SECONDS + DURATION))
worker() {
    local line
    while [ "$DURATION" -eq 0 ] || [ "$SECONDS" -lt "$deadline" ]; do
        line=$(curl -sS -o /dev/null --max-time "$REQUEST_TIMEOUT" -w '%{http_code} %{time_total}s' \
            -H "Content-Type: application/json" -d "$body" "$url" 2>&1) || line="000 $line"
        echo "$line"
        echo "$line" >>"$results"
    done
}
for _ in $(seq 1 "$N"); do
    worker &
done
wait
