#!/bin/bash
# One prepared check on an NVIDIA GPU host (the `device` tool's machine): SmolLM2 goldens on the
# CUDA PJRT plugin, decode step timings in f32 and bf16, then the HTTP server on `--device cuda`
# with a streaming load at 1, 16 and 64 concurrent clients.
# Expects in $1 (default .gpuB): goldens_xla, step_timing, tpuserve (stripped release builds),
# fixtures/smollm2, and the SmolLM2 GGUF at $SMOL (default /tmp/smol.gguf).
set -u
G=${1:-.gpuB}
SMOL=${SMOL:-/tmp/smol.gguf}
nvidia-smi -L
python3 -c "import jax_plugins.xla_cuda13 as p, os; print('cuda plugin dir', os.path.dirname(p.__file__))"
export TPUSERVE_SMOLLM2_GGUF=$SMOL TPUSERVE_FIXTURES_DIR=$G/fixtures TPUSERVE_TEST_XLA_DEVICE=cuda
echo "== goldens on CUDA"
t0=$(date +%s)
timeout 300 "$G/goldens_xla" smollm2 --test-threads 1 2>&1 | tail -25
echo "goldens took $(( $(date +%s) - t0 )) s"
echo "== decode step timings"
for dt in float32 bfloat16; do
  for s in 1 16 64; do
    echo "dtype $dt seqs $s"
    TPUSERVE_DEVICE=cuda TPUSERVE_DTYPE=$dt timeout 120 "$G/step_timing" "$SMOL" 1 "$s" 2>&1 | grep -v INFO | tail -4
  done
done
echo "== server on --device cuda (bf16)"
export VLLM_XLA_CACHE_PATH=/tmp/xla-cache
for run in cold warm; do
  t0=$(date +%s.%N)
  "$G/tpuserve" serve "$SMOL" --device cuda --dtype bfloat16 --served-model-name smol \
    --max-num-seqs 64 --max-num-batched-tokens 512 --port 8000 > "/tmp/serve-$run.log" 2>&1 &
  pid=$!
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=1)" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "server died"; tail -30 "/tmp/serve-$run.log"; break; }
    sleep 0.2
  done
  echo "$run start to ready: $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s"
  if [ "$run" = warm ]; then
    python3 -c "import urllib.request as u; print(u.urlopen(u.Request('http://127.0.0.1:8000/v1/completions', data=b'{\"model\":\"smol\",\"prompt\":\"The capital of France is\",\"max_tokens\":12,\"temperature\":0}', headers={'Content-Type': 'application/json'})).read().decode())"
    echo
    for c in 1 16 64; do python3 benches/stream_load.py http://127.0.0.1:8000 smol $c 3 64; done
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/metrics').read().decode())" | grep -E '^(tpuserve|vllm:generation_tokens_total)' | head -20
  fi
  kill -TERM $pid; wait $pid
  grep -E "compil|ready|ERROR|WARN" "/tmp/serve-$run.log" | tail -8
done
