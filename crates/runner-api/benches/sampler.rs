//! The host sampler over a Llama-3-sized vocabulary (128,256 logits): greedy, top-p 0.9,
//! top-k 50, and with penalties and logprobs. Run: `cargo bench -p tpuserve-runner-api`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use tpuserve_runner_api::{sampler, SamplingParams};

const VOCAB: usize = 128_256;

fn logits() -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // A peaked distribution like a real model's: most mass on a few hundred tokens.
    (0..VOCAB)
        .map(|i| {
            let base: f32 = rng.random_range(-8.0..2.0);
            if i % 401 == 0 {
                base + 8.0
            } else {
                base
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let l = logits();
    let prompt: Vec<u32> = (0..512).map(|i| (i * 97) % VOCAB as u32).collect();
    let output: Vec<u32> = (0..128).map(|i| (i * 131) % VOCAB as u32).collect();
    let cases = [
        ("greedy", SamplingParams::greedy()),
        (
            "top_p_0.9",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
        (
            "top_k_50",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
        (
            "penalties_logprobs_5",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                repetition_penalty: 1.1,
                logprobs: Some(5),
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
    ];
    let mut g = c.benchmark_group("sample_128k_vocab");
    for (name, p) in cases {
        g.bench_function(name, |b| {
            let mut step = 0u64;
            b.iter(|| {
                step += 1;
                black_box(sampler::sample(black_box(&l), &p, &prompt, &output, step))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
