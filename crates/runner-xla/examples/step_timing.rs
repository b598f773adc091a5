//! Times decode steps of the XLA runner:
//! `cargo run --release --example step_timing -- MODEL [TP] [SEQS]`, with `TPUSERVE_DEVICE`
//! (`xla-cpu`, `cuda`, `tpu`) and `TPUSERVE_DTYPE` (`float32`, `bfloat16`) from the environment.

use std::sync::Arc;
use std::time::Instant;

use tpuserve_model::load_model;
use tpuserve_runner_api::{ModelRunner, SamplingParams, SeqPlan, StepPlan};
use tpuserve_runner_xla::{WeightElem, XlaRunner, XlaRunnerOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = load_model(std::path::Path::new(&args[1])).expect("model");
    let tp: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let seqs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut r = XlaRunner::new(
        &model,
        XlaRunnerOptions {
            device: std::env::var("TPUSERVE_DEVICE")
                .unwrap_or_else(|_| "xla-cpu".into())
                .parse()
                .expect("TPUSERVE_DEVICE"),
            weight_dtype: match std::env::var("TPUSERVE_DTYPE").as_deref() {
                Ok("bfloat16") => WeightElem::BF16,
                _ => WeightElem::F32,
            },
            tensor_parallel_size: tp,
            num_blocks: 64 * seqs,
            max_num_batched_tokens: 16,
            max_model_len: 1024,
            max_logprobs: 0,
            compile_cache_dir: std::env::var_os("VLLM_XLA_CACHE_PATH").map(Into::into),
            ..Default::default()
        },
    )
    .expect("runner");
    let params = Arc::new(SamplingParams::greedy());
    for ctx in [16usize, 128, 512] {
        let plan = StepPlan {
            masks: None,
            token_ids: vec![100; seqs],
            positions: vec![ctx as u32 - 1; seqs],
            slot_mapping: (0..seqs).map(|s| (s * 64 * 16 + ctx - 1) as u32).collect(),
            seqs: (0..seqs)
                .map(|s| SeqPlan {
                    seq_id: s as u64,
                    query_start: s,
                    query_len: 1,
                    context_len: ctx,
                    block_table: (0..64).map(|b| (s * 64 + b) as u32).collect(),
                    sample: true,
                    prompt_logprob_targets: Vec::new(),
                    return_logits: false,
                    sampling: params.clone(),
                    output_tokens: Arc::new(Vec::new()),
                    prompt_tokens: Arc::new(Vec::new()),
                })
                .collect(),
        };
        r.execute(&plan).expect("step");
        let t = Instant::now();
        let n = 10;
        for _ in 0..n {
            r.execute(&plan).expect("step");
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!(
            "context {ctx:4} x {seqs} seqs: {ms:.1} ms/step ({:.1} tok/s)",
            seqs as f64 * 1e3 / ms
        );
    }
}
