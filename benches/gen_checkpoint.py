#!/usr/bin/env python3
"""Writes a Llama-shaped Hugging Face folder with a bf16 `model.safetensors` of random values
(every value in ±[2^-7, 2^-6): finite, small), for start-up benchmarks at real sizes without
downloading a model. Standard library only (runs where numpy is absent).

usage: gen_checkpoint.py OUT_DIR --tokenizer-from DIR [--layers 16 --hidden 2048 --inter 8192
       --heads 32 --kv-heads 8 --vocab 49152]
The tokenizer folder's tokenizer.json / tokenizer_config.json are copied (its vocabulary must
fit --vocab)."""
import argparse
import json
import os
import shutil
import struct

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--tokenizer-from", required=True)
p.add_argument("--layers", type=int, default=16)
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--inter", type=int, default=8192)
p.add_argument("--heads", type=int, default=32)
p.add_argument("--kv-heads", type=int, default=8)
p.add_argument("--vocab", type=int, default=49152)
a = p.parse_args()

os.makedirs(a.out, exist_ok=True)
hd = a.hidden // a.heads
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": a.hidden, "intermediate_size": a.inter, "num_hidden_layers": a.layers,
    "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": hd,
    "vocab_size": a.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}
json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=1)
for f in ("tokenizer.json", "tokenizer_config.json"):
    src = os.path.join(a.tokenizer_from, f)
    if os.path.exists(src):
        shutil.copy(src, os.path.join(a.out, f))

tensors = [("model.embed_tokens.weight", [a.vocab, a.hidden]),
           ("lm_head.weight", [a.vocab, a.hidden]),
           ("model.norm.weight", [a.hidden])]
kv = a.kv_heads * hd
for l in range(a.layers):
    pre = f"model.layers.{l}."
    tensors += [(pre + "input_layernorm.weight", [a.hidden]),
                (pre + "post_attention_layernorm.weight", [a.hidden]),
                (pre + "self_attn.q_proj.weight", [a.hidden, a.hidden]),
                (pre + "self_attn.k_proj.weight", [kv, a.hidden]),
                (pre + "self_attn.v_proj.weight", [kv, a.hidden]),
                (pre + "self_attn.o_proj.weight", [a.hidden, a.hidden]),
                (pre + "mlp.gate_proj.weight", [a.inter, a.hidden]),
                (pre + "mlp.up_proj.weight", [a.inter, a.hidden]),
                (pre + "mlp.down_proj.weight", [a.hidden, a.inter])]
header, off = {}, 0
for name, shape in tensors:
    n = 2
    for d in shape:
        n *= d
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
    off += n
head = json.dumps(header).encode()
head += b" " * (-len(head) % 8)

# One 4 MiB block of random bf16: random mantissas, the high byte forced to ±2^-7.
BLOCK = 4 << 20
block = bytearray(os.urandom(BLOCK))
hi = bytes(0xBC if b & 0x80 else 0x3C for b in range(256))
block[1::2] = bytes(block[1::2]).translate(hi)
block = bytes(block)
with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head)
    for i, (name, _) in enumerate(tensors):
        n = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        r = (i * 4099 * 2) % BLOCK  # a different phase per tensor
        view = (block[r:] + block[:r])
        while n > 0:
            k = min(n, BLOCK)
            f.write(view[:k])
            n -= k
print(f"{a.out}: {off / 1e9:.2f} GB of bf16 weights, {off // 2 / 1e9:.2f} B parameters")
