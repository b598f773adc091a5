//! `use_beam_search` as vLLM's `beam_search` runs it (on completions and chat): the beam width
//! is `n`; each step asks the engine for the next-token logprobs of every live beam (one
//! 1-token request per beam, `2 × width` alternatives; the prefix cache makes the shared
//! prefixes cheap), extends each beam by those alternatives, and keeps the best `width` by
//! score. A beam that draws EOS (unless `ignore_eos`) is complete. At the end the complete and
//! the live beams are sorted by score, cumulative logprob / length^length_penalty (length
//! counting the prompt, without a final EOS), and the best `width` are the choices.

use std::sync::Arc;

use tpuserve_engine::{
    EngineRequest, FinishReason, RequestStream, SamplingParams, StopParams, TokenLogprobs,
};

use crate::error::ApiError;
use crate::state::SharedState;

/// What a beam search needs from the request.
#[derive(Debug, Clone, Copy)]
pub struct BeamParams {
    pub width: usize,
    pub max_tokens: usize,
    pub length_penalty: f64,
    pub ignore_eos: bool,
    pub include_stop_str_in_output: bool,
}

/// One finished hypothesis.
#[derive(Debug, Clone)]
pub struct Beam {
    pub tokens: Vec<u32>,
    /// The chosen token's logprob entry at each step (alternatives included).
    pub logprobs: Vec<TokenLogprobs>,
    pub cum_logprob: f64,
    pub finish: FinishReason,
    /// The EOS id that ended it.
    pub stop_token: Option<u32>,
}

fn score(prompt_len: usize, b: &Beam, eos: &[u32], length_penalty: f64) -> f64 {
    let mut len = prompt_len + b.tokens.len();
    if b.tokens.last().is_some_and(|t| eos.contains(t)) {
        len -= 1;
    }
    b.cum_logprob / (len.max(1) as f64).powf(length_penalty)
}

/// Sorts beams by score, best first.
fn best_first(beams: &mut [Beam], prompt_len: usize, eos: &[u32], length_penalty: f64) {
    beams.sort_by(|a, b| {
        score(prompt_len, b, eos, length_penalty).total_cmp(&score(
            prompt_len,
            a,
            eos,
            length_penalty,
        ))
    });
}

/// Queues the 1-token request that yields the next-token logprobs (top `k` and the greedy
/// choice) after `tokens`.
fn ask(
    st: &SharedState,
    tokens: Vec<u32>,
    k: usize,
    v: &crate::validate::Validated,
) -> Result<RequestStream, ApiError> {
    let sampling = SamplingParams {
        temperature: 0.0,
        logprobs: Some(k),
        ..Default::default()
    };
    let stop = StopParams {
        max_tokens: Some(1),
        ignore_eos: true,
        ..Default::default()
    };
    let mut req = EngineRequest::new(tokens, sampling, stop);
    req.cache_salt = v.cache_salt.clone();
    req.priority = v.priority;
    let req = st.engine.validate(req)?;
    Ok(st.engine.add(req)?)
}

async fn answer(stream: RequestStream) -> Result<TokenLogprobs, ApiError> {
    let fin = stream.collect().await;
    if let Some(e) = fin.error {
        return Err(ApiError::internal(format!("generation failed: {e}")));
    }
    fin.outputs
        .into_iter()
        .next()
        .and_then(|o| o.logprobs)
        .and_then(|l| l.into_iter().next())
        .ok_or_else(|| ApiError::internal("beam search: the engine returned no logprobs"))
}

/// Runs the search from `prompt`; returns the best `width` beams, best first. Every step's
/// requests carry the request's `cache_salt` and `priority` (from `v`).
pub async fn search(
    st: &SharedState,
    prompt: &[u32],
    p: BeamParams,
    v: &crate::validate::Validated,
) -> Result<Vec<Beam>, ApiError> {
    let eos: Arc<[u32]> = st.eos_token_ids.clone().into();
    // vLLM asks for 2 × width alternatives; the server's --max-logprobs bounds them.
    let limits = st.limits();
    let k = (2 * p.width).min(limits.max_logprobs).max(1);
    let room = limits.max_model_len.saturating_sub(prompt.len());
    let steps = p.max_tokens.min(room);
    let mut live = vec![Beam {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        cum_logprob: 0.0,
        finish: FinishReason::Length,
        stop_token: None,
    }];
    let mut complete = Vec::new();
    for _ in 0..steps {
        // Every beam's request is queued before any is awaited: the engine batches them.
        let asks = live
            .iter()
            .map(|b| {
                let mut t = prompt.to_vec();
                t.extend(&b.tokens);
                ask(st, t, k, v)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut nexts = Vec::with_capacity(asks.len());
        for a in asks {
            nexts.push(answer(a).await?);
        }
        let mut grown = Vec::new();
        for (beam, next) in live.iter().zip(nexts) {
            let mut cands: Vec<(u32, f32)> = next.top.clone();
            if !cands.iter().any(|c| c.0 == next.token) {
                cands.push((next.token, next.logprob));
            }
            for (tok, lp) in cands {
                let mut b = beam.clone();
                b.cum_logprob += lp as f64;
                b.logprobs.push(TokenLogprobs {
                    token: tok,
                    logprob: lp,
                    rank: next
                        .top
                        .iter()
                        .position(|c| c.0 == tok)
                        .map_or(k + 1, |r| r + 1),
                    top: next.top.clone(),
                });
                b.tokens.push(tok);
                if !p.ignore_eos && eos.contains(&tok) {
                    b.finish = FinishReason::Stop;
                    b.stop_token = Some(tok);
                    complete.push(b);
                } else {
                    grown.push(b);
                }
            }
        }
        best_first(&mut grown, prompt.len(), &eos, p.length_penalty);
        grown.truncate(p.width);
        live = grown;
        if live.is_empty() {
            break;
        }
    }
    complete.extend(live);
    best_first(&mut complete, prompt.len(), &eos, p.length_penalty);
    complete.truncate(p.width);
    if !p.include_stop_str_in_output {
        for b in &mut complete {
            if b.stop_token.is_some() {
                b.tokens.pop();
                b.logprobs.pop();
            }
        }
    }
    Ok(complete)
}

/// A finished beam as the routes show it.
pub struct Shown {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Chosen-token logprobs, alternatives limited to what the request asked for.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    pub finish_reason: &'static str,
    pub stop_reason: serde_json::Value,
}

/// Decodes the beams and trims their logprobs to `want_logprobs` alternatives.
pub fn show(
    st: &SharedState,
    beams: Vec<Beam>,
    skip_special_tokens: bool,
    want_logprobs: Option<usize>,
) -> Vec<Shown> {
    beams
        .into_iter()
        .map(|b| Shown {
            text: st
                .tokenizer
                .decode(&b.tokens, skip_special_tokens)
                .unwrap_or_default(),
            logprobs: want_logprobs.map(|k| {
                b.logprobs
                    .iter()
                    .map(|l| {
                        let mut l = l.clone();
                        l.top.truncate(k);
                        l
                    })
                    .collect()
            }),
            token_ids: b.tokens,
            finish_reason: b.finish.as_str(),
            stop_reason: b.stop_token.map_or(serde_json::Value::Null, |t| t.into()),
        })
        .collect()
}
