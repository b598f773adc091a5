"""The artifacts: deterministic, of the shapes asked for, and accepted by the TPU compiler."""

import json
import os
import pathlib
import re
import subprocess
import sys

from tpuserve_kernels import lower

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Llama 3.1 70B at TP 8 (one KV head and 8 query heads a chip), a 512-token prompt chunk in
# tiles of 16 rows, the KV cache `tpuserve plan` sizes for v6e-8 (15,078 blocks × 80 layers).
SHAPE_70B = dict(tiles=32, kv_heads=1, rows=16, group=8, head_dim=128, page_size=16,
                 pages=15078 * 80, table_pages=256, chunk_pages=16, dtype="bfloat16")
# The same model's decode bucket: 128 tiles of one row.
SHAPE_70B_DECODE = dict(SHAPE_70B, tiles=128, rows=1)
# `--kv-cache-dtype fp8` (e4m3): fp8 pages, bf16 queries.
SHAPE_70B_FP8 = dict(SHAPE_70B_DECODE, cache_dtype="float8_e4m3fn")


def test_lowering_is_deterministic_and_of_the_shapes_asked_for(tmp_path):
    a = lower.artifact(SHAPE_70B)
    b = lower.artifact(dict(SHAPE_70B))
    assert a == b
    m = a["module"]
    assert m.count("stablehlo.custom_call @tpu_custom_call") == 1
    main = re.search(r"func\.func public @main\((.*?)\) -> \((.*?)\)", m)
    assert main, m[:2000]
    operands = re.findall(r"tensor<[^>]*>", main.group(1))
    assert operands == [
        "tensor<32x1x128x128xbf16>",
        "tensor<1206240x1x16x128xbf16>",
        "tensor<1206240x1x16x128xbf16>",
        "tensor<32x256xi32>",
        "tensor<32xi32>",
        "tensor<32x128x1xi32>",
    ]
    assert re.findall(r"tensor<[^>]*>", main.group(2)) == ["tensor<32x1x128x128xbf16>"]
    # The CLI writes the same artifact.
    out = tmp_path / "a.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SHAPE_70B.items()]
    subprocess.run([sys.executable, "-m", "tpuserve_kernels", "paged-attention", *args,
                    f"--out={out}"], check=True, cwd=ROOT / "kernels")
    assert json.loads(out.read_text()) == json.loads(json.dumps(a))


def test_an_artifact_does_not_depend_on_where_the_tool_is_checked_out(tmp_path):
    """The same shape lowered from a copy of the package elsewhere: the same bytes (the
    kernel's source path is not in the Mosaic body)."""
    import shutil
    copy = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "kernels" / "tpuserve_kernels", copy / "tpuserve_kernels")
    code = ("import json, sys; from tpuserve_kernels import lower; "
            f"print(lower.artifact(json.loads(sys.argv[1]))['module_sha256'])")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(SHAPE_70B_DECODE)],
                       cwd=copy, capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONPATH=str(copy)))
    assert r.stdout.strip() == lower.artifact(SHAPE_70B_DECODE)["module_sha256"]


def test_an_fp8_cache_is_an_operand_type_and_part_of_the_name(tmp_path):
    a = lower.artifact(SHAPE_70B_FP8)
    main = re.search(r"func\.func public @main\((.*?)\) -> \((.*?)\)", a["module"])
    operands = re.findall(r"tensor<[^>]*>", main.group(1))
    assert operands[:3] == ["tensor<128x1x8x128xbf16>", "tensor<1206240x1x16x128xf8E4M3FN>",
                            "tensor<1206240x1x16x128xf8E4M3FN>"], operands
    assert lower.file_name(SHAPE_70B_FP8).endswith("-bfloat16-kvfloat8_e4m3fn.json")
    assert lower.file_name(SHAPE_70B_DECODE).endswith("-c16-bfloat16.json")
    assert lower.check_shape(SHAPE_70B_FP8) is None
    assert "cache_dtype" in lower.check_shape(dict(SHAPE_70B, cache_dtype="int4"))
    out = tmp_path / "a.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SHAPE_70B_FP8.items()]
    subprocess.run([sys.executable, "-m", "tpuserve_kernels", "paged-attention", *args,
                    f"--out={out}"], check=True, cwd=ROOT / "kernels")
    assert json.loads(out.read_text()) == json.loads(json.dumps(a))


def compile_tpu():
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    exe = pathlib.Path(target) / "release" / "examples" / "compile_tpu"
    assert exe.is_file(), (
        f"{exe} missing: build it with `cargo build --release --examples` "
        "(scripts/test.sh builds every target first)")
    return exe


def test_the_tpu_compiler_accepts_the_kernel_for_v6e(tmp_path):
    """libtpu (the main venv's pin) compiles both buckets' kernels for a v6e:2x4 topology,
    deviceless: inside a network namespace with no interfaces, the metadata query off."""
    env = dict(os.environ, TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v6e-8",
               TPU_WORKER_ID="0", TPU_WORKER_HOSTNAMES="localhost", TPU_HOST_BOUNDS="1,1,1",
               TPU_CHIPS_PER_HOST_BOUNDS="2,4,1")
    for name, shape in (("prefill", SHAPE_70B), ("decode", SHAPE_70B_DECODE),
                        ("decode-fp8", SHAPE_70B_FP8)):
        path = tmp_path / f"{name}.mlir"
        path.write_text(lower.artifact(shape)["module"])
        r = subprocess.run(["unshare", "-n", str(compile_tpu()), "v6e:2x4", str(path)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        assert "compiled for v6e:2x4" in r.stdout, r.stdout
