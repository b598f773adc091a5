#!/bin/bash
# One prepared start-up check on an NVIDIA GPU host (the `device` tool's machine), for the
# start-up issue: a Llama-3.1-8B-shaped bf16 checkpoint (SmolLM2's vocabulary, random values)
# generated there, then
#   1. benches/weight_placement.sh: `cat` read rate vs weight placement, and --load-format dummy;
#   2. `tpuserve serve` with the issue's flags, cold compile cache then warm: time to ready and
#      the start-up log's phases, and one completion.
# Expects in $1 (default .gpu): tpuserve (a stripped release build) and tokenizer/.
set -u
G=${1:-.gpu}
BIN=$(realpath "$G/tpuserve")
DIR=/tmp/m8b
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc; free -g | head -2
python3 -c "import jax_plugins.xla_cuda13 as p, os; print('cuda plugin', os.path.dirname(p.__file__))"
t0=$(date +%s.%N)
python3 benches/gen_checkpoint.py "$DIR" --tokenizer-from "$G/tokenizer" \
  --layers 32 --hidden 4096 --inter 14336 --heads 32 --kv-heads 8
echo "generated in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
echo "== placement vs read rate"
TPUSERVE_BIN=$BIN TPUSERVE_BENCH_MODEL_DIR=$DIR timeout 200 benches/weight_placement.sh --device cuda --shape 8b
echo "== serve, the issue's flags"
export VLLM_XLA_CACHE_PATH=/tmp/xla-cache
for run in cold warm; do
  t0=$(date +%s.%N)
  "$BIN" serve "$DIR" --device cuda --dtype bfloat16 --served-model-name m --max-model-len 2048 \
    --max-num-seqs 128 --max-num-batched-tokens 512 --gpu-memory-utilization 0.6 \
    --port 8000 > "/tmp/serve-$run.log" 2>&1 &
  pid=$!
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=1)" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "server died"; tail -30 "/tmp/serve-$run.log"; break; }
    sleep 0.2
  done
  echo "$run: start to ready $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s"
  python3 -c "import urllib.request as u, json; r = json.loads(u.urlopen(u.Request('http://127.0.0.1:8000/v1/completions', data=b'{\"model\":\"m\",\"prompt\":\"Hello\",\"max_tokens\":8,\"ignore_eos\":true}', headers={'Content-Type': 'application/json'})).read()); print('completion tokens', r['usage']['completion_tokens'])"
  kill -TERM $pid; wait $pid
  grep -E "weights \(|KV cache:|programs ready|ready on|ERROR|WARN" "/tmp/serve-$run.log" | cut -c 1-400
done
