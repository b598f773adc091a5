//! What a request is: ids, prompt, sampling and stop settings (checked by the engine's gate,
//! `validation.rs`, before anything is queued), and how a finished sequence reports why it
//! ended.
//!
//! Lifecycle of every child sequence: waiting → running → finished (stop / length / abort /
//! error); a running sequence that loses its KV blocks is preempted back to the front of the
//! waiting queue and recomputed later.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tpuserve_runner_api::{SamplingParams, TokenId};

/// Engine-wide identity of a request (all its `n` children).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl RequestId {
    /// A process-unique id; the server keeps its own string id (`cmpl-…`) beside it.
    pub fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        RequestId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// Identity of one child sequence inside the scheduler; also the runner's `seq_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Index of a physical KV block in the runner's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// When generation ends, and what the output text looks like (vLLM's `SamplingParams` stop
/// and detokenization fields).
#[derive(Debug, Clone, PartialEq)]
pub struct StopParams {
    /// Generated tokens at most; `None` = until `max_model_len`.
    pub max_tokens: Option<usize>,
    /// EOS and `stop_token_ids` are banned, and stop strings ignored, until this many tokens.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<TokenId>,
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
    /// vLLM's `repetition_detection`: end the sequence when its output ends in a repeated
    /// n-gram.
    pub repetition: Option<RepetitionDetection>,
}

/// vLLM's `RepetitionDetectionParams` (checked by the server): the output's last
/// `min_count` runs of `n` tokens are equal, for some `n` in `min_pattern_size ..=
/// max_pattern_size` (`min_pattern_size` 0 counts as 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepetitionDetection {
    pub max_pattern_size: usize,
    pub min_pattern_size: usize,
    pub min_count: usize,
}

impl RepetitionDetection {
    /// Whether `tokens` end in a pattern repeated `min_count` times (vLLM's
    /// `check_sequence_repetition`: shorter patterns first, stopping at the first length
    /// whose repeats would not fit).
    pub fn detects(&self, tokens: &[TokenId]) -> bool {
        let lo = self.min_pattern_size.max(1);
        if self.max_pattern_size == 0 || self.min_count < 2 || lo > self.max_pattern_size {
            return false;
        }
        for len in lo..=self.max_pattern_size {
            if len.saturating_mul(self.min_count) > tokens.len() {
                return false;
            }
            let tail = &tokens[tokens.len() - len..];
            if (1..self.min_count).all(|m| {
                let end = tokens.len() - len * m;
                &tokens[end - len..end] == tail
            }) {
                return true;
            }
        }
        false
    }
}

impl Default for StopParams {
    fn default() -> Self {
        StopParams {
            max_tokens: Some(16),
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            repetition: None,
        }
    }
}

/// A request as the server builds it: tokenized and typed, not yet checked against the
/// engine's limits ([`crate::RequestLimits::validate`] turns it into a
/// [`crate::ValidatedRequest`]).
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub id: RequestId,
    pub prompt_token_ids: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Independent samples sharing the prompt; child `i` of a seeded request uses `seed + i`.
    pub n: usize,
    /// vLLM's `best_of`: only `None` or `n` is accepted (V1 samples exactly `n`).
    pub best_of: Option<usize>,
    /// When the server received it (queue time and TTFT are measured from here).
    pub arrival: Instant,
    /// Structured output: every child's tokens must follow this grammar.
    pub constraint: Option<crate::structured::Constraint>,
    /// vLLM's `cache_salt`: prefix-cache blocks are shared only with requests of the same
    /// salt (none: with unsalted requests).
    pub cache_salt: Option<String>,
    /// vLLM's `priority`: with `--scheduling-policy priority`, lower values are served first.
    pub priority: i64,
}

impl EngineRequest {
    pub fn new(prompt_token_ids: Vec<TokenId>, sampling: SamplingParams, stop: StopParams) -> Self {
        EngineRequest {
            id: RequestId::fresh(),
            prompt_token_ids,
            sampling,
            stop,
            n: 1,
            best_of: None,
            arrival: Instant::now(),
            constraint: None,
            cache_salt: None,
            priority: 0,
        }
    }

    /// The sampling settings of child `index`: its own seed so that siblings differ.
    pub fn child_sampling(&self, index: usize) -> SamplingParams {
        let mut p = self.sampling.clone();
        p.seed = p.seed.map(|s| s.wrapping_add(index as u64));
        p
    }
}

/// Why a sequence ended, as the OpenAI `finish_reason` field spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or `max_model_len` reached.
    Length,
    /// Cancelled from outside (client gone, explicit abort, engine shutdown).
    Abort,
    /// The runner failed on a step this request was part of.
    Error,
    /// `repetition_detection` found a repeated pattern (vLLM's `repetition`).
    Repetition,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
            FinishReason::Repetition => "repetition",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// vLLM's `stop_reason`: which stop string or stop token id ended the sequence
/// (`None` in [`Finish`] when it was EOS, length, abort or error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Token(TokenId),
    String(String),
    /// `repetition_detection` (vLLM reports `"repetition_detected"`).
    Repetition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    pub stop_reason: Option<StopReason>,
}

impl Finish {
    pub fn new(reason: FinishReason) -> Self {
        Finish {
            reason,
            stop_reason: None,
        }
    }
}

/// Where a child sequence is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued (new, or preempted and waiting to be recomputed).
    Waiting,
    /// Holds KV blocks and is scheduled every step the budget allows.
    Running,
}
