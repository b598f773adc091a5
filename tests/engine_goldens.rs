//! The goldens' `batch` cases through the engine (scheduler, chunked prefill, prefix cache,
//! detokenizer) over the CPU runner: submitted at once and with staggered arrivals, each must
//! reproduce its single-request golden tokens, logprobs (1e-3), prompt logprobs and text.

use std::sync::Arc;

use tpuserve_engine::{EngineConfig, FinishReason};
use tpuserve_model::load_model;
use tpuserve_suite::checks::check_case;
use tpuserve_suite::engine_support::{
    as_seq_result, assert_no_leak, cpu_runner, engine, golden_request, run_staggered, run_together,
};
use tpuserve_suite::goldens::{Case, Goldens};
use tpuserve_suite::{fixtures_dir, smollm2_gguf, tiny_llama3_dir};

fn check_batch(model_path: &std::path::Path, goldens: &str, max_model_len: usize) {
    let model = Arc::new(load_model(model_path).unwrap());
    let g = Goldens::load(&fixtures_dir().join(goldens));
    let cases: Vec<&Case> = g.batch.case_names.iter().map(|n| g.case(n)).collect();
    let mut runner = Some(cpu_runner(&model, 512));

    // (budget, staggered, skip special tokens): all at once with a budget that fits every
    // prompt; then arriving every 3 steps with a budget that chunks long prompts.
    for (budget, stagger, skip) in [(8192, false, false), (256, true, true)] {
        let mut cfg = EngineConfig::new(max_model_len);
        cfg.max_num_batched_tokens = budget;
        let mut core = engine(&model, runner.take().unwrap(), cfg);
        let reqs = cases.iter().map(|c| golden_request(c, skip)).collect();
        let arrive: Vec<usize> = (0..cases.len())
            .map(|i| if stagger { 3 * i } else { 0 })
            .collect();
        let outs = if stagger {
            run_staggered(&mut core, reqs, &arrive)
        } else {
            run_together(&mut core, reqs)
        };
        for (c, out) in cases.iter().zip(&outs) {
            check_case(c, &as_seq_result(out), true);
            let o = &out.outputs[0];
            let text = if skip {
                &c.completion_text_skip_special
            } else {
                &c.completion_text
            };
            assert_eq!(&o.text, text, "{}: text (skip special {skip})", c.name);
            assert_eq!(o.finish.as_ref().unwrap().reason, FinishReason::Length);
            assert_eq!(out.prompt.num_prompt_tokens, c.prompt_token_ids.len());
        }
        assert_no_leak(&core);
        runner = Some(core.into_runner());
    }
}

#[test]
fn smollm2_batch_through_the_engine_matches_goldens() {
    check_batch(&smollm2_gguf(), "smollm2/goldens.json", 2048);
}

#[test]
fn tiny_llama3_batch_through_the_engine_matches_goldens() {
    check_batch(&tiny_llama3_dir(), "tiny-llama3/goldens.json", 4096);
}
