//! Whole forward steps of the CPU runner on a real checkpoint, the shapes of the 32-stream
//! compare point: a prompt step of 23 sequences × 88 tokens (2,024 rows, what one
//! 2,048-token step of the prompt wave holds) and a decode step of 32 sequences at 152 tokens
//! of context. Medians of repeated steps, so that changes to the step's overheads (not only
//! its kernels) can be compared on a noisy machine:
//! `cargo run --release -p tpuserve-runner-cpu --example stepbench -- MODEL.gguf [reps]`.

use std::sync::Arc;
use std::time::Instant;
use tpuserve_runner_api::{ModelRunner, SamplingParams, SeqPlan, StepPlan};
use tpuserve_runner_cpu::{CpuRunner, CpuRunnerOptions, CpuWeights, Fp8};

fn plan(seqs: usize, qlen: usize, ctx: usize, bs: usize) -> StepPlan {
    let per_seq = ctx.div_ceil(bs);
    let mut p = StepPlan {
        token_ids: Vec::new(),
        positions: Vec::new(),
        slot_mapping: Vec::new(),
        seqs: Vec::new(),
        masks: None,
    };
    for s in 0..seqs {
        let table: Vec<u32> = (0..per_seq).map(|b| (s * per_seq + b) as u32).collect();
        for pos in ctx - qlen..ctx {
            p.token_ids
                .push(((s * 7919 + pos * 104_729) % 40_000 + 100) as u32);
            p.positions.push(pos as u32);
            p.slot_mapping
                .push(table[pos / bs] * bs as u32 + (pos % bs) as u32);
        }
        let mut sp = SeqPlan::sampling(s as u64, s * qlen, qlen, ctx, table);
        sp.sampling = Arc::new(SamplingParams::greedy());
        p.seqs.push(sp);
    }
    p
}

/// `a` then `b` in one step, `b`'s KV blocks moved past `first_block` (a mixed step: decodes
/// beside prompt chunks).
fn mixed(a: &StepPlan, b: &StepPlan, first_block: u32, bs: usize) -> StepPlan {
    let mut p = a.clone();
    let (rows, seqs) = (a.token_ids.len(), a.seqs.len() as u64);
    p.token_ids.extend(&b.token_ids);
    p.positions.extend(&b.positions);
    p.slot_mapping
        .extend(b.slot_mapping.iter().map(|s| s + first_block * bs as u32));
    p.seqs.extend(b.seqs.iter().map(|s| {
        let mut s = s.clone();
        s.seq_id += seqs;
        s.query_start += rows;
        s.block_table.iter_mut().for_each(|t| *t += first_block);
        s
    }));
    p
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: stepbench MODEL.gguf [reps]");
    let reps: usize = args.get(2).map_or(Ok(15), |r| r.parse())?;
    let model = tpuserve_model::load_model(std::path::Path::new(path))?;
    let bs = 16;
    let mut runner = CpuRunner::new(
        &model,
        CpuRunnerOptions {
            num_blocks: 32 * 10 + 16 * 6,
            block_size: bs,
            // `STEPBENCH_WEIGHTS=bf16` (or `f32`): the `--dtype bfloat16` / `float32` forms.
            weights: match std::env::var("STEPBENCH_WEIGHTS").as_deref() {
                Ok("bf16") => CpuWeights::Bf16,
                Ok("f32") => CpuWeights::F32,
                _ => CpuWeights::Native,
            },
            // `STEPBENCH_KV=fp8` (or `fp8_e5m2`): `--kv-cache-dtype fp8`.
            kv_fp8: match std::env::var("STEPBENCH_KV").as_deref() {
                Ok("fp8" | "fp8_e4m3") => Some(Fp8::E4m3),
                Ok("fp8_e5m2") => Some(Fp8::E5m2),
                _ => None,
            },
        },
    )?;
    // The prompts' KV first (the decode step attends over it), then each shape.
    let cases = [
        ("prompt 23 x 88", plan(23, 88, 88, bs)),
        // Smaller prompt steps: the cost per row as the step shrinks.
        ("prompt 8 x 88", plan(8, 88, 88, bs)),
        ("prompt 2 x 88", plan(2, 88, 88, bs)),
        ("prompt 1 x 88", plan(1, 88, 88, bs)),
        ("decode 32 x 1 @152", plan(32, 1, 152, bs)),
        ("decode 1 x 1 @152", plan(1, 1, 152, bs)),
        // What a step of a capped prompt burst holds (`--max-num-prefill-tokens`).
        (
            "mixed decode 32 + prompt 2 x 88",
            mixed(&plan(32, 1, 152, bs), &plan(2, 88, 88, bs), 320, bs),
        ),
    ];
    runner.execute(&plan(32, 152, 152, bs))?;
    // `STEPBENCH=decode` (or `prompt`) times one case alone, e.g. under `perf record`.
    let only = std::env::var("STEPBENCH").unwrap_or_default();
    for (name, p) in cases.iter().filter(|(n, _)| n.starts_with(only.as_str())) {
        let mut ms: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                runner.execute(p).expect("step");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.1} ms, min {:.1}, max {:.1} ({} rows, {reps} steps)",
            ms[reps / 2],
            ms[0],
            ms[reps - 1],
            p.num_tokens()
        );
    }
    Ok(())
}
