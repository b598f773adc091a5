#!/usr/bin/env python3
"""Can a collective matmul hide a prompt chunk's all-gather at TP 8 on v6e? The TPU compiler's
own answer, deviceless (issue 20).

Four programs, one matmul of Llama 3.1 70B's gate projection on 8 chips (x: 512 rows, split
by rows as the sequence-parallel step has them; w: [8192, 28672], split by columns), compiled
for v6e:2x4 by libtpu without a TPU (`compile_tpu --spmd 8`, inside `unshare -n` as `tpuserve
plan --cost` runs it):

  ag          GSPMD's own: all-gather x, then the dot
  ring        written by hand: each chip's 64-row shard goes round the ring by
              collective_permute, eight 64-row dots, each beside the next shard's transfer
  ag-loop     `ag` inside a 4-iteration loop over stacked weights (as the step's layer loop)
  ring-loop   `ring` likewise

For each: the code generator's cycles (all kernels; loops × trip count), launches, and the
collectives in the optimized module (`collective-permute-start`: an asynchronous transfer the
scheduler can overlap). The compiler's model, not a measurement.

  benches/collective_matmul.py            # needs target/release/examples/compile_tpu, libtpu
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
EXAMPLES = TARGET / "release" / "examples"
ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v6e-8", "TPU_WORKER_ID": "0",
       "TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1",
       "TPU_CHIPS_PER_HOST_BOUNDS": "2,4,1"}
ROWS, HIDDEN, COLS, TP, LAYERS = 512, 8192, 28672, 8, 4
SHARD, LOCAL = ROWS // TP, COLS // TP
X = f"tensor<{ROWS}x{HIDDEN}xbf16>"
W = f"tensor<{HIDDEN}x{COLS}xbf16>"
Y = f"tensor<{ROWS}x{COLS}xbf16>"
ARGS_SHARDING = ('{mhlo.sharding = "{devices=[8,1]<=[8]}"}', '{mhlo.sharding = "{devices=[1,8]<=[8]}"}')


def ag_body(x, w):
    return [f"%y = stablehlo.dot_general {x}, {w}, contracting_dims = [1] x [0] : ({X}, {W}) -> {Y}"]


def ring_body(x, w):
    """Each chip keeps its column block of w and passes its row block of x round the ring."""
    pairs = ", ".join(f"[{i}, {(i - 1) % TP}]" for i in range(TP))
    xs, ws = f"tensor<{SHARD}x{HIDDEN}xbf16>", f"tensor<{HIDDEN}x{LOCAL}xbf16>"
    acc, part = f"tensor<{ROWS}x{LOCAL}xbf16>", f"tensor<{SHARD}x{LOCAL}xbf16>"
    b = [f'%xf = stablehlo.custom_call @Sharding({x}) {{mhlo.sharding = "{{devices=[8,1]<=[8]}}"}} : ({X}) -> {X}',
         f'%x0 = stablehlo.custom_call @SPMDFullToShardShape(%xf) {{mhlo.sharding = "{{manual}}"}} : ({X}) -> {xs}',
         f'%wf = stablehlo.custom_call @Sharding({w}) {{mhlo.sharding = "{{devices=[1,8]<=[8]}}"}} : ({W}) -> {W}',
         f'%wl = stablehlo.custom_call @SPMDFullToShardShape(%wf) {{mhlo.sharding = "{{manual}}"}} : ({W}) -> {ws}',
         "%pid = stablehlo.partition_id : tensor<ui32>",
         "%pidi = stablehlo.convert %pid : (tensor<ui32>) -> tensor<i32>",
         f"%ctp = stablehlo.constant dense<{TP}> : tensor<i32>",
         f"%crows = stablehlo.constant dense<{SHARD}> : tensor<i32>",
         "%c0 = stablehlo.constant dense<0> : tensor<i32>",
         "%zb = stablehlo.constant dense<0.0> : tensor<bf16>",
         f"%a0 = stablehlo.broadcast_in_dim %zb, dims = [] : (tensor<bf16>) -> {acc}"]
    for s in range(TP):
        if s + 1 < TP:
            b.append(f'%x{s + 1} = "stablehlo.collective_permute"(%x{s}) {{source_target_pairs = '
                     f'dense<[{pairs}]> : tensor<{TP}x2xi64>, channel_handle = '
                     f'#stablehlo.channel_handle<handle = {s + 1}, type = 1>}} : ({xs}) -> {xs}')
        b += [f"%y{s} = stablehlo.dot_general %x{s}, %wl, contracting_dims = [1] x [0] : ({xs}, {ws}) -> {part}",
              f"%k{s} = stablehlo.constant dense<{s}> : tensor<i32>",
              f"%b{s} = stablehlo.add %pidi, %k{s} : tensor<i32>",
              f"%m{s} = stablehlo.remainder %b{s}, %ctp : tensor<i32>",
              f"%r{s} = stablehlo.multiply %m{s}, %crows : tensor<i32>",
              f"%a{s + 1} = stablehlo.dynamic_update_slice %a{s}, %y{s}, %r{s}, %c0 : ({acc}, {part}, tensor<i32>, tensor<i32>) -> {acc}"]
    b += [f'%am = stablehlo.custom_call @Sharding(%a{TP}) {{mhlo.sharding = "{{manual}}"}} : ({acc}) -> {acc}',
          f'%y = stablehlo.custom_call @SPMDShardToFullShape(%am) {{mhlo.sharding = "{{devices=[1,8]<=[8]}}"}} : ({acc}) -> {Y}']
    return b


def program(body, looped):
    head = f"module @m attributes {{mhlo.num_partitions = {TP} : i32, mhlo.num_replicas = 1 : i32}} {{"
    if not looped:
        lines = [head, f"func.func public @main(%x: {X} {ARGS_SHARDING[0]}, %w: {W} {ARGS_SHARDING[1]}) "
                       f"-> ({Y} {ARGS_SHARDING[1]}) {{", *body("%x", "%w"), f"return %y : {Y}", "}", "}"]
        return "\n".join(lines) + "\n"
    ws = f"tensor<{LAYERS}x{HIDDEN}x{COLS}xbf16>"
    lines = [head,
             f'func.func public @main(%x: {X} {ARGS_SHARDING[0]}, %w: {ws} {{mhlo.sharding = "{{devices=[1,1,8]<=[8]}}"}}) '
             f"-> ({Y} {ARGS_SHARDING[1]}) {{",
             "%zero = stablehlo.constant dense<0.0> : tensor<bf16>",
             f"%acc0 = stablehlo.broadcast_in_dim %zero, dims = [] : (tensor<bf16>) -> {Y}",
             "%i0 = stablehlo.constant dense<0> : tensor<i32>",
             f"%r:2 = stablehlo.while(%it = %i0, %acc = %acc0) : tensor<i32>, {Y}",
             " cond {",
             f"%n = stablehlo.constant dense<{LAYERS}> : tensor<i32>",
             "%c = stablehlo.compare LT, %it, %n, SIGNED : (tensor<i32>, tensor<i32>) -> tensor<i1>",
             "stablehlo.return %c : tensor<i1>",
             "} do {",
             "%z = stablehlo.constant dense<0> : tensor<i32>",
             f"%w3 = stablehlo.dynamic_slice %w, %it, %z, %z, sizes = [1, {HIDDEN}, {COLS}] : ({ws}, tensor<i32>, tensor<i32>, tensor<i32>) -> tensor<1x{HIDDEN}x{COLS}xbf16>",
             f"%wl0 = stablehlo.reshape %w3 : (tensor<1x{HIDDEN}x{COLS}xbf16>) -> {W}",
             *body("%x", "%wl0"),
             f"%acc2 = stablehlo.add %acc, %y : {Y}",
             "%one = stablehlo.constant dense<1> : tensor<i32>",
             "%it2 = stablehlo.add %it, %one : tensor<i32>",
             f"stablehlo.return %it2, %acc2 : tensor<i32>, {Y}",
             "}",
             f"return %r#1 : {Y}", "}", "}"]
    return "\n".join(lines) + "\n"


def main():
    tool = EXAMPLES / "compile_tpu"
    sums = EXAMPLES / "kernel_sums"
    for t in (tool, sums):
        if not t.is_file():
            sys.exit(f"{t} missing: cargo build --release -p tpuserve-runner-xla "
                     "--example compile_tpu --example kernel_sums")
    per_layer = LAYERS
    flops = 2 * ROWS * HIDDEN * LOCAL
    print(f"one dot per chip: [{ROWS}, {HIDDEN}] x [{HIDDEN}, {LOCAL}], {flops / 1e9:.1f} GFLOP "
          f"= {flops / 918e12 * 1e6:.1f} us at 918 TFLOP/s; its weight block "
          f"{HIDDEN * LOCAL * 2 / 1e6:.1f} MB = {HIDDEN * LOCAL * 2 / 1.64e12 * 1e6:.1f} us at 1.64 TB/s")
    with tempfile.TemporaryDirectory() as d:
        for name, body, looped in [("ag", ag_body, False), ("ring", ring_body, False),
                                   ("ag-loop", ag_body, True), ("ring-loop", ring_body, True)]:
            src, pb, dump = Path(d, f"{name}.mlir"), Path(d, f"{name}.hlo.pb"), Path(d, name)
            src.write_text(program(body, looped))
            env = {**os.environ, **ENV,
                   "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text"}
            r = subprocess.run(["unshare", "-n", str(tool), "v6e:2x4", str(src), "--spmd", str(TP),
                                "--dump", str(pb)], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{name}: {r.stdout}{r.stderr}")
            cycles = re.search(r"kernels: (\d+) cycles, (\d+) launches", r.stdout)
            top = subprocess.run([str(sums), "--top", "3", str(pb)], capture_output=True, text=True).stdout
            text = "".join(p.read_text() for p in dump.glob("*after_optimizations.txt"))
            ops = {op: text.count(f"{op}(") for op in
                   ("all-gather", "collective-permute-start", "while")}
            layers = per_layer if looped else 1
            print(f"\n{name}: {int(cycles[1]) / layers:,.0f} cycles a dot ({cycles[2]} launches "
                  f"in all), collectives {ops}")
            for line in top.splitlines()[1:]:
                print("   " + line.strip())


if __name__ == "__main__":
    main()
