"""The runner's step programs with the kernel spliced in, compiled for v6e by libtpu without a
TPU (`tpuserve plan --cost --attention-backend pallas`, which runs libtpu inside `unshare -n`
with the metadata query off): tiny-llama3 at TP 1 and 8, Llama 3.1 70B at TP 8. Every bucket
compiles with the Mosaic call on each chip's shard, and fits."""

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
# tiny-llama3's head_dim of 8 pads every page to the TPU's 128 lanes, and the compiler copies
# the whole cache into that layout for the call: a small cache, so that it fits (serve keeps
# the StableHLO attention for such a model on TPU).
TINY = ["--model", str(SHARED / "fixtures/tiny-llama3/model"), "--max-model-len", "512",
        "--gpu-memory-utilization", "0.05"]
# 64 sequences: decode buckets go up to --max-num-seqs, here the whole small token budget.
L70B = ["--model", str(SHARED / "fixtures/configs/llama-3.1-70b.config.json"),
        "--max-model-len", "4096", "--max-num-seqs", "64"]
SMALL_STEPS = ["--max-num-batched-tokens", "64", "--max-logprobs", "0"]


def tpuserve():
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    exe = pathlib.Path(target) / "release" / "tpuserve"
    assert exe.is_file(), f"{exe} missing: cargo build --release (scripts/test.sh builds it)"
    return exe


@pytest.mark.parametrize("name,model,tp", [("tiny", TINY, 1), ("tiny", TINY, 8),
                                          ("70b", L70B, 8),
                                          ("70b-fp8", [*L70B, "--kv-cache-dtype", "fp8"], 8)])
def test_spliced_step_programs_compile_for_v6e(tmp_path, name, model, tp):
    args = [*model, "--tensor-parallel-size", str(tp), *SMALL_STEPS]
    env = dict(os.environ, TPUSERVE_BIN=str(tpuserve()))
    out = tmp_path / "kernels"
    subprocess.run([str(ROOT / "scripts/attention-kernels.sh"), "--out", str(out), *args],
                   env=env, check=True, capture_output=True, timeout=600)
    shapes = sorted(out.glob("paged_attention-*.json"))
    # Decode and prompt tiles of 16 to 64 rows: six shapes.
    assert len(shapes) == 6, shapes
    # An fp8 cache is part of every shape: fp8 pages, bf16 queries.
    assert all(p.name.endswith("-kvfloat8_e4m3fn.json") == (name == "70b-fp8") for p in shapes)
    r = subprocess.run([str(tpuserve()), "plan", *args, "--cost", "--no-step-model",
                        "--attention-backend", "pallas", "--attention-kernels", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"attention: the Pallas kernel (6 artifacts from {out})" in r.stdout, r.stdout
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+0\s+[\d.]+", r.stdout, re.M)
    assert sorted(rows) == sorted((str(t), str(tile)) for t in (16, 32, 64) for tile in (1, 16)), r.stdout
    assert "fits: yes" in r.stdout, r.stdout
    temps = float(re.search(r"largest temporaries ([\d.]+) GB", r.stdout).group(1))
    padded = "head_dim 8 is not a multiple of the TPU's 128 lanes" in r.stdout
    assert padded == (name == "tiny"), r.stdout
    if name.startswith("70b"):
        # head_dim 128: the call reads the cache in place, no copy of it.
        assert temps < 0.1, r.stdout
