//! Micro-benchmark of the paged attention at SmolLM2-135M shapes (9 heads, 3 KV heads, head
//! dim 64, blocks of 16): decode steps of 1, 8 and 32 sequences at 152 tokens of context (an
//! 88-token prompt and 64 generated), and one 88-token prompt; one layer per call, times per
//! call and effective GFLOP/s (QK and PV, 4 flops per key and dim), over an f32 cache and an
//! f16 cache, with each kernel this CPU has:
//! `cargo run --release -p tpuserve-runner-cpu --example attnbench` (`ATTNBENCH=Avx512` runs
//! one kernel; `ATTNBENCH_CASE=hot|cold` only the single-layer cases or the 30-layer one,
//! e.g. under `perf`).

use std::time::Instant;
use tpuserve_runner_api::{SeqPlan, StepPlan};
use tpuserve_runner_cpu::attention::{available_kernels, paged_attention_with, AttnKernel, KvRef};

fn main() {
    let (heads, kv_heads, hd, bs) = (9usize, 3usize, 64usize, 16usize);
    let blocks = 4096;
    let kvs = kv_heads * hd;
    let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7 - 0.8;
    let k: Vec<f32> = (0..blocks * bs * kvs).map(val).collect();
    let v: Vec<f32> = (0..blocks * bs * kvs).map(|i| val(i + 7)).collect();
    let k16: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
    let v16: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    let chosen =
        |k: &AttnKernel| std::env::var("ATTNBENCH").map_or(true, |v| format!("{k:?}") == v);
    let case = std::env::var("ATTNBENCH_CASE").unwrap_or_default();
    for kernel in available_kernels()
        .into_iter()
        .filter(chosen)
        .filter(|_| case != "cold")
    {
        for (cache, kv) in [("f32", KvRef::F32(&k, &v)), ("f16", KvRef::F16(&k16, &v16))] {
            for (seqs, qlen, ctx) in [
                (1usize, 1usize, 152usize),
                (8, 1, 152),
                (32, 1, 152),
                (1, 88, 88),
            ] {
                let per_seq = ctx.div_ceil(bs);
                let mut plan = StepPlan {
                    token_ids: vec![0; seqs * qlen],
                    positions: vec![0; seqs * qlen],
                    slot_mapping: vec![0; seqs * qlen],
                    seqs: Vec::new(),
                    masks: None,
                };
                let mut token_seq = Vec::new();
                for s in 0..seqs {
                    // Blocks spread over the cache, as a busy server's are.
                    let table: Vec<u32> = (0..per_seq)
                        .map(|b| ((s * 131 + b * 977) % blocks) as u32)
                        .collect();
                    plan.seqs
                        .push(SeqPlan::sampling(s as u64, s * qlen, qlen, ctx, table));
                    token_seq.extend(std::iter::repeat_n(s, qlen));
                }
                let q: Vec<f32> = (0..seqs * qlen * heads * hd).map(|i| val(i + 3)).collect();
                let run = || {
                    paged_attention_with(kernel, &q, kv, &plan, &token_seq, heads, kv_heads, hd, bs)
                };
                let mut sink = run();
                let n = 300;
                let t = Instant::now();
                for _ in 0..n {
                    sink = run();
                }
                let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
                // Keys each query row sees: ctx for decode, 1..=qlen for a prompt.
                let keys: usize = if qlen == 1 {
                    seqs * ctx
                } else {
                    qlen * (qlen + 1) / 2
                };
                let flops = 4.0 * (keys * heads * hd) as f64;
                println!(
            "{kernel:?} {cache} {seqs:>3} seqs × {qlen:>3} rows, context {ctx:>3}: {us:>8.1} µs a layer, {:>6.2} GFLOP/s (checksum {:.3})",
            flops / us / 1e3,
            sink.iter().sum::<f32>()
        );
            }
        }
    }

    // A decode step's attention reads every layer's cache once: 30 layers of 32 sequences at
    // 152 tokens (f16, ~124 MB) do not stay in the last-level cache from call to call, as the
    // single layer above does.
    let (layers, seqs, ctx) = (30usize, 32usize, 152usize);
    let per_seq = ctx.div_ceil(bs);
    let lblocks = seqs * per_seq;
    let per = lblocks * bs * kvs;
    let mut all: Vec<half::f16> = Vec::with_capacity(2 * layers * per);
    for l in 0..layers {
        all.extend((0..per).map(|i| half::f16::from_f32(val(i + l))));
        all.extend((0..per).map(|i| half::f16::from_f32(val(i + l + 7))));
    }
    let caches: Vec<(&[half::f16], &[half::f16])> =
        all.chunks_exact(2 * per).map(|c| c.split_at(per)).collect();
    let mut plan = StepPlan {
        token_ids: vec![0; seqs],
        positions: vec![0; seqs],
        slot_mapping: vec![0; seqs],
        seqs: Vec::new(),
        masks: None,
    };
    for s in 0..seqs {
        let table: Vec<u32> = (0..per_seq).map(|b| (s * per_seq + b) as u32).collect();
        plan.seqs
            .push(SeqPlan::sampling(s as u64, s, 1, ctx, table));
    }
    let token_seq: Vec<usize> = (0..seqs).collect();
    let q: Vec<f32> = (0..seqs * heads * hd).map(|i| val(i + 3)).collect();
    for kernel in available_kernels()
        .into_iter()
        .filter(chosen)
        .filter(|_| case != "hot")
    {
        let n = 20;
        let mut sink = 0f32;
        let t = Instant::now();
        for _ in 0..n {
            for (k, v) in &caches {
                let o = paged_attention_with(
                    kernel,
                    &q,
                    KvRef::F16(k, v),
                    &plan,
                    &token_seq,
                    heads,
                    kv_heads,
                    hd,
                    bs,
                );
                sink += o[0];
            }
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / (n * layers) as f64;
        let bytes = (seqs * ctx * kvs * 2 * 2) as f64;
        println!(
        "{kernel:?} f16 {seqs} seqs x 1 row, context {ctx}, {layers} layers' caches in turn: {us:>8.1} µs a layer, {:.1} GB/s of K/V (checksum {sink:.3})",
        bytes / us / 1e3
    );
    }
}
