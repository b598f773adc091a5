//! Prints the greedy token and logprob of one prefill at a given TP (manual cross-check).
use std::sync::Arc;
use tpuserve_model::load_model;
use tpuserve_runner_api::{ModelRunner, SamplingParams, SeqPlan, StepPlan};
use tpuserve_runner_xla::{XlaRunner, XlaRunnerOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m = load_model(std::path::Path::new(&args[1])).expect("model");
    let tp: usize = args[2].parse().expect("tp");
    let mut x = XlaRunner::new(
        &m,
        XlaRunnerOptions {
            tensor_parallel_size: tp,
            num_blocks: 8,
            max_num_batched_tokens: 16,
            max_model_len: 64,
            max_logprobs: 2,
            ..Default::default()
        },
    )
    .expect("runner");
    let plan = StepPlan {
        masks: None,
        token_ids: vec![128000, 791, 6864, 315],
        positions: vec![0, 1, 2, 3],
        slot_mapping: vec![0, 1, 2, 3],
        seqs: vec![SeqPlan {
            seq_id: 0,
            query_start: 0,
            query_len: 4,
            context_len: 4,
            block_table: vec![0, 1],
            sample: true,
            prompt_logprob_targets: vec![],
            return_logits: false,
            sampling: Arc::new(SamplingParams {
                logprobs: Some(2),
                ..SamplingParams::greedy()
            }),
            output_tokens: Arc::new(vec![]),
            prompt_tokens: Arc::new(vec![]),
        }],
    };
    println!(
        "tp {tp}: {:?}",
        x.execute(&plan).expect("step").seqs[0].sampled
    );
}
