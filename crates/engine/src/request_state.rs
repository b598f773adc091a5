//! Engine-side state of a request between steps: per child, the incremental detokenizer,
//! the stop checker, the timeline for stats and the delta not yet sent; per request, the
//! output channel and the prompt facts sent with the first event.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tpuserve_runner_api::{SampledToken, TokenId, TokenLogprobs};

use crate::detokenizer::{DecodeError, IncrementalDetokenizer, TokenDecoder};
use crate::output::{RequestOutput, SeqDelta};
use crate::request::{Finish, FinishReason, RequestId, SeqId};
use crate::stats::FinishedSeqStats;
use crate::stop::StopChecker;

/// Per-step accumulation of what [`crate::stats::StepStats`] reports.
#[derive(Debug, Default)]
pub(crate) struct StepAcc {
    pub(crate) num_prompt_tokens: usize,
    pub(crate) num_generation_tokens: usize,
    pub(crate) ttft: Vec<Duration>,
    pub(crate) itl: Vec<Duration>,
    pub(crate) finished: Vec<FinishedSeqStats>,
}

/// Engine-side state of one child sequence: its text and stop conditions, its timeline and
/// the delta not yet sent.
pub(crate) struct Child {
    pub(crate) seq_id: SeqId,
    pub(crate) detok: IncrementalDetokenizer,
    pub(crate) stop: StopChecker,
    pub(crate) finish: Option<Finish>,
    pub(crate) num_generated: usize,
    pub(crate) first_scheduled: Option<Instant>,
    pub(crate) first_token: Option<Instant>,
    pub(crate) last_token: Option<Instant>,
    pub(crate) delta: SeqDelta,
    pub(crate) dirty: bool,
    /// Structured output: the grammar state after the tokens accepted so far.
    pub(crate) matcher: Option<llguidance::Matcher>,
}

pub(crate) struct RequestState {
    pub(crate) tx: UnboundedSender<RequestOutput>,
    pub(crate) n: usize,
    pub(crate) prompt_len: usize,
    pub(crate) max_tokens: Option<usize>,
    pub(crate) arrival: Instant,
    /// Accumulated from child 0 while its prompt is computed; `None` if not requested.
    pub(crate) prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub(crate) num_cached_tokens: usize,
    pub(crate) prompt_sent: bool,
    pub(crate) children: Vec<Child>,
}

impl RequestState {
    pub(crate) fn finished_stats(
        &self,
        id: RequestId,
        index: usize,
        now: Instant,
    ) -> FinishedSeqStats {
        let c = &self.children[index];
        FinishedSeqStats {
            request_id: id,
            index,
            n: self.n,
            finish_reason: c.finish.as_ref().map_or(FinishReason::Abort, |f| f.reason),
            num_prompt_tokens: self.prompt_len,
            num_generation_tokens: c.num_generated,
            max_tokens: self.max_tokens,
            arrival: self.arrival,
            first_scheduled: c.first_scheduled,
            first_token: c.first_token,
            last_token: c.last_token,
            finished: now,
        }
    }
}

impl Child {
    pub(crate) fn set_finish(&mut self, f: Finish) {
        self.delta.finish = Some(f.clone());
        self.finish = Some(f);
        self.dirty = true;
    }

    /// Advances the grammar by a sampled token. A complete grammar does not end the sequence:
    /// as in vLLM, its next mask allows only the end tokens (`compute_mask_or_eos`), so the
    /// answer ends with one of them — counted, in `token_ids` and logprobs — or with `length`.
    /// An end token is left to the stop checker and ends the grammar (under `ignore_eos` what
    /// follows is unconstrained, as vLLM's terminated grammar).
    pub(crate) fn advance_grammar(
        &mut self,
        token: TokenId,
        eos: &[TokenId],
    ) -> Result<(), String> {
        let Some(m) = self.matcher.as_mut() else {
            return Ok(());
        };
        if eos.contains(&token) {
            self.matcher = None;
            return Ok(());
        }
        m.consume_token(token).map_err(|e| {
            format!("structured output: the sampled token {token} does not follow the grammar: {e}")
        })?;
        Ok(())
    }

    /// Takes one sampled token: timings, text, stop conditions. Returns whether the sequence
    /// is finished.
    pub(crate) fn accept(
        &mut self,
        dec: &dyn TokenDecoder,
        sampled: SampledToken,
        now: Instant,
        arrival: Instant,
        acc: &mut StepAcc,
    ) -> Result<bool, DecodeError> {
        let token = sampled.token;
        self.num_generated += 1;
        let n = self.num_generated;
        self.dirty = true;
        self.delta.token_ids.push(token);
        if let Some(lp) = sampled.logprobs {
            self.delta.logprobs.get_or_insert_with(Vec::new).push(lp);
        }
        match self.last_token {
            None => acc.ttft.push(now.saturating_duration_since(arrival)),
            Some(prev) => acc.itl.push(now.saturating_duration_since(prev)),
        }
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        acc.num_generation_tokens += 1;

        let repetition = self.stop.check_repetition(token, n);
        let mut finish = self.stop.check_token(token, n);
        let mut by_stop_string = false;
        if finish.is_none() {
            let text = self.detok.push(dec, token)?;
            finish = self.stop.push_text(&text, n);
            by_stop_string = finish.is_some();
        } else if self.stop.keeps_stop_token_text() {
            let text = self.detok.push(dec, token)?;
            self.stop.append_text(&text);
        }
        if finish.is_none() {
            finish = self.stop.check_length(n);
        }
        if finish.is_none() {
            finish = repetition;
        }
        // A finished sequence releases a trailing incomplete character too; after a stop
        // string the rest is cut anyway.
        if finish.is_some() && !by_stop_string {
            let rest = self.detok.flush(dec)?;
            match self.stop.push_text(&rest, n) {
                Some(f)
                    if finish
                        .as_ref()
                        .is_some_and(|f| f.reason == FinishReason::Length) =>
                {
                    finish = Some(f)
                }
                _ => {}
            }
        }
        self.delta
            .text
            .push_str(&self.stop.take_text(finish.is_some()));
        match finish {
            Some(f) => {
                self.set_finish(f);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
