//! What flows back to the server: one [`RequestOutput`] event per step in which a request
//! made progress, over a per-request tokio channel so async code can await it.

use tokio::sync::mpsc::UnboundedReceiver;
use tpuserve_runner_api::{TokenId, TokenLogprobs};

use crate::request::{Finish, RequestId};

/// Facts about the prompt, sent once, with the first event of a request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptInfo {
    pub num_prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache (vLLM's `num_cached_tokens`).
    pub num_cached_tokens: usize,
    /// With `prompt_logprobs`: one entry per prompt token, the first `None` (vLLM layout).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

/// News for one child sequence (`index` in 0..n).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqDelta {
    pub index: usize,
    pub token_ids: Vec<TokenId>,
    /// Text completed by these tokens; may lag the tokens while a character or a possible
    /// stop string is incomplete, and catches up by the final event.
    pub text: String,
    /// With `logprobs`: one entry per token in `token_ids`.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// Set in this child's last delta.
    pub finish: Option<Finish>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOutput {
    pub request_id: RequestId,
    /// `Some` in the first event only.
    pub prompt: Option<PromptInfo>,
    /// Only children with news.
    pub seqs: Vec<SeqDelta>,
    /// All children are finished; this is the last event.
    pub finished: bool,
    /// Why the request failed (finish reason `error`): a runner error message.
    pub error: Option<String>,
}

/// One child's accumulated result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompletionOutput {
    pub index: usize,
    pub token_ids: Vec<TokenId>,
    pub text: String,
    pub logprobs: Option<Vec<TokenLogprobs>>,
    pub finish: Option<Finish>,
}

/// A whole request's result, built by folding its events (the non-streaming response).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FinalOutput {
    pub request_id: RequestId,
    pub prompt: PromptInfo,
    /// Indexed by child.
    pub outputs: Vec<CompletionOutput>,
    pub finished: bool,
    pub error: Option<String>,
}

impl FinalOutput {
    pub fn new(request_id: RequestId) -> Self {
        FinalOutput {
            request_id,
            ..Default::default()
        }
    }

    pub fn apply(&mut self, ev: RequestOutput) {
        if let Some(p) = ev.prompt {
            self.prompt = p;
        }
        for d in ev.seqs {
            while self.outputs.len() <= d.index {
                let index = self.outputs.len();
                self.outputs.push(CompletionOutput {
                    index,
                    ..Default::default()
                });
            }
            let o = &mut self.outputs[d.index];
            o.token_ids.extend(d.token_ids);
            o.text.push_str(&d.text);
            if let Some(lp) = d.logprobs {
                o.logprobs.get_or_insert_with(Vec::new).extend(lp);
            }
            if d.finish.is_some() {
                o.finish = d.finish;
            }
        }
        self.finished |= ev.finished;
        if ev.error.is_some() {
            self.error = ev.error;
        }
    }
}

/// The receiving end of one request. Dropping it aborts the request.
#[derive(Debug)]
pub struct RequestStream {
    pub id: RequestId,
    pub receiver: UnboundedReceiver<RequestOutput>,
}

impl RequestStream {
    /// The next event; `None` after the last one (or if the engine stopped).
    pub async fn next(&mut self) -> Option<RequestOutput> {
        self.receiver.recv().await
    }

    /// Blocking variant for non-async threads (never call it inside a tokio runtime).
    pub fn blocking_next(&mut self) -> Option<RequestOutput> {
        self.receiver.blocking_recv()
    }

    /// All events folded into the final result.
    pub async fn collect(mut self) -> FinalOutput {
        let mut out = FinalOutput::new(self.id);
        while let Some(ev) = self.next().await {
            out.apply(ev);
        }
        out
    }

    pub fn collect_blocking(mut self) -> FinalOutput {
        let mut out = FinalOutput::new(self.id);
        while let Some(ev) = self.blocking_next() {
            out.apply(ev);
        }
        out
    }
}
