//! The contract between the engine and a model runner. A [`StepPlan`] is flat data — token ids,
//! positions, per-sequence spans, block tables and the KV slot of every token — so that a
//! fixed-shape XLA runner can pad it into buckets and a host runner can walk it directly.
//! Runners return sampled tokens (and requested logprobs), never whole logits, so that on an
//! accelerator only token ids cross back to the host.

pub mod masks;
pub mod sampler;
pub mod sizing;

use std::sync::Arc;

pub use masks::{apply_mask, StepMasks, TokenBitmask};
pub use sampler::{SamplingParams, TokenLogprobs};

pub type TokenId = u32;

/// What one sequence contributes to a step.
#[derive(Debug, Clone)]
pub struct SeqPlan {
    /// Engine-side identity, stable across steps (runners may key per-sequence state on it).
    pub seq_id: u64,
    /// Offset of this sequence's first query token in [`StepPlan::token_ids`].
    pub query_start: usize,
    pub query_len: usize,
    /// Tokens in the KV cache for this sequence once this step has run (past + query).
    pub context_len: usize,
    /// Physical KV block ids, in order, covering at least `context_len` tokens.
    pub block_table: Vec<u32>,
    /// Sample a token from the last query position (the prompt is complete).
    pub sample: bool,
    /// For prompt logprobs: the prompt token that follows each query position, for as many
    /// leading query positions as have one in the prompt. Empty = none requested.
    pub prompt_logprob_targets: Vec<TokenId>,
    /// Return the raw logits of the last query position (debugging and tests).
    pub return_logits: bool,
    pub sampling: Arc<SamplingParams>,
    /// Tokens generated so far (for penalties) and how many: the seeded generator is keyed
    /// on (seed, number of generated tokens) so batching never changes a seeded result.
    pub output_tokens: Arc<Vec<TokenId>>,
    /// Prompt tokens, needed only when a repetition penalty is set.
    pub prompt_tokens: Arc<Vec<TokenId>>,
}

impl SeqPlan {
    /// A sequence whose last query position samples with the default parameters (no
    /// penalties, logprobs or logits): what kernel tests and benchmarks need.
    pub fn sampling(
        seq_id: u64,
        query_start: usize,
        query_len: usize,
        context_len: usize,
        block_table: Vec<u32>,
    ) -> SeqPlan {
        SeqPlan {
            seq_id,
            query_start,
            query_len,
            context_len,
            block_table,
            sample: true,
            prompt_logprob_targets: Vec::new(),
            return_logits: false,
            sampling: Default::default(),
            output_tokens: Default::default(),
            prompt_tokens: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    pub token_ids: Vec<TokenId>,
    pub positions: Vec<u32>,
    /// KV slot (block * block_size + offset) each token's key/value is written to.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqPlan>,
    /// Allowed-token masks of the structured-output rows, filled by the engine while the
    /// forward pass runs; `None` when no sequence of the step is constrained.
    pub masks: Option<Arc<StepMasks>>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: TokenId,
    /// Logprob of the chosen token and the top-k alternatives, present when requested.
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Debug, Clone, Default)]
pub struct SeqOutput {
    pub sampled: Option<SampledToken>,
    /// One entry per `prompt_logprob_targets` element.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub logits: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// In the order of [`StepPlan::seqs`].
    pub seqs: Vec<SeqOutput>,
}

/// The KV cache geometry a runner was built with; the engine's block manager mirrors it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_blocks: usize,
    pub block_size: usize,
    /// The cache's memory is committed by the OS on first write (zeroed host pages), not
    /// allocated whole at start: the block manager then reuses written blocks first.
    pub committed_on_write: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("invalid step plan: {0}")]
    InvalidPlan(String),
    #[error("model weights: {0}")]
    Weights(String),
    #[error("device: {0}")]
    Device(String),
    #[error("shape {0} was not compiled during warm-up")]
    Recompilation(String),
}

/// What a runner's sampler implements; the engine refuses requests that need more, so one
/// request cannot fail a step shared with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SamplingSupport {
    /// Everything in [`SamplingParams`] (the host sampler).
    #[default]
    Full,
    /// Greedy, temperature, top-k, top-p, min-p and logprobs on device; no penalties,
    /// `logit_bias`, `allowed_token_ids`, `bad_words`, `logprob_token_ids` or `min_tokens`.
    OnDevice,
}

impl SamplingSupport {
    /// The first request parameter this sampler cannot honour.
    pub fn unsupported(self, p: &SamplingParams, min_tokens: usize) -> Option<&'static str> {
        if self == SamplingSupport::Full {
            return None;
        }
        if p.presence_penalty != 0.0 {
            Some("presence_penalty")
        } else if p.frequency_penalty != 0.0 {
            Some("frequency_penalty")
        } else if p.repetition_penalty != 1.0 {
            Some("repetition_penalty")
        } else if !p.logit_bias.is_empty() {
            Some("logit_bias")
        } else if !p.allowed_tokens.is_empty() {
            Some("allowed_token_ids")
        } else if !p.bad_words.is_empty() {
            Some("bad_words")
        } else if !p.logprob_token_ids.is_empty() {
            Some("logprob_token_ids")
        } else if min_tokens > 0 || !p.banned_tokens.is_empty() {
            Some("min_tokens")
        } else {
            None
        }
    }
}

/// Compilation events of an ahead-of-time compiling runner, readable by the metrics endpoint
/// while the engine thread owns the runner (relaxed atomics: counters, not synchronisation).
#[derive(Debug, Default)]
pub struct CompileCounters {
    pub compilations: std::sync::atomic::AtomicU64,
    pub cache_hits: std::sync::atomic::AtomicU64,
    pub cache_misses: std::sync::atomic::AtomicU64,
    pub compile_micros: std::sync::atomic::AtomicU64,
    pub after_warmup: std::sync::atomic::AtomicU64,
}

pub trait ModelRunner: Send {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, RunnerError>;
    /// Compilation counters, for runners that compile programs.
    fn compile_counters(&self) -> Option<Arc<CompileCounters>> {
        None
    }
    /// Which sampling parameters the runner can honour.
    fn sampling_support(&self) -> SamplingSupport {
        SamplingSupport::Full
    }
    fn kv_cache_shape(&self) -> KvCacheShape;
    fn vocab_size(&self) -> usize;
    /// Short name for logs (`cpu`, `xla-cpu x8`, ...).
    fn describe(&self) -> String;
}

/// Checks the invariants every runner relies on, so a bad plan is an error, not a panic.
pub fn validate_plan(plan: &StepPlan, kv: KvCacheShape) -> Result<(), RunnerError> {
    let n = plan.token_ids.len();
    let bad = |m: String| Err(RunnerError::InvalidPlan(m));
    if plan.positions.len() != n || plan.slot_mapping.len() != n {
        return bad(format!(
            "{n} tokens but {} positions and {} slots",
            plan.positions.len(),
            plan.slot_mapping.len()
        ));
    }
    let capacity = kv.num_blocks * kv.block_size;
    if let Some(s) = plan.slot_mapping.iter().find(|&&s| s as usize >= capacity) {
        return bad(format!("slot {s} outside the KV cache ({capacity} slots)"));
    }
    let mut next = 0;
    for s in &plan.seqs {
        if s.query_start != next || s.query_len == 0 {
            return bad(format!(
                "sequence {} spans are not contiguous and non-empty",
                s.seq_id
            ));
        }
        next += s.query_len;
        if s.context_len < s.query_len {
            return bad(format!(
                "sequence {}: context shorter than its query",
                s.seq_id
            ));
        }
        if s.block_table.len() * kv.block_size < s.context_len {
            return bad(format!("sequence {}: block table too short", s.seq_id));
        }
        if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= kv.num_blocks) {
            return bad(format!("sequence {}: block {b} out of range", s.seq_id));
        }
        if s.prompt_logprob_targets.len() > s.query_len {
            return bad(format!(
                "sequence {}: too many prompt logprob targets",
                s.seq_id
            ));
        }
    }
    if next != n {
        return bad(format!("sequences cover {next} of {n} tokens"));
    }
    Ok(())
}
