//! Helpers for the engine tests (`tests/engine_*.rs`): an engine over the CPU runner, requests
//! shaped like the goldens, and drivers that submit requests at chosen steps.

use std::sync::Arc;

use tpuserve_engine::{
    DecodeError, EngineConfig, EngineCore, EngineRequest, FinalOutput, RequestStream,
    SamplingParams, StopParams, TokenDecoder,
};
use tpuserve_model::LoadedModel;
use tpuserve_runner_api::{ModelRunner, TokenId};
use tpuserve_runner_cpu::{CpuRunner, CpuRunnerOptions, CpuWeights};

use crate::driver::SeqResult;
use crate::goldens::Case;

pub const BLOCK_SIZE: usize = 16;

/// The model's tokenizer, shared by several engines over one loaded model.
pub struct SharedTokenizer(pub Arc<LoadedModel>);

impl TokenDecoder for SharedTokenizer {
    fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String, DecodeError> {
        TokenDecoder::decode(&self.0.tokenizer, ids, skip_special_tokens)
    }

    fn special_token_text(&self, id: TokenId) -> Option<String> {
        self.0.tokenizer.special_token_text(id)
    }
}

pub fn cpu_runner(model: &LoadedModel, num_blocks: usize) -> Box<dyn ModelRunner> {
    Box::new(
        CpuRunner::new(
            model,
            CpuRunnerOptions {
                num_blocks,
                block_size: BLOCK_SIZE,
                weights: CpuWeights::F32,
                kv_fp8: None,
            },
        )
        .expect("CPU runner"),
    )
}

/// An engine over `runner` (whose weights can be reused across engines: see
/// `EngineCore::into_runner`).
pub fn engine(
    model: &Arc<LoadedModel>,
    runner: Box<dyn ModelRunner>,
    cfg: EngineConfig,
) -> EngineCore {
    EngineCore::new(
        runner,
        Arc::new(SharedTokenizer(model.clone())),
        model.eos_token_ids.clone(),
        cfg,
    )
    .expect("engine")
}

/// Greedy, EOS ignored, `max_tokens` tokens: how the goldens were generated.
pub fn greedy(prompt: Vec<TokenId>, max_tokens: usize) -> EngineRequest {
    EngineRequest::new(
        prompt,
        SamplingParams::greedy(),
        StopParams {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        },
    )
}

/// A golden case as a request: greedy, top-5 logprobs, prompt logprobs where the golden has
/// them, special tokens kept in the text unless `skip_special`.
pub fn golden_request(c: &Case, skip_special: bool) -> EngineRequest {
    let mut r = greedy(c.prompt_token_ids.clone(), c.completion_token_ids.len());
    r.sampling.logprobs = Some(5);
    r.sampling.prompt_logprobs = c.prompt_logprobs.as_ref().map(|_| 5);
    r.stop.skip_special_tokens = skip_special;
    r
}

/// Child 0 of a finished request in the shape `checks::check_case` compares with goldens.
pub fn as_seq_result(out: &FinalOutput) -> SeqResult {
    let o = &out.outputs[0];
    SeqResult {
        tokens: o.token_ids.clone(),
        logprobs: o.logprobs.clone().unwrap_or_default(),
        prompt_logprobs: out
            .prompt
            .prompt_logprobs
            .iter()
            .flatten()
            .flatten()
            .cloned()
            .collect(),
        last_prompt_logits: None,
    }
}

/// Submits request `i` before step `arrive_at[i]` and runs until all are finished.
pub fn run_staggered(
    core: &mut EngineCore,
    reqs: Vec<EngineRequest>,
    arrive_at: &[usize],
) -> Vec<FinalOutput> {
    let mut pending: Vec<Option<EngineRequest>> = reqs.into_iter().map(Some).collect();
    let mut streams: Vec<Option<RequestStream>> = pending.iter().map(|_| None).collect();
    let mut step = 0;
    while pending.iter().any(Option::is_some) || core.has_unfinished() {
        for (i, slot) in pending.iter_mut().enumerate() {
            if arrive_at[i] <= step {
                if let Some(r) = slot.take() {
                    streams[i] = Some(core.add_request(r).expect("request accepted"));
                }
            }
        }
        core.step();
        step += 1;
    }
    streams
        .into_iter()
        .map(|s| s.expect("submitted").collect_blocking())
        .collect()
}

/// All requests submitted at once.
pub fn run_together(core: &mut EngineCore, reqs: Vec<EngineRequest>) -> Vec<FinalOutput> {
    let n = reqs.len();
    run_staggered(core, reqs, &vec![0; n])
}

/// Each request alone, one after the other, on the same engine.
pub fn run_alone(core: &mut EngineCore, reqs: Vec<EngineRequest>) -> Vec<FinalOutput> {
    reqs.into_iter()
        .map(|r| run_together(core, vec![r]).remove(0))
        .collect()
}

/// Every block is free again.
pub fn assert_no_leak(core: &EngineCore) {
    let bm = core.scheduler().block_manager();
    assert_eq!(
        bm.num_free_blocks(),
        bm.num_blocks(),
        "KV blocks leaked: {} of {} free",
        bm.num_free_blocks(),
        bm.num_blocks()
    );
    core.scheduler()
        .check_invariants()
        .expect("scheduler invariants");
}
