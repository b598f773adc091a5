//! Micro-benchmark of the paged attention at SmolLM2-135M shapes (9 heads, 3 KV heads, head
//! dim 64, blocks of 16): decode steps of 1, 8 and 32 sequences at 152 tokens of context (an
//! 88-token prompt and 64 generated), and one 88-token prompt; one layer per call, times per
//! call and effective GFLOP/s (QK and PV, 4 flops per key and dim), over an f32 cache and an
//! f16 cache:
//! `cargo run --release -p tpuserve-runner-cpu --example attnbench`.

use std::time::Instant;
use tpuserve_runner_api::{SeqPlan, StepPlan};
use tpuserve_runner_cpu::attention::{paged_attention, KvRef};

fn main() {
    let (heads, kv_heads, hd, bs) = (9usize, 3usize, 64usize, 16usize);
    let blocks = 4096;
    let kvs = kv_heads * hd;
    let val = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 1e7 - 0.8;
    let k: Vec<f32> = (0..blocks * bs * kvs).map(val).collect();
    let v: Vec<f32> = (0..blocks * bs * kvs).map(|i| val(i + 7)).collect();
    let k16: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
    let v16: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
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
            let run = || paged_attention(&q, kv, &plan, &token_seq, heads, kv_heads, hd, bs);
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
            "{cache} {seqs:>3} seqs × {qlen:>3} rows, context {ctx:>3}: {us:>8.1} µs a layer, {:>6.2} GFLOP/s (checksum {:.3})",
            flops / us / 1e3,
            sink.iter().sum::<f32>()
        );
        }
    }
}
