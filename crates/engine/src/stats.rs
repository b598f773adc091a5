//! Per-step statistics for the metrics and the periodic log line. The engine only produces
//! data ([`StepStats`], sent over unbounded channels so it never waits on an observer);
//! rendering them as vLLM's Prometheus metrics is the server's job.
//!
//! Mapping to vLLM's metrics:
//! - gauges `num_requests_running/waiting`, `kv_cache_usage_perc`: the latest step's fields;
//! - counters `prompt_tokens_total`, `generation_tokens_total`, `num_preemptions_total`,
//!   `prefix_cache_queries/hits_total`: sums of the per-step fields;
//! - histogram `iteration_tokens_total`: `num_prompt_tokens + num_generation_tokens` per step;
//! - histograms `time_to_first_token_seconds`, `inter_token_latency_seconds`: the per-step
//!   lists;
//! - per finished sequence ([`FinishedSeqStats`]): `e2e_request_latency_seconds`,
//!   `request_queue_time_seconds`, `request_prefill_time_seconds`,
//!   `request_decode_time_seconds`, `request_inference_time_seconds`,
//!   `request_prompt_tokens`, `request_generation_tokens`, `request_params_max_tokens`,
//!   `request_params_n` (observe once per request: where `index == 0`),
//!   `request_success_total{finished_reason}`.

use std::time::{Duration, Instant};

use crate::request::{FinishReason, RequestId};

#[derive(Debug, Clone)]
pub struct StepStats {
    /// 1, 2, 3, … in publishing order ([`crate::EngineCore::stats_published`] is the last).
    pub seq: u64,
    /// When the step ended.
    pub at: Instant,
    /// Time spent in the runner.
    pub execute_time: Duration,
    /// After the step.
    pub num_running: usize,
    pub num_waiting: usize,
    /// Fraction of KV blocks in use after the step, 0..1.
    pub kv_cache_usage: f64,
    /// Prefix-cache lookups this step, in tokens.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// vLLM's prompt-token count: the full prompt length (cached part included) of each
    /// request whose first token came out this step.
    pub num_prompt_tokens: usize,
    /// Tokens sampled this step.
    pub num_generation_tokens: usize,
    /// Tokens the runner actually computed this step (prefill chunks, recomputes, decodes).
    pub num_scheduled_tokens: usize,
    pub num_preemptions: usize,
    /// Arrival → first token, for each sequence whose first token came this step.
    pub time_to_first_token: Vec<Duration>,
    /// Previous token → this token, for each non-first token of this step.
    pub inter_token_latencies: Vec<Duration>,
    pub finished: Vec<FinishedSeqStats>,
}

/// Timeline of one finished child sequence (a request with `n > 1` yields `n` of these).
#[derive(Debug, Clone)]
pub struct FinishedSeqStats {
    pub request_id: RequestId,
    pub index: usize,
    /// The request's `n`.
    pub n: usize,
    pub finish_reason: FinishReason,
    pub num_prompt_tokens: usize,
    pub num_generation_tokens: usize,
    /// The request's `max_tokens` parameter, if it set one.
    pub max_tokens: Option<usize>,
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub finished: Instant,
}

fn span(from: Option<Instant>, to: Option<Instant>) -> Option<Duration> {
    Some(to?.saturating_duration_since(from?))
}

impl FinishedSeqStats {
    /// Arrival → finish.
    pub fn e2e_latency(&self) -> Duration {
        self.finished.saturating_duration_since(self.arrival)
    }

    /// Arrival → first scheduled.
    pub fn queue_time(&self) -> Option<Duration> {
        span(Some(self.arrival), self.first_scheduled)
    }

    pub fn time_to_first_token(&self) -> Option<Duration> {
        span(Some(self.arrival), self.first_token)
    }

    /// First scheduled → first token.
    pub fn prefill_time(&self) -> Option<Duration> {
        span(self.first_scheduled, self.first_token)
    }

    /// First token → last token.
    pub fn decode_time(&self) -> Option<Duration> {
        span(self.first_token, self.last_token)
    }

    /// First scheduled → last token.
    pub fn inference_time(&self) -> Option<Duration> {
        span(self.first_scheduled, self.last_token)
    }
}
